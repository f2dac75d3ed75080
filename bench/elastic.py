"""Elastic benchmark: add a 4th node (bootstrap streaming) to a loaded 3-node cluster.

    .venv/bin/python bench/elastic.py                   # 1024 MB of data, 4 KiB values
    .venv/bin/python bench/elastic.py --data-mb 64      # a smoke run
    .venv/bin/python bench/elastic.py --json            # also print the result as JSON

What it does (issue 10, Benchmarks):

1. starts 3 real node processes (RocksDB in a temp dir; the first members with
   ``--no-bootstrap``), creates keyspace ``elastic`` (N=3, QUORUM) and loads ``--data-mb``
   of logical data (``--value-bytes`` values, written at QUORUM by ``--load-procs``
   processes with many requests in flight each; loading is not measured);
2. baseline: a foreground open-loop QUORUM load (``--rate`` ops/s, half gets of loaded
   keys, half puts of new keys) for ``--baseline-s``; latency measured from each request's
   scheduled start (no coordinated omission), percentiles from the sorted samples;
3. starts a 4th node with bootstrap (``--join SEED``, no ``--no-bootstrap``) while the same
   load runs; measures the time from its start to its ring state ``normal`` (its
   ``ring.json``), the bytes it streamed (its ``stream_bytes_in`` counter on /metrics) and
   the foreground p50/p99 from its start until normal; optionally profiles the joiner with
   py-spy during the stream;
4. measures the raw sequential write speed of the same filesystem (``dd ... oflag=direct``,
   512 MiB; a Python write+fsync loop if dd fails);
5. reports streaming MB/s as a fraction of the raw disk speed, time to add the node, the
   p99 ratio during streaming vs baseline, and the foreground's read misses (a get of an
   acknowledged key that returns nothing), wrong values and errors (all expected 0).

Results: a markdown table on stdout and bench/results/elastic.json. Every process and the
temp dir are removed at the end, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from processes import free_ports, stop, wait_alive

from leaderless.client import AsyncClient, LeaderlessError

RESULTS = Path(__file__).parent / "results" / "elastic.json"
KEYSPACE = "elastic"
NOISE_BYTES = 1 << 20
"""Random bytes that values are cut from (incompressible, different per key)."""
LOAD_IN_FLIGHT = 256
"""Requests in flight per loading process."""
FOREGROUND_LANES = 128
"""Requests in flight at most in the foreground open-loop load."""


def value_for(noise: bytes, i: int, value_bytes: int) -> bytes:
    """The loaded value of key i: deterministic, so a read can be checked."""
    offset = (i * 4099) % (len(noise) - value_bytes)
    return b"%010d" % i + noise[offset + 10: offset + value_bytes]


def key_for(i: int) -> bytes:
    return b"k%09d" % i


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def run_loop(coro: Any) -> Any:
    try:
        import uvloop
        factory: Any = uvloop.new_event_loop
    except ImportError:
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


# -- loading (worker processes) -----------------------------------------------------------


def load_worker(args: dict[str, Any]) -> dict[str, Any]:
    return run_loop(_load(**args))  # type: ignore[no-any-return]


async def _load(nodes: list[str], first: int, step: int, count: int, value_bytes: int,
                noise_seed: int) -> dict[str, Any]:
    noise = random.Random(noise_seed).randbytes(NOISE_BYTES)
    errors: Counter[str] = Counter()
    async with AsyncClient(nodes, connections_per_node=2, timeout_s=30) as kv:
        todo = iter(range(first, count, step))

        async def lane() -> None:
            for i in todo:
                for _attempt in range(5):
                    try:
                        await kv.put(KEYSPACE, key_for(i), value_for(noise, i, value_bytes),
                                     consistency="QUORUM")
                        break
                    except LeaderlessError as exc:
                        errors[exc.code] += 1
                else:
                    raise RuntimeError(f"cannot load key {i}: {dict(errors)}")

        await asyncio.gather(*(lane() for _ in range(LOAD_IN_FLIGHT)))
    return {"errors": dict(errors)}


# -- foreground load (one process) --------------------------------------------------------


def foreground(args: dict[str, Any], stop: Any, out: Any) -> None:
    out.put(run_loop(_foreground(stop=stop, **args)))


async def _foreground(nodes: list[str], rate: float, duration_s: float, keys: int,
                      value_bytes: int, noise_seed: int, seed: int, stop: Any
                      ) -> dict[str, Any]:
    """Open loop at ``rate``/s until ``duration_s`` passed or ``stop`` is set: half gets of
    loaded keys (checked against their value), half puts of new keys. Returns samples
    ``(scheduled unix time, latency ms, op)`` of the requests that succeeded."""
    noise = random.Random(noise_seed).randbytes(NOISE_BYTES)
    rng = random.Random(seed)
    samples: list[tuple[float, float, str]] = []
    errors: Counter[str] = Counter()
    misses: list[str] = []
    wrong: list[str] = []
    clock = time.perf_counter
    wall_offset = time.time() - clock()
    fresh = os.urandom(value_bytes)
    async with AsyncClient(nodes, connections_per_node=1, timeout_s=10) as kv:
        start = clock() + 0.2
        end = start + duration_s
        interval = 1.0 / rate
        slot = 0
        written = 0

        async def one(scheduled: float) -> None:
            nonlocal written
            try:
                if rng.random() < 0.5:
                    op = "get"
                    i = rng.randrange(keys)
                    got = await kv.get(KEYSPACE, key_for(i), consistency="QUORUM")
                    if got is None:
                        misses.append(key_for(i).decode())
                    elif got != value_for(noise, i, value_bytes):
                        wrong.append(key_for(i).decode())
                else:
                    op = "put"
                    written += 1
                    await kv.put(KEYSPACE, b"f%d-%09d" % (seed, written), fresh,
                                 consistency="QUORUM")
            except LeaderlessError as exc:
                errors[exc.code] += 1
                return
            samples.append((scheduled + wall_offset, (clock() - scheduled) * 1000, op))

        async def lane() -> None:
            nonlocal slot
            while not stop.is_set():
                scheduled = start + slot * interval
                slot += 1
                if scheduled >= end:
                    return
                delay = scheduled - clock()
                if delay > 0:
                    await asyncio.sleep(delay)
                await one(scheduled)

        await asyncio.gather(*(lane() for _ in range(FOREGROUND_LANES)))
    return {"samples": samples, "errors": dict(errors), "misses": misses, "wrong": wrong}


def summarize(samples: list[tuple[float, float, str]], since: float, until: float
              ) -> dict[str, Any]:
    lat = sorted(ms for t, ms, _ in samples if since <= t < until)
    gets = sum(1 for t, _, op in samples if since <= t < until and op == "get")
    span = max(until - since, 1e-9)
    return {"ops": len(lat), "gets": gets, "ops_per_s": round(len(lat) / span, 1),
            "p50_ms": round(percentile(lat, 0.50), 3), "p99_ms": round(percentile(lat, 0.99), 3),
            "max_ms": round(lat[-1], 3) if lat else float("nan")}


# -- cluster ------------------------------------------------------------------------------


class Node:
    def __init__(self, name: str, workdir: Path) -> None:
        self.name = name
        self.bind, self.client, self.http = (f"127.0.0.1:{p}" for p in free_ports(3))
        self.data = workdir / name
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, join: str | None, bootstrap: bool) -> None:
        exe = Path(sys.executable).parent / "leaderless"
        self.data.mkdir(parents=True, exist_ok=True)
        cmd = [str(exe), "node", "start", "--name", self.name, "--bind", self.bind,
               "--client", self.client, "--http", self.http, "--data-dir", str(self.data),
               "--storage", "rocksdb", "--log-level", "warning"]
        if join:
            cmd += ["--join", join]
        if not bootstrap:
            cmd += ["--no-bootstrap"]
        log = open(self.data.parent / f"{self.name}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def ring_state(self) -> str:
        try:
            return str(json.loads((self.data / "ring.json").read_text())["state"])
        except (OSError, ValueError, KeyError):
            return "?"

    def counter(self, name: str) -> float | None:
        """A counter from the node's Prometheus /metrics (any labels summed)."""
        try:
            with urllib.request.urlopen(f"http://{self.http}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return None
        total, found = 0.0, False
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            metric = line.split("{", 1)[0].split(" ", 1)[0]
            if metric.endswith(name) or metric.endswith(name + "_total"):
                total += float(line.rsplit(" ", 1)[1])
                found = True
        return total if found else None


def stop_nodes(nodes: list[Node]) -> None:
    stop([n.proc for n in nodes if n.proc is not None])


async def create_keyspace(clients: list[str]) -> None:
    async with AsyncClient(clients, ring_refresh_s=0) as kv:
        await kv.create_keyspace(KEYSPACE, 3, "eventual", read_consistency="QUORUM",
                                 write_consistency="QUORUM", if_not_exists=True)
    await asyncio.sleep(1.0)  # let the schema spread


# -- raw disk -----------------------------------------------------------------------------


def disk_write_mb_s(directory: Path, mib: int = 512) -> tuple[float, str]:
    path = directory / "dd.tmp"
    try:
        start = time.perf_counter()
        done = subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={mib}",
                               "oflag=direct", "conv=fsync"], capture_output=True, timeout=300)
        elapsed = time.perf_counter() - start
        if done.returncode == 0:
            return mib / elapsed, f"dd bs=1M count={mib} oflag=direct conv=fsync"
        block = os.urandom(1 << 20)
        start = time.perf_counter()
        with open(path, "wb") as f:
            for _ in range(mib):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        return mib / (time.perf_counter() - start), f"python write {mib} MiB + fsync"
    finally:
        path.unlink(missing_ok=True)


