"""The hash forest: incremental equals rebuilt, order does not matter, any segment's digest
is exactly the hash of its rows, and ring alignment changes speed, never answers."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from leaderless.core.cells import Cell, decode_cell, encode_cell
from leaderless.core.keys import TOKEN_MAX, data_key, token
from leaderless.core.merkle import (
    TOKEN_SPACE,
    MerkleForest,
    coalesce,
    ring_segments,
    scan_hash,
)
from leaderless.core.ring import Ring, RingNode, TokenRange
from leaderless.storage.memory import MemoryStore

KS = "ks"


def put(store: MemoryStore, forest: MerkleForest, keyspace: str, pk: bytes, sk: bytes,
        cell: Cell) -> bool:
    """Store ``cell`` if newer, keeping the forest current as the replica does."""
    key = data_key(keyspace, pk, sk)
    raw = store.get(key)
    old = decode_cell(raw) if raw is not None else None
    if not cell.newer_than(old):
        return False
    store.write([(key, encode_cell(cell))])
    forest.update(keyspace, key, old, cell)
    return True


def purge(store: MemoryStore, forest: MerkleForest, keyspace: str, pk: bytes, sk: bytes) -> None:
    key = data_key(keyspace, pk, sk)
    raw = store.get(key)
    if raw is not None:
        store.write([(key, None)])
        forest.update(keyspace, key, decode_cell(raw), None)


def leaf_digests(forest: MerkleForest, store: MemoryStore, keyspace: str = KS) -> list[int]:
    segments = forest.split(0, TOKEN_SPACE, forest.leaf_count())
    return forest.digests(keyspace, segments, store)


# (partition index, hlc, writer index, tombstone, purge)
operations = st.lists(st.tuples(st.integers(0, 40), st.integers(1, 50), st.integers(0, 2),
                                st.booleans(), st.booleans()), max_size=120)


def apply_ops(ops: list[tuple[int, int, int, bool, bool]], store: MemoryStore,
              forest: MerkleForest) -> None:
    for pk, hlc, writer, tomb, gone in ops:
        key = (f"p{pk}".encode(), b"s" if pk % 3 else b"")
        if gone and pk % 5 == 0:
            purge(store, forest, KS, *key)
        else:
            put(store, forest, KS, *key, Cell(hlc, f"n{writer}", b"v", tombstone=tomb))


@settings(max_examples=60, deadline=None)
@given(operations)
def test_incremental_equals_rebuild(ops: list[tuple[int, int, int, bool, bool]]) -> None:
    store = MemoryStore()
    forest = MerkleForest(leaf_bits=4)
    apply_ops(ops, store, forest)
    rebuilt = MerkleForest(leaf_bits=4)
    assert rebuilt.rebuild(store) == len(store)
    assert leaf_digests(forest, store) == leaf_digests(rebuilt, store)
    assert forest.partial_scans == 0, "leaf-aligned segments come from memory"


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 60), st.integers(1, 1000)), max_size=60,
                unique_by=lambda t: t[0]), st.randoms(use_true_random=False))
def test_order_of_writes_does_not_matter(rows: list[tuple[int, int]], rnd: random.Random
                                         ) -> None:
    def build(order: list[tuple[int, int]]) -> list[int]:
        store, forest = MemoryStore(), MerkleForest(leaf_bits=3)
        for pk, hlc in order:
            put(store, forest, KS, f"k{pk}".encode(), b"", Cell(hlc, "a"))
        return leaf_digests(forest, store)

    shuffled = list(rows)
    rnd.shuffle(shuffled)
    assert build(rows) == build(shuffled)


def test_delete_and_rewrite_return_to_the_same_hash() -> None:
    store, forest = MemoryStore(), MerkleForest(leaf_bits=2)
    before = leaf_digests(forest, store)
    put(store, forest, KS, b"a", b"", Cell(5, "x"))
    assert leaf_digests(forest, store) != before
    forest.update(KS, data_key(KS, b"a"), Cell(5, "x"), Cell(5, "x"))  # same version: no-op
    purge(store, forest, KS, b"a", b"")
    assert leaf_digests(forest, store) == before == [0, 0, 0, 0]


def test_keyspaces_are_separate() -> None:
    store, forest = MemoryStore(), MerkleForest(leaf_bits=2)
    put(store, forest, "one", b"a", b"", Cell(5, "x"))
    assert forest.keyspaces() == ["one"]
    assert forest.digest("two", 0, TOKEN_SPACE, store) == 0
    assert forest.digest("one", 0, TOKEN_SPACE, store) != 0


def _random_store(seed: int, rows: int, leaf_bits: int) -> tuple[MemoryStore, MerkleForest]:
    rnd = random.Random(seed)
    store, forest = MemoryStore(), MerkleForest(leaf_bits=leaf_bits)
    for i in range(rows):
        put(store, forest, KS, f"p{i}".encode(), b"", Cell(rnd.randint(1, 99), "w"))
    return store, forest


@settings(max_examples=80, deadline=None)
@given(st.integers(0, TOKEN_MAX), st.integers(1, TOKEN_SPACE))
def test_any_segment_digest_is_exactly_its_rows(a: int, b: int) -> None:
    lo, hi = min(a, b - 1), max(a + 1, b)
    store, forest = _random_store(1, 200, leaf_bits=3)
    assert forest.digest(KS, lo, hi, store) == scan_hash(store, KS, lo, hi)[0]


def test_align_keeps_answers_and_removes_partial_scans() -> None:
    store, forest = _random_store(2, 300, leaf_bits=3)
    ring = Ring([RingNode("a", 1, 16), RingNode("b", 2, 16)])
    ranges = [r for r, _ in ring.ranges()]
    before = [forest.digest(KS, lo, hi, store) for r in ranges for lo, hi in ring_segments(r)]
    assert forest.partial_scans > 0
    cuts = {edge for r in ranges for seg in ring_segments(r) for edge in seg}
    forest.align(cuts, store)
    assert forest.leaf_count() > 8
    scans = forest.partial_scans
    after = [forest.digest(KS, lo, hi, store) for r in ranges for lo, hi in ring_segments(r)]
    assert after == before
    assert forest.partial_scans == scans, "ring ranges are whole leaves after align"
    # Writes after aligning land in the right (split) leaves.
    put(store, forest, KS, b"late", b"", Cell(7, "w"))
    rebuilt = MerkleForest(leaf_bits=3)
    rebuilt.align(cuts, store)
    rebuilt.rebuild(store)
    assert leaf_digests(forest, store) == leaf_digests(rebuilt, store)
    # Dropping the cuts merges leaves back.
    forest.align([], store)
    assert forest.leaf_count() == 8
    assert forest.digest(KS, 0, TOKEN_SPACE, store) == scan_hash(store, KS, 0, TOKEN_SPACE)[0]


def test_range_digests_at_a_granularity() -> None:
    store, forest = _random_store(3, 100, leaf_bits=6)
    whole = TokenRange(5, 5)  # the whole ring, wrapping
    [pieces] = forest.range_digests(KS, [whole], store, parts=4)
    assert 2 <= len(pieces) <= 8
    total = 0
    for _, digest in pieces:
        total ^= digest
    assert total == scan_hash(store, KS, 0, TOKEN_SPACE)[0]


def test_ring_segments_and_coalesce() -> None:
    assert ring_segments(TokenRange(10, 20)) == [(11, 21)]
    assert ring_segments(TokenRange(20, 10)) == [(21, TOKEN_SPACE), (0, 11)]
    assert ring_segments(TokenRange(TOKEN_MAX, 3)) == [(0, 4)]
    assert ring_segments(TokenRange(7, 7)) == [(8, TOKEN_SPACE), (0, 8)]
    assert coalesce([(5, 9), (0, 5), (20, 30), (25, 26)]) == [(0, 9), (20, 30)]
    for rng in (TokenRange(3, 2**63), TokenRange(2**63, 3)):
        covered = sum(hi - lo for lo, hi in ring_segments(rng))
        assert covered == rng.size()
        assert all(rng.contains(lo) and rng.contains(hi - 1) for lo, hi in ring_segments(rng))


@settings(max_examples=100, deadline=None)
@given(st.integers(0, TOKEN_MAX), st.integers(1, TOKEN_SPACE), st.integers(1, 40))
def test_split_covers_on_grid_boundaries(a: int, b: int, parts: int) -> None:
    lo, hi = min(a, b - 1), max(a + 1, b)
    forest = MerkleForest(leaf_bits=5)
    pieces = forest.split(lo, hi, parts)
    assert pieces[0][0] == lo and pieces[-1][1] == hi and len(pieces) <= parts
    for (_, x), (y, _) in zip(pieces, pieces[1:], strict=False):
        assert x == y and x % (1 << 59) == 0
    if len(pieces) == 1 and parts > 1:
        assert forest.is_finest(lo, hi)


def test_leaf_bits_are_bounded() -> None:
    with pytest.raises(ValueError, match="leaf_bits"):
        MerkleForest(leaf_bits=30)


def test_token_of_rows_places_them() -> None:
    """update() reads the token from the key: the same leaf as the key's own token."""
    store, forest = MemoryStore(), MerkleForest(leaf_bits=8)
    put(store, forest, KS, b"x", b"y", Cell(1, "w"))
    tok = token(b"x")
    assert forest.digest(KS, tok, tok + 1, store) != 0
