"""A deterministic simulation of strong mode: the production ``Acceptor`` and ``Proposer``
(``core.paxos``) on a simulated clock, network and crashing disk, with clients recording a
history for a linearizability checker.

The network delivers each message after a random latency (so messages reorder), drops some
(``loss``, partitions, a down receiver) and delivers some twice (``duplicate``). An
acceptor's writes go to its ``MemoryStore`` at once, are synced ``fsync_s`` later and only
then is the reply sent (group commit); a crash loses unsynced writes and every in-memory
state (proposer rounds, caches, ballot counter), and a restart rebuilds them from the store.
Failure detection is an oracle with a delay, as in ``sim.kv``.

Clients run one operation at a time on a random live node: reads, writes (unique values),
value-based compare-and-set and deletes on register keys; increments and reads on counter
keys. An ambiguous failure (the change may have been applied) is retried with the same
idempotency id on another node, up to ``client_retries`` times; then it is recorded as
indeterminate (``info``). A failure that certainly did not apply is ``fail``.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from typing import Any

from leaderless.core.coordinator import Topology
from leaderless.core.paxos import (
    Acceptor,
    Conflict,
    Done,
    Failed,
    Proposer,
    ProposerConfig,
    Respond,
    Result,
    SendAcceptor,
)
from leaderless.core.paxos_messages import (
    Accept,
    Cas,
    Change,
    Delete,
    Incr,
    PaxosFailure,
    Prepare,
    Purge,
    Put,
    Read,
)
from leaderless.core.ring import Ring, RingNode
from leaderless.sim.clock import SimClock
from leaderless.sim.fault_net import FaultyNet
from leaderless.storage.memory import MemoryStore
from leaderless.storage.store import StorageError

KEYSPACE = "strong"


@dataclasses.dataclass
class PaxosSimConfig:
    nodes: int = 3
    replication: int = 3
    tokens_per_node: int = 8
    latency_s: tuple[float, float] = (0.0002, 0.003)
    loss: float = 0.05
    duplicate: float = 0.05
    fsync_s: float = 0.0003
    detection_s: float = 0.3
    timeout_s: float = 0.5
    """The proposer's per-change deadline."""
    round_timeout_s: float = 0.05
    client_timeout_s: float = 1.0
    """A client gives up waiting after this (its node may have crashed): ``info``."""
    client_retries: int = 2
    register_keys: tuple[bytes, ...] = (b"r1", b"r2")
    counter_keys: tuple[bytes, ...] = (b"c1",)
    clients: int = 5
    ops_per_client: int = 30
    think_s: tuple[float, float] = (0.0, 0.15)
    """Pause between a client's operations: spreads the run over the fault phase."""
    fault_phase_s: float = 3.0
    """Faults (crashes, partitions) are injected only before this; then all heal."""


@dataclasses.dataclass
class Entry:
    """One client operation as the linearizability checker wants it (models
    ``cas_register``: read/write/cas; ``counter``: incr/read)."""

    client: int
    key: bytes
    kind: str
    input: Any
    call: float
    output: Any = None
    ret: float | None = None
    status: str = "pending"
    """``ok`` | ``fail`` (certainly not applied) | ``info`` (unknown) | ``pending``."""


class SimPaxosNode:
    def __init__(self, sim: PaxosSim, name: str) -> None:
        self.sim = sim
        self.name = name
        self.store = MemoryStore()
        self.up = True
        self.epoch = 0
        self._boot()

    def _boot(self) -> None:
        self.acceptor = Acceptor(self.store)
        self.proposer = Proposer(self.name, ProposerConfig(
            timeout_s=self.sim.config.timeout_s, round_timeout_s=self.sim.config.round_timeout_s),
                                 self.sim.ids, random.Random(self.sim.rng.getrandbits(64)))
        self._wake_at = float("inf")

    def crash(self) -> None:
        self.up = False
        self.epoch += 1
        self.store.crash()

    def restart(self) -> None:
        self.up = True
        self.epoch += 1
        self._boot()

    def execute(self, effects: list[SendAcceptor | Respond]) -> None:
        for effect in effects:
            if isinstance(effect, SendAcceptor):
                self.sim.send(self.name, effect.to, effect.message)
            else:
                self.sim.respond(effect.op_id, effect.result)
        soonest = self.proposer.next_deadline()
        if soonest < self._wake_at:
            self._wake_at = soonest
            self.sim.clock.at(max(soonest, self.sim.clock.now), self._wake, self.epoch)

    def _wake(self, epoch: int, _: Any) -> None:
        if epoch != self.epoch or not self.up or self.sim.clock.now < self._wake_at:
            return
        self._wake_at = float("inf")
        self.execute(self.proposer.on_tick(self.sim.clock.now))

    def receive(self, sender: str, message: Any) -> None:
        if isinstance(message, Prepare | Accept | Purge):
            reply, writes = self.acceptor.handle(message)
            if not writes:
                self.sim.send(self.name, sender, reply)
                return
            try:
                self.store.write(writes)
            except StorageError as exc:
                self.sim.send(self.name, sender, PaxosFailure(message.id, f"storage: {exc}"))
                return
            # Durable before the reply leaves: sync after fsync_s, unless crashed meanwhile.
            self.sim.clock.after(self.sim.config.fsync_s, self._synced, (self.epoch, sender),
                                 reply)
        elif self.proposer.owns(message.id):
            self.execute(self.proposer.on_reply(self.sim.clock.now, sender, message))

    def _synced(self, route: tuple[int, str], reply: Any) -> None:
        epoch, sender = route
        if epoch != self.epoch or not self.up:
            return  # crashed before the fsync: never acknowledged
        self.store.sync()
        self.sim.send(self.name, sender, reply)


