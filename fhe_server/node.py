"""The FHE node's core, protocol-free: sessions, admission limits, request assembly, products and hints.

The node holds only public data: the quantized base model (common.stages) and,
per session, the worker's public seed. It multiplies ciphertexts B by public
int8 matrices, Y = W·B (mod q), and computes hints H = W·A for a seed's A
(common.lwe.scheme). The servicer (fhe_server.service) turns stream messages
into calls here and domain errors into status codes; nothing here knows gRPC.
"""

from __future__ import annotations

import uuid
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from common.chunks import Assembler, ChunkLike
from common.errors import InvalidArgument, NotFound, ResourceExhausted
from common.lwe import scheme, wire
from common.lwe.params import LweParams
from common.lwe.planner import Plan
from common.lwe.prg import SEED_BYTES, expand_a
from common.stages import Direction, PublicWeights, WeightKey


@dataclass(frozen=True)
class Limits:
    max_in_flight: int = 8  # per stream: several micro-batches, never an unbounded backlog
    max_ciphertext_bytes: int = 256 << 20
    max_sessions: int = 64
    max_sessions_per_client: int = 4  # one client cannot take every session slot
    max_hint_streams_per_client: int = 2  # hints are the node's most expensive answer
    hint_cache_entries: int = 64


def check_seed(seed: bytes) -> bytes:
    if len(seed) != SEED_BYTES:
        raise InvalidArgument(f"seed must be {SEED_BYTES} bytes, got {len(seed)}")
    return seed


@dataclass
class Session:
    """One worker session: its public seed and parameter set, and the requests it has in flight."""

    id: str
    seed: bytes
    params: LweParams
    pending: dict[int, tuple[WeightKey, Assembler]] = field(default_factory=dict)  # still receiving chunks
    running: set[int] = field(default_factory=set)  # complete, being multiplied

    @property
    def incomplete(self) -> list[int]:
        return sorted(self.pending)


@dataclass(frozen=True)
class HintInfo:
    """What a worker is told with a hint (it checks every field against its own plan)."""

    key: WeightKey
    plan: Plan
    row_scales: np.ndarray | None  # forward only: backward products are rescaled by the worker


class Node:
    def __init__(self, weights: PublicWeights, limits: Limits | None = None) -> None:
        self.weights = weights
        self.limits = limits or Limits()
        self.sessions: dict[str, Session] = {}
        self._slots: dict[str, Counter[str]] = {"sessions": Counter(), "hint streams": Counter()}
        self._hints: OrderedDict[tuple[bytes, str, WeightKey], np.ndarray] = OrderedDict()

    @property
    def model_id(self) -> str:
        return self.weights.model.model_id

    # ---- admission --------------------------------------------------------------------------------

    @contextmanager
    def slot(self, client: str, what: str) -> Iterator[None]:
        """Hold one of the client's `what` ("sessions" or "hint streams") for the life of a call."""
        limit = (self.limits.max_sessions_per_client if what == "sessions"
                 else self.limits.max_hint_streams_per_client)
        counter = self._slots[what]
        if counter[client] >= limit:
            raise ResourceExhausted(f"{client} already has {counter[client]} {what} open (limit {limit})")
        counter[client] += 1
        try:
            yield
        finally:
            counter[client] -= 1
            if counter[client] <= 0:
                del counter[client]

    def check_model(self, model_id: str) -> None:
        if model_id != self.model_id:
            raise NotFound(f"model {model_id!r} is not served here (this node serves {self.model_id!r})")

    # ---- sessions ---------------------------------------------------------------------------------

    def open_session(self, seed: bytes, params: LweParams, model_id: str) -> Session:
        self.check_model(model_id)
        if len(self.sessions) >= self.limits.max_sessions:
            raise ResourceExhausted(f"node is at its limit of {self.limits.max_sessions} sessions")
        session = Session(uuid.uuid4().hex, check_seed(seed), params)
        self.sessions[session.id] = session
        return session

    def close_session(self, session: Session) -> None:
        self.sessions.pop(session.id, None)

    def accept(self, session: Session, request_id: int, key: WeightKey, chunk: ChunkLike) -> bytes | None:
        """Feed one chunk of a request; returns the whole ciphertext once the request is complete."""
        self.weights.check_key(key)
        if request_id in session.running:
            raise InvalidArgument(f"request id {request_id} is already in flight")
        if request_id not in session.pending:
            if len(session.pending) + len(session.running) >= self.limits.max_in_flight:
                raise ResourceExhausted(f"more than {self.limits.max_in_flight} requests in flight")
            session.pending[request_id] = (key, Assembler(self.limits.max_ciphertext_bytes))
        pkey, asm = session.pending[request_id]
        if pkey != key:
            raise InvalidArgument(f"request {request_id} changed its weight key between chunks")
        if not asm.add(chunk):
            return None
        del session.pending[request_id]
        session.running.add(request_id)
        return asm.payload()

    def finish_stream(self, session: Session | None) -> None:
        """The client half-closed: a request still missing chunks is an error, not silently dropped."""
        if session is not None and session.pending:
            raise InvalidArgument(f"the stream ended with request(s) {session.incomplete[:4]} incomplete "
                                  "(missing chunks)")

    # ---- products and hints -----------------------------------------------------------------------

    def multiply(self, session: Session, request_id: int, key: WeightKey, data: bytes) -> bytes:
        """Y = W·B (mod q) for a complete request's ciphertext bytes; the result in wire form."""
        try:
            try:
                b = wire.decode(data, kind=wire.Kind.CIPHERTEXT, log_q=session.params.log_q)
            except wire.WireFormatError as exc:
                raise InvalidArgument(f"malformed ciphertext: {exc}") from None
            return wire.encode(wire.Kind.RESULT, self.product(session.params, key, b))
        finally:
            session.running.discard(request_id)

    def product(self, params: LweParams, key: WeightKey, b: np.ndarray) -> np.ndarray:
        """W·B (mod q) for ciphertexts B (d_in, T)."""
        w = self.weights.matrix(key)
        if b.shape[0] != w.shape[1]:
            raise InvalidArgument(f"ciphertext has {b.shape[0]} rows, layer {key.layer} {key.stage.name} "
                                  f"{key.direction.name.lower()} expects {w.shape[1]}")
        return scheme.multiply(params, self.weights.matrix_f64(key), b)

    def hint_keys(self, keys: Sequence[WeightKey]) -> list[WeightKey]:
        """The keys a hint request asks for (none: the whole model), each checked."""
        keys = list(keys) or self.weights.keys()
        for key in keys:
            self.weights.check_key(key)
        return keys

    def hint(self, params: LweParams, seed: bytes, key: WeightKey) -> np.ndarray:
        """H = W·A (d_out × n) for this seed; the most recent hints are cached."""
        k = (check_seed(seed), params.name, key)
        if k in self._hints:
            self._hints.move_to_end(k)
            return self._hints[k]
        w = self.weights.matrix(key)
        h = scheme.hint(params, self.weights.matrix_f64(key), expand_a(seed, w.shape[1], params))
        self._hints[k] = h
        while len(self._hints) > self.limits.hint_cache_entries:
            self._hints.popitem(last=False)
        return h

    def hint_info(self, params: LweParams, key: WeightKey) -> HintInfo:
        scales = self.weights.row_scales(key) if key.direction == Direction.FORWARD else None
        return HintInfo(key, self.weights.plan(params, key), scales)

