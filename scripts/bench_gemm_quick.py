"""Quick CPU benchmark: exact mod-q GEMM (float64 limbs) against a float32 plaintext matmul of the same shape.

Shape: the node's W·B, W (2048 × 2048) int8 with |w| ≤ 127, B (2048 × 128)
uniform residues; mod 2^64 (exact set) and mod 2^32 (compact set), with W
passed as int8 and as the float64 copy the node caches. Each thread setting
runs in its own child process, because OpenBLAS reads its thread count from
the environment at import. Timings are best of N, interleaved so that load
from other processes hits every case alike. Target: mod 2^64 with int8 W at
most 5.5× the float32 product.

    python scripts/bench_gemm_quick.py [--json] [--repeat 7] [--threads 1,default] [--impl path/to/gemm.py]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
M, K, N = 2048, 2048, 128
TARGET_RATIO = 5.5


def load_gemm(impl: str | None) -> ModuleType:
    if impl is None:
        sys.path.insert(0, str(ROOT))
        from common.lwe import gemm

        return gemm
    # Another implementation of the same API, for an A/B comparison in the same conditions.
    spec = importlib.util.spec_from_file_location("gemm_under_test", impl)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {impl}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def child(threads: str, repeat: int, impl: str | None) -> dict[str, Any]:
    """Runs in a process whose BLAS thread count is already fixed by the environment."""
    import numpy as np
    import torch

    if threads != "default":
        torch.set_num_threads(int(threads))
    gemm = load_gemm(impl)
    rng = np.random.default_rng(0)  # benchmark data only
    w8 = rng.integers(-127, 128, size=(M, K)).astype(np.int8)
    w64 = w8.astype(np.float64)
    b64 = rng.integers(0, np.iinfo(np.uint64).max, size=(K, N), dtype=np.uint64, endpoint=True)
    b32 = b64.astype(np.uint32)
    w32f, b32f = w8.astype(np.float32), rng.standard_normal((K, N)).astype(np.float32)
    tw, tb = torch.from_numpy(w32f), torch.from_numpy(b32f)

    def mod(w: np.ndarray, b: np.ndarray, log_q: int) -> Callable[[], object]:
        return lambda: gemm.matmul_mod(w, b, log_q=log_q, small="left", small_bound=127, backend="cpu")

    cases: dict[str, Callable[[], object]] = {
        "fp32_numpy": lambda: w32f @ b32f,
        "fp32_torch": lambda: tw @ tb,
        "mod64_int8_w": mod(w8, b64, 64),
        "mod64_f64_w": mod(w64, b64, 64),
        "mod32_int8_w": mod(w8, b32, 32),
        "mod32_f64_w": mod(w64, b32, 32),
    }
    # A benchmark of a wrong product is worthless: check a sample against Python integers.
    rows, cols = rng.choice(M, 4, replace=False), rng.choice(N, 4, replace=False)
    for log_q, b in ((64, b64), (32, b32)):
        got = gemm.matmul_mod(w8, b, log_q=log_q, small="left", small_bound=127, backend="cpu")
        want = gemm.matmul_mod_reference(w8[rows], b[:, cols], log_q=log_q)
        if not np.array_equal(got[np.ix_(rows, cols)], want):
            raise SystemExit(f"mod 2^{log_q} product differs from the Python-integer reference")

    wall: dict[str, list[float]] = {name: [] for name in cases}
    cpu: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():  # warm-up: BLAS buffers, page faults
        fn()
    for _ in range(repeat):
        for name, fn in cases.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)

    def summary(times: dict[str, list[float]]) -> tuple[dict[str, float], dict[str, float]]:
        best = {name: min(ts) * 1e3 for name, ts in times.items()}
        fp32 = min(best["fp32_numpy"], best["fp32_torch"])  # the faster plaintext product
        ratio = {name: round(ms / fp32, 2) for name, ms in best.items() if name.startswith("mod")}
        return {name: round(ms, 2) for name, ms in best.items()}, ratio

    best_ms, ratio = summary(wall)
    # CPU time (all threads) is what the product costs when other processes share the cores;
    # on a busy box it is the steadier number, on a quiet one wall time is the one to quote.
    cpu_ms, cpu_ratio = summary(cpu)
    return {
        "threads": threads,
        "torch_threads": torch.get_num_threads(),
        "best_ms": best_ms,
        "ratio_vs_fp32": ratio,
        "best_cpu_ms": cpu_ms,
        "cpu_ratio_vs_fp32": cpu_ratio,
        "load_avg_1min": round(os.getloadavg()[0], 2),
    }


def run_child(threads: str, repeat: int, impl: str | None) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    if threads != "default":
        env.update(dict.fromkeys(THREAD_VARS, threads))
    cmd = [sys.executable, __file__, "--child", "--threads", threads, "--repeat", str(repeat)]
    if impl:
        cmd += ["--impl", impl]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"child for threads={threads} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--repeat", type=int, default=7, help="timed rounds per case (best is kept)")
    ap.add_argument("--threads", default="1,default", help="comma-separated BLAS thread settings")
    ap.add_argument("--impl", help="time this gemm.py instead of common/lwe/gemm.py")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.threads, args.repeat, args.impl)))
        return
    results = [run_child(t, args.repeat, args.impl) for t in args.threads.split(",")]
    report = {
        "shape": {"m": M, "k": K, "n": N},
        "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs",
        "target_ratio_mod64_int8_w": TARGET_RATIO,
        "impl": args.impl or "common/lwe/gemm.py",
        "runs": results,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"W ({M}x{K} int8) @ B ({K}x{N}) on {report['machine']}, best of {args.repeat}, impl {report['impl']}")
    for r in results:
        ms, ratio = r["best_ms"], r["ratio_vs_fp32"]
        cms, cratio = r["best_cpu_ms"], r["cpu_ratio_vs_fp32"]
        print(f"\nthreads={r['threads']} (torch {r['torch_threads']}), 1-min load average {r['load_avg_1min']}")
        print(f"  {'':18s}  {'wall':>10s}  {'':10s}  {'cpu time':>10s}")
        for name in ("fp32_numpy", "fp32_torch"):
            print(f"  {name:18s}  {ms[name]:7.2f} ms  {'':10s}  {cms[name]:7.2f} ms")
        for name in ratio:
            wall_col = f"{ms[name]:7.2f} ms  {ratio[name]:5.2f}x fp32"
            cpu_col = f"{cms[name]:7.2f} ms  {cratio[name]:5.2f}x"
            print(f"  {name:18s}  {wall_col}  {cpu_col}")
        verdict = "meets" if ratio["mod64_int8_w"] <= TARGET_RATIO else "MISSES"
        print(f"  mod 2^64 with int8 W {verdict} the {TARGET_RATIO}x target")


if __name__ == "__main__":
    main()
