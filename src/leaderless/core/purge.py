"""Purging tombstones and expired values once the grace period has passed.

A sweep walks the data keys a slice at a time (``keys_max`` per call, resuming from a
cursor) and deletes cells that are ``purgeable``: tombstones older than the grace period and
values expired longer than it. Until then they are kept, so a replica that missed the
delete (or the expiry's effect) learns of it by hints, read repair or anti-entropy instead
of resurrecting the old value.
"""

from __future__ import annotations

import dataclasses

from leaderless.core.cells import Cell, decode_cell
from leaderless.core.keys import DATA_PREFIX, parse_data_key
from leaderless.storage.store import Store, Write

DATA_END = bytes([DATA_PREFIX[0] + 1])


@dataclasses.dataclass(frozen=True, slots=True)
class PurgeSlice:
    writes: list[Write]
    """The deletions to commit."""
    purged: list[tuple[str, bytes, Cell]]
    """(keyspace, store key, cell) of each purged row, for the Merkle trees."""
    cursor: bytes | None
    """Where the next slice starts; None: the sweep reached the end."""


def purge_slice(store: Store, cursor: bytes, wall_ms: int, grace_ms: int,
                keys_max: int) -> PurgeSlice:
    assert keys_max > 0
    writes: list[Write] = []
    purged: list[tuple[str, bytes, Cell]] = []
    last: bytes | None = None
    for key, raw in store.scan(cursor, DATA_END, limit=keys_max):
        last = key
        cell = decode_cell(raw)
        if cell.purgeable(wall_ms, grace_ms):
            writes.append((key, None))
            purged.append((parse_data_key(key)[0], key, cell))
    return PurgeSlice(writes, purged, None if last is None else last + b"\x00")
