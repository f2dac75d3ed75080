"""Checkers: from a recorded history (``chaos.history``) to a verdict.

Each checker is a pure function of the history and returns a result dict:

- ``valid``: False when the history shows the store broke its promise;
- ``anomalies``: what was wrong, one readable string each (empty when valid);
- ``counts``: ``{"ok", "failed", "indeterminate"}`` over the workload's operations (not the
  harness's final reads);
- ``lost_acknowledged_writes``: acknowledged writes the store no longer has (set, counter;
  0 for the others), and the workload's own details (per-key verdicts, lists of lost or
  unexpected elements, ...).

What each one checks, and why that is exactly what the store promises:

- **register** (strong keyspace: read, write, cas on a few keys): each key's history is
  linearizable against a compare-and-set register (``sim.linearizability``, Wing & Gong /
  Lowe search; keys are independent, so each is checked alone). A key whose search spent
  its budget is ``unknown``: not counted as invalid, but listed in ``unknown_keys``.
- **set** (eventual keyspace, unique adds at QUORUM, one read of every element after
  healing): every acknowledged add is present (else *lost*); no add that surely failed is
  present (else *unexpected*); indeterminate adds may be either (how many came back is
  reported). Elements the final read could not read make the run invalid: nothing can be
  said about them.
- **counter** (strong keyspace ``incr``): the final value lies between the sum of the
  acknowledged increments and that sum plus every indeterminate one (below: increments
  were lost); and the whole history, with each increment's answered new value, is
  linearizable against a counter (``unknown`` when the search budget is spent).
- **lock** (leases with fencing tokens): ``sim.lock_check`` on the history as the test
  process saw it: no token granted to two owners, tokens never go back in real time, no
  other owner's grant completes while an earlier lease is still safe (from its grant's
  response until ``invoked + ttl - clock skew bound``, or until its release was sent),
  fenced writes never go back, and the data key ends with the newest fenced write.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from leaderless.chaos.history import FINAL_PROCESS, Entry, History, Operation, operations
from leaderless.core.locks import CLOCK_SKEW_MAX_MS
from leaderless.sim import linearizability as lin
from leaderless.sim import lock_check

__all__ = [
    "CHECKERS",
    "check",
    "check_counter",
    "check_lock",
    "check_register",
    "check_set",
    "counts",
]

Result = dict[str, Any]
REGISTER_STEPS_MAX = 2_000_000
"""Search steps per key (a healthy key needs a few per operation)."""
REGISTER_TIME_S = 60.0
"""Wall-clock budget for all keys together: a run never hangs in its checker."""
CLOCK_RESOLUTION_MS = 1
"""Nodes read their wall clocks in whole milliseconds (as ``client.locks``)."""


def _entries(history: History | Iterable[Entry]) -> list[Entry]:
    return list(history.entries if isinstance(history, History) else history)


def counts(ops: Iterable[Operation]) -> dict[str, int]:
    """ok / failed / indeterminate over the workload's operations (final reads excluded)."""
    out = {"ok": 0, "failed": 0, "indeterminate": 0}
    for op in ops:
        if op.process == FINAL_PROCESS:
            continue
        out[{"ok": "ok", "fail": "failed", "info": "indeterminate"}[op.type]] += 1
    return out


def _result(ops: list[Operation], anomalies: list[str], **extra: Any) -> Result:
    return {"valid": not anomalies, "anomalies": anomalies, "counts": counts(ops),
            "lost_acknowledged_writes": 0, **extra}


# -- register ---------------------------------------------------------------------------------


def _register_value(f: str, value: Any) -> Any:
    if f == "cas" and isinstance(value, list):
        return tuple(value)
    return value


