"""A deterministic simulation of concurrent topology changes under a QUORUM workload.

Every node runs the production core: ``Coordinator``, ``Replica``, ``HintLog``/``Handoff``,
the ring-change machine (``core.ring_changes.RingChanges``) and the range fetcher
(``core.streaming.Fetcher``, ``serve_page``, ``merge_rows``), over a ``MemoryStore`` on a
simulated clock and network (``sim.fault_net``).

**Membership.** Each node has its own view of the members' ring fields (name ->
``PlacementMember``). When a node publishes new fields (``Publish``: leaving, normal,
``synced``), every other node learns them after its own random gossip delay
(``gossip_s``, well below ``settle_s``); a node that is down learns the freshest fields
when it restarts (its first full-state sync). Each node builds its ``Placement`` from its
own view, keeping the current rings it used in the last ``settle_s`` as the runtime does
(``runtime.kv`` ``_placement_now``), and gives it to its coordinator in its ``Topology``.

**Ring changes.** Each node steps its ``RingChanges`` every ``ring_tick_s`` and carries
out the actions: ``SetPlan`` -> its fetcher's plan; ``Publish`` -> its own fields, then
gossip; ``Depart`` -> it leaves (the others learn that it left after a gossip delay) and
stops. Pages travel over the simulated network; rows are merged through the replica's
write path (newest wins) and the fetch counts as done only once the batches holding them
are durable.

**Events** (seeded): 3 or 4 normal nodes to start; then joins (a fresh node, JOINING, with
a random token seed), leaves (a normal node turns LEAVING), overlapping in time, and
crashes (unsynced writes lost; the node keeps its ring fields) with restarts. At most one
node is down at a time, and a leave waits until at least three normal members would stay
(N = 3).

**Workload and checks.** A QUORUM writer (unique values, ``keys`` keys, random live
coordinators) and a QUORUM reader run throughout. A read that started after a write to the
same key was acknowledged must return that write or a newer one (by HLC): each miss is
reported. A run must also acknowledge most operations, and every join and leave must
complete (joiners normal, leavers departed).

**Broken variants** (``ElasticSimConfig.broken``) switch off one piece of the design so
the checker can be seen to catch it: ``no_extra_replicas`` (writes ignore the pending and
previous replicas), ``no_settle`` (fetch and switch without waiting for gossip to
spread).

``python -m leaderless.sim elastic --seeds N`` runs many seeds.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import random
from collections.abc import Callable
from typing import Any

from leaderless.core.cells import Cell
from leaderless.core.coordinator import (
    Coordinator,
    CoordinatorConfig,
    ReadDone,
    Respond,
    Result,
    SendReplica,
    Topology,
    WriteDone,
)
from leaderless.core.hints import DeleteHint, Handoff, HintConfig, HintLog, SendHint
from leaderless.core.hlc import HybridClock
from leaderless.core.keys import token
from leaderless.core.kv_messages import (
    ReplicaAck,
    ReplicaRead,
    ReplicaReadReply,
    ReplicaScan,
    ReplicaScanReply,
    ReplicaWrite,
)
from leaderless.core.placement import (
    RING_VIEW_KEY,
    Placement,
    PlacementMember,
    PlacementView,
    RingState,
)
from leaderless.core.replica import Replica
from leaderless.core.ring import Ring, RingNode
from leaderless.core.ring_changes import Depart, Me, Publish, RingChanges, SetPlan
from leaderless.core.streaming import (
    ApplyStreamRows,
    Fetcher,
    SendStream,
    StreamConfig,
    merge_rows,
    serve_page,
)
from leaderless.core.streaming_messages import StreamPage, StreamRequest
from leaderless.sim.clock import SimClock
from leaderless.sim.fault_net import FaultyNet
from leaderless.storage.memory import MemoryStore
from leaderless.storage.store import StorageError

KEYSPACE = "sim"
BROKEN_VARIANTS = ("no_extra_replicas", "no_settle")


@dataclasses.dataclass
class ElasticSimConfig:
    replication: int = 3
    initial_nodes: tuple[int, int] = (3, 4)
    """How many normal nodes the cluster starts with (inclusive range)."""
    tokens_per_node: int = 12
    keys: int = 200
    latency_s: tuple[float, float] = (0.0005, 0.005)
    loss: float = 0.0
    """Probability that a message between nodes is lost (gossip is not: see ``gossip_s``)."""
    fsync_s: float = 0.0005
    detection_s: float = 0.5
    tick_s: float = 0.05
    ring_tick_s: float = 0.2
    settle_s: float = 3.0
    gossip_s: tuple[float, float] = (0.05, 1.5)
    """Delay before another node learns a published change (each node its own)."""
    write_timeout_s: float = 1.0
    read_timeout_s: float = 1.0
    ops_per_s: float = 100.0
    """Client operations per simulated second, half writes and half reads."""
    workload_s: float = 30.0
    """The workload runs this long; the events happen in its first ``events_until_s``."""
    events_until_s: float = 16.0
    finish_max_s: float = 60.0
    """After the workload, wait at most this long for the changes to complete."""
    joins: tuple[int, int] = (1, 3)
    leaves: tuple[int, int] = (1, 2)
    crashes: tuple[int, int] = (0, 2)
    down_s: tuple[float, float] = (0.5, 5.0)
    members_min: int = 3
    """Normal members (not joining, not leaving) that must stay: a leave waits until it
    would keep this many (joiners count once they are normal)."""
    stream: StreamConfig = dataclasses.field(default_factory=lambda: StreamConfig(
        page_bytes=4096, request_timeout_s=2.0, retry_backoff_s=1.0))
    broken: str = ""
    """"" (the design), or one of ``BROKEN_VARIANTS``."""

    def __post_init__(self) -> None:
        if self.broken and self.broken not in BROKEN_VARIANTS:
            raise ValueError(f"broken must be one of {BROKEN_VARIANTS}, not {self.broken!r}")
        if self.gossip_s[1] >= self.settle_s:
            raise ValueError("gossip must spread well within settle_s")


@dataclasses.dataclass(frozen=True, slots=True)
class WriteRecord:
    key: bytes
    cell: Cell
    start: float
    end: float
    ok: bool


@dataclasses.dataclass(frozen=True, slots=True)
class ReadRecord:
    key: bytes
    start: float
    end: float
    cell: Cell | None
    ok: bool
    via: str


@dataclasses.dataclass
class ElasticReport:
    seed: int
    broken: str
    writes_ok: int = 0
    writes_failed: int = 0
    reads_ok: int = 0
    reads_failed: int = 0
    joins: int = 0
    joins_done: int = 0
    leaves: int = 0
    leaves_done: int = 0
    crashes: int = 0
    pages: int = 0
    rows_streamed: int = 0
    finished_at: float = 0.0
    """When the run stopped (the changes done, or ``finish_max_s`` after the workload)."""
    last_change_s: float = 0.0
    """When the last join or leave completed."""
    overlap_max: int = 0
    """The most joins and leaves in progress at once."""
    misses: list[str] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)
    """Liveness: changes that did not complete, too few operations acknowledged."""

    @property
    def ok(self) -> bool:
        return not self.misses and not self.problems

    def summary(self) -> str:
        return (f"seed {self.seed}{' broken=' + self.broken if self.broken else ''}: "
                f"writes {self.writes_ok} ok / {self.writes_failed} failed, reads "
                f"{self.reads_ok} ok / {self.reads_failed} failed, joins "
                f"{self.joins_done}/{self.joins}, leaves {self.leaves_done}/{self.leaves}, "
                f"crashes {self.crashes}, up to {self.overlap_max} changes at once, "
                f"{self.pages} pages ({self.rows_streamed} rows), "
                f"last change done at {self.last_change_s:.1f} s, misses {len(self.misses)}")


class ElasticNode:
    """One node: its data plane, its ring-change machine, its fetcher and its own view."""

    def __init__(self, sim: ElasticSim, me: PlacementMember) -> None:
        self.sim = sim
        self.name = me.name
        self.me = me
        """Our ring fields (kept across crashes, as the runtime persists them)."""
        self.store = MemoryStore()
        self.up = True
        self.departed = False
        self.clock = HybridClock()
        self.epoch = 0
        """Bumped by each crash: callbacks scheduled before it are void."""
        self.view: dict[str, PlacementMember] = {}
        self.versions: dict[str, int] = {}
        """Per member, the version of the fields we hold (removals count too)."""
        self.learn_all()
        self._boot()

    def _boot(self) -> None:
        config = self.sim.config
        self.hints = HintLog(self.store)
        self.replica = Replica(self.store, self.hints)
        self.coordinator = Coordinator(self.name, CoordinatorConfig(
            write_timeout_s=config.write_timeout_s, read_timeout_s=config.read_timeout_s),
            self.sim.ids)
        self.handoff = Handoff(self.hints, HintConfig())
        self.fetcher = Fetcher(self.name, config.stream, self.store,
                               random.Random(self.sim.rng.getrandbits(64)))
        settle = 0.0 if config.broken == "no_settle" else config.settle_s
        self.changes = RingChanges(settle)
        self.plan_given = False
        self.stream_batches = 0
        """Streamed batches written but not yet durable: the fetch is not done before."""
        self.placement_view = PlacementView(config.settle_s)
        self.placement_view.restore(self.store.get(RING_VIEW_KEY), self.sim.clock.now)

    # -- membership view -----------------------------------------------------------------

    def learn_all(self) -> None:
        """A full-state sync: the freshest fields of every member (on start and restart)."""
        self.view = dict(self.sim.truth)
        self.versions = dict(self.sim.truth_versions)
        self.view[self.name] = self.me

    def learn(self, name: str, version: int, member: PlacementMember | None) -> None:
        """Gossip about ``name`` (None: it left)."""
        if not self.up or self.departed or name == self.name:
            return
        if version <= self.versions.get(name, 0):
            return
        self.versions[name] = version
        if member is None:
            self.view.pop(name, None)
        else:
            self.view[name] = member

    def placement(self) -> Placement:
        """The production ``core.placement.PlacementView`` over this node's view."""
        members = tuple(sorted((m for m in self.view.values() if m.token_count > 0),
                               key=lambda m: m.name))
        return self.placement_view.at(self.sim.clock.now, members)

    def _save_view(self, now: float) -> None:
        """As ``runtime.kv`` ``refresh_placement``: the view goes to the store (durable a
        group commit later)."""
        data = self.placement_view.to_save(now)
        if data is None:
            return
        self.store.write([(RING_VIEW_KEY, data)])
        self.sim.clock.after(self.sim.config.fsync_s, self._sync, self.epoch)

    def _sync(self, epoch: int, _: Any) -> None:
        if self.up and epoch == self.epoch:
            self.store.sync()

    def topology(self) -> Topology:
        placement = self.placement()
        up = self.sim.net.up_as_seen_by(self.name)
        changing = placement.changing and self.sim.config.broken != "no_extra_replicas"
        return Topology(placement.current, up, up, {},
                        placement=placement if changing else None)

    # -- faults --------------------------------------------------------------------------

    def crash(self) -> None:
        self.up = False
        self.epoch += 1
        self.store.crash()

    def restart(self) -> None:
        self.up = True
        self.learn_all()
        self._boot()

    # -- effects -------------------------------------------------------------------------

    def execute(self, effects: list[Any]) -> None:
        sim = self.sim
        for i, effect in enumerate(effects):
            if isinstance(effect, SendReplica | SendHint):
                sim.send(self.name, effect.to, effect.message)
            elif isinstance(effect, SendStream):
                sim.send(self.name, effect.to, effect.message)
            elif isinstance(effect, Respond):
                sim.respond(effect.op_id, effect.result)
            elif isinstance(effect, DeleteHint):
                self.store.write([effect.write])
            elif isinstance(effect, ApplyStreamRows):
                try:
                    writes = merge_rows(self.store, effect.rows, self.replica.apply)
                    self.store.write(writes + effect.progress)
                except StorageError:
                    return
                self.stream_batches += 1
                sim.report.rows_streamed += len(effect.rows)
                # The rest waits until the batch is durable (group commit).
                sim.clock.after(sim.config.fsync_s, self._stream_synced,
                                (self.epoch, list(effect.then)), effects[i + 1:])
                return

    def _stream_synced(self, entry: tuple[int, list[Any]], rest: list[Any]) -> None:
        epoch, then = entry
        if not self.up or epoch != self.epoch:
            return  # crashed first: the batch is lost, and the fetcher with it
        self.store.sync()
        self.stream_batches -= 1
        self.execute(then + rest)

    def receive(self, sender: str, message: Any) -> None:
        sim = self.sim
        now = sim.clock.now
        if isinstance(message, ReplicaWrite | ReplicaRead | ReplicaScan):
            reply, writes = self.replica.handle(message, sim.net.wall_ms())
            if writes:
                self.store.write(writes)
                sim.clock.after(sim.config.fsync_s, self._ack, (self.epoch, sender), reply)
            else:
                sim.send(self.name, sender, reply)
        elif isinstance(message, ReplicaAck | ReplicaReadReply | ReplicaScanReply):
            if self.coordinator.owns(message.id):
                self.execute(self.coordinator.on_reply(now, sender, message))
            elif isinstance(message, ReplicaAck) and self.handoff.owns(message.id):
                self.execute(list(self.handoff.on_ack(message)))
        elif isinstance(message, StreamRequest):
            sim.send(self.name, sender, serve_page(self.store, message,
                                                       sim.config.stream))
        elif isinstance(message, StreamPage):
            sim.report.pages += 1
            self.execute(list(self.fetcher.on_message(now, sender, message)))

    def _ack(self, entry: tuple[int, str], reply: Any) -> None:
        epoch, sender = entry
        if not self.up or epoch != self.epoch:
            return  # crashed before the fsync: never acknowledged
        self.store.sync()
        self.sim.send(self.name, sender, reply)

    # -- time ----------------------------------------------------------------------------

    def tick(self) -> None:
        sim = self.sim
        now = sim.clock.now
        self.execute(self.coordinator.on_tick(now))
        up = sim.net.up_as_seen_by(self.name)
        self.execute(list(self.handoff.on_tick(now, sim.net.wall_ms(), up, sim.ids)))
        if self.plan_given:
            self.execute(list(self.fetcher.on_tick(now)))

    def ring_tick(self) -> None:
        sim = self.sim
        now = sim.clock.now
        placement = self.placement()
        self._save_view(now)
        me = Me(self.name, self.me.state, self.me.token_count, self.me.next_token_count,
                self.me.synced)
        fetched = self.plan_given and self.fetcher.done() and self.stream_batches == 0
        actions = self.changes.step(now, placement, me,
                                    {KEYSPACE: sim.config.replication}, fetched)
        for action in actions:
            if isinstance(action, SetPlan):
                specs = [f.range_fetch() for f in action.fetches]
                self.plan_given = True
                self.execute(list(self.fetcher.set_plan(now, specs)))
            elif isinstance(action, Publish):
                sim.publish(self, dict(action.fields))
            elif isinstance(action, Depart):
                sim.depart(self)
                return


