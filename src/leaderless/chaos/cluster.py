"""Real ``leaderless`` node processes on one machine, with faults a test can turn on and off.

``ChaosCluster`` starts N real node processes (``leaderless node start``) in one of two modes,
named in ``mode`` and printed when it starts:

- ``netns``: each node in its own network namespace (``ip netns``) with its own IP address
  on a private bridge (a free 10.213.K.0/24; the bridge holds .1, so this process reaches
  every node's ports directly), nodes at .10, .11, ... Partitions are iptables DROP rules in
  each node's namespace (a chain ``llchaos`` the harness owns, jumped to from INPUT and
  OUTPUT): the cluster really crosses a network and loses packets on it. Needs root, ``ip``
  and ``iptables-restore``.
- ``loopback``: every node on 127.0.0.1 with its own ports. Partitions go through the
  test-only transport hook ``LEADERLESS_FAULT_DROP_FILE`` (``runtime.fault_partition``):
  each node reads, live, a file listing the peers it must not talk to.

In both modes: ``kill`` (SIGKILL), ``restart``, ``pause`` (SIGSTOP), ``resume`` (SIGCONT),
``partition`` / ``isolate`` / ``bridge_partition`` / ``heal``, ``set_clock_skew`` (a file
the node's live clock-skew hook reads: ``LEADERLESS_FAULT_CLOCK_SKEW_FILE``),
``fill_disk`` / ``free_disk`` (each data dir is a small tmpfs the harness mounts, when it
may mount; otherwise those two raise ``ChaosUnsupported`` with the reason).

Only addresses the harness created are used: the bridge subnet it picked (checked free
against every address and route of the machine) or loopback ports found free. Every name
it creates (namespaces, veths, the bridge) starts with ``llc<pid><letter>``, so concurrent
runs never collide and a leftover is attributable; ``start`` deletes the leftovers of runs
whose process is gone. ``stop`` (also run at exit) kills every node, deletes the
namespaces, links and bridge and unmounts the tmpfs mounts, whatever state it is in.

Every method blocks (subprocesses, waits); from asyncio code call them with
``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import errno
import fcntl
import ipaddress
import itertools
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from leaderless.core.locks import CLOCK_SKEW_MAX_MS
from leaderless.runtime.fault_partition import FAULT_DROP_FILE_ENV, REFRESH_S
from leaderless.runtime.wall_clock import FAULT_CLOCK_SKEW_FILE_ENV, write_fault_skew_file

Mode = Literal["netns", "loopback"]
T = TypeVar("T")

NAME_PREFIX = "llc"
"""Every namespace, veth and bridge the harness creates: ``llc<pid><letter>...``."""
SUBNET_BASE = "10.213"
"""Bridge subnets are 10.213.K.0/24 for the first K whose /24 no address or route uses."""
NODE_PORT, CLIENT_PORT, HTTP_PORT = 7946, 7950, 7951
"""netns mode: every node has its own IP, so all use the same ports."""
CHAIN = "llchaos"
"""The iptables chain in each namespace that holds the partition's DROP rules."""
TMPFS_MIB_DEFAULT = 64
FILL_FILE = ".chaos-disk-fill"
COMMAND_TIMEOUT_S = 20.0
LOCK_PATH = Path(tempfile.gettempdir()) / "leaderless-chaos-net.lock"
"""Held while choosing a subnet and creating the bridge, so two runs never pick the same."""

_instances = itertools.count()
_tag_re = re.compile(rf"^{NAME_PREFIX}(\d+)[a-z]")


class ChaosUnsupported(RuntimeError):
    """A mode or a fault this machine cannot provide; the message says why."""


@dataclasses.dataclass
class ChaosNode:
    name: str
    ip: str
    node_port: int
    client_port: int
    http_port: int
    data_dir: Path
    namespace: str | None
    """The node's network namespace (netns mode), else None."""
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    paused: bool = False
    disk_mounted: bool = False

    @property
    def pid(self) -> int | None:
        """The node process's pid while it runs (paused counts), else None."""
        if self.process is None or self.process.poll() is not None:
            return None
        return self.process.pid

    @property
    def address(self) -> str:
        """Its node (gossip and peer) address."""
        return f"{self.ip}:{self.node_port}"

    @property
    def client_address(self) -> str:
        return f"{self.ip}:{self.client_port}"

    @property
    def http_address(self) -> str:
        return f"{self.ip}:{self.http_port}"

    @property
    def skew_file(self) -> Path:
        return self.data_dir.parent / f"{self.name}.skew"

    @property
    def drop_file(self) -> Path:
        return self.data_dir.parent / f"{self.name}.drop"


