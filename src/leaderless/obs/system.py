"""The machine a node runs on, through psutil: the seed's seven metrics (CPU, memory, disk
usage, network traffic, load, disk I/O; the eighth, response time, is ``obs.requests``).

A sample is cached for ``max_age_s`` (1 s) so that several scrapes, the dashboard and the
gossiped load summary reading it together cost one pass over /proc.

CPU percentages are computed from this sampler's own previous reading, not with
``psutil.cpu_percent(interval=None)``: that function keeps its previous reading in state
shared by every caller in the thread, so two nodes in one process (as in tests) would
each see the other's interval. The first sample's CPU figures cover the time since the
sampler was made (see ``CPU_INTERVAL_S_MIN``).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import psutil

SAMPLE_AGE_S_MAX: Final = 1.0
"""A sample younger than this is returned again instead of reading /proc anew."""

CPU_INTERVAL_S_MIN: Final = 0.1
"""CPU percentages are measured over at least this long: CPU times tick every 10 ms, so a
shorter interval reads 0 or 100 % at random. Until it has passed (just after start) the
previous figure (at first 0.0) is reported and the reference is kept."""


@dataclasses.dataclass(frozen=True, slots=True)
class SystemSample:
    """One reading of the machine. Cumulative figures (disk and network I/O) are totals
    since the machine booted; ``*_available`` is False where the OS does not give them
    (e.g. ``disk_io_counters`` in many containers), and the figures are then zero."""

    cpu_percent: float
    """Busy share of all the machine's CPUs, 0..100."""
    process_cpu_percent: float
    """This process's CPU use, in percent of one CPU (up to 100 x CPUs)."""
    cpu_count: int
    memory_used_bytes: int
    """Total minus available: what the OS could not hand out without swapping."""
    memory_total_bytes: int
    process_rss_bytes: int
    disk_used_bytes: int
    """Of the filesystem that holds the data dir."""
    disk_free_bytes: int
    """Free for an unprivileged user (excludes blocks reserved for root)."""
    disk_total_bytes: int
    disk_usage_available: bool
    disk_read_bytes: int
    disk_write_bytes: int
    disk_reads: int
    disk_writes: int
    disk_io_available: bool
    network_sent_bytes: int
    network_received_bytes: int
    network_sent_packets: int
    network_received_packets: int
    network_io_available: bool
    load_1m: float
    load_5m: float
    load_15m: float

    @property
    def memory_used_pct(self) -> float:
        return _percent(self.memory_used_bytes, self.memory_total_bytes)

    @property
    def disk_used_pct(self) -> float:
        """As ``df`` shows it (Use%): used of what an unprivileged user can use, so a disk
        whose root-reserved blocks are all that is left reads 100 %."""
        return _percent(self.disk_used_bytes, self.disk_used_bytes + self.disk_free_bytes)


def _percent(part: int, whole: int) -> float:
    return round(100.0 * part / whole, 2) if whole > 0 else 0.0


