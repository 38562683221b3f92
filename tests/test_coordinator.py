"""CoordinatorService over real in-process servers: identity, the round policy, patches and every refusal."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from fedkit import FAST, Operator, RpcWorker, start_coordinator

from common.chunks import chunk_messages
from common.config import ChannelConfig, ServerConfig
from common.dp_recipe import LEARNING_RATE
from common.messages import config_to_proto, contributions, layout_from_proto, layout_to_proto
from common.rpc import make_channel
from common.updates import ConsortiumKey, decrypt_aggregate, encrypt_update
from coordinator.patchbuf import PatchBuffer, PatchStore
from coordinator.state import Settings
from fedfhe.v1 import common_pb2, coordinator_pb2_grpc
from fedfhe.v1 import coordinator_pb2 as pb

KEY = ConsortiumKey.generate()


def tensors(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"a": rng.normal(0, 0.1, (8, 4)).astype(np.float32), "b": rng.normal(0, 0.1, (3,)).astype(np.float32)}


class FakeWorker(RpcWorker):
    """An RPC-level worker that submits encrypted updates of small random tensors."""

    def __init__(self, address: str, name: str, key: ConsortiumKey = KEY) -> None:
        super().__init__(address, name, key)

    def update(self, round_: int, n: int = 5, *, seed: int = 0, digest: bytes | None = None,
               data: dict | None = None) -> tuple[pb.UpdateHeader, bytes]:
        enc = encrypt_update(self.key, self.federation, round_, self.name, data or tensors(seed), n)
        header = pb.UpdateHeader(round=round_, num_samples=n, epsilon_spent=1.5,
                                 tensors=layout_to_proto(enc.layout), size_bytes=len(enc.payload),
                                 digest=digest or enc.digest, worker_id=self.name,
                                 key_check_value=self.key.check_value(), nonce=enc.nonce)
        return header, enc.payload

    def requests(self, round_: int, **kw) -> list[pb.SubmitUpdateRequest]:  # type: ignore[no-untyped-def]
        """The upload as messages, in 100-byte chunks, for tests that break the stream."""
        header, payload = self.update(round_, **kw)
        return [pb.SubmitUpdateRequest(header=header),
                *(pb.SubmitUpdateRequest(chunk=c) for c in chunk_messages(payload, 100))]

    async def submit(self, round_: int, **kw) -> pb.SubmitUpdateResponse:  # type: ignore[no-untyped-def]
        return await self.client.submit_update(*self.update(round_, **kw))


async def code_of(coro) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await coro
    return exc.value.code()


@pytest.fixture
async def federation():
    running, fed = await start_coordinator(Settings(min_workers=2, deadline_seconds=30, keep_rounds=2, secagg=False))
    op = Operator(running.address)
    workers: list[FakeWorker] = []

    async def add(name: str) -> FakeWorker:
        w = FakeWorker(running.address, name)
        await w.join()
        workers.append(w)
        return w
    try:
        yield running, fed, op, add
    finally:
        for w in workers:
            await w.leave()
        await op.close()
        await running.stop(0)
        fed.close()


async def test_round_policy_duplicates_late_and_ineligible_submissions(federation) -> None:
    _running, _fed, op, add = federation
    a, b, c = await add("a"), await add("b"), await add("c")
    await op.wait_connected(["a", "b", "c"])
    started = await op.stub.StartRound(pb.StartRoundRequest(config=config_to_proto(FAST)))
    assert started.round == 1 and list(started.eligible) == ["a", "b", "c"]
    assert (await a.next_event("started")).started.round == 1
    late_joiner = await add("d")  # connected after the start: joins the next round
    assert await code_of(late_joiner.submit(1)) == grpc.StatusCode.FAILED_PRECONDITION
    assert (await a.submit(1, n=3, seed=1)).accepted
    assert await code_of(a.submit(1, seed=1)) == grpc.StatusCode.FAILED_PRECONDITION  # duplicate
    # a bad digest is refused and leaves the slot free for a correct resubmission
    assert await code_of(b.submit(1, digest=b"\0" * 32)) == grpc.StatusCode.INVALID_ARGUMENT
    assert await code_of(b.submit(1, data={"other": np.zeros(2)})) == grpc.StatusCode.INVALID_ARGUMENT  # layout
    assert (await b.submit(1, n=7, seed=2)).accepted
    await c.stub.DeclineRound(pb.DeclineRoundRequest(round=1, reason="DP budget: spent", worker_id="c"))
    closed = (await a.next_event("closed")).closed
    assert closed.outcome == pb.ROUND_OUTCOME_AGGREGATED and closed.total_samples == 10
    assert await code_of(c.submit(1)) == grpc.StatusCode.FAILED_PRECONDITION  # late
    # the aggregate is what FedAvg says
    patch = [m async for m in a.stub.GetPatch(pb.GetPatchRequest(round=1))]
    h = patch[0].header
    payload = b"".join(m.chunk.data for m in patch[1:])
    assert hashlib.sha256(payload).digest() == h.digest
    mean = decrypt_aggregate(KEY, h.federation_id, 1, contributions(h.participants), h.total_samples,
                             layout_from_proto(h.tensors), payload, h.key_check_value)
    for k in ("a", "b"):
        want = (3 * tensors(1)[k].astype(np.float64) + 7 * tensors(2)[k]) / 10
        np.testing.assert_allclose(mean[k], want, rtol=1e-6, atol=1e-9)
    status = await op.status()
    workers = {w.worker_id: w for w in status.workers}
    assert workers["c"].declined.startswith("round 1: DP budget") and workers["a"].epsilon == 1.5
    assert status.rounds[0].state == "aggregated" and status.rounds[0].bytes_received == 2 * len(payload)
    # round 2: d is eligible now
    started = await op.stub.StartRound(pb.StartRoundRequest(config=config_to_proto(FAST)))
    assert "d" in started.eligible


async def test_a_vanished_worker_does_not_block_the_round(federation) -> None:
    _, fed, op, add = federation
    a, b, c = await add("a"), await add("b"), await add("c")
    await op.wait_connected(["a", "b", "c"])
    await op.stub.StartRound(pb.StartRoundRequest(config=config_to_proto(FAST)))
    await a.submit(1, seed=1)
    await b.submit(1, seed=2)
    assert fed.rounds[1].state == "open"  # still waiting for c
    await c.leave()  # c dies mid-round
    closed = (await a.next_event("closed")).closed
    assert closed.outcome == pb.ROUND_OUTCOME_AGGREGATED and {p.worker_id for p in closed.participants} == {"a", "b"}
    c2 = await add("c")  # back: re-registers and takes part in the next round
    await op.wait_connected(["c"])
    started = await op.stub.StartRound(pb.StartRoundRequest(config=config_to_proto(FAST)))
    assert "c" in started.eligible
    assert (await c2.next_event("started")).started.base_round == 1
    assert (await c2.submit(2)).accepted


async def test_deadline_closes_the_round_and_too_few_updates_fail_it(federation) -> None:
    _, fed, op, add = federation
    a, b = await add("a"), await add("b")
    await op.wait_connected(["a", "b"])
    await op.stub.StartRound(pb.StartRoundRequest(config=config_to_proto(FAST), deadline_seconds=0.3))
    await a.submit(1)
    closed = (await a.next_event("closed")).closed
    assert closed.outcome == pb.ROUND_OUTCOME_FAILED and "at least 2" in closed.reason
    assert await code_of(b.submit(1)) == grpc.StatusCode.FAILED_PRECONDITION
    assert await code_of(a.stub.GetPatch(pb.GetPatchRequest(round=1)).read()) == grpc.StatusCode.NOT_FOUND
    assert fed.store.total_bytes == 0
    # with both in time, the deadline closes an aggregated round without waiting for more
    await op.stub.StartRound(pb.StartRoundRequest(config=config_to_proto(FAST), deadline_seconds=0.5))
    await a.submit(2)
    await b.submit(2)
    assert (await a.next_event("closed")).closed.outcome == pb.ROUND_OUTCOME_AGGREGATED


async def test_only_the_last_rounds_are_kept_and_evicted_buffers_are_closed(federation) -> None:
    _, fed, op, add = federation
    a, b = await add("a"), await add("b")
    await op.wait_connected(["a", "b"])
    stored = []
    for r in (1, 2, 3):
        await op.stub.StartRound(pb.StartRoundRequest(config=config_to_proto(FAST)))
        await a.submit(r)
        await b.submit(r)
        await a.next_event("closed")
        stored.append(fed.store.get(r))
    assert fed.store.rounds() == [2, 3] and fed.rounds[1].state == "evicted"
    assert stored[0] is not None and stored[0].closed and not stored[2].closed
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await a.stub.GetPatch(pb.GetPatchRequest(round=1)).read()
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND and "evicted" in exc.value.details()
    latest = await a.stub.GetPatch(pb.GetPatchRequest(round=0)).read()
    assert latest.header.round == 3


async def test_refusals_name_the_problem(federation) -> None:
    _, _fed, op, add = federation
    a = await add("a")
    st = op.stub
    # too few workers connected, then an invalid config, then a round already open
    assert await code_of(st.StartRound(pb.StartRoundRequest(config=config_to_proto(FAST)))) == \
        grpc.StatusCode.FAILED_PRECONDITION
    await add("b")
    await op.wait_connected(["a", "b"])
    bad = config_to_proto(FAST)
    bad.lora_targets.append("nope")
    assert await code_of(st.StartRound(pb.StartRoundRequest(config=bad))) == grpc.StatusCode.INVALID_ARGUMENT
    await st.StartRound(pb.StartRoundRequest(config=config_to_proto(FAST)))
    assert await code_of(st.StartRound(pb.StartRoundRequest(config=config_to_proto(FAST)))) == \
        grpc.StatusCode.FAILED_PRECONDITION
    # a wrong consortium key is refused at registration
    wrong_reg = pb.RegisterRequest(worker_name="x", key_check_value=ConsortiumKey.generate().check_value())
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await a.stub.Register(wrong_reg)
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "wrong consortium key" in exc.value.details()
    assert await code_of(a.stub.Register(pb.RegisterRequest(worker_name="y"))) == grpc.StatusCode.INVALID_ARGUMENT
    # malformed submissions: no header first, oversize, bad nonce
    async def chunk_first() -> AsyncIterator[pb.SubmitUpdateRequest]:
        yield pb.SubmitUpdateRequest(chunk=common_pb2.Chunk(index=0, count=1, data=b"x"))
    assert await code_of(a.stub.SubmitUpdate(chunk_first())) == grpc.StatusCode.INVALID_ARGUMENT
    reqs = a.requests(1)
    reqs[0].header.nonce = b"short"
    assert await code_of(a.stub.SubmitUpdate(iter(reqs))) == grpc.StatusCode.INVALID_ARGUMENT
    reqs = a.requests(1)
    reqs.append(pb.SubmitUpdateRequest(chunk=common_pb2.Chunk(index=len(reqs) - 1, count=len(reqs), data=b"x")))
    code = await code_of(a.stub.SubmitUpdate(iter(reqs)))
    assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
    reqs = a.requests(1)
    reqs[0].header.size_bytes = 1 << 40
    assert await code_of(a.stub.SubmitUpdate(iter(reqs))) == grpc.StatusCode.RESOURCE_EXHAUSTED
    # none of it disturbed the round: a proper update is still accepted
    assert (await a.submit(1)).accepted
    unknown = pb.WatchRoundsRequest(worker_id="never-registered")
    assert await code_of(a.stub.WatchRounds(unknown).read()) == grpc.StatusCode.FAILED_PRECONDITION
    assert await code_of(a.stub.GetPatch(pb.GetPatchRequest(round=99)).read()) == grpc.StatusCode.NOT_FOUND


async def test_roles_come_from_certificates(tls_dir: Path) -> None:
    running, fed = await start_coordinator(Settings(min_workers=1, enrolled=frozenset({"hospital-2"}), secagg=False),
                                           tls_dir=tls_dir)
    target = f"localhost:{running.port}"
    try:
        async with make_channel(target, ChannelConfig(tls_dir=tls_dir, identity="hospital-2")) as ch:
            stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
            resp = await stub.Register(pb.RegisterRequest(worker_name="claims-to-be-hospital-1", num_records=7,
                                                          key_check_value=KEY.check_value()))
            assert resp.worker_id == "hospital-2" and resp.federation_id == "fed-test"
            status = await stub.GetStatus(pb.GetStatusRequest())
            assert [w.worker_id for w in status.workers] == ["hospital-2"]
            # a worker certificate cannot run rounds
            code = await code_of(stub.StartRound(pb.StartRoundRequest(config=config_to_proto(FAST))))
            assert code == grpc.StatusCode.PERMISSION_DENIED
        async with make_channel(target, ChannelConfig(tls_dir=tls_dir, identity="hospital-1")) as ch:
            stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)  # a valid worker certificate, not enrolled
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await stub.Register(pb.RegisterRequest(key_check_value=KEY.check_value()))
            assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED and "not enrolled" in exc.value.details()
        async with make_channel(target, ChannelConfig(tls_dir=tls_dir, identity="operator")) as ch:
            stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
            code = await code_of(stub.Register(pb.RegisterRequest(key_check_value=KEY.check_value())))
            assert code == grpc.StatusCode.PERMISSION_DENIED
            code = await code_of(stub.StartRound(pb.StartRoundRequest(config=config_to_proto(FAST))))
            assert code == grpc.StatusCode.FAILED_PRECONDITION  # allowed, but nobody is connected
        assert list(fed.workers) == ["hospital-2"]
    finally:
        await running.stop(0)
        fed.close()


def test_patch_buffers_zero_on_close_and_evict_in_order() -> None:
    seen: list[bytes] = []
    buf = PatchBuffer(64)
    buf.add(np.arange(8, dtype=np.uint64).tobytes())
    assert buf.read(8, 16) == (1).to_bytes(8, "little")

    import ctypes

    real = buf._mm

    class Spy:
        def close(self) -> None:
            seen.append(ctypes.string_at(buf.address, buf.size))
            real.close()
    buf._mm = Spy()  # type: ignore[assignment]
    buf.close()
    assert seen == [bytes(64)] and buf.closed
    with pytest.raises(Exception, match="evicted"):
        buf.read()
    store = PatchStore(keep=2)
    bufs = [PatchBuffer(8) for _ in range(3)]
    assert store.put(1, bufs[0]) == [] and store.put(2, bufs[1]) == [] and store.put(3, bufs[2]) == [1]
    assert bufs[0].closed and not bufs[2].closed and store.total_bytes == 16
    store.close()
    assert all(b.closed for b in bufs)


def test_insecure_coordinator_refuses_non_loopback() -> None:
    from common.config import ConfigError

    with pytest.raises(ConfigError, match="non-loopback"):
        ServerConfig(insecure=True, listen="0.0.0.0:0").validate()


async def run_script(*args: str) -> tuple[int, str]:
    import sys

    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(Path(__file__).resolve().parents[1] / "scripts" / "rounds.py"), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env={"COLUMNS": "200", "PATH": ""})
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_rounds_script_starts_watches_and_finishes(federation) -> None:
    running, fed, op, add = federation
    a, b = await add("a"), await add("b")
    await op.wait_connected(["a", "b"])
    base = ["--insecure", "--coordinator", running.address]
    code, out = await run_script(*base, "start", "--local-steps", "2", "--lora-targets", "q,v")
    assert code == 0 and "round 1 started for a, b" in out, out
    # --dp-recipe auto (the default) for 10 notes at ε = 8: all of them per step; the explicit steps win
    assert "DP recipe auto for N=10 notes, ε=8, 1 round(s): expected batch 10 (q=1)" in out, out
    assert "explicit local_steps kept" in out, out
    config = (await a.next_event("started")).started.config
    assert (config.local_steps, config.batch_size, config.learning_rate) == (2, 10, pytest.approx(LEARNING_RATE))
    await a.submit(1)
    await b.submit(1)
    await a.next_event("closed")
    code, out = await run_script(*base, "status")
    assert code == 0 and "aggregated" in out and "fed-test" in out, out
    code, out = await run_script(*base, "start", "--batch-size", "0")
    assert code != 0 and "batch_size" in out  # refused before anything is sent
    code, out = await run_script(*base, "finish")
    assert code == 0 and "finished after round 1" in out, out
    assert (await a.next_event("finished")).finished.last_round == 1
    assert fed.finished


async def test_rounds_run_shows_epsilon_and_the_held_out_loss(federation) -> None:
    """`rounds.py run`: ε per hospital survives rich's markup (it once ate the [..] list), then the eval loss."""
    running, _fed, op, add = federation
    a, b = await add("a"), await add("b")
    await op.wait_connected(["a", "b"])
    run = asyncio.create_task(run_script("--insecure", "--coordinator", running.address, "run", "--rounds", "1",
                                         "--eval-wait", "60"))
    for w in (a, b):
        await w.next_event("started")
        await w.submit(1)
    await a.next_event("closed")
    await a.client.report_evaluation(1, "a", 4.25, 10)
    await b.client.report_evaluation(1, "b", 4.75, 30)
    code, out = await run
    assert code == 0 and "samples from [a ε 1.50, b ε 1.50]" in out, out
    assert "6 local step(s) per round" in out, out  # the recipe's six steps, all in the one planned round
    assert "held-out loss 4.625 (2 hospital(s))" in out, out


