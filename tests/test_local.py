"""fedfhe-local end to end: real processes on loopback with mTLS, rounds, a worker killed mid-round after it
joined the round's mask set (secure aggregation recovers its masks), the report."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from common.updates import load_key_file


@pytest.mark.timeout(900)
def test_local_federation_with_a_worker_killed_mid_round(tmp_path: Path) -> None:
    run, report_path = tmp_path / "run", tmp_path / "out" / "report.json"
    report_path.parent.mkdir()
    out = subprocess.run([sys.executable, "-m", "coordinator.local", "--workers", "4", "--rounds", "3",
                          "--model", "tiny", "--min-workers", "3", "--kill-worker", "hospital-4@2",
                          "--run-dir", str(run), "--report", str(report_path)],
                         capture_output=True, text=True, timeout=850, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("aggregated:") == 3, out.stdout
    report = json.loads(report_path.read_text())
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    # the killed worker does not block round 2, and it is back for round 3
    everyone = ["hospital-1", "hospital-2", "hospital-3", "hospital-4"]
    assert [r["participants"] for r in rounds] == [everyone, everyone[:3], everyone]
    assert report["workers"]["hospital-4"]["restarts"] == 1
    assert report["settings"]["scrub_pii"] and all(w["pii_scrubbed"] for w in report["workers"].values())
    # secure aggregation: hospital-4 had joined round 2's mask set, so its masks were rebuilt from shares
    assert report["secure_aggregation"]["threshold"] == 3 and "Bonawitz" in report["secure_aggregation"]["scheme"]
    assert rounds[1]["mask_recovery"]["dropped"] == ["hospital-4"]
    assert rounds[1]["mask_recovery"]["members"] == everyone and rounds[1]["mask_recovery"]["phase"] == "done"
    assert [r["mask_recovery"]["dropped"] for r in (rounds[0], rounds[2])] == [[], []]
    for r in rounds:
        assert r["train_loss"] > 0 and r["eval_loss"] > 0 and r["seconds"] > 0 and r["bytes_up"] > 0
        assert all(0 < e <= 8.0 + 1e-6 for e in r["epsilon"].values())
        assert set(r["epsilon"]) == set(r["participants"])
    # ε only grows, and the restarted worker kept its privacy ledger
    assert rounds[2]["epsilon"]["hospital-4"] > rounds[0]["epsilon"]["hospital-4"]
    assert [r["eval_loss"] for r in rounds] == sorted((r["eval_loss"] for r in rounds), reverse=True)  # it falls
    assert rounds[0]["workers"]["hospital-1"]["fhe_bytes_up"] > 0  # hospital-1 computes through the FHE node
    assert report["final_eval_loss"] < report["baseline_eval_loss"]
    assert report_path.with_suffix(".png").stat().st_size > 10_000
    assert {p.stem for p in (run / "logs").glob("*.log")} == {
        "fhe_server", "coordinator", *everyone, "hospital-1-generate"}
    # hospital-1 generated with the federated adapter, fetched and decrypted in RAM
    gen = report["generation"]
    assert gen["prompt"] and not gen["federated_adapter"].startswith("(failed")
    assert not gen["base_model"].startswith("(failed")
    coord = [json.loads(line) for line in (run / "logs" / "coordinator.log").read_text().splitlines()]
    assert any(e["event"] == "serving" and e["tls"] for e in coord)
    assert any(e["event"] == "shutting down" for e in coord)  # SIGTERM led to a graceful stop
    assert sum(e["event"] == "round closed" for e in coord) == 3
    for service in ("coordinator", "fhe_server"):  # no payload is ever logged: every line is short
        lines = (run / "logs" / f"{service}.log").read_text().splitlines()
        assert max(map(len, lines)) < 2000, service
    # keys are 0600, and no log, metric, data or temp file holds the consortium key
    key_file = run / "keys" / "consortium.key"
    for key in [*(run / "pki").glob("*.key"), key_file]:
        assert key.stat().st_mode & 0o777 == 0o600
    raw = load_key_file(key_file).raw_bytes()
    needles = [raw, raw.hex().encode(), base64.b64encode(raw)]
    for root in (run, Path(tempfile.gettempdir())):
        for path in root.rglob("*"):
            if path.is_file() and path != key_file and not path.is_symlink():
                try:
                    data = path.read_bytes()
                except OSError:
                    continue
                assert not any(n in data for n in needles), path


def test_worker_without_a_node_fails_cleanly() -> None:
    out = subprocess.run([sys.executable, "-m", "worker", "generate", "--fhe", "127.0.0.1:1", "--insecure",
                          "--prompt", "x", "--deadline-seconds", "3"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode != 0
    assert "UNAVAILABLE" in out.stderr or "failed to connect" in out.stderr.lower()
