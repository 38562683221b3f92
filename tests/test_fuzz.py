"""Hostile input against every RPC of FheService and CoordinatorService, through real in-process servers.

Hypothesis generates the requests (derandomized, no example database: the same examples every run). Each
generated case is invalid in one known way, so the test asserts the *precise* status code it must get; every
refusal must be a domain code (INVALID_ARGUMENT, FAILED_PRECONDITION, NOT_FOUND, RESOURCE_EXHAUSTED,
PERMISSION_DENIED, UNAUTHENTICATED), never UNKNOWN or INTERNAL. After every case the service must still answer
a well-formed request correctly, state from before the fuzzing must be intact (an FHE session opened before
still returns exact products, a coordinator round in progress still aggregates exactly), and failed calls must
leave nothing behind (Node.sessions, Federation workers/rounds/watchers/slots).

Hypothesis runs in a worker thread and hands each example to the event loop that serves the servers, so one
test can keep a session or a round alive across all of its examples and check it afterwards.

The regression tests at the end pin the bugs this file found, all fixed: shapes whose element count wrapped
int64, a refused duplicate restore freeing the live one's slot, a restored round number past what a round
counter can hold, undecodable protobuf answered UNKNOWN, and empty chunks piling up on the node.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import struct
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
from fedkit import RpcWorker, start_coordinator
from google.protobuf import text_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.config import ChannelConfig, ServerConfig
from common.lwe import params as P
from common.lwe import scheme, wire
from common.lwe.prg import DeterministicRandomness, expand_a
from common.messages import config_to_proto, contributions, layout_from_proto, layout_to_proto
from common.models import PROJECTIONS, load_model
from common.rpc import make_channel, start_server
from common.stages import Direction, PublicWeights, Stage, WeightKey
from common.training import TrainingConfig
from common.updates import (
    RESTORE,
    TAG_NAME,
    TAG_WORDS,
    ConsortiumKey,
    TensorLayout,
    decrypt_aggregate,
    encrypt_update,
)
from coordinator.state import Federation, Settings
from fedfhe.v1 import common_pb2, coordinator_pb2_grpc, fhe_pb2, fhe_pb2_grpc
from fedfhe.v1 import coordinator_pb2 as pb
from fhe_server.__main__ import SERVICE as FHE_SERVICE
from fhe_server.node import Limits
from fhe_server.node import Node as FheNode
from fhe_server.service import FheServicer

pytestmark = pytest.mark.timeout(300)

Code = grpc.StatusCode
INVALID, PRECONDITION, NOT_FOUND = Code.INVALID_ARGUMENT, Code.FAILED_PRECONDITION, Code.NOT_FOUND
EXHAUSTED, DENIED = Code.RESOURCE_EXHAUSTED, Code.PERMISSION_DENIED
DOMAIN_CODES = {INVALID, PRECONDITION, NOT_FOUND, EXHAUSTED, DENIED, Code.UNAUTHENTICATED}

U32, U64, I32 = (1 << 32) - 1, (1 << 64) - 1, 1 << 31
uint32 = st.integers(0, U32)
uint64 = st.integers(0, U64)
int32 = st.integers(-I32, I32 - 1)


def fuzz_settings(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much, HealthCheck.large_base_example])


Check = Callable[[Any], Coroutine[Any, Any, None]]


async def fuzz(strategy: st.SearchStrategy, check: Check, examples: int) -> None:
    """Run `check` on `examples` generated cases, one at a time, on this event loop (servers keep their state)."""
    loop = asyncio.get_running_loop()

    @fuzz_settings(examples)
    @given(case=strategy)
    def run(case: Any) -> None:
        asyncio.run_coroutine_threadsafe(check(case), loop).result(timeout=120)

    await asyncio.to_thread(run)


async def fuzz_families(families: Sequence[tuple[st.SearchStrategy, int]],
                        check: Check) -> None:
    """One hypothesis run per family of cases, each with its own budget (one_of would favour some)."""
    for strategy, examples in families:
        await fuzz(strategy, check, examples)


@dataclass(frozen=True)
class Case:
    """One hostile call: the RPC, its request (a tuple of messages for client streams), the code it must get.

    expected None means "any domain code, or success" (random message soups that may happen to be valid).
    """

    what: str
    rpc: str
    request: Any
    expected: grpc.StatusCode | None

    def __repr__(self) -> str:
        msgs = self.request if isinstance(self.request, tuple) else (self.request,)
        shown = [text_format.MessageToString(m, as_one_line=True)[:160] for m in msgs[:8]]
        more = f" +{len(msgs) - 8} more" if len(msgs) > 8 else ""
        code = self.expected.name if self.expected else "any"
        return f"Case({self.what!r} -> {code}: {self.rpc}{shown}{more})"


CLIENT_STREAMS = {"Evaluate", "SubmitUpdate", "RestorePatch"}


def invoke(stub: Any, case: Case) -> Any:
    method = getattr(stub, case.rpc)
    return method(iter(case.request)) if case.rpc in CLIENT_STREAMS else method(case.request)


async def outcome(call: Any) -> tuple[grpc.StatusCode, str]:
    """Run a call to its end: (OK, '') or the status it failed with, which must be a domain code."""
    try:
        if hasattr(call, "__aiter__"):
            async for _ in call:
                pass
        else:
            await call
    except grpc.aio.AioRpcError as exc:
        # grpc.aio replaces the server's status by its own INTERNAL when a client write fails because the server
        # already ended the stream (grpc/grpc#36066). Cases end at the message that makes them invalid, so that
        # never happens here; if it does, the server refused earlier than the case says.
        assert "SendMessageOperation" not in (exc.debug_error_string() or ""), \
            f"the server ended the stream before the client sent all messages (client-side {exc.code().name})"
        assert exc.code() in DOMAIN_CODES, f"{exc.code().name}: {exc.details()}"
        return exc.code(), exc.details() or ""
    return Code.OK, ""


async def soup_outcome(stub: Any, case: Case) -> tuple[grpc.StatusCode, str]:
    """A random message sequence has no known point of refusal: send ever longer prefixes until one is refused,
    so the refusing message is always the last one sent."""
    if not case.request:
        return await outcome(invoke(stub, case))
    for k in range(1, len(case.request) + 1):
        code, details = await outcome(invoke(stub, Case(case.what, case.rpc, case.request[:k], None)))
        if code != Code.OK:
            break
    return code, details


async def expect(call: Any, expected: grpc.StatusCode, what: str = "") -> None:
    code, details = await outcome(call)
    assert code == expected, f"{what}: expected {expected.name}, got {code.name}: {details}"


async def expect_case(stub: Any, case: Case) -> None:
    if case.expected is None:
        await soup_outcome(stub, case)
    else:
        await expect(invoke(stub, case), case.expected, case.what)


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Stream handlers clean up as the call unwinds, possibly just after the client saw the status."""
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, what
        await asyncio.sleep(0.005)


