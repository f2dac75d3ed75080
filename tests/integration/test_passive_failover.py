"""Passive failover on real processes: a node whose fsync starts failing (the test-only
fault hook) hands off its hints, leaves, and exits naming the fault; the others show it
``left``; every write acknowledged during the test is still readable."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import pytest

from leaderless.client import AsyncClient, LeaderlessError
from leaderless.runtime.ports import free_port
from leaderless.runtime.process import EXIT_FAILOVER
from tests.integration.helpers import NodeProcess, Processes, wait_until

pytestmark = pytest.mark.integration
KEYSPACE = "items"
FAULT_AFTER_SYNCS = 150
"""Syncs the failing node completes before its fsync fails: its start, the keyspace, and
a few dozen of the test's writes (each QUORUM write is about one sync there)."""
WRITES_MAX = 5000
"""Writes the test drives through the failing node at most; it fails long before."""


def start(processes: Processes, name: str, join: str | None = None, port: int | None = None,
          client: bool = True, env: dict[str, str] | None = None
          ) -> tuple[NodeProcess, str]:
    """A node, with a client listener or without one (then clients, which spread requests
    over every node they discover, cannot send it any: a alone coordinates the writes)."""
    address = f"127.0.0.1:{free_port()}"
    node = processes.start_node(name, port, join, env, *(("--client", address) if client
                                                         else ()), "--log-level", "info")
    return node, address


def state_of(observer: NodeProcess, name: str) -> str | None:
    member = observer.members().get(name)
    return None if member is None else member.state


def kv_counters(node: NodeProcess) -> dict[str, Any]:
    kv: dict[str, Any] = node.status().runtime["kv"]
    return kv


@pytest.mark.timeout(120)
def test_a_failing_fsync_hands_off_hints_leaves_and_loses_no_acknowledged_write(
        processes: Processes) -> None:
    a, a_client = start(processes, "a", env={
        "LEADERLESS_FAULT_FSYNC_FAIL_AFTER": str(FAULT_AFTER_SYNCS)})
    b, _ = start(processes, "b", a.address, client=False)
    c, _ = start(processes, "c", a.address, client=False)
    nodes = [a, b, c]
    wait_until(lambda: all(sum(m.state == "alive" for m in n.members().values()) == 3
                           for n in nodes), "all three nodes see each other alive")

    async def create() -> None:
        async with AsyncClient([a_client], timeout_s=15, token_aware=False) as client:
            await client.create_keyspace(KEYSPACE, replication=3)

    asyncio.run(create())
    # c goes down hard, so a (which coordinates every write) keeps hints for it.
    c.process.send_signal(signal.SIGKILL)
    c.process.wait(timeout=10)
    wait_until(lambda: state_of(a, "c") == "dead", "a sees c dead")

    acknowledged: dict[str, bytes] = {}
    refused: list[str] = []

    async def drive() -> None:
        # Write through a alone until its fsync fails and it stops serving.
        async with AsyncClient([a_client], timeout_s=5, token_aware=False) as client:
            for i in range(WRITES_MAX):
                key, value = f"key{i}", f"value-{i}".encode()
                try:
                    await client.put(KEYSPACE, key, value, consistency="QUORUM")
                except (LeaderlessError, OSError, TimeoutError) as exc:
                    refused.append(f"{key}: {exc}")
                    if a.process.poll() is not None or len(refused) > 20:
                        return
                    await asyncio.sleep(0.05)
                    continue
                acknowledged[key] = value

    asyncio.run(drive())
    assert a.process.wait(timeout=30) == EXIT_FAILOVER
    assert len(acknowledged) >= 10, (len(acknowledged), refused[:3])

    # a's log names each step: the fault, the hints handed off (to b), the leave, the exit.
    lines = a.log()
    by_msg = {line["msg"]: line for line in lines}
    assert by_msg["passive_failover"]["fault"] == "fsync"
    assert "Input/output error" in by_msg["passive_failover"]["error"]
    handed = by_msg["hints_handed_off"]
    assert handed["count"] >= len(acknowledged), handed  # a hint for c per write
    assert handed["holders"] == {"b": handed["count"]}
    assert handed["not_handed_off"] == 0
    assert "leaving" in by_msg
    exit_line = lines[-1]
    assert exit_line["msg"] == "passive_failover_exit", exit_line
    assert "fsync" in exit_line["message"] and "What to do" in exit_line["message"]
    # The test-only switch was announced loudly at start.
    assert by_msg["test_fault_enabled"]["level"] == "warning"

    # b marks a left (not dead) and keeps the hints for c it took over.
    wait_until(lambda: state_of(b, "a") == "left", "b shows a left")
    assert kv_counters(b)["hints_pending"] >= handed["count"]

    # c comes back (same address, now with a client listener): it learns that a left, and
    # b replays the hints to it.
    c, c_client = start(processes, "c", b.address, port=c.port)
    wait_until(lambda: state_of(c, "a") == "left", "c shows a left")
    wait_until(lambda: state_of(b, "c") == "alive", "b sees c alive again")
    wait_until(lambda: kv_counters(b)["hints_pending"] == 0, "b replayed its hints to c")
    assert kv_counters(b)["handoff_replayed"] >= handed["count"]

    async def check() -> None:
        # c's own copy first (it replicates every key; a QUORUM read would repair it):
        # what reached it through the hints a handed to b.
        async with AsyncClient([c_client], timeout_s=15, token_aware=False) as client:
            for key, value in acknowledged.items():
                assert await client.get(KEYSPACE, key, consistency="ONE") == value, key
        # QUORUM through c: a left the ring, so every key's live replicas are b and c, and
        # both must answer.
        async with AsyncClient([c_client], timeout_s=15) as client:
            for key, value in acknowledged.items():
                assert await client.get(KEYSPACE, key, consistency="QUORUM") == value, key

    asyncio.run(check())
