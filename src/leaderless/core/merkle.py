"""Hash trees over the token space, kept current on every local write (for anti-entropy).

Dynamo and Cassandra compare Merkle trees of a token range to find the few rows two
replicas disagree on, then stream only those. Cassandra builds the tree on demand by
reading the whole range ("validation compaction"); Dynamo keeps one tree per vnode range,
which must be rebuilt whenever ranges move. We keep a structure that is both cheap to
update and independent of who owns what:

- **Leaves are segments of the token space**, the same on every node: ``2**leaf_bits``
  equal segments (default 2**14: 128 KiB of 64-bit hashes per keyspace), plus cut points at
  the boundaries of the ring ranges this node replicates (``align``). Tokens come first in
  the store key (``core.keys``), so a segment is one contiguous key range.
- **A leaf's hash is the XOR of a 64-bit hash of (store key, ``cell.digest()``)** over its
  rows. XOR is its own inverse and does not care about order, so a write updates one leaf
  in O(log leaves) (find the leaf, XOR the old cell's contribution out and the new one in),
  two replicas that received the same writes in different orders hold the same hashes, and
  the hash of any union of leaves is the XOR of their hashes: an inner node of the tree is
  computed on demand for whatever range is asked, so the tree needs no rebalancing and
  ring changes never invalidate it.
- **Ring ranges do not have to align with the grid.** The digest of a token range is the
  XOR of the leaves wholly inside it plus, for a leaf only partly inside, the hash of
  exactly the in-range rows read from the store. Two replicas therefore compare exactly the
  rows of the range they share and never see a permanent false difference. Because every
  replicated range's boundaries are cut points after ``align``, and finer comparisons
  split on grid boundaries, those partial reads happen only while two nodes' ring views
  disagree (or their ``leaf_bits`` differ): correctness never depends on alignment, speed
  does.

A XOR of 64-bit hashes collides with probability about 2**-64 per comparison, which is
enough against accidents; it is not a defence against a peer crafting rows (peers are
trusted to the same degree as their replica writes).

Tokens here are half-open segments [lo, hi) of Python ints with 0 <= lo < hi <= 2**64
(the ring's ``TokenRange`` is (start, end]; ``ring_segments`` converts).
"""

from __future__ import annotations

import bisect
import functools
import operator
from array import array
from collections.abc import Iterable, Sequence

import xxhash

from leaderless.core.cells import Cell, decode_cell
from leaderless.core.keys import (
    DATA_PREFIX,
    TOKEN_MAX,
    keyspace_prefix,
    prefix_end,
    token_key,
)
from leaderless.core.ring import TokenRange
from leaderless.storage.store import Store

TOKEN_SPACE = TOKEN_MAX + 1
LEAF_BITS_DEFAULT = 14
"""2**14 leaves x 8 bytes = 128 KiB per keyspace. With 10 M rows per node a leaf holds
~600 rows, so the finest comparison lists a few hundred keys per differing segment."""
LEAF_BITS_MAX = 20
"""8 MiB per keyspace: past this, memory grows faster than the comparison gets finer."""
RING_CUTS_MAX = 1 << 16
"""Cut points from ring ranges: a node replicating 256 vnodes x N=3 needs ~1,500; past the
bound extra cuts are ignored, which costs partial scans, never correctness."""

Segment = tuple[int, int]
"""Tokens [lo, hi) with 0 <= lo < hi <= 2**64."""


def row_hash(key: bytes, cell: Cell) -> int:
    """A row's contribution to its leaf: depends on the key and the cell's version only."""
    return xxhash.xxh64_intdigest(key, seed=cell.digest())


def ring_segments(rng: TokenRange) -> list[Segment]:
    """The ring range (start, end] as one or two (when it wraps) segments."""
    lo = rng.start + 1
    if rng.start < rng.end:
        return [(lo, rng.end + 1)]
    parts = [(lo, TOKEN_SPACE)] if lo < TOKEN_SPACE else []
    return [*parts, (0, rng.end + 1)]


def coalesce(segments: Iterable[Segment]) -> list[Segment]:
    """Sorted, with overlapping or adjacent segments merged."""
    merged: list[Segment] = []
    for lo, hi in sorted(segments):
        assert 0 <= lo < hi <= TOKEN_SPACE, (lo, hi)
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return merged


