"""Parameter planner: activation bit width and Δ from public bounds only.

Decryption yields Δ·(W·X) + W·E (mod q). The exact set must (1) round W·E
away: |W·E| < Δ/2 except with probability < 2^-40 per entry, and (2) never
wrap: Δ·|W·X| + |W·E| < q/2. Both use public quantities only: the row norms of
the (public) int weights and the activation bound 2^(b-1)−1. A data-derived Δ
wrapped 1.95% of entries in simulation (DESIGN.md), so data never enters here.

Within those constraints the planner maximizes precision: the largest
activation width up to `max_act_bits`, then the largest Δ (more noise margin).
The compact set cannot round W·E away; it keeps Δ·|W·X| from wrapping and
reports the predicted error std σ‖w‖₂/Δ per output row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from common.lwe.params import LweParams, ParameterError

FAILURE_LOG2 = -40
# P(|N(0, s²)| > z·s) ≤ 2·exp(−z²/2) = 2^FAILURE_LOG2 per entry.
_Z = math.sqrt(2 * math.log(2) * (1 - FAILURE_LOG2))


@dataclass(frozen=True)
class Plan:
    """How products with one weight matrix are planned: bit widths, Δ = 2^delta_bits and the bounds they rest on."""

    params: LweParams
    d_out: int
    d_in: int
    weight_bits: int
    act_bits: int
    delta_bits: int
    row_l1_max: int
    row_l2_max: float
    noise_bound: float  # |W·E| stays below this except with prob. 2^FAILURE_LOG2 per entry

    @property
    def delta(self) -> int:
        return 1 << self.delta_bits

    @property
    def act_max(self) -> int:
        return (1 << (self.act_bits - 1)) - 1

    @property
    def exact(self) -> bool:
        return 2 * self.noise_bound < self.delta

    def predicted_error_std(self, row_l2: np.ndarray | float) -> np.ndarray | float:
        """Std of the decoded error (in units of W·X) for rows of these L2 norms: σ‖w‖₂/Δ."""
        return self.params.sigma * np.asarray(row_l2) / self.delta


def plan_for_weights(
    params: LweParams, w_int: np.ndarray, *, weight_bits: int = 8, max_act_bits: int = 24
) -> Plan:
    """Plan for an integer weight matrix (d_out, d_in) as the node will apply it."""
    w = np.asarray(w_int, dtype=np.int64)
    if w.ndim != 2 or 0 in w.shape:
        raise ParameterError(f"expected a non-empty 2-D weight matrix, got shape {w.shape}")
    wmax = (1 << (weight_bits - 1)) - 1
    if np.abs(w).max() > wmax:
        raise ParameterError(f"weights exceed the {weight_bits}-bit bound {wmax}")
    l1 = int(np.abs(w).sum(axis=1).max())
    l2 = float(np.sqrt((w.astype(np.float64) ** 2).sum(axis=1)).max())
    return plan_for_bounds(
        params, d_out=w.shape[0], d_in=w.shape[1], row_l1_max=l1, row_l2_max=l2,
        weight_bits=weight_bits, max_act_bits=max_act_bits,
    )


def plan_for_bounds(
    params: LweParams, *, d_out: int, d_in: int, row_l1_max: int, row_l2_max: float,
    weight_bits: int = 8, max_act_bits: int = 24,
) -> Plan:
    """Plan from public bounds: the largest row L1 and L2 norms of the integer weights."""
    if row_l1_max <= 0:
        row_l1_max, row_l2_max = 1, 1.0  # an all-zero matrix: any plan is exact
    half_q = params.q // 2
    # E is a rounded Gaussian: W·E = W·E_cont + W·(rounding), the latter at most L1/2.
    noise = _Z * params.sigma * row_l2_max + 0.5 * row_l1_max
    min_delta_bits = max(0, math.ceil(math.log2(2 * noise + 1))) if params.exact else 0

    def fits(act_bits: int, delta_bits: int) -> bool:
        xmax = (1 << (act_bits - 1)) - 1
        return (1 << delta_bits) * row_l1_max * xmax + noise < half_q

    act_bits = 0
    for b in range(max_act_bits, 1, -1):
        if fits(b, min_delta_bits):
            act_bits = b
            break
    if act_bits == 0:
        raise ParameterError(
            f"{params.name} set cannot hold a {d_out}×{d_in} product with row L1 norm {row_l1_max}: "
            f"even 2-bit activations would wrap mod q"
        )
    delta_bits = min_delta_bits
    while fits(act_bits, delta_bits + 1):
        delta_bits += 1
    return Plan(
        params=params, d_out=d_out, d_in=d_in, weight_bits=weight_bits, act_bits=act_bits,
        delta_bits=delta_bits, row_l1_max=row_l1_max, row_l2_max=row_l2_max, noise_bound=noise,
    )
