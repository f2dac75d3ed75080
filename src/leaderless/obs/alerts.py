"""Threshold alerts that a node evaluates for itself: rules, their states and a history.

Pure logic, no I/O and no clock: the node reads its inputs (``node_readings``) and calls
``Alerts.evaluate(now, readings)`` every ``alerts.interval_s``; ``now`` is any monotonic
clock in seconds (the node passes its event loop's). Every node evaluates the rules for
itself only, against its own view (``members_dead`` is how many members *this* node sees
dead), so there is no collector to lose: a dead node is seen dead by every survivor.

A rule is ``<metric> <op> <threshold>``, held for ``for_s``, with a severity. Its alert
moves through the states Prometheus uses::

    inactive --condition true--> pending --held for_s--> firing --false--> resolved
    pending --false--> inactive          (it never fired: nothing is recorded)
    inactive --true, for_s == 0--> firing

The condition is tested at each evaluation only, so an alert fires at the first
evaluation at least ``for_s`` after the condition began to hold. An input that is missing
from an evaluation (disk usage the OS does not give, a rate before its second reading, the
KV counters before the data plane started) or is NaN counts as "condition false": a
pending alert goes back to inactive and a firing one resolves, as when a Prometheus
series disappears. Resolved alerts are kept for ``HISTORY_AGE_S_MAX`` and at most
``HISTORY_MAX`` of them, newest first.

The inputs a rule may name are ``INPUTS``: gauges read at each evaluation (``GAUGES``) and
per-second rates (``RATES``) that ``Alerts`` derives from two successive readings of a
counter total (``<base>_per_s`` from the reading ``<base>_total``).

``DEFAULT_RULES`` are what a demanding operator expects with no configuration; each says
why in its description. A configured rule with the name of a default replaces it
(``AlertsConfig.effective_rules``), and ``alerts.defaults = false`` drops them all.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from leaderless.obs.system import SystemSample

# -- bounds, each with its reason --------------------------------------------------------

RULES_MAX: Final = 64
"""Rules one node evaluates (defaults included). Each costs a comparison per evaluation
and an entry in ``/api/alerts``; comprehensive public rule sets for a whole server
(node-exporter's mixin) have about 30, so 64 leaves room without letting a config file
make every evaluation and response unbounded."""

HISTORY_MAX: Final = 100
"""Resolved alerts kept, newest first: enough to see a flapping rule's last hours."""

HISTORY_AGE_S_MAX: Final = 3600.0
"""Resolved alerts older than this (1 h) are dropped: the logs keep the full story."""

NAME_CHARS_MAX: Final = 64
"""A rule name is an identifier in logs and JSON, like a node name (same limit)."""

DESCRIPTION_CHARS_MAX: Final = 512
"""A rule's description (its reason, shown in every alert message)."""

FOR_S_MAX: Final = 86400.0
"""Longest ``for_s``: a condition that must hold more than a day is a report, not an alert."""

INTERVAL_S_DEFAULT: Final = 5.0
"""Evaluate every 5 s: as often as the node refreshes its gossiped load, a fine enough
step for the tens-of-seconds ``for_s`` of the defaults, and negligible CPU."""

INTERVAL_S_MAX: Final = 3600.0

NAME_PATTERN: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

OPS: Final[Mapping[str, Callable[[float, float], bool]]] = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le,
    "==": operator.eq,
}
"""Comparison operators; ``==`` is meant for the 0/1 inputs (``storage_failed``)."""

SEVERITIES: Final = ("warning", "critical")

STATES: Final = ("inactive", "pending", "firing", "resolved")

# -- inputs ------------------------------------------------------------------------------

