"""structlog setup (console or JSON, optional file) with secret redaction. The per-call context is bound by
common.rpc.CallInterceptor."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, TextIO

import structlog

# Values under keys that look like these are never rendered: keys, seeds of secrets, PEMs.
_SECRET_WORDS = ("key", "secret", "seed", "password", "pem", "private")
_SECRET_NAMES = {"token", "auth_token", "access_token", "credentials"}
_SAFE_KEYS = {"key_id", "weight_key", "key_check_value_hex"}


def redact_secrets(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
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

