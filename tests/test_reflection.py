"""What `grpcurl list`, `describe` and a GetStatus call do, through the reflection protocol only.

The client below knows no fedfhe proto: every descriptor comes from the server's
reflection service, as it does for grpcurl.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from conftest import ServerThread
from fedkit import start_coordinator, start_node
from google.protobuf.descriptor_pool import DescriptorPool
from google.protobuf.message_factory import GetMessageClass
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from common.tls import channel_credentials
from coordinator.state import Settings

HEALTH, REFLECTION = "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"


def call_by_reflection(channel: grpc.Channel, pool: DescriptorPool, service: str, method: str) -> object:
    """A unary call built from reflected descriptors: grpcurl's `SERVICE/METHOD` with an empty request."""
    m = pool.FindServiceByName(service).methods_by_name[method]
    request_cls, response_cls = GetMessageClass(m.input_type), GetMessageClass(m.output_type)
    rpc = channel.unary_unary(f"/{service}/{method}", request_serializer=request_cls.SerializeToString,
                              response_deserializer=response_cls.FromString)
    return rpc(request_cls(), timeout=10)


def test_coordinator_lists_describes_and_answers_get_status_over_mtls(tls_dir: Path) -> None:
    server = ServerThread(lambda: _running(start_coordinator(Settings(min_workers=2, keep_rounds=4),
                                                            tls_dir=tls_dir)))
    creds = channel_credentials(tls_dir, "operator")
    try:
        with grpc.secure_channel(f"localhost:{server.running.port}", creds) as channel:
            db = ProtoReflectionDescriptorDatabase(channel)
            services = set(db.get_services())  # grpcurl ... list
            assert services == {"fedfhe.v1.CoordinatorService", HEALTH, REFLECTION}
            pool = DescriptorPool(db)
            svc = pool.FindServiceByName("fedfhe.v1.CoordinatorService")  # grpcurl ... describe SERVICE
            assert {"Register", "WatchRounds", "GetPatch", "SubmitUpdate", "GetStatus", "StartRound",
                    "FinishFederation", "DeclineRound", "RestorePatch"} <= set(svc.methods_by_name)
            assert svc.methods_by_name["SubmitUpdate"].client_streaming
            cfg = pool.FindMessageTypeByName("fedfhe.v1.RoundConfig")  # grpcurl ... describe MESSAGE
            assert {"local_steps", "batch_size", "lora_targets", "total_rounds"} <= set(cfg.fields_by_name)
            status = call_by_reflection(channel, pool, "fedfhe.v1.CoordinatorService", "GetStatus")
            assert status.federation_id == "fed-test" and status.min_workers == 2 and status.keep_rounds == 4
            health = call_by_reflection(channel, pool, HEALTH, "Check")
            assert health.status == 1  # SERVING
        # without a client certificate the TLS handshake itself is refused
        bare = grpc.ssl_channel_credentials(root_certificates=(tls_dir / "ca.pem").read_bytes())
        with grpc.secure_channel(f"localhost:{server.running.port}", bare) as channel:
            with pytest.raises(grpc.RpcError) as exc:
                list(ProtoReflectionDescriptorDatabase(channel).get_services())
            assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()


def test_fhe_node_lists_and_describes_over_plaintext_loopback() -> None:
    server = ServerThread(start_node)
    try:
        with grpc.insecure_channel(server.running.address) as channel:
            db = ProtoReflectionDescriptorDatabase(channel)
            assert set(db.get_services()) == {"fedfhe.v1.FheService", HEALTH, REFLECTION}
            pool = DescriptorPool(db)
            evaluate = pool.FindServiceByName("fedfhe.v1.FheService").methods_by_name["Evaluate"]
            assert evaluate.client_streaming and evaluate.server_streaming
            stage = pool.FindEnumTypeByName("fedfhe.v1.Stage")
            assert [v.name for v in stage.values] == ["STAGE_UNSPECIFIED", "STAGE_QKV", "STAGE_O",
                                                     "STAGE_GATE_UP", "STAGE_DOWN"]
            assert call_by_reflection(channel, pool, HEALTH, "Check").status == 1
    finally:
        server.stop()


async def _running(start):  # type: ignore[no-untyped-def]
    running, _ = await start
    return running
