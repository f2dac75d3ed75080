"""A keyspace's definition on a node that never used the keyspace, while a quorum of the
ring is down: real node processes.

Every node holds a replica of every keyspace definition, but a node reads one (on first
use) at QUORUM over the whole ring. With one of two nodes down that quorum is out of
reach, so a node that had not served the keyspace yet refused even a ONE write to it
(``1 of 2 replicas are alive; the consistency level needs 2``): the flake behind
test_encryption_at_rest's hints test, whose keyspace was sometimes created and warmed up
through the other node only. The node now falls back to its own replica."""

from __future__ import annotations

import asyncio
import signal

import pytest

from leaderless.api.kv_messages import CreateKeyspace, Done, Failure
from leaderless.client import AsyncClient
from leaderless.client.connection import NodeConnection
from leaderless.config import parse_host_port
from tests.integration.helpers import DEADLINE_S, Processes, wait_until
from tests.integration.test_encryption_at_rest import start, wait_ready

pytestmark = pytest.mark.integration


def create_through(client_address: str, keyspace: str) -> bool:
    """Create ``keyspace`` (replication 2) on exactly the node at ``client_address``: one
    connection, no ring discovery, so that no other node coordinates it."""
    address = parse_host_port(client_address)

    async def create() -> bool:
        conn = await NodeConnection.open(address.host, address.port, DEADLINE_S)
        try:
            reply = await conn.call(CreateKeyspace, (keyspace, 2), DEADLINE_S)
        finally:
            conn.close()
        assert isinstance(reply, Done | Failure), reply
        return isinstance(reply, Done)

    return asyncio.run(create())


@pytest.mark.timeout(120)
def test_a_one_write_needs_one_replica_on_a_node_that_never_used_the_keyspace(
        processes: Processes) -> None:
    first, first_client = start(processes, "d1")
    wait_ready(first)
    second, second_client = start(processes, "d2", join=first.address)
    wait_ready(first, members=2)
    wait_ready(second, members=2)
    # Written at QUORUM of the 2-node ring: d1 holds the definition, d2 alone served it.
    wait_until(lambda: create_through(second_client, "secrets"),
               "d2 creates the keyspace with both nodes in its ring")

    second.process.send_signal(signal.SIGKILL)
    second.process.wait(timeout=DEADLINE_S)
    wait_until(lambda: getattr(first.members().get("d2"), "state", "dead") == "dead",
               "d1 sees d2 dead")

    async def write_and_read() -> bytes | None:
        async with AsyncClient([first_client], timeout_s=15) as client:
            await client.put("secrets", "k", b"v", consistency="ONE")
            return await client.get("secrets", "k", consistency="ONE")

    assert asyncio.run(write_and_read()) == b"v"