def store_bounds(keyspace: str, lo: int, hi: int) -> tuple[bytes, bytes]:
    """Store keys [start, end) holding exactly the rows of tokens [lo, hi)."""
    assert 0 <= lo < hi <= TOKEN_SPACE
    end = token_key(keyspace, hi) if hi <= TOKEN_MAX else prefix_end(keyspace_prefix(keyspace))
    return token_key(keyspace, lo), end


def scan_hash(store: Store, keyspace: str, lo: int, hi: int) -> tuple[int, int]:
    """(XOR of row hashes, row count) of tokens [lo, hi), read from the store."""
    start, end = store_bounds(keyspace, lo, hi)
    acc = 0
    rows = 0
    for key, value in store.scan(start, end):
        acc ^= row_hash(key, decode_cell(value))
        rows += 1
    return acc, rows


class MerkleForest:
    """One leaf array per keyspace over shared cut points. Not thread-safe (nothing in
    core is): the replica calls ``update`` for every row it stores or deletes."""

    def __init__(self, leaf_bits: int = LEAF_BITS_DEFAULT) -> None:
        if not 1 <= leaf_bits <= LEAF_BITS_MAX:
            raise ValueError(f"leaf_bits is {leaf_bits}; use 1..{LEAF_BITS_MAX}")
        self.leaf_bits = leaf_bits
        self._shift = 64 - leaf_bits
        self._cuts = array("Q", (i << self._shift for i in range(1 << leaf_bits)))
        """Sorted leaf starts; leaf j is [cuts[j], cuts[j+1]) (the last ends at 2**64)."""
        self._ring_cuts: frozenset[int] = frozenset()
        self._leaves: dict[str, array[int]] = {}
        self.partial_scans = 0
        """Leaves read from the store because a segment cut through them (a metric)."""
        self.rows_scanned = 0

    # -- maintenance ---------------------------------------------------------------------

    def update(self, keyspace: str, key: bytes, old: Cell | None, new: Cell | None) -> None:
        """Record that the row at store ``key`` changed from ``old`` to ``new`` (None:
        absent). Call it for every local change, in any order; it is O(log leaves)."""
        if old is None and new is None:
            return
        delta = (row_hash(key, old) if old is not None else 0) ^ (
            row_hash(key, new) if new is not None else 0)
        if delta == 0:
            return  # the same version rewritten
        at = 2 + key[1]
        tok = int.from_bytes(key[at:at + 8], "big")
        leaves = self._leaves.get(keyspace)
        if leaves is None:
            leaves = self._leaves[keyspace] = self._empty_leaves()
        leaves[bisect.bisect_right(self._cuts, tok) - 1] ^= delta

    def rebuild(self, store: Store) -> int:
        """Recompute every leaf from a full scan (at startup: the forest lives in memory).
        Returns the number of rows read."""
        self._leaves = {}
        rows = 0
        prefix_bytes = b""
        keyspace = ""
        leaves = self._empty_leaves()
        cuts = self._cuts
        for key, value in store.scan(DATA_PREFIX, prefix_end(DATA_PREFIX)):
            at = 2 + key[1]
            if key[:at] != prefix_bytes:  # rows of one keyspace are contiguous
                prefix_bytes = key[:at]
                keyspace = key[2:at].decode()
                leaves = self._leaves.setdefault(keyspace, self._empty_leaves())
            tok = int.from_bytes(key[at:at + 8], "big")
            leaves[bisect.bisect_right(cuts, tok) - 1] ^= row_hash(key, decode_cell(value))
            rows += 1
        return rows

    def align(self, ring_cuts: Iterable[int], store: Store) -> None:
        """Add cut points (segment starts, e.g. ``lo`` of every replicated ring range) and
        drop the previous ring cuts, so that comparisons of those ranges need no store
        reads. Costs a read of the leaves that a new cut splits."""
        wanted = frozenset(c for c in ring_cuts if 0 < c < TOKEN_SPACE)
        if len(wanted) > RING_CUTS_MAX:
            wanted = frozenset(sorted(wanted)[:RING_CUTS_MAX])
        if wanted == self._ring_cuts:
            return
        grid_mask = (1 << self._shift) - 1
        starts = sorted({c for c in wanted if c & grid_mask}
                        | {i << self._shift for i in range(1 << self.leaf_bits)})
        ends = [*starts[1:], TOKEN_SPACE]
        fresh: dict[str, array[int]] = {}
        for keyspace in self._leaves:
            hashes = (self.digest(keyspace, lo, hi, store) for lo, hi in zip(starts, ends,
                                                                              strict=True))
            fresh[keyspace] = array("Q", hashes)
        self._cuts = array("Q", starts)
        self._leaves = fresh
        self._ring_cuts = wanted

    def _empty_leaves(self) -> array[int]:
        return array("Q", bytes(8 * len(self._cuts)))

    # -- queries -------------------------------------------------------------------------

    def keyspaces(self) -> list[str]:
        return sorted(self._leaves)

    def leaf_count(self) -> int:
        return len(self._cuts)

    def digest(self, keyspace: str, lo: int, hi: int, store: Store) -> int:
        """XOR of the row hashes of tokens [lo, hi): whole leaves from memory, the in-range
        part of a leaf cut by ``lo`` or ``hi`` from the store."""
        assert 0 <= lo < hi <= TOKEN_SPACE, (lo, hi)
        leaves = self._leaves.get(keyspace)
        if leaves is None:
            return 0
        cuts = self._cuts
        first = bisect.bisect_right(cuts, lo) - 1
        last = bisect.bisect_right(cuts, hi - 1) - 1
        acc = 0
        if cuts[first] != lo:  # lo cuts leaf ``first``: read the part from lo on
            end = min(hi, self._leaf_end(first))
            acc ^= self._scan(store, keyspace, lo, end)
            first += 1
        if first <= last and self._leaf_end(last) != hi:  # hi cuts leaf ``last``
            acc ^= self._scan(store, keyspace, cuts[last], hi)
            last -= 1
        if first <= last:
            acc ^= functools.reduce(operator.xor, leaves[first:last + 1], 0)
        return acc

    def digests(self, keyspace: str, segments: Sequence[Segment], store: Store) -> list[int]:
        return [self.digest(keyspace, lo, hi, store) for lo, hi in segments]

    def range_digests(self, keyspace: str, ranges: Sequence[TokenRange], store: Store,
                      parts: int = 1) -> list[list[tuple[Segment, int]]]:
        """For each ring range, its segments split ``parts`` ways on grid boundaries (as
        far as the grid allows) with their digests: the comparison digests of a range at a
        chosen granularity."""
        out: list[list[tuple[Segment, int]]] = []
        for rng in ranges:
            pieces = [p for lo, hi in ring_segments(rng) for p in self.split(lo, hi, parts)]
            out.append([(p, self.digest(keyspace, p[0], p[1], store)) for p in pieces])
        return out

    def split(self, lo: int, hi: int, parts: int) -> list[Segment]:
        """[lo, hi) cut into at most ``parts`` segments on grid boundaries (the same on
        every node with the same ``leaf_bits``, so the peer answers without store reads).
        A segment with no grid boundary inside is returned whole: it is the finest."""
        assert 0 <= lo < hi <= TOKEN_SPACE and parts >= 1
        first = ((lo >> self._shift) + 1) << self._shift  # the first boundary after lo
        if first >= hi or parts == 1:
            return [(lo, hi)]
        count = ((hi - 1 - first) >> self._shift) + 1  # boundaries in (lo, hi)
        chosen = sorted({(k * (count + 1)) // parts for k in range(1, parts)} - {0})
        bounds = [first + ((p - 1) << self._shift) for p in chosen if p <= count]
        edges = [lo, *bounds, hi]
        return [(a, b) for a, b in zip(edges, edges[1:], strict=False) if a < b]

    def is_finest(self, lo: int, hi: int) -> bool:
        """No grid boundary inside [lo, hi): splitting further would need store reads."""
        return (((lo >> self._shift) + 1) << self._shift) >= hi

    def _leaf_end(self, j: int) -> int:
        return self._cuts[j + 1] if j + 1 < len(self._cuts) else TOKEN_SPACE

    def _scan(self, store: Store, keyspace: str, lo: int, hi: int) -> int:
        self.partial_scans += 1
        acc, rows = scan_hash(store, keyspace, lo, hi)
        self.rows_scanned += rows
        return acc
