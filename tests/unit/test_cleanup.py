"""Cleanup (``runtime.cleanup``): a node deletes the rows of the ranges it no longer holds,
data rows and Paxos states alike, a slice at a time, keeping its Merkle forest right; never
while the ring changes; never the schema keyspace, hints, or keyspaces it cannot place."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from leaderless.core.cells import Cell, encode_cell
from leaderless.core.hints import HINT_PREFIX
from leaderless.core.keys import TOKEN_MAX, data_key, parse_data_key, token
from leaderless.core.merkle import MerkleForest
from leaderless.core.paxos import encode_state, paxos_key
from leaderless.core.paxos_messages import AcceptorState, Ballot, Register
from leaderless.core.placement import Placement, PlacementMember, RingState
from leaderless.core.ring import TokenRange
from leaderless.core.schema import SYSTEM_KEYSPACE
from leaderless.runtime.cleanup import (
    CleanupPass,
    CleanupRefusedError,
    cleanup_plan,
    dropped_intervals,
    has_rows,
)
from leaderless.runtime.node import Node
from leaderless.storage.memory import MemoryStore
from tests.unit.test_runtime_node import run_test, start_cluster, stop_all, wait_until

KS = "app"
TOKENS = 16
tokens_ = st.integers(0, TOKEN_MAX)


def contains(rng: TokenRange, tok: int) -> bool:
    if rng.start < rng.end:
        return rng.start < tok <= rng.end
    return tok > rng.start or tok <= rng.end


def in_intervals(intervals: list[tuple[int, int]], tok: int) -> bool:
    return any(lo <= tok <= hi for lo, hi in intervals)


@given(st.lists(st.tuples(tokens_, tokens_), max_size=8), st.lists(tokens_, max_size=30))
def test_dropped_intervals_are_exactly_the_tokens_outside_every_retained_range(
        pairs: list[tuple[int, int]], probes: list[int]) -> None:
    ranges = [TokenRange(a, b) for a, b in pairs]
    dropped = dropped_intervals(ranges)
    edges = [t for a, b in pairs for t in (a, b, a + 1, (b + 1) & TOKEN_MAX)]
    for tok in [*probes, *edges, 0, TOKEN_MAX]:
        assert in_intervals(dropped, tok) == (not any(contains(r, tok) for r in ranges))
    assert all(lo <= hi for lo, hi in dropped)
    assert all(a[1] < b[0] for a, b in zip(dropped, dropped[1:], strict=False))


def test_dropped_intervals_edges() -> None:
    assert dropped_intervals([]) == [(0, TOKEN_MAX)]
    assert dropped_intervals([TokenRange(5, 5)]) == []  # the whole ring
    assert dropped_intervals([TokenRange(10, 20)]) == [(0, 10), (21, TOKEN_MAX)]
    assert dropped_intervals([TokenRange(TOKEN_MAX - 1, 3)]) == [(4, TOKEN_MAX - 1)]


def members(*names: str, **states: RingState) -> list[PlacementMember]:
    return [PlacementMember(name, seed, TOKENS, state=states.get(name, RingState.NORMAL))
            for seed, name in enumerate(names, start=1)]


def fill(store: MemoryStore, forest: MerkleForest, keyspace: str, count: int) -> None:
    for i in range(count):
        pk = f"k{i}".encode()
        key = data_key(keyspace, pk)
        cell = Cell(1000 + i, "n1", b"v")
        store.write([(key, encode_cell(cell))])
        forest.update(keyspace, key, None, cell)
        if i % 4 == 0:
            store.write([(paxos_key(keyspace, pk, b""), encode_state(AcceptorState(
                Ballot(1, "n1"), Ballot(1, "n1"), Register(1, b"x"))))])


def leaf_digests(forest: MerkleForest, keyspace: str, store: MemoryStore) -> list[int]:
    segments = forest.split(0, TOKEN_MAX + 1, forest.leaf_count())
    return forest.digests(keyspace, segments, store)


def test_a_pass_deletes_rows_and_paxos_states_outside_the_retained_ranges() -> None:
    placement = Placement(members("n1", "n2", "n3", "n4"))
    store = MemoryStore()
    forest = MerkleForest(leaf_bits=8)
    fill(store, forest, KS, 600)
    fill(store, forest, "unplaced", 50)  # no definition here: never touched
    fill(store, forest, SYSTEM_KEYSPACE, 20)  # on every node
    store.write([(HINT_PREFIX + b"some-hint", b"x")])
    retained = placement.retained("n1", 2)
    bounds = cleanup_plan(placement, "n1", {KS: 2, SYSTEM_KEYSPACE: 1})
    assert has_rows(store, bounds)

    walk = CleanupPass(bounds)
    slices = 0
    while True:
        part = walk.next_slice(store, keys_max=37)
        assert len(part.writes) <= 37
        for keyspace, key, cell in part.deleted:
            forest.update(keyspace, key, cell, None)
        store.write(part.writes)
        slices += 1
        if part.done:
            break
    assert slices > 3
    assert not has_rows(store, bounds)

    kept = {parse_data_key(k)[2] for k, _ in store.scan(b"d", b"e")
            if parse_data_key(k)[0] == KS}
    for i in range(600):
        pk = f"k{i}".encode()
        ours = any(contains(r, token(pk)) for r in retained)
        assert (pk in kept) == ours
        if i % 4 == 0:
            assert (store.get(paxos_key(KS, pk, b"")) is not None) == ours
    assert 0 < len(kept) < 600
    assert len([1 for k, _ in store.scan(b"d", b"e") if parse_data_key(k)[0] == "unplaced"]) == 50
    assert len([1 for k, _ in store.scan(b"d", b"e")
                if parse_data_key(k)[0] == SYSTEM_KEYSPACE]) == 20
    assert store.get(HINT_PREFIX + b"some-hint") == b"x"
    rebuilt = MerkleForest(leaf_bits=8)
    rebuilt.rebuild(store)
    for keyspace in (KS, "unplaced", SYSTEM_KEYSPACE):
        assert leaf_digests(forest, keyspace, store) == leaf_digests(rebuilt, keyspace, store)


def test_cleanup_is_refused_while_the_ring_changes_or_off_the_ring() -> None:
    joining = Placement(members("n1", "n2", "n3", "j", j=RingState.JOINING))
    with pytest.raises(CleanupRefusedError, match="changing"):
        cleanup_plan(joining, "n1", {KS: 2})
    leaving = Placement(members("n1", "n2", "n3", n3=RingState.LEAVING))
    with pytest.raises(CleanupRefusedError, match="changing"):
        cleanup_plan(leaving, "n1", {KS: 2})
    with pytest.raises(CleanupRefusedError, match="not on the ring"):
        cleanup_plan(Placement(members("n1", "n2")), "x", {KS: 2})


def test_a_member_of_every_replica_set_has_nothing_to_delete() -> None:
    placement = Placement(members("n1", "n2", "n3"))
    assert cleanup_plan(placement, "n1", {KS: 3}) == []


# -- on a node --------------------------------------------------------------------------


def put_everywhere(node: Node, count: int) -> None:
    """Rows of every token straight into the node's store, as an old owner would hold."""
    assert node.kv is not None
    rng = random.Random(3)
    for i in range(count):
        writes = node.kv.replica.apply(KS, f"key{i}-{rng.random()}".encode(), b"",
                                       Cell(1000 + i, node.name, b"old"))
        node.kv.store.write(writes)


