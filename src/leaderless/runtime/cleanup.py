"""Cleanup: a node deletes the rows of the ranges it no longer holds.

After a ring change (a node joined, a capacity grew) old owners keep rows of ranges that
moved away: nothing reads them there any more, they only cost disk (and make anti-entropy
compare what it need not). Cleanup deletes, for every keyspace, the data rows (``b"d"``)
and the Paxos acceptor states (``b"p"``) whose token is outside
``Placement.retained(me, n)``: the ranges this node serves or may serve in any ring a
change in progress can reach. It never touches the schema keyspace (every node holds it
whole), hints, or keyspaces this node holds no definition of.

Rules:

- never while the ring changes (``Placement.changing``: a joiner or leaver, a capacity
  change, an old ring still within ``settle_s``): a range that looks lost may come back,
  and a fetch may be writing it. A pass that finds the ring changed between two slices
  stops; the next one starts over once the ring is stable again.
- in slices of ``KEYS_PER_SLICE`` keys, each committed through the group commit and
  awaited before the next (so the disk paces it and the node keeps serving), the Merkle
  forest updated for every data row deleted (as the tombstone purge does).
- automatically once the placement has been unchanged for ``ring.cleanup_grace_s``
  (checked every ``CHECK_INTERVAL_S``) and something is to be deleted; at once on
  ``leaderless node cleanup``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from leaderless.core.cells import Cell, decode_cell
from leaderless.core.keys import DATA_PREFIX, TOKEN_MAX, keyspace_prefix, prefix_end, token_key
from leaderless.core.paxos import PAXOS_PREFIX
from leaderless.core.placement import Placement
from leaderless.core.ring import TokenRange
from leaderless.core.schema import SYSTEM_KEYSPACE
from leaderless.runtime.logs import NodeLogger
from leaderless.runtime.ring_changes import SYSTEM_REPLICATION
from leaderless.storage.store import StorageError, Store, Write

KEYS_PER_SLICE = 1000
"""Keys read (and deleted) per slice: about a millisecond of the loop, so foreground
requests wait at most that long behind one."""
CHECK_INTERVAL_S = 5.0
"""How often the automatic cleanup looks whether the ring has been stable long enough."""


class CleanupRefusedError(Exception):
    """Cleanup cannot run now (the message says why and when it can)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Bound:
    """Store keys [lo, hi) of one keyspace to delete (data rows or Paxos states)."""

    keyspace: str
    lo: bytes
    hi: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class CleanupSlice:
    writes: list[Write]
    """The deletions to commit."""
    deleted: list[tuple[str, bytes, Cell]]
    """(keyspace, store key, cell) of each deleted data row, for the Merkle forest."""
    done: bool
    """The pass has reached the end of its bounds."""


def dropped_intervals(retained: Iterable[TokenRange]) -> list[tuple[int, int]]:
    """The token intervals ``[lo, hi]`` (inclusive) outside every range of ``retained``
    (ring ranges ``(start, end]``), in order."""
    kept: list[tuple[int, int]] = []
    for rng in retained:
        if rng.start == rng.end:
            return []  # the whole ring
        if rng.start < rng.end:
            kept.append((rng.start + 1, rng.end))
        else:
            if rng.start < TOKEN_MAX:
                kept.append((rng.start + 1, TOKEN_MAX))
            kept.append((0, rng.end))
    kept.sort()
    dropped: list[tuple[int, int]] = []
    at = 0  # the first token not yet known to be kept or dropped
    for lo, hi in kept:
        if lo > at:
            dropped.append((at, lo - 1))
        at = max(at, hi + 1)
        if at > TOKEN_MAX:
            return dropped
    dropped.append((at, TOKEN_MAX))
    return dropped


def keyspace_bounds(keyspace: str, intervals: Iterable[tuple[int, int]]) -> list[Bound]:
    """Store key bounds of ``intervals`` in ``keyspace``: data rows, then Paxos states."""
    end = prefix_end(keyspace_prefix(keyspace))
    data = [Bound(keyspace, token_key(keyspace, lo),
                  token_key(keyspace, hi + 1) if hi < TOKEN_MAX else end)
            for lo, hi in intervals]
    paxos = [Bound(keyspace, PAXOS_PREFIX + b.lo, PAXOS_PREFIX + b.hi) for b in data]
    return data + paxos


