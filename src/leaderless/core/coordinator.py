"""The coordinator: any node turns one client request into replica requests and back.

Writes go to every live replica of the key and succeed after W durable acks; a replica
that is down (or does not ack before the timeout) gets the write as a hint, kept by the
next healthy node clockwise (or by the coordinator), so it receives it when it returns.
Hints do not count towards W: a QUORUM read must always meet a QUORUM write (Cassandra's
choice; Dynamo's sloppy quorum counts them and loses that guarantee).

Reads ask R live replicas in the dynamic snitch's order (``core.snitch``: this node first if
it is one, then the local zone's replicas by reply latency and requests outstanding, suspect
ones last; near-ties keep ring order) and answer with the newest cell by (HLC, writer). If a
replica is slower than the speculative delay (the recent p99 of replica reads, at least
``speculative_floor_s``), one more replica is asked: the snitch's best of those not asked.
Replicas that answered with an older cell are repaired before the read returns (blocking
read repair, as Cassandra does for QUORUM), so a value once read is never "un-read" by a
later QUORUM read.

The state machine is sans-I/O: the caller passes the ring and the set of live nodes
(``Topology``), feeds replica replies to ``on_reply`` and calls ``on_tick`` by
``next_deadline``; effects are ``SendReplica`` (``to`` may be this node) and ``Respond``.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from collections.abc import Iterator, Mapping
from collections.abc import Set as AbstractSet

from leaderless.core.cells import Cell, newest
from leaderless.core.keys import token
from leaderless.core.kv_messages import (
    ReplicaAck,
    ReplicaRead,
    ReplicaReadReply,
    ReplicaReply,
    ReplicaRequest,
    ReplicaScan,
    ReplicaScanReply,
    ReplicaWrite,
    ScanRow,
)
from leaderless.core.placement import Placement
from leaderless.core.quorum import required
from leaderless.core.ring import Ring
from leaderless.core.snitch import Snitch, SnitchConfig


@dataclasses.dataclass(frozen=True)
class CoordinatorConfig:
    write_timeout_s: float = 2.0
    """Cassandra's write_request_timeout is 2 s: long enough for a busy disk, short
    enough that a client learns of trouble before its own timeout."""
    read_timeout_s: float = 2.0
    speculative_floor_s: float = 0.005
    """Never ask an extra replica sooner than this: below it the retry costs more load
    than the tail latency it saves on a LAN."""
    speculative_ceiling_s: float = 0.5
    ops_in_flight_max: int = 100_000
    """Requests this node coordinates at once; beyond it clients get ``overloaded``."""


@dataclasses.dataclass(frozen=True)
class Topology:
    """The coordinator's view: the ring, the nodes believed up (alive or suspect), and
    those believed fully alive (preferred for reads)."""

    ring: Ring
    up: AbstractSet[str]
    alive: AbstractSet[str]
    hints_allowed: Mapping[str, bool] = dataclasses.field(default_factory=dict)
    """Per down node: False once it has been down longer than the hint window."""
    read_only: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Members whose gossiped health is read-only (``core.health``), with the reason: they
    get no writes (theirs become hints, as for a down replica) and hold no hints, but
    still serve reads. This node among them: it refuses to coordinate writes."""
    placement: Placement | None = None
    """While the ring changes (``core.placement``): the extra replicas a write must also
    reach, one more acknowledgement each. ``ring`` is then the placement's current ring."""


@dataclasses.dataclass(frozen=True, slots=True)
class SendReplica:
    to: str
    message: ReplicaRequest


@dataclasses.dataclass(frozen=True, slots=True)
class WriteDone:
    hlc: int


@dataclasses.dataclass(frozen=True, slots=True)
class ReadDone:
    cell: Cell | None


@dataclasses.dataclass(frozen=True, slots=True)
class ScanDone:
    rows: list[ScanRow]
    more: bool


@dataclasses.dataclass(frozen=True, slots=True)
class Failed:
    code: str
    """``unavailable`` | ``timeout`` | ``overloaded`` | ``storage`` | ``read_only``"""
    message: str
    received: int = 0
    required: int = 0


Result = WriteDone | ReadDone | ScanDone | Failed


@dataclasses.dataclass(frozen=True, slots=True)
class Respond:
    op_id: int
    result: Result


Effect = SendReplica | Respond


