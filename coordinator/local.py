"""fedfhe-local: a whole federation on loopback, every party a separate process, mTLS throughout.

Makes a run directory (PKI, the consortium key, synthetic hospital data, one
log per service, one metrics file per worker), starts the FHE node and the
coordinator, then one worker process per hospital, and drives the rounds as
the federation's operator (StartRound, WatchRounds, FinishFederation over
gRPC with the operator certificate). It prints one line per round and writes
a JSON report (and a PNG plot beside it) with, per round, the participants,
train and held-out losses, ε per worker, seconds and bytes sent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

from common.certs import make_federation_pki
from common.config import ChannelConfig, is_loopback
from common.datagen.generator import generate_dataset
from common.dp_recipe import MAX_GRAD_NORM, RECIPE_FIELDS, auto_recipe
from common.models import MODEL_IDS
from common.secagg import SCHEME
from common.training import TrainingConfig
from common.updates import ConsortiumKey, write_key_file
from coordinator.operator import OperatorClient
from fedfhe.v1 import coordinator_pb2 as pb

READY_TIMEOUT_S = 900  # loading SmolLM2 and quantizing its weights takes a while on 2 cores

# Per model: training settings that fit a 2-core CPU (every one can be overridden by a flag).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"local_steps": 8, "batch_size": 8, "learning_rate": 2e-2, "lora_rank": 8, "lora_alpha": 16.0,
             "lora_targets": "q,v,o,gate,down", "max_seq_len": 64, "records": 160, "eval_records": 16,
             "param_set": "exact", "modes": "fhe,local,local", "round_deadline": 300.0, "dp_recipe": "preset"},
    "smollm2-135m": {"local_steps": 3, "batch_size": 4, "learning_rate": 3e-2, "lora_rank": 8, "lora_alpha": 16.0,
                     "lora_targets": "q,v", "max_seq_len": 48, "records": 40, "eval_records": 6,
                     "param_set": "compact", "modes": "fhe,local,local", "round_deadline": 1200.0,
                     "dp_recipe": "auto"},
}


def child_env() -> dict[str, str]:
    """One BLAS/OpenMP thread per party: several processes share the cores, and multi-threaded BLAS
    busy-waits for a preempted partner thread (a SmolLM2 forward went from 0.17 s to 4.6 s so)."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, "1")
    return env


def _service(module: str, run_dir: Path, name: str, *extra: str) -> tuple[subprocess.Popen, Path]:
    log_file = run_dir / "logs" / f"{name}.log"
    cmd = [sys.executable, "-m", module, "--listen", "127.0.0.1:0", "--tls-dir", str(run_dir / "pki"),
           "--log-file", str(log_file), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env=child_env())
    return proc, log_file


def wait_for_address(proc: subprocess.Popen, log_file: Path, timeout: float = READY_TIMEOUT_S) -> str:
    """The address a service logged once it serves (it binds port 0, so only it knows the port)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{log_file.stem} exited with code {proc.returncode}; see {log_file}")
        if log_file.exists():
            for line in log_file.read_text().splitlines():
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:  # a line still being written
                    continue
                if event.get("event") == "serving":
                    return str(event["address"]).replace("127.0.0.1", "localhost")  # the certificate's SAN
        time.sleep(0.2)
    raise TimeoutError(f"{log_file.stem} did not start serving within {timeout:.0f} s; see {log_file}")


def stop(procs: Sequence[subprocess.Popen], grace: float = 20.0) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def finite(x: float) -> float | None:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


@dataclass
class Hospital:
    name: str
    mode: str
    cmd: list[str]
    metrics: Path
    proc: subprocess.Popen | None = None
    restarts: int = 0

    def start(self) -> None:
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True, env=child_env())

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def events(self, event: str, round_: int | None = None) -> list[dict[str, Any]]:
        return [m for m in read_metrics(self.metrics)
                if m["event"] == event and (round_ is None or m.get("round") == round_)]


@dataclass
class Run:
    args: argparse.Namespace
    run_dir: Path
    hospitals: list[Hospital]
    config: TrainingConfig
    rounds: list[dict[str, Any]] = field(default_factory=list)
    generation: dict[str, str] | None = None
    pii_scrubbed: dict[str, bool] = field(default_factory=dict)  # per worker, as it told the coordinator


def mean_eval(hospitals: Sequence[Hospital], round_: int) -> float | None:
    """Held-out loss of round's global adapter, the mean over hospitals weighted by their held-out notes."""
    pairs = []
    for h in hospitals:
        ev = h.events("evaluated", round_)
        if ev:
            pairs.append((ev[-1]["eval_loss"], ev[-1]["records"]))
    if not pairs:
        return None
    return sum(loss * n for loss, n in pairs) / sum(n for _, n in pairs)


