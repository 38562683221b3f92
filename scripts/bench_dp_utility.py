"""DP utility benchmark: how much of the no-DP gain a DP-trained federated LoRA keeps, by hospital size and ε.

    python scripts/bench_dp_utility.py [--quick] [--json FILE] [--png FILE] [--records N ...]
                                       [--epsilons 1 3 8 none] [recipe flags: --batch --steps --rounds --lr ...]

Three hospitals of synthetic notes (`fedfhe-data`, seed 0), each with N training
notes, train SmolLM2-135M's FFA-LoRA adapter in `local` mode with the exact
parameter set (the integers the FHE node would return, so the adapters are the
ones `fhe` mode makes). FedAvg runs in-process as the federation does it: every
hospital starts a round from the global adapter, runs its own `Trainer` (own
Poisson sampling, own noise, own RDP accountant and budget, δ = 1/(10·N)), and
the new global adapter is the sample-weighted mean of the three adapters (a
float mean; the federation's fixed-point one agrees to 2^-32). Every cell of the
grid N × ε trains with the same recipe: the same logical steps and expected
batch, so the same tokens (only where N is below the batch does each step take
all N notes, q = 1). The no-DP cell at each N is the reference; it uses the same
steps and batch and its own learning rate (the best one without noise, so DP is
not flattered by a badly tuned reference). Reported per cell: the held-out loss
of the final global adapter on one fixed global eval set (the same notes for
every cell), and per N

    kept_fraction = (base − DP) / (base − no-DP)

where base is the loss of the untouched model. Randomness (sampling and noise)
is AES-CTR from a fixed seed per cell and hospital, so a rerun gives the same
numbers. Results go to JSON after every cell, the plot (kept fraction against N
per ε, and the losses) at the end.

Cost, measured on this machine (2-core AMD EPYC, shared; one BLAS/torch thread
per process, which beat two under another engineer's test load by 3×; a 2-thread
run is no faster even when idle, the float64 integer GEMMs are memory-bound):
one DP-SGD sequence (forward, per-sample backward) costs ≈ 0.8 s at 32 tokens,
1.0 s at 48, 1.15 s at 64 in `local` mode, nearly flat in the batch (8 … 128,
physical pieces of 32), about 3.3× less in `float` mode; evaluating one note
≈ 0.3 s at 48 tokens. A literature recipe (q·N in the hundreds, a few hundred
steps) would cost 3 × 300 × 256 sequences ≈ 64 hours per cell here, so the
grid below spends 768 sequences per hospital per cell (the batch / steps split
was chosen by a sweep, see the report in the issue):

- full (default): N ∈ {40, 400, 2000, 4000} × ε ∈ {1, 3, 8, no DP} = 16 cells,
  3 hospitals × 6 steps × 128 expected notes of 48 tokens ≈ 2,300 sequences
  ≈ 40 min per cell, 256 global eval notes ≈ 1.3 min each: ≈ 10.5 hours idle.
- --quick: N ∈ {50, 200, 800} at ε = 8 and no DP = 6 cells, 3 × 4 steps × 24
  notes of 32 tokens ≈ 290 sequences ≈ 3.9 min per cell, 96 eval notes:
  ≈ 25 min.
"""

from __future__ import annotations

import os

# Before numpy and torch load (OpenBLAS reads it once): one thread each unless set (see the docstring).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", os.environ["OMP_NUM_THREADS"])
os.environ.setdefault("MKL_NUM_THREADS", os.environ["OMP_NUM_THREADS"])

import argparse
import json
import math
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from common.datagen.generator import generate_dataset
from common.lwe.params import PARAM_SETS
from common.lwe.prg import DeterministicRandomness
from common.training import TrainingConfig
from worker.data import load_records
from worker.lora import load_lora_state_dict, lora_state_dict
from worker.model import LoraConfig, SplitLlama
from worker.runtime import MODES, Runtime, build, tokenizer
from worker.train import DpSettings, Trainer, held_out_loss

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the other benchmark scripts
from bench_matmul import machine_info

