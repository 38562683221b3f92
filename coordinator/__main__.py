"""fedfhe-coordinator: federation membership and rounds; sums encrypted updates it cannot read."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from common.config import ServerConfig, opt, parse
from common.logs import configure_logging
from common.rpc import serve_until_signal, start_server
from coordinator.service import CoordinatorServicer
from coordinator.state import Federation
from fedfhe.v1 import coordinator_pb2, coordinator_pb2_grpc

SERVICE = coordinator_pb2.DESCRIPTOR.services_by_name["CoordinatorService"].full_name


@dataclass(frozen=True)
class CoordinatorConfig(ServerConfig):
    federation_id: str = opt("", help="federation name (random when empty)")


async def serve(cfg: CoordinatorConfig) -> None:
    servicer = CoordinatorServicer(Federation(cfg.federation_id or None), insecure=cfg.insecure)

    def register(server: grpc.aio.Server) -> None:
        coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(servicer, server)

    running = await start_server(cfg, register, [SERVICE])
    await serve_until_signal(running, cfg.grace_seconds)


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse(CoordinatorConfig, argv, prog="fedfhe-coordinator", description=__doc__)
    configure_logging(cfg.log_format, cfg.log_level, cfg.log_file)
    asyncio.run(serve(cfg))


if __name__ == "__main__":
    main()
