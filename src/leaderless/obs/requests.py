"""Client request statistics, cheap enough for every request on the hot path.

A node serves tens of thousands of requests per second, so ``RequestStats.observe`` holds no
prometheus_client objects and allocates nothing on its common path: two dict look-ups find
the series of an (operation, consistency) pair, ``bisect`` finds the bucket in a fixed tuple
of bounds, and two list slots are incremented (the series' and the current second's). The
Prometheus collector (``obs.metrics``) reads a ``snapshot()`` at scrape time.

Bounds, all stated so that a hostile or buggy client cannot grow memory or the scrape:

- at most ``SERIES_MAX`` (operation, consistency) pairs and ``ERROR_SERIES_MAX``
  (operation, code) pairs are kept; later new pairs share one ``other``/``other`` series;
- an operation or code label must match ``[a-z][a-z0-9_]*`` and have at most
  ``LABEL_CHARS_MAX`` characters, and a consistency must be one of ``CONSISTENCIES``;
  anything else is counted under ``other`` (and never stored under the raw string).

Besides the cumulative histograms, a ring of per-second bucket counts over the last
``WINDOW_S`` complete seconds gives a recent rate (``ops_per_s``) and a recent 99th
percentile (``p99_ms``) that the node gossips in its load summary.

Not thread-safe: call it from the node's event loop thread only (scrapes run there too).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import Final

BUCKET_BOUNDS_S: Final[tuple[float, ...]] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0)
"""Upper bounds (seconds) of the latency buckets, plus an implicit +Inf bucket. A 1-2.5-5
series from 100 µs (a local read) to 10 s (the longest client timeout): 17 buckets keep a
series at ~0.3 KB and resolve our p99 of a few ms within one 2.5x step."""

BUCKETS_MAX: Final = 64
"""Custom bounds may have at most this many buckets (each costs a line per series)."""

CONSISTENCIES: Final[frozenset[str]] = frozenset(
    {"ONE", "TWO", "QUORUM", "ALL", "STRONG", "-"})
"""The consistency labels a series may carry; ``-`` is for requests that have none."""

SERIES_MAX: Final = 128
"""Distinct (operation, consistency) series. About 20 operations times the 6 consistency
labels fit (most operations use one or two); at ~0.3 KB each that is < 40 KB, and a scrape
stays under ~2,500 histogram lines."""

ERROR_SERIES_MAX: Final = 128
"""Distinct (operation, error code) counters: operations times the ~10 codes a node sends."""

LABEL_CHARS_MAX: Final = 64
"""Longest operation or error code label kept as it is."""

WINDOW_S: Final = 10
"""Seconds of history behind ``ops_per_s`` and ``p99_ms`` (complete seconds only)."""

OTHER: Final = "other"
"""The label of everything over a bound or not well formed."""

_INF: Final = math.inf
_LABEL: Final = re.compile(r"[a-z][a-z0-9_]*")


class _Series:
    """One (operation, consistency) histogram: per-bucket counts (last: +Inf) and the sum."""

    __slots__ = ("counts", "sum_s")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * buckets
        self.sum_s = 0.0


@dataclasses.dataclass(frozen=True, slots=True)
class LatencySeries:
    operation: str
    consistency: str
    bucket_counts: tuple[int, ...]
    """Observations per bucket, not cumulative; one more than the bounds (the +Inf one)."""
    sum_s: float

    @property
    def count(self) -> int:
        return sum(self.bucket_counts)

    def cumulative(self) -> list[int]:
        """Observations at or below each bound, then the total (Prometheus ``le`` order)."""
        result: list[int] = []
        running = 0
        for n in self.bucket_counts:
            running += n
            result.append(running)
        return result


@dataclasses.dataclass(frozen=True, slots=True)
class ErrorCount:
    operation: str
    code: str
    count: int


@dataclasses.dataclass(frozen=True, slots=True)
class RequestSnapshot:
    """A copy of the statistics at one moment, ordered by labels."""

    bounds_s: tuple[float, ...]
    latency: tuple[LatencySeries, ...]
    errors: tuple[ErrorCount, ...]


class RequestStats:
    """Per (operation, consistency) latency histograms and per (operation, code) error
    counts of the client requests one node served, plus a recent rate and p99.

    Call ``observe`` once for every completed request, failed ones included (their latency
    is what the client waited), and ``error`` in addition for each failure.
    """

    def __init__(self, bounds_s: Iterable[float] = BUCKET_BOUNDS_S, *,
                 series_max: int = SERIES_MAX, error_series_max: int = ERROR_SERIES_MAX,
                 clock: Callable[[], float] = time.monotonic) -> None:
        bounds = tuple(float(b) for b in bounds_s)
        if not 0 < len(bounds) < BUCKETS_MAX:
            raise ValueError(f"give 1..{BUCKETS_MAX - 1} bucket bounds (got {len(bounds)})")
        if not all(0.0 < b < math.inf for b in bounds):
            raise ValueError(f"bucket bounds must be positive and finite seconds: {bounds}")
        if any(a >= b for a, b in zip(bounds, bounds[1:], strict=False)):
            raise ValueError(f"bucket bounds must increase strictly: {bounds}")
        if series_max < 1 or error_series_max < 1:
            raise ValueError("series_max and error_series_max must be at least 1")
        self.bounds_s = bounds
        self._buckets = len(bounds) + 1
        self._series_max = series_max
        self._error_series_max = error_series_max
        self._clock = clock
        self._series: dict[str, dict[str, _Series]] = {}
        self._series_count = 0
        self._errors: dict[str, dict[str, int]] = {}
        self._error_count = 0
        # The ring: slot (second % len) holds that second's bucket counts, for the current
        # second and the WINDOW_S before it. A slot is zeroed when its second comes round.
        self._ring = [[0] * self._buckets for _ in range(WINDOW_S + 1)]
        self._zeros = [0] * self._buckets
        self._started_second = int(clock())
        self._second = self._started_second
        self._next_second_at = self._second + 1.0
        self._current = self._ring[self._second % len(self._ring)]

    # -- the hot path --------------------------------------------------------------------

    def observe(self, operation: str, consistency: str, seconds: float) -> None:
        """Count one request of ``operation`` at ``consistency`` that took ``seconds``."""
        by_consistency = self._series.get(operation)
        series = None if by_consistency is None else by_consistency.get(consistency)
        if series is None:
            series = self._find_series(operation, consistency)
        if not 0.0 <= seconds < _INF:
            seconds = 0.0  # NaN, negative or infinite: a caller's clock bug; keep sums sane
        i = bisect_left(self.bounds_s, seconds)
        series.counts[i] += 1
        series.sum_s += seconds
        now = self._clock()
        if now >= self._next_second_at:  # a float compare: cheaper than int() per call
            self._advance(int(now))
        self._current[i] += 1

    def error(self, operation: str, code: str) -> None:
        """Count one request of ``operation`` that failed with error ``code``."""
        by_code = self._errors.get(operation)
        if by_code is not None and code in by_code:
            by_code[code] += 1
        else:
            self._add_error(operation, code)

    # -- readers -------------------------------------------------------------------------

    def snapshot(self) -> RequestSnapshot:
        latency = tuple(
            LatencySeries(op, cons, tuple(s.counts), s.sum_s)
            for op, by_cons in sorted(self._series.items())
            for cons, s in sorted(by_cons.items()))
        errors = tuple(
            ErrorCount(op, code, n)
            for op, by_code in sorted(self._errors.items())
            for code, n in sorted(by_code.items()))
        return RequestSnapshot(self.bounds_s, latency, errors)

    def ops_per_s(self) -> float:
        """Requests per second over the last ``WINDOW_S`` complete seconds (fewer just
        after start); 0.0 before the first second is complete."""
        counts = self._recent()
        seconds = self._recent_seconds()
        return sum(counts) / seconds if seconds else 0.0

    def p99_ms(self) -> float:
        """The 99th percentile latency (ms) over the last ``WINDOW_S`` complete seconds,
        interpolated within its bucket like PromQL's ``histogram_quantile``; 0.0 without
        requests. Above the last bound it reports the last bound."""
        return self._quantile_s(0.99, self._recent()) * 1000.0

    # -- internals -----------------------------------------------------------------------

    def _find_series(self, operation: str, consistency: str) -> _Series:
        """The slow path: a pair not seen before, or one that is not stored as given."""
        op = operation if _is_label(operation) else OTHER
        cons = consistency if consistency in CONSISTENCIES else OTHER
        if self._series_count >= self._series_max and self._lookup(op, cons) is None:
            op, cons = OTHER, OTHER
        series = self._lookup(op, cons)
        if series is None:
            series = _Series(self._buckets)
            self._series.setdefault(op, {})[cons] = series
            self._series_count += 1
        return series

    def _lookup(self, operation: str, consistency: str) -> _Series | None:
        by_consistency = self._series.get(operation)
        return None if by_consistency is None else by_consistency.get(consistency)

    def _add_error(self, operation: str, code: str) -> None:
        op = operation if _is_label(operation) else OTHER
        code = code if _is_label(code) else OTHER
        known = code in self._errors.get(op, {})
        if not known and self._error_count >= self._error_series_max:
            op, code = OTHER, OTHER
            known = code in self._errors.get(op, {})
        by_code = self._errors.setdefault(op, {})
        if not known:
            by_code[code] = 0
            self._error_count += 1
        by_code[code] += 1

    def _advance(self, second: int) -> None:
        """Move the ring's current slot to ``second``, zeroing the slots of the seconds
        entered (at most all of them). A clock that goes back keeps the current slot."""
        if second < self._second:
            return
        ring = self._ring
        for s in range(self._second + 1, self._second + 1 + min(second - self._second,
                                                                  len(ring))):
            ring[s % len(ring)][:] = self._zeros
        self._second = second
        self._next_second_at = second + 1.0
        self._current = ring[second % len(ring)]

    def _recent_seconds(self) -> int:
        return min(WINDOW_S, self._second - self._started_second)

    def _recent(self) -> list[int]:
        """Bucket counts summed over the complete seconds of the window."""
        self._advance(int(self._clock()))
        total = [0] * self._buckets
        ring = self._ring
        for s in range(self._second - self._recent_seconds(), self._second):
            for i, n in enumerate(ring[s % len(ring)]):
                total[i] += n
        return total

    def _quantile_s(self, q: float, counts: list[int]) -> float:
        total = sum(counts)
        if total == 0:
            return 0.0
        rank = q * total
        below = 0
        bounds = self.bounds_s
        for i, n in enumerate(counts):
            if n and below + n >= rank:
                if i == len(bounds):
                    return bounds[-1]
                lower = bounds[i - 1] if i else 0.0
                return lower + (bounds[i] - lower) * (rank - below) / n
            below += n
        return bounds[-1]


def _is_label(value: str) -> bool:
    return len(value) <= LABEL_CHARS_MAX and _LABEL.fullmatch(value) is not None
