"""Tasks without a leader: a task is one strong register, changed only by Paxos rounds.

A task lives in the strong system keyspace ``system_tasks`` (partition key = the task id).
Its register holds a ``TaskState``: what to run (``TaskSpec``), its state, the current
lease (holder node, fencing token, expiry), the transitions so far and the outcome. Every
change is a ``TaskChange`` that the proposer applies to the chosen state (``apply_task``,
called from ``core.paxos.apply_change``), so two nodes can never both claim a task, and a
result is recorded at most once: the first ``finish`` carrying the current token wins; a
late one from a node whose lease expired (a paused "zombie") carries an older token and is
refused (the runtime counts it).

States::

    pending -> claimed -> running -> succeeded | failed | retrying -> claimed ...
    pending | retrying | claimed | running -> cancelled

``submit`` with a lease TTL creates the task already claimed by the submitting node (one
round instead of two: a node with free slots runs what is submitted through it, and such a
task gets an index entry only if it is still unfinished a moment later, see
``runtime.tasks``). ``claim`` grants a lease with token = previous token + 1 to a node if
the task is pending, retrying past its back-off, or claimed/running with an expired lease
(its holder died or paused: the task runs again elsewhere -- execution is at least once).
``start`` records that the worker began. ``renew`` extends the lease. ``finish`` records
the outcome: success, or a failure that is retried (after ``backoff_s * 2**(attempt-1)``)
while attempts remain.
``release`` hands a task back (a node that leaves gracefully). ``cancel`` ends it.
``expire`` deletes a finished task once its result TTL (``spec.result_ttl_s``) has passed.

Discovery: every task not yet finished also has an entry in the eventual keyspace
``system_task_index``, in one of ``SHARDS`` shards (partition ``<queue>/<shard>``), sorted
by priority (highest first) then submission time, whose value (``IndexEntry``) says what the
task needs and until when its current lease runs, so a node scanning a shard can skip the
tasks it cannot or need not claim without reading their registers. The index is a hint;
the register decides.

Time: leases expire by the proposer's wall clock, as lock leases do (``core.locks``): the
clocks of the nodes must agree within ``CLOCK_SKEW_MAX_MS``.
"""

from __future__ import annotations

import struct
from typing import Annotated, Literal

import msgspec
import xxhash

from leaderless.core.locks import CLOCK_SKEW_MAX_MS
from leaderless.core.paxos_messages import TaskChange

__all__ = ["TaskChange"]  # defined with the other Paxos changes; re-exported here

TASK_KEYSPACE = "system_tasks"
TASK_REPLICATION = 3
INDEX_KEYSPACE = "system_task_index"
INDEX_REPLICATION = 3
SHARDS = 64
"""Index shards per queue: enough to spread a queue over the ring's nodes (each node scans
the shards it is the first replica of, then steals from others), few enough that an idle
node finds work in a few scans."""

TASK_ID_BYTES_MAX = 128
FUNCTION_BYTES_MAX = 256
ARGS_BYTES_MAX = 256 * 1024
"""Encoded arguments of one task: larger inputs belong in the KV store (pass their key)."""
RESULT_BYTES_MAX = 256 * 1024
"""A result beyond this is recorded as a failure naming its size (store big outputs in
the KV store and return the key)."""
ERROR_BYTES_MAX = 16 * 1024
"""An error's text with its traceback, cut to this (the end is kept: the raise site)."""
TAGS_MAX = 16
TAG_BYTES_MAX = 64
QUEUE_BYTES_MAX = 64
HISTORY_MAX = 32
"""Transitions kept per task; the first (pending) is always kept, the oldest others go."""
PRIORITY_MAX = 1000
SLOTS_MAX = 64
RETRIES_MAX = 100
TIMEOUT_S_MAX = 7 * 86400.0
RESULT_TTL_S_DEFAULT = 86400.0
LOST_LEASE_RUNS_MAX = 3
"""A task whose holder was lost (its lease expired: the node died or paused) runs again
even past its ``max_retries`` (execution is at least once: a dead node is not the task's
failure), but at most this many extra times: a task that kills every node it runs on is
then recorded as failed."""
LEASE_TTL_MS_DEFAULT = 10_000
"""A running task's lease; its node renews it every third of this. A dead node's tasks
run elsewhere within failure detection plus this."""

State = Literal["pending", "claimed", "running", "succeeded", "failed", "retrying",
                "cancelled"]
FINISHED: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
Text = Annotated[str, msgspec.Meta(max_length=1024)]
Name = Annotated[str, msgspec.Meta(max_length=64)]


