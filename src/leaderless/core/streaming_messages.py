"""Wire messages of range streaming (``core.streaming``): tags 70-79, append-only.

A node that gains a token range asks each source for it page by page: ``StreamRequest``
names the range and a cursor, ``StreamPage`` answers with raw store rows (data rows, then
Paxos acceptor rows of the range) in a fixed order, a checksum over them and the cursor to
ask from next. The source keeps no state between pages: a request carries everything, so a
source that restarts mid-stream costs the fetcher one timeout and nothing else.

Every field a peer controls is bounded. A page holds at most ``PAGE_ROWS_MAX`` rows and
``PAGE_BYTES_MAX`` bytes of keys and values plus one row (a page always carries at least
one row when the range has any left, so a single row larger than the budget still goes);
with the 1 MiB value limit that keeps a page far under the 8 MiB frame
(``core.codec.FRAME_BYTES_MAX``).

Tokens travel as unsigned 64-bit integers (``ge=0``: msgpack itself stops at 2**64 - 1).
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from leaderless.core.anti_entropy_messages import STORE_KEY_BYTES_MAX
from leaderless.core.codec import FRAME_BYTES_MAX
from leaderless.core.kv_messages import ErrorText, KeyspaceName, RequestId

PAGE_ROWS_MAX = 4096
"""Rows in one page: 4096 rows of the smallest useful size (~250 bytes) fill a 1 MiB
page; more rows per page would only save round trips on ranges of tiny rows."""
PAGE_BYTES_MAX = 4 << 20
"""The largest byte budget a request may ask for: half a frame, so a page plus one more
row (up to the 1 MiB value limit) and the envelope stays under the 8 MiB frame."""
ROW_KEY_BYTES_MAX = 1 + STORE_KEY_BYTES_MAX
"""A data key, or a Paxos key (b"p" + data key)."""
ROW_VALUE_BYTES_MAX = FRAME_BYTES_MAX
"""An encoded cell or acceptor state: the value limit plus a few hundred bytes of
version, ballots and idempotency ids; the frame bounds it anyway."""

Token = Annotated[int, msgspec.Meta(ge=0)]
Cursor = Annotated[bytes, msgspec.Meta(max_length=ROW_KEY_BYTES_MAX)]
"""The store key of the last row received (b"": from the start of the range)."""


class StreamRequest(msgspec.Struct, frozen=True, array_like=True, tag=70):
    """Send the rows of ring range (start, end] of ``keyspace`` that come after ``after``
    in stream order (data rows, then Paxos rows), at most ``rows_max`` rows and about
    ``bytes_max`` bytes of keys and values."""

    id: RequestId
    keyspace: KeyspaceName
    start: Token
    end: Token
    after: Cursor
    bytes_max: Annotated[int, msgspec.Meta(ge=1, le=PAGE_BYTES_MAX)]
    rows_max: Annotated[int, msgspec.Meta(ge=1, le=PAGE_ROWS_MAX)]


class StreamRow(msgspec.Struct, frozen=True, array_like=True):
    """One store row as the source holds it: (key, encoded cell or acceptor state)."""

    key: Annotated[bytes, msgspec.Meta(min_length=1, max_length=ROW_KEY_BYTES_MAX)]
    value: Annotated[bytes, msgspec.Meta(max_length=ROW_VALUE_BYTES_MAX)]


class StreamPage(msgspec.Struct, frozen=True, array_like=True, tag=71):
    """Rows after the request's cursor, in stream order. ``next_after``: the cursor to ask
    from next, or None when the range is exhausted. ``checksum``: ``page_checksum`` of the
    rows. ``error``: the source could not serve the request (then no rows)."""

    id: RequestId
    rows: Annotated[list[StreamRow], msgspec.Meta(max_length=PAGE_ROWS_MAX)]
    next_after: Cursor | None
    checksum: Annotated[int, msgspec.Meta(ge=0)]
    error: ErrorText = ""


StreamMessage = StreamRequest | StreamPage
