"""CoordinatorService servicer: identity and message conversion over coordinator.state, nothing else.

Domain errors raised here or in the state become status codes in common.rpc.CallInterceptor.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any

import grpc
import structlog

from common.chunks import CHUNK_BYTES, read_split
from common.errors import InvalidArgument, PermissionDenied
from common.messages import (
    config_from_proto,
    config_to_proto,
    layout_to_proto,
    mask_keys_from_proto,
    mask_keys_to_proto,
    revealed_from_proto,
)
from common.secagg import SCHEME
from common.tls import peer_identity
from coordinator.state import (
    Evaluation,
    Event,
    Federation,
    FinishedEvent,
    MaskKeysEvent,
    MaskSharesEvent,
    ParticipantInfo,
    Round,
    RoundClosedEvent,
    RoundStartedEvent,
    SurvivorsConfirmedEvent,
    UnmaskEvent,
    UpdateClaim,
    Upload,
    check_worker_name,
    mean_eval_loss,
)
from fedfhe.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc

log = structlog.get_logger("fedfhe.coordinator")


def participant_to_proto(p: ParticipantInfo) -> coordinator_pb2.Participant:
    return coordinator_pb2.Participant(worker_id=p.worker_id, num_samples=p.num_samples, epsilon=p.epsilon,
                                       no_dp=p.no_dp, nonce=p.nonce, train_loss=p.train_loss)


def evaluations_to_proto(evaluations: dict[str, Evaluation]) -> list[coordinator_pb2.Evaluation]:
    return [coordinator_pb2.Evaluation(worker_id=e.worker_id, eval_loss=e.eval_loss, records=e.records)
            for e in sorted(evaluations.values(), key=lambda e: e.worker_id)]


def event_to_proto(ev: Event) -> coordinator_pb2.WatchRoundsResponse:
    pb = coordinator_pb2
    if isinstance(ev, RoundStartedEvent):
        secagg = pb.SecureAggregation(enabled=True, threshold=ev.secagg_threshold, scheme=SCHEME) if ev.secagg else None
        return pb.WatchRoundsResponse(started=pb.RoundStarted(
            round=ev.round, config=config_to_proto(ev.config), deadline_unix_ms=ev.deadline_unix_ms,
            base_round=ev.base_round, secure_aggregation=secagg))
    if isinstance(ev, MaskKeysEvent):
        return pb.WatchRoundsResponse(mask_keys=pb.MaskKeysReady(
            round=ev.round, threshold=ev.threshold, members=[mask_keys_to_proto(k) for k in ev.members]))
    if isinstance(ev, MaskSharesEvent):
        return pb.WatchRoundsResponse(mask_shares=pb.MaskSharesReady(
            round=ev.round, members=list(ev.members),
            shares=[pb.EncryptedShare(worker_id=s, ciphertext=ct) for s, ct in ev.shares]))
    if isinstance(ev, UnmaskEvent):
        return pb.WatchRoundsResponse(unmask=pb.UnmaskRequested(round=ev.round, survivors=list(ev.survivors)))
    if isinstance(ev, SurvivorsConfirmedEvent):
        return pb.WatchRoundsResponse(survivors_confirmed=pb.SurvivorsConfirmed(
            round=ev.round, survivors=list(ev.survivors),
            signatures=[pb.SurvivorSignature(worker_id=w, signature=sig) for w, sig in ev.signatures]))
    if isinstance(ev, RoundClosedEvent):
        outcome = (coordinator_pb2.ROUND_OUTCOME_AGGREGATED if ev.aggregated
                   else coordinator_pb2.ROUND_OUTCOME_FAILED)
        return coordinator_pb2.WatchRoundsResponse(closed=coordinator_pb2.RoundClosed(
            round=ev.round, participants=[participant_to_proto(p) for p in ev.participants],
            total_samples=ev.total_samples, outcome=outcome, reason=ev.reason))
    assert isinstance(ev, FinishedEvent)
    return coordinator_pb2.WatchRoundsResponse(finished=coordinator_pb2.FederationFinished(last_round=ev.last_round))


def update_claim(h: coordinator_pb2.UpdateHeader) -> UpdateClaim:
    return UpdateClaim(round=h.round, num_samples=h.num_samples, epsilon=h.epsilon_spent, no_dp=h.no_dp,
                       specs=[(s.name, tuple(s.shape)) for s in h.tensors], size_bytes=h.size_bytes,
                       key_check_value=h.key_check_value, nonce=h.nonce, digest=h.digest, masked=h.masked,
                       train_loss=h.train_loss if math.isfinite(h.train_loss) else math.nan)


def nan_to_zero(x: float) -> float:
    return x if math.isfinite(x) else 0.0


def mask_recovery(rnd: Round) -> coordinator_pb2.MaskRecovery | None:
    m = rnd.mask
    if m is None:
        return None
    return coordinator_pb2.MaskRecovery(threshold=m.threshold, phase=m.phase.value, members=m.members,
                                        survivors=m.survivors, dropped=m.dropped, revealed_by=sorted(m.reveals))


def restore_claim(h: coordinator_pb2.RestoreHeader) -> UpdateClaim:
    return UpdateClaim(round=h.round, num_samples=1, epsilon=0.0, no_dp=False,
                       specs=[(s.name, tuple(s.shape)) for s in h.tensors], size_bytes=h.size_bytes,
                       key_check_value=h.key_check_value, nonce=h.nonce, digest=h.digest,
                       config=config_from_proto(h.config))  # a restored adapter must say how to rebuild it


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServiceServicer):
    def __init__(self, federation: Federation, *, insecure: bool, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.federation = federation
        self.insecure = insecure
        self.chunk_bytes = chunk_bytes

    def _caller(self, context: grpc.aio.ServicerContext, claimed: str, *roles: str) -> tuple[str, str]:
        """(name, role) of the caller: from its verified certificate, or (--insecure) from the request."""
        if self.insecure:  # loopback-only mode: a named caller is a worker, an anonymous one the operator
            return (check_worker_name(claimed), "worker") if claimed else ("operator", "operator")
        who = peer_identity(context)  # Unauthenticated without a verified client certificate
        if who.role not in roles:
            raise PermissionDenied(f"certificate {who.name!r} has role {who.role!r}; this call needs "
                                   f"{' or '.join(roles)}")
        return who.name, who.role

    async def Register(self, request: coordinator_pb2.RegisterRequest,
                       context: grpc.aio.ServicerContext) -> coordinator_pb2.RegisterResponse:
        name, role = self._caller(context, request.worker_name, "worker")
        fed = self.federation
        worker = fed.register(name, role, request.num_records, request.key_check_value, request.no_dp,
                              request.pii_scrubbed, request.epsilon_budget)
        return coordinator_pb2.RegisterResponse(
            worker_id=worker.worker_id, federation_id=fed.federation_id,
            key_check_value=fed.key_check_value, latest_patch_round=fed.latest_patch_round)

    async def WatchRounds(self, request: coordinator_pb2.WatchRoundsRequest,
                          context: grpc.aio.ServicerContext) -> AsyncIterator[coordinator_pb2.WatchRoundsResponse]:
        fed = self.federation
        name, role = self._caller(context, request.worker_id, "worker", "operator")
        queue = fed.observe() if role == "operator" else fed.connect(name)
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
        self._caller(context, "", "worker", "operator")
        agg = fed.aggregate(request.round)
        size = agg.layout.size_bytes
        yield coordinator_pb2.GetPatchResponse(header=coordinator_pb2.PatchHeader(
            round=agg.round, participants=[participant_to_proto(p) for p in agg.participants],
            total_samples=agg.total_samples, tensors=layout_to_proto(agg.layout), size_bytes=size,
            federation_id=fed.federation_id, key_check_value=agg.key_check_value, digest=agg.digest,
            restored=agg.restored, config=config_to_proto(agg.config)))
        # Read chunk by chunk: no whole copy of the aggregate on the heap (NotFound if evicted meanwhile).
        for i, n, piece in read_split(size, agg.buffer.read, self.chunk_bytes):
            yield coordinator_pb2.GetPatchResponse(chunk=common_pb2.Chunk(index=i, count=n, data=piece))

    async def _upload(self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext,
                      header_kind: str) -> UpdateClaim:
        """One encrypted upload (SubmitUpdate or RestorePatch): a header, then chunks, into the state's Upload."""
        iterator = request_iterator.__aiter__()
        try:
            first = await iterator.__anext__()
        except StopAsyncIteration:
            raise InvalidArgument("empty stream: send a header first") from None
        if first.WhichOneof("kind") != "header":
            raise InvalidArgument(f"the first message must be a {header_kind}")
        h = first.header
        name, _ = self._caller(context, h.worker_id, "worker")
        fed = self.federation
        upload: Upload = (fed.begin_update(name, update_claim(h)) if header_kind == "UpdateHeader"
                          else fed.begin_restore(name, restore_claim(h)))
        with upload:
            async for msg in iterator:
                if msg.WhichOneof("kind") != "chunk":
                    raise InvalidArgument("only chunks may follow the header")
                upload.add(msg.chunk)
            upload.commit()
        return upload.claim

    async def SubmitUpdate(self, request_iterator: AsyncIterator[coordinator_pb2.SubmitUpdateRequest],
                           context: grpc.aio.ServicerContext) -> coordinator_pb2.SubmitUpdateResponse:
        claim = await self._upload(request_iterator, context, "UpdateHeader")
        return coordinator_pb2.SubmitUpdateResponse(round=claim.round, accepted=True)

    async def RestorePatch(self, request_iterator: AsyncIterator[coordinator_pb2.RestorePatchRequest],
                           context: grpc.aio.ServicerContext) -> coordinator_pb2.RestorePatchResponse:
        claim = await self._upload(request_iterator, context, "RestoreHeader")
        return coordinator_pb2.RestorePatchResponse(round=claim.round, accepted=True)

    async def DeclineRound(self, request: coordinator_pb2.DeclineRoundRequest,
                           context: grpc.aio.ServicerContext) -> coordinator_pb2.DeclineRoundResponse:
        name, _ = self._caller(context, request.worker_id, "worker")
        self.federation.decline(name, request.round, request.reason)
        return coordinator_pb2.DeclineRoundResponse(round=request.round)

    async def StartRound(self, request: coordinator_pb2.StartRoundRequest,
                         context: grpc.aio.ServicerContext) -> coordinator_pb2.StartRoundResponse:
        self._caller(context, "", "operator")
        rnd = self.federation.start_round(config_from_proto(request.config), request.deadline_seconds)
        return coordinator_pb2.StartRoundResponse(round=rnd.number, deadline_unix_ms=rnd.deadline_unix_ms,
                                                  eligible=list(rnd.eligible))

    async def FinishFederation(self, request: coordinator_pb2.FinishFederationRequest,
                               context: grpc.aio.ServicerContext) -> coordinator_pb2.FinishFederationResponse:
        self._caller(context, "", "operator")
        return coordinator_pb2.FinishFederationResponse(last_round=self.federation.finish())

    async def AdvertiseMaskKeys(self, request: coordinator_pb2.AdvertiseMaskKeysRequest,
                                context: grpc.aio.ServicerContext) -> coordinator_pb2.AdvertiseMaskKeysResponse:
        name, _ = self._caller(context, request.keys.worker_id, "worker")
        self.federation.advertise_keys(name, request.round, mask_keys_from_proto(request.keys))
        return coordinator_pb2.AdvertiseMaskKeysResponse(round=request.round)

    async def ShareMaskSecrets(self, request: coordinator_pb2.ShareMaskSecretsRequest,
                               context: grpc.aio.ServicerContext) -> coordinator_pb2.ShareMaskSecretsResponse:
        name, _ = self._caller(context, request.worker_id, "worker")
        shares = {s.worker_id: s.ciphertext for s in request.shares}
        if len(shares) != len(request.shares):
            raise InvalidArgument("two shares for the same member")
        self.federation.share_secrets(name, request.round, shares)
        return coordinator_pb2.ShareMaskSecretsResponse(round=request.round)

    async def ConfirmSurvivors(self, request: coordinator_pb2.ConfirmSurvivorsRequest,
                               context: grpc.aio.ServicerContext) -> coordinator_pb2.ConfirmSurvivorsResponse:
        name, _ = self._caller(context, request.worker_id, "worker")
        self.federation.confirm_survivors(name, request.round, request.signature)
        return coordinator_pb2.ConfirmSurvivorsResponse(round=request.round)

    async def RevealMaskShares(self, request: coordinator_pb2.RevealMaskSharesRequest,
                               context: grpc.aio.ServicerContext) -> coordinator_pb2.RevealMaskSharesResponse:
        name, _ = self._caller(context, request.worker_id, "worker")
        self.federation.reveal_shares(name, request.round, [revealed_from_proto(s) for s in request.shares])
        return coordinator_pb2.RevealMaskSharesResponse(round=request.round)

    async def ReportEvaluation(self, request: coordinator_pb2.ReportEvaluationRequest,
                               context: grpc.aio.ServicerContext) -> coordinator_pb2.ReportEvaluationResponse:
        name, _ = self._caller(context, request.worker_id, "worker")
        self.federation.report_evaluation(name, request.round, request.eval_loss, request.records)
        return coordinator_pb2.ReportEvaluationResponse(round=request.round)

    async def GetStatus(self, request: coordinator_pb2.GetStatusRequest,
                        context: grpc.aio.ServicerContext) -> coordinator_pb2.GetStatusResponse:
        self._caller(context, "", "worker", "operator")
        fed = self.federation
        return coordinator_pb2.GetStatusResponse(
            federation_id=fed.federation_id, current_round=fed.current_round,
            workers=[coordinator_pb2.WorkerStatus(
                worker_id=w.worker_id, connected=w.connected, last_round=w.last_round, epsilon=w.epsilon,
                num_records=w.num_records, no_dp=w.no_dp, declined=w.declined, pii_scrubbed=w.pii_scrubbed,
                epsilon_budget=w.epsilon_budget)
                for w in fed.workers.values()],
            rounds=[coordinator_pb2.RoundStatus(
                round=r.number, state=r.state.value,
                participants=[participant_to_proto(p) for p in r.submissions.values()],
                buffer_bytes=fed.buffer_bytes(r), eligible=list(r.eligible), reason=r.reason, seconds=r.seconds,
                bytes_received=r.bytes_received, mask_recovery=mask_recovery(r),
                evaluations=evaluations_to_proto(r.evaluations), eval_loss=nan_to_zero(mean_eval_loss(r.evaluations)),
                declines=[coordinator_pb2.Decline(worker_id=w, reason=why) for w, why in sorted(r.declined.items())])
                for r in sorted(fed.rounds.values(), key=lambda r: r.number)],
            buffer_bytes_total=fed.store.total_bytes, min_workers=fed.settings.min_workers,
            keep_rounds=fed.store.keep, buffers_locked=fed.buffers_locked, finished=fed.finished,
            baseline_evaluations=evaluations_to_proto(fed.baseline_evaluations),
            secure_aggregation=coordinator_pb2.SecureAggregation(
                enabled=fed.settings.secagg, threshold=fed.settings.secagg_threshold,
                scheme=SCHEME if fed.settings.secagg else "consortium pads only (--no-secagg)"))
