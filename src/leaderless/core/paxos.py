"""Per-key Paxos in the CASPaxos style (Rystsov 2018): strong mode without a leader.

Each key of a strong keyspace is one replicated register, agreed by single-decree Paxos
rounds among the key's N replicas (the ring's preference list). Any node proposes. A round
changes the register by a declarative ``Change`` (read, put, delete, cas, incr):

1. prepare: the proposer picks a ballot (counter, node) higher than any it has seen and
   asks every replica to promise it; a majority answers with its last accepted register;
2. the proposer applies the change to the register of the highest accepted ballot (or the
   empty register) and asks every replica to accept the result at the same ballot;
3. a majority of accepts makes the result chosen: the client gets its outcome.

A read is the same round with the identity change (CASPaxos): no shortcut, so it is
linearizable even right after a proposer failed half-way. A conflict (a cas whose
expectation fails) is also the identity, accepted before it is reported, so the value it
reports is chosen.

**One round trip.** An accept may carry ``next_ballot``: the acceptor accepts and promises
that next ballot in the same write (CASPaxos 2.2.1). A proposer whose round succeeded
without any refusal keeps (next ballot, register) for the key, and its next change of the
key goes straight to phase 2. If another proposer got in between, a majority refuses and
the proposer falls back to a full round.

**Contention.** A round that can no longer reach a majority (refusals) is retried with a
higher ballot after a random backoff (``rng``), at most ``retries_max`` times, then fails
with ``contention``. Changes queued for the same key at one proposer run one round at a
time and share it (up to ``batch_max`` per round), so a hot key on one node costs one
round per batch, not per change.

**Idempotency.** Each change carries an idempotency id; the register remembers the ids
of its last ``RECENT_CHANGES_MAX`` changes with the version each made. A change whose id is
remembered is not applied again: it is answered with the original outcome. This covers the
proposer's own retries (an accept that reached a minority may still be chosen later) and a
client retrying after a timeout. The window is bounded: a proposer retrying a change whose
accept went out remembers the version it first proposed it on, and if more changes landed
since than the register remembers ids of (another proposer adopted the change, then kept
changing the key while this one backed off), the change fails as ``maybe_applied`` instead
of being applied a second time. A client's own retry with the same id is safe while fewer
than ``RECENT_CHANGES_MAX`` changes of the key land in between (it is sent at once).

**Deletion.** A delete writes a tombstone (``value`` None, version + 1) through Paxos, so
it is ordered after every earlier change. The acceptor's state for a key is removed only by
a purge round, after the grace period: the proposer runs a round whose accept must be
acknowledged by *all* N replicas (so no replica still holds anything older than the
tombstone), then asks each to forget the key iff its state is still exactly that tombstone
at that ballot and nothing higher was promised. An acceptor without state for a key acts as
an empty register that has promised the node's *purge floor* (the highest ballot of any
purge it performed, kept durably), so a delayed or paused proposer's old accept (whose
ballot is below the tombstone's) is still refused after the purge. Why nothing resurrects:
after the all-replica accept, every acceptor holds the tombstone or something chosen later;
forgetting the tombstone leaves "absent", the same value, so any majority still answers
either "absent" or a newer chosen value. What is not kept across a purge is the version
number: a purged key's versions restart at 1, so ``cas(expected_version)`` must not use a
version read before a delete that is older than the grace period (the same bound Cassandra
puts on tombstones).

State machines, sans-I/O: ``Acceptor.handle`` returns (reply, store writes) and the runtime
persists the writes before it sends the reply; the ``Proposer`` returns effects
(``SendAcceptor``, ``Respond``) and is driven by ``on_reply`` and ``on_tick`` at
``next_deadline``.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import random
from collections.abc import Iterator

import msgspec
import xxhash

from leaderless.core.coordinator import Topology
from leaderless.core.keys import data_key, parse_data_key, token
from leaderless.core.locks import CLOCK_SKEW_MAX_MS, LockState, apply_lock, encode_lock
from leaderless.core.paxos_messages import (
    COUNTER_MAX,
    EMPTY_REGISTER,
    RECENT_CHANGES_MAX,
    ZERO_BALLOT,
    Accept,
    Accepted,
    AcceptorState,
    Ballot,
    Cas,
    Change,
    Delete,
    Incr,
    LockChange,
    Nack,
    PaxosFailure,
    PaxosReply,
    PaxosRequest,
    Prepare,
    Promise,
    Purge,
    Purged,
    Put,
    Read,
    Recent,
    Register,
    Release,
    TaskChange,
)
from leaderless.core.tasks import TaskRefused, apply_task
from leaderless.storage.store import Store, Write

__all__ = [
    "PAXOS_PREFIX", "FLOOR_KEY", "Ballot", "Acceptor", "Proposer", "ProposerConfig",
    "SendAcceptor", "Respond", "Done", "Conflict", "Fenced", "Failed", "PurgeDone", "Outcome",
    "Result", "Effect", "apply_change", "paxos_key", "parse_paxos_key",
    "encode_state", "decode_state", "id_digest",
]

PAXOS_PREFIX = b"p"
"""Acceptor state of a key lives at ``b"p" + data_key(...)``: beside the eventual-mode
rows (``b"d"``), which the Merkle trees, anti-entropy and purge sweep read as cells, and in
the same token order, so a token range's Paxos state is one contiguous key range to stream."""
FLOOR_KEY = b"pf"
"""The node's purge floor (an encoded ``Ballot``); data keys start with b"d", so no
``paxos_key`` can be this key."""


