"""The task service of a node: submit, claim, run, renew, finish (``core.tasks``).

No leader: every node submits into the index shards, scans the shards it is the first
replica of (then steals from others while it has free slots), and claims a task with one
Paxos round on the task's register, which decides (two nodes never both hold a task).

The claim loop is built for throughput: claimable entries are buffered sorted by priority
and claimed several at a time (one Paxos round each, concurrently, up to the free slots);
a task submitted through this node is claimed at once without a scan; the loop sleeps only
when no shard has work, backing off from ``IDLE_S_MIN`` to ``IDLE_S_MAX``, and a local
submit or a freed slot wakes it. A claimed task runs at once: ``finish`` carries the start
time (no separate ``start`` round).

**Claim at submit.** A node that can run a task submitted through it (tags, registered
function, load under the ceiling) and holds fewer than ``_room()`` slots' worth of tasks
(its slots plus ``prefetch_s`` seconds at its recent finishing rate) claims it in the
submit round itself, and runs it when a slot frees;
such a task is indexed only if it is still unfinished ``INDEX_DELAY_S`` later (for ``list``
and for failover), so a short task costs two Paxos rounds (submit-and-claim, finish) and no
index write, against three rounds and two index writes on the way through the index. If
its node dies before the entry is written, the survivors find the task in their own copies
of the task registers (``recover``), which they read whenever a member goes down, and
at start, and every ``RECOVER_INTERVAL_S`` (a holder that restarted faster than failure
detection); a pending task whose submitter went down is indexed again the same way (it may
have died between the register and the entry).
Leases of every running task are renewed in one pass every third of the lease TTL; a
refused renew means the task was cancelled or reclaimed, and its worker is aborted.

Refusals are remembered (``_skip``: until the holder's lease ends or the back-off passes)
so that a stale index entry costs one refused round per node, not one per scan; index
entries of finished or vanished tasks are deleted when met.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import contextlib
import dataclasses
import os
import random
import time
from collections.abc import Callable, Coroutine, Hashable
from typing import Any, Protocol

import msgspec
import xxhash

from leaderless.api.service import KvError
from leaderless.config import TasksConfig
from leaderless.core import paxos
from leaderless.core.keys import keyspace_prefix, prefix_end, token
from leaderless.core.locks import CLOCK_SKEW_MAX_MS
from leaderless.core.paxos_messages import Read
from leaderless.core.schema import KeyspaceDef
from leaderless.core.tasks import (
    FINISHED,
    INDEX_KEYSPACE,
    QUEUE_BYTES_MAX,
    SHARDS,
    TASK_ID_BYTES_MAX,
    TASK_KEYSPACE,
    TASK_REPLICATION,
    IndexEntry,
    TaskChange,
    TaskOutcome,
    TaskSpec,
    TaskState,
    claimable,
    decode_entry,
    decode_spec,
    decode_state,
    encode,
    index_sort,
    satisfies,
    shard_key,
    shard_of,
)
from leaderless.runtime.kv import KvNode
from leaderless.runtime.logs import NodeLogger, RateLimitedLog
from leaderless.runtime.task_workers import module_allowed

TASK_KEYSPACE_DEF = KeyspaceDef(TASK_KEYSPACE, TASK_REPLICATION, "strong")
QUEUES_PARTITION = b"queues"
"""The index partition listing the queues (sort key = queue name): a scanner learns of
queues submitted through other nodes. No shard key equals it (they all hold a '/')."""
QUEUES_MAX = 1000
QUEUES_REFRESH_S = 2.0
SCAN_CONSISTENCY = "QUORUM"
"""Index scans read a majority of a shard's replicas (index writes are QUORUM too): one
replica may lack an entry (a joiner not yet filled, a replica that missed the write), and
a task no scan shows would wait for anti-entropy. Scans are per buffer refill, not per
task, so the second replica costs little."""
SCAN_ROWS = 64
"""Index rows read per shard scan."""
SCANS_IN_FLIGHT = 16
STEAL_SHARDS = 8
"""Shards of other nodes scanned per round when this node's own have no work: the next
ones of a cycle through all of them from a random start, so an idle node covers every
shard within a few rounds."""
BUFFER_MAX = 512
"""Claimable entries remembered between scans (sorted by priority, then age)."""
BUFFER_AGE_S_MAX = 1.0
"""A buffer older than this is scanned again (entries go stale as others claim them)."""
IDLE_S_MIN = 0.02
IDLE_S_MAX = 0.5
LOAD_WAIT_S = 0.25
"""How long a node over its load ceiling waits before looking again."""
SKIP_MAX = 100_000
RECENT_MAX = 1000
"""Tasks finished through this node that ``list`` also shows (their index entries are gone)."""
SWEEP_INTERVAL_S = 30.0
"""How often a node looks for finished tasks past their result TTL."""
SWEEP_KEYS_PER_PASS = 2000
"""Task registers read per pass (from this node's own store, a slice at a time): the
sweep is background work; a later pass goes on where this one stopped."""
MISSING_CHECKS_PER_WAIT = 16
"""A wait that ends with nothing finished reads this many of its ids (strong reads) to
report the ones with no task (never submitted, or deleted past their TTL)."""
WAIT_IDS_MAX = 1000
CLAIMS_PER_ROUND = 64
"""Claims (Paxos rounds) a claim round starts at once at most."""
RATE_WINDOW_S = 2.0
"""The finishing rate that sizes the prefetch (``TasksConfig.prefetch_s``) is over this."""
PREFETCH_MAX = 1000
"""Tasks held beyond the free slots at most, whatever the rate."""
INDEX_DELAY_S = 1.0
"""A task claimed at submit gets its index entry when it is still unfinished this long
after (most short tasks never need one)."""
REFILL_S_MIN = 0.05
"""An empty buffer is scanned again at most this often (a busy node's claim rounds would
otherwise scan every shard after each task)."""
RECOVER_CHECK_S = 0.5
"""How often a node looks for members that went down (then reads its task registers)."""
RECOVER_INTERVAL_S = 30.0
"""A full read of this node's task registers for lost or unindexed tasks, at least this
often."""
RECOVER_SLICE = 2000
"""Task registers read per slice of a recovery pass (the loop runs others in between)."""
WAIT_GATHER_S = 0.005
"""A wait answers this long after its first task finished, with every task finished by
then (a client waiting on many re-sends its wait after each answer)."""
HOLD_LINGER_S = 10.0
HOLD_SWEEP_S = 1.0
"""Watches past their linger are let go at most this often (a pass looks at all)."""
HELD_MAX = 20_000
"""Task registers watched for waiters at once; beyond it ``wait`` answers overloaded."""
LIST_LIMIT_MAX = 1000
FINISH_TRIES = 5
IDEMPOTENCY_KEY_BYTES_MAX = 256


class Pool(Protocol):
    """What the service needs of ``runtime.task_workers.WorkerPool``."""

    async def start(self) -> None: ...
    def free_slots(self) -> int: ...
    async def run(self, spec: TaskSpec, *, key: Hashable | None = None) -> TaskOutcome: ...
    async def close(self) -> None: ...


@dataclasses.dataclass(slots=True)
class _Candidate:
    queue: str
    sort: bytes
    entry: IndexEntry


@dataclasses.dataclass(slots=True)
class _Run:
    """A task this node holds: claimed, running in a worker, finishing."""

    task_id: bytes
    spec: TaskSpec
    sort: bytes
    token: int
    lease_expires_ms: int
    worker: asyncio.Task[None] | None = None
    lost: bool = False
    """A renew was refused: the task was cancelled or reclaimed; its result is dropped."""
    releasing: bool = False
    finishing: bool = False
    """The worker returned: its outcome is being recorded (no renew, no abort)."""
    indexed: bool = True
    """Its index entry may exist (False: claimed at submit and not yet indexed)."""


def task_id_for(queue: str, idempotency_key: str) -> bytes:
    """A task's id: derived from (queue, idempotency key) when a key is given (the same
    key gives the same task), else 16 random bytes."""
    if not idempotency_key:
        return os.urandom(16)
    return xxhash.xxh3_128_digest(queue.encode() + b"\x00" + idempotency_key.encode())


class TaskService:
    def __init__(self, kv: KvNode, node_name: str, config: TasksConfig, tags: set[str],
                 pool: Pool, load: Callable[[], float],
                 now: Callable[[], float] = time.time) -> None:
        self._kv = kv
        self.node = node_name
        self.config = config
        self.tags = set(tags)
        self._pool = pool
        self._load = load
        self._now = now
        self._ttl_ms = int(config.lease_ttl_s * 1000)
        self.log = NodeLogger(node_name, "tasks")
        self._warn = RateLimitedLog(self.log)
        self._running: dict[bytes, _Run] = {}
        self._reserved = 0
        """Slots of claims under way (not yet in ``_running``)."""
        self._fresh: collections.deque[_Candidate] = collections.deque()
        self._fresh_ids: set[bytes] = set()
        """The ids in ``_fresh`` (at most ``BUFFER_MAX``): waiters on them need no watch
        while they are on their way to running here (``_unfresh``)."""
        """Tasks submitted through this node: claimed without a scan."""
        self._buffer: builtins.list[_Candidate] = []
        self._buffer_at = 0.0
        self._skip: dict[bytes, int] = {}
        """Task id -> wall ms until which a claim would be refused (held, backing off)."""
        self._queues: set[str] = {"default"}
        self._queues_written: set[str] = set()
        self._queues_read_at = -QUEUES_REFRESH_S
        self._home: tuple[Any, frozenset[str], frozenset[str], list[bytes], list[bytes]] = (
            None, frozenset(), frozenset(), [], [])
        self._steal_at = 0
        self._recent: collections.OrderedDict[bytes, TaskState] = collections.OrderedDict()
        self._waiters: dict[bytes, list[asyncio.Future[None]]] = {}
        self._wait_results: dict[int, dict[bytes, TaskState | None]] = {}
        self._held: dict[bytes, tuple[Callable[[], None], float]] = {}
        """Task registers watched for waiters: (let go, until when after the last wait)."""
        self._wake = asyncio.Event()
        self._claiming = False
        self._stopped = False
        self._loops: builtins.list[asyncio.Task[None]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        """Background index writes."""
        self._up_seen: frozenset[str] = frozenset()
        self._held_swept_at = 0.0
        self._held_slots = 0
        """Slots of the tasks in ``_running``."""
        self._finished_at: collections.deque[float] = collections.deque(maxlen=100_000)
        """When tasks left ``_running`` (monotonic), for the finishing rate."""
        self._down_seen: frozenset[str] = frozenset()
        self._rng = random.Random()
        self._counters: collections.Counter[str] = collections.Counter()
        self._sweep_cursor = b""
        """Where the next sweep of expired tasks goes on (``sweep_expired``)."""
        self._done_by_queue: collections.Counter[tuple[str, str]] = collections.Counter()
        self._pending_seen: dict[str, int] = {}
        kv.key_listeners.append(self._on_key_changed)

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def runs_tasks(self) -> bool:
        """Whether this node runs tasks at all: only with registered modules (or pickled
        callables allowed). Without, it still submits, reads, lists, waits and cancels."""
        return bool(self.config.modules) or self.config.allow_pickle

    async def start(self) -> None:
        """Start the upkeep of the task registers this node holds (every node: the TTL
        sweep and the recovery of lost tasks); with tasks to run, the workers and then
        claiming (at once: a joining node just scans)."""
        if self._stopped:
            return
        loop = asyncio.get_running_loop()
        self._loops = [loop.create_task(self._sweep_loop()),
                       loop.create_task(self._recover_loop())]
        if not self.runs_tasks:
            return
        await self._pool.start()
        if self._stopped:
            return
        self._claiming = True
        self._loops += [loop.create_task(self._claim_loop()),
                        loop.create_task(self._renew_loop())]

    async def stop(self, drain_s: float) -> None:
        """Claim nothing more, wait up to ``drain_s`` for the running tasks, then hand the
        rest back (``release``: they run elsewhere at once) and close the workers."""
        if self._stopped:
            return
        self._stopped = True
        self._claiming = False
        self._wake.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_s
        while self._running and loop.time() < deadline:
            await asyncio.sleep(min(0.05, max(0.0, deadline - loop.time())))
        if self._running:
            await asyncio.gather(*(self._release(run) for run in list(self._running.values())),
                                 return_exceptions=True)
        for task in [*self._loops, *self._tasks]:
            task.cancel()
        for task in [*self._loops, *self._tasks]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._loops = []
        for run in list(self._running.values()):
            if run.worker is not None:
                run.worker.cancel()
        if self.runs_tasks:
            await self._pool.close()
        with contextlib.suppress(ValueError):
            self._kv.key_listeners.remove(self._on_key_changed)
        for release, _ in self._held.values():
            release()
        self._held.clear()
        for futures in self._waiters.values():
            for future in futures:
                if not future.done():
                    future.set_result(None)

    # -- the API -------------------------------------------------------------------------

    async def submit(self, spec: TaskSpec, task_id: bytes | None = None,
                     idempotency_key: str = "") -> bytes:
        """Record a new pending task and index it; returns its id. With an idempotency key
        the id is derived from it: submitting again returns the first task's id."""
        spec = _checked_spec(spec)
        if spec.pickled and not self.config.allow_pickle:
            raise KvError("bad_request", "this cluster does not run pickled callables; "
                          "submit a registered function (module:function) or set "
                          "[tasks] allow_pickle = true on every node")
        if len(idempotency_key.encode()) > IDEMPOTENCY_KEY_BYTES_MAX:
            raise KvError("bad_request", f"an idempotency key has at most "
                          f"{IDEMPOTENCY_KEY_BYTES_MAX} bytes")
        if task_id is None:
            task_id = task_id_for(spec.queue, idempotency_key)
        elif not 1 <= len(task_id) <= TASK_ID_BYTES_MAX:
            raise KvError("bad_request", f"a task id has 1..{TASK_ID_BYTES_MAX} bytes")
        take = self._takes(spec)
        if take:
            self._reserved += spec.slots
        try:
            outcome = await self._change(task_id, TaskChange(
                "submit", self.node, ttl_ms=self._ttl_ms if take else 0,
                payload=encode(spec)))
        finally:
            if take:
                self._reserved -= spec.slots
        if isinstance(outcome, paxos.Conflict):
            if outcome.reason != "exists" or outcome.value is None:
                raise KvError("conflict", f"task {task_id.hex()} was not submitted: "
                              f"{outcome.reason}")
            state = decode_state(outcome.value)
            if state.spec != spec:
                raise KvError("conflict", f"task {task_id.hex()} exists with another spec "
                              f"(idempotency key {idempotency_key!r} was used for other work)")
            if state.state in FINISHED:
                return task_id
            # The first submission may have died before its index entry: write it again.
        else:
            assert isinstance(outcome, paxos.Done), outcome
            assert outcome.value is not None
            state = decode_state(outcome.value)
            self._counters["submitted"] += 1
        sort = index_sort(spec.priority, state.submitted_ms, task_id)
        if (state.state == "claimed" and state.holder == self.node
                and task_id not in self._running):
            # Claimed in the submit round: it runs here; indexed only if it lasts.
            self._counters["claimed"] += 1
            self._counters["claimed_at_submit"] += 1  # a subset of ``claimed``
            entry = IndexEntry(task_id, spec.slots, list(spec.tags))
            self._start(_Candidate(spec.queue, sort, entry), state, indexed=False)
            await self._note_queue(spec.queue)
            return task_id
        await self._note_queue(spec.queue)
        entry = IndexEntry(task_id, spec.slots, list(spec.tags), state.lease_expires_ms,
                           state.not_before_ms)
        await self._kv.put(INDEX_KEYSPACE, _shard(spec.queue, task_id), encode(entry), sort)
        if (self._claiming and state.state == "pending" and satisfies(self.tags, spec.tags)
                and len(self._fresh) < BUFFER_MAX and task_id not in self._fresh_ids):
            self._fresh.append(_Candidate(spec.queue, sort, entry))
            self._fresh_ids.add(task_id)
            self._wake.set()
        return task_id

    async def status(self, task_id: bytes) -> TaskState | None:
        """The task's state (a linearizable read), or None if there is no such task."""
        _check_id(task_id)
        outcome = await self._kv.propose(TASK_KEYSPACE_DEF, task_id, b"", Read(), b"")
        assert isinstance(outcome, paxos.Done), outcome
        return None if outcome.value is None else decode_state(outcome.value)

    async def cancel(self, task_id: bytes) -> TaskState:
        """Cancel a task that has not finished; its holder (if any) aborts it at its next
        renew. Raises ``not_found`` or ``conflict`` (finished already)."""
        _check_id(task_id)
        outcome = await self._change(task_id, TaskChange("cancel", self.node))
        if isinstance(outcome, paxos.Conflict):
            if outcome.value is None:
                raise KvError("not_found", f"there is no task {task_id.hex()} (never "
                              "submitted, or deleted after its result TTL)")
            state = decode_state(outcome.value)
            raise KvError("conflict", f"task {task_id.hex()} cannot be cancelled: it "
                          f"{state.state} already")
        assert isinstance(outcome, paxos.Done) and outcome.value is not None, outcome
        state = decode_state(outcome.value)
        self._counters["cancelled"] += 1
        run = self._running.get(task_id)
        if run is not None:
            run.lost = True
            if run.worker is not None:
                run.worker.cancel()
        self._finished_locally(task_id, state)
        await self._delete_entry(state.spec.queue, task_id,
                                 index_sort(state.spec.priority, state.submitted_ms, task_id))
        return state

    async def list(self, queue: str = "default", state: str | None = None,
                   limit: int = 100) -> builtins.list[tuple[bytes, TaskState]]:
        """Tasks of ``queue`` (optionally in ``state``), at most ``limit``: the unfinished
        ones from the index shards (their registers read for the truth) and the ones
        finished recently through this node."""
        if not 1 <= limit <= LIST_LIMIT_MAX:
            raise KvError("bad_request", f"limit must be 1..{LIST_LIMIT_MAX}")
        _check_queue(queue)
        ids: builtins.list[bytes] = []
        gate = asyncio.Semaphore(SCANS_IN_FLIGHT)

        async def scan(shard: int) -> builtins.list[bytes]:
            async with gate:
                rows, _ = await self._kv.scan(INDEX_KEYSPACE, shard_key(queue, shard),
                                              limit=limit, consistency=SCAN_CONSISTENCY)
            return [decode_entry(row.value).task_id for row in rows]

        if state is None or state not in FINISHED:
            for found in await asyncio.gather(*(scan(s) for s in range(SHARDS))):
                ids.extend(found)
        seen = set(ids)
        ids.extend(i for i, s in reversed(self._recent.items())
                   if s.spec.queue == queue and i not in seen)
        result: builtins.list[tuple[bytes, TaskState]] = []
        read_gate = asyncio.Semaphore(SCANS_IN_FLIGHT)

        async def read(task_id: bytes) -> TaskState | None:
            async with read_gate:
                return await self.status(task_id)

        for start in range(0, len(ids), SCANS_IN_FLIGHT * 4):
            chunk = ids[start:start + SCANS_IN_FLIGHT * 4]
            for task_id, task in zip(chunk, await asyncio.gather(*(read(i) for i in chunk)),
                                     strict=True):
                if task is not None and (state is None or task.state == state):
                    result.append((task_id, task))
                    if len(result) >= limit:
                        return result
        return result

    async def wait(self, task_ids: builtins.list[bytes], timeout_s: float
                   ) -> dict[bytes, TaskState | None]:
        """The finished ones of ``task_ids`` as soon as at least one has finished, or those
        finished when ``timeout_s`` passes (maybe none; then also, as None, some of the ids
        with no task). Learns of changes through watches
        on the tasks' registers (no polling)."""
        if len(task_ids) > WAIT_IDS_MAX:
            raise KvError("bad_request", f"wait for at most {WAIT_IDS_MAX} tasks at once")
        for task_id in task_ids:
            _check_id(task_id)
        if len(self._held) + len(task_ids) > HELD_MAX:
            self._hold(set())  # let go of the expired ones first
            if len(self._held) + len(task_ids) > HELD_MAX:
                raise KvError("overloaded", f"{HELD_MAX} tasks are waited on through this "
                              "node; wait through another node or later")
        found: dict[bytes, TaskState | None] = {}
        wanted: set[bytes] = set(task_ids)
        for task_id in wanted:
            recent = self._recent.get(task_id)
            if recent is not None:
                found[task_id] = recent
        if found or not wanted:
            return found
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        results: dict[bytes, TaskState | None] = {}
        for task_id in wanted:
            self._waiters.setdefault(task_id, []).append(future)
        self._wait_results[id(future)] = results
        # A task this node holds, or is about to claim, is finished here: no watch needed
        # (if it ends elsewhere after all, ``_drop``/``_unfresh`` open one then).
        self._hold({task_id for task_id in wanted if not self._ends_here(task_id)})
        try:
            # A watch reads its key when it opens: a task finished before is delivered too.
            await asyncio.wait_for(asyncio.shield(future), timeout_s)
            if len(results) < len(wanted):
                # Others are likely finishing too: answer them in this reply rather than
                # in one reply (and one new wait of every id) each.
                await asyncio.sleep(WAIT_GATHER_S)
        except TimeoutError:
            # Nothing finished: some ids may have no task at all (never submitted, or
            # deleted past their TTL); read a few, so a waiter learns of them in time.
            for task_id in random.sample(sorted(wanted),
                                         min(MISSING_CHECKS_PER_WAIT, len(wanted))):
                if await self.status(task_id) is None:
                    results[task_id] = None
        finally:
            linger = time.monotonic() + HOLD_LINGER_S
            for task_id in wanted:
                held = self._held.get(task_id)
                if held is not None:
                    self._held[task_id] = (held[0], linger)
                futures = self._waiters.get(task_id, [])
                with contextlib.suppress(ValueError):
                    futures.remove(future)
                if not futures:
                    self._waiters.pop(task_id, None)
            self._wait_results.pop(id(future), None)
        return results

    # -- results past their TTL ----------------------------------------------------------

    async def _recover_loop(self) -> None:
        loop = asyncio.get_running_loop()
        self._up_seen = frozenset(self._kv._members_up())
        gone: set[str] = set()
        next_pass = loop.time() + RECOVER_CHECK_S  # once at start: we may have restarted
        while True:
            await asyncio.sleep(RECOVER_CHECK_S)
            up = frozenset(self._kv._members_up())
            # Down now, or down for a moment since the last look (the ring keeps members
            # that are down; one that left it for good was decommissioned, nothing lost).
            down = (self._up_seen | set(self._kv.placement.current.nodes)) - up
            gone |= down - self._down_seen
            self._up_seen, self._down_seen = up, frozenset(down)
            if not gone and loop.time() < next_pass:
                continue
            next_pass = loop.time() + RECOVER_INTERVAL_S * random.uniform(0.8, 1.2)
            try:
                await self.recover(gone)
                gone = set()
            except KvError as exc:
                self._warn.warning(f"recover_{exc.code}", "task_recovery_failed",
                                   time.monotonic(), error=str(exc))
            except Exception as exc:  # a bug must not end recovery for good
                self.log.error("task_recovery_crashed", error=repr(exc))

    async def recover(self, gone: set[str] | frozenset[str] = frozenset()) -> int:
        """Index the unfinished tasks of this node's own copies of the task registers that
        no scan might find: held by a member that is not up or whose lease has expired
        (claimed at submit and never indexed), and pending ones submitted through a member
        that is down or in ``gone`` (it may have died between the register and the entry).
        The entry carries the lease, so the task is claimed when it expires; writing it
        twice (every replica does) is harmless. Returns the entries written."""
        cursor: bytes | None = b""
        written = 0
        while cursor is not None:
            wall_ms = int(self._now() * 1000)
            up = set(self._kv._members_up())
            found: builtins.list[tuple[bytes, TaskState]] = []
            tasks, cursor = self._local_tasks(cursor, RECOVER_SLICE)
            for task_id, task in tasks:
                if task.state in FINISHED or task_id in self._running:
                    continue
                if task.state in ("claimed", "running"):
                    lost = (task.holder not in up or task.holder in gone
                            or task.lease_expires_ms + CLOCK_SKEW_MAX_MS < wall_ms)
                else:  # pending: its submitter may have died before writing the entry
                    submitter = task.history[0].node if task.history else ""
                    lost = submitter in gone or submitter not in up
                if lost:
                    found.append((task_id, task))
            for task_id, task in found:
                spec = task.spec
                entry = IndexEntry(task_id, spec.slots, list(spec.tags), task.lease_expires_ms
                                   if task.state in ("claimed", "running") else 0,
                                   task.not_before_ms)
                await self._put_entry(spec.queue, index_sort(spec.priority, task.submitted_ms,
                                                             task_id), entry)
                await self._note_queue(spec.queue)
                written += 1
            await asyncio.sleep(0)  # let the loop serve others between slices
        self._counters["recovered"] += written
        return written

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S * random.uniform(0.5, 1.5))
            try:
                await self.sweep_expired()
            except KvError as exc:
                self._warn.warning(f"sweep_{exc.code}", "task_sweep_failed", time.monotonic(),
                                   error=str(exc))

    async def sweep_expired(self) -> int:
        """Delete finished tasks whose result TTL has passed (``TaskChange("expire")``, which
        the register itself checks). This node reads the task registers of its own store,
        ``SWEEP_KEYS_PER_PASS`` per pass, and expires those it is the first live replica
        of, so each task is swept by one node. Returns how many it deleted."""
        wall_ms = int(self._now() * 1000)
        placement = self._kv.placement
        up = set(self._kv._members_up())
        due: list[bytes] = []
        tasks, cursor = self._local_tasks(self._sweep_cursor, SWEEP_KEYS_PER_PASS)
        for task_id, task in tasks:
            if (task.state not in FINISHED
                    or task.finished_ms + int(task.spec.result_ttl_s * 1000) > wall_ms):
                continue
            replicas = [r for r in placement.current.preference_list(
                token(task_id), TASK_REPLICATION) if r in up]
            if replicas and replicas[0] == self.node:
                due.append(task_id)
        self._sweep_cursor = cursor or b""
        deleted = 0
        for task_id in due:
            outcome = await self._kv.propose(TASK_KEYSPACE_DEF, task_id, b"",
                                             TaskChange("expire", self.node), b"")
            if isinstance(outcome, paxos.Done):
                deleted += 1
                self._recent.pop(task_id, None)
        self._counters["expired"] += deleted
        return deleted

    def _local_tasks(self, start: bytes, limit: int
                     ) -> tuple[builtins.list[tuple[bytes, TaskState]], bytes | None]:
        """This node's own copies of the task registers from store key ``start`` on, at
        most ``limit`` rows read: (task id, state) of those holding a task, and where the
        next slice starts (None: the end was reached)."""
        prefix = paxos.PAXOS_PREFIX + keyspace_prefix(TASK_KEYSPACE)
        out: builtins.list[tuple[bytes, TaskState]] = []
        last = None
        for key, raw in self._kv.store.scan(max(start, prefix), prefix_end(prefix),
                                            limit=limit):
            last = key
            accepted = paxos.decode_state(raw).register
            if accepted is None or accepted.value is None:
                continue
            try:
                task = decode_state(accepted.value)
            except msgspec.DecodeError:
                continue
            out.append((paxos.parse_paxos_key(key)[1], task))
        return out, None if last is None else last + b"\x00"

    def counters(self) -> dict[str, int]:
        names = ("submitted", "claimed", "succeeded", "failed", "retried", "cancelled",
                 "released", "lost", "zombie_results_rejected", "claim_refusals",
                 "stale_entries_deleted", "renewals", "renew_refusals", "expired",
                 "claimed_at_submit", "recovered")
        result = {f"tasks_{name}": self._counters[name] for name in names}
        result["tasks_running"] = len(self._running)
        result["tasks_free_slots"] = self._free()
        return result

    def stats(self) -> dict[str, Any]:
        """For the dashboard: running and free slots here, and per queue the pending tasks
        last seen in scans, running here, and finished through this node by outcome."""
        queues: dict[str, dict[str, int]] = {}
        for queue in sorted(self._queues | {q for q, _ in self._done_by_queue}):
            queues[queue] = {"pending": self._pending_seen.get(queue, 0), "running": 0,
                             **{s: self._done_by_queue[(queue, s)]
                                for s in ("succeeded", "failed", "cancelled")}}
        for run in self._running.values():
            queues.setdefault(run.spec.queue, {"pending": 0, "running": 0})
            queues[run.spec.queue]["running"] += 1
        return {"node": self.node, "slots": self.config.slots, "running": len(self._running),
                "free_slots": self._free(), "claiming": self._claiming,
                "tags": sorted(self.tags), "queues": queues}

    # -- claiming ------------------------------------------------------------------------

    def _drop(self, run: _Run) -> None:
        if self._running.get(run.task_id) is run:
            del self._running[run.task_id]
            self._held_slots -= run.spec.slots
            self._finished_at.append(time.monotonic())
            self._watch_if_waited(run.task_id)  # retrying, lost, handed back

    def _ends_here(self, task_id: bytes) -> bool:
        """Whether this node runs the task, or is about to claim it: its end is then
        learned here without a watch."""
        return task_id in self._running or task_id in self._fresh_ids

    def _watch_if_waited(self, task_id: bytes) -> None:
        """A task waited for here no longer ends here: watch its register to hear of its
        end elsewhere (unless it finished here already)."""
        if (task_id in self._waiters and not self._ends_here(task_id)
                and task_id not in self._recent):
            self._hold({task_id})

    def _free(self) -> int:
        """Slots free now (none reserved or held)."""
        return max(0, self.config.slots - self._reserved - self._held_slots)

    def _room(self) -> int:
        """Slots' worth of tasks this node may still take on: its free slots, plus what it
        finishes in ``prefetch_s`` at its rate over the last ``RATE_WINDOW_S``."""
        now = time.monotonic()
        finished = self._finished_at
        while finished and finished[0] < now - RATE_WINDOW_S:
            finished.popleft()
        ahead = int(len(finished) / RATE_WINDOW_S * self.config.prefetch_s)
        return max(0, self.config.slots + min(ahead, PREFETCH_MAX)
                   - self._reserved - self._held_slots)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()

    async def _claim_loop(self) -> None:
        idle_s = IDLE_S_MIN
        while self._claiming:
            if self._room() <= 0:
                await self._sleep(IDLE_S_MAX)  # a finished task wakes us
                continue
            ceiling = self.config.load_ceiling_pct
            if ceiling < 100 and self._load() >= ceiling:  # 100: no ceiling
                self._counters["load_pauses"] += 1
                await self._sleep(LOAD_WAIT_S)
                continue
            try:
                tried = await self._claim_round()
            except KvError as exc:
                self._warn.warning(f"claim_{exc.code}", "claim_round_failed",
                                   time.monotonic(), error=str(exc))
                tried = 0
            except Exception as exc:  # a bug must not end the node's claiming for good
                self.log.error("claim_round_crashed", error=repr(exc))
                tried = 0
            if tried:
                idle_s = IDLE_S_MIN
                continue
            await self._sleep(idle_s)
            idle_s = min(idle_s * 2, IDLE_S_MAX)

    async def _claim_round(self) -> int:
        """Claim up to the free slots' worth of tasks at once; the number tried."""
        free = min(self._room(), CLAIMS_PER_ROUND)
        picked: builtins.list[_Candidate] = []
        now_ms = int(self._now() * 1000)
        while self._fresh and free > 0:
            candidate = self._fresh.popleft()
            if self._wanted(candidate, now_ms) and candidate.entry.slots <= free:
                picked.append(candidate)
                free -= candidate.entry.slots
            else:  # the index still has it: a scan finds it
                self._unfresh(candidate.entry.task_id)
        if free > 0:
            await self._refill(now_ms)
            keep = []
            for candidate in self._buffer:
                if free > 0 and candidate.entry.slots <= free \
                        and self._wanted(candidate, now_ms):
                    picked.append(candidate)
                    free -= candidate.entry.slots
                elif self._wanted(candidate, now_ms):
                    keep.append(candidate)
            self._buffer = keep
        if not picked:
            return 0
        await asyncio.gather(*(self._claim(c) for c in picked))
        return len(picked)

    def _wanted(self, candidate: _Candidate, now_ms: int) -> bool:
        task_id = candidate.entry.task_id
        if task_id in self._running or self._skip.get(task_id, 0) > now_ms:
            return False
        entry = candidate.entry
        return (claimable(entry, now_ms) and entry.slots <= self.config.slots
                and satisfies(self.tags, entry.tags))

    async def _refill(self, now_ms: int) -> None:
        loop = asyncio.get_running_loop()
        if self._buffer and loop.time() - self._buffer_at < BUFFER_AGE_S_MAX:
            return
        if not self._buffer and loop.time() - self._buffer_at < REFILL_S_MIN:
            return
        await self._refresh_queues()
        home, others = self._shards()
        found = await self._scan_shards(home, now_ms)
        if not found and others:
            start = self._steal_at % len(others)
            self._steal_at = start + STEAL_SHARDS
            found = await self._scan_shards((others + others)[start:start + STEAL_SHARDS],
                                            now_ms)
        found.sort(key=lambda c: c.sort)
        self._buffer = found[:BUFFER_MAX]
        self._buffer_at = loop.time()

    async def _scan_shards(self, shards: builtins.list[bytes], now_ms: int
                           ) -> builtins.list[_Candidate]:
        gate = asyncio.Semaphore(SCANS_IN_FLIGHT)
        pending: collections.Counter[str] = collections.Counter()

        async def scan(key: bytes) -> builtins.list[_Candidate]:
            queue = key.rsplit(b"/", 1)[0].decode()
            async with gate:
                rows, _ = await self._kv.scan(INDEX_KEYSPACE, key, limit=SCAN_ROWS,
                                              consistency=SCAN_CONSISTENCY)
            out = []
            for row in rows:
                try:
                    entry = decode_entry(row.value)
                except msgspec.DecodeError:
                    continue
                pending[queue] += 1
                candidate = _Candidate(queue, row.sort, entry)
                if self._wanted(candidate, now_ms):
                    out.append(candidate)
            return out

        results = await asyncio.gather(*(scan(k) for k in shards), return_exceptions=True)
        found: builtins.list[_Candidate] = []
        for result in results:
            if isinstance(result, BaseException):
                if not isinstance(result, KvError):
                    raise result
                self._warn.warning(f"scan_{result.code}", "index_scan_failed",
                                   time.monotonic(), error=str(result))
                continue
            found.extend(result)
        for queue in {k.rsplit(b"/", 1)[0].decode() for k in shards}:
            self._pending_seen[queue] = pending[queue]
        return found

    def _shards(self) -> tuple[builtins.list[bytes], builtins.list[bytes]]:
        """(the index shards whose first live replica this node is, all the others in a
        shuffled order). A dead node's shards get a home among the live at once."""
        ring = self._kv.placement.current
        queues = frozenset(self._queues)
        up = frozenset(self._kv._members_up())
        if self._home[:3] != (ring, queues, up):
            home: builtins.list[bytes] = []
            others: builtins.list[bytes] = []
            for queue in sorted(queues):
                for shard in range(SHARDS):
                    key = shard_key(queue, shard)
                    live = [n for n in ring.preference_list(token(key), TASK_REPLICATION)
                            if n in up]
                    (home if live[:1] in ([self.node], []) else others).append(key)
            self._rng.shuffle(others)
            self._home = (ring, queues, up, home, others)
        return self._home[3], self._home[4]

    async def _refresh_queues(self) -> None:
        now = time.monotonic()
        if now - self._queues_read_at < QUEUES_REFRESH_S:
            return
        self._queues_read_at = now
        try:
            rows, _ = await self._kv.scan(INDEX_KEYSPACE, QUEUES_PARTITION, limit=QUEUES_MAX,
                                          consistency=SCAN_CONSISTENCY)
        except KvError as exc:
            self._warn.warning("queues", "queue_list_unreadable", now, error=str(exc))
            return
        self._queues.update(row.sort.decode(errors="replace") for row in rows)

    async def _note_queue(self, queue: str) -> None:
        if queue in self._queues_written:
            return
        await self._kv.put(INDEX_KEYSPACE, QUEUES_PARTITION, b"", queue.encode())
        self._queues_written.add(queue)
        self._queues.add(queue)

    async def _claim(self, candidate: _Candidate) -> None:
        try:
            await self._claim_one(candidate)
        finally:
            self._unfresh(candidate.entry.task_id)

    def _unfresh(self, task_id: bytes) -> None:
        """A task submitted here left the way to a local claim: if it does not run here,
        whoever waits for it here needs a watch to hear of its end."""
        if task_id in self._fresh_ids:
            self._fresh_ids.discard(task_id)
            self._watch_if_waited(task_id)

    async def _claim_one(self, candidate: _Candidate) -> None:
        entry = candidate.entry
        task_id = entry.task_id
        self._reserved += entry.slots
        try:
            try:
                outcome = await self._change(
                    task_id, TaskChange("claim", self.node, ttl_ms=self._ttl_ms))
            except KvError as exc:
                # The claim may still have been applied (a timeout, contention): read the
                # task, and run it if it is ours, else its lease would expire unused.
                self._warn.warning(f"claim_{exc.code}", "claim_failed", time.monotonic(),
                                   task=task_id.hex(), error=str(exc))
                self._skip_until(task_id, int(self._now() * 1000) + 1000)
                try:
                    read = await self._kv.propose(TASK_KEYSPACE_DEF, task_id, b"", Read(),
                                                  b"")
                except KvError:
                    return
                assert isinstance(read, paxos.Done), read
                outcome = read
            if isinstance(outcome, paxos.Conflict):
                await self._refused(candidate, outcome)
                return
            state = None if outcome.value is None else decode_state(outcome.value)
        finally:
            self._reserved -= entry.slots
        if state is not None and state.state in FINISHED:
            # Its holder was lost on the last attempt allowed: the claim recorded that
            # failure (or a retried round read back a task finished since).
            self._counters[state.state] += 1
            self._finished_locally(task_id, state)
            await self._delete_entry(candidate.queue, task_id, candidate.sort)
            return
        if state is None or state.state != "claimed" or state.holder != self.node:
            return  # a retried round read back a state that moved on
        self._counters["claimed"] += 1
        self._start(candidate, state)

    def _start(self, candidate: _Candidate, state: TaskState, indexed: bool = True) -> None:
        """Run a task this node has just claimed (its worker waits for free slots)."""
        task_id = candidate.entry.task_id
        run = _Run(task_id, state.spec, candidate.sort, state.token, state.lease_expires_ms,
                   indexed=indexed)
        self._running[task_id] = run
        self._held_slots += run.spec.slots
        loop = asyncio.get_running_loop()
        run.worker = loop.create_task(self._execute(run, candidate))
        if not indexed:
            loop.call_later(INDEX_DELAY_S, self._index_late, run)

    def _index_late(self, run: _Run) -> None:
        """A task claimed at submit is still unfinished: index it (``list`` shows it, and a
        scan finds it once its lease expires if this node dies)."""
        if self._running.get(run.task_id) is not run or run.finishing or run.lost \
                or run.releasing or run.indexed:
            return
        run.indexed = True
        entry = IndexEntry(run.task_id, run.spec.slots, list(run.spec.tags),
                           run.lease_expires_ms)

        async def put() -> None:
            try:
                await self._put_entry(run.spec.queue, run.sort, entry)
            except KvError as exc:
                run.indexed = False  # the next renewal writes it
                self._warn.warning(f"index_{exc.code}", "index_put_failed",
                                   time.monotonic(), task=run.task_id.hex(), error=str(exc))

        self._background(put())

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _takes(self, spec: TaskSpec) -> bool:
        """Whether this node claims a task submitted through it in the submit round."""
        if not self._claiming:
            return False
        if spec.slots > self.config.slots or not satisfies(self.tags, spec.tags):
            return False
        runnable = (self.config.allow_pickle if spec.pickled
                    else module_allowed(spec.function, self.config.modules))
        if not runnable:
            return False
        if spec.slots > self._room():
            return False
        ceiling = self.config.load_ceiling_pct
        return not (ceiling < 100 and self._load() >= ceiling)

    async def _refused(self, candidate: _Candidate, conflict: paxos.Conflict) -> None:
        task_id = candidate.entry.task_id
        self._counters["claim_refusals"] += 1
        state = None if conflict.value is None else decode_state(conflict.value)
        if state is None or state.state in FINISHED:
            # The task finished (or its register is gone): its entry is stale.
            self._counters["stale_entries_deleted"] += 1
            await self._delete_entry(candidate.queue, task_id, candidate.sort)
        elif state.state == "retrying":
            self._skip_until(task_id, state.not_before_ms)
        else:
            self._skip_until(task_id, state.lease_expires_ms)

    def _skip_until(self, task_id: bytes, until_ms: int) -> None:
        if len(self._skip) >= SKIP_MAX:
            now_ms = int(self._now() * 1000)
            self._skip = {k: v for k, v in self._skip.items() if v > now_ms}
            if len(self._skip) >= SKIP_MAX:
                self._skip.clear()
        self._skip[task_id] = until_ms

    # -- running -------------------------------------------------------------------------

    async def _execute(self, run: _Run, candidate: _Candidate) -> None:
        started_ms = int(self._now() * 1000)
        try:
            try:
                outcome = await self._pool.run(run.spec, key=run.task_id)
            except asyncio.CancelledError:
                return  # cancelled, reclaimed or released: nothing to record
            except Exception as exc:
                outcome = TaskOutcome(False, error=f"the worker pool failed: {exc!r}",
                                      started_ms=started_ms)
            if not outcome.started_ms:
                outcome = msgspec.structs.replace(outcome, started_ms=started_ms)
            if run.lost or run.releasing:
                return
            run.finishing = True
            await self._finish(run, candidate, outcome)
        finally:
            if not run.releasing:
                self._drop(run)
            self._wake.set()

    async def _finish(self, run: _Run, candidate: _Candidate, outcome: TaskOutcome) -> None:
        change = TaskChange("finish", self.node, token=run.token, payload=encode(outcome))
        idempotency = os.urandom(16)  # the same on each try: a retry cannot apply twice
        for attempt in range(FINISH_TRIES):
            try:
                result = await self._change(run.task_id, change, idempotency)
                break
            except KvError as exc:
                self._warn.warning(f"finish_{exc.code}", "finish_failed", time.monotonic(),
                                   task=run.task_id.hex(), attempt=attempt + 1,
                                   error=str(exc))
                if int(self._now() * 1000) > run.lease_expires_ms:
                    return  # our lease is over: the task runs again elsewhere
                await asyncio.sleep(0.1 * 2 ** attempt)
        else:
            return
        if isinstance(result, paxos.Conflict):
            self._counters["zombie_results_rejected"] += 1
            self.log.warning("zombie_result_rejected", task=run.task_id.hex(),
                             token=run.token, holder=self.node, reason=result.reason)
            return
        if result.value is None:
            return  # deleted since (its result TTL ran out)
        state = decode_state(result.value)
        if state.state == "retrying":
            self._counters["retried"] += 1
            entry = msgspec.structs.replace(candidate.entry, lease_expires_ms=0,
                                            not_before_ms=state.not_before_ms)
            await self._put_entry(candidate.queue, candidate.sort, entry)
            return
        if state.state not in FINISHED:
            return  # read back after a retry: it moved on (claimed again elsewhere)
        self._counters[state.state] += 1
        self._finished_locally(run.task_id, state)
        if run.indexed:
            await self._delete_entry(candidate.queue, run.task_id, candidate.sort)

    def _hold(self, task_ids: set[bytes]) -> None:
        """Watch these registers, and keep watching them ``HOLD_LINGER_S`` after the wait:
        a client waiting on many tasks calls ``wait`` again for the rest, and a watch
        costs a read and a subscription at every member to open."""
        now = time.monotonic()
        if now >= self._held_swept_at + HOLD_SWEEP_S or not task_ids:
            self._held_swept_at = now
            for task_id, (release, until) in list(self._held.items()):
                if until < now and task_id not in self._waiters:
                    release()
                    del self._held[task_id]
        for task_id in task_ids:
            held = self._held.get(task_id)
            if held is None:
                release = self._kv.watches.hold_key(TASK_KEYSPACE_DEF, task_id)
                self._held[task_id] = (release, float("inf"))
            else:
                self._held[task_id] = (held[0], float("inf"))

    def _finished_locally(self, task_id: bytes, state: TaskState) -> None:
        self._done_by_queue[(state.spec.queue, state.state)] += 1
        self._notify(task_id, state)

    def _remember(self, task_id: bytes, state: TaskState) -> None:
        self._recent[task_id] = state
        self._recent.move_to_end(task_id)
        while len(self._recent) > RECENT_MAX:
            self._recent.popitem(last=False)

    async def _renew_loop(self) -> None:
        period_s = self.config.lease_ttl_s / 3
        while True:
            await asyncio.sleep(period_s)
            runs = [r for r in self._running.values()
                    if not (r.lost or r.releasing or r.finishing)]
            if runs:
                await asyncio.gather(*(self._renew(r) for r in runs))

    async def _renew(self, run: _Run) -> None:
        try:
            outcome = await self._change(
                run.task_id, TaskChange("renew", self.node, token=run.token,
                                        ttl_ms=self._ttl_ms))
        except KvError as exc:
            self._warn.warning(f"renew_{exc.code}", "renew_failed", time.monotonic(),
                               task=run.task_id.hex(), error=str(exc))
            if int(self._now() * 1000) > run.lease_expires_ms:
                self._lose(run, "its lease ran out while renewals failed")
            return
        if run.finishing:
            return
        if isinstance(outcome, paxos.Conflict):
            self._counters["renew_refusals"] += 1
            self._lose(run, outcome.reason)
            return
        assert isinstance(outcome, paxos.Done) and outcome.value is not None, outcome
        self._counters["renewals"] += 1
        state = decode_state(outcome.value)
        run.lease_expires_ms = state.lease_expires_ms
        entry = IndexEntry(run.task_id, run.spec.slots, list(run.spec.tags),
                           state.lease_expires_ms)
        run.indexed = True
        with contextlib.suppress(KvError):
            await self._put_entry(run.spec.queue, run.sort, entry)

    def _lose(self, run: _Run, reason: str) -> None:
        """The task is no longer ours (cancelled, reclaimed): abort its worker."""
        if run.lost or run.finishing:
            return
        run.lost = True
        self._counters["lost"] += 1
        self.log.warning("task_lease_lost", task=run.task_id.hex(), token=run.token,
                         reason=reason)
        if run.worker is not None:
            run.worker.cancel()

    async def _release(self, run: _Run) -> None:
        run.releasing = True
        if run.worker is not None:
            run.worker.cancel()
        try:
            outcome = await self._change(
                run.task_id, TaskChange("release", self.node, token=run.token))
            if isinstance(outcome, paxos.Done):
                self._counters["released"] += 1
                entry = IndexEntry(run.task_id, run.spec.slots, list(run.spec.tags))
                await self._put_entry(run.spec.queue, run.sort, entry)
        except KvError as exc:
            self.log.warning("release_failed", task=run.task_id.hex(), error=str(exc),
                             note="the task runs elsewhere once its lease expires")
        finally:
            self._drop(run)

    # -- index and notifications ---------------------------------------------------------

    async def _change(self, task_id: bytes, change: TaskChange, idempotency: bytes = b""
                      ) -> paxos.Done | paxos.Conflict:
        """One change of a task register. A change applied by an earlier round of the same
        proposal comes back as a duplicate without a value: the value is read then."""
        outcome = await self._kv.propose(TASK_KEYSPACE_DEF, task_id, b"", change, idempotency)
        if isinstance(outcome, paxos.Done) and outcome.duplicate and outcome.value is None:
            read = await self._kv.propose(TASK_KEYSPACE_DEF, task_id, b"", Read(), b"")
            assert isinstance(read, paxos.Done), read
            outcome = paxos.Done(read.version, read.value, True)
        assert isinstance(outcome, paxos.Done | paxos.Conflict), outcome
        return outcome

    async def _put_entry(self, queue: str, sort: bytes, entry: IndexEntry) -> None:
        await self._kv.put(INDEX_KEYSPACE, _shard(queue, entry.task_id), encode(entry), sort)

    async def _delete_entry(self, queue: str, task_id: bytes, sort: bytes) -> None:
        try:
            await self._kv.delete(INDEX_KEYSPACE, _shard(queue, task_id), sort)
        except KvError as exc:
            self._warn.warning(f"index_{exc.code}", "index_delete_failed", time.monotonic(),
                               task=task_id.hex(), error=str(exc))

    def _on_key_changed(self, keyspace: str, partition: bytes, sort: bytes,
                        value: bytes | None) -> None:
        if keyspace != TASK_KEYSPACE or value is None or (
                partition not in self._waiters and partition not in self._held):
            return
        try:
            state = decode_state(value)
        except msgspec.DecodeError:
            return
        if state.state in FINISHED:
            self._notify(partition, state)

    def _notify(self, task_id: bytes, state: TaskState) -> None:
        """A task finished: remember it and wake whoever waits for it here."""
        self._remember(task_id, state)
        for future in self._waiters.get(task_id, []):
            results = self._wait_results.get(id(future))
            if results is not None:
                results[task_id] = state
            if not future.done():
                future.set_result(None)


def _shard(queue: str, task_id: bytes) -> bytes:
    return shard_key(queue, shard_of(task_id))


def _check_id(task_id: bytes) -> None:
    if not 1 <= len(task_id) <= TASK_ID_BYTES_MAX:
        raise KvError("bad_request", f"a task id has 1..{TASK_ID_BYTES_MAX} bytes "
                      f"(got {len(task_id)})")


def _check_queue(queue: str) -> None:
    if not queue or len(queue.encode()) > QUEUE_BYTES_MAX or "/" in queue:
        raise KvError("bad_request", f"a queue name has 1..{QUEUE_BYTES_MAX} bytes and no "
                      f"'/' (got {queue[:80]!r})")


def _checked_spec(spec: TaskSpec) -> TaskSpec:
    """The spec, validated against its declared bounds (a struct built in Python is not)."""
    _check_queue(spec.queue)
    try:
        return decode_spec(encode(spec))
    except msgspec.ValidationError as exc:
        raise KvError("bad_request", f"invalid task: {exc}") from None

