"""A node: the membership state machine wired to sockets, a timer, a disk and subscribers.

Every input (a datagram, a push-pull, a tick, a local command) goes to ``Membership``; the
effects it returns are executed in order by ``_execute``. ``SaveIncarnation`` is written
durably before the effects after it run, so no message that depends on a new incarnation
leaves before the number would survive a crash. After every input the timer is re-armed
for ``next_deadline()``.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import dataclasses
import os
import random
import socket
import time
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec

from leaderless import __version__
from leaderless.api.http import serve_http
from leaderless.api.kv_server import abort_connections, serve_clients
from leaderless.api.messages import (
    DoctorReply,
    DoctorReportRequest,
    KeyringChange,
    KeyringChangeReply,
    KeyringNodeResult,
    KeyringReply,
    KeyringRequest,
    Request,
    RingReply,
    RingReport,
    RingReportRequest,
    RingRequest,
    StatusReply,
)
from leaderless.api.server import ApiHandler
from leaderless.config import NodeConfig, is_ip_literal
from leaderless.core.anti_entropy_messages import AntiEntropyMessage
from leaderless.core.codec import MalformedInput
from leaderless.core.effects import (
    DeliverUserEvent,
    Effect,
    MemberEvent,
    SaveIncarnation,
    SendPacket,
    StartPushPull,
)
from leaderless.core.health import HEALTHY, HealthState
from leaderless.core.kv_messages import PeerHello, ReplicaRead, ReplicaScan, ReplicaWrite
from leaderless.core.membership import Member, Membership
from leaderless.core.messages import (
    Address,
    LoadSummary,
    MemberStatus,
    NodeMeta,
    Packet,
    PushPull,
    SealedPushPull,
    UserEvent,
    with_fields,
)
from leaderless.core.paxos_messages import PaxosRequest
from leaderless.core.ring import token_count_for
from leaderless.core.snitch import PeerScore
from leaderless.core.streaming import StreamConfig
from leaderless.core.streaming_messages import StreamRequest
from leaderless.core.watch_messages import WatchMessage
from leaderless.obs import RequestStats, SystemSampler, make_registry, render
from leaderless.obs.alerts import Alerts, Transition, node_readings
from leaderless.obs.metrics import HOT_PARTITIONS_EXPORTED
from leaderless.runtime.auth import AuthService
from leaderless.runtime.cleanup import Cleanup, held_replication
from leaderless.runtime.counters import RuntimeCounters
from leaderless.runtime.datadir import DataDir
from leaderless.runtime.doctor import NodeDoctor
from leaderless.runtime.drops import Drops
from leaderless.runtime.errors import DataDirError, StartupError
from leaderless.runtime.failover import PassiveFailover, classify, hand_off_hints
from leaderless.runtime.fault_partition import install_fault_partition
from leaderless.runtime.health import HealthMonitor, StoreErrors
from leaderless.runtime.keyring_service import (
    KeyringService,
    SyncFrame,
    open_sync_frame,
    sync_frame,
)
from leaderless.runtime.kv import KvNode
from leaderless.runtime.logs import NodeLogger, RateLimitedLog
from leaderless.runtime.peers import PeerLinks
from leaderless.runtime.ring_changes import (
    RingChangeError,
    RingService,
    initial_ring_fields,
    load_ring_file,
    save_ring_file,
)
from leaderless.runtime.ring_status import gather, own_report, ring_metrics
from leaderless.runtime.task_workers import WorkerPool
from leaderless.runtime.tasks import TaskService
from leaderless.runtime.tcp import ConnectionClosedError, ServerConnection
from leaderless.runtime.transport import NetTransport, Transport
from leaderless.runtime.wall_clock import install_fault_skew, wall_ms
from leaderless.security.data_keys import DataKeyError, load_data_keys
from leaderless.security.keyring import SEAL_OVERHEAD_BYTES, KeyringError, OpenError
from leaderless.security.tls import NodeTls, TlsError, peer_frame_refusal
from leaderless.storage.encrypted import at_rest
from leaderless.storage.memory import MemoryStore
from leaderless.storage.rocks import RocksStore
from leaderless.storage.store import StorageError, Store

InboundFrame = (PushPull | SealedPushPull | Request | ReplicaWrite | ReplicaRead | ReplicaScan
                | PeerHello | AntiEntropyMessage | PaxosRequest | WatchMessage | KeyringChange
                | DoctorReportRequest | StreamRequest | RingReportRequest)
"""What may arrive on the TCP port: a peer's sync (sealed when the node has a gossip
keyring), a CLI request, or the data plane (a coordinator's replica request, a proposer's
Paxos request, anti-entropy), a keyring change sent on by a peer, or a peer's doctor."""
LOAD_REFRESH_S = 5.0
"""How often a node looks at its load to gossip it (``LoadSummary``)."""
LOAD_MAX_AGE_S = 60.0
"""A load summary is re-sent at least this often, even if nothing moved."""
LOAD_CHANGE_MIN = 10
"""Points of cpu/memory/disk %, or percent of ops/s or p99, worth a new summary: one alive
update per node per refresh at most, so small wobbles must not flood the gossip."""
PUSH_PULLS_IN_FLIGHT_MAX = 16
"""Outbound syncs at once (and one per peer): each may carry megabytes at 20,000 members."""
TICK_FLOOR_S = 0.005
"""The timer never fires sooner than this after the last tick: deadlines a few ms apart
share one tick, and a deadline that is already due cannot spin the loop."""
JOIN_RETRY_INITIAL_S = 0.5
JOIN_RETRY_MAX_S = 10.0
SUBSCRIBERS_MAX = 1024

T = TypeVar("T")