class SystemSampler:
    """Reads the machine for a node whose data lives in ``data_dir``."""

    def __init__(self, data_dir: Path, *, max_age_s: float = SAMPLE_AGE_S_MAX,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.data_dir = Path(data_dir)
        self.max_age_s = max_age_s
        self._clock = clock
        self._process = psutil.Process(os.getpid())
        self._cpu_count = psutil.cpu_count() or 1
        # CPU references: (busy, total) machine CPU seconds, and (process CPU seconds, wall
        # time); each percentage is the change since its reference.
        self._cpu_busy_s, self._cpu_total_s = _cpu_busy_total_s()
        self._process_cpu_s, self._process_at = _process_cpu_s(self._process), time.monotonic()
        self._cpu_percent = 0.0
        self._process_cpu_percent = 0.0
        self._sample: SystemSample | None = None
        self._sampled_at = 0.0

    def sample(self) -> SystemSample:
        now = self._clock()
        if self._sample is not None and 0.0 <= now - self._sampled_at < self.max_age_s:
            return self._sample
        self._sample = self._read()
        self._sampled_at = now
        return self._sample

    def _read(self) -> SystemSample:
        memory = psutil.virtual_memory()
        try:
            disk = psutil.disk_usage(str(self.data_dir))
            usage = (disk.used, disk.free, disk.total, True)
        except OSError:  # the data dir is gone or unreadable: report it, do not fail a scrape
            usage = (0, 0, 0, False)
        io = _disk_io()
        net = _net_io()
        load_1m, load_5m, load_15m = psutil.getloadavg()
        return SystemSample(
            cpu_percent=self._machine_cpu(),
            process_cpu_percent=self._process_cpu(),
            cpu_count=self._cpu_count,
            memory_used_bytes=memory.total - memory.available,
            memory_total_bytes=memory.total,
            process_rss_bytes=self._process.memory_info().rss,
            disk_used_bytes=usage[0], disk_free_bytes=usage[1], disk_total_bytes=usage[2],
            disk_usage_available=usage[3],
            disk_read_bytes=io[0], disk_write_bytes=io[1], disk_reads=io[2],
            disk_writes=io[3], disk_io_available=io[4],
            network_sent_bytes=net[0], network_received_bytes=net[1],
            network_sent_packets=net[2], network_received_packets=net[3],
            network_io_available=net[4],
            load_1m=load_1m, load_5m=load_5m, load_15m=load_15m)

    def _machine_cpu(self) -> float:
        busy_s, total_s = _cpu_busy_total_s()
        total_delta = total_s - self._cpu_total_s
        if total_delta >= CPU_INTERVAL_S_MIN * self._cpu_count:
            busy_delta = busy_s - self._cpu_busy_s
            self._cpu_busy_s, self._cpu_total_s = busy_s, total_s
            self._cpu_percent = _clamp(100.0 * busy_delta / total_delta, 100.0)
        return self._cpu_percent

    def _process_cpu(self) -> float:
        cpu_s, at = _process_cpu_s(self._process), time.monotonic()
        wall_delta = at - self._process_at
        if wall_delta >= CPU_INTERVAL_S_MIN:
            cpu_delta = cpu_s - self._process_cpu_s
            self._process_cpu_s, self._process_at = cpu_s, at
            self._process_cpu_percent = _clamp(100.0 * cpu_delta / wall_delta,
                                               100.0 * self._cpu_count)
        return self._process_cpu_percent


def _clamp(percent: float, top: float) -> float:
    """CPU times tick in 10 ms steps, so a short interval can read a little outside."""
    return round(min(top, max(0.0, percent)), 1)


def _process_cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def _cpu_busy_total_s() -> tuple[float, float]:
    """Busy and total CPU seconds of the machine, the way psutil.cpu_percent counts them:
    guest time is already inside user time on Linux, idle and iowait are not busy."""
    times = psutil.cpu_times()
    total = sum(times)
    total -= getattr(times, "guest", 0.0) + getattr(times, "guest_nice", 0.0)
    idle = times.idle + getattr(times, "iowait", 0.0)
    return total - idle, total


def _disk_io() -> tuple[int, int, int, int, bool]:
    try:
        io = psutil.disk_io_counters()
    except (OSError, RuntimeError):  # no /proc/diskstats or nothing in it
        io = None
    if io is None:
        return 0, 0, 0, 0, False
    return io.read_bytes, io.write_bytes, io.read_count, io.write_count, True


def _net_io() -> tuple[int, int, int, int, bool]:
    # Any: psutil returns None on a machine without interfaces, which its stubs omit.
    net: Any
    try:
        net = psutil.net_io_counters()
    except (OSError, RuntimeError):
        net = None
    if net is None:
        return 0, 0, 0, 0, False
    return net.bytes_sent, net.bytes_recv, net.packets_sent, net.packets_recv, True
