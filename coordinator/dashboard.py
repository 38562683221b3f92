"""fedfhe-dashboard: the operator's live, read-only view of a federation in a browser.

One page (coordinator/dashboard_static/) that updates itself over server-sent
events (GET /events). What feeds it: the coordinator's WatchRounds stream, as
the operator, and GetStatus every --poll-seconds and right after each round
event; with --fhe, the node's grpc.health.v1 Check. The page shows the
federation id, rounds (state, participants, declines and why, seconds, bytes
received, mask recovery), ε per hospital against its budget, train and
held-out loss per round, the patch buffers' lock state, secure aggregation
and PII scrubbing per hospital. It has no control: nothing on it starts a
round or finishes the federation.

Who may look:
- On a loopback --listen (the default) the page is plain HTTP without a
  password, for the operator's own machine. Requests whose Host header is not
  a loopback name are refused (403), so a web page elsewhere cannot reach it
  by DNS rebinding.
- Any other --listen needs both --tls-dir, whose `server.pem`/`server.key`
  (the federation PKI's service certificate; its SANs must name the address
  the browser uses) serve HTTPS, and --auth-token-file, a file of mode 0600
  holding a token of at least 16 characters. Every request must then carry it,
  either as `Authorization: Bearer TOKEN` (scripts) or as the password of HTTP
  basic auth with any user name (browsers: they prompt once, then send it with
  the event stream too). Without both it refuses to start (exit status 2).
  --auth-token-file also turns the check on for a loopback address.

The dashboard connects with the operator certificate (--tls-dir, --identity
operator) and refuses any other role: a worker certificate on WatchRounds
would make the coordinator count the dashboard as that hospital. When the
coordinator cannot be reached the page says "disconnected, retrying" over the
last known state, and the dashboard reconnects with a fresh channel (gRPC's
own reconnect backoff grows to minutes).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import math
import os
import signal
import socket
import ssl
import stat
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import structlog
from aiohttp import web
from cryptography import x509
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.config import ChannelConfig, ConfigError, LogConfig, is_loopback, opt, parse, split_host_port
from common.logs import configure_logging
from common.rpc import Backoff, make_channel
from common.tls import CA_CERT, SERVER, TlsError
from coordinator.operator import OperatorClient
from fedfhe.v1 import coordinator_pb2 as pb

log = structlog.get_logger("fedfhe.dashboard")

STATIC_DIR = Path(__file__).parent / "dashboard_static"
MIN_TOKEN_CHARS = 16
EVENTS_KEPT = 50  # round events listed on the page, newest first
SSE_KEEPALIVE_S = 15.0  # a comment line this often: proxies keep the stream, a gone browser is noticed
NODE_POLL_S = 5.0
WATCH_REOPEN_S = 5.0  # after a finished federation ends the watch stream, GetStatus alone keeps the page current


@dataclass(frozen=True)
class DashboardConfig(LogConfig, ChannelConfig):
    coordinator: str = opt("", help="the coordinator's HOST:PORT (required)")
    fhe: str = opt("", help="an FHE node's HOST:PORT whose health to show (empty: not shown)")
    listen: str = opt("127.0.0.1:8765", help="HOST:PORT of the page (port 0 picks a free port); a non-loopback "
                                             "address needs --tls-dir (HTTPS) and --auth-token-file")
    auth_token_file: Path | None = opt(None, help="file (mode 0600) with the token every request must carry: "
                                                  "bearer token, or the password of HTTP basic auth")
    poll_seconds: float = opt(1.0, help="GetStatus this often (and right after each round event)")
    # Overridden defaults: the operator's certificate, and a short deadline so an unreachable
    # coordinator shows on the page within seconds.
    identity: str = opt("operator", help="operator certificate name inside --tls-dir")
    deadline_seconds: float = opt(5.0, help="deadline of each GetStatus and health check")

    def validate(self) -> None:
        if not self.coordinator:
            raise ConfigError("--coordinator HOST:PORT is required")
        if self.poll_seconds <= 0:
            raise ConfigError("--poll-seconds must be > 0")
        if not self.insecure and self.tls_dir is None:
            raise ConfigError("--tls-dir is required (the operator certificate) unless --insecure")
        host, _ = split_host_port(self.listen)
        if not is_loopback(host):
            missing = [f for f, v in (("--tls-dir", self.tls_dir), ("--auth-token-file", self.auth_token_file))
                       if v is None]
            if missing:
                raise ConfigError(f"--listen {self.listen!r} is not a loopback address: it needs HTTPS with the "
                                  f"federation's server certificate (--tls-dir) and a token (--auth-token-file); "
                                  f"missing {' and '.join(missing)}")

    @property
    def public(self) -> bool:
        return not is_loopback(split_host_port(self.listen)[0])


# --------------------------------------------------------------------------------------------------
# The view model: GetStatus and round events → the JSON the page renders (no I/O here)
# --------------------------------------------------------------------------------------------------


def finite(x: float) -> float | None:
    """JSON has no NaN or infinity (the page's JSON.parse would reject the whole message)."""
    return float(x) if math.isfinite(x) else None


def mean(xs: Iterable[float]) -> float | None:
    vals = list(xs)
    return sum(vals) / len(vals) if vals else None


def evaluation_view(e: pb.Evaluation) -> dict[str, Any]:
    return {"worker_id": e.worker_id, "eval_loss": finite(e.eval_loss), "records": e.records}


def mean_eval_loss(evaluations: Sequence[pb.Evaluation]) -> float | None:
    """Held-out loss weighted by held-out notes, as the coordinator does for RoundStatus.eval_loss."""
    ok = [e for e in evaluations if math.isfinite(e.eval_loss)]
    weight = sum(e.records for e in ok)
    if weight:
        return sum(e.eval_loss * e.records for e in ok) / weight
    return mean(e.eval_loss for e in ok)


def worker_view(w: pb.WorkerStatus) -> dict[str, Any]:
    eps, budget = finite(w.epsilon), finite(w.epsilon_budget)
    dp = not w.no_dp
    return {
        "worker_id": w.worker_id, "connected": w.connected, "last_round": w.last_round,
        "num_records": w.num_records, "dp": dp, "epsilon": eps if dp else None,
        # 0 means "without DP, or an older worker that does not report it"
        "epsilon_budget": budget if dp and budget else None,
        "budget_used": eps / budget if dp and eps is not None and budget else None,
        "declined": w.declined, "pii_scrubbed": w.pii_scrubbed,
    }


def participant_view(p: pb.Participant) -> dict[str, Any]:
    return {"worker_id": p.worker_id, "num_samples": p.num_samples, "epsilon": finite(p.epsilon), "dp": not p.no_dp,
            # 0 is proto3's "not set" (an older worker); a cross-entropy is never exactly 0
            "train_loss": finite(p.train_loss) if p.train_loss > 0 else None}


def mask_recovery_view(m: pb.MaskRecovery) -> dict[str, Any]:
    return {"threshold": m.threshold, "phase": m.phase, "members": list(m.members), "survivors": list(m.survivors),
            "dropped": list(m.dropped), "revealed_by": list(m.revealed_by)}


def round_view(r: pb.RoundStatus) -> dict[str, Any]:
    participants = [participant_view(p) for p in sorted(r.participants, key=lambda p: p.worker_id)]
    return {
        "round": r.round, "state": r.state, "reason": r.reason, "seconds": finite(r.seconds),
        "bytes_received": r.bytes_received, "buffer_bytes": r.buffer_bytes, "eligible": sorted(r.eligible),
        "participants": participants,
        "train_loss": mean(p["train_loss"] for p in participants if p["train_loss"] is not None),
        "eval_loss": finite(r.eval_loss) if r.eval_loss > 0 else None,  # 0: none reported yet
        "evaluations": [evaluation_view(e) for e in r.evaluations],
        "declines": [{"worker_id": d.worker_id, "reason": d.reason} for d in r.declines],
        "mask_recovery": mask_recovery_view(r.mask_recovery) if r.HasField("mask_recovery") else None,
    }


def status_view(s: pb.GetStatusResponse) -> dict[str, Any]:
    """Everything the page shows from one GetStatus; a field an older coordinator lacks reads as absent."""
    sa = s.secure_aggregation
    return {
        "federation_id": s.federation_id, "current_round": s.current_round, "finished": s.finished,
        "min_workers": s.min_workers or None, "keep_rounds": s.keep_rounds or None,
        "buffers_locked": s.buffers_locked, "buffer_bytes_total": s.buffer_bytes_total,
        "secure_aggregation": ({"enabled": sa.enabled, "threshold": sa.threshold or None, "scheme": sa.scheme}
                               if s.HasField("secure_aggregation") else None),
        "baseline_eval_loss": mean_eval_loss(s.baseline_evaluations),
        "baseline_evaluations": [evaluation_view(e) for e in s.baseline_evaluations],
        "workers": [worker_view(w) for w in sorted(s.workers, key=lambda w: w.worker_id)],
        "rounds": [round_view(r) for r in sorted(s.rounds, key=lambda r: r.round)],
    }


def event_text(ev: pb.WatchRoundsResponse) -> str:
    """One line of the page's activity list for a round event (plain text: the page never parses it as HTML)."""
    kind = ev.WhichOneof("event")
    if kind == "started":
        sa = "secure aggregation" if ev.started.secure_aggregation.enabled else "pads only"
        return f"round {ev.started.round} started from round {ev.started.base_round}'s adapter ({sa})"
    if kind == "closed":
        c = ev.closed
        outcome = "aggregated" if c.outcome == pb.ROUND_OUTCOME_AGGREGATED else "failed"
        return (f"round {c.round} {outcome}: {len(c.participants)} participants, {c.total_samples} samples"
                + (f" ({c.reason})" if c.reason else ""))
    if kind == "finished":
        return f"federation finished after round {ev.finished.last_round}"
    if kind == "mask_keys":
        keys = ev.mask_keys
        return f"round {keys.round}: mask keys of {len(keys.members)} members, t={keys.threshold}"
    if kind == "mask_shares":
        return f"round {ev.mask_shares.round}: mask shares delivered, {len(ev.mask_shares.members)} members"
    if kind == "unmask":
        return f"round {ev.unmask.round}: uploads closed, {len(ev.unmask.survivors)} survivors asked to confirm"
    if kind == "survivors_confirmed":
        return (f"round {ev.survivors_confirmed.round}: survivor set confirmed by "
                f"{len(ev.survivors_confirmed.signatures)} signatures")
    return f"event {kind or 'unknown'}"


def now_ms() -> int:
    return int(time.time() * 1000)


# --------------------------------------------------------------------------------------------------
# Who may look: token and HTTPS material, loaded once at start
# --------------------------------------------------------------------------------------------------


def load_token_digest(path: Path) -> bytes:
    """SHA-256 of the token in `path`, which must be 0600 (only the digest is kept in memory)."""
    try:
        st = path.stat()
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"--auth-token-file {path}: {exc.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"--auth-token-file {path} has mode {stat.S_IMODE(st.st_mode):04o}: others could read "
                          f"the token; chmod 600 it")
    token = raw.strip()
    if len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(f"--auth-token-file {path}: the token needs at least {MIN_TOKEN_CHARS} characters "
                          f"(e.g. openssl rand -hex 32)")
    return hashlib.sha256(token).digest()