class Node:
    """One cluster member in this process. ``await start()``, then ``await stop()``."""

    def __init__(self, config: NodeConfig, rng: random.Random | None = None,
                 transport_factory: Callable[..., Any] = NetTransport.bind) -> None:
        self.config = config
        self.log = NodeLogger(config.name, "node")
        self._member_log = NodeLogger(config.name, "membership")
        self._event_log = NodeLogger(config.name, "events")
        self.counters = RuntimeCounters()
        self._drops = Drops(self.counters, NodeLogger(config.name, "transport"))
        self._data_dir = DataDir(config.data_dir)
        self._rng = rng or random.Random()
        self._transport_factory = transport_factory
        self._api = ApiHandler(self)
        self._membership: Membership | None = None
        self._transport: Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = 0.0
        self._member_subscribers: list[Callable[[MemberEvent], None]] = []
        self._event_subscribers: list[Callable[[UserEvent], None]] = []
        self._push_pulls: dict[Address, asyncio.Task[bool]] = {}
        self._join_log = RateLimitedLog(self.log)
        self._join_task: asyncio.Task[None] | None = None
        self._drained = asyncio.Event()
        self._started_at = 0.0
        self._load_task: asyncio.Task[None] | None = None
        self.requests = RequestStats()
        """Client request latencies and errors (``obs``), for metrics and the load summary."""
        self.system = SystemSampler(config.data_dir)
        """This machine's CPU, memory, disk and network (``obs``): metrics, load, dashboard."""
        self.health = HealthMonitor(config.health, self.system, publish=self._publish_health,
                                    log=NodeLogger(config.name, "health"))
        """The self-health monitor (``runtime.health``): ``state``, ``readings()`` and
        ``clock_offsets()``; started with the node, its state gossiped in the metadata."""
        self._registry = make_registry(
            lambda: msgspec.structs.asdict(self.status()), self.requests, self.system,
            commit_group_sizes=lambda: self.kv.commit.group_sizes if self.kv else {},
            commit_sync_latency=lambda: None if self.kv is None else (
                self.kv.commit.sync_bounds_s, self.kv.commit.sync_counts,
                self.kv.commit.sync_seconds),
            auth_events=lambda: self.auth.counters() if self.auth is not None else {},
            member_health=lambda: {m.name: (m.meta.health or HEALTHY).status.label
                                   for m in self.members()},
            doctor_findings=lambda: None if self.doctor_service is None else (
                self.doctor_service.finding_counts()),
            routing=lambda: self.kv.routing() if self.kv is not None else [],
            hot_partitions=lambda: (self.kv.hot(HOT_PARTITIONS_EXPORTED)
                                    if self.kv is not None else []),
            ring=lambda: None if self.ring is None else ring_metrics(self.ring_report()))
        self._alerts = Alerts(config.alerts.effective_rules())
        """This node's alert rules and their states (``obs.alerts``)."""
        self._alerts_task: asyncio.Task[None] | None = None
        self._stopping = False
        self.kv: KvNode | None = None
        """The data plane (None until started)."""
        self.auth: AuthService | None = None
        """Users, tokens and permission checks (None until started; ``enabled`` False
        unless ``[auth] enabled``)."""
        self._store: Store | None = None
        self._client_server: asyncio.Server | None = None
        self._http_runner: Any = None
        self.client_address: Address | None = None
        self.http_address: Address | None = None
        self.joined = asyncio.Event()
        """Set once a seed answered (or at once for a cluster of one)."""
        self.stopped = asyncio.Event()
        self.fatal_error: str | None = None
        """Set when the node had to stop on an operating error (e.g. the disk failed)."""
        self.failover: PassiveFailover | None = None
        """Set when an unrecoverable local fault started passive failover."""
        self.keyring: KeyringService | None = None
        """The gossip keyring (None: gossip in plaintext); loaded at start."""
        self.tls: NodeTls | None = None
        """The TLS contexts from ``[tls]`` (None: plaintext TCP); loaded at start."""
        self.doctor_service: NodeDoctor | None = None
        """This node's side of ``leaderless doctor`` (None until started)."""
        self.ring: RingService | None = None
        """Joins, leaves and capacity changes of this node (``runtime.ring_changes``)."""
        self.cleanup: Cleanup | None = None
        """Deletes the ranges this node no longer holds (``runtime.cleanup``)."""
        self._ring_task: asyncio.Task[None] | None = None
        self.tasks: TaskService | None = None
        """Task queues (``runtime.tasks``; None until started): submit, status, claim."""
        self._tasks_task: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Lock the data dir, bind the address, take incarnation last+1 and start joining.
        Raises StartupError (PortInUseError, DataDirError) with what to do."""
        self._data_dir.open()
        try:
            install_fault_skew(os.environ, self.log)  # test-only; warns when set
            install_fault_partition(os.environ, self.log)  # test-only; warns when set
            last = self._data_dir.load_incarnation()
            # The data-dir copy of the gossip keyring (kept by rotations) wins over the
            # initial file; without either, gossip stays plaintext.
            self.keyring = KeyringService.load(
                self.config.name, self.config.data_dir, self.config.security.gossip_keyring,
                NodeLogger(self.config.name, "keyring"))
            sealing = {} if self.keyring is None else {"keyring": self.keyring}
            self.tls = _load_tls(self.config)
            contexts = {} if self.tls is None else {
                "server_ssl": self.tls.node_server, "client_ssl": self.tls.node_client}
            self._transport = await self._transport_factory(
                self.config.bind, self._on_packet, self, InboundFrame, self._drops, **sealing,
                **contexts)
        except StartupError:
            self._data_dir.close()
            raise
        # A restarted node must outvote whatever the cluster remembers about its last life.
        incarnation = 0 if last is None else last + 1
        self._data_dir.save_incarnation(incarnation)
        loop = asyncio.get_running_loop()
        self._started_at = loop.time()
        advertise = self.config.advertise
        if advertise.port == 0:
            advertise = Address(advertise.host, self._transport.address.port)
        try:
            await self._start_data_plane()
        except (StartupError, StorageError, OSError) as exc:
            await self._transport.close()
            if self._store is not None:
                self._store.close()
            self._data_dir.close()
            if isinstance(exc, StartupError):
                raise
            raise StartupError(f"cannot start the data plane: {exc}") from exc
        token_seed = self._data_dir.token_seed(self._rng.getrandbits(64))
        try:
            ring_fields = self._ring_fields(first_start=last is None)
        except StartupError:
            if self.kv is not None:
                await self.kv.close()
            await self._transport.close()
            if self._store is not None:
                self._store.close()
            self._data_dir.close()
            raise
        token_seed = int(ring_fields.get("token_seed", token_seed))
        meta = NodeMeta(zone=self.config.zone,
                        weight_milli=max(1, round(self.config.weight * 1000)),
                        tags=dict(self.config.tags), version=__version__,
                        token_seed=token_seed,
                        client_port=self.client_address.port if self.client_address else 0,
                        http_port=self.http_address.port if self.http_address else 0)
        assert self.kv is not None
        self.ring = RingService(
            self.config.name, self.config.data_dir, ring_fields,
            settle_s=self.config.ring.settle_s, kv=self.kv,
            meta=lambda: self._require().meta, publish=self._publish_ring,
            members=lambda: self._require().members(), depart=self.stop, now=self._now)
        meta = with_fields(meta, **self.ring.meta_fields())
        kv = self.kv
        self.cleanup = Cleanup(kv, self.config.name, grace_s=self.config.ring.cleanup_grace_s,
                               replication=lambda: held_replication(kv))
        self._membership = Membership(self.config.name, advertise, meta,
                                      self.config.membership, self._rng, loop.time(),
                                      incarnation=incarnation,
                                      datagram_overhead_bytes=SEAL_OVERHEAD_BYTES
                                      if self.keyring is not None else 0)
        self._arm_timer()
        assert self.kv is not None
        self.kv.start(self._membership.members())
        # Probe round trips measure the peers' clocks: strong operations and lock leases
        # are refused while this node's is beyond the bound; health and doctor show them.
        self.kv.clock_skew_ms = self._membership.clock_skew_ms
        self.health.set_clock_offsets(self._membership.clock_offsets.offsets_ms)
        self.health.set_clock_skew(self._membership.clock_skew_ms)
        self.doctor_service = self._make_doctor(self.kv)
        self.doctor_service.start()
        assert self.auth is not None
        self.auth.start(self.joined)  # bootstraps once a seed has answered
        self.tasks = self._make_tasks(self.kv)
        self.kv.tasks = self.tasks  # the client protocols reach it there (api.task_api)
        self._tasks_task = loop.create_task(self._start_tasks(self.tasks))
        self.log.info("started", address=str(advertise), bind=str(self._transport.address),
                      incarnation=incarnation, data_dir=str(self.config.data_dir),
                      version=__version__,
                      client=str(self.client_address) if self.client_address else None,
                      http=str(self.http_address) if self.http_address else None)
        if self.config.join:
            self._join_task = loop.create_task(self._join_loop(self.config.join))
        else:
            self.joined.set()
        self._load_task = loop.create_task(self._gossip_load())
        self._ring_task = loop.create_task(self._start_ring())
        self.health.start()
        self._alerts_task = loop.create_task(self._evaluate_alerts())

    def _make_tasks(self, kv: KvNode) -> TaskService:
        tasks = self.config.tasks
        tags = set(self.config.tags) | {f"{k}={v}" for k, v in self.config.tags.items() if v}
        pool = WorkerPool(tasks.slots, tasks.modules, tasks.allow_pickle,
                          max_tasks_per_worker=tasks.max_tasks_per_worker,
                          max_worker_memory_mb=tasks.max_worker_memory_mb,
                          log=NodeLogger(self.config.name, "task_workers"))
        return TaskService(kv, self.config.name, tasks, tags, pool,
                           load=lambda: self.system.sample().cpu_percent,
                           now=lambda: wall_ms() / 1000)

    async def _start_tasks(self, tasks: TaskService) -> None:
        """Start the task workers (a second or so) without holding up the node's start."""
        try:
            await tasks.start()
        except Exception as exc:  # e.g. a registered module that does not import
            self.log.error("tasks_not_started", error=str(exc),
                           note="this node runs no tasks; fix [tasks] modules and restart")

    def _ring_fields(self, first_start: bool) -> dict[str, Any]:
        """This node's ring state (``runtime.ring_changes``): saved, or on a first start
        joining (bootstrap) or normal; saved at once so a crash keeps it."""
        config = self.config
        saved = load_ring_file(config.data_dir)
        if saved is None and not first_start:
            # A data dir from before ring states: its node was on the ring already.
            saved = {"state": "normal", "token_count": token_count_for(config.weight)}
        fields = initial_ring_fields(saved, token_count=token_count_for(config.weight),
                                     joins=bool(config.join), bootstrap=config.ring.bootstrap,
                                     replace=config.replace)
        save_ring_file(config.data_dir, fields)
        return fields

    async def _start_ring(self) -> None:
        """Ring changes start once a seed answered: before, the view is only ourselves."""
        await self.joined.wait()
        if self.ring is not None and not self._stopping:
            self.ring.start()
            if self.cleanup is not None:
                self.cleanup.start()

    def _publish_ring(self, fields: dict[str, Any]) -> None:
        """Gossip new ring fields (``runtime.ring_changes`` saved them first)."""
        membership = self._membership
        if membership is not None:
            self._feed(membership.update_meta(self._now(), with_fields(
                membership.meta, **fields)))

    async def _start_data_plane(self) -> None:
        """Open the store and the client listeners (before the membership, so the member
        metadata can carry the real client ports)."""
        config = self.config
        if config.storage == "memory":
            self._store = MemoryStore()
        else:
            # With fsync=always nothing is acknowledged before a sync, so writes can wait
            # in one batch per group (storage.rocks); interval acknowledges before the
            # sync, so each write must reach the OS at once to survive a kill -9.
            self._store = RocksStore(config.data_dir / "data",
                                     buffer_writes=config.fsync == "always")
        # Encryption at rest: values sealed under the data keys, when some are configured;
        # a store that does not match the setting (encrypted or not) is refused here.
        try:
            data_keys = load_data_keys(config.security.encryption_key_file,
                                       config.security.encryption_key)
        except DataKeyError as exc:
            raise StartupError(str(exc)) from None
        self._store = at_rest(self._store, data_keys, where=str(config.data_dir))
        # Every store failure the node meets is counted here for the health monitor.
        self._store = self.health.store_errors = StoreErrors(self._store)
        drops = self._drops

        def links(hello: Any, reply_type: Any, on_message: Callable[[str, Any], None]
                  ) -> PeerLinks:
            return PeerLinks(config.name, hello, reply_type, drops, on_message,
                             ssl_context=self.tls.node_client if self.tls else None)

        self.kv = KvNode(
            config.name, self._store, value_bytes_max=config.value_bytes_max,
            fsync=config.fsync, fsync_interval_ms=config.fsync_interval_ms,
            tombstone_grace_s=config.tombstone_grace_s, hint_window_s=config.hint_window_s,
            anti_entropy_interval_s=config.anti_entropy_interval_s, peers=links,
            on_fatal=self._fail, rng_seed=self._rng.getrandbits(64),
            settle_s=config.ring.settle_s,
            stream=StreamConfig(bytes_per_s=config.ring.stream_mb_per_s * 1e6,
                                sessions_max=config.ring.stream_sessions))
        self.auth = AuthService(self.kv, enabled=config.security.auth,
                                token_ttl_s=config.security.token_ttl_s,
                                admin_password_file=config.security.admin_password_file)
        log = NodeLogger(config.name, "api")
        if config.client is not None:
            try:
                self._client_server = await serve_clients(self.kv, config.client.host,
                                                          config.client.port, log=log,
                                                          stats=self.requests,
                                                          auth=self.auth, drops=self._drops,
                                                          ssl_context=self.tls.client_server
                                                          if self.tls else None)
            except OSError as exc:
                raise StartupError(f"client: cannot listen on {config.client}: "
                                   f"{exc.strerror or exc}; pick another --client port"
                                   ) from None
            port = self._client_server.sockets[0].getsockname()[1]
            self.client_address = Address(config.client.host, port)
        if config.http is not None:
            try:
                self._http_runner = await serve_http(self.kv, config.http.host,
                                                     config.http.port,
                                                     value_bytes_max=config.value_bytes_max,
                                                     log=log, ops=self, drops=self._drops,
                                                     ssl_context=self.tls.client_server
                                                     if self.tls else None)
            except OSError as exc:
                raise StartupError(f"http: cannot listen on {config.http}: "
                                   f"{exc.strerror or exc}; pick another --http port") from None
            port = self._http_runner.addresses[0][1]
            self.http_address = Address(config.http.host, port)

    async def stop(self) -> None:
        """Leave gracefully: announce it, keep gossiping until the announcement is out
        (or ``leave_timeout_s``), then close the sockets. Safe to call twice."""
        if self._stopping:
            await self.stopped.wait()
            return
        self._stopping = True
        if self._join_task is not None:
            self._join_task.cancel()
        if self.tasks is not None and self.fatal_error is None:
            # Finish or hand back the running tasks while this node still serves rounds.
            await self.tasks.stop(self.config.tasks.drain_s)
        membership = self._membership
        if membership is not None and (self.fatal_error is None or self.failover is not None):
            others = membership.live_count() > 1
            self._feed(membership.leave(self._now()))
            self.log.info("leaving", pending_broadcasts=membership.pending_broadcasts())
            if others:
                await self._wait_drained(membership)
        await self._close()

    async def _wait_drained(self, membership: Membership) -> None:
        try:
            async with asyncio.timeout(self.config.leave_timeout_s):
                # Nobody left to tell (the whole cluster is stopping): nothing to wait for.
                while membership.pending_broadcasts() > 0 and membership.live_count() > 1:
                    self._drained.clear()
                    await self._drained.wait()
        except TimeoutError:
            self.log.warning("leave_timeout", pending_broadcasts=membership.pending_broadcasts(),
                             leave_timeout_s=self.config.leave_timeout_s)

    async def _close(self) -> None:
        await self.health.stop()
        if self._ring_task is not None:
            self._ring_task.cancel()
        if self.ring is not None:
            self.ring.close()
        if self.cleanup is not None:
            self.cleanup.close()
        if self._load_task is not None:
            self._load_task.cancel()
        if self._alerts_task is not None:
            self._alerts_task.cancel()
        if self.doctor_service is not None:
            self.doctor_service.close()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in list(self._push_pulls.values()):
            task.cancel()
        if self._client_server is not None:
            self._client_server.close()
            abort_connections(self._client_server)
        if self._http_runner is not None:
            await self._http_runner.cleanup()
        if self._tasks_task is not None:
            self._tasks_task.cancel()
        if self.tasks is not None:
            await self.tasks.stop(0.0)
        if self.auth is not None:
            await self.auth.close()
        if self.kv is not None:
            await self.kv.close()
        if self._transport is not None:
            await self._transport.close()
        if self._store is not None:
            try:
                self._store.close()
            except StorageError as exc:
                if self.fatal_error is None:
                    raise
                # Stepping out because the store failed (a full disk): closing it fails
                # too ("Writer has previous error"); what it synced is intact. Exit anyway.
                self.log.warning("store_close_failed", error=str(exc))
        self._data_dir.close()
        self.log.info("stopped")
        self.stopped.set()

    def _fail(self, error: str | StorageError) -> None:
        """An operating error we cannot run safely with (a failed fsync, a corrupt store,
        a data dir that cannot keep the incarnation): passive failover -- hand off the
        hints, leave, stop; the process exits with ``EXIT_FAILOVER``."""
        if self.fatal_error is not None:
            return
        fault = classify(error)
        self.fatal_error = f"{fault.kind.value}: {fault.detail}"
        self.failover = PassiveFailover(self.name, fault)
        self.log.error("fatal", error=self.fatal_error)
        asyncio.get_running_loop().create_task(self._fail_over(self.failover))

    async def _fail_over(self, failover: PassiveFailover) -> None:
        """The passive-failover sequence (``runtime.failover``), in its order."""
        failover.started()
        if self._membership is not None:
            self.health.leave(failover.fault.reason)  # gossiped at once: leaving(reason)
        if self._client_server is not None:  # refuse clients: they retry on other nodes
            self._client_server.close()
            abort_connections(self._client_server)
        if self._http_runner is not None:
            runner, self._http_runner = self._http_runner, None
            await runner.cleanup()
        try:
            if self.kv is not None and self._membership is not None and not self._stopping:
                live = [m.name for m in self._membership.members()
                        if m.status is MemberStatus.ALIVE]
                failover.handed_off(await hand_off_hints(
                    self.kv.hints, self.kv.hand_off_hint, self.name, live))
        except StorageError as exc:  # the hint log itself is unreadable (corrupt store)
            failover.hand_off_failed(exc)
        finally:
            await self.stop()  # a graceful leave: peers mark this node left, not dead

    # -- public API (also served to clients by api.server) -----------------------------

    @property
    def address(self) -> Address:
        """The advertised address (with the real port if bound to port 0)."""
        return self._require().address

    @property
    def membership(self) -> Membership:
        return self._require()

    def members(self) -> list[Member]:
        return self._require().members()

    def clock_offsets(self) -> dict[str, float]:
        """Each probed peer's clock minus this node's, in ms (``core.clock_offsets``)."""
        return self._require().clock_offsets.offsets_ms()

    def clock_skew_ms(self) -> float | None:
        """How far this node's clock is ahead of its peers' (negative: behind), in ms;
        None until enough peers were probed. Beyond ``core.locks.CLOCK_SKEW_MAX_MS`` the
        node refuses to coordinate strong operations and lock leases."""
        return self._require().clock_skew_ms()

    def wall_time(self, monotonic_s: float) -> float:
        """Unix time of a ``now`` value of this node's loop clock (for display only)."""
        return time.time() - (self._now() - monotonic_s)

    def broadcast_event(self, name: str, payload: bytes) -> UserEvent:
        """Send a user event to the cluster; raises ValueError if name/payload are too big."""
        membership = self._require()
        effects = membership.broadcast_event(self._now(), name, payload)
        event = next(e.event for e in effects if isinstance(e, DeliverUserEvent))
        self._feed(effects)
        return event

    def subscribe_member_events(self, callback: Callable[[MemberEvent], None]
                                ) -> Callable[[], None]:
        """Call ``callback`` for every membership change; returns the unsubscribe function."""
        return _subscribe(self._member_subscribers, callback)

    def subscribe_user_events(self, callback: Callable[[UserEvent], None]
                              ) -> Callable[[], None]:
        """Call ``callback`` for every user event delivered here; returns the unsubscribe."""
        return _subscribe(self._event_subscribers, callback)

    async def keyring_operation(self, request: KeyringRequest) -> KeyringReply:
        """Apply a keyring operation here and on every other alive member; each node's
        result. Raises KeyringError if the key is malformed, this node refuses, or gossip
        encryption is off here."""
        if self.keyring is None:
            raise KeyringError("gossip encryption is off on this node; start every node "
                               "with --gossip-keyring FILE (`leaderless keyring generate`)")
        membership = self._require()
        assert self._transport is not None
        peers = [(m.name, m.address) for m in membership.members()
                 if m.status is MemberStatus.ALIVE and m.name != membership.name]
        return await self.keyring.run(request, peers, self._transport.request,
                                      self.config.io_timeout_s)

    async def doctor(self) -> DoctorReply:
        """Diagnose the whole cluster from here (``leaderless doctor``, ``GET /api/doctor``):
        every alive member's report, gathered at once, and the checks (``obs.doctor``)."""
        self._require()
        assert self.doctor_service is not None and self._transport is not None
        return await self.doctor_service.diagnose(self._transport.request)

    async def ring_operation(self, request: RingRequest) -> RingReply:
        """``leaderless node decommission | set-capacity | cleanup`` act on this node, then
        (and for ``ring status``) the cluster's ring status, every alive member's report
        gathered at once (``runtime.ring_status``). Raises RingChangeError (or
        CleanupRefusedError) with the reason when this node refuses."""
        membership = self._require()
        ring, cleanup, kv = self.ring, self.cleanup, self.kv
        assert ring is not None and cleanup is not None and kv is not None
        assert self._transport is not None
        if request.operation == "decommission":
            ring.decommission()
        elif request.operation == "set_capacity":
            if not 0 < request.weight <= 1000:
                raise RingChangeError(f"weight {request.weight:g} is out of range: give a "
                                      "capacity weight in (0, 1000]")
            ring.set_capacity(token_count_for(request.weight))
        elif request.operation == "cleanup":
            cleanup.request()
        return await gather(request.operation, self.name, self.ring_report(),
                            membership.members(), kv.placement, self._transport.request)

    async def ring_status(self) -> RingReply:
        """The cluster's ring status (``leaderless ring status``, ``GET /api/ring``)."""
        return await self.ring_operation(RingRequest("status"))

    def ring_report(self) -> RingReport:
        """This node's ring figures (the answer to a peer's ``RingReportRequest``)."""
        assert self.ring is not None
        return own_report(self.name, self.ring.status(), self.cleanup)

    def _make_doctor(self, kv: KvNode) -> NodeDoctor:
        def disk_usage() -> tuple[int, int, int, bool]:
            sample = self.system.sample()
            return (sample.disk_used_bytes, sample.disk_free_bytes, sample.disk_total_bytes,
                    sample.disk_usage_available)

        tls_cert = self.config.security.tls_cert if self.tls is not None else None
        return NodeDoctor(self, kv, version=__version__, tls_cert=tls_cert, disk_usage=disk_usage,
                          clock_offsets=self.health.clock_offsets,
                          log=NodeLogger(self.config.name, "doctor"))

    def status(self) -> StatusReply:
        membership = self._require()
        states = collections.Counter(m.status.name.lower() for m in membership.members())
        return StatusReply(
            name=membership.name, address=str(membership.address),
            incarnation=membership.incarnation, version=__version__,
            uptime_s=round(self._now() - self._started_at, 3), states=dict(states),
            pending_broadcasts=membership.pending_broadcasts(),
            membership=dataclasses.asdict(membership.counters),
            runtime={**{k: dict(v) for k, v in self.counters.as_dict().items()},
                     **({"kv": {**self.kv.counters(),
                                **(self.tasks.counters() if self.tasks is not None else {})}}
                        if self.kv is not None else {})})

    @property
    def name(self) -> str:
        return self.config.name

    def readiness(self) -> dict[str, str | None]:
        """The readiness checks (``GET /health/ready``): each failure's reason, or None."""
        membership = self._membership
        checks: dict[str, str | None] = {}
        if membership is None or not self.joined.is_set():
            checks["joined"] = ("joining: no seed has answered yet" if self.config.join
                                else "starting")
        else:
            checks["joined"] = None
        if self.fatal_error is not None or self._stopping:
            checks["storage"] = self.fatal_error or "stopping"
        elif self._store is None or self.kv is None:
            checks["storage"] = "not open yet"
        else:
            checks["storage"] = None
        checks["ring"] = None if self.kv is None or membership is None else (
            self.kv.ring_gaps(m.name for m in membership.members()
                              if m.status is MemberStatus.ALIVE))
        return checks

    def metrics(self) -> tuple[bytes, str]:
        return render(self._registry)

    def cluster(self) -> list[dict[str, Any]]:
        """Every member this node knows, with its state and last gossiped load
        (``GET /api/cluster``): the cluster's view without a central collector."""
        membership = self._require()
        ownership = self.kv.ownership() if self.kv is not None else {}
        routing = {p.name: p for p in self.kv.routing()} if self.kv is not None else {}
        out = []
        for m in sorted(membership.members(), key=lambda m: m.name):
            load = m.meta.load
            out.append({
                "name": m.name, "address": str(m.address), "state": m.status.name.lower(),
                "http": (f"{m.address.host}:{m.meta.http_port}" if m.meta.http_port
                         else None),
                "incarnation": m.incarnation, "zone": m.meta.zone, "version": m.meta.version,
                "weight": m.meta.weight, "ownership": round(ownership.get(m.name, 0.0), 4),
                "load": None if load is None else msgspec.structs.asdict(load),
                "health": _health_dict(m.meta.health),
                "routing": _routing_dict(routing.get(m.name))})
        return out

    def _load_summary(self) -> LoadSummary:
        sample = self.system.sample()
        return LoadSummary(min(100, round(sample.cpu_percent)),
                           min(100, round(sample.memory_used_pct)),
                           min(100, round(sample.disk_used_pct)),
                           round(self.requests.ops_per_s()),
                           round(self.requests.p99_ms(), 2))

    async def _gossip_load(self) -> None:
        """Refresh our load in the member metadata every LOAD_REFRESH_S when it moved by
        more than LOAD_CHANGE_MIN (or LOAD_MAX_AGE_S passed): each refresh is an alive
        update every member receives, so it must stay rare."""
        last_sent = -LOAD_MAX_AGE_S
        while not self._stopping:
            await asyncio.sleep(LOAD_REFRESH_S)
            membership = self._membership
            if membership is None or self._stopping:
                continue
            new = self._load_summary()
            old = membership.meta.load
            now = self._now()
            if old is not None and now - last_sent < LOAD_MAX_AGE_S and not _moved(old, new):
                continue
            last_sent = now
            self._feed(membership.update_meta(now, msgspec.structs.replace(
                membership.meta, load=new)))

    def _publish_health(self, state: HealthState) -> None:
        """Gossip our health at once (unlike load, every change matters: a read-only node
        must stop getting writes within a gossip round)."""
        membership = self._membership
        if membership is not None:
            self._feed(membership.update_meta(self._now(), msgspec.structs.replace(
                membership.meta, health=state)))

    # -- alerts (obs.alerts): this node's rules, evaluated by this node for itself -------

    def alerts(self) -> list[dict[str, Any]]:
        """Firing, pending and recently resolved alerts (``GET /api/alerts``), with
        ``since`` in unix seconds."""
        now = self._now()
        return self._alerts.alerts(now, wall_offset_s=time.time() - now)

    def alert_rules(self) -> list[dict[str, Any]]:
        """The rules this node evaluates (defaults kept or replaced, then configured)."""
        return [rule.as_dict() for rule in self._alerts.rules]

    def _alert_readings(self) -> dict[str, float]:
        membership = self._require()
        states = collections.Counter(m.status.name.lower() for m in membership.members())
        return node_readings(
            sample=self.system.sample(), states=states, runtime=self.counters.as_dict(),
            kv=self.kv.counters() if self.kv is not None else None,
            request_p99_ms=self.requests.p99_ms(),
            request_ops_per_s=self.requests.ops_per_s(),
            request_errors_total=sum(e.count for e in self.requests.snapshot().errors),
            storage_failed=self.fatal_error is not None)

    async def _evaluate_alerts(self) -> None:
        """Every ``alerts.interval_s``: read this node's inputs and evaluate its rules,
        logging each alert that fires (warning or error by severity) or resolves."""
        while not self._stopping:
            await asyncio.sleep(self.config.alerts.interval_s)
            if self._membership is None or self._stopping:
                continue
            try:
                transitions = self._alerts.evaluate(self._now(), self._alert_readings())
            except Exception as exc:  # a bug here must not stop the node it watches
                self.log.error("alert_evaluation_failed", error=repr(exc))
                continue
            for transition in transitions:
                self._log_alert(transition)

    def _log_alert(self, transition: Transition) -> None:
        rule = transition.rule
        fields: dict[str, Any] = {
            "alert": rule.name, "severity": rule.severity, "metric": rule.metric,
            "value": transition.value, "op": rule.op, "threshold": rule.threshold,
            "for_s": rule.for_s}
        if transition.state == "firing":
            log = self.log.error if rule.severity == "critical" else self.log.warning
            log("alert_firing", description=rule.description, **fields)
        elif transition.state == "resolved":
            self.log.info("alert_resolved", **fields)
        else:
            self.log.debug(f"alert_{transition.state}", **fields)

    def _require(self) -> Membership:
        if self._membership is None:
            raise RuntimeError("the node is not started; await Node.start() first")
        return self._membership

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    # -- inputs --------------------------------------------------------------------------

    def _on_packet(self, packet: Packet) -> None:
        membership = self._membership
        if membership is None or self.stopped.is_set():
            return
        self._feed(membership.on_packet(self._now(), packet, wall_ms()))

    def handle_frame(self, message: Any, conn: ServerConnection) -> None:
        """A decoded frame from a TCP connection (``runtime.tcp.FrameHandler``)."""
        membership = self._membership
        if membership is None or self.stopped.is_set():
            conn.close()
            return
        identity = conn.peer_identity
        if identity is not None:  # TLS: only nodes send peer frames, under their own name
            refusal = peer_frame_refusal(
                identity, admin_request=isinstance(message, Request),
                announced_name=message.name if isinstance(message, PeerHello) else None)
            if refusal is not None:
                self._drops.malformed("tls_peer", conn.peer, refusal)
                conn.close()
                return
        if isinstance(message, PushPull | SealedPushPull):
            try:  # with a keyring, only a holder of a current key may sync (and so join)
                sync = open_sync_frame(self.keyring, message)
            except OpenError as exc:
                self._drops.malformed(f"sync_{exc.reason}", conn.peer, exc)
                conn.close()
                return
            if sync.reply:
                self._drops.malformed("tcp_unexpected", conn.peer, "push-pull reply as request")
                conn.close()
                return
            reply, effects = membership.on_push_pull(self._now(), sync)
            # Effects first: a refutation's SaveIncarnation must be durable before the
            # reply (which carries the new incarnation) leaves.
            self._feed(effects)
            conn.send(sync_frame(self.keyring, reply))
        elif isinstance(message, Request):
            self._api.handle(message, conn)
        elif isinstance(message, DoctorReportRequest):
            if self.doctor_service is not None:
                conn.send(self.doctor_service.report())
        elif isinstance(message, RingReportRequest):
            if self.ring is not None:
                conn.send(self.ring_report())
        elif isinstance(message, KeyringChange):
            conn.send(KeyringChangeReply(KeyringNodeResult(
                self.name, False, "gossip encryption is off on this node")) if
                self.keyring is None else self.keyring.handle_change(message))
        elif self.kv is not None:
            self.kv.handle_request(message, conn)

    # -- effects and time ----------------------------------------------------------------

    def _feed(self, effects: list[Effect]) -> list[asyncio.Task[bool]]:
        """Execute ``effects`` in order, then re-arm the timer. Returns push-pull tasks."""
        tasks = self._execute(effects)
        if self._membership is not None and not self.stopped.is_set():
            self._arm_timer()
        return tasks

    def _execute(self, effects: list[Effect]) -> list[asyncio.Task[bool]]:
        tasks: list[asyncio.Task[bool]] = []
        transport = self._transport
        assert transport is not None
        for effect in effects:
            if isinstance(effect, SendPacket):
                transport.send_packet(effect.to, effect.packet)
            elif isinstance(effect, SaveIncarnation):
                try:
                    self._data_dir.save_incarnation(effect.incarnation)
                except DataDirError as exc:
                    # Nothing after this may leave: it would claim an incarnation that
                    # a crash could forget.
                    self._fail(str(exc))
                    return tasks
            elif isinstance(effect, StartPushPull):
                task = self._start_push_pull(effect)
                if task is not None:
                    tasks.append(task)
            elif isinstance(effect, MemberEvent):
                self._on_member_event(effect)
            elif isinstance(effect, DeliverUserEvent):
                self._on_user_event(effect.event)
        return tasks

    def _arm_timer(self) -> None:
        membership = self._membership
        assert membership is not None
        loop = asyncio.get_running_loop()
        when = max(membership.next_deadline(), loop.time() + TICK_FLOOR_S)
        if self._timer is not None:
            if self._timer_when <= when:
                return  # it fires first; _on_timer re-arms
            self._timer.cancel()
        self._timer_when = when
        self._timer = loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        membership = self._membership
        if membership is None or self.stopped.is_set():
            return
        self._feed(membership.on_tick(self._now()))
        if membership.pending_broadcasts() == 0 or membership.live_count() <= 1:
            self._drained.set()

    def _on_member_event(self, event: MemberEvent) -> None:
        # Contract with the benchmark harness: msg "member" with kind, member, incarnation.
        self._member_log.info("member", kind=event.kind.value, member=event.name,
                              incarnation=event.incarnation, address=str(event.address))
        if self.kv is not None and self._membership is not None:
            self.kv.on_member_event(event, self._membership.member(event.name))
        _notify(self._member_subscribers, event, self.log)

    def _on_user_event(self, event: UserEvent) -> None:
        # Contract with the benchmark harness: msg "user_event" with name, origin, ltime,
        # payload (text if it is UTF-8, else base64).
        payload, encoding = payload_text(event.payload)
        self._event_log.info("user_event", name=event.name, origin=event.origin,
                             ltime=event.ltime, payload=payload, payload_encoding=encoding)
        _notify(self._event_subscribers, event, self.log)

    # -- push-pull and join --------------------------------------------------------------

    def _start_push_pull(self, effect: StartPushPull) -> asyncio.Task[bool] | None:
        to = effect.to
        if to in self._push_pulls or len(self._push_pulls) >= PUSH_PULLS_IN_FLIGHT_MAX:
            self._drops.overload("push_pull_in_flight", to)
            loop = asyncio.get_running_loop()
            loop.call_soon(self._push_pull_failed, to)  # not re-entrantly from _execute
            return None
        task = asyncio.get_running_loop().create_task(self._push_pull(effect))
        self._push_pulls[to] = task
        task.add_done_callback(lambda _: self._push_pulls.pop(to, None))
        return task

    async def _push_pull(self, effect: StartPushPull) -> bool:
        """One full-state sync; True if the peer answered. Never raises (but cancels)."""
        join = effect.request.join
        timeout_s = self.config.membership.join_timeout_s if join else self.config.io_timeout_s
        transport = self._transport
        assert transport is not None
        try:
            frame = await transport.request(effect.to, sync_frame(self.keyring, effect.request),
                                            SyncFrame, timeout_s)
            reply = open_sync_frame(self.keyring, frame)
            if not reply.reply:
                raise MalformedInput("the peer did not answer with a push-pull reply")
        except (OSError, TimeoutError, ConnectionError, MalformedInput, OpenError) as exc:
            error = str(exc) or type(exc).__name__
            if isinstance(exc, OpenError):
                error = f"cannot open the peer's answer: {error}"
            if join:
                # A seed refuses a sync it cannot open by closing the connection unanswered.
                hint = ("a seed closes a sync it cannot open: check that this node's "
                        "--gossip-keyring holds a current cluster key, or that neither side "
                        "has one") if isinstance(exc, ConnectionClosedError) else None
                self._join_log.warning(f"join:{effect.to}:{type(exc).__name__}",
                                       "join_push_pull_failed", self._now(),
                                       seed=str(effect.to), error=error, hint=hint)
            else:
                self.log.debug("push_pull_failed", peer=str(effect.to), error=error)
            self._push_pull_failed(effect.to)
            return False
        membership = self._membership
        if membership is None or self.stopped.is_set():
            return False
        self._feed(membership.on_push_pull_reply(self._now(), reply, join=join))
        return True

    def _push_pull_failed(self, to: Address) -> None:
        if self._membership is not None and not self.stopped.is_set():
            self._feed(self._membership.on_push_pull_failed(self._now(), to))

    async def _join_loop(self, seeds: tuple[Address, ...]) -> None:
        """Push-pull with every seed until one answers, backing off between rounds."""
        delay = JOIN_RETRY_INITIAL_S
        attempt = 0
        while True:
            attempt += 1
            addresses = await self._resolve(seeds)
            if await self._join_once(addresses):
                return
            retry_in_s = delay * self._rng.uniform(0.8, 1.2)
            self.log.warning("join_failed", attempt=attempt, seeds=[str(s) for s in seeds],
                             retry_in_s=round(retry_in_s, 2))
            await asyncio.sleep(retry_in_s)
            delay = min(delay * 2, JOIN_RETRY_MAX_S)

    async def _join_once(self, seeds: list[Address]) -> bool:
        membership = self._require()
        if not seeds:
            return False
        effects = membership.join(self._now(), seeds)
        if not effects:
            # Every seed is this node itself: a cluster of one until others join us.
            self.log.info("joined", seeds=[str(s) for s in seeds], members=1)
            self.joined.set()
            return True
        results = await asyncio.gather(*self._feed(effects))
        if not any(results):
            return False
        self.log.info("joined", seeds=[str(s) for s in seeds],
                      members=membership.live_count())
        self.joined.set()
        return True

    async def _resolve(self, seeds: tuple[Address, ...]) -> list[Address]:
        """Seeds given by host name are resolved on every attempt (DNS may change)."""
        loop = asyncio.get_running_loop()
        resolved: list[Address] = []
        for seed in seeds:
            if is_ip_literal(seed.host):
                resolved.append(seed)
                continue
            try:
                infos = await loop.getaddrinfo(seed.host, seed.port, type=socket.SOCK_DGRAM)
            except OSError as exc:
                self.log.warning("seed_unresolved", seed=str(seed), error=str(exc))
                continue
            family = socket.AF_INET6 if ":" in self.config.bind.host else socket.AF_INET
            hosts = [info[4][0] for info in infos if info[0] == family]
            if hosts:
                resolved.append(Address(str(hosts[0]), seed.port))
        return resolved


