"""Several FHE nodes behind gRPC client-side load balancing: sessions spread over them, results stay exact."""

from __future__ import annotations

import asyncio

import numpy as np
import torch
from conftest import ServerThread

from common.config import ChannelConfig, ServerConfig
from common.lwe.params import EXACT
from common.models import load_model
from common.rpc import make_channel, start_server
from common.stages import PublicWeights
from fedfhe.v1 import common_pb2, fhe_pb2, fhe_pb2_grpc
from fhe_server.__main__ import SERVICE
from fhe_server.node import Node
from fhe_server.service import FheServicer
from worker.fhe_client import FheClient
from worker.linears import FheEngine, LocalEngine, QuantizedLinears
from worker.model import SplitLlama

OPEN = fhe_pb2.EvaluateRequest(open=fhe_pb2.OpenSession(seed=bytes(32), param_set=common_pb2.PARAM_SET_EXACT,
                                                         model_id="tiny"))


async def spread(target: str, sessions: int, opened: asyncio.Event, release: asyncio.Event) -> None:
    """Open `sessions` Evaluate streams on one round_robin channel once every node is connected;
    set `opened`, and hold them until `release`."""
    async with make_channel(target, ChannelConfig(insecure=True, load_balancing="round_robin")) as channel:
        await channel.channel_ready()
        await asyncio.sleep(1.0)  # the other subchannels connect too: round_robin only picks READY ones
        stub = fhe_pb2_grpc.FheServiceStub(channel)
        calls = []
        for _ in range(sessions):
            call = stub.Evaluate()
            await call.write(OPEN)
            assert (await call.read()).WhichOneof("kind") == "opened"
            calls.append(call)
        opened.set()
        await release.wait()
        for call in calls:
            await call.done_writing()


def test_round_robin_spreads_sessions_over_fhe_nodes() -> None:
    tiny = load_model("tiny")
    servicers = [FheServicer(Node(PublicWeights(tiny))) for _ in range(2)]
    threads = []
    for servicer in servicers:
        async def start(servicer: FheServicer = servicer):  # type: ignore[no-untyped-def]
            return await start_server(ServerConfig(insecure=True),
                                      lambda s: fhe_pb2_grpc.add_FheServiceServicer_to_server(servicer, s),
                                      [SERVICE])
        threads.append(ServerThread(start))
    target = "ipv4:" + ",".join(f"127.0.0.1:{t.running.port}" for t in threads)  # what dns:/// resolves to
    try:
        async def check_spread() -> None:
            opened, release = asyncio.Event(), asyncio.Event()
            task = asyncio.create_task(spread(target, 4, opened, release))
            await opened.wait()
            assert [len(s.node.sessions) for s in servicers] == [2, 2]  # one channel: sessions alternate nodes
            release.set()
            await task
        asyncio.run(check_spread())
        # Workers, each with its own channel: whichever node a session lands on, the products are exact
        # (hints depend only on the public seed and weights, so they may come from either node).
        clients = [FheClient(target, ChannelConfig(insecure=True, load_balancing="round_robin"), EXACT, "tiny")
                   for _ in range(4)]
        try:
            assert sum(len(s.node.sessions) for s in servicers) == 4
            ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
            local = SplitLlama(tiny, QuantizedLinears(LocalEngine(PublicWeights(tiny), EXACT)))
            with torch.no_grad():
                want = local(ids)
                public = PublicWeights(tiny)
                for c in clients:
                    np.testing.assert_array_equal(SplitLlama(tiny, QuantizedLinears(FheEngine(c, public)))(ids), want)
        finally:
            for c in clients:
                c.close()
    finally:
        for t in threads:
            t.stop()
