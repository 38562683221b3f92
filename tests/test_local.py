"""fedfhe-local end to end: real processes on loopback with mTLS, per-service logs, clean shutdown."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.timeout(600)
def test_local_federation_runs_every_party_as_a_process(tmp_path: Path) -> None:
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "coordinator.local", "--workers", "2", "--run-dir", str(run),
                          "--max-new-tokens", "3"], capture_output=True, text=True, timeout=500, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("encrypted generation ok") == 2
    logs = {p.stem for p in (run / "logs").glob("*.log")}
    assert logs == {"fhe_server", "coordinator", "hospital-1", "hospital-2"}
    events = [json.loads(line) for line in (run / "logs" / "fhe_server.log").read_text().splitlines()]
    assert any(e["event"] == "serving" and e["tls"] for e in events)
    assert any(e["event"] == "shutting down" for e in events)  # SIGTERM led to a graceful stop
    generated = [json.loads(line) for line in (run / "logs" / "hospital-1.log").read_text().splitlines()]
    assert any(e["event"] == "generated" and e["bytes_up"] > 0 for e in generated)
    for key in (run / "pki").glob("*.key"):
        assert key.stat().st_mode & 0o777 == 0o600


def test_worker_without_a_node_fails_cleanly() -> None:
    out = subprocess.run([sys.executable, "-m", "worker", "generate", "--fhe", "127.0.0.1:1", "--insecure",
                          "--prompt", "x", "--deadline-seconds", "3"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode != 0
    assert "UNAVAILABLE" in out.stderr or "failed to connect" in out.stderr.lower()
