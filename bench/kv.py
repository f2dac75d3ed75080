"""KV benchmark: put and get throughput and latency on a local 3-node cluster.

    .venv/bin/python bench/kv.py                      # starts 3 nodes, runs, stops them
    .venv/bin/python bench/kv.py --nodes 127.0.0.1:7400,127.0.0.1:7401,127.0.0.1:7402
    .venv/bin/python bench/kv.py --duration 3 --quick # a smoke run
    .venv/bin/python bench/kv.py --kill               # plus a run that kill -9s node3
    .venv/bin/python bench/kv.py --secure             # TLS everywhere, sealed gossip, auth

Keyspace ``bench`` with N=3, QUORUM reads and writes, 100-byte values. For each of put
and get: closed-loop runs with 1 and 64 concurrent requests (each "client" is an asyncio
task issuing one request after another, token-aware through ``leaderless.client``), then
an open-loop run at half the 64-client throughput, whose latency is measured from each
request's *scheduled* start so a stall is not hidden (no coordinated omission).

Latencies go into a log-linear histogram (64 sub-buckets per power of two: <= 1.6 % error)
from which p50/p99/p99.9 are read. Load comes from ``--procs`` worker processes (one
Python process cannot drive 64 in flight and measure them at full speed); on a 2-core
machine those workers compete with the three nodes for CPU, so the figures are a floor
for what the nodes do with dedicated cores. The JSON records the CPU count.

Starting the cluster needs ``leaderless node start --name N --bind HOST:PORT --client
HOST:PORT --http HOST:PORT --data-dir DIR [--join SEED]``; readiness is "the first
node's ``DescribeRing`` lists 3 alive members with client addresses". Results go to
bench/results/kv.json.

``--secure`` measures what security costs: the bench makes a cluster CA and node
certificates (``security.pki``), a gossip key and a bootstrap admin password, starts the
nodes with ``--tls-ca/--tls-cert/--tls-key --gossip-keyring --auth``, logs in as the admin,
makes an API token and drives the load over TLS with it (every request authorized).
``--encrypt-at-rest`` adds data keys (values sealed with AES-GCM in the store).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from processes import free_ports, stop

from leaderless.client import AsyncClient, LeaderlessError

RESULTS = Path(__file__).parent / "results" / "kv.json"
KEYSPACE = "bench"
SUB_BITS = 6
OPEN_LOOP_LANES = 256
"""Requests in flight at most per worker process in the open-loop (half load) runs."""


# -- histogram ----------------------------------------------------------------------------


def bucket(us: int) -> int:
    """Log-linear bucket of a latency in microseconds: exact below 128, then 64 buckets
    per power of two."""
    shift = max(0, us.bit_length() - (SUB_BITS + 1))
    return (shift << (SUB_BITS + 1)) | (us >> shift)


def bucket_value(key: int) -> float:
    shift = key >> (SUB_BITS + 1)
    mantissa = key & ((1 << (SUB_BITS + 1)) - 1)
    return (mantissa << shift) + ((1 << shift) - 1) / 2  # the bucket's midpoint


def percentile(hist: Counter[int], q: float) -> float:
    total = sum(hist.values())
    if not total:
        return float("nan")
    rank = q * total
    seen = 0
    for key in sorted(hist):
        seen += hist[key]
        if seen >= rank:
            return bucket_value(key)
    return bucket_value(max(hist))


# -- load workers (one process each) ------------------------------------------------------


def worker(args: dict[str, Any]) -> dict[str, Any]:
    try:
        import uvloop
        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(_work(**args))


def client_options(secure: dict[str, str] | None) -> dict[str, Any]:
    """AsyncClient keywords for a ``--secure`` cluster: its CA and an API token."""
    if not secure:
        return {}
    from leaderless.security.tls import ClientTls
    return {"tls": ClientTls(secure["ca"]), "token": secure.get("token")}


async def _work(nodes: list[str], op: str, tasks: int, rate: float, duration_s: float,
                warmup_s: float, keys: int, value_bytes: int, seed: int,
                secure: dict[str, str] | None = None) -> dict[str, Any]:
    rng = random.Random(seed)
    value = os.urandom(value_bytes)
    hist: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    done = 0
    # time.perf_counter, not loop.time(): uvloop's loop clock has millisecond resolution.
    clock = time.perf_counter
    async with AsyncClient(nodes, connections_per_node=1, timeout_s=10,
                           **client_options(secure)) as kv:
        start = clock() + 0.2
        measure_from = start + warmup_s
        end = measure_from + duration_s

        async def one(scheduled: float) -> None:
            nonlocal done
            key = b"k%08d" % rng.randrange(keys)
            try:
                if op == "put" or (op == "mix" and rng.random() < 0.5):
                    await kv.put(KEYSPACE, key, value)
                else:
                    await kv.get(KEYSPACE, key)
            except LeaderlessError as exc:
                errors[exc.code] += 1
                return
            now = clock()
            if scheduled >= measure_from and now <= end:
                hist[bucket(int((now - scheduled) * 1e6))] += 1
                done += 1

        await asyncio.sleep(max(0.0, start - clock()))
        if rate <= 0:  # closed loop: each task issues its next request when one returns
            async def client() -> None:
                while (t := clock()) < end:
                    await one(t)

            await asyncio.gather(*(client() for _ in range(tasks)))
        else:
            # Open loop at `rate`/s: lanes take the next slot of a fixed schedule, wait for
            # its time, and measure from it; a slot that finds every lane busy starts late
            # and its lateness counts in its latency (no coordinated omission).
            interval = 1.0 / rate
            slot = 0

            async def lane() -> None:
                nonlocal slot
                while True:
                    scheduled = start + slot * interval
                    slot += 1
                    if scheduled >= end:
                        return
                    delay = scheduled - clock()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    await one(scheduled)

            await asyncio.gather(*(lane() for _ in range(OPEN_LOOP_LANES)))
    return {"hist": dict(hist), "done": done, "errors": dict(errors)}


def run_phase(pool: Any, nodes: list[str], op: str, clients: int, procs: int, rate: float,
              opts: argparse.Namespace) -> dict[str, Any]:
    procs = max(1, min(procs, clients)) if rate <= 0 else procs
    jobs = []
    for p in range(procs):
        tasks = clients // procs + (1 if p < clients % procs else 0)
        jobs.append({"nodes": nodes, "op": op, "tasks": tasks, "rate": rate / procs,
                     "duration_s": opts.duration, "warmup_s": opts.warmup, "keys": opts.keys,
                     "value_bytes": opts.value_bytes, "seed": random.randrange(1 << 30),
                     "secure": opts.secure_client})
    results = pool.map(worker, jobs[:procs])
    hist: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    done = 0
    for r in results:
        hist.update({int(k): v for k, v in r["hist"].items()})
        errors.update(r["errors"])
        done += r["done"]
    return {
        "op": op, "clients": clients if rate <= 0 else None,
        "target_rate": round(rate) if rate > 0 else None, "procs": procs,
        "ops_per_s": round(done / opts.duration), "ops": done,
        "p50_ms": round(percentile(hist, 0.50) / 1000, 3),
        "p99_ms": round(percentile(hist, 0.99) / 1000, 3),
        "p999_ms": round(percentile(hist, 0.999) / 1000, 3),
        "errors": dict(errors),
    }


# -- cluster ------------------------------------------------------------------------------


def security_files(n: int, workdir: Path, encrypt_at_rest: bool) -> dict[str, Any]:
    """A CA, node certificates, a gossip key, an admin password (and data keys)."""
    from leaderless.security import pki
    from leaderless.security.keyring import generate_key

    certs = workdir / "certs"
    pki.init_ca(certs)
    for i in range(n):
        pki.issue_node(certs, f"node{i + 1}")
    secret = workdir / "secret"
    secret.mkdir(mode=0o700)
    files = {"ca": certs / "ca.crt", "certs": certs, "keyring": secret / "keyring",
             "password": secret / "admin-password", "data_keys": None}
    pki.write_file(files["keyring"], (generate_key() + "\n").encode(), 0o600)
    files["admin_password"] = os.urandom(18).hex()
    pki.write_file(files["password"], files["admin_password"].encode(), 0o600)
    if encrypt_at_rest:
        import base64
        files["data_keys"] = secret / "data.keys"
        key = base64.b64encode(os.urandom(32)).decode()
        pki.write_file(files["data_keys"], f"k1:{key}\n".encode(), 0o600)
    return files


def security_flags(name: str, files: dict[str, Any] | None) -> list[str]:
    if not files:
        return []
    certs = files["certs"]
    flags = ["--tls-ca", str(files["ca"]), "--tls-cert", str(certs / f"{name}.crt"),
             "--tls-key", str(certs / f"{name}.key"), "--gossip-keyring", str(files["keyring"]),
             "--auth", "--admin-password-file", str(files["password"])]
    if files["data_keys"] is not None:
        flags += ["--encryption-key-file", str(files["data_keys"])]
    return flags


def start_cluster(n: int, workdir: Path, security: dict[str, Any] | None = None
                  ) -> tuple[list[subprocess.Popen[bytes]], list[str]]:
    exe = Path(sys.executable).parent / "leaderless"
    ports = free_ports(3 * n)
    procs, clients = [], []
    seed = f"127.0.0.1:{ports[0]}"
    for i in range(n):
        bind, client, http = ports[3 * i: 3 * i + 3]
        name = f"node{i + 1}"
        data = workdir / name
        data.mkdir(parents=True, exist_ok=True)
        cmd = [str(exe), "node", "start", "--name", name, "--bind", f"127.0.0.1:{bind}",
               "--client", f"127.0.0.1:{client}", "--http", f"127.0.0.1:{http}",
               "--data-dir", str(data), "--log-level", "warning", "--no-bootstrap",
               *security_flags(name, security)]  # all are first members: no streaming
        if i:
            cmd += ["--join", seed]
        log = open(data / "node.log", "wb")  # noqa: SIM115 (kept open for the process)
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
        clients.append(f"127.0.0.1:{client}")
    return procs, clients


def stop_cluster(procs: list[subprocess.Popen[bytes]]) -> None:
    stop(procs, grace_s=5.0)


async def wait_ready(nodes: list[str], members: int, timeout_s: float,
                     opts: argparse.Namespace) -> None:
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            async with AsyncClient(nodes[:1], connect_timeout_s=1, ring_refresh_s=0,
                                   **client_options(opts.secure_client)) as kv:
                ring = await kv.describe_ring()
                alive = [m for m in ring if m.state == "alive" and m.client_address]
                if len(alive) >= members:
                    return
                last = RuntimeError(f"{len(alive)} of {members} members alive")
        except LeaderlessError as exc:
            last = exc
        await asyncio.sleep(0.5)
    raise SystemExit(f"the cluster did not become ready in {timeout_s:.0f} s: {last}")


async def prepare(nodes: list[str], opts: argparse.Namespace) -> None:
    if opts.secure_client is not None:
        await log_in(nodes, opts)
    await wait_ready(nodes, opts.cluster_size, 60, opts)
    async with AsyncClient(nodes, ring_refresh_s=0, **client_options(opts.secure_client)) as kv:
        await kv.create_keyspace(KEYSPACE, 3, "eventual", read_consistency="QUORUM",
                                 write_consistency="QUORUM", if_not_exists=True)
        # Let the schema spread before measuring, then fill the key space for the gets.
        await asyncio.sleep(1.0)
        value = os.urandom(opts.value_bytes)
        sem = asyncio.Semaphore(128)

        async def put(i: int) -> None:
            async with sem:
                await kv.put(KEYSPACE, b"k%08d" % i, value)

        await asyncio.gather(*(put(i) for i in range(opts.preload)))


async def log_in(nodes: list[str], opts: argparse.Namespace) -> None:
    """Log in as the bootstrap admin (once a node has made it) and make an API token."""
    deadline = time.monotonic() + 60
    while True:
        try:
            kv = AsyncClient(nodes[:1], connect_timeout_s=1, ring_refresh_s=0,
                             **client_options(opts.secure_client))
            try:  # log in before connecting: connecting needs a token
                await kv.login("admin", opts.admin_password)
                issued = await kv.create_api_token("admin", "bench", 3600.0)
                opts.secure_client["token"] = issued.token
                return
            finally:
                await kv.close()
        except LeaderlessError as exc:
            if time.monotonic() > deadline:
                raise SystemExit(f"cannot log in as admin: {exc}") from None
            await asyncio.sleep(0.5)


# -- main ---------------------------------------------------------------------------------


def print_table(rows: list[dict[str, Any]]) -> None:
    header = (f"{'op':<4} {'load':>14} {'ops/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'p999 ms':>8}  errors")
    print(header)
    print("-" * len(header))
    for r in rows:
        load = (f"{r['clients']} clients" if r["clients"] is not None
                else f"{r['target_rate']}/s open")
        errors = ", ".join(f"{k}={v}" for k, v in r["errors"].items()) or "-"
        print(f"{r['op']:<4} {load:>14} {r['ops_per_s']:>9} {r['p50_ms']:>8} {r['p99_ms']:>8} "
              f"{r['p999_ms']:>8}  {errors}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", help="client addresses of a running cluster, comma-separated "
                        "(default: start a local 3-node cluster)")
    parser.add_argument("--cluster-size", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds not measured")
    parser.add_argument("--value-bytes", type=int, default=100)
    parser.add_argument("--keys", type=int, default=100_000, help="key space size")
    parser.add_argument("--preload", type=int, default=20_000, help="keys written before gets")
    parser.add_argument("--clients", default="1,64", help="concurrency levels")
    parser.add_argument("--procs", type=int, default=2, help="load-generating processes")
    parser.add_argument("--no-half", action="store_true", help="skip the half-load runs")
    parser.add_argument("--quick", action="store_true", help="short runs, small preload")
    parser.add_argument("--kill", action="store_true",
                        help="last, a 50/50 put/get run at the highest concurrency during "
                        "which the third node is killed (kill -9) a third of the way in; "
                        "counts failed QUORUM operations (only with the bench's own cluster)")
    parser.add_argument("--secure", action="store_true",
                        help="TLS on every port, sealed gossip and auth (the bench's cluster)")
    parser.add_argument("--encrypt-at-rest", action="store_true",
                        help="with --secure: values encrypted in the store too")
    parser.add_argument("--out", default=str(RESULTS))
    opts = parser.parse_args()
    opts.secure_client = None
    if opts.quick:
        opts.duration, opts.warmup, opts.preload = min(opts.duration, 3.0), 0.5, 2000
    levels = [int(c) for c in opts.clients.split(",")]

    procs: list[subprocess.Popen[bytes]] = []
    workdir = tempfile.TemporaryDirectory(prefix="leaderless-bench-")
    if opts.nodes:
        nodes = [n.strip() for n in opts.nodes.split(",") if n.strip()]
    else:
        security = None
        if opts.secure:
            security = security_files(opts.cluster_size, Path(workdir.name),
                                      opts.encrypt_at_rest)
            opts.secure_client = {"ca": str(security["ca"])}
            opts.admin_password = security["admin_password"]
        procs, nodes = start_cluster(opts.cluster_size, Path(workdir.name), security)
        print(f"started {opts.cluster_size} nodes, client ports {', '.join(nodes)} "
              f"(logs in {workdir.name})", file=sys.stderr)
    rows: list[dict[str, Any]] = []
    try:
        asyncio.run(prepare(nodes, opts))
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(max(opts.procs, 1)) as pool:
            for op in ("put", "get"):
                for clients in levels:
                    row = run_phase(pool, nodes, op, clients, opts.procs, 0.0, opts)
                    rows.append(row)
                    print_table([row])
                if not opts.no_half:
                    peak = max(r["ops_per_s"] for r in rows if r["op"] == op)
                    row = run_phase(pool, nodes, op, 0, opts.procs, peak / 2, opts)
                    rows.append(row)
                    print_table([row])
            if opts.kill and procs:
                victim = procs[-1]
                kill_at = opts.warmup + 0.2 + opts.duration / 3
                timer = threading.Timer(kill_at, victim.send_signal, (signal.SIGKILL,))
                timer.start()
                row = run_phase(pool, nodes, "mix", max(levels), opts.procs, 0.0, opts)
                timer.join()
                row["killed"] = f"node{len(procs)} by SIGKILL {kill_at:.1f} s into the run"
                rows.append(row)
                print_table([row])
    finally:
        stop_cluster(procs)
        workdir.cleanup()
    print()
    print_table(rows)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()
    result = {"benchmark": "kv", "commit": commit, "cpus": os.cpu_count(),
              "cluster": "given" if opts.nodes else f"local {opts.cluster_size} nodes",
              "keyspace": {"replication": 3, "read": "QUORUM", "write": "QUORUM"},
              "value_bytes": opts.value_bytes, "duration_s": opts.duration,
              "load_procs": opts.procs, "runs": rows,
              "security": ("tls+gossip keyring+auth" + (
                  "+encryption at rest" if opts.encrypt_at_rest else "")) if opts.secure
              else "off"}
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