class ElasticSim:
    def __init__(self, config: ElasticSimConfig, seed: int) -> None:
        self.config = config
        self.seed = seed
        self.rng = random.Random(seed)
        self.clock = SimClock()
        self.ids = itertools.count(1)
        self._op_ids = itertools.count(1)
        self._callbacks: dict[int, Callable[[Result], None]] = {}
        self._version = itertools.count(1)
        self.truth: dict[str, PlacementMember] = {}
        """The freshest fields of every member (what a full-state sync gives)."""
        self.truth_versions: dict[str, int] = {}
        self.net = FaultyNet(self.rng, self.clock, config.latency_s, config.loss,
                             config.detection_s)
        self.nodes: dict[str, ElasticNode] = {}
        self.net.nodes = self.nodes
        self.report = ElasticReport(seed, config.broken)
        self.writes: list[WriteRecord] = []
        self.reads: list[ReadRecord] = []
        self.joined: list[str] = []
        self.left: list[str] = []
        self._names = itertools.count(1)
        self.drop: Callable[[str, str, Any], bool] | None = None
        """A targeted fault: messages (sender, to, message) it holds true for are lost."""
        # The first members know each other from the start (a cluster already formed).
        first = [self._member(RingState.NORMAL) for _ in range(self.rng.randint(
            *config.initial_nodes))]
        for me in first:
            self.truth[me.name] = me
            self.truth_versions[me.name] = next(self._version)
        for me in first:
            self._start(ElasticNode(self, me))

    # -- membership ----------------------------------------------------------------------

    def _member(self, state: RingState) -> PlacementMember:
        return PlacementMember(f"n{next(self._names):02d}", self.rng.getrandbits(64),
                               self.config.tokens_per_node, state=state)

    def _start(self, node: ElasticNode) -> None:
        self.nodes[node.name] = node
        offset = self.rng.uniform(0, self.config.tick_s)
        self.clock.after(offset, self._tick, node.name)
        self.clock.after(offset, self._ring_tick, node.name)

    def add_node(self, state: RingState) -> ElasticNode:
        """A new member: it syncs the view from the others; they learn of it by gossip."""
        me = self._member(state)
        version = next(self._version)
        self.truth[me.name] = me
        self.truth_versions[me.name] = version
        node = ElasticNode(self, me)
        for other in self.nodes.values():
            self._gossip(other, me.name, version, me)
        self._start(node)
        self._count_overlap()
        return node

    def publish(self, node: ElasticNode, fields: dict[str, int]) -> None:
        me = node.me
        for field, value in fields.items():
            if field == "ring_state":
                me = dataclasses.replace(me, state=RingState(value))
                if value == RingState.NORMAL:
                    node.execute(list(node.fetcher.forget_progress()))
            elif field == "token_count":
                me = dataclasses.replace(me, token_count=value)
            elif field == "next_token_count":
                me = dataclasses.replace(me, next_token_count=value)
            elif field == "synced":
                me = dataclasses.replace(me, synced=value)
            else:
                raise AssertionError(f"unknown ring field {field}")
        if me.state is RingState.NORMAL and node.me.state is RingState.JOINING:
            self.report.joins_done += 1
            self.report.last_change_s = self.clock.now
        node.me = me
        node.view[node.name] = me
        version = next(self._version)
        self.truth[node.name] = me
        self.truth_versions[node.name] = version
        for other in self.nodes.values():
            if other is not node:
                self._gossip(other, node.name, version, me)
        self._count_overlap()

    def _count_overlap(self) -> None:
        changing = sum(m.state is not RingState.NORMAL for m in self.truth.values())
        self.report.overlap_max = max(self.report.overlap_max, changing)

    def depart(self, node: ElasticNode) -> None:
        """The leave is complete: the node stops; the others learn it after gossip."""
        node.departed = True
        self.report.leaves_done += 1
        self.report.last_change_s = self.clock.now
        version = next(self._version)
        del self.truth[node.name]
        self.truth_versions[node.name] = version
        for other in self.nodes.values():
            if other is not node:
                self._gossip(other, node.name, version, None)
        self.net.crash(node.name)  # stops; the others' failure detectors see it go

    def send(self, sender: str, to: str, message: Any) -> None:
        if self.drop is not None and self.drop(sender, to, message):
            self.net.messages_dropped += 1
            return
        self.net.send(sender, to, message)

    def _gossip(self, to: ElasticNode, name: str, version: int,
                member: PlacementMember | None) -> None:
        delay = self.rng.uniform(*self.config.gossip_s)
        self.clock.after(delay, self._learn, (to.name, name), (version, member))

    def _learn(self, route: tuple[str, str], news: tuple[int, PlacementMember | None]
               ) -> None:
        to, name = route
        self.nodes[to].learn(name, *news)

    def live(self) -> list[ElasticNode]:
        return [n for n in self.nodes.values() if n.up and not n.departed]

    # -- time ----------------------------------------------------------------------------

    def _tick(self, name: str, _: Any) -> None:
        node = self.nodes[name]
        if node.departed:
            return
        if node.up:
            node.tick()
        self.clock.after(self.config.tick_s, self._tick, name)

    def _ring_tick(self, name: str, _: Any) -> None:
        node = self.nodes[name]
        if node.departed:
            return
        if node.up:
            node.ring_tick()
        if not node.departed:
            self.clock.after(self.config.ring_tick_s, self._ring_tick, name)

    # -- events --------------------------------------------------------------------------

    def schedule_events(self) -> None:
        config = self.config
        rng = self.rng
        kinds = (["join"] * rng.randint(*config.joins) + ["leave"] * rng.randint(*config.leaves)
                 + ["crash"] * rng.randint(*config.crashes))
        for kind in kinds:
            self.clock.at(rng.uniform(1.0, config.events_until_s), self._event, kind)

    def _event(self, kind: str, _: Any) -> None:
        config = self.config
        if kind == "join":
            self.report.joins += 1
            node = self.add_node(RingState.JOINING)
            self.joined.append(node.name)
        elif kind == "leave":
            normal = [m.name for m in self.truth.values() if m.state is RingState.NORMAL]
            candidates = [name for name in normal if self.nodes[name].up]
            if len(normal) - 1 < config.members_min or not candidates:
                self.clock.after(1.0, self._event, kind)  # later: a join may come first
                return
            self.report.leaves += 1
            node = self.nodes[self.rng.choice(candidates)]
            self.left.append(node.name)
            self.publish(node, {"ring_state": RingState.LEAVING})
        elif kind == "crash":
            if any(not n.up for n in self.nodes.values() if not n.departed):
                self.clock.after(1.0, self._event, kind)  # one node down at a time
                return
            node = self.rng.choice(self.live())
            self.report.crashes += 1
            self.net.crash(node.name)
            self.clock.after(self.rng.uniform(*config.down_s), self._restart, node.name)

    def _restart(self, name: str, _: Any) -> None:
        if not self.nodes[name].departed:
            self.net.restart(name)

    def changes_done(self) -> bool:
        return (all(m.state is RingState.NORMAL for m in self.truth.values())
                and all(n.up for n in self.nodes.values() if not n.departed)
                and self.report.joins_done == self.report.joins
                and self.report.leaves_done == self.report.leaves)

    # -- client operations ---------------------------------------------------------------

    def respond(self, op_id: int, result: Result) -> None:
        callback = self._callbacks.pop(op_id, None)
        if callback is not None:
            callback(result)

    def _client_op(self, step: int, _: Any) -> None:
        config = self.config
        if self.clock.now >= config.workload_s:
            return
        self.clock.after(self.rng.expovariate(config.ops_per_s), self._client_op, step + 1)
        live = self.live()
        if not live:
            return
        node = self.rng.choice(live)
        key = b"k%d" % self.rng.randrange(config.keys)
        if self.rng.random() < 0.5:
            self.write(node.name, key, b"%d" % step)
        else:
            self.read(node.name, key)

    def write(self, via: str, key: bytes, value: bytes) -> Cell:
        """A QUORUM write of a new cell through ``via``, recorded in ``writes``."""
        node = self.nodes[via]
        now = self.clock.now
        cell = Cell(node.clock.now(self.net.wall_ms()), via, value)

        def written(result: Result) -> None:
            ok = isinstance(result, WriteDone)
            self.writes.append(WriteRecord(key, cell, now, self.clock.now, ok))

        op_id = next(self._op_ids)
        self._callbacks[op_id] = written
        node.execute(node.coordinator.write(now, op_id, node.topology(), KEYSPACE,
                                            self.config.replication, key, b"", cell,
                                            "QUORUM"))
        return cell

    def read(self, via: str, key: bytes) -> None:
        """A QUORUM read through ``via``, recorded in ``reads``."""
        node = self.nodes[via]
        now = self.clock.now

        def done(result: Result) -> None:
            ok = isinstance(result, ReadDone)
            cell = result.cell if isinstance(result, ReadDone) else None
            self.reads.append(ReadRecord(key, now, self.clock.now, cell, ok, via))

        op_id = next(self._op_ids)
        self._callbacks[op_id] = done
        node.execute(node.coordinator.read(now, op_id, node.topology(), KEYSPACE,
                                           self.config.replication, key, b"", "QUORUM"))

    # -- the run -------------------------------------------------------------------------

    def run(self) -> ElasticReport:
        config = self.config
        self.schedule_events()
        self.clock.after(0.5, self._client_op, 0)
        self.clock.run_until(config.workload_s + config.write_timeout_s + 1.0)
        report = self.report
        done = self.clock.run_until(self.clock.now + config.finish_max_s, self.changes_done,
                                    check_every_s=0.5)
        report.finished_at = self.clock.now
        if not done:
            states = {m.name: m.state.name for m in self.truth.values()}
            report.problems.append(
                f"changes incomplete after {report.finished_at:.0f} s: joins "
                f"{report.joins_done}/{report.joins}, leaves {report.leaves_done}/"
                f"{report.leaves}; members {states}; waiting: "
                + ", ".join(f"{n.name} for {n.changes.waiting_for}"
                            for n in self.live() if n.changes.waiting_for))
        report.writes_ok = sum(w.ok for w in self.writes)
        report.writes_failed = len(self.writes) - report.writes_ok
        report.reads_ok = sum(r.ok for r in self.reads)
        report.reads_failed = len(self.reads) - report.reads_ok
        report.misses = check_history(self.writes, self.reads)
        total = len(self.writes) + len(self.reads)
        if total == 0 or (report.writes_ok + report.reads_ok) < 0.8 * total:
            report.problems.append(f"too few operations acknowledged: "
                                   f"{report.writes_ok + report.reads_ok} of {total}")
        return report


