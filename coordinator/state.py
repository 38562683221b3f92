"""Federation state, protocol-free: membership, the round policy, encrypted aggregation into patch buffers.

The round policy:
- An operator starts a round; the workers connected at that moment (an open
  watch stream) are eligible and the round waits for them.
- A worker submits once (a second submission is refused) or declines, before
  the deadline (a late one is refused). A worker whose stream ends is no
  longer waited for, so a vanished worker never blocks the round.
- The round closes as soon as no eligible, connected worker is still pending,
  or at the deadline: with at least `min_workers` updates it is aggregated,
  otherwise it fails and nothing is kept.
- Updates are added into the round's accumulator buffer as they arrive (the
  coordinator never holds them apart); the aggregates of the last
  `keep_rounds` rounds are kept in the PatchStore, their only owner.

With secure aggregation (the default; coordinator.masking, common.secagg) a
round first fixes its mask set: the eligible workers send signed keys, then
encrypted shares, each phase closing when every connected worker answered or
after `secagg_phase_seconds`; only the members may upload, and only masked
updates. When the uploads close, the survivors confirm the survivor set and
reveal shares (two more phases, state "unmasking"); with at least the threshold
of them the masks are removed and the round is aggregated, otherwise it fails
and nothing is kept.

An upload (an update or a restore) is an `Upload` from its header to its
addition: `begin_update`/`begin_restore` check the header and reserve the
worker's slot, the upload streams into its own locked scratch buffer, and
`commit` adds it; closing it zeroes the scratch and frees the slot whatever
happened, so a single contribution never outlives its addition.

Everything runs on one asyncio event loop (the server's), so no locks are
needed; the deadline is a loop timer. Events go to watchers through queues.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from types import TracebackType

import structlog

from common.chunks import Assembler, ChunkLike
from common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from common.secagg import MemberKeys, RevealedShare, SecAggError
from common.training import TrainingConfig
from common.updates import MAX_PARTICIPANTS, NONCE_BYTES, TensorLayout, UpdateFormatError
from coordinator.masking import MaskPhase, MaskRound
from coordinator.patchbuf import PatchBuffer, PatchStore

log = structlog.get_logger("fedfhe.coordinator")
MAX_ROUND = (1 << 62) - 1  # round numbers travel as uint64; far beyond any federation's life


@dataclass(frozen=True)
class Settings:
    min_workers: int = 2
    deadline_seconds: float = 600.0
    keep_rounds: int = 3
    require_mlock: bool = False
    max_update_bytes: int = 1 << 30
    key_check_value: bytes = b""  # pinned up front; otherwise the first worker's is pinned
    enrolled: frozenset[str] = frozenset()  # worker names allowed in; empty: any worker certificate of the CA
    secagg: bool = True  # pairwise masks over the pads (False: pads only, for comparison runs and old workers)
    secagg_threshold: int = 0  # Shamir threshold; 0: a majority of each round's mask set
    secagg_phase_seconds: float = 60.0  # the longest each secure-aggregation phase waits for its members


# --------------------------------------------------------------------------------------------------
# Events (the servicer turns them into WatchRoundsResponse messages)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParticipantInfo:
    worker_id: str
    num_samples: int
    epsilon: float
    no_dp: bool
    nonce: bytes
    train_loss: float = math.nan  # as the worker reported it (nan: not reported)


@dataclass(frozen=True)
class Evaluation:
    """A worker's held-out loss of a round's global adapter (reported, for the operator's view)."""

    worker_id: str
    eval_loss: float
    records: int


def mean_eval_loss(evaluations: dict[str, Evaluation]) -> float:
    """Mean held-out loss weighted by the notes each worker measured it on (nan: none reported)."""
    total = sum(e.records for e in evaluations.values())
    return sum(e.eval_loss * e.records for e in evaluations.values()) / total if total else math.nan


@dataclass(frozen=True)
class RoundStartedEvent:
    round: int
    config: TrainingConfig  # the operator's, passed through (the coordinator never trains)
    deadline_unix_ms: int
    base_round: int
    secagg: bool = False
    secagg_threshold: int = 0  # the setting; the round's own is fixed with its mask set


@dataclass(frozen=True)
class RoundClosedEvent:
    round: int
    participants: tuple[ParticipantInfo, ...]
    total_samples: int
    aggregated: bool
    reason: str


@dataclass(frozen=True)
class FinishedEvent:
    last_round: int


@dataclass(frozen=True)
class MaskKeysEvent:
    round: int
    threshold: int
    members: tuple[MemberKeys, ...]


@dataclass(frozen=True)
class MaskSharesEvent:
    round: int
    members: tuple[str, ...]
    shares: tuple[tuple[str, bytes], ...]  # (sender, ciphertext), addressed to the watcher


@dataclass(frozen=True)
class UnmaskEvent:
    round: int
    survivors: tuple[str, ...]


@dataclass(frozen=True)
class SurvivorsConfirmedEvent:
    round: int
    survivors: tuple[str, ...]
    signatures: tuple[tuple[str, bytes], ...]


Event = (RoundStartedEvent | RoundClosedEvent | FinishedEvent | MaskKeysEvent | MaskSharesEvent | UnmaskEvent
         | SurvivorsConfirmedEvent)


# --------------------------------------------------------------------------------------------------
# Workers and rounds
# --------------------------------------------------------------------------------------------------


RESERVED_NAMES = frozenset({"operator", "server", "ca", "service-client"})  # the PKI's own certificates


def check_worker_name(name: str) -> str:
    if not name or len(name) > 64 or not name.replace("-", "").replace("_", "").isalnum():
        raise InvalidArgument(f"worker name {name[:70]!r} must be 1-64 letters, digits, '-' or '_'")
    if name.lower() in RESERVED_NAMES:
        raise InvalidArgument(f"worker name {name!r} is reserved")
    return name


@dataclass
class Worker:
    worker_id: str
    num_records: int
    no_dp: bool = False
    pii_scrubbed: bool = False
    epsilon_budget: float = 0.0  # its DP budget (0: without DP or not reported)
    registered_at: float = field(default_factory=time.time)
    last_round: int = 0
    epsilon: float = 0.0
    declined: str = ""
    watchers: list[asyncio.Queue[Event]] = field(default_factory=list)

    @property
    def connected(self) -> bool:
        return bool(self.watchers)


class RoundState(StrEnum):  # the values GetStatus reports
    OPEN = "open"
    UNMASKING = "unmasking"  # uploads closed; survivors confirm and reveal shares (secure aggregation)
    AGGREGATED = "aggregated"
    FAILED = "failed"
    EVICTED = "evicted"  # aggregated, then dropped from the store (the last `keep_rounds` are kept)


@dataclass
class Round:
    number: int
    config: TrainingConfig
    deadline_unix_ms: int
    eligible: tuple[str, ...]
    base_round: int
    started: float = field(default_factory=time.monotonic)
    pending: set[str] = field(default_factory=set)  # eligible, connected, neither submitted nor declined
    receiving: set[str] = field(default_factory=set)  # headers accepted, payload still streaming
    submissions: dict[str, ParticipantInfo] = field(default_factory=dict)
    declined: dict[str, str] = field(default_factory=dict)
    layout: TensorLayout | None = None
    accumulator: PatchBuffer | None = None  # the running sum while open; the PatchStore owns it after
    state: RoundState = RoundState.OPEN
    reason: str = ""
    seconds: float = 0.0
    bytes_received: int = 0
    restored: bool = False
    digest: bytes = b""  # SHA-256 of the stored aggregate, fixed when the round closes
    timer: asyncio.TimerHandle | None = None
    mask: MaskRound | None = None  # secure aggregation (None: pads only)
    evaluations: dict[str, Evaluation] = field(default_factory=dict)
    mask_timer: asyncio.TimerHandle | None = None  # bounds the current secure-aggregation phase

    @property
    def total_samples(self) -> int:
        return sum(p.num_samples for p in self.submissions.values())

    def started_event(self, secagg_threshold: int = 0) -> RoundStartedEvent:
        return RoundStartedEvent(self.number, self.config, self.deadline_unix_ms, self.base_round,
                                 self.mask is not None, secagg_threshold)

    def closed_event(self) -> RoundClosedEvent:
        return RoundClosedEvent(self.number, tuple(self.submissions.values()), self.total_samples,
                                self.state == RoundState.AGGREGATED, self.reason)


@dataclass(frozen=True)
class StoredAggregate:
    """A round's encrypted aggregate as GetPatch serves it (read from its buffer chunk by chunk)."""

    round: int
    participants: tuple[ParticipantInfo, ...]
    total_samples: int
    layout: TensorLayout
    buffer: PatchBuffer
    digest: bytes
    key_check_value: bytes
    restored: bool
    config: TrainingConfig


@dataclass(frozen=True)
class UpdateClaim:
    """What a worker's UpdateHeader (or RestoreHeader) says, before the payload arrives."""

    round: int
    num_samples: int
    epsilon: float
    no_dp: bool
    specs: Sequence[tuple[str, Sequence[int]]]
    size_bytes: int
    key_check_value: bytes
    nonce: bytes
    digest: bytes = b""  # SHA-256 of the payload
    config: TrainingConfig | None = None  # a restore's: how to rebuild the adapter
    masked: bool = False  # an update carrying secure-aggregation masks
    train_loss: float = math.nan


class UploadKind(StrEnum):
    UPDATE = "update"
    RESTORE = "restore"


class Upload:
    """One worker's encrypted upload, from its accepted header to its addition (see the module docstring).

    The payload streams into a locked, undumpable scratch buffer; `commit` checks that it is
    complete and matches its digest, then hands it to the federation. Use it as a context
    manager: leaving it zeroes the scratch buffer and, unless committed, frees the worker's slot.
    """

    def __init__(self, federation: Federation, kind: UploadKind, worker: str, claim: UpdateClaim,
                 layout: TensorLayout) -> None:
        self.federation, self.kind, self.worker, self.claim, self.layout = federation, kind, worker, claim, layout
        self.scratch = PatchBuffer(layout.size_bytes, require_mlock=federation.settings.require_mlock)
        self._assembler = Assembler(layout.size_bytes, self.scratch.write, digest=claim.digest)
        self._open = True

    def add(self, chunk: ChunkLike) -> None:
        self._assembler.add(chunk)

    def commit(self) -> None:
        self._assembler.finish(self.layout.size_bytes)
        self._open = False  # the slot is the federation's to settle from here on
        self.federation._commit(self)

    def close(self) -> None:
        self.scratch.close()
        if self._open:
            self._open = False
            self.federation._abandon(self)

    def __enter__(self) -> Upload:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class Federation:
    def __init__(self, federation_id: str | None = None, settings: Settings | None = None,
                 *, clock: Callable[[], float] = time.time) -> None:
        self.federation_id = federation_id or "fed-" + secrets.token_hex(4)
        self.settings = settings or Settings()
        if self.settings.min_workers < 1:
            raise ValueError("min_workers must be at least 1")
        self.key_check_value = self.settings.key_check_value
        self.workers: dict[str, Worker] = {}
        self.rounds: dict[int, Round] = {}
        self.store = PatchStore(self.settings.keep_rounds)
        self.finished = False
        self._restoring: set[str] = set()
        self.baseline_evaluations: dict[str, Evaluation] = {}  # round 0: the base model
        self._observers: list[asyncio.Queue[Event]] = []
        self._clock = clock

    # ---- membership -------------------------------------------------------------------------------

    def _check_kcv(self, kcv: bytes, what: str) -> None:
        if not kcv:
            raise InvalidArgument(f"{what} carries no consortium key check value")
        if self.key_check_value and kcv != self.key_check_value:
            raise FailedPrecondition(
                f"{what} is under consortium key {kcv.hex()}, but this federation uses "
                f"{self.key_check_value.hex()}: wrong consortium key file")

    def register(self, name: str, role: str, num_records: int, key_check_value: bytes,
                 no_dp: bool = False, pii_scrubbed: bool = False, epsilon_budget: float = 0.0) -> Worker:
        """Enroll (or re-enroll, after a restart) a worker under its certificate name."""
        if role != "worker":
            raise PermissionDenied(f"certificate {name!r} has role {role!r}, not worker")
        check_worker_name(name)
        if self.settings.enrolled and name not in self.settings.enrolled:
            raise PermissionDenied(f"certificate {name!r} is valid but not enrolled in federation "
                                   f"{self.federation_id!r}")
        self._check_kcv(key_check_value, f"worker {name!r}")
        if not self.key_check_value:
            self.key_check_value = key_check_value
            log.info("consortium key pinned", key_check_value_hex=key_check_value.hex())
        worker = self.workers.get(name)
        if worker is None:
            worker = self.workers[name] = Worker(name, num_records)
            log.info("worker registered", worker=name, records=num_records, no_dp=no_dp, pii_scrubbed=pii_scrubbed)
        if not (math.isfinite(epsilon_budget) and 0 <= epsilon_budget <= 1e6):
            raise InvalidArgument(f"epsilon budget {epsilon_budget} is not a finite number in [0, 1e6]")
        worker.num_records, worker.no_dp, worker.pii_scrubbed = num_records, no_dp, pii_scrubbed
        worker.epsilon_budget = epsilon_budget
        return worker

    def worker(self, name: str) -> Worker:
        worker = self.workers.get(name)
        if worker is None:
            raise FailedPrecondition(f"worker {name!r} is not registered: call Register first")
        return worker

    def connect(self, name: str) -> asyncio.Queue[Event]:
        """Open the watch stream of a registered worker: one at a time.

        A second process presenting the same certificate is refused (ALREADY_EXISTS) rather than silently
        sharing the worker's rounds: two processes would train and submit under one name. A worker whose
        old stream has not yet been noticed gone (keepalive: under a minute) retries until it is.
        """
        worker = self.worker(name)
        if worker.connected:
            raise AlreadyExists(f"worker {name!r} is already connected: another process with the same "
                                "certificate? (a reconnect is accepted once the old stream is gone)")
        queue = self._watch(worker.watchers)
        if self.finished:
            return queue
        rnd = self.open_round
        if rnd is not None and name in rnd.eligible and name not in rnd.submissions and name not in rnd.declined:
            rnd.pending.add(name)  # reconnected within its round: it may still submit
            queue.put_nowait(rnd.started_event(self.settings.secagg_threshold))
        log.info("worker connected", worker=name)
        return queue

    def disconnect(self, name: str, queue: asyncio.Queue[Event]) -> None:
        worker = self.workers.get(name)
        if worker is None or queue not in worker.watchers:
            return
        worker.watchers.remove(queue)
        log.info("worker disconnected", worker=name, still_connected=worker.connected)
        rnd = self.open_round
        if rnd is not None and not worker.connected and name in rnd.pending:
            rnd.pending.discard(name)  # vanished: the round no longer waits for it
            self._advance(rnd)

    # ---- observers (operators) --------------------------------------------------------------------

    def _watch(self, watchers: list[asyncio.Queue[Event]]) -> asyncio.Queue[Event]:
        """A new event queue among `watchers`; a finished federation says so at once."""
        queue: asyncio.Queue[Event] = asyncio.Queue()
        watchers.append(queue)
        if self.finished:
            queue.put_nowait(FinishedEvent(self.last_round))
        return queue

    def observe(self) -> asyncio.Queue[Event]:
        return self._watch(self._observers)

    def unobserve(self, queue: asyncio.Queue[Event]) -> None:
        if queue in self._observers:
            self._observers.remove(queue)

    def _broadcast(self, event: Event, to: Sequence[str] | None = None) -> None:
        for worker in self.workers.values():
            if to is None or worker.worker_id in to:
                for q in worker.watchers:
                    q.put_nowait(event)
        for q in self._observers:
            q.put_nowait(event)

    def _send(self, worker: str, event: Event) -> None:
        """An event for one worker's eyes only (its own shares)."""
        w = self.workers.get(worker)
        for q in w.watchers if w is not None else []:
            q.put_nowait(event)

    # ---- rounds -----------------------------------------------------------------------------------

    @property
    def current_round(self) -> int:
        return max(self.rounds, default=0)

    @property
    def last_round(self) -> int:
        """The newest round that has closed (aggregated, failed or evicted)."""
        return max((r.number for r in self.rounds.values() if r.state not in (RoundState.OPEN, RoundState.UNMASKING)),
                   default=0)

    @property
    def open_round(self) -> Round | None:
        rnd = self.rounds.get(self.current_round)
        return rnd if rnd is not None and rnd.state == RoundState.OPEN else None

    @property
    def unfinished_round(self) -> Round | None:
        """The newest round if it has not closed yet (open, or removing its masks)."""
        rnd = self.rounds.get(self.current_round)
        return rnd if rnd is not None and rnd.state in (RoundState.OPEN, RoundState.UNMASKING) else None

    def _live_buffers(self) -> list[PatchBuffer]:
        return [*self.store.buffers(), *(r.accumulator for r in self.rounds.values() if r.accumulator is not None)]

    def buffer_bytes(self, rnd: Round) -> int:
        """Bytes a round holds in memory: its accumulator while open, its stored aggregate after."""
        buf = rnd.accumulator if rnd.accumulator is not None else self.store.get(rnd.number)
        return buf.size if buf is not None else 0

    @property
    def buffers_locked(self) -> bool:
        """Every live patch buffer is mlocked (true before the first one exists only if a probe locks)."""
        live = self._live_buffers()
        if not live:
            probe = PatchBuffer(8)
            probe.close()
            return probe.locked
        return all(b.locked for b in live)

    @property
    def latest_patch_round(self) -> int:
        return max(self.store.rounds(), default=0)

    def start_round(self, config: TrainingConfig, deadline_seconds: float = 0.0) -> Round:
        if self.finished:
            raise FailedPrecondition("the federation is finished")
        if self.unfinished_round is not None:
            raise FailedPrecondition(f"round {self.current_round} is still {self.unfinished_round.state}")
        if deadline_seconds < 0 or not math.isfinite(deadline_seconds) or deadline_seconds > 7 * 86400:
            raise InvalidArgument(f"deadline of {deadline_seconds} s is not in (0, 7 days]")
        seconds = deadline_seconds or self.settings.deadline_seconds
        connected = sorted(w.worker_id for w in self.workers.values() if w.connected)
        if len(connected) < self.settings.min_workers:
            raise FailedPrecondition(f"{len(connected)} worker(s) connected, the round needs at least "
                                     f"{self.settings.min_workers} (--min-workers)")
        number = self.current_round + 1
        if number > MAX_ROUND:
            raise FailedPrecondition(f"round numbers are exhausted ({MAX_ROUND})")
        rnd = Round(number, config, int((self._clock() + seconds) * 1000), tuple(connected),
                    self.latest_patch_round, pending=set(connected))
        self.rounds[number] = rnd
        rnd.timer = asyncio.get_running_loop().call_later(seconds, self._deadline, number)
        if self.settings.secagg:
            rnd.mask = MaskRound(self.federation_id, number, self.settings.secagg_threshold)
            self._phase_timer(rnd)
        log.info("round started", round=number, eligible=connected, deadline_seconds=seconds,
                 secagg=self.settings.secagg)
        self._broadcast(rnd.started_event(self.settings.secagg_threshold), to=connected)
        return rnd

    def _open(self, round_: int, worker: str) -> Round:
        rnd = self.rounds.get(round_)
        if rnd is None:
            raise FailedPrecondition(f"round {round_} has not started (current round {self.current_round})")
        if rnd.state != RoundState.OPEN:
            raise FailedPrecondition(f"round {round_} is closed ({rnd.state}): late submissions are refused")
        if worker not in rnd.eligible:
            raise FailedPrecondition(f"worker {worker!r} was not connected when round {round_} started: "
                                     "it joins the next round")
        if worker in rnd.submissions or worker in rnd.receiving:
            raise FailedPrecondition(f"worker {worker!r} already submitted to round {round_}")
        if worker in rnd.declined:
            raise FailedPrecondition(f"worker {worker!r} declined round {round_}")
        return rnd

    def _check_claim(self, claim: UpdateClaim, what: str) -> TensorLayout:
        self._check_kcv(claim.key_check_value, what)
        if not 1 <= claim.num_samples <= 1 << 40:
            raise InvalidArgument(f"sample count {claim.num_samples} is not in [1, 2^40]")
        if not (claim.epsilon >= 0 and (math.isfinite(claim.epsilon) or claim.no_dp)):
            raise InvalidArgument(f"epsilon {claim.epsilon} must be a finite non-negative number")
        if len(claim.nonce) != NONCE_BYTES:
            raise InvalidArgument(f"nonce must be {NONCE_BYTES} bytes, got {len(claim.nonce)}")
        if claim.size_bytes > self.settings.max_update_bytes:
            raise ResourceExhausted(f"update of {claim.size_bytes} bytes exceeds the limit of "
                                    f"{self.settings.max_update_bytes}")
        try:
            layout = TensorLayout.checked(claim.specs, max_words=self.settings.max_update_bytes // 8)
        except UpdateFormatError as exc:
            raise InvalidArgument(str(exc)) from None
        if layout.size_bytes != claim.size_bytes:
            raise InvalidArgument(f"header says {claim.size_bytes} bytes, its tensors need {layout.size_bytes}")
        return layout

    def begin_update(self, worker: str, claim: UpdateClaim) -> Upload:
        """Check a submission's header before its payload streams in; reserves the worker's slot."""
        self.worker(worker)
        rnd = self._open(claim.round, worker)
        layout = self._check_claim(claim, f"update of {worker!r}")
        if rnd.layout is not None and layout != rnd.layout:
            raise InvalidArgument(f"update tensors differ from round {rnd.number}'s first update "
                                  f"({len(layout.specs)} vs {len(rnd.layout.specs)} tensors)")
        if len(rnd.submissions) + len(rnd.receiving) >= MAX_PARTICIPANTS:
            raise ResourceExhausted(f"round {rnd.number} has its maximum of {MAX_PARTICIPANTS} participants")
        if rnd.mask is not None:
            rnd.mask.check_upload(worker, claim.masked)
        elif claim.masked:
            raise FailedPrecondition(f"round {rnd.number} does not use secure aggregation: send the update "
                                     "without masks")
        upload = Upload(self, UploadKind.UPDATE, worker, claim, layout)
        rnd.receiving.add(worker)
        return upload

    def _abandon(self, upload: Upload) -> None:
        """The payload stream broke or failed its checks: free the slot (nothing was added)."""
        if upload.kind == UploadKind.RESTORE:
            self._restoring.discard(upload.worker)
            return
        rnd = self.rounds.get(upload.claim.round)
        if rnd is not None and upload.worker in rnd.receiving:
            rnd.receiving.discard(upload.worker)
            self._maybe_close(rnd)  # it may have been the last one the round waited for

    def _commit(self, upload: Upload) -> None:
        if upload.kind == UploadKind.RESTORE:
            self._finish_restore(upload)
        else:
            self._finish_update(upload)

    def _finish_update(self, upload: Upload) -> None:
        """Add a complete, digest-checked payload into the round's accumulator; may close the round."""
        worker, claim, layout = upload.worker, upload.claim, upload.layout
        rnd = self.rounds.get(claim.round)
        if rnd is None or worker not in rnd.receiving:
            raise FailedPrecondition(f"no submission of {worker!r} to round {claim.round} is in progress")
        rnd.receiving.discard(worker)
        if rnd.state != RoundState.OPEN:
            raise FailedPrecondition(f"round {claim.round} closed ({rnd.state}) while the update streamed in: "
                                     "late submissions are refused")
        if rnd.layout is not None and layout != rnd.layout:  # a concurrent first submission set another layout
            raise InvalidArgument(f"update tensors differ from round {rnd.number}'s first update")
        if rnd.accumulator is None:
            rnd.layout = layout
            rnd.accumulator = PatchBuffer(layout.size_bytes, require_mlock=self.settings.require_mlock)
        rnd.accumulator.add(upload.scratch)
        rnd.bytes_received += layout.size_bytes
        rnd.submissions[worker] = ParticipantInfo(worker, claim.num_samples, claim.epsilon, claim.no_dp,
                                                  claim.nonce, claim.train_loss)
        rnd.pending.discard(worker)
        w = self.workers[worker]
        w.last_round, w.epsilon, w.no_dp, w.declined = rnd.number, claim.epsilon, claim.no_dp, ""
        log.info("update added", round=rnd.number, worker=worker, samples=claim.num_samples,
                 epsilon=claim.epsilon, bytes=layout.size_bytes)
        self._maybe_close(rnd)

    def decline(self, worker: str, round_: int, reason: str) -> None:
        self.worker(worker)
        rnd = self._open(round_, worker)
        reason = reason.strip()[:500] or "no reason given"
        rnd.declined[worker] = reason
        rnd.pending.discard(worker)
        self.workers[worker].declined = f"round {round_}: {reason}"
        log.info("round declined", round=round_, worker=worker, reason=reason)
        self._advance(rnd)

    def _maybe_close(self, rnd: Round) -> None:
        setup = rnd.mask is not None and rnd.mask.phase in (MaskPhase.KEYS, MaskPhase.SHARES)
        if rnd.state == RoundState.OPEN and not rnd.pending and not rnd.receiving and not setup:
            self._close(rnd, deadline=False)

    def _deadline(self, round_: int) -> None:
        rnd = self.rounds.get(round_)
        if rnd is not None and rnd.state == RoundState.OPEN:
            self._close(rnd, deadline=True)

    def _close(self, rnd: Round, *, deadline: bool) -> None:
        """The uploads are over: aggregate, start removing the masks, or fail."""
        if rnd.timer is not None:
            rnd.timer.cancel()
        n = len(rnd.submissions)
        how = "at the deadline" if deadline else "all connected eligible workers answered"
        rnd.receiving.clear()
        if n < self.settings.min_workers or rnd.accumulator is None:
            self._finalize(rnd, False, f"{n} update(s) {how}; at least {self.settings.min_workers} needed "
                                       "(--min-workers)")
        elif rnd.mask is None:
            self._finalize(rnd, True, f"{n} update(s), closed {how}")
        elif rnd.mask.phase != MaskPhase.UPLOADS:
            self._finalize(rnd, False, f"secure aggregation setup did not complete ({rnd.mask.phase.value} phase)")
        else:
            try:
                rnd.mask.start_recovery(sorted(rnd.submissions))
            except FailedPrecondition as exc:
                self._finalize(rnd, False, f"{n} update(s) {how}; {exc}")
                return
            rnd.state, rnd.reason = RoundState.UNMASKING, f"{n} update(s), closed {how}"
            log.info("unmasking", round=rnd.number, survivors=rnd.mask.survivors, dropped=rnd.mask.dropped)
            for k in rnd.mask.survivors:
                self._send(k, UnmaskEvent(rnd.number, tuple(rnd.mask.survivors)))
            self._phase_timer(rnd)

    def _finalize(self, rnd: Round, aggregated: bool, reason: str) -> None:
        """The round is over: keep its aggregate (aggregated) or zero its buffer (failed), and say so."""
        for timer in (rnd.timer, rnd.mask_timer):
            if timer is not None:
                timer.cancel()
        rnd.seconds = time.monotonic() - rnd.started
        buf, rnd.accumulator = rnd.accumulator, None
        rnd.receiving.clear()
        rnd.reason = reason
        if aggregated and buf is not None:
            rnd.state = RoundState.AGGREGATED
            rnd.digest = buf.digest()
            for old in self.store.put(rnd.number, buf):
                self.rounds[old].state = RoundState.EVICTED
        else:
            rnd.state = RoundState.FAILED
            if buf is not None:
                buf.close()
        log.info("round closed", round=rnd.number, state=rnd.state, reason=rnd.reason,
                 participants=sorted(rnd.submissions), seconds=round(rnd.seconds, 2))
        self._broadcast(rnd.closed_event())

    def report_evaluation(self, worker: str, round_: int, eval_loss: float, records: int) -> None:
        """A worker's held-out loss of a round's global adapter (round 0: the base model); the latest wins."""
        self.worker(worker)
        if not (math.isfinite(eval_loss) and 0 <= eval_loss <= 1e6) or not 0 <= records <= 1 << 40:
            raise InvalidArgument(f"eval loss {eval_loss} or record count {records} out of range")
        if round_ == 0:
            self.baseline_evaluations[worker] = Evaluation(worker, eval_loss, records)
            return
        rnd = self.rounds.get(round_)
        if rnd is None or rnd.state not in (RoundState.AGGREGATED, RoundState.EVICTED):
            raise FailedPrecondition(f"round {round_} has no aggregate to have been evaluated")
        rnd.evaluations[worker] = Evaluation(worker, eval_loss, records)

    # ---- secure aggregation -----------------------------------------------------------------------

    def _masked_round(self, round_: int, worker: str) -> tuple[Round, MaskRound]:
        self.worker(worker)
        rnd = self.rounds.get(round_)
        if rnd is None or rnd.mask is None:
            raise FailedPrecondition(f"round {round_} does not use secure aggregation (or has not started)")
        if rnd.state not in (RoundState.OPEN, RoundState.UNMASKING):
            raise FailedPrecondition(f"round {round_} is closed ({rnd.state})")
        return rnd, rnd.mask

    def advertise_keys(self, worker: str, round_: int, keys: MemberKeys) -> None:
        rnd, mask = self._masked_round(round_, worker)
        self._open(round_, worker)  # eligible, neither submitted nor declined
        mask.advertise(worker, keys)
        self._advance(rnd)

    def share_secrets(self, worker: str, round_: int, shares: dict[str, bytes]) -> None:
        rnd, mask = self._masked_round(round_, worker)
        mask.share(worker, shares)
        self._advance(rnd)

    def confirm_survivors(self, worker: str, round_: int, signature: bytes) -> None:
        rnd, mask = self._masked_round(round_, worker)
        mask.confirm(worker, signature)
        self._advance(rnd)

    def reveal_shares(self, worker: str, round_: int, shares: Sequence[RevealedShare]) -> None:
        rnd, mask = self._masked_round(round_, worker)
        mask.reveal(worker, shares)
        self._advance(rnd)

    def _phase_timer(self, rnd: Round) -> None:
        if rnd.mask_timer is not None:
            rnd.mask_timer.cancel()
        rnd.mask_timer = asyncio.get_running_loop().call_later(self.settings.secagg_phase_seconds,
                                                               self._advance, rnd, True)

    def _advance(self, rnd: Round, timeout: bool = False) -> None:
        """Move a round on as far as its members' answers allow (or, at a phase's timeout, without the rest)."""
        mask = rnd.mask
        if mask is None or mask.phase == MaskPhase.UPLOADS:
            if rnd.state == RoundState.OPEN:
                self._maybe_close(rnd)
            return
        if rnd.state not in (RoundState.OPEN, RoundState.UNMASKING):
            return
        try:
            if mask.phase == MaskPhase.KEYS and (timeout or rnd.pending <= set(mask.keys)):
                threshold, keys = mask.fix_keys()
                rnd.pending &= set(mask.keys)  # who sent no keys cannot upload: not waited for
                for k in keys:
                    self._send(k.worker, MaskKeysEvent(rnd.number, threshold, tuple(keys)))
                self._phase_timer(rnd)
                timeout = False
            if mask.phase == MaskPhase.SHARES and (timeout or not mask.waiting_for & rnd.pending):
                members = mask.fix_shares()
                rnd.pending &= set(members)
                for m in members:
                    self._send(m, MaskSharesEvent(rnd.number, tuple(members), tuple(mask.inbox(m).items())))
                if rnd.mask_timer is not None:
                    rnd.mask_timer.cancel()
                self._maybe_close(rnd)  # everyone may have declined meanwhile
                return
            connected = {w for w, info in self.workers.items() if info.connected}
            if mask.phase == MaskPhase.CONFIRM and (timeout or not mask.waiting_for & connected):
                signatures = mask.fix_confirmations()
                for name in signatures:
                    self._send(name, SurvivorsConfirmedEvent(rnd.number, tuple(mask.survivors),
                                                          tuple(signatures.items())))
                self._phase_timer(rnd)
                timeout = False
            if mask.phase == MaskPhase.REVEAL and (timeout or not mask.waiting_for & connected):
                self._unmask(rnd, mask)
        except (FailedPrecondition, SecAggError) as exc:
            if rnd.state == RoundState.OPEN and rnd.timer is not None:
                rnd.timer.cancel()
            self._finalize(rnd, False, f"secure aggregation: {exc}")

    def _unmask(self, rnd: Round, mask: MaskRound) -> None:
        assert rnd.accumulator is not None
        rnd.accumulator.transform(mask.remove_masks)  # RecoveryError: too few or inconsistent shares
        dropped = f"; masks of {', '.join(mask.dropped)} recovered from shares" if mask.dropped else ""
        self._finalize(rnd, True, f"{rnd.reason}; unmasked with {len(mask.reveals)} of {len(mask.survivors)} "
                                  f"survivors' shares (threshold {mask.threshold}){dropped}")

    def finish(self) -> int:
        """End the federation: close an unfinished round first (failing one still removing masks)."""
        rnd = self.unfinished_round
        if rnd is not None and rnd.state == RoundState.UNMASKING:
            self._finalize(rnd, False, "the federation finished before the masks were removed")
        elif rnd is not None:
            self._close(rnd, deadline=True)
            if rnd.state == RoundState.UNMASKING:
                self._finalize(rnd, False, "the federation finished before the masks were removed")
        self.finished = True
        self._broadcast(FinishedEvent(self.last_round))
        log.info("federation finished", last_round=self.last_round)
        return self.last_round

    # ---- patches ----------------------------------------------------------------------------------

    def aggregate(self, round_: int) -> StoredAggregate:
        round_ = round_ or self.latest_patch_round
        rnd = self.rounds.get(round_)
        if rnd is None or round_ == 0:
            raise NotFound(f"no aggregate for round {round_} (newest: {self.latest_patch_round or 'none'})")
        if rnd.state == RoundState.OPEN:
            raise FailedPrecondition(f"round {round_} is still open")
        buf = self.store.get(round_)
        if rnd.state != RoundState.AGGREGATED or buf is None or rnd.layout is None:
            detail = (f"it was evicted (the last {self.store.keep} are kept)" if rnd.state == RoundState.EVICTED
                      else rnd.reason)
            raise NotFound(f"no aggregate for round {round_}: {detail}")
        return StoredAggregate(round_, tuple(rnd.submissions.values()), rnd.total_samples, rnd.layout, buf, rnd.digest,
                     self.key_check_value, rnd.restored, rnd.config)

    def _restorable(self, round_: int) -> bool:
        """A fresh coordinator, or one holding only restored aggregates older than round_, and no new round."""
        if not self.rounds:
            return True
        return all(r.restored for r in self.rounds.values()) and round_ > max(self.rounds)

    def begin_restore(self, worker: str, claim: UpdateClaim) -> Upload:
        """A worker offers the global adapter of a round after a restart left this coordinator empty.

        Until the next round starts, a newer restored round replaces an older one, so the worker holding
        the most recent global adapter wins whatever the order in which workers reconnect.
        """
        self.worker(worker)
        if self.finished:
            raise FailedPrecondition("the federation is finished")
        if not 1 <= claim.round <= MAX_ROUND:
            raise InvalidArgument(f"a restored aggregate belongs to a round in [1, {MAX_ROUND}]")
        if not self._restorable(claim.round):
            raise FailedPrecondition(f"this coordinator already holds round {self.current_round}: restoring "
                                     f"round {claim.round} would not move it forward")
        if worker in self._restoring:
            raise FailedPrecondition(f"worker {worker!r} is already restoring")
        if claim.num_samples != 1:
            raise InvalidArgument("a restored aggregate has weight 1")
        if claim.config is None:
            raise InvalidArgument("a restored aggregate must carry its round config (how to rebuild it)")
        layout = self._check_claim(claim, f"restore by {worker!r}")
        upload = Upload(self, UploadKind.RESTORE, worker, claim, layout)
        self._restoring.add(worker)
        return upload

    def _finish_restore(self, upload: Upload) -> None:
        worker, claim, layout = upload.worker, upload.claim, upload.layout
        assert claim.config is not None  # begin_restore refuses a restore without one
        self._restoring.discard(worker)
        if not self._restorable(claim.round):
            raise FailedPrecondition(f"round {self.current_round} is already here (restored first or started)")
        buf = PatchBuffer(layout.size_bytes, require_mlock=self.settings.require_mlock)
        buf.add(upload.scratch)
        self.rounds.clear()  # an older restored round gives way (restorable: no round of its own is open)
        self.store.close()
        rnd = Round(claim.round, claim.config, int(self._clock() * 1000), (worker,), 0,
                    state=RoundState.AGGREGATED, reason=f"restored by {worker}", layout=layout, restored=True,
                    digest=buf.digest())
        rnd.submissions[worker] = ParticipantInfo(worker, 1, claim.epsilon, claim.no_dp, claim.nonce)
        self.rounds[claim.round] = rnd
        self.store.put(claim.round, buf)
        log.info("aggregate restored", round=claim.round, worker=worker, bytes=layout.size_bytes)

    def close(self) -> None:
        for rnd in self.rounds.values():
            for timer in (rnd.timer, rnd.mask_timer):
                if timer is not None:
                    timer.cancel()
            if rnd.accumulator is not None:
                rnd.accumulator.close()
        self.store.close()
