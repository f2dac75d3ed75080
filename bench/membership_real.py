"""Real-process membership benchmark: leaderless vs swim-protocol (PyPI 0.6.3).

For each system and each cluster size n it starts n OS processes on loopback ports and reads
their JSON-lines stderr into one timeline of member events, then measures:

* convergence: time from the first spawn until every node reports every other node alive;
* false failures in a quiet cluster: suspect and dead events during ``quiet_s`` seconds with
  nothing killed (every such event is false), then the same while one CPU is saturated by a
  busy-loop process started for the purpose;
* detection: ``kill -9`` of one random non-seed node, time until EVERY live member logged it
  dead (and until the first one did); the node is restarted with the same name, port and data
  dir and the cluster must reconverge before the next trial. Median and max over the trials.

Both systems run with their own defaults (the harness strips ``LEADERLESS_*`` from the
environment). Nothing here asserts a timing: it measures, prints a markdown table and writes
JSON (default bench/results/membership_real.json).

Full run:   .venv/bin/python bench/membership_real.py
Quick run:  .venv/bin/python bench/membership_real.py --sizes 5,10 --trials 3 --quiet-s 30 \
                --out /tmp/membership_quick.json
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RESULTS = REPO / "bench" / "results" / "membership_real.json"
SWIM_PEER = REPO / "bench" / "swim_peer.py"
SYSTEMS = ("leaderless", "swim-protocol")
HOST = "127.0.0.1"  # loopback only, always

# Member event kind -> the status it leaves the member in, from the observer's point of view.
# "updated" is a metadata change and keeps the status; "reaped" forgets the member.
KIND_STATUS = {"joined": "alive", "alive": "alive", "suspect": "suspect", "dead": "dead",
               "left": "left", "reaped": "gone"}
FAILURE_KINDS = ("suspect", "dead")

# Bounds: every wait below is bounded by one of these (seconds) or by a count.
STARTED_TIMEOUT_S = 30.0
POLL_S = 0.05
DRAIN_S = 0.5  # let reader threads catch up with the last lines before a phase is counted
SETTLE_S = 10.0  # after convergence, before the quiet period, so join traffic has died down
STOP_GRACE_S = 3.0
TAIL_LINES = 30  # non-JSON stderr lines kept per process instance (tracebacks)
PROBLEM_SAMPLES = 3  # warning/error lines kept per distinct message


# ----------------------------------------------------------------------------------------------
# child process bookkeeping: every child ever started is killed on every way out


_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}
_CHILDREN_LOCK = threading.Lock()


def _kill_all_children() -> None:
    with _CHILDREN_LOCK:
        children = list(_CHILDREN.values())
        _CHILDREN.clear()
    for child in children:
        with contextlib.suppress(ProcessLookupError, OSError):
            child.kill()
    for child in children:
        with contextlib.suppress(Exception):
            child.wait(timeout=5)


atexit.register(_kill_all_children)


def _raise_exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _pdeathsig_prefix() -> list[str]:
    """setpriv makes the kernel SIGKILL the child if the harness dies, even by SIGKILL, so no
    orphan outlives us; atexit and try/finally cover every other way out."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []


def spawn(argv: Sequence[str], env: dict[str, str], stderr: int | None,
          stdout: int | IO[bytes] | None = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    # A new session keeps a terminal's Ctrl-C away from the children: the harness kills them
    # itself, so no node starts a graceful leave in the middle of a measurement.
    child = subprocess.Popen([*_pdeathsig_prefix(), *argv], env=env, stdin=subprocess.DEVNULL,
                             stdout=stdout, stderr=stderr, start_new_session=True)
    with _CHILDREN_LOCK:
        _CHILDREN[child.pid] = child
    return child


def reap(child: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, OSError):
        child.send_signal(sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.wait(timeout=10)
    with _CHILDREN_LOCK:
        _CHILDREN.pop(child.pid, None)


def child_env() -> dict[str, str]:
    """Product defaults: drop every LEADERLESS_* override the caller may have exported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEADERLESS_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def port_is_free(port: int) -> bool:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                return False
    return True


def free_ports(count: int, taken: set[int]) -> list[int]:
    """Ports free for both TCP and UDP on loopback. The kernel picks candidates; at most
    50 attempts per port."""
    ports: list[int] = []
    for _ in range(count * 50):
        if len(ports) == count:
            break
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port = int(sock.getsockname()[1])
        if port not in taken and port_is_free(port):
            taken.add(port)
            ports.append(port)
    if len(ports) != count:
        raise RuntimeError(f"found only {len(ports)} of {count} free loopback ports")
    return ports


def machine_busy_ticks() -> int:
    """CPU ticks spent by every process on the machine (all CPUs), from /proc/stat."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0
    idle, iowait = fields[3], fields[4] if len(fields) > 4 else 0
    return sum(fields[:8]) - idle - iowait


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process in clock ticks (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


# ----------------------------------------------------------------------------------------------
# one node process instance and its stderr reader


@dataclasses.dataclass
class Instance:
    """One OS process of a node; a restart is a new Instance with the same name and port."""

    name: str
    serial: int
    popen: subprocess.Popen[bytes]
    spawned_at: float
    started_at: float | None = None
    exit_code: int | None = None
    expected_exit: bool = False
    tail: list[str] = dataclasses.field(default_factory=list)
    reader: threading.Thread | None = None


@dataclasses.dataclass(frozen=True)
class MemberEvent:
    ts: float
    observer: str
    member: str
    kind: str
    incarnation: int | None


class Cluster:
    """n node processes of one system, the event timeline they log, and each node's view."""

    def __init__(self, system: str, n: int, workdir: Path, ports: list[int],
                 swim_peers: str = "all") -> None:
        self.system = system
        self.n = n
        self.names = [f"n{i:02d}" for i in range(n)]
        self.port = dict(zip(self.names, ports, strict=True))
        self.workdir = workdir
        self.swim_peers = swim_peers
        self.env = child_env()
        self.cond = threading.Condition()
        self.events: list[MemberEvent] = []
        self.by_pair: dict[tuple[str, str], list[MemberEvent]] = {}
        # view[observer][member] = (status, since_ts), reset when the observer restarts
        self.view: dict[str, dict[str, tuple[str, float]]] = {m: {} for m in self.names}
        self.live: dict[str, Instance] = {}
        self.history: list[Instance] = []
        self.unexpected_exits: list[dict[str, Any]] = []
        self.other_lines = 0
        self.problems: dict[str, int] = {}
        self.problem_samples: dict[str, list[dict[str, Any]]] = {}
        self._serial = 0

    # -- commands ---------------------------------------------------------------------------

    def addr(self, name: str) -> str:
        return f"{HOST}:{self.port[name]}"

    def data_dir(self, name: str) -> Path:
        path = self.workdir / self.system / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def command(self, name: str) -> list[str]:
        seed = self.names[0]
        if self.system == "leaderless":
            argv = [str(BIN / "leaderless"), "node", "start", "--name", name,
                    "--bind", self.addr(name), "--data-dir", str(self.data_dir(name)),
                    "--log-format", "json"]
            return argv if name == seed else [*argv, "--join", self.addr(seed)]
        argv = [sys.executable, str(SWIM_PEER), "--name", name, "--bind", self.addr(name)]
        for member in self.names:
            argv += ["--member", f"{member}@{self.addr(member)}"]
        if self.swim_peers == "seed":
            # like leaderless --join: one configured peer; the seed needs one too (the
            # package's failure detector asserts it has someone to ping)
            argv += ["--peer", self.addr(self.names[1] if name == seed else seed)]
        return argv

    # -- processes --------------------------------------------------------------------------

    def start(self, name: str) -> Instance:
        assert name not in self.live, f"{name} is already running"
        self._serial += 1
        log = self.workdir / "logs" / f"{self.system}-n{self.n}-{name}-{self._serial}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        popen = spawn(self.command(name), self.env, stderr=subprocess.PIPE)
        inst = Instance(name, self._serial, popen, time.time())
        with self.cond:
            self.view[name] = {}
            self.live[name] = inst
            self.history.append(inst)
        inst.reader = threading.Thread(target=self._read, args=(inst, log), daemon=True,
                                       name=f"read-{name}-{inst.serial}")
        inst.reader.start()
        return inst

    def kill(self, name: str) -> float:
        """SIGKILL one node; returns the kill time (taken just before the signal)."""
        with self.cond:
            inst = self.live.pop(name)
            inst.expected_exit = True
        killed_at = time.time()
        reap(inst.popen)
        return killed_at

    def stop_all(self) -> None:
        with self.cond:
            instances = list(self.live.values())
            self.live.clear()
            for inst in instances:
                inst.expected_exit = True
        for inst in instances:
            with contextlib.suppress(ProcessLookupError, OSError):
                inst.popen.kill()
        for inst in instances:
            reap(inst.popen)
        for inst in self.history:
            if inst.reader is not None:
                inst.reader.join(timeout=STOP_GRACE_S)

    def check_exits(self) -> list[str]:
        """Names of nodes that exited on their own (crashes); they are dropped from live."""
        crashed: list[str] = []
        with self.cond:
            for name, inst in list(self.live.items()):
                code = inst.popen.poll()
                if code is None:
                    continue
                inst.exit_code = code
                del self.live[name]
                crashed.append(name)
                self.unexpected_exits.append({
                    "node": name, "instance": inst.serial, "exit_code": code,
                    "ts": time.time(), "stderr_tail": inst.tail[-TAIL_LINES:]})
        return crashed

    # -- stderr ------------------------------------------------------------------------------

    def _read(self, inst: Instance, log: Path) -> None:
        assert inst.popen.stderr is not None
        with open(log, "wb") as raw:
            for line in inst.popen.stderr:
                raw.write(line)
                self._handle_line(inst, line)
        inst.popen.stderr.close()

    def _handle_line(self, inst: Instance, line: bytes) -> None:
        record: Any = None
        if line.startswith(b"{"):
            with contextlib.suppress(ValueError):
                record = json.loads(line)
        if not isinstance(record, dict):
            text = line.decode("utf-8", "replace").rstrip()
            if text:
                inst.tail.append(text)
                del inst.tail[:-TAIL_LINES]
                self.other_lines += 1
            return
        msg = record.get("msg")
        level = record.get("level")
        if level in ("warning", "error", "critical"):
            self._note_problem(inst, str(level), str(msg), record)
        if msg == "started":
            with self.cond:
                inst.started_at = float(record.get("ts") or time.time())
                self.cond.notify_all()
        elif msg == "member":
            self._on_member(inst, record)

    def _note_problem(self, inst: Instance, level: str, msg: str,
                      record: dict[str, Any]) -> None:
        """Count warning/error lines by message; keep the first few of each as evidence."""
        key = f"{level}: {msg}"
        with self.cond:
            self.problems[key] = self.problems.get(key, 0) + 1
            samples = self.problem_samples.setdefault(key, [])
            if len(samples) < PROBLEM_SAMPLES:
                samples.append({"instance": inst.serial, **record})

    def _on_member(self, inst: Instance, record: dict[str, Any]) -> None:
        member = record.get("member")
        kind = record.get("kind")
        if not isinstance(member, str) or not isinstance(kind, str) or member == inst.name:
            return
        ts = float(record.get("ts") or time.time())
        incarnation = record.get("incarnation")
        event = MemberEvent(ts, inst.name, member, kind,
                            incarnation if isinstance(incarnation, int) else None)
        with self.cond:
            self.events.append(event)
            self.by_pair.setdefault((inst.name, member), []).append(event)
            if self.live.get(inst.name) is not inst:
                return  # a line from a process we already killed: timeline only
            view = self.view[inst.name]
            status = KIND_STATUS.get(kind)
            if status == "gone":
                view.pop(member, None)
            elif status is not None:
                if view.get(member, ("", 0.0))[0] != status:
                    view[member] = (status, ts)
            elif member not in view:  # "updated" about a member we had not heard of
                view[member] = ("alive", ts)
            self.cond.notify_all()

    # -- predicates over the views (call with self.cond held) --------------------------------

    def events_about(self, member: str, observer: str) -> list[MemberEvent]:
        return self.by_pair.get((observer, member), [])

    def pairs(self) -> Iterator[tuple[str, str]]:
        for observer in self.live:
            for member in self.live:
                if member != observer:
                    yield observer, member

    def alive_pairs(self) -> int:
        return sum(1 for o, m in self.pairs() if self.view[o].get(m, ("",))[0] == "alive")

    def converged(self) -> bool:
        return len(self.live) == self.n and all(
            self.view[o].get(m, ("",))[0] == "alive" for o, m in self.pairs())

    def converged_at(self) -> float:
        return max(self.view[o][m][1] for o, m in self.pairs())

    def wait(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        """Wait (bounded) until predicate() holds; crashes are recorded on the way."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self.cond:
                if predicate():
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.cond.wait(min(remaining, POLL_S * 4))
            self.check_exits()

    def sleep(self, duration_s: float) -> None:
        """Sleep while watching for crashes."""
        deadline = time.monotonic() + duration_s
        while (remaining := deadline - time.monotonic()) > 0:
            time.sleep(min(remaining, 1.0))
            self.check_exits()

    def cpu_ticks(self) -> int:
        with self.cond:
            pids = [inst.popen.pid for inst in self.live.values()]
        return sum(cpu_ticks(pid) for pid in pids)


# ----------------------------------------------------------------------------------------------
# phases


def summarize(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "max": None, "min": None}
    return {"median": round(statistics.median(values), 3), "max": round(max(values), 3),
            "min": round(min(values), 3)}


def start_cluster(cluster: Cluster, converge_timeout_s: float) -> dict[str, Any]:
    """Seed first (wait for its start line), then the rest at once; bounded wait to converge."""
    t0 = time.time()
    seed = cluster.start(cluster.names[0])
    cluster.wait(lambda: seed.started_at is not None or seed.popen.poll() is not None,
                 STARTED_TIMEOUT_S)
    for name in cluster.names[1:]:
        cluster.start(name)
    last_spawn = time.time()
    ok = cluster.wait(cluster.converged, converge_timeout_s)
    with cluster.cond:
        total = cluster.n * (cluster.n - 1)
        alive = cluster.alive_pairs()
        at = cluster.converged_at() if ok else None
        started = sum(1 for i in cluster.live.values() if i.started_at is not None)
    return {
        "converged": ok,
        "converge_s": round(at - t0, 3) if at is not None else None,
        "converge_after_last_spawn_s": round(at - last_spawn, 3) if at is not None else None,
        "converge_timeout_s": converge_timeout_s,
        "spawn_s": round(last_spawn - t0, 3),
        "started_lines": started,
        "alive_pairs_at_end": alive,
        "pairs_total": total,
    }


def count_failures(cluster: Cluster, t0: float, t1: float,
                   killed: Iterable[str] = ()) -> dict[str, Any]:
    """Suspect/dead events in [t0, t1) about members that were not killed in that window."""
    excluded = set(killed)
    with cluster.cond:
        window = [e for e in cluster.events if t0 <= e.ts < t1 and e.member not in excluded]
    fails = [e for e in window if e.kind in FAILURE_KINDS]
    return {
        "false_suspect_events": sum(1 for e in fails if e.kind == "suspect"),
        "false_dead_events": sum(1 for e in fails if e.kind == "dead"),
        "members_falsely_suspected": len({e.member for e in fails}),
        "observer_member_pairs": len({(e.observer, e.member) for e in fails}),
        "member_events_total": len(window),
    }


def quiet_phase(cluster: Cluster, quiet_s: float, busy_cpu: bool) -> dict[str, Any]:
    busy: subprocess.Popen[bytes] | None = None
    busy_cpu_index: int | None = None
    if busy_cpu:
        busy = spawn([sys.executable, "-c", "while True: pass"], cluster.env,
                     stderr=subprocess.DEVNULL)
        cpus = sorted(os.sched_getaffinity(0))
        busy_cpu_index = cpus[-1]
        with contextlib.suppress(OSError):
            os.sched_setaffinity(busy.pid, {busy_cpu_index})  # saturate exactly one CPU
    try:
        ticks0, t0, own0 = cluster.cpu_ticks(), time.time(), time.process_time()
        machine0 = machine_busy_ticks()
        cluster.sleep(quiet_s)
        ticks1, t1, own1 = cluster.cpu_ticks(), time.time(), time.process_time()
        machine1 = machine_busy_ticks()
        busy_ticks = cpu_ticks(busy.pid) if busy is not None else 0
    finally:
        if busy is not None:
            reap(busy)
    time.sleep(DRAIN_S)
    hz = os.sysconf("SC_CLK_TCK")
    elapsed = max(t1 - t0, 1e-9)
    result = count_failures(cluster, t0, t1)
    result |= {
        "duration_s": round(elapsed, 1),
        "busy_loop_cpu": busy_cpu_index,
        "busy_loop_cpu_pct": round(100 * busy_ticks / hz / elapsed, 1) if busy else None,
        "node_cpu_pct_mean": round(100 * (ticks1 - ticks0) / hz / elapsed / cluster.n, 2),
        "harness_cpu_pct": round(100 * (own1 - own0) / elapsed, 2),
        # whatever else ran on the machine meanwhile (other people's tests, simulations):
        # machine busy time minus the nodes, the busy loop and this harness, in % of one CPU
        "other_processes_cpu_pct": round(
            100 * ((machine1 - machine0) - (ticks1 - ticks0) - busy_ticks) / hz / elapsed
            - 100 * (own1 - own0) / elapsed, 1),
        "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
        "nodes_live_at_end": len(cluster.live),
    }
    return result


def restart_crashed(cluster: Cluster, timeout_s: float) -> list[str]:
    crashed = cluster.check_exits()
    with cluster.cond:
        missing = [m for m in cluster.names if m not in cluster.live]
    for name in missing:
        cluster.start(name)
    if missing:
        cluster.wait(cluster.converged, timeout_s)
    return crashed


def detection_trial(cluster: Cluster, victim: str, detect_timeout_s: float,
                    rejoin_timeout_s: float) -> dict[str, Any]:
    killed_at = cluster.kill(victim)
    observers = [m for m in cluster.names if m != victim]

    def first(observer: str, kind: str, since: float) -> float | None:
        for event in cluster.events_about(victim, observer):
            if event.kind == kind and event.ts >= since:
                return event.ts
        return None

    def all_dead() -> bool:
        return all(first(o, "dead", killed_at) is not None for o in cluster.live)

    detected = cluster.wait(all_dead, detect_timeout_s)
    with cluster.cond:
        dead_at = {o: first(o, "dead", killed_at) for o in observers}
        suspect_at = {o: first(o, "suspect", killed_at) for o in observers}
    dead_s = [t - killed_at for t in dead_at.values() if t is not None]
    suspect_s = [t - killed_at for t in suspect_at.values() if t is not None]
    detect_end = time.time()
    restarted_at = time.time()
    cluster.start(victim)

    def victim_back() -> bool:
        return cluster.converged() and all(
            cluster.view[o][victim][1] >= restarted_at for o in observers if o in cluster.live)

    rejoined = cluster.wait(victim_back, rejoin_timeout_s)
    with cluster.cond:
        rejoin_at = max((cluster.view[o].get(victim, ("", 0.0))[1] for o in observers),
                        default=0.0)
    return {
        "victim": victim,
        "detected_by_all": detected,
        "detect_all_s": round(max(dead_s), 3) if detected and dead_s else None,
        "detect_first_s": round(min(dead_s), 3) if dead_s else None,
        "suspect_first_s": round(min(suspect_s), 3) if suspect_s else None,
        "observers_detected": len(dead_s),
        "observers": len(observers),
        "rejoined": rejoined,
        "rejoin_s": round(rejoin_at - restarted_at, 3) if rejoined else None,
        "false_during_detection": count_failures(cluster, killed_at, detect_end, [victim]),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }


def detection_phase(cluster: Cluster, trials: int, rng: random.Random,
                    detect_timeout_s: float, rejoin_timeout_s: float,
                    log: Callable[[str], None]) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    for trial in range(trials):
        restart_crashed(cluster, rejoin_timeout_s)
        if not cluster.wait(cluster.converged, rejoin_timeout_s):
            log(f"  trial {trial}: cluster not converged; stopping trials")
            break
        # a random pause so kills do not fall at the same phase of the probe rounds
        time.sleep(rng.uniform(0.5, 1.5))
        victim = rng.choice(cluster.names[1:])
        run = detection_trial(cluster, victim, detect_timeout_s, rejoin_timeout_s)
        runs.append(run)
        log(f"  trial {trial}: kill {victim}: all dead in {run['detect_all_s']} s "
            f"(first {run['detect_first_s']} s), rejoined in {run['rejoin_s']} s")
    detect_all = [r["detect_all_s"] for r in runs if r["detect_all_s"] is not None]
    return {
        "trials_requested": trials,
        "trials_run": len(runs),
        "trials_detected_by_all": len(detect_all),
        "detect_all_s": summarize(detect_all),
        "detect_first_s": summarize([r["detect_first_s"] for r in runs
                                     if r["detect_first_s"] is not None]),
        "suspect_first_s": summarize([r["suspect_first_s"] for r in runs
                                      if r["suspect_first_s"] is not None]),
        "rejoin_s": summarize([r["rejoin_s"] for r in runs if r["rejoin_s"] is not None]),
        "false_suspect_events_during_trials": sum(
            r["false_during_detection"]["false_suspect_events"] for r in runs),
        "false_dead_events_during_trials": sum(
            r["false_during_detection"]["false_dead_events"] for r in runs),
        "runs": runs,
    }


# ----------------------------------------------------------------------------------------------
# one system at one size, the whole run, the table


@dataclasses.dataclass(frozen=True)
class Limits:
    converge_timeout_s: float = 120.0
    detect_timeout_s: float = 60.0
    rejoin_timeout_s: float = 90.0


def run_one(system: str, n: int, trials: int, quiet_s: float, *, rng: random.Random,
            workdir: Path, taken_ports: set[int], limits: Limits, busy_cpu: bool,
            swim_peers: str, log: Callable[[str], None]) -> dict[str, Any]:
    cluster = Cluster(system, n, workdir, free_ports(n, taken_ports), swim_peers)
    began = time.time()
    result: dict[str, Any] = {"system": system, "n": n, "trials": trials, "quiet_s": quiet_s}
    try:
        startup = start_cluster(cluster, limits.converge_timeout_s)
        result["startup"] = startup
        log(f"{system} n={n}: converged={startup['converged']} in {startup['converge_s']} s "
            f"({startup['alive_pairs_at_end']}/{startup['pairs_total']} pairs alive)")
        if startup["converged"]:
            # first convergence can be a passing moment (swim-protocol at n=50): say whether
            # the view stayed whole over the settle period
            settle_from = time.time()
            cluster.sleep(SETTLE_S)
            time.sleep(DRAIN_S)
            with cluster.cond:
                startup["still_converged_after_settle"] = cluster.converged()
            startup["settle"] = count_failures(cluster, settle_from, time.time())
        if quiet_s > 0:
            result["quiet"] = quiet_phase(cluster, quiet_s, busy_cpu=False)
            log(f"{system} n={n}: quiet {quiet_s:.0f} s: {brief(result['quiet'])}")
            if busy_cpu:
                result["quiet_busy_cpu"] = quiet_phase(cluster, quiet_s, busy_cpu=True)
                log(f"{system} n={n}: quiet, one CPU busy: {brief(result['quiet_busy_cpu'])}")
        with cluster.cond:
            converged_now = cluster.converged()
        if trials > 0 and (startup["converged"] or converged_now):
            result["detection"] = detection_phase(
                cluster, trials, rng, limits.detect_timeout_s, limits.rejoin_timeout_s, log)
        elif trials > 0:
            result["detection"] = {"skipped": "the cluster never converged", "trials_run": 0}
    finally:
        cluster.stop_all()
        result["unexpected_exits"] = cluster.unexpected_exits
        result["member_events_total"] = len(cluster.events)
        result["non_json_stderr_lines"] = cluster.other_lines
        result["non_json_stderr_tail"] = next(
            (i.tail[-TAIL_LINES:] for i in cluster.history if i.tail), [])
        result["warnings_errors"] = cluster.problems
        result["warning_error_samples"] = cluster.problem_samples
        result["wall_s"] = round(time.time() - began, 1)
    return result


def brief(quiet: dict[str, Any]) -> str:
    return (f"{quiet['false_suspect_events']} suspect / {quiet['false_dead_events']} dead events, "
            f"node CPU {quiet['node_cpu_pct_mean']} %")


def meta(params: dict[str, Any]) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": platform.platform(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "params": params,
        "swim_protocol_defaults": {
            "ping_interval_s": 1.0, "ping_timeout_s": 0.3, "ping_req_count": 1,
            "ping_req_timeout_s": 0.9, "suspect_timeout_s": 5.0, "sync_interval_s": 0.5},
    }
    with contextlib.suppress(Exception):
        from importlib.metadata import version
        info["swim_protocol_version"] = version("swim-protocol")
    with contextlib.suppress(Exception):
        from leaderless.core.membership_config import MembershipConfig
        info["leaderless_membership_defaults"] = dataclasses.asdict(MembershipConfig())
    with contextlib.suppress(Exception):
        info["git_commit"] = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
            timeout=10).stdout.strip()
    return info


def run_real_bench(systems: Sequence[str] = SYSTEMS, sizes: Sequence[int] = (5, 10, 50),
                   trials: int = 10, quiet_s: float = 300.0, *,
                   trials_by_size: dict[int, int] | None = None,
                   quiet_s_by_system: dict[str, float] | None = None,
                   busy_cpu: bool = True, swim_peers: str = "all", seed: int = 1,
                   limits: Limits | None = None, out: Path | None = RESULTS,
                   keep_logs: Path | None = None,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every (size, system) combination in one go and return (and write) the results."""
    limits = limits or Limits()
    params = {"systems": list(systems), "sizes": list(sizes), "trials": trials,
              "quiet_s": quiet_s, "trials_by_size": trials_by_size or {},
              "quiet_s_by_system": quiet_s_by_system or {}, "busy_cpu": busy_cpu,
              "swim_peers": swim_peers, "seed": seed, "limits": dataclasses.asdict(limits)}
    report: dict[str, Any] = {"meta": meta(params), "results": []}
    rng = random.Random(seed)
    taken: set[int] = set()
    workdir = Path(tempfile.mkdtemp(prefix="membership-real-"))
    began = time.time()
    try:
        for n in sizes:
            for system in systems:
                result = run_one(
                    system, n, (trials_by_size or {}).get(n, trials),
                    (quiet_s_by_system or {}).get(system, quiet_s), rng=rng,
                    workdir=workdir, taken_ports=taken, limits=limits, busy_cpu=busy_cpu,
                    swim_peers=swim_peers, log=log)
                report["results"].append(result)
                report["meta"]["wall_s"] = round(time.time() - began, 1)
                if out is not None:
                    write_json(out, report)
    finally:
        _kill_all_children()
        if keep_logs is not None:
            shutil.copytree(workdir / "logs", keep_logs, dirs_exist_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)
    report["meta"]["wall_s"] = round(time.time() - began, 1)
    report["table"] = markdown_table(report["results"])
    if out is not None:
        write_json(out, report)
    return report


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)


def _fmt(value: Any) -> str:
    return "–" if value is None else str(value)


def _failures(quiet: dict[str, Any] | None) -> str:
    if not quiet:
        return "–"
    return f"{quiet['false_suspect_events']} / {quiet['false_dead_events']}"


def markdown_table(results: Iterable[dict[str, Any]]) -> str:
    head = ("| n | system | converged (s) | detect by all: median / max (s) | first dead "
            "median (s) | rejoin median (s) | trials | quiet: false suspect / dead | one CPU "
            "busy: false suspect / dead | node CPU % (quiet) |")
    lines = [head, "|" + "---|" * 10]
    for r in results:
        startup = r.get("startup", {})
        det = r.get("detection") or {}
        conv = (_fmt(startup.get("converge_s")) if startup.get("converged")
                else f"no ({startup.get('alive_pairs_at_end')}/{startup.get('pairs_total')} "
                     f"pairs in {startup.get('converge_timeout_s')} s)")
        if startup.get("still_converged_after_settle") is False:
            conv += f" (lost within {SETTLE_S:.0f} s)"
        detect = det.get("detect_all_s") or {}
        quiet = r.get("quiet")
        lines.append(
            f"| {r['n']} | {r['system']} | {conv} | {_fmt(detect.get('median'))} / "
            f"{_fmt(detect.get('max'))} | {_fmt((det.get('detect_first_s') or {}).get('median'))}"
            f" | {_fmt((det.get('rejoin_s') or {}).get('median'))} | "
            f"{det.get('trials_detected_by_all', 0)}/{det.get('trials_run', 0)} | "
            f"{_failures(quiet)} | {_failures(r.get('quiet_busy_cpu'))} | "
            f"{_fmt(quiet.get('node_cpu_pct_mean') if quiet else None)} |")
    return "\n".join(lines)


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _pairs(items: Sequence[str], cast: Callable[[str], Any]) -> dict[Any, float]:
    out: dict[Any, float] = {}
    for item in items:
        key, _, value = item.partition("=")
        out[cast(key)] = float(value)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--sizes", type=_int_list, default=[5, 10, 50])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--trials-for", action="append", default=[], metavar="N=TRIALS",
                        help="trials for one size, e.g. 50=5")
    parser.add_argument("--quiet-s", type=float, default=300.0)
    parser.add_argument("--quiet-s-for", action="append", default=[], metavar="SYSTEM=S",
                        help="quiet period for one system, e.g. swim-protocol=60")
    parser.add_argument("--no-busy-cpu", action="store_true",
                        help="skip the quiet period with one CPU saturated")
    parser.add_argument("--swim-peers", choices=("all", "seed"), default="all",
                        help="swim-protocol peers: every member (default) or one seed")
    parser.add_argument("--converge-timeout-s", type=float, default=120.0)
    parser.add_argument("--detect-timeout-s", type=float, default=60.0)
    parser.add_argument("--rejoin-timeout-s", type=float, default=90.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--keep-logs", type=Path, default=None,
                        help="copy every process's raw stderr here")
    args = parser.parse_args(argv)
    systems = [s for s in args.systems.split(",") if s]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}; choose from {SYSTEMS}")
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_exit)
    # even when started in the background (where a shell ignores SIGINT), Ctrl-C / kill -INT
    # must reach the finally blocks that kill the children
    signal.signal(signal.SIGINT, signal.default_int_handler)
    report = run_real_bench(
        systems, args.sizes, args.trials, args.quiet_s,
        trials_by_size={int(k): int(v) for k, v in _pairs(args.trials_for, int).items()},
        quiet_s_by_system=_pairs(args.quiet_s_for, str), busy_cpu=not args.no_busy_cpu,
        swim_peers=args.swim_peers, seed=args.seed,
        limits=Limits(args.converge_timeout_s, args.detect_timeout_s, args.rejoin_timeout_s),
        out=args.out, keep_logs=args.keep_logs,
        log=lambda line: print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True))
    print()
    print(report["table"])
    print(f"\nwall time {report['meta']['wall_s']} s; JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