MODEL = "smollm2-135m"
HOSPITALS = 3
TOKENIZE_MAX = 4096  # notes are cut to the recipe's max_seq_len at batch time, as the worker does


@dataclass(frozen=True)
class Recipe:
    """One training recipe, the same for every cell of a grid."""

    batch: int  # expected notes per hospital and step: Poisson rate q = batch / N (at most 1)
    steps: int  # logical DP-SGD steps per hospital over the whole run; the budget is spent over them
    rounds: int  # FedAvg rounds; steps / rounds local steps each
    lr: float  # Adam, fresh every round (worker.train)
    lr_no_dp: float  # the no-DP reference's own, tuned the same way
    clip: float  # per-sample gradient norm C
    rank: int
    alpha: float
    targets: tuple[str, ...]
    max_seq_len: int
    physical_batch: int  # notes per forward; a larger Poisson batch is split (one noise draw per step)

    def config(self, no_dp: bool) -> TrainingConfig:
        if self.steps % self.rounds:
            raise ValueError(f"steps {self.steps} is not a multiple of rounds {self.rounds}")
        return TrainingConfig(local_steps=self.steps // self.rounds, batch_size=self.batch,
                              learning_rate=self.lr_no_dp if no_dp else self.lr, lora_rank=self.rank,
                              lora_alpha=self.alpha, lora_targets=self.targets, ffa=True,
                              max_seq_len=self.max_seq_len, total_rounds=self.rounds).validate()


@dataclass(frozen=True)
class Grid:
    records: tuple[int, ...]  # training notes per hospital
    epsilons: tuple[float | None, ...]  # None: no DP (the reference; always run)
    eval_notes: int  # the global held-out set, the same for every cell
    recipe: Recipe


FULL = Grid(records=(40, 400, 2000, 4000), epsilons=(1.0, 3.0, 8.0, None), eval_notes=256,
            recipe=Recipe(batch=64, steps=6, rounds=1, lr=0.06, lr_no_dp=0.06, clip=0.5, rank=8, alpha=16.0,
                          targets=("q", "v"), max_seq_len=48, physical_batch=32))
QUICK = Grid(records=(50, 200, 800), epsilons=(8.0, None), eval_notes=64,
             recipe=Recipe(batch=24, steps=4, rounds=1, lr=0.06, lr_no_dp=0.06, clip=0.5, rank=8, alpha=16.0,
                           targets=("q", "v"), max_seq_len=32, physical_batch=32))


@dataclass
class Data:
    train: list[list[list[int]]]  # per hospital, the largest N's notes; smaller N take a prefix
    eval: list[list[int]]
    pad_id: int


def make_data(out_dir: Path, n_max: int, eval_notes: int, seed: int) -> Data:
    """Every hospital's notes at the largest N (smaller N are prefixes) and the global eval set."""
    generate_dataset(out_dir, hospitals=HOSPITALS, seed=seed, records=[n_max] * HOSPITALS, eval_fraction=0.0,
                     global_eval=eval_notes)
    tok = tokenizer(MODEL)
    train = [load_records(out_dir / f"hospital-{h + 1}" / "train.jsonl", tok, TOKENIZE_MAX)
             for h in range(HOSPITALS)]
    pad = tok.pad_token_id if getattr(tok, "pad_token_id", None) is not None else 0
    return Data(train, load_records(out_dir / "eval.jsonl", tok, TOKENIZE_MAX), int(pad))


def fedavg(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[int]) -> dict[str, torch.Tensor]:
    """The sample-weighted mean of the adapters (exact for FFA-LoRA: only B is trained)."""
    total = float(sum(weights))
    return {k: sum((w / total) * s[k] for s, w in zip(states, weights, strict=True)) for k in states[0]}  # type: ignore[misc]


def eval_loss(model: SplitLlama, data: Data, max_len: int) -> float:
    loss = held_out_loss(model, data.eval, max_len, pad_id=data.pad_id)
    assert loss is not None  # only a should_stop callback cuts it short
    return loss


