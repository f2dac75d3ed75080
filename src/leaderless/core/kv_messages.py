"""Wire messages between replicas and coordinators (the KV data plane).

They travel as length-prefixed msgpack frames over the inter-node TCP port (``core.codec``
framing), many per write when the runtime coalesces a loop turn's messages to one peer.
Every request carries the coordinator's request id; the replica's reply echoes it.

Tags 30-39 are this module's, 40-49 anti-entropy's (``core.anti_entropy``). Append-only.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from leaderless.core.cells import Cell
from leaderless.core.keys import (
    KEYSPACE_NAME_MAX,
    PARTITION_KEY_BYTES_MAX,
    SORT_KEY_BYTES_MAX,
)
from leaderless.core.messages import Name

SCAN_ROWS_MAX = 10_000
"""Rows in one scan reply; a client pages through larger partitions."""
ERROR_TEXT_MAX = 512

RequestId = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Trace = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
"""The coordinator's (or proposer's) operation id: with the sender's name it names one
client request across every node it touches (``request_id`` in their log lines)."""
KeyspaceName = Annotated[str, msgspec.Meta(min_length=1, max_length=KEYSPACE_NAME_MAX)]
PartitionKey = Annotated[bytes, msgspec.Meta(min_length=1, max_length=PARTITION_KEY_BYTES_MAX)]
SortKey = Annotated[bytes, msgspec.Meta(max_length=SORT_KEY_BYTES_MAX)]
ErrorText = Annotated[str, msgspec.Meta(max_length=ERROR_TEXT_MAX)]


class ReplicaWrite(msgspec.Struct, frozen=True, array_like=True, tag=30):
    """Store ``cell`` if it is newer than what the replica has. With ``hint_for`` set, the
    receiver is not a replica: it keeps the write as a durable hint for that node."""

    id: RequestId
    keyspace: KeyspaceName
    partition: PartitionKey
    sort: SortKey
    cell: Cell
    hint_for: Name | None = None
    trace: Trace = 0


class ReplicaRead(msgspec.Struct, frozen=True, array_like=True, tag=31):
    id: RequestId
    keyspace: KeyspaceName
    partition: PartitionKey
    sort: SortKey
    trace: Trace = 0


class ReplicaScan(msgspec.Struct, frozen=True, array_like=True, tag=32):
    """Rows of one partition with start <= sort < end (None: unbounded), at most ``limit``."""

    id: RequestId
    keyspace: KeyspaceName
    partition: PartitionKey
    start: SortKey | None
    end: SortKey | None
    limit: Annotated[int, msgspec.Meta(ge=1, le=SCAN_ROWS_MAX)]
    trace: Trace = 0


class ReplicaAck(msgspec.Struct, frozen=True, array_like=True, tag=33):
    """The write is durable on the replica (or ``error`` says why it is not)."""

    id: RequestId
    error: ErrorText = ""


class ReplicaReadReply(msgspec.Struct, frozen=True, array_like=True, tag=34):
    id: RequestId
    cell: Cell | None
    error: ErrorText = ""


class ScanRow(msgspec.Struct, frozen=True, array_like=True):
    sort: SortKey
    cell: Cell


class ReplicaScanReply(msgspec.Struct, frozen=True, array_like=True, tag=35):
    id: RequestId
    rows: Annotated[list[ScanRow], msgspec.Meta(max_length=SCAN_ROWS_MAX)]
    error: ErrorText = ""


ReplicaRequest = ReplicaWrite | ReplicaRead | ReplicaScan
ReplicaReply = ReplicaAck | ReplicaReadReply | ReplicaScanReply


class PeerHello(msgspec.Struct, frozen=True, array_like=True, tag=36):
    """First frame on a data-plane link: who is sending (replies need no name, anti-entropy
    does)."""

    name: Name
