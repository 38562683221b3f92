"""scripts/bench_dp_utility.py's arithmetic: the kept fraction per N against that N's no-DP reference, and grids
run side by side (one process per N) combined only when they are the same benchmark."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_dp_utility.py"


@pytest.fixture(scope="module")
def bench() -> Any:
    spec = importlib.util.spec_from_file_location("bench_dp_utility", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def row(n: int, eps: float | None, loss: float) -> dict[str, Any]:
    return {"records_per_hospital": n, "epsilon": eps, "eval_loss": loss, "kept_fraction": None}


def test_kept_fraction_is_against_the_same_n_reference(bench: Any) -> None:
    rows = [row(400, None, 3.0), row(400, 8.0, 4.0), row(400, 1.0, 5.5), row(2000, 8.0, 3.5), row(40, None, 5.0),
            row(40, 8.0, 4.9)]
    bench.kept_fractions(rows, 5.0)
    assert [r["kept_fraction"] for r in rows] == [1.0, 0.5, pytest.approx(-0.25), None, None, None]


def report(tmp_path: Path, name: str, rows: list[dict[str, Any]], lr: float = 0.06) -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({
        "results": rows, "base_eval_loss": 5.0,
        "settings": {"model": "smollm2-135m", "mode": "local", "seed": 0, "eval_notes": 8, "quick": False,
                     "command": f"bench {name}", "records_per_hospital": sorted({r["records_per_hospital"]
                                                                                 for r in rows}),
                     "recipe": {"batch": 64, "steps": 6, "lr": lr, "clip": 0.5}},
        "machine": {"cpu": "test"}}))
    return path


def test_grids_run_side_by_side_combine_into_one_report(bench: Any, tmp_path: Path) -> None:
    a = report(tmp_path, "a", [row(2000, None, 3.0), row(2000, 8.0, 3.4)])
    b = report(tmp_path, "b", [row(400, None, 3.0), row(400, 8.0, 4.0)])
    out = tmp_path / "all.json"
    assert bench.combine([a, b], out, tmp_path / "all.png") == 0
    combined = json.loads(out.read_text())
    kept = {(r["records_per_hospital"], r["epsilon"]): r["kept_fraction"] for r in combined["results"]}
    assert kept == {(2000, None): 1.0, (2000, 8.0): pytest.approx(0.8), (400, None): 1.0, (400, 8.0): 0.5}
    assert combined["settings"]["records_per_hospital"] == [400, 2000]
    assert [p["command"] for p in combined["parts"]] == ["bench a", "bench b"]
    assert (tmp_path / "all.png").stat().st_size > 10_000


def test_different_benchmarks_are_not_combined(bench: Any, tmp_path: Path) -> None:
    a = report(tmp_path, "a", [row(2000, None, 3.0)])
    b = report(tmp_path, "b", [row(400, None, 3.0)], lr=0.01)
    with pytest.raises(SystemExit, match=r"not the same benchmark.*recipe"):
        bench.combine([a, b], tmp_path / "all.json", tmp_path / "all.png")
    assert not (tmp_path / "all.json").exists()