def evaluated(hospitals: Sequence[Hospital], round_: int):  # type: ignore[no-untyped-def]
    """A predicate: every live hospital has evaluated the round's global adapter."""
    return lambda: all(h.events("evaluated", round_) or not h.alive for h in hospitals)


async def wait_for(pred, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.2)


async def drive(run: Run, coord_addr: str) -> None:
    """The operator: wait for the workers, run the rounds, finish the federation."""
    args = run.args
    kill = dict(k.split("@") for k in args.kill_worker or [])
    async with OperatorClient(coord_addr, ChannelConfig(tls_dir=run.run_dir / "pki", identity="operator")) as op:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not {h.name for h in run.hospitals} <= await op.connected():
            for h in run.hospitals:
                if not h.alive:
                    raise RuntimeError(f"{h.name} exited with code {h.proc.returncode if h.proc else '?'}; "
                                       f"see {run.run_dir / 'logs' / (h.name + '.log')}")
            if time.monotonic() > deadline:
                raise TimeoutError("workers did not connect")
            await asyncio.sleep(0.3)
        for r in range(1, args.rounds + 1):
            victims = [h for h in run.hospitals if kill.get(h.name) == str(r) and h.alive]
            if args.no_secagg:
                for h in victims:  # frozen before the round starts, killed once it has: a worker lost mid-round
                    assert h.proc is not None
                    os.killpg(h.proc.pid, signal.SIGSTOP)

            async def on_started(started: pb.StartRoundResponse, victims: list[Hospital] = victims) -> None:
                print(f"round {started.round}/{args.rounds} started: {', '.join(started.eligible)} training …",
                      flush=True)
                if victims and not args.no_secagg:  # lost after joining the mask set: its masks must be recovered
                    give_up = time.monotonic() + 60
                    while not await uploads_phase(op, started.round) and time.monotonic() < give_up:
                        await asyncio.sleep(0.05)
                for h in victims:
                    assert h.proc is not None
                    os.killpg(h.proc.pid, signal.SIGSTOP)
                    await asyncio.sleep(0.5)
                    os.killpg(h.proc.pid, signal.SIGKILL)
                    h.proc.wait()
                    print(f"  (killed {h.name} during round {started.round}, as --kill-worker asked)")

            start = time.monotonic()
            started, closed = await op.run_round(run.config, args.round_deadline, after_start=on_started)
            seconds = time.monotonic() - start
            if closed.outcome == pb.ROUND_OUTCOME_AGGREGATED:  # live workers fetch, verify and evaluate it
                await wait_for(evaluated(run.hospitals, started.round), args.round_deadline, f"round {r} evaluations")
            for h in victims:  # it comes back and joins the next round
                h.restarts += 1
                h.start()
            await op.wait_connected([h.name for h in victims], READY_TIMEOUT_S)
            run.rounds.append(round_record(run, started.round, closed, seconds, time.monotonic() - start))
            run.rounds[-1]["mask_recovery"] = await mask_recovery(op, started.round)
            print_round(run.rounds[-1], args.rounds)
        if args.generate and any(r["outcome"] == "aggregated" for r in run.rounds):
            run.generation = await asyncio.to_thread(generate_both, run, coord_addr)
        run.pii_scrubbed = {w.worker_id: w.pii_scrubbed for w in (await op.status()).workers}
        await op.finish()


