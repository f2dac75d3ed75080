"""Side by side: leaderless vs a 3-member etcd vs a single Redis, one load generator.

    .venv/bin/python bench/peers.py                   # 3 rounds, then 3 kill trials each
    .venv/bin/python bench/peers.py --quick           # short smoke run (1 round, 3 s phases)
    .venv/bin/python bench/peers.py --json            # one JSON object on stdout
    .venv/bin/python bench/peers.py --systems leaderless,etcd --no-availability

Every system is started by the bench on loopback (free ports, data in a temp dir, all
stopped and removed at the end, also on failure) and driven by the same load generator:
one Python process, one asyncio loop (uvloop when installed), a fixed number of client
tasks (``--concurrency``, 64) each issuing one request after another, 100-byte values over
``--keys`` (10,000) keys, ``--warmup`` (2 s) not measured then ``--duration`` (10 s)
measured, latencies in an HDR histogram (``hdrhistogram`` from PyPI; exact sorted lists
when it is missing). After an error a task waits 10 ms before its next request (all
systems alike) so a refused connection does not spin the loop.

The systems (all up for the whole run, so idle ones cost a little CPU too):

- ``leaderless-quorum``, ``leaderless-strong``: one 3-node cluster (``leaderless node start``,
  RocksDB, default fsync, first members ``--no-bootstrap``), keyspaces ``peers_q`` (eventual,
  N=3, QUORUM reads and writes) and ``peers_s`` (strong, N=3: each put a CASPaxos round);
  the token-aware ``leaderless.client.AsyncClient``.
- ``etcd``: 3 members of Debian's etcd (``etcd`` on PATH), driven through its v3 HTTP/JSON
  gateway (``/v3/kv/put``, ``/v3/kv/range``: linearizable reads, etcd's default) with
  aiohttp, one connection pool per member and requests spread round-robin over members
  (etcd forwards writes to its leader); a member that refuses a connection is skipped for 1 s.
- ``redis``: one Debian ``redis-server``, no persistence (``--save '' --appendonly no``):
  the no-replication ceiling; ``redis-aof``: one more with ``--appendonly yes
  --appendfsync everysec``. Client: ``redis.asyncio`` with a pool of ``--concurrency``.

Throughput rounds are interleaved: each round runs put then get on every system (the order
of systems rotates each round), and the report gives the median and the spread of the
rounds, so a burst of foreign CPU load on the shared machine hits one round, not one
system. Each phase also records the CPU the load generator and the system's servers used
(psutil), and the load average: with two cores shared by everything, a generator at one
full core is the bottleneck and the figure is a floor.

Availability (``--no-availability`` skips it): per trial a fresh cluster, a steady put
load for ``--avail-duration`` (20 s) at the same concurrency, and at ``--kill-at`` (7 s)
a SIGKILL of one node (leaderless: node3 of 3, the client keeps the other two; etcd: the
current leader, found via ``/v3/maintenance/status``). The gap is the longest interval
with no successful op (from per-op completion times over the measured window), next to the
longest such interval before the kill (the no-fault baseline) and the errors.

Results: a markdown table on stdout (or ``--json``), bench/results/peers.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil
from processes import free_ports, spawn, stop, stop_all, wait_alive

from leaderless.client import AsyncClient, LeaderlessError

RESULTS = Path(__file__).parent / "results" / "peers.json"
KS_QUORUM = "peers_q"
KS_STRONG = "peers_s"
ERROR_PAUSE_S = 0.01
OP_TIMEOUT_S = 5.0
SYSTEMS = ("leaderless-quorum", "leaderless-strong", "etcd", "redis", "redis-aof")
clock = time.perf_counter  # not loop.time(): uvloop's loop clock has millisecond resolution


# -- latency histogram --------------------------------------------------------------------


class Latencies:
    """HDR histogram of microseconds (3 significant digits), or an exact list."""

    def __init__(self) -> None:
        try:
            from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]
            self._hdr: Any = HdrHistogram(1, 120_000_000, 3)
            self._exact: list[int] | None = None
        except ImportError:
            self._hdr, self._exact = None, []
        self.kind = "hdr" if self._hdr is not None else "exact"

    def record(self, seconds: float) -> None:
        us = max(1, int(seconds * 1e6))
        if self._hdr is not None:
            self._hdr.record_value(us)
        else:
            assert self._exact is not None
            self._exact.append(us)

    def count(self) -> int:
        return int(self._hdr.get_total_count()) if self._hdr is not None else len(
            self._exact or [])

    def ms(self, percentile: float) -> float:
        if not self.count():
            return float("nan")
        if self._hdr is not None:
            return round(float(self._hdr.get_value_at_percentile(percentile)) / 1000, 3)
        values = sorted(self._exact or [])
        rank = max(0, min(len(values) - 1, int(round(percentile / 100 * len(values))) - 1))
        return round(values[rank] / 1000, 3)


# -- processes ------------------------------------------------------------------------------


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            for p in [proc, *proc.children(recursive=True)]:
                t = p.cpu_times()
                total += t.user + t.system
        except psutil.Error:
            pass
    return total


# -- the systems ----------------------------------------------------------------------------


class LeaderlessCluster:
    def __init__(self, workdir: Path, n: int = 3) -> None:
        self.workdir = workdir
        self.n = n
        self.procs: list[subprocess.Popen[bytes]] = []
        self.clients: list[str] = []

    def start(self) -> None:
        exe = Path(sys.executable).parent / "leaderless"
        ports = free_ports(3 * self.n)
        seed = f"127.0.0.1:{ports[0]}"
        for i in range(self.n):
            bind, client, http = ports[3 * i: 3 * i + 3]
            name = f"node{i + 1}"
            data = self.workdir / name
            data.mkdir(parents=True, exist_ok=True)
            cmd = [str(exe), "node", "start", "--name", name, "--bind", f"127.0.0.1:{bind}",
                   "--client", f"127.0.0.1:{client}", "--http", f"127.0.0.1:{http}",
                   "--data-dir", str(data), "--log-level", "warning", "--no-bootstrap",
                   "--parent-pid", str(os.getpid())]
            if i:
                cmd += ["--join", seed]
            self.procs.append(spawn(cmd, self.workdir / f"{name}.log"))
            self.clients.append(f"127.0.0.1:{client}")

    async def ready(self, timeout_s: float = 60) -> None:
        await wait_alive(self.clients, self.n, timeout_s)
        async with AsyncClient(self.clients, ring_refresh_s=0) as kv:
            await kv.create_keyspace(KS_QUORUM, 3, "eventual", read_consistency="QUORUM",
                                     write_consistency="QUORUM", if_not_exists=True)
            await kv.create_keyspace(KS_STRONG, 3, "strong", if_not_exists=True)
        await asyncio.sleep(1.0)  # let the schema spread

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.poll() is None]

    def stop(self) -> None:
        stop(self.procs)


class EtcdCluster:
    def __init__(self, workdir: Path, n: int = 3) -> None:
        self.workdir = workdir
        self.n = n
        self.procs: list[subprocess.Popen[bytes]] = []
        self.endpoints: list[str] = []

    def start(self) -> None:
        ports = free_ports(2 * self.n)
        names = [f"e{i}" for i in range(self.n)]
        cluster = ",".join(f"{name}=http://127.0.0.1:{ports[2 * i + 1]}"
                           for i, name in enumerate(names))
        for i, name in enumerate(names):
            client, peer = ports[2 * i], ports[2 * i + 1]
            cmd = ["etcd", "--name", name, "--data-dir", str(self.workdir / name),
                   "--listen-client-urls", f"http://127.0.0.1:{client}",
                   "--advertise-client-urls", f"http://127.0.0.1:{client}",
                   "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                   "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                   "--initial-cluster", cluster, "--initial-cluster-state", "new",
                   "--initial-cluster-token", f"peers-{os.getpid()}",
                   "--logger", "zap", "--log-level", "warn"]
            self.procs.append(spawn(cmd, self.workdir / f"{name}.log"))
            self.endpoints.append(f"http://127.0.0.1:{client}")

    async def leader(self, timeout_s: float = 30) -> int:
        """Index of the member that is the leader (it says leader == its own member id)."""
        import aiohttp
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as http:
            while time.monotonic() < deadline:
                for i, url in enumerate(self.endpoints):
                    if self.procs[i].poll() is not None:
                        continue
                    try:
                        async with http.post(url + "/v3/maintenance/status", json={}) as r:
                            status = await r.json()
                        if status.get("leader") == status["header"]["member_id"]:
                            return i
                    except (aiohttp.ClientError, TimeoutError, KeyError, ValueError):
                        pass
                await asyncio.sleep(0.2)
        raise RuntimeError(f"etcd elected no leader in {timeout_s:.0f} s (logs: "
                           f"{self.workdir})")

    async def ready(self) -> None:
        await self.leader()

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.poll() is None]

    def stop(self) -> None:
        stop(self.procs)


class RedisServer:
    def __init__(self, workdir: Path, aof: bool) -> None:
        self.workdir = workdir
        self.aof = aof
        self.procs: list[subprocess.Popen[bytes]] = []
        self.port = 0

    def start(self) -> None:
        self.port = free_ports(1)[0]
        name = "redis-aof" if self.aof else "redis"
        data = self.workdir / name
        data.mkdir(parents=True, exist_ok=True)
        persistence = (["--appendonly", "yes", "--appendfsync", "everysec"] if self.aof
                       else ["--appendonly", "no"])
        cmd = ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port),
               "--save", "", *persistence, "--dir", str(data), "--protected-mode", "no",
               "--loglevel", "warning"]
        self.procs.append(spawn(cmd, self.workdir / f"{name}.log"))

    async def ready(self, timeout_s: float = 20) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                return
            except OSError:
                await asyncio.sleep(0.1)
        raise RuntimeError(f"redis-server did not listen in {timeout_s:.0f} s")

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.poll() is None]

    def stop(self) -> None:
        stop(self.procs)


# -- clients: put/get of bytes on every system -------------------------------------------


class Target:
    """What the load generator drives: ``put(i)``/``get(i)`` on key number ``i``."""

    name = ""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def put(self, i: int) -> None:
        raise NotImplementedError

    async def get(self, i: int) -> None:
        raise NotImplementedError


class LeaderlessTarget(Target):
    def __init__(self, name: str, cluster: LeaderlessCluster, keyspace: str, keys: int,
                 value: bytes) -> None:
        self.name, self.cluster, self.keyspace, self.value = name, cluster, keyspace, value
        self.keys = [b"k%08d" % i for i in range(keys)]
        self.kv: AsyncClient | None = None

    async def open(self) -> None:
        self.kv = AsyncClient(self.cluster.clients, timeout_s=OP_TIMEOUT_S)
        await self.kv.connect()

    async def close(self) -> None:
        if self.kv is not None:
            await self.kv.close()

    async def put(self, i: int) -> None:
        assert self.kv is not None
        await self.kv.put(self.keyspace, self.keys[i], self.value)

    async def get(self, i: int) -> None:
        assert self.kv is not None
        await self.kv.get(self.keyspace, self.keys[i])


class EtcdError(Exception):
    pass


class EtcdTarget(Target):
    """The v3 JSON gateway: a pool per member, requests round-robin over live members."""

    name = "etcd"

    def __init__(self, cluster: EtcdCluster, keys: int, value: bytes, pool: int) -> None:
        self.cluster, self.pool = cluster, pool
        b64 = base64.b64encode
        self.put_bodies = [json.dumps({"key": b64(b"k%08d" % i).decode(),
                                       "value": b64(value).decode()}).encode()
                           for i in range(keys)]
        self.get_bodies = [json.dumps({"key": b64(b"k%08d" % i).decode()}).encode()
                           for i in range(keys)]
        self.sessions: list[Any] = []
        self.down_until = [0.0] * len(cluster.endpoints)
        self.next = 0

    async def open(self) -> None:
        import aiohttp
        timeout = aiohttp.ClientTimeout(total=OP_TIMEOUT_S)
        self.sessions = [aiohttp.ClientSession(
            base_url=url, timeout=timeout, headers={"Content-Type": "application/json"},
            connector=aiohttp.TCPConnector(limit=self.pool)) for url in self.cluster.endpoints]

    async def close(self) -> None:
        for s in self.sessions:
            await s.close()

    def _member(self) -> int:
        now = clock()
        for _ in range(len(self.sessions)):
            m = self.next
            self.next = (self.next + 1) % len(self.sessions)
            if self.down_until[m] <= now:
                return m
        return self.next

    async def _call(self, path: str, body: bytes) -> dict[str, Any]:
        import aiohttp
        m = self._member()
        try:
            async with self.sessions[m].post(path, data=body) as r:
                reply: dict[str, Any] = await r.json(content_type=None)
                status = r.status
        except aiohttp.ClientConnectionError:
            self.down_until[m] = clock() + 1.0
            raise
        if status != 200 or "error" in reply:
            raise EtcdError(str(reply.get("error") or reply.get("message") or status))
        return reply

    async def put(self, i: int) -> None:
        await self._call("/v3/kv/put", self.put_bodies[i])

    async def get(self, i: int) -> None:
        await self._call("/v3/kv/range", self.get_bodies[i])


class RedisTarget(Target):
    def __init__(self, name: str, server: RedisServer, keys: int, value: bytes,
                 pool: int) -> None:
        self.name, self.server, self.value, self.pool = name, server, value, pool
        self.keys = [b"k%08d" % i for i in range(keys)]
        self.client: Any = None

    async def open(self) -> None:
        import redis.asyncio as aioredis
        pool = aioredis.BlockingConnectionPool(host="127.0.0.1", port=self.server.port,
                                               max_connections=self.pool,
                                               socket_timeout=OP_TIMEOUT_S)
        self.client = aioredis.Redis(connection_pool=pool)
        await self.client.ping()

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    async def put(self, i: int) -> None:
        await self.client.set(self.keys[i], self.value)

    async def get(self, i: int) -> None:
        await self.client.get(self.keys[i])


# -- the load generator ---------------------------------------------------------------------


async def load(target: Target, op: str, concurrency: int, warmup_s: float, duration_s: float,
               keys: int, server_pids: Callable[[], list[int]], seed: int,
               on_measure: Callable[[float], Awaitable[None]] | None = None,
               keep_times: bool = False) -> dict[str, Any]:
    """Closed loop: ``concurrency`` tasks, each one request after another."""
    import random
    rng = random.Random(seed)
    lat = Latencies()
    errors: Counter[str] = Counter()
    times: list[float] = []
    call = target.put if op == "put" else target.get
    start = clock()
    measure_from = start + warmup_s
    end = measure_from + duration_s
    done = 0
    snap: dict[str, float] = {}

    async def client() -> None:
        nonlocal done
        while (began := clock()) < end:
            try:
                await asyncio.wait_for(call(rng.randrange(keys)), OP_TIMEOUT_S + 1)
            except Exception as exc:  # noqa: BLE001 (any failure of any client is an error)
                errors[type(exc).__name__ + (f": {exc.code}" if isinstance(
                    exc, LeaderlessError) else "")] += 1
                await asyncio.sleep(ERROR_PAUSE_S)
                continue
            now = clock()
            if began >= measure_from and now <= end:
                lat.record(now - began)
                done += 1
            if keep_times and now >= measure_from:
                times.append(now)

    async def meter() -> None:
        await asyncio.sleep(max(0.0, measure_from - clock()))
        snap.update(gen=time.process_time(), srv=cpu_seconds(server_pids()), t=clock())
        if on_measure is not None:
            await on_measure(measure_from)
        await asyncio.sleep(max(0.0, end - clock()))
        snap.update(gen_end=time.process_time(), srv_end=cpu_seconds(server_pids()),
                    t_end=clock())

    await asyncio.gather(meter(), *(client() for _ in range(concurrency)))
    wall = snap["t_end"] - snap["t"]
    row = {
        "system": target.name, "op": op, "concurrency": concurrency,
        "ops_per_s": round(done / duration_s), "ops": done,
        "p50_ms": lat.ms(50), "p99_ms": lat.ms(99), "p999_ms": lat.ms(99.9),
        "errors": dict(errors), "histogram": lat.kind,
        "generator_cpu": round((snap["gen_end"] - snap["gen"]) / wall, 2),
        "server_cpu": round((snap["srv_end"] - snap["srv"]) / wall, 2),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }
    if keep_times:
        row["_times"] = times
        row["_window"] = (measure_from, end)
    return row


async def preload(target: Target, keys: int, concurrency: int) -> None:
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            for attempt in range(5):
                try:
                    await target.put(i)
                    return
                except Exception:  # noqa: BLE001 (retried, then raised)
                    if attempt == 4:
                        raise
                    await asyncio.sleep(0.2)

    await asyncio.gather(*(one(i) for i in range(keys)))


# -- throughput rounds ------------------------------------------------------------------------


def make_targets(systems: list[str], servers: dict[str, Any], opts: argparse.Namespace,
                 value: bytes) -> list[tuple[Target, Any]]:
    out: list[tuple[Target, Any]] = []
    for name in systems:
        if name == "leaderless-quorum":
            out.append((LeaderlessTarget(name, servers["leaderless"], KS_QUORUM, opts.keys,
                                         value), servers["leaderless"]))
        elif name == "leaderless-strong":
            out.append((LeaderlessTarget(name, servers["leaderless"], KS_STRONG, opts.keys,
                                         value), servers["leaderless"]))
        elif name == "etcd":
            out.append((EtcdTarget(servers["etcd"], opts.keys, value, opts.concurrency),
                        servers["etcd"]))
        elif name in ("redis", "redis-aof"):
            out.append((RedisTarget(name, servers[name], opts.keys, value,
                                    opts.concurrency), servers[name]))
    return out


async def throughput(systems: list[str], workdir: Path, opts: argparse.Namespace
                     ) -> list[dict[str, Any]]:
    servers: dict[str, Any] = {}
    if any(s.startswith("leaderless") for s in systems):
        servers["leaderless"] = LeaderlessCluster(workdir / "leaderless")
    if "etcd" in systems:
        servers["etcd"] = EtcdCluster(workdir / "etcd")
    for name in ("redis", "redis-aof"):
        if name in systems:
            servers[name] = RedisServer(workdir, aof=name == "redis-aof")
    for s in servers.values():
        s.workdir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    try:
        for s in servers.values():
            s.start()
        for s in servers.values():
            await s.ready()
        value = os.urandom(opts.value_bytes)
        targets = make_targets(systems, servers, opts, value)
        for t, _ in targets:
            await t.open()
        try:
            for t, _ in targets:
                began = clock()
                await preload(t, opts.keys, opts.concurrency)
                log(opts, f"preloaded {opts.keys} keys into {t.name} in {clock() - began:.1f} s")
            for rnd in range(opts.rounds):
                shift = rnd % len(targets)
                for t, server in targets[shift:] + targets[:shift]:
                    for op in ("put", "get"):
                        row = await load(t, op, opts.concurrency, opts.warmup, opts.duration,
                                         opts.keys, server.pids, seed=rnd)
                        row["round"] = rnd + 1
                        rows.append(row)
                        log(opts, f"round {rnd + 1} {t.name:<18} {op}: "
                                  f"{row['ops_per_s']:>6} ops/s p50 {row['p50_ms']} ms "
                                  f"p99 {row['p99_ms']} ms errors {sum(row['errors'].values())}"
                                  f" gen {row['generator_cpu']} srv {row['server_cpu']} cores"
                                  f" load {row['loadavg_1m']}")
        finally:
            for t, _ in targets:
                await t.close()
    finally:
        for s in servers.values():
            s.stop()
    return rows


# -- availability ------------------------------------------------------------------------------


def gaps(times: list[float], start: float, end: float, kill_at: float) -> dict[str, Any]:
    """The longest stretch with no successful op: before the kill, and from the kill on."""
    points = sorted(t for t in times if start <= t <= end)
    before = [start, *(t for t in points if t < kill_at), kill_at]
    # The stretch that spans the kill: from the last success before it to the first after.
    last_before = max((t for t in points if t < kill_at), default=start)
    after_span = [last_before, *(t for t in points if t >= kill_at), end]

    def longest(seq: list[float]) -> float:
        return max((b - a for a, b in zip(seq, seq[1:], strict=False)), default=0.0)

    bins = [0] * int((end - start) * 10 + 1)
    for t in points:
        bins[int((t - start) * 10)] += 1
    pre = sum(1 for t in points if t < kill_at) / max(1e-9, kill_at - start)
    post = sum(1 for t in points if t >= kill_at + 1.0) / max(1e-9, end - kill_at - 1.0)
    return {"longest_gap_ms": round(longest(after_span) * 1000, 1),
            "baseline_longest_gap_ms": round(longest(before) * 1000, 1),
            "ops_per_s_before_kill": round(pre), "ops_per_s_from_1s_after_kill": round(post),
            "ops_per_100ms": bins}


async def availability_trial(system: str, workdir: Path, opts: argparse.Namespace,
                             trial: int) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    value = os.urandom(opts.value_bytes)
    server: Any
    target: Target
    if system == "etcd":
        server = EtcdCluster(workdir)
    else:
        server = LeaderlessCluster(workdir)
    try:
        server.start()
        await server.ready()
        if isinstance(server, EtcdCluster):
            target = EtcdTarget(server, opts.keys, value, opts.concurrency)
        else:
            ks = KS_QUORUM if system == "leaderless-quorum" else KS_STRONG
            target = LeaderlessTarget(system, server, ks, opts.keys, value)
        await target.open()
        killed: dict[str, Any] = {}

        async def kill(measure_from: float) -> None:
            if isinstance(server, EtcdCluster):
                victim = await server.leader()
                killed["name"] = f"leader e{victim}"
            else:
                victim = server.n - 1
                killed["name"] = f"node{victim + 1} of {server.n}"
            await asyncio.sleep(max(0.0, measure_from + opts.kill_at - clock()))
            killed["at"] = clock()
            server.procs[victim].send_signal(signal.SIGKILL)

        try:
            row = await load(target, "put", opts.concurrency, opts.warmup,
                             opts.avail_duration, opts.keys, server.pids, seed=trial,
                             on_measure=lambda t: kill(t), keep_times=True)
        finally:
            await target.close()
    finally:
        server.stop()
    start, end = row.pop("_window")
    result = {"system": system, "trial": trial + 1, "killed": killed.get("name"),
              "kill_at_s": round(killed["at"] - start, 2), "errors": row["errors"],
              "ops": row["ops"], "p99_ms": row["p99_ms"],
              **gaps(row.pop("_times"), start, end, killed["at"])}
    return result


async def availability(systems: list[str], workdir: Path, opts: argparse.Namespace
                       ) -> list[dict[str, Any]]:
    plan = [s for s in ("leaderless-quorum", "leaderless-strong", "etcd") if s in systems]
    trials = []
    for trial in range(opts.avail_rounds):
        for system in plan:  # interleaved: one trial of each system per round
            result = await availability_trial(system, workdir / f"avail-{system}-{trial}",
                                              opts, trial)
            trials.append(result)
            log(opts, f"kill trial {trial + 1} {system:<18} killed {result['killed']}: "
                      f"longest gap {result['longest_gap_ms']} ms (before the kill "
                      f"{result['baseline_longest_gap_ms']} ms), errors "
                      f"{sum(result['errors'].values())}, ops/s "
                      f"{result['ops_per_s_before_kill']} -> "
                      f"{result['ops_per_s_from_1s_after_kill']}")
    return trials


# -- report ---------------------------------------------------------------------------------


def log(opts: argparse.Namespace, text: str) -> None:
    print(text, file=sys.stderr if opts.json else sys.stdout, flush=True)


def summarize(rows: list[dict[str, Any]], trials: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for r in rows:
        summary.setdefault(f"{r['system']} {r['op']}", []).append(r)
    out: dict[str, Any] = {}
    for key, rs in summary.items():
        ops = [r["ops_per_s"] for r in rs]
        out[key] = {
            "system": rs[0]["system"], "op": rs[0]["op"], "rounds": len(rs),
            "ops_per_s": round(statistics.median(ops)), "ops_per_s_min": min(ops),
            "ops_per_s_max": max(ops),
            "p50_ms": round(statistics.median(r["p50_ms"] for r in rs), 3),
            "p99_ms": round(statistics.median(r["p99_ms"] for r in rs), 3),
            "p99_ms_min": min(r["p99_ms"] for r in rs),
            "p99_ms_max": max(r["p99_ms"] for r in rs),
            "errors": sum(sum(r["errors"].values()) for r in rs),
            "generator_cpu": round(statistics.median(r["generator_cpu"] for r in rs), 2),
            "server_cpu": round(statistics.median(r["server_cpu"] for r in rs), 2),
        }
    for v in out.values():
        for ref in ("etcd", "redis"):
            base = out.get(f"{ref} {v['op']}")
            if base and base["ops_per_s"]:
                v[f"ops_vs_{ref}"] = round(v["ops_per_s"] / base["ops_per_s"], 2)
                v[f"p50_vs_{ref}"] = round(v["p50_ms"] / base["p50_ms"], 2)
                v[f"p99_vs_{ref}"] = round(v["p99_ms"] / base["p99_ms"], 2)
    avail: dict[str, Any] = {}
    for t in trials:
        a = avail.setdefault(t["system"], {"trials": 0, "longest_gap_ms": [],
                                           "baseline_longest_gap_ms": [], "errors": []})
        a["trials"] += 1
        a["longest_gap_ms"].append(t["longest_gap_ms"])
        a["baseline_longest_gap_ms"].append(t["baseline_longest_gap_ms"])
        a["errors"].append(sum(t["errors"].values()))
    return {"by_system_op": out, "availability": avail}


def fmt(x: Any) -> str:
    return "-" if x is None else str(x)


def markdown(summary: dict[str, Any]) -> str:
    lines = ["| system | op | ops/s (median, min-max) | p50 ms | p99 ms (median, min-max) | "
             "ops/s ×etcd | ops/s ×Redis | p50 ×etcd | p99 ×etcd | p50 ×Redis | p99 ×Redis | "
             "errors | gen CPU | server CPU |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for op in ("put", "get"):
        for v in summary["by_system_op"].values():
            if v["op"] != op:
                continue
            lines.append(
                f"| {v['system']} | {op} | {v['ops_per_s']} ({v['ops_per_s_min']}-"
                f"{v['ops_per_s_max']}) | {v['p50_ms']} | {v['p99_ms']} ({v['p99_ms_min']}-"
                f"{v['p99_ms_max']}) | {fmt(v.get('ops_vs_etcd'))} | "
                f"{fmt(v.get('ops_vs_redis'))} | {fmt(v.get('p50_vs_etcd'))} | "
                f"{fmt(v.get('p99_vs_etcd'))} | {fmt(v.get('p50_vs_redis'))} | "
                f"{fmt(v.get('p99_vs_redis'))} | {v['errors']} | {v['generator_cpu']} | "
                f"{v['server_cpu']} |")
    if summary["availability"]:
        lines += ["", "| system (one node killed) | trials | longest gap with no successful "
                  "put, ms (per trial) | longest gap before the kill, ms | errors (per trial) |",
                  "|---|---|---|---|---|"]
        for system, a in summary["availability"].items():
            lines.append(f"| {system} | {a['trials']} | "
                         f"{', '.join(map(str, a['longest_gap_ms']))} | "
                         f"{', '.join(map(str, a['baseline_longest_gap_ms']))} | "
                         f"{', '.join(map(str, a['errors']))} |")
    return "\n".join(lines)


def goals(summary: dict[str, Any]) -> list[str]:
    out = []
    by = summary["by_system_op"]
    q, e = by.get("leaderless-quorum put"), by.get("etcd put")
    if q and e:
        ratio = q["ops_per_s"] / e["ops_per_s"] if e["ops_per_s"] else float("inf")
        out.append(f"QUORUM put throughput >= etcd's: {'met' if ratio >= 1 else 'missed'} "
                   f"(median {q['ops_per_s']} vs {e['ops_per_s']} ops/s, x{ratio:.2f}; "
                   f"rounds {q['ops_per_s_min']}-{q['ops_per_s_max']} vs "
                   f"{e['ops_per_s_min']}-{e['ops_per_s_max']})")
    av = summary["availability"]
    if "etcd" in av:
        etcd_gap = min(av["etcd"]["longest_gap_ms"])
        for system in ("leaderless-quorum", "leaderless-strong"):
            if system in av:
                worst = max(av[system]["longest_gap_ms"])
                verdict = "met" if worst < 1000 and worst < etcd_gap else "missed"
                out.append(f"no pause where etcd pauses ({system}): {verdict} (longest gap "
                           f"{worst} ms at worst vs etcd's {etcd_gap} ms at best; "
                           f"no-fault gaps {max(av[system]['baseline_longest_gap_ms'])} ms)")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help=f"comma-separated, of {', '.join(SYSTEMS)}")
    parser.add_argument("--rounds", type=int, default=3,
                        help="throughput rounds (0: only the kill trials)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=10.0, help="measured s per phase")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--value-bytes", type=int, default=100)
    parser.add_argument("--no-availability", action="store_true")
    parser.add_argument("--avail-rounds", type=int, default=None,
                        help="kill trials per system (default: --rounds)")
    parser.add_argument("--avail-duration", type=float, default=20.0)
    parser.add_argument("--kill-at", type=float, default=7.0,
                        help="seconds into the measured window")
    parser.add_argument("--quick", action="store_true", help="1 round, 3 s phases")
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the temp dir with the servers' logs and data")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--out", default=str(RESULTS))
    opts = parser.parse_args()
    if opts.quick:
        opts.rounds, opts.duration, opts.warmup, opts.keys = 1, 3.0, 1.0, 2000
        opts.avail_duration, opts.kill_at = min(opts.avail_duration, 8.0), 3.0
    opts.avail_rounds = opts.rounds if opts.avail_rounds is None else opts.avail_rounds
    systems = [s.strip() for s in opts.systems.split(",") if s.strip()]
    if unknown := set(systems) - set(SYSTEMS):
        parser.error(f"unknown systems {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    missing = {"etcd": "etcd", "redis": "redis-server", "redis-aof": "redis-server"}
    for system, exe in missing.items():
        if system in systems and not shutil.which(exe):
            log(opts, f"{exe} is not on PATH (apt-get install -y "
                      f"{'etcd-server' if exe == 'etcd' else 'redis-server'}): "
                      f"{system} is skipped")
            systems.remove(system)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # atexit stops the servers

    try:
        import uvloop
        loop_factory: Any = uvloop.new_event_loop
    except ImportError:
        loop_factory = asyncio.new_event_loop
    workdir = Path(tempfile.mkdtemp(prefix="leaderless-peers-"))
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            rows = (runner.run(throughput(systems, workdir, opts))
                    if opts.rounds else [])
            trials = ([] if opts.no_availability else
                      runner.run(availability(systems, workdir, opts)))
    finally:
        stop_all()
        if opts.keep_logs:
            log(opts, f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    summary = summarize(rows, trials)
    table = markdown(summary)
    verdicts = goals(summary)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip())
    versions = {
        "etcd": subprocess.run(["etcd", "--version"], capture_output=True, text=True
                               ).stdout.split("\n")[0] if shutil.which("etcd") else None,
        "redis": subprocess.run(["redis-server", "--version"], capture_output=True, text=True
                                ).stdout.strip() if shutil.which("redis-server") else None,
        "event_loop": "uvloop" if loop_factory is not asyncio.new_event_loop else "asyncio",
    }
    result = {"benchmark": "peers", "commit": commit, "worktree_dirty": dirty,
              "cpus": os.cpu_count(), "systems": systems, "versions": versions,
              "concurrency": opts.concurrency, "keys": opts.keys,
              "value_bytes": opts.value_bytes, "warmup_s": opts.warmup,
              "duration_s": opts.duration, "rounds": opts.rounds,
              "avail_duration_s": opts.avail_duration, "kill_at_s": opts.kill_at,
              "summary": summary, "goals": verdicts, "runs": rows, "kill_trials": trials,
              "table": table}
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if opts.json:
        print(json.dumps(result))
    else:
        print()
        print(table)
        print()
        for v in verdicts:
            print(f"- {v}")
    log(opts, f"wrote {out}")


if __name__ == "__main__":
    main()