def check_register(history: History | Iterable[Entry], *,
                   steps_max: int = REGISTER_STEPS_MAX,
                   time_s: float = REGISTER_TIME_S) -> Result:
    """Per-key linearizability of read / write / cas against a cas register."""
    entries = [e for e in _entries(history) if e.f in ("read", "write", "cas")]
    ops = operations(entries)
    events = [lin.Event(e.type, e.process, e.f, _register_value(e.f, e.value), e.time, e.key)
              for e in entries]
    by_key = lin.histories_by_key(events)
    verdicts: dict[str, str] = {}
    anomalies: list[str] = []
    deadline = time.monotonic() + time_s
    for key in sorted(by_key, key=str):
        left = deadline - time.monotonic()
        if left <= 0:
            verdicts[str(key)] = "unknown"
            continue
        result = lin.check(by_key[key], lin.cas_register, steps_max=steps_max, timeout_s=left)
        if result.ok is True:
            verdicts[str(key)] = "linearizable"
        elif result.ok is False:
            verdicts[str(key)] = "not linearizable"
            anomalies.append(result.explain())
        else:
            verdicts[str(key)] = "unknown"
    unknown = [k for k, v in verdicts.items() if v == "unknown"]
    return _result(ops, anomalies, keys=verdicts, unknown_keys=unknown)


# -- set ----------------------------------------------------------------------------------------


def check_set(history: History | Iterable[Entry]) -> Result:
    """Every acknowledged add is in the final read; no surely-failed add is."""
    ops = operations(_entries(history))
    adds = [op for op in ops if op.f == "add"]
    finals = [op for op in ops if op.f == "final_read"]
    acked = {op.invoke.value for op in adds if op.type == "ok"}
    failed = {op.invoke.value for op in adds if op.type == "fail"}
    maybe = {op.invoke.value for op in adds if op.type == "info"}
    anomalies: list[str] = []
    if not finals:
        anomalies.append("no final read was made: nothing can be said about the adds")
        return _result(ops, anomalies, acknowledged=len(acked), lost=[], unexpected=[],
                       unacknowledged=len(maybe), recovered=0, unreadable=[])
    final = finals[-1]
    outcome = final.completion.value if final.completion is not None else None
    if not isinstance(outcome, dict):
        outcome = {}
    found = set(outcome.get("found", []))
    unreadable = sorted(set(outcome.get("unreadable", [])))
    if final.type != "ok" or unreadable:
        anomalies.append(f"the final read could not read {len(unreadable)} elements "
                         f"(e.g. {unreadable[:5]}): their presence is unknown")
    lost = sorted(acked - found - set(unreadable))
    unexpected = sorted(found - acked - maybe)
    if lost:
        anomalies.append(f"{len(lost)} acknowledged adds are missing after healing: "
                         f"{lost[:20]}")
    if unexpected:
        what = sorted(found & failed)
        anomalies.append(f"{len(unexpected)} elements present that no add may have written "
                         f"({len(what)} of them from adds that surely failed): "
                         f"{unexpected[:20]}")
    result = _result(ops, anomalies, acknowledged=len(acked), lost=lost,
                     unexpected=unexpected, unacknowledged=len(maybe),
                     recovered=len(maybe & found), unreadable=unreadable)
    result["lost_acknowledged_writes"] = len(lost)
    return result


# -- counter ------------------------------------------------------------------------------------


def check_counter(history: History | Iterable[Entry], *,
                  steps_max: int = REGISTER_STEPS_MAX,
                  time_s: float = REGISTER_TIME_S) -> Result:
    """acknowledged <= final <= acknowledged + indeterminate, and linearizability."""
    entries = [e for e in _entries(history) if e.f in ("incr", "read")]
    ops = operations(entries)
    incrs = [op for op in ops if op.f == "incr"]
    acked = sum(int(op.invoke.value) for op in incrs if op.type == "ok")
    maybe = sum(int(op.invoke.value) for op in incrs if op.type == "info")
    finals = [op for op in ops if op.f == "read" and op.process == FINAL_PROCESS
              and op.type == "ok"]
    anomalies: list[str] = []
    final: int | None = None
    if not finals:
        anomalies.append("no final read succeeded: the counter's value is unknown")
    else:
        assert finals[-1].completion is not None
        final = int(finals[-1].completion.value or 0)
        if final < acked:
            anomalies.append(f"the final value {final} is below the {acked} acknowledged "
                             f"increments: {acked - final} acknowledged increments lost")
        elif final > acked + maybe:
            anomalies.append(f"the final value {final} is above the {acked} acknowledged "
                             f"plus {maybe} indeterminate increments: increments that "
                             "surely failed were applied (or applied twice)")
    events = [lin.Event(e.type, e.process, e.f, e.value, e.time, e.key) for e in entries]
    result = lin.check(lin.history_from_events(events), lin.counter, steps_max=steps_max,
                       timeout_s=time_s)
    verdict = {True: "linearizable", False: "not linearizable", None: "unknown"}[result.ok]
    if result.ok is False:
        anomalies.append(result.explain())
    out = _result(ops, anomalies, acknowledged=acked, indeterminate_sum=maybe,
                  final=final, linearizability=verdict)
    out["lost_acknowledged_writes"] = max(0, acked - final) if final is not None else 0
    return out