class ChaosCluster:
    """N real nodes and the faults to inflict on them (module docstring)."""

    def __init__(self, n: int, root_dir: Path | str, seed: int, *, mode: str = "auto",
                 node_args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                 tmpfs_mib: int = TMPFS_MIB_DEFAULT, log_level: str = "warning",
                 echo: Callable[[str], None] | None = None) -> None:
        if n < 1:
            raise ValueError("a cluster needs at least one node")
        if mode not in ("auto", "netns", "loopback"):
            raise ValueError(f"mode must be auto, netns or loopback, not {mode!r}")
        self.n = n
        self.root_dir = Path(root_dir)
        self.seed = seed
        self.rng = random.Random(seed)
        self.node_args = tuple(node_args)
        self.env = dict(env or {})
        self.tmpfs_mib = tmpfs_mib
        self.log_level = log_level
        self._echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
        self.requested_mode = mode
        self.mode: Mode = "loopback"
        self.mode_reason = ""
        """Why this mode (e.g. why not netns)."""
        self.disk_reason: str | None = None
        """None when fill_disk works; else why it cannot."""
        self.tag = f"{NAME_PREFIX}{os.getpid()}{_letters(next(_instances))}"
        self.subnet: ipaddress.IPv4Network | None = None
        self.host_ip = "127.0.0.1"
        self.nodes: list[ChaosNode] = []
        self.blocked: dict[str, frozenset[str]] = {}
        """The partition in force: node -> the nodes it cannot reach (empty when healed)."""
        self._created_netns: list[str] = []
        self._created_links: list[str] = []
        self._started = False
        self._stopped = False
        self._lock = threading.RLock()

    # -- lifecycle ---------------------------------------------------------------------

    def start(self, timeout_s: float = 60.0) -> ChaosCluster:
        """Set up the network and data dirs, start every node and wait until each sees all
        alive. On any failure everything created so far is removed again."""
        if self._started:
            raise RuntimeError("this cluster was started already")
        self._started = True
        atexit.register(self.stop)
        try:
            self.mode, self.mode_reason = self._choose_mode()
            self.root_dir.mkdir(parents=True, exist_ok=True)
            if os.geteuid() == 0:
                with _net_lock():
                    swept = sweep_leftovers()
                if swept:
                    self._echo(f"chaos cluster: removed leftovers of dead runs: {swept}")
            if self.mode == "netns":
                self._setup_netns()
            else:
                self._setup_loopback()
            self._echo(f"chaos cluster {self.tag}: {self.n} nodes, mode={self.mode} "
                       f"({self.mode_reason}); seed {self.seed}; "
                       f"nodes {', '.join(n.address for n in self.nodes)}; "
                       f"disk faults: {self.disk_reason or 'tmpfs data dirs'}")
            for node in self.nodes:
                self._launch(node, first=True)
            self.wait_healthy(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Kill every node, delete namespaces, veths and the bridge, unmount the tmpfs
        mounts. Safe to call more than once and after a failed start."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    node.process.send_signal(signal.SIGKILL)
        for node in self.nodes:
            if node.process is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    node.process.wait(timeout=10)
        for node in self.nodes:
            if node.disk_mounted:
                if _run(["umount", str(node.data_dir)], check=False).returncode != 0:
                    _run(["umount", "-l", str(node.data_dir)], check=False)
                node.disk_mounted = False
        for ns in self._created_netns:
            _run(["ip", "netns", "del", ns], check=False)
        for link in reversed(self._created_links):
            if Path(f"/sys/class/net/{link}").exists():
                _run(["ip", "link", "del", link], check=False)
        self._created_netns.clear()
        self._created_links.clear()

    def __enter__(self) -> ChaosCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _choose_mode(self) -> tuple[Mode, str]:
        if self.requested_mode == "loopback":
            return "loopback", "asked for"
        problem = netns_unavailable()
        if problem is None:
            return "netns", "each node in its own network namespace"
        if self.requested_mode == "netns":
            raise ChaosUnsupported(f"netns mode is not available: {problem}")
        return "loopback", f"network namespaces unavailable: {problem}"

    # -- setup -------------------------------------------------------------------------

    def _new_node(self, i: int, ip: str, ports: tuple[int, int, int],
                  namespace: str | None) -> ChaosNode:
        name = f"n{i + 1}"
        data_dir = self.root_dir / name
        data_dir.mkdir(parents=True, exist_ok=True)
        node = ChaosNode(name, ip, *ports, data_dir=data_dir, namespace=namespace,
                         log_path=self.root_dir / f"{name}.log")
        write_fault_skew_file(str(node.skew_file), 0)
        return node

    def _setup_loopback(self) -> None:
        from leaderless.runtime.ports import free_port
        taken: set[int] = set()
        for i in range(self.n):
            ports: list[int] = []
            while len(ports) < 3:
                port = free_port()
                if port not in taken:
                    taken.add(port)
                    ports.append(port)
            node = self._new_node(i, "127.0.0.1", (ports[0], ports[1], ports[2]), None)
            node.drop_file.write_text("")
            self.nodes.append(node)
        self._mount_disks()

    def _setup_netns(self) -> None:
        bridge = f"{self.tag}b"
        with _net_lock():
            self.subnet = _free_subnet()
            hosts = list(self.subnet.hosts())
            self.host_ip = str(hosts[0])
            _run(["ip", "link", "add", bridge, "type", "bridge"])
            self._created_links.append(bridge)
            _run(["ip", "addr", "add", f"{self.host_ip}/{self.subnet.prefixlen}",
                  "dev", bridge])
            _run(["ip", "link", "set", bridge, "up"])
        for i in range(self.n):
            ip = str(hosts[9 + i])
            ns = f"{self.tag}-n{i + 1}"
            host_end, ns_end = f"{self.tag}h{i}", f"{self.tag}n{i}"
            _run(["ip", "netns", "add", ns])
            self._created_netns.append(ns)
            _run(["ip", "link", "add", host_end, "type", "veth", "peer", "name", ns_end])
            self._created_links.append(host_end)
            _run(["ip", "link", "set", ns_end, "netns", ns])
            _run(["ip", "link", "set", host_end, "master", bridge, "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{ip}/{self.subnet.prefixlen}",
                  "dev", ns_end])
            _run(["ip", "-n", ns, "link", "set", ns_end, "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            _iptables_restore(ns, f"*filter\n:{CHAIN} - [0:0]\n-A INPUT -j {CHAIN}\n"
                                  f"-A OUTPUT -j {CHAIN}\nCOMMIT\n")
            self.nodes.append(self._new_node(i, ip, (NODE_PORT, CLIENT_PORT, HTTP_PORT), ns))
        self._mount_disks()

    def _mount_disks(self) -> None:
        if os.geteuid() != 0:
            self.disk_reason = "not root: cannot mount a tmpfs data dir"
            return
        for node in self.nodes:
            done = _run(["mount", "-t", "tmpfs", "-o", f"size={self.tmpfs_mib}m,mode=0700",
                         f"{self.tag}-{node.name}", str(node.data_dir)], check=False)
            if done.returncode != 0:
                self.disk_reason = f"mount -t tmpfs failed: {done.stderr.strip()}"
                return
            node.disk_mounted = True

    # -- processes ---------------------------------------------------------------------

    def _launch(self, node: ChaosNode, first: bool) -> None:
        exe = str(Path(sys.executable).parent / "leaderless")
        if first:
            seeds = [self.nodes[0].address] if node is not self.nodes[0] else []
        else:
            seeds = [other.address for other in self.nodes if other is not node]
        args = [exe, "node", "start", "--name", node.name,
                "--bind", node.address, "--advertise", node.address,
                "--client", node.client_address, "--http", node.http_address,
                "--data-dir", str(node.data_dir), "--parent-pid", str(os.getpid()),
                "--log-level", self.log_level, "--no-bootstrap", *self.node_args]
        if seeds:
            args += ["--join", ",".join(seeds)]
        if node.namespace is not None:
            args = ["ip", "netns", "exec", node.namespace, *args]
        env = {k: v for k, v in os.environ.items() if not k.startswith("LEADERLESS_")}
        env.update(self.env)
        env[FAULT_CLOCK_SKEW_FILE_ENV] = str(node.skew_file)
        if self.mode == "loopback":
            env[FAULT_DROP_FILE_ENV] = str(node.drop_file)
        with node.log_path.open("ab") as log:
            log.write(f"--- chaos: start {' '.join(args)}\n".encode())
            log.flush()
            node.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=log, env=env)
        node.paused = False

    def node(self, name: str) -> ChaosNode:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(f"no node {name!r} (nodes: {', '.join(self.names)})")

    @property
    def names(self) -> list[str]:
        return [node.name for node in self.nodes]

    def running(self) -> list[str]:
        """The nodes whose process runs (paused ones included)."""
        return [node.name for node in self.nodes if node.pid is not None]

    def kill(self, name: str) -> None:
        """SIGKILL the node (kill -9); its data dir stays for ``restart``."""
        node = self.node(name)
        if node.process is not None and node.process.poll() is None:
            node.process.send_signal(signal.SIGKILL)
            node.process.wait(timeout=COMMAND_TIMEOUT_S)
        node.paused = False

    def restart(self, name: str) -> None:
        """Start the node again on its data dir (killing it first if it runs), joining
        through all the other nodes."""
        node = self.node(name)
        self.kill(name)
        self._launch(node, first=False)

    def pause(self, name: str) -> None:
        """SIGSTOP: the process stays, answers nothing (a GC pause, a VM stall)."""
        node = self.node(name)
        if node.pid is not None:
            os.kill(node.pid, signal.SIGSTOP)
            node.paused = True

    def resume(self, name: str) -> None:
        """SIGCONT after ``pause``."""
        node = self.node(name)
        if node.pid is not None:
            os.kill(node.pid, signal.SIGCONT)
        node.paused = False

    # -- partitions --------------------------------------------------------------------

    def partition(self, groups: Sequence[Sequence[str]]) -> None:
        """Drop all traffic between nodes of different groups, both ways (nodes within a
        group still talk). Nodes in no group form one more group together. Replaces any
        partition in force."""
        listed = [name for group in groups for name in group]
        for name in listed:
            self.node(name)
        if len(set(listed)) != len(listed):
            raise ValueError(f"a node is in two groups: {groups}")
        rest = [name for name in self.names if name not in listed]
        all_groups = [list(group) for group in groups if group] + ([rest] if rest else [])
        group_of = {name: i for i, group in enumerate(all_groups) for name in group}
        self._apply({a: frozenset(b for b in self.names if group_of[b] != group_of[a])
                     for a in self.names})

    def isolate(self, name: str) -> None:
        """Cut one node off from all the others."""
        self.partition([[name]])

    def bridge_partition(self, bridge: str | None = None) -> tuple[list[str], str, list[str]]:
        """Two halves that cannot reach each other but both reach the ``bridge`` node (a
        seeded random one if None). Returns (left half, bridge, right half)."""
        bridge = bridge or self.rng.choice(self.names)
        self.node(bridge)
        others = [name for name in self.names if name != bridge]
        self.rng.shuffle(others)
        half = (len(others) + 1) // 2
        left, right = sorted(others[:half]), sorted(others[half:])
        blocked = {name: frozenset[str]() for name in self.names}
        for a in left:
            blocked[a] = frozenset(right)
        for b in right:
            blocked[b] = frozenset(left)
        self._apply(blocked)
        return left, bridge, right

    def heal(self) -> None:
        """Remove every partition: all nodes reach each other again."""
        self._apply({name: frozenset() for name in self.names})

    def _apply(self, blocked: dict[str, frozenset[str]]) -> None:
        for node in self.nodes:
            peers = [self.node(other) for other in sorted(blocked.get(node.name, ()))]
            if self.mode == "netns":
                assert node.namespace is not None
                rules = "".join(f"-A {CHAIN} -s {p.ip} -j DROP\n-A {CHAIN} -d {p.ip} -j DROP\n"
                                for p in peers)
                _iptables_restore(node.namespace, f"*filter\n-F {CHAIN}\n{rules}COMMIT\n")
            else:
                _write_atomic(node.drop_file, "".join(f"{p.address}\n" for p in peers))
        if self.mode == "loopback":
            time.sleep(2 * REFRESH_S)  # every node has re-read its file
        self.blocked = {a: b for a, b in blocked.items() if b}

    # -- clock and disk ----------------------------------------------------------------

    def set_clock_skew(self, name: str, ms: int, *, beyond_bound: bool = False) -> None:
        """Shift the node's wall clock by ``ms`` (live, through the file its clock-skew
        hook reads). Refused beyond the documented bound (``CLOCK_SKEW_MAX_MS``, 500 ms)
        unless ``beyond_bound``; 0 removes the skew."""
        if not beyond_bound and abs(ms) > CLOCK_SKEW_MAX_MS:
            raise ValueError(f"clock skew {ms} ms is beyond the documented bound of "
                             f"{CLOCK_SKEW_MAX_MS} ms (pass beyond_bound=True to test that)")
        write_fault_skew_file(str(self.node(name).skew_file), ms)

    def fill_disk(self, name: str) -> int:
        """Fill the node's data dir (its tmpfs) until no byte is left; returns the bytes
        written. Raises ChaosUnsupported when the data dirs are not on a harness tmpfs."""
        node = self.node(name)
        if not node.disk_mounted:
            raise ChaosUnsupported(f"fill_disk: {self.disk_reason or 'no tmpfs data dir'}")
        path = node.data_dir / FILL_FILE
        written = 0
        chunk = b"\0" * (1 << 20)
        with path.open("ab") as f:
            stat = os.statvfs(node.data_dir)
            free = stat.f_bavail * stat.f_frsize
            with contextlib.suppress(OSError):
                os.posix_fallocate(f.fileno(), f.tell(), free)
                written += free
            while True:  # whatever is left (fallocate may stop short)
                try:
                    written += os.write(f.fileno(), chunk if len(chunk) > 1 else b"\0")
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    if len(chunk) == 1:
                        break
                    chunk = chunk[: len(chunk) // 2]
        return written

    def free_disk(self, name: str) -> None:
        """Delete what ``fill_disk`` wrote."""
        node = self.node(name)
        with contextlib.suppress(FileNotFoundError):
            (node.data_dir / FILL_FILE).unlink()

    # -- observing ---------------------------------------------------------------------

    def client_addresses(self) -> list[str]:
        """Every node's native client address, reachable from this process."""
        return [node.client_address for node in self.nodes]

    def members(self, name: str, timeout_s: float = 2.0) -> dict[str, str]:
        """The node's membership view: member name -> state (alive, suspect, dead, left);
        empty when it does not answer within ``timeout_s``."""
        node = self.node(name)

        async def ask() -> dict[str, str]:
            from leaderless.api.client import Client
            from leaderless.config import parse_host_port
            async with asyncio.timeout(timeout_s):
                async with Client(parse_host_port(node.address), timeout_s=timeout_s) as c:
                    return {m.name: m.state for m in await c.members()}

        try:
            view: dict[str, str] = _run_coroutine(ask)
        except Exception:  # noqa: BLE001 (unreachable, paused, starting: no view)
            return {}
        return view

    def wait_healthy(self, timeout_s: float = 60.0) -> None:
        """Wait until every node runs, is not paused, and sees every node alive. Raises
        TimeoutError naming each node's view."""
        deadline = time.monotonic() + timeout_s
        views: dict[str, dict[str, str]] = {}
        while True:
            dead = [n.name for n in self.nodes if n.pid is None]
            views = {} if dead else {name: self.members(name) for name in self.names}
            if not dead and all(len(view) >= self.n and all(
                    view.get(other) == "alive" for other in self.names)
                    for view in views.values()):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"cluster not healthy after {timeout_s:g} s: "
                    + (f"not running: {dead}" if dead else f"views: {views}")
                    + f"; logs in {self.root_dir}")
            time.sleep(0.25)

    def wait_for(self, predicate: Callable[[], bool], what: str,
                 timeout_s: float = 30.0) -> None:
        """Poll ``predicate`` until true; TimeoutError naming ``what`` otherwise."""
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout_s:g} s waiting until {what}")
            time.sleep(0.2)

    def describe(self) -> dict[str, Any]:
        """The cluster's shape, for a run's record."""
        return {"mode": self.mode, "mode_reason": self.mode_reason, "seed": self.seed,
                "tag": self.tag, "subnet": str(self.subnet) if self.subnet else None,
                "disk_faults": self.disk_reason or "available",
                "nodes": [{"name": n.name, "address": n.address,
                           "client": n.client_address, "http": n.http_address,
                           "namespace": n.namespace, "pid": n.pid} for n in self.nodes]}


