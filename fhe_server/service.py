"""FheService servicer: sessions on a bidirectional stream, chunked passes, hints. Thin over NodeWeights."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import structlog

from common.chunks import Assembler, split
from common.errors import (
    FailedPrecondition,
    FedfheError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from common.lwe import wire
from common.lwe.params import LweParams
from common.lwe.prg import SEED_BYTES
from common.messages import key_from_proto, key_to_proto, params_from_proto
from common.rpc import abort_with
from common.stages import Direction, NodeWeights, Stage, WeightKey
from common.tls import peer_identity
from fedfhe.v1 import common_pb2, fhe_pb2, fhe_pb2_grpc

log = structlog.get_logger("fedfhe.fhe_server")



@dataclass(frozen=True)
class Limits:
    max_in_flight: int = 8  # per stream: several micro-batches, never an unbounded backlog
    chunk_bytes: int = 1 << 20  # < the 16 MiB message limit
    max_ciphertext_bytes: int = 256 << 20
    max_sessions: int = 64
    max_sessions_per_client: int = 4  # one client cannot take every session slot
    max_hint_streams_per_client: int = 2  # hints are the node's most expensive answer


def check_seed(seed: bytes) -> bytes:
    if len(seed) != SEED_BYTES:
        raise InvalidArgument(f"seed must be {SEED_BYTES} bytes, got {len(seed)}")
    return seed


@dataclass
class _Session:
    id: str
    seed: bytes
    params: LweParams
    pending: dict[int, tuple[WeightKey, Assembler]] = field(default_factory=dict)
    running: set[int] = field(default_factory=set)


class FheServicer(fhe_pb2_grpc.FheServiceServicer):
    def __init__(self, weights: NodeWeights, limits: Limits | None = None, *, insecure: bool = True) -> None:
        self.weights = weights
        self.limits = limits or Limits()
        self.insecure = insecure
        self.sessions: dict[str, _Session] = {}
        self._client_sessions: Counter[str] = Counter()
        self._client_hints: Counter[str] = Counter()

    def _client(self, context: grpc.aio.ServicerContext) -> str:
        """Who is calling: a worker certificate's name (other roles are refused), or under --insecure
        (loopback only, no identities) the connection, so that the per-client limits apply in both modes."""
        if self.insecure:
            return str(context.peer())
        who = peer_identity(context)  # Unauthenticated without a verified client certificate
        if who.role != "worker":
            raise PermissionDenied(f"certificate {who.name!r} has role {who.role!r}; only workers use the node")
        return who.name

    @staticmethod
    def _acquire(counter: Counter[str], client: str, limit: int, what: str) -> None:
        if counter[client] >= limit:
            raise ResourceExhausted(f"{client} already has {counter[client]} {what} open (limit {limit})")
        counter[client] += 1

    @staticmethod
    def _release(counter: Counter[str], client: str) -> None:
        counter[client] -= 1
        if counter[client] <= 0:
            del counter[client]

    async def _admit(self, context: grpc.aio.ServicerContext, counter: Counter[str], limit: int,
                     what: str) -> str | None:
        """The caller's name with one of its `what` slots taken, or None after aborting the call."""
        try:
            client = self._client(context)
            self._acquire(counter, client, limit, what)
            return client
        except FedfheError as exc:
            await abort_with(context, exc)
            return None

    def _check_model(self, model_id: str) -> None:
        if model_id != self.weights.model.model_id:
            raise NotFound(f"model {model_id!r} is not served here (this node serves "
                           f"{self.weights.model.model_id!r})")

    def _model_info(self) -> fhe_pb2.ModelInfo:
        s = self.weights.model.shape
        return fhe_pb2.ModelInfo(
            model_id=self.weights.model.model_id, weights_digest=self.weights.digest,
            num_layers=s.num_layers, hidden_size=s.hidden, intermediate_size=s.intermediate,
            num_heads=s.num_heads, num_kv_heads=s.num_kv_heads)

    def _open(self, msg: fhe_pb2.OpenSession) -> _Session:
        params = params_from_proto(msg.param_set)
        self._check_model(msg.model_id)
        if len(self.sessions) >= self.limits.max_sessions:
            raise ResourceExhausted(f"node is at its limit of {self.limits.max_sessions} sessions")
        session = _Session(uuid.uuid4().hex, check_seed(msg.seed), params)
        self.sessions[session.id] = session
        return session

    def _accept_chunk(self, session: _Session, p: fhe_pb2.PassRequest) -> tuple[WeightKey, bytes] | None:
        """Feed one PassRequest chunk; returns (key, ciphertext bytes) once the request is complete."""
        key = key_from_proto(p.key)
        self.weights.check_key(key)
        rid = p.request_id
        if rid in session.running:
            raise InvalidArgument(f"request id {rid} is already in flight")
        if rid not in session.pending:
            if len(session.pending) + len(session.running) >= self.limits.max_in_flight:
                raise ResourceExhausted(f"more than {self.limits.max_in_flight} requests in flight")
            session.pending[rid] = (key, Assembler(self.limits.max_ciphertext_bytes))
        pkey, asm = session.pending[rid]
        if pkey != key:
            raise InvalidArgument(f"request {rid} changed its weight key between chunks")
        if not asm.add(p.ciphertext.index, p.ciphertext.count, p.ciphertext.data):
            return None
        del session.pending[rid]
        return key, asm.payload()

    def _compute(self, session: _Session, key: WeightKey, data: bytes) -> bytes:
        try:
            b = wire.decode(data, kind=wire.Kind.CIPHERTEXT, log_q=session.params.log_q)
        except wire.WireFormatError as exc:
            raise InvalidArgument(f"malformed ciphertext: {exc}") from None
        y = self.weights.evaluate(session.params, key, b)
        return wire.encode(wire.Kind.RESULT, y)

    async def Evaluate(self, request_iterator: AsyncIterator[fhe_pb2.EvaluateRequest],
                       context: grpc.aio.ServicerContext) -> AsyncIterator[fhe_pb2.EvaluateResponse]:
        client = await self._admit(context, self._client_sessions, self.limits.max_sessions_per_client, "sessions")
        if client is None:
            return
        out: asyncio.Queue[fhe_pb2.EvaluateResponse | BaseException | None] = asyncio.Queue()
        session: _Session | None = None
        tasks: set[asyncio.Task[None]] = set()

        async def run(rid: int, key: WeightKey, data: bytes) -> None:
            assert session is not None
            try:
                result = await asyncio.to_thread(self._compute, session, key, data)
                for i, n, piece in split(result, self.limits.chunk_bytes):
                    await out.put(fhe_pb2.EvaluateResponse(result=fhe_pb2.PassResult(
                        request_id=rid, result=common_pb2.Chunk(index=i, count=n, data=piece))))
            except BaseException as exc:  # surfaced to the caller by the response loop
                await out.put(exc)
            finally:
                session.running.discard(rid)

        async def read() -> None:
            nonlocal session
            try:
                async for req in request_iterator:
                    kind = req.WhichOneof("kind")
                    if kind == "open":
                        if session is not None:
                            raise FailedPrecondition("session already open on this stream")
                        session = self._open(req.open)
                        structlog.contextvars.bind_contextvars(session=session.id[:12])
                        log.info("session opened", params=session.params.name)
                        await out.put(fhe_pb2.EvaluateResponse(opened=fhe_pb2.SessionOpened(
                            session_id=session.id, model=self._model_info())))
                    elif kind == "pass_request":
                        if session is None:
                            raise FailedPrecondition("the first message of a stream must be OpenSession")
                        done = self._accept_chunk(session, req.pass_request)
                        if done is not None:
                            session.running.add(req.pass_request.request_id)
                            task = asyncio.create_task(run(req.pass_request.request_id, *done))
                            tasks.add(task)
                            task.add_done_callback(tasks.discard)
                    else:
                        raise InvalidArgument("empty EvaluateRequest: set open or pass")
                if tasks:
                    await asyncio.gather(*tasks)
                if session is not None and session.pending:  # the client half-closed mid-request
                    rids = sorted(session.pending)[:4]
                    raise InvalidArgument(f"the stream ended with request(s) {rids} incomplete (missing chunks)")
                await out.put(None)
            except BaseException as exc:
                await out.put(exc)

        reader = asyncio.create_task(read())
        try:
            while True:
                item = await out.get()
                if item is None:
                    return
                if isinstance(item, FedfheError):
                    await abort_with(context, item)
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            reader.cancel()
            for t in tasks:
                t.cancel()
            if session is not None:
                self.sessions.pop(session.id, None)
            self._release(self._client_sessions, client)

    async def GetHint(self, request: fhe_pb2.GetHintRequest,
                      context: grpc.aio.ServicerContext) -> AsyncIterator[fhe_pb2.GetHintResponse]:
        client = await self._admit(context, self._client_hints, self.limits.max_hint_streams_per_client,
                                   "hint streams")
        if client is None:
            return
        try:
            async for msg in self._hints(request, context):
                yield msg
        finally:
            self._release(self._client_hints, client)

    async def _hints(self, request: fhe_pb2.GetHintRequest,
                     context: grpc.aio.ServicerContext) -> AsyncIterator[fhe_pb2.GetHintResponse]:
        try:
            params = params_from_proto(request.param_set)
            self._check_model(request.model_id)
            seed = check_seed(request.seed)
            keys = [key_from_proto(k) for k in request.keys] or [
                WeightKey(layer, stage, direction)
                for layer in range(len(self.weights.stages)) for stage in Stage for direction in Direction]
            for key in keys:
                self.weights.check_key(key)
        except FedfheError as exc:
            await abort_with(context, exc)
            return
        for key in keys:
            h = await asyncio.to_thread(self.weights.hint, params, seed, key)
            plan = self.weights.plan(params, key)
            scales = self.weights.row_scales(key) if key.direction == Direction.FORWARD else b""
            yield fhe_pb2.GetHintResponse(header=fhe_pb2.HintHeader(
                key=key_to_proto(key),
                rows=plan.d_out, cols=plan.d_in, act_bits=plan.act_bits, delta_bits=plan.delta_bits,
                row_scales=scales.astype("<f4").tobytes() if len(scales) else b""))
            for i, n, piece in split(wire.encode(wire.Kind.HINT, h), self.limits.chunk_bytes):
                yield fhe_pb2.GetHintResponse(chunk=common_pb2.Chunk(index=i, count=n, data=piece))
