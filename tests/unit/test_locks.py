"""Locks as register changes (core.locks through core.paxos.apply_change), and fences."""

from __future__ import annotations

import pytest

from leaderless.core.locks import FREE, LockState, decode_lock
from leaderless.core.paxos import Conflict, Done, Fenced, apply_change
from leaderless.core.paxos_messages import (
    EMPTY_REGISTER,
    Acquire,
    Cas,
    Delete,
    Fence,
    Incr,
    Put,
    Register,
    Release,
    Renew,
)


def run(register: Register, change: object, wall_ms: int, op: bytes = b"") -> tuple[
        Register, object]:
    return apply_change(register, change, op or repr((change, wall_ms)).encode()[:64],
                        wall_ms)  # type: ignore[arg-type]


def test_first_grant_has_token_one_and_expires_after_ttl() -> None:
    register, outcome = run(EMPTY_REGISTER, Acquire("a", 1000), 5000)
    assert isinstance(outcome, Done)
    assert decode_lock(outcome.value) == LockState("a", 1, 6000)
    assert decode_lock(register.value) == LockState("a", 1, 6000)
    assert register.recent[-1].number == 1


def test_held_lock_is_refused_to_others_until_it_expires() -> None:
    register, _ = run(EMPTY_REGISTER, Acquire("a", 1000), 5000)
    same, outcome = run(register, Acquire("b", 1000), 5999)
    assert same is register
    assert isinstance(outcome, Conflict)
    assert decode_lock(outcome.value) == LockState("a", 1, 6000)
    register, outcome = run(register, Acquire("b", 1000), 6000)
    assert isinstance(outcome, Done)
    assert decode_lock(outcome.value) == LockState("b", 2, 7000)


def test_tokens_increase_with_every_grant_and_survive_release() -> None:
    register = EMPTY_REGISTER
    tokens = []
    for i in range(5):
        register, outcome = run(register, Acquire(f"c{i}", 1000), 100 * i)
        assert isinstance(outcome, Done)
        token = decode_lock(outcome.value).token
        tokens.append(token)
        register, outcome = run(register, Release(f"c{i}", token), 100 * i + 1)
        assert isinstance(outcome, Done)
        assert decode_lock(register.value) == LockState("", token, 0)
    assert tokens == [1, 2, 3, 4, 5]


def test_holder_acquiring_again_keeps_its_token_and_extends() -> None:
    register, _ = run(EMPTY_REGISTER, Acquire("a", 1000), 0)
    register, outcome = run(register, Acquire("a", 2000), 500)
    assert isinstance(outcome, Done)
    assert decode_lock(outcome.value) == LockState("a", 1, 2500)


def test_renew_extends_only_the_current_unexpired_lease() -> None:
    register, _ = run(EMPTY_REGISTER, Acquire("a", 1000), 0)
    register, outcome = run(register, Renew("a", 1, 1000), 900)
    assert isinstance(outcome, Done)
    assert decode_lock(register.value).expires_at_ms == 1900
    for change, wall in ((Renew("b", 1, 1000), 1000), (Renew("a", 2, 1000), 1000),
                         (Renew("a", 1, 1000), 1900)):
        _, outcome = run(register, change, wall)
        assert isinstance(outcome, Conflict), change


def test_release_by_a_stale_holder_is_refused() -> None:
    register, _ = run(EMPTY_REGISTER, Acquire("a", 100), 0)
    register, _ = run(register, Acquire("b", 100), 200)
    same, outcome = run(register, Release("a", 1), 250)
    assert same is register and isinstance(outcome, Conflict)
    assert decode_lock(same.value) == LockState("b", 2, 300)


def test_retried_acquire_is_answered_with_the_same_token() -> None:
    register, first = run(EMPTY_REGISTER, Acquire("a", 100), 0, op=b"op-1")
    register, _ = run(register, Release("a", 1), 10, op=b"op-2")
    again, outcome = run(register, Acquire("a", 100), 20, op=b"op-1")
    assert again is register
    assert isinstance(outcome, Done) and outcome.duplicate
    assert decode_lock(outcome.value).token == 1


def test_decode_lock_of_absent_register_is_free() -> None:
    assert decode_lock(None) == FREE
    assert not FREE.held(0)


@pytest.mark.parametrize("change", [
    Put(b"x", Fence("L", 3)), Delete(Fence("L", 3)), Incr(1, Fence("L", 3)),
    Cas(b"x", expected_version=1, fence=Fence("L", 3)),
])
def test_a_change_fenced_by_an_older_token_is_refused(change: object) -> None:
    register, outcome = run(EMPTY_REGISTER, Put(b"1", Fence("L", 4)), 0)
    assert isinstance(outcome, Done) and register.fence == Fence("L", 4)
    same, outcome = run(register, change, 1)
    assert same is register
    assert outcome == Fenced("L", 4)


def test_fence_keeps_the_newest_token_and_follows_another_lock() -> None:
    register, _ = run(EMPTY_REGISTER, Put(b"1", Fence("L", 4)), 0)
    register, outcome = run(register, Put(b"2", Fence("L", 4)), 1)
    assert isinstance(outcome, Done) and register.fence == Fence("L", 4)
    register, outcome = run(register, Put(b"3"), 2)  # unfenced writes are not refused
    assert isinstance(outcome, Done) and register.fence == Fence("L", 4)
    register, outcome = run(register, Put(b"4", Fence("M", 1)), 3)
    assert isinstance(outcome, Done) and register.fence == Fence("M", 1)
    register, outcome = run(register, Put(b"5", Fence("L", 1)), 4)
    assert isinstance(outcome, Done) and register.fence == Fence("L", 1)