def presented_token(header: str | None) -> bytes | None:
    """The token of `Authorization: Bearer T` or of basic auth's password; None when absent or malformed."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() == "bearer":
        return value.strip().encode()
    if scheme.lower() == "basic":
        try:
            user_pass = base64.b64decode(value.strip(), validate=True)
        except ValueError:
            return None
        return user_pass.partition(b":")[2]
    return None


def authorized(header: str | None, token_digest: bytes) -> bool:
    given = presented_token(header)
    # Digests of equal length, compared in constant time: how long the check takes says nothing of the token.
    return given is not None and hmac.compare_digest(hashlib.sha256(given).digest(), token_digest)


def https_context(tls_dir: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(tls_dir / f"{SERVER}.pem", tls_dir / f"{SERVER}.key")
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot serve HTTPS with {tls_dir / SERVER}.pem/.key: {exc}") from None
    return ctx


def check_operator_identity(tls_dir: Path, identity: str) -> None:
    """Refuse a certificate whose role (OU) is not operator: on WatchRounds it would be counted as a hospital."""
    path = tls_dir / f"{identity}.pem"
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise TlsError(f"cannot read the certificate {path}: {exc}") from None
    for name in (f"{identity}.key", CA_CERT):
        if not (tls_dir / name).is_file():
            raise TlsError(f"missing {tls_dir / name}")
    roles = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
    if roles != ["operator"]:
        raise TlsError(f"{path} has role {', '.join(roles) or 'none'}: the dashboard needs an operator "
                       f"certificate (fedfhe-certs makes operator.pem)")


def grpc_reason(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details() or ''}".strip()
    return f"{type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------------------------------
# The feed: coordinator and node → one current view → every open page
# --------------------------------------------------------------------------------------------------


class Hub:
    """The current view and the event streams of the open pages.

    Every message is the whole view, so a subscriber's queue holds only the newest: a slow
    browser gets fewer updates, never a growing backlog in the dashboard.
    """

    def __init__(self, coordinator: str, node: str) -> None:
        self.coordinator: dict[str, Any] = {"address": coordinator, "connected": False, "error": None,
                                            "retry_seconds": None, "since_unix_ms": now_ms()}
        self.status: dict[str, Any] | None = None
        self.node: dict[str, Any] | None = ({"address": node, "state": "unknown", "detail": "not checked yet"}
                                            if node else None)
        self.events: deque[dict[str, Any]] = deque(maxlen=EVENTS_KEPT)
        self._subscribers: set[asyncio.Queue[bytes | None]] = set()

    def snapshot(self) -> dict[str, Any]:
        return {"coordinator": self.coordinator, "status": self.status, "node": self.node,
                "events": list(self.events), "updated_unix_ms": now_ms()}

    def message(self) -> bytes:
        return b"data: " + json.dumps(self.snapshot(), allow_nan=False).encode() + b"\n\n"

    def publish(self) -> None:
        if not self._subscribers:
            return
        msg = self.message()
        for q in self._subscribers:
            if q.full():
                q.get_nowait()  # superseded by this newer view
            q.put_nowait(msg)

    def subscribe(self) -> asyncio.Queue[bytes | None]:
        q: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=1)
        self._subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[bytes | None]) -> None:
        self._subscribers.discard(q)

    def close(self) -> None:
        """End every event stream (shutdown): None tells a stream handler to return."""
        for q in self._subscribers:
            if q.full():
                q.get_nowait()
            q.put_nowait(None)

    # ---- what the feeds report ----

    def connected(self, status: pb.GetStatusResponse) -> None:
        if not self.coordinator["connected"]:
            self.coordinator.update(connected=True, error=None, retry_seconds=None, since_unix_ms=now_ms())
        self.status = status_view(status)
        self.publish()

    def disconnected(self, reason: str, retry_seconds: float) -> None:
        if self.coordinator["connected"]:
            self.coordinator["since_unix_ms"] = now_ms()
        self.coordinator.update(connected=False, error=reason, retry_seconds=round(retry_seconds, 1))
        self.publish()  # the last known status stays, shown as stale

    def event(self, ev: pb.WatchRoundsResponse) -> None:
        self.events.appendleft({"at_unix_ms": now_ms(), "kind": ev.WhichOneof("event") or "", "text": event_text(ev)})

    def node_health(self, state: str, detail: str) -> None:
        if self.node is not None:
            self.node.update(state=state, detail=detail, checked_unix_ms=now_ms())
            self.publish()


class CoordinatorFeed:
    """GetStatus and WatchRounds as the operator; on any failure a fresh channel after a backoff."""

    def __init__(self, cfg: DashboardConfig, hub: Hub) -> None:
        self.cfg, self.hub = cfg, hub
        self.wake = asyncio.Event()
        self.backoff = Backoff(math.inf, first=0.5, cap=5.0)

    async def run(self) -> None:
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # whatever breaks the session, the page says why and the dashboard retries
                reason = grpc_reason(exc)
                if not isinstance(exc, grpc.aio.AioRpcError):
                    log.warning("coordinator session failed", error=reason, exc_info=True)
                self.hub.disconnected(reason, self.backoff.delay)
                await self.backoff.wait()

    async def _session(self) -> None:
        # A new channel per session: a reused one would wait out gRPC's reconnect backoff (up to 2 minutes)
        # after the coordinator comes back.
        async with OperatorClient(self.cfg.coordinator, self.cfg) as op:
            self.hub.connected(await op.status())
            self.backoff.reset()
            log.info("coordinator connected", coordinator=self.cfg.coordinator)
            await first_failure(self._watch(op), self._poll(op))

    async def _poll(self, op: OperatorClient) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.cfg.poll_seconds)
            self.wake.clear()
            self.hub.connected(await op.status())

    async def _watch(self, op: OperatorClient) -> None:
        while True:
            async for ev in op.watch():
                self.hub.event(ev)
                self.wake.set()  # GetStatus now: the event alone does not carry the round's whole state
            await asyncio.sleep(WATCH_REOPEN_S)


class NodeFeed:
    """grpc.health.v1 Check on the FHE node with the dashboard's identity (the node's health service takes any
    certificate of the federation CA; its FheService takes only workers')."""

    def __init__(self, cfg: DashboardConfig, hub: Hub) -> None:
        self.cfg, self.hub = cfg, hub

    async def run(self) -> None:
        while True:
            try:
                channel = make_channel(self.cfg.fhe, self.cfg)
            except Exception as exc:
                self.hub.node_health("unknown", grpc_reason(exc))
                await asyncio.sleep(NODE_POLL_S)
                continue
            try:
                stub = health_pb2_grpc.HealthStub(channel)
                while True:
                    resp = await stub.Check(health_pb2.HealthCheckRequest(service=""),
                                            timeout=self.cfg.deadline_seconds)
                    state = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
                    self.hub.node_health(state, "")
                    await asyncio.sleep(NODE_POLL_S)
            except grpc.aio.AioRpcError as exc:
                self.hub.node_health("unknown", grpc_reason(exc))
            finally:
                await channel.close()  # a fresh channel next time, for the reason CoordinatorFeed says
            await asyncio.sleep(NODE_POLL_S)