async def test_a_refused_second_upload_keeps_the_first_and_an_abandoned_one_lets_the_round_close(federation) -> None:
    _, fed, op, add = federation
    a, b = await add("a"), await add("b")
    await op.wait_connected(["a", "b"])
    await op.stub.StartRound(pb.StartRoundRequest(config=config_to_proto(FAST), deadline_seconds=60))
    reqs = a.requests(1)
    release = asyncio.Event()

    async def slow() -> AsyncIterator[pb.SubmitUpdateRequest]:
        yield reqs[0]
        yield reqs[1]
        await release.wait()  # the first upload is still streaming...
        for r in reqs[2:]:
            yield r
    first = asyncio.ensure_future(a.stub.SubmitUpdate(slow()))
    for _ in range(100):
        if "a" in fed.rounds[1].receiving:
            break
        await asyncio.sleep(0.02)
    # ... when a retry arrives: refused, and it must not free the live upload's slot
    assert await code_of(a.submit(1)) == grpc.StatusCode.FAILED_PRECONDITION
    assert "a" in fed.rounds[1].receiving
    release.set()
    assert (await first).accepted
    # b starts uploading, then dies: its watch ends and its upload is cancelled; the round closes at once
    breqs = b.requests(1)
    hold = asyncio.Event()

    async def stalled() -> AsyncIterator[pb.SubmitUpdateRequest]:
        yield breqs[0]
        await hold.wait()
        yield breqs[1]
    upload = b.stub.SubmitUpdate(stalled())
    task = asyncio.ensure_future(upload)
    for _ in range(100):
        if "b" in fed.rounds[1].receiving:
            break
        await asyncio.sleep(0.02)
    assert fed.rounds[1].state == "open"
    b.watch.cancel()
    await asyncio.sleep(0.1)
    assert fed.rounds[1].state == "open"  # still receiving b's upload
    upload.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(100):
        if fed.rounds[1].state != "open":
            break
        await asyncio.sleep(0.02)
    assert fed.rounds[1].state == "failed" and fed.rounds[1].seconds < 30  # 1 update < min 2, long before 60 s


def test_an_unlockable_buffer_warns_or_is_refused_with_require_mlock(monkeypatch) -> None:
    import ctypes

    from coordinator import patchbuf

    real = patchbuf._libc

    class NoLock:  # a process over its RLIMIT_MEMLOCK: mlock fails with ENOMEM
        def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
            return getattr(real, name)

        @staticmethod
        def mlock(address: int, size: int) -> int:
            ctypes.set_errno(12)
            return -1

    monkeypatch.setattr(patchbuf, "_libc", NoLock())
    buf = PatchBuffer(64)  # kept, with a warning: not locked
    assert not buf.locked and not buf.closed
    buf.close()
    with pytest.raises(patchbuf.MlockRefused, match="require-mlock"):
        PatchBuffer(64, require_mlock=True)