def test_node_cleanup_keeps_exactly_its_ranges_and_counts_the_rows(tmp_path: Path) -> None:
    async def main() -> None:
        nodes = await start_cluster(tmp_path, 3)
        try:
            n1 = nodes[0]
            assert n1.kv is not None and n1.cleanup is not None
            await n1.kv.create_keyspace(KS, replication=1)
            await wait_until(lambda: any(d.name == KS for d in n1.kv.local_definitions())
                             if n1.kv else False, "the keyspace is defined on n1")
            put_everywhere(n1, 400)
            await wait_until(lambda: not n1.kv.placement.changing if n1.kv else False,
                             "the ring is stable")
            # Automatic: once the ring has been stable for the grace period.
            grace_s = n1.cleanup.grace_s
            n1.cleanup.close()  # its own loop (on the real clock) stays out of the way
            n1.cleanup.check(0.0)  # the first look: the ring's shape, stable from now
            n1.cleanup.check(grace_s - 1)
            assert not n1.cleanup.running and n1.cleanup.deleted_rows == 0
            n1.cleanup.check(grace_s)
            assert n1.cleanup.running
            await wait_until(lambda: n1.cleanup is not None and not n1.cleanup.running,
                             "the cleanup pass ends")
            assert n1.cleanup.error == ""
            n1.cleanup.check(2 * grace_s)  # done for this ring: no new pass
            assert not n1.cleanup.running
            retained = n1.kv.placement.retained("n1", 1)
            rows = [parse_data_key(k) for k, _ in n1.kv.store.scan(b"d", b"e")]
            ours = [tok for ks, tok, _, _ in rows if ks == KS]
            assert ours and all(any(contains(r, t) for r in retained) for t in ours)
            assert n1.cleanup.deleted_rows == 400 - len(ours) > 0
            assert n1.cleanup.last_finished_at is not None
            # Nothing left: a requested pass deletes nothing.
            n1.cleanup.request()
            await wait_until(lambda: n1.cleanup is not None and not n1.cleanup.running,
                             "the second pass ends")
            assert n1.cleanup.deleted_rows == 400 - len(ours)
            await asyncio.sleep(0)
        finally:
            await stop_all(nodes)

    run_test(main())
