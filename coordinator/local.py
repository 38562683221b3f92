"""fedfhe-local: a whole federation on loopback, every party a separate process, mTLS throughout.

Makes a run directory (PKI, one log file per service), starts the FHE node and
the coordinator, waits for each to log its bound address, then runs one
worker process per hospital against them. Federated rounds are added to this
launcher by the federation issue; today each worker runs the encrypted model.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from common.certs import make_federation_pki
from common.models import MODEL_IDS

READY_TIMEOUT_S = 600  # loading SmolLM2 and quantizing its weights takes a while on 2 cores


def _service(module: str, run_dir: Path, name: str, *extra: str) -> tuple[subprocess.Popen, Path]:
    log_file = run_dir / "logs" / f"{name}.log"
    cmd = [sys.executable, "-m", module, "--listen", "127.0.0.1:0", "--tls-dir", str(run_dir / "pki"),
           "--log-file", str(log_file), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    return proc, log_file


def wait_for_address(proc: subprocess.Popen, log_file: Path, timeout: float = READY_TIMEOUT_S) -> str:
    """The address a service logged once it serves (it binds port 0, so only it knows the port)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{log_file.stem} exited with code {proc.returncode}; see {log_file}")
        if log_file.exists():
            for line in log_file.read_text().splitlines():
                event = json.loads(line)
                if event.get("event") == "serving":
                    return str(event["address"])
        time.sleep(0.2)
    raise TimeoutError(f"{log_file.stem} did not start serving within {timeout:.0f} s; see {log_file}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedfhe-local", description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=3, help="number of hospitals")
    parser.add_argument("--model", default="tiny", choices=MODEL_IDS)
    parser.add_argument("--param-set", default="exact", choices=["exact", "compact"])
    parser.add_argument("--run-dir", type=Path, help="keep everything here (default: a new temporary directory)")
    parser.add_argument("--prompt", default="Patient admitted with chest pain. Diagnosis:")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="fedfhe-run-"))
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    hospitals = [f"hospital-{i + 1}" for i in range(args.workers)]
    make_federation_pki(run_dir / "pki", hospitals, ["localhost", "127.0.0.1"], force=True)
    print(f"run directory: {run_dir}")
    procs: list[subprocess.Popen] = []
    try:
        node, node_log = _service("fhe_server", run_dir, "fhe_server", "--model", args.model)
        coord, coord_log = _service("coordinator", run_dir, "coordinator")
        procs += [node, coord]
        node_addr = wait_for_address(node, node_log)
        coord_addr = wait_for_address(coord, coord_log)
        print(f"FHE node on {node_addr}, coordinator on {coord_addr} (mTLS)")
        failures = 0
        for name in hospitals:
            cmd = [sys.executable, "-m", "worker", "generate", "--fhe", node_addr.replace("127.0.0.1", "localhost"),
                   "--tls-dir", str(run_dir / "pki"), "--identity", name, "--model", args.model,
                   "--param-set", args.param_set, "--prompt", args.prompt,
                   "--max-new-tokens", str(args.max_new_tokens), "--log-file", str(run_dir / "logs" / f"{name}.log")]
            start = time.monotonic()
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            text = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
            status = "ok" if out.returncode == 0 else f"failed ({out.returncode})"
            failures += out.returncode != 0
            print(f"{name}: encrypted generation {status} in {time.monotonic() - start:.1f} s: {text!r}")
        return 1 if failures else 0
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
