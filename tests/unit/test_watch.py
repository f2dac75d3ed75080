"""core.watch: acceptor subscriptions and reports, and the learner's majority rule."""

from __future__ import annotations

from leaderless.core.paxos import Acceptor, paxos_key
from leaderless.core.paxos_messages import Accept, Ballot, Register
from leaderless.core.watch import Learner, Subscriptions
from leaderless.core.watch_messages import (
    SnapshotEntry,
    WatchAccepted,
    WatchFilter,
    WatchSnapshotReply,
    WatchSubscribe,
    WatchSubscribed,
)
from leaderless.storage.memory import MemoryStore

KEY = WatchFilter("ks", b"k")
PREFIX = WatchFilter("ks", b"user/", prefix=True)


def reg(version: int, value: bytes | None = b"v", at: int = 0) -> Register:
    return Register(version, value, at)


def report(seq: int, ballot: Ballot, register: Register, partition: bytes = b"k"
           ) -> WatchAccepted:
    return WatchAccepted(1, seq, "ks", partition, b"", ballot, register)


def test_filter_matches_exact_key_or_partition_prefix() -> None:
    assert KEY.matches("ks", b"k", b"")
    assert not KEY.matches("ks", b"k", b"s")
    assert not KEY.matches("other", b"k", b"")
    assert not KEY.matches("ks", b"kk", b"")
    assert PREFIX.matches("ks", b"user/1", b"any")
    assert not PREFIX.matches("ks", b"use", b"")
    assert WatchFilter("ks", b"", prefix=True).matches("ks", b"anything", b"")


def test_subscriptions_report_matching_accepts_with_sequence_numbers() -> None:
    subs = Subscriptions()
    assert subs.subscribe(0.0, "w", WatchSubscribe(1, KEY, 10)) == WatchSubscribed(1, True, 0)
    assert not subs.watched("other")
    b = Ballot(1, "n1")
    out = subs.on_accepted("ks", b"k", b"", b, reg(1))
    assert out == [("w", report(1, b, reg(1)))]
    assert subs.on_accepted("ks", b"x", b"", b, reg(1)) == []
    assert subs.on_accepted("ks", b"k", b"", b, reg(2))[0][1].seq == 2
    # A renewal is not fresh and says how many reports were sent.
    assert subs.subscribe(5.0, "w", WatchSubscribe(1, KEY, 10)) == WatchSubscribed(1, False, 2)
    subs.expire(14.9)
    assert len(subs) == 1
    subs.expire(15.0)
    assert len(subs) == 0 and not subs.watched("ks")
    assert subs.subscribe(16.0, "w", WatchSubscribe(1, KEY, 10)).fresh  # lost: fresh again


def test_subscriptions_are_bounded() -> None:
    subs = Subscriptions(subs_max=1)
    subs.subscribe(0.0, "w", WatchSubscribe(1, KEY, 10))
    refused = subs.subscribe(0.0, "w", WatchSubscribe(2, KEY, 10))
    assert refused.fresh and len(subs) == 1


def test_snapshot_reads_accepted_state_of_matching_keys() -> None:
    store = MemoryStore()
    acceptor = Acceptor(store)
    b = Ballot(3, "n1")
    for i, partition in enumerate((b"user/1", b"user/2", b"other")):
        _, writes = acceptor.handle(Accept(i, "ks", partition, b"", b, reg(i + 1)))
        store.write(writes)
    subs = Subscriptions()
    subs.subscribe(0.0, "w", WatchSubscribe(7, PREFIX, 10))
    snap = subs.snapshot(store, "w", 7)
    assert sorted((e.partition, e.register.version) for e in snap.entries) == [
        (b"user/1", 1), (b"user/2", 2)]
    assert store.get(paxos_key("ks", b"other", b"")) is not None
    assert not subs.snapshot(store, "w", 8).known


def test_learner_delivers_once_a_majority_accepted_one_ballot() -> None:
    learner = Learner(majority=2)
    b1, b2 = Ballot(1, "n1"), Ballot(2, "n2")
    assert learner.report("a1", report(1, b1, reg(1, b"x"))) == (None, False)
    # A different ballot (a competing minority accept) does not add up with b1.
    assert learner.report("a2", report(1, b2, reg(1, b"y"))) == (None, False)
    chosen, gap = learner.report("a3", report(1, b2, reg(1, b"y")))
    assert chosen == reg(1, b"y") and not gap
    # The straggler's report of the same choice delivers nothing again.
    assert learner.report("a1", report(2, b2, reg(1, b"y"))) == (None, False)
    # A read (same version, higher ballot) delivers nothing.
    b3 = Ballot(3, "n1")
    learner.report("a1", report(3, b3, reg(1, b"y")))
    assert learner.report("a2", report(2, b3, reg(1, b"y")))[0] is None
    assert learner.delivered((b"k", b"")) == 1


def test_learner_sees_gaps_and_lost_subscriptions() -> None:
    learner = Learner(majority=2)
    b = Ballot(1, "n1")
    assert not learner.subscribed("a1", WatchSubscribed(1, True, 0))  # the first one
    assert learner.report("a1", report(1, b, reg(1)))[1] is False
    assert learner.report("a1", report(3, b, reg(2)))[1] is True  # report 2 was lost
    assert not learner.subscribed("a1", WatchSubscribed(1, False, 3))
    assert learner.subscribed("a1", WatchSubscribed(1, False, 4))  # report 4 never came
    assert learner.subscribed("a1", WatchSubscribed(1, True, 0))  # the acceptor forgot us


def test_learner_snapshot_and_settling_unresolved_keys() -> None:
    learner = Learner(majority=2)
    b, old = Ballot(5, "n1"), Ballot(2, "n1")
    chosen = learner.snapshot("a1", WatchSnapshotReply(1, 0, [
        SnapshotEntry(b"user/1", b"", b, reg(4)), SnapshotEntry(b"user/2", b"", old, reg(1))]))
    assert chosen == []
    chosen = learner.snapshot("a2", WatchSnapshotReply(1, 0, [
        SnapshotEntry(b"user/1", b"", b, reg(4)), SnapshotEntry(b"user/2", b"", b, reg(2))]))
    assert chosen == [((b"user/1", b""), reg(4))]
    assert learner.unsettled() == [(b"user/2", b"")]
    assert learner.learned((b"user/2", b""), reg(2))
    assert not learner.learned((b"user/2", b""), reg(2))
    assert learner.unsettled() == []


def test_learner_delivers_a_recreated_key_after_its_tombstone_was_purged() -> None:
    learner = Learner(majority=1)
    b = Ballot(1, "n1")
    assert learner.report("a1", report(1, b, reg(7, None, at=1000)))[0] is not None
    # Purged, then written again: versions restart at 1, but later in time.
    assert learner.report("a1", report(2, Ballot(2, "n1"), reg(1, b"new", at=9000)))[0] \
        == reg(1, b"new", at=9000)
    # An old accept of one lagging replica (from before the tombstone) is never a
    # majority on its own: it stays unsettled until a read settles it.
    two = Learner(majority=2)
    two.report("a1", report(1, b, reg(7, None, at=1000)))
    two.report("a2", report(1, b, reg(7, None, at=1000)))
    assert two.report("a3", report(1, Ballot(0, "n0"), reg(6, b"old", at=500)))[0] is None