async def uploads_phase(op: OperatorClient, round_: int) -> bool:
    """Whether the round's mask set is fixed (its members may upload)."""
    for r in (await op.status()).rounds:
        if r.round == round_ and r.HasField("mask_recovery"):
            return r.mask_recovery.phase not in ("keys", "shares")
    return False


async def mask_recovery(op: OperatorClient, round_: int) -> dict[str, Any] | None:
    """How the round's masks were removed, as GetStatus reports it (None without secure aggregation)."""
    for r in (await op.status()).rounds:
        if r.round == round_ and r.HasField("mask_recovery"):
            m = r.mask_recovery
            return {"threshold": m.threshold, "phase": m.phase, "members": list(m.members),
                    "survivors": list(m.survivors), "dropped": list(m.dropped), "revealed_by": list(m.revealed_by)}
    return None


def generate_both(run: Run, coord_addr: str) -> dict[str, str]:
    """hospital-1 generates from the prompt with the base model, then under the federated adapter.

    The adapter is fetched encrypted, verified and decrypted in RAM by `fedfhe-worker generate`; the local
    compute mode keeps the demo quick (the adapter is applied the same way in every mode).
    """
    h = run.hospitals[0]
    base = [sys.executable, "-m", "worker", "generate", "--mode", "local", "--model", run.args.model,
            "--tls-dir", str(run.run_dir / "pki"), "--identity", h.name, "--prompt", run.args.generate,
            "--max-new-tokens", "24", "--min-aggregate", str(min(2, run.args.min_workers)),
            "--log-file", str(run.run_dir / "logs" / f"{h.name}-generate.log")]
    federated = [*base, "--coordinator", coord_addr, "--consortium-key", str(run.run_dir / "keys" / "consortium.key")]
    out = {"prompt": run.args.generate}
    for name, cmd in (("base_model", base), ("federated_adapter", federated)):
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=child_env())
        out[name] = done.stdout.strip() if done.returncode == 0 else f"(failed: {done.stderr.strip()[-300:]})"
    print(f"generate {run.args.generate!r}\n  base model:        {out['base_model']!r}\n"
          f"  federated adapter: {out['federated_adapter']!r}", flush=True)
    return out


def round_record(run: Run, round_: int, closed: pb.RoundClosed, seconds: float, total: float) -> dict[str, Any]:
    parts = {p.worker_id: p for p in closed.participants}
    per_worker: dict[str, dict[str, Any]] = {}
    for h in run.hospitals:
        sub = h.events("submitted", round_)
        declined = h.events("declined", round_)
        applied = h.events("applied", round_)
        per_worker[h.name] = {
            "mode": h.mode,
            "participated": h.name in parts,
            "dp": not (sub[-1]["no_dp"] if sub else run.args.no_dp),
            "train_loss": sub[-1]["train_loss"] if sub else None,
            "epsilon": finite(parts[h.name].epsilon) if h.name in parts else None,
            "update_bytes": sub[-1]["update_bytes"] if sub else 0,
            "fhe_bytes_up": sub[-1]["fhe_bytes_up"] if sub else 0,
            "declined": declined[-1]["reason"] if declined else None,
            "lora_aggregation_error": applied[-1].get("lora_aggregation_error") if applied else None,
        }
    losses = [w["train_loss"] for w in per_worker.values() if w["train_loss"] is not None]
    errors = [w["lora_aggregation_error"] for w in per_worker.values() if w["lora_aggregation_error"] is not None]
    return {
        "round": round_,
        "outcome": "aggregated" if closed.outcome == pb.ROUND_OUTCOME_AGGREGATED else "failed",
        "reason": closed.reason,
        "participants": sorted(parts),
        "train_loss": sum(losses) / len(losses) if losses else None,
        "eval_loss": mean_eval(run.hospitals, round_),
        "epsilon": {n: w["epsilon"] for n, w in per_worker.items() if w["participated"]},
        "dp": {n: w["dp"] for n, w in per_worker.items()},
        "seconds": round(seconds, 3),
        "seconds_with_eval": round(total, 3),
        "bytes_up": sum(w["update_bytes"] + w["fhe_bytes_up"] for w in per_worker.values()),
        "update_bytes": sum(w["update_bytes"] for w in per_worker.values()),
        "fhe_bytes_up": sum(w["fhe_bytes_up"] for w in per_worker.values()),
        "lora_aggregation_error": max(errors) if errors else None,
        "workers": per_worker,
    }


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def print_round(rec: dict[str, Any], total: int) -> None:
    eps = ", ".join(f"{n} {'no-DP' if not rec['dp'][n] else _fmt(e, '.2f')}" for n, e in rec["epsilon"].items())
    extra = f"  LoRA agg. error {rec['lora_aggregation_error']:.2e}" if rec["lora_aggregation_error"] else ""
    print(f"round {rec['round']}/{total} {rec['outcome']}: {len(rec['participants'])} participants  "
          f"train loss {_fmt(rec['train_loss'])}  eval loss {_fmt(rec['eval_loss'])}  ε [{eps}]  "
          f"{rec['seconds']:.1f} s  {rec['bytes_up'] / 1e6:.2f} MB up{extra}", flush=True)


