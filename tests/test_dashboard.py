"""fedfhe-dashboard: the status view model, who may look (loopback, HTTPS + token, operator certificate only),
and the page itself in headless Chromium (Debian's `chromium`, driven by Playwright) while a federation runs
and while its coordinator is unreachable.

The browser tests skip where Playwright or Chromium is missing. FEDFHE_UPDATE_SCREENSHOT=1 also writes the
live page's screenshot to docs/dashboard.png.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fedkit import FAST, Operator, RpcWorker, federation, start_coordinator, start_node

from common.config import ConfigError
from common.tls import TlsError
from common.updates import ConsortiumKey
from coordinator.dashboard import Dashboard, DashboardConfig, authorized, event_text, status_view
from coordinator.state import Settings
from fedfhe.v1 import coordinator_pb2 as pb

CHROMIUM = Path(os.environ.get("FEDFHE_CHROMIUM", "/usr/bin/chromium"))
# Playwright cannot fetch its own browser here: it drives Debian's, with nothing that phones home.
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"]
DOCS_SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "dashboard.png"
HOSTILE = '<img src=x onerror="window.__pwned = 1"><script>window.__pwned = 2</script> & "budget"'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------------------------------
# The view model (no browser, no network)
# --------------------------------------------------------------------------------------------------


def full_status() -> pb.GetStatusResponse:
    return pb.GetStatusResponse(
        federation_id="fed-x", current_round=2, min_workers=2, keep_rounds=3, buffers_locked=True,
        buffer_bytes_total=4096, finished=False,
        secure_aggregation=pb.SecureAggregation(enabled=True, threshold=0, scheme="pairwise+self masks"),
        baseline_evaluations=[pb.Evaluation(worker_id="a", eval_loss=4.0, records=30),
                              pb.Evaluation(worker_id="b", eval_loss=2.0, records=10)],
        workers=[pb.WorkerStatus(worker_id="b", connected=True, last_round=2, epsilon=2.0, epsilon_budget=8.0,
                                 num_records=40, pii_scrubbed=True),
                 pb.WorkerStatus(worker_id="a", connected=False, epsilon=math.inf, no_dp=True, declined="round 2: x")],
        rounds=[
            pb.RoundStatus(round=2, state="failed", reason="1 update(s)", eligible=["b", "a"],
                           participants=[pb.Participant(worker_id="b", num_samples=8, epsilon=2.0,
                                                        train_loss=math.nan)],
                           declines=[pb.Decline(worker_id="a", reason="DP budget: ε would reach 9.1 > 8.0")]),
            pb.RoundStatus(round=1, state="aggregated", seconds=3.5, bytes_received=1000, buffer_bytes=512,
                           eval_loss=2.5, evaluations=[pb.Evaluation(worker_id="b", eval_loss=2.5, records=10)],
                           participants=[pb.Participant(worker_id="b", num_samples=8, epsilon=1.0, train_loss=3.0),
                                         pb.Participant(worker_id="a", num_samples=4, no_dp=True, train_loss=4.0),
                                         pb.Participant(worker_id="c", num_samples=4, train_loss=0.0)],
                           mask_recovery=pb.MaskRecovery(threshold=2, phase="done", members=["a", "b", "c"],
                                                         survivors=["a", "b"], dropped=["c"], revealed_by=["a", "b"])),
        ])


def test_status_view_carries_what_the_page_shows() -> None:
    v = status_view(full_status())
    json.dumps(v, allow_nan=False)  # the page's JSON.parse accepts it: no NaN, no infinity
    assert v["federation_id"] == "fed-x" and v["buffers_locked"] and v["buffer_bytes_total"] == 4096
    assert v["secure_aggregation"] == {"enabled": True, "threshold": None, "scheme": "pairwise+self masks"}
    assert v["baseline_eval_loss"] == pytest.approx((4.0 * 30 + 2.0 * 10) / 40)  # weighted by held-out notes
    assert [w["worker_id"] for w in v["workers"]] == ["a", "b"] and [r["round"] for r in v["rounds"]] == [1, 2]
    a, b = v["workers"]
    assert b["epsilon"] == 2.0 and b["epsilon_budget"] == 8.0 and b["budget_used"] == 0.25 and b["pii_scrubbed"]
    assert a["epsilon"] is None and a["epsilon_budget"] is None and not a["dp"] and a["declined"] == "round 2: x"
    r1, r2 = v["rounds"]
    assert r1["train_loss"] == 3.5  # mean over participants that reported one (0 is proto3's unset)
    assert r1["eval_loss"] == 2.5 and r1["seconds"] == 3.5 and r1["bytes_received"] == 1000
    assert r1["mask_recovery"]["dropped"] == ["c"] and r1["mask_recovery"]["threshold"] == 2
    assert r2["train_loss"] is None and r2["eval_loss"] is None and r2["mask_recovery"] is None
    assert r2["declines"] == [{"worker_id": "a", "reason": "DP budget: ε would reach 9.1 > 8.0"}]
    assert r2["eligible"] == ["a", "b"] and r2["state"] == "failed"


def test_status_view_of_an_older_coordinator_reads_missing_fields_as_absent() -> None:
    v = status_view(pb.GetStatusResponse(federation_id="old", workers=[pb.WorkerStatus(worker_id="a", epsilon=1.0)],
                                         rounds=[pb.RoundStatus(round=1, state="aggregated")]))
    json.dumps(v, allow_nan=False)
    assert v["secure_aggregation"] is None and v["baseline_eval_loss"] is None and v["min_workers"] is None
    assert v["workers"][0]["epsilon_budget"] is None and v["workers"][0]["budget_used"] is None
    assert v["rounds"][0]["mask_recovery"] is None and v["rounds"][0]["eval_loss"] is None
    assert status_view(pb.GetStatusResponse())["workers"] == []


def test_event_lines() -> None:
    closed = pb.WatchRoundsResponse(closed=pb.RoundClosed(round=3, outcome=pb.ROUND_OUTCOME_AGGREGATED,
                                                          participants=[pb.Participant()] * 2, total_samples=16,
                                                          reason="all answered"))
    assert event_text(closed) == "round 3 aggregated: 2 participants, 16 samples (all answered)"
    assert event_text(pb.WatchRoundsResponse(finished=pb.FederationFinished(last_round=3))).endswith("round 3")
    assert event_text(pb.WatchRoundsResponse()) == "event unknown"


# --------------------------------------------------------------------------------------------------
# Who may look
# --------------------------------------------------------------------------------------------------


def test_a_non_loopback_address_without_tls_and_token_is_refused() -> None:
    for extra in ([], ["--tls-dir", "/nonexistent"]):
        out = subprocess.run([sys.executable, "-m", "coordinator.dashboard", "--coordinator", "127.0.0.1:1",
                              "--insecure", "--listen", "0.0.0.0:0", *extra],
                             capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode == 2, out.stderr
        assert "not a loopback address" in out.stderr and "--auth-token-file" in out.stderr
        assert "Traceback" not in out.stderr


def token_file(path: Path, token: str, mode: int = 0o600) -> Path:
    path.write_text(token + "\n")
    path.chmod(mode)
    return path


async def test_token_file_and_certificate_checks_refuse_to_start(tmp_path: Path, tls_dir: Path) -> None:
    good = "t" * 32

    def cfg(**kw: Any) -> DashboardConfig:
        return DashboardConfig(**{"coordinator": "127.0.0.1:1", "tls_dir": tls_dir, "listen": "127.0.0.1:0", **kw})

    cases: list[tuple[DashboardConfig, type[Exception], str]] = [
        (cfg(auth_token_file=token_file(tmp_path / "open", good, 0o644)), ConfigError, "chmod 600"),
        (cfg(auth_token_file=token_file(tmp_path / "short", "abc")), ConfigError, "at least 16"),
        (cfg(auth_token_file=tmp_path / "missing"), ConfigError, "auth-token-file"),
        # a worker certificate on WatchRounds would be counted as that hospital
        (cfg(identity="hospital-1"), TlsError, "operator certificate"),
    ]
    for c, exc, words in cases:
        with pytest.raises(exc, match=words):
            await Dashboard(c).start()


def test_authorization_header_forms() -> None:
    import hashlib

    digest = hashlib.sha256(b"s3cret-token-0123456789").digest()
    basic = base64.b64encode(b"anyone:s3cret-token-0123456789").decode()
    assert authorized("Bearer s3cret-token-0123456789", digest) and authorized(f"Basic {basic}", digest)
    for bad in (None, "", "Bearer nope", "Basic !!!", f"Digest {basic}", "Bearer s3cret-token-012345678"):
        assert not authorized(bad, digest)


async def test_https_and_token_on_a_non_loopback_address(tmp_path: Path, tls_dir: Path) -> None:
    token = "0123456789abcdef0123456789abcdef"
    cfg = DashboardConfig(coordinator="127.0.0.1:1", tls_dir=tls_dir, listen="0.0.0.0:0",
                          auth_token_file=token_file(tmp_path / "token", token))
    async with Dashboard(cfg) as dash:
        assert dash.url.startswith("https://")
        url = f"https://127.0.0.1:{dash.url.rsplit(':', 1)[1].rstrip('/')}/api/status"
        ca = ssl.create_default_context(cafile=str(tls_dir / "ca.pem"))  # the federation's server certificate
        async with aiohttp.ClientSession() as http:
            async with http.get(url, ssl=ca) as r:
                assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Basic")
            async with http.get(url, ssl=ca, headers={"Authorization": "Bearer wrong-token-0123456789"}) as r:
                assert r.status == 401
            async with http.get(url, ssl=ca, headers={"Authorization": f"Bearer {token}"}) as r:
                assert r.status == 200 and (await r.json())["coordinator"]["address"] == "127.0.0.1:1"
            basic = base64.b64encode(f"operator:{token}".encode()).decode()  # what a browser sends after its prompt
            async with http.get(url, ssl=ca, headers={"Authorization": f"Basic {basic}"}) as r:
                assert r.status == 200 and "Content-Security-Policy" in r.headers
            with pytest.raises(aiohttp.ClientError):  # no plaintext on that port
                async with http.get(url.replace("https", "http")) as r:
                    await r.read()


async def test_operator_certificate_over_mtls_and_node_health(tls_dir: Path) -> None:
    coord, fed = await start_coordinator(Settings(), federation_id="fed-mtls", tls_dir=tls_dir)
    try:
        # any fedfhe server answers grpc.health.v1 to a certificate of the federation CA (the node's FheService
        # takes only workers'; its health service takes the operator's too)
        cfg = DashboardConfig(coordinator=coord.address, tls_dir=tls_dir, fhe=coord.address, listen="127.0.0.1:0")
        async with Dashboard(cfg) as dash, aiohttp.ClientSession() as http:
            for _ in range(100):
                async with http.get(dash.url + "api/status") as r:
                    view = await r.json()
                if view["coordinator"]["connected"] and view["node"]["state"] == "SERVING":
                    break
                await asyncio.sleep(0.1)
            assert view["status"]["federation_id"] == "fed-mtls", view
            assert view["node"]["state"] == "SERVING", view
            async with http.get(dash.url, headers={"Host": "dashboard.attacker.example"}) as r:
                assert r.status == 403  # DNS rebinding: a loopback dashboard answers loopback names only
    finally:
        await coord.stop(0)
        fed.close()


# --------------------------------------------------------------------------------------------------
# The page in a real browser
# --------------------------------------------------------------------------------------------------


@dataclass
class Browser:
    page: Any  # playwright.async_api.Page (Playwright is optional)
    errors: list[str]
    expect: Any


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    try:
        from playwright.async_api import async_playwright, expect
    except ImportError:
        pytest.skip("Playwright is not installed (pip install playwright==1.65.2): browser tests skipped")
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium, or set FEDFHE_CHROMIUM): "
                    "browser tests skipped")
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS, headless=True)
        page = await chromium.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
        page.on("console", lambda msg: errors.append(f"console {msg.type}: {msg.text}")
                if msg.type in ("error", "warning") else None)
        try:
            yield Browser(page, errors, expect)
        finally:
            await chromium.close()


async def test_the_page_follows_a_live_federation(tmp_path: Path, browser: Browser) -> None:
    page, expect = browser.page, browser.expect
    names = ["hospital-1", "hospital-2"]
    node = await start_node()
    try:
        async with federation(tmp_path, names, Settings(min_workers=2, deadline_seconds=120)) as fx, \
                Dashboard(DashboardConfig(coordinator=fx.coord.address, insecure=True, fhe=node.address,
                                          listen="127.0.0.1:0", poll_seconds=0.5)) as dash:
            await page.goto(dash.url)
            await expect(page.locator("#federation-id")).to_have_text("fed-test", timeout=15_000)
            await expect(page.locator("#connection")).to_have_text("live")
            assert (await fx.op.round(FAST)).outcome == pb.ROUND_OUTCOME_AGGREGATED
            await expect(page.locator('#rounds tr[data-round="1"] .state')).to_contain_text("aggregated")

            # round 2: a third hospital joins and declines, with a reason that must stay text
            third = RpcWorker(fx.coord.address, "hospital-3", fx.key)
            await third.join()
            await fx.op.wait_connected([*names, "hospital-3"])
            reason = "DP budget: ε would reach 9.1 > 8.0"

            async def decline(started: pb.StartRoundResponse) -> None:
                await third.stub.DeclineRound(pb.DeclineRoundRequest(round=started.round, reason=reason,
                                                                     worker_id="hospital-3"))
            _, closed = await fx.op.run_round(FAST, after_start=decline, timeout=120)
            assert closed.outcome == pb.ROUND_OUTCOME_AGGREGATED
            row = page.locator('#rounds tr[data-round="2"]')
            await expect(row.locator(".state")).to_contain_text("aggregated")
            await expect(row.locator(".decline")).to_have_text(f"hospital-3: {reason}")
            await expect(row.locator(".eval-loss")).not_to_have_text("–", timeout=30_000)  # evaluations arrive late

            # ε on the page is GetStatus's, to the last bit
            status = await fx.op.status()
            assert {w.worker_id for w in status.workers} == {*names, "hospital-3"}
            for w in status.workers:
                cell = page.locator(f'#hospitals tr[data-worker="{w.worker_id}"] .epsilon-value')
                await expect(cell).to_have_text(f"{w.epsilon:.3f}")
                assert float(await cell.get_attribute("data-value")) == w.epsilon
            assert all(w.epsilon > 0 for w in status.workers if w.worker_id in names)
            await expect(page.locator('#hospitals tr[data-worker="hospital-1"] .pii')).to_have_text("yes")
            await expect(page.locator("#node-state")).to_have_text("SERVING")
            await expect(page.locator("#secagg-state")).to_have_text("on")
            assert await page.evaluate("typeof Chart") == "function"

            shot = tmp_path / "dashboard.png"
            await page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 20_000
            if os.environ.get("FEDFHE_UPDATE_SCREENSHOT") == "1":
                shutil.copyfile(shot, DOCS_SCREENSHOT)

            await fx.finish()
            await expect(page.locator("#round-detail")).to_contain_text("federation finished")
            await third.leave()
    finally:
        await node.stop(0)
    assert browser.errors == []


async def test_an_unreachable_coordinator_shows_disconnected_then_recovers(tmp_path: Path, browser: Browser) -> None:
    page, expect = browser.page, browser.expect
    port = free_port()  # nothing listens there yet
    cfg = DashboardConfig(coordinator=f"127.0.0.1:{port}", insecure=True, fhe=f"127.0.0.1:{free_port()}",
                          listen="127.0.0.1:0", poll_seconds=0.5)
    async with Dashboard(cfg) as dash:
        await page.goto(dash.url)
        banner = page.locator("#banner")
        await expect(banner).to_contain_text("disconnected, retrying", timeout=15_000)
        await expect(banner).to_contain_text("UNAVAILABLE")
        await expect(page.locator("#connection")).to_have_text("disconnected, retrying")
        await expect(page.locator("#node-state")).to_have_text("unknown")

        # a page fed views with fields missing, or hostile strings, still renders them as text
        shown = await page.evaluate("""(hostile) => {
            const r = window.fedfheDashboard.render;
            r({}); r(null); r({status: {}}); r({status: {rounds: [{}], workers: [{}]}, coordinator: {}});
            r({coordinator: {connected: true}, status: {federation_id: hostile,
               workers: [{worker_id: "w", declined: hostile, epsilon: "NaN"}],
               rounds: [{round: 1, state: "weird state", declines: [{worker_id: "w", reason: hostile}],
                         mask_recovery: {members: "not a list"}}]}});
            return {id: document.getElementById("federation-id").textContent,
                    reason: document.querySelector("#rounds .decline").textContent,
                    injected: document.querySelectorAll("main img, main script, header img").length,
                    pwned: window.__pwned === undefined ? null : window.__pwned};
        }""", HOSTILE)
        assert shown == {"id": HOSTILE, "reason": f"w: {HOSTILE}", "injected": 0, "pwned": None}

        # the coordinator comes up at that address: the page recovers by itself
        coord, fed = await start_coordinator(Settings(min_workers=1), federation_id="fed-back", port=port)
        worker = RpcWorker(coord.address, "hospital-9", ConsortiumKey.generate())
        try:
            await expect(page.locator("#federation-id")).to_have_text("fed-back", timeout=20_000)
            await expect(page.locator("#connection")).to_have_text("live")
            await expect(banner).to_be_hidden()

            # a hostile decline reason, through the coordinator, reaches the page as text
            await worker.join()
            async with Operator(coord.address) as op:
                await op.wait_connected(["hospital-9"])
                started = await op.start_round(FAST)
            await worker.stub.DeclineRound(pb.DeclineRoundRequest(round=started.round, reason=HOSTILE,
                                                                  worker_id="hospital-9"))
            row = page.locator(f'#rounds tr[data-round="{started.round}"]')
            await expect(row.locator(".state")).to_contain_text("failed")
            await expect(row.locator(".decline")).to_have_text(f"hospital-9: {HOSTILE}")
            await expect(page.locator('#hospitals tr[data-worker="hospital-9"] .declined')).to_contain_text(HOSTILE)
            assert await page.locator("main img, main script").count() == 0
            assert await page.evaluate("window.__pwned === undefined")
        finally:
            await worker.leave()
            await coord.stop(0)
            fed.close()
        await expect(banner).to_contain_text("disconnected, retrying", timeout=15_000)
    assert browser.errors == []
