"""Linearizability checking of client histories against a sequential model.

A history is what clients saw: each operation's invocation time and, if the client learned it,
its response and response time. The history is linearizable if every operation can be given
one instant between its invocation and its response (its linearization point) such that the
operations, applied to the model one at a time in that order, produce exactly the responses the
clients saw (Herlihy & Wing 1990).

The search is the one of Wing & Gong (1993) as improved by Lowe ("Testing for linearizability",
2017) and used by Porcupine (Athalye): walk the invocation/response events in time order, try
each pending operation as the next linearization point, backtrack when a response is reached
whose operation could not be placed, and remember every (set of linearized operations, model
state) configuration already explored, because the future of the search depends on nothing
else. Histories over independent keys are checked one key at a time (P-compositionality,
Horn & Kroening 2015): linearizability is local, so a history is linearizable iff each key's
sub-history is, and the search is exponential only in the concurrency of one key.

Indeterminate operations (the client timed out or crashed: the operation may have taken effect
at any time after its invocation, or never) have no response event. They may be linearized
anywhere after their invocation and may also be left out, which is what makes checking
histories with crashes sound, as in Jepsen/Knossos. Their output is unknown: the checker calls
``Model.step`` with ``output=UNKNOWN``. (Not ``None``: ``None`` is a real output, the read of a
register that was never written, and a stale read of "absent" must still be caught.)

Besides the memo, two reductions keep the search small: a completed read-only op (a read, a
cas that answered False) that fits the current state is placed at once without branching
(placing it later is never better), and indeterminate ops are tried only when no completed op
can go next, with a configuration skipped when one with the same completed ops and state but
fewer indeterminate ops spent was already seen (it has every option this one has).

Measured (2 cores, CPython 3.11), one key, 10 clients always busy (10 ops in flight, a tenth of
them 5-10x slower), 2,000 ops: a linearizable history checks in 0.05-0.3 s (30k-220k steps,
~1M steps/s); one with a corrupted read is refuted in 0.05-3 s when nothing is indeterminate.

Limits: the work grows as 2^(ops in flight at one instant) x (model states) per event in the
worst case, and every indeterminate op stays concurrent with everything after it, so refuting a
violation late in a long history with dozens of indeterminate writes can spend the step/time
budget; the result is then ``ok=None`` ("unknown"), never a hang. Check per key, and keep
per-key histories to a few thousand ops. Indeterminate read-only ops are dropped up front.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import math
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, Final, Literal

__all__ = [
    "UNKNOWN",
    "CasRegister",
    "CheckResult",
    "Counter",
    "Event",
    "HistoryRecorder",
    "Model",
    "Op",
    "Unknown",
    "cas_register",
    "check",
    "check_by_key",
    "counter",
    "histories_by_key",
    "history_from_events",
]

STEPS_MAX_DEFAULT: Final = 20_000_000
"""Search steps before giving up with ``ok=None``: roughly a minute of CPU, far beyond what a
healthy per-key history needs (a few steps per operation), and deterministic, unlike time."""
TIMEOUT_S_DEFAULT: Final = 60.0
"""Wall-clock bound as a second guard for models whose step is slow."""
_BUDGET_CHECK_STEPS: Final = 1024
"""How often the search looks at its budget: reading the clock each step would cost ~10 %."""


class Unknown(enum.Enum):
    """The output of an operation whose outcome the client never learned."""

    UNKNOWN = "UNKNOWN"

    def __repr__(self) -> str:
        return "?"


UNKNOWN: Final = Unknown.UNKNOWN
"""Passed to ``Model.step`` as the output of an indeterminate operation: accept any output."""


@dataclasses.dataclass(frozen=True, slots=True)
class Op:
    """One client operation: invoked at ``call``; answered ``output`` at ``ret``.

    ``ret is None`` marks an indeterminate operation (timeout, crash): it may have taken effect
    at any time after ``call``, or never, and its ``output`` is ignored.
    """

    client: int
    kind: str
    input: Any
    output: Any
    call: float
    ret: float | None

    def __post_init__(self) -> None:
        if not math.isfinite(self.call):
            raise ValueError(f"op invocation time must be finite, got {self.call!r}")
        if self.ret is not None and not (math.isfinite(self.ret) and self.ret >= self.call):
            raise ValueError(f"op response time {self.ret!r} must be finite and not before "
                             f"its invocation {self.call!r}; use ret=None for an unknown outcome")

    @property
    def indeterminate(self) -> bool:
        return self.ret is None

    def __str__(self) -> str:
        arg = "" if self.input is None and self.kind == "read" else repr(self.input)
        out = "?" if self.ret is None else repr(self.output)
        end = "inf)" if self.ret is None else f"{self.ret:.6g}]"
        return f"c{self.client} {self.kind}({arg}) -> {out}  [{self.call:.6g}, {end}"


# -- models ---------------------------------------------------------------------------------


class Model(abc.ABC):
    """A sequential specification. States must be hashable (the search memoizes them) and
    are never mutated: ``step`` returns a new state."""

    name: str = "model"
    read_only_kinds: frozenset[str] = frozenset()
    """Kinds that never change the state: indeterminate ones are dropped before the search."""

    def read_only(self, kind: str, output: Any) -> bool:
        """Whether a completed op with this kind and output leaves every state unchanged: the
        search then places it as soon as it fits, without branching."""
        return kind in self.read_only_kinds

    @abc.abstractmethod
    def init(self) -> Hashable:
        """The state before any operation."""

    @abc.abstractmethod
    def step(self, state: Any, kind: str, input: Any, output: Any) -> tuple[bool, Hashable]:
        """Apply one operation: (whether ``output`` is what the model answers, the new state).

        ``output`` is ``UNKNOWN`` for an indeterminate operation: accept any output. Returning
        False for an indeterminate operation that would change nothing is allowed (and prunes
        the search): leaving it out of the linearization has the same effect.
        """


class CasRegister(Model):
    """A register with compare-and-set.

    - ``read``: input ignored; output is the value (``initial``, default None, if never written).
    - ``write``: input is the value; output ignored.
    - ``cas``: input is ``(expected, new)``; output True (it swapped) or False (the value was not
      ``expected``; nothing changed). A cas known to have failed is thus still a constraint.
    """

    name = "cas-register"
    read_only_kinds = frozenset({"read"})

    def __init__(self, initial: Hashable = None) -> None:
        self.initial = initial

    def init(self) -> Hashable:
        return self.initial

    def read_only(self, kind: str, output: Any) -> bool:
        return kind == "read" or (kind == "cas" and output is False)

    def step(self, state: Any, kind: str, input: Any, output: Any) -> tuple[bool, Hashable]:
        if kind == "read":
            return output is UNKNOWN or output == state, state
        if kind == "write":
            return True, input
        if kind == "cas":
            expected, new = input
            if output is UNKNOWN or output is True:
                # An unknown cas that found another value changed nothing: same as leaving it out.
                return state == expected, new
            if output is False:
                return state != expected, state
            raise ValueError(f"cas output must be True or False, got {output!r}")
        raise ValueError(f"cas-register has no operation {kind!r} (read, write, cas)")


class Counter(Model):
    """A counter: ``incr`` adds its input and answers the new value; ``read`` answers it."""

    name = "counter"
    read_only_kinds = frozenset({"read"})

    def __init__(self, initial: int = 0) -> None:
        self.initial = initial

    def init(self) -> Hashable:
        return self.initial

    def step(self, state: Any, kind: str, input: Any, output: Any) -> tuple[bool, Hashable]:
        if kind == "read":
            return output is UNKNOWN or output == state, state
        if kind == "incr":
            new = state + input
            return output is UNKNOWN or output == new, new
        raise ValueError(f"counter has no operation {kind!r} (read, incr)")


cas_register: Final = CasRegister()
counter: Final = Counter()


# -- recording histories ----------------------------------------------------------------------


class HistoryRecorder:
    """Builds a history while a simulation runs, one operation handle at a time.

    ``invoke`` returns a handle; complete it with ``ok`` (the outcome is known), ``fail`` (it
    definitely did not take effect: it is dropped, as Jepsen does) or ``info`` (unknown: it may
    or may not have taken effect). A handle never completed is indeterminate.
    """

    def __init__(self) -> None:
        self._calls: list[tuple[int, str, Any, float, Hashable]] = []
        self._ends: dict[int, tuple[Any, float] | None] = {}
        """handle -> (output, response time), or None for fail; absent: indeterminate."""
        self._info: set[int] = set()

    def invoke(self, client: int, kind: str, input: Any, now: float,
               key: Hashable = None) -> int:
        self._calls.append((client, kind, input, now, key))
        return len(self._calls) - 1

    def ok(self, handle: int, output: Any, now: float) -> None:
        self._complete(handle, (output, now), now)

    def fail(self, handle: int, now: float) -> None:
        self._complete(handle, None, now)

    def info(self, handle: int, now: float) -> None:
        self._complete(handle, None, now)
        del self._ends[handle]
        self._info.add(handle)

    def _complete(self, handle: int, end: tuple[Any, float] | None, now: float) -> None:
        if not 0 <= handle < len(self._calls):
            raise ValueError(f"no operation was invoked with handle {handle}")
        if handle in self._ends or handle in self._info:
            raise ValueError(f"operation {handle} ({self._calls[handle][1]}) completed twice")
        if now < self._calls[handle][3]:
            raise ValueError(f"operation {handle} completed at {now} before its invocation "
                             f"at {self._calls[handle][3]}")
        self._ends[handle] = end

    def by_key(self) -> dict[Hashable, list[Op]]:
        """The operations grouped by key, in invocation order; failed ones left out."""
        out: dict[Hashable, list[Op]] = {}
        for handle, (client, kind, input, call, key) in enumerate(self._calls):
            if handle in self._ends:
                end = self._ends[handle]
                if end is None:
                    continue
                op = Op(client, kind, input, end[0], call, end[1])
            else:
                op = Op(client, kind, input, None, call, None)
            out.setdefault(key, []).append(op)
        return out

    def history(self) -> list[Op]:
        """All operations, whatever their key, in invocation order."""
        ops = [op for ops in self.by_key().values() for op in ops]
        ops.sort(key=lambda op: op.call)
        return ops


@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    """One line of a Jepsen-style history: ``invoke`` carries the input, ``ok`` the output;
    ``fail`` means it did not happen, ``info`` that nobody knows. A completion belongs to the
    pending invocation of the same client; a client invoked again only after completion."""

    type: Literal["invoke", "ok", "fail", "info"]
    client: int
    kind: str
    value: Any
    time: float
    key: Hashable = None


def _record(events: Iterable[Event]) -> HistoryRecorder:
    recorder = HistoryRecorder()
    pending: dict[int, int] = {}
    for event in events:
        if event.type == "invoke":
            if event.client in pending:
                raise ValueError(f"client {event.client} invoked {event.kind} at {event.time} "
                                 f"while its previous operation is pending")
            pending[event.client] = recorder.invoke(event.client, event.kind, event.value,
                                                    event.time, event.key)
            continue
        handle = pending.pop(event.client, None)
        if handle is None:
            raise ValueError(f"{event.type} of client {event.client} at {event.time} "
                             f"matches no pending invocation")
        if event.type == "ok":
            recorder.ok(handle, event.value, event.time)
        elif event.type == "fail":
            recorder.fail(handle, event.time)
        elif event.type == "info":
            recorder.info(handle, event.time)
        else:
            raise ValueError(f"unknown event type {event.type!r} (invoke, ok, fail, info)")
    return recorder


def history_from_events(events: Iterable[Event]) -> list[Op]:
    """The operations of a Jepsen-style event stream (all keys together)."""
    return _record(events).history()


def histories_by_key(events: Iterable[Event]) -> dict[Hashable, list[Op]]:
    """The operations of a Jepsen-style event stream, one history per ``Event.key``."""
    return _record(events).by_key()


# -- results ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """The verdict. ``ok``: True linearizable, False not, None unknown (budget spent)."""

    ok: bool | None
    linearization: tuple[Op, ...] = ()
    """ok True: a witness order (indeterminate ops not in it never took effect).
    Otherwise: the longest linearizable prefix the search found."""
    state: Any = None
    """The model state after ``linearization``."""
    unplaced: tuple[Op, ...] = ()
    """ok False: after that prefix, the ops that could go next (invoked before the earliest
    pending response); none of them led anywhere."""
    rejected: tuple[Op, ...] = ()
    """The subset of ``unplaced`` whose output the model refuses in ``state``."""
    blocking: Op | None = None
    """ok False: the completed op whose response came before it could be placed."""
    key: Hashable = None
    """check_by_key: the key whose history failed (or was not decided)."""
    ops: int = 0
    steps: int = 0
    reason: str = ""

    def explain(self, tail: int = 10) -> str:
        """A readable account: the verdict, and for a failure where the search got stuck."""
        where = "" if self.key is None else f" (key {self.key!r})"
        if self.ok:
            return f"linearizable{where}: {self.ops} ops, {self.steps} search steps"
        lines = [f"{'NOT linearizable' if self.ok is False else 'unknown'}{where}: "
                 f"{self.reason}"]
        n = len(self.linearization)
        lines.append(f"longest linearizable prefix: {n} ops, model state after it = "
                     f"{self.state!r}; its last {min(tail, n)}:")
        lines += [f"  {op}" for op in self.linearization[max(0, n - tail):] if tail > 0]
        if self.unplaced:
            lines.append("none of these can go next:")
            for op in self.unplaced:
                why = ("model refuses it in that state" if op in self.rejected
                       else "accepted, but nothing after it works")
                lines.append(f"  {op}   <- {why}")
        if self.blocking is not None:
            lines.append(f"and {self.blocking} must take effect before its response at "
                         f"{self.blocking.ret:.6g}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.explain()


# -- the search -------------------------------------------------------------------------------


@dataclasses.dataclass
class _Budget:
    steps_max: int | None
    deadline: float | None
    clock: Callable[[], float]
    steps: int = 0

    def spend(self, steps: int) -> bool:
        """Count ``steps``; True once the budget is spent."""
        self.steps += steps
        if self.steps_max is not None and self.steps >= self.steps_max:
            return True
        return self.deadline is not None and self.clock() >= self.deadline


def _budget(steps_max: int | None, timeout_s: float | None) -> _Budget:
    clock = time.monotonic
    return _Budget(steps_max, None if timeout_s is None else clock() + timeout_s, clock)


_Alternatives = list[tuple[int, Any]]
"""At a stuck point: (indeterminate op index, state after it) for each one that may go next."""
_FORCED: Final = -2
"""Marks the frame of a read-only op placed as soon as it fit: placing it then is at least as
good as any later point (it changes nothing, and an earlier point only relaxes real-time
constraints), so backtracking skips the alternatives to it."""
_Frame = tuple[int, int, Any, int, int, _Alternatives | None]
"""What a push changed: (entry, index in alternatives, state, completed bits, indeterminate
bits, alternatives). Either a completed op's call entry (alternatives None), or the response
entry the scan was stuck at and which of the alternatives was taken."""


class _Search:
    """One key's search.

    Completed ops' invocations and responses, sorted by time, form a doubly linked list
    (indices are sorted positions; ``head`` and ``tail`` are sentinels) from which a linearized
    op's two entries are lifted, and put back on backtracking. Indeterminate ops have no
    response, so they stay apart in invocation order and are tried only when the scan is stuck
    at a response: then any of them invoked before that response may go next. Trying them last
    makes the search meet each (completed ops, state) first with as few indeterminate ops
    spent as possible, and a configuration is skipped when one with the same completed ops and
    state and a subset of its indeterminate ops was seen: it has every option this one has.
    """

    def __init__(self, ops: Sequence[Op], model: Model) -> None:
        self.ops = ops
        self.model = model
        rows: list[tuple[float, int, int]] = []
        for i, op in enumerate(ops):
            rows.append((op.call, 0, i))
            if op.ret is not None:
                rows.append((op.ret, 1, i))
        # At equal times invocations sort first: such ops count as concurrent (the lenient
        # reading, since simulated clocks make ties common and neither order was observed).
        rows.sort()
        count = len(rows)
        self.head, self.tail = count, count + 1
        self.op_of = [i for _, _, i in rows] + [-1, -1]
        self.is_call = [r == 0 for _, r, _ in rows] + [False, False]
        ret_entry = {i: e for e, (_, r, i) in enumerate(rows) if r == 1}
        self.match = [ret_entry.get(i, -1) if r == 0 else -1 for _, r, i in rows] + [-1, -1]
        self.nxt = [0] * (count + 2)
        self.prv = [0] * (count + 2)
        order = [self.head, *(e for e, (_, _, i) in enumerate(rows) if i in ret_entry),
                 self.tail]
        for a, b in zip(order, order[1:], strict=False):
            self.nxt[a] = b
            self.prv[b] = a
        self.ind_entry = [e for e, (_, r, i) in enumerate(rows) if i not in ret_entry]
        self.ind_op = [self.op_of[e] for e in self.ind_entry]
        self.twin = self._twins()
        self.best: tuple[list[int], Any, list[int], int] | None = None
        """Deepest dead end: (linearized op ids, state, candidate op ids, blocking op id)."""

    def _twins(self) -> list[int]:
        """For each indeterminate op, the previous one with the same kind and input, or -1.
        Twins are interchangeable once both are invoked, so the later one is tried only after
        the earlier one is placed: the search counts them instead of choosing subsets."""
        last: dict[tuple[str, Any], int] = {}
        twin = []
        for j, o in enumerate(self.ind_op):
            op = self.ops[o]
            try:
                twin.append(last.get((op.kind, op.input), -1))
                last[(op.kind, op.input)] = j
            except TypeError:  # an unhashable input has no twin
                twin.append(-1)
        return twin

    def run(self, budget: _Budget) -> CheckResult:
        ops, nxt, prv, match, is_call, op_of = (self.ops, self.nxt, self.prv, self.match,
                                                self.is_call, self.op_of)
        kinds = [op.kind for op in ops]
        inputs = [op.input for op in ops]
        outputs = [UNKNOWN if op.ret is None else op.output for op in ops]
        step = self.model.step
        read_only = [op.ret is not None and self.model.read_only(op.kind, op.output)
                     for op in ops]
        state: Any = self.model.init()
        done = undone = 0  # bits of linearized completed ops, of linearized indeterminate ops
        stack: list[_Frame] = []
        seen: dict[tuple[int, Any], list[int]] = {}
        remaining = sum(1 for op in ops if op.ret is not None)
        steps = 0
        e = nxt[self.head]
        alternatives: _Alternatives | None = None  # set: stuck at response e, trying these
        k = -1
        while remaining:
            steps += 1
            if steps % _BUDGET_CHECK_STEPS == 0 and budget.spend(_BUDGET_CHECK_STEPS):
                return self._result(None, stack, state, steps, "search budget spent")
            dead = False
            if alternatives is None and is_call[e]:
                o = op_of[e]
                fits, after = step(state, kinds[o], inputs[o], outputs[o])
                if fits and _first_visit(seen, done | (1 << o), after, undone):
                    stack.append((e, _FORCED if read_only[o] else -1, state, done, undone, None))
                    state, done = after, done | (1 << o)
                    m = match[e]  # lift e and its response out of the list
                    nxt[prv[e]] = nxt[e]
                    prv[nxt[e]] = prv[e]
                    nxt[prv[m]] = nxt[m]
                    prv[nxt[m]] = prv[m]
                    remaining -= 1
                    e = nxt[self.head]
                    continue
                if not (fits and read_only[o]):
                    e = nxt[e]
                    continue
                dead = True  # the read-only op that must go now leads where we have been
            if not dead:
                if alternatives is None:
                    assert e != self.tail, "a pending completed op always has a response entry"
                    alternatives, k = self._alternatives(e, state, done, undone, seen), -1
                    steps += len(alternatives)
                k += 1
                if k < len(alternatives):
                    j, after = alternatives[k]
                    stack.append((e, k, state, done, undone, alternatives))
                    state, undone = after, undone | (1 << j)
                    e, alternatives = nxt[self.head], None
                    continue
                # Nothing can go before response e: this branch is dead.
                self._dead_end(stack, state, e, undone)
            while True:  # backtrack, past every forced read-only op
                if not stack:
                    budget.spend(steps % _BUDGET_CHECK_STEPS)
                    return self._result(False, [], state, steps, "no linearization exists")
                e, k, state, done, undone, alternatives = stack.pop()
                if alternatives is not None:
                    break
                m = match[e]  # put e and its response back, in reverse order of lifting
                prv[nxt[m]] = m
                nxt[prv[m]] = m
                prv[nxt[e]] = e
                nxt[prv[e]] = e
                remaining += 1
                if k != _FORCED:
                    e = nxt[e]
                    break
        budget.spend(steps % _BUDGET_CHECK_STEPS)
        return self._result(True, stack, state, steps, "")

    def _alternatives(self, response: int, state: Any, done: int, undone: int,
                      seen: dict[tuple[int, Any], list[int]]) -> _Alternatives:
        """The indeterminate ops that may go next when the scan is stuck at ``response``.

        All of them are recorded as seen before any is explored, so that a chain of several
        indeterminate ops that ends where a single one would (two writes: only the last
        counts) is recognized as dominated instead of explored again.
        """
        out: _Alternatives = []
        twin, ops = self.twin, self.ops
        for j, entry in enumerate(self.ind_entry):
            if entry >= response:
                break
            if undone >> j & 1 or (twin[j] >= 0 and not undone >> twin[j] & 1):
                continue
            op = ops[self.ind_op[j]]
            fits, after = self.model.step(state, op.kind, op.input, UNKNOWN)
            if fits and _first_visit(seen, done, after, undone | (1 << j)):
                out.append((j, after))
        return out

    def _frame_op(self, frame: _Frame) -> int:
        alternatives = frame[5]
        if alternatives is None:
            return self.op_of[frame[0]]
        return self.ind_op[alternatives[frame[1]][0]]

    def _dead_end(self, stack: list[_Frame], state: Any, response: int, undone: int) -> None:
        if self.best is not None and len(stack) <= len(self.best[0]):
            return
        candidates: list[int] = []
        e = self.nxt[self.head]
        while e != response:
            if self.is_call[e]:
                candidates.append(self.op_of[e])
            e = self.nxt[e]
        candidates += [o for j, o in enumerate(self.ind_op)
                       if self.ind_entry[j] < response and not undone >> j & 1]
        self.best = ([self._frame_op(f) for f in stack], state, candidates,
                     self.op_of[response])

    def _result(self, ok: bool | None, stack: list[_Frame], state: Any,
                steps: int, reason: str) -> CheckResult:
        ops = self.ops
        if ok or self.best is None:
            return CheckResult(ok, tuple(ops[self._frame_op(f)] for f in stack), state,
                               ops=len(ops), steps=steps, reason=reason)
        prefix, best_state, candidates, blocking = self.best
        rejected = []
        for o in candidates:
            op = ops[o]
            output = UNKNOWN if op.ret is None else op.output
            if not self.model.step(best_state, op.kind, op.input, output)[0]:
                rejected.append(op)
        if ok is False:
            reason = (f"{ops[blocking]} cannot be placed: after the longest linearizable "
                      f"prefix no pending op fits")
        return CheckResult(ok, tuple(ops[o] for o in prefix), best_state,
                           tuple(ops[o] for o in candidates), tuple(rejected), ops[blocking],
                           ops=len(ops), steps=steps, reason=reason)


def _first_visit(seen: dict[tuple[int, Any], list[int]], done: int, state: Any,
                 undone: int) -> bool:
    """Record a configuration; False if it or one that dominates it was seen (same completed
    ops and state, a subset of these indeterminate ops spent: all of this one's options)."""
    key = (done, state)
    spent = seen.get(key)
    if spent is None:
        seen[key] = [undone]
        return True
    for other in spent:
        if other & ~undone == 0:
            return False
    # Keep an antichain: sets that include ``undone`` are now dominated by it.
    spent[:] = [other for other in spent if undone & ~other != 0]
    spent.append(undone)
    return True


def _prepare(history: Sequence[Op], model: Model) -> list[Op]:
    """Drop indeterminate reads: they may be left out, so they can never be what fails."""
    drop = model.read_only_kinds
    return [op for op in history if not (op.ret is None and op.kind in drop)]


def check(history: Sequence[Op], model: Model, *, steps_max: int | None = STEPS_MAX_DEFAULT,
          timeout_s: float | None = TIMEOUT_S_DEFAULT) -> CheckResult:
    """Whether ``history`` (one object, e.g. one key) is linearizable with respect to ``model``.

    Returns ``ok=None`` once ``steps_max`` search steps or ``timeout_s`` seconds are spent
    (None disables either); pass ``timeout_s=None`` for a verdict that depends on the seed only.
    """
    budget = _budget(steps_max, timeout_s)
    return _Search(_prepare(history, model), model).run(budget)


def check_by_key(histories_by_key: Mapping[Hashable, Sequence[Op]], model: Model, *,
                 steps_max: int | None = STEPS_MAX_DEFAULT,
                 timeout_s: float | None = TIMEOUT_S_DEFAULT) -> CheckResult:
    """Check each key's history on its own (one budget for all of them).

    The first key found not linearizable decides (False, with that key's explanation);
    otherwise any key left undecided makes the result None; otherwise True.
    """
    budget = _budget(steps_max, timeout_s)
    ops = 0
    keys = list(histories_by_key)
    for done, key in enumerate(keys):
        result = dataclasses.replace(
            _Search(_prepare(histories_by_key[key], model), model).run(budget), key=key)
        ops += result.ops
        if result.ok is False:
            return result
        if result.ok is None:
            # The budget is shared, so nothing more can be checked.
            return dataclasses.replace(
                result, steps=budget.steps,
                reason=f"search budget spent on this key; {len(keys) - done - 1} of "
                       f"{len(keys)} keys not checked")
    return CheckResult(True, ops=ops, steps=budget.steps)
