"""Group commit: many batches written during one event-loop turn share one ``Store.sync``.

Policy ``always`` (the default): ``commit`` writes the batch to the store at once (visible
to reads) and calls ``done`` only after a ``sync`` that covers it; the node acknowledges
nothing before that. Every batch committed during one loop turn waits for the same sync,
scheduled with ``loop.call_soon`` once per turn; batches committed while a sync is in
flight wait for the next one, which starts as soon as the current one finishes -- so the
groups grow by themselves under load.

Where the sync runs (``sync_in_thread``): by default inline on the loop, at the end of the
turn. RocksDB's ``flush_wal`` does release the GIL, but measured (bench/storage.py,
docs/storage.md) a background thread loses: when the loop is busy the sync thread waits a
GIL switch interval at each hand-back, and acknowledgements slowed from ~40k/s to a few
hundred per second; on an idle loop it was ~6 % slower than inline. ``sync_in_thread=True``
runs ``store.sync`` in one ThreadPoolExecutor thread (the loop keeps serving reads while
the disk works) for stores whose sync is long and the loop mostly idle.

Policy ``interval``: ``done(None)`` is called right after the write and a timer syncs every
``interval_ms``. A kill -9 of the process loses nothing (the OS holds the written data); a
crash of the machine may lose the writes of the last interval, although acknowledged.

Storage errors are sticky: after a write or sync fails, every waiting ``done`` gets the
error, ``on_error`` is called once, and every later ``commit`` fails at once. An fsync that
failed cannot be retried safely (the kernel may have dropped the dirty pages), so the node
should stop serving writes and restart (see docs/storage.md); ``runtime.failover`` then
steps the node out of the cluster. A failed sync reaches ``on_error`` as ``SyncFailedError``.

Test-only fault hook: ``LEADERLESS_FAULT_FSYNC_FAIL_AFTER=N`` (read once when the node
starts, logged at warning) makes every sync after the first N successful ones fail with
EIO, to drive a node through passive failover in tests. Never set it in production.

All methods must be called on the event loop thread.
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import errno
import os
import time
from collections.abc import Callable, Mapping, Sequence

from leaderless.runtime.faults import fault_hook_int
from leaderless.storage.store import StorageError, Store, Write

POLICIES = ("always", "interval")
Done = Callable[[StorageError | None], None]


SYNC_BOUNDS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
"""Bucket bounds of the sync-latency histogram: an fsync takes ~0.1 ms on a fast NVMe
drive, a few ms on cloud disks, and a stalling disk shows in the top buckets."""


FAULT_FSYNC_FAIL_AFTER_ENV = "LEADERLESS_FAULT_FSYNC_FAIL_AFTER"
"""Test-only switch: after this many successful syncs, every sync fails with EIO."""


class SyncFailedError(StorageError):
    """The store's fsync failed: what it was to make durable may be lost, and a retry
    cannot tell (the kernel may have dropped the dirty pages), so nothing it covered is
    acknowledged and the store takes no more writes."""


def fsync_fault_from_env(environ: Mapping[str, str] | None = None) -> int | None:
    """The test-only fault hook's N, or None when it is not set; ValueError when it is
    not a non-negative integer."""
    return fault_hook_int(os.environ if environ is None else environ,
                          FAULT_FSYNC_FAIL_AFTER_ENV, 0, 2**63 - 1,
                          "the number of syncs to let succeed")


class GroupCommit:
    def __init__(self, store: Store, policy: str = "always", interval_ms: float = 100.0, *,
                 on_error: Callable[[StorageError], None], sync_in_thread: bool = False,
                 fault_fsync_fail_after: int | None = None) -> None:
        if policy not in POLICIES:
            raise ValueError(f"fsync policy {policy!r} is not one of {POLICIES}")
        if not interval_ms > 0:
            raise ValueError(f"fsync interval must be > 0 ms, not {interval_ms}")
        self.store = store
        self.policy = policy
        self.interval_s = interval_ms / 1000.0
        self._on_error = on_error
        self._executor = (concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="group-commit") if sync_in_thread else None)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: list[Done] = []  # waiting for the next sync (policy always)
        self._pending_writes = 0
        self._dirty = False  # written since the last sync started
        self._sync_scheduled = False
        self._in_flight: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._error: StorageError | None = None
        self._closed = False
        self._fault_fsync_fail_after = fault_fsync_fail_after
        """Test-only (FAULT_FSYNC_FAIL_AFTER_ENV): syncs allowed to succeed, or None."""
        self._fault_syncs_done = 0
        # Metrics (read by obs/): totals and the shape of the last group.
        self.commits = 0
        """Batches committed."""
        self.writes = 0
        """Rows (puts and deletes) written."""
        self.syncs = 0
        """Syncs completed."""
        self.last_batch_commits = 0
        """Batches covered by the last sync."""
        self.last_batch_writes = 0
        """Rows covered by the last sync."""
        self.group_sizes: dict[int, int] = {}
        """Histogram of batches per sync, bucketed to the next power of two (1, 2, 4, ...)."""
        self.sync_bounds_s = SYNC_BOUNDS_S
        self.sync_counts = [0] * (len(SYNC_BOUNDS_S) + 1)
        """Histogram of sync durations: counts per bound of ``sync_bounds_s``, then +Inf."""
        self.sync_seconds = 0.0
        """Total time spent in syncs."""
        self.sync_failures = 0
        """Syncs that failed (at most one: a failed sync makes the store fail for good)."""

    @property
    def failed(self) -> StorageError | None:
        return self._error

    def commit(self, batch: Sequence[Write], done: Done) -> None:
        """Write ``batch`` now; call ``done(None)`` once it is durable under the policy,
        or ``done(error)``. ``done`` may run before ``commit`` returns (policy interval,
        or when the store has already failed)."""
        if self._closed:
            raise RuntimeError("GroupCommit.commit after close")
        if self._error is not None:
            done(self._error)
            return
        loop = self._running_loop()
        try:
            self.store.write(batch)
        except StorageError as exc:
            self._fail(exc, [done])
            return
        self.commits += 1
        self.writes += len(batch)
        self._dirty = True
        if self.policy == "interval":
            done(None)
            if self._timer is None:
                self._timer = loop.call_later(self.interval_s, self._on_timer)
            return
        self._pending.append(done)
        self._pending_writes += len(batch)
        if not self._sync_scheduled and self._in_flight is None:
            self._sync_scheduled = True
            loop.call_soon(self._start_sync)

    async def close(self) -> None:
        """Finish the sync in flight, sync what is left, and stop the thread."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        await self._wait_in_flight()
        if self._error is None and (self._dirty or self._pending):
            self._start_sync()
            await self._wait_in_flight()
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    async def _wait_in_flight(self) -> None:
        while self._in_flight is not None:
            await asyncio.wait([self._in_flight])
            # Its done callback (``_sync_done``) was scheduled first; let it run.
            await asyncio.sleep(0)

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def _on_timer(self) -> None:
        self._timer = None
        if self._closed or self._error is not None:
            return
        if self._dirty and self._in_flight is None:
            self._start_sync()
        # Re-arm only while there is something to sync, so an idle node does not wake up.
        if self._dirty or self._in_flight is not None:
            self._timer = self._running_loop().call_later(self.interval_s, self._on_timer)

    def _start_sync(self) -> None:
        self._sync_scheduled = False
        if self._in_flight is not None or self._error is not None:
            return  # the sync in flight finishes, then starts the next one
        if not self._dirty and not self._pending:
            return
        group, self._pending = self._pending, []
        writes, self._pending_writes = self._pending_writes, 0
        self._dirty = False
        began = time.perf_counter()
        if self._executor is None:
            try:
                self._sync()
            except Exception as exc:
                self._sync_done(exc, group, writes, began)
                return
            self._sync_done(None, group, writes, began)
            return
        fut = asyncio.ensure_future(
            self._running_loop().run_in_executor(self._executor, self._sync))
        self._in_flight = fut
        fut.add_done_callback(lambda f: self._sync_done(f.exception(), group, writes, began))

    def _sync(self) -> None:
        """``store.sync``, or the test-only fault once its N successful syncs are done."""
        after = self._fault_fsync_fail_after
        if after is not None and self._fault_syncs_done >= after:
            raise OSError(errno.EIO, f"{os.strerror(errno.EIO)} (test fault "
                          f"{FAULT_FSYNC_FAIL_AFTER_ENV}={after})")
        self.store.sync()
        self._fault_syncs_done += 1

    def _sync_done(self, exc: BaseException | None, group: list[Done], writes: int,
                   began: float) -> None:
        self._in_flight = None
        took_s = time.perf_counter() - began
        self.sync_seconds += took_s
        self.sync_counts[bisect.bisect_left(self.sync_bounds_s, took_s)] += 1
        if exc is not None:
            self.sync_failures += 1
            self._fail(SyncFailedError(f"fsync failed: {exc}"), group)
            return
        if self._error is not None:
            # A later write failed while this sync ran: the store is in an unknown state,
            # so acknowledge nothing more (a client retry is safe; a false ack is not).
            for done in group:
                done(self._error)
            return
        self.syncs += 1
        self.last_batch_commits = len(group)
        self.last_batch_writes = writes
        if group:
            bucket = 1 << (len(group) - 1).bit_length()
            self.group_sizes[bucket] = self.group_sizes.get(bucket, 0) + 1
        for done in group:
            done(None)
        if self._pending and not self._closed:
            self._start_sync()

    def _fail(self, error: StorageError, group: list[Done]) -> None:
        first = self._error is None
        if first:
            self._error = error
        waiting, self._pending = group + self._pending, []
        self._pending_writes = 0
        for done in waiting:
            done(self._error)
        if first:
            self._on_error(error)
