"""A deterministic simulation of the KV data plane: the production core (``Coordinator``,
``Replica``, ``HintLog``/``Handoff``, ``MerkleForest``/``AntiEntropy``) on a simulated
clock, network and disk.

Each node has a ``MemoryStore`` as its disk: a replica's write is applied at once, synced
``fsync_s`` later, and only then acknowledged, as group commit does; ``crash`` loses what
was not synced and all in-memory state (in-flight requests, Merkle trees, hint cursors),
``restart`` rebuilds them from the store as a real restart does. The network delivers
each message after a random latency, or drops it (loss, partitions, a down receiver).

Failure detection is an oracle with a delay: ``detection_s`` after a node crashes
(restarts) every other node treats it as down (up). Membership has its own simulation
(``sim.cluster``); here the subject is what the data plane does with a view, right or late.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Callable
from typing import Any

from leaderless.core.anti_entropy import AntiEntropy, AntiEntropyConfig, ApplyRows, SendToPeer
from leaderless.core.cells import Cell, decode_cell
from leaderless.core.coordinator import (
    Coordinator,
    CoordinatorConfig,
    Respond,
    Result,
    SendReplica,
    Topology,
)
from leaderless.core.hints import DeleteHint, Handoff, HintConfig, HintLog, SendHint
from leaderless.core.hlc import HybridClock
from leaderless.core.keys import data_key, token
from leaderless.core.kv_messages import (
    ReplicaAck,
    ReplicaRead,
    ReplicaReadReply,
    ReplicaScan,
    ReplicaScanReply,
    ReplicaWrite,
)
from leaderless.core.merkle import MerkleForest
from leaderless.core.replica import Replica
from leaderless.core.ring import Ring, RingNode
from leaderless.sim.clock import SimClock
from leaderless.sim.fault_net import FaultyNet
from leaderless.storage.memory import MemoryStore
from leaderless.storage.store import StorageError

KEYSPACE = "sim"


@dataclasses.dataclass
class KvSimConfig:
    nodes: int = 3
    replication: int = 3
    tokens_per_node: int = 64
    latency_s: tuple[float, float] = (0.0002, 0.002)
    loss: float = 0.0
    fsync_s: float = 0.0003
    detection_s: float = 1.0
    tick_s: float = 0.05
    hint_window_s: float = 3600.0
    anti_entropy_interval_s: float = 5.0
    write_timeout_s: float = 1.0
    read_timeout_s: float = 1.0


class SimKvNode:
    """One node's data plane over its simulated disk."""

    def __init__(self, sim: KvSim, name: str, store: MemoryStore) -> None:
        self.sim = sim
        self.name = name
        self.store = store
        self.up = True
        self.clock = HybridClock()
        self.acked_writes: list[tuple[bytes, Cell]] = []
        """Every replica write this node acknowledged (key, cell): must survive crashes."""
        self._boot()

    def _boot(self) -> None:
        config = self.sim.config
        self.forest = MerkleForest(leaf_bits=10)
        self.forest.rebuild(self.store)
        self.hints = HintLog(self.store)
        self.replica = Replica(self.store, self.hints, self.forest.update)
        self.coordinator = Coordinator(self.name, CoordinatorConfig(
            write_timeout_s=config.write_timeout_s, read_timeout_s=config.read_timeout_s),
            self.sim.ids)
        self.handoff = Handoff(self.hints, HintConfig(hint_window_s=config.hint_window_s))
        self.anti_entropy = AntiEntropy(
            self.name, AntiEntropyConfig(interval_s=config.anti_entropy_interval_s),
            random.Random(self.sim.rng.getrandbits(64)), self.store, self.forest)

    def crash(self) -> None:
        self.up = False
        self.store.crash()

    def restart(self) -> None:
        self.up = True
        self._boot()

    # -- effects -------------------------------------------------------------------------

    def execute(self, effects: list[Any]) -> None:
        sim = self.sim
        for i, effect in enumerate(effects):
            if isinstance(effect, SendReplica | SendHint):
                sim.send(self.name, effect.to, effect.message)
            elif isinstance(effect, SendToPeer):
                sim.send(self.name, effect.to, effect.message)
            elif isinstance(effect, Respond):
                sim.respond(effect.op_id, effect.result)
            elif isinstance(effect, DeleteHint):
                self.store.write([effect.write])
            elif isinstance(effect, ApplyRows):
                writes = []
                try:
                    for keyspace, partition, sort, cell in effect.rows:
                        applied = self.replica.apply(keyspace, partition, sort, cell)
                        self.store.write(applied)
                        writes.extend(applied)
                except StorageError:
                    return  # a failing disk takes no repairs (the runtime stops the node)
                if writes:  # the rest waits until the rows are durable
                    rest = effects[i + 1:]
                    sim.clock.after(sim.config.fsync_s, self._after_sync, rest)
                    return

    def _after_sync(self, rest: list[Any], _: Any) -> None:
        if self.up:
            self.store.sync()
            self.execute(rest)

    def receive(self, sender: str, message: Any) -> None:
        if isinstance(message, ReplicaWrite | ReplicaRead | ReplicaScan):
            reply, writes = self.replica.handle(message, self.sim.wall_ms())
            if writes:
                try:
                    self.store.write(writes)
                except StorageError as exc:  # as the runtime does: refuse, name the cause
                    self.sim.send(self.name, sender, ReplicaAck(message.id, f"storage: {exc}"))
                    return
                self.sim.clock.after(self.sim.config.fsync_s, self._ack, (sender, reply,
                                                                            message))
            else:
                self.sim.send(self.name, sender, reply)
        elif isinstance(message, ReplicaAck | ReplicaReadReply | ReplicaScanReply):
            if self.coordinator.owns(message.id):
                self.execute(self.coordinator.on_reply(self.sim.clock.now, sender, message))
            elif isinstance(message, ReplicaAck) and self.handoff.owns(message.id):
                self.execute(list(self.handoff.on_ack(message)))
        else:
            self.execute(self.anti_entropy.on_message(self.sim.clock.now, sender, message))

    def _ack(self, entry: tuple[str, Any, Any], _: Any) -> None:
        sender, reply, request = entry
        if not self.up:
            return  # crashed before the fsync: never acknowledged
        self.store.sync()
        if isinstance(request, ReplicaWrite) and request.hint_for is None:
            key = data_key(request.keyspace, request.partition, request.sort)
            self.acked_writes.append((key, request.cell))
        self.sim.send(self.name, sender, reply)

    def tick(self) -> None:
        sim = self.sim
        now = sim.clock.now
        topology = sim.topology(self.name)
        self.execute(self.coordinator.on_tick(now))
        self.execute(list(self.handoff.on_tick(now, sim.wall_ms(), topology.alive, sim.ids)))
        self.execute(self.anti_entropy.on_tick(now, topology.ring,
                                               {KEYSPACE: sim.config.replication},
                                               topology.alive))

    def local(self, key: bytes, sort: bytes = b"") -> Cell | None:
        raw = self.store.get(data_key(KEYSPACE, key, sort))
        return decode_cell(raw) if raw is not None else None


