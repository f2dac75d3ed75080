"""The ``Store`` interface: an ordered byte-key/byte-value map with explicit durability.

Core protocol code (replica writes, hints, anti-entropy) reads and writes through this
synchronous interface; it never imports an engine. Semantics every engine must keep:

- ``write`` applies a batch atomically and makes it visible to reads at once;
- it is durable only after ``sync`` returns (one fsync for everything written so far):
  the runtime calls ``sync`` once per event-loop turn (group commit) and acknowledges
  nothing before it returns;
- after a crash (kill -9, power loss) the store holds every batch written before the last
  ``sync``, and possibly some written after it, each batch whole or not at all;
- ``scan`` yields keys in byte order within [start, end).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

Write = tuple[bytes, bytes | None]
"""(key, value) to put, or (key, None) to delete."""


class StorageError(Exception):
    """The engine failed to read, write or sync (an operating error: disk full, I/O error).
    The node must not acknowledge anything the failed call was to make durable."""


class Store(Protocol):
    def get(self, key: bytes) -> bytes | None: ...

    def write(self, batch: Sequence[Write]) -> None:
        """Apply puts and deletes atomically; visible now, durable after ``sync``."""

    def sync(self) -> None:
        """Make every write so far durable (one fsync)."""

    def scan(self, start: bytes, end: bytes | None = None, *, limit: int | None = None,
             reverse: bool = False) -> Iterator[tuple[bytes, bytes]]:
        """Keys in [start, end) in byte order (descending if ``reverse``); ``end`` None
        means no upper bound."""

    def close(self) -> None: ...
