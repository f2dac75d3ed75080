"""The token ring: which nodes hold a key. A pure function of the membership view.

Each node owns ``token_count`` tokens (vnodes), ``TOKENS_PER_WEIGHT`` per unit of capacity
weight. It picks a random 64-bit ``token_seed`` once, persists it, and gossips only
(seed, count) in its metadata; everyone derives the same tokens with xxh64(seed, i). That
keeps a member's alive update inside one 1,400-byte datagram whatever the vnode count.

A node's token t owns the range (previous token, t]. A key's preference list is the first
N distinct nodes met walking clockwise from its token; when zones are set, nodes in zones
not yet used come first (so N replicas span min(N, zones) zones), then the rest in ring
order. Random tokens need many vnodes for balance: with 256 per node the largest of 5
equal nodes owns about 1.1x its fair share (the unit tests check <= 1.25x).
"""

from __future__ import annotations

import bisect
import dataclasses
import struct
from collections.abc import Iterable

import xxhash

from leaderless.core.keys import TOKEN_MAX

TOKENS_PER_WEIGHT = 256
TOKEN_COUNT_MAX = 4096
"""Per node: 16x the default weight, and still only 32 KiB of tokens to hash and sort."""
_INDEX = struct.Struct(">I")


def derive_tokens(token_seed: int, token_count: int) -> list[int]:
    """The node's tokens: deterministic from (seed, count), so only those two are gossiped."""
    assert 0 < token_count <= TOKEN_COUNT_MAX
    return [xxhash.xxh64_intdigest(_INDEX.pack(i), seed=token_seed) for i in range(token_count)]


def token_count_for(weight: float) -> int:
    return max(1, min(TOKEN_COUNT_MAX, round(weight * TOKENS_PER_WEIGHT)))


@dataclasses.dataclass(frozen=True, slots=True)
class RingNode:
    """What the ring needs to know about a member."""

    name: str
    token_seed: int
    token_count: int
    zone: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class TokenRange:
    """The ring range (start, end]; it wraps past TOKEN_MAX when start >= end (and is the
    whole ring when start == end, which happens only with a single token)."""

    start: int
    end: int

    def contains(self, tok: int) -> bool:
        if self.start < self.end:
            return self.start < tok <= self.end
        return tok > self.start or tok <= self.end

    def size(self) -> int:
        """Number of tokens in the range."""
        if self.start < self.end:
            return self.end - self.start
        return TOKEN_MAX - self.start + self.end + 1


class Ring:
    """Immutable; build a new one when the membership view changes (``Ring.build``)."""

    def __init__(self, nodes: Iterable[RingNode]) -> None:
        self.nodes: dict[str, RingNode] = {}
        pairs: list[tuple[int, str]] = []
        for node in nodes:
            assert node.name not in self.nodes, f"node {node.name} given twice"
            self.nodes[node.name] = node
            pairs.extend((t, node.name) for t in derive_tokens(node.token_seed,
                                                               node.token_count))
        # Two nodes drawing the same token is a 1-in-2**64 event; the name breaks the tie.
        pairs.sort()
        self.tokens = [t for t, _ in pairs]
        self.owners = [name for _, name in pairs]
        self._zones = len({n.zone for n in self.nodes.values()})
        self._cache: dict[tuple[int, int], tuple[str, ...]] = {}

    def __len__(self) -> int:
        return len(self.nodes)

    def token_index(self, tok: int) -> int:
        """Index of the vnode that owns ``tok``: the first token >= tok, wrapping to 0."""
        i = bisect.bisect_left(self.tokens, tok)
        return 0 if i == len(self.tokens) else i

    def preference_list(self, tok: int, n: int) -> tuple[str, ...]:
        """The first ``n`` distinct nodes clockwise from ``tok`` (zone-aware)."""
        if not self.tokens:
            return ()
        return self._replicas_at(self.token_index(tok), n)

    def walk(self, tok: int) -> list[str]:
        """Every node, in the order met clockwise from ``tok`` (for hint holders)."""
        if not self.tokens:
            return []
        return list(self._replicas_at(self.token_index(tok), len(self.nodes), zone_aware=False))

    def _replicas_at(self, index: int, n: int, zone_aware: bool = True) -> tuple[str, ...]:
        key = (index, n if zone_aware else -n)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        want = min(n, len(self.nodes))
        chosen: list[str] = []
        seen: set[str] = set()
        zones_used: set[str] = set()
        skipped: list[str] = []
        count = len(self.tokens)
        spread = zone_aware and self._zones > 1
        for step in range(count):
            if len(chosen) == want:
                break
            name = self.owners[(index + step) % count]
            if name in seen:
                continue
            seen.add(name)
            zone = self.nodes[name].zone
            if spread and zone in zones_used and len(zones_used) < self._zones:
                skipped.append(name)  # a later node may bring a new zone
                continue
            chosen.append(name)
            zones_used.add(zone)
        for name in skipped:
            if len(chosen) == want:
                break
            chosen.append(name)
        result = tuple(chosen)
        if len(self._cache) < 1 << 16:
            self._cache[key] = result
        return result

    def ranges(self) -> list[tuple[TokenRange, int]]:
        """Every vnode range with its index into ``tokens``/``owners``."""
        count = len(self.tokens)
        return [(TokenRange(self.tokens[i - 1], self.tokens[i]), i) for i in range(count)]

    def replica_ranges(self, name: str, n: int) -> list[tuple[TokenRange, tuple[str, ...]]]:
        """The vnode ranges ``name`` holds a replica of (with their full replica sets),
        for anti-entropy and streaming."""
        return [(rng, reps) for rng, i in self.ranges()
                if name in (reps := self._replicas_at(i, n))]

    def ownership(self) -> dict[str, float]:
        """Fraction of the token space each node owns as primary (first replica)."""
        share = dict.fromkeys(self.nodes, 0.0)
        total = float(TOKEN_MAX) + 1
        for rng, i in self.ranges():
            share[self.owners[i]] += rng.size() / total
        return share
