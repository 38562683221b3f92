"""Federated rounds in one process: real gRPC servers on port 0, workers as asyncio tasks, the tiny model.

Checks the must-shows of the federation issue that need the whole loop: the
aggregate a worker applies equals the plaintext sample-weighted FedAvg,
nothing plaintext reaches a file, patch buffers are anonymous mappings, and a
tampered aggregate or a wrong key never touches the current adapter.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from fedkit import FAST, federation, join_config, make_worker, start_node

from common.config import ChannelConfig
from common.lwe.params import EXACT
from common.updates import ConsortiumKey, TamperedAggregate, WrongConsortiumKey, write_key_file
from coordinator.state import Settings
from worker.__main__ import global_adapter
from worker.config import GenerateConfig
from worker.coordinator_client import CoordinatorClient, FetchedPatch
from worker.lora import load_lora_state_dict, lora_state_dict
from worker.model import generate
from worker.runtime import build

pytestmark = pytest.mark.timeout(300)


def fedavg(submitted: list[dict]) -> dict[str, np.ndarray]:
    total = sum(s["n"] for s in submitted)
    return {k: sum(s["n"] * s["state"][k].astype(np.float64) for s in submitted) / total
            for k in submitted[0]["state"]}


def rel_err(got: dict, want: dict) -> float:
    num = sum(float(np.sum((np.asarray(got[k], np.float64) - want[k]) ** 2)) for k in want)
    return (num / sum(float(np.sum(want[k] ** 2)) for k in want)) ** 0.5


def anonymous_mapping(address: int) -> tuple[str, list[str]]:
    """The /proc/self/smaps entry holding address: (its pathname, its VmFlags)."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \S+\s*(.*)$", line)
        if m and int(m.group(1), 16) <= address < int(m.group(2), 16):
            flags = next(ln for ln in lines[i + 1:] if ln.startswith("VmFlags:"))
            return m.group(3), flags.split()[1:]
    raise AssertionError(f"address {address:#x} is not mapped")


def scan_for(roots: list[Path], needles: dict[str, bytes], skip: set[Path]) -> list[str]:
    hits = []
    for root in roots:
        for path in root.rglob("*"):
            if not path.is_file() or path in skip or path.is_symlink():
                continue
            try:
                data = path.read_bytes()
            except OSError:
                continue
            hits += [f"{path}: {what}" for what, needle in needles.items() if needle in data]
    return hits


async def check_generate(coordinator: str, key_file: Path, tmp_path: Path) -> None:
    """`generate` under the federated adapter differs from the base model; a wrong key generates nothing."""
    prompt = "Patient admitted with chest pain. Assessment:"
    cfg = GenerateConfig(insecure=True, coordinator=coordinator, consortium_key=key_file, mode="local",
                         model="tiny", prompt=prompt, max_new_tokens=16)
    lora, state, round_ = await global_adapter(cfg)
    assert round_ == 2
    rt = build("local", "tiny", EXACT, lora)
    ids = torch.tensor([list(prompt.encode())])
    with torch.no_grad():
        base = rt.model(ids)
        load_lora_state_dict(rt.model, state)
        tuned = rt.model(ids)
    # two short rounds move the logits, not necessarily the greedy tokens (the SmolLM2 run shows those change)
    assert (tuned - base).abs().max() > 1e-2
    assert len(generate(rt.model, ids, 4)) == ids.shape[1] + 4
    wrong = tmp_path / "wrong.key"
    write_key_file(wrong, ConsortiumKey.generate())
    with pytest.raises(WrongConsortiumKey):
        await global_adapter(replace(cfg, consortium_key=wrong))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "generate", "--insecure", "--mode", "local", "--coordinator", coordinator,
        "--consortium-key", str(wrong), "--prompt", prompt, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 2 and out == b"" and b"wrong consortium key" in err, err[-500:]


