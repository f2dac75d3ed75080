"""Wire messages of watches: a watching node subscribes at every acceptor, acceptors
report what they accept for watched keys, and the watcher learns what was chosen.

All travel node-to-node on the TCP port, each on the sender's own link to the receiver
(never as a reply on the same connection). Tags 60-69 are this module's. Append-only.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from leaderless.core.kv_messages import KeyspaceName, PartitionKey, SortKey
from leaderless.core.paxos_messages import Ballot, Register

SNAPSHOT_KEYS_MAX = 10_000
"""Keys one acceptor reports for one prefix snapshot; a prefix holding more cannot be
watched from a snapshot (the watch fails with a message saying so)."""

SubId = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Seq = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Prefix = Annotated[bytes, msgspec.Meta(max_length=1024)]


class WatchFilter(msgspec.Struct, frozen=True, array_like=True):
    """Keys of ``keyspace`` whose partition key is ``partition`` and sort key ``sort``
    (``prefix`` False), or whose partition key starts with ``partition`` (``prefix``
    True, any sort key; an empty prefix is the whole keyspace)."""

    keyspace: KeyspaceName
    partition: Prefix
    sort: SortKey = b""
    prefix: bool = False

    def matches(self, keyspace: str, partition: bytes, sort: bytes) -> bool:
        if keyspace != self.keyspace:
            return False
        if self.prefix:
            return partition.startswith(self.partition)
        return partition == self.partition and sort == self.sort


class WatchSubscribe(msgspec.Struct, frozen=True, array_like=True, tag=60):
    """Report every accept of a key matching ``filter`` to the sender, for the next
    ``lease_s`` (renewed by sending it again)."""

    sub: SubId
    filter: WatchFilter
    lease_s: Annotated[float, msgspec.Meta(gt=0, le=3600)]


class WatchSubscribed(msgspec.Struct, frozen=True, array_like=True, tag=61):
    """``fresh``: the acceptor did not hold this subscription (new, or lost by a restart
    or expiry: reports may have been missed). ``seq``: the last report's number."""

    sub: SubId
    fresh: bool
    seq: Seq


class WatchUnsubscribe(msgspec.Struct, frozen=True, array_like=True, tag=62):
    sub: SubId


class WatchAccepted(msgspec.Struct, frozen=True, array_like=True, tag=63):
    """The sender accepted ``register`` at ``ballot`` for this key (durably). Reports of
    one subscription are numbered 1, 2, ...; a gap means one was lost."""

    sub: SubId
    seq: Seq
    keyspace: KeyspaceName
    partition: PartitionKey
    sort: SortKey
    ballot: Ballot
    register: Register


class WatchSnapshot(msgspec.Struct, frozen=True, array_like=True, tag=64):
    """Report the accepted state of every key matching the subscription's filter."""

    sub: SubId


class SnapshotEntry(msgspec.Struct, frozen=True, array_like=True):
    partition: PartitionKey
    sort: SortKey
    ballot: Ballot
    register: Register


class WatchSnapshotReply(msgspec.Struct, frozen=True, array_like=True, tag=65):
    sub: SubId
    seq: Seq
    """The subscription's report number when the snapshot was taken."""
    entries: Annotated[list[SnapshotEntry], msgspec.Meta(max_length=SNAPSHOT_KEYS_MAX)]
    truncated: bool = False
    known: bool = True
    """False: the acceptor holds no such subscription (it expired or was never made)."""


WatchMessage = (WatchSubscribe | WatchSubscribed | WatchUnsubscribe | WatchAccepted
                | WatchSnapshot | WatchSnapshotReply)
