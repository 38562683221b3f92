"""A lying FHE node, built on the real node and servicer, is caught: forward and backward, every kind of lie.

Each case trains through an in-process node that tells the truth until it is armed, then lies once.
The step that received the lie raises NodeMisbehaved before its optimizer step, noise and privacy
charge: the adapter, the optimizer state and the accountant are bit-identical to what they were
after the previous step. A positive control shows that the same lie, unchecked, changes the adapter.
A federation test shows the worker's side: it declines the round with a reason GetStatus shows,
counts the rejection, and moves to the next node, where training continues.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import ServerThread
from fedkit import FAST, federation

from common.config import ChannelConfig, ServerConfig
from common.errors import NodeMisbehaved
from common.lwe.params import EXACT, LweParams
from common.lwe.prg import DeterministicRandomness
from common.lwe.verify import Verifier
from common.models import load_model
from common.rpc import RunningServer, start_server
from common.stages import Direction, PublicWeights, WeightKey
from common.training import TrainingConfig
from coordinator.state import Settings
from fedfhe.v1 import fhe_pb2, fhe_pb2_grpc
from fhe_server.__main__ import SERVICE
from fhe_server.node import HintInfo, Node
from fhe_server.service import FheServicer
from worker.fhe_client import FheClient
from worker.linears import FheEngine, QuantizedLinears
from worker.lora import lora_state_dict
from worker.model import LoraConfig, SplitLlama
from worker.train import DpSettings, Trainer

pytestmark = pytest.mark.timeout(600)
LORA = LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "down"), seed=2)
# Equal-length records, all of them in every step (Poisson rate 1): every step's products have the same
# shape, so a stale answer from the step before fits.
RECORDS = [list(f"Patient {i} had chest pain.".encode())[:16] for i in range(6)]
CFG = TrainingConfig(local_steps=2, batch_size=len(RECORDS), learning_rate=2e-2, lora_rank=4, lora_alpha=8.0,
                     lora_targets=("q", "v", "down"), max_seq_len=16, total_rounds=3)

PRODUCT_LIES = ("y+1", "+2^20·Δ at one entry", "+q/2 at one entry", "answer for another batch", "swapped stage",
                "unknown request id")
HINT_LIES = ("wrong hint", "wrong plan: act_bits", "wrong plan: row_scales")


class LyingNode(Node):
    """The real node, which tells one lie of the chosen kind once armed (in the chosen direction)."""

    def __init__(self, weights: PublicWeights, lie: str | None = None, direction: Direction = Direction.FORWARD,
                 ) -> None:
        super().__init__(weights)
        self.armed = threading.Event()
        self.plan_lie(lie, direction)

    def plan_lie(self, lie: str | None, direction: Direction) -> None:
        self.lie, self.direction = lie, direction
        self.armed.clear()
        self.told = 0
        self.rewrite_next_id = False
        self._last: dict[WeightKey, np.ndarray] = {}
        self._hints.clear()  # a lie about a hint must reach the worker, not a cached honest copy

    def _now(self, key: WeightKey) -> bool:
        return self.lie is not None and self.armed.is_set() and key.direction == self.direction and not self.told

    def product(self, params: LweParams, key: WeightKey, b: np.ndarray) -> np.ndarray:
        y = super().product(params, key, b)
        stale, self._last[key] = self._last.get(key), y
        if not self._now(key) or self.lie not in PRODUCT_LIES:
            return y
        self.told += 1
        y = y.copy()
        with np.errstate(over="ignore"):
            if self.lie == "y+1":
                y[0, 0] += params.dtype(1)
            elif self.lie == "+2^20·Δ at one entry":
                y[1, 0] += params.dtype((1 << 20) << self.weights.plan(params, key).delta_bits)
            elif self.lie == "+q/2 at one entry":
                y[2, 1] += params.dtype(params.q // 2)
            elif self.lie == "answer for another batch":
                assert stale is not None and stale.shape == y.shape
                y = stale
            elif self.lie == "swapped stage":
                y = super().product(params, dataclasses.replace(key, layer=1 - key.layer), b)
            elif self.lie == "unknown request id":
                self.rewrite_next_id = True
        return y

    def hint(self, params: LweParams, seed: bytes, key: WeightKey) -> np.ndarray:
        h = super().hint(params, seed, key)
        if self._now(key) and self.lie == "wrong hint":
            self.told += 1
            h = h.copy()
            h[3, 5] += params.dtype(1)
        return h

    def hint_info(self, params: LweParams, key: WeightKey) -> HintInfo:
        info = super().hint_info(params, key)
        if self._now(key) and self.lie == "wrong plan: act_bits":
            self.told += 1
            return dataclasses.replace(info, plan=dataclasses.replace(info.plan, act_bits=info.plan.act_bits - 1))
        if self._now(key) and self.lie == "wrong plan: row_scales" and info.row_scales is not None:
            self.told += 1
            return dataclasses.replace(info, row_scales=info.row_scales * np.float32(1.001))
        return info


class LyingServicer(FheServicer):
    """The real servicer; for the unknown-id lie it labels one answer with a request id nobody asked for."""

    async def Evaluate(self, request_iterator: Any, context: Any) -> AsyncIterator[fhe_pb2.EvaluateResponse]:
        node = self.node
        assert isinstance(node, LyingNode)
        async for resp in super().Evaluate(request_iterator, context):
            if resp.WhichOneof("kind") == "result" and node.rewrite_next_id:
                node.rewrite_next_id = False
                resp.result.request_id += 1000
            yield resp


def serve(node: LyingNode) -> ServerThread:
    servicer = LyingServicer(node)

    async def start() -> RunningServer:
        return await start_server(ServerConfig(insecure=True),
                                  lambda s: fhe_pb2_grpc.add_FheServiceServicer_to_server(servicer, s), [SERVICE])
    return ServerThread(start)


@pytest.fixture(scope="module")
def public() -> PublicWeights:
    return PublicWeights(load_model("tiny"))


@dataclasses.dataclass
class Setup:
    node: LyingNode
    client: FheClient
    engine: FheEngine
    model: SplitLlama
    trainer: Trainer


@pytest.fixture(scope="module")
def nodes(public: PublicWeights) -> Iterator[list[tuple[LyingNode, ServerThread]]]:
    """Two nodes for the whole module (a liar and an honest one, reconfigured per test)."""
    pair = [(node, serve(node)) for node in (LyingNode(public), LyingNode(public))]
    yield pair
    for _, thread in pair:
        thread.stop()


@pytest.fixture
def make(public: PublicWeights, nodes) -> Iterator[Any]:
    made: list[FheClient] = []

    def build(lie: str | None, direction: Direction = Direction.FORWARD) -> Setup:
        node, thread = nodes[len(made)]
        node.plan_lie(lie, direction)
        client = FheClient(thread.running.address, ChannelConfig(insecure=True), EXACT, "tiny",
                           weights_digest=public.digest)
        made.append(client)
        engine = FheEngine(client, public, rng=DeterministicRandomness(4))
        model = SplitLlama(public.model, QuantizedLinears(engine), LORA)
        trainer = Trainer(model, RECORDS, DpSettings(epsilon=8.0), rng=DeterministicRandomness(5))
        return Setup(node, client, engine, model, trainer)

    yield build
    for client in made:
        client.close()


def optimizer_state(trainer: Trainer) -> dict[str, Any]:
    assert trainer.optimizer is not None
    return copy.deepcopy(trainer.optimizer.state_dict()["state"])


def assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        elif isinstance(a[k], dict):
            assert_same_state(a[k], b[k])
        else:
            assert a[k] == b[k], k


@pytest.mark.parametrize("direction", [Direction.FORWARD, Direction.BACKWARD], ids=["forward", "backward"])
@pytest.mark.parametrize("lie", PRODUCT_LIES + HINT_LIES)
def test_every_lie_is_caught_and_the_step_changes_nothing(make, lie: str, direction: Direction) -> None:
    if lie == "wrong plan: row_scales" and direction == Direction.BACKWARD:
        pytest.skip("row scales travel with forward hints only (the backward rescaling is the worker's)")
    s = make(lie, direction)
    before: dict[str, Any] = {}

    def after_step(step: int) -> None:  # the lie comes in the second step
        before.update(lora=lora_state_dict(s.model), opt=optimizer_state(s.trainer), steps=s.trainer.steps_taken,
                      history=list(s.trainer.accountant.history))
        s.node.armed.set()

    if lie in HINT_LIES:  # hints and plans are fetched once, at the first use of each matrix: lie from the start
        s.node.armed.set()
        before.update(lora=lora_state_dict(s.model), opt={}, steps=0, history=[])
        progress = None
    else:
        progress = after_step
    with pytest.raises(NodeMisbehaved) as exc:
        s.trainer.train_round(CFG, progress)
    assert s.node.told == 1, "the lie was never told: the test would prove nothing"
    assert any(w in str(exc.value) for w in ("Freivalds", "plan", "request id", "hint")), str(exc.value)
    after = lora_state_dict(s.model)
    assert all(torch.equal(after[k], before["lora"][k]) for k in before["lora"])
    assert_same_state(optimizer_state(s.trainer), before["opt"])
    assert s.trainer.steps_taken == before["steps"] and s.trainer.accountant.history == before["history"]
    assert all(getattr(p, "grad_sample", None) is None for p in s.model.parameters() if p.requires_grad)
    s.client.abandon(str(exc.value))  # as the worker does: a fresh seed (and hints), the next node if any
    s.trainer.train_round(dataclasses.replace(CFG, local_steps=1))  # and it trains again: nothing stale left behind
    assert s.trainer.steps_taken == before["steps"] + 1


def test_positive_control_an_unchecked_lie_changes_the_adapter(make, monkeypatch) -> None:
    """Without the check, +q/2 in one backward product is accepted and silently changes the trained adapter."""
    honest, lying = make(None), make("+q/2 at one entry", Direction.BACKWARD)
    lying.node.armed.set()
    monkeypatch.setattr(Verifier, "compare", lambda *a, **k: None)
    honest.trainer.train_round(dataclasses.replace(CFG, local_steps=1))
    lying.trainer.train_round(dataclasses.replace(CFG, local_steps=1))
    assert lying.node.told == 1
    a, b = lora_state_dict(honest.model), lora_state_dict(lying.model)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_after_a_lie_the_client_stays_usable_and_honest_runs_are_unchanged(make) -> None:
    """The unknown-id lie fails one call; the next products (a new session) are exact again."""
    honest, lying = make(None), make("unknown request id")
    lying.node.armed.set()
    ids = torch.tensor([RECORDS[0]])
    with torch.no_grad(), pytest.raises(NodeMisbehaved, match="request id"):
        lying.model(ids)
    with torch.no_grad():
        np.testing.assert_array_equal(lying.model(ids).numpy(), honest.model(ids).numpy())
    assert lying.client.sessions_opened == 2


async def test_the_worker_declines_says_why_and_moves_to_the_next_node(tmp_path: Path, public) -> None:
    liar, honest = LyingNode(public, "+q/2 at one entry", Direction.BACKWARD), LyingNode(public, None,
                                                                                          Direction.FORWARD)
    liar.armed.set()
    threads = [serve(liar), serve(honest)]
    try:
        fhe = ",".join(t.running.address for t in threads)
        names = ["hospital-1", "hospital-2"]
        async with federation(tmp_path, names, Settings(min_workers=1, deadline_seconds=120), node=fhe,
                              modes={"hospital-1": "fhe"}, overrides={n: {"min_aggregate": 1} for n in names}) as fx:
            first = await fx.op.round(FAST)
            assert {p.worker_id for p in first.participants} == {"hospital-2"}
            status = await fx.op.status()
            declined = {w.worker_id: w.declined for w in status.workers}["hospital-1"]
            assert "failed verification" in declined and "Freivalds" in declined
            second = await fx.op.round(FAST)
            assert {p.worker_id for p in second.participants} == set(names)  # on the honest node now
            w = fx.workers["hospital-1"]
            assert w.node_failures == 1 and w.runtime is not None and w.runtime.client is not None
            assert w.runtime.client.target == threads[1].running.address
            client = w.runtime.client
            await fx.wait(lambda: client.seeds_used >= 3)  # the first, the move, and a rotation after submitting
            events = [json.loads(x) for x in (fx.data / "hospital-1.metrics.jsonl").read_text().splitlines()]
            rejected = [e for e in events if e["event"] == "node_rejected"]
            assert len(rejected) == 1 and rejected[0]["node"] == threads[0].running.address
            await fx.finish()
    finally:
        for t in threads:
            t.stop()
