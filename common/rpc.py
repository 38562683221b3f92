"""One place for gRPC server and channel construction: options, TLS, health, reflection, shutdown, errors, retries.

Servicers stay thin: they call protocol-free logic, which raises
common.errors types; `CallInterceptor` (on every server) maps those to status
codes, so no servicer writes a catch-and-abort block. Clients retry transient
failures with one policy: `RETRYABLE` codes, `Backoff` delays.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Self, TypeVar

import grpc
import psutil
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common import errors
from common.config import ChannelConfig, ServerConfig, parse, split_host_port
from common.logs import configure_logging
from common.tls import channel_credentials, server_credentials

log = structlog.get_logger("fedfhe.rpc")
ServerConfigT = TypeVar("ServerConfigT", bound=ServerConfig)


def grpc_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """Options shared by servers and channels."""
    return [
        # Ciphertexts are chunked below this; anything larger is refused, not buffered.
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # Rounds can idle for minutes between events: ping so NATs and proxies keep the stream.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # Accept the clients' keepalive pings at that rate instead of answering GOAWAY.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
    ]


_STATUS = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}


def status_for(exc: BaseException) -> grpc.StatusCode:
    """Status code for a domain error: bad input → INVALID_ARGUMENT, wrong state → FAILED_PRECONDITION…"""
    for cls in type(exc).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return grpc.StatusCode.INTERNAL


def _peer(context: Any) -> str:
    try:
        return str(context.peer())
    except Exception:
        return "unknown"


class _Undecodable:
    """Stands in for a request message whose bytes are not valid protobuf."""

    def __init__(self, error: str) -> None:
        self.error = error


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def load(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # decoded where gRPC would answer UNKNOWN; the handler answers precisely
            return _Undecodable(str(exc)[:200])
    return load


async def _checked(requests: Any) -> Any:
    """A request stream that raises InvalidArgument (which servicers map) at an undecodable message."""
    async for req in requests:
        if isinstance(req, _Undecodable):
            raise errors.InvalidArgument(f"undecodable request message: {req.error}")
        yield req


class CallInterceptor(grpc.aio.ServerInterceptor):
    """Every call of every service: log context, tolerant decoding, domain errors as status codes.

    - Binds method, peer and a call id to structlog's context for the life of the call.
    - Decodes requests tolerantly: a message that is not valid protobuf gets INVALID_ARGUMENT
      instead of gRPC's UNKNOWN.
    - A common.errors.FedfheError raised by a servicer (or the logic under it) aborts the call
      with `status_for(exc)` and its message; anything else stays an error (INTERNAL).
    """

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method

        @contextlib.asynccontextmanager
        async def scope(context: Any) -> AsyncIterator[None]:
            """The life of one call: its log context, its domain errors as status codes, its last log line."""
            structlog.contextvars.bind_contextvars(method=method, peer=_peer(context),
                                                   call_id=uuid.uuid4().hex[:12])
            start = time.perf_counter()
            error_: BaseException | None = None
            try:
                yield
            except errors.FedfheError as exc:
                error_ = exc
                await context.abort(status_for(exc), str(exc))
            except BaseException as exc:
                error_ = exc
                raise
            finally:
                code = context.code() if hasattr(context, "code") else None
                log.info("call finished", code=str(code or ("ERROR" if error_ else "OK")),
                         ms=round((time.perf_counter() - start) * 1e3, 2))
                structlog.contextvars.clear_contextvars()

        streaming_request = bool(handler.stream_unary or handler.stream_stream)

        async def undecodable(request: Any, context: Any) -> Any:
            """The request as the handler should see it, or None after aborting with INVALID_ARGUMENT."""
            if streaming_request:
                return _checked(request)
            if isinstance(request, _Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"undecodable request: {request.error}")
            return request

        if handler.unary_unary or handler.stream_unary:
            inner = handler.unary_unary or handler.stream_unary
            make = (grpc.unary_unary_rpc_method_handler if handler.unary_unary
                    else grpc.stream_unary_rpc_method_handler)
        else:
            inner = handler.unary_stream or handler.stream_stream
            make = (grpc.unary_stream_rpc_method_handler if handler.unary_stream
                    else grpc.stream_stream_rpc_method_handler)

        # grpc.aio runs a streaming handler according to its kind: an async generator is
        # iterated, a coroutine writes with context.write. The wrapper keeps the kind.
        if inspect.isasyncgenfunction(inner):

            async def wrapped(request: Any, context: Any) -> Any:
                async with scope(context):
                    async for item in inner(await undecodable(request, context), context):
                        yield item
        else:

            async def wrapped(request: Any, context: Any) -> Any:  # type: ignore[misc]
                async with scope(context):
                    return await inner(await undecodable(request, context), context)

        return make(wrapped, request_deserializer=_tolerant(handler.request_deserializer),
                    response_serializer=handler.response_serializer)


@dataclass
class RunningServer:
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def stop(self, grace: float | None = 5.0) -> None:
        """Report NOT_SERVING, refuse new calls, let running ones finish within grace."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def start_server(
    cfg: ServerConfig, register: Callable[[grpc.aio.Server], None], service_names: Sequence[str],
    *, interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> RunningServer:
    """Build, bind and start a server with health checking, reflection and the call interceptor."""
    cfg.validate()  # a config built in code gets the same refusals as one from flags
    server = grpc.aio.server(interceptors=[CallInterceptor(), *interceptors],
                             options=grpc_options(cfg.max_message_bytes))
    register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", *service_names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME], server)
    host, _ = split_host_port(cfg.listen)
    if cfg.insecure:
        port = server.add_insecure_port(cfg.listen)
    else:
        assert cfg.tls_dir is not None  # ServerConfig.validate guarantees it
        port = server.add_secure_port(cfg.listen, server_credentials(cfg.tls_dir))
    await server.start()
    running = RunningServer(server, health_servicer, host, port)
    log.info("serving", address=running.address, tls=not cfg.insecure, services=list(service_names),
             pid=os.getpid())
    return running