def check_history(writes: list[WriteRecord], reads: list[ReadRecord]) -> list[str]:
    """Each read that started after a write to its key was acknowledged must return that
    write or a newer one: the misses, described."""
    acked: dict[bytes, list[WriteRecord]] = {}
    for write in writes:
        if write.ok:
            acked.setdefault(write.key, []).append(write)
    floors: dict[bytes, tuple[list[float], list[WriteRecord]]] = {}
    for key, records in acked.items():
        records.sort(key=lambda w: w.end)
        times: list[float] = []
        best: list[WriteRecord] = []
        for write in records:
            if not best or write.cell.newer_than(best[-1].cell):
                times.append(write.end)
                best.append(write)
            else:
                times.append(write.end)
                best.append(best[-1])
        floors[key] = (times, best)
    misses: list[str] = []
    for read in reads:
        if not read.ok or read.key not in floors:
            continue
        times, best = floors[read.key]
        i = bisect.bisect_left(times, read.start) - 1
        if i < 0:
            continue
        floor = best[i]
        if floor.cell.newer_than(read.cell):
            got = "nothing" if read.cell is None else f"{read.cell.value!r}"
            misses.append(f"read of {read.key!r} via {read.via} at {read.start:.3f} s got "
                          f"{got}; write {floor.cell.value!r} (hlc {floor.cell.hlc}) was "
                          f"acknowledged at {floor.end:.3f} s")
    return misses


