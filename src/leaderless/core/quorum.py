"""Consistency levels: how many of a key's N replicas must answer.

With R + W > N a read meets the latest acknowledged write (QUORUM + QUORUM does it for
every N). ONE and TWO trade that for latency and availability.
"""

from __future__ import annotations

LEVELS = ("ONE", "TWO", "QUORUM", "ALL")


class ConsistencyError(ValueError):
    """The level is unknown or asks for more replicas than the keyspace has."""


def required(level: str, replication: int) -> int:
    """Replicas that must answer at ``level`` when the keyspace keeps ``replication``."""
    assert replication >= 1
    if level == "ONE":
        need = 1
    elif level == "TWO":
        need = 2
    elif level == "QUORUM":
        need = replication // 2 + 1
    elif level == "ALL":
        need = replication
    else:
        raise ConsistencyError(f"consistency {level!r} is unknown; use one of "
                               f"{', '.join(LEVELS)}")
    if need > replication:
        raise ConsistencyError(f"consistency {level} needs {need} replicas but the keyspace "
                               f"keeps only {replication}")
    return need