class PaxosSim:
    def __init__(self, config: PaxosSimConfig, seed: int) -> None:
        self.config = config
        self.seed = seed
        self.rng = random.Random(seed)
        self.clock = SimClock()
        self.ids = itertools.count(1)
        self._op_ids = itertools.count(1)
        self._callbacks: dict[int, Any] = {}
        names = [f"n{i}" for i in range(1, config.nodes + 1)]
        self.ring = Ring(RingNode(name, self.rng.getrandbits(64), config.tokens_per_node)
                         for name in names)
        self.net = FaultyNet(self.rng, self.clock, config.latency_s, config.loss,
                             config.detection_s, config.duplicate)
        self.nodes = {name: SimPaxosNode(self, name) for name in names}
        self.net.nodes = self.nodes
        self.history: list[Entry] = []
        self._clients_done = 0
        self.wall_skew_ms: dict[str, int] = {}
        """Per-node offset of the wall clock from true simulated time (none: every clock
        agrees). Proposers judge lease expiry by their own wall clock (``sim.locks``)."""

    # -- network and faults (sim.fault_net) ---------------------------------------------

    def wall_ms(self) -> int:
        return self.net.wall_ms()

    def node_wall_ms(self, name: str) -> int:
        """``name``'s wall clock: the true one plus its skew."""
        return self.net.wall_ms() + self.wall_skew_ms.get(name, 0)

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

    @property
    def messages_dropped(self) -> int:
        return self.net.messages_dropped

    def topology(self, viewer: str) -> Topology:
        up = self.net.up_as_seen_by(viewer)
        return Topology(self.ring, up, up)

    # -- clients --------------------------------------------------------------------------

    def respond(self, op_id: int, result: Result) -> None:
        callback = self._callbacks.pop(op_id, None)
        if callback is not None:
            callback(result)

    def submit(self, via: str, key: bytes, change: Change, idempotency_id: bytes,
               done: Any) -> int:
        node = self.nodes[via]
        assert node.up
        op_id = next(self._op_ids)
        self._callbacks[op_id] = done
        node.execute(node.proposer.propose(
            self.clock.now, op_id, self.topology(via), KEYSPACE, self.config.replication,
            key, b"", change, idempotency_id, self.node_wall_ms(via)))
        return op_id

    def _client_step(self, client: int, remaining: int) -> None:
        if remaining == 0:
            self._clients_done += 1
            return
        rng = self.rng
        keys = self.config.register_keys + self.config.counter_keys
        key = keys[rng.randrange(len(keys))]
        change: Change
        if key in self.config.counter_keys:
            if rng.random() < 0.7:
                delta = rng.randint(1, 3)
                change, entry = Incr(delta), Entry(client, key, "incr", delta, self.clock.now)
            else:
                change, entry = Read(), Entry(client, key, "read", None, self.clock.now)
        else:
            roll = rng.random()
            if roll < 0.35:
                change, entry = Read(), Entry(client, key, "read", None, self.clock.now)
            elif roll < 0.6:
                value = f"c{client}-{remaining}".encode()
                change, entry = Put(value), Entry(client, key, "write", value, self.clock.now)
            elif roll < 0.93:
                expected = self._guess(key)
                new = f"c{client}-{remaining}".encode()
                change = (Cas(new, expected_absent=True) if expected is None
                          else Cas(new, expected_value=expected))
                entry = Entry(client, key, "cas", (expected, new), self.clock.now)
            else:
                change, entry = Delete(), Entry(client, key, "write", None, self.clock.now)
        self.history.append(entry)
        idempotency_id = f"{self.seed}/{client}/{remaining}".encode()
        self._attempt(entry, change, idempotency_id, 0, remaining)

    def _guess(self, key: bytes) -> bytes | None:
        """An expected value for a cas: a value some client wrote or read on the key."""
        seen = [e.output if e.kind == "read" else e.input[1] if e.kind == "cas" else e.input
                for e in self.history[-20:] if e.key == key and e.kind != "incr"]
        candidates = [v for v in seen if v is None or isinstance(v, bytes)]
        return self.rng.choice(candidates) if candidates else None

    def _attempt(self, entry: Entry, change: Change, idempotency_id: bytes, attempt: int,
                 remaining: int) -> None:
        live = [name for name, node in self.nodes.items() if node.up]
        if not live:
            self._complete(entry, "info" if attempt else "fail", None, remaining)
            return
        via = self.rng.choice(live)
        state = {"answered": False}

        def done(result: Result) -> None:
            if state["answered"]:
                return
            state["answered"] = True
            self._settle(entry, change, idempotency_id, attempt, remaining, result)

        op_id = self.submit(via, entry.key, change, idempotency_id, done)

        def give_up(_: Any, __: Any) -> None:
            if state["answered"]:
                return
            state["answered"] = True
            self._callbacks.pop(op_id, None)
            self._settle(entry, change, idempotency_id, attempt, remaining,
                         Failed("timeout", "client timeout", maybe_applied=True))

        self.clock.after(self.config.client_timeout_s, give_up)

    def _settle(self, entry: Entry, change: Change, idempotency_id: bytes, attempt: int,
                remaining: int, result: Result) -> None:
        if isinstance(result, Done):
            output: Any = result.value
            if entry.kind == "incr" or (entry.kind == "read" and entry.key
                                        in self.config.counter_keys):
                output = int(result.value) if result.value is not None else 0
            elif entry.kind == "cas":
                output = True
            self._complete(entry, "ok", output, remaining)
        elif isinstance(result, Conflict):
            self._complete(entry, "ok", False, remaining)
        elif isinstance(result, Failed) and (result.maybe_applied or attempt > 0):
            if attempt < self.config.client_retries and not isinstance(change, Read):
                self._attempt(entry, change, idempotency_id, attempt + 1, remaining)
            else:
                self._complete(entry, "info", None, remaining)
        else:
            self._complete(entry, "fail", None, remaining)

    def _complete(self, entry: Entry, status: str, output: Any, remaining: int) -> None:
        entry.status = status
        if status == "ok":
            entry.output = output
            entry.ret = self.clock.now
        client = entry.client
        self.clock.after(self.rng.uniform(*self.config.think_s), self._next, client,
                         remaining - 1)

    def _next(self, client: int, remaining: int) -> None:
        self._client_step(client, remaining)

    # -- a run ------------------------------------------------------------------------------

    def _faults(self) -> None:
        """A random schedule of crashes, restarts and partitions within the fault phase."""
        rng = self.rng
        names = sorted(self.nodes)
        at = 0.0
        while True:
            at += rng.uniform(0.05, 0.6)
            if at >= self.config.fault_phase_s:
                break
            kind = rng.random()
            name = rng.choice(names)
            if kind < 0.4:
                self.clock.at(at, lambda n, _: self.crash(n) if self.nodes[n].up else None, name)
                self.clock.at(at + rng.uniform(0.05, 0.6),
                              lambda n, _: self.restart(n) if not self.nodes[n].up else None,
                              name)
            elif kind < 0.7:
                other = [n for n in names if n != name]
                self.clock.at(at, lambda groups, _: self.partition(groups),
                              [[name], other])
                self.clock.at(at + rng.uniform(0.05, 0.6), lambda _, __: self.heal())
        self.clock.at(self.config.fault_phase_s, self._heal_all)

    def _heal_all(self, _: Any = None, __: Any = None) -> None:
        self.heal()
        for name, node in self.nodes.items():
            if not node.up:
                self.restart(name)

    def run(self, faults: bool = True, limit_s: float = 60.0) -> bool:
        """Run every client to the end (True), or stop at ``limit_s`` simulated (False)."""
        if faults:
            self._faults()
        for client in range(self.config.clients):
            self.clock.after(self.rng.uniform(0, 0.01), self._next, client,
                             self.config.ops_per_client)
        end = self.clock.now + limit_s
        return self.clock.run_until(end, lambda: self._clients_done == self.config.clients,
                                    check_every_s=0.05)

    def read_all(self) -> dict[bytes, list[Result]]:
        """Read every key through every node once the run has healed (a liveness check)."""
        healed = self.config.fault_phase_s + self.config.detection_s + 0.01
        self.clock.run_until(max(self.clock.now, healed))
        out: dict[bytes, list[Result]] = {}
        for key in self.config.register_keys + self.config.counter_keys:
            results = out[key] = []
            for name in sorted(self.nodes):
                self.submit(name, key, Read(), b"", results.append)
                self.clock.run_until(self.clock.now + 2 * self.config.timeout_s)
        return out
