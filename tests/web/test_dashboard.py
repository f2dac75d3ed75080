"""The dashboard in a real browser (Playwright driving Debian's chromium, headless) against
a real 3-node cluster: the page loads, shows three members alive, its charts receive points,
and a node killed with SIGKILL turns suspect and then dead on the page. Screenshots are
saved under the test's tmp dir and, when set, ``$LEADERLESS_TEST_ARTIFACTS``.

Skipped, with the reason, where chromium (``apt-get install chromium``) or the Python
package ``playwright`` is missing. Waits are deadlines, never timing assertions.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from leaderless.web.handlers import add_web_routes
from tests.integration.helpers import Processes, wait_until
from tests.integration.test_ops import get, start
from tests.web.test_handlers import FakeNode

pytestmark = pytest.mark.integration

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking"]
DEADLINE_MS = 60_000
"""Generous: failure detection takes seconds and CI machines are slow."""


def chromium_or_skip() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("chromium is not installed (apt-get install -y --no-install-recommends "
                    "chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("the Python package playwright is not installed (pip install "
                    "'.[test]')")
    return path


def save_screenshot(page: Any, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    artifacts = os.environ.get("LEADERLESS_TEST_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(artifacts) / name)
        print(f"screenshot: {Path(artifacts) / name}")
    print(f"screenshot: {path}")
    return path


def create_keyspace(url: str, name: str) -> None:
    request = urllib.request.Request(
        url + "/v1/keyspaces", method="POST",
        data=json.dumps({"name": name, "replication": 3, "if_not_exists": True}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status in (200, 201)


@pytest.mark.timeout(300)
def test_dashboard_in_chromium(processes: Processes, tmp_path: Path) -> None:
    executable = chromium_or_skip()
    from playwright.sync_api import sync_playwright

    first, first_url = start(processes, "d1")
    others = [start(processes, name, first.address) for name in ("d2", "d3")]
    urls = [first_url, *(url for _, url in others)]
    wait_until(lambda: all(get(url + "/health/ready")[0] == 200 for url in urls),
               "all three nodes are ready", timeout_s=60)
    create_keyspace(first_url, "dash_ks")
    victim = others[1][0]

    started = time.monotonic()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS,
                                     headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(DEADLINE_MS)
            errors: list[str] = []
            foreign: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("request", lambda request: None if request.url.startswith(first_url)
                    else foreign.append(request.url))
            response = page.goto(first_url + "/")
            assert response is not None and response.status == 200

            # The header names the node; the table shows three members alive.
            page.wait_for_function("document.getElementById('node-name').textContent === 'd1'")
            page.wait_for_function(
                "document.querySelectorAll('#members tbody tr[data-state=alive]').length === 3")
            assert page.locator("#members tbody tr").count() == 3
            names = page.locator("#members tbody tr td.name").all_text_contents()
            assert names == ["d1", "d2", "d3"]
            # Every other member links to its own dashboard (its charts).
            link = page.locator("#members tbody tr[data-member=d2] td.name a")
            assert (link.get_attribute("href") or "").startswith("http://127.0.0.1:")
            assert page.locator("#members tbody tr[data-member=d1] td.name a").count() == 0
            page.wait_for_selector("#keyspaces tr[data-keyspace=dash_ks]")
            # Each member's gossiped health is a column; the Doctor panel lists findings.
            healths = page.locator("#members tbody tr td.health").evaluate_all(
                "cells => cells.map(c => c.dataset.health)")
            assert healths == ["healthy"] * 3, healths
            page.wait_for_function("window.dashboard.doctor !== null")
            assert page.evaluate("window.dashboard.doctor.critical") == 0
            assert page.locator("#doctor li").count() >= 1

            # Charts receive points: every chart is fed, and keeps getting new ones.
            page.wait_for_function("window.dashboard.points('cpu') >= 2")
            before = page.evaluate("window.dashboard.points('cpu')")
            page.wait_for_function(f"window.dashboard.points('cpu') >= {before + 2}")
            counts = page.evaluate("Object.fromEntries(Object.keys(window.dashboard.charts)"
                                   ".map(n => [n, window.dashboard.points(n)]))")
            assert set(counts) == {"cpu", "memory", "disk", "network", "load", "diskio",
                                   "p99", "rate"}
            assert all(n >= 1 for n in counts.values()), counts
            ring = page.evaluate("window.dashboard.ring.getOption().series[0].data"
                                 ".map(d => d.name)")
            assert sorted(ring) == ["d1", "d2", "d3"]
            save_screenshot(page, tmp_path, "dashboard-alive.png")

            # kill -9 one node: the page shows it suspect, then dead.
            victim.process.send_signal(signal.SIGKILL)
            victim.process.wait(timeout=10)
            page.wait_for_function(
                "(window.dashboard.states['d3'] || []).includes('dead')", timeout=120_000)
            states = page.evaluate("window.dashboard.states['d3']")
            assert states.index("suspect") < states.index("dead"), states
            row = page.locator("#members tbody tr[data-member=d3] td.state")
            assert row.text_content() == "dead"
            assert "state-dead" in (row.get_attribute("class") or "")
            alive = page.locator("#members tbody tr[data-state=alive] td.name")
            assert alive.all_text_contents() == ["d1", "d2"]
            page.wait_for_selector("#doctor li[data-check=members][data-subject=d3]"
                                   "[data-severity=critical]", timeout=30_000)
            finding = page.locator("#doctor li[data-subject=d3][data-check=members]")
            assert "fix:" in (finding.text_content() or "")
            shot = save_screenshot(page, tmp_path, "dashboard-dead.png")
            assert shot.stat().st_size > 10_000

            assert errors == [], errors
            assert foreign == [], f"the page fetched from elsewhere: {foreign}"
        finally:
            browser.close()
    print(f"browser part took {time.monotonic() - started:.1f} s")


@pytest.mark.timeout(120)
def test_dashboard_shows_alerts(tmp_path: Path) -> None:
    """The alerts list in the browser, fed by a fake node whose rules fire (the real
    cluster above may well have none firing)."""
    executable = chromium_or_skip()
    from playwright.sync_api import sync_playwright

    node = FakeNode(tmp_path)
    node.alerts = lambda: [
        {"name": "member_dead", "severity": "critical", "state": "firing",
         "message": "members_dead = 1 > 0 for 12 s"},
        {"name": "disk_full", "severity": "warning", "state": "resolved",
         "message": "resolved: disk_pct = 40"}]
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    port: list[int] = []

    async def serve() -> web.AppRunner:
        app = web.Application()
        add_web_routes(app, node)
        runner = web.AppRunner(app, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port.append(runner.addresses[0][1])
        return runner

    def run_loop() -> None:
        asyncio.set_event_loop(loop)
        runner = loop.run_until_complete(serve())
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())

    thread = threading.Thread(target=run_loop, daemon=True)
    thread.start()
    assert ready.wait(30)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS,
                                         headless=True)
            try:
                page = browser.new_page()
                page.set_default_timeout(DEADLINE_MS)
                page.goto(f"http://127.0.0.1:{port[0]}/")
                page.wait_for_selector("#alerts li[data-alert=member_dead]")
                firing = page.locator("#alerts li[data-alert=member_dead]")
                assert firing.get_attribute("data-state") == "firing"
                assert "members_dead = 1" in (firing.text_content() or "")
                assert page.locator("#alert-count").text_content() == "1 firing"
                resolved = page.locator("#alerts li[data-alert=disk_full]")
                assert resolved.get_attribute("data-state") == "resolved"
                save_screenshot(page, tmp_path, "dashboard-alerts.png")
            finally:
                browser.close()
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