def payload_text(payload: bytes) -> tuple[str, str]:
    """(text, "utf-8") if the payload is UTF-8 text, else (base64, "base64")."""
    try:
        return payload.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(payload).decode("ascii"), "base64"


def _subscribe(subscribers: list[Callable[[T], None]], callback: Callable[[T], None]
               ) -> Callable[[], None]:
    if len(subscribers) >= SUBSCRIBERS_MAX:
        raise RuntimeError(f"at most {SUBSCRIBERS_MAX} subscribers; unsubscribe unused ones")
    subscribers.append(callback)

    def unsubscribe() -> None:
        if callback in subscribers:
            subscribers.remove(callback)

    return unsubscribe


def _notify(subscribers: list[Callable[[T], None]], item: T, log: NodeLogger) -> None:
    for callback in list(subscribers):
        try:
            callback(item)
        except Exception as exc:  # a subscriber's bug must not stop the protocol
            log.error("subscriber_failed", error=repr(exc))


def _load_tls(config: NodeConfig) -> NodeTls | None:
    """The node's TLS contexts from ``[tls]`` (None when it is not set); a StartupError
    names the file that is wrong, or says the certificate is another node's."""
    security = config.security
    if security.tls_ca is None or security.tls_cert is None or security.tls_key is None:
        return None
    try:
        tls = NodeTls.load(security.tls_ca, security.tls_cert, security.tls_key)
    except TlsError as exc:
        raise StartupError(str(exc)) from None
    if tls.name != config.name:
        raise StartupError(f"tls.cert {security.tls_cert}: is the certificate of node "
                           f"{tls.name!r}, but this node is {config.name!r}; peers check that "
                           f"a node's name is its certificate's (`leaderless certs issue "
                           f"{config.name}`)")
    return tls