class KvSim:
    def __init__(self, config: KvSimConfig, seed: int) -> None:
        self.config = config
        self.seed = seed
        self.rng = random.Random(seed)
        self.clock = SimClock()
        self.ids = itertools.count(1)
        self._op_ids = itertools.count(1)
        self._callbacks: dict[int, Callable[[Result], None]] = {}
        names = [f"n{i:02d}" for i in range(1, config.nodes + 1)]
        self.ring = Ring(RingNode(name, self.rng.getrandbits(64), config.tokens_per_node)
                         for name in names)
        self.net = FaultyNet(self.rng, self.clock, config.latency_s, config.loss,
                             config.detection_s)
        self.nodes = {name: SimKvNode(self, name, MemoryStore()) for name in names}
        self.net.nodes = self.nodes
        for i, name in enumerate(names):
            self.clock.at(config.tick_s * (i + 1) / len(names), self._tick, name)

    # -- time, network and faults (sim.fault_net) ----------------------------------------

    def wall_ms(self) -> int:
        return self.net.wall_ms()

    def run_for(self, seconds: float) -> None:
        self.clock.run_until(self.clock.now + seconds)

    def _tick(self, name: str, _: Any) -> None:
        node = self.nodes[name]
        if node.up:
            node.tick()
        self.clock.after(self.config.tick_s, self._tick, name)

    def send(self, sender: str, to: str, message: Any) -> None:
        self.net.send(sender, to, message)

    def partition(self, groups: list[list[str]]) -> None:
        self.net.partition(groups)

    def heal(self) -> None:
        self.net.heal()

    def crash(self, name: str) -> None:
        self.net.crash(name)

    def restart(self, name: str) -> None:
        self.net.restart(name)

    def topology(self, viewer: str) -> Topology:
        up = self.net.up_as_seen_by(viewer)
        window = self.config.hint_window_s
        allowed = {name: self.clock.now - since < window
                   for name, since in self.net.down_since.items()}
        return Topology(self.ring, up, up, allowed)

    # -- client operations -----------------------------------------------------------------

    def respond(self, op_id: int, result: Result) -> None:
        callback = self._callbacks.pop(op_id, None)
        if callback is not None:
            callback(result)

    def cell(self, via: str, value: bytes, tombstone: bool = False) -> Cell:
        """A new cell stamped by ``via``'s clock, as its coordinator would stamp a write."""
        return Cell(self.nodes[via].clock.now(self.wall_ms()), via, value, tombstone)

    def put(self, via: str, key: bytes, value: bytes | Cell, consistency: str,
            done: Callable[[Result], None], tombstone: bool = False) -> Cell:
        node = self.nodes[via]
        assert node.up, f"{via} is down: it cannot coordinate"
        cell = value if isinstance(value, Cell) else self.cell(via, value, tombstone)
        op_id = next(self._op_ids)
        self._callbacks[op_id] = done
        node.execute(node.coordinator.write(
            self.clock.now, op_id, self.topology(via), KEYSPACE, self.config.replication,
            key, b"", cell, consistency))
        return cell

    def get(self, via: str, key: bytes, consistency: str,
            done: Callable[[Result], None]) -> None:
        node = self.nodes[via]
        assert node.up, f"{via} is down: it cannot coordinate"
        op_id = next(self._op_ids)
        self._callbacks[op_id] = done
        node.execute(node.coordinator.read(
            self.clock.now, op_id, self.topology(via), KEYSPACE, self.config.replication,
            key, b"", consistency))

    def replicas(self, key: bytes) -> tuple[str, ...]:
        return self.ring.preference_list(token(key), self.config.replication)
