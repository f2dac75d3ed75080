"""The chaos checkers catch a broken store, and pass a correct one.

Each workload's own code (``chaos.workloads``) drives an in-memory store written here, once
correct and once with one deliberate bug: a set that drops one acknowledged add, a register
that serves one stale read, a counter that loses one acknowledged increment, a lock service
that grants a held lock a second time. A checker that cannot fail is worth nothing, so each
bug must make its checker say invalid, and the correct store must pass. The store takes
each operation's effect at one instant between its invocation and its response, and yields
to the event loop around it a seeded number of times, so operations really overlap.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

import pytest

from leaderless.chaos.checkers import check_counter, check_lock, check_register, check_set
from leaderless.chaos.history import FINAL_PROCESS, History, read_jsonl, write_jsonl
from leaderless.chaos.workloads import (
    Workload,
    make_workload,
    outcome,
    run_workload,
)
from leaderless.client.errors import (
    ConflictError,
    ConnectionLostError,
    FencedError,
    LeaseLostError,
    LockHeldError,
    NoNodeAvailableError,
    RequestTimeoutError,
    UnavailableError,
)
from leaderless.client.locks import Lease

RUN_S = 1.0
CONCURRENCY = 4


class FakeStore:
    """A linearizable in-memory store, unless ``bug`` names the one thing it gets wrong:
    ``drop_add`` (the 5th put to the set keyspace is acknowledged but not kept),
    ``stale_read`` (one read, during which no change of its key was in flight, answers
    the value the key had before its last change), ``lose_incr`` (the 5th increment is
    acknowledged and not applied), ``double_grant`` (one acquire of a held lock is granted
    anyway)."""

    def __init__(self, seed: int, bug: str | None = None) -> None:
        self.rng = random.Random(seed)
        self.bug = bug
        self.data: dict[tuple[str, str], bytes] = {}
        self.previous: dict[tuple[str, str], bytes | None] = {}
        self.changing: dict[tuple[str, str], int] = {}
        self.changes: dict[tuple[str, str], int] = {}
        self.puts = 0
        self.incrs = 0
        self.bug_done = False
        self.lock: dict[str, tuple[str, int, float]] = {}  # name -> (owner, token, expiry)
        self.tokens: dict[str, int] = {}
        self.fences: dict[tuple[str, str], int] = {}

    async def _yield(self) -> None:
        for _ in range(self.rng.randrange(4)):
            await asyncio.sleep(0)

    def _set(self, k: tuple[str, str], value: bytes | None) -> None:
        self.changes[k] = self.changes.get(k, 0) + 1
        self.previous[k] = self.data.get(k)
        if value is None:
            self.data.pop(k, None)
        else:
            self.data[k] = value

    async def create_keyspace(self, name: str, replication: int = 3, mode: str = "eventual",
                              **_: Any) -> None:
        await self._yield()

    async def get(self, keyspace: str, key: str, *, consistency: str | None = None,
                  **_: Any) -> bytes | None:
        k = (keyspace, key)
        quiet_since = (self.changing.get(k, 0), self.changes.get(k, 0))
        await self._yield()
        value = self.data.get(k)
        if (self.bug == "stale_read" and not self.bug_done and quiet_since[0] == 0
                and quiet_since == (self.changing.get(k, 0), self.changes.get(k, 0))
                and k in self.previous and self.previous[k] != value):
            # No change of the key was in flight from this read's invocation until now:
            # the value before the last change is surely stale.
            self.bug_done = True
            value = self.previous[k]
        await self._yield()
        return value

    async def put(self, keyspace: str, key: str, value: str, *, fence: Any = None,
                  **_: Any) -> int:
        k = (keyspace, key)
        self.changing[k] = self.changing.get(k, 0) + 1
        try:
            await self._yield()
            if fence is not None:
                if fence.token < self.fences.get(k, 0):
                    raise FencedError("a newer token has written this key")
                self.fences[k] = fence.token
            self.puts += 1
            if not (self.bug == "drop_add" and keyspace == "chaos_set" and self.puts == 5):
                self._set(k, value.encode())
            await self._yield()
            return self.puts
        finally:
            self.changing[k] -= 1

    async def cas(self, keyspace: str, key: str, value: str, *,
                  expected_value: str | None = None, **_: Any) -> int:
        k = (keyspace, key)
        self.changing[k] = self.changing.get(k, 0) + 1
        try:
            await self._yield()
            current = self.data.get(k)
            if current != (None if expected_value is None else expected_value.encode()):
                raise ConflictError("expectation did not hold", value=current)
            self._set(k, value.encode())
            await self._yield()
            return 1
        finally:
            self.changing[k] -= 1

    async def incr(self, keyspace: str, key: str, delta: int = 1, **_: Any) -> int:
        k = (keyspace, key)
        await self._yield()
        self.incrs += 1
        new = int(self.data.get(k, b"0")) + delta
        if not (self.bug == "lose_incr" and self.incrs == 5):
            self.data[k] = str(new).encode()
        await self._yield()
        return new

    async def acquire(self, name: str, ttl: float = 10.0, *, wait: float | None = 0.0,
                      owner: str | None = None) -> Lease:
        sent_at = time.monotonic()
        deadline = sent_at + (wait or 0.0)
        while True:
            await self._yield()
            now = time.monotonic()
            held = self.lock.get(name)
            free = held is None or held[2] <= now
            if not free and self.bug == "double_grant" and not self.bug_done:
                self.bug_done, free = True, True
            if free:
                token = self.tokens[name] = self.tokens.get(name, 0) + 1
                self.lock[name] = (owner or "", token, now + ttl)
                await self._yield()
                return Lease(name, owner or "", token, ttl, sent_at)
            if now >= deadline:
                raise LockHeldError("held by another owner")
            await asyncio.sleep(0.005)

    async def release(self, lease: Lease) -> None:
        await self._yield()
        held = self.lock.get(lease.name)
        if held is None or held[1] != lease.token:
            raise LeaseLostError("not the current lease")
        del self.lock[lease.name]
        await self._yield()


async def _drive(workload: Workload, store: FakeStore, run_s: float = RUN_S) -> History:
    history = History()
    await workload.setup(store)
    await run_workload(workload, [store] * CONCURRENCY, history, run_s)
    await workload.final(store, history)
    return history


def run(name: str, bug: str | None, seed: int = 7, **kwargs: Any
        ) -> tuple[dict[str, Any], FakeStore]:
    workload = make_workload(name, seed, concurrency=CONCURRENCY, **kwargs)
    store = FakeStore(seed, bug)
    history = asyncio.run(_drive(workload, store))
    return workload.check(history), store


@pytest.mark.parametrize("name", ["register", "set", "counter", "lock"])
def test_a_correct_store_is_valid(name: str) -> None:
    result, _ = run(name, None)
    assert result["valid"], result["anomalies"]
    assert result["anomalies"] == []
    assert result["lost_acknowledged_writes"] == 0
    assert result["counts"]["ok"] > 20
    assert result["counts"]["indeterminate"] == 0


def test_set_checker_catches_a_dropped_acknowledged_add() -> None:
    result, _ = run("set", "drop_add")
    assert not result["valid"]
    assert result["lost_acknowledged_writes"] == 1
    assert result["lost"] == [4]  # the 5th add (elements count from 0)
    assert "acknowledged adds are missing" in result["anomalies"][0]


def test_register_checker_catches_a_stale_read() -> None:
    result, store = run("register", "stale_read", keys=2)
    assert store.bug_done, "the fake never served its stale read"
    assert not result["valid"]
    assert "not linearizable" in result["keys"].values()
    assert any("NOT linearizable" in a for a in result["anomalies"])


def test_counter_checker_catches_a_lost_increment() -> None:
    result, _ = run("counter", "lose_incr")
    assert not result["valid"]
    assert result["lost_acknowledged_writes"] == 1
    assert result["final"] == result["acknowledged"] - 1
    assert result["linearizability"] == "not linearizable"


def test_lock_checker_catches_a_double_grant() -> None:
    result, store = run("lock", "double_grant")
    assert store.bug_done, "the fake never granted twice"
    assert not result["valid"]
    assert any("two owners held the lock at once" in a for a in result["anomalies"])


def test_lock_checker_catches_a_stale_fenced_write() -> None:
    """A store that accepts a write under an old token after a newer one was accepted."""
    history = History()
    t0 = time.monotonic()
    for process, (owner, token) in enumerate([("a", 2), ("b", 1)]):
        at = t0 + process
        inv = history.invoke(process, "write", "d", {"owner": owner, "token": token,
                                                     "value": owner}, at=at)
        history.ok(inv, None, at=at + 0.1)
    result = check_lock(history)
    assert not result["valid"]
    assert "stale fenced write" in result["anomalies"][0]


def test_counter_checker_catches_a_surely_failed_increment_applied() -> None:
    history = History()
    inv = history.invoke(0, "incr", "c", 1, at=1.0)
    history.ok(inv, 1, at=1.1)
    inv = history.invoke(0, "incr", "c", 1, at=2.0)
    history.fail(inv, {"error": "no_node_available"}, at=2.1)
    inv = history.invoke(FINAL_PROCESS, "read", "c", None, at=3.0)
    history.ok(inv, 2, at=3.1)
    result = check_counter(history)
    assert not result["valid"]
    assert "above" in result["anomalies"][0]


def test_counter_allows_indeterminate_increments_either_way() -> None:
    for final in (1, 2):
        history = History()
        inv = history.invoke(0, "incr", "c", 1, at=1.0)
        history.ok(inv, 1, at=1.1)
        inv = history.invoke(1, "incr", "c", 1, at=1.2)
        history.info(inv, {"error": "timeout"}, at=2.0)
        inv = history.invoke(FINAL_PROCESS, "read", "c", None, at=3.0)
        history.ok(inv, final, at=3.1)
        result = check_counter(history)
        assert result["valid"], result["anomalies"]
        assert result["counts"] == {"ok": 1, "failed": 0, "indeterminate": 1}


def test_set_checker_flags_a_failed_add_that_appears_and_unreadable_elements() -> None:
    history = History()
    for n, kind in enumerate(["ok", "fail", "info"]):
        inv = history.invoke(n, "add", f"s{n}", n, at=float(n))
        getattr(history, kind)(inv, None, at=n + 0.5)
    inv = history.invoke(FINAL_PROCESS, "final_read", None, None, at=10.0)
    history.ok(inv, {"found": [0, 1], "unreadable": []}, at=11.0)
    result = check_set(history)
    assert not result["valid"] and result["unexpected"] == [1]
    assert result["lost_acknowledged_writes"] == 0
    history = History()
    inv = history.invoke(0, "add", "s0", 0, at=0.0)
    history.ok(inv, None, at=0.5)
    inv = history.invoke(FINAL_PROCESS, "final_read", None, None, at=10.0)
    history.info(inv, {"found": [], "unreadable": [0]}, at=11.0)
    result = check_set(history)
    assert not result["valid"] and result["lost"] == [] and result["unreadable"] == [0]


def test_register_budget_spent_is_unknown_not_invalid() -> None:
    history = History()
    for i in range(6):
        inv = history.invoke(i, "write", "k", i, at=0.0)
        history.ok(inv, None, at=1.0)
    inv = history.invoke(9, "read", "k", None, at=2.0)
    history.ok(inv, 5, at=2.5)
    result = check_register(history, time_s=0.0)
    assert result["valid"] and result["keys"] == {"k": "unknown"}
    assert result["unknown_keys"] == ["k"]
    assert check_register(history)["keys"] == {"k": "linearizable"}


def test_errors_are_fail_only_when_the_change_surely_did_not_apply() -> None:
    assert outcome(NoNodeAvailableError("down"), changes=True) == "fail"
    assert outcome(LockHeldError("held"), changes=True) == "fail"
    for exc in (RequestTimeoutError("slow"), ConnectionLostError("cut"),
                UnavailableError("1 of 2"), TimeoutError()):
        assert outcome(exc, changes=True) == "info"
        assert outcome(exc, changes=False) == "fail"


def test_history_round_trips_through_jsonl(tmp_path: Path) -> None:
    workload = make_workload("register", 3, concurrency=CONCURRENCY)
    history = asyncio.run(_drive(workload, FakeStore(3), run_s=0.3))
    path = tmp_path / "history.jsonl"
    write_jsonl(history, path)
    back = read_jsonl(path)
    assert back.entries == history.entries
    assert workload.check(back)["keys"] == workload.check(history)["keys"]
    lines = path.read_text().splitlines()
    assert {"process", "type", "f", "key", "value", "time", "index"} == set(
        json.loads(lines[0]))
    path.write_text(lines[1] + "\n")
    with pytest.raises(ValueError, match="history.jsonl:1"):
        read_jsonl(path)
