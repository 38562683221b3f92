"""Quantized base linears: one arithmetic, two engines for the exact integer product.

Forward: X ≈ X_int·diag(s_x) per token, W ≈ diag(s_w)·W_int per row, so
W·x = s_x·s_w·(W_int·X_int). Backward: Wᵀ·δ = W_intᵀ·(s_w ⊙ δ), with s_w ⊙ δ
quantized per token. The engine supplies W_int·X_int exactly:

- LocalEngine: the worker holds the public int weights and multiplies itself.
- FheEngine: encrypt X_int under the session's A, the node returns W·B, the
  worker verifies it (Freivalds) and decrypts with the (verified) hint. With the
  exact parameter set both engines return the same integers, so the two modes
  give bit-identical activations and gradients.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from common.errors import NodeMisbehaved
from common.lwe import scheme
from common.lwe.pads import PadPool
from common.lwe.params import LweParams
from common.lwe.prg import Randomness, expand_a
from common.lwe.quant import dequantize_product, quantize_tokens
from common.lwe.verify import Verifier
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


def own_meta(weights: PublicWeights, params: LweParams, key: WeightKey) -> StageMeta:
    """A stage's plan and scales as this worker derives them from the public weights (never from the node)."""
    plan = weights.plan(params, key)
    scales = weights.row_scales(key) if key.direction == Direction.FORWARD else None
    return StageMeta(plan.act_bits, plan.delta_bits, plan.d_out, plan.d_in, scales)


class LocalEngine:
    """The worker multiplies the public int weights itself, with the plan of the chosen parameter set."""

    def __init__(self, weights: PublicWeights, params: LweParams) -> None:
        self.weights, self.params = weights, params

    def meta(self, key: WeightKey) -> StageMeta:
        return own_meta(self.weights, self.params, key)

    def product(self, key: WeightKey, x_int: np.ndarray) -> np.ndarray:
        # Exact in float64: the plan keeps ‖w‖₁·x_max < 2^35 (exact set), far below 2^53.
        return np.rint(self.weights.matrix_f64(key) @ x_int.astype(np.float64)).astype(np.int64)


class RemoteNode(Protocol):
    """What FheEngine needs from a connection to the node (worker.fhe_client.FheClient)."""

    params: LweParams
    seed: bytes  # the current public seed; a new one (rotation, another node) means new A and hints

    def hint(self, key: WeightKey) -> tuple[StageMeta, np.ndarray]: ...

    def multiply(self, key: WeightKey, b: np.ndarray) -> np.ndarray: ...


class PlanMismatch(NodeMisbehaved):
    """The node's hint header disagrees with the plan this worker derived from the public weights."""


def check_node_meta(key: WeightKey, theirs: StageMeta, ours: StageMeta) -> None:
    """Refuse a hint whose quantization plan, shape or row scales differ from ours (bit for bit)."""
    fields = [("act_bits", theirs.act_bits, ours.act_bits), ("delta_bits", theirs.delta_bits, ours.delta_bits),
              ("rows", theirs.rows, ours.rows), ("cols", theirs.cols, ours.cols)]
    wrong = [f"{name} {a} (ours {b})" for name, a, b in fields if a != b]
    if (theirs.row_scales is None) != (ours.row_scales is None) or (
            ours.row_scales is not None and theirs.row_scales is not None
            and theirs.row_scales.astype(np.float32).tobytes() != ours.row_scales.astype(np.float32).tobytes()):
        wrong.append("row_scales")
    if wrong:
        raise PlanMismatch(f"the node's plan for {key} differs from the public weights': {', '.join(wrong)}")


def training_order(weights: PublicWeights) -> list[WeightKey]:
    """The weight matrices in the order a training step multiplies by them: forward, then backward."""
    fwd = [WeightKey(layer, stage, Direction.FORWARD) for layer in range(weights.num_layers) for stage in Stage]
    bwd = [WeightKey(k.layer, k.stage, Direction.BACKWARD) for k in reversed(fwd)]
    return fwd + bwd