@dataclasses.dataclass
class CoordinatorCounters:
    writes: int = 0
    reads: int = 0
    scans: int = 0
    unavailable: int = 0
    timeouts: int = 0
    hints_sent: int = 0
    read_repairs: int = 0
    speculative_retries: int = 0
    replica_errors: int = 0


@dataclasses.dataclass(slots=True)
class _Op:
    op_id: int
    kind: str  # "write" | "read" | "scan"
    need: int
    deadline: float
    request: ReplicaRequest
    replicas: tuple[str, ...]
    candidates: list[str]
    """Live replicas not asked yet (reads: speculative retry goes to these)."""
    sent: dict[int, str] = dataclasses.field(default_factory=dict)
    """request id -> replica, for requests not yet answered."""
    sent_at: dict[int, float] = dataclasses.field(default_factory=dict)
    ok: int = 0
    failed: int = 0
    answers: dict[str, Cell | None] = dataclasses.field(default_factory=dict)
    scans: dict[str, list[ScanRow]] = dataclasses.field(default_factory=dict)
    responded: bool = False
    speculate_at: float = float("inf")
    repairs: int = 0
    """Read repairs outstanding; the read answers when they are acked (or time out)."""
    result: Result | None = None
    error: str = ""
    """The last error a replica answered with (for the client's message)."""


