"""Watches on strong keys, learned the classic Paxos way, without a leader or a log.

A node serving a watch subscribes at every node (``Subscriptions``, the acceptor side):
each acceptor then reports every accept of a matching key, once it is durable. A value is
*chosen* when a majority of the key's acceptors accepted it at the same ballot, so the
watcher (``Learner``) counts reports per (key, ballot) and delivers a register once a
majority agree, if its version is newer than what it delivered for that key. Reads (the
identity change) re-accept the same version and deliver nothing. Only watched keys cost
anything: an accept with no matching subscription sends no report.

Nothing is missed: a subscription that an acceptor lost (restart, expiry) is reported as
``fresh`` at the next renewal, and a lost report shows as a gap in its sequence numbers;
either makes the watcher resynchronise from a snapshot (every acceptor's accepted state of
the matching keys; keys where no majority agrees are settled by a linearizable read). A
watcher that reconnects gets the current state of every key newer than what it has seen:
intermediate versions that changed while it was away are not replayed (like ZooKeeper
watches and Consul blocking queries; etcd keeps a history, we keep none).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

from leaderless.core.keys import keyspace_prefix, prefix_end
from leaderless.core.paxos import PAXOS_PREFIX, decode_state, parse_paxos_key
from leaderless.core.paxos_messages import Ballot, Register
from leaderless.core.watch_messages import (
    SNAPSHOT_KEYS_MAX,
    SnapshotEntry,
    WatchAccepted,
    WatchFilter,
    WatchSnapshotReply,
    WatchSubscribe,
    WatchSubscribed,
)
from leaderless.storage.store import Store

SUBSCRIPTIONS_MAX = 10_000
"""Subscriptions one acceptor holds (from all watchers); beyond it new ones are refused
(the watcher's renewal sees ``fresh`` forever and its watch fails as unavailable)."""
TALLY_KEYS_MAX = 10_000
"""Keys a learner tallies reports for at once (least recently reported dropped first; a
dropped tally only delays a key to its next change or resync)."""
TALLY_BALLOTS_MAX = 8
DELIVERED_KEYS_MAX = 100_000
"""Per watch, keys whose delivered version is remembered (a prefix watch over more keys
may deliver a key's current version twice after a resync; versions let clients tell)."""

KeyId = tuple[bytes, bytes]
"""(partition, sort) within the watch's keyspace."""


@dataclasses.dataclass
class _Sub:
    filter: WatchFilter
    expires_at: float
    seq: int = 0


class Subscriptions:
    """The acceptor side: who watches what, and the reports an accept produces."""

    def __init__(self, subs_max: int = SUBSCRIPTIONS_MAX) -> None:
        self._subs: dict[tuple[str, int], _Sub] = {}
        self._by_keyspace: dict[str, set[tuple[str, int]]] = {}
        self._exact: dict[tuple[str, bytes, bytes], set[tuple[str, int]]] = {}
        """Subscriptions to one key, by that key: an accept finds its watchers in one
        lookup however many keys are watched (a task waiter watches thousands)."""
        self._prefixes: dict[str, set[tuple[str, int]]] = {}
        """Prefix subscriptions by keyspace (matched one by one)."""
        self._subs_max = subs_max
        self.reports = 0

    def __len__(self) -> int:
        return len(self._subs)

    def subscribe(self, now: float, subscriber: str, msg: WatchSubscribe) -> WatchSubscribed:
        key = (subscriber, msg.sub)
        sub = self._subs.get(key)
        fresh = sub is None or sub.filter != msg.filter
        if sub is None or fresh:
            if sub is None and len(self._subs) >= self._subs_max:
                return WatchSubscribed(msg.sub, True, 0)
            self._drop(key)
            sub = self._subs[key] = _Sub(msg.filter, 0.0)
            self._by_keyspace.setdefault(msg.filter.keyspace, set()).add(key)
            self._index(msg.filter).setdefault(_slot(msg.filter), set()).add(key)
        sub.expires_at = now + msg.lease_s
        return WatchSubscribed(msg.sub, fresh, sub.seq)

    def unsubscribe(self, subscriber: str, sub: int) -> None:
        self._drop((subscriber, sub))

    def _index(self, flt: WatchFilter) -> dict[Any, set[tuple[str, int]]]:
        return self._prefixes if flt.prefix else self._exact

    def _drop(self, key: tuple[str, int]) -> None:
        sub = self._subs.pop(key, None)
        if sub is not None:
            for index, slot in ((self._by_keyspace, sub.filter.keyspace),
                                (self._index(sub.filter), _slot(sub.filter))):
                keys = index.get(slot)
                if keys is not None:
                    keys.discard(key)
                    if not keys:
                        del index[slot]

    def expire(self, now: float) -> None:
        for key in [k for k, s in self._subs.items() if s.expires_at <= now]:
            self._drop(key)

    def watched(self, keyspace: str) -> bool:
        return keyspace in self._by_keyspace

    def on_accepted(self, keyspace: str, partition: bytes, sort: bytes, ballot: Ballot,
                    register: Register) -> list[tuple[str, WatchAccepted]]:
        """(subscriber, report) for every subscription matching this durable accept."""
        out: list[tuple[str, WatchAccepted]] = []
        exact = self._exact.get((keyspace, partition, sort), ())
        prefixes = self._prefixes.get(keyspace, ())
        for key in (*exact, *prefixes):
            sub = self._subs[key]
            if sub.filter.matches(keyspace, partition, sort):
                sub.seq += 1
                self.reports += 1
                out.append((key[0], WatchAccepted(key[1], sub.seq, keyspace, partition, sort,
                                                  ballot, register)))
        return out

    def snapshot(self, store: Store, subscriber: str, sub_id: int) -> WatchSnapshotReply:
        """The accepted state of every key the subscription matches (from ``store``)."""
        sub = self._subs.get((subscriber, sub_id))
        if sub is None:
            return WatchSnapshotReply(sub_id, 0, [], known=False)
        flt = sub.filter
        start = PAXOS_PREFIX + keyspace_prefix(flt.keyspace)
        entries: list[SnapshotEntry] = []
        truncated = False
        for key, raw in store.scan(start, prefix_end(start)):
            _, partition, sort = parse_paxos_key(key)
            if not flt.matches(flt.keyspace, partition, sort):
                continue
            state = decode_state(raw)
            if state.accepted is None or state.register is None:
                continue
            if len(entries) >= SNAPSHOT_KEYS_MAX:
                truncated = True
                break
            entries.append(SnapshotEntry(partition, sort, state.accepted, state.register))
        return WatchSnapshotReply(sub_id, sub.seq, entries, truncated)


class Learner:
    """The watcher side of one watch: from acceptors' reports to chosen registers."""

    def __init__(self, majority: int, tally_keys_max: int = TALLY_KEYS_MAX,
                 delivered_keys_max: int = DELIVERED_KEYS_MAX) -> None:
        assert majority >= 1
        self.majority = majority
        self._tally: collections.OrderedDict[
            KeyId, dict[Ballot, tuple[Register, set[str]]]] = collections.OrderedDict()
        self._delivered: collections.OrderedDict[KeyId, Register] = collections.OrderedDict()
        self._seq: dict[str, int] = {}
        self._tally_keys_max = tally_keys_max
        self._delivered_keys_max = delivered_keys_max

    def delivered(self, key: KeyId) -> int:
        register = self._delivered.get(key)
        return 0 if register is None else register.version

    def _newer(self, key: KeyId, register: Register) -> bool:
        """Newer than what was delivered: a higher version; or, after a delivered
        tombstone, a later change (a purged key's versions restart at 1)."""
        last = self._delivered.get(key)
        if last is None or register.version > last.version:
            return True
        return last.tombstone and register.changed_at_ms > last.changed_at_ms

    def report(self, acceptor: str, msg: WatchAccepted) -> tuple[Register | None, bool]:
        """(the register now chosen and newer than delivered, or None; True if a report
        from this acceptor was lost before this one: resynchronise)."""
        last = self._seq.get(acceptor)
        gap = last is not None and msg.seq != last + 1
        self._seq[acceptor] = max(msg.seq, last or 0)
        return self._count(acceptor, (msg.partition, msg.sort), msg.ballot, msg.register), gap

    def subscribed(self, acceptor: str, reply: WatchSubscribed) -> bool:
        """Note a (re)subscription's answer; True if reports may have been missed."""
        last = self._seq.get(acceptor)
        self._seq[acceptor] = max(reply.seq, last or 0)
        if last is None:
            return False  # the first subscription: the initial snapshot covers it
        return reply.fresh or reply.seq > last

    def forget_acceptor(self, acceptor: str) -> None:
        self._seq.pop(acceptor, None)

    def snapshot(self, acceptor: str, reply: WatchSnapshotReply
                 ) -> list[tuple[KeyId, Register]]:
        """Count a snapshot's entries as reports; the registers it makes chosen."""
        self._seq[acceptor] = max(reply.seq, self._seq.get(acceptor, 0))
        out = []
        for entry in reply.entries:
            key = (entry.partition, entry.sort)
            chosen = self._count(acceptor, key, entry.ballot, entry.register)
            if chosen is not None:
                out.append((key, chosen))
        return out

    def unsettled(self) -> list[KeyId]:
        """Keys with reports that no majority agrees on (settle them with a read)."""
        return list(self._tally)

    def learned(self, key: KeyId, register: Register) -> bool:
        """A register known to be chosen (e.g. by a linearizable read): True if it is newer
        than what was delivered for the key (and it now counts as delivered)."""
        self._tally.pop(key, None)
        if not self._newer(key, register):
            return False
        # Kept slim (no value, no idempotency ids): only what ``_newer`` compares.
        self._delivered[key] = Register(register.version,
                                        None if register.tombstone else b"",
                                        register.changed_at_ms)
        self._delivered.move_to_end(key)
        while len(self._delivered) > self._delivered_keys_max:
            self._delivered.popitem(last=False)
        return True

    def _count(self, acceptor: str, key: KeyId, ballot: Ballot, register: Register
               ) -> Register | None:
        if not self._newer(key, register):
            return None  # delivered already, or an old accept of a lagging replica
        ballots = self._tally.get(key)
        if ballots is None:
            ballots = self._tally[key] = {}
        self._tally.move_to_end(key)
        entry = ballots.get(ballot)
        if entry is None:
            entry = ballots[ballot] = (register, set())
        entry[1].add(acceptor)
        if len(entry[1]) >= self.majority:
            self._tally.pop(key, None)
            return register if self.learned(key, register) else None
        while len(ballots) > TALLY_BALLOTS_MAX:
            del ballots[min(ballots)]
        while len(self._tally) > self._tally_keys_max:
            self._tally.popitem(last=False)
        return None


def _slot(flt: WatchFilter) -> Any:
    """Where a subscription is indexed: its key, or (prefix) its keyspace."""
    return flt.keyspace if flt.prefix else (flt.keyspace, flt.partition, flt.sort)
