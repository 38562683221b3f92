"""Plots from the JSON of bench_matmul.py (cost vs width, cost vs tokens) and bench_model.py (where the time goes).

    python scripts/bench_plots.py --matmul /tmp/bench/matmul.json [--model /tmp/bench/model.json] [--out docs/bench]
        [--threads default] [--width-tokens 128] [--tokens-width 2048]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

SERIES = (  # label, value(shape) in ms, style
    ("plaintext fp32", lambda r: r["fp32_ms"], dict(color="black", marker="o")),
    ("node, exact set (q=2^64, n=2048)", lambda r: r["exact"]["node_ms"], dict(color="tab:blue", marker="s")),
    ("node, compact set (q=2^32, n=1280)", lambda r: r["compact"]["node_ms"], dict(color="tab:cyan", marker="^")),
    ("worker enc+dec, exact set", lambda r: r["exact"]["encrypt_ms"] + r["exact"]["decrypt_ms"],
     dict(color="tab:green", marker="D", linestyle="--")),
    ("worker online only, exact set", lambda r: r["exact"]["online_ms"],
     dict(color="tab:olive", marker="d", linestyle=":")),
    ("server, scalar LWE (engima-fhe, n=1024)", lambda r: r["scalar"]["server_ms"],
     dict(color="tab:red", marker="x", linestyle="-.")),
)


def _run(report: dict[str, Any], threads: str) -> dict[str, Any]:
    for run in report["runs"]:
        if run["threads"] == threads:
            return run
    raise SystemExit(f"no run with threads={threads} in the JSON (have {[r['threads'] for r in report['runs']]})")


def _machine(run: dict[str, Any]) -> str:
    m = run["machine"]
    return f"{m['cpu_model'] or m['machine']}, {m['logical_cpus']} CPUs, BLAS threads {run['threads']}"


def cost_plot(shapes: list[dict[str, Any]], x_key: str, title: str, xlabel: str, path: Path, machine: str) -> None:
    fig, (ax, rx) = plt.subplots(1, 2, figsize=(13, 5))
    xs = [r[x_key] for r in shapes]
    for label, value, style in SERIES:
        ys = [value(r) for r in shapes]
        ax.plot(xs, ys, label=label, **style)
        if label.startswith("server, scalar"):  # hollow markers: extrapolated from a timed subset
            ext = [(x, y) for x, y, r in zip(xs, ys, shapes, strict=True) if r["scalar"]["extrapolated"]]
            if ext:
                ax.scatter(*zip(*ext, strict=True), s=120, facecolors="none", edgecolors="tab:red",
                           label="scalar LWE: extrapolated from a timed subset")
        if label != "plaintext fp32":
            rx.plot(xs, [y / r["fp32_ms"] for y, r in zip(ys, shapes, strict=True)], label=label, **style)
    for a in (ax, rx):
        a.set_xscale("log", base=2)
        a.set_yscale("log")
        a.set_xticks(xs, [str(x) for x in xs])
        a.set_xlabel(xlabel)
        a.grid(True, which="both", alpha=0.3)
    ax.set_ylabel("ms (best of N, wall)")
    ax.set_title(title)
    rx.set_ylabel("time / plaintext fp32 time")
    rx.axhline(5.5, color="tab:blue", alpha=0.4, linestyle=":")
    rx.set_title("ratio to the plaintext product (dotted: 5.5×)")
    ax.legend(fontsize=7, loc="best", framealpha=0.6)
    fig.suptitle(machine, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")


def breakdown_plot(model: dict[str, Any], path: Path) -> None:
    from bench_model import BREAKDOWN_LABELS

    sections = [("forward", model["forward"])] + ([("training step", model["train"])] if model.get("train") else [])
    fig, ax = plt.subplots(figsize=(11, 1.2 + 1.1 * len(sections)))
    colors = plt.get_cmap("tab10").colors
    for row, (_, sec) in enumerate(sections):
        left = 0.0
        parts = sec["fhe"]["parts_s"]
        for i, (key, label) in enumerate(BREAKDOWN_LABELS.items()):
            width = max(0.0, parts[key])
            ax.barh(row, width, left=left, color=colors[i], label=label if row == 0 else None)
            left += width
        ax.text(left, row, f"  {sec['fhe']['seconds']:.1f} s (local {sec['local']['seconds']:.2f} s)", va="center")
    ax.set_yticks(range(len(sections)), [s for s, _ in sections])
    ax.set_xlabel("seconds")
    ax.set_title(f"{model['model']}, {model['layers']} layers, {model['param_set']} set, {model['batch']}×"
                 f"{model['tokens']} tokens: where the encrypted (fhe) time goes")
    ax.set_xlim(0, max(s["fhe"]["seconds"] for _, s in sections) * 1.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--matmul", type=Path, help="JSON written by bench_matmul.py --json")
    ap.add_argument("--model", type=Path, help="JSON written by bench_model.py --json")
    ap.add_argument("--out", type=Path, default=Path("docs/bench"))
    ap.add_argument("--threads", default="default", help="which thread setting of the matmul JSON to plot")
    ap.add_argument("--width-tokens", type=int, default=128, help="T of the cost-vs-width plot")
    ap.add_argument("--tokens-width", type=int, default=2048, help="d of the cost-vs-tokens plot")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.matmul:
        run = _run(json.loads(args.matmul.read_text()), args.threads)
        shapes = run["shapes"]
        by_width = sorted((r for r in shapes if r["tokens"] == args.width_tokens), key=lambda r: r["d"])
        by_tokens = sorted((r for r in shapes if r["d"] == args.tokens_width), key=lambda r: r["tokens"])
        if by_width:
            cost_plot(by_width, "d", f"W (d×d) @ X (d×{args.width_tokens}): cost vs width", "width d",
                      args.out / "cost_vs_width.png", _machine(run))
        if by_tokens:
            cost_plot(by_tokens, "tokens", f"W ({args.tokens_width}×{args.tokens_width}) @ X: cost vs tokens",
                      "tokens T", args.out / "cost_vs_tokens.png", _machine(run))
    if args.model:
        breakdown_plot(json.loads(args.model.read_text()), args.out / "model_breakdown.png")


if __name__ == "__main__":
    main()