class Coordinator:
    def __init__(self, me: str, config: CoordinatorConfig, ids: Iterator[int]) -> None:
        self.me = me
        self.config = config
        self.counters = CoordinatorCounters()
        self._ids = ids
        self._ops: dict[int, _Op] = {}
        self._by_request: dict[int, int] = {}
        self._deadlines: list[tuple[float, int]] = []
        self._latencies: list[float] = []
        self._latency_at = itertools.count()
        self._speculative_s = config.speculative_ceiling_s / 5
        self._speculations: list[tuple[float, int]] = []
        """(when, op id) of reads that may need a speculative retry; stale entries (the
        op finished or was answered) are skipped when they come up."""
        self._topology: Topology | None = None
        self.snitch = Snitch(me, SnitchConfig())
        """Reply latency and outstanding requests per replica: the order reads ask them in."""
        self._snitch_ring: Ring | None = None

    # -- requests ----------------------------------------------------------------------

    def write(self, now: float, op_id: int, topology: Topology, keyspace: str, replication: int,
              partition: bytes, sort: bytes, cell: Cell, consistency: str) -> list[Effect]:
        self.counters.writes += 1
        self._topology = topology
        if self.me in topology.read_only:
            return [Respond(op_id, read_only_failure(topology.read_only[self.me]))]
        need = required(consistency, replication)
        tok = token(partition)
        replicas = topology.ring.preference_list(tok, replication)
        if topology.placement is not None and topology.placement.changing:
            extra = topology.placement.extra_replicas(tok, replication)
            replicas += extra
            need += len(extra)
        live = [r for r in replicas if r in topology.up and r not in topology.read_only]
        if len(live) < need or len(self._ops) >= self.config.ops_in_flight_max:
            read_only = [r for r in replicas if r in topology.read_only]
            return [self._refuse(op_id, len(live), need, len(replicas), read_only)]
        effects: list[Effect] = []
        op = _Op(op_id, "write", need, now + self.config.write_timeout_s,
                 ReplicaWrite(0, keyspace, partition, sort, cell, trace=op_id), replicas, [])
        self._start(op)
        for replica in live:
            effects.append(self._send(op, replica, now))
        for down in replicas:
            if down not in topology.up or down in topology.read_only:
                effects.extend(self._hint(topology, tok, replicas, down, op.request))
        return effects

    def read(self, now: float, op_id: int, topology: Topology, keyspace: str, replication: int,
             partition: bytes, sort: bytes, consistency: str) -> list[Effect]:
        self.counters.reads += 1
        request = ReplicaRead(0, keyspace, partition, sort, op_id)
        return self._start_read(now, op_id, topology, replication, partition, consistency,
                                "read", request)

    def scan(self, now: float, op_id: int, topology: Topology, keyspace: str, replication: int,
             partition: bytes, start: bytes | None, end: bytes | None, limit: int,
             consistency: str) -> list[Effect]:
        self.counters.scans += 1
        request = ReplicaScan(0, keyspace, partition, start, end, limit, op_id)
        return self._start_read(now, op_id, topology, replication, partition, consistency,
                                "scan", request)

    def _start_read(self, now: float, op_id: int, topology: Topology, replication: int,
                    partition: bytes, consistency: str, kind: str,
                    request: ReplicaRead | ReplicaScan) -> list[Effect]:
        self._topology = topology
        need = required(consistency, replication)
        replicas = topology.ring.preference_list(token(partition), replication)
        live = [r for r in replicas if r in topology.up]
        if len(live) < need or len(self._ops) >= self.config.ops_in_flight_max:
            return [self._refuse(op_id, len(live), need, replication)]
        # This node first (no network), then the local zone's fastest and least loaded,
        # suspect ones last; near-ties keep ring order (core.snitch).
        self._sync_snitch(topology)
        live = self.snitch.order(now, live, topology.alive)
        op = _Op(op_id, kind, need, now + self.config.read_timeout_s, request, replicas,
                 live[need:])
        self._start(op)
        if op.candidates:
            op.speculate_at = now + self._speculative_s
            heapq.heappush(self._speculations, (op.speculate_at, op_id))
        return [self._send(op, replica, now) for replica in live[:need]]

    def _refuse(self, op_id: int, live: int, need: int, replication: int,
                read_only: list[str] | None = None) -> Respond:
        if live < need:
            self.counters.unavailable += 1
            usable = (f"alive and writable ({', '.join(read_only)} read-only)" if read_only
                      else "alive")
            return Respond(op_id, Failed(
                "unavailable", f"{live} of {replication} replicas are {usable}; the "
                f"consistency level needs {need}", live, need))
        return Respond(op_id, Failed("overloaded", "this node coordinates too many requests; "
                                     "retry with back-off"))

    def _sync_snitch(self, topology: Topology) -> None:
        """Tell the snitch the ring's members and zones when the ring changed (it forgets
        those that left, and learns this node's zone)."""
        if topology.ring is not self._snitch_ring:
            self._snitch_ring = topology.ring
            self.snitch.set_peers({n: node.zone for n, node in topology.ring.nodes.items()})

    def _next_candidate(self, op: _Op, now: float) -> str:
        """The best replica not asked yet, by the snitch's order now (speculative retry)."""
        alive = self._topology.alive if self._topology is not None else None
        best = self.snitch.order(now, op.candidates, alive)[0]
        op.candidates.remove(best)
        return best

    def _start(self, op: _Op) -> None:
        assert op.op_id not in self._ops, f"op id {op.op_id} reused while in flight"
        self._ops[op.op_id] = op
        heapq.heappush(self._deadlines, (op.deadline, op.op_id))

    def _send(self, op: _Op, replica: str, now: float) -> SendReplica:
        request_id = next(self._ids)
        self.snitch.on_send(replica, now)
        op.sent[request_id] = replica
        op.sent_at[request_id] = now
        self._by_request[request_id] = op.op_id
        return SendReplica(replica, _with_id(op.request, request_id))

    def _hint(self, topology: Topology, tok: int, replicas: tuple[str, ...], target: str,
              write: ReplicaRequest) -> list[Effect]:
        assert isinstance(write, ReplicaWrite)
        if not topology.hints_allowed.get(target, True):
            return []
        holder = self.me
        for name in topology.ring.walk(tok):
            if (name not in replicas and name in topology.alive
                    and name not in topology.read_only):
                holder = name
                break
        self.counters.hints_sent += 1
        # Hint writes are fire-and-forget for this op: their acks are ignored (id unknown).
        hint = ReplicaWrite(next(self._ids), write.keyspace, write.partition, write.sort,
                            write.cell, hint_for=target, trace=write.trace)
        return [SendReplica(holder, hint)]

    # -- replies and time --------------------------------------------------------------

    def owns(self, request_id: int) -> bool:
        return request_id in self._by_request

    def on_reply(self, now: float, replica: str, reply: ReplicaReply) -> list[Effect]:
        """A replica's answer (``replica`` is informational; the request id identifies it)."""
        op_id = self._by_request.pop(reply.id, None)
        op = self._ops.get(op_id) if op_id is not None else None
        if op is None:
            return []
        sender = op.sent.pop(reply.id, None)
        sent_at = op.sent_at.pop(reply.id, now)
        if sender is None:
            sender = replica
        else:
            self.snitch.on_reply(sender, now)
        hints: list[Effect] = []
        if reply.error:
            self.counters.replica_errors += 1
            op.failed += 1
            op.error = reply.error
            request = op.request
            if (reply.error.startswith(READ_ONLY_ERROR) and isinstance(request, ReplicaWrite)
                    and request.hint_for is None and op.kind == "write"
                    and self._topology is not None):
                # A read-only replica we had not heard of yet (gossip lag): hint it.
                hints = self._hint(self._topology, token(request.partition), op.replicas,
                                   sender, request)
        elif isinstance(reply, ReplicaAck):
            if op.kind == "write":
                op.ok += 1
            else:
                op.repairs -= 1
        elif isinstance(reply, ReplicaReadReply):
            self._record_latency(sender, now - sent_at)
            op.ok += 1
            op.answers[sender] = reply.cell
        elif isinstance(reply, ReplicaScanReply):
            self._record_latency(sender, now - sent_at)
            op.ok += 1
            op.scans[sender] = reply.rows
        return hints + self._progress(now, op)

    def _progress(self, now: float, op: _Op) -> list[Effect]:
        effects: list[Effect] = []
        if op.kind == "write":
            if not op.responded and op.ok >= op.need:
                assert isinstance(op.request, ReplicaWrite)
                effects.append(self._respond(op, WriteDone(op.request.cell.hlc)))
            elif not op.responded and op.failed > len(op.replicas) - op.need:
                # A replica's storage failure is "storage"; anything else (a clock too far
                # ahead) makes the replica unavailable for this write.
                code = "storage" if op.error.startswith("storage") else "unavailable"
                effects.append(self._respond(op, Failed(
                    code, f"{op.failed} replicas refused the write (last: {op.error}); "
                    f"{op.ok} of {op.need} needed acknowledged it", op.ok, op.need)))
        elif op.result is None and op.ok >= op.need:
            op.result = self._read_result(op)
            effects.extend(self._read_repair(now, op))
        elif (op.result is None and op.failed > 0 and not op.sent and op.candidates):
            effects.append(self._send(op, self._next_candidate(op, now), now))
        if op.result is not None and not op.responded and op.repairs <= 0:
            effects.append(self._respond(op, op.result))
        if op.responded and not op.sent:
            self._finish(op)
        return effects

    def _read_result(self, op: _Op) -> Result:
        if op.kind == "read":
            return ReadDone(newest(list(op.answers.values())))
        assert isinstance(op.request, ReplicaScan)
        return ScanDone(*merge_scans(op.scans, op.request.limit))

    def _read_repair(self, now: float, op: _Op) -> list[Effect]:
        """Send the newest version to every replica that answered with an older one."""
        request = op.request
        effects: list[Effect] = []
        stale: list[tuple[str, bytes, Cell]] = []
        if isinstance(request, ReplicaRead):
            best = newest(list(op.answers.values()))
            if best is not None:
                stale = [(r, request.sort, best) for r, c in op.answers.items()
                         if best.newer_than(c)]
        elif isinstance(op.result, ScanDone):
            for row in op.result.rows:
                for replica, rows in op.scans.items():
                    theirs = next((r.cell for r in rows if r.sort == row.sort), None)
                    if row.cell.newer_than(theirs):
                        stale.append((replica, row.sort, row.cell))
        read_only = self._topology.read_only if self._topology is not None else {}
        for replica, sort, cell in stale:
            if replica in read_only:
                continue  # it would refuse; it catches up by hints and anti-entropy
            self.counters.read_repairs += 1
            op.repairs += 1
            repair = ReplicaWrite(next(self._ids), request.keyspace, request.partition, sort,
                                  cell, trace=op.op_id)
            op.sent[repair.id] = replica
            op.sent_at[repair.id] = now
            self.snitch.on_send(replica, now)
            self._by_request[repair.id] = op.op_id
            effects.append(SendReplica(replica, repair))
        return effects

    def _respond(self, op: _Op, result: Result) -> Respond:
        op.responded = True
        return Respond(op.op_id, result)

    def _finish(self, op: _Op) -> None:
        self._ops.pop(op.op_id, None)
        for request_id in op.sent:
            self._by_request.pop(request_id, None)

    def on_tick(self, now: float) -> list[Effect]:
        effects: list[Effect] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, op_id = heapq.heappop(self._deadlines)
            op = self._ops.get(op_id)
            if op is not None:
                effects.extend(self._expire(op))
        while self._speculations and self._speculations[0][0] <= now:
            _, op_id = heapq.heappop(self._speculations)
            op = self._ops.get(op_id)
            if op is not None and op.result is None and op.speculate_at <= now:
                op.speculate_at = float("inf")
                if op.candidates:
                    self.counters.speculative_retries += 1
                    effects.append(self._send(op, self._next_candidate(op, now), now))
        return effects

    def _expire(self, op: _Op) -> list[Effect]:
        effects: list[Effect] = []
        if not op.responded:
            if op.result is not None:  # answered; only read repairs were outstanding
                effects.append(self._respond(op, op.result))
            else:
                self.counters.timeouts += 1
                what = "acknowledged the write" if op.kind == "write" else "answered"
                effects.append(self._respond(op, Failed(
                    "timeout", f"{op.ok} of {op.need} needed replicas {what} in time",
                    op.ok, op.need)))
        if op.kind == "write" and self._topology is not None:
            # Replicas that never acked get the write as a hint (they may be partitioned).
            request = op.request
            tok = token(request.partition)
            for replica in set(op.sent.values()):
                if isinstance(request, ReplicaWrite) and request.hint_for is None:
                    effects.extend(self._hint(self._topology, tok, op.replicas, replica,
                                              request))
        for request_id, replica in op.sent.items():
            # Unanswered in time: the wait counts against the replica (core.snitch), and a
            # late reply is no longer ours (nor kept in _by_request for ever).
            waited_s = op.deadline - op.sent_at.get(request_id, op.deadline)
            self.snitch.on_timeout(replica, op.deadline, waited_s)
            self._by_request.pop(request_id, None)
        op.sent.clear()
        self._finish(op)
        return effects

    def next_deadline(self) -> float:
        """When ``on_tick`` next has work (possibly earlier: entries of finished ops are
        dropped only when they come up)."""
        soonest = self._deadlines[0][0] if self._deadlines else float("inf")
        if self._speculations and self._speculations[0][0] < soonest:
            soonest = self._speculations[0][0]
        return soonest

    def in_flight(self) -> int:
        return len(self._ops)

    # -- speculative delay ---------------------------------------------------------------

    def _record_latency(self, replica: str, latency_s: float) -> None:
        """Feed the replica's latency to the snitch, and keep the last 512 replica read
        latencies; every 64th, re-derive the speculative delay from their p99 (sorting on
        every read would cost more than it saves)."""
        self.snitch.record_latency(replica, latency_s)
        at = next(self._latency_at)
        if len(self._latencies) < 512:
            self._latencies.append(latency_s)
        else:
            self._latencies[at % 512] = latency_s
        if at % 64 == 63:
            p99 = sorted(self._latencies)[int(len(self._latencies) * 0.99)]
            self._speculative_s = min(self.config.speculative_ceiling_s,
                                      max(self.config.speculative_floor_s, p99))