GAUGES: Final[Mapping[str, str]] = {
    "cpu_pct": "Busy share of all the machine's CPUs, 0-100.",
    "process_cpu_pct": "This node process's CPU use, in percent of one CPU.",
    "memory_used_pct": "Machine memory in use (total minus available), 0-100.",
    "process_rss_bytes": "This node process's resident memory.",
    "disk_used_pct": "Use of the data dir's filesystem as df shows it: used / (used + "
                     "free for an unprivileged user), 0-100; 100 means this node can "
                     "write no more. Missing where the OS does not give it.",
    "disk_free_bytes": "Free space of the data dir's filesystem for an unprivileged "
                       "user. Missing where the OS does not give it.",
    "load_per_cpu": "The machine's 1-minute load average divided by its CPUs.",
    "members_alive": "Members this node sees alive, itself included.",
    "members_suspect": "Members this node suspects (not yet confirmed dead).",
    "members_dead": "Members this node sees dead (kept until they return, or for "
                    "membership.dead_retention_s).",
    "hints_pending": "Hints stored here for down replicas, not yet replayed.",
    "requests_in_flight": "Requests this node coordinates right now.",
    "request_p99_ms": "99th percentile latency of client requests this node served "
                      "over the last 10 s, in ms (0 without requests).",
    "request_ops_per_s": "Client requests this node served per second, last 10 s.",
    "storage_failed": "1 once the node hit a storage error it cannot run with (it then "
                      "stops), else 0.",
}
"""Inputs read as they are at each evaluation."""

RATES: Final[Mapping[str, str]] = {
    "dropped_malformed_per_s": "Network input that failed to decode or validate, per s.",
    "dropped_overload_per_s": "Messages dropped because a queue bound was reached, per s.",
    "send_errors_per_s": "Sends the operating system refused, per s.",
    "request_errors_per_s": "Client requests that failed, per s.",
    "replica_timeouts_per_s": "Coordinated requests that timed out waiting for "
                              "replicas, per s.",
    "unavailable_per_s": "Requests and strong changes refused for too few live "
                         "replicas, per s.",
    "hints_expired_per_s": "Hints dropped for being older than hint_window_s, per s "
                           "(their replica waits for anti-entropy).",
}
"""Inputs derived by ``Alerts`` from two successive readings of ``<base>_total``."""

INPUTS: Final[Mapping[str, str]] = {**GAUGES, **RATES}
"""Every metric a rule may name, with its meaning."""


def total_name(rate: str) -> str:
    """The counter reading a rate input is derived from: ``x_per_s`` -> ``x_total``."""
    return rate.removesuffix("_per_s") + "_total"


def node_readings(*, sample: SystemSample, states: Mapping[str, int],
                  runtime: Mapping[str, Mapping[str, int]], kv: Mapping[str, int] | None,
                  request_p99_ms: float, request_ops_per_s: float,
                  request_errors_total: int, storage_failed: bool) -> dict[str, float]:
    """A node's readings for ``Alerts.evaluate``: every gauge of ``GAUGES`` and the
    counter total behind every rate of ``RATES`` (KV ones only when ``kv`` is given).

    ``states``: members by state name; ``runtime``: ``RuntimeCounters.as_dict()``;
    ``kv``: ``KvNode.counters()`` or None before the data plane started."""
    readings: dict[str, float] = {
        "cpu_pct": sample.cpu_percent,
        "process_cpu_pct": sample.process_cpu_percent,
        "memory_used_pct": sample.memory_used_pct,
        "process_rss_bytes": sample.process_rss_bytes,
        "load_per_cpu": sample.load_1m / max(1, sample.cpu_count),
        "members_alive": states.get("alive", 0),
        "members_suspect": states.get("suspect", 0),
        "members_dead": states.get("dead", 0),
        "request_p99_ms": request_p99_ms,
        "request_ops_per_s": request_ops_per_s,
        "storage_failed": 1.0 if storage_failed else 0.0,
        "request_errors_total": request_errors_total,
    }
    if sample.disk_usage_available and sample.disk_used_bytes + sample.disk_free_bytes > 0:
        readings["disk_used_pct"] = sample.disk_used_pct
        readings["disk_free_bytes"] = sample.disk_free_bytes
    for group in ("dropped_malformed_total", "dropped_overload_total", "send_errors_total"):
        readings[group] = sum(runtime.get(group, {}).values())
    if kv is not None:
        readings["hints_pending"] = kv.get("hints_pending", 0)
        readings["requests_in_flight"] = kv.get("in_flight", 0)
        readings["replica_timeouts_total"] = kv.get("coordinator_timeouts", 0)
        readings["unavailable_total"] = (kv.get("coordinator_unavailable", 0)
                                         + kv.get("proposer_unavailable", 0))
        readings["hints_expired_total"] = kv.get("handoff_expired", 0)
    return readings