def run_elastic(seed: int, config: ElasticSimConfig | None = None) -> ElasticReport:
    return ElasticSim(config or ElasticSimConfig(), seed).run()


def run_write_after_ring_change(seed: int, restarted: bool, broken: str = "") -> list[str]:
    """A directed case of the previous-ring rule: a joiner has just turned normal and one
    reader has not heard yet (gossip takes 1.2-1.4 s here). A writer that has heard writes
    a key whose replicas changed; its write to one replica that both rings share (the
    reader itself) is lost, and the reader's request to the other shared replica is lost
    too, so the reader reads from itself and the replica the joiner replaced. The write
    must have reached that replica: the writer keeps the old ring's replicas for
    ``settle_s``. With ``restarted`` the writer was down during the join and restarted
    just now: it knows the old ring only from the view it saved before the crash (as
    ``runtime.kv`` does). Returns the misses."""
    for skip in range(20):
        misses = _write_after_ring_change(seed, restarted, broken, skip)
        if misses is not None:
            return misses
    raise AssertionError(f"seed {seed}: no reader stayed unaware long enough")


def _write_after_ring_change(seed: int, restarted: bool, broken: str, skip: int
                             ) -> list[str] | None:
    """One try, with the ``skip``-th (key, reader) that fits; None if that reader heard
    of the change before the write was acknowledged (then the case does not arise)."""
    sim = ElasticSim(ElasticSimConfig(initial_nodes=(4, 4), gossip_s=(1.2, 1.4),
                                      broken=broken), seed)
    first = sorted(sim.nodes)
    sim.clock.run_until(sim.config.settle_s + 0.5)  # every node has saved its view
    if restarted:
        sim.net.crash(first[-1])
    sim.clock.run_until(sim.clock.now + 0.5)
    joiner = sim.add_node(RingState.JOINING).name

    def sees(name: str) -> bool:
        return joiner in sim.nodes[name].placement().current.nodes

    normal = sim.clock.run_until(
        30.0, lambda: sim.truth[joiner].state is RingState.NORMAL, check_every_s=0.001)
    assert normal, f"seed {seed}: the joiner did not become normal"
    if restarted:
        writer = first[-1]
        sim.net.restart(writer)
    else:
        def one_knows() -> bool:
            return any(sees(n) for n in first) and not all(sees(n) for n in first)
        assert sim.clock.run_until(sim.clock.now + 2.0, one_knows, check_every_s=0.001)
        writer = next(n for n in first if sees(n))
    new = sim.nodes[writer].placement().current
    for i in range(10_000):
        key = b"x%d" % i
        tok = token(key)
        now_ = new.preference_list(tok, 3)
        for reader in (n for n in first if n != writer and not sees(n)):
            old = sim.nodes[reader].placement().current.preference_list(tok, 3)
            shared = [n for n in old if n in now_]
            if (joiner in now_ and writer not in now_ + old and reader in shared
                    and len(shared) == 2):
                if skip > 0:
                    skip -= 1
                    continue
                other = next(n for n in shared if n != reader)

                def drop(sender: str, to: str, message: Any, key: bytes = key,
                         reader: str = reader, other: str = other) -> bool:
                    if isinstance(message, ReplicaWrite) and message.partition == key:
                        return sender == writer and to == reader
                    if isinstance(message, ReplicaRead) and message.partition == key:
                        return sender == reader and to == other
                    return False

                sim.drop = drop
                sim.write(writer, key, b"v")
                sim.clock.run_until(sim.clock.now + 1.0, lambda: bool(sim.writes),
                                    check_every_s=0.0005)
                if sees(reader):
                    return None
                sim.read(reader, key)
                sim.clock.run_until(sim.clock.now + 1.5)
                assert len(sim.writes) == 1 and sim.writes[0].ok, sim.writes
                assert len(sim.reads) == 1 and sim.reads[0].ok, sim.reads
                return check_history(sim.writes, sim.reads)
    raise AssertionError(f"seed {seed}: no key fits")


