"""Watches on real processes: changes made through any node reach a watcher on another,
a prefix watch sees every key, and a watch survives the death of the node serving it."""

from __future__ import annotations

import asyncio
import json
import signal

import aiohttp
import pytest

from leaderless.client import AsyncClient, BadRequestError, KeyChange
from tests.integration.helpers import Processes, run_cli
from tests.integration.test_kv_cluster import start_cluster
from tests.integration.test_ops import get, start_ready_cluster

pytestmark = pytest.mark.integration


async def take(changes: object, count: int, timeout_s: float = 20) -> list[KeyChange]:
    got: list[KeyChange] = []

    async def collect() -> None:
        async for change in changes:  # type: ignore[attr-defined]
            got.append(change)
            if len(got) == count:
                return

    await asyncio.wait_for(collect(), timeout_s)
    return got


@pytest.mark.timeout(300)
def test_watch_key_and_prefix_across_nodes(processes: Processes) -> None:
    _, clients = start_cluster(processes)

    async def run() -> None:
        async with AsyncClient(clients[:1], token_aware=False, timeout_s=10) as watcher, \
                AsyncClient(clients[1:], token_aware=False, timeout_s=10) as writer:
            await writer.create_keyspace("s", mode="strong")
            await writer.create_keyspace("e")
            await writer.put("s", "k", b"v0")
            key_watch = watcher.watch("s", "k")
            first = await take(key_watch, 1)
            assert (first[0].value, first[0].version) == (b"v0", 1)  # the current value

            async def write() -> None:
                await writer.put("s", "k", b"v1")
                await writer.cas("s", "k", b"v2", expected_value=b"v1")
                await writer.delete("s", "k")
                await writer.put("s", "k", b"v3")

            task = asyncio.create_task(write())
            changes = await take(key_watch, 4)
            await task
            assert [(c.version, c.value) for c in changes] == [
                (2, b"v1"), (3, b"v2"), (4, None), (5, b"v3")]
            await key_watch.aclose()

            # Resume: only what is newer than the version given.
            resumed = await take(watcher.watch("s", "k", since_version=4), 1)
            assert [(c.version, c.value) for c in resumed] == [(5, b"v3")]

            # A prefix: the current state of every key first, then changes.
            for i in range(5):
                await writer.put("s", f"user/{i}", str(i).encode())
            await writer.put("s", "other", b"x")
            prefix_watch = watcher.watch("s", "user/", prefix=True)
            initial = await take(prefix_watch, 5)
            assert sorted(c.key for c in initial) == [f"user/{i}".encode() for i in range(5)]
            await writer.incr("s", "user/9", 7)
            await writer.put("s", "other", b"y")  # not under the prefix
            await writer.put("s", "user/0", b"new")
            later = await take(prefix_watch, 2)
            assert [(c.key, c.value) for c in later] == [(b"user/9", b"7"),
                                                         (b"user/0", b"new")]
            await prefix_watch.aclose()

            with pytest.raises(BadRequestError):
                await take(watcher.watch("e", "k"), 1)

    asyncio.run(run())


@pytest.mark.timeout(300)
def test_watch_survives_the_death_of_its_node_and_misses_nothing(
        processes: Processes) -> None:
    nodes, clients = start_cluster(processes)

    async def run() -> None:
        # The watcher is given node 3 only (it learns the others from the ring), and with
        # token_aware off it watches through node 3.
        async with AsyncClient([clients[2]], token_aware=False, timeout_s=5) as watcher, \
                AsyncClient(clients[:2], timeout_s=10) as writer:
            await writer.create_keyspace("s", mode="strong")
            await writer.put("s", "k", b"0")
            stream = watcher.watch("s", "k")
            assert [c.value for c in await take(stream, 1)] == [b"0"]
            nodes[2].process.send_signal(signal.SIGKILL)
            for i in range(1, 21):
                await writer.put("s", "k", str(i).encode())
            seen = []
            while not seen or seen[-1].value != b"20":
                seen.extend(await take(stream, 1, timeout_s=60))
            versions = [c.version for c in seen]
            assert versions == sorted(set(versions))  # increasing, no duplicates
            assert seen[-1].version == 21
            await stream.aclose()

    asyncio.run(run())


