"""Several FHE nodes behind gRPC client-side load balancing: sessions spread over them, results stay exact."""

from __future__ import annotations

import numpy as np
import torch
from conftest import ServerThread

from common.config import ChannelConfig, ServerConfig
from common.lwe.params import EXACT
from common.models import load_model
from common.rpc import start_server
from common.stages import NodeWeights
from fedfhe.v1 import fhe_pb2_grpc
from fhe_server.__main__ import SERVICE
from fhe_server.service import FheServicer
from worker.fhe_client import FheClient
from worker.linears import FheEngine, LocalEngine, QuantizedLinears
from worker.model import SplitLlama


def test_round_robin_spreads_sessions_over_fhe_nodes() -> None:
    tiny = load_model("tiny")
    servicers = [FheServicer(NodeWeights(tiny)) for _ in range(2)]
    threads = []
    for servicer in servicers:
        async def start(servicer: FheServicer = servicer):  # type: ignore[no-untyped-def]
            return await start_server(ServerConfig(insecure=True),
                                      lambda s: fhe_pb2_grpc.add_FheServiceServicer_to_server(servicer, s),
                                      [SERVICE])
        threads.append(ServerThread(start))
    target = "ipv4:" + ",".join(f"127.0.0.1:{t.running.port}" for t in threads)  # what dns:/// resolves to
    channel = ChannelConfig(insecure=True, load_balancing="round_robin")
    clients = [FheClient(target, channel, EXACT, "tiny") for _ in range(4)]
    try:
        assert [len(s.sessions) for s in servicers] == [2, 2]  # four sessions, two per node
        ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
        local = SplitLlama(tiny, QuantizedLinears(LocalEngine(NodeWeights(tiny), EXACT)))
        with torch.no_grad():
            want = local(ids)
            for c in clients:  # hints may come from either node: they depend only on the seed and W
                np.testing.assert_array_equal(SplitLlama(tiny, QuantizedLinears(FheEngine(c)))(ids), want)
    finally:
        for c in clients:
            c.close()
        for t in threads:
            t.stop()
