"""Growing and shrinking a cluster of real processes while it serves: two nodes join at
once, a node is decommissioned, a killed node is replaced. A writer and a QUORUM reader
run throughout; no read may miss an acknowledged write."""

from __future__ import annotations

import asyncio
import json
import random
import signal
from pathlib import Path
from typing import Any

import pytest

from leaderless.client import AsyncClient, LeaderlessError
from leaderless.core.keys import keyspace_prefix, parse_data_key, prefix_end, token
from leaderless.core.ring import Ring, RingNode
from leaderless.runtime.ports import free_port
from leaderless.storage.rocks import RocksStore
from tests.integration.helpers import NodeProcess, Processes, run_cli, wait_until
from tests.integration.test_kv_cluster import KEYSPACE, write_all

pytestmark = pytest.mark.integration
FAST = {"LEADERLESS_RING_SETTLE_S": "2", "LEADERLESS_ANTI_ENTROPY_INTERVAL_S": "3600"}
"""Anti-entropy off (in effect): what the joiners hold must come from streaming."""


def start(processes: Processes, name: str, join: str | None = None, *,
          bootstrap: bool = False, extra: tuple[str, ...] = ()) -> tuple[NodeProcess, str]:
    client = f"127.0.0.1:{free_port()}"
    node = processes.start_node(name, None, join, FAST, "--client", client,
                                "--log-level", "warning", *extra, bootstrap=bootstrap)
    return node, client


def first_members(processes: Processes, count: int) -> tuple[list[NodeProcess], list[str]]:
    """The first ``count`` members of a new cluster (n1 .. n<count>), all seeing all alive."""
    first, first_client = start(processes, "n1")
    nodes, clients = [first], [first_client]
    for i in range(2, count + 1):
        node, client = start(processes, f"n{i}", first.address)
        nodes.append(node)
        clients.append(client)
    wait_until(lambda: all(alive_count(n) == count for n in nodes), f"{count} nodes alive")
    return nodes, clients


def ring_state(node: NodeProcess) -> str:
    try:
        return str(json.loads((node.data_dir / "ring.json").read_text())["state"])
    except (OSError, ValueError):
        return "?"


def alive_count(node: NodeProcess) -> int:
    return sum(m.state == "alive" for m in node.members().values())


class Load:
    """A writer of new keys and a QUORUM reader of acknowledged ones, until stopped."""

    def __init__(self, clients: list[str]) -> None:
        self.clients = clients
        self.acked: dict[str, bytes] = {}
        self.write_errors: list[str] = []
        self.misses: list[str] = []
        self.read_errors: list[str] = []
        self.reads = 0
        self._stop = asyncio.Event()

    async def run(self, known: dict[str, bytes]) -> None:
        async with AsyncClient(self.clients, timeout_s=10.0) as client:
            await asyncio.gather(self._writer(client), self._reader(client, known),
                                 self._reader(client, known))

    def stop(self) -> None:
        self._stop.set()

    async def _writer(self, client: AsyncClient) -> None:
        i = 0
        while not self._stop.is_set():
            key, value = f"live{i}", f"value-{i}".encode()
            try:
                await client.put(KEYSPACE, key, value, consistency="QUORUM")
            except LeaderlessError as exc:
                self.write_errors.append(f"{key}: {exc.code}: {exc}")
            else:
                self.acked[key] = value
            i += 1
            await asyncio.sleep(0.002)

    async def _reader(self, client: AsyncClient, known: dict[str, bytes]) -> None:
        rng = random.Random(7)
        keys = list(known)
        while not self._stop.is_set():
            if self.acked and rng.random() < 0.5:
                key = rng.choice(list(self.acked))
                expect = self.acked[key]
            else:
                key = rng.choice(keys)
                expect = known[key]
            try:
                got = await client.get(KEYSPACE, key, consistency="QUORUM")
            except LeaderlessError as exc:
                self.read_errors.append(f"{key}: {exc.code}: {exc}")
                continue
            self.reads += 1
            if got != expect:
                self.misses.append(f"{key}: {got!r}")


def run_with_load(clients: list[str], known: dict[str, bytes], during: Any) -> Load:
    """Run ``during()`` (blocking, in a thread) while the load runs; returns the load."""
    load = Load(clients)

    async def main() -> None:
        task = asyncio.get_running_loop().create_task(load.run(known))
        await asyncio.sleep(1.0)
        await asyncio.to_thread(during)
        await asyncio.sleep(1.0)
        load.stop()
        await task

    asyncio.run(main())
    return load


def create_and_fill(client: str, count: int) -> dict[str, bytes]:
    values = {f"key{i}": f"v{i}".encode() for i in range(count)}

    async def go() -> list[str]:
        async with AsyncClient([client], timeout_s=10.0) as c:
            await c.create_keyspace(KEYSPACE, replication=3)
            return await write_all(c, range(count), lambda i: f"v{i}".encode())

    assert asyncio.run(go()) == []
    return values


def stored_keys(data_dir: Path) -> set[bytes]:
    """The partition keys of KEYSPACE in a stopped node's store."""
    store = RocksStore(data_dir / "data")
    try:
        prefix = keyspace_prefix(KEYSPACE)
        return {parse_data_key(k)[2] for k, _ in store.scan(prefix, prefix_end(prefix))}
    finally:
        store.close()


def final_ring(nodes: list[NodeProcess]) -> Ring:
    """The ring of the given (stopped, normal) nodes, from their data dirs."""
    result = []
    for node in nodes:
        saved = json.loads((node.data_dir / "ring.json").read_text())
        seed = int(saved.get("token_seed") or (node.data_dir / "token_seed").read_text())
        result.append(RingNode(node.name, seed, int(saved["token_count"])))
    return Ring(result)


