"""The data plane of a running node: coordinator, replica, hints and repair on the event loop.

``KvNode`` implements ``api.service.KvService`` for the client protocols. It keeps the
ring in step with membership (rebuilt on every member change), runs the coordinator's
effects (replica requests to peers over ``PeerLinks``, or to the local replica directly),
commits replica writes through ``GroupCommit`` and replies only once they are durable,
replays hints to returning peers, runs anti-entropy sessions and purges old tombstones.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import random
from collections.abc import Callable, Iterable
from typing import Any

import msgspec

from leaderless.api.kv_messages import (
    Changed,
    CompareAndSet,
    Conflict,
    Delete,
    Done,
    Failure,
    Get,
    Increment,
    KeyspaceInfo,
    Lease,
    LockInfo,
    Put,
    RingMember,
    Row,
    Value,
)
from leaderless.api.service import Fence, KvError
from leaderless.core import paxos
from leaderless.core.anti_entropy import AntiEntropy, AntiEntropyConfig, ApplyRows, SendToPeer
from leaderless.core.anti_entropy_messages import AntiEntropyMessage
from leaderless.core.cells import Cell, decode_cell
from leaderless.core.clock_offsets import skew_refusal
from leaderless.core.coordinator import (
    READ_ONLY_ERROR,
    Coordinator,
    CoordinatorConfig,
    Failed,
    ReadDone,
    Respond,
    Result,
    ScanDone,
    SendReplica,
    Topology,
    WriteDone,
    read_only_failure,
)
from leaderless.core.effects import MemberEvent, MemberEventKind
from leaderless.core.health import HealthStatus
from leaderless.core.hints import DeleteHint, Handoff, Hint, HintConfig, HintLog, SendHint
from leaderless.core.hlc import ClockSkewError, HybridClock, physical_ms
from leaderless.core.hot_partitions import HotPartition, HotPartitions
from leaderless.core.keys import (
    DATA_PREFIX,
    KeyError_,
    check_key,
    data_key,
    keyspace_prefix,
    prefix_end,
)
from leaderless.core.kv_messages import (
    PeerHello,
    ReplicaAck,
    ReplicaRead,
    ReplicaReadReply,
    ReplicaReply,
    ReplicaScan,
    ReplicaScanReply,
    ReplicaWrite,
)
from leaderless.core.locks import CLOCK_SKEW_MAX_MS
from leaderless.core.membership import Member
from leaderless.core.merkle import MerkleForest
from leaderless.core.messages import MemberStatus
from leaderless.core.paxos_messages import (
    Accept,
    Accepted,
    Change,
    Incr,
    Nack,
    PaxosFailure,
    PaxosReply,
    Prepare,
    Promise,
    Purge,
    Purged,
    Read,
)
from leaderless.core.paxos_messages import (
    Cas as CasChange,
)
from leaderless.core.paxos_messages import (
    Delete as DeleteChange,
)
from leaderless.core.paxos_messages import (
    Fence as FenceChange,
)
from leaderless.core.paxos_messages import (
    Put as PutChange,
)
from leaderless.core.placement import (
    RING_VIEW_KEY,
    Placement,
    PlacementMember,
    PlacementView,
    RingState,
)
from leaderless.core.purge import purge_slice
from leaderless.core.quorum import ConsistencyError, required
from leaderless.core.replica import Replica
from leaderless.core.ring import Ring
from leaderless.core.schema import (
    SYSTEM_KEYSPACE,
    KeyspaceDef,
    decode_def,
    encode_def,
    validate,
)
from leaderless.core.snitch import PeerScore
from leaderless.core.streaming import StreamConfig
from leaderless.core.streaming_messages import StreamPage, StreamRequest
from leaderless.core.tasks import INDEX_KEYSPACE, INDEX_REPLICATION
from leaderless.core.watch_messages import WatchFilter, WatchMessage
from leaderless.runtime.errors import StartupError
from leaderless.runtime.group_commit import (
    FAULT_FSYNC_FAIL_AFTER_ENV,
    GroupCommit,
    fsync_fault_from_env,
)
from leaderless.runtime.locks import LockService
from leaderless.runtime.logs import ROOT_LOGGER, NodeLogger, RateLimitedLog
from leaderless.runtime.peers import PeerLinks
from leaderless.runtime.streaming import StreamService
from leaderless.runtime.tcp import ServerConnection
from leaderless.runtime.wall_clock import wall_ms as _wall_ms
from leaderless.runtime.watch import Watch, WatchHub
from leaderless.storage.store import StorageError, Store, Write

PeerReply = ReplicaReply | AntiEntropyMessage | PaxosReply | StreamPage
"""What arrives on our outbound links: replicas' and acceptors' replies, anti-entropy,
stream pages."""
PAXOS_PURGE_KEYS_PER_SWEEP = 100
SCAN_PAGES_MAX = 16
"""Pages a scan reads past deleted (tombstone) or expired rows to fill its limit: rows are
merged across replicas with their tombstones (a newer delete must win over an older
value), so a page can come back empty of live rows; beyond this many pages the scan
answers with what it found and ``more``."""
SCAN_SKIP_PAGE_ROWS = 256
"""Rows per page once a scan reads on past deleted rows (up to 4,096 of them in all)."""
BUILTIN_KEYSPACES = {INDEX_KEYSPACE: KeyspaceDef(INDEX_KEYSPACE, INDEX_REPLICATION, "eventual",
                                                 "ONE", "QUORUM")}
"""Eventual system keyspaces with fixed definitions (not in the schema keyspace): the task
index (``runtime.tasks``) is read and written with the ordinary KV operations."""
ServedRequest = ReplicaWrite | ReplicaRead | ReplicaScan | Prepare | Accept | Purge
"""What this node answers as a replica (eventual mode) or an acceptor (strong mode)."""
BACKGROUND_TICK_S = 0.05
PURGE_KEYS_PER_TICK = 2000
PURGE_INTERVAL_S = 60.0


class KvNode:
    def __init__(self, name: str, store: Store, *, value_bytes_max: int, fsync: str,
                 fsync_interval_ms: float, tombstone_grace_s: float, hint_window_s: float,
                 anti_entropy_interval_s: float, peers: PeerLinksFactory,
                 on_fatal: Callable[[StorageError], None], rng_seed: int,
                 settle_s: float = 3.0, stream: StreamConfig | None = None) -> None:
        self.name = name
        self.store = store
        self.value_bytes_max = value_bytes_max
        self.tombstone_grace_s = tombstone_grace_s
        self.log = NodeLogger(name, "kv")
        self._refusals = RateLimitedLog(self.log)
        self._debug = logging.getLogger(f"{ROOT_LOGGER}.kv").isEnabledFor(logging.DEBUG)
        """Per-request debug lines cost on the hot path: decided once, at start."""
        self._on_fatal = on_fatal
        self._ids = itertools.count(1)
        self._op_ids = itertools.count(1)
        self.clock = HybridClock()
        self.forest = MerkleForest()
        self.forest.rebuild(store)
        self.hints = HintLog(store)
        self.replica = Replica(store, self.hints, self.forest.update)
        self.coordinator = Coordinator(name, CoordinatorConfig(), self._ids)
        self.hot_partitions = HotPartitions()
        """Requests per partition key this node coordinates (``core.hot_partitions``)."""
        self.acceptor = paxos.Acceptor(store)
        self.proposer = paxos.Proposer(name, paxos.ProposerConfig(), self._ids,
                                       random.Random(rng_seed ^ 0x5A5A))
        self._paxos_purge_cursor = b""
        self.key_listeners: list[Callable[[str, bytes, bytes, bytes | None], None]] = []
        self.watches = WatchHub(name, store, self._send, self._members_up, self.propose,
                                self._key_changed)
        self.clock_skew_ms: Callable[[], float | None] = lambda: None
        """This node's clock against its peers' (``core.clock_offsets``; the node wires
        it to its membership): beyond ``CLOCK_SKEW_MAX_MS`` it coordinates no strong
        operation and no lock lease (``_check_clock``)."""
        self.locks = LockService(self.propose, self.watches.hold_key, self._check_clock)
        self.key_listeners.append(self.locks.on_key_changed)
        """Called with (keyspace, partition, sort, new value) for every change of a strong
        key chosen by this node's proposer (and, from watches, by others)."""
        self.tasks: Any = None
        """The node's ``runtime.tasks.TaskService`` (set by the node once made), which the
        client protocols serve task requests from (``api.task_api``)."""
        self.handoff = Handoff(self.hints, HintConfig(hint_window_s=hint_window_s))
        self.anti_entropy = AntiEntropy(name, AntiEntropyConfig(
            interval_s=anti_entropy_interval_s), random.Random(rng_seed), store, self.forest)
        try:
            fault_after = fsync_fault_from_env()
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        if fault_after is not None:
            self.log.warning("test_fault_enabled", fault=FAULT_FSYNC_FAIL_AFTER_ENV,
                             after_syncs=fault_after,
                             effect="every fsync fails with EIO after this many; test only")
        self.commit = GroupCommit(store, fsync, fsync_interval_ms,
                                  on_error=self._storage_failed, sync_in_thread=True,
                                  fault_fsync_fail_after=fault_after)
        self.streaming = StreamService(self, stream or StreamConfig(),
                                       random.Random(rng_seed ^ 0x57AE))
        """Range streaming (``runtime.streaming``): fetches the ranges this node gains."""
        self._hand_off_acks: dict[int, Callable[[ReplicaAck], None]] = {}
        """Acks awaited for hints this node hands off as it leaves (``runtime.failover``)."""
        # In a node (loop ~50 % busy, three processes sharing the disk) the fsync in a thread
        # measured 7.0-8.7k QUORUM puts/s against 6.2-6.9k inline (docs/benchmarks.md): the
        # loop keeps routing other requests' messages while the disk works.
        self.links = peers(PeerHello(name), PeerReply, self._on_peer_message)
        self._futures: dict[int, asyncio.Future[Any]] = {}
        """Operations awaited by the async API: a coordinator Result or a paxos Result."""
        self._callbacks: dict[int, tuple[int, Callable[[Any], None]]] = {}
        self._strong_callbacks: dict[int, tuple[Any, Callable[[Any], None], str]] = {}
        """Strong requests on the callback path: (request, reply, keyspace) by op id."""
        self._members: dict[str, Member] = {}
        self._down_since: dict[str, float] = {}
        self._hint_window_s = hint_window_s
        self._topology = Topology(Ring([]), frozenset(), frozenset())
        self._keyspaces: dict[str, KeyspaceDef] = {}
        self._loop = asyncio.get_event_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = float("inf")
        self._background: asyncio.Task[None] | None = None
        self._purge_cursor = DATA_PREFIX
        self._next_purge = 0.0
        self._closed = False
        self._replication: dict[str, int] = {}
        self._replication_refresh_at = 0.0
        self.settle_s = settle_s
        """How long a change of the ring takes to reach every member (``core.placement``)."""
        self._view = PlacementView(settle_s)
        """The placement over time, with the rings of the last settle_s."""
        self.purged = 0

    # -- lifecycle ---------------------------------------------------------------------

    def start(self, members: list[Member]) -> None:
        self._loop = asyncio.get_running_loop()
        for member in members:
            self._members[member.name] = member
        if not self._view.restore(self.store.get(RING_VIEW_KEY), self._now()):
            self.log.warning("ring_view_unreadable", note="starting without the saved view")
        self._rebuild()
        self._background = asyncio.get_running_loop().create_task(self._background_loop())

    async def close(self) -> None:
        self._closed = True
        self.streaming.close()
        if self._background is not None:
            self._background.cancel()
        if self._timer is not None:
            self._timer.cancel()
        for future in self._futures.values():
            if not future.done():
                future.set_exception(KvError("unavailable", "the node is stopping"))
        for op_id in list(self._callbacks):
            self._callback_reply(op_id, Failed("unavailable", "the node is stopping"))
        for op_id in list(self._strong_callbacks):
            self._strong_reply(op_id, paxos.Failed("unavailable", "the node is stopping"))
        self.links.close()
        await self.commit.close()

    def hand_off_hint(self, holder: str, target: str, hint: Hint,
                      on_ack: Callable[[ReplicaAck], None]) -> Callable[[], None]:
        """Send ``hint`` (kept here for ``target``) to ``holder``, which stores it durably
        as its own hint for ``target`` (or, when ``holder`` is the target, applies it);
        ``on_ack`` gets the holder's ack. Returns a function that forgets the ack (on
        timeout). Used by passive failover (``runtime.failover``) before the node leaves."""
        request_id = next(self._ids)
        self._hand_off_acks[request_id] = on_ack
        self._send(holder, ReplicaWrite(request_id, hint.keyspace, hint.partition, hint.sort,
                                        hint.cell, hint_for=None if holder == target
                                        else target))

        def forget() -> None:
            self._hand_off_acks.pop(request_id, None)

        return forget

    def _storage_failed(self, error: StorageError) -> None:
        self.log.error("storage_failed", error=str(error))
        self._on_fatal(error)

    # -- membership --------------------------------------------------------------------

    def on_member_event(self, event: MemberEvent, member: Member | None) -> None:
        now = self._now()
        if member is not None:
            self._members[event.name] = member
        if event.kind in (MemberEventKind.LEFT, MemberEventKind.REAPED):
            self._members.pop(event.name, None)
        if event.kind is MemberEventKind.DEAD:
            self._down_since.setdefault(event.name, now)
        elif event.kind in (MemberEventKind.ALIVE, MemberEventKind.JOINED):
            self._down_since.pop(event.name, None)
        was_up = event.name in self._topology.up
        self._rebuild()
        if not was_up and event.name in self._topology.up and event.name != self.name:
            self.watches.on_member_up(event.name)

    def _rebuild(self) -> None:
        now = self._now()
        placement = self._placement_now(now)
        ring = placement.current
        up = frozenset(m.name for m in self._members.values()
                       if m.status in (MemberStatus.ALIVE, MemberStatus.SUSPECT))
        alive = frozenset(m.name for m in self._members.values()
                          if m.status is MemberStatus.ALIVE)
        hints_allowed = {name: now - since < self._hint_window_s
                         for name, since in self._down_since.items()}
        read_only = {m.name: m.meta.health.reason for m in self._members.values()
                     if m.meta.health is not None
                     and m.meta.health.status is HealthStatus.READ_ONLY}
        self._topology = Topology(ring, up, alive, hints_allowed, read_only,
                                  placement if placement.changing else None)

    def _placement_now(self, now: float) -> Placement:
        """The placement of the current view (``core.placement.PlacementView``)."""
        members = tuple(sorted(
            (PlacementMember(m.name, m.meta.token_seed, m.meta.token_count, m.meta.zone,
                             RingState(m.meta.ring_state), m.meta.replacing,
                             m.meta.next_token_count, m.meta.synced)
             for m in self._members.values()
             if m.meta.token_count > 0 and m.status is not MemberStatus.LEFT),
            key=lambda m: m.name))
        return self._view.at(now, members)

    @property
    def placement(self) -> Placement:
        """The ring's placement now (current ring, pending replicas, fetch plans)."""
        return self._placement_now(self._now())

    def refresh_placement(self) -> None:
        """Rebuild the topology when an old ring's settle time ran out (called by the ring
        changes loop, ``runtime.ring_changes``)."""
        now = self._now()
        if self._view.expired(now):
            self._rebuild()
        data = self._view.to_save(now)
        if data is not None and not self._closed:
            self.commit.commit([(RING_VIEW_KEY, data)], _ignore)

    # -- KvService ---------------------------------------------------------------------

    async def put(self, keyspace: str, key: bytes, value: bytes, sort: bytes = b"",
                  consistency: str | None = None, ttl_s: float | None = None,
                  idempotency: bytes = b"", fence: Fence | None = None, *,
                  retry_ms: int = 0) -> int:
        definition = await self._keyspace(keyspace)
        self._check_key(key, sort)
        if definition.mode == "strong":
            change = self._put_change(value, ttl_s)
            if fence is not None:
                change = msgspec.structs.replace(change, fence=await self._fence(fence))
            done = await self._strong(definition, key, sort, change, idempotency, retry_ms)
            return done.version
        cell = self._new_cell(value, ttl_s)
        await self._fence(fence)
        return await self._write(definition, key, sort, cell, consistency)

    async def delete(self, keyspace: str, key: bytes, sort: bytes = b"",
                     consistency: str | None = None, idempotency: bytes = b"",
                     fence: Fence | None = None, *, retry_ms: int = 0) -> int:
        definition = await self._keyspace(keyspace)
        self._check_key(key, sort)
        if definition.mode == "strong":
            done = await self._strong(definition, key, sort,
                                      DeleteChange(await self._fence(fence)), idempotency,
                                      retry_ms)
            return done.version
        await self._fence(fence)
        cell = Cell(self.clock.now(_wall_ms()), self.name, b"", True)
        return await self._write(definition, key, sort, cell, consistency)

    async def get(self, keyspace: str, key: bytes, sort: bytes = b"",
                  consistency: str | None = None) -> Value:
        definition = await self._keyspace(keyspace)
        self._check_key(key, sort)
        if definition.mode == "strong":
            # Linearizable: a Paxos round with the identity change (CASPaxos), no shortcut.
            done = await self._strong(definition, key, sort, Read(), b"")
            if done.value is None:
                return Value(0, False, version=done.version)
            return Value(0, True, done.value, version=done.version)
        level = self._level(definition, consistency, definition.read_consistency)
        self.hot_partitions.record(self._now(), definition.name, key, False)
        op_id = next(self._op_ids)
        result = await self._run(op_id, lambda: self.coordinator.read(
            self._now(), op_id, self._topology, definition.name, definition.replication,
            key, sort, level))
        assert isinstance(result, ReadDone)
        cell = result.cell
        if cell is None or not cell.visible(_wall_ms()):
            return Value(0, False)
        return Value(0, True, cell.value, cell.hlc, cell.expires_at_ms)

    async def scan(self, keyspace: str, key: bytes, start: bytes | None = None,
                   end: bytes | None = None, limit: int = 1000,
                   consistency: str | None = None) -> tuple[list[Row], bool]:
        definition = await self._keyspace(keyspace)
        self._check_key(key, start or b"")
        level = self._level(definition, consistency, definition.read_consistency)
        self.hot_partitions.record(self._now(), definition.name, key, False)
        rows: list[Row] = []
        more = False
        page_rows = limit
        for _ in range(SCAN_PAGES_MAX):
            op_id = next(self._op_ids)
            result = await self._run(op_id, functools.partial(
                self._scan_page, op_id, definition, key, start, end, page_rows, level))
            assert isinstance(result, ScanDone)
            wall_ms = _wall_ms()
            rows.extend(Row(r.sort, r.cell.value, r.cell.hlc, r.cell.expires_at_ms)
                        for r in result.rows if r.cell.visible(wall_ms))
            more = result.more
            if not more or len(rows) >= limit or not result.rows:
                break
            # The page was mostly deleted or expired rows: read on past them, so live rows
            # behind many deleted ones are found (a queue's index, say).
            start = result.rows[-1].sort + b"\x00"
            page_rows = max(limit, SCAN_SKIP_PAGE_ROWS)
        return rows[:limit], more or len(rows) > limit

    def _scan_page(self, op_id: int, definition: KeyspaceDef, key: bytes,
                   start: bytes | None, end: bytes | None, limit: int,
                   level: str) -> list[Any]:
        return self.coordinator.scan(self._now(), op_id, self._topology, definition.name,
                                     definition.replication, key, start, end, limit, level)

    async def cas(self, keyspace: str, key: bytes, value: bytes, sort: bytes = b"",
                  expected_version: int | None = None, expected_value: bytes | None = None,
                  expected_absent: bool = False, idempotency: bytes = b"",
                  fence: Fence | None = None, *, retry_ms: int = 0) -> Changed | Conflict:
        definition = await self._strong_keyspace(keyspace, "compare-and-set")
        self._check_key(key, sort)
        change = self._cas_change(value, expected_version, expected_value, expected_absent)
        if fence is not None:
            change = msgspec.structs.replace(change, fence=await self._fence(fence))
        try:
            done = await self._strong(definition, key, sort, change, idempotency, retry_ms)
        except _ConflictFound as conflict:
            return Conflict(0, conflict.version, conflict.value is not None,
                            conflict.value or b"")
        return Changed(0, done.version, done.value or b"", done.duplicate)

    async def incr(self, keyspace: str, key: bytes, delta: int = 1, sort: bytes = b"",
                   idempotency: bytes = b"", fence: Fence | None = None, *,
                   retry_ms: int = 0) -> Changed:
        definition = await self._strong_keyspace(keyspace, "increment")
        self._check_key(key, sort)
        done = await self._strong(definition, key, sort, Incr(delta, await self._fence(fence)),
                                  idempotency, retry_ms)
        return Changed(0, done.version, done.value or b"", done.duplicate)

    def _put_change(self, value: bytes, ttl_s: float | None) -> PutChange:
        """A strong put's change, or ``bad_request`` naming what is wrong."""
        if ttl_s is not None:
            raise KvError("bad_request", "strong keyspaces do not support TTL yet")
        self._check_value(value)
        return PutChange(value)

    def _cas_change(self, value: bytes, expected_version: int | None,
                    expected_value: bytes | None, expected_absent: bool) -> CasChange:
        """A compare-and-set's change, or ``bad_request`` naming what is wrong."""
        self._check_value(value)
        given = (expected_version is not None) + (expected_value is not None) + expected_absent
        if given != 1:
            raise KvError("bad_request", "compare-and-set needs exactly one expectation: "
                          "expected_version, expected_value or expected_absent")
        return CasChange(value, expected_version, expected_value, expected_absent)

    async def _strong_keyspace(self, keyspace: str, what: str) -> KeyspaceDef:
        definition = await self._keyspace(keyspace)
        if definition.mode != "strong":
            raise KvError("bad_request", f"{what} needs a strong keyspace; {keyspace!r} is "
                          "eventual (create one with --mode strong)")
        return definition

    def _check_value(self, value: bytes) -> None:
        if len(value) > self.value_bytes_max:
            raise KvError("bad_request", f"the value has {len(value)} bytes; the limit is "
                          f"{self.value_bytes_max} (setting value_bytes_max)")

    async def _strong(self, definition: KeyspaceDef, key: bytes, sort: bytes, change: Change,
                      idempotency: bytes, retry_ms: int = 0) -> paxos.Done:
        self._check_clock()
        self.hot_partitions.record(self._now(), definition.name, key, not isinstance(change, Read))
        result = await self.propose(definition, key, sort, change, idempotency, retry_ms)
        if isinstance(result, paxos.Conflict):
            raise _ConflictFound(result.version, result.value)
        if isinstance(result, paxos.Fenced):
            self.locks.fenced += 1
            raise KvError("fenced", f"this key was changed under token {result.token} of lock "
                          f"{result.lock!r}, newer than this write's: it was not applied")
        assert isinstance(result, paxos.Done), result
        return result

    async def propose(self, definition: KeyspaceDef, key: bytes, sort: bytes, change: Change,
                      idempotency: bytes, retry_ms: int = 0) -> paxos.Outcome:
        """Run a change of a strong key through Paxos: Done, Conflict or Fenced (a failure
        is raised as KvError). Listeners hear of every chosen change."""
        if not isinstance(change, Read):
            self._check_writable()
        op_id = next(self._op_ids)
        result = await self._await_op(op_id, lambda: self.proposer.propose(
            self._now(), op_id, self._topology, definition.name, definition.replication,
            key, sort, change, idempotency, self._clock_ms(), retry_ms))
        if isinstance(result, paxos.Failed):
            code = "bad_request" if result.code == "invalid" else result.code
            self._log_failure(op_id, code, result.message)
            raise KvError(code, result.message, result.received, result.required)
        if isinstance(result, paxos.Done) and not isinstance(change, Read):
            self._key_changed(definition.name, key, sort, result.value)
        assert isinstance(result, paxos.Done | paxos.Conflict | paxos.Fenced), result
        return result

    def _key_changed(self, keyspace: str, partition: bytes, sort: bytes,
                     value: bytes | None) -> None:
        for listener in self.key_listeners:
            listener(keyspace, partition, sort, value)

    async def watch(self, keyspace: str, key: bytes, sort: bytes = b"", prefix: bool = False,
                    since_version: int = 0) -> Watch:
        """Changes of one key (or of every key whose partition key starts with ``key``)
        of a strong keyspace, from after ``since_version`` (one key only)."""
        definition = await self._keyspace(keyspace)
        if not prefix:
            self._check_key(key, sort)
        elif sort:
            raise KvError("bad_request", "a prefix watch matches partition keys only; give "
                          "no sort key")
        elif len(key) > 1024:
            raise KvError("bad_request", f"a watch prefix has at most 1024 bytes (got "
                          f"{len(key)})")
        if since_version < 0:
            raise KvError("bad_request", "since_version must be >= 0")
        return self.watches.open(definition, WatchFilter(keyspace, key, sort, prefix),
                                 since_version)

    def _members_up(self) -> list[str]:
        return sorted(self._topology.up | {self.name})

    async def _fence(self, fence: Fence | None) -> FenceChange | None:
        """Check a write's fence against its lock (raises ``fenced``); the fence to carry
        into a strong change."""
        if fence is None:
            return None
        lock, token = fence
        await self.locks.check_fence(lock, token)
        return FenceChange(lock, token)

    # -- locks (runtime.locks) -----------------------------------------------------------

    async def acquire_lock(self, name: str, owner: str, ttl_ms: int, wait_ms: int = 0,
                           idempotency: bytes = b"") -> Lease:
        return await self.locks.acquire(name, owner, ttl_ms, wait_ms, idempotency)

    async def renew_lock(self, name: str, owner: str, token: int, ttl_ms: int,
                         idempotency: bytes = b"") -> Lease:
        return await self.locks.renew(name, owner, token, ttl_ms, idempotency)

    async def release_lock(self, name: str, owner: str, token: int,
                           idempotency: bytes = b"") -> int:
        return await self.locks.release(name, owner, token, idempotency)

    async def lock_status(self, name: str) -> LockInfo:
        return await self.locks.status(name)

    async def create_keyspace(self, name: str, replication: int = 3, mode: str = "eventual",
                              read_consistency: str = "QUORUM",
                              write_consistency: str = "QUORUM",
                              if_not_exists: bool = False) -> None:
        definition = KeyspaceDef(name, replication, mode, read_consistency.upper(),
                                 write_consistency.upper())
        try:
            validate(definition)
        except KeyError_ as exc:
            raise KvError("bad_request", str(exc)) from None
        existing = await self._read_definition(name)
        if existing is not None:
            if if_not_exists and existing == definition:
                return
            raise KvError("keyspace_exists", f"keyspace {name!r} exists already "
                          f"(replication {existing.replication}, mode {existing.mode})")
        ring_size = max(1, len(self._topology.ring))
        cell = Cell(self.clock.now(_wall_ms()), self.name, encode_def(definition))
        system = KeyspaceDef(SYSTEM_KEYSPACE, ring_size)
        await self._write(system, name.encode(), b"", cell, "QUORUM")
        self._keyspaces[name] = definition
        self.log.info("keyspace_created", keyspace=name, replication=replication, mode=mode)

    async def list_keyspaces(self) -> list[KeyspaceInfo]:
        # Every node holds a replica of every definition (the system keyspace's N is the
        # ring size), so the local replica is complete once anti-entropy has run.
        found: dict[str, KeyspaceDef] = dict(self._keyspaces)
        for definition in self.local_definitions():
            found.setdefault(definition.name, definition)
        return [KeyspaceInfo(d.name, d.replication, d.mode, d.read_consistency,
                             d.write_consistency) for d in sorted(found.values(),
                                                                 key=lambda d: d.name)]

    def local_definitions(self) -> list[KeyspaceDef]:
        prefix = keyspace_prefix(SYSTEM_KEYSPACE)
        result = []
        for _, raw in self.store.scan(prefix, prefix_end(prefix)):
            cell = decode_cell(raw)
            if cell.visible(_wall_ms()):
                result.append(decode_def(cell.value))
        return result

    def ownership(self) -> dict[str, float]:
        """Each ring member's share of the token space (before replication)."""
        return self._topology.ring.ownership()

    def ring_gaps(self, alive: Iterable[str]) -> str | None:
        """Why this node's ring is incomplete (an alive member with tokens missing from
        it), or None."""
        ring_nodes = set(self._topology.ring.nodes.values())
        names = {node.name for node in ring_nodes}
        missing = sorted(name for name in alive if name not in names
                         and (member := self._members.get(name)) is not None
                         and member.meta.token_count > 0)
        if not names:
            return "the ring is empty: no member announces tokens yet"
        if missing:
            return f"the ring lacks {len(missing)} alive member(s): {', '.join(missing[:5])}"
        return None

    def ring_members(self) -> list[RingMember]:
        result = []
        for member in self._members.values():
            meta = member.meta
            client = (f"{member.address.host}:{meta.client_port}" if meta.client_port else "")
            result.append(RingMember(member.name, client, meta.token_seed, meta.token_count,
                                     meta.zone, member.status.name.lower()))
        return result

    # -- the callback fast path (api.kv_server) --------------------------------------------

    def try_submit(self, request: Any, reply: Callable[[Any], None]) -> bool:
        """Start a get, put or delete on a keyspace this node knows and call ``reply``
        with its ``api.kv_messages`` reply; False (nothing started) for anything else."""
        kind = type(request)
        if kind is CompareAndSet or kind is Increment:
            definition = self._keyspaces.get(request.keyspace)
            if (definition is None or definition.mode != "strong" or self._closed
                    or request.fence_lock):
                return False
            return self._submit_strong(definition, request, reply)
        if kind is not Get and kind is not Put and kind is not Delete:
            return False
        if kind is not Get and request.fence_lock:
            return False  # the fence check reads the lock first (the async path)
        definition = self._keyspaces.get(request.keyspace)
        if definition is None or self._closed:
            return False
        if definition.mode == "strong":
            return self._submit_strong(definition, request, reply)
        try:
            self._check_key(request.key, request.sort)
            if kind is Get:
                level = self._level(definition, request.consistency,
                                    definition.read_consistency)
            else:
                level = self._level(definition, request.consistency,
                                    definition.write_consistency)
                cell = self._new_cell(request.value, request.ttl_s) if kind is Put else Cell(
                    self.clock.now(_wall_ms()), self.name, b"", True)
        except KvError as exc:
            reply(Failure(request.id, exc.code, exc.message[:500]))
            return True
        op_id = next(self._op_ids)
        self._callbacks[op_id] = (request.id, reply)
        if self._debug:
            self.log.debug("request", request_id=f"{self.name}:{op_id}",
                           kind=kind.__name__, keyspace=definition.name)
        now = self._now()
        self.hot_partitions.record(now, definition.name, request.key, kind is not Get)
        if kind is Get:
            effects = self.coordinator.read(now, op_id, self._topology, definition.name,
                                            definition.replication, request.key,
                                            request.sort, level)
        else:
            effects = self.coordinator.write(now, op_id, self._topology, definition.name,
                                             definition.replication, request.key,
                                             request.sort, cell, level)
        self._execute(effects)
        return True

    def _submit_strong(self, definition: KeyspaceDef, request: Any,
                       reply: Callable[[Any], None]) -> bool:
        """The callback path of a strong get, put, delete, cas or increment: one Paxos
        round whose outcome becomes the reply, with no task or coroutine per request (a
        third of a strong request's CPU on a node went to those)."""
        kind = type(request)
        change: Change
        try:
            self._check_key(request.key, request.sort)
            self._check_clock()
            if kind is not Get:
                self._check_writable()
            if kind is Get:
                change = Read()
            elif kind is Put:
                change = self._put_change(request.value, request.ttl_s)
            elif kind is Delete:
                change = DeleteChange()
            elif kind is Increment:
                change = Incr(request.delta)
            else:
                change = self._cas_change(request.value, request.expected_version,
                                          request.expected_value, request.expected_absent)
        except KvError as exc:
            reply(Failure(request.id, exc.code, exc.message[:500]))
            return True
        op_id = next(self._op_ids)
        self._strong_callbacks[op_id] = (request, reply, definition.name)
        if self._debug:
            self.log.debug("request", request_id=f"{self.name}:{op_id}",
                           kind=kind.__name__, keyspace=definition.name)
        self.hot_partitions.record(self._now(), definition.name, request.key, kind is not Get)
        self._execute(self.proposer.propose(
            self._now(), op_id, self._topology, definition.name, definition.replication,
            request.key, request.sort, change, getattr(request, "idempotency", b""),
            self._clock_ms(), getattr(request, "retry_ms", 0)))
        return True

    def _strong_reply(self, op_id: int, result: paxos.Result) -> None:
        request, reply, keyspace = self._strong_callbacks.pop(op_id)
        kind = type(request)
        rid = request.id
        if isinstance(result, paxos.Failed):
            code = "bad_request" if result.code == "invalid" else result.code
            self._log_failure(op_id, code, result.message)
            reply(Failure(rid, code, result.message[:500], result.received, result.required))
            return
        if isinstance(result, paxos.Conflict):
            reply(Conflict(rid, result.version, result.value is not None, result.value or b""))
            return
        assert isinstance(result, paxos.Done), result
        if kind is Get:
            reply(Value(rid, result.value is not None, result.value or b"",
                        version=result.version))
            return
        self._key_changed(keyspace, request.key, request.sort, result.value)
        if kind is Put or kind is Delete:
            reply(Done(rid, result.version))
        else:
            reply(Changed(rid, result.version, result.value or b"", result.duplicate))

    def _new_cell(self, value: bytes, ttl_s: float | None) -> Cell:
        self._check_value(value)
        wall_ms = _wall_ms()
        expires = 0 if ttl_s is None else wall_ms + max(1, int(ttl_s * 1000))
        return Cell(self.clock.now(wall_ms), self.name, value, False, expires)

    def _callback_reply(self, op_id: int, result: Result) -> None:
        request_id, reply = self._callbacks.pop(op_id)
        if isinstance(result, Failed):
            self._log_failure(op_id, result.code, result.message)
            reply(Failure(request_id, result.code, result.message[:500], result.received,
                          result.required))
        elif isinstance(result, WriteDone):
            reply(Done(request_id, result.hlc))
        elif isinstance(result, ReadDone):
            cell = result.cell
            if cell is None or not cell.visible(_wall_ms()):
                reply(Value(request_id, False))
            else:
                reply(Value(request_id, True, cell.value, cell.hlc, cell.expires_at_ms))
        else:
            raise AssertionError(f"no callback reply for {result!r}")

    # -- helpers for the service ----------------------------------------------------------

    async def _keyspace(self, name: str) -> KeyspaceDef:
        definition = self._keyspaces.get(name) or BUILTIN_KEYSPACES.get(name)
        if definition is not None:
            return definition
        if name == SYSTEM_KEYSPACE:
            raise KvError("bad_request", f"keyspace {name!r} is the cluster's own; it is "
                          "changed with 'keyspace create', not written directly")
        definition = await self._read_definition(name)
        if definition is None:
            raise KvError("unknown_keyspace", f"keyspace {name!r} does not exist; create it "
                          f"with: leaderless keyspace create {name}")
        self._keyspaces[name] = definition
        return definition

    async def _read_definition(self, name: str) -> KeyspaceDef | None:
        """A QUORUM read of the system keyspace (it repairs a stale replica), or this node's
        own replica when too few members are up for a quorum. Every node holds a replica of
        every definition (N is the ring size) and a definition never changes once written,
        so the local copy is the definition: without it, a node that had not used a
        keyspace yet could not serve even a ONE write to it while a quorum of the ring was
        down (one of two nodes, say)."""
        op_id = next(self._op_ids)
        ring_size = max(1, len(self._topology.ring))
        try:
            result = await self._run(op_id, lambda: self.coordinator.read(
                self._now(), op_id, self._topology, SYSTEM_KEYSPACE, ring_size,
                name.encode(), b"", "QUORUM"))
        except KvError as exc:
            local = self.store.get(data_key(SYSTEM_KEYSPACE, name.encode()))
            if exc.code != "unavailable" or local is None:
                raise
            cell = decode_cell(local)
        else:
            assert isinstance(result, ReadDone)
            if result.cell is None:
                return None
            cell = result.cell
        if not cell.visible(_wall_ms()):
            return None
        return decode_def(cell.value)

    def _check_writable(self) -> None:
        """A node that is itself read-only (its gossiped health) coordinates no writes."""
        reason = self._topology.read_only.get(self.name)
        if reason is not None:
            failure = read_only_failure(reason)
            raise KvError(failure.code, failure.message)

    def _check_clock(self) -> None:
        """Refuse (``clock_skew``) to coordinate a strong operation or a lock lease while
        this node's clock is beyond the skew bound: lease expiry and the hybrid clock
        assume clocks within ``CLOCK_SKEW_MAX_MS`` (``core.locks``). Resumes by itself
        once probes measure it back within bound."""
        refusal = skew_refusal(self.clock_skew_ms(), CLOCK_SKEW_MAX_MS)
        if refusal is not None:
            self._refusals.warning("clock_skew", "refused_clock_skew", self._now(),
                                   error=refusal)
            raise KvError("clock_skew", refusal)

    def _check_key(self, key: bytes, sort: bytes) -> None:
        try:
            check_key(key, sort)
        except KeyError_ as exc:
            raise KvError("bad_request", str(exc)) from None

    def _level(self, definition: KeyspaceDef, given: str | None, default: str) -> str:
        level = (given or default).upper()
        try:
            required(level, definition.replication)
        except ConsistencyError as exc:
            raise KvError("bad_request", str(exc)) from None
        return level

    async def _write(self, definition: KeyspaceDef, key: bytes, sort: bytes, cell: Cell,
                     consistency: str | None) -> int:
        level = self._level(definition, consistency, definition.write_consistency)
        self.hot_partitions.record(self._now(), definition.name, key, True)
        op_id = next(self._op_ids)
        result = await self._run(op_id, lambda: self.coordinator.write(
            self._now(), op_id, self._topology, definition.name, definition.replication,
            key, sort, cell, level))
        assert isinstance(result, WriteDone)
        return result.hlc

    async def _await_op(self, op_id: int, start: Callable[[], list[Any]]) -> Any:
        """Start an operation (coordinator or proposer) and wait for its ``Respond``."""
        if self._closed:
            raise KvError("unavailable", "the node is stopping")
        future: asyncio.Future[Any] = self._loop.create_future()
        self._futures[op_id] = future
        if self._debug:
            self.log.debug("request", request_id=f"{self.name}:{op_id}")
        try:
            self._execute(start())
            return await future
        finally:
            self._futures.pop(op_id, None)

    async def _run(self, op_id: int, start: Callable[[], list[Any]]) -> Result:
        """An eventual-mode operation: its result, or its failure as a KvError."""
        result = await self._await_op(op_id, start)
        if isinstance(result, Failed):
            self._log_failure(op_id, result.code, result.message)
            raise KvError(result.code, result.message, result.received, result.required)
        assert isinstance(result, WriteDone | ReadDone | ScanDone), result
        return result

    # -- effects ---------------------------------------------------------------------------

    def _execute(self, effects: list[Any]) -> None:
        for i, effect in enumerate(effects):
            if isinstance(effect, ApplyRows):
                # What follows (e.g. an anti-entropy ack) waits until the rows are durable:
                # it rides on the last row's commit (all of one turn share one sync).
                try:
                    if self._apply_rows(effect, self._then(effects[i + 1:])):
                        break
                except StorageError as exc:
                    self._storage_failed(exc)
                    return
                continue
            if isinstance(effect, SendReplica | paxos.SendAcceptor):
                self._send(effect.to, effect.message)
            elif isinstance(effect, Respond | paxos.Respond):
                if effect.op_id in self._callbacks:
                    assert isinstance(effect, Respond)  # callbacks are eventual-mode ops
                    self._callback_reply(effect.op_id, effect.result)
                    continue
                if effect.op_id in self._strong_callbacks:
                    assert isinstance(effect, paxos.Respond)
                    self._strong_reply(effect.op_id, effect.result)
                    continue
                future = self._futures.get(effect.op_id)
                if future is not None and not future.done():
                    future.set_result(effect.result)
            elif isinstance(effect, SendHint):
                self._send(effect.to, effect.message)
            elif isinstance(effect, DeleteHint):
                self.commit.commit([effect.write], _ignore)
            elif isinstance(effect, SendToPeer):
                self._send(effect.to, effect.message)
        self._arm_timer()

    def _then(self, effects: list[Any]) -> Callable[[StorageError | None], None]:
        def done(error: StorageError | None) -> None:
            if error is None:
                self._execute(effects)
        return done

    def _send(self, to: str, message: Any) -> None:
        if to == self.name:
            if isinstance(message, ServedRequest):
                self._serve(message, self._deliver_to_self, self.name)
            elif isinstance(message, WatchMessage):
                self._loop.call_soon(self._on_peer_message, self.name, message)
            return
        member = self._members.get(to)
        if member is None:
            return
        self.links.send(to, member.address, message)

    def _deliver_to_self(self, reply: Any) -> None:
        # Never re-entrantly into the effect loop that sent the request: the next turn.
        self._loop.call_soon(self._on_peer_message, self.name, reply)

    def _serve(self, request: ServedRequest, reply_to: Callable[[Any], object],
               sender: str) -> None:
        """Answer a replica or acceptor request (from a peer, or from this node's own
        coordinator or proposer): its writes are committed first, and the reply leaves
        only once they are durable (or as a refusal naming the failure). Log lines about
        it carry ``request_id`` = sender:trace, the id the sender logs the request under."""
        reply: Any
        writes: list[Write]
        if self._debug:
            self.log.debug("served", request_id=f"{sender}:{getattr(request, 'trace', 0)}",
                           kind=type(request).__name__, keyspace=request.keyspace)
        if (isinstance(request, (ReplicaWrite, Prepare, Accept))
                and self.name in self._topology.read_only):
            # Read-only (disk nearly full): take no writes, hints or Paxos state; the
            # coordinator hints it elsewhere, a Paxos majority forms without us.
            reply_to(_refusal(request, f"{READ_ONLY_ERROR}: this node is read-only "
                              f"({self._topology.read_only[self.name]})"))
            return
        try:
            if isinstance(request, ReplicaWrite):
                self.clock.observe(request.cell.hlc, _wall_ms())
            if isinstance(request, (Prepare, Accept, Purge)):
                reply, writes = self.acceptor.handle(request)
            else:
                reply, writes = self.replica.handle(request, _wall_ms())
        except ClockSkewError as exc:
            self._refusals.warning("clock", "refused_clock_skew", self._now(),
                                   request_id=f"{sender}:{getattr(request, 'trace', 0)}",
                                   error=str(exc))
            reply_to(_refusal(request, f"clock: {exc}"))
            return
        except StorageError as exc:
            self.log.error("refused_storage", error=str(exc),
                           request_id=f"{sender}:{getattr(request, 'trace', 0)}")
            reply_to(_refusal(request, f"storage: {exc}"))
            self._storage_failed(exc)
            return
        if not writes:
            reply_to(reply)
            return

        def durable(error: StorageError | None) -> None:
            reply_to(_refusal(request, f"storage: {error}") if error else reply)
            if error is None and isinstance(request, Accept):
                self.watches.on_accept_durable(request)

        self.commit.commit(writes, durable)

    def handle_request(self, message: Any, conn: ServerConnection) -> None:
        """A frame from a peer's link (inbound): a replica or acceptor request, or
        anti-entropy."""
        if isinstance(message, PeerHello):
            conn.peer_name = message.name
            return
        if isinstance(message, ServedRequest):
            self._serve(message, conn.send, conn.peer_name or "?")
            return
        if isinstance(message, StreamRequest):
            self.streaming.serve(message, conn.send)
            return
        if conn.peer_name is None:
            conn.close()  # anti-entropy needs to know who is asking
            return
        self._on_peer_message(conn.peer_name, message)

    def _on_peer_message(self, sender: str, message: Any) -> None:
        if isinstance(message, WatchMessage):
            self.watches.on_message(self._now(), sender, message)
            return
        if isinstance(message, StreamPage):
            self.streaming.on_page(sender, message)
            return
        if isinstance(message, (Promise, Accepted, Nack, Purged, PaxosFailure)):
            if self.proposer.owns(message.id):
                self._execute(self.proposer.on_reply(self._now(), sender, message))
            return
        if isinstance(message, (ReplicaAck, ReplicaReadReply, ReplicaScanReply)):
            if self.coordinator.owns(message.id):
                self._execute(self.coordinator.on_reply(self._now(), sender, message))
            elif isinstance(message, ReplicaAck) and message.id in self._hand_off_acks:
                self._hand_off_acks.pop(message.id)(message)
            elif isinstance(message, ReplicaAck) and self.handoff.owns(message.id):
                self._execute(list(self.handoff.on_ack(message)))
            return
        self._execute(self.anti_entropy.on_message(self._now(), sender, message))

    def _apply_rows(self, effect: ApplyRows, then: Callable[[StorageError | None], None]
                    ) -> bool:
        """Commit the rows that are newer than ours (each visible at once); True if any
        was, and then ``then`` runs once they are durable (an empty commit joins their
        group); False if none was."""
        applied_any = False
        for keyspace, partition, sort, cell in effect.rows:
            applied = self.replica.apply(keyspace, partition, sort, cell)
            if applied:
                self.commit.commit(applied, _ignore)
                applied_any = True
        if applied_any:
            self.commit.commit([], then)
        return applied_any

    def _log_failure(self, op_id: int, code: str, message: str) -> None:
        """A request that failed for a cluster reason (not the client's input), logged with
        the request id its replicas log it under: at most one line per code per 10 s (the
        rest are counted in the next line as ``suppressed``)."""
        if code in ("bad_request", "conflict"):
            return
        self._refusals.warning(f"failed:{code}", "request_failed", self._now(),
                               request_id=f"{self.name}:{op_id}", code=code,
                               error=message[:300])

    # -- time ------------------------------------------------------------------------------

    def _arm_timer(self) -> None:
        if self._closed:
            return
        when = min(self.coordinator.next_deadline(), self.proposer.next_deadline())
        if when == float("inf") or when >= self._timer_when:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_when = when
        self._timer = asyncio.get_running_loop().call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_when = float("inf")
        self._execute(self.coordinator.on_tick(self._now()))
        self._execute(self.proposer.on_tick(self._now()))

    async def _background_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(BACKGROUND_TICK_S)
            now = self._now()
            try:
                self._execute(self.coordinator.on_tick(now))
                self._execute(self.proposer.on_tick(now))
                # A read-only member gets no hints replayed and no anti-entropy rows
                # (its disk is nearly full); both resume when it is healthy again.
                writable = self._topology.alive - self._topology.read_only.keys()
                self._execute(list(self.handoff.on_tick(now, _wall_ms(), writable,
                                                        self._ids)))
                if self.name not in self._topology.read_only:
                    self._execute(self.anti_entropy.on_tick(
                        now, self._topology.ring, self._replication_map(now), writable))
                self.watches.on_tick(now)
                if now >= self._next_purge:
                    self._purge_step(now)
            except StorageError as exc:
                self._storage_failed(exc)
                return

    def _replication_map(self, now: float) -> dict[str, int]:
        """Keyspace -> replication factor for anti-entropy: every keyspace this node holds a
        definition of (refreshed every few seconds), and the system keyspace on all nodes."""
        if now >= self._replication_refresh_at:
            self._replication_refresh_at = now + 5.0
            self._replication = {d.name: d.replication for d in self.local_definitions()}
            self._replication.update((d.name, d.replication) for d in BUILTIN_KEYSPACES.values())
        self._replication[SYSTEM_KEYSPACE] = max(1, len(self._topology.ring))
        return self._replication

    def _purge_step(self, now: float) -> None:
        """Drop tombstones and expired cells older than the grace period, a slice of the
        store per tick (a full pass at least every PURGE_INTERVAL_S)."""
        swept = purge_slice(self.store, self._purge_cursor, _wall_ms(),
                            int(self.tombstone_grace_s * 1000), PURGE_KEYS_PER_TICK)
        for keyspace, key, cell in swept.purged:
            self.forest.update(keyspace, key, cell, None)
        if swept.writes:
            self.purged += len(swept.writes)
            self.commit.commit(swept.writes, _ignore)
        if swept.cursor is None:
            self._purge_cursor = DATA_PREFIX
            self._next_purge = now + PURGE_INTERVAL_S
            self._purge_strong(now)
        else:
            self._purge_cursor = swept.cursor

    def _purge_strong(self, now: float) -> None:
        """Forget strong-mode tombstones older than the grace period, a slice per sweep
        (each needs all N replicas to accept; ``Proposer.purge``)."""
        grace_ms = int(self.tombstone_grace_s * 1000)
        keys, cursor = self.acceptor.tombstones(self._paxos_purge_cursor, _wall_ms(),
                                                grace_ms, PAXOS_PURGE_KEYS_PER_SWEEP)
        self._paxos_purge_cursor = cursor or b""
        for keyspace, partition, sort in keys:
            replication = self._replication_map(now).get(keyspace)
            if replication is None:
                continue
            op_id = next(self._op_ids)  # its outcome (PurgeDone) is not awaited
            self._execute(self.proposer.purge(now, op_id, self._topology, keyspace,
                                              replication, partition, sort, _wall_ms(),
                                              grace_ms))

    def _now(self) -> float:
        return self._loop.time()

    def _clock_ms(self) -> int:
        """The time stamped on strong changes, by which lock leases expire: the hybrid
        clock's wall part, so it never goes back on this node (an NTP step backwards does
        not lengthen a lease) and stays within the skew bound of the other nodes'."""
        return physical_ms(self.clock.now(_wall_ms()))

    def hot(self, n: int, keyspace: str | None = None) -> list[HotPartition]:
        """The ``n`` busiest partitions this node coordinates (of ``keyspace``, or of all)."""
        return self.hot_partitions.top(self._now(), n, keyspace)

    def keyspace_rates(self) -> dict[str, float]:
        """Requests per second this node coordinates, per keyspace (decaying window)."""
        now = self._now()
        return {ks: self.hot_partitions.keyspace_rate(now, ks)
                for ks in self.hot_partitions.keyspaces()}

    def routing(self) -> list[PeerScore]:
        """The coordinator's view of each replica it asks (``core.snitch``)."""
        return self.coordinator.snitch.view(self._now())

    def counters(self) -> dict[str, int]:
        result: dict[str, int] = {}
        for prefix, counters in (("coordinator", self.coordinator.counters),
                                 ("proposer", self.proposer.counters),
                                 ("acceptor", self.acceptor.counters),
                                 ("replica", self.replica.counters),
                                 ("handoff", self.handoff.counters),
                                 ("anti_entropy", self.anti_entropy.counters)):
            for field, value in vars(counters).items():
                result[f"{prefix}_{field}"] = value
        result["hints_pending"] = self.hints.total()
        result["commit_syncs"] = self.commit.syncs
        result["commit_writes"] = self.commit.writes
        result["commit_batches"] = self.commit.commits
        result["purged"] = self.purged
        result["in_flight"] = self.coordinator.in_flight()
        result.update(self.locks.counters())
        result.update(self.watches.counters())
        result.update(self.streaming.counters())
        return result


PeerLinksFactory = Callable[[PeerHello, Any, Callable[[str, Any], None]], PeerLinks]


def _ignore(error: StorageError | None) -> None:
    """For commits nobody waits on (a failure reaches ``on_error`` anyway)."""


class _ConflictFound(Exception):
    def __init__(self, version: int, value: bytes | None) -> None:
        super().__init__(f"version {version}")
        self.version = version
        self.value = value


def _refusal(request: ServedRequest, error: str) -> ReplicaAck | PaxosFailure:
    """The reply that tells a coordinator or proposer why this node did not serve it."""
    if isinstance(request, (Prepare, Accept, Purge)):
        return PaxosFailure(request.id, error[:500])
    return ReplicaAck(request.id, error[:500])
