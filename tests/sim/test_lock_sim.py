"""Locks under faults: many seeds of the lock simulation (``sim.locks``: leases with
fencing tokens over per-key Paxos, skewed node clocks, loss, duplication, reordering,
partitions, crashes), each history checked by ``sim.lock_check``; then, healed, every node
grants and releases the lock (liveness). The checker itself is tested on hand-written
histories that must be flagged and ones that must pass. A failing seed is a reproducible
bug: ``python -m leaderless.sim locks --seed N --history``."""

from __future__ import annotations

import collections
import itertools
import random

import pytest

from leaderless.core.coordinator import Topology
from leaderless.core.locks import decode_lock
from leaderless.core.paxos import Done, Failed, Proposer, ProposerConfig, Respond, SendAcceptor
from leaderless.core.paxos_messages import Ballot, Nack, Put
from leaderless.core.ring import Ring, RingNode
from leaderless.sim.lock_check import (
    LockHistory,
    LockOp,
    WriteOp,
    check_fenced_writes,
    check_final,
    check_lock_history,
    check_safe_windows,
    check_token_order,
    check_token_owners,
)
from leaderless.sim.locks import LockSim, LockSimConfig, counts, run_lock_seed

SEEDS = 1000
CHUNK = 100


def _check_seed(seed: int) -> dict[str, int]:
    sim, ended = run_lock_seed(seed)
    history = sim.final
    assert ended, f"seed {seed}: the clients did not finish"
    assert history.final_read, f"seed {seed}: the data key or the lock was not read after healing"
    violations = check_lock_history(history)
    assert not violations, "\n".join(violations)
    for name, acquired, released in sim.liveness():
        assert isinstance(acquired, Done), (seed, name, acquired)
        assert isinstance(released, Done), (seed, name, released)
    return counts(history)


