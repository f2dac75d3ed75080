"""core.tasks.apply_task: every transition of a task register, fencing, lease expiry,
retries with back-off, attempts exhausted, cancel, release and the history bound; and the
same changes applied through core.paxos.apply_change (refusals come back as Conflict)."""

from __future__ import annotations

import pytest

from leaderless.core import paxos
from leaderless.core.locks import CLOCK_SKEW_MAX_MS
from leaderless.core.paxos_messages import Register
from leaderless.core.tasks import (
    HISTORY_MAX,
    LOST_LEASE_RUNS_MAX,
    PRIORITY_MAX,
    SHARDS,
    IndexEntry,
    TaskChange,
    TaskOutcome,
    TaskRefused,
    TaskSpec,
    TaskState,
    apply_task,
    claimable,
    decode_entry,
    decode_state,
    encode,
    index_sort,
    satisfies,
    shard_key,
    shard_of,
)

T0 = 1_000_000
TTL = 10_000
SPEC = TaskSpec("mod:fn", b"\x92\x90\x80", max_retries=2, backoff_s=1.0)


def apply(value: bytes | None, change: TaskChange, at: int) -> TaskState:
    new = apply_task(value, change, at)
    assert new is not None
    return decode_state(new)


def submitted(spec: TaskSpec = SPEC) -> bytes:
    return encode(apply(None, TaskChange("submit", "a", payload=encode(spec)), T0))


def claimed(node: str = "b", at: int = T0 + 1, value: bytes | None = None) -> bytes:
    return encode(apply(value or submitted(), TaskChange("claim", node, ttl_ms=TTL), at))


def finish(value: bytes, node: str, token: int, outcome: TaskOutcome, at: int) -> TaskState:
    return apply(value, TaskChange("finish", node, token, payload=encode(outcome)), at)


def refused(value: bytes | None, change: TaskChange, at: int) -> str:
    with pytest.raises(TaskRefused) as info:
        apply_task(value, change, at)
    return info.value.reason


def test_submit_records_a_pending_task_once() -> None:
    state = decode_state(submitted())
    assert (state.state, state.attempt, state.token, state.submitted_ms) == ("pending", 0, 0, T0)
    assert state.spec == SPEC
    assert [(t.state, t.node, t.at_ms) for t in state.history] == [("pending", "a", T0)]
    assert refused(submitted(), TaskChange("submit", "a", payload=encode(SPEC)), T0) == "exists"


def test_changes_of_an_absent_task_are_refused() -> None:
    for kind in ("claim", "start", "renew", "finish", "release", "cancel"):
        assert refused(None, TaskChange(kind, "b"), T0) == "absent"


def test_claim_start_renew_finish_success() -> None:
    value = claimed()
    state = decode_state(value)
    assert (state.state, state.holder, state.token, state.attempt) == ("claimed", "b", 1, 1)
    assert state.lease_expires_ms == T0 + 1 + TTL
    state = apply(value, TaskChange("start", "b", 1), T0 + 2)
    assert state.state == "running"
    state = apply(encode(state), TaskChange("renew", "b", 1, ttl_ms=TTL), T0 + 5000)
    assert state.lease_expires_ms == T0 + 5000 + TTL
    done = finish(encode(state), "b", 1, TaskOutcome(True, b"42"), T0 + 6000)
    assert (done.state, done.result, done.holder, done.finished_ms) == (
        "succeeded", b"42", "", T0 + 6000)
    assert [t.state for t in done.history] == ["pending", "claimed", "running", "succeeded"]


def test_finish_carries_the_start_time_without_a_start_round() -> None:
    done = finish(claimed(), "b", 1, TaskOutcome(True, b"1", started_ms=T0 + 3), T0 + 9)
    assert [(t.state, t.at_ms) for t in done.history][1:] == [
        ("claimed", T0 + 1), ("running", T0 + 3), ("succeeded", T0 + 9)]


def test_a_held_task_cannot_be_claimed_until_its_lease_expires() -> None:
    value = claimed("b")
    assert refused(value, TaskChange("claim", "c", ttl_ms=TTL), T0 + 5000).startswith(
        "held by b")
    # Past the lease: reclaimed by c with the next token (b's holder died or paused).
    state = apply(value, TaskChange("claim", "c", ttl_ms=TTL), T0 + 1 + TTL + 1)
    assert (state.state, state.holder, state.token, state.attempt) == ("claimed", "c", 2, 2)
    assert state.history[-1].note == "lease of b expired"


