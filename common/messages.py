"""Conversions between fedfhe.v1 messages and protocol-free values, in one place for every party.

Servicers and clients call these; the logic they feed (coordinator.state,
common.updates, the LWE core) never sees a protobuf message.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

from common.errors import InvalidArgument
from common.lwe.params import LweParams, ParameterError, by_name
from common.models import PROJECTIONS
from common.stages import Direction, Stage, WeightKey
from common.updates import Contribution, TensorLayout, UpdateFormatError
from fedfhe.v1 import common_pb2, coordinator_pb2, fhe_pb2

# The one mapping between parameter-set names (common.lwe.params) and fedfhe.v1.ParamSet values.
PARAM_SET_VALUES = {"exact": common_pb2.PARAM_SET_EXACT, "compact": common_pb2.PARAM_SET_COMPACT}
_PARAMS = {value: name for name, value in PARAM_SET_VALUES.items()}


def params_from_proto(value: int) -> LweParams:
    if value not in _PARAMS:
        raise InvalidArgument(f"unknown parameter set {value}; use PARAM_SET_EXACT or PARAM_SET_COMPACT")
    try:
        return by_name(_PARAMS[value])
    except ParameterError as exc:
        raise InvalidArgument(str(exc)) from None


def key_to_proto(key: WeightKey) -> fhe_pb2.WeightKey:
    return fhe_pb2.WeightKey(layer=key.layer, stage=int(key.stage), direction=int(key.direction))


def key_from_proto(k: fhe_pb2.WeightKey) -> WeightKey:
    if k.stage not in Stage._value2member_map_:
        raise InvalidArgument(f"unknown stage {k.stage}: expected QKV, O, GATE_UP or DOWN")
    if k.direction not in Direction._value2member_map_:
        raise InvalidArgument(f"unknown direction {k.direction}: expected FORWARD or BACKWARD")
    return WeightKey(k.layer, Stage(k.stage), Direction(k.direction))


# --------------------------------------------------------------------------------------------------
# Rounds
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingConfig:
    """What every participant of a round trains with (fedfhe.v1.RoundConfig)."""

    local_steps: int = 10
    batch_size: int = 8
    learning_rate: float = 5e-3
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q", "v")
    ffa: bool = True  # FFA-LoRA: A frozen from lora_seed, only B trained, so FedAvg is exact
    lora_seed: int = 0
    max_seq_len: int = 128
    total_rounds: int = 1  # planned rounds: DP noise is calibrated to spend the budget over them

    def validate(self) -> TrainingConfig:
        checks = [
            (1 <= self.local_steps <= 100_000, f"local_steps {self.local_steps} not in [1, 100000]"),
            (1 <= self.batch_size <= 65_536, f"batch_size {self.batch_size} not in [1, 65536]"),
            (math.isfinite(self.learning_rate) and 0 < self.learning_rate <= 10,
             f"learning_rate {self.learning_rate} not in (0, 10]"),
            (1 <= self.lora_rank <= 1024, f"lora_rank {self.lora_rank} not in [1, 1024]"),
            (math.isfinite(self.lora_alpha) and self.lora_alpha > 0, f"lora_alpha {self.lora_alpha} must be > 0"),
            (bool(self.lora_targets) and set(self.lora_targets) <= set(PROJECTIONS)
             and len(set(self.lora_targets)) == len(self.lora_targets),
             f"lora_targets {list(self.lora_targets)} must be distinct names from {list(PROJECTIONS)}"),
            (2 <= self.max_seq_len <= 8192, f"max_seq_len {self.max_seq_len} not in [2, 8192]"),
            (1 <= self.total_rounds <= 1_000_000, f"total_rounds {self.total_rounds} not in [1, 1000000]"),
        ]
        for ok, why in checks:
            if not ok:
                raise InvalidArgument(f"round config: {why}")
        return self


def config_to_proto(cfg: TrainingConfig) -> coordinator_pb2.RoundConfig:
    return coordinator_pb2.RoundConfig(
        local_steps=cfg.local_steps, batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
        lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_targets=list(cfg.lora_targets), ffa=cfg.ffa,
        lora_seed=cfg.lora_seed, max_seq_len=cfg.max_seq_len, total_rounds=cfg.total_rounds)


def config_from_proto(msg: coordinator_pb2.RoundConfig) -> TrainingConfig:
    values = {f.name: getattr(msg, f.name) for f in fields(TrainingConfig)}
    values["lora_targets"] = tuple(msg.lora_targets)
    return TrainingConfig(**values).validate()


def layout_to_proto(layout: TensorLayout) -> list[coordinator_pb2.TensorSpec]:
    return [coordinator_pb2.TensorSpec(name=n, shape=list(s)) for n, s in layout.specs]


def layout_from_proto(specs: Sequence[coordinator_pb2.TensorSpec]) -> TensorLayout:
    try:
        return TensorLayout.checked([(s.name, tuple(s.shape)) for s in specs])
    except UpdateFormatError as exc:
        raise InvalidArgument(str(exc)) from None


def contributions(participants: Sequence[coordinator_pb2.Participant]) -> list[Contribution]:
    return [Contribution(p.worker_id, p.num_samples, p.nonce) for p in participants]
