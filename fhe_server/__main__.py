"""fedfhe-fhe-server: serve public base-model weights and multiply LWE ciphertexts by them (W·B)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from common.config import ServerConfig, opt
from common.models import MODEL_IDS, load_model
from common.rpc import serve_forever, service_main
from common.stages import PublicWeights
from fedfhe.v1 import fhe_pb2, fhe_pb2_grpc
from fhe_server.node import Node
from fhe_server.service import FheServicer

SERVICE = fhe_pb2.DESCRIPTOR.services_by_name["FheService"].full_name


@dataclass(frozen=True)
class FheServerConfig(ServerConfig):
    model: str = opt("tiny", help="public base model to serve", choices=list(MODEL_IDS))


async def serve(cfg: FheServerConfig) -> None:
    structlog.get_logger("fedfhe.fhe_server").info("loading model", model=cfg.model)
    weights = await asyncio.to_thread(lambda: PublicWeights(load_model(cfg.model)))
    servicer = FheServicer(Node(weights), insecure=cfg.insecure)
    await serve_forever(cfg, lambda s: fhe_pb2_grpc.add_FheServiceServicer_to_server(servicer, s), [SERVICE])


def main(argv: Sequence[str] | None = None) -> None:
    service_main(FheServerConfig, argv, prog="fedfhe-fhe-server", description=__doc__, serve=serve)


if __name__ == "__main__":
    main()
