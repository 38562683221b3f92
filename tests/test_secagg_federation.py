"""Secure aggregation over gRPC with real workers: masked uploads, dropouts, a round below the threshold, and a
coordinator that substitutes or replays a hospital's keys."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fedkit import FAST, RecordingWorker, federation
from scipy import stats

from common.updates import _pads
from coordinator.masking import MaskPhase
from coordinator.state import Event, Federation, MaskKeysEvent, Settings, Upload

pytestmark = pytest.mark.timeout(600)
NAMES = ["hospital-1", "hospital-2", "hospital-3"]


class DropsOut(RecordingWorker):
    """Joins the mask set of round `drop_round`, then declines instead of uploading (a dropout)."""

    drop_round = 1

    async def _submit(self, client, round_, result, cfg):  # type: ignore[no-untyped-def]
        if round_ == self.drop_round:
            await self.decline(client, round_, "test: dropped after the mask setup")
            return 0
        return await super()._submit(client, round_, result, cfg)


def keys_phase_over(fed: Federation, round_: int = 1) -> None:
    """Block (a worker thread) until the coordinator's keys phase of the round is over."""
    while True:
        rnd = fed.rounds.get(round_)
        if rnd is not None and rnd.mask is not None and rnd.mask.phase != MaskPhase.KEYS:
            return
        time.sleep(0.05)


class SlowToLoad(RecordingWorker):
    """Its first model load lasts until the keys phase is over (SmolLM2, an FHE session and its hints on a busy
    machine once outlasted it): its keys must already be out by then."""

    fed: Federation

    def ensure_model(self, cfg):  # type: ignore[no-untyped-def]
        if self.runtime is None:
            keys_phase_over(self.fed)  # ensure_model runs in a worker thread
        return super().ensure_model(cfg)


class Recording(Federation):
    """The coordinator's view: every upload exactly as it arrived (the scratch buffer before it is added)."""

    uploads: dict[tuple[int, str], bytes]

    def _finish_update(self, upload: Upload) -> None:
        self.uploads[(upload.claim.round, upload.worker)] = upload.scratch.read()
        super()._finish_update(upload)


class Substituting(Federation):
    """A coordinator that swaps one member's keys: another's (mode "forge") or its own of an earlier round
    ("replay"); "pass" relays them untouched (and remembers them)."""

    mode = "forge"
    seen: dict[int, MaskKeysEvent]

    def _send(self, worker: str, event: Event) -> None:
        if isinstance(event, MaskKeysEvent):
            self.seen.setdefault(event.round, event)
        if isinstance(event, MaskKeysEvent) and self.mode != "pass":
            victim = event.members[0]
            if self.mode == "forge":
                other = event.members[-1]
                swapped = dataclasses.replace(victim, cipher_public=other.cipher_public,
                                              mask_public=other.mask_public)
            else:
                earlier = self.seen.get(event.round - 1)
                swapped = earlier.members[0] if earlier is not None else victim
            event = dataclasses.replace(event, members=(swapped, *event.members[1:]))
        super()._send(worker, event)


def patch_federation(monkeypatch, cls: type[Federation], **attrs: Any) -> None:  # type: ignore[no-untyped-def]
    import fedkit

    def make(federation_id: str, settings: Settings) -> Federation:
        fed = cls(federation_id, settings)
        for k, v in attrs.items():
            setattr(fed, k, v)
        return fed
    monkeypatch.setattr(fedkit, "Federation", make)


async def test_masked_uploads_look_uniform_and_getstatus_shows_the_recovery(tmp_path: Path, monkeypatch) -> None:
    patch_federation(monkeypatch, Recording, uploads={})
    async with federation(tmp_path, NAMES, Settings(min_workers=2, deadline_seconds=120),
                          classes={"hospital-3": DropsOut}) as fx:
        closed = await fx.op.round(FAST)
        assert closed.outcome == 1 and {p.worker_id for p in closed.participants} == set(NAMES[:2])
        assert "masks of hospital-3 recovered from shares" in closed.reason
        status = await fx.op.status()
        assert status.secure_aggregation.enabled and status.secure_aggregation.threshold == 0  # majority
        assert all(w.pii_scrubbed for w in status.workers)  # each hospital scrubs its notes (the default)
        rec = status.rounds[0].mask_recovery
        assert (rec.threshold, rec.phase, list(rec.members), list(rec.survivors), list(rec.dropped)) == (
            2, "done", NAMES, NAMES[:2], ["hospital-3"])
        # The coordinator with the consortium key (one colluding hospital) strips hospital-1's pad:
        # the rest is uniform bytes (the masks), while the aggregate decrypts to the exact FedAvg.
        fed = fx.fed
        assert isinstance(fed, Recording)
        raw = fed.uploads[(1, "hospital-1")]
        participants = {p.worker_id: p for p in closed.participants}
        w = fx.workers["hospital-1"]
        assert w.runtime is not None
        from common.updates import TensorLayout
        layout = TensorLayout.of({k: v for k, v in w.submitted[1]["state"].items()})
        with np.errstate(over="ignore"):
            seen = np.frombuffer(raw, dtype="<u8") - _pads(fx.key, "update", fed.federation_id, 1, "hospital-1",
                                                          participants["hospital-1"].nonce, layout)
        counts = np.bincount(seen.astype("<u8").view(np.uint8), minlength=256)
        assert stats.chisquare(counts).pvalue > 1e-3
        await fx.wait_applied(1, NAMES[:2])
        await fx.finish()


