"""What one member does about the ring changes in progress: a small sans-I/O state machine.

Given the placement (``core.placement``) of its view, a member decides, step by step:

- what it must fetch (every range it has in the base ring, or in its own larger ring,
  that it does not serve now: ``Placement.fetches`` for each keyspace), and hands that plan
  to its fetcher once the placement has been unchanged for ``settle_s`` (every writer
  must know of the change before a fetch starts, or a write could miss the fetching
  member and the fetch alike);
- to advertise ``synced`` (the base ring's digest) once the plan is fetched;
- when joining: to become normal once synced;
- when leaving: to go once every member that takes over its ranges advertises ``synced``
  for this base ring (and the placement has been stable for ``settle_s``);
- when its capacity changes: to switch to the new token count once its own fetch is done
  (growing) or every taker is synced (shrinking).

The runtime (``runtime.ring_changes``) and the simulator drive the same machine: they
call ``step`` with the placement, their fetcher's state and the time, and carry out the
returned actions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from leaderless.core.placement import Fetch, Placement, RingState
from leaderless.core.quorum import required
from leaderless.core.streaming import RangeFetch


@dataclasses.dataclass(frozen=True, slots=True)
class KeyspaceFetch:
    """A range of one keyspace to fetch (``Fetch`` with its keyspace)."""

    keyspace: str
    fetch: Fetch

    def range_fetch(self) -> RangeFetch:
        """The fetcher's form (``core.streaming``)."""
        fetch = self.fetch
        return RangeFetch(self.keyspace, fetch.range.start, fetch.range.end, fetch.sources,
                          fetch.copies, fetch.alone)


@dataclasses.dataclass(frozen=True, slots=True)
class SetPlan:
    """Give the fetcher this plan (it keeps the progress of fetches already in it)."""

    fetches: tuple[KeyspaceFetch, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Publish:
    """Gossip these metadata fields (``NodeMeta``): ring_state, token_count,
    next_token_count, synced."""

    fields: Mapping[str, int]


@dataclasses.dataclass(frozen=True, slots=True)
class Depart:
    """The leave is complete: leave the membership gracefully (peers mark us left)."""


Action = SetPlan | Publish | Depart


@dataclasses.dataclass(frozen=True, slots=True)
class Me:
    """This member's own ring fields, as it gossips them."""

    name: str
    state: RingState
    token_count: int
    next_token_count: int = 0
    synced: int = 0


class RingChanges:
    def __init__(self, settle_s: float) -> None:
        self.settle_s = settle_s
        self._shape: tuple[object, ...] | None = None
        self._stable_since = 0.0
        self._plan: tuple[KeyspaceFetch, ...] | None = None
        """The plan last given to the fetcher (None: none yet)."""
        self.waiting_for: list[str] = []
        """Members a leave (or shrink) waits for: those not yet synced (for status)."""
        self._plan_key: tuple[object, ...] | None = None
        self._plan_cached: tuple[KeyspaceFetch, ...] = ()

    def plan(self, placement: Placement, me: str, replication: Mapping[str, int]
             ) -> tuple[KeyspaceFetch, ...]:
        """Every range ``me`` must fetch, over the keyspaces and their replication."""
        fetches: list[KeyspaceFetch] = []
        for keyspace, n in sorted(replication.items()):
            quorum = required("QUORUM", n)
            fetches.extend(KeyspaceFetch(keyspace, f) for f in placement.fetches(me, n, quorum))
        return tuple(fetches)

    def step(self, now: float, placement: Placement, me: Me, replication: Mapping[str, int],
             fetched: bool) -> list[Action]:
        """``fetched``: the fetcher has completed the plan last returned in a ``SetPlan``
        (False if none was given). Returns what to do now."""
        shape = _shape(placement)
        if shape != self._shape:
            self._shape = shape
            self._stable_since = now
        settled = now - self._stable_since >= self.settle_s
        actions: list[Action] = []
        # The plan depends only on the rings and the keyspaces: computing it walks every
        # range of the ring, so it is kept while they stay the same (a step is every 0.5 s).
        plan_key = (shape, me.name, tuple(sorted(replication.items())))
        if plan_key != self._plan_key:
            self._plan_key = plan_key
            self._plan_cached = self.plan(placement, me.name, replication)
        plan = self._plan_cached
        synced = False
        if not plan:
            synced = True
        elif settled:
            if plan != self._plan:
                self._plan = plan
                actions.append(SetPlan(plan))
                fetched = False
            synced = fetched
        digest = placement.digest()
        fields: dict[str, int] = {}
        if synced and me.synced != digest:
            fields["synced"] = digest
        if me.state is RingState.JOINING and synced and settled and me.token_count > 0:
            fields["ring_state"] = RingState.NORMAL
        elif me.state is RingState.LEAVING or (
                me.next_token_count and me.next_token_count < me.token_count):
            self.waiting_for = sorted({name for n in set(replication.values())
                                       for name in placement.unsynced(n) if name != me.name})
            if settled and not self.waiting_for and (synced or me.state is RingState.LEAVING):
                if me.state is RingState.LEAVING:
                    actions.append(Depart())
                else:
                    fields.update(token_count=me.next_token_count, next_token_count=0)
        elif me.next_token_count > me.token_count and synced and settled:
            fields.update(token_count=me.next_token_count, next_token_count=0)
        if not (me.state is RingState.LEAVING or me.next_token_count):
            self.waiting_for = []
        if fields:
            actions.append(Publish(fields))
        return actions

    def settled(self, now: float) -> bool:
        return self._shape is not None and now - self._stable_since >= self.settle_s


def _shape(placement: Placement) -> tuple[object, ...]:
    """What a fetch plan depends on: the rings (not the members' ``synced`` fields)."""
    return (placement.digest(), tuple(sorted(placement.current.nodes.items())),
            tuple(sorted(placement.gaining.items())))
