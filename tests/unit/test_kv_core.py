"""Core pieces of the data plane: ring balance and zones, HLC, key layout, quorum sizes,
cells (last-writer-wins, TTL, purge), hints, and the scan merge."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from leaderless.core.cells import Cell, decode_cell, encode_cell, newest
from leaderless.core.coordinator import merge_scans
from leaderless.core.hints import Hint, HintLog
from leaderless.core.hlc import ClockSkewError, HybridClock, physical_ms
from leaderless.core.keys import (
    KeyError_,
    check_key,
    check_keyspace_name,
    data_key,
    parse_data_key,
    partition_prefix,
    token,
    token_range_bounds,
)
from leaderless.core.kv_messages import ScanRow
from leaderless.core.quorum import ConsistencyError, required
from leaderless.core.ring import Ring, RingNode, TokenRange, derive_tokens, token_count_for
from leaderless.storage.memory import MemoryStore


def ring_of(weights: list[float], seed: int, zones: list[str] | None = None) -> Ring:
    rng = random.Random(seed)
    return Ring(RingNode(f"n{i}", rng.getrandbits(64), token_count_for(w),
                         zones[i] if zones else "") for i, w in enumerate(weights))


@pytest.mark.parametrize("seed", range(20))
def test_five_equal_nodes_own_at_most_125_percent_of_a_fair_share(seed: int) -> None:
    ownership = ring_of([1.0] * 5, seed).ownership()
    assert sum(ownership.values()) == pytest.approx(1.0)
    assert max(ownership.values()) <= 1.25 / 5


def test_ownership_follows_weights() -> None:
    weights = [1.0, 2.0, 4.0]
    for seed in range(10):
        ownership = ring_of(weights, seed).ownership()
        for i, weight in enumerate(weights):
            fair = weight / sum(weights)
            assert abs(ownership[f"n{i}"] - fair) <= 0.2 * fair, (seed, ownership)


def test_preference_list_is_n_distinct_nodes_and_spans_zones_first() -> None:
    ring = ring_of([1.0] * 6, 1, zones=["a", "a", "a", "b", "b", "c"])
    for key in range(200):
        replicas = ring.preference_list(token(str(key).encode()), 3)
        assert len(set(replicas)) == 3
        assert {ring.nodes[r].zone for r in replicas} == {"a", "b", "c"}
    plain = ring_of([1.0] * 4, 2)
    assert len(plain.preference_list(123, 10)) == 4  # never more than the nodes


def test_tokens_are_deterministic_and_ranges_tile_the_ring() -> None:
    assert derive_tokens(7, 16) == derive_tokens(7, 16)
    ring = ring_of([1.0] * 3, 3)
    total = sum(rng.size() for rng, _ in ring.ranges())
    assert total == 2**64
    wrap = TokenRange(2**64 - 10, 5)
    assert wrap.contains(2**64 - 1) and wrap.contains(0) and wrap.contains(5)
    assert not wrap.contains(6) and not wrap.contains(2**64 - 10)


def test_hlc_is_monotonic_follows_peers_and_refuses_far_future() -> None:
    clock = HybridClock(max_offset_ms=500)
    a = clock.now(1000)
    b = clock.now(1000)  # same millisecond: the counter moves
    c = clock.now(900)  # wall clock went back: still ahead
    assert a < b < c
    merged = clock.observe((1400 << 16) | 3, 1000)
    assert merged >= (1400 << 16) | 3 and clock.now(1000) > merged
    with pytest.raises(ClockSkewError):
        clock.observe(2000 << 16, 1000)
    assert physical_ms(clock.now(5000)) == 5000


@given(st.binary(min_size=1, max_size=40), st.binary(max_size=40),
       st.binary(min_size=1, max_size=40), st.binary(max_size=40))
def test_store_keys_group_partitions_and_order_by_sort_key(pk1: bytes, sk1: bytes,
                                                           pk2: bytes, sk2: bytes) -> None:
    k1, k2 = data_key("ks", pk1, sk1), data_key("ks", pk2, sk2)
    assert parse_data_key(k1) == ("ks", token(pk1), pk1, sk1)
    if pk1 == pk2:
        assert (k1 < k2) == (sk1 < sk2)
        assert k1.startswith(partition_prefix("ks", pk1))
    else:
        assert not k2.startswith(partition_prefix("ks", pk1))


def test_token_range_bounds_cover_exactly_the_range() -> None:
    store = MemoryStore()
    keys = [f"k{i}".encode() for i in range(500)]
    store.write([(data_key("ks", k), b"x") for k in keys])
    store.write([(data_key("other", k), b"x") for k in keys])
    for rng in (TokenRange(2**62, 2**63), TokenRange(2**63, 2**62)):
        found = set()
        for lo, hi in token_range_bounds("ks", rng.start, rng.end):
            found.update(parse_data_key(k)[2] for k, _ in store.scan(lo, hi))
        assert found == {k for k in keys if rng.contains(token(k))}


def test_key_limits_are_specific() -> None:
    check_key(b"k" * 1024, b"s" * 1024)
    with pytest.raises(KeyError_, match="partition key has 1025 bytes"):
        check_key(b"k" * 1025, b"")
    with pytest.raises(KeyError_, match="sort key"):
        check_key(b"k", b"s" * 1025)
    with pytest.raises(KeyError_, match="empty"):
        check_key(b"", b"")
    with pytest.raises(KeyError_):
        check_keyspace_name("9bad")


def test_quorum_sizes() -> None:
    assert [required(level, 3) for level in ("ONE", "TWO", "QUORUM", "ALL")] == [1, 2, 2, 3]
    assert required("QUORUM", 5) == 3 and required("QUORUM", 1) == 1
    with pytest.raises(ConsistencyError, match="only 1"):
        required("TWO", 1)
    with pytest.raises(ConsistencyError, match="unknown"):
        required("EACH", 3)


def test_cells_last_writer_wins_ttl_and_purge() -> None:
    old = Cell(5 << 16, "a", b"old")
    new = Cell(6 << 16, "a", b"new")
    tie = Cell(6 << 16, "b", b"tie")
    assert new.newer_than(old) and tie.newer_than(new) and not old.newer_than(new)
    assert newest([old, None, tie, new]) == tie
    assert decode_cell(encode_cell(tie)) == tie
    expiring = Cell(5 << 16, "a", b"v", expires_at_ms=100)
    assert expiring.visible(99) and not expiring.visible(100)
    assert not expiring.purgeable(150, grace_ms=100) and expiring.purgeable(201, grace_ms=100)
    tomb = Cell(1000 << 16, "a", tombstone=True)
    assert not tomb.visible(0)
    assert not tomb.purgeable(1050, grace_ms=100) and tomb.purgeable(1101, grace_ms=100)


def test_hint_log_counts_survive_a_reopen() -> None:
    store = MemoryStore()
    log = HintLog(store)
    writes = [log.add("n2", Hint("ks", b"p", b"", Cell(i << 16, "n1", b"v"), 0))
              for i in range(3)]
    writes.append(log.add("n3", Hint("ks", b"q", b"", Cell(9 << 16, "n1", b"v"), 0)))
    store.write(writes)
    again = HintLog(store)
    assert again.pending == {"n2": 3, "n3": 1}
    listed = list(again.scan("n2", None, 10))
    assert [h.cell.hlc >> 16 for _, h in listed] == [0, 1, 2]
    store.write([again.remove("n2", listed[0][0])])
    assert HintLog(store).pending == {"n2": 2, "n3": 1}


def test_scan_merge_takes_newest_and_stops_where_a_replica_was_cut() -> None:
    def rows(*items: tuple[bytes, int]) -> list[ScanRow]:
        return [ScanRow(sort, Cell(ts << 16, "n")) for sort, ts in items]

    merged, more = merge_scans({"a": rows((b"1", 1), (b"2", 5)),
                                "b": rows((b"1", 3), (b"3", 1))}, limit=2)
    # a hit the limit at b"2": b"3" (only b had it) may hide a newer row on a: cut there.
    assert [(r.sort, r.cell.hlc >> 16) for r in merged] == [(b"1", 3), (b"2", 5)]
    assert more
    merged, more = merge_scans({"a": rows((b"1", 1)), "b": rows((b"2", 1))}, limit=5)
    assert [r.sort for r in merged] == [b"1", b"2"] and not more


def test_purge_drops_only_old_tombstones_and_long_expired_values_in_slices() -> None:
    from leaderless.core.purge import purge_slice

    store = MemoryStore()
    now_ms = 1_000_000
    rows = {
        b"live": Cell(1 << 16, "n", b"v"),
        b"old-tomb": Cell(100 << 16, "n", tombstone=True),
        b"new-tomb": Cell((now_ms - 10) << 16, "n", tombstone=True),
        b"long-expired": Cell(1 << 16, "n", b"v", expires_at_ms=200),
        b"just-expired": Cell(1 << 16, "n", b"v", expires_at_ms=now_ms - 10),
    }
    store.write([(data_key("ks", k), encode_cell(c)) for k, c in rows.items()])
    store.write([(b"h\x02n2xxxxxxxxxxxx", b"a hint is not data")])
    purged: list[bytes] = []
    cursor: bytes | None = b"d"
    while cursor is not None:
        swept = purge_slice(store, cursor, now_ms, grace_ms=1000, keys_max=2)
        store.write(swept.writes)
        purged.extend(parse_data_key(key)[2] for _, key, _ in swept.purged)
        cursor = swept.cursor
    assert sorted(purged) == [b"long-expired", b"old-tomb"]
    assert store.get(data_key("ks", b"new-tomb")) is not None
    assert store.get(b"h\x02n2xxxxxxxxxxxx") is not None