RETRY_TRANSIT_MS = 1000
"""How long a client's retry may take from being sent to being proposed (its ``retry_ms``
is measured at the client): the assumed bound that makes retried changes safe, in the
same spirit as the clock bound."""


def paxos_key(keyspace: str, partition: bytes, sort: bytes) -> bytes:
    return PAXOS_PREFIX + data_key(keyspace, partition, sort)


def parse_paxos_key(key: bytes) -> tuple[str, bytes, bytes]:
    """(keyspace, partition, sort) of a key made by ``paxos_key``."""
    if not key.startswith(PAXOS_PREFIX) or key == FLOOR_KEY:
        raise ValueError("not a paxos key")
    keyspace, _, partition, sort = parse_data_key(key[len(PAXOS_PREFIX):])
    return keyspace, partition, sort


_state_encoder = msgspec.msgpack.Encoder()
_state_decoder = msgspec.msgpack.Decoder(AcceptorState)
_ballot_decoder = msgspec.msgpack.Decoder(Ballot)


def encode_state(state: AcceptorState) -> bytes:
    return _state_encoder.encode(state)


def decode_state(data: bytes) -> AcceptorState:
    return _state_decoder.decode(data)


# -- outcomes and changes -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Done:
    """The change is chosen. ``value``: the register's value after it (None: absent); for
    a read, the current value. ``duplicate``: its idempotency id was already applied, and
    this is that earlier outcome."""

    version: int
    value: bytes | None
    duplicate: bool = False
    changed_at_ms: int = dataclasses.field(default=0, compare=False)
    """For a read: when the value was last changed (the proposer's wall clock);
    informational, so not part of equality."""


