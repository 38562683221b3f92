"""CoordinatorService membership over mTLS and insecure loopback."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from common.config import ChannelConfig, ServerConfig
from common.rpc import make_channel, start_server
from coordinator.__main__ import SERVICE
from coordinator.service import CoordinatorServicer
from coordinator.state import Federation
from fedfhe.v1 import coordinator_pb2 as pb
from fedfhe.v1 import coordinator_pb2_grpc


async def start(cfg: ServerConfig, insecure: bool):
    servicer = CoordinatorServicer(Federation("fed-test"), insecure=insecure)
    running = await start_server(
        cfg, lambda s: coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(servicer, s), [SERVICE])
    return running, servicer


async def test_register_takes_identity_from_the_certificate(tls_dir: Path) -> None:
    running, servicer = await start(ServerConfig(tls_dir=tls_dir), insecure=False)
    target = f"localhost:{running.port}"
    try:
        async with make_channel(target, ChannelConfig(tls_dir=tls_dir, identity="hospital-2")) as ch:
            stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
            resp = await stub.Register(pb.RegisterRequest(worker_name="claims-to-be-hospital-1", num_records=7))
            assert resp.worker_id == "hospital-2" and resp.federation_id == "fed-test"
            status = await stub.GetStatus(pb.GetStatusRequest())
            assert [w.worker_id for w in status.workers] == ["hospital-2"]
        async with make_channel(target, ChannelConfig(tls_dir=tls_dir, identity="operator")) as ch:
            stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await stub.Register(pb.RegisterRequest())
            assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert list(servicer.federation.workers) == ["hospital-2"]
    finally:
        await running.stop(0)


async def test_insecure_loopback_takes_the_name_from_the_request() -> None:
    running, _ = await start(ServerConfig(insecure=True), insecure=True)
    try:
        async with make_channel(running.address, ChannelConfig(insecure=True)) as ch:
            stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
            assert (await stub.Register(pb.RegisterRequest(worker_name="hospital-9"))).worker_id == "hospital-9"
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await stub.Register(pb.RegisterRequest(worker_name="../etc"))
            assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert len((await stub.GetStatus(pb.GetStatusRequest())).workers) == 1
    finally:
        await running.stop(0)
