"""Wire messages of per-key Paxos (strong mode, CASPaxos) and the values they carry.

A proposer sends ``Prepare``/``Accept``/``Purge`` to the acceptors of one key (the key's N
replicas); an acceptor answers ``Promise``/``Accepted``/``Purged``, or ``Nack`` with the
highest ballot it has promised (so the proposer can pick a higher one at once), or
``PaxosFailure`` when its store failed. Every request carries the proposer's request id
and every reply echoes it.

The replicated value is a ``Register``: the user's bytes (None once deleted: a tombstone),
a version that grows by one per change, and the idempotency ids of the last changes.

Tags 50-59 are this module's (30-36 are the KV data plane's, 40-49 anti-entropy's).
Append-only: they are the wire protocol.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from leaderless.core.cells import VALUE_BYTES_HARD_MAX
from leaderless.core.kv_messages import (
    ErrorText,
    KeyspaceName,
    PartitionKey,
    RequestId,
    SortKey,
    Trace,
)
from leaderless.core.messages import NAME_BYTES_MAX

COUNTER_MAX = 2**63 - 1
RECENT_CHANGES_MAX = 32
"""Idempotency ids a register remembers (its last changes). A client that retries a change
after an ambiguous failure gets the original outcome as long as fewer than this many other
changes of the key landed in between; at one client retry window (seconds) that covers a
key changing several times a second with tens of clients contending. Each entry is ~13
bytes (an 8-byte digest of the id, the version, the counter), so the bound keeps a
register, and every Paxos message and accept write of it, under ~450 bytes of overhead:
64 full ids (~1.4 KB) cost a measured third of strong-mode throughput."""
RECENT_CHANGES_DECODE_MAX = 64
"""What a stored register may hold (registers written before the bound was lowered)."""
IDEMPOTENCY_ID_BYTES_MAX = 64

Counter = Annotated[int, msgspec.Meta(ge=0, le=COUNTER_MAX)]
Version = Annotated[int, msgspec.Meta(ge=0, le=COUNTER_MAX)]
WallMs = Annotated[int, msgspec.Meta(ge=0, le=COUNTER_MAX)]
Number = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
BallotNode = Annotated[str, msgspec.Meta(max_length=NAME_BYTES_MAX)]
"""A node name, or "" in the zero ballot and in an acceptor's purge floor."""
IdempotencyId = Annotated[bytes, msgspec.Meta(min_length=1, max_length=IDEMPOTENCY_ID_BYTES_MAX)]
Value = Annotated[bytes, msgspec.Meta(max_length=VALUE_BYTES_HARD_MAX)]
LOCK_NAME_BYTES_MAX = 256
LockName = Annotated[str, msgspec.Meta(min_length=1, max_length=LOCK_NAME_BYTES_MAX)]
OWNER_BYTES_MAX = 128
Owner = Annotated[str, msgspec.Meta(min_length=1, max_length=OWNER_BYTES_MAX)]
LEASE_TTL_MS_MIN = 100
LEASE_TTL_MS_MAX = 86_400_000
TtlMs = Annotated[int, msgspec.Meta(ge=LEASE_TTL_MS_MIN, le=LEASE_TTL_MS_MAX)]


class Ballot(msgspec.Struct, frozen=True, array_like=True, order=True):
    """Ordered by (counter, node): unique per proposer, and any proposer can always pick a
    higher one by raising the counter."""

    counter: Counter
    node: BallotNode

    def __str__(self) -> str:
        return f"{self.counter}.{self.node}"


ZERO_BALLOT = Ballot(0, "")
"""Lower than every ballot a proposer uses (their counters start at 1)."""


class Recent(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True):
    """One applied change: the digest of its idempotency id (``core.paxos.id_digest``), the
    version it made and, for an increment or a lock grant, the number it produced (the
    outcome a retry of it is answered with)."""

    id: IdempotencyId
    version: Version
    number: Number | None = None


class Fence(msgspec.Struct, frozen=True, array_like=True):
    """A change made under a lock: the lock's name and the fencing token of the lease
    (``core.locks``). The change is refused if the lock has granted a newer token."""

    lock: LockName
    token: Counter


class Register(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True):
    """The value one key's Paxos instance agrees on."""

    version: Version
    """0: never written (or purged); each applied change adds one, a delete included."""
    value: Value | None
    """None: absent (never written, or deleted: a tombstone when ``version`` > 0)."""
    changed_at_ms: WallMs = 0
    """The proposer's wall clock at the last change (a tombstone's age, for purging)."""
    recent: Annotated[list[Recent], msgspec.Meta(max_length=RECENT_CHANGES_DECODE_MAX)] = []
    fence: Fence | None = None
    """The newest fencing token that changed this key (``Put.fence``): a change fenced by
    an older token of the same lock is refused."""
    forgotten_ms: WallMs = 0
    """No change whose id ``recent`` no longer holds was applied after this wall time (the
    clock of the change that pushed the newest of them out); 0: none was pushed out (or
    not known, in registers from before). A client's retry first sent after it is safe
    to apply if its id is not in ``recent`` (``core.paxos.remembers_after``)."""

    @property
    def tombstone(self) -> bool:
        return self.value is None and self.version > 0


EMPTY_REGISTER = Register(0, None)


class Prepare(msgspec.Struct, frozen=True, array_like=True, tag=50):
    """Phase 1: promise to ignore ballots lower than ``ballot`` for this key."""

    id: RequestId
    keyspace: KeyspaceName
    partition: PartitionKey
    sort: SortKey
    ballot: Ballot
    trace: Trace = 0
    """The proposer's operation id of the round's first change (for log correlation)."""


