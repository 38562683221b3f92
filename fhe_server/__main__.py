"""fedfhe-fhe-server: serve public base-model weights and evaluate W·B on LWE ciphertexts."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import structlog

from common.config import ServerConfig, opt, parse
from common.logs import configure_logging
from common.models import MODEL_IDS, load_model
from common.rpc import serve_until_signal, start_server
from common.stages import NodeWeights
from fedfhe.v1 import fhe_pb2, fhe_pb2_grpc
from fhe_server.service import FheServicer

SERVICE = fhe_pb2.DESCRIPTOR.services_by_name["FheService"].full_name


@dataclass(frozen=True)
class FheServerConfig(ServerConfig):
    model: str = opt("tiny", help="public base model to serve", choices=list(MODEL_IDS))


async def serve(cfg: FheServerConfig) -> None:
    log = structlog.get_logger("fedfhe.fhe_server")
    log.info("loading model", model=cfg.model)
    weights = await asyncio.to_thread(lambda: NodeWeights(load_model(cfg.model)))
    servicer = FheServicer(weights)

    def register(server: grpc.aio.Server) -> None:
        fhe_pb2_grpc.add_FheServiceServicer_to_server(servicer, server)

    running = await start_server(cfg, register, [SERVICE])
    await serve_until_signal(running, cfg.grace_seconds)


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse(FheServerConfig, argv, prog="fedfhe-fhe-server", description=__doc__)
    configure_logging(cfg.log_format, cfg.log_level, cfg.log_file)
    asyncio.run(serve(cfg))


if __name__ == "__main__":
    main()
