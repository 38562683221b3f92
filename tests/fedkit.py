"""In-process federation parts for tests: FHE node and coordinator on port 0, workers as asyncio tasks."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import grpc

from common.certs import make_federation_pki
from common.config import ChannelConfig, ServerConfig
from common.datagen.generator import generate_dataset
from common.models import load_model
from common.rpc import RunningServer, start_server
from common.stages import PublicWeights
from common.training import TrainingConfig
from common.updates import ConsortiumKey, write_key_file
from coordinator.__main__ import SERVICE as COORDINATOR
from coordinator.operator import OperatorClient
from coordinator.service import CoordinatorServicer
from coordinator.state import Federation, Settings
from fedfhe.v1 import coordinator_pb2, coordinator_pb2_grpc, fhe_pb2_grpc
from fhe_server.__main__ import SERVICE as FHE
from fhe_server.node import Node
from fhe_server.service import FheServicer
from worker.config import JoinConfig
from worker.coordinator_client import CoordinatorClient
from worker.data import load_records
from worker.federation import FederatedWorker
from worker.runtime import tokenizer
from worker.scrub import Scrubber

FAST = TrainingConfig(local_steps=3, batch_size=4, learning_rate=2e-2, lora_rank=4, lora_alpha=8.0,
                      lora_targets=("q", "v", "down"), max_seq_len=48, total_rounds=3)


def make_data(root: Path, hospitals: int = 3, records: int = 24) -> Path:
    generate_dataset(root, hospitals=hospitals, seed=0, records=[records], global_eval=6)
    return root


async def start_node(model: str = "tiny") -> RunningServer:
    servicer = FheServicer(Node(PublicWeights(load_model(model))))
    return await start_server(ServerConfig(insecure=True),
                              lambda s: fhe_pb2_grpc.add_FheServiceServicer_to_server(servicer, s), [FHE])


async def start_coordinator(settings: Settings, *, federation_id: str = "fed-test", tls_dir: Path | None = None,
                            port: int = 0) -> tuple[RunningServer, Federation]:
    fed = Federation(federation_id, settings)
    servicer = CoordinatorServicer(fed, insecure=tls_dir is None)
    listen = f"127.0.0.1:{port}"
    cfg = ServerConfig(insecure=True, listen=listen) if tls_dir is None else ServerConfig(tls_dir=tls_dir,
                                                                                         listen=listen)
    running = await start_server(
        cfg, lambda s: coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(servicer, s), [COORDINATOR])
    return running, fed


class RecordingWorker(FederatedWorker):
    """A FederatedWorker that remembers what it submitted (tests compare it with the decrypted aggregate)."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.submitted: dict[int, dict] = {}

    async def _submit(self, client, round_, result, cfg):  # type: ignore[no-untyped-def]
        from worker.lora import lora_state_dict

        assert self.runtime is not None
        state = {k: v.numpy().copy() for k, v in lora_state_dict(self.runtime.model).items()}
        self.submitted[round_] = {"state": state, "n": result.num_samples}
        return await super()._submit(client, round_, result, cfg)


def join_config(name: str, data: Path, key_file: Path, coordinator: str, node: str, *, mode: str = "local",
                tls_dir: Path | None = None, **overrides) -> JoinConfig:
    """A worker on insecure loopback channels; tls_dir holds its certificate, which signs its mask keys."""
    cfg = JoinConfig(insecure=True, tls_dir=tls_dir, identity=name, coordinator=coordinator, fhe=node, mode=mode,
                     model="tiny",
                     data=data / name / "train.jsonl", eval_data=data / name / "eval.jsonl", eval_records=4,
                     consortium_key=key_file, metrics_file=data / f"{name}.metrics.jsonl", reconnect_seconds=20,
                     privacy_ledger=data / f"{name}.privacy.json")
    cfg = replace(cfg, **overrides)
    cfg.validate()
    return cfg


@functools.cache
def scrubber() -> Scrubber:
    return Scrubber()  # built once: the patterns are the costly part


def make_worker(cfg: JoinConfig, key: ConsortiumKey, cls: type[FederatedWorker] = RecordingWorker) -> FederatedWorker:
    """A worker as `fedfhe-worker join` makes it: notes scrubbed (unless --no-scrub-pii), then tokenized."""
    tok, scrub = tokenizer(cfg.model), scrubber() if cfg.scrub_pii else None
    return cls(cfg, key, load_records(cfg.data, tok, 512, scrubber=scrub),
               load_records(cfg.eval_data, tok, 512, cfg.eval_records, scrubber=scrub))


