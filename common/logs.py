"""structlog setup (console or JSON, optional file) with secret redaction and a per-call gRPC interceptor."""

from __future__ import annotations

import inspect
import logging
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO

import grpc
import structlog

from common.errors import InvalidArgument

# Values under keys that look like these are never rendered: keys, seeds of secrets, PEMs.
_SECRET_WORDS = ("key", "secret", "seed", "password", "pem", "private")
_SECRET_NAMES = {"token", "auth_token", "access_token", "credentials"}
_SAFE_KEYS = {"key_id", "weight_key", "key_check_value_hex"}


def redact_secrets(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    for k in list(event_dict):
        low = k.lower()
        if low in _SECRET_NAMES or (low not in _SAFE_KEYS and any(w in low for w in _SECRET_WORDS)):
            event_dict[k] = "[redacted]"
    return event_dict


class _Tee:
    """Writes rendered lines to the console and, if set, a log file."""

    def __init__(self, console: TextIO, file: TextIO | None) -> None:
        self.console, self.file = console, file

    def msg(self, message: str) -> None:
        print(message, file=self.console, flush=True)
        if self.file is not None:
            print(message, file=self.file, flush=True)

    log = debug = info = warning = warn = error = critical = exception = fatal = msg


def configure_logging(fmt: str = "console", level: str = "info", file: Path | None = None,
                      stream: TextIO | None = None) -> None:
    """Configure structlog once per process."""
    handle = open(file, "a", encoding="utf-8") if file is not None else None
    renderer: Any = (structlog.processors.JSONRenderer() if fmt == "json" or handle is not None
                     else structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=lambda *_: _Tee(stream or sys.stderr, handle),
        cache_logger_on_first_use=False,
    )


log = structlog.get_logger("fedfhe")


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
            raise InvalidArgument(f"undecodable request message: {req.error}")
        yield req


class LoggingInterceptor(grpc.aio.ServerInterceptor):
    """Binds method, peer and a call id to structlog's context for the life of each call.

    It also decodes requests tolerantly: a message that is not valid protobuf gets
    INVALID_ARGUMENT instead of gRPC's UNKNOWN, on every method of every service.
    """

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method

        def bind(context: Any) -> float:
            structlog.contextvars.bind_contextvars(method=method, peer=_peer(context),
                                                   call_id=uuid.uuid4().hex[:12])
            return time.perf_counter()

        def done(start: float, context: Any, error: BaseException | None) -> None:
            code = context.code() if hasattr(context, "code") else None
            log.info("call finished", code=str(code or ("ERROR" if error else "OK")),
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
                start = bind(context)
                error = None
                try:
                    async for item in inner(await undecodable(request, context), context):
                        yield item
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    done(start, context, error)
        else:

            async def wrapped(request: Any, context: Any) -> Any:  # type: ignore[misc]
                start = bind(context)
                error = None
                try:
                    return await inner(await undecodable(request, context), context)
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    done(start, context, error)

        return make(wrapped, request_deserializer=_tolerant(handler.request_deserializer),
                    response_serializer=handler.response_serializer)
