"""A hospital's side of CoordinatorService: every call a worker makes, chunked uploads, and the one retry policy.

Mirrors fhe_client.FheClient (the node) and coordinator.operator.OperatorClient
(the operator). It carries messages only: what to submit, and whether an
aggregate can be trusted, are worker.federation's business.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import structlog

from common.chunks import Assembler, chunk_messages
from common.config import ChannelConfig
from common.errors import FailedPrecondition
from common.messages import mask_keys_to_proto, revealed_to_proto
from common.rpc import Backoff, RpcClient, make_channel, retryable
from common.secagg import MemberKeys, RevealedShare
from fedfhe.v1 import coordinator_pb2 as pb
from fedfhe.v1 import coordinator_pb2_grpc

log = structlog.get_logger("fedfhe.worker")


@dataclass
class FetchedPatch:
    """An encrypted aggregate as it arrived: its header and payload, digest-checked but not yet verified."""

    header: pb.PatchHeader
    payload: bytes


def _upload_stream(request: Any, header: Any, payload: bytes) -> AsyncIterator[Any]:
    """The messages of one upload: the header, then the payload in chunks (SubmitUpdate and RestorePatch alike)."""
    async def stream() -> AsyncIterator[Any]:
        yield request(header=header)
        for chunk in chunk_messages(payload):
            yield request(chunk=chunk)
    return stream()


class CoordinatorClient(RpcClient):
    def __init__(self, target: str, channel: ChannelConfig) -> None:
        super().__init__(target, channel)
        self.stub = coordinator_pb2_grpc.CoordinatorServiceStub(self.channel)

    async def reconnect(self) -> None:
        """A fresh channel (the coordinator restarted, or the connection broke)."""
        await self.channel.close()
        self.channel = make_channel(self.target, self.channel_cfg)
        self.stub = coordinator_pb2_grpc.CoordinatorServiceStub(self.channel)

    async def register(self, worker_name: str, num_records: int, key_check_value: bytes,
                       no_dp: bool, pii_scrubbed: bool = False, epsilon_budget: float = 0.0) -> pb.RegisterResponse:
        return await self.stub.Register(pb.RegisterRequest(
            worker_name=worker_name, num_records=num_records, key_check_value=key_check_value, no_dp=no_dp,
            pii_scrubbed=pii_scrubbed, epsilon_budget=epsilon_budget))

    def watch(self, worker_id: str) -> AsyncIterator[pb.WatchRoundsResponse]:
        """This worker's round events, until the federation finishes or the stream breaks."""
        return self.stub.WatchRounds(pb.WatchRoundsRequest(worker_id=worker_id))

    async def get_patch(self, round_: int) -> FetchedPatch:
        """The encrypted aggregate of a round (0: the newest), reassembled and digest-checked; not yet verified."""
        header, asm = None, None
        async for msg in self.stub.GetPatch(pb.GetPatchRequest(round=round_)):
            if msg.WhichOneof("kind") == "header":
                header = msg.header
                asm = Assembler(header.size_bytes, digest=header.digest)
            elif asm is not None:
                asm.add(msg.chunk)
        if header is None or asm is None:
            raise FailedPrecondition(f"the coordinator sent no patch header for round {round_}")
        payload = asm.payload()  # ChunkError if incomplete or corrupted
        return FetchedPatch(header, payload)

    async def submit_update(self, header: pb.UpdateHeader, payload: bytes) -> pb.SubmitUpdateResponse:
        # The deadline grows with the payload: about 1 MB/s is the slowest link we expect.
        return await self.stub.SubmitUpdate(_upload_stream(pb.SubmitUpdateRequest, header, payload),
                                            timeout=max(60.0, len(payload) / 1e6))

    async def restore_patch(self, header: pb.RestoreHeader, payload: bytes) -> pb.RestorePatchResponse:
        return await self.stub.RestorePatch(_upload_stream(pb.RestorePatchRequest, header, payload),
                                            timeout=max(60.0, len(payload) / 1e6))

    async def decline(self, worker_id: str, round_: int, reason: str) -> pb.DeclineRoundResponse:
        return await self.stub.DeclineRound(pb.DeclineRoundRequest(round=round_, reason=reason,
                                                                    worker_id=worker_id))

    async def advertise_keys(self, round_: int, keys: MemberKeys) -> pb.AdvertiseMaskKeysResponse:
        return await self.stub.AdvertiseMaskKeys(pb.AdvertiseMaskKeysRequest(round=round_,
                                                                             keys=mask_keys_to_proto(keys)))

    async def share_secrets(self, round_: int, worker_id: str, shares: dict[str, bytes]
                            ) -> pb.ShareMaskSecretsResponse:
        return await self.stub.ShareMaskSecrets(pb.ShareMaskSecretsRequest(
            round=round_, worker_id=worker_id,
            shares=[pb.EncryptedShare(worker_id=to, ciphertext=ct) for to, ct in sorted(shares.items())]))

    async def confirm_survivors(self, round_: int, worker_id: str, signature: bytes) -> pb.ConfirmSurvivorsResponse:
        return await self.stub.ConfirmSurvivors(pb.ConfirmSurvivorsRequest(round=round_, worker_id=worker_id,
                                                                           signature=signature))

    async def reveal_shares(self, round_: int, worker_id: str, shares: list[RevealedShare]
                            ) -> pb.RevealMaskSharesResponse:
        return await self.stub.RevealMaskShares(pb.RevealMaskSharesRequest(
            round=round_, worker_id=worker_id, shares=[revealed_to_proto(r) for r in shares]))

    async def report_evaluation(self, round_: int, worker_id: str, eval_loss: float, records: int,
                                ) -> pb.ReportEvaluationResponse:
        return await self.stub.ReportEvaluation(pb.ReportEvaluationRequest(
            round=round_, worker_id=worker_id, eval_loss=eval_loss, records=records))

    async def get_status(self) -> pb.GetStatusResponse:
        return await self.stub.GetStatus(pb.GetStatusRequest())

    async def follow(self, session: Callable[[CoordinatorClient], Awaitable[bool]], backoff: Backoff) -> None:
        """Run session(self) until it returns True (the federation finished), reconnecting while the coordinator
        is away: a transient failure (common.rpc.RETRYABLE) is retried until `backoff` runs out of budget since
        the last sign of life (the session calls backoff.reset() when it hears from the coordinator)."""
        while True:
            try:
                if await session(self):
                    return
                log.warning("round stream ended without the federation finishing; reconnecting")
            except grpc.aio.AioRpcError as exc:
                # ALREADY_EXISTS: this worker's previous stream is still registered (or another process uses its
                # certificate): worth retrying until the coordinator notices the old stream gone, then fatal.
                again = retryable(exc) or exc.code() == grpc.StatusCode.ALREADY_EXISTS
                if not again or backoff.exhausted:
                    raise
                log.warning("coordinator unreachable; reconnecting", code=exc.code().name, backoff=backoff.delay,
                            details=(exc.details() or "")[:200])
            await backoff.wait()
            await self.reconnect()

