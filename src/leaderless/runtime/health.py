"""The self-health monitor: a node measures itself every ``interval_s`` and says so.

Each round reads free space of the data dir's filesystem and memory use (``obs.system``),
the store's failed writes and syncs and its corrupt reads (``StoreErrors``, a thin wrapper
around the node's store, so every caller's failure is counted in one place), how late the
monitor's own timer fired (event-loop lag) and this node's clock skew against its peers
(estimated by the membership's probes, ``core.clock_offsets``, handed in by the node).
``core.health.HealthRule`` turns them into a state; a change is published at once
(``publish``: the node puts it in its gossiped ``NodeMeta.health``) and logged, so every
member learns it within a gossip round.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from leaderless.config import HealthConfig
from leaderless.core.health import (
    HEALTHY,
    HealthReadings,
    HealthRule,
    HealthState,
    HealthStatus,
    short_reason,
)
from leaderless.obs.system import SystemSampler
from leaderless.runtime.logs import NodeLogger
from leaderless.storage.encrypted import DecryptionError
from leaderless.storage.store import StorageError, Store, Write


class StoreErrors:
    """A ``Store`` that counts its own failures for the health monitor: failed writes and
    syncs (the disk refused data) and corrupt reads (RocksDB's checksum failures, or a
    record that fails authentication under encryption at rest). It changes nothing else:
    every error is re-raised to the caller as before."""

    def __init__(self, store: Store) -> None:
        self.inner = store
        self.write_errors = 0
        self.sync_errors = 0
        self.read_errors = 0
        self.corrupt_reads = 0

    def get(self, key: bytes) -> bytes | None:
        try:
            return self.inner.get(key)
        except StorageError as exc:
            self._read_failed(exc)
            raise

    def write(self, batch: Sequence[Write]) -> None:
        try:
            self.inner.write(batch)
        except StorageError:
            self.write_errors += 1
            raise

    def sync(self) -> None:
        try:
            self.inner.sync()
        except StorageError:
            self.sync_errors += 1
            raise

    def scan(self, start: bytes, end: bytes | None = None, *, limit: int | None = None,
             reverse: bool = False) -> Iterator[tuple[bytes, bytes]]:
        try:
            yield from self.inner.scan(start, end, limit=limit, reverse=reverse)
        except StorageError as exc:
            self._read_failed(exc)
            raise

    def close(self) -> None:
        self.inner.close()

    def _read_failed(self, error: StorageError) -> None:
        self.read_errors += 1
        if isinstance(error, DecryptionError) or "corrupt" in str(error).lower():
            self.corrupt_reads += 1


class HealthMonitor:
    """Checks this node every ``config.interval_s`` once started; ``state`` is the latest
    verdict, ``readings()`` the numbers behind it, ``clock_offsets()`` the peers' offsets."""

    def __init__(self, config: HealthConfig, system: SystemSampler, *,
                 publish: Callable[[HealthState], None], log: NodeLogger,
                 store_errors: StoreErrors | None = None,
                 clock_offsets: Callable[[], Mapping[str, float]] | None = None) -> None:
        self.config = config
        self.system = system
        self.store_errors = store_errors
        self._publish = publish
        self._log = log
        self._rule = HealthRule(config.thresholds)
        self._clock_offsets = clock_offsets
        self._clock_skew: Callable[[], float | None] | None = None
        self.state: HealthState = HEALTHY
        """The latest verdict (what the node gossips)."""
        self._readings = HealthReadings()
        self._leaving: str | None = None
        self._task: asyncio.Task[None] | None = None

    # -- what the node, doctor, metrics and the dashboard read -------------------------

    def readings(self) -> dict[str, Any]:
        """The latest measurements, by name (None: not measurable on this machine)."""
        r = self._readings
        errors = self.store_errors
        return {
            "disk_free_pct": r.disk_free_pct,
            "storage_errors": r.storage_errors,
            "storage_write_errors": errors.write_errors if errors else 0,
            "storage_sync_errors": errors.sync_errors if errors else 0,
            "corrupt_reads": r.corrupt_reads,
            "loop_lag_ms": round(r.loop_lag_ms, 3),
            "memory_used_pct": r.memory_used_pct,
            "clock_skew_ms": r.clock_skew_ms,
        }

    def clock_offsets(self) -> dict[str, float]:
        """Per peer: the peer's clock minus this node's, in ms (``core.clock_offsets``;
        empty until a peer was probed)."""
        return dict(self._clock_offsets()) if self._clock_offsets is not None else {}

    def set_clock_offsets(self, source: Callable[[], Mapping[str, float]]) -> None:
        """Where the per-peer clock offsets come from (the membership's probes)."""
        self._clock_offsets = source

    def set_clock_skew(self, source: Callable[[], float | None]) -> None:
        """Where this node's own skew comes from: how far its clock is ahead of its
        peers' (``core.clock_offsets.ClockOffsets.skew_ms``), judged against the bound."""
        self._clock_skew = source

    def leave(self, reason: str) -> HealthState:
        """Pin the state to ``leaving`` (passive failover: an unrecoverable local fault);
        no later reading undoes it. Published at once."""
        self._leaving = short_reason(reason)
        self._set(HealthState(HealthStatus.LEAVING, self._leaving))
        return self.state

    # -- the loop ---------------------------------------------------------------------------

    def start(self) -> None:
        """Check once now (so a node that starts on a full disk is read-only at once),
        then every ``interval_s``."""
        self.check()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.config.interval_s
        while True:
            due = loop.time() + interval
            await asyncio.sleep(interval)
            self.check(loop_lag_ms=max(0.0, (loop.time() - due) * 1000))

    def check(self, loop_lag_ms: float = 0.0) -> HealthState:
        """One round: measure, judge, publish the state if it changed."""
        sample = self.system.sample()
        disk_free_pct = None
        if sample.disk_usage_available:
            usable = sample.disk_used_bytes + sample.disk_free_bytes
            disk_free_pct = 100.0 * sample.disk_free_bytes / usable if usable else 0.0
        errors = self.store_errors
        self._readings = HealthReadings(
            disk_free_pct=disk_free_pct,
            storage_errors=errors.write_errors + errors.sync_errors if errors else 0,
            corrupt_reads=errors.corrupt_reads if errors else 0,
            loop_lag_ms=loop_lag_ms,
            memory_used_pct=sample.memory_used_pct if sample.memory_total_bytes else None,
            clock_skew_ms=self._clock_skew() if self._clock_skew is not None else None)
        state = self._rule.assess(self._readings)
        if self._leaving is None:
            self._set(state)
        return self.state

    def _set(self, state: HealthState) -> None:
        if state == self.state:
            return
        old, self.state = self.state, state
        log = self._log.info if state.status is HealthStatus.HEALTHY else self._log.warning
        log("health_changed", status=state.status.label, reason=state.reason,
            was=old.status.label, was_reason=old.reason)
        self._publish(state)
