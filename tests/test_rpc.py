"""Server/channel factory: health, reflection, mTLS, limits, graceful stop, logging context, config."""

from __future__ import annotations

import argparse
import os
import stat
from pathlib import Path

import grpc
import pytest
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from common import errors
from common.certs import main as certs_main
from common.certs import make_federation_pki
from common.config import ChannelConfig, ConfigError, ServerConfig, add_arguments, from_namespace, parse
from common.logs import redact_secrets
from common.rpc import make_channel, start_server, status_for
from common.tls import peer_identity

ECHO = "test.Echo"
SEEN: list[dict] = []


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    SEEN.append(dict(structlog.contextvars.get_contextvars()))
    try:
        who = peer_identity(context)
        return f"{who.name}/{who.role}:".encode() + request
    except errors.Unauthenticated:
        return b"anonymous:" + request


def _register(server: grpc.aio.Server) -> None:
    handler = grpc.method_handlers_generic_handler(
        ECHO, {"Say": grpc.unary_unary_rpc_method_handler(_echo)})
    server.add_generic_rpc_handlers((handler,))


def server_cfg(**kw) -> ServerConfig:
    return ServerConfig(**({"insecure": True} | kw))


async def call(channel: grpc.aio.Channel, payload: bytes) -> bytes:
    return await channel.unary_unary(f"/{ECHO}/Say")(payload, timeout=10)


async def test_insecure_server_health_reflection_and_echo() -> None:
    running = await start_server(server_cfg(), _register, [ECHO])
    try:
        assert running.port > 0
        async with make_channel(running.address, ChannelConfig(insecure=True)) as ch:
            assert await call(ch, b"hi") == b"anonymous:hi"
            stub = health_pb2_grpc.HealthStub(ch)
            for name in ("", ECHO):
                resp = await stub.Check(health_pb2.HealthCheckRequest(service=name))
                assert resp.status == health_pb2.HealthCheckResponse.SERVING
            refl = reflection_pb2_grpc.ServerReflectionStub(ch)
            async for resp in refl.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")])):
                names = {s.name for s in resp.list_services_response.service}
            assert {ECHO, "grpc.health.v1.Health",
                    "grpc.reflection.v1alpha.ServerReflection"} <= names
    finally:
        await running.stop(0)


async def test_coroutine_streaming_handlers_survive_the_interceptor() -> None:
    """Health.Watch is a coroutine that writes with context.write, not an async generator."""
    running = await start_server(server_cfg(), _register, [ECHO])
    try:
        async with make_channel(running.address, ChannelConfig(insecure=True)) as ch:
            call = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=ECHO))
            first = await call.read()
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            call.cancel()
    finally:
        await running.stop(0)


async def test_start_server_refuses_insecure_on_a_public_address() -> None:
    with pytest.raises(ConfigError, match="--insecure is refused"):
        await start_server(ServerConfig(insecure=True, listen="0.0.0.0:0"), _register, [ECHO])


async def test_graceful_stop_reports_not_serving_and_refuses_new_calls() -> None:
    running = await start_server(server_cfg(), _register, [ECHO])
    ch = make_channel(running.address, ChannelConfig(insecure=True))
    await running.health.enter_graceful_shutdown()
    resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=ECHO))
    assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING
    await running.stop(0)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await call(ch, b"late")
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
    await ch.close()


async def test_oversized_message_is_resource_exhausted() -> None:
    running = await start_server(server_cfg(max_message_bytes=4096), _register, [ECHO])
    try:
        async with make_channel(running.address, ChannelConfig(insecure=True,
                                                               max_message_bytes=1 << 20)) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await call(ch, b"x" * 10_000)
            assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert await call(ch, b"small") == b"anonymous:small"  # still serving
    finally:
        await running.stop(0)


async def test_mtls_identity_and_refusals(tls_dir: Path, tmp_path: Path) -> None:
    running = await start_server(ServerConfig(tls_dir=tls_dir, listen="127.0.0.1:0"), _register, [ECHO])
    target = f"localhost:{running.port}"
    try:
        async with make_channel(target, ChannelConfig(tls_dir=tls_dir, identity="hospital-1")) as ch:
            assert await call(ch, b"x") == b"hospital-1/worker:x"
        async with make_channel(target, ChannelConfig(tls_dir=tls_dir, identity="operator")) as ch:
            assert await call(ch, b"y") == b"operator/operator:y"
        # No client certificate: the TLS handshake fails (gRPC reports UNAVAILABLE).
        bare = grpc.ssl_channel_credentials(root_certificates=(tls_dir / "ca.pem").read_bytes())
        async with grpc.aio.secure_channel(target, bare) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await call(ch, b"z")
            assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
        # A certificate from another federation's CA is refused too.
        other = tmp_path / "other"
        make_federation_pki(other, ["hospital-1"], ["localhost"])
        mixed = grpc.ssl_channel_credentials(
            root_certificates=(tls_dir / "ca.pem").read_bytes(),
            private_key=(other / "hospital-1.key").read_bytes(),
            certificate_chain=(other / "hospital-1.pem").read_bytes())
        async with grpc.aio.secure_channel(target, mixed) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await call(ch, b"z")
            assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await running.stop(0)