@pytest.mark.parametrize("chunk", range(SEEDS // CHUNK))
def test_lock_histories_are_safe_under_faults(chunk: int) -> None:
    total: collections.Counter[str] = collections.Counter()
    for seed in range(chunk * CHUNK, (chunk + 1) * CHUNK):
        total.update(_check_seed(seed))
    # The runs did something: grants, refusals, renewals, fenced writes.
    assert total["acquire_ok"] > CHUNK and total["acquire_conflict"] > 0, total
    assert total["renew_ok"] > 0 and total["write_ok"] > 0 and total["release_ok"] > 0, total


def test_the_workload_exercises_what_the_checks_are_about() -> None:
    """Over a few seeds: unknown outcomes, refused stale writes, accepted stale writes (no
    newer holder wrote yet), leases that had to expire, holders getting their lease back."""
    total: collections.Counter[str] = collections.Counter()
    regrants = 0
    for seed in range(40):
        sim, _ = run_lock_seed(seed)
        total.update(counts(sim.final))
        tokens = collections.Counter(op.token for op in sim.final.locks
                                     if op.kind == "acquire" and op.status == "ok")
        regrants += sum(n - 1 for n in tokens.values())
        assert sim.messages_dropped > 0
        assert len(set(sim.wall_skew_ms.values())) > 1, sim.wall_skew_ms
    for kind in ("acquire_info", "acquire_fail", "write_fenced", "write_stale",
                 "expiry_takeovers", "release_conflict"):
        assert total[kind] > 0, (kind, total)
    assert regrants > 0


def test_without_faults_every_lock_operation_has_a_definite_outcome() -> None:
    sim = LockSim(LockSimConfig(loss=0.0, duplicate=0.0), 3)
    assert sim.run(faults=False)
    history = sim.finish()
    assert {op.status for op in history.locks} <= {"ok", "conflict"}, counts(history)
    assert {w.status for w in history.writes} <= {"ok", "fenced"}, counts(history)
    assert counts(history)["acquire_ok"] > 0 and counts(history)["write_ok"] > 0
    assert check_lock_history(history) == []
    assert history.final_value is not None and history.final_fence is not None


def test_after_healing_every_node_grants_the_lock_with_growing_tokens() -> None:
    for seed in range(5):
        sim, _ = run_lock_seed(seed)
        tokens = []
        for name, acquired, released in sim.liveness():
            assert isinstance(acquired, Done) and isinstance(released, Done), (seed, name)
            tokens.append(decode_lock(acquired.value).token)
        assert sim.final.final_lock is not None
        assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens), (seed, tokens)
        assert tokens[0] > sim.final.final_lock[1], (seed, tokens, sim.final.final_lock)


def test_clocks_beyond_the_bound_break_mutual_exclusion_but_not_fencing() -> None:
    """With node clocks spread far wider than the clients assume, a proposer whose clock
    runs ahead grants the lock while the previous holder still believes it safe: the
    checker must see it. Tokens and fencing do not depend on clocks: still safe."""
    config = LockSimConfig(skew_spread_ms=400)
    flagged = []
    for seed in range(20):
        sim, _ = run_lock_seed(seed, config)
        history = sim.final
        if check_safe_windows(history):
            flagged.append(seed)
        assert check_token_owners(history) == [], seed
        assert check_token_order(history) == [], seed
        assert check_fenced_writes(history) == [], seed
        assert check_final(history) == [], seed
    assert flagged, "no seed broke mutual exclusion with clocks spread 400 ms"


# -- the checker on hand-written histories ------------------------------------------------

MARGIN_MS = 60


class Builder:
    """Hand-written histories: times in seconds, ttl in ms, the safe end as sim.locks
    computes it (invoke + ttl - MARGIN_MS)."""

    def __init__(self) -> None:
        self.locks: list[LockOp] = []
        self.writes: list[WriteOp] = []
        self._index = itertools.count()

    def _lock(self, kind: str, owner: str, token: int | None, invoke: float,
              complete: float | None, status: str, ttl_ms: int,
              seen: tuple[str, int] | None) -> LockOp:
        op = LockOp(next(self._index), int(owner[1:]), owner, kind, invoke, ttl_ms, token,
                    status, complete if status in ("ok", "conflict", "fail") else None)
        if kind != "release":
            op.valid_until_s = invoke + (ttl_ms - MARGIN_MS) / 1000
        op.seen = seen
        self.locks.append(op)
        return op

    def acquire(self, owner: str, token: int | None, invoke: float, complete: float | None,
                status: str = "ok", ttl_ms: int = 300,
                seen: tuple[str, int] | None = None) -> LockOp:
        if status == "ok":
            assert token is not None
            seen = (owner, token)
        return self._lock("acquire", owner, token, invoke, complete, status, ttl_ms, seen)

    def renew(self, owner: str, token: int, invoke: float, complete: float,
              status: str = "ok", ttl_ms: int = 300) -> LockOp:
        seen = (owner, token) if status == "ok" else None
        return self._lock("renew", owner, token, invoke, complete, status, ttl_ms, seen)

    def release(self, owner: str, token: int, invoke: float, complete: float,
                status: str = "ok") -> LockOp:
        seen = ("", token) if status == "ok" else None
        return self._lock("release", owner, token, invoke, complete, status, 0, seen)

    def write(self, owner: str, token: int, invoke: float, complete: float | None,
              status: str = "ok", fenced_by: int | None = None) -> WriteOp:
        index = next(self._index)
        op = WriteOp(index, int(owner[1:]), owner, token, f"w{index}".encode(), invoke,
                     status, complete, fenced_by)
        self.writes.append(op)
        return op

    def history(self, final: WriteOp | None = None, final_fence: int | None = None,
                final_lock: tuple[str, int] | None = None) -> LockHistory:
        return LockHistory(7, self.locks, self.writes,
                           final.value if final is not None else None, final_fence,
                           final_lock, final_read=final is not None or final_lock is not None)


def test_checker_flags_two_owners_with_the_same_token() -> None:
    h = Builder()
    first = h.acquire("c1", 1, 0.0, 0.01)
    h.release("c1", 1, 0.05, 0.06)
    second = h.acquire("c2", 1, 0.5, 0.51)
    found = check_token_owners(h.history())
    assert len(found) == 1
    assert "seed 7" in found[0] and f"#{first.index} " in found[0]
    assert f"#{second.index} " in found[0]
    assert found[0] in check_lock_history(h.history())


def test_checker_flags_a_token_going_back() -> None:
    h = Builder()
    h.acquire("c1", 2, 0.0, 0.01)
    h.release("c1", 2, 0.05, 0.06)
    late = h.acquire("c2", 1, 0.1, 0.11)
    found = check_token_order(h.history())
    assert found and all("went back from 2 to 1" in line for line in found), found
    assert any(f"#{late.index} " in line for line in found)


def test_checker_flags_a_grant_that_repeats_a_token_another_owner_was_shown_holding() -> None:
    """c1's acquire is unknown (it did grant: c3 was refused by it); c2 later gets the
    same token: two owners, although c1 never saw its grant."""
    h = Builder()
    h.acquire("c1", None, 0.0, None, status="info")
    h.acquire("c3", None, 0.05, 0.06, status="conflict", seen=("c1", 3))
    h.acquire("c2", 3, 0.5, 0.51)
    assert check_token_owners(h.history()) == []
    found = check_token_order(h.history())
    assert len(found) == 1 and "not newer than the lock state ('c1', 3)" in found[0], found


def test_checker_flags_overlapping_safe_windows() -> None:
    h = Builder()
    first = h.acquire("c1", 1, 0.0, 0.01)  # safe until 0.24
    second = h.acquire("c2", 2, 0.05, 0.2)
    found = check_safe_windows(h.history())
    assert len(found) == 1, found
    assert f"#{first.index} " in found[0] and f"#{second.index} " in found[0]
    assert "safe until 0.2400 s" in found[0]


def test_checker_flags_a_grant_inside_a_renewed_window() -> None:
    h = Builder()
    h.acquire("c1", 1, 0.0, 0.01)  # safe until 0.24
    h.renew("c1", 1, 0.2, 0.21)  # safe until 0.44
    h.acquire("c2", 2, 0.3, 0.31)
    assert len(check_safe_windows(h.history())) == 1


def test_checker_flags_a_grant_inside_a_reacquired_window_before_release() -> None:
    h = Builder()
    h.acquire("c1", 1, 0.0, 0.01)
    h.acquire("c1", 1, 0.1, 0.11, ttl_ms=400)  # its own lease back: safe until 0.44
    h.acquire("c2", 2, 0.3, 0.31)
    h.release("c1", 1, 0.35, 0.36, status="conflict")
    found = check_safe_windows(h.history())
    assert len(found) == 1 and "safe until 0.4400 s" in found[0], found


def test_checker_flags_a_stale_fenced_write_accepted_after_a_newer_one() -> None:
    h = Builder()
    h.write("c2", 2, 0.1, 0.11)
    stale = h.write("c1", 1, 0.2, 0.21)
    found = check_fenced_writes(h.history())
    assert len(found) == 1 and "stale fenced write" in found[0]
    assert f"#{stale.index} " in found[0]


def test_checker_flags_a_refusal_naming_a_token_no_write_carried() -> None:
    h = Builder()
    h.write("c2", 2, 0.1, 0.11)
    h.write("c1", 1, 0.2, 0.21, status="fenced", fenced_by=5)
    h.write("c1", 1, 0.3, 0.31, status="fenced", fenced_by=1)
    assert len(check_fenced_writes(h.history())) == 2


def test_checker_flags_a_final_value_under_an_older_token() -> None:
    h = Builder()
    old = h.write("c1", 1, 0.0, 0.01, status="info")
    h.write("c2", 2, 0.1, 0.11)
    found = check_final(h.history(final=old, final_fence=1))
    assert len(found) == 1 and "under token 1, but a write under token 2" in found[0]
    refused = h.write("c1", 1, 0.2, 0.21, status="fenced", fenced_by=2)
    assert check_final(h.history(final=refused, final_fence=2))
    good = h.writes[1]
    assert check_final(h.history(final=good, final_fence=2)) == []
    assert len(check_final(h.history(final=good, final_fence=1))) == 1  # the fence lags
    h.acquire("c3", 4, 0.3, 0.31)
    found = check_final(h.history(final=good, final_fence=2, final_lock=("", 3)))
    assert len(found) == 1 and "lock's token after healing is 3" in found[0], found


def test_checker_flags_operations_never_answered() -> None:
    h = Builder()
    h.acquire("c1", None, 0.0, None, status="pending")
    assert len(check_lock_history(h.history())) == 1


def test_checker_passes_a_holder_getting_its_own_lease_back() -> None:
    h = Builder()
    h.acquire("c1", 1, 0.0, 0.01)
    h.renew("c1", 1, 0.1, 0.11)
    h.acquire("c1", 1, 0.2, 0.21)
    h.release("c1", 1, 0.3, 0.31)
    h.acquire("c2", 2, 0.32, 0.33)
    h.write("c1", 1, 0.05, 0.06)
    h.write("c2", 2, 0.4, 0.41)
    h.write("c1", 1, 0.5, 0.51, status="fenced", fenced_by=2)
    assert check_lock_history(h.history(final=h.writes[1], final_fence=2,
                                        final_lock=("c2", 2))) == []


def test_checker_passes_a_release_sent_before_the_next_grant_completes() -> None:
    h = Builder()
    h.acquire("c1", 1, 0.0, 0.01)  # safe until 0.24
    h.acquire("c2", 2, 0.05, 0.07)  # sent before the release, granted after it
    h.release("c1", 1, 0.06, 0.08, status="info")  # not known to have landed: still counts
    assert check_lock_history(h.history()) == []


def test_checker_passes_concurrent_grants_and_tokens_consumed_by_unknown_acquires() -> None:
    h = Builder()
    h.acquire("c2", 1, 0.0, 0.25, ttl_ms=200)  # answered after its safe end: never held
    h.acquire("c1", 2, 0.1, 0.2)  # concurrent with it
    h.acquire("c3", None, 0.6, None, status="info")  # may have taken token 3
    h.acquire("c4", 4, 1.0, 1.01)
    h.acquire("c5", None, 1.02, 1.03, status="conflict", seen=("c4", 4))
    assert check_lock_history(h.history()) == []


def test_checker_passes_a_lease_shortened_by_its_holder() -> None:
    """A renewal sets the expiry to its own ttl from now (it does not add), and a renewal
    with an unknown outcome may have done so: the holder's safe end follows."""
    h = Builder()
    h.acquire("c1", 1, 0.0, 0.01, ttl_ms=400)  # safe until 0.34
    h.renew("c1", 1, 0.05, 0.06, ttl_ms=150)  # set: safe until 0.14
    h.acquire("c2", 2, 0.15, 0.16)
    h.release("c2", 2, 0.17, 0.18)
    h.acquire("c3", 3, 0.2, 0.21, ttl_ms=400)  # safe until 0.54
    h.renew("c3", 3, 0.25, None, status="info", ttl_ms=150)  # maybe: safe until 0.34
    h.acquire("c4", 4, 0.3, 0.35)
    assert check_lock_history(h.history()) == []
    h.locks[-2].status = "fail"  # certainly not applied: c3 still holds until 0.54
    assert len(check_safe_windows(h.history())) == 1


def test_checker_passes_a_grant_sent_during_a_lease_and_answered_after_it() -> None:
    h = Builder()
    h.acquire("c1", 1, 0.0, 0.01)  # safe until 0.24
    h.acquire("c2", 2, 0.1, 0.25)
    h.write("c1", 1, 0.1, 0.3)
    final = h.write("c2", 2, 0.26, 0.28)  # concurrent with c1's: either order is fine
    assert check_lock_history(h.history(final=final, final_fence=2)) == []
# -- a core bug the lock simulation found ------------------------------------------------


def test_a_proposer_retrying_with_every_change_of_the_round_out_of_attempts() -> None:
    """Found by ``sim.locks`` (seed 137 with ``CLOCK_RESOLUTION_MS`` 0): a round refused
    after its changes used up ``retries_max`` while another change of the key waited in
    the queue crashed the proposer (``max()`` of no attempts). The refused changes fail
    with ``contention``; the waiting one gets its round after a backoff."""
    names = ("n1", "n2", "n3")
    ring = Ring(RingNode(name, i + 1, 8) for i, name in enumerate(names))
    topology = Topology(ring, frozenset(names), frozenset(names))
    proposer = Proposer("n1", ProposerConfig(retries_max=0), itertools.count(1),
                        random.Random(1))
    prepares = [e for e in proposer.propose(0.0, 1, topology, "strong", 3, b"k", b"",
                                            Put(b"a")) if isinstance(e, SendAcceptor)]
    assert proposer.propose(0.0, 2, topology, "strong", 3, b"k", b"", Put(b"b")) == []
    effects = []
    for effect in prepares[:2]:
        effects += proposer.on_reply(0.001, effect.to, Nack(effect.message.id, Ballot(9, "n2")))
    failed = [e for e in effects if isinstance(e, Respond)]
    assert len(failed) == 1 and failed[0].op_id == 1
    assert isinstance(failed[0].result, Failed) and failed[0].result.code == "contention"
    retried = proposer.on_tick(proposer.next_deadline())
    assert any(isinstance(e, SendAcceptor) for e in retried)
