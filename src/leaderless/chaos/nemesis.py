"""The nemesis: seeded, printed schedules of faults injected into a ``ChaosCluster``.

Kinds (``KINDS``):

- ``kill``: SIGKILL of 1..minority nodes, restarted at the end;
- ``pause``: SIGSTOP of 1..minority nodes, SIGCONT at the end; half of the pauses last
  longer than failure detection (``FAILURE_DETECTION_S``), so peers declare the node dead
  and it comes back to find itself so;
- ``partition``: traffic dropped between groups, shape chosen at random: ``halves`` (a
  minority cut from the rest), ``bridge`` (two halves that both see one bridge node),
  ``isolate`` (one node alone); healed at the end;
- ``clock``: one node's wall clock shifted live (``LEADERLESS_FAULT_CLOCK_SKEW_FILE``) by
  ``CLOCK_SKEW_MIN_MS``..``CLOCK_SKEW_FAULT_MAX_MS`` either way, inside the bound the
  system assumes (``core.locks.CLOCK_SKEW_MAX_MS``); set back to 0 at the end;
- ``disk``: one node's data dir (a small tmpfs) filled; a node whose write meets it steps
  out (passive failover, exit status 4, docs/health.md); at the end the disk is freed and
  a node that stepped out (it exited, or its log says ``passive_failover``) restarted.

The schedule (``plan``) is a pure function of the node names, kinds, seed, interval and
duration, computed up front and printed, so a run can be repeated. Every ``interval_s``
(plus up to ``JITTER`` of it) one fault starts, lasting ``FAULT_S`` (pauses sometimes
longer). The cluster can always serve: the nodes impaired at once (killed, paused, disk
full, or cut off from the largest side of a partition — counted until ``RECOVERY_S``
after their fault ended, while they rejoin) never exceed a minority, (n - 1) // 2. One
partition and one clock skew at a time (a second skew could put two clocks
``2 * CLOCK_SKEW_FAULT_MAX_MS`` apart, past the bound); a node carries one fault at a time.

``Nemesis.run`` executes it as an asyncio coroutine, calling the cluster's blocking
methods off the loop (``asyncio.to_thread``), records each fault's start and end with
``time.monotonic()`` (the clock the history uses) in ``faults``, and always ends with
``heal_all`` (also when cancelled or on an error).
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from leaderless.chaos.cluster import ChaosUnsupported
from leaderless.core.locks import CLOCK_SKEW_MAX_MS

KINDS = ("kill", "pause", "partition", "clock", "disk")
SHAPES = ("halves", "bridge", "isolate")

FAULT_S = (2.0, 8.0)
"""How long a fault lasts (uniform), except long pauses."""
FAILURE_DETECTION_S = 5.0
"""Roughly the longest time before peers declare a silent node dead (suspicion 1.2-4.8 s
at n <= 10, docs/benchmarks.md "Membership and failure detection"), and the clients'
I/O timeout (``io_timeout_s`` = 5 s)."""
LONG_PAUSE_S = (FAILURE_DETECTION_S + 1.0, FAILURE_DETECTION_S + 5.0)
SHORT_PAUSE_S = (1.0, 4.0)
LONG_PAUSE_CHANCE = 0.5
MIN_FAULT_S = 1.0
"""A fault is planned only when it can last this long before the run ends."""
JITTER = 0.2
"""Each start is delayed by up to this fraction of the interval."""
RECOVERY_S = 2.0
"""A node whose fault ended still counts as impaired this long (it restarts, rejoins)."""
CLOCK_SKEW_MIN_MS = 100
CLOCK_SKEW_FAULT_MAX_MS = CLOCK_SKEW_MAX_MS * 4 // 5
"""The largest skew the nemesis injects: the system's bound (500 ms) less a margin for
the error of the peers' measurement (half a round trip), so no refusals are expected."""