async def serve_until_signal(running: RunningServer, grace: float) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("shutting down", grace_seconds=grace)
    finally:
        await running.stop(grace)


def resources() -> dict[str, int]:
    """What a long-running service watches for leaks: resident memory, open descriptors, tasks, threads."""
    proc = psutil.Process()
    return {"rss_bytes": proc.memory_info().rss, "fds": proc.num_fds(), "tasks": len(asyncio.all_tasks()),
            "threads": threading.active_count()}


async def log_resources(every: float) -> None:
    while True:
        log.info("resources", **resources())
        await asyncio.sleep(every)


async def serve_forever(cfg: ServerConfig, register: Callable[[grpc.aio.Server], None],
                        service_names: Sequence[str]) -> None:
    """Start a server and serve until SIGTERM/SIGINT, logging its resources every cfg.stats_seconds."""
    running = await start_server(cfg, register, service_names)
    stats = asyncio.create_task(log_resources(cfg.stats_seconds)) if cfg.stats_seconds > 0 else None
    try:
        await serve_until_signal(running, cfg.grace_seconds)
    finally:
        if stats is not None:
            stats.cancel()


def service_main(cls: type[ServerConfigT], argv: Sequence[str] | None, *, prog: str, description: str | None,
                 serve: Callable[[ServerConfigT], Coroutine[Any, Any, None]]) -> None:
    """Console-script body of every server: parse config, configure logging, run `serve(cfg)`."""
    cfg = parse(cls, argv, prog=prog, description=description)
    configure_logging(cfg.log_format, cfg.log_level, cfg.log_file)
    asyncio.run(serve(cfg))


class _DefaultDeadline(grpc.aio.UnaryUnaryClientInterceptor):
    """Gives unary calls a deadline when the caller set none (streams live as long as a session)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        if details.timeout is None:
            details = details._replace(timeout=self.seconds)
        return await continuation(details, request)


class RpcClient:
    """A client's channel (see make_channel), closed by `close` or by leaving `async with`."""

    def __init__(self, target: str, cfg: ChannelConfig) -> None:
        self.target, self.channel_cfg = target, cfg
        self.channel = make_channel(target, cfg)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()



def make_channel(target: str, cfg: ChannelConfig) -> grpc.aio.Channel:
    """A channel with the same limits, keepalive and (unless insecure) mTLS identity."""
    # Client-side load balancing: with a target such as dns:///fhe-nodes:50051 that resolves to several
    # nodes, round_robin gives each new stream (an FHE session) the next node.
    options = [*grpc_options(cfg.max_message_bytes), ("grpc.lb_policy_name", cfg.load_balancing)]
    interceptors = [_DefaultDeadline(cfg.deadline_seconds)]
    if cfg.insecure:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    if cfg.tls_dir is None or not cfg.identity:
        raise errors.FailedPrecondition("a TLS channel needs --tls-dir and --identity (or --insecure)")
    creds = channel_credentials(cfg.tls_dir, cfg.identity)
    return grpc.aio.secure_channel(target, creds, options=options, interceptors=interceptors)


# --------------------------------------------------------------------------------------------------
# Retries: one policy for every client
# --------------------------------------------------------------------------------------------------

# A call broken by a restart, a lost connection or a server shutting down; anything else is not transient.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED,
                       grpc.StatusCode.DEADLINE_EXCEEDED})


def retryable(exc: BaseException) -> bool:
    """Whether a failed call is worth repeating after a reconnect."""
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() in RETRYABLE


class Backoff:
    """Exponential delays between attempts, within a budget of `seconds` from the last success."""

    def __init__(self, seconds: float, first: float = 0.2, cap: float = 5.0) -> None:
        self.seconds, self.first, self.cap = seconds, first, cap
        self.reset()

    def reset(self) -> None:
        """A success (or any sign of life): the budget and the delay start over."""
        self.since = time.monotonic()
        self.delay = self.first

    @property
    def exhausted(self) -> bool:
        return time.monotonic() - self.since > self.seconds

    async def wait(self) -> None:
        await asyncio.sleep(self.delay)
        self.delay = min(2 * self.delay, self.cap)