# -- rules -------------------------------------------------------------------------------


class RuleError(ValueError):
    """A rule is invalid; the message names the rule and the field and says why."""

    def __init__(self, message: str, field: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.field = field
        self.reason = reason


RULE_FIELDS: Final = ("name", "metric", "op", "threshold", "for_s", "severity", "description")
RULE_FIELDS_REQUIRED: Final = ("name", "metric", "op", "threshold")


@dataclasses.dataclass(frozen=True, slots=True)
class Rule:
    """``metric op threshold`` held for ``for_s`` seconds fires an alert of ``severity``."""

    name: str
    metric: str
    op: str
    threshold: float
    for_s: float = 0.0
    severity: str = "warning"
    description: str = ""

    def __post_init__(self) -> None:
        problem = _rule_problem(self)
        if problem is not None:
            field, reason = problem
            raise RuleError(f"rule {self.name!r}: {field}: {reason}", field, reason)
        # Plain floats whatever the literal (90 or 90.0), so the JSON and logs agree.
        object.__setattr__(self, "threshold", float(self.threshold))
        object.__setattr__(self, "for_s", float(self.for_s))

    def holds(self, value: float | None) -> bool:
        """Whether the condition holds for ``value`` (None or NaN: missing, so no)."""
        if value is None or math.isnan(value):
            return False
        return OPS[self.op](value, self.threshold)

    def condition(self) -> str:
        return f"{self.metric} {self.op} {self.threshold:g}"

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _rule_problem(rule: Rule) -> tuple[str, str] | None:
    """(field, reason) for the first invalid field of ``rule``, or None."""
    if not isinstance(rule.name, str) or not NAME_PATTERN.match(rule.name):
        return "name", ("must start with a letter or digit and use only "
                        "A-Z a-z 0-9 . _ -")
    if len(rule.name) > NAME_CHARS_MAX:
        return "name", f"is longer than {NAME_CHARS_MAX} characters"
    if not isinstance(rule.metric, str) or rule.metric not in INPUTS:
        return "metric", f"{rule.metric!r} is not an input; known: {', '.join(INPUTS)}"
    if not isinstance(rule.op, str) or rule.op not in OPS:
        return "op", f"{rule.op!r} must be one of {', '.join(OPS)}"
    if not _is_number(rule.threshold) or not math.isfinite(rule.threshold):
        return "threshold", f"{rule.threshold!r} must be a finite number"
    if not _is_number(rule.for_s) or not 0 <= rule.for_s <= FOR_S_MAX:
        return "for_s", f"{rule.for_s!r} must be a number of seconds in [0, {FOR_S_MAX:g}]"
    if not isinstance(rule.severity, str) or rule.severity not in SEVERITIES:
        return "severity", f"{rule.severity!r} must be one of {', '.join(SEVERITIES)}"
    if not isinstance(rule.description, str) or len(rule.description) > DESCRIPTION_CHARS_MAX:
        return "description", f"must be text of at most {DESCRIPTION_CHARS_MAX} characters"
    return None


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def parse_rule(raw: Any, index: int) -> Rule:
    """One ``[[alerts.rules]]`` table (``index`` counts from 1) -> Rule, or RuleError
    naming the rule (by number and name) and the field."""
    if not isinstance(raw, Mapping):
        raise RuleError(f"rule {index}: must be a table with {', '.join(RULE_FIELDS)}")
    label = f"rule {index}" + (f" {raw['name']!r}" if isinstance(raw.get("name"), str) else "")
    unknown = [str(k) for k in raw if k not in RULE_FIELDS]
    if unknown:
        raise RuleError(f"{label}: unknown field {unknown[0]!r}; known: "
                        f"{', '.join(RULE_FIELDS)}")
    missing = [f for f in RULE_FIELDS_REQUIRED if f not in raw]
    if missing:
        raise RuleError(f"{label}: {missing[0]} is required")
    values = {str(k): v for k, v in raw.items()}
    if isinstance(values.get("severity"), str):
        values["severity"] = values["severity"].lower()
    try:
        return Rule(**values)
    except RuleError as exc:
        # Labelled with the rule's number too: the name itself may be what is wrong.
        raise RuleError(f"{label}: {exc.field}: {exc.reason}", exc.field,
                        exc.reason) from None


def parse_rules(raw: Any) -> tuple[Rule, ...]:
    """The ``[[alerts.rules]]`` array -> rules, each valid and every name unique."""
    if not isinstance(raw, list | tuple):
        raise RuleError("must be an array of tables ([[alerts.rules]] in the TOML file)")
    if len(raw) > RULES_MAX:
        raise RuleError(f"has {len(raw)} rules; at most {RULES_MAX} are allowed")
    rules: list[Rule] = []
    for index, item in enumerate(raw, start=1):
        rule = parse_rule(item, index)
        if any(r.name == rule.name for r in rules):
            raise RuleError(f"rule {index} {rule.name!r}: name: another rule already "
                            "has this name")
        rules.append(rule)
    return tuple(rules)


DEFAULT_RULES: Final[tuple[Rule, ...]] = (
    Rule("disk_critical", "disk_used_pct", ">", 90, 60, "critical",
         "The data dir's filesystem is over 90 % full. The storage engine needs free "
         "space to compact (a compaction may briefly need as much again as the files it "
         "merges); a full disk fails a write and the node stops. 60 s ignores a "
         "compaction's temporary files."),
    Rule("disk_warning", "disk_used_pct", ">", 80, 300, "warning",
         "The data dir's filesystem is over 80 % full: add capacity or delete data while "
         "it is not urgent. 5 min, because disk use moves slowly and a burst is not a "
         "trend."),
    Rule("member_dead", "members_dead", ">", 0, 30, "critical",
         "A member is dead: every key it replicated has one replica less, its writes "
         "become hints, and one more failure among those replicas makes QUORUM "
         "unavailable. 30 s lets a restarted node come back first; a node removed for "
         "good should leave rather than die."),
    Rule("hints_backlog", "hints_pending", ">", 10_000, 60, "warning",
         "Over 10,000 hints wait here for down replicas: a long outage or a replica "
         "that cannot keep up. Replayed when it returns; past hint_window_s they expire "
         "and only anti-entropy repairs the replica."),
    Rule("request_latency", "request_p99_ms", ">", 500, 60, "warning",
         "The 99th percentile of client requests served here is over 500 ms (a few ms "
         "is normal on a LAN): clients time out and retry. 60 s ignores a pause or a "
         "short compaction stall."),
    Rule("memory_critical", "memory_used_pct", ">", 90, 60, "critical",
         "Over 90 % of the machine's memory is in use: the kernel evicts the page cache "
         "the storage engine reads from, then the OOM killer ends a process, likely "
         "this one."),
    Rule("malformed_input", "dropped_malformed_per_s", ">", 1, 120, "warning",
         "A healthy cluster sends no malformed messages: a steady stream means a node of "
         "another version or cluster, a client on the wrong port, or a scanner."),
)
"""The rules a node evaluates when its config says nothing (``alerts.defaults = true``)."""


@dataclasses.dataclass(frozen=True)
class AlertsConfig:
    """The ``[alerts]`` table of a node's config."""

    defaults: bool = True
    """Keep ``DEFAULT_RULES`` (a configured rule with a default's name replaces it)."""
    rules: tuple[Rule, ...] = ()
    """Configured rules, in file order."""
    interval_s: float = INTERVAL_S_DEFAULT

    def __post_init__(self) -> None:
        count = len(self.effective_rules())
        if count > RULES_MAX:
            raise RuleError(f"{len(self.rules)} rules and the default rules make {count}; "
                            f"at most {RULES_MAX} are allowed (drop some, or set "
                            "alerts.defaults = false)")
        if not 0 < self.interval_s <= INTERVAL_S_MAX:
            raise RuleError(f"interval_s must be in (0, {INTERVAL_S_MAX:g}]")

    def effective_rules(self) -> tuple[Rule, ...]:
        """The rules to evaluate: the defaults not replaced by name, then the configured."""
        configured = {r.name for r in self.rules}
        kept = [r for r in DEFAULT_RULES if r.name not in configured] if self.defaults else []
        return (*kept, *self.rules)


# -- evaluation --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Transition:
    """An alert changed state at ``now`` (to ``pending``, ``firing``, ``resolved`` or
    back to ``inactive`` from pending)."""

    rule: Rule
    state: str
    value: float | None
    now: float


@dataclasses.dataclass(slots=True)
class _Active:
    """A rule whose condition holds: pending, or firing since ``fired_at``."""

    since: float
    """When the condition began to hold."""
    value: float | None
    fired_at: float | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class _Resolved:
    rule: Rule
    value: float | None
    fired_at: float
    resolved_at: float


class Alerts:
    """Evaluates ``rules`` against readings, keeping each rule's state and the resolved
    alerts of the last ``history_age_s_max`` (at most ``history_max``)."""

    def __init__(self, rules: Sequence[Rule], *, history_max: int = HISTORY_MAX,
                 history_age_s_max: float = HISTORY_AGE_S_MAX) -> None:
        names = [r.name for r in rules]
        if len(set(names)) != len(names):
            raise RuleError("two rules have the same name")
        if len(rules) > RULES_MAX:
            raise RuleError(f"{len(rules)} rules; at most {RULES_MAX} are allowed")
        assert history_max >= 0 and history_age_s_max >= 0
        self.rules: tuple[Rule, ...] = tuple(rules)
        self._active: dict[str, _Active] = {}
        self._history: deque[_Resolved] = deque(maxlen=history_max)
        self._history_age_s_max = history_age_s_max
        self._totals: dict[str, float] = {}
        self._totals_at: float | None = None
        self._inputs: dict[str, float] = {}

    def evaluate(self, now: float, readings: Mapping[str, float]) -> list[Transition]:
        """Test every rule against ``readings`` (gauges by input name, counters as
        ``<base>_total``) at ``now``; return the state changes, in rule order."""
        inputs = self._derive(now, readings)
        self._inputs = inputs
        transitions: list[Transition] = []
        resolved: list[_Resolved] = []
        for rule in self.rules:
            transition = self._step(rule, now, inputs.get(rule.metric), resolved)
            if transition is not None:
                transitions.append(transition)
        self._history.extendleft(reversed(resolved))  # newest first, rule order within
        self._expire(now)
        return transitions

    def _derive(self, now: float, readings: Mapping[str, float]) -> dict[str, float]:
        """Gauges as read, plus each rate from this and the previous counter total (none
        on the first evaluation, when time did not move, or when a counter went down)."""
        inputs = {k: float(v) for k, v in readings.items() if k in GAUGES}
        previous, previous_at = self._totals, self._totals_at
        totals = {total_name(r): float(readings[total_name(r)]) for r in RATES
                  if total_name(r) in readings}
        if previous_at is not None and now > previous_at:
            for rate in RATES:
                name = total_name(rate)
                if name in totals and name in previous and totals[name] >= previous[name]:
                    inputs[rate] = (totals[name] - previous[name]) / (now - previous_at)
        self._totals, self._totals_at = totals, now
        return inputs

    def _step(self, rule: Rule, now: float, value: float | None,
              resolved: list[_Resolved]) -> Transition | None:
        active = self._active.get(rule.name)
        if not rule.holds(value):
            if active is None:
                return None
            del self._active[rule.name]
            if active.fired_at is None:
                return Transition(rule, "inactive", value, now)
            resolved.append(_Resolved(rule, value, active.fired_at, now))
            return Transition(rule, "resolved", value, now)
        if active is None:
            active = self._active[rule.name] = _Active(since=now, value=value)
            if rule.for_s > 0:
                return Transition(rule, "pending", value, now)
        active.value = value
        if active.fired_at is None and now - active.since >= rule.for_s:
            active.fired_at = now
            return Transition(rule, "firing", value, now)
        return None

    def _expire(self, now: float) -> None:
        while self._history and now - self._history[-1].resolved_at > self._history_age_s_max:
            self._history.pop()

    def state(self, name: str) -> str:
        """``inactive``, ``pending`` or ``firing`` (the current state of rule ``name``)."""
        active = self._active.get(name)
        if active is None:
            return "inactive"
        return "pending" if active.fired_at is None else "firing"

    def inputs(self) -> dict[str, float]:
        """The inputs of the last evaluation (rates included)."""
        return dict(self._inputs)

    def alerts(self, now: float, wall_offset_s: float = 0.0) -> list[dict[str, Any]]:
        """Firing (critical first), pending, then resolved alerts (newest first), as
        ``{"name", "severity", "state", "metric", "value", "threshold", "op", "since",
        "message"}``. ``since`` is when the alert entered its state, as ``now``-clock
        seconds plus ``wall_offset_s`` (pass unix time minus ``now`` for unix time)."""
        firing: list[dict[str, Any]] = []
        pending: list[dict[str, Any]] = []
        for rule in self.rules:
            active = self._active.get(rule.name)
            if active is None:
                continue
            if active.fired_at is None:
                message = (f"{_reading(rule, active.value)} for {now - active.since:.0f} s "
                           f"(fires after {rule.for_s:g} s)")
                pending.append(_alert(rule, "pending", active.value,
                                      active.since + wall_offset_s, message))
            else:
                message = f"{_reading(rule, active.value)} for {now - active.since:.0f} s"
                firing.append(_alert(rule, "firing", active.value,
                                     active.fired_at + wall_offset_s, message))
        firing.sort(key=lambda a: SEVERITIES.index(a["severity"]), reverse=True)
        resolved = [
            _alert(r.rule, "resolved", r.value, r.resolved_at + wall_offset_s,
                   f"resolved: {r.rule.metric} = {_number(r.value)}, no longer "
                   f"{r.rule.op} {r.rule.threshold:g} (fired for "
                   f"{r.resolved_at - r.fired_at:.0f} s)")
            for r in self._history if now - r.resolved_at <= self._history_age_s_max]
        return firing + pending + resolved


def _number(value: float | None) -> str:
    return "missing" if value is None else f"{value:g}"


def _reading(rule: Rule, value: float | None) -> str:
    return f"{rule.metric} = {_number(value)} {rule.op} {rule.threshold:g}"


def _alert(rule: Rule, state: str, value: float | None, since: float,
           message: str) -> dict[str, Any]:
    if rule.description:
        message = f"{message}: {rule.description}"
    return {"name": rule.name, "severity": rule.severity, "state": state,
            "metric": rule.metric, "value": value, "threshold": rule.threshold,
            "op": rule.op, "since": round(since, 3), "message": message}
