"""A hospital's round loop: watch rounds → fetch and verify the global adapter → train → encrypt → submit.

The global adapter exists in plaintext only in this process's memory: it
arrives as an encrypted aggregate, is verified and decrypted with the
consortium key in RAM, and is applied only when every check passed (a wrong
key or a tampered aggregate leaves the current adapter untouched). Local
training runs in a thread so the gRPC streams stay serviced.

If the coordinator restarts (its patch buffers are memory-only and gone), the
worker reconnects and, holding the last global adapter, re-encrypts it under
a fresh nonce and restores it (RestorePatch), so the federation resumes
from the same round.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import numpy as np
import structlog
import torch

from common.errors import FailedPrecondition, FedfheError, NodeMisbehaved
from common.lwe.params import by_name
from common.lwe.prg import DeterministicRandomness
from common.messages import (
    config_from_proto,
    config_to_proto,
    contributions,
    layout_from_proto,
    layout_to_proto,
)
from common.progress import progress_bar
from common.rpc import Backoff
from common.secagg import MemberSecrets
from common.training import TrainingConfig
from common.updates import (
    RESTORE,
    UPDATE,
    ConsortiumKey,
    TamperedAggregate,
    decrypt_aggregate,
    encrypt_update,
)
from fedfhe.v1 import coordinator_pb2
from worker.config import JoinConfig
from worker.coordinator_client import CoordinatorClient, FetchedPatch
from worker.lora import load_lora_state_dict, lora_state_dict
from worker.masking import MaskMember
from worker.model import LoraConfig
from worker.runtime import Runtime, build
from worker.train import RoundResult, Trainer, held_out_loss

log = structlog.get_logger("fedfhe.worker")
SKETCH_COLS = 16  # random projection width for measuring full-LoRA aggregation error


def lora_config(cfg: TrainingConfig) -> LoraConfig:
    return LoraConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=cfg.lora_targets, ffa=cfg.ffa,
                      seed=cfg.lora_seed)


def sketches(runtime: Runtime, seed: int) -> dict[str, np.ndarray]:
    """(α/r)·B·A·R for every LoRA module, R (d_in × 16) Gaussian from the public seed: a JL sketch of B·A."""
    out = {}
    gen = torch.Generator().manual_seed(seed + 7919)
    for name, mod in runtime.model.named_modules():
        if hasattr(mod, "lora_a") and hasattr(mod, "lora_b"):
            r = torch.randn(mod.lora_a.in_features, SKETCH_COLS, generator=gen) / math.sqrt(SKETCH_COLS)
            with torch.no_grad():
                out[f"sketch.{name}"] = (mod.scale * mod.lora_b.weight @ (mod.lora_a.weight @ r)).numpy()
    return out


def aggregation_error(runtime: Runtime, mean_sketch: dict[str, np.ndarray], seed: int) -> float:
    """‖mean(B)·mean(A)·R − mean(B·A)·R‖ / ‖mean(B·A)·R‖: what averaging A and B apart costs (full LoRA)."""
    ours = sketches(runtime, seed)
    num = sum(float(np.sum((ours[k].astype(np.float64) - mean_sketch[k]) ** 2)) for k in mean_sketch)
    den = sum(float(np.sum(mean_sketch[k].astype(np.float64) ** 2)) for k in mean_sketch)
    return math.sqrt(num / den) if den > 0 else 0.0


def open_patch(key: ConsortiumKey, federation_id: str, patch: FetchedPatch, *, expected_round: int = 0,
               min_participants: int = 1) -> dict[str, np.ndarray]:
    """Verify and decrypt an aggregate (UpdateCryptoError if anything is off); touches no model state.

    The round comes from the coordinator's header, so a reader that asked for a given round checks it:
    otherwise an older (validly encrypted) aggregate could be served in its place and roll the adapter back.
    """
    h = patch.header
    if h.federation_id != federation_id:
        raise FailedPrecondition(f"patch of federation {h.federation_id!r}, expected {federation_id!r}")
    if expected_round and h.round != expected_round:
        raise TamperedAggregate(f"asked for the aggregate of round {expected_round}, got round {h.round}")
    return decrypt_aggregate(key, federation_id, h.round, contributions(h.participants), h.total_samples,
                             layout_from_proto(h.tensors), patch.payload, h.key_check_value,
                             kind=RESTORE if h.restored else UPDATE, min_participants=min_participants)


def adapter_tensors(mean: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The LoRA tensors of a decrypted aggregate (without the full-LoRA error sketches)."""
    return {k: torch.from_numpy(v) for k, v in mean.items() if not k.startswith("sketch.")}


