"""Named LWE parameter sets and the allow-list every party checks at load.

Notation follows DESIGN.md: modulus q = 2^log_q, LWE dimension n, error
standard deviation σ. Security follows n and log2(q/σ) (Homomorphic
Encryption Standard v1.1, 128-bit classical, table for σ≈3.19: max log2 q is
27 / 54 / 109 for n = 1024 / 2048 / 4096); a larger σ buys the same margin in
log2 q, which is why the exact set may use q = 2^64 at n = 2048 with σ = 2^12.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np


class ParameterError(ValueError):
    """A parameter set is unknown, outside the allow-list, or cannot hold the requested product."""


# HE standard v1.1, 128-bit classical, uniform/ternary secret rows: n -> max log2(q).
# The budget is stated for σ≈3.19; we compare log2(q/σ) against max log2 q − log2 3.19.
_HE_STANDARD_128 = {1024: 27, 2048: 54, 4096: 109}
_STANDARD_SIGMA = 3.19


@dataclass(frozen=True)
class LweParams:
    """One LWE parameter set: q = 2^log_q, dimension n, error std σ (also the secret's)."""

    name: str
    log_q: int
    n: int
    sigma: float
    exact: bool  # whether the planner guarantees bit-exact W·X (failure < 2^-40)

    @property
    def q(self) -> int:
        return 1 << self.log_q

    @property
    def word_bytes(self) -> int:
        return self.log_q // 8

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        return np.uint64 if self.log_q == 64 else np.uint32

    @property
    def tail_bound(self) -> int:
        """Samples of the error distribution are cut at this magnitude (12σ: P < 2^-100)."""
        return math.ceil(12 * self.sigma)

    def security_margin_bits(self) -> float:
        """Bits of log2(q/σ) left under the HE-standard budget for n (interpolated); ≥ 0 is allowed."""
        budget = _interpolated_budget(self.n) - math.log2(_STANDARD_SIGMA)
        return budget - (self.log_q - math.log2(self.sigma))


def _interpolated_budget(n: int) -> float:
    points = sorted(_HE_STANDARD_128.items())
    if n < points[0][0]:
        raise ParameterError(f"n={n} is below the smallest standardized dimension {points[0][0]}")
    for (n0, b0), (n1, b1) in itertools.pairwise(points):
        if n0 <= n <= n1:
            # Linear in n between table rows: conservative, the budget grows ~linearly in n.
            return b0 + (b1 - b0) * (n - n0) / (n1 - n0)
    return float(points[-1][1])


EXACT = LweParams(name="exact", log_q=64, n=2048, sigma=4096.0, exact=True)
COMPACT = LweParams(name="compact", log_q=32, n=1280, sigma=3.19, exact=False)

PARAM_SETS: dict[str, LweParams] = {p.name: p for p in (EXACT, COMPACT)}

# The only (n, log2 q, σ) triples any party will use.
ALLOWED: frozenset[tuple[int, int, float]] = frozenset((p.n, p.log_q, p.sigma) for p in PARAM_SETS.values())


def check_allowed(params: LweParams) -> LweParams:
    """Return params if they are on the allow-list and inside the security budget, else raise."""
    triple = (params.n, params.log_q, params.sigma)
    if triple not in ALLOWED:
        allowed = ", ".join(f"(n={n}, log2 q={lq}, σ={s})" for n, lq, s in sorted(ALLOWED))
        raise ParameterError(
            f"LWE parameters (n={params.n}, log2 q={params.log_q}, σ={params.sigma}) are not on the "
            f"allow-list; allowed: {allowed}"
        )
    if params.security_margin_bits() < 0:
        raise ParameterError(f"parameter set {params.name!r} exceeds the 128-bit HE-standard budget")
    return params


def by_name(name: str) -> LweParams:
    """Look up a named parameter set ("exact" or "compact")."""
    try:
        return check_allowed(PARAM_SETS[name])
    except KeyError:
        raise ParameterError(
            f"unknown LWE parameter set {name!r}; choose one of {sorted(PARAM_SETS)}"
        ) from None


for _p in PARAM_SETS.values():  # a bad table edit fails at import, not in production
    check_allowed(_p)