async def first_failure(*coros: Awaitable[None]) -> None:
    """Run coroutines that loop forever until the first one fails; cancel the rest and raise its error."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            t.result()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# --------------------------------------------------------------------------------------------------
# HTTP: the page, its files, the event stream
# --------------------------------------------------------------------------------------------------

# The page loads only its own files: no inline script, no other origin (also what keeps a hostile
# decline reason inert if it ever reached the DOM as markup).
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def host_is_loopback(host_header: str) -> bool:
    host = host_header.strip()
    if host.startswith("["):  # [v6]:port
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return is_loopback(host)


def make_app(cfg: DashboardConfig, hub: Hub, token_digest: bytes | None) -> web.Application:
    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not cfg.public and not host_is_loopback(request.host):
            raise web.HTTPForbidden(text="this dashboard answers loopback host names only\n")
        if token_digest is not None and not authorized(request.headers.get("Authorization"), token_digest):
            raise web.HTTPUnauthorized(text="token required\n",
                                       headers={"WWW-Authenticate": 'Basic realm="fedfhe dashboard", charset="UTF-8"'})
        return await handler(request)

    async def index(_: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC_DIR / "index.html")

    async def status(_: web.Request) -> web.StreamResponse:
        return web.Response(body=json.dumps(hub.snapshot(), allow_nan=False).encode(),
                            content_type="application/json")

    async def events(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        queue = hub.subscribe()
        try:
            await resp.write(b"retry: 1000\n\n" + hub.message())  # reconnect fast if the dashboard restarts
            while True:
                try:
                    msg = await asyncio.wait_for(queue.get(), SSE_KEEPALIVE_S)
                except TimeoutError:
                    msg = b": keepalive\n\n"
                if msg is None:
                    break
                await resp.write(msg)
        except ConnectionResetError:
            pass  # the browser went away
        finally:
            hub.unsubscribe(queue)
        return resp

    async def headers(_: web.Request, response: web.StreamResponse) -> None:
        response.headers.update(SECURITY_HEADERS)

    app = web.Application(middlewares=[guard])
    app.router.add_get("/", index)
    app.router.add_get("/api/status", status)
    app.router.add_get("/events", events)
    app.router.add_static("/static/", STATIC_DIR)
    app.on_response_prepare.append(headers)
    return app


class Dashboard:
    """The dashboard in this process: `async with Dashboard(cfg) as d:` serves at `d.url` until the block ends."""

    def __init__(self, cfg: DashboardConfig) -> None:
        self.cfg = cfg
        self.hub = Hub(cfg.coordinator, cfg.fhe)
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Check the configuration (ConfigError/TlsError: refuse to start), bind, start the feeds."""
        cfg = self.cfg
        cfg.validate()
        if not cfg.insecure:
            assert cfg.tls_dir is not None  # validate guarantees it
            check_operator_identity(cfg.tls_dir, cfg.identity)
        token = load_token_digest(cfg.auth_token_file) if cfg.auth_token_file is not None else None
        tls = None
        if cfg.public:
            assert cfg.tls_dir is not None and token is not None  # validate guarantees both
            tls = https_context(cfg.tls_dir)
        host, port = split_host_port(cfg.listen)
        try:
            sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {cfg.listen}: {exc.strerror}") from None
        self._runner = web.AppRunner(make_app(cfg, self.hub, token), access_log=None, shutdown_timeout=2.0)
        self._runner.app.on_shutdown.append(lambda _: self._close_streams())
        await self._runner.setup()
        await web.SockSite(self._runner, sock, ssl_context=tls).start()
        bound = sock.getsockname()[1]
        address = f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}"
        self.url = f"{'https' if tls else 'http'}://{address}/"
        self._tasks.append(asyncio.create_task(CoordinatorFeed(cfg, self.hub).run()))
        if cfg.fhe:
            self._tasks.append(asyncio.create_task(NodeFeed(cfg, self.hub).run()))
        log.info("serving", address=address, url=self.url, coordinator=cfg.coordinator, https=tls is not None,
                 auth="token" if token is not None else "none (loopback)", pid=os.getpid())

    async def _close_streams(self) -> None:
        self.hub.close()

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> Dashboard:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def serve(cfg: DashboardConfig) -> int:
    dash = Dashboard(cfg)
    try:
        await dash.start()
    except (ConfigError, TlsError) as exc:
        print(f"fedfhe-dashboard: {exc}", file=sys.stderr)
        await dash.stop()
        return 2
    print(f"dashboard: {dash.url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("shutting down")
    finally:
        await dash.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse(DashboardConfig, argv, prog="fedfhe-dashboard", description=__doc__.splitlines()[0])
    configure_logging(cfg.log_format, cfg.log_level, cfg.log_file)
    return asyncio.run(serve(cfg))


if __name__ == "__main__":
    sys.exit(main())