class Operator(OperatorClient):
    """The operator over an insecure loopback channel (an anonymous caller is the operator there)."""

    def __init__(self, address: str) -> None:
        super().__init__(address, ChannelConfig(insecure=True))

    async def round(self, cfg: TrainingConfig = FAST, deadline: float = 0.0,
                    timeout: float = 120.0) -> coordinator_pb2.RoundClosed:
        return (await self.run_round(cfg, deadline, timeout))[1]


@dataclass
class LocalFederation:
    """A running in-process federation: coordinator, workers as tasks, the operator; see `federation()`."""

    data: Path
    key: ConsortiumKey
    key_file: Path
    coord: RunningServer
    fed: Federation
    workers: dict[str, FederatedWorker]
    tasks: list[asyncio.Task[int]]
    op: Operator

    async def wait(self, pred, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
        """Poll pred() until true (workers apply aggregates asynchronously after a round closes)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not pred():
            assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
            await asyncio.sleep(0.05)

    async def wait_applied(self, round_: int, names: Sequence[str] | None = None) -> None:
        await self.wait(lambda: all(self.workers[n].applied_round == round_ for n in names or self.workers))

    async def finish(self) -> None:
        """Finish the federation; every worker exits cleanly."""
        await self.op.finish()
        assert await asyncio.wait_for(asyncio.gather(*self.tasks), 60) == [0] * len(self.tasks)

    async def restart_coordinator(self, settings: Settings) -> None:
        """Kill the coordinator (its memory-only buffers with it) and start a fresh one at the same address."""
        port = self.coord.port
        await self.op.close()
        await self.coord.stop(0)
        self.fed.close()
        self.coord, self.fed = await start_coordinator(settings, port=port)
        self.op = Operator(self.coord.address)


@asynccontextmanager
async def federation(tmp_path: Path, names: Sequence[str], settings: Settings, *, node: str = "",
                     modes: dict[str, str] | None = None, classes: dict[str, type[FederatedWorker]] | None = None,
                     overrides: dict[str, dict] | None = None) -> AsyncIterator[LocalFederation]:
    """Data, consortium key, coordinator and one worker task per name (local mode unless `modes` says)."""
    data = make_data(tmp_path / "data", hospitals=len(names))
    make_federation_pki(tmp_path / "pki", list(names), ["localhost"])  # the workers sign their mask keys
    key = ConsortiumKey.generate()
    key_file = tmp_path / "consortium.key"
    write_key_file(key_file, key)
    coord, fed = await start_coordinator(settings)
    workers = {n: make_worker(join_config(n, data, key_file, coord.address, node, tls_dir=tmp_path / "pki",
                                          mode=(modes or {}).get(n, "local"), **(overrides or {}).get(n, {})),
                              key, cls=(classes or {}).get(n, RecordingWorker)) for n in names}
    fx = LocalFederation(data, key, key_file, coord, fed, workers,
                         [asyncio.create_task(w.run()) for w in workers.values()], Operator(coord.address))
    try:
        await fx.op.wait_connected(names)
        yield fx
    finally:
        for t in fx.tasks:
            t.cancel()
        await fx.op.close()
        for w in workers.values():
            w.close()
        await fx.coord.stop(0)
        fx.fed.close()


class RpcWorker:
    """A worker at the RPC level: registers, keeps a watch stream open, collects its round events."""

    def __init__(self, address: str, name: str, key: ConsortiumKey, *, max_message_bytes: int = 16 << 20) -> None:
        self.name, self.key = name, key
        self.client = CoordinatorClient(address, ChannelConfig(insecure=True, max_message_bytes=max_message_bytes))
        self.stub = self.client.stub  # for tests that send what no well-behaved client would
        self.events: asyncio.Queue[coordinator_pb2.WatchRoundsResponse] = asyncio.Queue()
        self.watch: asyncio.Task[None] | None = None
        self.federation = ""

    async def join(self) -> None:
        reg = await self.client.register(self.name, 10, self.key.check_value(), no_dp=False, epsilon_budget=8.0)
        self.federation = reg.federation_id
        call = self.client.watch(self.name)

        async def pump() -> None:
            try:
                async for ev in call:
                    await self.events.put(ev)
            except grpc.aio.AioRpcError:
                pass  # the coordinator went away or the test ended the stream
        self.watch = asyncio.create_task(pump())

    async def next_event(self, kind: str) -> coordinator_pb2.WatchRoundsResponse:
        while True:
            ev = await asyncio.wait_for(self.events.get(), 30)
            if ev.WhichOneof("event") == kind:
                return ev

    async def leave(self) -> None:
        if self.watch is not None:
            self.watch.cancel()
        await self.client.close()