class Cluster(Protocol):
    """What the nemesis needs of a ``chaos.cluster.ChaosCluster``."""

    @property
    def nodes(self) -> Sequence[Any]: ...  # each with .name
    @property
    def disk_reason(self) -> str | None: ...  # None: fill_disk works
    def kill(self, name: str) -> None: ...
    def restart(self, name: str) -> None: ...
    def pause(self, name: str) -> None: ...
    def resume(self, name: str) -> None: ...
    def partition(self, groups: list[list[str]]) -> None: ...
    def bridge_partition(self, bridge: str | None = None
                         ) -> tuple[list[str], str, list[str]]: ...
    def isolate(self, name: str) -> None: ...
    def heal(self) -> None: ...
    def set_clock_skew(self, name: str, ms: int) -> None: ...
    def fill_disk(self, name: str) -> int: ...
    def free_disk(self, name: str) -> None: ...
    def running(self) -> list[str]: ...


@dataclass(frozen=True)
class PlannedFault:
    """One fault of a schedule: ``kind`` on ``targets`` from ``at_s`` (seconds after the
    run's start) for ``duration_s``. ``detail``: partition ``shape`` and ``groups`` (and
    ``bridge``), clock ``skew_ms``, pause ``long``."""

    kind: str
    at_s: float
    duration_s: float
    targets: tuple[str, ...]
    detail: dict[str, Any] = field(default_factory=dict, compare=True, hash=False)

    @property
    def end_s(self) -> float:
        return self.at_s + self.duration_s

    @property
    def impaired(self) -> frozenset[str]:
        """The nodes this fault keeps from serving with the majority. A bridge partition's
        halves are drawn by the cluster when it starts (``bridge_partition``), so its
        smaller half stands in as placeholders ``?bridge1``.. (its size is known): no other
        impairing fault fits beside it."""
        if self.kind == "clock":
            return frozenset()
        if self.kind == "partition":
            if self.detail["shape"] == "bridge":
                return frozenset(f"?bridge{i + 1}" for i in range(self.detail["cut"]))
            groups = [set(g) for g in self.detail["groups"]]
            largest = max(groups, key=len)
            return frozenset(n for g in groups for n in g) - largest
        return frozenset(self.targets)

    def describe(self) -> str:
        """One line, e.g. ``+12.3s  partition  for 5.1s  bridge n1 | n2 | n3``."""
        what = " ".join(self.targets)
        if self.kind == "partition" and self.detail["shape"] == "bridge":
            what = f"bridge: {self.detail['bridge']} sees both halves of the others"
        elif self.kind == "partition":
            groups = " | ".join(" ".join(g) for g in self.detail["groups"])
            what = f"{self.detail['shape']}: {groups}"
        elif self.kind == "clock":
            what += f" {self.detail['skew_ms']:+d} ms"
        elif self.kind == "pause" and self.detail.get("long"):
            what += " (past failure detection)"
        at = f"+{self.at_s:.1f}s"
        return f"{at:>8}  {self.kind:<9}  for {self.duration_s:4.1f}s  {what}"


def parse_kinds(text: str | Iterable[str]) -> set[str]:
    """``"partition,kill"`` (or an iterable; ``all``: every kind) -> a set of kinds;
    ValueError naming the unknown ones."""
    items = text.split(",") if isinstance(text, str) else list(text)
    kinds = {k.strip() for k in items if k.strip()}
    if "all" in kinds:
        kinds = (kinds - {"all"}) | set(KINDS)
    unknown = sorted(kinds - set(KINDS))
    if unknown or not kinds:
        raise ValueError(f"unknown nemesis kinds {unknown}: choose among {', '.join(KINDS)}"
                         if unknown else f"no nemesis kind given: choose among {KINDS}")
    return kinds