# -- machine checks and helpers ---------------------------------------------------------


def netns_unavailable() -> str | None:
    """Why netns mode cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "not root"
    for tool in ("ip", "iptables-restore", "mount"):
        if shutil.which(tool) is None:
            return f"no {tool} on PATH (Debian: apt-get install iproute2 iptables)"
    probe = f"{NAME_PREFIX}{os.getpid()}probe{next(_instances)}"
    made = _run(["ip", "netns", "add", probe], check=False)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    try:
        rule = _run(["ip", "netns", "exec", probe, "iptables-restore", "-n"], check=False,
                    stdin="*filter\n-A INPUT -s 192.0.2.255 -j DROP\nCOMMIT\n")
        if rule.returncode != 0:
            return f"iptables in a namespace failed: {rule.stderr.strip()}"
    finally:
        _run(["ip", "netns", "del", probe], check=False)
    return None


def sweep_leftovers() -> list[str]:
    """Unmount tmpfs data dirs and delete namespaces and links named ``llc<pid>...``
    whose process is gone (a run killed before its cleanup); returns what was deleted."""
    deleted = []
    mounts = Path("/proc/mounts").read_text() if Path("/proc/mounts").exists() else ""
    for line in mounts.splitlines():
        source, target = (line.split(" ") + ["", ""])[:2]
        if _is_orphan(source):
            target = target.replace("\\040", " ")
            if _run(["umount", target], check=False).returncode != 0:
                _run(["umount", "-l", target], check=False)
            deleted.append(f"{source} on {target}")
    names = _run(["ip", "netns", "list"], check=False).stdout.split("\n")
    for line in names:
        ns = line.split(" ")[0]
        if _is_orphan(ns):
            _run(["ip", "netns", "del", ns], check=False)
            deleted.append(ns)
    for link in sorted(os.listdir("/sys/class/net")) if os.path.isdir("/sys/class/net") else []:
        if _is_orphan(link) and os.path.exists(f"/sys/class/net/{link}"):
            _run(["ip", "link", "del", link], check=False)
            deleted.append(link)
    return deleted


def _is_orphan(name: str) -> bool:
    match = _tag_re.match(name)
    if match is None:
        return False
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _free_subnet() -> ipaddress.IPv4Network:
    used: list[ipaddress.IPv4Network] = []
    for cmd in (["ip", "-o", "-4", "addr", "show"], ["ip", "-4", "route", "show", "table", "all"]):
        for token in _run(cmd).stdout.split():
            with contextlib.suppress(ValueError):
                if "/" in token or token.count(".") == 3:
                    used.append(ipaddress.IPv4Network(token, strict=False))
    start = os.getpid() % 250
    for k in itertools.chain(range(start, 250), range(start)):
        candidate = ipaddress.IPv4Network(f"{SUBNET_BASE}.{k}.0/24")
        if not any(candidate.overlaps(net) for net in used if net.prefixlen >= 8):
            return candidate
    raise ChaosUnsupported(f"no free /24 in {SUBNET_BASE}.0.0/16 on this machine")


@contextlib.contextmanager
def _net_lock() -> Any:
    with LOCK_PATH.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _iptables_restore(namespace: str, rules: str) -> None:
    _run(["ip", "netns", "exec", namespace, "iptables-restore", "-n"], stdin=rules)


def _run(cmd: Sequence[str], *, check: bool = True, stdin: str | None = None
         ) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(list(cmd), capture_output=True, text=True, input=stdin,
                              timeout=COMMAND_TIMEOUT_S)
    except FileNotFoundError as exc:  # the tool is not installed
        done = subprocess.CompletedProcess(list(cmd), 127, "", str(exc))
    if check and done.returncode != 0:
        raise ChaosUnsupported(f"{' '.join(cmd)} failed ({done.returncode}): "
                               f"{done.stderr.strip()}")
    return done


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _letters(i: int) -> str:
    out = ""
    while True:
        out = chr(ord("a") + i % 26) + out
        i = i // 26 - 1
        if i < 0:
            return out


def _run_coroutine(factory: Callable[[], Any]) -> Any:
    """Run ``factory()``'s coroutine to the end, also when called from a running loop
    (then on a helper thread)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    result: list[Any] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(factory()))
        except BaseException as exc:  # noqa: BLE001 (re-raised on the caller's thread)
            error.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
