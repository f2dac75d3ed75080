"""The KV store on real processes: QUORUM through a kill -9, hints and anti-entropy after
the restart, durability of acknowledged writes, and bad input against a live node."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import struct
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from leaderless.client import AsyncClient, LeaderlessError
from leaderless.core.cells import decode_cell
from leaderless.core.keys import data_key
from leaderless.runtime.ports import free_port
from leaderless.storage.rocks import RocksStore
from tests.integration.helpers import NodeProcess, Processes, run_cli, wait_until

pytestmark = pytest.mark.integration
KEYSPACE = "items"
FAST_REPAIR = {"LEADERLESS_ANTI_ENTROPY_INTERVAL_S": "1"}


def start_kv_node(processes: Processes, name: str, join: str | None = None,
                  port: int | None = None, client_port: int | None = None,
                  env: dict[str, str] | None = None) -> tuple[NodeProcess, str]:
    client = f"127.0.0.1:{client_port or free_port()}"
    node = processes.start_node(name, port, join, env, "--client", client,
                                "--log-level", "warning")
    return node, client


def start_cluster(processes: Processes, env: dict[str, str] | None = None
                  ) -> tuple[list[NodeProcess], list[str]]:
    first, first_client = start_kv_node(processes, "n1", env=env)
    nodes, clients = [first], [first_client]
    for name in ("n2", "n3"):
        node, client = start_kv_node(processes, name, first.address, env=env)
        nodes.append(node)
        clients.append(client)
    wait_until(lambda: all(sum(m.state == "alive" for m in n.members().values()) == 3
                           for n in nodes), "all three nodes see each other alive")
    return nodes, clients


def run(coro: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(coro())


async def write_all(client: AsyncClient, keys: range, value: Callable[[int], bytes],
                    consistency: str = "QUORUM", concurrency: int = 64) -> list[str]:
    """Write every key; returns the errors (a test expects none)."""
    errors: list[str] = []
    queue = iter(keys)

    async def worker() -> None:
        for i in queue:
            try:
                await client.put(KEYSPACE, f"key{i}", value(i), consistency=consistency)
            except LeaderlessError as exc:
                errors.append(f"put key{i}: {exc.code}: {exc}")

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return errors


async def read_all(client: AsyncClient, keys: range, expect: Callable[[int], bytes],
                   consistency: str = "QUORUM", concurrency: int = 64) -> list[str]:
    errors: list[str] = []
    queue = iter(keys)

    async def worker() -> None:
        for i in queue:
            try:
                got = await client.get(KEYSPACE, f"key{i}", consistency=consistency)
            except LeaderlessError as exc:
                errors.append(f"get key{i}: {exc.code}: {exc}")
                continue
            if got != expect(i):
                errors.append(f"get key{i}: {got!r} != {expect(i)!r}")

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return errors


def test_quorum_through_a_kill_and_convergence_after_restart(processes: Processes) -> None:
    nodes, clients = start_cluster(processes, FAST_REPAIR)

    def v1(i: int) -> bytes:
        return f"v1-{i}".encode()

    def v2(i: int) -> bytes:
        return f"v2-{i}".encode() if i % 2 == 0 else v1(i)

    async def phase_one() -> None:
        async with AsyncClient(clients, timeout_s=15) as client:
            await client.create_keyspace(KEYSPACE, replication=3)
            assert await write_all(client, range(10_000), v1) == []

    run(phase_one)
    nodes[2].process.send_signal(signal.SIGKILL)
    nodes[2].process.wait(timeout=10)

    async def phase_two() -> None:
        # Keep writing (every even key gets a new value) and reading while n3 is dead,
        # first undetected, then detected: QUORUM needs 2 of 3, so nothing may fail.
        async with AsyncClient(clients, timeout_s=15) as client:
            writes = write_all(client, range(0, 10_000, 2), v2)
            reads = read_all(client, range(1, 10_000, 2), v1)
            errors = await asyncio.gather(writes, reads)
            assert errors == [[], []], [e[:5] for e in errors]
            assert await read_all(client, range(10_000), v2) == []

    run(phase_two)
    start_kv_node(processes, "n3", nodes[0].address, port=nodes[2].port,
                  client_port=int(clients[2].rsplit(":", 1)[1]), env=FAST_REPAIR)

    async def holds_everything(address: str) -> bool:
        # Consistency ONE on a node that replicates every key (N=3 of 3) reads its own copy.
        async with AsyncClient([address], timeout_s=15, token_aware=False) as client:
            return await read_all(client, range(10_000), v2, consistency="ONE") == []

    for address in clients:
        wait_until(lambda a=address: run(lambda: holds_everything(a)),  # type: ignore[misc]
                   f"{address} holds every key's newest value", timeout_s=120)


def test_writes_a_replica_acknowledged_are_on_its_disk_after_kill_9(
        processes: Processes) -> None:
    nodes, clients = start_cluster(processes)
    acknowledged: list[int] = []

    async def load() -> None:
        async with AsyncClient(clients, timeout_s=10) as client:
            await client.create_keyspace(KEYSPACE, replication=3)
            stop = asyncio.Event()

            async def worker(start: int) -> None:
                i = start
                while not stop.is_set():
                    try:
                        # ALL: a success means n3 itself acknowledged the write.
                        await client.put(KEYSPACE, f"key{i}", b"durable", consistency="ALL")
                        acknowledged.append(i)
                    except LeaderlessError:
                        pass
                    i += 64

            workers = [asyncio.create_task(worker(s)) for s in range(64)]
            while len(acknowledged) < 3000:
                await asyncio.sleep(0.01)
            nodes[2].process.send_signal(signal.SIGKILL)  # in the middle of the stream
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*workers)

    run(load)
    nodes[2].process.wait(timeout=10)
    store = RocksStore(nodes[2].data_dir / "data")
    try:
        missing = [i for i in acknowledged
                   if (raw := store.get(data_key(KEYSPACE, f"key{i}".encode()))) is None
                   or decode_cell(raw).value != b"durable"]
    finally:
        store.close()
    assert len(acknowledged) >= 3000
    assert missing == []


def _frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def test_bad_input_gets_specific_errors_and_the_node_keeps_serving(
        processes: Processes, tmp_path: Path) -> None:
    http_port = free_port()
    client_address = f"127.0.0.1:{free_port()}"
    node = processes.start_node("solo", None, None, None, "--client", client_address,
                                "--http", f"127.0.0.1:{http_port}",
                                "--value-bytes-max", "1000")
    host, port = client_address.rsplit(":", 1)
    wait_until(lambda: bool(node.members()), "the node answers")

    async def checks() -> None:
        async with AsyncClient([client_address], timeout_s=10) as client:
            await client.create_keyspace(KEYSPACE, replication=1)
            with pytest.raises(LeaderlessError) as err:
                await client.put(KEYSPACE, b"k" * 2000, b"v")
            assert err.value.code == "bad_request" and "1024" in str(err.value)
            with pytest.raises(LeaderlessError) as err:
                await client.put(KEYSPACE, b"k", b"v" * 1001)
            assert err.value.code == "bad_request" and "1000" in str(err.value)
            with pytest.raises(LeaderlessError) as err:
                await client.get("nosuch", b"k")
            assert err.value.code == "unknown_keyspace"
            with pytest.raises(LeaderlessError) as err:
                await client.put(KEYSPACE, b"k", b"v", consistency="QUORUM2")
            assert err.value.code == "bad_request"

    run(checks)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(_frame(b"\xc1\xc1 not msgpack"))
        reply = sock.recv(65536)
        assert b"bad_request" in reply
        assert sock.recv(65536) == b""  # closed

    base = f"http://127.0.0.1:{http_port}"
    request = urllib.request.Request(f"{base}/v1/keyspaces", data=b"{not json",
                                     method="POST", headers={"Content-Type":
                                                             "application/json"})
    with pytest.raises(urllib.error.HTTPError) as http_err:
        urllib.request.urlopen(request, timeout=10)
    assert http_err.value.code == 400
    assert json.loads(http_err.value.read())["error"] == "bad_request"
    request = urllib.request.Request(f"{base}/v1/kv/{KEYSPACE}/big", data=b"v" * 5000,
                                     method="PUT")
    with pytest.raises(urllib.error.HTTPError) as http_err:
        urllib.request.urlopen(request, timeout=10)
    assert http_err.value.code == 413
    # Still serving, both ways.
    put = urllib.request.Request(f"{base}/v1/kv/{KEYSPACE}/ok", data=b"fine", method="PUT")
    assert urllib.request.urlopen(put, timeout=10).status == 200
    assert urllib.request.urlopen(f"{base}/v1/kv/{KEYSPACE}/ok", timeout=10).read() == b"fine"

    async def still_ok() -> None:
        async with AsyncClient([client_address], timeout_s=10) as client:
            assert await client.get(KEYSPACE, "ok") == b"fine"

    run(still_ok)
    del tmp_path


def test_cli_against_a_live_node(processes: Processes) -> None:
    node, client = start_kv_node(processes, "cli")
    wait_until(lambda: bool(node.members()), "the node answers")
    target = ["--node", client]
    created = run_cli("keyspace", "create", "notes", "--replication", "1", *target)
    assert created.returncode == 0, created.stderr
    again = run_cli("keyspace", "create", "notes", "--replication", "1", *target)
    assert again.returncode == 6 and "exists" in again.stderr
    for sort, text in (("b", "second"), ("a", "first")):
        put = run_cli("kv", "put", "notes", "day1", text, "--sort", sort, *target)
        assert put.returncode == 0, put.stderr
    got = run_cli("kv", "get", "notes", "day1", "--sort", "a", *target)
    assert (got.returncode, got.stdout) == (0, "first")
    scan = run_cli("kv", "scan", "notes", "day1", "--json", *target)
    assert [row["value"] for row in json.loads(scan.stdout)] == ["first", "second"]
    deleted = run_cli("kv", "delete", "notes", "day1", "--sort", "a", *target)
    assert deleted.returncode == 0, deleted.stderr
    missing = run_cli("kv", "get", "notes", "day1", "--sort", "a", *target)
    assert missing.returncode == 4
    unknown = run_cli("kv", "get", "nosuch", "k", *target)
    assert unknown.returncode == 6 and "leaderless keyspace create nosuch" in unknown.stderr
