"""A node's judgement of its own health: readings in, a state with a reason out.

``runtime.health.HealthMonitor`` measures (free disk, storage errors, corrupt reads, event
loop lag, memory, clock offset) every ``interval_s`` and hands the numbers to
``HealthRule.assess``, which is pure: the same readings and history give the same state, in
a node, the simulator or a unit test. The state is gossiped in ``NodeMeta.health`` so every
member knows every member's health: coordinators send no writes to a ``READ_ONLY`` replica
(its writes become hints) and the node itself refuses writes with code ``read_only``.

Every threshold has hysteresis: a state is entered below a threshold and left only once the
reading is clear of it by a margin, so a disk hovering at the stop-writes line does not make
the node flap between read-only and healthy (each flip is an alive update every member
receives).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Annotated

import msgspec

from leaderless.core.hlc import MAX_OFFSET_MS_DEFAULT

REASON_BYTES_MAX = 64
"""A reason is a short phrase for a table and an error message ("disk 3.1% free
(stop-writes below 5%)"); it rides in every alive update, so it must stay small."""
DISK_HYSTERESIS_PCT = 2.0
"""Points of free disk above a threshold before its state is left: a node read-only below
5 % free becomes writable again at 7 %."""
LOOP_LAG_HYSTERESIS = 0.5
"""Event-loop lag must fall below this fraction of its threshold to clear its warning."""
MEMORY_HYSTERESIS_PCT = 5.0
"""Points of memory use below the threshold before its warning clears."""
CLOCK_HYSTERESIS = 0.8
"""A clock offset must fall below this fraction of the bound to clear its warning."""


class HealthStatus(enum.IntEnum):
    """What a node says of itself. Values are on the wire: append-only."""

    HEALTHY = 0
    DEGRADED = 1
    """Working, with a problem an operator should look at (the reason says which)."""
    READ_ONLY = 2
    """Serves reads, refuses writes (its disk is nearly full); replicas' writes for it
    become hints elsewhere and are replayed when it is healthy again."""
    LEAVING = 3
    """Stepping out of the cluster on an unrecoverable local fault."""

    @property
    def label(self) -> str:
        """The name operators see: healthy, degraded, read-only, leaving."""
        return self.name.lower().replace("_", "-")


Reason = Annotated[str, msgspec.Meta(max_length=REASON_BYTES_MAX)]


class HealthState(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True):
    """A node's health as gossiped in ``NodeMeta.health``: a few bytes on the wire."""

    status: HealthStatus = HealthStatus.HEALTHY
    reason: Reason = ""
    """Why, in a short phrase; empty when healthy."""

    def __str__(self) -> str:
        label = self.status.label
        return f"{label} ({self.reason})" if self.reason else label


HEALTHY = HealthState()


def short_reason(text: str) -> str:
    """``text`` cut to REASON_BYTES_MAX bytes of UTF-8 (on a character boundary)."""
    data = text.encode()
    if len(data) <= REASON_BYTES_MAX:
        return text
    return data[:REASON_BYTES_MAX - 3].decode(errors="ignore") + "..."


@dataclasses.dataclass(frozen=True)
class HealthThresholds:
    """The limits a node judges itself by (the ``[health]`` config table)."""

    disk_warn_free_pct: float = 10.0
    """Below this much free space (percent of the data dir's filesystem): degraded."""
    disk_stop_writes_free_pct: float = 5.0
    """Below this much free space: read-only, so the disk never fills up under RocksDB (a
    full disk fails a write or fsync, which stops the node)."""
    loop_lag_warn_ms: float = 500.0
    """A timer firing this late means the event loop is stalled: probes, acks and client
    requests all wait that long."""
    memory_warn_pct: float = 90.0
    """Machine memory in use above this: degraded (the kernel may soon kill a process)."""
    clock_skew_max_ms: float = MAX_OFFSET_MS_DEFAULT
    """Clock offset from the peers (median) beyond this: degraded. The HLC bound, which
    is also ``core.locks.CLOCK_SKEW_MAX_MS``."""

    def __post_init__(self) -> None:
        problems = [
            (0 <= self.disk_stop_writes_free_pct < 100,
             "disk_stop_writes_free_pct must be in [0, 100)"),
            (self.disk_stop_writes_free_pct <= self.disk_warn_free_pct < 100,
             "disk_warn_free_pct must be in [disk_stop_writes_free_pct, 100)"),
            (self.loop_lag_warn_ms > 0, "loop_lag_warn_ms must be > 0"),
            (0 < self.memory_warn_pct <= 100, "memory_warn_pct must be in (0, 100]"),
            (self.clock_skew_max_ms > 0, "clock_skew_max_ms must be > 0"),
        ]
        for ok, message in problems:
            if not ok:
                raise ValueError(message)


@dataclasses.dataclass(frozen=True)
class HealthReadings:
    """One round of measurements. None: not measurable here (nothing is concluded)."""

    disk_free_pct: float | None = None
    """Free space of the data dir's filesystem, as ``df`` counts it (for unprivileged use)."""
    storage_errors: int = 0
    """Failed store writes and syncs since the node started."""
    corrupt_reads: int = 0
    """Reads the store refused as corrupt (checksum mismatch) since the node started."""
    loop_lag_ms: float = 0.0
    """How late the monitor's last timer fired."""
    memory_used_pct: float | None = None
    clock_skew_ms: float | None = None
    """How far this node's clock is ahead of its peers' (negative: behind), as the
    membership's probes estimate it (``core.clock_offsets``); None before any probe."""


class HealthRule:
    """Turns readings into a state. Keeps which thresholds are crossed (the hysteresis
    memory); otherwise a pure function of its inputs."""

    def __init__(self, thresholds: HealthThresholds) -> None:
        self.thresholds = thresholds
        self._disk_stop = False
        self._disk_warn = False
        self._lagging = False
        self._memory_high = False
        self._skewed = False

    def assess(self, readings: HealthReadings) -> HealthState:
        """The state these readings (and the previous ones) call for: read-only when the
        disk is below stop-writes, else degraded naming the most serious problem (and how
        many more there are), else healthy."""
        t = self.thresholds
        free = readings.disk_free_pct
        if free is not None:
            self._disk_stop = _crossed(self._disk_stop, free < t.disk_stop_writes_free_pct,
                                       free >= t.disk_stop_writes_free_pct
                                       + DISK_HYSTERESIS_PCT)
            self._disk_warn = _crossed(self._disk_warn, free < t.disk_warn_free_pct,
                                       free >= t.disk_warn_free_pct + DISK_HYSTERESIS_PCT)
        self._lagging = _crossed(self._lagging, readings.loop_lag_ms >= t.loop_lag_warn_ms,
                                 readings.loop_lag_ms < t.loop_lag_warn_ms
                                 * LOOP_LAG_HYSTERESIS)
        memory = readings.memory_used_pct
        if memory is not None:
            self._memory_high = _crossed(self._memory_high, memory >= t.memory_warn_pct,
                                         memory < t.memory_warn_pct - MEMORY_HYSTERESIS_PCT)
        offset = readings.clock_skew_ms
        if offset is not None:
            self._skewed = _crossed(self._skewed, abs(offset) > t.clock_skew_max_ms,
                                    abs(offset) < t.clock_skew_max_ms * CLOCK_HYSTERESIS)
        if self._disk_stop and free is not None:
            return HealthState(HealthStatus.READ_ONLY, short_reason(
                f"disk {free:.1f}% free (stop-writes below {t.disk_stop_writes_free_pct:g}%)"))
        problems: list[str] = []
        if readings.corrupt_reads:
            problems.append(f"{readings.corrupt_reads} corrupt reads in the store")
        if readings.storage_errors:
            problems.append(f"{readings.storage_errors} storage write/sync errors")
        if self._skewed and offset is not None:
            side = "ahead of" if offset > 0 else "behind"
            problems.append(f"clock {abs(offset):.0f} ms {side} peers "
                            f"(bound {t.clock_skew_max_ms:g} ms)")
        if self._disk_warn and free is not None:
            problems.append(f"disk {free:.1f}% free (warn below {t.disk_warn_free_pct:g}%)")
        if self._memory_high and memory is not None:
            problems.append(f"memory {memory:.0f}% used (warn at {t.memory_warn_pct:g}%)")
        if self._lagging:
            problems.append(f"event loop {readings.loop_lag_ms:.0f} ms late "
                            f"(warn at {t.loop_lag_warn_ms:g} ms)")
        if not problems:
            return HEALTHY
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        head = short_reason(problems[0])
        if len((head + more).encode()) > REASON_BYTES_MAX:
            more = ""
        return HealthState(HealthStatus.DEGRADED, head + more)


def _crossed(was: bool, enter: bool, leave: bool) -> bool:
    """A threshold flag with hysteresis: set on ``enter``, cleared only on ``leave``."""
    if was:
        return not leave
    return enter