def plan(names: Sequence[str], kinds: Iterable[str], seed: int, interval_s: float,
         duration_s: float) -> list[PlannedFault]:
    """The seeded schedule for a cluster of ``names`` over ``duration_s`` (see the module
    docstring for its rules). Same arguments, same list; a longer duration extends a
    shorter one's list."""
    kinds = sorted(parse_kinds(kinds))
    if interval_s <= 0:
        raise ValueError(f"interval_s must be positive, not {interval_s}")
    names = list(names)
    if len(set(names)) != len(names):
        raise ValueError(f"node names repeat: {names}")
    rng = random.Random(seed)
    minority = (len(names) - 1) // 2
    faults: list[PlannedFault] = []
    k = 1
    while True:
        at_s = round(k * interval_s + rng.uniform(0, JITTER * interval_s), 2)
        k += 1
        if at_s + MIN_FAULT_S > duration_s:
            return faults
        active = [f for f in faults if f.end_s + RECOVERY_S > at_s]
        for kind in rng.sample(kinds, len(kinds)):
            fault = _draw(rng, kind, at_s, names, minority, active)
            if fault is not None:
                lasts_s = round(min(fault.end_s, duration_s) - at_s, 2)
                detail = dict(fault.detail)
                if "long" in detail:  # cut short by the run's end: long only if still so
                    detail["long"] = lasts_s > FAILURE_DETECTION_S
                faults.append(PlannedFault(fault.kind, at_s, lasts_s, fault.targets, detail))
                break


def _draw(rng: random.Random, kind: str, at_s: float, names: list[str], minority: int,
          active: list[PlannedFault]) -> PlannedFault | None:
    """A fault of ``kind`` starting at ``at_s`` that fits beside ``active``, or None."""
    busy = {n for f in active if f.kind != "partition" for n in f.targets}
    free = [n for n in names if n not in busy]
    impaired = frozenset().union(*(f.impaired for f in active))

    def fits(fault: PlannedFault) -> bool:
        return len(impaired | fault.impaired) <= minority

    duration_s = round(rng.uniform(*FAULT_S), 2)
    if kind in ("kill", "pause", "disk"):
        detail: dict[str, Any] = {}
        if kind == "pause":
            detail["long"] = rng.random() < LONG_PAUSE_CHANCE
            duration_s = round(rng.uniform(*(LONG_PAUSE_S if detail["long"]
                                              else SHORT_PAUSE_S)), 2)
        most = 1 if kind == "disk" else minority - len(impaired)
        if most < 1 or not free:
            return None
        count = rng.randint(1, min(most, len(free)))
        fault = PlannedFault(kind, at_s, duration_s, tuple(sorted(rng.sample(free, count))),
                             detail)
        return fault if fits(fault) else None
    if kind == "clock":
        if any(f.kind == "clock" for f in active) or not free:
            return None
        skew_ms = rng.choice((-1, 1)) * rng.randint(CLOCK_SKEW_MIN_MS, CLOCK_SKEW_FAULT_MAX_MS)
        return PlannedFault(kind, at_s, duration_s, (rng.choice(free),), {"skew_ms": skew_ms})
    if kind == "partition":
        if any(f.kind == "partition" for f in active) or minority < 1:
            return None
        for shape in rng.sample(SHAPES, len(SHAPES)):
            cut = _partition(rng, shape, at_s, duration_s, names, minority)
            if cut is not None and fits(cut):
                return cut
        return None
    raise ValueError(f"unknown nemesis kind {kind!r}")