def lora_of(recipe: Recipe) -> LoraConfig:
    return LoraConfig(rank=recipe.rank, alpha=recipe.alpha, targets=recipe.targets, ffa=True, seed=0)


def run_cell(rt: Runtime, data: Data, n: int, epsilon: float | None, recipe: Recipe, seed: int) -> dict[str, Any]:
    """One federation: HOSPITALS workers, recipe.rounds rounds of FedAvg; the final global adapter's eval loss."""
    start = time.perf_counter()
    no_dp = epsilon is None
    cfg = recipe.config(no_dp)
    dp = DpSettings(enabled=not no_dp, epsilon=epsilon or 1.0, max_grad_norm=recipe.clip)
    trainers = []
    for h in range(HOSPITALS):
        model = SplitLlama(rt.weights, rt.model.base, lora_of(recipe))  # own adapter and hooks, shared base
        rng = DeterministicRandomness(f"bench-dp-utility/{seed}/{n}/{epsilon}/{h}".encode())
        trainers.append(Trainer(model, data.train[h][:n], dp, pad_id=data.pad_id, rng=rng,
                                max_physical_batch=recipe.physical_batch))
    global_state = lora_state_dict(trainers[0].model)  # fresh: B = 0, the base model
    rounds = []
    for r in range(1, recipe.rounds + 1):
        states, weights, results = [], [], []
        for t in trainers:
            load_lora_state_dict(t.model, global_state)
            res = t.train_round(cfg)
            states.append(lora_state_dict(t.model))
            weights.append(res.num_samples)
            results.append(res)
        global_state = fedavg(states, weights)
        rounds.append({"round": r, "train_loss": [round(x.train_loss, 4) for x in results],
                       "epsilon": [None if math.isinf(x.epsilon) else round(x.epsilon, 4) for x in results],
                       "sampled": [x.sampled for x in results], "seconds": round(sum(x.seconds for x in results), 1)})
        print(f"  N={n} ε={epsilon} round {r}/{recipe.rounds}: train loss "
              f"{', '.join(f'{x.train_loss:.3f}' for x in results)}, {rounds[-1]['seconds']} s", flush=True)
    load_lora_state_dict(rt.model, global_state)
    loss = eval_loss(rt.model, data, recipe.max_seq_len)
    sigma = trainers[0].noise_multiplier
    return {"records_per_hospital": n, "epsilon": epsilon, "eval_loss": loss, "kept_fraction": None,
            "seconds": round(time.perf_counter() - start, 1), "sample_rate": trainers[0].sample_rate(cfg),
            "noise_multiplier": sigma, "delta": None if no_dp else trainers[0].delta,
            "epsilon_spent": None if no_dp else max(t.epsilon for t in trainers),
            "learning_rate": cfg.learning_rate, "rounds": rounds}


def kept_fractions(results: list[dict[str, Any]], base: float) -> None:
    """(base − DP) / (base − no-DP) per N, in place; None where the no-DP reference is missing or gained nothing."""
    ref = {r["records_per_hospital"]: r["eval_loss"] for r in results if r["epsilon"] is None}
    for r in results:
        gain = base - ref[r["records_per_hospital"]] if r["records_per_hospital"] in ref else 0.0
        r["kept_fraction"] = (base - r["eval_loss"]) / gain if gain > 0 else None


