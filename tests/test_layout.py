"""The house rules, checked: each party's package imports no other party's, and protocol-free code has no gRPC."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTIES = ("coordinator", "worker", "fhe_server")
# Modules that must stay protocol-free: crypto, aggregation, model math, data (tested directly, no servers).
PROTOCOL_FREE = ("common/lwe", "common/datagen", "common/notes.py", "common/updates.py", "common/stages.py",
                 "common/training.py", "coordinator/state.py", "coordinator/patchbuf.py", "fhe_server/node.py",
                 "worker/model.py", "worker/train.py", "worker/linears.py", "worker/lora.py", "worker/data.py")


def imported_roots(path: Path) -> set[str]:
    """Top-level package names a module imports (absolute imports only: the project uses no relative ones)."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def modules(*where: str) -> list[Path]:
    out: list[Path] = []
    for w in where:
        p = ROOT / w
        out.extend(sorted(p.rglob("*.py")) if p.is_dir() else [p])
    return out


@pytest.mark.parametrize("party", PARTIES)
def test_no_party_imports_another(party: str) -> None:
    others = set(PARTIES) - {party}
    bad = {str(m.relative_to(ROOT)): sorted(imported_roots(m) & others) for m in modules(party)}
    assert {k: v for k, v in bad.items() if v} == {}


def test_common_imports_no_party() -> None:
    bad = {str(m.relative_to(ROOT)): sorted(imported_roots(m) & set(PARTIES)) for m in modules("common")}
    assert {k: v for k, v in bad.items() if v} == {}


def test_protocol_free_modules_have_no_grpc() -> None:
    bad = [str(m.relative_to(ROOT)) for m in modules(*PROTOCOL_FREE) if {"grpc", "fedfhe"} & imported_roots(m)]
    assert bad == []


def test_the_check_sees_a_cross_import(tmp_path: Path) -> None:
    """Positive control: a module importing another party is seen."""
    m = tmp_path / "bad.py"
    m.write_text("from worker.data import load_records\nimport coordinator.state as s\n")
    assert {"worker", "coordinator"} <= imported_roots(m)
