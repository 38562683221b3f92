"""Public base weights by linear stage: stacked int8 matrices, per-row scales, plans; what anyone can compute.

Stages of a Llama block (see README "four dependent stages"): QKV = [q; k; v]
on RMSNorm(x), O on the attention output, GATE_UP = [gate; up] on RMSNorm(h),
DOWN on the MLP hidden. Forward applies W_int; backward applies W_intᵀ to
(s_w ⊙ δ), which the worker prepares, so Wᵀ·δ = W_intᵀ·(s_w ⊙ δ).

The node (fhe_server.node) multiplies ciphertexts by these matrices and makes
hints from them; a worker derives the same plans and scales from the same
public model, so it never has to take them from the node.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from common.errors import NotFound
from common.lwe.params import LweParams
from common.lwe.planner import Plan, plan_for_weights
from common.lwe.quant import quantize_rows
from common.models import ModelWeights


class Stage(IntEnum):  # values match fedfhe.v1.Stage
    QKV = 1
    O = 2  # noqa: E741 - the o projection; named as in the protocol
    GATE_UP = 3
    DOWN = 4


class Direction(IntEnum):  # values match fedfhe.v1.Direction
    FORWARD = 1
    BACKWARD = 2


STAGE_PROJECTIONS: dict[Stage, tuple[str, ...]] = {
    Stage.QKV: ("q", "k", "v"), Stage.O: ("o",), Stage.GATE_UP: ("gate", "up"), Stage.DOWN: ("down",),
}


@dataclass(frozen=True)
class WeightKey:
    layer: int
    stage: Stage
    direction: Direction


@dataclass(frozen=True)
class StageWeights:
    w_int: np.ndarray  # (d_out, d_in) int8, projections stacked row-wise
    row_scales: np.ndarray  # (d_out,) float32


def stage_weights(model: ModelWeights) -> list[dict[Stage, StageWeights]]:
    out = []
    for layer in model.layers:
        stages = {}
        for stage, projs in STAGE_PROJECTIONS.items():
            w_int, scales = quantize_rows(np.concatenate([layer[p] for p in projs], axis=0))
            stages[stage] = StageWeights(w_int, scales)
        out.append(stages)
    return out


class PublicWeights:
    """The quantized public model by stage: matrices (int8 and cached float64), row scales, plans, digest."""

    def __init__(self, model: ModelWeights) -> None:
        self.model = model
        self.stages = stage_weights(model)
        digest = hashlib.sha256(model.model_id.encode())
        for layer in self.stages:
            for sw in layer.values():
                digest.update(sw.w_int.tobytes())
                digest.update(sw.row_scales.tobytes())
        self.digest = digest.digest()
        self._f64: dict[WeightKey, np.ndarray] = {}
        self._plans: dict[tuple[str, WeightKey], Plan] = {}

    @property
    def num_layers(self) -> int:
        return len(self.stages)

    def keys(self) -> list[WeightKey]:
        """Every stage of every layer, both directions: what a whole model's hints cover."""
        return [WeightKey(layer, stage, direction) for layer in range(self.num_layers)
                for stage in Stage for direction in Direction]

    def check_key(self, key: WeightKey) -> None:
        if not 0 <= key.layer < len(self.stages):
            raise NotFound(f"layer {key.layer} does not exist (model has {len(self.stages)} layers)")

    def matrix(self, key: WeightKey) -> np.ndarray:
        """The integer matrix as applied: W_int forward, W_intᵀ backward (int8)."""
        self.check_key(key)
        w = self.stages[key.layer][key.stage].w_int
        return w if key.direction == Direction.FORWARD else np.ascontiguousarray(w.T)

    def matrix_f64(self, key: WeightKey) -> np.ndarray:
        # Cached float64 copy: the CPU GEMM would otherwise convert 4M entries per call.
        if key not in self._f64:
            self._f64[key] = self.matrix(key).astype(np.float64)
        return self._f64[key]

    def row_scales(self, key: WeightKey) -> np.ndarray:
        self.check_key(key)
        return self.stages[key.layer][key.stage].row_scales

    def plan(self, params: LweParams, key: WeightKey) -> Plan:
        k = (params.name, key)
        if k not in self._plans:
            self._plans[k] = plan_for_weights(params, self.matrix(key))
        return self._plans[k]
