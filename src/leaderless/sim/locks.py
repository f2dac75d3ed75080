"""A deterministic simulation of locks (``core.locks``) over per-key Paxos: the Paxos
simulation (``sim.paxos``: production acceptors and proposers, loss, duplication,
reordering, partitions, crashes) with a lock workload, node wall clocks that disagree, and
a history for the lock checker (``sim.lock_check``).

**Clocks.** Each node's wall clock is off the true simulated time by a fixed offset within
±``skew_spread_ms``/2, drawn again when it restarts (a restarted host may have been
re-synced). By default the spread is ``skew_max_ms``: the documented assumption (node
clocks differ by at most ``core.locks.CLOCK_SKEW_MAX_MS``), scaled to the sim's short
leases (a 500 ms bound against leases of a few hundred ms would leave no safe time at all).
A run with a wider spread breaks the assumption on purpose: the checker then finds two
holders at once, while fencing still keeps the data key safe.

**Clients.** Each client is one owner. It loops: acquire lock ``L`` through a random live
node; on a refusal back off and try again; once granted, it holds the lease from the
grant's answer until ``invoked + ttl - skew_max_ms`` by true time (what
``client.Lease.valid_for_s`` assumes, its monotonic clock being the true one here; less
``CLOCK_RESOLUTION_MS``), maybe renews it once or twice (a renewal *sets* the expiry to its
ttl from now, so the client follows its latest renewal, and one with an unknown outcome
can only shorten what it assumes), maybe writes the data key under ``Fence("L", token)``
while its lease is safe, and usually releases it (otherwise it expires). Sometimes it
"pauses" (a GC pause, a stopped VM) and writes after its lease ended: fencing must refuse
that write if a newer holder already wrote. Refused, a client backs off, or tries again
right when the holder's lease ends (the grants that race an expiry test the skew margin).

An ambiguous failure (timeout, ``maybe_applied``) is retried with the same idempotency id
through another node, up to ``client_retries`` times; then its outcome is unknown
(``info``): an acquire that may have granted is not counted as held.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from leaderless.core.locks import decode_lock
from leaderless.core.paxos import Conflict, Done, Failed, Fenced, Result
from leaderless.core.paxos_messages import (
    Acquire,
    Change,
    Fence,
    Put,
    Read,
    Release,
    Renew,
)
from leaderless.sim.fault_net import EPOCH_MS
from leaderless.sim.lock_check import LockHistory, LockOp, WriteOp, expiry_takeovers
from leaderless.sim.paxos import KEYSPACE, PaxosSim, PaxosSimConfig

LOCK_NAME = "L"
LOCK_KEY = LOCK_NAME.encode()
DATA_KEY = b"shared"
CLOCK_RESOLUTION_MS = 1
"""Proposers stamp and compare leases in whole ms (``int`` wall clocks), which can lose up
to 1 ms: the granting node truncates its stamp down by up to 1 ms, and another node judges
expiry on a truncated reading. So with clocks exactly ``skew_max_ms`` apart a lease may end
up to 1 ms before ``invoked + ttl - skew``; the clients here take that 1 ms off as well (the
production client's 500 ms margin does not, a difference far inside what any skew bound
means in practice)."""


@dataclasses.dataclass
class LockSimConfig(PaxosSimConfig):
    clients: int = 5
    cycles: int = 10
    """Acquire attempts per client (a refused one counts)."""
    ttl_ms: tuple[int, int] = (200, 450)
    skew_max_ms: int = 60
    """The clock-skew bound the clients assume (the sim's ``CLOCK_SKEW_MAX_MS``)."""
    skew_spread_ms: int | None = None
    """The real spread of node clocks (None: ``skew_max_ms``, the assumption holds)."""
    backoff_s: tuple[float, float] = (0.02, 0.15)
    """After a refused or failed acquire."""
    at_expiry_odds: float = 0.5
    """Of the refused acquires: try again within ``skew_max_ms`` of the lease's expiry."""
    think_s: tuple[float, float] = (0.0, 0.08)
    renew_odds: tuple[float, float, float] = (0.5, 0.3, 0.2)
    """Chances of 0, 1 or 2 renewals of a lease."""
    write_odds: float = 0.8
    pause_odds: float = 0.2
    """Of the writes: the client pauses past its lease first (a stale write)."""
    release_odds: float = 0.75


@dataclasses.dataclass
class _Lease:
    token: int
    valid_until_s: float
    renewals: int
    write: bool
    pause: bool
    release: bool


class LockClient:
    """One owner's loop: acquire, hold (renew, fenced write), release or let expire."""

    def __init__(self, sim: LockSim, index: int) -> None:
        self.sim = sim
        self.index = index
        self.owner = f"c{index}"
        self.left = sim.config.cycles
        self._ops = 0

    def _id(self) -> bytes:
        self._ops += 1
        return f"{self.sim.seed}/{self.owner}/{self._ops}".encode()

    def _later(self, span_s: tuple[float, float], then: Callable[[], None]) -> None:
        self.sim.clock.after(self.sim.rng.uniform(*span_s), lambda _, __: then())

    def start(self) -> None:
        self._later((0.0, 0.01), self.acquire)

    def acquire(self) -> None:
        if self.left == 0:
            self.sim.clients_finished += 1
            return
        self.left -= 1
        ttl = self.sim.rng.randint(*self.sim.config.ttl_ms)
        op = self.sim.record_lock(self.index, self.owner, "acquire", ttl, None)
        self.sim.call(LOCK_KEY, Acquire(self.owner, ttl), self._id(),
                      lambda result: self._acquired(op, result))

    def _acquired(self, op: LockOp, result: Result) -> None:
        self.sim.settle_lock(op, result)
        if op.status != "ok":
            self._retry_acquire(result)
            return
        assert op.token is not None and op.valid_until_s is not None
        rng, config = self.sim.rng, self.sim.config
        lease = _Lease(op.token, op.valid_until_s,
                       rng.choices((0, 1, 2), weights=config.renew_odds)[0],
                       rng.random() < config.write_odds, rng.random() < config.pause_odds,
                       rng.random() < config.release_odds)
        self._hold(lease)

    def _retry_acquire(self, result: Result) -> None:
        """Back off; or, told who holds the lock until when, try again right around that
        instant (as a client that read ``expires_in_ms`` would): the grants that race an
        expiry are the ones that test the clock-skew margin."""
        sim = self.sim
        if isinstance(result, Conflict) and sim.rng.random() < sim.config.at_expiry_odds:
            state = decode_lock(result.value)
            if state.held(sim.wall_ms()):
                skew_s = sim.config.skew_max_ms / 1000
                expires_s = (state.expires_at_ms - EPOCH_MS) / 1000
                at = expires_s + sim.rng.uniform(-skew_s, skew_s)
                sim.clock.at(max(sim.clock.now, at), lambda _, __: self.acquire())
                return
        self._later(sim.config.backoff_s, self.acquire)

    def _safe_left_s(self, lease: _Lease) -> float:
        return lease.valid_until_s - self.sim.clock.now

    def _hold(self, lease: _Lease) -> None:
        """The next step of a held lease: renew, write, then release."""
        left = self._safe_left_s(lease)
        if lease.renewals and left > 0:
            lease.renewals -= 1
            self._later((0.3 * left, 0.7 * left), lambda: self._renew(lease))
        elif lease.write and lease.pause:
            lease.write = False
            pause = max(0.0, left) + self.sim.rng.uniform(0.0, 0.25)
            self.sim.clock.after(pause, lambda _, __: self._write(lease, stale=True))
        elif lease.write and left > 0:
            lease.write = False
            self._later((0.0, 0.5 * left), lambda: self._write(lease, stale=False))
        elif lease.release:
            lease.release = False
            op = self.sim.record_lock(self.index, self.owner, "release", 0, lease.token)
            self.sim.call(LOCK_KEY, Release(self.owner, lease.token), self._id(),
                          lambda result: self._released(op, result))
        else:
            self._later(self.sim.config.think_s, self.acquire)

    def _renew(self, lease: _Lease) -> None:
        if self._safe_left_s(lease) <= 0:  # too late: the client knows it lost the lease
            self._hold(lease)
            return
        ttl = self.sim.rng.randint(*self.sim.config.ttl_ms)
        op = self.sim.record_lock(self.index, self.owner, "renew", ttl, lease.token)

        def renewed(result: Result) -> None:
            self.sim.settle_lock(op, result)
            assert op.valid_until_s is not None
            if op.status == "ok":  # a renewal sets the expiry: ttl from now, not added
                lease.valid_until_s = op.valid_until_s
            elif op.status == "info":  # it may have applied, with a shorter ttl
                lease.valid_until_s = min(lease.valid_until_s, op.valid_until_s)
            elif op.status == "conflict":  # not ours any more: nothing left to do with it
                lease.renewals = 0
                lease.write = lease.write and lease.pause
            self._hold(lease)

        self.sim.call(LOCK_KEY, Renew(self.owner, lease.token, ttl), self._id(), renewed)

    def _write(self, lease: _Lease, stale: bool) -> None:
        if not stale and self._safe_left_s(lease) <= 0:
            self._hold(lease)
            return
        op = self.sim.record_write(self.index, self.owner, lease.token, stale)
        change = Put(op.value, fence=Fence(LOCK_NAME, lease.token))

        def written(result: Result) -> None:
            self.sim.settle_write(op, result)
            self._hold(lease)

        self.sim.call(DATA_KEY, change, self._id(), written)

    def _released(self, op: LockOp, result: Result) -> None:
        self.sim.settle_lock(op, result)
        self._later(self.sim.config.think_s, self.acquire)


class LockSim(PaxosSim):
    config: LockSimConfig

    def __init__(self, config: LockSimConfig, seed: int) -> None:
        super().__init__(config, seed)
        self.locks: list[LockOp] = []
        self.writes: list[WriteOp] = []
        self.clients_finished = 0
        for name in sorted(self.nodes):
            self._skew(name)
        self.clients = [LockClient(self, i) for i in range(1, config.clients + 1)]
        self.final = LockHistory(seed, self.locks, self.writes, final_read=False)

    def _skew(self, name: str) -> None:
        spread = self.config.skew_spread_ms
        half = (self.config.skew_max_ms if spread is None else spread) // 2
        self.wall_skew_ms[name] = self.rng.randint(-half, half)

    def restart(self, name: str) -> None:
        self._skew(name)
        super().restart(name)

    # -- the history ---------------------------------------------------------------------

    def record_lock(self, client: int, owner: str, kind: str, ttl_ms: int,
                    token: int | None) -> LockOp:
        op = LockOp(len(self.locks) + len(self.writes), client, owner, kind, self.clock.now,
                    ttl_ms, token)
        if kind != "release":
            margin_ms = self.config.skew_max_ms + CLOCK_RESOLUTION_MS
            op.valid_until_s = op.invoke_s + (ttl_ms - margin_ms) / 1000
        self.locks.append(op)
        return op

    def record_write(self, client: int, owner: str, token: int, stale: bool) -> WriteOp:
        index = len(self.locks) + len(self.writes)
        op = WriteOp(index, client, owner, token, f"w{index}-{owner}-t{token}".encode(),
                     self.clock.now, stale=stale)
        self.writes.append(op)
        return op

    def settle_lock(self, op: LockOp, result: Result) -> None:
        op.status = _status(result)
        if op.status in ("ok", "conflict", "fail"):
            op.complete_s = self.clock.now
        if isinstance(result, Done | Conflict):
            state = decode_lock(result.value)
            op.seen = (state.holder, state.token)
        if op.status != "ok" or op.kind == "release":
            return
        assert op.seen is not None and op.seen[0] == op.owner, (self.seed, op, result)
        if op.kind == "acquire":
            op.token = op.seen[1]
        assert op.token == op.seen[1], (self.seed, op, result)

    def settle_write(self, op: WriteOp, result: Result) -> None:
        op.status = _status(result)
        if op.status in ("ok", "fenced", "fail"):
            op.complete_s = self.clock.now
        if isinstance(result, Fenced):
            op.fenced_by = result.token

    # -- calls through random live nodes, retrying ambiguous failures ------------------

    def call(self, key: bytes, change: Change, idempotency_id: bytes,
             then: Callable[[Result], None], attempt: int = 0) -> None:
        live = [name for name, node in self.nodes.items() if node.up]
        if not live:
            then(Failed("unavailable", "no node is up", maybe_applied=attempt > 0))
            return
        via = self.rng.choice(live)
        answered = False

        def done(result: Result) -> None:
            nonlocal answered
            if answered:
                return
            answered = True
            if isinstance(result, Failed) and attempt > 0 and not result.maybe_applied:
                # An earlier attempt may have applied it: still unknown.
                result = dataclasses.replace(result, maybe_applied=True)
            if (isinstance(result, Failed) and result.maybe_applied
                    and attempt < self.config.client_retries):
                self.call(key, change, idempotency_id, then, attempt + 1)
            else:
                then(result)

        op_id = self.submit(via, key, change, idempotency_id, done)

        def give_up(_: Any, __: Any) -> None:
            if not answered:
                self._callbacks.pop(op_id, None)
                done(Failed("timeout", "client timeout", maybe_applied=True))

        self.clock.after(self.config.client_timeout_s, give_up)

    # -- a run ----------------------------------------------------------------------------

    def run(self, faults: bool = True, limit_s: float = 60.0) -> bool:
        """Run every client to the end (True), or stop at ``limit_s`` simulated (False)."""
        if faults:
            self._faults()
        for client in self.clients:
            client.start()
        end = self.clock.now + limit_s
        return self.clock.run_until(end, lambda: self.clients_finished == len(self.clients),
                                    check_every_s=0.05)

    def _settle_all(self) -> None:
        """Heal, wait for every fault to be detected healed and every lease to expire."""
        config = self.config
        self.clock.run_until(max(self.clock.now, config.fault_phase_s))
        self._heal_all()
        ready = self.clock.now + config.detection_s + (
            config.ttl_ms[1] + (config.skew_spread_ms or config.skew_max_ms)) / 1000 + 0.01
        self.clock.run_until(ready)

    def _sync_call(self, via: str, key: bytes, change: Change, idempotency_id: bytes
                   ) -> Result | None:
        results: list[Result] = []
        self.submit(via, key, change, idempotency_id, results.append)
        self.clock.run_until(self.clock.now + 2 * self.config.timeout_s)
        return results[0] if results else None

    def finish(self) -> LockHistory:
        """After ``run``: heal, read the data key and the lock (the final state the checker
        compares with the history). The history, final reads included."""
        self._settle_all()
        via = sorted(self.nodes)[0]
        data = self._sync_call(via, DATA_KEY, Read(), b"")
        lock = self._sync_call(via, LOCK_KEY, Read(), b"")
        history = LockHistory(self.seed, self.locks, self.writes, final_read=False)
        if isinstance(data, Done) and isinstance(lock, Done):
            state = decode_lock(lock.value)
            history = LockHistory(self.seed, self.locks, self.writes, data.value,
                                  self.chosen_fence(), (state.holder, state.token))
        self.final = history
        return history

    def chosen_fence(self) -> int | None:
        """The fence token of the data key's register as the acceptors hold it: the one
        accepted at the highest ballot (after a completed read, the chosen one)."""
        best = None
        for node in self.nodes.values():
            state = node.acceptor.state(KEYSPACE, DATA_KEY, b"")
            if state.accepted is not None and (best is None or state.accepted > best[0]):
                best = (state.accepted, state.register)
        if best is None or best[1] is None or best[1].fence is None:
            return None
        return best[1].fence.token

    def liveness(self) -> list[tuple[str, Result | None, Result | None]]:
        """After ``finish``: through every node, a new owner acquires then releases the
        lock; (node, acquire's result, release's result) for each."""
        out: list[tuple[str, Result | None, Result | None]] = []
        for name in sorted(self.nodes):
            owner = f"probe-{name}"
            acquired = self._sync_call(name, LOCK_KEY, Acquire(owner, 1000),
                                       f"{owner}/acquire".encode())
            released = None
            if isinstance(acquired, Done):
                token = decode_lock(acquired.value).token
                released = self._sync_call(name, LOCK_KEY, Release(owner, token),
                                           f"{owner}/release".encode())
            out.append((name, acquired, released))
        return out


def _status(result: Result) -> str:
    if isinstance(result, Done):
        return "ok"
    if isinstance(result, Conflict):
        return "conflict"
    if isinstance(result, Fenced):
        return "fenced"
    if isinstance(result, Failed):
        return "info" if result.maybe_applied else "fail"
    raise AssertionError(f"not an outcome of a change: {result!r}")


def run_lock_seed(seed: int, config: LockSimConfig | None = None) -> tuple[LockSim, bool]:
    """One seed with faults, healed and read back: (the sim, whether every client ended)."""
    sim = LockSim(config or LockSimConfig(), seed)
    ended = sim.run()
    sim.finish()
    return sim, ended


def counts(history: LockHistory) -> dict[str, int]:
    """How many operations of each kind ended how (``acquire_ok``, ``write_fenced``, ...),
    stale writes, and grants that had to wait for an unreleased lease to expire."""
    out: dict[str, int] = {}
    for op in history.locks:
        out[f"{op.kind}_{op.status}"] = out.get(f"{op.kind}_{op.status}", 0) + 1
    for write in history.writes:
        out[f"write_{write.status}"] = out.get(f"write_{write.status}", 0) + 1
        if write.stale:
            out["write_stale"] = out.get("write_stale", 0) + 1
    out["expiry_takeovers"] = expiry_takeovers(history)
    return dict(sorted(out.items()))
