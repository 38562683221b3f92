"""CoordinatorService servicer: identity and message conversion over coordinator.state, nothing else."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import structlog

from common.chunks import Assembler
from common.errors import FedfheError, InvalidArgument, PermissionDenied
from common.messages import config_from_proto, layout_to_proto
from common.rpc import abort_with
from common.tls import peer_identity
from common.updates import TensorLayout
from coordinator.patchbuf import PatchBuffer
from coordinator.state import (
    Event,
    Federation,
    FinishedEvent,
    ParticipantInfo,
    RoundClosedEvent,
    RoundStartedEvent,
    UpdateClaim,
    check_worker_name,
)
from fedfhe.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc

log = structlog.get_logger("fedfhe.coordinator")
T = TypeVar("T")
CHUNK_BYTES = 1 << 20


def participant_to_proto(p: ParticipantInfo) -> coordinator_pb2.Participant:
    return coordinator_pb2.Participant(worker_id=p.worker_id, num_samples=p.num_samples, epsilon=p.epsilon,
                                       no_dp=p.no_dp, nonce=p.nonce)


def event_to_proto(ev: Event) -> coordinator_pb2.WatchRoundsResponse:
    if isinstance(ev, RoundStartedEvent):
        return coordinator_pb2.WatchRoundsResponse(started=coordinator_pb2.RoundStarted(
            round=ev.round, config=ev.config, deadline_unix_ms=ev.deadline_unix_ms, base_round=ev.base_round))
    if isinstance(ev, RoundClosedEvent):
        outcome = (coordinator_pb2.ROUND_OUTCOME_AGGREGATED if ev.aggregated
                   else coordinator_pb2.ROUND_OUTCOME_FAILED)
        return coordinator_pb2.WatchRoundsResponse(closed=coordinator_pb2.RoundClosed(
            round=ev.round, participants=[participant_to_proto(p) for p in ev.participants],
            total_samples=ev.total_samples, outcome=outcome, reason=ev.reason))
    assert isinstance(ev, FinishedEvent)
    return coordinator_pb2.WatchRoundsResponse(finished=coordinator_pb2.FederationFinished(last_round=ev.last_round))


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServiceServicer):
    def __init__(self, federation: Federation, *, insecure: bool) -> None:
        self.federation = federation
        self.insecure = insecure

    def _caller(self, context: grpc.aio.ServicerContext, claimed: str, *roles: str) -> tuple[str, str]:
        """(name, role) of the caller: from its verified certificate, or (--insecure) from the request."""
        if self.insecure:  # loopback-only mode: a named caller is a worker, an anonymous one the operator
            return (check_worker_name(claimed), "worker") if claimed else ("operator", "operator")
        who = peer_identity(context)  # Unauthenticated without a verified client certificate
        if who.role not in roles:
            raise PermissionDenied(f"certificate {who.name!r} has role {who.role!r}; this call needs "
                                   f"{' or '.join(roles)}")
        return who.name, who.role

    async def _unary(self, context: grpc.aio.ServicerContext, call: Callable[[], Awaitable[T] | T]) -> T:
        try:
            result = call()
            return await result if asyncio.iscoroutine(result) else result  # type: ignore[return-value]
        except FedfheError as exc:
            await abort_with(context, exc)
            raise AssertionError("unreachable") from exc

    async def Register(self, request: coordinator_pb2.RegisterRequest,
                       context: grpc.aio.ServicerContext) -> coordinator_pb2.RegisterResponse:
        def call() -> coordinator_pb2.RegisterResponse:
            name, role = self._caller(context, request.worker_name, "worker")
            fed = self.federation
            worker = fed.register(name, role, request.num_records, request.key_check_value, request.no_dp)
            return coordinator_pb2.RegisterResponse(
                worker_id=worker.worker_id, federation_id=fed.federation_id,
                key_check_value=fed.key_check_value, latest_patch_round=fed.latest_patch_round)
        return await self._unary(context, call)

    async def WatchRounds(self, request: coordinator_pb2.WatchRoundsRequest,
                          context: grpc.aio.ServicerContext) -> AsyncIterator[coordinator_pb2.WatchRoundsResponse]:
        fed = self.federation
        try:
            name, role = self._caller(context, request.worker_id, "worker", "operator")
            queue = fed.observe() if role == "operator" else fed.connect(name)
        except FedfheError as exc:
            await abort_with(context, exc)
            return
        try:
            while True:
                event = await queue.get()
                yield event_to_proto(event)
                if isinstance(event, FinishedEvent):
                    return
        finally:  # the stream ended: cancelled, broken or finished
            if role == "operator":
                fed.unobserve(queue)
            else:
                fed.disconnect(name, queue)

    async def GetPatch(self, request: coordinator_pb2.GetPatchRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[coordinator_pb2.GetPatchResponse]:
        fed = self.federation
        try:
            self._caller(context, "", "worker", "operator")
            patch = fed.patch(request.round)
        except FedfheError as exc:
            await abort_with(context, exc)
            return
        size = patch.layout.size_bytes
        yield coordinator_pb2.GetPatchResponse(header=coordinator_pb2.PatchHeader(
            round=patch.round, participants=[participant_to_proto(p) for p in patch.participants],
            total_samples=patch.total_samples, tensors=layout_to_proto(patch.layout), size_bytes=size,
            federation_id=fed.federation_id, key_check_value=patch.key_check_value, digest=patch.digest,
            restored=patch.restored, config=patch.config))
        count = max(1, -(-size // CHUNK_BYTES))
        for i in range(count):  # read chunk by chunk: no whole copy of the aggregate on the heap
            try:
                piece = patch.buffer.read(i * CHUNK_BYTES, (i + 1) * CHUNK_BYTES)
            except FedfheError as exc:  # evicted while streaming
                await abort_with(context, exc)
                return
            yield coordinator_pb2.GetPatchResponse(chunk=common_pb2.Chunk(index=i, count=count, data=piece))

    async def _receive(self, request_iterator: AsyncIterator, header_kind: str) -> tuple[object, AsyncIterator]:
        iterator = request_iterator.__aiter__()
        try:
            first = await iterator.__anext__()
        except StopAsyncIteration:
            raise InvalidArgument("empty stream: send a header first") from None
        if first.WhichOneof("kind") != "header":
            raise InvalidArgument(f"the first message must be a {header_kind}")
        return first.header, iterator

    @staticmethod
    async def _payload(iterator: AsyncIterator, layout: TensorLayout, digest: bytes, scratch: PatchBuffer) -> None:
        """Write the chunks straight into a locked, undumpable scratch buffer and check their digest."""
        h = hashlib.sha256()

        def sink(offset: int, data: bytes) -> None:
            scratch.write(offset, data)
            h.update(data)
        asm = Assembler(layout.size_bytes, sink)
        async for msg in iterator:
            if msg.WhichOneof("kind") != "chunk":
                raise InvalidArgument("only chunks may follow the header")
            asm.add(msg.chunk.index, msg.chunk.count, msg.chunk.data)
        if not asm.complete or asm.size != layout.size_bytes:
            raise InvalidArgument(f"payload is {asm.size} bytes, the header says {layout.size_bytes}")
        if h.digest() != digest:
            raise InvalidArgument("payload digest does not match the header's SHA-256")

    @staticmethod
    def _claim(h: coordinator_pb2.UpdateHeader | coordinator_pb2.RestoreHeader, num_samples: int, epsilon: float,
               no_dp: bool) -> UpdateClaim:
        return UpdateClaim(round=h.round, num_samples=num_samples, epsilon=epsilon, no_dp=no_dp,
                           specs=[(s.name, tuple(s.shape)) for s in h.tensors], size_bytes=h.size_bytes,
                           key_check_value=h.key_check_value, nonce=h.nonce)

    async def _upload(self, request_iterator: AsyncIterator, context: grpc.aio.ServicerContext, header_kind: str,
                      begin: Callable[[str, Any], tuple[UpdateClaim, TensorLayout]],
                      finish: Callable[[str, UpdateClaim, TensorLayout, PatchBuffer, Any], None],
                      abandon: Callable[[str, UpdateClaim], None]) -> UpdateClaim:
        """One encrypted upload (an update or a restore): header, checks, chunks into a locked scratch buffer.

        begin(name, header) reserves the worker's slot; only an upload that got it frees it, so a refused
        duplicate cannot release the one still streaming. The scratch buffer is zeroed whatever happens:
        a single contribution never outlives its addition.
        """
        fed = self.federation
        name, claim, reserved, scratch = "", None, False, None
        try:
            h, iterator = await self._receive(request_iterator, header_kind)
            name, _ = self._caller(context, h.worker_id, "worker")
            claim, layout = begin(name, h)
            reserved = True
            scratch = PatchBuffer(layout.size_bytes, require_mlock=fed.settings.require_mlock)
            await self._payload(iterator, layout, h.digest, scratch)
            reserved = False
            finish(name, claim, layout, scratch, h)
            return claim
        except FedfheError as exc:
            await abort_with(context, exc)
            raise AssertionError("unreachable") from exc
        finally:
            if scratch is not None:
                scratch.close()
            if reserved and claim is not None:
                abandon(name, claim)

    async def SubmitUpdate(self, request_iterator: AsyncIterator[coordinator_pb2.SubmitUpdateRequest],
                           context: grpc.aio.ServicerContext) -> coordinator_pb2.SubmitUpdateResponse:
        fed = self.federation

        def begin(name: str, h: coordinator_pb2.UpdateHeader) -> tuple[UpdateClaim, TensorLayout]:
            claim = self._claim(h, h.num_samples, h.epsilon_spent, h.no_dp)
            return claim, fed.begin_update(name, claim)

        claim = await self._upload(
            request_iterator, context, "UpdateHeader", begin,
            lambda name, claim, layout, scratch, _: fed.finish_update(name, claim, layout, scratch),
            lambda name, claim: fed.abandon_update(name, claim.round))
        return coordinator_pb2.SubmitUpdateResponse(round=claim.round, accepted=True)

    async def DeclineRound(self, request: coordinator_pb2.DeclineRoundRequest,
                           context: grpc.aio.ServicerContext) -> coordinator_pb2.DeclineRoundResponse:
        def call() -> coordinator_pb2.DeclineRoundResponse:
            name, _ = self._caller(context, request.worker_id, "worker")
            self.federation.decline(name, request.round, request.reason)
            return coordinator_pb2.DeclineRoundResponse(round=request.round)
        return await self._unary(context, call)

    async def StartRound(self, request: coordinator_pb2.StartRoundRequest,
                         context: grpc.aio.ServicerContext) -> coordinator_pb2.StartRoundResponse:
        def call() -> coordinator_pb2.StartRoundResponse:
            self._caller(context, "", "operator")
            config_from_proto(request.config)  # refuse a config no worker could train with
            rnd = self.federation.start_round(request.config, request.deadline_seconds)
            return coordinator_pb2.StartRoundResponse(round=rnd.number, deadline_unix_ms=rnd.deadline_unix_ms,
                                                      eligible=list(rnd.eligible))
        return await self._unary(context, call)

    async def FinishFederation(self, request: coordinator_pb2.FinishFederationRequest,
                               context: grpc.aio.ServicerContext) -> coordinator_pb2.FinishFederationResponse:
        def call() -> coordinator_pb2.FinishFederationResponse:
            self._caller(context, "", "operator")
            return coordinator_pb2.FinishFederationResponse(last_round=self.federation.finish())
        return await self._unary(context, call)

    async def RestorePatch(self, request_iterator: AsyncIterator[coordinator_pb2.RestorePatchRequest],
                           context: grpc.aio.ServicerContext) -> coordinator_pb2.RestorePatchResponse:
        fed = self.federation

        def begin(name: str, h: coordinator_pb2.RestoreHeader) -> tuple[UpdateClaim, TensorLayout]:
            config_from_proto(h.config)  # a restored adapter must say how to rebuild it
            claim = self._claim(h, 1, 0.0, False)
            return claim, fed.begin_restore(name, claim)

        claim = await self._upload(
            request_iterator, context, "RestoreHeader", begin,
            lambda name, claim, layout, scratch, h: fed.finish_restore(name, claim, layout, scratch, h.config),
            lambda name, _: fed.abandon_restore(name))
        return coordinator_pb2.RestorePatchResponse(round=claim.round, accepted=True)

    async def GetStatus(self, request: coordinator_pb2.GetStatusRequest,
                        context: grpc.aio.ServicerContext) -> coordinator_pb2.GetStatusResponse:
        def call() -> coordinator_pb2.GetStatusResponse:
            self._caller(context, "", "worker", "operator")
            fed = self.federation
            return coordinator_pb2.GetStatusResponse(
                federation_id=fed.federation_id, current_round=fed.current_round,
                workers=[coordinator_pb2.WorkerStatus(
                    worker_id=w.worker_id, connected=w.connected, last_round=w.last_round, epsilon=w.epsilon,
                    num_records=w.num_records, no_dp=w.no_dp, declined=w.declined)
                    for w in fed.workers.values()],
                rounds=[coordinator_pb2.RoundStatus(
                    round=r.number, state=r.state, participants=[participant_to_proto(p)
                                                                 for p in r.submissions.values()],
                    buffer_bytes=r.buffer.size if r.buffer is not None and not r.buffer.closed else 0,
                    eligible=list(r.eligible), reason=r.reason, seconds=r.seconds,
                    bytes_received=r.bytes_received) for r in sorted(fed.rounds.values(), key=lambda r: r.number)],
                buffer_bytes_total=fed.store.total_bytes, min_workers=fed.settings.min_workers,
                keep_rounds=fed.store.keep, buffers_locked=fed.buffers_locked, finished=fed.finished)
        return await self._unary(context, call)
