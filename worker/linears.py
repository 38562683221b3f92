"""Quantized base linears: one arithmetic, two engines for the exact integer product.

Forward: X ≈ X_int·diag(s_x) per token, W ≈ diag(s_w)·W_int per row, so
W·x = s_x·s_w·(W_int·X_int). Backward: Wᵀ·δ = W_intᵀ·(s_w ⊙ δ), with s_w ⊙ δ
quantized per token. The engine supplies W_int·X_int exactly:

- LocalEngine: the worker holds the public int weights and multiplies itself.
- FheEngine: encrypt X_int under the session's A, the node returns W·B, decrypt
  with the hint. With the exact parameter set both engines return the same
  integers, so the two modes give bit-identical activations and gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from common.lwe import scheme
from common.lwe.params import LweParams
from common.lwe.prg import Randomness, expand_a
from common.lwe.quant import dequantize_product, quantize_tokens
from common.stages import Direction, PublicWeights, Stage, WeightKey


@dataclass(frozen=True)
class StageMeta:
    act_bits: int
    delta_bits: int
    rows: int
    cols: int
    row_scales: np.ndarray | None  # forward only


class IntegerEngine(Protocol):
    def meta(self, key: WeightKey) -> StageMeta: ...

    def product(self, key: WeightKey, x_int: np.ndarray) -> np.ndarray:
        """W_int·X_int exactly (d_out, N) int64 for X_int (d_in, N)."""
        ...


class QuantizedLinears:
    """BaseLinears over an integer engine (see worker.model.BaseLinears)."""

    def __init__(self, engine: IntegerEngine) -> None:
        self.engine = engine

    def forward(self, layer: int, stage: Stage, x: torch.Tensor) -> torch.Tensor:
        key = WeightKey(layer, stage, Direction.FORWARD)
        meta = self.engine.meta(key)
        assert meta.row_scales is not None
        x_int, sx = quantize_tokens(x.numpy(), meta.act_bits)
        y_int = self.engine.product(key, np.ascontiguousarray(x_int.T))
        return torch.from_numpy(dequantize_product(y_int, meta.row_scales, sx).astype(np.float32))

    def backward(self, layer: int, stage: Stage, grad_out: torch.Tensor) -> torch.Tensor:
        fwd = self.engine.meta(WeightKey(layer, stage, Direction.FORWARD))
        key = WeightKey(layer, stage, Direction.BACKWARD)
        meta = self.engine.meta(key)
        assert fwd.row_scales is not None
        g = grad_out.numpy().astype(np.float64) * fwd.row_scales.astype(np.float64)[None, :]
        g_int, sg = quantize_tokens(g, meta.act_bits)
        y_int = self.engine.product(key, np.ascontiguousarray(g_int.T))
        return torch.from_numpy((y_int.T.astype(np.float64) * sg[:, None]).astype(np.float32))


class LocalEngine:
    """The worker multiplies the public int weights itself, with the plan of the chosen parameter set."""

    def __init__(self, weights: PublicWeights, params: LweParams) -> None:
        self.weights, self.params = weights, params

    def meta(self, key: WeightKey) -> StageMeta:
        plan = self.weights.plan(self.params, key)
        scales = self.weights.row_scales(key) if key.direction == Direction.FORWARD else None
        return StageMeta(plan.act_bits, plan.delta_bits, plan.d_out, plan.d_in, scales)

    def product(self, key: WeightKey, x_int: np.ndarray) -> np.ndarray:
        # Exact in float64: the plan keeps ‖w‖₁·x_max < 2^35 (exact set), far below 2^53.
        return np.rint(self.weights.matrix_f64(key) @ x_int.astype(np.float64)).astype(np.int64)


class RemoteNode(Protocol):
    """What FheEngine needs from a connection to the node (worker.fhe_client.FheClient)."""

    params: LweParams
    seed: bytes

    def hint(self, key: WeightKey) -> tuple[StageMeta, np.ndarray]: ...

    def multiply(self, key: WeightKey, b: np.ndarray) -> np.ndarray: ...


class FheEngine:
    """Encrypted products: fresh secret per batch, the node sees only B."""

    def __init__(self, node: RemoteNode, rng: Randomness | None = None) -> None:
        self.node = node
        self._a: dict[int, np.ndarray] = {}
        self._rng = rng

    def meta(self, key: WeightKey) -> StageMeta:
        return self.node.hint(key)[0]

    def product(self, key: WeightKey, x_int: np.ndarray) -> np.ndarray:
        meta, h = self.node.hint(key)
        p = self.node.params
        if meta.cols not in self._a:
            self._a[meta.cols] = expand_a(self.node.seed, meta.cols, p)
        kwargs = {"rng": self._rng} if self._rng is not None else {}
        enc = scheme.encrypt(p, self._a[meta.cols], x_int, meta.delta_bits, **kwargs)
        y = self.node.multiply(key, enc.b)
        return scheme.decrypt(p, y, h, enc.s, meta.delta_bits)
