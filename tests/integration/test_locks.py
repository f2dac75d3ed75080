"""Locks on real processes: leases, fencing tokens, blocking acquire, fenced writes."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import pytest

from leaderless.client import (
    AsyncClient,
    BadRequestError,
    FencedError,
    LeaseLostError,
    LockHeldError,
)
from tests.integration.helpers import Processes, run_cli
from tests.integration.test_kv_cluster import start_cluster
from tests.integration.test_ops import start_ready_cluster

pytestmark = pytest.mark.integration


@pytest.mark.timeout(300)
def test_lock_api_leases_tokens_fences_and_waiting(processes: Processes) -> None:
    _, clients = start_cluster(processes)

    async def run() -> None:
        async with AsyncClient(clients, timeout_s=10) as a, \
                AsyncClient(clients[1:], timeout_s=10) as b:
            await a.create_keyspace("data", replication=3, mode="strong")
            await a.create_keyspace("plain", replication=3)
            first = await a.acquire("job", ttl=5)
            assert first.token >= 1 and first.valid_for_s() > 0
            with pytest.raises(LockHeldError):
                await b.acquire("job", ttl=5, wait=0)
            status = await b.lock_status("job")
            assert status.held and status.holder == first.owner and status.token == first.token
            assert first.owner.startswith(a.owner)
            # Two tasks of one client exclude each other like two clients.
            with pytest.raises(LockHeldError):
                await a.acquire("job", ttl=5, wait=0)
            renewed = await a.renew(first, ttl=5)
            assert renewed.token == first.token
            await a.put("data", "k", b"v1", fence=first)
            await a.put("plain", "k", b"v1", fence=first)

            # A blocked acquire is woken by the release (no polling), and gets token + 1.
            waiter = asyncio.create_task(b.acquire("job", ttl=5, wait=30))
            await asyncio.sleep(0.3)
            assert not waiter.done()
            await a.release(first)
            second = await asyncio.wait_for(waiter, 10)
            assert second.token == first.token + 1

            # The old holder's lease is gone: renew/release fail, fenced writes are refused.
            with pytest.raises(LeaseLostError):
                await a.renew(first)
            with pytest.raises(LeaseLostError):
                await a.release(first)
            for keyspace in ("data", "plain"):
                with pytest.raises(FencedError):
                    await a.put(keyspace, "k", b"stale", fence=first)
            with pytest.raises(FencedError):
                await a.cas("data", "k", b"stale", expected_value=b"v1", fence=first)
            with pytest.raises(FencedError):
                await a.incr("data", "n", fence=first)
            with pytest.raises(FencedError):
                await a.delete("data", "k", fence=first)
            with pytest.raises(FencedError):  # a token never granted
                await a.put("data", "k", b"x", fence=("job", second.token + 5))
            assert await a.get("data", "k") == b"v1"
            assert await a.get("plain", "k") == b"v1"
            await b.put("data", "k", b"v2", fence=second)
            assert await a.get("data", "k") == b"v2"

            # Expiry: a holder that stops renewing loses the lock after its TTL.
            await b.release(second)
            short = await b.acquire("short", ttl=0.5)
            third = await a.acquire("short", ttl=5, wait=10)
            assert third.token == short.token + 1

            # async with: renewed while held, released after.
            async with a.lock("ctx", ttl=0.6) as lease:
                await asyncio.sleep(1.5)  # past the TTL: the renewals keep it
                assert not lease.lost
                with pytest.raises(LockHeldError):
                    await b.acquire("ctx", ttl=1, wait=0)
            after = await b.acquire("ctx", ttl=1, wait=0)
            assert after.token == lease.token + 1

            inside = peak = 0

            async def critical_section() -> None:
                nonlocal inside, peak
                async with a.lock("y", ttl=5, wait=30):
                    inside += 1
                    peak = max(peak, inside)
                    await asyncio.sleep(0.05)
                    inside -= 1

            await asyncio.gather(*(critical_section() for _ in range(4)))
            assert peak == 1

            for bad in ("", "x" * 300):
                with pytest.raises(BadRequestError):
                    await a.acquire(bad, ttl=1)
            with pytest.raises(BadRequestError):
                await a.acquire("job", ttl=0.01)

    asyncio.run(run())


@pytest.mark.timeout(300)
def test_locks_from_the_cli(processes: Processes) -> None:
    _, clients = start_cluster(processes)
    target = ("--node", clients[0])
    assert run_cli("keyspace", "create", "s", "--mode", "strong", *target).returncode == 0
    got = run_cli("lock", "acquire", "backup", "--ttl", "30", "--owner", "me", "--json",
                  *target)
    assert got.returncode == 0, got.stderr
    token = json.loads(got.stdout)["token"]
    held = run_cli("lock", "acquire", "backup", "--owner", "other", *target)
    assert held.returncode == 8 and "held" in held.stderr
    status = json.loads(run_cli("lock", "status", "backup", "--json", *target).stdout)
    assert status["held"] and status["holder"] == "me" and status["token"] == token
    fence = f"backup:{token}"
    assert run_cli("kv", "put", "s", "k", "v", "--fence", fence, *target).returncode == 0
    assert run_cli("lock", "renew", "backup", "--owner", "me", "--token", str(token),
                   *target).returncode == 0
    assert run_cli("lock", "release", "backup", "--owner", "me", "--token", str(token),
                   *target).returncode == 0
    again = run_cli("lock", "acquire", "backup", "--owner", "other", "--json", *target)
    assert json.loads(again.stdout)["token"] == token + 1
    stale = run_cli("kv", "put", "s", "k", "stale", "--fence", fence, *target)
    assert stale.returncode == 8 and "has granted token" in stale.stderr
    lost = run_cli("lock", "release", "backup", "--owner", "me", "--token", str(token),
                   *target)
    assert lost.returncode == 8
    assert run_cli("kv", "get", "s", "k", *target).stdout == "v"
    bad = run_cli("kv", "put", "s", "k", "v", "--fence", "nocolon", *target)
    assert bad.returncode == 2
    assert "free" in run_cli("lock", "status", "nobody", *target).stdout


@pytest.mark.timeout(300)
def test_locks_over_http(processes: Processes) -> None:
    _, urls = start_ready_cluster(processes, ("h1", "h2", "h3"))
    base = urls[0]

    def call(method: str, path: str, body: bytes = b"") -> tuple[int, dict[str, object]]:
        request = urllib.request.Request(base + path, data=body or None, method=method)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    assert call("POST", "/v1/keyspaces", b'{"name": "s", "mode": "strong"}')[0] == 201
    status, lease = call("POST", "/v1/locks/job?ttl=30&owner=web1")
    assert status == 200 and lease["owner"] == "web1"
    token = lease["token"]
    status, body = call("POST", "/v1/locks/job?owner=web2")
    assert status == 409 and body["error"] == "lock_held"
    status, body = call("GET", "/v1/locks/job")
    assert (status, body["held"], body["holder"], body["token"]) == (200, True, "web1", token)
    assert call("PUT", f"/v1/kv/s/k?fence=job:{token}", b"v")[0] == 200
    assert call("PUT", f"/v1/locks/job?owner=web1&token={token}&ttl=30")[0] == 200
    assert call("DELETE", f"/v1/locks/job?owner=web1&token={token}")[0] == 200
    status, again = call("POST", "/v1/locks/job?owner=web2&ttl=30")
    assert status == 200 and again["token"] == token + 1
    status, body = call("PUT", f"/v1/kv/s/k?fence=job:{token}", b"stale")
    assert status == 409 and body["error"] == "fenced"
    status, body = call("POST", f"/v1/incr/s/n?fence=job:{token}")
    assert status == 409 and body["error"] == "fenced"
    status, body = call("DELETE", f"/v1/locks/job?owner=web1&token={token}")
    assert status == 409 and body["error"] == "lease_lost"
    assert call("PUT", "/v1/kv/s/k?fence=nocolon", b"x")[1]["error"] == "bad_request"
    assert call("POST", "/v1/locks/job?ttl=0")[1]["error"] == "bad_request"
    assert call("DELETE", "/v1/locks/job")[1]["error"] == "bad_request"
    with urllib.request.urlopen(base + "/v1/kv/s/k", timeout=10) as response:
        assert response.read() == b"v"
