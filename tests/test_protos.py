"""The committed generated code equals a fresh regeneration, and the API surface is complete."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "protos" / "fedfhe" / "v1"


def test_generated_code_matches_regeneration(tmp_path: Path) -> None:
    protos = sorted(PROTO_DIR.glob("*.proto"))
    assert protos, "no .proto files found"
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'protos'}",
         f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
         *map(str, protos)],
        check=True,
    )
    fresh = sorted((tmp_path / "fedfhe" / "v1").glob("*_pb2*.py*"))
    assert len(fresh) == 3 * len(protos)
    stale = [f.name for f in fresh if (PROTO_DIR / f.name).read_bytes() != f.read_bytes()]
    assert not stale, f"regenerate with scripts/gen_protos.sh; stale: {stale}"
    committed = {f.name for f in PROTO_DIR.glob("*_pb2*.py*")}
    assert committed == {f.name for f in fresh}, "generated files without a .proto"


def test_service_surface() -> None:
    from fedfhe.v1 import coordinator_pb2, fhe_pb2

    fhe = fhe_pb2.DESCRIPTOR.services_by_name["FheService"]
    evaluate = fhe.methods_by_name["Evaluate"]
    assert evaluate.client_streaming and evaluate.server_streaming
    hint = fhe.methods_by_name["GetHint"]
    assert not hint.client_streaming and hint.server_streaming
    coord = coordinator_pb2.DESCRIPTOR.services_by_name["CoordinatorService"]
    kinds = {m.name: (m.client_streaming, m.server_streaming) for m in coord.methods}
    assert kinds == {
        "Register": (False, False),
        "WatchRounds": (False, True),
        "GetPatch": (False, True),
        "SubmitUpdate": (True, False),
        "DeclineRound": (False, False),
        "GetStatus": (False, False),
        "StartRound": (False, False),
        "FinishFederation": (False, False),
        "RestorePatch": (True, False),
        "AdvertiseMaskKeys": (False, False),
        "ShareMaskSecrets": (False, False),
        "ConfirmSurvivors": (False, False),
        "RevealMaskShares": (False, False),
        "ReportEvaluation": (False, False),
    }


def test_fhe_messages_have_no_secret_fields() -> None:
    """Every message the node accepts is free of fields that could carry key material."""
    from fedfhe.v1 import fhe_pb2

    forbidden = ("secret", "key_bytes", "private", "password", "sk", "token")
    seen: set[str] = set()

    def walk(desc) -> None:  # type: ignore[no-untyped-def]
        if desc.full_name in seen:
            return
        seen.add(desc.full_name)
        for f in desc.fields:
            assert not any(w == f.name or f.name.startswith(w + "_") or w in f.name.split("_")
                           for w in forbidden), f"{desc.full_name}.{f.name} looks secret"
            if f.message_type is not None:
                walk(f.message_type)

    for method in fhe_pb2.DESCRIPTOR.services_by_name["FheService"].methods:
        walk(method.input_type)
    assert "fedfhe.v1.OpenSession" in seen and "fedfhe.v1.PassRequest" in seen
