"""Hot partitions: the busiest partition keys per keyspace, in bounded memory.

A node cannot count every partition key it coordinates (there may be billions), yet an
operator must see the one key that takes half the traffic. The *space-saving* algorithm
(Metwally, Agrawal, El Abbadi, "Efficient Computation of Frequent and Top-k Elements in
Data Streams", ICDT 2005) keeps ``capacity`` counters: a tracked key's counter grows; an
untracked key takes over the smallest counter, inheriting its count as its *error*. Every
key whose true count exceeds (total / capacity) is guaranteed to be tracked, and a tracked
key's count overestimates its true count by at most its error.

Counts decay so they are *rates over a recent window*: each request weighs
``2 ** ((now - landmark) / half_life_s)`` (forward decay, Cormode et al., ICDE 2009), so
counters never need touching to age, and a counter read at ``now`` is scaled down by the
current weight. A steady rate ``r`` converges to a decayed count of ``r * half_life_s /
ln 2``, which ``top`` turns back into requests per second. When the weights grow large,
every counter is rescaled once (every ``RESCALE_HALF_LIVES`` half-lives).

Finding the smallest counter uses a heap of lower bounds: a hit only raises its counter
(O(1)); a miss pops heap entries whose recorded count is stale, re-pushing them with the
true count, until the top is current, which is then the true minimum (amortised O(log k)).

Pure and sans-I/O: time arrives as ``now``. Memory: ``capacity`` counters of at most one
partition key (``core.keys.PARTITION_KEY_BYTES_MAX``) per keyspace, for at most
``keyspaces_max`` keyspaces.
"""

from __future__ import annotations

import dataclasses
import heapq
import math

RESCALE_HALF_LIVES = 64.0
"""Rescale every counter when the request weight reaches 2**64: floats keep 53 bits, so
counts stay exact relative to each other, and the rescale (O(counters)) is rare."""
LABEL_CHARS_MAX = 64
"""A partition key rendered for a metric label or a table is cut to this many characters."""


@dataclasses.dataclass(frozen=True)
class HotPartitionsConfig:
    capacity: int = 64
    """Counters per keyspace. Any key with more than 1/64 of its keyspace's traffic is
    guaranteed to be among them; 64 * 1 KiB keys bound a keyspace's memory at 64 KiB."""
    half_life_s: float = 30.0
    """The window of the rates: a request weighs half as much after 30 s. Long enough to
    smooth bursts, short enough that a key that cooled down leaves the top within minutes."""
    keyspaces_max: int = 256
    """Keyspaces counted at most; requests to further ones are only counted as untracked."""

    def __post_init__(self) -> None:
        assert self.capacity >= 1, "capacity is >= 1"
        assert self.half_life_s > 0, "half_life_s is > 0"
        assert self.keyspaces_max >= 1, "keyspaces_max is >= 1"


@dataclasses.dataclass(slots=True)
class _Counter:
    count: float
    error: float
    reads: float
    writes: float


@dataclasses.dataclass(frozen=True, slots=True)
class HotPartition:
    """A partition among the busiest of its keyspace, with its recent rates."""

    keyspace: str
    partition: bytes
    requests_per_s: float
    """Estimated rate (an upper bound: it includes ``error_per_s``)."""
    reads_per_s: float
    """Reads and writes counted since this key took its counter (lower bounds)."""
    writes_per_s: float
    error_per_s: float
    """By how much ``requests_per_s`` may overestimate (inherited when the key took the
    counter of a smaller one); 0 for a key tracked since the window began."""
    share: float
    """``requests_per_s`` as a fraction of the keyspace's total rate (0..1)."""


class SpaceSaving:
    """The space-saving sketch of one keyspace; weights are given by ``HotPartitions``."""

    def __init__(self, capacity: int) -> None:
        assert capacity >= 1
        self.capacity = capacity
        self.counters: dict[bytes, _Counter] = {}
        self.total = 0.0
        self._heap: list[tuple[float, bytes]] = []
        """(count when pushed, key): one entry per tracked key, a lower bound of its count."""

    def add(self, key: bytes, weight: float, write: bool) -> None:
        self.total += weight
        counter = self.counters.get(key)
        if counter is None:
            counter = self._take(key, weight)
        else:
            counter.count += weight
        if write:
            counter.writes += weight
        else:
            counter.reads += weight

    def _take(self, key: bytes, weight: float) -> _Counter:
        heap = self._heap
        if len(self.counters) < self.capacity:
            counter = self.counters[key] = _Counter(weight, 0.0, 0.0, 0.0)
            heapq.heappush(heap, (weight, key))
            return counter
        while True:
            recorded, victim = heap[0]
            actual = self.counters[victim].count
            if recorded == actual:
                break
            heapq.heapreplace(heap, (actual, victim))  # stale: push its true count back
        del self.counters[victim]
        counter = self.counters[key] = _Counter(actual + weight, actual, 0.0, 0.0)
        heapq.heapreplace(heap, (counter.count, key))
        assert len(self.counters) == len(heap) <= self.capacity
        return counter

    def scale(self, factor: float) -> None:
        """Multiply every count (the forward-decay rescale); rebuilds the heap."""
        self.total *= factor
        for c in self.counters.values():
            c.count *= factor
            c.error *= factor
            c.reads *= factor
            c.writes *= factor
        self._heap = [(c.count, k) for k, c in self.counters.items()]
        heapq.heapify(self._heap)

    def top(self, n: int) -> list[tuple[bytes, _Counter]]:
        return sorted(self.counters.items(), key=lambda kv: (-kv[1].count, kv[0]))[:n]