def test_fencing_refuses_a_zombie_and_wrong_holders() -> None:
    value = claimed("b")
    reclaimed = encode(apply(value, TaskChange("claim", "c", ttl_ms=TTL), T0 + 2 * TTL))
    late = TaskChange("finish", "b", 1, payload=encode(TaskOutcome(True, b"late")))
    assert refused(reclaimed, late, T0 + 2 * TTL + 5).startswith("fenced (token 1 of b")
    for kind in ("start", "renew", "release"):
        assert refused(reclaimed, TaskChange(kind, "b", 1, ttl_ms=TTL),
                       T0 + 2 * TTL + 5).startswith("fenced")
    # The right token from the wrong node is refused too.
    assert refused(reclaimed, TaskChange("renew", "b", 2, ttl_ms=TTL),
                   T0 + 2 * TTL + 5).startswith("fenced")
    # The current holder's result is the one recorded, once.
    done = finish(reclaimed, "c", 2, TaskOutcome(True, b"ok"), T0 + 2 * TTL + 9)
    assert done.result == b"ok"
    again = TaskChange("finish", "c", 2, payload=encode(TaskOutcome(True, b"again")))
    assert refused(encode(done), again, T0 + 2 * TTL + 10).startswith("fenced")


def test_a_renew_after_expiry_is_refused() -> None:
    value = claimed("b")
    assert refused(value, TaskChange("renew", "b", 1, ttl_ms=TTL),
                   T0 + 1 + TTL + 1) == "lease expired"


def test_retries_back_off_exponentially_then_fail() -> None:
    spec = TaskSpec("mod:fn", max_retries=2, backoff_s=1.0)
    value = claimed(value=submitted(spec))
    state = finish(value, "b", 1, TaskOutcome(False, error="Traceback\n  x\nValueError: boom"),
                   T0 + 10)
    assert (state.state, state.not_before_ms, state.holder) == ("retrying", T0 + 10 + 1000, "")
    assert state.history[-1].note == "ValueError: boom"
    # Not before its back-off.
    assert refused(encode(state), TaskChange("claim", "c", ttl_ms=TTL),
                   T0 + 500) == "backing off"
    state = apply(encode(state), TaskChange("claim", "c", ttl_ms=TTL), T0 + 1010)
    assert (state.attempt, state.token) == (2, 2)
    state = finish(encode(state), "c", 2, TaskOutcome(False, error="again"), T0 + 2000)
    assert (state.state, state.not_before_ms) == ("retrying", T0 + 2000 + 2000)  # doubled
    state = apply(encode(state), TaskChange("claim", "b", ttl_ms=TTL), T0 + 4000)
    state = finish(encode(state), "b", 3, TaskOutcome(False, error="last"), T0 + 5000)
    assert (state.state, state.attempt, state.error, state.finished_ms) == (
        "failed", 3, "last", T0 + 5000)


def test_a_non_retryable_failure_fails_at_once() -> None:
    state = finish(claimed(), "b", 1, TaskOutcome(False, error="not registered",
                                                  retryable=False), T0 + 5)
    assert (state.state, state.attempt) == ("failed", 1)


def test_errors_keep_their_end() -> None:
    error = "x" * 20_000 + "END"
    state = finish(claimed(value=submitted(TaskSpec("m:f"))), "b", 1,
                   TaskOutcome(False, error=error), T0 + 5)
    assert state.state == "failed" and state.error.endswith("END")
    assert len(state.error.encode()) <= 16 * 1024


def test_a_lost_holder_is_not_the_tasks_failure_but_a_poison_task_stops() -> None:
    value = claimed(value=submitted(TaskSpec("m:f", max_retries=0)))
    at = T0 + 1
    for attempt in range(2, LOST_LEASE_RUNS_MAX + 2):
        at += 2 * TTL
        state = apply(value, TaskChange("claim", f"n{attempt}", ttl_ms=TTL), at)
        assert (state.state, state.attempt, state.token) == ("claimed", attempt, attempt)
        value = encode(state)
    state = apply(value, TaskChange("claim", "last", ttl_ms=TTL), at + 2 * TTL)
    assert (state.state, state.holder, state.attempt) == ("failed", "", LOST_LEASE_RUNS_MAX + 1)
    assert f"lost its node n{LOST_LEASE_RUNS_MAX + 1}" in state.error