async def test_interceptor_binds_call_context() -> None:
    SEEN.clear()
    running = await start_server(server_cfg(), _register, [ECHO])
    try:
        async with make_channel(running.address, ChannelConfig(insecure=True)) as ch:
            await call(ch, b"a")
            await call(ch, b"b")
    finally:
        await running.stop(0)
    assert [c["method"] for c in SEEN] == [f"/{ECHO}/Say"] * 2
    assert all(c["peer"].startswith("ipv") for c in SEEN)
    assert SEEN[0]["call_id"] != SEEN[1]["call_id"]


def test_secrets_are_redacted_from_logs() -> None:
    event = redact_secrets(None, "info", {"event": "x", "update_key": b"k" * 32, "seed": b"s",
                                          "private_pem": "---", "token": "t", "tokens": 5,
                                          "round": 3})
    assert event == {"event": "x", "update_key": "[redacted]", "seed": "[redacted]",
                     "private_pem": "[redacted]", "token": "[redacted]", "tokens": 5, "round": 3}


def test_status_mapping() -> None:
    assert status_for(errors.InvalidArgument("x")) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_for(errors.FailedPrecondition("x")) == grpc.StatusCode.FAILED_PRECONDITION
    assert status_for(errors.NotFound("x")) == grpc.StatusCode.NOT_FOUND
    assert status_for(errors.ResourceExhausted("x")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_for(errors.PermissionDenied("x")) == grpc.StatusCode.PERMISSION_DENIED
    assert status_for(RuntimeError("x")) == grpc.StatusCode.INTERNAL


# ------------------------------------------------------------------ config


def test_config_precedence_flag_env_default() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser, ServerConfig)
    env = {"FEDFHE_LISTEN": "127.0.0.1:7000", "FEDFHE_INSECURE": "true", "FEDFHE_GRACE_SECONDS": "2"}
    cfg = from_namespace(ServerConfig, parser.parse_args([]), env)
    assert (cfg.listen, cfg.insecure, cfg.grace_seconds) == ("127.0.0.1:7000", True, 2.0)
    cfg = from_namespace(ServerConfig, parser.parse_args(["--listen", "[::1]:0"]), env)
    assert cfg.listen == "[::1]:0" and cfg.log_format == "console"


def test_a_flag_on_by_default_has_a_no_form(tmp_path: Path) -> None:
    """--scrub-pii is on by default; --no-scrub-pii (or FEDFHE_SCRUB_PII=false) turns it off."""
    from worker.config import JoinConfig

    parser = argparse.ArgumentParser()
    add_arguments(parser, JoinConfig)
    (tmp_path / "d.jsonl").write_text("")
    (tmp_path / "k").write_text("")
    base = ["--coordinator", "c:1", "--data", str(tmp_path / "d.jsonl"), "--consortium-key", str(tmp_path / "k"),
            "--no-dp", "--mode", "local"]
    assert from_namespace(JoinConfig, parser.parse_args(base), {}).scrub_pii is True
    assert from_namespace(JoinConfig, parser.parse_args([*base, "--no-scrub-pii"]), {}).scrub_pii is False
    assert from_namespace(JoinConfig, parser.parse_args([*base, "--scrub-pii"]), {}).scrub_pii is True
    assert from_namespace(JoinConfig, parser.parse_args(base), {"FEDFHE_SCRUB_PII": "false"}).scrub_pii is False


@pytest.mark.parametrize("listen", ["0.0.0.0:50051", "10.1.2.3:1", "example.org:443"])
def test_insecure_on_non_loopback_is_refused(listen: str) -> None:
    with pytest.raises(ConfigError, match="--insecure is refused on non-loopback"):
        ServerConfig(listen=listen, insecure=True).validate()


@pytest.mark.parametrize("listen", ["127.0.0.1:0", "localhost:5", "[::1]:0"])
def test_insecure_on_loopback_is_allowed(listen: str) -> None:
    ServerConfig(listen=listen, insecure=True).validate()


@pytest.mark.parametrize("argv, message", [
    (["--listen", "nowhere"], "not HOST:PORT"),
    (["--grace-seconds", "soon", "--insecure"], "cannot read 'soon'"),
    (["--log-format", "xml", "--insecure"], "invalid choice"),
    ([], "--tls-dir is required"),
])
def test_bad_config_is_a_clear_error(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit):
        parse(ServerConfig, argv, env={})
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------ certificates


def test_certs_cli_writes_private_keys_0600_and_refuses_to_replace_a_ca(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    assert certs_main([str(d), "--workers", "a,b"]) == 0
    keys = sorted(p.name for p in d.glob("*.key"))
    assert keys == ["a.key", "b.key", "ca.key", "operator.key", "server.key", "service-client.key"]
    for p in d.glob("*.key"):
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    for p in d.glob("*.pem"):
        assert not stat.S_IMODE(os.stat(p).st_mode) & 0o022
    assert certs_main([str(d)]) == 2
    for reserved in ("server", "ca", "../evil"):
        assert certs_main([str(tmp_path / "other"), "--workers", reserved]) == 2