class HotPartitions:
    """Requests per partition key, per keyspace, as decaying rates (see the module)."""

    def __init__(self, config: HotPartitionsConfig | None = None) -> None:
        self.config = config or HotPartitionsConfig()
        self._sketches: dict[str, SpaceSaving] = {}
        self._landmark: float | None = None
        self._started: float | None = None
        self._exponent_max = RESCALE_HALF_LIVES * self.config.half_life_s
        self.untracked = 0
        """Requests to keyspaces beyond ``keyspaces_max`` (not counted per partition)."""

    def record(self, now: float, keyspace: str, partition: bytes, write: bool) -> None:
        """One request (a read unless ``write``) this node coordinates for ``partition``."""
        if self._landmark is None:
            self._landmark = self._started = now
        sketch = self._sketches.get(keyspace)
        if sketch is None:
            if len(self._sketches) >= self.config.keyspaces_max:
                self.untracked += 1
                return
            sketch = self._sketches[keyspace] = SpaceSaving(self.config.capacity)
        elapsed = now - self._landmark
        if elapsed > self._exponent_max:
            self._rescale(now)
            elapsed = 0.0
        sketch.add(partition, math.pow(2.0, elapsed / self.config.half_life_s), write)

    def _rescale(self, now: float) -> None:
        assert self._landmark is not None
        factor = math.pow(2.0, -(now - self._landmark) / self.config.half_life_s)
        for sketch in self._sketches.values():
            sketch.scale(factor)
        self._landmark = now

    def keyspaces(self) -> list[str]:
        return sorted(self._sketches)

    def _to_rate(self, now: float) -> float:
        """Decayed count -> requests per second at ``now``: undo the weight, divide by the
        window (half_life / ln 2), and correct for a window not yet full since the first
        request (so a steady rate reads right from the start)."""
        assert self._landmark is not None and self._started is not None
        half_life = self.config.half_life_s
        weight = math.pow(2.0, (now - self._landmark) / half_life)
        window = half_life / math.log(2)
        filled = 1.0 - math.pow(2.0, -max(0.0, now - self._started) / half_life)
        return 1.0 / (weight * window * max(filled, 1e-9))

    def keyspace_rate(self, now: float, keyspace: str) -> float:
        """All requests to ``keyspace`` per second (exact, not only the tracked keys)."""
        sketch = self._sketches.get(keyspace)
        if sketch is None or self._landmark is None:
            return 0.0
        return sketch.total * self._to_rate(now)

    def top(self, now: float, n: int, keyspace: str | None = None) -> list[HotPartition]:
        """The ``n`` busiest partitions of ``keyspace`` (None: of every keyspace together),
        busiest first."""
        if self._landmark is None or n <= 0:
            return []
        per = self._to_rate(now)
        chosen = self.keyspaces() if keyspace is None else [keyspace]
        out: list[HotPartition] = []
        for name in chosen:
            sketch = self._sketches.get(name)
            if sketch is None:
                continue
            total = sketch.total
            for key, c in sketch.top(n):
                out.append(HotPartition(name, key, c.count * per, c.reads * per,
                                        c.writes * per, c.error * per,
                                        c.count / total if total > 0 else 0.0))
        out.sort(key=lambda h: (-h.requests_per_s, h.keyspace, h.partition))
        return out[:n]


def partition_label(partition: bytes) -> str:
    """A partition key for a metric label or a table: the text itself when it is printable
    ASCII, else ``0x`` and its hex; cut to ``LABEL_CHARS_MAX`` characters (``...`` marks a
    cut)."""
    if partition.isascii() and partition.decode("ascii").isprintable():
        text = partition.decode("ascii")
    else:
        text = "0x" + partition.hex()
    if len(text) > LABEL_CHARS_MAX:
        text = text[:LABEL_CHARS_MAX - 3] + "..."
    return text