def test_cancel_from_every_unfinished_state_and_not_after() -> None:
    pending = submitted()
    running = encode(apply(claimed(), TaskChange("start", "b", 1), T0 + 2))
    retrying = encode(finish(claimed(), "b", 1, TaskOutcome(False, error="e"), T0 + 3))
    for value in (pending, claimed(), running, retrying):
        state = apply(value, TaskChange("cancel", "x"), T0 + 50)
        assert (state.state, state.holder, state.finished_ms) == ("cancelled", "", T0 + 50)
        assert refused(encode(state), TaskChange("cancel", "x"), T0 + 60) == \
            "finished (cancelled)"
        assert refused(encode(state), TaskChange("claim", "x", ttl_ms=TTL),
                       T0 + 60) == "finished (cancelled)"
    # The holder of a cancelled task is fenced: its renew and its result are refused.
    cancelled = encode(apply(running, TaskChange("cancel", "x"), T0 + 50))
    assert refused(cancelled, TaskChange("renew", "b", 1, ttl_ms=TTL),
                   T0 + 60).startswith("fenced")


def test_release_hands_the_task_back_without_using_an_attempt() -> None:
    value = claimed("b")
    state = apply(value, TaskChange("release", "b", 1), T0 + 5)
    assert (state.state, state.holder, state.lease_expires_ms, state.attempt) == (
        "pending", "", 0, 0)
    assert state.history[-1].note == "handed back"
    again = apply(encode(state), TaskChange("claim", "c", ttl_ms=TTL), T0 + 6)
    assert (again.holder, again.token, again.attempt) == ("c", 2, 1)


def test_history_is_bounded_and_keeps_the_first() -> None:
    value = submitted()
    token = 0
    for i in range(HISTORY_MAX * 2):
        value = claimed("b", T0 + 10 * i + 1, value)
        token += 1
        value = encode(apply(value, TaskChange("release", "b", token), T0 + 10 * i + 2))
    state = decode_state(value)
    assert len(state.history) == HISTORY_MAX
    assert state.history[0].state == "pending" and state.history[0].node == "a"
    assert state.history[-1].note == "handed back"
    assert state.token == HISTORY_MAX * 2


def test_through_paxos_apply_change_refusals_are_conflicts() -> None:
    register = Register(0, None)
    register, outcome = paxos.apply_change(
        register, TaskChange("submit", "a", payload=encode(SPEC)), b"id-1", T0)
    assert isinstance(outcome, paxos.Done)
    register, outcome = paxos.apply_change(
        register, TaskChange("claim", "b", ttl_ms=TTL), b"id-2", T0 + 1)
    assert isinstance(outcome, paxos.Done)
    register, outcome = paxos.apply_change(
        register, TaskChange("claim", "c", ttl_ms=TTL), b"id-3", T0 + 2)
    assert isinstance(outcome, paxos.Conflict)
    assert outcome.reason.startswith("held by b")
    assert decode_state(outcome.value or b"").holder == "b"


def test_index_helpers() -> None:
    task_id = b"\x01" * 16
    assert 0 <= shard_of(task_id) < SHARDS
    assert shard_key("q", 7) == b"q/07"
    # Higher priority sorts first; then older first.
    assert index_sort(PRIORITY_MAX, T0 + 5, b"b") < index_sort(0, T0, b"a")
    assert index_sort(1, T0, b"z") < index_sort(1, T0 + 1, b"a")
    entry = IndexEntry(task_id, 2, ["io"], 0, 0)
    assert decode_entry(encode(entry)) == entry
    assert claimable(entry, T0)
    held = IndexEntry(task_id, lease_expires_ms=T0)
    assert not claimable(held, T0 + CLOCK_SKEW_MAX_MS - 1)
    assert claimable(held, T0 + CLOCK_SKEW_MAX_MS + 1)
    assert not claimable(IndexEntry(task_id, not_before_ms=T0 + 5), T0)
    assert satisfies({"io", "cpu"}, ["io"]) and satisfies(set(), [])
    assert not satisfies({"cpu"}, ["io"])