class TaskSpec(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True):
    """What to run and how (given at submit, never changed)."""

    function: Annotated[str, msgspec.Meta(min_length=1, max_length=FUNCTION_BYTES_MAX)]
    """A registered name ``module:function``, or a label for a pickled callable."""
    args: Annotated[bytes, msgspec.Meta(max_length=ARGS_BYTES_MAX)] = b""
    """msgpack of ``[args, kwargs]``, or with ``pickled`` cloudpickle of
    ``(callable, args, kwargs)``."""
    pickled: bool = False
    queue: Annotated[str, msgspec.Meta(max_length=QUEUE_BYTES_MAX)] = "default"
    priority: Annotated[int, msgspec.Meta(ge=0, le=PRIORITY_MAX)] = 0
    """Higher runs first within a shard."""
    slots: Annotated[int, msgspec.Meta(ge=1, le=SLOTS_MAX)] = 1
    tags: Annotated[list[Annotated[str, msgspec.Meta(max_length=TAG_BYTES_MAX)]],
                    msgspec.Meta(max_length=TAGS_MAX)] = []
    """Node tags the task needs (a node runs it only if it has every one)."""
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=TIMEOUT_S_MAX)] = 300.0
    max_retries: Annotated[int, msgspec.Meta(ge=0, le=RETRIES_MAX)] = 0
    backoff_s: Annotated[float, msgspec.Meta(ge=0, le=86400.0)] = 1.0
    result_ttl_s: Annotated[float, msgspec.Meta(gt=0, le=366 * 86400.0)] = RESULT_TTL_S_DEFAULT
    submitter: Name = ""
    """The authenticated user who submitted it ("" with auth off)."""


class Transition(msgspec.Struct, frozen=True, array_like=True):
    state: str
    node: Name
    at_ms: int
    note: Text = ""


class TaskState(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True):
    spec: TaskSpec
    state: str = "pending"
    attempt: int = 0
    """Claims so far (the running one included)."""
    holder: Name = ""
    token: int = 0
    """Fencing token of the last claim; only grows."""
    lease_expires_ms: int = 0
    not_before_ms: int = 0
    """A retrying task may be claimed from then on."""
    history: list[Transition] = []
    result: bytes | None = None
    error: str = ""
    submitted_ms: int = 0
    finished_ms: int = 0


class TaskOutcome(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True):
    """What a worker reports (``finish``'s payload)."""

    ok: bool
    result: bytes = b""
    error: str = ""
    started_ms: int = 0
    retryable: bool = True
    """False: fail at once whatever retries remain (e.g. the function is not allowed)."""


class IndexEntry(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True):
    """A task's entry in its index shard (a hint for scanners)."""

    task_id: bytes
    slots: int = 1
    tags: list[str] = []
    lease_expires_ms: int = 0
    """0: not claimed (or claimable again from not_before_ms)."""
    not_before_ms: int = 0


_state_encoder = msgspec.msgpack.Encoder()
_state_decoder = msgspec.msgpack.Decoder(TaskState)
_spec_decoder = msgspec.msgpack.Decoder(TaskSpec)
_outcome_decoder = msgspec.msgpack.Decoder(TaskOutcome)
_entry_decoder = msgspec.msgpack.Decoder(IndexEntry)
_SORT = struct.Struct(">HQ")


def encode(value: TaskState | TaskSpec | TaskOutcome | IndexEntry) -> bytes:
    return _state_encoder.encode(value)


def decode_state(data: bytes) -> TaskState:
    return _state_decoder.decode(data)


def decode_spec(data: bytes) -> TaskSpec:
    return _spec_decoder.decode(data)


def decode_outcome(data: bytes) -> TaskOutcome:
    return _outcome_decoder.decode(data)


def decode_entry(data: bytes) -> IndexEntry:
    return _entry_decoder.decode(data)


def shard_of(task_id: bytes) -> int:
    return xxhash.xxh64_intdigest(task_id, seed=0x7A5C) % SHARDS


def shard_key(queue: str, shard: int) -> bytes:
    """The index partition of ``shard`` of ``queue``."""
    return f"{queue}/{shard:02d}".encode()


def index_sort(priority: int, submitted_ms: int, task_id: bytes) -> bytes:
    """Sort key in a shard: highest priority first, then oldest first."""
    return _SORT.pack(PRIORITY_MAX - priority, submitted_ms) + task_id


