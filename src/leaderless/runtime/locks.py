"""The lock service of a node: leases with fencing tokens over the strong keyspace
``system_locks`` (``core.locks``), blocking acquire, and the fence check of writes.

A blocking acquire does not poll: when the lock is held it waits for a change of the lock's
key (this node's own proposer choosing a release, or a watch notification of a change
proposed elsewhere) or for the holder's lease to expire by this node's clock, whichever
comes first, and then tries again, until its wait time is over.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Awaitable, Callable

from leaderless.api.kv_messages import Lease, LockInfo
from leaderless.api.service import KvError
from leaderless.core import paxos
from leaderless.core.keys import KeyError_, check_key
from leaderless.core.locks import LOCK_KEYSPACE, LOCK_REPLICATION, LockState, decode_lock
from leaderless.core.paxos_messages import (
    LEASE_TTL_MS_MAX,
    LEASE_TTL_MS_MIN,
    LOCK_NAME_BYTES_MAX,
    OWNER_BYTES_MAX,
    Acquire,
    Change,
    Read,
    Release,
    Renew,
)
from leaderless.core.schema import KeyspaceDef
from leaderless.runtime.wall_clock import wall_ms as _wall_ms

LOCK_KEYSPACE_DEF = KeyspaceDef(LOCK_KEYSPACE, LOCK_REPLICATION, "strong")
WAIT_MS_MAX = 3_600_000
"""The longest a blocking acquire may wait (an hour): a request must end some time."""
WAITERS_MAX = 10_000
"""Blocking acquires waiting on one node at once; beyond it: ``overloaded``."""
EXPIRY_MARGIN_S = 0.002
"""Retry this long after the holder's lease ends by our clock (the proposer, which may be
us, judges expiry by its clock; a hair late costs one retry less)."""

Propose = Callable[[KeyspaceDef, bytes, bytes, Change, bytes], Awaitable[paxos.Outcome]]
HoldKey = Callable[[KeyspaceDef, bytes], Callable[[], None]]
"""Learn of a key's changes made through other nodes while waiting (``WatchHub.hold_key``);
returns the function that lets go."""
ClockCheck = Callable[[], None]
"""Raises ``clock_skew`` while this node's clock is beyond the skew bound
(``KvNode._check_clock``): a lease granted or renewed here would expire by a wrong clock."""


class LockService:
    def __init__(self, propose: Propose, hold_key: HoldKey,
                 clock_check: ClockCheck = lambda: None) -> None:
        self._propose = propose
        self._hold_key = hold_key
        self._clock_check = clock_check
        self._queues: dict[bytes, collections.deque[asyncio.Future[None]]] = {}
        """Acquires waiting on each lock here, in arrival order: a release wakes the first
        (not all of them, which would cost a round of refusals per hand-over)."""
        self._missed: set[bytes] = set()
        """Locks freed while their acquirers were between an attempt and their wait."""
        self._acquiring: dict[bytes, int] = {}
        self._expiry_ms: dict[bytes, int] = {}
        """When the current lease of each lock acquired here ends, as last refused."""
        self._waiting = 0
        self.grants = 0
        self.refusals = 0
        self.fenced = 0

    # -- notifications -----------------------------------------------------------------

    def on_key_changed(self, keyspace: str, partition: bytes, sort: bytes,
                       value: bytes | None) -> None:
        """A change of a strong key was chosen: if it freed a lock, wake the acquire that
        has waited longest for it here."""
        if keyspace != LOCK_KEYSPACE or partition not in self._acquiring:
            return
        if decode_lock(value).held(_wall_ms()):
            return  # granted or renewed: nothing for a waiter to take
        queue = self._queues.get(partition)
        while queue:
            future = queue.popleft()
            if not future.done():
                future.set_result(None)
                return
        self._missed.add(partition)

    # -- operations --------------------------------------------------------------------

    async def acquire(self, name: str, owner: str, ttl_ms: int, wait_ms: int = 0,
                      idempotency: bytes = b"") -> Lease:
        key = _check(name, owner, ttl_ms)
        if not 0 <= wait_ms <= WAIT_MS_MAX:
            raise KvError("bad_request", f"wait_ms {wait_ms} is out of range 0..{WAIT_MS_MAX}")
        self._clock_check()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_ms / 1000
        let_go: Callable[[], None] | None = None
        woken = False
        self._acquiring[key] = self._acquiring.get(key, 0) + 1
        try:
            if wait_ms and any(not f.done() for f in self._queues.get(key, ())):
                # Others wait for this lock here: queue behind them instead of barging in
                # (a client releasing and at once acquiring again would otherwise win
                # every hand-over), until the lock is freed or the holder's lease ends.
                let_go = self._hold_key(LOCK_KEYSPACE_DEF, key)
                expiry_s = (max(0.0, (self._expiry_ms.get(key, 0) - _wall_ms()) / 1000)
                            + EXPIRY_MARGIN_S)
                woken = await self._wait_change(key, min(wait_ms / 1000, expiry_s), False)
            while True:
                # Each attempt is a new change (a fresh id): a refused acquire changed
                # nothing, and the client's id keeps the *granting* attempt idempotent
                # across its retries. The clock is checked again: it may have drifted
                # out of bound while this acquire waited.
                self._clock_check()
                outcome = await self._propose(LOCK_KEYSPACE_DEF, key, b"",
                                              Acquire(owner, ttl_ms), idempotency)
                if isinstance(outcome, paxos.Done):
                    self.grants += 1
                    state = decode_lock(outcome.value)
                    return Lease(0, name, owner, state.token, ttl_ms, outcome.version,
                                 outcome.duplicate)
                assert isinstance(outcome, paxos.Conflict), outcome
                state = decode_lock(outcome.value)
                self._expiry_ms[key] = state.expires_at_ms
                remaining_s = deadline - loop.time()
                if remaining_s <= 0:
                    self.refusals += 1
                    left_ms = max(0, state.expires_at_ms - _wall_ms())
                    raise KvError("lock_held", f"lock {name!r} is held (token {state.token}, "
                                  f"its lease ends in {left_ms} ms unless renewed); "
                                  + ("wait for it with a wait time" if wait_ms == 0 else
                                     f"waited {wait_ms} ms"))
                idempotency = b""
                if let_go is None:
                    # Hear of a release made through another node; then try once more
                    # before waiting, in case it came in between.
                    let_go = self._hold_key(LOCK_KEYSPACE_DEF, key)
                    continue
                expiry_s = (max(0.0, (state.expires_at_ms - _wall_ms()) / 1000)
                            + EXPIRY_MARGIN_S)
                # A waiter that was woken and lost the race keeps its place at the front.
                woken = await self._wait_change(key, min(remaining_s, expiry_s), woken)
        finally:
            if let_go is not None:
                let_go()
            self._acquiring[key] -= 1
            if not self._acquiring[key]:
                del self._acquiring[key]
                self._expiry_ms.pop(key, None)
                self._missed.discard(key)
                self._queues.pop(key, None)

    async def _wait_change(self, key: bytes, timeout_s: float, front: bool) -> bool:
        """Wait until the lock is freed (True) or ``timeout_s`` passes (False)."""
        if key in self._missed:
            self._missed.discard(key)
            return True
        if self._waiting >= WAITERS_MAX:
            raise KvError("overloaded", f"{WAITERS_MAX} lock acquires are waiting on this "
                          "node; retry later or on another node")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._queues.setdefault(key, collections.deque())
        if front:
            queue.appendleft(future)
        else:
            queue.append(future)
        self._waiting += 1
        try:
            await asyncio.wait_for(future, timeout_s)
            return True
        except TimeoutError:
            return False
        finally:
            self._waiting -= 1
            if not future.done():
                future.cancel()
            with contextlib.suppress(ValueError):
                queue.remove(future)  # timed out or cancelled: not woken, still queued

    async def renew(self, name: str, owner: str, token: int, ttl_ms: int,
                    idempotency: bytes = b"") -> Lease:
        key = _check(name, owner, ttl_ms)
        self._clock_check()
        outcome = await self._propose(LOCK_KEYSPACE_DEF, key, b"", Renew(owner, token, ttl_ms),
                                      idempotency)
        if isinstance(outcome, paxos.Done):
            return Lease(0, name, owner, token, ttl_ms, outcome.version, outcome.duplicate)
        assert isinstance(outcome, paxos.Conflict), outcome
        raise _lost(name, token, decode_lock(outcome.value), "renew")

    async def release(self, name: str, owner: str, token: int,
                      idempotency: bytes = b"") -> int:
        key = _check(name, owner)
        outcome = await self._propose(LOCK_KEYSPACE_DEF, key, b"", Release(owner, token),
                                      idempotency)
        if isinstance(outcome, paxos.Done):
            return outcome.version
        assert isinstance(outcome, paxos.Conflict), outcome
        raise _lost(name, token, decode_lock(outcome.value), "release")

    async def status(self, name: str) -> LockInfo:
        key = _lock_key(name)
        outcome = await self._propose(LOCK_KEYSPACE_DEF, key, b"", Read(), b"")
        assert isinstance(outcome, paxos.Done), outcome
        state = decode_lock(outcome.value)
        left_ms = max(0, state.expires_at_ms - _wall_ms())
        held = bool(state.holder) and left_ms > 0
        return LockInfo(0, name, held, state.holder if held else "", state.token,
                        left_ms if held else 0, outcome.version)

    async def check_fence(self, lock: str, token: int) -> None:
        """Refuse (``fenced``) a write under ``token`` of ``lock`` if the lock has granted
        a newer token, or never granted this one. A linearizable read of the lock."""
        key = _lock_key(lock)
        outcome = await self._propose(LOCK_KEYSPACE_DEF, key, b"", Read(), b"")
        assert isinstance(outcome, paxos.Done), outcome
        state = decode_lock(outcome.value)
        if state.token > token:
            self.fenced += 1
            raise KvError("fenced", f"lock {lock!r} has granted token {state.token} since "
                          f"token {token}: this write comes from a holder whose lease "
                          "ended; it was not applied")
        if state.token < token:
            self.fenced += 1
            raise KvError("fenced", f"lock {lock!r} never granted token {token} (its newest "
                          f"is {state.token}); the write was not applied")

    def counters(self) -> dict[str, int]:
        return {"lock_grants": self.grants, "lock_refusals": self.refusals,
                "lock_fenced_writes": self.fenced, "lock_waiting": self._waiting}


def _lock_key(name: str) -> bytes:
    """The lock's partition key in ``system_locks``, or ``bad_request``."""
    key = name.encode()
    if not name or len(key) > LOCK_NAME_BYTES_MAX:
        raise KvError("bad_request", f"a lock name must have 1..{LOCK_NAME_BYTES_MAX} bytes "
                      f"(got {len(key)})")
    try:
        check_key(key, b"")
    except KeyError_ as exc:
        raise KvError("bad_request", str(exc)) from None
    return key


def _check(name: str, owner: str, ttl_ms: int | None = None) -> bytes:
    """``_lock_key`` of a lease's lock, then its owner (and TTL if given) checked."""
    key = _lock_key(name)
    if not owner or len(owner.encode()) > OWNER_BYTES_MAX:
        raise KvError("bad_request", f"a lock owner id must have 1..{OWNER_BYTES_MAX} bytes")
    if ttl_ms is not None and not LEASE_TTL_MS_MIN <= ttl_ms <= LEASE_TTL_MS_MAX:
        raise KvError("bad_request", f"ttl {ttl_ms} ms is out of range "
                      f"{LEASE_TTL_MS_MIN}..{LEASE_TTL_MS_MAX} ms")
    return key


def _lost(name: str, token: int, state: LockState, what: str) -> KvError:
    now = "held" if state.held(_wall_ms()) else "free"
    return KvError("lease_lost", f"cannot {what} lease {token} of lock {name!r}: it is no "
                   f"longer the current lease (the lock's newest token is {state.token}, "
                   f"{now}); stop using it")
