"""An in-memory ``Store`` for the simulator and unit tests, with crash semantics.

It keeps two maps: what has been written (visible to reads) and what was durable at the
last ``sync``. ``crash()`` throws away everything since that sync, as kill -9 or a power
cut would, so tests can check that nothing acknowledged is lost.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence

from leaderless.storage.store import StorageError, Write


class MemoryStore:
    def __init__(self) -> None:
        self._keys: list[bytes] = []
        self._values: dict[bytes, bytes] = {}
        self._synced: dict[bytes, bytes] = {}
        self._unsynced: list[Write] = []
        self.syncs = 0
        self.fail_writes: str | None = None
        """Set to an error text to make writes and syncs fail (fault injection)."""

    def get(self, key: bytes) -> bytes | None:
        return self._values.get(key)

    def write(self, batch: Sequence[Write]) -> None:
        if self.fail_writes:
            raise StorageError(self.fail_writes)
        for key, value in batch:
            self._apply(self._values, key, value, index=True)
        self._unsynced.extend(batch)

    def sync(self) -> None:
        if self.fail_writes:
            raise StorageError(self.fail_writes)
        for key, value in self._unsynced:
            self._apply(self._synced, key, value, index=False)
        self._unsynced.clear()
        self.syncs += 1

    def scan(self, start: bytes, end: bytes | None = None, *, limit: int | None = None,
             reverse: bool = False) -> Iterator[tuple[bytes, bytes]]:
        lo = bisect.bisect_left(self._keys, start)
        hi = len(self._keys) if end is None else bisect.bisect_left(self._keys, end)
        keys = self._keys[lo:hi]  # a copy: callers may write while iterating
        if reverse:
            keys.reverse()
        if limit is not None:
            keys = keys[:limit]
        for key in keys:
            value = self._values.get(key)
            if value is not None:
                yield key, value

    def close(self) -> None:
        pass

    def crash(self) -> None:
        """Lose every write since the last sync, as a kill -9 would."""
        self._unsynced.clear()
        self._values = dict(self._synced)
        self._keys = sorted(self._values)

    def unsynced_writes(self) -> int:
        return len(self._unsynced)

    def __len__(self) -> int:
        return len(self._values)

    def _apply(self, target: dict[bytes, bytes], key: bytes, value: bytes | None,
               index: bool) -> None:
        if value is None:
            if target.pop(key, None) is not None and index:
                i = bisect.bisect_left(self._keys, key)
                del self._keys[i]
        else:
            if key not in target and index:
                bisect.insort(self._keys, key)
            target[key] = value