def cleanup_plan(placement: Placement, me: str, replication: Mapping[str, int]
                 ) -> list[Bound]:
    """Every store key range ``me`` may delete, over the keyspaces and their replication
    factor (the schema keyspace never). Raises CleanupRefusedError while the ring
    changes or when ``me`` is not on it."""
    if placement.changing:
        raise CleanupRefusedError(
            "the ring is changing (a member is joining, leaving or changing its capacity, "
            "or the last change is younger than ring.settle_s): a range that looks moved "
            "away may still be needed; run cleanup once `leaderless ring status` shows no "
            "change in progress")
    if me not in placement.current.nodes:
        raise CleanupRefusedError("this node is not on the ring (it holds no tokens in its "
                                  "view yet): nothing can be judged moved away")
    bounds: list[Bound] = []
    for keyspace, n in sorted(replication.items()):
        if keyspace == SYSTEM_KEYSPACE:
            continue
        intervals = dropped_intervals(placement.retained(me, n))
        bounds.extend(keyspace_bounds(keyspace, intervals))
    return bounds


def held_replication(kv: Any) -> dict[str, int]:
    """Keyspace -> replication factor of what a node may hold: the user keyspaces it has
    a definition of and the strong system keyspaces (``kv``: its ``KvNode``)."""
    result = {d.name: d.replication for d in kv.local_definitions()}
    result.update(SYSTEM_REPLICATION)
    result.pop(SYSTEM_KEYSPACE, None)
    return result


def has_rows(store: Store, bounds: Iterable[Bound]) -> bool:
    """Whether any bound holds a key (a cheap probe: one key per bound at most)."""
    return any(next(iter(store.scan(b.lo, b.hi, limit=1)), None) is not None for b in bounds)


class CleanupPass:
    """One walk over a plan's bounds, a slice at a time (``next_slice``)."""

    def __init__(self, bounds: list[Bound]) -> None:
        self._bounds = bounds
        self._at = 0
        self._cursor: bytes | None = None

    def next_slice(self, store: Store, keys_max: int = KEYS_PER_SLICE) -> CleanupSlice:
        """The deletions of the next ``keys_max`` keys at most (read now: commit them
        before the next call)."""
        assert keys_max > 0
        writes: list[Write] = []
        deleted: list[tuple[str, bytes, Cell]] = []
        while self._at < len(self._bounds) and len(writes) < keys_max:
            bound = self._bounds[self._at]
            want = keys_max - len(writes)
            got = 0
            last = b""
            for key, raw in store.scan(self._cursor or bound.lo, bound.hi, limit=want):
                got += 1
                last = key
                writes.append((key, None))
                if key.startswith(DATA_PREFIX):
                    deleted.append((bound.keyspace, key, decode_cell(raw)))
            if got < want:
                self._at += 1
                self._cursor = None
            else:
                self._cursor = last + b"\x00"
        return CleanupSlice(writes, deleted, self._at >= len(self._bounds))