class FederatedWorker:
    """One hospital in the federation. `run()` returns when the operator finishes the federation."""

    def __init__(self, cfg: JoinConfig, key: ConsortiumKey, train: Sequence[Sequence[int]],
                 held_out: Sequence[Sequence[int]], *, pad_id: int = 0,
                 runtime_factory: Callable[..., Runtime] = build) -> None:
        self.cfg, self.key = cfg, key
        self.train_records, self.held_out, self.pad_id = list(train), list(held_out), pad_id
        self.runtime_factory = runtime_factory
        self.runtime: Runtime | None = None
        self.trainer: Trainer | None = None
        self.lora: LoraConfig | None = None
        self.worker_id = cfg.identity or "worker"
        self.federation_id = ""
        self.applied_round = 0  # the round whose aggregate is the current global adapter (0: initial)
        self.global_state: dict[str, torch.Tensor] | None = None
        self.dp = cfg.dp_settings()
        self.metrics_path = cfg.metrics_file
        self.baseline_done = False
        self.round_cfg: TrainingConfig | None = None  # the newest round's settings
        # Reconnect to a coordinator that went away while it was heard from within reconnect_seconds.
        self.backoff = Backoff(cfg.reconnect_seconds, first=0.5)
        self.node_failures = 0  # FHE answers that failed verification (each ends that node's session)
        self._round_task: asyncio.Task[None] | None = None
        self._evaluation: tuple[asyncio.Task[None], threading.Event] | None = None  # running in the background
        self._eval_owed: list[tuple[int, TrainingConfig]] = []  # put off or interrupted: done after the next upload
        self.masks = MaskMember(cfg.tls_dir, cfg.identity, self.metric)  # secure aggregation
        self._rotation: asyncio.Task[None] | None = None  # a new FHE seed being set up between rounds

    # ---- metrics ----------------------------------------------------------------------------------

    def metric(self, event: str, **fields: Any) -> None:
        record = {"event": event, "worker": self.worker_id, "time": time.time(), **fields}
        log.info(event, **{k: v for k, v in fields.items() if k != "time"})
        if self.metrics_path is not None:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, allow_nan=True) + "\n")

    # ---- model ------------------------------------------------------------------------------------

    def ensure_model(self, cfg: TrainingConfig) -> Runtime:
        """Build the split model for the round's LoRA settings (once; a later change is refused)."""
        lora = lora_config(cfg)
        if self.runtime is not None:
            if lora != self.lora:
                raise FailedPrecondition(f"the federation changed its LoRA settings mid-run ({self.lora} → {lora})")
            return self.runtime
        self.runtime = self.runtime_factory(self.cfg.mode, self.cfg.model, by_name(self.cfg.param_set), lora,
                                            fhe_target=self.cfg.fhe, channel=self.cfg,
                                            reconnect_seconds=self.cfg.reconnect_seconds,
                                            pad_pool_bytes=self.cfg.pad_pool_mb << 20)
        self.lora = lora
        client = self.runtime.client
        if client is not None:  # every hint in one stream up front: the first steps do not stall on them
            start = time.perf_counter()
            try:
                with progress_bar("hints", client.hint_count, self.cfg.progress) as update:
                    client.prefetch_hints(progress=update)
            except NodeMisbehaved as exc:  # fetched again, from the next node, as they are needed
                self.node_failed(exc, 0, "hint download")
            log.info("hints fetched", count=client.hint_count, bytes=client.bytes_down,
                     seconds=round(time.perf_counter() - start, 2))
        rng = (DeterministicRandomness(f"{self.cfg.replay_seed}/{self.worker_id}".encode())
               if self.cfg.replay_seed else os.urandom)
        self.trainer = Trainer(self.runtime.model, self.train_records, self.dp, pad_id=self.pad_id,
                               ledger=self.cfg.privacy_ledger, rng=rng,
                               max_physical_batch=self.cfg.physical_batch or None)
        self.global_state = lora_state_dict(self.runtime.model)  # the initial adapter: B = 0
        return self.runtime

    def evaluate_adapter(self, round_: int, cfg: TrainingConfig,
                         should_stop: Callable[[], bool] | None = None) -> float | None:
        """Held-out loss of the global adapter, recorded as the round's eval loss (None: none, or stopped)."""
        if not self.held_out or self.runtime is None or self.global_state is None:
            return None
        load_lora_state_dict(self.runtime.model, self.global_state)  # the global adapter, whatever trained since
        start = time.perf_counter()
        try:
            loss = held_out_loss(self.runtime.model, self.held_out, cfg.max_seq_len, pad_id=self.pad_id,
                                 should_stop=should_stop)
        except NodeMisbehaved as exc:  # no loss is recorded from an answer that failed verification
            self.node_failed(exc, round_, "evaluation")
            return None
        if loss is None:
            return None
        self.metric("evaluated", round=round_, eval_loss=loss, records=len(self.held_out),
                    seconds=round(time.perf_counter() - start, 3))
        return loss

    async def evaluate_and_report(self, client: CoordinatorClient, round_: int, cfg: TrainingConfig,
                                  should_stop: Callable[[], bool] | None = None) -> bool:
        """Evaluate the global adapter of round_ and tell the coordinator (the operator sees it in GetStatus).

        False if should_stop() interrupted it (the round's evaluation is then still owed).
        """
        loss = await asyncio.to_thread(self.evaluate_adapter, round_, cfg, should_stop)
        if loss is None:
            return should_stop is None or not should_stop()
        try:
            await client.report_evaluation(round_, self.worker_id, loss, len(self.held_out))
        except grpc.aio.AioRpcError as exc:  # the operator's view only: never worth failing a round over
            log.warning("eval loss not reported", round=round_, code=exc.code().name)
        return True

    def start_evaluation(self, client: CoordinatorClient, round_: int, cfg: TrainingConfig) -> None:
        """Evaluate round_'s aggregate in the background, off the next round's critical path."""
        stop = threading.Event()

        async def run() -> None:
            if not await self.evaluate_and_report(client, round_, cfg, stop.is_set):
                self._eval_owed.append((round_, cfg))  # interrupted by the next round: done after it submits
        self._evaluation = (asyncio.create_task(run()), stop)

    async def yield_model(self) -> None:
        """The next round needs the model: stop a background evaluation between two batches (it is then owed)."""
        running, self._evaluation = self._evaluation, None
        if running is not None:
            task, stop = running
            stop.set()
            await task

    async def pay_owed_evaluation(self, client: CoordinatorClient) -> None:
        """Evaluations a round put off (see on_started), now that this worker's update is in (or at the end)."""
        owed, self._eval_owed = self._eval_owed, []
        for round_, cfg in owed:
            await self.evaluate_and_report(client, round_, cfg)

    # ---- the FHE node -----------------------------------------------------------------------------

    def node_failed(self, exc: NodeMisbehaved, round_: int, during: str) -> None:
        """An answer of the node failed a check: count it, say so, and move to another node (fresh seed)."""
        self.node_failures += 1
        client = self.runtime.client if self.runtime is not None else None
        node = client.target if client is not None else ""
        log.error("FHE node answer rejected; nothing from it was used", round=round_, during=during, node=node,
                  error=str(exc))
        self.metric("node_rejected", round=round_, during=during, node=node, error=str(exc)[:500],
                    node_failures=self.node_failures)
        if client is not None:
            client.abandon(str(exc)[:200])

    def rotate_seed(self) -> None:
        """A fresh public seed (a new A) for the next round, its hints fetched before they are needed."""
        client = self.runtime.client if self.runtime is not None else None
        if client is None or self.cfg.rotate_seed_rounds == 0:
            return
        start = time.perf_counter()
        client.rotate()
        try:
            client.prefetch_hints()
        except NodeMisbehaved as exc:  # the hints are fetched again, from the next node, as they are needed
            self.node_failed(exc, 0, "hint download")
        log.info("FHE seed rotated", seeds=client.seeds_used, seconds=round(time.perf_counter() - start, 2))

    async def settle_rotation(self) -> None:
        """Wait for a seed rotation in progress (the client serves one caller at a time)."""
        task, self._rotation = self._rotation, None
        if task is not None:
            try:
                await task
            except (FedfheError, grpc.aio.AioRpcError) as exc:  # the next products reopen the session
                log.warning("FHE seed rotation failed; the next products will retry", error=str(exc)[:200])

    # ---- patches ----------------------------------------------------------------------------------

    def apply_patch(self, patch: FetchedPatch, expected_round: int = 0) -> dict[str, np.ndarray]:
        """Decrypt, verify, then load the global adapter; on any error the current adapter is left as it was."""
        mean = open_patch(self.key, self.federation_id, patch, expected_round=expected_round,
                          min_participants=self.cfg.min_aggregate)
        assert self.runtime is not None
        load_lora_state_dict(self.runtime.model, adapter_tensors(mean))  # strict: every name and shape first
        self.global_state = lora_state_dict(self.runtime.model)
        self.applied_round = patch.header.round
        return mean

    async def sync(self, client: CoordinatorClient, round_: int, cfg: TrainingConfig, *,
                   evaluate: bool = True) -> str | None:
        """Make the aggregate of `round_` the current global adapter (fetch, verify, apply, and evaluate it
        unless the caller evaluates it itself).

        Returns why it could not (the current adapter is then kept), or None.
        """
        if round_ == 0 or round_ == self.applied_round:
            return None
        if round_ < self.applied_round:
            why = (f"the coordinator offers round {round_}, older than this worker's adapter "
                   f"(round {self.applied_round})")
            self.metric("patch_rejected", round=round_, error=why)
            return why
        await asyncio.to_thread(self.ensure_model, cfg)
        try:
            patch = await client.get_patch(round_)
            mean = await asyncio.to_thread(self.apply_patch, patch, round_)
        except (FedfheError, KeyError, ValueError) as exc:  # tampered, wrong key, or not this model's adapter
            log.error("aggregate rejected; current adapter kept", round=round_, error=str(exc))
            self.metric("patch_rejected", round=round_, error=str(exc))
            return f"cannot apply the aggregate of round {round_}: {exc}"
        fields: dict[str, Any] = {"participants": [p.worker_id for p in patch.header.participants],
                                  "restored": patch.header.restored}
        if not cfg.ffa and any(k.startswith("sketch.") for k in mean):
            assert self.runtime is not None
            fields["lora_aggregation_error"] = aggregation_error(
                self.runtime, {k: v for k, v in mean.items() if k.startswith("sketch.")}, cfg.lora_seed)
        self.metric("applied", round=round_, **fields)
        if evaluate:
            await self.evaluate_and_report(client, round_, cfg)
        return None

    async def decline(self, client: CoordinatorClient, round_: int, why: str) -> None:
        await client.decline(self.worker_id, round_, why)
        self.metric("declined", round=round_, reason=why, epsilon=self.trainer.epsilon if self.trainer else 0.0)
        await self.pay_owed_evaluation(client)  # the model is free: it will not train this round

    # ---- rounds -----------------------------------------------------------------------------------

    async def _submit(self, client: CoordinatorClient, round_: int, result: RoundResult,
                      cfg: TrainingConfig) -> int:
        assert self.runtime is not None
        tensors = {k: v.numpy() for k, v in lora_state_dict(self.runtime.model).items()}
        if not cfg.ffa:
            tensors.update(sketches(self.runtime, cfg.lora_seed))
        enc = encrypt_update(self.key, self.federation_id, round_, self.worker_id, tensors, result.num_samples)
        payload, secrets = enc.payload, self.masks.secrets(round_)
        if secrets is not None:  # secure aggregation: self and pairwise masks over the pads
            words = np.frombuffer(payload, dtype="<u8").astype(np.uint64)
            secrets.mask(words)
            payload = words.astype("<u8").tobytes()
        header = coordinator_pb2.UpdateHeader(
            round=round_, num_samples=result.num_samples, epsilon_spent=result.epsilon,
            tensors=layout_to_proto(enc.layout), size_bytes=len(payload), digest=hashlib.sha256(payload).digest(),
            worker_id=self.worker_id, key_check_value=self.key.check_value(), no_dp=not self.dp.enabled,
            nonce=enc.nonce, masked=secrets is not None, train_loss=result.train_loss)
        await client.submit_update(header, payload)
        return len(payload)

    async def on_started(self, client: CoordinatorClient, started: coordinator_pb2.RoundStarted) -> None:
        r = started.round
        await self.settle_rotation()
        cfg = self.round_cfg = config_from_proto(started.config)
        why = self.refusal(started, cfg) if self.trainer is not None else None
        if why is not None:  # known before any mask setup: the others need not recover this worker's masks
            await self.decline(client, r, why)
            return
        joining = None
        if started.HasField("secure_aggregation") and started.secure_aggregation.enabled:
            # Keys out at once, while the model loads and the aggregate is fetched: the first round's model load
            # (SmolLM2, an FHE session, its hints) can outlast the keys phase on a busy machine.
            joining = asyncio.create_task(self.masks.join(client, started, self.federation_id, self.worker_id))
        try:
            await self._train_and_submit(client, started, cfg, joining)
        finally:
            if joining is not None and not joining.done():  # declined before the setup finished
                joining.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await joining

    def refusal(self, started: coordinator_pb2.RoundStarted, cfg: TrainingConfig) -> str | None:
        """Why this worker must decline the round whatever its adapter: its budget, or a deadline already past."""
        assert self.trainer is not None
        why = self.trainer.refusal(cfg)
        if why is None and time.time() * 1000 >= started.deadline_unix_ms:
            why = "the round's deadline has passed: no privacy budget is spent on an update that would be refused"
        return why

    async def _train_and_submit(self, client: CoordinatorClient, started: coordinator_pb2.RoundStarted,
                                cfg: TrainingConfig, joining: asyncio.Task[MemberSecrets | str] | None) -> None:
        r = started.round
        runtime = await asyncio.to_thread(self.ensure_model, cfg)  # may open the FHE session: blocking
        assert self.trainer is not None and self.global_state is not None
        applied_before = self.applied_round
        why = await self.sync(client, started.base_round, cfg, evaluate=False)
        load_lora_state_dict(runtime.model, self.global_state)  # a failed round's local training is dropped
        if why is not None:  # never train from an adapter the federation did not agree on
            await self.decline(client, r, why)
            return
        # Evaluations this round owes (the base model once; an aggregate caught up with here) come after this
        # worker's update or decline: never between the round's start and the others' mask setup and training.
        if self.applied_round != applied_before:
            self._eval_owed.append((self.applied_round, cfg))
        if not self.baseline_done and self.applied_round == 0:
            self.baseline_done = True
            self._eval_owed.append((0, cfg))
        why = self.refusal(started, cfg)
        if why is not None:
            await self.decline(client, r, why)
            return
        if joining is not None:
            joined = await joining
            if isinstance(joined, str):  # never train or submit without the round's masks
                await self.decline(client, r, joined)
                return
        fhe_before = runtime.client.bytes_up if runtime.client else 0
        try:
            with progress_bar(f"round {r} local steps", cfg.local_steps, self.cfg.progress) as update:
                result = await asyncio.to_thread(self.trainer.train_round, cfg, update)
        except NodeMisbehaved as exc:  # the step stopped before any state changed; this round's training is dropped
            load_lora_state_dict(runtime.model, self.global_state)
            self.masks.forget(r)
            await asyncio.to_thread(self.node_failed, exc, r, "training")
            await self.decline(client, r, f"an FHE node answer failed verification ({exc}); this round's "
                                          "local training was discarded")
            return
        fhe_up = (runtime.client.bytes_up if runtime.client else 0) - fhe_before
        fields = {"round": r, "train_loss": result.train_loss, "epsilon": result.epsilon, "no_dp": not self.dp.enabled,
                  "noise_multiplier": self.trainer.noise_multiplier, "delta": self.trainer.delta,
                  "steps": result.steps, "sampled": result.sampled, "num_samples": result.num_samples,
                  "train_seconds": round(result.seconds, 3), "fhe_bytes_up": fhe_up, "mode": self.cfg.mode}
        try:
            sent = await self._submit(client, r, result, cfg)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            self.metric("refused", **fields, reason=exc.details())  # late: it catches up next round
            return
        self.metric("submitted", **fields, update_bytes=sent, bytes_up=sent + fhe_up)
        await self.pay_owed_evaluation(client)  # while the other hospitals finish the round
        if runtime.client is not None and self.cfg.rotate_seed_rounds and r % self.cfg.rotate_seed_rounds == 0:
            # While the other hospitals finish this round: the next round's products use a new A.
            self._rotation = asyncio.create_task(asyncio.to_thread(self.rotate_seed))

    async def restore(self, client: CoordinatorClient) -> None:
        """Re-seed a coordinator that lost its buffers with the global adapter this worker holds."""
        assert self.global_state is not None
        enc = encrypt_update(self.key, self.federation_id, self.applied_round, self.worker_id,
                             {k: v.numpy() for k, v in self.global_state.items()}, 1, kind=RESTORE)
        header = coordinator_pb2.RestoreHeader(
            round=self.applied_round, tensors=layout_to_proto(enc.layout), size_bytes=len(enc.payload),
            digest=enc.digest, key_check_value=self.key.check_value(), worker_id=self.worker_id, nonce=enc.nonce,
            config=config_to_proto(self.round_cfg) if self.round_cfg else None)
        try:
            await client.restore_patch(header, enc.payload)
            self.metric("restored", round=self.applied_round)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:  # someone else restored it first
                raise
            log.info("restore not needed", reason=exc.details())

    async def session(self, client: CoordinatorClient) -> bool:
        """Register, catch up, follow the round events; True once the federation finished (False: stream ended)."""
        reg = await client.register(self.worker_id, len(self.train_records), self.key.check_value(),
                                    no_dp=not self.dp.enabled, pii_scrubbed=self.cfg.scrub_pii,
                                    epsilon_budget=self.dp.epsilon if self.dp.enabled else 0.0)
        if self.federation_id and reg.federation_id != self.federation_id:
            raise FailedPrecondition(f"coordinator now serves federation {reg.federation_id!r}, "
                                     f"not {self.federation_id!r}")
        self.worker_id, self.federation_id = reg.worker_id, reg.federation_id
        self.backoff.reset()
        log.info("registered", federation=reg.federation_id, latest_patch_round=reg.latest_patch_round)
        if reg.latest_patch_round == 0 and self.applied_round > 0:
            await self.restore(client)
        try:
            async for event in client.watch(self.worker_id):
                self.backoff.reset()
                kind = event.WhichOneof("event")
                if kind == "started":
                    await self.settle_round()
                    await self.yield_model()
                    # The round runs as its own task: its secure-aggregation events arrive on this stream meanwhile.
                    self._round_task = asyncio.create_task(self.on_started(client, event.started))
                elif kind in ("mask_keys", "mask_shares"):
                    self.masks.inbox.put_nowait(event)
                elif kind == "unmask":
                    await self.masks.on_unmask(client, event.unmask, self.worker_id)
                elif kind == "survivors_confirmed":
                    await self.masks.on_survivors_confirmed(client, event.survivors_confirmed, self.worker_id)
                elif kind == "closed":
                    await self.settle_round()
                    closed = event.closed
                    self.masks.forget(closed.round)
                    self.metric("round_closed", round=closed.round, reason=closed.reason,
                                aggregated=closed.outcome == coordinator_pb2.ROUND_OUTCOME_AGGREGATED)
                    if closed.outcome == coordinator_pb2.ROUND_OUTCOME_AGGREGATED and self.round_cfg is not None:
                        await self.settle_rotation()
                        await self.yield_model()
                        # Applied now (a rejected one keeps the adapter); evaluated in the background, so a
                        # round the operator starts at once does not wait for it.
                        if await self.sync(client, closed.round, self.round_cfg, evaluate=False) is None:
                            self.start_evaluation(client, closed.round, self.round_cfg)
                elif kind == "finished":
                    await self.settle_round()
                    if self._evaluation is not None:
                        await self._evaluation[0]  # the last round's loss, in full
                        self._evaluation = None
                    await self.pay_owed_evaluation(client)
                    self.metric("finished", last_round=event.finished.last_round,
                                epsilon=self.trainer.epsilon if self.trainer else 0.0)
                    return True
            return False
        finally:  # the stream ended: a round still waiting for setup events learns it, and finishes first
            self.masks.inbox.put_nowait(None)
            await self.settle_round(quiet=True)
            self.masks.drain()

    async def settle_round(self, *, quiet: bool = False) -> None:
        """Wait for the current round's task (its errors surface here, unless quiet after a broken stream)."""
        task, self._round_task = self._round_task, None
        if task is None:
            return
        try:
            await task
        except (grpc.aio.AioRpcError, ConnectionError) as exc:
            if not quiet:
                raise
            log.warning("the round in progress ended with the stream", error=str(exc)[:200])

    async def run(self) -> int:
        """Follow the federation, reconnecting to a coordinator that went away, until it finishes."""
        async with CoordinatorClient(self.cfg.coordinator, self.cfg) as client:
            await client.follow(self.session, self.backoff)
        return 0

    def close(self) -> None:
        if self.runtime is not None:
            self.runtime.close()