async def test_rounds_aggregate_exactly_and_leave_no_plaintext_behind(tmp_path: Path) -> None:
    node = await start_node()
    names = ["hospital-1", "hospital-2", "hospital-3"]
    buffers = []
    try:
        # hospital-1 computes through the FHE node; the others multiply the public weights themselves
        async with federation(tmp_path, names, Settings(min_workers=2, deadline_seconds=120, keep_rounds=2),
                              node=node.address, modes={"hospital-1": "fhe"},
                              overrides={"hospital-3": {"no_dp": True}}) as fx:
            for r in (1, 2):
                closed = await fx.op.round(FAST)
                assert closed.round == r and closed.outcome == 1, closed
                assert {p.worker_id for p in closed.participants} == set(names)
                assert [p.no_dp for p in sorted(closed.participants, key=lambda p: p.worker_id)] == [
                    False, False, True]
                buf = fx.fed.store.get(r)
                assert buf is not None and not buf.closed
                buffers.append(buf)
                path, flags = anonymous_mapping(buf.address)
                assert path == "", path  # anonymous: no file behind it
                assert "dd" in flags  # MADV_DONTDUMP: excluded from core dumps
                assert ("lo" in flags) == buf.locked
                # every worker applies the same global adapter: the sample-weighted FedAvg of what was submitted
                await fx.wait_applied(r)
                want = fedavg([w.submitted[r] for w in fx.workers.values()])
                for w in fx.workers.values():
                    got = {k: v.numpy() for k, v in w.global_state.items()}
                    assert rel_err(got, want) <= 2.0 ** -20
                    assert max(float(np.abs(v).max()) for v in want.values()) > 1e-4  # not the all-zero adapter
                if r == 1:  # started from B = 0: the global adapter IS the FedAvg of the deltas
                    deltas = fedavg([w.submitted[1] for w in fx.workers.values()])
                    assert rel_err(got, deltas) <= 2.0 ** -20
            status = await fx.op.status()
            assert status.current_round == 2 and status.buffer_bytes_total > 0
            assert [r.state for r in status.rounds] == ["aggregated", "aggregated"]
            eps = {w.worker_id: w.epsilon for w in status.workers}
            assert 0 < eps["hospital-1"] < 8 and eps["hospital-3"] == float("inf")

            # no plaintext adapter or key bytes in any file under the run's directories or the temp dir
            raw = fx.key.raw_bytes()
            needles = {"key": raw, "key-hex": raw.hex().encode(), "key-b64": base64.b64encode(raw)[:40]}
            for name, w in fx.workers.items():
                for tname, t in w.global_state.items():
                    arr = t.numpy().ravel()
                    i = int(np.argmax(np.abs(arr)))
                    needles[f"{name}:{tname}:f32"] = arr[max(0, i - 2):i + 2].tobytes()
                    needles[f"{name}:{tname}:f64"] = arr[max(0, i - 2):i + 2].astype(np.float64).tobytes()
            hits = scan_for([tmp_path, Path(tempfile.gettempdir())], needles, skip={fx.key_file})
            assert not hits, hits[:5]

            await check_generate(fx.coord.address, fx.key_file, tmp_path)
            await fx.finish()
            metrics = [json.loads(line) for line in (fx.data / "hospital-1.metrics.jsonl").read_text().splitlines()]
            events = [(m["event"], m.get("round")) for m in metrics]
            assert ("evaluated", 0) in events and ("submitted", 2) in events and ("evaluated", 2) in events
            sub = next(m for m in metrics if m["event"] == "submitted")
            assert sub["fhe_bytes_up"] > 0 and sub["update_bytes"] > 0 and sub["mode"] == "fhe"
    finally:
        await node.stop(0)
    assert all(b.closed for b in buffers)  # zeroed and unmapped at shutdown


async def test_tampered_aggregate_or_wrong_key_leaves_the_adapter_untouched(tmp_path: Path) -> None:
    names = ["hospital-1", "hospital-2"]
    async with federation(tmp_path, names, Settings(min_workers=2, deadline_seconds=60)) as fx:
        assert (await fx.op.round(FAST)).outcome == 1
        await fx.wait_applied(1)
        w = fx.workers["hospital-1"]
        before = {k: v.clone() for k, v in lora_state_dict(w.runtime.model).items()}
        client = CoordinatorClient(fx.coord.address, ChannelConfig(insecure=True))
        good = await client.get_patch(1)
        rng = np.random.default_rng(0)
        for bit in rng.choice(len(good.payload) * 8, 40, replace=False):
            bad = bytearray(good.payload)
            bad[bit // 8] ^= 1 << (bit % 8)
            with pytest.raises(TamperedAggregate):
                w.apply_patch(FetchedPatch(good.header, bytes(bad)))
        wrong = make_worker(join_config("hospital-1", fx.data, fx.key_file, fx.coord.address, "", mode="local"),
                            ConsortiumKey.generate())
        wrong.runtime, wrong.lora, wrong.federation_id = w.runtime, w.lora, w.federation_id
        with pytest.raises(WrongConsortiumKey, match="wrong consortium key"):
            wrong.apply_patch(good)
        # an older round served in place of the one asked for (a rollback) is refused
        with pytest.raises(TamperedAggregate, match="asked for the aggregate of round 2"):
            w.apply_patch(good, expected_round=2)
        w.applied_round = 3
        why = await w.sync(client, 1, w.round_cfg)
        assert why is not None and "older" in why
        w.applied_round = 1
        after = lora_state_dict(w.runtime.model)
        assert all(torch.equal(before[k], after[k]) for k in before)
        # the coordinator refuses a worker whose key differs from the federation's
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await wrong.session(client)
        assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "wrong consortium key" in exc.value.details()
        await client.close()
        await fx.finish()
