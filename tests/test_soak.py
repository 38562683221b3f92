"""Load and soak: 4 workers × 20 rounds on the tiny model; the services' memory, descriptors and tasks stay flat."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROUNDS = 20


def events(log: Path, name: str) -> list[dict]:
    return [e for e in map(json.loads, log.read_text().splitlines()) if e["event"] == name]


@pytest.mark.timeout(900)
def test_twenty_rounds_with_four_workers_leak_nothing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "coordinator.local", "--workers", "4", "--rounds", str(ROUNDS),
                          "--model", "tiny", "--modes", "fhe,local,local,local", "--local-steps", "2",
                          "--records", "40", "--eval-records", "4", "--max-seq-len", "48",
                          "--stats-seconds", "1", "--run-dir", str(run)],
                         capture_output=True, text=True, timeout=850, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads((run / "report.json").read_text())
    assert [r["outcome"] for r in report["rounds"]] == ["aggregated"] * ROUNDS
    assert all(len(r["participants"]) == 4 for r in report["rounds"])
    closed = [e["timestamp"] for e in events(run / "logs" / "coordinator.log", "round closed")]
    assert len(closed) == ROUNDS
    for service in ("coordinator", "fhe_server"):
        samples = events(run / "logs" / f"{service}.log", "resources")
        warm = [s for s in samples if s["timestamp"] >= closed[2]]  # after three rounds: caches and pools warm
        assert len(warm) >= 10, (service, len(samples))
        first, last = warm[0], warm[-1]
        # a leak grows with the rounds; one sample's RSS also depends on where in a round it fell (sessions and
        # their hints come and go), so compare the peaks of the first and the last third of the samples
        third = len(warm) // 3
        early, late = (max(s["rss_bytes"] for s in part) for part in (warm[:third], warm[-third:]))
        growth = late / early - 1
        print(f"{service}: peak RSS {early / 2**20:.1f} → {late / 2**20:.1f} MiB ({growth:+.1%}), "
              f"fds {first['fds']} → {last['fds']}, tasks {first['tasks']} → {last['tasks']}")
        assert growth < 0.10, (service, early, late, warm)
        assert last["fds"] <= first["fds"] + 2, (service, first, last)
        assert last["tasks"] <= first["tasks"] + 2, (service, first, last)