class Promise(msgspec.Struct, frozen=True, array_like=True, tag=51):
    """Promised; with the acceptor's last accepted ballot and register (None: nothing)."""

    id: RequestId
    ballot: Ballot
    accepted: Ballot | None
    register: Register | None


class Accept(msgspec.Struct, frozen=True, array_like=True, tag=52):
    """Phase 2: accept ``register`` at ``ballot``. With ``next_ballot``, also promise it
    (CASPaxos 2.2.1: the next change's prepare rides on this accept)."""

    id: RequestId
    keyspace: KeyspaceName
    partition: PartitionKey
    sort: SortKey
    ballot: Ballot
    register: Register
    next_ballot: Ballot | None = None
    trace: Trace = 0


class Accepted(msgspec.Struct, frozen=True, array_like=True, tag=53):
    id: RequestId
    ballot: Ballot


class Nack(msgspec.Struct, frozen=True, array_like=True, tag=54):
    """Refused: the acceptor has promised ``promised``, which is not lower than the ballot
    asked for."""

    id: RequestId
    promised: Ballot


class Purge(msgspec.Struct, frozen=True, array_like=True, tag=55):
    """Forget this key's state if it is still exactly the tombstone accepted at ``ballot``
    (which every replica has accepted: see ``core.paxos``)."""

    id: RequestId
    keyspace: KeyspaceName
    partition: PartitionKey
    sort: SortKey
    ballot: Ballot


class Purged(msgspec.Struct, frozen=True, array_like=True, tag=56):
    id: RequestId
    purged: bool


class PaxosFailure(msgspec.Struct, frozen=True, array_like=True, tag=57):
    """The acceptor could not act (its store failed); the proposer counts it as no vote."""

    id: RequestId
    error: ErrorText


PaxosRequest = Prepare | Accept | Purge
PaxosReply = Promise | Accepted | Nack | Purged | PaxosFailure


class AcceptorState(msgspec.Struct, frozen=True, array_like=True):
    """What an acceptor keeps per key (stored under ``core.paxos.paxos_key``)."""

    promised: Ballot
    accepted: Ballot | None = None
    register: Register | None = None


# -- changes: what a client asks a round to do to the register --------------------------------


class Read(msgspec.Struct, frozen=True, array_like=True, tag="read"):
    """The identity change: a linearizable read is a full Paxos round that changes nothing."""


class Put(msgspec.Struct, frozen=True, array_like=True, tag="put"):
    value: Value
    fence: Fence | None = None


class Delete(msgspec.Struct, frozen=True, array_like=True, tag="delete"):
    """Write a tombstone (ordered after every earlier change, like any change)."""

    fence: Fence | None = None


class Cas(msgspec.Struct, frozen=True, array_like=True, tag="cas"):
    """Set ``new_value`` if exactly one of the expectations holds: the current version is
    ``expected_version``, or the current value is ``expected_value``, or (with
    ``expected_absent``) the key has no value."""

    new_value: Value
    expected_version: Version | None = None
    expected_value: Value | None = None
    expected_absent: bool = False
    fence: Fence | None = None

    def __post_init__(self) -> None:
        given = ((self.expected_version is not None) + (self.expected_value is not None)
                 + self.expected_absent)
        if given != 1:
            raise ValueError("a cas needs exactly one of expected_version, expected_value "
                             f"or expected_absent (got {given})")


class Incr(msgspec.Struct, frozen=True, array_like=True, tag="incr"):
    """Add ``delta`` to a counter: the value as a decimal ASCII integer (absent reads 0)."""

    delta: Number
    fence: Fence | None = None


class Acquire(msgspec.Struct, frozen=True, array_like=True, tag="acquire"):
    """Grant the lock (this key's register holds a ``core.locks.LockState``) to ``owner``
    for ``ttl_ms`` if it is free or its lease has expired, with the next fencing token.
    The holder asking again gets its lease back, extended, with the same token."""

    owner: Owner
    ttl_ms: TtlMs


class Renew(msgspec.Struct, frozen=True, array_like=True, tag="renew"):
    """Extend the lease ``token`` of ``owner`` by ``ttl_ms`` from now, if it is still the
    lock's current, unexpired lease."""

    owner: Owner
    token: Counter
    ttl_ms: TtlMs


class Release(msgspec.Struct, frozen=True, array_like=True, tag="release"):
    """Free the lock if ``token`` of ``owner`` is still its current lease."""

    owner: Owner
    token: Counter


class TaskChange(msgspec.Struct, frozen=True, array_like=True, tag="task"):
    """A change of a task register (``core.tasks.apply_task``): submit, claim, start,
    renew, finish, release, cancel, or expire (delete a finished task past its result
    TTL)."""

    kind: Literal["submit", "claim", "start", "renew", "finish", "release", "cancel",
                  "expire"]
    node: Annotated[str, msgspec.Meta(max_length=64)] = ""
    token: Counter = 0
    ttl_ms: Annotated[int, msgspec.Meta(ge=0, le=3_600_000)] = 0
    payload: Annotated[bytes, msgspec.Meta(max_length=(256 + 8) * 1024)] = b""
    """submit: an encoded ``TaskSpec``; finish: an encoded ``TaskOutcome``. A submit with
    ``ttl_ms`` is also the submitting node's claim."""


LockChange = Acquire | Renew | Release
Change = Read | Put | Delete | Cas | Incr | Acquire | Renew | Release | TaskChange