@pytest.mark.timeout(300)
def test_a_waiting_acquire_is_woken_by_a_release_through_another_node(
        processes: Processes) -> None:
    _, clients = start_cluster(processes)

    async def run() -> None:
        async with AsyncClient(clients[:1], token_aware=False, timeout_s=10) as a, \
                AsyncClient(clients[1:2], token_aware=False, timeout_s=10) as b:
            lease = await b.acquire("x", ttl=60)
            waiting = asyncio.create_task(a.acquire("x", ttl=5, wait=120))
            await asyncio.sleep(0.5)
            assert not waiting.done()
            await b.release(lease)
            # Woken by the watch (the lease had 60 s left).
            granted = await asyncio.wait_for(waiting, 20)
            assert granted.token == lease.token + 1

    asyncio.run(run())


@pytest.mark.timeout(300)
def test_watch_over_http_server_sent_events(processes: Processes) -> None:
    _, urls = start_ready_cluster(processes, ("h1", "h2", "h3"))
    base = urls[0]
    ring = json.loads(get(urls[1] + "/v1/ring")[1])["members"]
    h2_client = next(m["client_address"] for m in ring if m["name"] == "h2")

    async def events(session: aiohttp.ClientSession, url: str, count: int,
                     headers: dict[str, str] | None = None) -> list[dict[str, object]]:
        found: list[dict[str, object]] = []
        async with session.get(url, headers=headers) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/event-stream")
            async for raw in response.content:
                line = raw.decode().strip()
                if line.startswith("data: "):
                    found.append(json.loads(line[6:]))
                    if len(found) == count:
                        return found
        return found

    async def run() -> None:
        async with AsyncClient([h2_client], timeout_s=10) as writer, \
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            await writer.create_keyspace("s", mode="strong")
            await writer.put("s", "k", b"v1")
            reader = asyncio.create_task(events(session, base + "/v1/watch/s/k", 3))
            await asyncio.sleep(0.5)
            await writer.put("s", "k", b"v2")
            await writer.delete("s", "k")
            got = await asyncio.wait_for(reader, 30)
            assert [(e["version"], e["value_utf8"], e["deleted"]) for e in got] == [
                (1, "v1", False), (2, "v2", False), (3, None, True)]
            await writer.put("s", "k", b"v4")
            resumed = await events(session, base + "/v1/watch/s/k", 1,
                                   {"Last-Event-ID": "3"})
            assert [(e["version"], e["value_utf8"]) for e in resumed] == [(4, "v4")]
            async with session.get(base + "/v1/watch/nope/k") as response:
                assert response.status == 404
            async with session.get(base + "/v1/watch/s/k?bogus=1") as response:
                assert response.status == 400

    asyncio.run(run())


@pytest.mark.timeout(300)
def test_watch_from_the_cli(processes: Processes) -> None:
    _, clients = start_cluster(processes)
    target = ("--node", clients[0])
    assert run_cli("keyspace", "create", "s", "--mode", "strong", *target).returncode == 0
    assert run_cli("kv", "put", "s", "k", "a", *target).returncode == 0
    assert run_cli("kv", "put", "s", "k", "b", *target).returncode == 0
    shown = run_cli("kv", "watch", "s", "k", "--count", "1", *target)
    assert shown.returncode == 0 and shown.stdout == "k\t2\tb\n"
    resumed = run_cli("kv", "watch", "s", "k", "--since-version", "1", "--count", "1",
                      "--json", *target)
    assert json.loads(resumed.stdout) == {"key": "k", "key_b64": "aw==", "version": 2,
                                          "deleted": False, "value": "b", "value_b64": "Yg=="}
