"""Wire messages of anti-entropy (``core.anti_entropy``): tags 40-49, append-only.

The initiator of a session asks, the responder answers from its store and hash forest
and keeps no state: every request carries the session id, every reply echoes it. They
travel as frames over the inter-node TCP port like the KV messages (``core.kv_messages``,
tags 30-39). Every field a peer controls is bounded; a worst-case message stays under the
8 MiB frame (``core.codec.FRAME_BYTES_MAX``): the row lists are bounded in count here and
in bytes by the sender (``AntiEntropyConfig.row_bytes_per_message``).

Token segments travel inclusive, [first, last], because msgpack has no 2**64.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from leaderless.core.cells import Cell
from leaderless.core.keys import KEYSPACE_NAME_MAX, PARTITION_KEY_BYTES_MAX, SORT_KEY_BYTES_MAX
from leaderless.core.kv_messages import KeyspaceName, PartitionKey, SortKey
from leaderless.core.messages import Name

SEGMENTS_MAX = 4096
"""Digests asked or answered in one message: 4096 x ~20 bytes is 80 KiB."""
KEYS_MAX = 2048
"""Key versions in one listing: 2048 x ~2.2 KiB worst case is 4.5 MiB, under a frame."""
ROWS_MAX = 1024
"""Rows (or keys of rows asked for) in one message; their bytes are bounded by the sender."""
STORE_KEY_BYTES_MAX = 2 + KEYSPACE_NAME_MAX + 8 + 2 + PARTITION_KEY_BYTES_MAX + SORT_KEY_BYTES_MAX

SessionId = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
# msgpack integers stop at 2**64 - 1 and msgspec cannot state that bound (past int64), so
# ``ge=0`` plus the format itself bound tokens and digests to 64 bits.
Token = Annotated[int, msgspec.Meta(ge=0)]
Digest = Annotated[int, msgspec.Meta(ge=0)]
StoreKey = Annotated[bytes, msgspec.Meta(min_length=1, max_length=STORE_KEY_BYTES_MAX)]
Count = Annotated[int, msgspec.Meta(ge=0, le=ROWS_MAX)]


class Span(msgspec.Struct, frozen=True, array_like=True):
    """Tokens first..last, both included."""

    first: Token
    last: Token

    def __post_init__(self) -> None:
        if self.first > self.last:
            raise ValueError("span: first > last")


class KeyVersion(msgspec.Struct, frozen=True, array_like=True):
    key: StoreKey
    hlc: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
    writer: Name


class Row(msgspec.Struct, frozen=True, array_like=True):
    partition: PartitionKey
    sort: SortKey
    cell: Cell


class DigestRequest(msgspec.Struct, frozen=True, array_like=True, tag=40):
    """Send your digest of each span of ``keyspace``."""

    session: SessionId
    keyspace: KeyspaceName
    spans: Annotated[list[Span], msgspec.Meta(max_length=SEGMENTS_MAX)]


class DigestReply(msgspec.Struct, frozen=True, array_like=True, tag=41):
    """One digest per span asked, in order."""

    session: SessionId
    digests: Annotated[list[Digest], msgspec.Meta(max_length=SEGMENTS_MAX)]


class KeysRequest(msgspec.Struct, frozen=True, array_like=True, tag=42):
    """List (key, version) of your rows in ``spans`` (ascending, disjoint) with store key
    > ``after``, in key order, at most ``limit`` in all."""

    session: SessionId
    keyspace: KeyspaceName
    spans: Annotated[list[Span], msgspec.Meta(min_length=1, max_length=SEGMENTS_MAX)]
    after: StoreKey | None
    limit: Annotated[int, msgspec.Meta(ge=1, le=KEYS_MAX)]


class KeysReply(msgspec.Struct, frozen=True, array_like=True, tag=43):
    """``more``: the listing stopped at ``limit``; keys past the last one may exist."""

    session: SessionId
    keys: Annotated[list[KeyVersion], msgspec.Meta(max_length=KEYS_MAX)]
    more: bool


class RowsRequest(msgspec.Struct, frozen=True, array_like=True, tag=44):
    """Send me these rows (I lack them or hold older versions)."""

    session: SessionId
    keyspace: KeyspaceName
    keys: Annotated[list[StoreKey], msgspec.Meta(max_length=ROWS_MAX)]


class RowsReply(msgspec.Struct, frozen=True, array_like=True, tag=45):
    """Rows for the first ``answered`` keys asked (absent ones skipped): fewer than asked
    when the byte budget ran out, never zero when any was asked."""

    session: SessionId
    rows: Annotated[list[Row], msgspec.Meta(max_length=ROWS_MAX)]
    answered: Count


class RowsPush(msgspec.Struct, frozen=True, array_like=True, tag=46):
    """Rows you lack or hold older versions of; store each if newer than yours."""

    session: SessionId
    keyspace: KeyspaceName
    rows: Annotated[list[Row], msgspec.Meta(max_length=ROWS_MAX)]


class RowsPushAck(msgspec.Struct, frozen=True, array_like=True, tag=47):
    """The pushed rows went to the write path (``accepted`` of them; the others were for
    ranges the responder does not replicate)."""

    session: SessionId
    accepted: Count


AntiEntropyRequest = DigestRequest | KeysRequest | RowsRequest | RowsPush
AntiEntropyReply = DigestReply | KeysReply | RowsReply | RowsPushAck
AntiEntropyMessage = AntiEntropyRequest | AntiEntropyReply
