"""Dataclass configuration loaded from command-line flags and FEDFHE_* environment variables in one place.

Precedence: flag > environment > default. A service declares a frozen
dataclass (extending ServerConfig or ChannelConfig); `parse(cls, argv)`
builds the argparse parser from the fields and validates the result.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
MiB = 1 << 20


class ConfigError(ValueError):
    """A flag or environment value is invalid; the message names it."""


def opt(default: Any = dataclasses.MISSING, *, help: str, choices: Sequence[str] | None = None,
        default_factory: Any = dataclasses.MISSING) -> Any:
    """A config field with its help text (flag `--name-with-dashes`, env `FEDFHE_NAME`)."""
    meta = {"help": help, "choices": choices}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    return "FEDFHE_" + name.upper()


def _base_type(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def _convert(name: str, tp: Any, raw: str) -> Any:
    base = _base_type(tp)
    try:
        if base is bool:
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if base is Path:
            return Path(raw)
        return base(raw)
    except ValueError:
        where = f"{_flag(name)} / {env_name(name)}"
        raise ConfigError(f"{where}: cannot read {raw!r} as {base.__name__}") from None


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per field of the dataclass cls; defaults are resolved later (env in between)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        help_text = f.metadata.get("help", "")
        help_text += f" [env {env_name(f.name)}]"
        if _base_type(hints[f.name]) is bool:
            parser.add_argument(_flag(f.name), dest=f.name, action="store_const", const="true",
                                default=None, help=help_text)
            if f.default is True:  # on by default: --no-NAME turns it off
                parser.add_argument("--no-" + _flag(f.name)[2:], dest=f.name, action="store_const", const="false",
                                    default=None, help=f"turn {_flag(f.name)} off")
        else:
            parser.add_argument(_flag(f.name), dest=f.name, default=None, help=help_text,
                                choices=f.metadata.get("choices"))


def from_namespace(cls: type[T], ns: argparse.Namespace, env: Mapping[str, str] | None = None) -> T:
    """Build cls from parsed flags, then the environment, then the field defaults."""
    env = os.environ if env is None else env
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]  # cls is a config dataclass
        raw = getattr(ns, f.name, None)
        if raw is None:
            raw = env.get(env_name(f.name))
        if raw is None:
            continue
        choices = f.metadata.get("choices")
        if choices and raw not in choices:
            raise ConfigError(f"{_flag(f.name)}: {raw!r} is not one of {', '.join(choices)}")
        values[f.name] = _convert(f.name, hints[f.name], raw)
    cfg = cls(**values)
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg


def parse(cls: type[T], argv: Sequence[str] | None = None, *, prog: str | None = None,
          description: str | None = None, env: Mapping[str, str] | None = None) -> T:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(parser, cls)
    ns = parser.parse_args(argv)
    try:
        return from_namespace(cls, ns, env)
    except ConfigError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


def split_host_port(address: str) -> tuple[str, int]:
    """'HOST:PORT' or '[v6]:PORT' -> (host, port); a clear ConfigError otherwise."""
    host, sep, port_s = address.rpartition(":")
    if not sep or not host or not port_s.isdigit() or int(port_s) > 65535:
        raise ConfigError(f"address {address!r} is not HOST:PORT (port 0-65535)")
    return host.strip("[]"), int(port_s)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class LogConfig:
    log_format: str = opt("console", help="log rendering", choices=["console", "json"])
    log_level: str = opt("info", help="minimum level", choices=["debug", "info", "warning", "error"])
    log_file: Path | None = opt(None, help="also write JSON logs to this file")


@dataclass(frozen=True)
class TlsConfig:
    insecure: bool = opt(False, help="plaintext, no client certificates (loopback addresses only)")
    tls_dir: Path | None = opt(None, help="directory made by fedfhe-certs (CA, certificates, keys)")
    max_message_bytes: int = opt(16 * MiB, help="largest gRPC message; bigger payloads are chunked")


@dataclass(frozen=True)
class ServerConfig(LogConfig, TlsConfig):
    listen: str = opt("127.0.0.1:0", help="HOST:PORT to serve on (port 0 picks a free port)")
    grace_seconds: float = opt(5.0, help="graceful-shutdown grace period after SIGTERM/SIGINT")
    stats_seconds: float = opt(60.0, help="log memory, file descriptors and tasks this often (0: never)")

    def validate(self) -> None:
        host, _ = split_host_port(self.listen)
        if self.insecure and not is_loopback(host):
            raise ConfigError(
                f"--insecure is refused on non-loopback address {self.listen!r}: "
                "use mTLS (--tls-dir) for anything reachable from another host"
            )
        if not self.insecure and self.tls_dir is None:
            raise ConfigError("--tls-dir is required (make one with fedfhe-certs) unless --insecure")


@dataclass(frozen=True)
class ChannelConfig(TlsConfig):
    identity: str = opt("", help="client certificate name inside --tls-dir (e.g. hospital-1)")
    deadline_seconds: float = opt(30.0, help="default deadline of unary calls")
    load_balancing: str = opt("pick_first", help="gRPC client-side load balancing over the addresses a target "
                                                 "resolves to (round_robin spreads sessions over FHE nodes)",
                              choices=["pick_first", "round_robin"])
