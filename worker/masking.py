"""A hospital's side of secure aggregation: join a round's mask set, mask its update, confirm and reveal.

The cryptography is common.secagg's; this is its round logic against the
coordinator (mirroring coordinator.masking): keys out, the peers' keys checked
against the federation CA, shares out and in, then, after the uploads close, a
signature over the announced survivor set and one share per member. Round events
for the setup arrive on the worker's watch stream and are handed over through
`inbox`; the survivor-set events come straight to `on_unmask` and
`on_survivors_confirmed`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import structlog
from cryptography import x509

from common.errors import FailedPrecondition, FedfheError
from common.messages import mask_keys_from_proto
from common.secagg import MemberSecrets, RecoveryError, SecAggError, Signer, check_members, load_anchor
from fedfhe.v1 import coordinator_pb2
from worker.coordinator_client import CoordinatorClient

log = structlog.get_logger("fedfhe.worker")


class MaskMember:
    def __init__(self, tls_dir: Path | None, identity: str, metric: Callable[..., None]) -> None:
        self.tls_dir, self.identity, self.metric = tls_dir, identity, metric
        self.inbox: asyncio.Queue[coordinator_pb2.WatchRoundsResponse | None] = asyncio.Queue()
        self._secrets: dict[int, MemberSecrets] = {}  # this worker's, per round
        self._identity: tuple[Signer, x509.Certificate] | None = None

    def _load_identity(self) -> tuple[Signer, x509.Certificate]:
        """This worker's federation certificate (it signs its mask keys) and the CA (it checks its peers')."""
        if self._identity is None:
            if self.tls_dir is None or not self.identity:
                raise FailedPrecondition("secure aggregation signs with this worker's federation certificate: "
                                         "give --tls-dir and --identity")
            self._identity = (Signer.load(self.tls_dir, self.identity), load_anchor(self.tls_dir))
        return self._identity

    async def _event(self, kind: str, round_: int, deadline_ms: int) -> Any:
        """The next secure-aggregation event of this round (strays of other rounds are dropped)."""
        while True:
            timeout = max(5.0, deadline_ms / 1000 - time.time())
            event = await asyncio.wait_for(self.inbox.get(), timeout)
            if event is None:
                raise ConnectionError("the round stream ended during secure aggregation setup")
            if event.WhichOneof("event") == kind and getattr(event, kind).round == round_:
                return getattr(event, kind)

    async def join(self, client: CoordinatorClient, started: coordinator_pb2.RoundStarted, federation: str,
                   worker_id: str) -> MemberSecrets | str:
        """Keys out, peers' keys checked, shares out and in: this round's mask secrets, or why not."""
        r = started.round
        try:
            signer, anchor = self._load_identity()
            secrets = MemberSecrets(federation, r, signer)
            await client.advertise_keys(r, secrets.keys)
            ready = await self._event("mask_keys", r, started.deadline_unix_ms)
            members = check_members([mask_keys_from_proto(m) for m in ready.members], anchor, federation, r,
                                    ready.threshold)
            await client.share_secrets(r, worker_id, secrets.shares_for(members, ready.threshold))
            shares = await self._event("mask_shares", r, started.deadline_unix_ms)
            secrets.restrict(list(shares.members))
            for share in shares.shares:
                secrets.receive(share.worker_id, share.ciphertext)
            if secrets.holds != set(shares.members):
                raise RecoveryError(f"shares from {sorted(set(shares.members) - secrets.holds)} are missing")
        except (FedfheError, TimeoutError) as exc:  # KeyRefused: a substituted or replayed key, say
            log.error("secure aggregation setup refused", round=r, error=str(exc))
            return f"secure aggregation setup: {exc or 'timed out'}"
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            return f"secure aggregation setup: {exc.details()}"
        self._secrets[r] = secrets
        log.info("mask set joined", round=r, members=len(shares.members), threshold=secrets.threshold)
        return secrets

    def secrets(self, round_: int) -> MemberSecrets | None:
        """The round's mask secrets (None: the round does not use secure aggregation, or this worker is out)."""
        return self._secrets.get(round_)

    def forget(self, round_: int) -> None:
        secrets = self._secrets.pop(round_, None)
        if secrets is not None:
            secrets.close()

    def drain(self) -> None:
        """The stream ended: no setup event of it is still to be read."""
        while not self.inbox.empty():
            self.inbox.get_nowait()

    async def on_unmask(self, client: CoordinatorClient, request: coordinator_pb2.UnmaskRequested,
                        worker_id: str) -> None:
        """Sign the survivor set the coordinator announced (before any share is revealed)."""
        secrets = self._secrets.get(request.round)
        if secrets is None:
            return
        try:
            signature = secrets.confirm(list(request.survivors))
        except SecAggError as exc:
            log.error("survivor set refused", round=request.round, error=str(exc))
            return
        await client.confirm_survivors(request.round, worker_id, signature)

    async def on_survivors_confirmed(self, client: CoordinatorClient, confirmed: coordinator_pb2.SurvivorsConfirmed,
                                     worker_id: str) -> None:
        """Reveal one share per member once t survivors signed the same survivor set."""
        secrets = self._secrets.get(confirmed.round)
        if secrets is None:
            return
        _, anchor = self._load_identity()
        try:
            shares = secrets.reveal(list(confirmed.survivors), {s.worker_id: s.signature
                                                                for s in confirmed.signatures}, anchor)
        except SecAggError as exc:
            log.error("no shares revealed", round=confirmed.round, error=str(exc))
            return
        await client.reveal_shares(confirmed.round, worker_id, shares)
        self.metric("shares_revealed", round=confirmed.round, survivors=list(confirmed.survivors),
                    shares=len(shares))
