"""`--dp-recipe auto`: what it picks from N, ε and the rounds, σ that spends exactly ε, the prediction it prints,
explicit settings winning, and the benchmark table it reads agreeing with the committed benchmark results."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from common import dp_recipe
from common.dp_recipe import BATCH, LEARNING_RATE, MAX_GRAD_NORM, TOTAL_STEPS, auto_recipe, predicted_kept
from common.training import TrainingConfig
from coordinator.local import parse_args, plan_training

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "bench" / "dp_utility.json"
TABLE = {8.0: {40: 0.2, 400: 0.5, 2000: 0.8}, 1.0: {40: 0.0, 400: 0.1, 2000: 0.4}}  # made up, for the arithmetic


@pytest.mark.parametrize(("n", "rounds", "batch", "steps"), [
    (2000, 1, BATCH, TOTAL_STEPS), (2000, 3, BATCH, 2), (400, 4, BATCH, 2), (40, 3, 40, 2), (5000, 10, BATCH, 1)])
def test_auto_picks_the_measured_batch_and_spreads_the_steps_over_the_rounds(n: int, rounds: int, batch: int,
                                                                               steps: int) -> None:
    r = auto_recipe(n, 8.0, rounds)
    assert (r.batch_size, r.local_steps, r.learning_rate, r.max_grad_norm) == (batch, steps, LEARNING_RATE,
                                                                                MAX_GRAD_NORM)
    assert r.sample_rate == pytest.approx(batch / n)
    assert r.local_steps * rounds >= TOTAL_STEPS


@pytest.mark.parametrize(("n", "eps", "rounds"), [(2000, 8.0, 1), (400, 3.0, 3), (40, 1.0, 2)])
def test_sigma_spends_exactly_the_budget_at_the_workers_delta(n: int, eps: float, rounds: int) -> None:
    r = auto_recipe(n, eps, rounds)
    assert r.noise_multiplier is not None and r.noise_multiplier > 0.3
    acc = RDPAccountant()
    for _ in range(r.local_steps * rounds):
        acc.step(noise_multiplier=r.noise_multiplier, sample_rate=r.sample_rate)
    assert eps - 0.01 <= acc.get_epsilon(1 / (10 * n)) <= eps
    assert auto_recipe(n, eps / 2, rounds).noise_multiplier > r.noise_multiplier  # type: ignore[operator]


def test_without_dp_there_is_no_noise_and_nothing_to_lose() -> None:
    r = auto_recipe(2000, None, 1)
    assert r.noise_multiplier is None and r.predicted_kept == 1.0 and "no DP" in r.describe()


def test_explicit_settings_win_and_the_rest_follow_the_recipe() -> None:
    base = TrainingConfig(local_steps=3, batch_size=4, learning_rate=0.03, max_seq_len=48, total_rounds=3)
    r = auto_recipe(2000, 8.0, 3)
    assert r.apply(base) == TrainingConfig(local_steps=2, batch_size=64, learning_rate=LEARNING_RATE,
                                           max_seq_len=48, total_rounds=3)
    mixed = r.apply(base, {"learning_rate", "batch_size"})
    assert (mixed.batch_size, mixed.learning_rate, mixed.local_steps) == (4, 0.03, 2)


@pytest.mark.parametrize(("n", "eps", "rounds"), [(0, 8.0, 1), (100, 0.0, 1), (100, -1.0, 1), (100, 8.0, 0)])
def test_impossible_plans_are_refused(n: int, eps: float, rounds: int) -> None:
    with pytest.raises(ValueError):
        auto_recipe(n, eps, rounds)


def test_prediction_is_read_off_the_grid_and_says_when_it_guesses() -> None:
    assert predicted_kept(2000, 8.0, TABLE)[0] == pytest.approx(0.8)
    assert predicted_kept(400, 1.0, TABLE)[0] == pytest.approx(0.1)
    mid, where = predicted_kept(round(math.sqrt(400 * 2000)), 8.0, TABLE)  # halfway in log N
    assert mid == pytest.approx(0.65, abs=1e-3) and "interpolated" in where
    between, _ = predicted_kept(2000, math.sqrt(8.0), TABLE)  # halfway in log ε
    assert between == pytest.approx(0.6, abs=1e-3)
    far, where = predicted_kept(100_000, 8.0, TABLE)
    assert far == pytest.approx(0.8) and "OUTSIDE" in where
    low, where = predicted_kept(2000, 0.5, TABLE)
    assert low == pytest.approx(0.4) and "OUTSIDE" in where
    assert predicted_kept(2000, 8.0, {}) == (None, "no benchmark table")


def test_the_table_is_the_committed_benchmark() -> None:
    """MEASURED is the full grid's kept fraction, rounded to 0.01: a rerun of the benchmark updates both."""
    report = json.loads(RESULTS.read_text())
    assert not report["settings"]["quick"] and report["settings"]["mode"] == "local"
    measured = {}
    for row in report["results"]:
        if row["epsilon"] is not None:
            measured.setdefault(row["epsilon"], {})[row["records_per_hospital"]] = round(row["kept_fraction"], 2)
    assert measured == {e: dict(row) for e, row in dp_recipe.MEASURED.items()}
    recipe = report["settings"]["recipe"]
    assert (recipe["batch"], recipe["steps"], recipe["lr"], recipe["clip"]) == (BATCH, TOTAL_STEPS, LEARNING_RATE,
                                                                                MAX_GRAD_NORM)


def test_fedfhe_local_uses_the_recipe_for_smollm2_and_its_preset_for_the_tiny_model() -> None:
    _, args = parse_args(["--model", "smollm2-135m", "--records", "2000", "--rounds", "2"])
    cfg = plan_training(args)
    assert (cfg.batch_size, cfg.local_steps, cfg.learning_rate, cfg.total_rounds) == (64, 3, LEARNING_RATE, 2)
    assert args.max_grad_norm == MAX_GRAD_NORM and args.recipe.num_records == 2000
    _, args = parse_args(["--model", "smollm2-135m", "--learning-rate", "0.01", "--max-grad-norm", "1"])
    cfg = plan_training(args)
    assert (cfg.learning_rate, cfg.batch_size, args.max_grad_norm) == (0.01, 40, 1.0)  # explicit flags win
    _, args = parse_args(["--model", "smollm2-135m", "--dp-recipe", "preset"])
    cfg = plan_training(args)
    assert args.recipe is None and (cfg.batch_size, cfg.local_steps) == (4, 3)
    _, args = parse_args(["--model", "tiny"])  # the recipe was measured on SmolLM2, not on a random tiny Llama
    assert plan_training(args).batch_size == 8 and args.recipe is None
