"""Where a row lives: its token on the ring, and its key in the local store.

A row is addressed by (keyspace, partition key, sort key). The partition key's token
(xxh64) places it on the ring; every row of a partition has the same token, so a partition
lives on one replica set and its rows sort together by sort key.

Store key layout (byte order = scan order)::

    b"d" | len(keyspace):u8 | keyspace | token:u64be | len(pk):u16be | pk | sk

Token before partition key makes a token range one contiguous key range (for anti-entropy
and streaming); the length prefix keeps one partition's rows contiguous and in sort-key
order whatever bytes the keys hold.
"""

from __future__ import annotations

import re
import struct

import xxhash

TOKEN_MAX = (1 << 64) - 1
"""Tokens are unsigned 64-bit: the ring is [0, 2**64)."""
PARTITION_KEY_BYTES_MAX = 1024
SORT_KEY_BYTES_MAX = 1024
"""The issue's limit, "key <= 1 KiB", applies to each part of the key."""
KEYSPACE_NAME_MAX = 48
KEYSPACE_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,47}$")
SYSTEM_PREFIX = "system"
DATA_PREFIX = b"d"

_TOKEN = struct.Struct(">Q")
_PK_LEN = struct.Struct(">H")


class KeyError_(ValueError):
    """A key or keyspace name breaks a documented limit (the caller's input)."""


def token(partition_key: bytes) -> int:
    return xxhash.xxh64_intdigest(partition_key)


def check_keyspace_name(name: str) -> None:
    if not KEYSPACE_PATTERN.match(name):
        raise KeyError_(f"keyspace name {name[:60]!r} is invalid: use 1-{KEYSPACE_NAME_MAX} "
                        "letters, digits or '_', starting with a letter")


def check_key(partition_key: bytes, sort_key: bytes) -> None:
    if not partition_key:
        raise KeyError_("the partition key is empty; give at least one byte")
    if len(partition_key) > PARTITION_KEY_BYTES_MAX:
        raise KeyError_(f"the partition key has {len(partition_key)} bytes; "
                        f"the limit is {PARTITION_KEY_BYTES_MAX}")
    if len(sort_key) > SORT_KEY_BYTES_MAX:
        raise KeyError_(f"the sort key has {len(sort_key)} bytes; "
                        f"the limit is {SORT_KEY_BYTES_MAX}")


def keyspace_prefix(keyspace: str) -> bytes:
    name = keyspace.encode()
    return DATA_PREFIX + bytes([len(name)]) + name


def token_key(keyspace: str, tok: int) -> bytes:
    """The first store key of ``tok`` in ``keyspace`` (for token-range scans)."""
    return keyspace_prefix(keyspace) + _TOKEN.pack(tok)


def partition_prefix(keyspace: str, partition_key: bytes) -> bytes:
    return (keyspace_prefix(keyspace) + _TOKEN.pack(token(partition_key))
            + _PK_LEN.pack(len(partition_key)) + partition_key)


def data_key(keyspace: str, partition_key: bytes, sort_key: bytes = b"") -> bytes:
    return partition_prefix(keyspace, partition_key) + sort_key


def parse_data_key(key: bytes) -> tuple[str, int, bytes, bytes]:
    """(keyspace, token, partition key, sort key) of a store key made by ``data_key``."""
    if not key.startswith(DATA_PREFIX) or len(key) < 2:
        raise ValueError("not a data key")
    ks_len = key[1]
    at = 2 + ks_len
    keyspace = key[2:at].decode()
    (tok,) = _TOKEN.unpack_from(key, at)
    at += _TOKEN.size
    (pk_len,) = _PK_LEN.unpack_from(key, at)
    at += _PK_LEN.size
    return keyspace, tok, key[at:at + pk_len], key[at + pk_len:]


def token_range_bounds(keyspace: str, start: int, end: int) -> list[tuple[bytes, bytes | None]]:
    """Store key bounds [lo, hi) covering tokens in the ring range (start, end], which wraps
    past TOKEN_MAX when start >= end. ``hi`` None means the end of the keyspace."""
    prefix = keyspace_prefix(keyspace)
    after = _next_prefix(prefix)

    def lo(tok_exclusive: int) -> bytes:
        return token_key(keyspace, tok_exclusive + 1) if tok_exclusive < TOKEN_MAX else after

    def hi(tok_inclusive: int) -> bytes:
        return token_key(keyspace, tok_inclusive + 1) if tok_inclusive < TOKEN_MAX else after

    if start < end:
        return [(lo(start), hi(end))]
    # Wrapping (or the whole ring when start == end): (start, MAX] and [0, end].
    return [(lo(start), after), (prefix, hi(end))]


def _next_prefix(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with ``prefix``."""
    stripped = prefix.rstrip(b"\xff")
    assert stripped, "a prefix of only 0xff bytes has no successor"
    return stripped[:-1] + bytes([stripped[-1] + 1])


def prefix_end(prefix: bytes) -> bytes:
    return _next_prefix(prefix)