def _partition(rng: random.Random, shape: str, at_s: float, duration_s: float,
               names: list[str], minority: int) -> PlannedFault | None:
    """A partition of ``shape``: its groups, the smaller side(s) first."""
    order = rng.sample(names, len(names))
    if shape == "isolate":
        groups = [[order[0]], sorted(order[1:])]
        return PlannedFault("partition", at_s, duration_s, (order[0],),
                            {"shape": shape, "groups": groups})
    if shape == "halves":
        cut = sorted(order[:minority])
        return PlannedFault("partition", at_s, duration_s, tuple(cut),
                            {"shape": shape, "groups": [cut, sorted(order[minority:])]})
    if len(names) < 3:
        return None
    # The cluster splits the others into halves, the larger first (ChaosCluster.
    # bridge_partition); the smaller one is cut from the majority.
    return PlannedFault("partition", at_s, duration_s, (order[0],),
                        {"shape": shape, "bridge": order[0], "cut": (len(names) - 1) // 2})


def format_schedule(faults: Sequence[PlannedFault], seed: int) -> str:
    """The schedule as printed before a run (one line per fault)."""
    head = f"nemesis schedule (seed {seed}, {len(faults)} faults):"
    return "\n".join([head] + ["  " + f.describe() for f in faults] if faults
                     else [head, "  (none)"])


class Nemesis:
    """Runs a seeded fault schedule against ``cluster`` (see the module docstring)."""

    def __init__(self, cluster: Cluster, kinds: Iterable[str], seed: int,
                 interval_s: float = 10.0, log: Callable[[str], None] = print) -> None:
        self.cluster = cluster
        self.kinds = parse_kinds(kinds)
        self.seed = seed
        self.interval_s = interval_s
        self.log = log
        self.faults: list[dict[str, Any]] = []
        """Every fault injected: kind, targets, start, end (``time.monotonic()``; end None
        while active), detail (the planned detail, plus ``error`` if healing it failed)."""
        self._active: list[tuple[PlannedFault, dict[str, Any]]] = []
        self._log_marks: dict[str, int] = {}  # node -> its log's size when its disk filled
        self._lock = threading.Lock()  # heal_all may run from another thread

    def usable_kinds(self) -> set[str]:
        """The kinds this cluster can inflict: ``disk`` only on harness tmpfs data dirs
        (ChaosUnsupported, with the reason, when nothing is left)."""
        reason = self.cluster.disk_reason
        if "disk" not in self.kinds or not reason:
            return set(self.kinds)
        if self.kinds == {"disk"}:
            raise ChaosUnsupported(f"nemesis disk: {reason}")
        return self.kinds - {"disk"}

    def schedule(self, duration_s: float) -> list[PlannedFault]:
        """The faults a run of ``duration_s`` (from the start of ``run``) will inject, in
        order; without ``disk`` when the cluster cannot fill disks (see ``usable_kinds``)."""
        return plan([n.name for n in self.cluster.nodes], self.usable_kinds(), self.seed,
                    self.interval_s, duration_s)

    async def run(self, duration_s: float) -> list[dict[str, Any]]:
        """Inject the schedule over ``duration_s`` from now, then heal everything (also on
        cancellation or an error); returns ``faults``."""
        if self.kinds != self.usable_kinds():
            self.log(f"nemesis: no disk faults: {self.cluster.disk_reason}")
        t0 = time.monotonic()
        events: list[tuple[float, int, bool, PlannedFault]] = []
        for i, fault in enumerate(self.schedule(duration_s)):
            events.append((fault.at_s, 2 * i + 1, True, fault))
            events.append((fault.end_s, 2 * i, False, fault))  # an end before a start
        events.sort(key=lambda e: (e[0], e[1]))
        try:
            for at_s, _, starting, fault in events:
                await asyncio.sleep(max(0.0, t0 + at_s - time.monotonic()))
                await asyncio.to_thread(self._start if starting else self._end, fault)
            await asyncio.sleep(max(0.0, t0 + duration_s - time.monotonic()))
        finally:
            await asyncio.shield(asyncio.to_thread(self.heal_all))
        return self.faults

    def run_sync(self, duration_s: float) -> list[dict[str, Any]]:
        """``run`` on a fresh event loop (for a nemesis in its own thread)."""
        return asyncio.run(self.run(duration_s))

    def heal_all(self) -> None:
        """End every active fault (newest first), then heal the network. Raises the first
        error after trying everything."""
        errors: list[BaseException] = []
        with self._lock:
            active = list(reversed(self._active))
        for fault, _ in active:
            try:
                self._end(fault)
            except Exception as exc:  # noqa: BLE001 - heal the rest, raise after
                errors.append(exc)
        if "partition" in self.kinds:
            try:
                self.cluster.heal()
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
        if errors:
            raise errors[0]

    # -- one fault ------------------------------------------------------------------

    def _log_path(self, name: str) -> Path | None:
        node = next((n for n in self.cluster.nodes if n.name == name), None)
        path = getattr(node, "log_path", None)
        return Path(path) if path is not None else None

    def _log_size(self, name: str) -> int:
        path = self._log_path(name)
        try:
            return path.stat().st_size if path is not None else 0
        except OSError:
            return 0

    def _stepped_out(self, name: str) -> bool:
        """Whether the node met the full disk: it exited, or it logged ``passive_failover``
        since its disk was filled (it hands off hints for up to 10 s, then exits with
        status 4, docs/health.md). Such a node is started again, as an operator would."""
        if name not in self.cluster.running():
            return True
        path = self._log_path(name)
        if path is None:
            return False
        try:
            with path.open("rb") as f:
                f.seek(self._log_marks.get(name, 0))
                return b'"msg":"passive_failover"' in f.read()
        except OSError:
            return False

    def _start(self, fault: PlannedFault) -> None:
        record: dict[str, Any] = {"kind": fault.kind, "targets": list(fault.targets),
                                  "start": time.monotonic(), "end": None,
                                  "detail": dict(fault.detail)}
        with self._lock:
            self.faults.append(record)
            self._active.append((fault, record))
        self.log(f"nemesis: start {fault.describe()}")
        c = self.cluster
        if fault.kind == "kill":
            for name in fault.targets:
                c.kill(name)
        elif fault.kind == "pause":
            for name in fault.targets:
                c.pause(name)
        elif fault.kind == "partition":
            shape = fault.detail["shape"]
            if shape == "isolate":
                c.isolate(fault.targets[0])
            elif shape == "bridge":
                left, bridge, right = c.bridge_partition(fault.detail["bridge"])
                record["detail"]["groups"] = [[*left, bridge], [*right, bridge]]
            else:
                c.partition([list(g) for g in fault.detail["groups"]])
        elif fault.kind == "clock":
            c.set_clock_skew(fault.targets[0], fault.detail["skew_ms"])
        elif fault.kind == "disk":
            self._log_marks[fault.targets[0]] = self._log_size(fault.targets[0])
            record["detail"]["bytes"] = c.fill_disk(fault.targets[0])

    def _end(self, fault: PlannedFault) -> None:
        with self._lock:
            found = [(f, r) for f, r in self._active if f is fault]
            if not found:
                return  # never started, or already ended (heal_all)
            self._active.remove(found[0])
        record = found[0][1]
        c = self.cluster
        try:
            if fault.kind == "kill":
                for name in fault.targets:
                    c.restart(name)
            elif fault.kind == "pause":
                for name in fault.targets:
                    c.resume(name)
            elif fault.kind == "partition":
                c.heal()
            elif fault.kind == "clock":
                c.set_clock_skew(fault.targets[0], 0)
            elif fault.kind == "disk":
                c.free_disk(fault.targets[0])
                if self._stepped_out(fault.targets[0]):
                    record["detail"]["restarted"] = True
                    c.restart(fault.targets[0])
        except Exception as exc:
            record["detail"]["error"] = f"{type(exc).__name__}: {exc}"
            self.log(f"nemesis: ending {fault.kind} on {' '.join(fault.targets)} failed: "
                     f"{record['detail']['error']}")
            raise
        finally:
            record["end"] = time.monotonic()
        self.log(f"nemesis: end   {fault.kind} on {' '.join(fault.targets)}")
