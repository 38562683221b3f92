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


class ServerThread:
    """Runs an in-process grpc.aio server on its own event loop, for blocking (sync) clients."""

    def __init__(self, start) -> None:  # start: async () -> RunningServer
        import asyncio
        import threading

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.running = asyncio.run_coroutine_threadsafe(start(), self._loop).result(timeout=60)

    def stop(self) -> None:
        import asyncio

        asyncio.run_coroutine_threadsafe(self.running.stop(0), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