class FheEngine:
    """Encrypted products: fresh secret per batch, the node sees only B, and every answer is verified.

    The plan (bit widths, Δ, row scales) is this worker's own, from the public weights; the node's
    hint header must agree with it. Each hint is Freivalds-checked once per seed before first use
    (and before any pad is made with it), each product before it is decrypted (common.lwe.verify);
    a failure raises NodeMisbehaved and leaves nothing decrypted. The check rows are drawn afresh
    whenever the node's seed changes.

    The data-independent work of each encryption (A·S + E, H·S) comes from a pool of pads a
    background thread makes ahead (common.lwe.pads), at most `pool_bytes` of them; what is left
    online per product is Δ·X, Y − H·S and the rounding. pool_bytes=0: every pad is made on demand.
    """

    def __init__(self, node: RemoteNode, weights: PublicWeights, rng: Randomness | None = None, *,
                 pool_bytes: int = 0, chunk_tokens: int = 128) -> None:
        self.node, self.weights = node, weights
        self._rng = _locked(rng) if rng is not None else None  # the pool's thread draws from it too
        self._seed = b""
        self._a: dict[int, np.ndarray] = {}
        self._verified: set[WeightKey] = set()
        self._lock = threading.RLock()  # the caches below are shared with the pool's thread
        self.verifier = Verifier(self._matrix, node.params)
        self.pool = PadPool(self._make_pad, training_order(weights), limit_bytes=pool_bytes,
                            chunk_tokens=chunk_tokens)
        self._checks = ThreadPoolExecutor(1, thread_name_prefix="freivalds")

    def _matrix(self, key: Hashable) -> np.ndarray:
        assert isinstance(key, WeightKey)
        return self.weights.matrix(key)

    def _epoch(self) -> None:
        """A new seed: new A, hints not yet verified, new secret check rows, no pad of the old (A, H)."""
        with self._lock:
            if self.node.seed != self._seed:
                self._seed, self._a = self.node.seed, {}
                self._verified.clear()
                self.verifier.close()
                self.verifier = Verifier(self._matrix, self.node.params)
                self.pool.reset()

    def _public_a(self, cols: int) -> np.ndarray:
        with self._lock:
            if cols not in self._a:
                self._a[cols] = expand_a(self._seed, cols, self.node.params)
            return self._a[cols]

    def meta(self, key: WeightKey) -> StageMeta:
        return own_meta(self.weights, self.node.params, key)

    def _hint(self, key: WeightKey, ours: StageMeta) -> np.ndarray:
        theirs, h = self.node.hint(key)
        check_node_meta(key, theirs, ours)
        with self._lock:
            if key not in self._verified:
                self.verifier.check_hint(key, self._public_a(ours.cols), h)
                self._verified.add(key)
        return h

    def _make_pad(self, key: Hashable, tokens: int) -> scheme.Pad:
        assert isinstance(key, WeightKey)
        if not self._seed:  # before the first product: nothing to make pads for yet
            self._epoch()
        meta = self.meta(key)
        h = self._hint(key, meta)  # verified before any pad depends on it
        kwargs = {"rng": self._rng} if self._rng is not None else {}
        return scheme.make_pad(self.node.params, self._public_a(meta.cols), h, tokens, **kwargs)

    def product(self, key: WeightKey, x_int: np.ndarray) -> np.ndarray:
        self._epoch()
        meta = self.meta(key)
        self._hint(key, meta)
        p = self.node.params
        pad = self.pool.take(key, x_int.shape[1])
        try:
            b = scheme.seal(p, pad, x_int, meta.delta_bits)
            # What R times the right answer must be depends only on B: computed while the node works.
            expected = self._checks.submit(self.verifier.expected, key, b)
            y = self.node.multiply(key, b)
            self.verifier.compare(key, y, expected.result())  # before anything is decrypted
            return scheme.unseal(p, pad, y, meta.delta_bits)
        finally:
            pad.zeroize()

    def close(self) -> None:
        self.pool.close()
        self._checks.shutdown(wait=True)


def _locked(rng: Randomness) -> Randomness:
    """A randomness source two threads may draw from (a deterministic one keeps its stream in order)."""
    lock = threading.Lock()

    def draw(n: int) -> bytes:
        with lock:
            return rng(n)
    return draw
