"""`--dp-recipe auto`: DP-SGD settings from a hospital's size, its ε and the planned rounds.

The recipe and the utility it predicts come from `scripts/bench_dp_utility.py`
(BENCHMARKS.md, "DP utility"): SmolLM2-135M, three hospitals of synthetic
notes, FFA-LoRA rank 8 on q and v, FedAvg. A sweep at 2,000 notes per hospital
and ε = 8 (float mode for speed, 768 sequences per hospital in every cell)
found:

- an expected batch of 64 notes per step (Poisson rate q = 64 / N; the whole
  data set, q = 1, below 64 notes) reached a lower DP loss than 16, 32 and 128;
- six DP-SGD steps in all, spread over the planned rounds;
- Adam at learning rate 0.06 (0.12 the same; 0.01 and 0.03 left DP far
  behind; 0.25 diverged), about six times what suits smaller batches without noise;
- clipping norm C = 0.5 (2.0 lost two fifths of the gain);
- rank 8 on q and v (rank 2 and 4 were worse; v alone was close).

σ then follows from ε, δ = 1/(10·N), q and the steps (the worker's own RDP
calibration, `noise_multiplier` below, the one both use). The predicted kept
fraction, (base − DP loss) / (base − no-DP loss) at the same recipe, is read
off the benchmark's grid (`MEASURED`, interpolated in log N and log ε, clamped
at its edges and said so). Explicit settings always win over the recipe.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace

from common.training import TrainingConfig

BATCH = 64  # expected notes per step
TOTAL_STEPS = 6  # DP-SGD steps over the whole federation
LEARNING_RATE = 0.06
MAX_GRAD_NORM = 0.5
RECIPE_FIELDS = ("batch_size", "local_steps", "learning_rate")  # the TrainingConfig fields the recipe sets

# kept fraction at ε, by notes per hospital: the full grid of scripts/bench_dp_utility.py (docs/bench/dp_utility.json;
# tests/test_dp_recipe.py checks the two agree)
MEASURED: Mapping[float, Mapping[int, float]] = {
    1.0: {40: 0.1, 400: 0.41, 2000: 0.54},
    3.0: {400: 0.59, 2000: 0.61},
    8.0: {40: 0.41, 400: 0.65, 2000: 0.74},
}


def noise_multiplier(epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp") -> float:
    """σ that spends exactly ε at δ after `steps` Poisson-sampled steps at rate `sample_rate` (Opacus)."""
    from opacus.accountants.utils import get_noise_multiplier  # heavy: only where σ is needed

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                          steps=steps, accountant=accountant, epsilon_tolerance=0.005))


def _interpolate(points: Mapping[float, float], x: float) -> tuple[float, bool]:
    """Linear in log x between the nearest measured points; clamped (and False) outside them."""
    xs = sorted(points)
    if x <= xs[0] or x >= xs[-1]:
        edge = xs[0] if x <= xs[0] else xs[-1]
        return points[edge], math.isclose(x, edge)
    hi = next(i for i, v in enumerate(xs) if v >= x)
    x0, x1 = xs[hi - 1], xs[hi]
    t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
    return points[x0] + t * (points[x1] - points[x0]), True


def predicted_kept(num_records: int, epsilon: float | None,
                   measured: Mapping[float, Mapping[int, float]] = MEASURED) -> tuple[float | None, str]:
    """The kept fraction the benchmark predicts for N notes at ε (None: not measured), and where it comes from."""
    if epsilon is None or math.isinf(epsilon):
        return 1.0, "no DP: the reference itself"
    if not measured:
        return None, "no benchmark table"
    es = sorted(measured)
    lower = [e for e in es if e <= epsilon] or es[:1]
    upper = [e for e in es if e >= epsilon] or es[-1:]
    used = {lower[-1], upper[0]}  # the measured ε on either side (one where ε was measured or is outside)
    by_eps = {e: _interpolate({float(n): k for n, k in measured[e].items()}, num_records) for e in used}
    kept, inside = _interpolate({e: v for e, (v, _) in by_eps.items()}, epsilon)
    inside = (inside or (len(used) == 1 and es[0] <= epsilon <= es[-1])) and all(ok for _, ok in by_eps.values())
    ns = sorted({n for row in measured.values() for n in row})
    where = (f"interpolated from the benchmark grid (N {ns[0]}…{ns[-1]}, ε {es[0]:g}…{es[-1]:g})" if inside else
             f"OUTSIDE the benchmark grid (N {ns[0]}…{ns[-1]}, ε {es[0]:g}…{es[-1]:g}): nearest edge, a guess")
    return max(0.0, kept), where


@dataclass(frozen=True)
class DpRecipe:
    """What `auto` picked for a hospital of N notes at ε over the planned rounds, and what it predicts."""

    num_records: int
    epsilon: float | None  # None: no DP
    rounds: int
    batch_size: int
    local_steps: int
    learning_rate: float
    max_grad_norm: float
    sample_rate: float
    noise_multiplier: float | None
    predicted_kept: float | None
    basis: str

    def apply(self, cfg: TrainingConfig, explicit: frozenset[str] | set[str] = frozenset()) -> TrainingConfig:
        """cfg with the recipe's batch, steps and learning rate, except the fields named in `explicit`."""
        picked = {f: getattr(self, f) for f in RECIPE_FIELDS if f not in explicit}
        return replace(cfg, total_rounds=self.rounds, **picked).validate()

    def describe(self, explicit: frozenset[str] | set[str] = frozenset()) -> str:
        """One line: what auto picked, σ, the prediction, and which settings the operator gave explicitly."""
        eps = "no DP" if self.epsilon is None else f"ε={self.epsilon:g}"
        sigma = "" if self.noise_multiplier is None else f", σ={self.noise_multiplier:.3f}"
        kept = ("kept fraction not predicted" if self.predicted_kept is None
                else f"predicted kept fraction {self.predicted_kept:.2f}")
        return (f"DP recipe auto for N={self.num_records} notes, {eps}, {self.rounds} round(s): expected batch "
                f"{self.batch_size} (q={self.sample_rate:.3g}), {self.local_steps} local step(s) per round, "
                f"learning rate {self.learning_rate:g}, clipping norm {self.max_grad_norm:g}{sigma}; {kept} "
                f"({self.basis})" + (f"; explicit {', '.join(sorted(explicit))} kept" if explicit else ""))


def auto_recipe(num_records: int, epsilon: float | None, rounds: int, delta: float | None = None,
                accountant: str = "rdp") -> DpRecipe:
    """The measured recipe for the smallest hospital (N notes) at budget ε (None: no DP) over `rounds` rounds."""
    if num_records < 1 or rounds < 1:
        raise ValueError(f"need at least one note and one round, got N={num_records}, rounds={rounds}")
    if epsilon is not None and not epsilon > 0:
        raise ValueError(f"epsilon must be positive, got {epsilon}")
    batch = min(BATCH, num_records)
    local_steps = max(1, math.ceil(TOTAL_STEPS / rounds))
    q = batch / num_records
    sigma = None if epsilon is None else noise_multiplier(
        epsilon, delta if delta else 1.0 / (10 * num_records), q, local_steps * rounds, accountant)
    kept, basis = predicted_kept(num_records, epsilon)
    return DpRecipe(num_records=num_records, epsilon=epsilon, rounds=rounds, batch_size=batch,
                    local_steps=local_steps, learning_rate=LEARNING_RATE, max_grad_norm=MAX_GRAD_NORM,
                    sample_rate=q, noise_multiplier=sigma, predicted_kept=kept, basis=basis)