# -- profile ------------------------------------------------------------------------------

GENERIC_FRAMES = ("leaderless/cli.py", "leaderless/runtime/process.py", "<module>")
"""Frames on every stack (the node's entry), left out of the inclusive list."""


def summarize_profile(path: Path, top: int = 12) -> dict[str, Any]:
    """Top frames of a py-spy ``-f raw`` (collapsed stacks) file: by own samples and by
    inclusive samples."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        total += count
        frames = stack.split(";")
        own[frames[-1]] += count
        for f in set(frames):
            if "leaderless/" in f and not any(g in f for g in GENERIC_FRAMES):
                inclusive[f] += count

    def share(c: Counter[str]) -> list[tuple[str, float]]:
        return [(f, round(100 * v / total, 1)) for f, v in c.most_common(top)]

    return {"samples": total, "own_pct": share(own), "inclusive_pct": share(inclusive)}


# -- main ---------------------------------------------------------------------------------


def fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def table(result: dict[str, Any]) -> str:
    b, s, j = result["baseline"], result["streaming"], result["join"]
    rows = [
        ("data loaded", f"{result['data_mb']} MB ({result['keys']} keys of "
                        f"{result['value_bytes']} B), {result['load_s']} s to load"),
        ("raw disk write", f"{result['disk_mb_s']} MB/s ({result['disk_method']})"),
        ("time to add node (start -> normal)", f"{j['time_to_normal_s']} s"
         + ("" if j["completed"] else " (NOT normal yet: timed out)")),
        ("bytes streamed to the new node", f"{j['bytes_streamed_mb']} MB"),
        ("streaming throughput", f"{j['stream_mb_s']} MB/s over {j['time_to_normal_s']} s"
                                 f" = {j['fraction_of_disk']:.1%} of raw disk"),
        ("foreground baseline p50 / p99", f"{b['p50_ms']} / {b['p99_ms']} ms "
                                          f"({b['ops']} ops, {b['ops_per_s']}/s)"),
        ("foreground during join p50 / p99", f"{s['p50_ms']} / {s['p99_ms']} ms "
                                             f"({s['ops']} ops, {s['ops_per_s']}/s)"),
        ("p99 during join / baseline", f"{result['p99_ratio']}x"),
        ("read misses / wrong values / errors",
         f"{result['misses']} / {result['wrong']} / {result['errors'] or 0}"),
    ]
    lines = ["| measure | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-mb", type=int, default=1024, help="logical data to load")
    parser.add_argument("--value-bytes", type=int, default=4096)
    parser.add_argument("--rate", type=float, default=500.0, help="foreground ops/s")
    parser.add_argument("--baseline-s", type=float, default=15.0)
    parser.add_argument("--load-procs", type=int, default=2)
    parser.add_argument("--join-timeout-s", type=float, default=600.0,
                        help="stop waiting for the joiner (the result says it timed out)")
    parser.add_argument("--no-profile", action="store_true", help="skip py-spy on the joiner")
    parser.add_argument("--json", action="store_true", help="print the result as JSON too")
    parser.add_argument("--out", default=str(RESULTS))
    opts = parser.parse_args()
    if not 16 <= opts.value_bytes <= NOISE_BYTES // 2:
        parser.error("--value-bytes must be in [16, 524288]")

    workdir = Path(tempfile.mkdtemp(prefix="leaderless-elastic-"))
    nodes = [Node(f"node{i}", workdir) for i in range(1, 5)]
    ctx = multiprocessing.get_context("spawn")
    children: list[Any] = []
    try:
        result = run(opts, workdir, nodes, ctx, children)
    finally:
        for c in children:
            if c.is_alive():
                c.terminate()
            c.join(5)
        stop_nodes(nodes)
        shutil.rmtree(workdir, ignore_errors=True)
    print(table(result))
    if opts.json:
        print(json.dumps(result, indent=2))
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}", file=sys.stderr)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_foreground(ctx: Any, children: list[Any], clients: list[str], opts: argparse.Namespace,
                   keys: int, duration_s: float, noise_seed: int) -> tuple[Any, Any, Any]:
    stop, out = ctx.Event(), ctx.Queue()
    args = {"nodes": clients, "rate": opts.rate, "duration_s": duration_s, "keys": keys,
            "value_bytes": opts.value_bytes, "noise_seed": noise_seed,
            "seed": random.randrange(1 << 20)}
    proc = ctx.Process(target=foreground, args=(args, stop, out))
    proc.start()
    children.append(proc)
    return proc, stop, out


def run(opts: argparse.Namespace, workdir: Path, nodes: list[Node], ctx: Any,
        children: list[Any]) -> dict[str, Any]:
    seed = nodes[0].bind
    for i, node in enumerate(nodes[:3]):
        node.start(seed if i else None, bootstrap=False)
    clients = [n.client for n in nodes[:3]]
    log(f"started 3 nodes in {workdir}")
    asyncio.run(wait_alive(clients[:1], 3, 60))
    asyncio.run(create_keyspace(clients))

    keys = opts.data_mb * 1_000_000 // opts.value_bytes
    noise_seed = random.randrange(1 << 30)
    log(f"loading {keys} keys of {opts.value_bytes} B ({opts.data_mb} MB) "
        f"with {opts.load_procs} processes")
    t0 = time.perf_counter()
    with ctx.Pool(opts.load_procs) as pool:
        loaded = pool.map(load_worker, [
            {"nodes": clients, "first": p, "step": opts.load_procs, "count": keys,
             "value_bytes": opts.value_bytes, "noise_seed": noise_seed}
            for p in range(opts.load_procs)])
    load_s = time.perf_counter() - t0
    load_errors: Counter[str] = Counter()
    for r in loaded:
        load_errors.update(r["errors"])
    log(f"loaded in {load_s:.1f} s ({opts.data_mb / load_s:.1f} MB/s), retried errors "
        f"{dict(load_errors)}")
    time.sleep(3.0)  # let compactions and flushes of the load calm down a little

    # 1. baseline
    log(f"baseline: {opts.rate:.0f} ops/s QUORUM for {opts.baseline_s:.0f} s")
    proc, _stop, out = run_foreground(ctx, children, clients, opts, keys, opts.baseline_s,
                                      noise_seed)
    base = out.get(timeout=opts.baseline_s + 120)
    proc.join(10)
    b_samples = base["samples"]
    b_from = min(t for t, _, _ in b_samples) + 1.0  # skip the first second (connections)
    baseline = summarize(b_samples, b_from, max(t for t, _, _ in b_samples))

    # 2. join a 4th node under the same load
    log("join: foreground load running, starting node4 with bootstrap")
    proc, stop, out = run_foreground(ctx, children, clients, opts, keys,
                                     opts.join_timeout_s + 60, noise_seed)
    time.sleep(3.0)  # the load runs steadily before the join starts
    joiner = nodes[3]
    t_start_wall = time.time()
    t_start = time.perf_counter()
    joiner.start(seed, bootstrap=True)
    assert joiner.proc is not None
    profile_file = workdir / "joiner.pyspy.txt"
    spy: subprocess.Popen[bytes] | None = None
    states: list[tuple[float, str]] = []
    last_state = ""
    t_normal = None
    while time.perf_counter() - t_start < opts.join_timeout_s:
        state = joiner.ring_state()
        now = time.perf_counter() - t_start
        if state != last_state:
            states.append((round(now, 2), state))
            last_state = state
            log(f"node4 ring state: {state} at {now:.1f} s")
        if state == "normal":
            t_normal = now
            break
        if joiner.proc.poll() is not None:
            raise RuntimeError(f"node4 exited ({joiner.proc.returncode}); see its log")
        if spy is None and not opts.no_profile and now > 4.0:
            py_spy = Path(sys.executable).parent / "py-spy"
            if py_spy.exists():
                spy = subprocess.Popen(
                    [str(py_spy), "record", "-p", str(joiner.proc.pid), "-d", "10", "-r", "100",
                     "--nonblocking", "-f", "raw", "-o", str(profile_file)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.05)
    t_end_wall = time.time()
    completed = t_normal is not None
    if t_normal is None:  # report what it did in the time given
        log(f"node4 not normal after {opts.join_timeout_s:.0f} s: {states}")
        t_normal = time.perf_counter() - t_start
    time.sleep(2.0)
    stop.set()
    fg = out.get(timeout=120)
    proc.join(10)
    streamed = joiner.counter("stream_bytes_in") or 0.0
    profile: dict[str, Any] | None = None
    if spy is not None:
        try:
            _, err = spy.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            spy.kill()
            err = b"timeout"
        if profile_file.exists():
            profile = summarize_profile(profile_file)
        else:
            profile = {"error": err.decode(errors="replace")[-500:]}

    during = summarize(fg["samples"], t_start_wall, t_end_wall)
    log("measuring raw disk write speed")
    disk, method = disk_write_mb_s(workdir)
    stream_mb_s = streamed / 1e6 / t_normal
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()
    errors = Counter(base["errors"]) + Counter(fg["errors"])
    return {
        "benchmark": "elastic", "commit": commit, "cpus": os.cpu_count(),
        "data_mb": opts.data_mb, "value_bytes": opts.value_bytes, "keys": keys,
        "load_s": round(load_s, 1), "load_retried_errors": dict(load_errors),
        "foreground": {"rate": opts.rate, "mix": "50% get of loaded keys, 50% put of new keys",
                       "consistency": "QUORUM"},
        "baseline": baseline,
        "join": {"completed": completed, "time_to_normal_s": round(t_normal, 2),
                 "states": states,
                 "bytes_streamed_mb": round(streamed / 1e6, 1),
                 "stream_mb_s": round(stream_mb_s, 1),
                 "fraction_of_disk": round(stream_mb_s / disk, 4)},
        "streaming": during,
        "p99_ratio": round(during["p99_ms"] / baseline["p99_ms"], 2),
        "misses": len(base["misses"]) + len(fg["misses"]),
        "wrong": len(base["wrong"]) + len(fg["wrong"]),
        "errors": dict(errors),
        "miss_examples": (base["misses"] + fg["misses"])[:10],
        "disk_mb_s": round(disk, 1), "disk_method": method,
        "profile_joiner": profile,
    }


if __name__ == "__main__":
    main()