def run_write_during_join(seed: int, broken: str = "") -> list[str]:
    """A directed case of the settle wait: a node joins, and a writer that has not heard
    of it yet (gossip takes 1.2-1.4 s here) writes a key the joiner will hold. Every copy
    of the write to one replica the old and new rings share (the reader) is lost, so only
    the replica the joiner displaces and the other shared one hold it. Once the reader
    sees the joiner normal it reads from itself and the joiner. The joiner must have the
    write: it fetched from a read quorum of the old replicas only after ``settle_s``, by
    when the write was there (or every writer knew of it). Returns the misses."""
    sim = ElasticSim(ElasticSimConfig(initial_nodes=(4, 4), gossip_s=(1.2, 1.4),
                                      broken=broken), seed)
    first = sorted(sim.nodes)
    sim.clock.run_until(0.5)
    old = sim.nodes[first[0]].placement().current
    joiner = sim.add_node(RingState.JOINING)
    member = joiner.me
    new = Ring([*old.nodes.values(), RingNode(member.name, member.token_seed,
                                              member.token_count)])
    for i in range(10_000):
        key = b"x%d" % i
        tok = token(key)
        before, after = old.preference_list(tok, 3), new.preference_list(tok, 3)
        shared = [n for n in before if n in after]
        if member.name not in after or len(shared) != 2:
            continue
        reader, other = shared
        writer = next(n for n in first if n not in before)  # (nor in after)

        def drop(sender: str, to: str, message: Any, key: bytes = key,
                 reader: str = reader, other: str = other) -> bool:
            if isinstance(message, ReplicaWrite) and message.partition == key:
                return to == reader
            if isinstance(message, ReplicaRead) and message.partition == key:
                return sender == reader and to == other
            return False

        sim.drop = drop
        sim.clock.run_until(sim.clock.now + 0.3)
        assert member.name not in sim.nodes[writer].view, "the writer must not know yet"
        sim.write(writer, key, b"v")

        def sees_normal(reader: str = reader) -> bool:
            view = sim.nodes[reader].view.get(member.name)
            return view is not None and view.state is RingState.NORMAL

        assert sim.clock.run_until(30.0, sees_normal, check_every_s=0.001), \
            f"seed {seed}: the joiner did not become normal"
        sim.read(reader, key)
        sim.clock.run_until(sim.clock.now + 1.5)
        assert len(sim.writes) == 1 and sim.writes[0].ok, sim.writes
        assert len(sim.reads) == 1 and sim.reads[0].ok, sim.reads
        return check_history(sim.writes, sim.reads)
    raise AssertionError(f"seed {seed}: no key fits")
