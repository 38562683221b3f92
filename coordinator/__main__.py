"""fedfhe-coordinator: federation membership and rounds; sums encrypted updates it cannot read."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from common.config import ServerConfig, opt
from common.rpc import serve_forever, service_main
from coordinator.service import CoordinatorServicer
from coordinator.state import Federation
from fedfhe.v1 import coordinator_pb2, coordinator_pb2_grpc

SERVICE = coordinator_pb2.DESCRIPTOR.services_by_name["CoordinatorService"].full_name


@dataclass(frozen=True)
class CoordinatorConfig(ServerConfig):
    federation_id: str = opt("", help="federation name (random when empty)")


async def serve(cfg: CoordinatorConfig) -> None:
    servicer = CoordinatorServicer(Federation(cfg.federation_id or None), insecure=cfg.insecure)
    await serve_forever(
        cfg, lambda s: coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(servicer, s), [SERVICE])


def main(argv: Sequence[str] | None = None) -> None:
    service_main(CoordinatorConfig, argv, prog="fedfhe-coordinator", description=__doc__, serve=serve)


if __name__ == "__main__":
    main()
