"""Federation benchmark: round time and bytes for 2, 4, 8 workers on the tiny model; coordinator memory per worker.

    python scripts/bench_federation.py [--workers 2 4 8] [--rounds 3] [--modes local] [--json FILE]

Each configuration is one real `fedfhe-local` run (every party its own process, mTLS on
loopback), one after the other on the same machine. From each run's report and the
coordinator's periodic `resources` log it takes: the mean round time (start to close, and
with the workers' evaluation), bytes sent per worker per round (encrypted update, and
ciphertexts to the FHE node for fhe-mode hospitals), and the coordinator's peak RSS. The
coordinator's memory per worker is the slope of peak RSS over the worker count.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]


def run(workers: int, rounds: int, modes: str, extra: list[str]) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix=f"fedfhe-bench-{workers}-"))
    cmd = [sys.executable, "-m", "coordinator.local", "--workers", str(workers), "--rounds", str(rounds),
           "--model", "tiny", "--modes", modes, "--min-workers", "2", "--stats-seconds", "0.5",
           "--run-dir", str(run_dir), *extra]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    report = json.loads((run_dir / "report.json").read_text())
    samples = [e for e in map(json.loads, (run_dir / "logs" / "coordinator.log").read_text().splitlines())
               if e["event"] == "resources"]
    rs = report["rounds"]
    return {
        "workers": workers,
        "rounds": rounds,
        "round_seconds": sum(r["seconds"] for r in rs) / len(rs),
        "round_seconds_with_eval": sum(r["seconds_with_eval"] for r in rs) / len(rs),
        "update_bytes_per_worker": sum(r["update_bytes"] for r in rs) / len(rs) / workers,
        "fhe_bytes_per_round": sum(r["fhe_bytes_up"] for r in rs) / len(rs),
        "coordinator_peak_rss": max(s["rss_bytes"] for s in samples),
        "coordinator_start_rss": samples[0]["rss_bytes"],
        "final_eval_loss": report["final_eval_loss"],
        "baseline_eval_loss": report["baseline_eval_loss"],
        "run_dir": str(run_dir),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--modes", default="local", help="compute modes, cycled over the hospitals")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("extra", nargs="*", help="more fedfhe-local flags, after --")
    args = p.parse_args()
    results = [run(w, args.rounds, args.modes, args.extra) for w in args.workers]
    if len(results) >= 2:
        a, b = results[0], results[-1]
        slope = (b["coordinator_peak_rss"] - a["coordinator_peak_rss"]) / (b["workers"] - a["workers"])
    else:
        slope = float("nan")
    table = Table("workers", "round s", "round s (+eval)", "update KB/worker/round", "FHE MB/round",
                  "coordinator peak RSS MiB", "eval loss",
                  title=f"federation on the tiny model, {args.rounds} rounds, modes {args.modes}")
    for r in results:
        table.add_row(str(r["workers"]), f"{r['round_seconds']:.2f}", f"{r['round_seconds_with_eval']:.2f}",
                      f"{r['update_bytes_per_worker'] / 1e3:.1f}", f"{r['fhe_bytes_per_round'] / 1e6:.1f}",
                      f"{r['coordinator_peak_rss'] / 2**20:.1f}",
                      f"{r['baseline_eval_loss']:.2f} → {r['final_eval_loss']:.2f}")
    console = Console()
    console.print(table)
    console.print(f"coordinator memory per worker (slope of peak RSS): {slope / 2**10:.0f} KiB")
    console.print(f"machine: {platform.machine()}, {platform.system()} {platform.release()}, "
                  f"{len(__import__('os').sched_getaffinity(0))} CPUs")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"results": results, "coordinator_bytes_per_worker": slope}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
