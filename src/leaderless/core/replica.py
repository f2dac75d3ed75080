"""The replica side: store a cell if it is newer, read one, scan a partition, keep hints.

``Replica.handle`` answers one request from a coordinator. A write returns the store batch
to commit; the caller must write it to the store before it handles the next request
(``GroupCommit.commit`` does, at once), so the next request reads it, and must send the
reply only once the batch is durable, so an acknowledged write survives a crash. A write
that is not newer than the stored cell changes nothing but is still acknowledged: the
replica has something at least as new, which is what the coordinator needs to know.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from leaderless.core.cells import Cell, decode_cell, encode_cell
from leaderless.core.hints import Hint, HintLog
from leaderless.core.keys import data_key, partition_prefix, prefix_end
from leaderless.core.kv_messages import (
    ReplicaAck,
    ReplicaRead,
    ReplicaReadReply,
    ReplicaReply,
    ReplicaRequest,
    ReplicaScan,
    ReplicaScanReply,
    ReplicaWrite,
    ScanRow,
)
from leaderless.storage.store import Store, Write

CellObserver = Callable[[str, bytes, Cell | None, Cell], None]
"""Called with (keyspace, store key, old cell, new cell) for every applied write, so the
Merkle trees follow every change."""


@dataclasses.dataclass
class ReplicaCounters:
    writes_applied: int = 0
    writes_stale: int = 0
    reads: int = 0
    scans: int = 0
    hints_stored: int = 0


class Replica:
    def __init__(self, store: Store, hints: HintLog,
                 on_change: CellObserver | None = None) -> None:
        self.store = store
        self.hints = hints
        self.counters = ReplicaCounters()
        self._on_change = on_change

    def handle(self, request: ReplicaRequest, wall_ms: int) -> tuple[ReplicaReply, list[Write]]:
        """The reply and the writes that must be durable before it is sent."""
        if isinstance(request, ReplicaWrite):
            if request.hint_for is not None:
                self.counters.hints_stored += 1
                hint = Hint(request.keyspace, request.partition, request.sort, request.cell,
                            wall_ms)
                return ReplicaAck(request.id), [self.hints.add(request.hint_for, hint)]
            writes = self.apply(request.keyspace, request.partition, request.sort,
                                request.cell)
            return ReplicaAck(request.id), writes
        if isinstance(request, ReplicaRead):
            self.counters.reads += 1
            cell = self.read(request.keyspace, request.partition, request.sort)
            return ReplicaReadReply(request.id, cell), []
        self.counters.scans += 1
        return ReplicaScanReply(request.id, self.scan(request)), []

    def apply(self, keyspace: str, partition: bytes, sort: bytes, cell: Cell) -> list[Write]:
        """The store write that makes ``cell`` current, or nothing if ours is as new."""
        key = data_key(keyspace, partition, sort)
        raw = self.store.get(key)
        old = decode_cell(raw) if raw is not None else None
        if not cell.newer_than(old):
            self.counters.writes_stale += 1
            return []
        self.counters.writes_applied += 1
        write = (key, encode_cell(cell))
        if self._on_change is not None:
            self._on_change(keyspace, key, old, cell)
        return [write]

    def read(self, keyspace: str, partition: bytes, sort: bytes) -> Cell | None:
        raw = self.store.get(data_key(keyspace, partition, sort))
        return decode_cell(raw) if raw is not None else None

    def scan(self, request: ReplicaScan) -> list[ScanRow]:
        prefix = partition_prefix(request.keyspace, request.partition)
        start = prefix + (request.start or b"")
        end = prefix + request.end if request.end is not None else prefix_end(prefix)
        return [ScanRow(key[len(prefix):], decode_cell(value))
                for key, value in self.store.scan(start, end, limit=request.limit)]