def pieces(data: bytes, n: int) -> list[bytes]:
    """data in n non-empty in-order pieces (an empty chunk among several is itself a fault); n <= len(data)."""
    n = max(1, min(n, len(data)))
    bounds = [len(data) * i // n for i in range(n + 1)]
    return [data[bounds[i]:bounds[i + 1]] for i in range(n)]


@st.composite
def disorder(draw: st.DrawFn, data: bytes, after_complete: bool = True) -> tuple[str, list[tuple[int, int, bytes]]]:
    """A chunk sequence (index, count, piece) that breaks the strict in-order protocol in its last chunk.

    The pieces before the fault never complete the payload ("after_complete" aside) and never exceed its size.
    (On the node a completed payload is evaluated at once, so there "after_complete" has no single point of
    refusal and is left out.)
    """
    assert len(data) >= 6, "disorder needs a payload of at least 6 bytes"
    n = draw(st.integers(2, 6))
    parts = pieces(data, n)
    fault = draw(st.sampled_from(["first_not_zero", "gap", "duplicate", "count_changed", "count_zero",
                                  *(["after_complete"] if after_complete else [])]))
    k = 0 if fault == "first_not_zero" else n if fault == "after_complete" else draw(st.integers(1, n - 1))
    chunks = [(i, n, parts[i]) for i in range(k)]
    junk = draw(st.binary(max_size=16))
    if fault == "first_not_zero":
        chunks.append((draw(st.integers(1, U32)), n, junk))
    elif fault == "gap":
        chunks.append((draw(st.integers(k + 1, U32)), n, junk))
    elif fault == "duplicate":
        chunks.append((draw(st.integers(0, k - 1)), n, junk))
    elif fault == "count_changed":  # a count no larger than the payload could be (larger is RESOURCE_EXHAUSTED)
        chunks.append((k, draw(st.integers(1, n + 64).filter(lambda m: m != n)), junk))
    elif fault == "count_zero":
        chunks.append((draw(uint32), 0, junk))
    else:
        chunks.append((draw(uint32), n, junk))
    return fault, chunks


# ==================================================================================================
# FheService
# ==================================================================================================

SEED = bytes(range(32))
EXACT = common_pb2.PARAM_SET_EXACT
FHE_MAX_MESSAGE = 128 << 10  # the node's gRPC message limit in these tests
FHE_LIMITS = Limits(max_in_flight=4, max_ciphertext_bytes=64 << 10, max_sessions=4)
FHE_CHUNK_BYTES = 4096
# What one client may hold at once (per-client limits where the node has them).
SESSIONS_PER_CLIENT = min(FHE_LIMITS.max_sessions, getattr(FHE_LIMITS, "max_sessions_per_client", 1 << 30))
HINTS_PER_CLIENT = getattr(FHE_LIMITS, "max_hint_streams_per_client", 1)
WEIGHTS = PublicWeights(load_model("tiny"))
LAYERS = len(WEIGHTS.stages)
KEYS = [WeightKey(layer, stage, direction) for layer in range(LAYERS) for stage in Stage for direction in Direction]
D_IN = {(k.layer, int(k.stage), int(k.direction)): WEIGHTS.matrix(k).shape[1] for k in KEYS}
QKV0 = (0, int(Stage.QKV), int(Direction.FORWARD))
WIRE_HEADER = struct.Struct("<4sBBBBII")


def pb_key(layer: int, stage: int, direction: int) -> fhe_pb2.WeightKey:
    return fhe_pb2.WeightKey(layer=layer, stage=stage, direction=direction)


def open_msg(seed: bytes = SEED, param_set: int = EXACT, model_id: str = "tiny") -> fhe_pb2.EvaluateRequest:
    return fhe_pb2.EvaluateRequest(open=fhe_pb2.OpenSession(seed=seed, param_set=param_set, model_id=model_id))


def pass_msg(rid: int, key: fhe_pb2.WeightKey | tuple[int, int, int] | None, index: int, count: int,
             data: bytes) -> fhe_pb2.EvaluateRequest:
    k = pb_key(*key) if isinstance(key, tuple) else key
    return fhe_pb2.EvaluateRequest(pass_request=fhe_pb2.PassRequest(
        request_id=rid, key=k, ciphertext=common_pb2.Chunk(index=index, count=count, data=data)))


def pass_msgs(rid: int, key: tuple[int, int, int], data: bytes, n: int = 1) -> list[fhe_pb2.EvaluateRequest]:
    parts = pieces(data, n)
    return [pass_msg(rid, key, i, len(parts), p) for i, p in enumerate(parts)]


def evaluate(what: str, requests: Sequence[fhe_pb2.EvaluateRequest], expected: grpc.StatusCode | None) -> Case:
    return Case(what, "Evaluate", tuple(requests), expected)


valid_keys = st.sampled_from(sorted(D_IN))
request_ids = st.one_of(st.integers(0, 8), uint64)
bad_seeds = st.binary(max_size=80).filter(lambda b: len(b) != 32)
bad_param_sets = int32.filter(lambda v: v not in (common_pb2.PARAM_SET_EXACT, common_pb2.PARAM_SET_COMPACT))
bad_models = st.text(max_size=40).filter(lambda s: s != "tiny")
bad_stages = int32.filter(lambda v: v not in Stage._value2member_map_)
bad_directions = int32.filter(lambda v: v not in Direction._value2member_map_)
bad_layers = st.integers(LAYERS, U32)


@st.composite
def any_key(draw: st.DrawFn) -> fhe_pb2.WeightKey:
    return pb_key(draw(st.one_of(st.integers(0, LAYERS + 1), uint32)), draw(st.one_of(st.integers(-1, 6), int32)),
                  draw(st.one_of(st.integers(-1, 3), int32)))


@st.composite
def pass_before_open(draw: st.DrawFn) -> Case:
    first = pass_msg(draw(request_ids), draw(any_key()), draw(uint32), draw(uint32), draw(st.binary(max_size=64)))
    return evaluate("pass before open", [first], PRECONDITION)


@st.composite
def open_twice(draw: st.DrawFn) -> Case:
    between = []
    if draw(st.booleans()):  # an incomplete request pending when the second open arrives
        count = draw(st.integers(2, FHE_LIMITS.max_ciphertext_bytes))  # a possible count: still incomplete
        between = [pass_msg(draw(request_ids), draw(valid_keys), 0, count, b"x")]
    second = open_msg(draw(st.one_of(st.just(SEED), bad_seeds)), draw(st.one_of(st.just(EXACT), bad_param_sets)),
                      draw(st.one_of(st.just("tiny"), bad_models)))
    return evaluate("duplicate OpenSession", [open_msg(), *between, second], PRECONDITION)


@st.composite
def empty_message(draw: st.DrawFn) -> Case:
    before = [open_msg()] if draw(st.booleans()) else []
    return evaluate("empty EvaluateRequest", [*before, fhe_pb2.EvaluateRequest()], INVALID)


@st.composite
def bad_open(draw: st.DrawFn) -> Case:
    fault = draw(st.sampled_from(["seed", "param_set", "model_id"]))
    if fault == "seed":
        msg, code = open_msg(seed=draw(bad_seeds)), INVALID
    elif fault == "param_set":
        msg, code = open_msg(param_set=draw(bad_param_sets)), INVALID
    else:
        msg, code = open_msg(model_id=draw(bad_models)), NOT_FOUND
    return evaluate(f"OpenSession with a bad {fault}", [msg], code)


@st.composite
def bad_key(draw: st.DrawFn) -> Case:
    layer, stage, direction = draw(valid_keys)
    fault = draw(st.sampled_from(["stage", "direction", "layer", "unset"]))
    if fault == "unset":
        key, code = None, INVALID
    elif fault == "stage":
        key, code = pb_key(layer, draw(bad_stages), direction), INVALID
    elif fault == "direction":
        key, code = pb_key(layer, stage, draw(bad_directions)), INVALID
    else:
        key, code = pb_key(draw(bad_layers), stage, direction), NOT_FOUND
    msg = pass_msg(draw(request_ids), key, 0, draw(st.integers(1, U32)), draw(st.binary(max_size=64)))
    return evaluate(f"PassRequest with a bad {fault}", [open_msg(), msg], code)


@st.composite
def chunk_disorder(draw: st.DrawFn) -> Case:
    rid, key = draw(request_ids), draw(valid_keys)
    fault, chunks = draw(disorder(draw(st.binary(min_size=6, max_size=600)), after_complete=False))
    msgs = [pass_msg(rid, key, i, n, d) for i, n, d in chunks]
    if draw(st.booleans()):  # the fault arrives while another, incomplete request is pending
        other = draw(request_ids.filter(lambda r: r != rid))
        msgs.insert(draw(st.integers(0, len(msgs) - 1)), pass_msg(other, draw(valid_keys), 0, 2, b"y"))
    return evaluate(f"ciphertext chunks: {fault}", [open_msg(), *msgs], INVALID)


@st.composite
def key_changed(draw: st.DrawFn) -> Case:
    rid, key = draw(request_ids), draw(valid_keys)
    other = draw(valid_keys.filter(lambda k: k != key))
    n = draw(st.integers(2, 5))
    k = draw(st.integers(1, n - 1))
    msgs = [pass_msg(rid, key, i, n, b"z" * 10) for i in range(k)] + [pass_msg(rid, other, k, n, b"z")]
    return evaluate("weight key changed between chunks", [open_msg(), *msgs], INVALID)


@st.composite
def bad_ciphertext(draw: st.DrawFn) -> Case:
    """A complete payload that is not a ciphertext this key accepts: random bytes or one wrong header field."""
    key = draw(valid_keys)
    d_in, cols = D_IN[key], draw(st.integers(1, 3))
    f = {"magic": b"FFLW", "version": 1, "kind": int(wire.Kind.CIPHERTEXT), "log_q": 64, "reserved": 0,
         "rows": d_in, "cols": cols}
    fault = draw(st.sampled_from(["random", "magic", "version", "kind", "log_q", "reserved", "rows", "cols",
                                  "length"]))
    if fault == "random":
        data = draw(st.binary(max_size=3000))
    else:
        replace = {
            "magic": st.binary(min_size=4, max_size=4).filter(lambda m: m != b"FFLW"),
            "version": st.integers(0, 255).filter(lambda v: v != 1),
            "kind": st.integers(0, 255).filter(lambda v: v != int(wire.Kind.CIPHERTEXT)),
            "log_q": st.one_of(st.just(32), st.integers(0, 255).filter(lambda v: v != 64)),
            "reserved": st.integers(1, 255),
            "rows": st.one_of(st.integers(0, 300), uint32).filter(lambda r: r != d_in),  # wrong or huge
            "cols": st.one_of(st.just(0), st.integers(wire.MAX_DIM + 1, U32)),  # empty or huge
        }
        if fault in replace:
            f[fault] = draw(replace[fault])
        word = 4 if f["log_q"] == 32 else 8
        size = f["rows"] * f["cols"] * word
        if fault == "length":
            size += draw(st.integers(-size, 200).filter(lambda d: d != 0))
        elif size > 32 << 10:
            size = d_in * cols * 8  # a huge claimed shape over a small body
        header = WIRE_HEADER.pack(f["magic"], f["version"], f["kind"], f["log_q"], f["reserved"], f["rows"],
                                  f["cols"])
        data = header + bytes(range(256)) * (size // 256) + bytes(size % 256)
    msgs = pass_msgs(draw(request_ids), key, data, draw(st.integers(1, 4)))
    return evaluate(f"malformed ciphertext: {fault}", [open_msg(), *msgs], INVALID)


@st.composite
def too_large(draw: st.DrawFn) -> Case:
    limit = FHE_LIMITS.max_ciphertext_bytes
    sizes = draw(st.lists(st.integers(1, limit // 4), max_size=3))  # within the limit (no empty chunk)...
    sizes.append(limit - sum(sizes) + draw(st.integers(1, 20_000)))  # ...until the last chunk
    n = len(sizes) + draw(st.integers(0, 3))
    rid, key = draw(request_ids), draw(valid_keys)
    msgs = [pass_msg(rid, key, i, n, bytes(s)) for i, s in enumerate(sizes)]
    return evaluate(f"ciphertext of {sum(sizes)} bytes over {limit}", [open_msg(), *msgs], EXHAUSTED)


@st.composite
def too_many_in_flight(draw: st.DrawFn) -> Case:
    rids = draw(st.lists(request_ids, min_size=FHE_LIMITS.max_in_flight + 1,
                         max_size=FHE_LIMITS.max_in_flight + 1, unique=True))
    msgs = [pass_msg(r, draw(valid_keys), 0, draw(st.integers(2, FHE_LIMITS.max_ciphertext_bytes)), b"w")
            for r in rids]
    return evaluate(f"{len(rids)} requests in flight", [open_msg(), *msgs], EXHAUSTED)


@st.composite
def oversized_message(draw: st.DrawFn) -> Case:
    size = draw(st.integers(FHE_MAX_MESSAGE + 1, 2 * FHE_MAX_MESSAGE))
    where = draw(st.sampled_from(["ciphertext", "model_id", "seed"]))
    if where == "ciphertext":
        msgs = [open_msg(), pass_msg(draw(request_ids), draw(valid_keys), 0, 1, bytes(size))]
    elif where == "model_id":
        msgs = [open_msg(model_id="m" * size)]
    else:
        msgs = [open_msg(seed=bytes(size))]
    return evaluate(f"{size}-byte message ({where}) over the {FHE_MAX_MESSAGE}-byte limit", msgs, EXHAUSTED)


@st.composite
def message_soup(draw: st.DrawFn) -> Case:
    """Random sequences of any messages with random fields: some may even be valid; none may crash the node."""
    opens = st.builds(open_msg, st.one_of(st.just(SEED), st.binary(max_size=40)), st.integers(-1, 4),
                      st.sampled_from(["tiny", "", "smollm2-135m", "TINY"]))
    passes = st.builds(pass_msg, st.integers(0, 3), any_key(), st.one_of(st.integers(0, 4), uint32),
                       st.one_of(st.integers(0, 4), uint32), st.binary(max_size=64))
    msgs = draw(st.lists(st.one_of(opens, passes, st.just(fhe_pb2.EvaluateRequest())), min_size=1, max_size=8))
    return evaluate("message soup", msgs, None)


EVALUATE_CASES = [(pass_before_open(), 10), (open_twice(), 10), (empty_message(), 4), (bad_open(), 15),
                  (bad_key(), 20), (chunk_disorder(), 40), (key_changed(), 8), (bad_ciphertext(), 60),
                  (too_large(), 10), (too_many_in_flight(), 6), (oversized_message(), 8), (message_soup(), 40)]


@st.composite
def bad_hint(draw: st.DrawFn) -> Case:
    req = fhe_pb2.GetHintRequest(seed=SEED, param_set=EXACT, model_id="tiny",
                                 keys=[pb_key(*k) for k in draw(st.lists(valid_keys, max_size=3))])
    fault = draw(st.sampled_from(["seed", "param_set", "model_id", "stage", "direction", "layer", "oversized"]))
    code = INVALID
    if fault == "seed":
        req.seed = draw(bad_seeds)
    elif fault == "param_set":
        req.param_set = draw(bad_param_sets)
    elif fault == "model_id":
        req.model_id, code = draw(bad_models), NOT_FOUND
    elif fault == "oversized":  # many (valid) keys: one request message over the limit
        req.keys.extend([pb_key(*QKV0)] * (FHE_MAX_MESSAGE // 6 + draw(st.integers(1, 5000))))
        code = EXHAUSTED
    else:
        layer, stage, direction = draw(valid_keys)
        if fault == "stage":
            bad = pb_key(layer, draw(bad_stages), direction)
        elif fault == "direction":
            bad = pb_key(layer, stage, draw(bad_directions))
        else:
            bad, code = pb_key(draw(bad_layers), stage, direction), NOT_FOUND
        req.keys.insert(draw(st.integers(0, len(req.keys))), bad)
    return Case(f"GetHint with a bad {fault}", "GetHint", req, code)


@dataclass
class NodeUnderTest:
    servicer: FheServicer
    stub: fhe_pb2_grpc.FheServiceStub
    channel: grpc.aio.Channel


@pytest.fixture
async def node():
    servicer = FheServicer(FheNode(WEIGHTS, FHE_LIMITS), chunk_bytes=FHE_CHUNK_BYTES)
    running = await start_server(ServerConfig(insecure=True, max_message_bytes=FHE_MAX_MESSAGE),
                                 lambda s: fhe_pb2_grpc.add_FheServiceServicer_to_server(servicer, s),
                                 [FHE_SERVICE])
    # The client may send more than the server accepts: oversized messages must reach the server.
    channel = make_channel(running.address, ChannelConfig(insecure=True, max_message_bytes=64 << 20))
    try:
        yield NodeUnderTest(servicer, fhe_pb2_grpc.FheServiceStub(channel), channel)
    finally:
        await channel.close()
        await running.stop(0)


async def fetch_hint(stub: fhe_pb2_grpc.FheServiceStub, key: tuple[int, int, int]
                     ) -> tuple[fhe_pb2.HintHeader, np.ndarray]:
    header, data = None, b""
    async for resp in stub.GetHint(fhe_pb2.GetHintRequest(seed=SEED, param_set=EXACT, model_id="tiny",
                                                         keys=[pb_key(*key)])):
        if resp.WhichOneof("kind") == "header":
            header = resp.header
        else:
            data += resp.chunk.data
    assert header is not None
    return header, wire.decode(data, kind=wire.Kind.HINT)


class Survivor:
    """An FHE session opened before the fuzzing; it must keep returning bit-exact products."""

    def __init__(self, stub: fhe_pb2_grpc.FheServiceStub) -> None:
        self.stub = stub
        self.call = stub.Evaluate()
        self.rid = 1000

    async def open(self) -> None:
        await self.call.write(open_msg())
        resp = await asyncio.wait_for(self.call.read(), 30)
        self.session_id = resp.opened.session_id
        assert self.session_id and resp.opened.model.model_id == "tiny"
        self.header, self.hint = await fetch_hint(self.stub, QKV0)
        w = WEIGHTS.matrix(WeightKey(0, Stage.QKV, Direction.FORWARD))
        half = 1 << (self.header.act_bits - 1)
        x = np.random.default_rng(7).integers(-half + 1, half, size=(w.shape[1], 3))
        enc = scheme.encrypt(P.EXACT, expand_a(SEED, w.shape[1], P.EXACT), x, self.header.delta_bits,
                             rng=DeterministicRandomness(7))
        self.ciphertext, self.secret = wire.encode(wire.Kind.CIPHERTEXT, enc.b), enc.s
        self.want = w.astype(np.int64) @ x

    async def check(self) -> None:
        self.rid += 1
        for msg in pass_msgs(self.rid, QKV0, self.ciphertext, 2):
            await self.call.write(msg)
        data = b""
        while True:
            resp = await asyncio.wait_for(self.call.read(), 30)
            assert resp is not grpc.aio.EOF and resp.result.request_id == self.rid, resp
            data += resp.result.result.data
            if resp.result.result.index == resp.result.result.count - 1:
                break
        y = wire.decode(data, kind=wire.Kind.RESULT)
        got = scheme.decrypt(P.EXACT, y, self.hint, self.secret, self.header.delta_bits)
        assert np.array_equal(got, self.want), "the session opened before the fuzzing lost exactness"

    async def close(self) -> None:
        await self.call.done_writing()
        assert await asyncio.wait_for(self.call.read(), 30) is grpc.aio.EOF
        assert await self.call.code() == Code.OK


async def open_sessions(stub: fhe_pb2_grpc.FheServiceStub, n: int) -> list[Any]:
    calls = []
    for _ in range(n):
        call = stub.Evaluate()
        await call.write(open_msg())
        assert (await asyncio.wait_for(call.read(), 30)).opened.session_id
        calls.append(call)
    return calls


async def test_evaluate_survives_hostile_streams(node: NodeUnderTest) -> None:
    survivor = Survivor(node.stub)
    await survivor.open()
    await survivor.check()

    async def check(case: Case) -> None:
        await expect_case(node.stub, case)
        await eventually(lambda: set(node.servicer.node.sessions) == {survivor.session_id},
                         f"{case.what}: sessions left behind: {set(node.servicer.node.sessions)}")
        await survivor.check()

    await fuzz_families(EVALUATE_CASES, check)
    await survivor.check()
    # Refused streams gave back every slot: this client can still fill its whole quota of sessions.
    others = await open_sessions(node.stub, SESSIONS_PER_CLIENT - 1)
    for call in others:
        call.cancel()
    await survivor.check()
    await survivor.close()
    await eventually(lambda: node.servicer.node.sessions == {}, "sessions outlived their streams")


async def test_get_hint_and_session_limits_survive_hostile_input(node: NodeUnderTest) -> None:
    _, want = await fetch_hint(node.stub, QKV0)

    async def check(case: Case) -> None:
        await expect_case(node.stub, case)
        _, again = await fetch_hint(node.stub, QKV0)
        assert np.array_equal(again, want)

    await fuzz(bad_hint(), check, examples=60)

    # Refused hint requests gave back their slots: this client can still hold its quota of hint streams.
    streams = [node.stub.GetHint(fhe_pb2.GetHintRequest(seed=SEED, param_set=EXACT, model_id="tiny"))
               for _ in range(HINTS_PER_CLIENT)]
    for call in streams:
        assert (await asyncio.wait_for(call.read(), 30)).WhichOneof("kind") == "header"
    for call in streams:
        call.cancel()

    # Absurd counts of sessions: the node holds what a client may open, refuses the next, frees closed ones.
    held = await open_sessions(node.stub, SESSIONS_PER_CLIENT)
    # A per-client limit refuses as the stream starts (so send nothing), a node-wide one at OpenSession.
    first = [] if SESSIONS_PER_CLIENT == getattr(FHE_LIMITS, "max_sessions_per_client", None) else [open_msg()]
    await expect(node.stub.Evaluate(iter(first)), EXHAUSTED, "one session over the limit")
    assert len(node.servicer.node.sessions) == SESSIONS_PER_CLIENT
    for call in held[1:]:
        call.cancel()
    await eventually(lambda: len(node.servicer.node.sessions) == 1, "cancelled streams left their sessions behind")
    await held[0].done_writing()
    await eventually(lambda: node.servicer.node.sessions == {}, "a closed stream left its session behind")
    survivor = Survivor(node.stub)
    await survivor.open()
    await survivor.check()
    await survivor.close()


@st.composite
def node_request(draw: st.DrawFn) -> Case:
    """Any request an operator certificate might send the node: it serves workers only."""
    if draw(st.booleans()):
        req = fhe_pb2.GetHintRequest(seed=draw(st.one_of(st.just(SEED), bad_seeds)),
                                     param_set=draw(st.one_of(st.just(EXACT), bad_param_sets)),
                                     model_id=draw(st.sampled_from(["tiny", "x"])),
                                     keys=[pb_key(*k) for k in draw(st.lists(valid_keys, max_size=2))])
        return Case("operator asks for hints", "GetHint", req, DENIED)
    # Refused as the stream starts, before any message is read: sending one would race the refusal.
    return evaluate("operator opens a session", [], DENIED)


async def test_node_refuses_non_worker_certificates(tls_dir) -> None:  # type: ignore[no-untyped-def]
    servicer = FheServicer(FheNode(WEIGHTS, FHE_LIMITS), chunk_bytes=FHE_CHUNK_BYTES, insecure=False)
    running = await start_server(ServerConfig(tls_dir=tls_dir),
                                 lambda s: fhe_pb2_grpc.add_FheServiceServicer_to_server(servicer, s),
                                 [FHE_SERVICE])
    target = f"localhost:{running.port}"
    op_ch = make_channel(target, ChannelConfig(tls_dir=tls_dir, identity="operator"))
    worker_ch = make_channel(target, ChannelConfig(tls_dir=tls_dir, identity="hospital-1"))
    try:
        op, worker = fhe_pb2_grpc.FheServiceStub(op_ch), fhe_pb2_grpc.FheServiceStub(worker_ch)
        survivor = Survivor(worker)
        await survivor.open()

        async def check(case: Case) -> None:
            await expect_case(op, case)
            assert set(servicer.node.sessions) == {survivor.session_id}, case.what

        await fuzz(node_request(), check, examples=30)
        await survivor.check()
        await survivor.close()
    finally:
        await op_ch.close()
        await worker_ch.close()
        await running.stop(0)


# ==================================================================================================
# CoordinatorService
# ==================================================================================================

KEY = ConsortiumKey(bytes(range(100, 132)))
KCV = KEY.check_value()
FEDERATION = "fed-test"  # start_coordinator's default id
MAX_UPDATE = 64 << 10  # Settings.max_update_bytes in these tests
CFG = TrainingConfig(local_steps=3, batch_size=4, learning_rate=2e-2, lora_rank=4, lora_alpha=8.0,
                     lora_targets=("q", "v", "down"), max_seq_len=48, total_rounds=3)
SHAPES = {"a": (8, 4), "b": (3,)}
LAYOUT = TensorLayout.of({name: np.zeros(shape) for name, shape in SHAPES.items()})
# Stand-in ciphertext: the coordinator cannot read payloads, so any bytes of the right size with a matching
# digest would be a valid submission. Hostile cases below always break something else.
PAYLOAD = bytes(i * 7 % 251 for i in range(LAYOUT.size_bytes))
DIGEST = hashlib.sha256(PAYLOAD).digest()
NONCE = bytes(range(16))
WORKERS = ("a", "b", "c")
SERVER_MAX_MESSAGE = ServerConfig(insecure=True).max_message_bytes


def tensors(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.normal(0, 0.1, shape).astype(np.float32) for name, shape in SHAPES.items()}


def specs(layout: Sequence[tuple[str, Sequence[int]]]) -> list[pb.TensorSpec]:
    return [pb.TensorSpec(name=n, shape=list(s)) for n, s in layout]


def update_header(**fields: Any) -> pb.UpdateHeader:
    values = dict(round=1, num_samples=5, epsilon_spent=1.0, tensors=layout_to_proto(LAYOUT),
                  size_bytes=LAYOUT.size_bytes, digest=DIGEST, worker_id="b", key_check_value=KCV, nonce=NONCE)
    values.update(fields)
    return pb.UpdateHeader(**values)


def restore_header(**fields: Any) -> pb.RestoreHeader:
    values = dict(round=5, tensors=layout_to_proto(LAYOUT), size_bytes=LAYOUT.size_bytes, digest=DIGEST,
                  key_check_value=KCV, worker_id="r", nonce=NONCE, config=config_to_proto(CFG))
    values.update(fields)
    return pb.RestoreHeader(**values)


def chunk(index: int, count: int, data: bytes) -> common_pb2.Chunk:
    return common_pb2.Chunk(index=index, count=count, data=data)


def stream(kind: type, header: Any, chunks: Sequence[tuple[int, int, bytes]]) -> tuple:
    msgs = [] if header is None else [kind(header=header)]
    return tuple(msgs + [kind(chunk=chunk(*c)) for c in chunks])


def in_order(data: bytes = PAYLOAD, n: int = 1) -> list[tuple[int, int, bytes]]:
    parts = pieces(data, n)
    return [(i, len(parts), p) for i, p in enumerate(parts)]


def overrun(data: bytes, n: int, extra: bytes) -> list[tuple[int, int, bytes]]:
    """data in n chunks of a payload that says n + 1, then `extra` as the last: over the size exactly there."""
    return [(i, n + 1, p) for i, p in enumerate(pieces(data, n))] + [(n, n + 1, extra)]


SAFE_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"
FORBIDDEN = " !\"#$%&'()*+,./:;<=>?@[\\]^`{|}~\t\n\r\x00\u00a0\u200b\u20ac\u2603"
# Names check_worker_name refuses: a forbidden character, too long, or only '-' and '_'.
bad_names = st.one_of(
    st.builds(lambda a, c, b: a + c + b, st.text(SAFE_CHARS, max_size=20), st.sampled_from(FORBIDDEN),
              st.text(SAFE_CHARS + FORBIDDEN, max_size=20)),
    st.text(SAFE_CHARS, min_size=65, max_size=120),
    st.text("-_", min_size=1, max_size=10))
# Well-formed names nobody registered.
stranger_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", fullmatch=True).filter(
    lambda n: n not in WORKERS and n != "r")
wrong_kcvs = st.binary(min_size=1, max_size=40).filter(lambda b: b != KCV)
bad_nonces = st.binary(max_size=40).filter(lambda b: len(b) != len(NONCE))
bad_digests = st.binary(max_size=40).filter(lambda b: b != DIGEST)
bad_epsilons = st.one_of(st.floats(max_value=0.0, exclude_max=True), st.just(math.nan), st.just(math.inf))
# Shapes whose element count fits int64 (one that wraps it is pinned by test_overflowing_tensor_shape_is_refused).
shapes = st.one_of(st.lists(st.integers(1, 64), min_size=1, max_size=3),
                   st.lists(st.integers(0, 1 << 20), min_size=0, max_size=3),
                   st.lists(uint32, min_size=1, max_size=1),
                   st.lists(st.integers(1, 1 << 31), min_size=2, max_size=2))


@st.composite
def bad_tensors(draw: st.DrawFn) -> list[pb.TensorSpec]:
    """A tensor list no round-1 update may carry: malformed, or well-formed but not the round's layout."""
    base = [(n, list(s)) for n, s in LAYOUT.specs]
    fault = draw(st.sampled_from(["empty", "no_tag", "tag_first", "tag_size", "duplicate", "empty_name",
                                  "long_name", "zero_dim", "no_dims", "huge", "different", "random"]))
    if fault == "empty":
        out: list = []
    elif fault == "no_tag":
        out = base[:-1]
    elif fault == "tag_first":
        out = [base[-1], *base[:-1]]
    elif fault == "tag_size":
        out = [*base[:-1], (TAG_NAME, draw(st.lists(st.integers(1, 64), min_size=1, max_size=2).filter(
            lambda s: s != [TAG_WORDS])))]
    elif fault == "duplicate":
        out = [base[0], *base[:-1], base[-1]]
    elif fault in ("empty_name", "long_name"):
        name = "" if fault == "empty_name" else draw(st.text(SAFE_CHARS, min_size=257, max_size=300))
        out = [(name, [2]), *base]
    elif fault == "zero_dim":
        out = [("a", [8, 0]), *base[1:]]
    elif fault == "no_dims":
        out = [("a", []), *base[1:]]
    elif fault == "huge":  # more words than max_update_bytes allows
        out = [("a", [draw(st.integers(MAX_UPDATE // 8 + 1, U32))]), *base[1:]]
    elif fault == "different":  # well-formed, but not the layout round 1's first update set
        out = [("a", draw(st.lists(st.integers(1, 16), min_size=1, max_size=3).filter(lambda s: s != [8, 4]))),
               *base[1:]]
    else:
        names = st.one_of(st.sampled_from(["a", "b", TAG_NAME]), st.text(max_size=8))
        out = draw(st.lists(st.tuples(names, shapes), max_size=4).filter(lambda o: o != base))
    return specs(out)


@st.composite
def bad_update_header(draw: st.DrawFn) -> Case:
    fault = draw(st.sampled_from(["worker_id", "stranger", "anonymous", "submitted", "round", "no_kcv",
                                  "wrong_kcv", "num_samples", "epsilon", "nonce", "size_over_limit",
                                  "size_mismatch", "tensors", "digest"]))
    worker = draw(st.sampled_from(["b", "c"]))
    fields: dict[str, Any] = {"worker_id": worker}
    code = INVALID
    if fault == "worker_id":
        fields["worker_id"] = draw(bad_names)
    elif fault == "stranger":
        fields["worker_id"], code = draw(stranger_names), PRECONDITION
    elif fault == "anonymous":  # an anonymous caller is the operator, which is no worker
        fields["worker_id"], code = "", PRECONDITION
    elif fault == "submitted":
        fields["worker_id"], code = "a", PRECONDITION
    elif fault == "round":  # a round that never started, or one far in the future
        fields["round"], code = draw(uint64.filter(lambda r: r != 1)), PRECONDITION
    elif fault == "no_kcv":
        fields["key_check_value"] = b""
    elif fault == "wrong_kcv":
        fields["key_check_value"], code = draw(wrong_kcvs), PRECONDITION
    elif fault == "num_samples":
        fields["num_samples"] = draw(st.one_of(st.just(0), st.integers((1 << 40) + 1, U64)))
    elif fault == "epsilon":
        fields["epsilon_spent"] = draw(bad_epsilons)
    elif fault == "nonce":
        fields["nonce"] = draw(bad_nonces)
    elif fault == "size_over_limit":
        fields["size_bytes"], code = draw(st.integers(MAX_UPDATE + 1, U64)), EXHAUSTED
    elif fault == "size_mismatch":
        fields["size_bytes"] = draw(st.integers(0, MAX_UPDATE).filter(lambda s: s != LAYOUT.size_bytes))
    elif fault == "tensors":
        fields["tensors"] = draw(bad_tensors())
    else:
        fields["digest"] = draw(bad_digests)
    chunks = in_order(PAYLOAD, draw(st.integers(1, 4))) if fault == "digest" else []  # others: refused at the header
    return Case(f"UpdateHeader: {fault}", "SubmitUpdate", stream(pb.SubmitUpdateRequest, update_header(**fields),
                                                                 chunks), code)


@st.composite
def bad_update_payload(draw: st.DrawFn) -> Case:
    header = update_header(worker_id=draw(st.sampled_from(["b", "c"])))
    fault = draw(st.sampled_from(["no_chunks", "truncated", "extended", "corrupted", "disorder",
                                  "second_header", "chunk_first", "empty_stream"]))
    code = INVALID
    if fault == "no_chunks":
        msgs = stream(pb.SubmitUpdateRequest, header, [])
    elif fault == "truncated":
        data = PAYLOAD[:draw(st.integers(0, len(PAYLOAD) - 1))]
        msgs = stream(pb.SubmitUpdateRequest, header, in_order(data, draw(st.integers(1, 4))))
    elif fault == "extended":
        chunks = overrun(PAYLOAD, draw(st.integers(1, 4)), draw(st.binary(min_size=1, max_size=4000)))
        msgs, code = stream(pb.SubmitUpdateRequest, header, chunks), EXHAUSTED
    elif fault == "corrupted":  # right size, random or flipped bytes: the digest no longer matches
        data = draw(st.one_of(st.binary(min_size=len(PAYLOAD), max_size=len(PAYLOAD)),
                              st.integers(0, len(PAYLOAD) - 1).map(
                                  lambda i: PAYLOAD[:i] + bytes([PAYLOAD[i] ^ 1]) + PAYLOAD[i + 1:])
                              ).filter(lambda d: d != PAYLOAD))
        msgs = stream(pb.SubmitUpdateRequest, header, in_order(data, draw(st.integers(1, 4))))
    elif fault == "disorder":
        what, chunks = draw(disorder(PAYLOAD))
        fault = f"disorder/{what}"
        msgs = stream(pb.SubmitUpdateRequest, header, chunks)
    elif fault == "second_header":
        chunks = in_order(PAYLOAD, 4)[:draw(st.integers(0, 3))]
        msgs = (*stream(pb.SubmitUpdateRequest, header, chunks), pb.SubmitUpdateRequest(header=header))
    elif fault == "chunk_first":
        msgs = stream(pb.SubmitUpdateRequest, None, in_order(PAYLOAD, draw(st.integers(1, 3)))[:1])
    else:
        msgs = () if draw(st.booleans()) else (pb.SubmitUpdateRequest(),)
    return Case(f"update payload: {fault}", "SubmitUpdate", msgs, code)


@st.composite
def submission_soup(draw: st.DrawFn) -> Case:
    """Random headers and chunks in random order from random (mostly real) workers: never a valid update."""
    headers = st.builds(update_header, round=st.integers(0, 3), num_samples=st.integers(0, 9),
                        epsilon_spent=st.floats(), tensors=bad_tensors() | st.just(layout_to_proto(LAYOUT)),
                        size_bytes=st.integers(0, 1000), digest=bad_digests,
                        worker_id=st.sampled_from([*WORKERS, "", "zz"]),
                        key_check_value=st.sampled_from([KCV, b"", b"k"]), nonce=st.sampled_from([NONCE, b""]))
    chunks = st.builds(chunk, st.integers(0, 4), st.integers(0, 4), st.binary(max_size=400))
    msgs = draw(st.lists(st.one_of(headers.map(lambda h: pb.SubmitUpdateRequest(header=h)),
                                   chunks.map(lambda c: pb.SubmitUpdateRequest(chunk=c))), max_size=6))
    return Case("submission soup", "SubmitUpdate", tuple(msgs), None)


SUBMIT_CASES = [(bad_update_header(), 150), (bad_update_payload(), 100), (submission_soup(), 60)]


@st.composite
def bad_config(draw: st.DrawFn) -> pb.RoundConfig | None:
    """A RoundConfig no worker could train with (one field out of range), or none at all."""
    cfg = config_to_proto(CFG)
    fault = draw(st.sampled_from(["missing", "local_steps", "batch_size", "learning_rate", "lora_rank",
                                  "lora_alpha", "lora_targets", "max_seq_len", "total_rounds"]))
    if fault == "missing":
        return None
    bad = {
        "local_steps": st.one_of(st.just(0), st.integers(100_001, U32)),
        "batch_size": st.one_of(st.just(0), st.integers(65_537, U32)),
        "learning_rate": st.one_of(st.floats(max_value=0.0), st.floats(min_value=10.0, exclude_min=True),
                                   st.just(math.nan)),
        "lora_rank": st.one_of(st.just(0), st.integers(1025, U32)),
        "lora_alpha": st.one_of(st.floats(max_value=0.0), st.just(math.inf), st.just(math.nan)),
        "max_seq_len": st.one_of(st.integers(0, 1), st.integers(8193, U32)),
        "total_rounds": st.one_of(st.just(0), st.integers(1_000_001, U32)),
    }
    if fault == "lora_targets":
        targets = draw(st.one_of(
            st.just([]), st.sampled_from(PROJECTIONS).map(lambda p: [p, p]),
            st.lists(st.text(max_size=8).filter(lambda t: t not in PROJECTIONS), min_size=1, max_size=3)
            .map(lambda ts: ["q", *ts])))
        del cfg.lora_targets[:]
        cfg.lora_targets.extend(targets)
    else:
        setattr(cfg, fault, draw(bad[fault]))
    return cfg


any_deadline = st.one_of(st.just(0.0), st.floats(allow_nan=True, allow_infinity=True))
bad_deadlines = st.one_of(st.floats(max_value=0.0, exclude_max=True), st.just(math.nan), st.just(math.inf),
                          st.floats(min_value=7 * 86400.0, exclude_min=True))


@st.composite
def bad_rpc_during_round(draw: st.DrawFn, rpc: str) -> Case:
    """The other RPCs, with hostile requests, while round 1 is open and 'a' has submitted."""
    if rpc == "Register":
        fault = draw(st.sampled_from(["name", "anonymous", "no_kcv", "wrong_kcv"]))
        if fault == "name":
            name = draw(bad_names)
        elif fault == "anonymous":  # the operator, which cannot register
            name = ""
        else:
            name = draw(st.one_of(st.sampled_from(WORKERS), stranger_names))
        if fault == "no_kcv":
            kcv = b""
        elif fault == "wrong_kcv":
            kcv = draw(wrong_kcvs)
        else:
            kcv = draw(st.one_of(st.just(b""), wrong_kcvs, st.just(KCV)))
        code = {"name": INVALID, "anonymous": DENIED, "no_kcv": INVALID, "wrong_kcv": PRECONDITION}[fault]
        req = pb.RegisterRequest(worker_name=name, num_records=draw(uint64), key_check_value=kcv,
                                 no_dp=draw(st.booleans()))
    elif rpc == "DeclineRound":
        fault = draw(st.sampled_from(["name", "anonymous", "stranger", "submitted", "round"]))
        name = {"name": draw(bad_names), "anonymous": "", "stranger": draw(stranger_names), "submitted": "a",
                "round": draw(st.sampled_from(["b", "c"]))}[fault]
        round_ = draw(uint64.filter(lambda r: r != 1)) if fault == "round" else draw(st.one_of(st.just(1), uint64))
        code = INVALID if fault == "name" else PRECONDITION
        req = pb.DeclineRoundRequest(round=round_, reason=draw(st.text(max_size=600)), worker_id=name)
    elif rpc == "GetPatch":
        fault = "round"
        round_ = draw(st.one_of(st.integers(0, 3), uint64))
        req, code = pb.GetPatchRequest(round=round_), PRECONDITION if round_ == 1 else NOT_FOUND
    elif rpc == "WatchRounds":
        fault = draw(st.sampled_from(["name", "stranger"]))
        name = draw(bad_names) if fault == "name" else draw(stranger_names)
        req, code = pb.WatchRoundsRequest(worker_id=name), INVALID if fault == "name" else PRECONDITION
    elif rpc == "StartRound":
        fault = draw(st.sampled_from(["config", "round_open"]))
        cfg = draw(bad_config()) if fault == "config" else config_to_proto(CFG)
        req = pb.StartRoundRequest(config=cfg, deadline_seconds=draw(any_deadline))
        code = INVALID if fault == "config" else PRECONDITION
    else:
        fault = draw(st.sampled_from(["name", "anonymous", "stranger", "holds_rounds", "chunk_first"]))
        if fault == "name":
            name = draw(bad_names)
        elif fault == "anonymous":
            name = ""
        elif fault == "stranger":
            name = draw(stranger_names)
        else:
            name = draw(st.sampled_from(WORKERS))
        header = restore_header(worker_id=name, round=draw(st.one_of(st.just(5), st.integers(1, U64))))
        req = (stream(pb.RestorePatchRequest, None, in_order(PAYLOAD, 2)[:1]) if fault == "chunk_first"
               else stream(pb.RestorePatchRequest, header, []))  # refused at the header
        code = INVALID if fault in ("name", "chunk_first") else PRECONDITION
    return Case(f"{rpc}: {fault}", rpc, req, code)


class Member(RpcWorker):
    """An RPC-level worker of the fuzzed round (large messages allowed, to send oversized ones)."""

    def __init__(self, address: str, name: str) -> None:
        super().__init__(address, name, KEY, max_message_bytes=64 << 20)

    def update(self, round_: int, n: int, seed: int) -> tuple[pb.SubmitUpdateRequest, ...]:
        enc = encrypt_update(KEY, FEDERATION, round_, self.name, tensors(seed), n)
        header = update_header(round=round_, num_samples=n, epsilon_spent=1.5, tensors=layout_to_proto(enc.layout),
                               size_bytes=len(enc.payload), digest=enc.digest, worker_id=self.name, nonce=enc.nonce)
        return stream(pb.SubmitUpdateRequest, header, in_order(enc.payload, 3))

    async def submit(self, round_: int, n: int, seed: int) -> pb.SubmitUpdateResponse:
        return await self.stub.SubmitUpdate(iter(self.update(round_, n, seed)))


class Coordinator:
    def __init__(self, address: str, fed: Federation) -> None:
        self.address, self.fed = address, fed
        self.channel = make_channel(address, ChannelConfig(insecure=True, max_message_bytes=64 << 20))
        self.op = coordinator_pb2_grpc.CoordinatorServiceStub(self.channel)  # anonymous: the operator
        self.members: dict[str, Member] = {}

    async def add(self, *names: str) -> None:
        for name in names:
            self.members[name] = m = Member(self.address, name)
            await m.join()
        await eventually(lambda: all(self.fed.workers[n].connected for n in names), "workers never connected",
                         timeout=30)

    async def close(self) -> None:
        for m in self.members.values():
            await m.leave()
        await self.channel.close()


@pytest.fixture
async def coordinators():
    """Starts coordinators (insecure, as tests run them) with the given min_workers; stops them afterwards."""
    started: list[tuple[Any, Coordinator]] = []

    async def start(min_workers: int = 2) -> Coordinator:
        running, fed = await start_coordinator(Settings(min_workers=min_workers, deadline_seconds=600,
                                                        keep_rounds=2, max_update_bytes=MAX_UPDATE, secagg=False))
        started.append((running, Coordinator(running.address, fed)))
        return started[-1][1]
    try:
        yield start
    finally:
        for running, c in started:
            await c.close()
            await running.stop(0)
            c.fed.close()


async def fetch_patch(stub: coordinator_pb2_grpc.CoordinatorServiceStub, round_: int
                      ) -> tuple[pb.PatchHeader, bytes]:
    msgs = [m async for m in stub.GetPatch(pb.GetPatchRequest(round=round_))]
    payload = b"".join(m.chunk.data for m in msgs[1:])
    assert hashlib.sha256(payload).digest() == msgs[0].header.digest
    return msgs[0].header, payload


def decrypt(header: pb.PatchHeader, payload: bytes, **kw: Any) -> dict[str, np.ndarray]:
    return decrypt_aggregate(KEY, header.federation_id, header.round, contributions(header.participants),
                             header.total_samples, layout_from_proto(header.tensors), payload,
                             header.key_check_value, **kw)


async def test_round_in_progress_survives_hostile_calls(coordinators) -> None:  # type: ignore[no-untyped-def]
    c = await coordinators()
    fed = c.fed
    await c.add(*WORKERS)
    started = await c.op.StartRound(pb.StartRoundRequest(config=config_to_proto(CFG)))
    assert started.round == 1 and list(started.eligible) == list(WORKERS)
    assert (await c.members["a"].submit(1, n=3, seed=1)).accepted
    rnd = fed.rounds[1]
    a_bytes = rnd.bytes_received

    async def intact(what: str) -> None:
        await eventually(lambda: not rnd.receiving, f"{what}: upload slots left reserved: {rnd.receiving}")
        assert list(fed.rounds) == [1] and rnd.state == "open", what
        assert set(rnd.submissions) == {"a"} and rnd.bytes_received == a_bytes, what
        assert rnd.pending == {"b", "c"} and not rnd.declined, what
        assert set(fed.workers) == set(WORKERS), f"{what}: workers {set(fed.workers)}"
        assert all(len(w.watchers) == 1 for w in fed.workers.values()), what
        assert fed.store.rounds() == [] and fed.key_check_value == KCV and not fed.finished, what
        status = await c.op.GetStatus(pb.GetStatusRequest())
        assert status.current_round == 1 and [r.state for r in status.rounds] == ["open"], what

    async def check(case: Case) -> None:
        await expect_case(c.members["b"].stub, case)
        await intact(case.what)

    await fuzz_families(SUBMIT_CASES, check)
    await fuzz_families([(bad_rpc_during_round(rpc), 30) for rpc in ("Register", "DeclineRound", "GetPatch",
                                                                      "WatchRounds", "StartRound", "RestorePatch")],
                        check)

    # Messages over the server's limit, on every kind of call.
    big = "x" * (SERVER_MAX_MESSAGE + 1)
    oversized = [
        Case("oversized Register", "Register", pb.RegisterRequest(worker_name=big, key_check_value=KCV), EXHAUSTED),
        Case("oversized DeclineRound", "DeclineRound", pb.DeclineRoundRequest(round=1, reason=big, worker_id="b"),
             EXHAUSTED),
        Case("oversized WatchRounds", "WatchRounds", pb.WatchRoundsRequest(worker_id=big), EXHAUSTED),
        Case("oversized StartRound", "StartRound",
             pb.StartRoundRequest(config=pb.RoundConfig(lora_targets=[big])), EXHAUSTED),
        Case("oversized update chunk", "SubmitUpdate",
             stream(pb.SubmitUpdateRequest, update_header(), [(0, 1, big.encode())]), EXHAUSTED),
    ]
    for case in oversized:
        await check(case)

    # Afterwards the round still takes a proper update and aggregates exactly.
    assert (await c.members["b"].submit(1, n=7, seed=2)).accepted
    await c.members["c"].stub.DeclineRound(pb.DeclineRoundRequest(round=1, reason="DP budget", worker_id="c"))
    closed = (await c.members["a"].next_event("closed")).closed
    assert closed.outcome == pb.ROUND_OUTCOME_AGGREGATED and closed.total_samples == 10
    assert {p.worker_id for p in closed.participants} == {"a", "b"}
    header, payload = await fetch_patch(c.op, 1)
    mean = decrypt(header, payload)
    for name in SHAPES:
        want = (3 * tensors(1)[name].astype(np.float64) + 7 * tensors(2)[name]) / 10
        np.testing.assert_allclose(mean[name], want, rtol=1e-6, atol=1e-9)
    assert rnd.bytes_received == 2 * a_bytes and fed.store.rounds() == [1]
    # and the closed round refuses what comes late, precisely
    await expect(c.members["c"].stub.SubmitUpdate(iter(c.members["c"].update(1, 2, 3)[:1])), PRECONDITION)
    await expect(c.op.GetPatch(pb.GetPatchRequest(round=2)), NOT_FOUND)


@st.composite
def bad_start(draw: st.DrawFn) -> Case:
    if draw(st.booleans()):
        req, what = pb.StartRoundRequest(config=draw(bad_config()), deadline_seconds=draw(any_deadline)), "config"
    else:
        req, what = pb.StartRoundRequest(config=config_to_proto(CFG), deadline_seconds=draw(bad_deadlines)), \
            "deadline"
    return Case(f"StartRound: bad {what}", "StartRound", req, INVALID)


async def test_operator_calls_survive_hostile_input(coordinators) -> None:  # type: ignore[no-untyped-def]
    c = await coordinators()
    fed = c.fed
    await c.add("a", "b")

    async def check(case: Case) -> None:
        await expect_case(c.op, case)
        assert fed.rounds == {} and not fed.finished, f"{case.what}: a refused StartRound changed the state"

    await fuzz(bad_start(), check, examples=100)
    for m in c.members.values():
        assert m.events.empty(), "a refused StartRound reached the workers"
    # The next proper round is round 1: refusals consumed no round numbers.
    started = await c.op.StartRound(pb.StartRoundRequest(config=config_to_proto(CFG), deadline_seconds=60))
    assert started.round == 1 and (await c.members["a"].next_event("started")).started.round == 1

    last = await c.op.FinishFederation(pb.FinishFederationRequest())
    assert last.last_round == 1 and fed.finished
    assert (await c.members["b"].next_event("finished")).finished.last_round == 1
    # A finished federation refuses, precisely, and finishing again is harmless.
    await expect(c.op.StartRound(pb.StartRoundRequest(config=config_to_proto(CFG))), PRECONDITION)
    await expect(c.op.StartRound(pb.StartRoundRequest()), INVALID)
    await expect(c.members["a"].stub.SubmitUpdate(iter(c.members["a"].update(1, 2, 3)[:1])), PRECONDITION)
    assert (await c.op.FinishFederation(pb.FinishFederationRequest())).last_round == 1
    status = await c.op.GetStatus(pb.GetStatusRequest())
    assert status.finished and [r.state for r in status.rounds] == ["failed"]


@st.composite
def bad_restore(draw: st.DrawFn) -> Case:
    fault = draw(st.sampled_from(["worker_id", "stranger", "anonymous", "round_zero", "no_kcv", "wrong_kcv",
                                  "nonce", "size_over_limit", "size_mismatch", "tensors", "digest", "config",
                                  "payload"]))
    fields: dict[str, Any] = {}
    code = INVALID
    chunks: list = []  # header faults are refused at the header
    if fault == "worker_id":
        fields["worker_id"] = draw(bad_names)
    elif fault in ("stranger", "anonymous"):
        fields["worker_id"], code = (draw(stranger_names) if fault == "stranger" else ""), PRECONDITION
    elif fault == "round_zero":
        fields["round"] = 0
    elif fault == "no_kcv":
        fields["key_check_value"] = b""
    elif fault == "wrong_kcv":
        fields["key_check_value"], code = draw(wrong_kcvs), PRECONDITION
    elif fault == "nonce":
        fields["nonce"] = draw(bad_nonces)
    elif fault == "size_over_limit":
        fields["size_bytes"], code = draw(st.integers(MAX_UPDATE + 1, U64)), EXHAUSTED
    elif fault == "size_mismatch":
        fields["size_bytes"] = draw(st.integers(0, MAX_UPDATE).filter(lambda s: s != LAYOUT.size_bytes))
    elif fault == "tensors":  # any layout is fine for a restore, as long as it is well-formed and sized
        fields["tensors"] = draw(bad_tensors().filter(lambda t: _malformed_or_missized(t)))
    elif fault == "digest":
        fields["digest"] = draw(bad_digests)
        chunks = in_order(PAYLOAD, draw(st.integers(1, 3)))
    elif fault == "config":  # a restored adapter must say how to rebuild it
        cfg = draw(bad_config())
        fields["config"] = cfg if cfg is not None else pb.RoundConfig()
    else:
        what, chunks = draw(st.one_of(disorder(PAYLOAD), st.just(("none", [])),
                                      st.binary(min_size=1, max_size=2000).map(
                                          lambda x: ("extended", overrun(PAYLOAD, 2, x)))))
        fault, code = f"payload/{what}", EXHAUSTED if what == "extended" else INVALID
    header = restore_header(round=draw(st.integers(1, (1 << 62) - 1)), **fields) if fault != "round_zero" else \
        restore_header(**fields)
    return Case(f"RestorePatch: {fault}", "RestorePatch", stream(pb.RestorePatchRequest, header, chunks), code)


def _malformed_or_missized(t: Sequence[pb.TensorSpec]) -> bool:
    try:
        return layout_from_proto(t).size_bytes != LAYOUT.size_bytes
    except Exception:
        return True


async def test_restore_survives_hostile_input(coordinators) -> None:  # type: ignore[no-untyped-def]
    c = await coordinators(min_workers=1)
    fed = c.fed
    await c.add("r")
    r = c.members["r"]

    async def check(case: Case) -> None:
        await expect_case(r.stub, case)
        assert fed.rounds == {} and fed.store.rounds() == [], f"{case.what}: a refused restore left state"
        assert set(fed.workers) == {"r"}

    await fuzz(bad_restore(), check, examples=150)
    big = bytes(SERVER_MAX_MESSAGE + 1)
    await check(Case("oversized restore chunk", "RestorePatch",
                     stream(pb.RestorePatchRequest, restore_header(), [(0, 1, big)]), EXHAUSTED))
    # A proper restore is still accepted, and its aggregate decrypts exactly.
    enc = encrypt_update(KEY, FEDERATION, 5, "r", tensors(4), 1, kind=RESTORE)
    good = stream(pb.RestorePatchRequest, restore_header(tensors=layout_to_proto(enc.layout),
                                                         size_bytes=len(enc.payload), digest=enc.digest,
                                                         nonce=enc.nonce), in_order(enc.payload, 2))
    assert (await r.stub.RestorePatch(iter(good))).accepted
    header, payload = await fetch_patch(r.stub, 0)
    assert header.round == 5 and header.restored
    mean = decrypt(header, payload, kind=RESTORE)
    for name, value in tensors(4).items():
        np.testing.assert_allclose(mean[name], value, rtol=1e-6, atol=1e-9)
    await expect(r.stub.RestorePatch(iter(good)), PRECONDITION)  # only a fresh coordinator is restored
    started = await c.op.StartRound(pb.StartRoundRequest(config=config_to_proto(CFG)))
    assert started.round == 6 and (await r.next_event("started")).started.base_round == 5


@st.composite
def wrong_role(draw: st.DrawFn) -> Case:
    """Under mTLS identity comes from the certificate: a worker cannot run rounds, the operator cannot submit."""
    who = draw(st.sampled_from(["worker", "operator", "unenrolled"]))
    claimed = draw(st.one_of(st.just(""), st.sampled_from(["hospital-1", "operator"]), bad_names))
    if who == "worker":
        rpc = draw(st.sampled_from(["StartRound", "FinishFederation"]))
        req = (pb.StartRoundRequest(config=draw(st.one_of(bad_config(), st.just(config_to_proto(CFG)))),
                                    deadline_seconds=draw(any_deadline))
               if rpc == "StartRound" else pb.FinishFederationRequest())
    elif who == "unenrolled":  # a valid worker certificate the federation did not enroll
        rpc, req = "Register", pb.RegisterRequest(worker_name=claimed, num_records=draw(uint64),
                                                  key_check_value=draw(st.sampled_from([KCV, b"", b"x"])))
    else:
        rpc = draw(st.sampled_from(["Register", "DeclineRound", "SubmitUpdate", "RestorePatch"]))
        if rpc == "Register":
            req = pb.RegisterRequest(worker_name=claimed, key_check_value=draw(st.sampled_from([KCV, b"", b"x"])))
        elif rpc == "DeclineRound":
            req = pb.DeclineRoundRequest(round=draw(uint64), reason="no", worker_id=claimed)
        elif rpc == "SubmitUpdate":
            req = stream(pb.SubmitUpdateRequest, update_header(worker_id=claimed, round=draw(uint64)), [])
        else:
            req = stream(pb.RestorePatchRequest, restore_header(worker_id=claimed), [])
    return Case(f"{who} certificate calls {rpc}", f"{who}:{rpc}", req, DENIED)


async def test_roles_from_certificates_survive_hostile_callers(tls_dir) -> None:  # type: ignore[no-untyped-def]
    running, fed = await start_coordinator(Settings(min_workers=1, enrolled=frozenset({"hospital-1"}), secagg=False),
                                           tls_dir=tls_dir)
    target = f"localhost:{running.port}"
    channels = {who: make_channel(target, ChannelConfig(tls_dir=tls_dir, identity=identity))
                for who, identity in [("worker", "hospital-1"), ("operator", "operator"),
                                      ("unenrolled", "hospital-2")]}
    stubs = {who: coordinator_pb2_grpc.CoordinatorServiceStub(ch) for who, ch in channels.items()}
    try:
        async def check(case: Case) -> None:
            who, rpc = case.rpc.split(":")
            await expect_case(stubs[who], Case(case.what, rpc, case.request, case.expected))
            assert fed.workers == {} and fed.rounds == {} and not fed.finished, case.what

        await fuzz(wrong_role(), check, examples=60)
        # A worker that never registered cannot watch; after registering, it can.
        await expect(stubs["worker"].WatchRounds(pb.WatchRoundsRequest(worker_id="hospital-2")), PRECONDITION)
        reg = await stubs["worker"].Register(pb.RegisterRequest(worker_name="operator", key_check_value=KCV))
        assert reg.worker_id == "hospital-1" and list(fed.workers) == ["hospital-1"]
        status = await stubs["operator"].GetStatus(pb.GetStatusRequest())
        assert [w.worker_id for w in status.workers] == ["hospital-1"]
    finally:
        for ch in channels.values():
            await ch.close()
        await running.stop(0)
        fed.close()


# ==================================================================================================
# Bugs found by this file, pinned until fixed (strict: they XPASS, and so fail, once the bug is gone)
# ==================================================================================================


async def test_overflowing_tensor_shape_is_refused(coordinators) -> None:  # type: ignore[no-untyped-def]
    c = await coordinators()
    await c.add("a", "b")
    await c.op.StartRound(pb.StartRoundRequest(config=config_to_proto(CFG)))
    # (2^32-1)^2 wraps to -(2^33-1) in int64; 5 * 1717986917 = 2^33 - 6; the tag adds 6: "0 words".
    layout = [("x", [U32, U32]), ("y", [5, 1717986917]), (TAG_NAME, [TAG_WORDS])]
    header = update_header(worker_id="a", tensors=specs(layout), size_bytes=0, digest=hashlib.sha256(b"").digest())
    await expect(c.members["a"].stub.SubmitUpdate(iter(stream(pb.SubmitUpdateRequest, header, [(0, 1, b"")]))),
                 INVALID, "a layout of 2^64 + 2^33 elements")
    assert (await c.members["b"].submit(1, n=7, seed=2)).accepted


async def test_refused_duplicate_does_not_cancel_the_upload_in_flight(coordinators) -> None:  # type: ignore
    c = await coordinators()
    await c.add("a", "b")
    await c.op.StartRound(pb.StartRoundRequest(config=config_to_proto(CFG)))
    a = c.members["a"]
    reqs, gate = a.update(1, n=3, seed=1), asyncio.Event()

    async def slow() -> Any:  # header and the first chunk, then a pause (a slow uplink)
        yield reqs[0]
        yield reqs[1]
        await gate.wait()
        for r in reqs[2:]:
            yield r
    first = asyncio.ensure_future(a.stub.SubmitUpdate(slow()))
    try:
        await eventually(lambda: "a" in c.fed.rounds[1].receiving, "the first upload never started")
        # A retry of the same update while the first is streaming: refused, precisely...
        await expect(a.stub.SubmitUpdate(iter(a.update(1, n=3, seed=1)[:1])), PRECONDITION, "duplicate")
        gate.set()
        # ...and the upload in flight must be unaffected.
        code, details = await outcome(first)
        assert code == Code.OK, f"the upload in flight was refused: {code.name}: {details}"
    finally:
        gate.set()
        first.cancel()


async def test_refused_duplicate_restore_keeps_the_guard(coordinators) -> None:  # type: ignore[no-untyped-def]
    c = await coordinators(min_workers=1)
    await c.add("r")
    r = c.members["r"]
    enc = encrypt_update(KEY, FEDERATION, 5, "r", tensors(4), 1, kind=RESTORE)
    msgs = stream(pb.RestorePatchRequest, restore_header(tensors=layout_to_proto(enc.layout),
                                                         size_bytes=len(enc.payload), digest=enc.digest,
                                                         nonce=enc.nonce), in_order(enc.payload, 3))
    gate = asyncio.Event()

    async def slow() -> Any:
        yield msgs[0]
        yield msgs[1]
        await gate.wait()
        for m in msgs[2:]:
            yield m
    first = asyncio.ensure_future(r.stub.RestorePatch(slow()))
    try:
        await eventually(lambda: "r" in c.fed._restoring, "the first restore never started")
        for attempt in (1, 2):  # header-only duplicates while the first restore streams
            code, details = await outcome(r.stub.RestorePatch(iter(msgs[:1])))
            assert code == PRECONDITION and "already restoring" in details, \
                f"duplicate restore {attempt} while one is in flight: {code.name}: {details}"
        gate.set()
        assert (await first).accepted
    finally:
        gate.set()
        first.cancel()


async def test_restored_round_number_cannot_break_the_federation(coordinators) -> None:  # type: ignore
    c = await coordinators(min_workers=1)
    await c.add("r")
    enc = encrypt_update(KEY, FEDERATION, U64, "r", tensors(4), 1, kind=RESTORE)
    restore = stream(pb.RestorePatchRequest, restore_header(round=U64, tensors=layout_to_proto(enc.layout),
                                                            size_bytes=len(enc.payload), digest=enc.digest,
                                                            nonce=enc.nonce), in_order(enc.payload))
    code, _ = await outcome(c.members["r"].stub.RestorePatch(iter(restore)))  # refusing it is fine
    if code == Code.OK:  # accepting it is fine too, if the federation keeps working
        await outcome(c.op.StartRound(pb.StartRoundRequest(config=config_to_proto(CFG))))
        await outcome(c.op.GetStatus(pb.GetStatusRequest()))


GARBAGE = b"\x0a\xff\x01"  # field 1, length 255, then 1 byte: truncated, for every message type


async def test_undecodable_requests_get_invalid_argument(node: NodeUnderTest, coordinators) -> None:  # type: ignore
    c = await coordinators()
    services = [(node.channel, fhe_pb2.DESCRIPTOR.services_by_name["FheService"]),
                (c.channel, pb.DESCRIPTOR.services_by_name["CoordinatorService"])]
    codes = {}
    for channel, service in services:
        for method in service.methods:
            with pytest.raises(Exception):  # noqa: B017 - every message type fails to parse these bytes
                method.input_type._concrete_class.FromString(GARBAGE)
            path = f"/{service.full_name}/{method.name}"
            kind = ("stream" if method.client_streaming else "unary") + "_" + (
                "stream" if method.server_streaming else "unary")
            call = getattr(channel, kind)(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)
            try:
                res = call(iter([GARBAGE]) if method.client_streaming else GARBAGE)
                if method.server_streaming:
                    async for _ in res:
                        pass
                else:
                    await res
                codes[path] = Code.OK
            except grpc.aio.AioRpcError as exc:
                codes[path] = exc.code()
    # the services still answer well-formed requests
    await c.op.GetStatus(pb.GetStatusRequest())
    await fetch_hint(node.stub, QKV0)
    wrong = {path: code.name for path, code in codes.items() if code != INVALID}
    assert not wrong, f"undecodable requests: {wrong}"


async def test_empty_chunks_do_not_pile_up_on_the_node(node: NodeUnderTest) -> None:
    """More chunks than the payload has bytes, or an empty chunk among several, is refused at the first chunk:
    nothing accumulates (once, 3000 empty chunks of a request claiming 2^32−1 held 26 KB, unbounded)."""
    for count, data, code in [(U32, b"", EXHAUSTED), (FHE_LIMITS.max_ciphertext_bytes + 1, b"x", EXHAUSTED),
                              (3, b"", INVALID)]:
        release = asyncio.Event()

        async def requests(count: int = count, data: bytes = data, release: asyncio.Event = release) -> Any:
            yield open_msg()
            yield pass_msg(5, QKV0, 0, count, data)
            await release.wait()  # no more writes: the refusal must come from this chunk alone

        call = node.stub.Evaluate(requests())
        try:
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                async for _ in call:
                    pass
            assert exc.value.code() == code, (count, exc.value.details())
        finally:
            release.set()
            call.cancel()
    assert node.servicer.node.sessions == {}
