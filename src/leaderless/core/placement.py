"""Placement while the ring changes: who serves reads, who must get writes, who fetches what.

A member is on the ring in one of three states, gossiped in its metadata: ``normal``,
``joining`` (it streams the ranges it will own before it serves them) or ``leaving`` (it
serves its ranges until the members that take them over have fetched them). A joining node
may *replace* a dead member (it takes that member's tokens), and a normal member may be
changing its token count (a capacity change: ``next_token_count``). Several members may do
any of this at once; nothing is serialised.

Three rings follow from the members (tokens are derived from (seed, count), and the tokens
of a smaller count are a prefix of those of a larger one, so a count change adds or removes
vnodes and moves nothing else):

- **current** ``C``: who serves reads. Normal and leaving members with their current
  counts; a dead member being replaced stays until its replacement is normal.
- **base** ``B``: the ring every change in progress has in common: normal members with the
  smaller of their two counts, replacements in place of the member they replace; no
  joining or leaving member. A member must hold every range it has in ``B``; before a
  leaver goes, the members that gain its ranges in ``B`` fetch them.
- for each member that gains vnodes (joining, replacing, growing): ``B`` with that member
  at its larger count. It fetches the ranges it has there.

Reads ask replicas of ``C(k)``. A write goes to ``U(k)``: ``C(k)``, every member that may
hold k in one of the rings above, and the ``C(k)`` of the rings this node used in the last
``settle_s`` (readers with an older view may still use them). It waits for
``W + |U(k) \\ C(k)|`` acknowledgements: any such set holds ``W`` of every replica set a
reader may be using (Cassandra's rule for pending replicas). Strong rounds use the same
sets with a majority in place of ``W``.

Why that is enough: a member that enters ``C(k)`` either fetched k from a read quorum of
the replicas serving it (so it holds every write acknowledged at QUORUM before its fetch)
or was already in ``U(k)`` during its fetch (so it got every later write, or the write
counted one more acknowledgement elsewhere). Adding a member to a ring can only push
others out of a key's replica list, never in; so a member's ranges in ``B`` (the fewest
members) cover its ranges in every ring a reader may reach as changes complete, in any
order. That monotonicity holds for rings without zones; with zones a replica list may
change in other ways and the rule is best-effort.

The rest is timing, as in Cassandra (its RING_DELAY): a member starts a fetch only once the
placement has been unchanged for ``settle_s`` in its view, and writers keep an old ring's
replicas in ``U`` for ``settle_s``, assuming gossip reaches every member in that time.

Pure: built from the membership view by the runtime and the simulator alike.
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
from collections.abc import Iterable, Sequence

import msgspec
import xxhash

from leaderless.core.ring import Ring, RingNode, TokenRange


class RingState(enum.IntEnum):
    """A member's state on the ring. Values are on the wire (``NodeMeta.ring_state``)."""

    NORMAL = 0
    JOINING = 1
    LEAVING = 2


