"""The dashboard's routes without a browser or a cluster: a fake node behind aiohttp."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from leaderless.obs import RequestStats, SystemSampler
from leaderless.web import handlers
from leaderless.web.handlers import STATIC_DIR, add_web_routes


class FakeNode:
    """What ``runtime.node.Node`` offers the dashboard."""

    def __init__(self, data_dir: Path, alerts: bool = True) -> None:
        self.system = SystemSampler(data_dir)
        self.requests = RequestStats()
        if alerts:
            self.alerts = lambda: [{"name": "disk_full", "severity": "warning",
                                    "message": "disk 95 % > 90 %"}]

    @property
    def name(self) -> str:
        return "fake1"

    def readiness(self) -> dict[str, str | None]:
        return {}

    def metrics(self) -> tuple[bytes, str]:
        return b"", "text/plain"

    def cluster(self) -> list[dict[str, Any]]:
        return [{"name": "fake1", "address": "127.0.0.1:1", "state": "alive",
                 "incarnation": 0, "zone": "z1", "version": "x", "weight": 1,
                 "ownership": 1.0, "load": None}]


def run(test: Callable[[TestClient[Any, Any]], Awaitable[None]], node: Any) -> None:
    async def go() -> None:
        app = web.Application()
        add_web_routes(app, node)
        async with TestClient(TestServer(app)) as client:
            await asyncio.wait_for(test(client), 60)

    asyncio.run(go())


async def events(response: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, Any]]:
    """(event name, decoded data) of each server-sent event."""
    name, data = "message", ""
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if not line:
            if data:
                yield name, json.loads(data)
            name, data = "message", ""
        elif line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            data += line[len("data: "):]


def test_page_and_vendored_echarts(tmp_path: Path) -> None:
    async def check(client: TestClient[Any, Any]) -> None:
        page = await client.get("/")
        assert page.status == 200 and page.content_type == "text/html"
        html = await page.text()
        assert "/static/vendor/echarts/echarts.min.js" in html and "/static/app.js" in html
        assert "http://" not in html and "https://" not in html  # nothing from the internet
        echarts = await client.get("/static/vendor/echarts/echarts.min.js")
        assert echarts.status == 200
        assert echarts.content_type in ("application/javascript", "text/javascript")
        assert len(await echarts.read()) > 500_000
        for name in ("LICENSE", "NOTICE"):
            assert (await client.get(f"/static/vendor/echarts/{name}")).status == 200
        for name in ("app.js", "style.css"):
            assert (await client.get(f"/static/{name}")).status == 200

    run(check, FakeNode(tmp_path))


def test_static_refuses_path_traversal(tmp_path: Path) -> None:
    outside = ["../handlers.py", "..%2fhandlers.py", "%2e%2e/handlers.py",
               "%2e%2e%2fhandlers.py", "vendor/../../handlers.py",
               "vendor/%2e%2e/%2e%2e/__init__.py", "%2fetc%2fpasswd", "..%5chandlers.py",
               "vendor", "vendor/", ".hidden", "nope.js", "index.html%00.js"]

    async def check(client: TestClient[Any, Any]) -> None:
        for path in outside:
            # encoded=True: sent as written, not normalized by the client first
            url = client.make_url("/").with_path(f"/static/{path}", encoded=True)
            async with client.session.get(url) as response:
                body = await response.read()
                assert response.status == 404, (path, response.status)
                assert b"import" not in body and b"root:" not in body
        # ... and with a raw request line, which no client library tidies up.
        reader, writer = await asyncio.open_connection(client.host, client.port)
        writer.write(b"GET /static/../../web/handlers.py HTTP/1.1\r\nHost: x\r\n"
                     b"Connection: close\r\n\r\n")
        raw = await reader.read()
        writer.close()
        assert raw.startswith(b"HTTP/1.1 404"), raw[:80]

    run(check, FakeNode(tmp_path))
    assert handlers._static_file("app.js") == STATIC_DIR / "app.js"
    for path in ("../handlers.py", "/etc/passwd", "vendor/../../handlers.py", "", "vendor",
                 "..\\handlers.py", "a\x00b"):
        assert handlers._static_file(path) is None, path


def test_stream_sends_snapshots(tmp_path: Path) -> None:
    node = FakeNode(tmp_path)
    for _ in range(50):
        node.requests.observe("get", "QUORUM", 0.002)

    async def check(client: TestClient[Any, Any]) -> None:
        started = time.monotonic()
        async with client.get("/api/dashboard/stream") as response:
            assert response.status == 200
            assert response.content_type == "text/event-stream"
            received = []
            async for name, data in events(response):
                assert name == "snapshot"
                received.append(data)
                if len(received) == 3:
                    break
        assert time.monotonic() - started >= 1.5  # at most one event per second
        first = received[0]
        assert set(first) == {"node", "time", "system", "requests", "members", "alerts"}
        assert first["node"] == "fake1" and isinstance(first["time"], float)
        system = first["system"]
        for key in ("cpu_pct", "mem_pct", "disk_pct", "disk_read_bps", "disk_write_bps",
                    "net_in_bps", "net_out_bps", "load_1m", "load_5m", "load_15m"):
            assert isinstance(system[key], int | float) and system[key] >= 0, key
        assert 0 <= system["cpu_pct"] <= 100 and 0 < system["mem_pct"] <= 100
        assert system["memory_total_bytes"] > 0
        assert set(first["requests"]) == {"ops_per_s", "p99_ms"}
        assert first["members"][0]["name"] == "fake1"
        assert first["alerts"] == [{"name": "disk_full", "severity": "warning",
                                    "message": "disk 95 % > 90 %"}]
        assert received[2]["time"] > received[0]["time"]

    run(check, node)


def test_stream_without_alerts_or_system(tmp_path: Path) -> None:
    class Bare(FakeNode):
        def __init__(self) -> None:  # neither a sampler, request stats nor alerts
            pass

    async def check(client: TestClient[Any, Any]) -> None:
        async with client.get("/api/dashboard/stream") as response:
            async for _, data in events(response):
                assert data["alerts"] is None and data["system"] is None
                assert data["requests"] is None and data["node"] == "fake1"
                break

    run(check, Bare())


def test_streams_are_bounded_and_freed_when_clients_go(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handlers, "STREAMS_MAX", 2)

    async def check(client: TestClient[Any, Any]) -> None:
        first = await client.get("/api/dashboard/stream")
        second = await client.get("/api/dashboard/stream")
        assert first.status == second.status == 200
        refused = await client.get("/api/dashboard/stream")
        assert refused.status == 503
        body = await refused.json()
        assert body["error"] == "overloaded" and "at most 2" in body["message"]
        first.close()  # the client goes: the server notices on its next write
        deadline = time.monotonic() + 30
        while True:
            again = await client.get("/api/dashboard/stream")
            if again.status == 200:
                break
            again.close()
            assert time.monotonic() < deadline, "the closed stream was never freed"
            await asyncio.sleep(0.2)
        again.close()
        second.close()

    run(check, FakeNode(tmp_path))


def test_failing_alerts_do_not_end_the_stream(tmp_path: Path) -> None:
    node = FakeNode(tmp_path)

    def broken() -> list[Any]:
        raise ValueError("a rule is broken")

    node.alerts = broken

    async def check(client: TestClient[Any, Any]) -> None:
        async with client.get("/api/dashboard/stream") as response:
            async for _, data in events(response):
                assert data["alerts"] is None and data["members"]
                break

    run(check, node)
