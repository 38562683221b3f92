"""FheService over in-process gRPC: exact encrypted products through the stream, and every error path."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest

from common.config import ChannelConfig, ServerConfig
from common.lwe import params as P
from common.lwe import scheme, wire
from common.lwe.prg import DeterministicRandomness, expand_a
from common.models import load_model
from common.rpc import make_channel, start_server
from common.stages import Direction, PublicWeights, Stage, WeightKey
from fedfhe.v1 import common_pb2, fhe_pb2, fhe_pb2_grpc
from fhe_server.__main__ import SERVICE
from fhe_server.node import Limits, Node
from fhe_server.service import FheServicer

SEED = bytes(range(32))
EXACT = common_pb2.PARAM_SET_EXACT


@pytest.fixture(scope="module")
def weights() -> PublicWeights:
    return PublicWeights(load_model("tiny"))


@pytest.fixture
async def stub(weights: PublicWeights) -> AsyncIterator[fhe_pb2_grpc.FheServiceStub]:
    servicer = FheServicer(Node(weights, Limits(max_in_flight=4, max_ciphertext_bytes=1 << 20)), chunk_bytes=4096)
    running = await start_server(ServerConfig(insecure=True),
                                 lambda s: fhe_pb2_grpc.add_FheServiceServicer_to_server(servicer, s),
                                 [SERVICE])
    async with make_channel(running.address, ChannelConfig(insecure=True)) as ch:
        yield fhe_pb2_grpc.FheServiceStub(ch)
    await running.stop(0)


def pb_key(layer: int, stage: int, direction: int) -> fhe_pb2.WeightKey:
    return fhe_pb2.WeightKey(layer=layer, stage=stage, direction=direction)


def open_msg(seed: bytes = SEED, param_set: int = EXACT, model_id: str = "tiny") -> fhe_pb2.EvaluateRequest:
    session = fhe_pb2.OpenSession(seed=seed, param_set=param_set, model_id=model_id)
    return fhe_pb2.EvaluateRequest(open=session)


def pass_msgs(rid: int, key: fhe_pb2.WeightKey, data: bytes, chunk: int = 3000) -> list:
    n = max(1, -(-len(data) // chunk))
    pieces = [data[i * chunk:(i + 1) * chunk] for i in range(n)]
    return [fhe_pb2.EvaluateRequest(pass_request=fhe_pb2.PassRequest(
        request_id=rid, key=key, ciphertext=common_pb2.Chunk(index=i, count=n, data=piece)))
        for i, piece in enumerate(pieces)]


async def fetch_hint(stub, key: fhe_pb2.WeightKey, param_set: int = EXACT):
    header, data = None, b""
    async for resp in stub.GetHint(fhe_pb2.GetHintRequest(seed=SEED, param_set=param_set, model_id="tiny",
                                                         keys=[key])):
        if resp.WhichOneof("kind") == "header":
            header = resp.header
        else:
            data += resp.chunk.data
    return header, wire.decode(data, kind=wire.Kind.HINT)


@pytest.mark.parametrize("param_set, params", [(EXACT, P.EXACT), (common_pb2.PARAM_SET_COMPACT, P.COMPACT)])
async def test_exact_products_through_the_stream_several_in_flight(stub, weights, param_set, params) -> None:
    keys = [WeightKey(0, Stage.QKV, Direction.FORWARD), WeightKey(1, Stage.DOWN, Direction.FORWARD),
            WeightKey(1, Stage.GATE_UP, Direction.BACKWARD)]
    rng = np.random.default_rng(0)
    jobs = {}
    for rid, key in enumerate(keys, start=10):
        pk = pb_key(key.layer, key.stage, key.direction)
        header, h = await fetch_hint(stub, pk, param_set)
        w = weights.matrix(key)
        assert (header.rows, header.cols) == w.shape and h.shape == (w.shape[0], params.n)
        x = rng.integers(-(1 << (header.act_bits - 1)) + 1, 1 << (header.act_bits - 1), size=(w.shape[1], 5))
        enc = scheme.encrypt(params, expand_a(SEED, w.shape[1], params), x, header.delta_bits,
                             rng=DeterministicRandomness(rid))
        jobs[rid] = (pk, w, x, enc, h, header)
    # All requests go out before any result is read: the node answers by request id.
    requests = [open_msg(param_set=param_set)]
    for rid, (pk, _, _, enc, _, _) in jobs.items():
        requests += pass_msgs(rid, pk, wire.encode(wire.Kind.CIPHERTEXT, enc.b))
    call = stub.Evaluate(iter(requests))
    results: dict[int, bytes] = {}
    opened = None
    async for resp in call:
        if resp.WhichOneof("kind") == "opened":
            opened = resp.opened
        else:
            rid = resp.result.request_id
            results[rid] = results.get(rid, b"") + resp.result.result.data
    assert opened is not None and opened.model.model_id == "tiny" and opened.model.num_layers == 2
    assert set(results) == set(jobs)
    for rid, (_, w, x, enc, h, header) in jobs.items():
        y = wire.decode(results[rid], kind=wire.Kind.RESULT)
        got = scheme.decrypt(params, y, h, enc.s, header.delta_bits)
        truth = w.astype(np.int64) @ x
        if params.exact:
            assert np.array_equal(got, truth)
        else:
            err = got - truth
            assert np.abs(err).max() < 8 * params.sigma * np.sqrt((w.astype(float) ** 2).sum(1)).max()


async def expect_error(stub, requests, code: grpc.StatusCode, match: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        async for _ in stub.Evaluate(iter(requests)):
            pass
    assert exc.value.code() == code, exc.value.details()
    assert match in exc.value.details()


def ciphertext(rows: int, params: P.LweParams = P.EXACT) -> bytes:
    return wire.encode(wire.Kind.CIPHERTEXT, np.zeros((rows, 2), dtype=params.dtype))


QKV0 = pb_key(0, 1, 1)


@pytest.mark.parametrize("requests, code, match", [
    (lambda: pass_msgs(1, QKV0, ciphertext(64)), grpc.StatusCode.FAILED_PRECONDITION, "must be OpenSession"),
    (lambda: [open_msg(), open_msg()], grpc.StatusCode.FAILED_PRECONDITION, "already open"),
    (lambda: [open_msg(model_id="gpt-9")], grpc.StatusCode.NOT_FOUND, "model 'gpt-9' is not served"),
    (lambda: [open_msg(seed=b"x" * 5)], grpc.StatusCode.INVALID_ARGUMENT, "seed must be 32 bytes"),
    (lambda: [open_msg(param_set=7)], grpc.StatusCode.INVALID_ARGUMENT, "unknown parameter set 7"),
    (lambda: [open_msg(), *pass_msgs(1, pb_key(0, 9, 1), ciphertext(64))],
     grpc.StatusCode.INVALID_ARGUMENT, "unknown stage 9"),
    (lambda: [open_msg(), *pass_msgs(1, pb_key(0, 1, 0), ciphertext(64))],
     grpc.StatusCode.INVALID_ARGUMENT, "unknown direction 0"),
    (lambda: [open_msg(), *pass_msgs(1, pb_key(5, 1, 1), ciphertext(64))],
     grpc.StatusCode.NOT_FOUND, "layer 5 does not exist"),
    (lambda: [open_msg(), *pass_msgs(1, QKV0, ciphertext(65))],
     grpc.StatusCode.INVALID_ARGUMENT, "ciphertext has 65 rows, layer 0 QKV forward expects 64"),
    (lambda: [open_msg(), *pass_msgs(1, QKV0, ciphertext(64)[:-3])],
     grpc.StatusCode.INVALID_ARGUMENT, "malformed ciphertext: payload is"),
    (lambda: [open_msg(), *pass_msgs(1, QKV0, ciphertext(64, P.COMPACT))],
     grpc.StatusCode.INVALID_ARGUMENT, "expected 64-bit words"),
    (lambda: [open_msg(), *pass_msgs(1, QKV0, b"\x00" * 40)],
     grpc.StatusCode.INVALID_ARGUMENT, "bad magic"),
    (lambda: [open_msg(), *pass_msgs(1, QKV0, ciphertext(64), chunk=500)[1:]],
     grpc.StatusCode.INVALID_ARGUMENT, "expected chunk 0"),
    (lambda: [open_msg(), *pass_msgs(1, QKV0, b"\x00" * (2 << 20), chunk=1 << 20)],
     grpc.StatusCode.RESOURCE_EXHAUSTED, "payload exceeds"),
    (lambda: [open_msg(), *[pass_msgs(r, QKV0, ciphertext(64), chunk=500)[0] for r in range(5)]],
     grpc.StatusCode.RESOURCE_EXHAUSTED, "more than 4 requests in flight"),
    (lambda: [open_msg(), fhe_pb2.EvaluateRequest()],
     grpc.StatusCode.INVALID_ARGUMENT, "empty EvaluateRequest"),
])
async def test_bad_input_gets_a_precise_status_and_node_keeps_serving(stub, requests, code, match) -> None:
    await expect_error(stub, requests(), code, match)
    # Another session on the same server is unaffected.
    header, _ = await fetch_hint(stub, QKV0)
    assert header.rows == 128


async def test_oversized_message_is_refused_and_session_survives(weights) -> None:
    servicer = FheServicer(Node(weights))
    running = await start_server(ServerConfig(insecure=True, max_message_bytes=64 * 1024),
                                 lambda s: fhe_pb2_grpc.add_FheServiceServicer_to_server(servicer, s),
                                 [SERVICE])
    try:
        big = ChannelConfig(insecure=True, max_message_bytes=1 << 22)
        async with make_channel(running.address, big) as ch:
            stub = fhe_pb2_grpc.FheServiceStub(ch)
            await expect_error(stub, [open_msg(), *pass_msgs(1, QKV0, b"\x00" * 200_000, chunk=200_000)],
                               grpc.StatusCode.RESOURCE_EXHAUSTED, "")
            async for resp in stub.Evaluate(iter([open_msg()])):
                assert resp.opened.model.model_id == "tiny"
        assert servicer.node.sessions == {}  # closed streams leave no session behind
    finally:
        await running.stop(0)


async def test_hint_errors(stub) -> None:
    for req, code in [
        (fhe_pb2.GetHintRequest(seed=SEED, param_set=EXACT, model_id="nope"), grpc.StatusCode.NOT_FOUND),
        (fhe_pb2.GetHintRequest(seed=b"", param_set=EXACT, model_id="tiny"),
         grpc.StatusCode.INVALID_ARGUMENT),
        (fhe_pb2.GetHintRequest(seed=SEED, param_set=EXACT, model_id="tiny", keys=[pb_key(3, 1, 1)]),
         grpc.StatusCode.NOT_FOUND),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            async for _ in stub.GetHint(req):
                pass
        assert exc.value.code() == code


async def test_concurrent_sessions_are_independent(stub) -> None:
    async def one(seed: bytes) -> str:
        async for resp in stub.Evaluate(iter([open_msg(seed=seed)])):
            return resp.opened.session_id
        raise AssertionError("no answer")

    ids = await asyncio.gather(*(one(bytes([i]) * 32) for i in range(5)))
    assert len(set(ids)) == 5


async def test_node_serves_workers_only_and_limits_each_client(weights: PublicWeights, tls_dir) -> None:
    servicer = FheServicer(Node(weights, Limits(max_sessions_per_client=2, max_hint_streams_per_client=1)),
                           insecure=False)
    running = await start_server(ServerConfig(tls_dir=tls_dir),
                                 lambda s: fhe_pb2_grpc.add_FheServiceServicer_to_server(servicer, s), [SERVICE])
    target = f"localhost:{running.port}"
    hint_req = fhe_pb2.GetHintRequest(seed=SEED, param_set=EXACT, model_id="tiny")
    try:
        async with make_channel(target, ChannelConfig(tls_dir=tls_dir, identity="operator")) as ch:
            op = fhe_pb2_grpc.FheServiceStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await op.GetHint(hint_req).read()
            assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED and "only workers" in exc.value.details()
        async with make_channel(target, ChannelConfig(tls_dir=tls_dir, identity="hospital-1")) as ch:
            st = fhe_pb2_grpc.FheServiceStub(ch)
            calls = []
            for _ in range(3):  # opened one after the other: the third is over the limit
                calls.append(st.Evaluate())
                await calls[-1].write(open_msg())
                if len(calls) < 3:
                    assert (await calls[-1].read()).WhichOneof("kind") == "opened"
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await calls[2].read()
            assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit 2" in exc.value.details()
            # a hint stream in progress takes the client's only hint slot
            first = st.GetHint(hint_req)
            await first.read()
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await st.GetHint(hint_req).read()
            assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            first.cancel()
            for c in calls[:2]:
                await c.done_writing()
            await asyncio.sleep(0.2)
            assert not servicer.node._slots["sessions"] and servicer.node.sessions == {}  # slots come back
        async with make_channel(target, ChannelConfig(tls_dir=tls_dir, identity="hospital-2")) as ch:
            header, _ = await fetch_hint(fhe_pb2_grpc.FheServiceStub(ch), pb_key(0, 1, 1))
            assert header.rows > 0  # another worker is unaffected
    finally:
        await running.stop(0)
