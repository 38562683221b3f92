"""fedfhe-coordinator: federation membership and rounds; sums encrypted updates it cannot read."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from common.config import ConfigError, ServerConfig, opt
from common.rpc import serve_forever, service_main
from coordinator.service import CoordinatorServicer
from coordinator.state import Federation, Settings
from fedfhe.v1 import coordinator_pb2, coordinator_pb2_grpc

SERVICE = coordinator_pb2.DESCRIPTOR.services_by_name["CoordinatorService"].full_name


@dataclass(frozen=True)
class CoordinatorConfig(ServerConfig):
    federation_id: str = opt("", help="federation name (random when empty)")
    min_workers: int = opt(2, help="updates a round needs to be aggregated")
    round_deadline: float = opt(600.0, help="default seconds from a round's start until submissions are refused")
    keep_rounds: int = opt(3, help="aggregates kept in memory-only patch buffers (older ones are zeroed)")
    require_mlock: bool = opt(False, help="refuse to keep an aggregate that cannot be locked in RAM (mlock)")
    max_update_bytes: int = opt(1 << 30, help="largest encrypted update accepted")
    enrolled: str = opt("", help="comma-separated worker names allowed to register (empty: any worker "
                                 "certificate from the federation CA)")
    key_check_value: str = opt("", help="hex check value of the consortium key (public; fedfhe-keygen prints "
                                        "it); when empty, the first registered worker's is pinned")
    no_secagg: bool = opt(False, help="NO secure aggregation: consortium pads only, so one hospital with the "
                                      "coordinator can read another's update (comparison runs, older workers)")
    secagg_threshold: int = opt(0, help="Shamir threshold t of secure aggregation: t surviving hospitals remove "
                                        "the masks dropouts leave (0: a majority of each round's mask set)")
    secagg_phase_seconds: float = opt(60.0, help="the longest each secure-aggregation phase (keys, shares, "
                                                 "confirmations, reveals) waits for its members")

    def validate(self) -> None:
        super().validate()
        if self.min_workers < 1 or self.keep_rounds < 1 or self.round_deadline <= 0:
            raise ConfigError("--min-workers and --keep-rounds must be >= 1, --round-deadline > 0")
        if self.secagg_threshold < 0 or self.secagg_phase_seconds <= 0:
            raise ConfigError("--secagg-threshold must be >= 0 and --secagg-phase-seconds > 0")
        try:
            bytes.fromhex(self.key_check_value)
        except ValueError:
            raise ConfigError(f"--key-check-value {self.key_check_value!r} is not hex") from None

    def settings(self) -> Settings:
        return Settings(min_workers=self.min_workers, deadline_seconds=self.round_deadline,
                        keep_rounds=self.keep_rounds, require_mlock=self.require_mlock,
                        max_update_bytes=self.max_update_bytes,
                        key_check_value=bytes.fromhex(self.key_check_value),
                        enrolled=frozenset(n for n in self.enrolled.split(",") if n), secagg=not self.no_secagg,
                        secagg_threshold=self.secagg_threshold, secagg_phase_seconds=self.secagg_phase_seconds)


async def serve(cfg: CoordinatorConfig) -> None:
    federation = Federation(cfg.federation_id or None, cfg.settings())
    servicer = CoordinatorServicer(federation, insecure=cfg.insecure)
    try:
        await serve_forever(
            cfg, lambda s: coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(servicer, s), [SERVICE])
    finally:
        federation.close()  # zero every patch buffer before the process exits


def main(argv: Sequence[str] | None = None) -> None:
    service_main(CoordinatorConfig, argv, prog="fedfhe-coordinator", description=__doc__, serve=serve)


if __name__ == "__main__":
    main()