def _routing_dict(peer: PeerScore | None) -> dict[str, Any] | None:
    """How this node's coordinator rates a member as a replica (``core.snitch``) for
    ``/api/cluster``; None until it sent that member a request."""
    if peer is None:
        return None
    return {"latency_ms": round(peer.latency_s * 1000, 3), "outstanding": peer.outstanding,
            "score": peer.score, "requests": peer.requests, "timeouts": peer.timeouts}


def _health_dict(health: HealthState | None) -> dict[str, str]:
    """A member's gossiped health for ``/api/cluster`` (None: healthy, or an older node)."""
    state = health or HEALTHY
    return {"status": state.status.label, "reason": state.reason}


def _moved(old: LoadSummary, new: LoadSummary) -> bool:
    def rel(a: float, b: float) -> bool:
        return abs(a - b) * 100 > LOAD_CHANGE_MIN * max(a, b, 1)
    return (abs(old.cpu_pct - new.cpu_pct) >= LOAD_CHANGE_MIN
            or abs(old.mem_pct - new.mem_pct) >= LOAD_CHANGE_MIN
            or abs(old.disk_pct - new.disk_pct) >= LOAD_CHANGE_MIN
            or rel(old.ops_per_s, new.ops_per_s) or rel(old.p99_ms, new.p99_ms))
