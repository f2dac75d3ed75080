"""The small pure pieces: broadcast queue, suspicion timer, local health, user events."""

from __future__ import annotations

from leaderless.core.awareness import LocalHealth
from leaderless.core.broadcasts import BroadcastQueue
from leaderless.core.membership_config import MembershipConfig
from leaderless.core.messages import Suspect, UserEvent
from leaderless.core.suspicion import Suspicion
from leaderless.core.user_events import UserEvents


def test_broadcast_retransmit_limit_and_replacement() -> None:
    q = BroadcastQueue(capacity=100)
    q.push("b", Suspect("b", 0, "x"))
    q.push("b", Suspect("b", 1, "x"))  # newer news about b replaces the old
    assert len(q) == 1
    for _ in range(3):
        assert q.take(1000, limit=3, count_max=10) == [Suspect("b", 1, "x")]
    assert len(q) == 0


def test_broadcast_least_sent_then_newest_first_within_budget() -> None:
    q = BroadcastQueue(capacity=100)
    q.push("a", Suspect("a", 0, "x"))
    q.take(1000, limit=10, count_max=10)
    q.push("b", Suspect("b", 0, "x"))
    q.push("c", Suspect("c", 0, "x"))
    assert [u.name for u in q.take(1000, 10, 10)] == ["c", "b", "a"]  # type: ignore[union-attr]
    one = len(__import__("msgspec").msgpack.encode(Suspect("a", 0, "x"))) + 1
    assert len(q.take(one, 10, 10)) == 1


def test_broadcast_capacity_drops_the_most_sent() -> None:
    q = BroadcastQueue(capacity=2)
    q.push("a", Suspect("a", 0, "x"))
    q.take(1000, 10, 10)
    q.push("b", Suspect("b", 0, "x"))
    q.push("c", Suspect("c", 0, "x"))
    assert len(q) == 2 and not q.has("a")


def test_suspicion_timeout_falls_logarithmically_to_the_minimum() -> None:
    s = Suspicion(10.0, "a", min_s=1.0, max_s=4.0, expected=3)
    assert s.deadline() == 14.0
    timeouts = []
    for accuser in ["b", "c", "d", "e"]:
        s.confirm(accuser)
        timeouts.append(s.timeout_s())
    assert timeouts[0] < 4.0 and timeouts == sorted(timeouts, reverse=True)
    assert timeouts[2] == 1.0 and s.confirmations == 3  # the fourth is not counted
    assert Suspicion(0.0, "a", 1.0, 4.0, expected=0).timeout_s() == 1.0


def test_local_health_is_bounded_and_scales_timeouts() -> None:
    h = LocalHealth(score_max=8)
    h.apply(-3)
    assert h.score == 0
    h.apply(20)
    assert h.score == 8 and h.scale(0.5) == 4.5


def test_user_events_deduplicate_and_reject_too_old() -> None:
    ev = UserEvents(buffer=16)
    e = UserEvent("n1", 0, 5, "deploy", b"x")
    assert ev.accept(e) and not ev.accept(e)
    ev.accept(UserEvent("n2", 0, 100, "later", b""))
    assert not ev.accept(UserEvent("n3", 0, 50, "old", b"")) and ev.too_old == 1
    assert ev.create("me", 0, "mine", b"").ltime == 101
    # The same origin and Lamport time from a later incarnation is a different event.
    assert ev.accept(UserEvent("n1", 1, 100, "after restart", b""))
    assert not ev.accept(UserEvent("n1", 1, 100, "after restart", b""))


def test_formulas_scale_with_cluster_size() -> None:
    c = MembershipConfig()
    assert c.retransmit_limit(5) == 4 and c.retransmit_limit(10_000) == 20
    assert abs(c.suspicion_min_s(5) - 1.2) < 1e-9 and abs(c.suspicion_min_s(1000) - 3.6) < 1e-9
    assert abs(c.suspicion_max_s(5) - 4.8) < 1e-9
    assert c.expected_confirmations(3) == 1 and c.expected_confirmations(50) == 3
    assert c.push_pull_period_s(10) == 30.0 and c.push_pull_period_s(64) == 60.0