async def test_fewer_survivors_than_the_threshold_fail_cleanly_and_the_next_round_works(tmp_path: Path) -> None:
    async with federation(tmp_path, NAMES, Settings(min_workers=1, deadline_seconds=120, secagg_threshold=3),
                          classes={"hospital-3": DropsOut},
                          overrides={n: {"min_aggregate": 1} for n in NAMES}) as fx:
        failed = await fx.op.round(FAST)
        assert failed.outcome == 2 and "2 survivor(s), fewer than the threshold 3" in failed.reason
        assert fx.fed.store.rounds() == [] and fx.fed.rounds[1].accumulator is None  # nothing kept
        status = await fx.op.status()
        assert status.rounds[0].state == "failed" and status.rounds[0].mask_recovery.phase == "failed"
        second = await fx.op.round(FAST)
        assert second.outcome == 1 and len(second.participants) == 3
        await fx.wait_applied(2)
        await fx.finish()


@pytest.mark.parametrize("mode", ["forge", "replay"])
async def test_a_substituted_or_replayed_key_is_refused(tmp_path: Path, monkeypatch, mode: str) -> None:
    patch_federation(monkeypatch, Substituting, mode=mode, seen={})
    async with federation(tmp_path, NAMES, Settings(min_workers=1, deadline_seconds=240),
                          overrides={n: {"min_aggregate": 1} for n in NAMES}) as fx:
        if mode == "replay":  # round 1 records genuine keys (its own first member's are passed through)
            fx.fed.mode = "pass"
            assert (await fx.op.round(FAST)).outcome == 1
            fx.fed.mode = "replay"
        closed = await fx.op.round(FAST)
        assert closed.outcome == 2 and closed.participants == []  # nobody trains on a substituted mask set
        status = await fx.op.status()
        reasons = {w.worker_id: w.declined for w in status.workers}
        assert all("not signed by its certificate" in reasons[n] for n in NAMES), reasons
        await fx.finish()


class LateKeys(SlowToLoad):
    """Positive control: keys sent only after that load, as the worker once did."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        join = self.masks.join

        async def late(*a, **kw):  # type: ignore[no-untyped-def]
            await asyncio.to_thread(keys_phase_over, self.fed)
            return await join(*a, **kw)
        self.masks.join = late  # type: ignore[method-assign]


@pytest.mark.parametrize("cls", [SlowToLoad, LateKeys])
async def test_a_worker_whose_first_model_load_outlasts_the_keys_phase_still_takes_part(
        tmp_path: Path, cls: type[SlowToLoad]) -> None:
    async with federation(tmp_path, NAMES, Settings(min_workers=2, deadline_seconds=240, secagg_phase_seconds=20),
                          classes={"hospital-3": cls}) as fx:
        slow = fx.workers["hospital-3"]
        assert isinstance(slow, SlowToLoad)
        slow.fed = fx.fed
        closed = await fx.op.round(FAST)
        got = {p.worker_id for p in closed.participants}
        if cls is SlowToLoad:  # its keys went out at once: the phase closed without waiting for its timer
            assert got == set(NAMES), closed.reason
            assert list((await fx.op.status()).rounds[0].mask_recovery.dropped) == []
        else:  # the test sees the failure it guards against: the phase closed at its timer without hospital-3
            declined = {w.worker_id: w.declined for w in (await fx.op.status()).workers}
            assert got == set(NAMES[:2]) and "keys phase" in declined["hospital-3"], declined
        await fx.finish()
