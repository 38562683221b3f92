"""Faults with real servers: the FHE node restarted mid-step, the coordinator restarted mid-federation."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from conftest import ServerThread
from fedkit import FAST, RecordingWorker, federation

from common.config import ChannelConfig, ServerConfig
from common.lwe.params import EXACT
from common.lwe.prg import DeterministicRandomness
from common.messages import config_from_proto
from common.models import load_model
from common.rpc import start_server
from common.stages import PublicWeights
from common.training import TrainingConfig
from coordinator.state import Settings
from fedfhe.v1 import fhe_pb2_grpc
from fhe_server.__main__ import SERVICE
from fhe_server.node import Node
from fhe_server.service import FheServicer
from worker.lora import lora_state_dict
from worker.model import LoraConfig
from worker.runtime import build
from worker.train import DpSettings, Trainer

pytestmark = pytest.mark.timeout(300)


class FlakyNode(Node):
    """A node whose owner is told (once) when the n-th product starts: the moment to pull the plug."""

    def __init__(self, *args, crash_at: int, on_crash: threading.Event, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.calls, self.crash_at, self.on_crash = 0, crash_at, on_crash

    def multiply(self, session, request_id, key, data):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.calls == self.crash_at:
            self.on_crash.set()
            threading.Event().wait(0.5)  # the node dies while this product is in flight
        return super().multiply(session, request_id, key, data)


class RestartableNode:
    def __init__(self, node: Node) -> None:
        self.node, self.port, self.restarts = node, 0, 0
        self.thread = self._start()
        self.port = self.thread.running.port

    def _start(self) -> ServerThread:
        servicer = FheServicer(self.node)

        async def start():  # type: ignore[no-untyped-def]
            return await start_server(ServerConfig(insecure=True, listen=f"127.0.0.1:{self.port}"),
                                      lambda s: fhe_pb2_grpc.add_FheServiceServicer_to_server(servicer, s),
                                      [SERVICE])
        return ServerThread(start)

    def restart(self) -> None:
        self.thread.stop()  # in-flight calls are cancelled: the client sees its stream break
        self.thread = self._start()
        self.restarts += 1


def train_through_node(weights: PublicWeights, crash_at: int | None) -> tuple[dict, int, int]:
    crash = threading.Event()
    node = RestartableNode(Node(weights) if crash_at is None else FlakyNode(weights, crash_at=crash_at, on_crash=crash))
    restarter = threading.Thread(target=lambda: crash.wait(60) and node.restart(), daemon=True)
    restarter.start()
    rt = build("fhe", "tiny", EXACT, LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "down"), seed=2),
               fhe_target=f"127.0.0.1:{node.port}", channel=ChannelConfig(insecure=True))
    try:
        records = [list(f"Patient {i} admitted with chest pain; troponin {i % 7}.".encode()) for i in range(16)]
        trainer = Trainer(rt.model, records, DpSettings(epsilon=6.0), rng=DeterministicRandomness(9))
        cfg = TrainingConfig(local_steps=3, batch_size=4, learning_rate=2e-2, lora_rank=4, lora_alpha=8.0,
                             lora_targets=("q", "v", "down"), max_seq_len=48, total_rounds=1)
        trainer.train_round(cfg)
        assert rt.client is not None
        return lora_state_dict(rt.model), rt.client.sessions_opened, node.restarts
    finally:
        rt.close()
        crash.set()
        node.thread.stop()


def test_fhe_node_restarted_mid_step_gives_the_uninterrupted_result() -> None:
    weights = PublicWeights(load_model("tiny"))
    want, sessions, restarts = train_through_node(weights, crash_at=None)
    assert (sessions, restarts) == (1, 0)
    got, sessions, restarts = train_through_node(weights, crash_at=20)  # mid-way through the first backward
    assert restarts == 1 and sessions == 2  # it reconnected, reopened its session and repeated the product
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert max(float(v.abs().max()) for v in want.values()) > 0


async def test_coordinator_restart_is_restored_by_a_worker_and_the_federation_continues(tmp_path: Path) -> None:
    settings = Settings(min_workers=2, deadline_seconds=60)
    names = ["hospital-1", "hospital-2"]
    async with federation(tmp_path, names, settings) as fx:
        assert (await fx.op.round(FAST)).outcome == 1
        assert (await fx.op.round(FAST)).outcome == 1
        await fx.wait_applied(2)
        held = {k: v.clone() for k, v in fx.workers["hospital-1"].global_state.items()}
        await fx.restart_coordinator(settings)  # its memory-only buffers are gone by design
        assert fx.fed.rounds == {}
        await fx.op.wait_connected(names, timeout=60)
        await fx.wait(lambda: fx.fed.latest_patch_round == 2)  # a worker re-seeded it with the round-2 adapter
        assert fx.fed.rounds[2].restored
        closed = await fx.op.round(FAST)
        assert closed.round == 3 and closed.outcome == 1  # the federation continues from the same round
        # round 3 started from the restored round-2 adapter, which both workers agree on
        await fx.wait_applied(3)
        assert any(not torch.equal(fx.workers["hospital-1"].global_state[k], held[k]) for k in held)
        await fx.finish()


class SlowWorker(RecordingWorker):
    """Trains slowly in the given rounds (a hospital with a busy GPU, say): until the event is set."""

    slow: ClassVar[dict[int, threading.Event]] = {}

    async def on_started(self, client, started):  # type: ignore[no-untyped-def]
        done = self.slow.get(started.round)
        if done is None:
            return await super().on_started(client, started)
        await asyncio.to_thread(self.ensure_model, config_from_proto(started.config))
        assert self.trainer is not None
        real = self.trainer.train_round

        def slow(cfg, progress=None):  # type: ignore[no-untyped-def]
            done.wait(120)
            return real(cfg, progress)
        self.trainer.train_round = slow  # type: ignore[method-assign]
        try:
            return await super().on_started(client, started)
        finally:
            del self.trainer.train_round


async def test_a_slow_worker_past_the_deadline_is_refused_and_catches_up(tmp_path: Path) -> None:
    names = ["hospital-1", "hospital-2", "hospital-3"]
    SlowWorker.slow = {1: threading.Event()}
    async with federation(tmp_path, names, Settings(min_workers=2, deadline_seconds=120),
                          classes={"hospital-3": SlowWorker}) as fx:
        first = await fx.op.round(FAST, deadline=20.0)  # the two others submit; hospital-3 is still training
        assert first.outcome == 1 and sorted(p.worker_id for p in first.participants) == names[:2]
        assert "deadline" in first.reason
        SlowWorker.slow[1].set()  # now it finishes, past the deadline
        slow = fx.workers["hospital-3"]
        assert slow.metrics_path is not None

        def events(kind: str) -> list[dict]:  # the file appears with the worker's first metric
            lines = slow.metrics_path.read_text().splitlines() if slow.metrics_path.exists() else []
            return [m for m in map(json.loads, lines) if m["event"] == kind]
        await fx.wait(lambda: bool(events("refused")))  # its update is refused: the round is closed
        assert events("refused")[0]["round"] == 1 and "late" in events("refused")[0]["reason"]
        assert fx.fed.rounds[1].submissions.keys() == set(names[:2])
        second = await fx.op.round(FAST)
        assert second.outcome == 1 and sorted(p.worker_id for p in second.participants) == names
        await fx.wait_applied(2)
        # it caught up: round 2 started from round 1's aggregate, and it applies round 2's like the others
        assert [a["round"] for a in events("applied")] == [1, 2]
        for k, v in fx.workers["hospital-1"].global_state.items():
            assert torch.equal(v, slow.global_state[k])
        await fx.finish()