def write_plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = [r["round"] for r in report["rounds"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot([0, *rounds], [report["baseline_eval_loss"], *[r["eval_loss"] for r in report["rounds"]]], "o-")
    ax1.set(xlabel="round", ylabel="held-out loss (global adapter)", title="eval loss")
    for name in report["workers"]:
        eps = [r["epsilon"].get(name) for r in report["rounds"]]
        if any(e is not None for e in eps):
            ax2.plot(rounds, [e if e is not None else float("nan") for e in eps], "o-", label=name)
    ax2.axhline(report["settings"]["epsilon"], ls="--", c="grey", label="budget")
    ax2.set(xlabel="round", ylabel="ε spent", title="differential privacy")
    ax2.legend()
    for ax in (ax1, ax2):  # rounds are whole numbers: no 0.5, 1.5, ... ticks
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedfhe-local", description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=3, help="number of hospitals")
    p.add_argument("--rounds", type=int, default=3, help="federated rounds")
    p.add_argument("--model", default="tiny", choices=MODEL_IDS)
    p.add_argument("--report", type=Path, help="JSON report (default RUN_DIR/report.json); a PNG plot goes beside it")
    p.add_argument("--run-dir", type=Path, help="keep everything here (default: a new temporary directory)")
    p.add_argument("--min-workers", type=int, default=2, help="updates a round needs")
    def per_model(name: str) -> str:
        return "default per model: " + ", ".join(f"{m} {PRESETS[m][name]}" for m in PRESETS)

    p.add_argument("--modes", help="compute mode per hospital, cycled (fhe: encrypted on the node; local); "
                                   + per_model("modes"))
    p.add_argument("--param-set", choices=["exact", "compact"],
                   help="LWE parameter set of the fhe hospitals; " + per_model("param_set"))
    p.add_argument("--epsilon", type=float, default=8.0, help="DP budget per hospital over the whole run")
    p.add_argument("--delta", type=float, default=0.0, help="DP delta (0: 1/(10·N) per hospital)")
    p.add_argument("--no-dp", action="store_true", help="train WITHOUT differential privacy (comparison only)")
    p.add_argument("--no-scrub-pii", action="store_true",
                   help="hospitals train on notes WITH their identifiers (comparison only; default: scrubbed)")
    p.add_argument("--no-secagg", action="store_true",
                   help="WITHOUT secure aggregation: consortium pads only (comparison only)")
    p.add_argument("--secagg-threshold", type=int, default=0,
                   help="Shamir threshold of secure aggregation (0: a majority of each round's mask set)")
    p.add_argument("--max-grad-norm", type=float, help=f"DP-SGD clipping norm (default {MAX_GRAD_NORM:g}, the DP "
                                                         "recipe's)")
    p.add_argument("--dp-recipe", choices=["auto", "preset"],
                   help="auto: expected batch, local steps and learning rate from the notes per hospital, epsilon "
                        "and --rounds, as the DP utility benchmark measured them on SmolLM2 (prints its choice and "
                        "the kept fraction it predicts); preset: the model's preset below. Explicit flags win "
                        "either way; " + per_model("dp_recipe"))
    p.add_argument("--full-lora", action="store_true", help="train A and B (FedAvg of both is inexact: reported)")
    p.add_argument("--seed", type=int, default=0, help="data seed")
    p.add_argument("--replay-seed", type=int, default=0,
                   help="repeatable run: workers draw sampling and DP noise from a stream keyed by this seed "
                        "(comparisons only, NOT private; 0: the OS CSPRNG)")
    p.add_argument("--generate", default="Discharge summary: patient admitted with chest pain.", metavar="PROMPT",
                   help="after the last round, hospital-1 generates from PROMPT with and without the federated "
                        "adapter (empty: skip)")
    p.add_argument("--stats-seconds", type=float, default=30.0,
                   help="the services log memory, descriptors and tasks this often")
    p.add_argument("--kill-worker", action="append", metavar="NAME@ROUND",
                   help="fault drill: kill this worker mid-round, restart it after the round (repeatable)")
    p.add_argument("--dashboard", nargs="?", const="127.0.0.1:0", metavar="HOST:PORT",
                   help="also serve the operator's live dashboard (fedfhe-dashboard, operator certificate) on this "
                        "loopback address (default: a free port) and print its URL")
    for name in ("local_steps", "batch_size", "learning_rate", "lora_rank", "lora_alpha", "lora_targets",
                 "max_seq_len", "records", "eval_records", "round_deadline"):
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=type(PRESETS["tiny"][name]),
                       help=per_model(name))
    return p


def plan_training(args: argparse.Namespace) -> TrainingConfig:
    """The rounds' settings: the model's preset, then `--dp-recipe auto` (sets args.recipe), explicit flags win."""
    config = TrainingConfig(local_steps=args.local_steps, batch_size=args.batch_size,
                            learning_rate=args.learning_rate, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                            lora_targets=tuple(args.lora_targets.split(",")), ffa=not args.full_lora,
                            max_seq_len=args.max_seq_len, total_rounds=args.rounds).validate()
    args.recipe = None
    if args.dp_recipe == "auto":
        args.recipe = auto_recipe(args.records, None if args.no_dp else args.epsilon, args.rounds,
                                  args.delta or None)
        config = args.recipe.apply(config, args.explicit)
    if args.max_grad_norm is None:
        args.max_grad_norm = args.recipe.max_grad_norm if args.recipe else MAX_GRAD_NORM
    return config


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """The flags, the model's preset where a flag is missing, and which recipe settings were explicit."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.explicit = {f for f in RECIPE_FIELDS if getattr(args, f, None) is not None}  # before the preset fills in
    for name, value in PRESETS[args.model].items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    return parser, args


def main(argv: Sequence[str] | None = None) -> int:
    parser, args = parse_args(argv)
    if args.workers < 1 or args.rounds < 1 or not 1 <= args.min_workers <= args.workers:
        parser.error("need --workers >= 1, --rounds >= 1 and 1 <= --min-workers <= --workers")
    for k in args.kill_worker or []:
        if "@" not in k:
            parser.error(f"--kill-worker {k!r}: expected NAME@ROUND")
    if args.dashboard is not None and not is_loopback(args.dashboard.rpartition(":")[0].strip("[]")):
        parser.error(f"--dashboard {args.dashboard!r}: a loopback HOST:PORT (run fedfhe-dashboard with HTTPS and a "
                     "token to serve it beyond this machine)")
    config = plan_training(args)
    run_dir = (args.run_dir or Path(tempfile.mkdtemp(prefix="fedfhe-run-"))).resolve()
    for sub in ("logs", "metrics", "state"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    names = [f"hospital-{i + 1}" for i in range(args.workers)]
    make_federation_pki(run_dir / "pki", names, ["localhost", "127.0.0.1"], force=True)
    (run_dir / "keys").mkdir(mode=0o700, exist_ok=True)
    key = ConsortiumKey.generate()
    key_file = run_dir / "keys" / "consortium.key"
    write_key_file(key_file, key, force=True)
    generate_dataset(run_dir / "data", hospitals=args.workers, seed=args.seed, records=[args.records])
    modes = (args.modes.split(",") * args.workers)[:args.workers]
    print(f"run directory: {run_dir}")
    if args.recipe:
        print(args.recipe.describe(args.explicit))
    print(f"model {args.model}; hospitals {', '.join(f'{n} ({m})' for n, m in zip(names, modes, strict=True))}; "
          f"{'NO differential privacy (comparison run)' if args.no_dp else f'DP budget ε={args.epsilon:g}'}; "
          f"{'NO secure aggregation (comparison run)' if args.no_secagg else 'secure aggregation'}; "
          f"{'identifiers NOT scrubbed (comparison run)' if args.no_scrub_pii else 'PII scrubbed'}; "
          f"{f'REPLAYABLE randomness, seed {args.replay_seed} (comparison run); ' if args.replay_seed else ''}"
          f"{'full LoRA' if args.full_lora else 'FFA-LoRA'} rank {args.lora_rank} on {args.lora_targets}")
    procs: list[subprocess.Popen] = []
    hospitals: list[Hospital] = []
    started = time.monotonic()
    try:
        node_addr = ""
        if "fhe" in modes:
            node, node_log = _service("fhe_server", run_dir, "fhe_server", "--model", args.model,
                                  "--stats-seconds", str(args.stats_seconds))
            procs.append(node)
        coord, coord_log = _service("coordinator", run_dir, "coordinator", "--min-workers", str(args.min_workers),
                                    "--federation-id", f"local-{run_dir.name}"[:64], "--enrolled", ",".join(names),
                                    "--round-deadline", str(args.round_deadline),
                                    "--key-check-value", key.check_value().hex(),
                                    "--secagg-threshold", str(args.secagg_threshold),
                                    *(["--no-secagg"] if args.no_secagg else []),
                                    "--stats-seconds", str(args.stats_seconds))
        procs.append(coord)
        coord_addr = wait_for_address(coord, coord_log)
        if "fhe" in modes:
            node_addr = wait_for_address(node, node_log)
        print(f"coordinator on {coord_addr}" + (f", FHE node on {node_addr}" if node_addr else "") + " (mTLS)")
        if args.dashboard is not None:
            dash, dash_log = _service("coordinator.dashboard", run_dir, "dashboard", "--listen", args.dashboard,
                                      "--coordinator", coord_addr, "--identity", "operator",
                                      *(["--fhe", node_addr] if node_addr else []))
            procs.append(dash)  # stopped with the services at the end
            print(f"dashboard: http://{wait_for_address(dash, dash_log, timeout=60)}/", flush=True)
        for name, mode in zip(names, modes, strict=True):
            cmd = [sys.executable, "-m", "worker", "join", "--coordinator", coord_addr, "--tls-dir",
                   str(run_dir / "pki"), "--identity", name, "--mode", mode, "--model", args.model,
                   "--param-set", args.param_set, "--data", str(run_dir / "data" / name / "train.jsonl"),
                   "--eval-data", str(run_dir / "data" / name / "eval.jsonl"),
                   "--eval-records", str(args.eval_records), "--consortium-key", str(key_file),
                   "--epsilon", str(args.epsilon), "--delta", str(args.delta),
                   "--max-grad-norm", str(args.max_grad_norm),
                   "--metrics-file", str(run_dir / "metrics" / f"{name}.jsonl"),
                   "--privacy-ledger", str(run_dir / "state" / f"{name}.privacy.json"),
                   "--min-aggregate", str(min(2, args.min_workers)),
                   "--log-file", str(run_dir / "logs" / f"{name}.log"), "--reconnect-seconds", "60"]
            if mode == "fhe":
                cmd += ["--fhe", node_addr]
            if args.no_dp:
                cmd.append("--no-dp")
            if args.no_scrub_pii:
                cmd.append("--no-scrub-pii")
            if args.replay_seed:
                cmd += ["--replay-seed", str(args.replay_seed)]
            hospitals.append(Hospital(name, mode, cmd, run_dir / "metrics" / f"{name}.jsonl"))
            hospitals[-1].start()
        run = Run(args, run_dir, hospitals, config)
        asyncio.run(drive(run, coord_addr))
        for h in hospitals:
            try:
                assert h.proc is not None
                h.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                print(f"{h.name} did not exit after the federation finished", file=sys.stderr)
        report = make_report(run, time.monotonic() - started)
        report_path = (args.report or run_dir / "report.json").resolve()
        report_path.write_text(json.dumps(report, indent=2, allow_nan=False))
        write_plot(report, report_path.with_suffix(".png"))
        print(f"baseline eval loss {_fmt(report['baseline_eval_loss'])} → final {_fmt(report['final_eval_loss'])} "
              f"in {report['seconds']:.0f} s; report {report_path} (plot {report_path.with_suffix('.png').name})")
        bad = [h.name for h in hospitals if h.proc is not None and h.proc.returncode not in (0, None)]
        return 1 if bad or any(r["outcome"] != "aggregated" for r in report["rounds"]) else 0
    except (RuntimeError, TimeoutError, grpc.aio.AioRpcError) as exc:
        print(f"fedfhe-local: {exc}; logs in {run_dir / 'logs'}", file=sys.stderr)
        return 1
    finally:
        stop([h.proc for h in hospitals if h.proc is not None], grace=10)
        stop(procs)


def make_report(run: Run, seconds: float) -> dict[str, Any]:
    args = run.args
    aggregated = [r for r in run.rounds if r["outcome"] == "aggregated" and r["eval_loss"] is not None]
    return {
        "model": args.model,
        "workers": {h.name: {"mode": h.mode, "restarts": h.restarts, "pii_scrubbed": run.pii_scrubbed.get(h.name),
                             "final_epsilon": finite(h.events("finished")[-1]["epsilon"]) if h.events("finished")
                             else None} for h in run.hospitals},
        "settings": {"rounds": args.rounds, "min_workers": args.min_workers, "param_set": args.param_set,
                     "epsilon": args.epsilon, "delta": args.delta or None, "dp": not args.no_dp,
                     "replay_seed": args.replay_seed or None, "scrub_pii": not args.no_scrub_pii,
                     "max_grad_norm": args.max_grad_norm, "records_largest_hospital": args.records,
                     "dp_recipe": {**asdict(args.recipe), "explicit": sorted(args.explicit)} if args.recipe
                     else "preset",
                     "training": {**run.config.__dict__, "lora_targets": list(run.config.lora_targets)}},
        "secure_aggregation": None if args.no_secagg else {
            "scheme": SCHEME,
            "threshold": args.secagg_threshold or max((r["mask_recovery"] or {}).get("threshold", 0)
                                                      for r in run.rounds),
            "threshold_rule": "fixed (--secagg-threshold)" if args.secagg_threshold else "majority of each round's "
                                                                                        "mask set"},
        "baseline_eval_loss": mean_eval(run.hospitals, 0),
        "final_eval_loss": aggregated[-1]["eval_loss"] if aggregated else None,
        "rounds": run.rounds,
        "generation": run.generation,
        "seconds": round(seconds, 1),
        "run_dir": str(run.run_dir),
    }


if __name__ == "__main__":
    sys.exit(main())
