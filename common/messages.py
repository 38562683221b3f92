"""Conversions between fedfhe.v1 messages and protocol-free values, in one place for every party.

Servicers and clients call these; the logic they feed (coordinator.state,
common.updates, the LWE core) never sees a protobuf message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields

from common.errors import InvalidArgument
from common.lwe.params import LweParams, ParameterError, by_name
from common.secagg import MemberKeys, RevealedShare, ShareKind
from common.stages import Direction, Stage, WeightKey
from common.training import TrainingConfig
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


# --------------------------------------------------------------------------------------------------
# Secure aggregation
# --------------------------------------------------------------------------------------------------


def mask_keys_to_proto(k: MemberKeys) -> coordinator_pb2.MaskKeys:
    return coordinator_pb2.MaskKeys(worker_id=k.worker, cipher_public_key=k.cipher_public,
                                    mask_public_key=k.mask_public, self_mask_commitment=k.self_commitment,
                                    signature=k.signature, certificate_pem=k.certificate)


def mask_keys_from_proto(m: coordinator_pb2.MaskKeys) -> MemberKeys:
    if len(m.certificate_pem) > 16 << 10 or len(m.signature) > 256:
        raise InvalidArgument("a member's certificate or signature is too large")
    return MemberKeys(m.worker_id, m.cipher_public_key, m.mask_public_key, m.self_mask_commitment, m.signature,
                      m.certificate_pem)


def revealed_to_proto(r: RevealedShare) -> coordinator_pb2.RevealedShare:
    return coordinator_pb2.RevealedShare(owner=r.owner, kind=int(r.kind), index=r.index, value=r.value)


def revealed_from_proto(m: coordinator_pb2.RevealedShare) -> RevealedShare:
    if m.kind not in ShareKind._value2member_map_:
        raise InvalidArgument(f"unknown share kind {m.kind}: expected SELF_MASK or MASK_KEY")
    return RevealedShare(m.owner, ShareKind(m.kind), m.index, m.value)