@dataclasses.dataclass(frozen=True, slots=True)
class PlacementMember:
    """What placement needs to know about a member (from its gossiped metadata)."""

    name: str
    token_seed: int
    token_count: int
    zone: str = ""
    state: RingState = RingState.NORMAL
    replacing: str = ""
    """A joining member taking over this dead member's tokens (its seed and count)."""
    next_token_count: int = 0
    """A normal member changing its token count to this (0: no change)."""
    synced: int = 0
    """Digest of the base ring this member has fetched all its ranges of (``Placement.digest``)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Fetch:
    """A range a member must fetch: from ``copies`` of ``sources`` (``C(k)``, the
    replicas serving it now), so it sees every write acknowledged at QUORUM."""

    range: TokenRange
    sources: tuple[str, ...]
    copies: int
    alone: str = ""
    """When one change alone is in progress and the range moves away from exactly one
    member: that member, whose full copy is enough (Cassandra's consistent range movement:
    what it holds plus the writes that reach the fetching member meanwhile is every write
    it would have served)."""


class Placement:
    """Immutable; built from the members (``Placement(members, previous)``)."""

    def __init__(self, members: Iterable[PlacementMember],
                 previous: Sequence[Ring] = ()) -> None:
        self.members: dict[str, PlacementMember] = {m.name: m for m in members}
        replaced = {m.replacing for m in self.members.values()
                    if m.replacing and m.state is RingState.NORMAL}
        """Members whose replacement completed: off every ring."""
        replacing = {m.replacing for m in self.members.values()
                     if m.replacing and m.state is RingState.JOINING}
        current: list[RingNode] = []
        base: list[RingNode] = []
        self.gaining: dict[str, RingNode] = {}
        """Members that may serve ranges beyond their base ones, at their larger count:
        joining, growing, shrinking (its old vnodes) and leaving members."""
        for m in self.members.values():
            if m.token_count <= 0 or m.name in replaced:
                continue
            full = RingNode(m.name, m.token_seed, m.token_count, m.zone)
            if m.state is RingState.JOINING:
                if m.replacing:
                    base.append(full)  # in place of the member it replaces
                self.gaining[m.name] = full
                continue
            current.append(full)
            if m.name in replacing:
                continue
            if m.state is RingState.LEAVING:
                # Until it goes, it serves reads; if another leaver goes first it may serve
                # ranges it did not have: it fetches them like any gainer.
                self.gaining[m.name] = full
                continue
            if m.next_token_count and m.next_token_count != m.token_count:
                low = min(m.token_count, m.next_token_count)
                high = max(m.token_count, m.next_token_count)
                base.append(RingNode(m.name, m.token_seed, low, m.zone))
                self.gaining[m.name] = RingNode(m.name, m.token_seed, high, m.zone)
            else:
                base.append(full)
        self.current = Ring(current)
        self.base = Ring(base)
        self._gain_rings = {
            name: Ring([n for n in base if n.name != name] + [node])
            for name, node in self.gaining.items()}
        self.previous = tuple(r for r in previous if r.nodes != self.current.nodes)
        self.changing = bool(self.gaining) or self.previous != () or any(
            m.state is RingState.LEAVING or m.next_token_count for m in self.members.values()
            if m.name not in replaced and m.token_count > 0)
        """False in the steady state: writes then go to ``C(k)`` alone."""
        self._digest = _digest(base)
        self._gainers: dict[int, set[str]] = {}
        changers = [m for m in self.members.values()
                    if m.token_count > 0 and m.name not in replaced
                    and (m.state is not RingState.NORMAL or m.next_token_count)]
        self._single: Ring | None = None
        """The ring once the one change in progress completes (None: none, several, a
        replacement -- its member is dead -- or an old ring still settling)."""
        if len(changers) == 1 and not changers[0].replacing and not self.previous:
            changer = changers[0]
            grows = changer.state is RingState.JOINING or (
                changer.state is RingState.NORMAL
                and changer.next_token_count > changer.token_count)
            self._single = self._gain_rings[changer.name] if grows else self.base

    # -- reads and writes ----------------------------------------------------------------

    def extra_replicas(self, tok: int, n: int) -> tuple[str, ...]:
        """``U(k) \\ C(k)``: the members a write of ``tok`` must also go to (in a stable
        order), each adding one to the acknowledgements it needs."""
        if not self.changing:
            return ()
        natural = self.current.preference_list(tok, n)
        extra: list[str] = []
        for name in self.base.preference_list(tok, n):
            if name not in natural:
                extra.append(name)
        for name, ring in self._gain_rings.items():
            if name not in natural and name not in extra and name in ring.preference_list(tok, n):
                extra.append(name)
        for ring in self.previous:
            for name in ring.preference_list(tok, n):
                if name not in natural and name not in extra:
                    extra.append(name)
        return tuple(extra)

    # -- fetching ------------------------------------------------------------------------

    def digest(self) -> int:
        """Identifies the base ring: a member advertises it as ``synced`` once it holds
        every range it has there."""
        return self._digest

    def fetches(self, me: str, n: int, quorum: int) -> list[Fetch]:
        """The ranges ``me`` must fetch for a keyspace of replication ``n``: those it has
        in ``B`` (at its larger count) but not in ``C``, each from ``quorum`` replicas of
        ``C`` (all of them when fewer serve it)."""
        ring = self._gain_rings.get(me)
        if ring is None:
            if me not in self.base.nodes:
                return []
            ring = self.base
        fetches: list[Fetch] = []
        single = self._single
        for rng, _ in ring.replica_ranges(me, n):
            for part, sources in self._current_parts(rng, n):
                if me in sources:
                    continue
                alone = ""
                if single is not None:
                    future = single.preference_list(part.end, n)
                    losers = [name for name in sources if name not in future]
                    alone = losers[0] if len(losers) == 1 else ""
                last = fetches[-1] if fetches else None
                if (last is not None and last.range.end == part.start
                        and set(last.sources) == set(sources) and last.alone == alone):
                    # Adjacent with the same replicas: one fetch (far fewer round trips).
                    fetches[-1] = dataclasses.replace(
                        last, range=TokenRange(last.range.start, part.end))
                else:
                    fetches.append(Fetch(part, sources, min(quorum, len(sources)), alone))
        if (len(fetches) > 1 and fetches[-1].range.end == fetches[0].range.start
                and set(fetches[-1].sources) == set(fetches[0].sources)
                and fetches[-1].alone == fetches[0].alone):
            first, last = fetches[0], fetches.pop()
            fetches[0] = dataclasses.replace(
                first, range=TokenRange(last.range.start, first.range.end))
        return fetches

    def _current_parts(self, rng: TokenRange, n: int) -> list[tuple[TokenRange, tuple[str, ...]]]:
        """``rng`` cut at the current ring's tokens inside it, each part with its ``C``
        replicas (the replicas of a part's end token)."""
        tokens = self.current.tokens
        if not tokens:
            return []
        if rng.start < rng.end:
            cuts = tokens[bisect.bisect_right(tokens, rng.start):
                          bisect.bisect_left(tokens, rng.end)]
        else:  # wrapping: the tokens after start, then those before end
            cuts = (tokens[bisect.bisect_right(tokens, rng.start):]
                    + tokens[:bisect.bisect_left(tokens, rng.end)])
        parts: list[tuple[TokenRange, tuple[str, ...]]] = []
        start = rng.start
        for cut in [*cuts, rng.end]:
            if cut == start and parts:
                continue
            parts.append((TokenRange(start, cut), self.current.preference_list(cut, n)))
            start = cut
        return parts

    def gainers(self, n: int) -> set[str]:
        """Members (not joining: those complete by themselves) with ranges to fetch: a
        leaver (or a shrinking member) waits until each of them advertises ``synced``."""
        found = self._gainers.get(n)
        if found is None:
            found = self._gainers[n] = {
                name for name in self.members
                if self.members[name].state is not RingState.JOINING
                and self.fetches(name, n, 1)}
        return found

    def unsynced(self, n: int) -> list[str]:
        """Gainers whose advertised ``synced`` is not this base ring."""
        return sorted(name for name in self.gainers(n)
                      if self.members[name].synced != self._digest)

    def retained(self, me: str, n: int) -> list[TokenRange]:
        """Ranges ``me`` keeps for replication ``n``: those it serves or may serve in any
        ring above (the rest is deleted by cleanup)."""
        ranges = [r for r, _ in self.current.replica_ranges(me, n)] if me in self.current.nodes \
            else []
        for ring in (self.base, self._gain_rings.get(me), *self.previous):
            if ring is not None and me in ring.nodes:
                ranges.extend(r for r, _ in ring.replica_ranges(me, n))
        return ranges


def _digest(nodes: Iterable[RingNode]) -> int:
    h = xxhash.xxh64()
    for node in sorted(nodes, key=lambda n: n.name):
        h.update(f"{node.name}\0{node.token_seed}\0{node.token_count}\0{node.zone}\n".encode())
    return h.intdigest()



RING_VIEW_KEY = b"rv"
"""Store key of a node's saved view (``PlacementView.to_save``); no data, Paxos, hint or
stream key starts with b"r"."""
_view_encoder = msgspec.msgpack.Encoder()


class PlacementView:
    """The placement one node uses over time, by the runtime and the simulator alike.

    ``at(now, members)`` rebuilds the placement only when a member's ring fields changed or
    an old ring's settle time ran out; when the current ring changes, the old one stays in
    the write set for ``settle_s`` (readers with an older view may still use it).

    The members' ring fields are saved in the node's store (``to_save``) and restored at
    the next start (``restore``): a node that restarts starts from the ring it last served
    with, so that ring stays in its write set for ``settle_s`` too. Nothing is saved in the
    first ``settle_s`` after a start, while the view is still filling in.
    """

    def __init__(self, settle_s: float) -> None:
        self.settle_s = settle_s
        self.history: list[tuple[float, Ring]] = []
        """(when it was replaced, ring): current rings of the last settle_s."""
        self._placement: Placement | None = None
        self._key: tuple[object, ...] = ()
        self._members: tuple[PlacementMember, ...] = ()
        self._saved: tuple[PlacementMember, ...] = ()
        self._saveable_at = float("inf")

    def restore(self, data: bytes | None, now: float) -> bool:
        """Start from a saved view (None: none saved); False if it is unreadable."""
        self._saveable_at = now + self.settle_s
        if data is None:
            return True
        try:
            members = tuple(
                PlacementMember(name, seed, count, zone, RingState(state), replacing,
                                next_count, synced)
                for name, seed, count, zone, state, replacing, next_count, synced
                in msgspec.msgpack.decode(data))
        except (msgspec.DecodeError, ValueError, TypeError):
            return False
        self._placement = Placement(members)
        self._key = (members, ())
        self._members = members
        return True

    def at(self, now: float, members: tuple[PlacementMember, ...]) -> Placement:
        """The placement for ``members`` (sorted by name) at ``now``."""
        history = self.history
        while history and now - history[0][0] > self.settle_s:
            history.pop(0)
        previous = tuple(r for _, r in history)
        old = self._placement
        if old is not None and self._key == (members, previous):
            return old
        placement = Placement(members, previous)
        if old is not None and placement.current.nodes != old.current.nodes:
            history.append((now, old.current))
            placement = Placement(members, (*previous, old.current))
        self._placement = placement
        self._key = (members, tuple(r for _, r in history))
        self._members = members
        return placement

    def expired(self, now: float) -> bool:
        """Whether an old ring's settle time ran out (rebuild the placement)."""
        return bool(self.history) and now - self.history[0][0] > self.settle_s

    def to_save(self, now: float) -> bytes | None:
        """The encoded view when it should be saved now (changed since the last save, and
        past the first settle_s after a start), else None."""
        if now < self._saveable_at or not self._members or self._members == self._saved:
            return None
        self._saved = self._members
        return _view_encoder.encode([dataclasses.astuple(m) for m in self._members])