class TaskRefused(Exception):
    """A change that does not apply to the task's state; ``reason`` names why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def apply_task(value: bytes | None, change: TaskChange, wall_ms: int) -> bytes | None:
    """The register value after ``change`` (None: the task is deleted), or ``TaskRefused``.
    Deterministic in (value, change, wall_ms): the proposer applies it to the chosen value."""
    if change.kind == "submit":
        if value is not None:
            raise TaskRefused("exists")  # the same id again: the first submission stands
        spec = decode_spec(change.payload)
        task = TaskState(spec, "pending", submitted_ms=wall_ms,
                         history=[Transition("pending", change.node, wall_ms)])
        if change.ttl_ms:  # submitted and claimed by the submitting node in one round
            task = _claim(task, change, wall_ms)
        return encode(task)
    if value is None:
        raise TaskRefused("absent")
    task = decode_state(value)
    if change.kind == "claim":
        return encode(_claim(task, change, wall_ms))
    if change.kind == "expire":
        if task.state not in FINISHED:
            raise TaskRefused(f"not finished ({task.state})")
        if task.finished_ms + int(task.spec.result_ttl_s * 1000) > wall_ms:
            raise TaskRefused("its result is still within its TTL")
        return None  # deleted (a strong tombstone, purged after the grace period)
    if change.kind == "cancel":
        if task.state in FINISHED:
            raise TaskRefused(f"finished ({task.state})")
        return encode(_to(task, "cancelled", change.node, wall_ms, holder="",
                          lease_expires_ms=0, finished_ms=wall_ms))
    # The rest needs the current lease.
    if task.state not in ("claimed", "running") or task.token != change.token \
            or task.holder != change.node:
        raise TaskRefused(f"fenced (token {change.token} of {change.node}; the task is "
                          f"{task.state}, token {task.token} of {task.holder or 'nobody'})")
    if change.kind == "start":
        return encode(_to(task, "running", change.node, wall_ms))
    if change.kind == "renew":
        if task.lease_expires_ms < wall_ms:
            raise TaskRefused("lease expired")
        return encode(msgspec.structs.replace(
            task, lease_expires_ms=wall_ms + change.ttl_ms))
    if change.kind == "release":
        return encode(_to(task, "pending", change.node, wall_ms, holder="",
                          lease_expires_ms=0, attempt=max(0, task.attempt - 1),
                          note="handed back"))
    assert change.kind == "finish"
    outcome = decode_outcome(change.payload)
    if outcome.started_ms and task.state == "claimed":
        task = _to(task, "running", change.node, outcome.started_ms)
    if outcome.ok:
        return encode(_to(task, "succeeded", change.node, wall_ms, holder="",
                          lease_expires_ms=0, result=outcome.result, finished_ms=wall_ms))
    error = outcome.error[-ERROR_BYTES_MAX:]
    if outcome.retryable and task.attempt <= task.spec.max_retries:
        delay_ms = int(task.spec.backoff_s * 1000 * 2 ** max(0, task.attempt - 1))
        return encode(_to(task, "retrying", change.node, wall_ms, holder="",
                          lease_expires_ms=0, error=error, not_before_ms=wall_ms + delay_ms,
                          note=_first_line(error)))
    return encode(_to(task, "failed", change.node, wall_ms, holder="", lease_expires_ms=0,
                      error=error, finished_ms=wall_ms, note=_first_line(error)))


def _claim(task: TaskState, change: TaskChange, wall_ms: int) -> TaskState:
    state = task.state
    if state in FINISHED:
        raise TaskRefused(f"finished ({state})")
    if state in ("claimed", "running"):
        if task.lease_expires_ms >= wall_ms:
            raise TaskRefused(f"held by {task.holder} (token {task.token})")
        if task.attempt > task.spec.max_retries + LOST_LEASE_RUNS_MAX:
            # Its holders were lost on every attempt allowed: stop (a poison task).
            return _to(task, "failed", change.node, wall_ms, holder="", lease_expires_ms=0,
                       finished_ms=wall_ms, error=f"lost its node {task.holder} "
                       f"(lease expired) on attempt {task.attempt}",
                       note=f"lease of {task.holder} expired")
        note = f"lease of {task.holder} expired"
    elif state == "retrying" and task.not_before_ms > wall_ms:
        raise TaskRefused("backing off")
    else:
        note = ""
    return _to(task, "claimed", change.node, wall_ms, holder=change.node,
               token=task.token + 1, attempt=task.attempt + 1,
               lease_expires_ms=wall_ms + change.ttl_ms, note=note)


def _to(task: TaskState, state: str, node: str, at_ms: int, note: str = "",
        **fields: object) -> TaskState:
    history = [*task.history, Transition(state, node, at_ms, note[:1024])]
    if len(history) > HISTORY_MAX:
        history = [history[0], *history[-(HISTORY_MAX - 1):]]
    return msgspec.structs.replace(task, state=state, history=history, **fields)


def _first_line(error: str) -> str:
    lines = [line for line in error.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


def claimable(entry: IndexEntry, wall_ms: int) -> bool:
    """Whether a scanner should try to claim this entry now (by its hint; the register
    decides). A lease counts as expired only past the clock bound, to spare rounds."""
    if entry.lease_expires_ms and entry.lease_expires_ms + CLOCK_SKEW_MAX_MS > wall_ms:
        return False
    return entry.not_before_ms <= wall_ms


def satisfies(node_tags: set[str], needs: list[str]) -> bool:
    return all(tag in node_tags for tag in needs)
