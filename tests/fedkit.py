"""In-process federation parts for tests: FHE node and coordinator on port 0, workers as asyncio tasks."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc

from common.config import ChannelConfig, ServerConfig
from common.messages import TrainingConfig
from common.models import load_model
from common.rpc import RunningServer, start_server
from common.stages import NodeWeights
from common.updates import ConsortiumKey
from coordinator.__main__ import SERVICE as COORDINATOR
from coordinator.operator import OperatorClient
from coordinator.service import CoordinatorServicer
from coordinator.state import Federation, Settings
from fedfhe.v1 import coordinator_pb2, coordinator_pb2_grpc, fhe_pb2_grpc
from fhe_server.__main__ import SERVICE as FHE
from fhe_server.service import FheServicer
from worker.config import JoinConfig
from worker.data import generate_dataset
from worker.federation import FederatedWorker, load_records
from worker.runtime import tokenizer

FAST = TrainingConfig(local_steps=3, batch_size=4, learning_rate=2e-2, lora_rank=4, lora_alpha=8.0,
                      lora_targets=("q", "v", "down"), max_seq_len=48, total_rounds=3)


def make_data(root: Path, hospitals: int = 3, records: int = 24) -> Path:
    generate_dataset(root, hospitals=hospitals, seed=0, records=[records], global_eval=6)
    return root


async def start_node(model: str = "tiny") -> RunningServer:
    servicer = FheServicer(NodeWeights(load_model(model)))
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


@dataclass
class Hospital:
    name: str
    worker: FederatedWorker
    task: asyncio.Task[int] | None = None
    updates: list[dict] = field(default_factory=list)  # the plaintext adapters it submitted, per round


class RecordingWorker(FederatedWorker):
    """A FederatedWorker that remembers what it submitted (tests compare it with the decrypted aggregate)."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.submitted: dict[int, dict] = {}

    async def _submit(self, stub, round_, result, cfg):  # type: ignore[no-untyped-def]
        from worker.lora import lora_state_dict

        assert self.runtime is not None
        state = {k: v.numpy().copy() for k, v in lora_state_dict(self.runtime.model).items()}
        self.submitted[round_] = {"state": state, "n": result.num_samples}
        return await super()._submit(stub, round_, result, cfg)


def join_config(name: str, data: Path, key_file: Path, coordinator: str, node: str, *, mode: str = "local",
                **overrides) -> JoinConfig:
    cfg = JoinConfig(insecure=True, identity=name, coordinator=coordinator, fhe=node, mode=mode, model="tiny",
                     data=data / name / "train.jsonl", eval_data=data / name / "eval.jsonl", eval_records=4,
                     consortium_key=key_file, metrics_file=data / f"{name}.metrics.jsonl", reconnect_seconds=20,
                     privacy_ledger=data / f"{name}.privacy.json")
    cfg = replace(cfg, **overrides)
    cfg.validate()
    return cfg


def make_worker(cfg: JoinConfig, key: ConsortiumKey, cls: type[FederatedWorker] = RecordingWorker) -> FederatedWorker:
    tok = tokenizer(cfg.model)
    return cls(cfg, key, load_records(cfg.data, tok, 512), load_records(cfg.eval_data, tok, 512, cfg.eval_records))


class Operator(OperatorClient):
    """The operator over an insecure loopback channel (an anonymous caller is the operator there)."""

    def __init__(self, address: str) -> None:
        super().__init__(address, ChannelConfig(insecure=True))

    async def round(self, cfg: TrainingConfig = FAST, deadline: float = 0.0,
                    timeout: float = 120.0) -> coordinator_pb2.RoundClosed:
        return (await self.run_round(cfg, deadline, timeout))[1]


def is_status(exc: BaseException, code: grpc.StatusCode) -> bool:
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() == code