# -- lock ---------------------------------------------------------------------------------------


def _lock_history(ops: list[Operation], skew_ms: int) -> lock_check.LockHistory:
    locks: list[lock_check.LockOp] = []
    writes: list[lock_check.WriteOp] = []
    final_value: bytes | None = None
    final_read = False
    margin_ms = skew_ms + CLOCK_RESOLUTION_MS
    for index, op in enumerate(ops):
        given = op.invoke.value or {}
        answer = op.completion.value if op.completion is not None else None
        answer = answer if isinstance(answer, dict) else {}
        done = op.end
        if op.f in ("acquire", "release"):
            status = {"ok": "ok", "info": "info"}.get(op.type, "fail")
            if op.type == "fail" and answer.get("error") in ("lock_held", "lease_lost"):
                status = "conflict"  # refused by the lock's state: not applied
            token = answer.get("token") if op.f == "acquire" else given.get("token")
            ttl_ms = int(given.get("ttl_ms", 0))
            lock_op = lock_check.LockOp(index, op.process, str(given.get("owner", "")), op.f,
                                        op.start, ttl_ms, token, status, done)
            if op.f == "acquire":
                lock_op.valid_until_s = op.start + (ttl_ms - margin_ms) / 1000
                if status == "ok" and token is not None:
                    lock_op.seen = (lock_op.owner, int(token))
            locks.append(lock_op)
        elif op.f == "write":
            status = {"ok": "ok", "info": "info"}.get(op.type, "fail")
            writes.append(lock_check.WriteOp(index, op.process, str(given.get("owner", "")),
                                             int(given.get("token", 0)),
                                             str(given.get("value", "")).encode(), op.start,
                                             status, done))
        elif op.f == "final_read" and op.type == "ok":
            final_read = True
            final_value = None if answer.get("value") is None else str(
                answer["value"]).encode()
    return lock_check.LockHistory(0, locks, writes, final_value=final_value,
                                  final_read=final_read)


def check_lock(history: History | Iterable[Entry], *,
               skew_ms: int = CLOCK_SKEW_MAX_MS) -> Result:
    """Mutual exclusion by the test process's clock, and fencing tokens in grant order."""
    ops = operations(_entries(history))
    lock_history = _lock_history(ops, skew_ms)
    anomalies = [a.removeprefix("seed 0: ")
                 for a in lock_check.check_lock_history(lock_history)]
    grants = lock_check.grants(lock_history)
    return _result(ops, anomalies, grants=len(grants),
                   releases_ok=sum(op.kind == "release" and op.status == "ok"
                                   for op in lock_history.locks),
                   fenced_writes_ok=sum(w.status == "ok" for w in lock_history.writes))


CHECKERS: dict[str, Callable[..., Result]] = {
    "register": check_register,
    "set": check_set,
    "counter": check_counter,
    "lock": check_lock,
}


def check(workload: str, history: History | Iterable[Entry]) -> Result:
    if workload not in CHECKERS:
        raise ValueError(f"no checker for workload {workload!r} ({', '.join(CHECKERS)})")
    return CHECKERS[workload](history)