def machine() -> dict[str, Any]:
    """The benchmarks' machine description (bench_matmul.machine_info), with memory and the load at the start."""
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {**machine_info(), "memory_gib": round(mem / 2**30, 1), "load_average_start": os.getloadavg()}


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    results, base = report["results"], report["base_eval_loss"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for eps in sorted({r["epsilon"] for r in results}, key=lambda e: math.inf if e is None else e):
        rows = sorted((r for r in results if r["epsilon"] == eps), key=lambda r: r["records_per_hospital"])
        ns = [r["records_per_hospital"] for r in rows]
        label = "no DP" if eps is None else f"ε = {eps:g}"
        ax2.plot(ns, [r["eval_loss"] for r in rows], "o-", label=label)
        if eps is not None:
            ax1.plot(ns, [r["kept_fraction"] if r["kept_fraction"] is not None else math.nan for r in rows], "o-",
                     label=label)
    ax2.axhline(base, color="grey", ls="--", label="base model")
    ax1.axhline(1.0, color="grey", ls=":")
    s = report["settings"]["recipe"]
    ax1.set(xscale="log", xlabel="training notes per hospital (N)", ylabel="kept fraction of the no-DP gain",
            title=f"kept fraction ({HOSPITALS} hospitals, {s['steps']} steps × {s['batch']} notes)")
    ax2.set(xscale="log", xlabel="training notes per hospital (N)", ylabel="held-out loss (global adapter)",
            title="held-out loss")
    ns_all = sorted({r["records_per_hospital"] for r in results})
    for ax in (ax1, ax2):  # the measured N as plain numbers, no log minor ticks
        ax.set_xticks(ns_all, [str(n) for n in ns_all])
        ax.minorticks_off()
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(path)  # a reader never sees half a file, and an interrupted run keeps its finished cells


def parse_epsilon(text: str) -> float | None:
    return None if text.lower() in ("none", "inf", "nodp", "no-dp") else float(text)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the ≈25-minute grid (smaller N, 32 tokens, ε = 8 only)")
    p.add_argument("--json", type=Path, default=Path("dp_utility.json"), help="results (written after every cell)")
    p.add_argument("--png", type=Path, help="the plot (default: beside the JSON)")
    p.add_argument("--records", type=int, nargs="+", help="training notes per hospital, one grid row each")
    p.add_argument("--epsilons", type=parse_epsilon, nargs="+", help="ε values; `none` is the no-DP reference")
    p.add_argument("--eval-notes", type=int, help="size of the global held-out set")
    p.add_argument("--mode", choices=MODES[1:], default="local",
                   help="local: the exact integers fhe mode computes (the benchmark); float: a cheaper, "
                        "not identical, reference for sweeps")
    p.add_argument("--seed", type=int, default=0, help="data and randomness seed")
    p.add_argument("--data-dir", type=Path, help="where the synthetic notes go (default: a temporary folder)")
    for name in ("batch", "steps", "rounds", "physical-batch", "rank", "max-seq-len"):
        p.add_argument(f"--{name}", type=int, help="recipe override")
    for name in ("lr", "lr-no-dp", "clip", "alpha"):
        p.add_argument(f"--{name}", type=float, help="recipe override")
    p.add_argument("--targets", help="recipe override, e.g. q,v")
    p.add_argument("--combine", type=Path, nargs="+", metavar="PART",
                   help="no training: merge the JSON of grids run side by side into --json and its plot")
    args = p.parse_args(argv)
    png = args.png or args.json.with_suffix(".png")
    if args.combine:
        return combine(args.combine, args.json, png)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    warnings.filterwarnings("ignore", message="Full backward hook")

    grid = QUICK if args.quick else FULL
    overrides = {k: getattr(args, k) for k in ("batch", "steps", "rounds", "physical_batch", "rank", "max_seq_len",
                                               "lr", "lr_no_dp", "clip", "alpha") if getattr(args, k) is not None}
    if args.targets:
        overrides["targets"] = tuple(args.targets.split(","))
    recipe = replace(grid.recipe, **overrides)
    grid = replace(grid, recipe=recipe, records=tuple(args.records or grid.records),
                   epsilons=tuple(args.epsilons or grid.epsilons), eval_notes=args.eval_notes or grid.eval_notes)
    order = sorted(grid.epsilons, key=lambda e: -math.inf if e is None else e)  # the reference first
    cells = [(n, e) for n in grid.records for e in order]

    t0 = time.perf_counter()  # the whole run: data, model, base evaluation and every cell
    with tempfile.TemporaryDirectory(prefix="fedfhe-dp-utility-") as tmp:
        data = make_data(args.data_dir or Path(tmp), max(grid.records), grid.eval_notes, args.seed)
        rt = build(args.mode, MODEL, PARAM_SETS["exact"], lora_of(recipe))
        start = time.perf_counter()
        base = eval_loss(rt.model, data, recipe.max_seq_len)
        print(f"{args.mode} mode, {len(data.eval)} global eval notes: base model loss {base:.4f} "
              f"({time.perf_counter() - start:.0f} s to evaluate)", flush=True)
        base_seconds = round(time.perf_counter() - start, 1)
        start = time.perf_counter()
        report: dict[str, Any] = {
            "results": [], "base_eval_loss": base, "base_eval_seconds": base_seconds,
            "settings": {"quick": args.quick, "mode": args.mode, "param_set": "exact", "model": MODEL,
                         "hospitals": HOSPITALS, "records_per_hospital": list(grid.records),
                         "epsilons": list(grid.epsilons), "delta": "1/(10·N) per hospital", "accountant": "rdp",
                         "eval_notes": len(data.eval), "seed": args.seed, "recipe": asdict(recipe),
                         "sequences_per_hospital_per_cell": recipe.steps * recipe.batch,
                         "command": " ".join(sys.argv)},
            "machine": machine(),
        }
        for i, (n, eps) in enumerate(cells, 1):
            row = run_cell(rt, data, n, eps, recipe, args.seed)
            report["results"].append(row)
            kept_fractions(report["results"], base)
            report["machine"]["load_average_end"] = os.getloadavg()
            report["wall_seconds"] = round(time.perf_counter() - t0, 1)
            write(report, args.json)
            done = time.perf_counter() - start
            kept = row["kept_fraction"]
            print(f"[{i}/{len(cells)}] N={n} ε={eps}: eval loss {row['eval_loss']:.4f}"
                  f"{'' if kept is None else f', kept {kept:.3f}'}, σ={row['noise_multiplier']}, "
                  f"{row['seconds']:.0f} s; about {done / i * (len(cells) - i) / 60:.0f} min left", flush=True)
    finish(report, args.json, png)
    return 0


def finish(report: dict[str, Any], path: Path, png: Path) -> None:
    """The plot and the table of a finished (or combined) grid."""
    plot(report, png)
    base = report["base_eval_loss"]
    print(f"{'N':>6} {'ε':>6} {'eval loss':>10} {'kept':>6}   (base {base:.4f})")
    for r in sorted(report["results"], key=lambda r: (r["records_per_hospital"], -(r["epsilon"] or math.inf))):
        kept = "-" if r["kept_fraction"] is None else f"{r['kept_fraction']:.3f}"
        eps_txt = "none" if r["epsilon"] is None else f"{r['epsilon']:g}"
        print(f"{r['records_per_hospital']:>6} {eps_txt:>6} {r['eval_loss']:>10.4f} {kept:>6}")
    print(f"wrote {path} and {png}")


def combine(parts: Sequence[Path], path: Path, png: Path) -> int:
    """One report from grids run side by side (one process per N): same model, data, eval set and recipe."""
    reports = [json.loads(p.read_text()) for p in parts]
    first = reports[0]
    same = ("model", "mode", "seed", "eval_notes", "recipe")
    for p, r in zip(parts, reports, strict=True):
        differs = [k for k in same if r["settings"][k] != first["settings"][k]]
        if differs or r["base_eval_loss"] != first["base_eval_loss"]:
            raise SystemExit(f"{p} is not the same benchmark as {parts[0]}: {differs or ['base_eval_loss']} differ")
    report = {**first, "results": [row for r in reports for row in r["results"]],
              "parts": [{"file": str(p), "command": r["settings"]["command"], "machine": r["machine"]}
                        for p, r in zip(parts, reports, strict=True)]}
    report["settings"] = {**first["settings"],
                          "records_per_hospital": sorted({x["records_per_hospital"] for x in report["results"]})}
    kept_fractions(report["results"], report["base_eval_loss"])
    write(report, path)
    finish(report, path, png)
    return 0

if __name__ == "__main__":
    sys.exit(main())