@dataclasses.dataclass(frozen=True, slots=True)
class Conflict:
    """A cas whose expectation failed (or a lock or task change that does not apply):
    the current (chosen) version and value."""

    version: int
    value: bytes | None
    reason: str = ""
    """For a task change: why it does not apply (``core.tasks.TaskRefused``)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Fenced:
    """A change made under ``Fence(lock, token)`` was refused: this key was already changed
    under ``token`` (newer) of the same lock."""

    lock: str
    token: int


@dataclasses.dataclass(frozen=True, slots=True)
class Failed:
    code: str
    """``unavailable`` (fewer than a majority of replicas up), ``timeout``, ``contention``
    (refused ``retries_max`` times), ``overloaded`` (this proposer's bounds), ``invalid``
    (the change does not apply to the value, e.g. incr of a non-number; not retryable)."""
    message: str
    received: int = 0
    required: int = 0
    maybe_applied: bool = False
    """True when an accept carrying the change was sent: it may yet be chosen. Retry with
    the same idempotency id to learn the outcome without applying it twice."""


@dataclasses.dataclass(frozen=True, slots=True)
class PurgeDone:
    purged: bool
    reason: str = ""


Outcome = Done | Conflict | Fenced | Failed
Result = Done | Conflict | Fenced | Failed | PurgeDone


def _number(value: bytes | None) -> int | None:
    if value is None:
        return 0
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        return None
    if not text or len(text) > 20 or not text.lstrip("-").isdigit():
        return None
    return int(text)


def id_digest(idempotency_id: bytes) -> bytes:
    """What a register remembers of an idempotency id: 8 bytes of xxh64 (ids are random
    128-bit values or client-chosen strings; two ids of one key's last changes colliding
    has odds of about 2^-59)."""
    return xxhash.xxh64_digest(idempotency_id)


def apply_change(register: Register, change: Change, idempotency_id: bytes,
                 wall_ms: int) -> tuple[Register, Outcome]:
    """The register after ``change`` and the outcome the client gets. A change that does
    not apply (conflict, fenced, invalid, read, duplicate) returns ``register`` itself."""
    if isinstance(change, Read):
        return register, Done(register.version, register.value,
                              changed_at_ms=register.changed_at_ms)
    digest = id_digest(idempotency_id)
    for seen in register.recent:
        if seen.id == digest:
            return register, _replayed(change, seen)
    fence = None if isinstance(change, LockChange | TaskChange) else change.fence
    if (fence is not None and register.fence is not None
            and register.fence.lock == fence.lock and fence.token < register.fence.token):
        return register, Fenced(fence.lock, register.fence.token)
    number: int | None = None
    if isinstance(change, LockChange):
        new_lock, _ = apply_lock(register, change, wall_ms)
        if new_lock is None:
            return register, Conflict(register.version, register.value)
        new_value: bytes | None = encode_lock(new_lock)
        number = new_lock.token
    elif isinstance(change, TaskChange):
        try:
            new_value = apply_task(register.value, change, wall_ms)
        except TaskRefused as refused:
            return register, Conflict(register.version, register.value, refused.reason)
    elif isinstance(change, Put):
        new_value = change.value
    elif isinstance(change, Delete):
        new_value = None
    elif isinstance(change, Cas):
        if not _expectation_holds(register, change):
            return register, Conflict(register.version, register.value)
        new_value = change.new_value
    else:
        current_number = _number(register.value)
        if current_number is None:
            return register, Failed("invalid", "incr needs the value to be a decimal integer "
                                    f"(it holds {len(register.value or b'')} other bytes)")
        total = current_number + change.delta
        if not -(2**63) <= total < 2**63:
            return register, Failed("invalid", f"incr by {change.delta} overflows 64 bits")
        new_value = str(total).encode()
        number = total
    assert register.version < COUNTER_MAX, "version space exhausted"
    version = register.version + 1
    recent = [*register.recent[-(RECENT_CHANGES_MAX - 1):], Recent(digest, version, number)]
    forgotten_ms = register.forgotten_ms
    if len(register.recent) >= RECENT_CHANGES_MAX:  # the oldest id is pushed out now
        forgotten_ms = max(forgotten_ms, wall_ms)
    if fence is None or (register.fence is not None and register.fence.lock == fence.lock
                         and register.fence.token > fence.token):
        fence = register.fence
    return (Register(version, new_value, wall_ms, recent, fence, forgotten_ms),
            Done(version, new_value))


def remembers_since(register: Register, base_version: int) -> bool:
    """Whether ``register`` remembers the id of every change made above ``base_version``
    (each change adds one version and one remembered id, the last ``RECENT_CHANGES_MAX``
    kept). If not, a change first proposed on ``base_version`` may have been chosen and
    forgotten since: applying it again could apply it twice."""
    if register.version <= base_version:
        return True
    return bool(register.recent) and register.recent[0].version <= base_version + 1


def remembers_after(register: Register, after_ms: int) -> bool:
    """Whether ``register`` remembers the id of every change applied after wall time
    ``after_ms``: it remembers every change it ever had, or the ids it forgot were pushed
    out before then (clocks differ by less than the widening ``after_ms`` got)."""
    if not register.recent:
        return register.version == 0
    if register.recent[0].version == 1:
        return True
    return 0 < register.forgotten_ms < after_ms


def _forgotten(register: Register, op: _Op) -> str:
    """Why ``op`` must not be applied to ``register`` ("" if it may be): an earlier attempt
    of it may be among the changes the register no longer remembers the ids of."""
    if op.base_version is not None and not remembers_since(register, op.base_version):
        why = "an earlier round of this proposer"
    elif op.earlier_after_ms and not remembers_after(register, op.earlier_after_ms):
        why = "the client's earlier attempt"
    else:
        return ""  # the common case, checked first: a first try, or nothing forgotten
    digest = id_digest(op.idempotency_id)
    if any(seen.id == digest for seen in register.recent):
        return ""  # remembered: answered with its outcome, not applied again
    return why


def _expectation_holds(register: Register, change: Cas) -> bool:
    if change.expected_version is not None:
        return register.version == change.expected_version
    if change.expected_absent:
        return register.value is None
    return register.value is not None and register.value == change.expected_value


def _replayed(change: Change, seen: Recent) -> Done:
    if isinstance(change, Put):
        return Done(seen.version, change.value, duplicate=True)
    if isinstance(change, Cas):
        return Done(seen.version, change.new_value, duplicate=True)
    if isinstance(change, Incr):
        number = seen.number if seen.number is not None else 0
        return Done(seen.version, str(number).encode(), duplicate=True)
    if isinstance(change, LockChange):
        # The lease as granted (its token); the expiry is not remembered, and the client
        # times its lease from when it sent the request anyway.
        holder = "" if isinstance(change, Release) else change.owner
        return Done(seen.version, encode_lock(LockState(holder, seen.number or 0, 0)),
                    duplicate=True)
    return Done(seen.version, None, duplicate=True)


# -- acceptor -------------------------------------------------------------------------------


@dataclasses.dataclass
class AcceptorCounters:
    promises: int = 0
    accepts: int = 0
    refusals: int = 0
    purges: int = 0


class Acceptor:
    """One node's acceptor for every strong key it replicates, over its store.

    ``handle`` returns the reply and the writes that must be durable before the reply is
    sent; the caller writes them to the store before it handles the next request (the next
    request must see them), exactly like ``Replica.handle``. Nothing is cached: after a
    restart the acceptor is whatever the store holds.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.counters = AcceptorCounters()

    def floor(self) -> Ballot:
        raw = self.store.get(FLOOR_KEY)
        return _ballot_decoder.decode(raw) if raw is not None else ZERO_BALLOT

    def state(self, keyspace: str, partition: bytes, sort: bytes) -> AcceptorState:
        raw = self.store.get(paxos_key(keyspace, partition, sort))
        return decode_state(raw) if raw is not None else AcceptorState(self.floor())

    def handle(self, request: PaxosRequest) -> tuple[PaxosReply, list[Write]]:
        key = paxos_key(request.keyspace, request.partition, request.sort)
        raw = self.store.get(key)
        state = decode_state(raw) if raw is not None else AcceptorState(self.floor())
        if isinstance(request, Prepare):
            # Strictly higher: a ballot is promised once, so a proposer that restarted and
            # reuses a ballot can never gather a second majority for it.
            if request.ballot <= state.promised:
                self.counters.refusals += 1
                return Nack(request.id, state.promised), []
            self.counters.promises += 1
            new = AcceptorState(request.ballot, state.accepted, state.register)
            return (Promise(request.id, request.ballot, state.accepted, state.register),
                    [(key, encode_state(new))])
        if isinstance(request, Accept):
            if request.ballot < state.promised:
                self.counters.refusals += 1
                return Nack(request.id, state.promised), []
            promised = request.ballot
            if request.next_ballot is not None and request.next_ballot > request.ballot:
                promised = request.next_ballot  # (a lower one is a peer's bug: ignored)
            self.counters.accepts += 1
            new = AcceptorState(promised, request.ballot, request.register)
            return Accepted(request.id, request.ballot), [(key, encode_state(new))]
        return self._purge(key, state, request)

    def _purge(self, key: bytes, state: AcceptorState,
               request: Purge) -> tuple[PaxosReply, list[Write]]:
        exact = (state.accepted == request.ballot and state.promised == request.ballot
                 and state.register is not None and state.register.tombstone)
        if not exact:
            return Purged(request.id, False), []
        self.counters.purges += 1
        writes: list[Write] = [(key, None)]
        if request.ballot > self.floor():
            writes.append((FLOOR_KEY, _state_encoder.encode(request.ballot)))
        return Purged(request.id, True), writes

    def tombstones(self, cursor: bytes, wall_ms: int, grace_ms: int,
                   keys_max: int) -> tuple[list[tuple[str, bytes, bytes]], bytes | None]:
        """Keys (keyspace, partition, sort) whose accepted register is a tombstone older
        than ``grace_ms``, scanning at most ``keys_max`` states from ``cursor`` (start at
        ``PAXOS_PREFIX + b"d"``); and where to resume (None: done). The runtime hands each
        to ``Proposer.purge``."""
        assert keys_max > 0
        found: list[tuple[str, bytes, bytes]] = []
        last: bytes | None = None
        for key, raw in self.store.scan(max(cursor, PAXOS_PREFIX + b"d"), PAXOS_PREFIX + b"e",
                                        limit=keys_max):
            last = key
            register = decode_state(raw).register
            if (register is not None and register.tombstone
                    and wall_ms - register.changed_at_ms > grace_ms):
                found.append(parse_paxos_key(key))
        return found, None if last is None else last + b"\x00"


# -- proposer -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProposerConfig:
    timeout_s: float = 2.0
    """A change's deadline from ``propose``, retries included (as the eventual-mode write
    timeout: long enough for a busy disk, short enough to beat a client's own timeout)."""
    round_timeout_s: float = 0.25
    """A round still short of its quorum after this is abandoned and started afresh (a
    higher ballot, a full prepare), so a lost message or a replica that died silently costs
    one round, not the change's whole ``timeout_s``. Well above a LAN round trip with an
    fsync under load (p99 tens of ms)."""
    retries_max: int = 8
    """Rounds refused by a higher ballot before ``contention``; with the backoff below,
    about 0.5 s of duelling, well inside ``timeout_s``."""
    backoff_base_s: float = 0.002
    """First retry waits uniform(0, base); each further one doubles the range (a LAN round
    trip is ~0.2-1 ms, so two duelling proposers part after a retry or two)."""
    backoff_max_s: float = 0.1
    batch_max: int = 64
    """Queued changes of one key that share one round (each still versioned one by one)."""
    queue_max: int = 1024
    """Changes waiting for one key at this proposer; beyond it: ``overloaded``."""
    ops_in_flight_max: int = 100_000
    """Changes this proposer holds at once (queued or in a round); beyond it: ``overloaded``."""
    cached_keys_max: int = 10_000
    """Keys whose (next ballot, register) is kept for the one-round-trip path, least
    recently used dropped first (a dropped key just costs one full round next time)."""


@dataclasses.dataclass(frozen=True, slots=True)
class SendAcceptor:
    to: str
    """A replica of the key (possibly this node: deliver it to the local ``Acceptor``)."""
    message: PaxosRequest


@dataclasses.dataclass(frozen=True, slots=True)
class Respond:
    op_id: int
    result: Result


Effect = SendAcceptor | Respond

_KeyId = tuple[str, bytes, bytes]


@dataclasses.dataclass
class ProposerCounters:
    changes: int = 0
    rounds: int = 0
    one_rtt_rounds: int = 0
    refused_rounds: int = 0
    retries: int = 0
    unavailable: int = 0
    timeouts: int = 0
    contention: int = 0
    duplicates: int = 0
    purges: int = 0


@dataclasses.dataclass
class _Op:
    op_id: int
    change: Change | None
    """None: a purge."""
    idempotency_id: bytes
    wall_ms: int
    deadline: float
    attempts: int = 0
    accept_sent: bool = False
    grace_ms: int = 0
    base_version: int | None = None
    """The register version this change was first proposed on: once an accept carrying it
    was sent, it may be chosen at any version above this one."""
    earlier_after_ms: int = 0
    """A client's retry: an earlier attempt of this change (same idempotency id) may have
    been applied after this wall time (this node's clock, widened by the clock bound and
    ``RETRY_TRANSIT_MS``); 0: the first attempt."""


@dataclasses.dataclass
class _Round:
    ops: list[_Op]
    ballot: Ballot
    phase: str
    """``prepare`` | ``accept`` | ``purge``"""
    replicas: tuple[str, ...]
    need: int
    deadline: float
    sent: dict[int, str] = dataclasses.field(default_factory=dict)
    promises: dict[str, tuple[Ballot | None, Register | None]] = dataclasses.field(
        default_factory=dict)
    acks: int = 0
    refusals: int = 0
    failures: int = 0
    proposed: Register | None = None
    outcomes: list[Outcome] = dataclasses.field(default_factory=list)
    next_ballot: Ballot | None = None


@dataclasses.dataclass
class _Key:
    key: _KeyId
    replication: int
    topology: Topology
    queue: collections.deque[_Op] = dataclasses.field(default_factory=collections.deque)
    round: _Round | None = None
    retry_at: float | None = None


class Proposer:
    """One node's proposer for all strong keys. ``propose`` queues a change; changes of one
    key run one round at a time (sharing it), so the one-round-trip path and idempotency
    checks see every earlier change of this proposer."""

    def __init__(self, me: str, config: ProposerConfig, ids: Iterator[int],
                 rng: random.Random) -> None:
        assert config.retries_max >= 0 and config.batch_max >= 1
        self.me = me
        self.config = config
        self.counters = ProposerCounters()
        self._ids = ids
        self._rng = rng
        self._counter = 0
        """The highest ballot counter seen (own, promised or accepted anywhere)."""
        self._keys: dict[_KeyId, _Key] = {}
        self._by_request: dict[int, _KeyId] = {}
        self._timers: list[tuple[float, int, _KeyId]] = []
        self._timer_seq = 0
        self._cache: collections.OrderedDict[_KeyId, tuple[Ballot, Register]] = (
            collections.OrderedDict())
        self._ops = 0

    # -- requests ----------------------------------------------------------------------

    def propose(self, now: float, op_id: int, topology: Topology, keyspace: str,
                replication: int, partition: bytes, sort: bytes, change: Change,
                idempotency_id: bytes = b"", wall_ms: int = 0,
                retry_ms: int = 0) -> list[Effect]:
        """Apply ``change`` to the key through Paxos; the outcome comes as ``Respond``.

        ``idempotency_id`` (1-64 bytes): the client's id for this change, the same on each
        of its retries; empty: this proposer draws a random one (which still makes its own
        internal retries safe). ``wall_ms``: this node's wall clock, stamped on the new
        register (a tombstone's age for purging). ``retry_ms``: a client's retry of a change
        it sent this long ago (an earlier attempt may have been applied): if the register no
        longer remembers every change since then and not this id, the retry fails as
        ``maybe_applied`` instead of applying the change twice."""
        self.counters.changes += 1
        op_id_bytes = idempotency_id or self._rng.getrandbits(128).to_bytes(16, "big")
        op = _Op(op_id, change, op_id_bytes, wall_ms, now + self.config.timeout_s)
        if retry_ms and idempotency_id:
            op.earlier_after_ms = max(
                1, wall_ms - retry_ms - CLOCK_SKEW_MAX_MS - RETRY_TRANSIT_MS)
        return self._enqueue(now, op, topology, (keyspace, partition, sort), replication)

    def purge(self, now: float, op_id: int, topology: Topology, keyspace: str,
              replication: int, partition: bytes, sort: bytes, wall_ms: int,
              grace_ms: int) -> list[Effect]:
        """Forget a tombstone older than ``grace_ms`` on every replica (all N must be up and
        accept it first); answers ``PurgeDone``."""
        self.counters.purges += 1
        op = _Op(op_id, None, b"", wall_ms, now + self.config.timeout_s, grace_ms=grace_ms)
        return self._enqueue(now, op, topology, (keyspace, partition, sort), replication)

    def _enqueue(self, now: float, op: _Op, topology: Topology, key: _KeyId,
                 replication: int) -> list[Effect]:
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = _Key(key, replication, topology)
        state.topology = topology
        state.replication = replication
        if self._ops >= self.config.ops_in_flight_max or len(state.queue) >= self.config.queue_max:
            if state.round is None and not state.queue:
                del self._keys[key]
            return [Respond(op.op_id, Failed(
                "overloaded", "this node has too many strong changes in flight; retry "
                "with back-off"))]
        self._ops += 1
        state.queue.append(op)
        self._arm(op.deadline, key)
        if state.round is None and state.retry_at is None:
            return self._start_round(now, state)
        return []

    def _arm(self, when: float, key: _KeyId) -> None:
        self._timer_seq += 1
        heapq.heappush(self._timers, (when, self._timer_seq, key))

    def _next_ballot(self) -> Ballot:
        self._counter += 1
        assert self._counter < COUNTER_MAX, "ballot counter exhausted"
        return Ballot(self._counter, self.me)

    def _see(self, ballot: Ballot | None) -> None:
        if ballot is not None and ballot.counter > self._counter:
            self._counter = ballot.counter

    # -- rounds ------------------------------------------------------------------------

    def _start_round(self, now: float, state: _Key) -> list[Effect]:
        assert state.round is None
        state.retry_at = None
        effects = self._expire_queued(now, state)
        if not state.queue:
            self._forget_if_idle(state)
            return effects
        replication = state.replication
        tok = token(state.key[1])
        replicas = state.topology.ring.preference_list(tok, replication)
        placement = state.topology.placement
        extra = placement.extra_replicas(tok, replication) if placement is not None else ()
        # The ring is changing: the acceptors of every replica set a reader may use, and
        # one more acknowledgement per extra acceptor (``core.placement``).
        replicas += extra
        live = [r for r in replicas if r in state.topology.up]
        purge = state.queue[0].change is None
        need = len(replicas) if purge else replication // 2 + 1 + len(extra)
        if len(live) < need:
            while state.queue:
                op = state.queue.popleft()
                self.counters.unavailable += 1
                what = "all of" if purge else "a majority of"
                effects.append(self._finish(op, Failed(
                    "unavailable", f"{len(live)} of {len(replicas)} replicas are up; "
                    f"{'a purge' if purge else 'a strong change'} needs {what} them",
                    len(live), need, op.accept_sent)))
            self._forget_if_idle(state)
            return effects
        ops = [state.queue.popleft()]
        while (not purge and state.queue and len(ops) < self.config.batch_max
               and state.queue[0].change is not None):
            ops.append(state.queue.popleft())
        deadline = min(min(op.deadline for op in ops), now + self.config.round_timeout_s)
        self.counters.rounds += 1
        self._arm(deadline, state.key)
        cached = None if purge else self._cache.pop(state.key, None)
        if extra:
            cached = None  # the cached ballot was promised by the acceptors of another set
        if cached is not None:
            ballot, register = cached
            self.counters.one_rtt_rounds += 1
            rnd = _Round(ops, ballot, "accept", tuple(live), need, deadline)
            state.round = rnd
            self._propose_value(rnd, register)
            effects.extend(self._send_accepts(state, rnd))
            return effects
        rnd = _Round(ops, self._next_ballot(), "prepare", tuple(live), need, deadline)
        state.round = rnd
        keyspace, partition, sort = state.key
        for replica in live:
            request_id = next(self._ids)
            rnd.sent[request_id] = replica
            self._by_request[request_id] = state.key
            effects.append(SendAcceptor(replica, Prepare(request_id, keyspace, partition, sort,
                                                         rnd.ballot, rnd.ops[0].op_id)))
        return effects

    def _propose_value(self, rnd: _Round, register: Register) -> None:
        rnd.outcomes = []
        for op in rnd.ops:
            assert op.change is not None
            forgotten = _forgotten(register, op)
            if forgotten:
                rnd.outcomes.append(Failed(
                    "contention", f"the change may have been chosen by {forgotten}, and "
                    f"more than {RECENT_CHANGES_MAX} changes of the key landed since, so the "
                    "register no longer remembers its id: it was not applied again; read "
                    "the key to learn whether it took effect", maybe_applied=True))
                continue
            if op.base_version is None:
                op.base_version = register.version
            register, outcome = apply_change(register, op.change, op.idempotency_id,
                                             op.wall_ms)
            rnd.outcomes.append(outcome)
        rnd.proposed = register
        # Reserve the next ballot now: acceptors that accept will have promised it.
        rnd.next_ballot = self._next_ballot()

    def _send_accepts(self, state: _Key, rnd: _Round) -> list[Effect]:
        assert rnd.proposed is not None
        keyspace, partition, sort = state.key
        effects: list[Effect] = []
        rnd.sent = {}
        rnd.acks = rnd.refusals = rnd.failures = 0
        for op in rnd.ops:
            op.accept_sent = True
        for replica in rnd.replicas:
            request_id = next(self._ids)
            rnd.sent[request_id] = replica
            self._by_request[request_id] = state.key
            effects.append(SendAcceptor(replica, Accept(
                request_id, keyspace, partition, sort, rnd.ballot, rnd.proposed,
                rnd.next_ballot, rnd.ops[0].op_id)))
        return effects

    # -- replies and time --------------------------------------------------------------

    def owns(self, request_id: int) -> bool:
        return request_id in self._by_request

    def on_reply(self, now: float, acceptor: str, reply: PaxosReply) -> list[Effect]:
        """An acceptor's answer (matched by its request id; ``acceptor`` is informational)."""
        key = self._by_request.get(reply.id)
        state = self._keys.get(key) if key is not None else None
        rnd = state.round if state is not None else None
        if state is None or rnd is None or reply.id not in rnd.sent:
            self._by_request.pop(reply.id, None)
            return []
        if isinstance(reply, Nack) and reply.promised in (rnd.ballot, rnd.next_ballot):
            # Our own ballot, promised already: a duplicate of our prepare (or of our accept,
            # whose piggybacked promise is ``next_ballot``) was answered first. The first
            # copy got the real answer; wait for it.
            return []
        self._by_request.pop(reply.id, None)
        sender = rnd.sent.pop(reply.id)
        if isinstance(reply, Nack):
            self._see(reply.promised)
            rnd.refusals += 1
        elif isinstance(reply, PaxosFailure):
            rnd.failures += 1
        elif isinstance(reply, Promise):
            if rnd.phase != "prepare" or reply.ballot != rnd.ballot:
                return []
            self._see(reply.accepted)
            rnd.promises[sender] = (reply.accepted, reply.register)
            rnd.acks += 1
        elif isinstance(reply, Accepted):
            if rnd.phase not in ("accept", "purge") or reply.ballot != rnd.ballot:
                return []
            rnd.acks += 1
        else:  # Purged: fire-and-forget, sent after the round is answered
            return []
        return self._progress(now, state, rnd)

    def _progress(self, now: float, state: _Key, rnd: _Round) -> list[Effect]:
        if rnd.acks >= rnd.need:
            if rnd.phase == "prepare":
                return self._promised(now, state, rnd)
            return self._chosen(now, state, rnd)
        if rnd.refusals + rnd.failures > len(rnd.replicas) - rnd.need:
            return self._retry(now, state, rnd, refused=rnd.refusals > 0)
        return []

    def _promised(self, now: float, state: _Key, rnd: _Round) -> list[Effect]:
        best: tuple[Ballot, Register] | None = None
        for accepted, register in rnd.promises.values():
            if accepted is not None and register is not None and (
                    best is None or accepted > best[0]):
                best = (accepted, register)
        current = best[1] if best is not None else EMPTY_REGISTER
        self._drop_requests(rnd)
        if rnd.ops[0].change is None:
            return self._purge_accept(now, state, rnd, current)
        rnd.phase = "accept"
        self._propose_value(rnd, current)
        return self._send_accepts(state, rnd)

    def _purge_accept(self, now: float, state: _Key, rnd: _Round,
                      current: Register) -> list[Effect]:
        op = rnd.ops[0]
        reason = ""
        if not current.tombstone:
            reason = "the key holds a value" if current.value is not None else "no tombstone"
        elif op.wall_ms - current.changed_at_ms <= op.grace_ms:
            reason = "the tombstone is younger than the grace period"
        if reason:
            state.round = None
            effects = [self._finish(op, PurgeDone(False, reason))]
            return effects + self._start_round(now, state)
        rnd.phase = "purge"
        rnd.proposed = current
        rnd.outcomes = []
        rnd.next_ballot = None
        return self._send_accepts(state, rnd)

    def _chosen(self, now: float, state: _Key, rnd: _Round) -> list[Effect]:
        assert rnd.proposed is not None
        clean = rnd.refusals == 0 and rnd.failures == 0
        self._drop_requests(rnd)
        state.round = None
        effects: list[Effect] = []
        if rnd.phase == "purge":
            keyspace, partition, sort = state.key
            for replica in rnd.replicas:
                effects.append(SendAcceptor(replica, Purge(next(self._ids), keyspace,
                                                           partition, sort, rnd.ballot)))
            effects.append(self._finish(rnd.ops[0], PurgeDone(True)))
        else:
            assert rnd.next_ballot is not None
            if clean:
                self._remember(state.key, rnd.next_ballot, rnd.proposed)
            for op, outcome in zip(rnd.ops, rnd.outcomes, strict=True):
                if isinstance(outcome, Done) and outcome.duplicate:
                    self.counters.duplicates += 1
                effects.append(self._finish(op, outcome))
        return effects + self._start_round(now, state)

    def _remember(self, key: _KeyId, ballot: Ballot, register: Register) -> None:
        self._cache[key] = (ballot, register)
        self._cache.move_to_end(key)
        while len(self._cache) > self.config.cached_keys_max:
            self._cache.popitem(last=False)

    def _retry(self, now: float, state: _Key, rnd: _Round, refused: bool) -> list[Effect]:
        """The round cannot reach its quorum: requeue its changes after a backoff, or fail
        those out of attempts."""
        self._drop_requests(rnd)
        self._cache.pop(state.key, None)
        state.round = None
        effects: list[Effect] = []
        if refused:
            self.counters.refused_rounds += 1
        keep: list[_Op] = []
        for op in rnd.ops:
            op.attempts += 1
            if op.attempts > self.config.retries_max:
                self.counters.contention += 1
                cause = "refused by higher ballots" if refused else "refused by replicas"
                effects.append(self._finish(op, Failed(
                    "contention", f"{op.attempts} rounds {cause} (other proposers are "
                    "changing this key); retry later", rnd.acks, rnd.need, op.accept_sent)))
            else:
                keep.append(op)
        state.queue.extendleft(reversed(keep))
        if not state.queue:
            self._forget_if_idle(state)
            return effects
        self.counters.retries += 1
        # Every change of the round may have run out of attempts while others of the key
        # wait in the queue: they still back off (the key is contended), from the start.
        attempts = max((op.attempts for op in keep), default=1)
        span = min(self.config.backoff_max_s, self.config.backoff_base_s * 2 ** (attempts - 1))
        state.retry_at = now + self._rng.uniform(0, span)
        self._arm(state.retry_at, state.key)
        return effects

    def _drop_requests(self, rnd: _Round) -> None:
        for request_id in rnd.sent:
            self._by_request.pop(request_id, None)
        rnd.sent = {}
        rnd.promises = {}

    def _finish(self, op: _Op, result: Result) -> Respond:
        self._ops -= 1
        assert self._ops >= 0
        return Respond(op.op_id, result)

    def _forget_if_idle(self, state: _Key) -> None:
        if state.round is None and not state.queue and state.retry_at is None:
            self._keys.pop(state.key, None)

    def _expire_queued(self, now: float, state: _Key) -> list[Effect]:
        effects: list[Effect] = []
        if any(op.deadline <= now for op in state.queue):
            keep = collections.deque[_Op]()
            for op in state.queue:
                if op.deadline <= now:
                    effects.append(self._timeout(op, 0, state.replication // 2 + 1))
                else:
                    keep.append(op)
            state.queue = keep
        return effects

    def _timeout(self, op: _Op, received: int, required: int) -> Respond:
        self.counters.timeouts += 1
        return self._finish(op, Failed(
            "timeout", f"{received} of {required} needed replicas answered in time"
            + (" (the change may still be applied: retry with the same idempotency id)"
               if op.accept_sent else ""), received, required, op.accept_sent))

    def on_tick(self, now: float) -> list[Effect]:
        effects: list[Effect] = []
        while self._timers and self._timers[0][0] <= now:
            _, _, key = heapq.heappop(self._timers)
            state = self._keys.get(key)
            if state is None:
                continue
            rnd = state.round
            if rnd is not None and rnd.deadline <= now:
                effects.extend(self._expire_round(now, state, rnd))
            elif rnd is not None:
                effects.extend(self._expire_queued(now, state))
            elif rnd is None and state.retry_at is not None and state.retry_at <= now:
                effects.extend(self._start_round(now, state))
            else:  # waiting for a retry (or idle): changes due in the queue time out now
                effects.extend(self._expire_queued(now, state))
                self._forget_if_idle(state)
        return effects

    def _expire_round(self, now: float, state: _Key, rnd: _Round) -> list[Effect]:
        """The round timed out (``round_timeout_s``) or its earliest change is due: time out
        the changes due, requeue the rest in a fresh round (a full one: this one's accepts
        may have reached a minority)."""
        self._drop_requests(rnd)
        self._cache.pop(state.key, None)
        state.round = None
        effects: list[Effect] = []
        keep: list[_Op] = []
        for op in rnd.ops:
            if op.deadline <= now:
                if op.change is None:
                    effects.append(self._finish(op, PurgeDone(False, "timed out")))
                else:
                    effects.append(self._timeout(op, rnd.acks, rnd.need))
            else:
                keep.append(op)
        state.queue.extendleft(reversed(keep))
        return effects + self._start_round(now, state)

    def next_deadline(self) -> float:
        """When ``on_tick`` next has work (possibly earlier: stale timers are skipped)."""
        return self._timers[0][0] if self._timers else float("inf")

    def in_flight(self) -> int:
        return self._ops