class Cleanup:
    """This node's cleanup: on request and automatically (``start``)."""

    def __init__(self, kv: Any, name: str, *, grace_s: float,
                 replication: Callable[[], Mapping[str, int]],
                 check_interval_s: float = CHECK_INTERVAL_S) -> None:
        """``kv``: the node's ``KvNode`` (``placement``, ``store``, ``forest``, ``commit``);
        ``replication``: keyspace -> replication factor of what the node may hold."""
        self._kv = kv
        self.name = name
        self.grace_s = grace_s
        self._replication = replication
        self._check_interval_s = check_interval_s
        self.log = NodeLogger(name, "cleanup")
        self.deleted_rows = 0
        """Rows deleted (durably) since the node started."""
        self.last_finished_at: float | None = None
        self.error = ""
        self._pass: asyncio.Task[int] | None = None
        self._auto: asyncio.Task[None] | None = None
        self._shape: tuple[object, ...] | None = None
        self._stable_since = 0.0
        self._cleaned: tuple[object, ...] | None = None
        """The shape of the last complete pass (or of a probe that found nothing)."""

    @property
    def running(self) -> bool:
        return self._pass is not None and not self._pass.done()

    def start(self) -> None:
        self._auto = asyncio.get_running_loop().create_task(self._auto_loop())

    def close(self) -> None:
        for task in (self._auto, self._pass):
            if task is not None:
                task.cancel()

    # -- requests ------------------------------------------------------------------------

    def request(self) -> None:
        """Start a pass now (``leaderless node cleanup``); nothing if one runs. Raises
        CleanupRefusedError while the ring changes."""
        if self.running:
            return
        placement = self._kv.placement
        replication = dict(self._replication())
        bounds = cleanup_plan(placement, self.name, replication)
        self._begin(bounds, _shape(placement, replication), "requested")

    def _begin(self, bounds: list[Bound], shape: tuple[object, ...], why: str) -> None:
        self.error = ""
        self.log.info("cleanup_started", why=why, ranges=len(bounds))
        self._pass = asyncio.get_running_loop().create_task(self._run(bounds, shape))

    # -- the pass ------------------------------------------------------------------------

    async def _run(self, bounds: list[Bound], shape: tuple[object, ...]) -> int:
        walk = CleanupPass(bounds)
        deleted = 0
        loop = asyncio.get_running_loop()
        while True:
            replication = dict(self._replication())
            if _shape(self._kv.placement, replication) != shape:
                self.error = ("the ring changed during cleanup; it runs again once the ring "
                              "has been stable for ring.cleanup_grace_s (or run `leaderless "
                              "node cleanup` again)")
                self.log.info("cleanup_stopped", deleted_rows=deleted, reason="ring changed")
                return deleted
            try:
                part = walk.next_slice(self._kv.store)
            except StorageError as exc:
                self.error = f"storage: {exc}"
                self._kv._storage_failed(exc)
                return deleted
            if part.writes:
                for keyspace, key, cell in part.deleted:
                    self._kv.forest.update(keyspace, key, cell, None)
                durable: asyncio.Future[StorageError | None] = loop.create_future()
                self._kv.commit.commit(part.writes, lambda e, f=durable: (
                    None if f.done() else f.set_result(e)))
                error = await durable
                if error is not None:
                    self.error = f"storage: {error}"
                    return deleted
                deleted += len(part.writes)
                self.deleted_rows += len(part.writes)
            if part.done:
                break
            await asyncio.sleep(0)  # let foreground requests in between slices
        self._cleaned = shape
        self.last_finished_at = time.time()
        self.log.info("cleanup_done", deleted_rows=deleted)
        return deleted

    # -- automatic -----------------------------------------------------------------------

    async def _auto_loop(self) -> None:
        while True:
            await asyncio.sleep(self._check_interval_s)
            try:
                self.check(asyncio.get_running_loop().time())
            except StorageError as exc:
                self._kv._storage_failed(exc)
                return
            except Exception as exc:  # a bug must not stop the loop for good
                self.log.error("cleanup_check_failed", error=repr(exc))

    def check(self, now: float) -> None:
        """Start a pass if the ring has been stable for ``grace_s`` since it last changed
        and rows outside this node's ranges remain (the automatic cleanup calls it every
        ``check_interval_s``; ``now``: the loop's clock)."""
        placement = self._kv.placement
        replication = dict(self._replication())
        shape = _shape(placement, replication)
        if shape != self._shape:
            self._shape = shape
            self._stable_since = now
            return
        if (placement.changing or self.running or shape == self._cleaned
                or now - self._stable_since < self.grace_s):
            return
        try:
            bounds = cleanup_plan(placement, self.name, replication)
        except CleanupRefusedError:
            return
        if not has_rows(self._kv.store, bounds):
            self._cleaned = shape
            return
        self._begin(bounds, shape, f"the ring has been stable for {self.grace_s:g} s")


def _shape(placement: Placement, replication: Mapping[str, int]) -> tuple[object, ...]:
    """What a plan depends on: the rings (and whether they change) and the keyspaces."""
    return (placement.digest(), placement.changing,
            tuple(sorted(placement.current.nodes.items())),
            tuple(sorted(replication.items())))
