"""Shared fixtures: a federation PKI in a temporary directory; the tiny model, an FHE node serving it, a client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


@pytest.fixture(scope="session")
def tiny() -> Any:
    from common.models import load_model

    return load_model("tiny")


@pytest.fixture(scope="session")
def node_address(tiny: Any) -> Iterator[str]:
    """An in-process FHE node serving the tiny model (insecure loopback), on its own event loop thread."""
    from common.config import ServerConfig
    from common.rpc import start_server
    from common.stages import PublicWeights
    from fedfhe.v1 import fhe_pb2_grpc
    from fhe_server.__main__ import SERVICE
    from fhe_server.node import Node
    from fhe_server.service import FheServicer

    servicer = FheServicer(Node(PublicWeights(tiny)))

    async def start():  # type: ignore[no-untyped-def]
        return await start_server(ServerConfig(insecure=True),
                                  lambda s: fhe_pb2_grpc.add_FheServiceServicer_to_server(servicer, s), [SERVICE])

    thread = ServerThread(start)
    yield thread.running.address
    thread.stop()


@pytest.fixture
def client(node_address: str) -> Iterator[Any]:
    """A session with that node, exact parameter set."""
    from common.config import ChannelConfig
    from common.lwe.params import EXACT
    from worker.fhe_client import FheClient

    with FheClient(node_address, ChannelConfig(insecure=True), EXACT, "tiny") as c:
        yield c
