"""What a newcomer hit following the README with their own notes, each fixed and pinned here.

- a privacy ledger (or metrics file) in a directory that does not exist: refused at start, not after a round;
- a hospital name without its key files: a clear "ask your federation admin" instead of a traceback;
- a second process with the same worker certificate: refused (ALREADY_EXISTS) while the first is connected;
- a wrong consortium key at join: exit 2 (a setup error), as the README says;
- `generate --compare-base`: the base model and the federated adapter from one run;
- evaluation off the round's critical path: a round started at once does not wait for the last one's.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import grpc
import pytest
from fedkit import FAST, RecordingWorker, RpcWorker, federation, make_data, start_coordinator

from common.certs import make_federation_pki
from common.updates import ConsortiumKey, write_key_file
from coordinator.state import Settings
from worker.__main__ import main


@pytest.fixture
def setup(tmp_path: Path) -> dict[str, Path]:
    data = make_data(tmp_path / "data", hospitals=1, records=8)
    key_file = tmp_path / "consortium.key"
    write_key_file(key_file, ConsortiumKey.generate())
    return {"data": data / "hospital-1" / "train.jsonl", "key": key_file, "root": tmp_path}


def join(setup: dict[str, Path], *extra: str, coordinator: str = "127.0.0.1:1") -> list[str]:
    return ["join", "--insecure", "--coordinator", coordinator, "--mode", "local", "--model", "tiny",
            "--data", str(setup["data"]), "--consortium-key", str(setup["key"]), "--identity", "hospital-1", *extra]


@pytest.mark.parametrize("flag", ["--privacy-ledger", "--metrics-file", "--log-file"])
def test_a_path_in_a_missing_directory_is_refused_at_start(setup, flag: str, capsys) -> None:
    missing = setup["root"] / "no-such-dir" / "file.json"
    ledger = [] if flag == "--privacy-ledger" else ["--privacy-ledger", str(setup["root"] / "ledger.json")]
    with pytest.raises(SystemExit) as exc:
        main(join(setup, *ledger, flag, str(missing)))
    assert exc.value.code == 2
    assert f"{flag} {missing}: the directory {missing.parent} does not exist" in capsys.readouterr().err


def test_missing_data_and_key_files_are_refused_at_start(setup, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(join(setup, "--no-dp", "--data", str(setup["root"] / "nope.jsonl")))
    assert exc.value.code == 2 and "--data" in capsys.readouterr().err


def test_an_identity_without_its_key_files_says_whom_to_ask(setup, capsys) -> None:
    pki = setup["root"] / "pki"
    make_federation_pki(pki, ["hospital-2"], ["localhost"])
    with pytest.raises(SystemExit) as exc:
        main(join(setup, "--no-dp", "--tls-dir", str(pki)))  # hospital-1's certificate is not there
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert "ask your federation admin for ca.pem, hospital-1.pem and hospital-1.key" in err
    assert "Traceback" not in err


async def test_a_second_process_with_the_same_certificate_is_refused(tmp_path: Path) -> None:
    running, _fed = await start_coordinator(Settings(min_workers=1, secagg=False))
    key = ConsortiumKey.generate()
    first, second = RpcWorker(running.address, "hospital-1", key), RpcWorker(running.address, "hospital-1", key)
    try:
        await first.join()
        await asyncio.sleep(0.2)
        await second.client.register("hospital-1", 10, key.check_value(), no_dp=False)
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            async for _ in second.client.watch("hospital-1"):
                pass
        assert exc.value.code() == grpc.StatusCode.ALREADY_EXISTS and "already connected" in exc.value.details()
        # once the first is gone, the same name connects again (a restarted worker)
        await first.leave()
        await asyncio.sleep(0.3)
        third = RpcWorker(running.address, "hospital-1", key)
        await third.join()
        ev = asyncio.create_task(third.next_event("started"))
        await asyncio.sleep(0.2)
        assert not ev.done()  # connected and waiting, not refused
        ev.cancel()
        await third.leave()
    finally:
        await second.leave()
        await running.stop(0)


async def test_a_wrong_consortium_key_at_join_exits_2(setup, capsys) -> None:
    pinned = ConsortiumKey.generate()  # the federation's key; the worker holds another
    running, _fed = await start_coordinator(Settings(min_workers=1, key_check_value=pinned.check_value()))
    try:
        code = await asyncio.to_thread(main, join(setup, "--no-dp", "--reconnect-seconds", "2",
                                                  coordinator=running.address))
    finally:
        await running.stop(0)
    assert code == 2
    assert "wrong consortium key" in capsys.readouterr().err


def test_generate_compares_with_the_base_model_in_one_run(capsys) -> None:
    assert main(["generate", "--mode", "local", "--model", "tiny", "--prompt", "Patient", "--max-new-tokens", "3",
                 "--compare-base", "--log-format", "json"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("base model:")
    assert not out.splitlines()[0].rstrip().endswith("''")  # it generated something


class SlowEvaluator(RecordingWorker):
    """Evaluates slowly (a hospital evaluating through the FHE node): only a new round makes it stop early."""

    def evaluate_adapter(self, round_, cfg, should_stop=None):  # type: ignore[no-untyped-def]
        if should_stop is not None:
            deadline = time.monotonic() + 20
            while not should_stop() and time.monotonic() < deadline:
                time.sleep(0.02)
            if should_stop():
                return None
        return super().evaluate_adapter(round_, cfg, should_stop)


async def test_evaluation_is_off_the_next_rounds_critical_path(tmp_path: Path) -> None:
    """A round started right after the last one closes does not wait for its evaluation; the loss comes after."""
    names = ["hospital-1", "hospital-2"]
    async with federation(tmp_path, names, Settings(min_workers=2, deadline_seconds=120),
                          classes={"hospital-1": SlowEvaluator}) as fx:
        assert (await fx.op.round(FAST)).outcome == 1
        assert (await fx.op.round(FAST)).outcome == 1  # started at once: hospital-1 was still "evaluating" round 1
        await fx.finish()
        events = [json.loads(line) for line in (fx.data / "hospital-1.metrics.jsonl").read_text().splitlines()]
        order = [(e["event"], e.get("round")) for e in events if e["event"] in ("submitted", "evaluated")]
        assert order.index(("submitted", 2)) < order.index(("evaluated", 1))  # trained first, evaluated after
        assert ("evaluated", 2) in order
        status = await fx.op.status()
        assert all({e.worker_id for e in r.evaluations} == set(names) for r in status.rounds)