READ_ONLY_ERROR = "read_only"
"""Code of a write refused by a read-only node; a replica's refusal starts with it."""


def read_only_failure(reason: str) -> Failed:
    """The refusal of a write by a node that is itself read-only (``core.health``)."""
    return Failed(READ_ONLY_ERROR, f"this node is read-only ({reason}): it takes no writes "
                  "until it is healthy again; write through another node")


def _with_id(request: ReplicaRequest, request_id: int) -> ReplicaRequest:
    if isinstance(request, ReplicaWrite):
        return ReplicaWrite(request_id, request.keyspace, request.partition, request.sort,
                            request.cell, request.hint_for, request.trace)
    if isinstance(request, ReplicaRead):
        return ReplicaRead(request_id, request.keyspace, request.partition, request.sort,
                           request.trace)
    return ReplicaScan(request_id, request.keyspace, request.partition, request.start,
                       request.end, request.limit, request.trace)


def merge_scans(scans: Mapping[str, list[ScanRow]], limit: int) -> tuple[list[ScanRow], bool]:
    """Newest cell per sort key across replicas. A replica that hit ``limit`` saw nothing
    past its last row, so the merged answer stops there (``more`` is then True)."""
    cutoff: bytes | None = None
    more = False
    for rows in scans.values():
        if len(rows) >= limit:
            more = True
            last = rows[-1].sort
            cutoff = last if cutoff is None or last < cutoff else cutoff
    merged: dict[bytes, Cell] = {}
    for rows in scans.values():
        for row in rows:
            if cutoff is not None and row.sort > cutoff:
                continue
            if row.cell.newer_than(merged.get(row.sort)):
                merged[row.sort] = row.cell
    result = [ScanRow(sort, merged[sort]) for sort in sorted(merged)]
    return result[:limit], more or len(result) > limit
