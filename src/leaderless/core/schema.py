"""Keyspace definitions, kept in the system keyspace ``system_schema`` on every node.

A definition is a row (partition key = keyspace name) replicated to every member of the
ring and written and read at QUORUM of them, so any node can learn a keyspace another node
created without a metadata server. Anti-entropy spreads it to the rest.
"""

from __future__ import annotations

import msgspec

from leaderless.core.keys import KeyError_, check_keyspace_name
from leaderless.core.quorum import LEVELS

SYSTEM_KEYSPACE = "system_schema"
MODES = ("eventual", "strong")
REPLICATION_MAX = 15


class KeyspaceDef(msgspec.Struct, frozen=True, array_like=True):
    name: str
    replication: int = 3
    mode: str = "eventual"
    read_consistency: str = "QUORUM"
    write_consistency: str = "QUORUM"


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(KeyspaceDef)


def encode_def(definition: KeyspaceDef) -> bytes:
    return _encoder.encode(definition)


def decode_def(data: bytes) -> KeyspaceDef:
    return _decoder.decode(data)


def validate(definition: KeyspaceDef) -> None:
    """Raises KeyError_ (a ValueError) naming the bad field."""
    check_keyspace_name(definition.name)
    if definition.name.startswith("system"):
        raise KeyError_(f"keyspace {definition.name!r}: names starting with 'system' are "
                        "reserved for the cluster's own data")
    if not 1 <= definition.replication <= REPLICATION_MAX:
        raise KeyError_(f"replication {definition.replication} is out of range "
                        f"1..{REPLICATION_MAX}")
    if definition.mode not in MODES:
        raise KeyError_(f"mode {definition.mode!r} is unknown; use one of {', '.join(MODES)}")
    for field in ("read_consistency", "write_consistency"):
        level = getattr(definition, field)
        if level not in LEVELS:
            raise KeyError_(f"{field} {level!r} is unknown; use one of {', '.join(LEVELS)}")
