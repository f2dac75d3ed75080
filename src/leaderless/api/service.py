"""What the client-facing protocols (native ``api.kv_server``, HTTP ``api.http``) need from
a node's data plane. ``runtime.kv.KvNode`` implements it; the protocols only translate.

Every method raises ``KvError`` (with a stable code from ``api.kv_messages.ERROR_CODES``)
for anything the client should hear about; any other exception is a bug.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from leaderless.api.kv_messages import (
    Changed,
    Conflict,
    KeyspaceInfo,
    Lease,
    LockInfo,
    RingMember,
    Row,
    Value,
)


class KvError(Exception):
    def __init__(self, code: str, message: str, received: int = 0, required: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.received = received
        self.required = required


Fence = tuple[str, int]
"""(lock name, fencing token): a write made under that lease (refused as ``fenced`` once
the lock has granted a newer token)."""


class WatchStream(Protocol):
    def events(self) -> AsyncIterator[WatchEventLike]:
        """Events until the watch ends (a KvError when it fails)."""

    def close(self) -> None: ...


class WatchEventLike(Protocol):
    @property
    def partition(self) -> bytes: ...

    @property
    def sort(self) -> bytes: ...

    @property
    def version(self) -> int: ...

    @property
    def value(self) -> bytes | None:
        """None: deleted."""


class KvService(Protocol):
    async def put(self, keyspace: str, key: bytes, value: bytes, sort: bytes = b"",
                  consistency: str | None = None, ttl_s: float | None = None,
                  idempotency: bytes = b"", fence: Fence | None = None, *,
                  retry_ms: int = 0) -> int:
        """Write; returns the write's HLC timestamp once ``consistency`` replicas have it
        durably."""

    async def get(self, keyspace: str, key: bytes, sort: bytes = b"",
                  consistency: str | None = None) -> Value:
        """Read the newest visible value (``Value.id`` is 0; the protocol sets its own)."""

    async def delete(self, keyspace: str, key: bytes, sort: bytes = b"",
                     consistency: str | None = None, idempotency: bytes = b"",
                     fence: Fence | None = None, *, retry_ms: int = 0) -> int:
        """Write a tombstone; returns its HLC timestamp."""

    async def scan(self, keyspace: str, key: bytes, start: bytes | None = None,
                   end: bytes | None = None, limit: int = 1000,
                   consistency: str | None = None) -> tuple[list[Row], bool]:
        """Rows of one partition with start <= sort < end; (rows, more)."""

    async def cas(self, keyspace: str, key: bytes, value: bytes, sort: bytes = b"",
                  expected_version: int | None = None, expected_value: bytes | None = None,
                  expected_absent: bool = False, idempotency: bytes = b"",
                  fence: Fence | None = None, *, retry_ms: int = 0) -> Changed | Conflict:
        """Strong keyspaces: compare-and-set (``Changed``/``Conflict`` with id 0)."""

    async def incr(self, keyspace: str, key: bytes, delta: int = 1, sort: bytes = b"",
                   idempotency: bytes = b"", fence: Fence | None = None, *,
                   retry_ms: int = 0) -> Changed:
        """Strong keyspaces: add ``delta`` to a counter; the new value in ``Changed``."""

    async def acquire_lock(self, name: str, owner: str, ttl_ms: int, wait_ms: int = 0,
                           idempotency: bytes = b"") -> Lease:
        """A lease on lock ``name`` (``Lease.id`` 0), waiting up to ``wait_ms`` if held."""

    async def renew_lock(self, name: str, owner: str, token: int, ttl_ms: int,
                         idempotency: bytes = b"") -> Lease: ...

    async def release_lock(self, name: str, owner: str, token: int,
                           idempotency: bytes = b"") -> int: ...

    async def lock_status(self, name: str) -> LockInfo: ...

    async def watch(self, keyspace: str, key: bytes, sort: bytes = b"", prefix: bool = False,
                    since_version: int = 0) -> WatchStream:
        """Start a watch (errors at once: unknown keyspace, not strong, bad key)."""

    async def create_keyspace(self, name: str, replication: int = 3, mode: str = "eventual",
                              read_consistency: str = "QUORUM",
                              write_consistency: str = "QUORUM",
                              if_not_exists: bool = False) -> None: ...

    async def list_keyspaces(self) -> list[KeyspaceInfo]: ...

    def ring_members(self) -> list[RingMember]: ...
