"""Shared fixtures: a federation PKI in a temporary directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.certs import make_federation_pki


@pytest.fixture(scope="session")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    make_federation_pki(d, ["hospital-1", "hospital-2"], ["localhost", "127.0.0.1"])
    return d