def stop(nodes: list[NodeProcess]) -> None:
    for node in nodes:
        node.process.send_signal(signal.SIGTERM)
    for node in nodes:
        node.process.wait(timeout=30)


def check_load(load: Load) -> None:
    assert load.misses == [], f"{len(load.misses)} reads missed acknowledged writes: " \
        f"{load.misses[:5]}"
    assert load.write_errors == [], load.write_errors[:5]
    assert load.read_errors == [], load.read_errors[:5]
    assert len(load.acked) > 100 and load.reads > 100, (len(load.acked), load.reads)


def test_two_nodes_join_at_once_under_load(processes: Processes) -> None:
    nodes, clients = first_members(processes, 3)
    first, first_client = nodes[0], clients[0]
    known = create_and_fill(first_client, 20_000)
    joiners: list[NodeProcess] = []

    def join_two() -> None:
        for name in ("n4", "n5"):
            node, client = start(processes, name, first.address, bootstrap=True)
            joiners.append(node)
            clients.append(client)
        wait_until(lambda: all(ring_state(n) == "joining" for n in joiners), "both joining",
                   timeout_s=20)
        wait_until(lambda: all(ring_state(n) == "normal" for n in joiners),
                   "both joiners streamed their ranges and became normal", timeout_s=120)

    load = run_with_load(clients[:3], known, join_two)
    check_load(load)
    everyone = nodes + joiners
    for node in everyone:  # refused until the ring has been still for settle_s
        wait_until(lambda n=node: run_cli("node", "cleanup", "--node", n.address)  # type: ignore[misc]
                   .returncode == 0, f"cleanup on {node.name} done", timeout_s=30)
    stop(everyone)
    ring = final_ring(everyone)
    shares = ring.ownership()
    assert max(shares.values()) <= 1.25 / len(everyone), shares
    all_keys = {k.encode() for k in known} | {k.encode() for k in load.acked}
    for node in everyone:
        held = stored_keys(node.data_dir)
        mine = {k for k in all_keys if node.name in ring.preference_list(token(k), 3)}
        assert mine <= held, f"{node.name} lacks {len(mine - held)} keys of its ranges"
        assert held <= mine, f"{node.name} keeps {len(held - mine)} keys of others' ranges"


def test_decommission_one_of_five_under_load(processes: Processes) -> None:
    nodes, clients = first_members(processes, 5)
    known = create_and_fill(clients[0], 5_000)
    leaving = nodes[4]

    def decommission() -> None:
        result = run_cli("node", "decommission", "--node", leaving.address, timeout_s=120)
        assert result.returncode == 0, result.stderr
        leaving.process.wait(timeout=30)

    load = run_with_load(clients[:4], known, decommission)
    check_load(load)
    assert ring_state(leaving) == "left"
    stop(nodes[:4])
    ring = final_ring(nodes[:4])
    for key in list(known)[:2000] + list(load.acked):
        holders = [n for n in nodes[:4] if n.name in ring.preference_list(token(key.encode()), 3)]
        assert len(holders) == 3
    for node in nodes[:4]:
        held = stored_keys(node.data_dir)
        mine = {k.encode() for k in known if node.name in ring.preference_list(
            token(k.encode()), 3)}
        assert mine <= held, f"{node.name} lacks {len(mine - held)} keys it took over"


def test_a_killed_node_is_replaced_with_its_data(processes: Processes) -> None:
    nodes, clients = first_members(processes, 4)
    first, first_client = nodes[0], clients[0]
    known = create_and_fill(first_client, 5_000)
    dead = nodes[3]
    dead.process.send_signal(signal.SIGKILL)
    dead.process.wait(timeout=10)
    wait_until(lambda: all(n.members().get("n4") is not None
                           and n.members()["n4"].state == "dead" for n in nodes[:3]),
               "n4 is dead to everyone", timeout_s=60)
    replacement, _ = start(processes, "r4", first.address, bootstrap=True,
                           extra=("--replace", "n4"))
    wait_until(lambda: ring_state(replacement) == "normal",
               "the replacement streamed n4's ranges and became normal", timeout_s=120)
    survivors = [*nodes[:3], replacement]
    stop(survivors)
    ring = final_ring(survivors)
    held = stored_keys(replacement.data_dir)
    mine = {k.encode() for k in known if "r4" in ring.preference_list(token(k.encode()), 3)}
    assert mine and mine == held & {k.encode() for k in known}
    for peer in nodes[:3]:
        theirs = stored_keys(peer.data_dir)
        shared = {k for k in mine if peer.name in ring.preference_list(token(k), 3)}
        assert shared <= theirs


def test_a_capacity_change_moves_a_share_of_the_data_under_load(processes: Processes) -> None:
    nodes, clients = first_members(processes, 4)
    known = create_and_fill(clients[0], 4_000)
    bigger = nodes[3]

    def grow() -> None:
        result = run_cli("node", "set-capacity", "2", "--node", bigger.address)
        assert result.returncode == 0, result.stderr
        wait_until(lambda: json.loads((bigger.data_dir / "ring.json").read_text())
                   .get("token_count") == 512, "n4 moved to 512 tokens", timeout_s=120)

    load = run_with_load(clients, known, grow)
    check_load(load)
    stop(nodes)
    ring = final_ring(nodes)
    shares = ring.ownership()
    assert shares["n4"] > 1.6 * max(shares[n.name] for n in nodes[:3]), shares
    held = stored_keys(bigger.data_dir)
    mine = {k.encode() for k in known if "n4" in ring.preference_list(token(k.encode()), 3)}
    assert mine <= held, f"n4 lacks {len(mine - held)} keys of its new ranges"
