"""Strong-mode benchmark: compare-and-set and increment on a local 3-node cluster.

    .venv/bin/python bench/strong.py                  # starts 3 nodes, runs, stops them
    .venv/bin/python bench/strong.py --duration 3     # shorter runs

Keyspace ``strong`` with N=3 in strong mode (every change a CASPaxos round among the key's
3 replicas). Runs, each closed-loop for ``--duration`` seconds after a warm-up, from one
load process (asyncio tasks through ``leaderless.client.AsyncClient``):

- ``cas`` uncontended: each client owns a key and sets it by version (``expected_version``
  = the version its last cas returned), 1 and 32 clients;
- ``cas`` contended: all clients on one key, each a read + cas by version, retried on
  conflict; ops/s counts successful changes, and the conflicts are reported;
- ``incr`` contended: all clients increment one counter (changes of one key queued at a
  node share a Paxos round);
- ``lock`` (uncontended): each client acquires its own lock (``wait=0``, ttl 10 s) and
  releases it, 1 and 32 clients; ops/s counts acquire+release pairs, the latency is the
  pair's (the acquire's alone is reported too);
- ``lock-contended``: all clients take turns on one lock, each a blocking acquire (the
  node wakes its waiters when the lock changes) then a release. Each client has its own owner
  id: acquires by the same owner are re-grants of the lease it holds, not exclusion.

``--ops lock,lock-contended`` runs only the named ops (default: all).

``--availability``: instead, 5 trials of a continuous writer (one put at a time through
one client, 1 s timeout) to a strong key while the bench kill -9s one node 2 s in; reports
the longest gap between two successful writes around the kill. Then the same against a
3-member etcd on loopback (Debian's ``etcd-server``, if ``etcd`` is on PATH), writing
through its JSON gateway and rotating to the next member on a failure as etcd's client
does, with the *leader* killed. Results go to
bench/results/strong.json (or strong_availability.json).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from kv import (
    bucket,
    free_ports,
    percentile,
    print_table,
    start_cluster,
    stop_cluster,
    wait_ready,
)

from leaderless.client import AsyncClient, ConflictError, LeaderlessError

PLAIN_CLIENT = argparse.Namespace(secure_client=None)
"""``kv.wait_ready``'s options: no TLS, no login."""

RESULTS = Path(__file__).parent / "results" / "strong.json"
KEYSPACE = "strong"
LOCK_TTL_S = 10.0
LOCK_WAIT_S = 30.0
OPS = ("cas", "cas-contended", "incr-contended", "lock", "lock-contended")


async def run(nodes: list[str], mode: str, clients: int, duration_s: float,
              warmup_s: float) -> dict[str, Any]:
    hist: Counter[int] = Counter()
    acquire_hist: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    conflicts = 0
    done = 0
    clock = time.perf_counter
    async with AsyncClient(nodes, timeout_s=10) as kv:
        start = clock()
        measure_from = start + warmup_s
        end = measure_from + duration_s

        def record(began: float) -> None:
            nonlocal done
            now = clock()
            if began >= measure_from and now <= end:
                hist[bucket(int((now - began) * 1e6))] += 1
                done += 1

        async def uncontended(index: int) -> None:
            key = f"own-{mode}-{clients}-{index}-{os.getpid()}"
            version: int | None = None
            while clock() < end:
                began = clock()
                try:
                    if version is None:
                        version = await kv.cas(KEYSPACE, key, b"v", expected_absent=True)
                    else:
                        version = await kv.cas(KEYSPACE, key, b"v", expected_version=version)
                except LeaderlessError as exc:
                    errors[exc.code] += 1
                    version = None if isinstance(exc, ConflictError) else version
                    continue
                record(began)

        async def contended_cas(index: int) -> None:
            nonlocal conflicts
            key = f"shared-{clients}"
            while clock() < end:
                began = clock()
                while clock() < end:
                    try:
                        item = await kv.get_with_meta(KEYSPACE, key)
                        if item is None:
                            await kv.cas(KEYSPACE, key, b"1", expected_absent=True)
                        else:
                            await kv.cas(KEYSPACE, key, b"x", expected_version=item.version)
                        record(began)
                        break
                    except ConflictError:
                        conflicts += 1
                    except LeaderlessError as exc:
                        errors[exc.code] += 1

        async def contended_incr(index: int) -> None:
            key = f"counter-{clients}"
            while clock() < end:
                began = clock()
                try:
                    await kv.incr(KEYSPACE, key, 1)
                except LeaderlessError as exc:
                    errors[exc.code] += 1
                    continue
                record(began)

        async def lock_pairs(index: int) -> None:
            """Acquire + release; ``lock``: a lock of its own, ``lock-contended``: one
            shared lock with a blocking acquire."""
            contended = mode == "lock-contended"
            name = (f"shared-{clients}-{os.getpid()}" if contended
                    else f"own-{clients}-{index}-{os.getpid()}")
            owner = f"{kv.owner}-{index}"
            wait = LOCK_WAIT_S if contended else 0.0
            while clock() < end:
                began = clock()
                try:
                    lease = await kv.acquire(name, LOCK_TTL_S, wait=wait, owner=owner)
                    acquired = clock()
                    await kv.release(lease)
                except LeaderlessError as exc:
                    errors[exc.code] += 1
                    continue
                if began >= measure_from and acquired <= end:
                    acquire_hist[bucket(int((acquired - began) * 1e6))] += 1
                record(began)

        body = {"cas": uncontended, "cas-contended": contended_cas,
                "incr-contended": contended_incr, "lock": lock_pairs,
                "lock-contended": lock_pairs}[mode]
        await asyncio.gather(*(body(i) for i in range(clients)))
    row = {
        "op": mode, "clients": clients, "target_rate": None,
        "ops_per_s": round(done / duration_s), "ops": done, "conflicts": conflicts,
        "p50_ms": round(percentile(hist, 0.50) / 1000, 3),
        "p99_ms": round(percentile(hist, 0.99) / 1000, 3),
        "p999_ms": round(percentile(hist, 0.999) / 1000, 3),
        "errors": dict(errors),
    }
    if acquire_hist:
        row["acquire_p50_ms"] = round(percentile(acquire_hist, 0.50) / 1000, 3)
        row["acquire_p99_ms"] = round(percentile(acquire_hist, 0.99) / 1000, 3)
    return row


async def availability_trial(nodes: list[str], victim: Any, seconds: float,
                             kill_at_s: float) -> dict[str, Any]:
    """Write one key in a loop; kill ``victim`` at ``kill_at_s``; the longest gap between
    successful writes (and the failures) over the whole run."""
    clock = time.perf_counter
    gaps: list[float] = []
    failures: Counter[str] = Counter()
    async with AsyncClient(nodes, timeout_s=1.0) as kv:
        await kv.create_keyspace(KEYSPACE, 3, "strong", if_not_exists=True)
        start = last_ok = clock()
        killed = False
        n = 0
        while clock() - start < seconds:
            if not killed and clock() - start >= kill_at_s:
                victim.send_signal(9)
                killed = True
            try:
                await kv.put(KEYSPACE, "availability", str(n).encode())
            except LeaderlessError as exc:
                failures[exc.code] += 1
                continue
            now = clock()
            gaps.append(now - last_ok)
            last_ok = now
            n += 1
    return {"writes": n, "longest_gap_ms": round(max(gaps) * 1000, 1),
            "failures": dict(failures)}


def start_etcd(workdir: Path) -> tuple[list[subprocess.Popen[bytes]], list[str]]:
    ports = free_ports(6)
    names = [f"e{i}" for i in range(3)]
    cluster = ",".join(f"{n}=http://127.0.0.1:{ports[2 * i + 1]}" for i, n in enumerate(names))
    procs, clients = [], []
    for i, name in enumerate(names):
        client, peer = ports[2 * i], ports[2 * i + 1]
        log = open(workdir / f"{name}.log", "wb")  # noqa: SIM115 (kept for the process)
        procs.append(subprocess.Popen(
            ["etcd", "--name", name, "--data-dir", str(workdir / name),
             "--listen-client-urls", f"http://127.0.0.1:{client}",
             "--advertise-client-urls", f"http://127.0.0.1:{client}",
             "--listen-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-cluster", cluster, "--initial-cluster-state", "new"],
            stdout=log, stderr=subprocess.STDOUT))
        clients.append(f"http://127.0.0.1:{client}")
    return procs, clients


async def etcd_trial(endpoints: list[str], procs: list[Any], seconds: float,
                     kill_at_s: float) -> dict[str, Any]:
    import aiohttp

    clock = time.perf_counter
    timeout = aiohttp.ClientTimeout(total=1.0)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        leader = None
        deadline = clock() + 30
        while leader is None and clock() < deadline:
            for i, url in enumerate(endpoints):
                try:
                    async with http.post(url + "/v3/maintenance/status", json={}) as r:
                        status = await r.json()
                    if status.get("leader") and status["leader"] == status["header"][
                            "member_id"]:
                        leader = i
                except (aiohttp.ClientError, TimeoutError):
                    pass
            await asyncio.sleep(0.2)
        if leader is None:
            raise SystemExit("etcd did not elect a leader in 30 s")
        gaps: list[float] = []
        failures = 0
        at = (leader + 1) % 3  # write through a follower, as a client usually would
        start = last_ok = clock()
        killed = False
        n = 0
        while clock() - start < seconds:
            if not killed and clock() - start >= kill_at_s:
                procs[leader].send_signal(9)
                killed = True
            body = {"key": "YXZhaWxhYmlsaXR5",  # base64("availability")
                    "value": base64.b64encode(str(n).encode()).decode()}
            try:
                async with http.post(endpoints[at] + "/v3/kv/put", json=body) as r:
                    ok = r.status == 200 and "error" not in await r.json()
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            if not ok:
                failures += 1
                at = (at + 1) % 3  # the next member, as etcd's client balancer does
                continue
            now = clock()
            gaps.append(now - last_ok)
            last_ok = now
            n += 1
    if not gaps:
        raise SystemExit("no write to etcd succeeded: check its logs")
    return {"writes": n, "longest_gap_ms": round(max(gaps) * 1000, 1),
            "failed_attempts": failures, "killed": f"leader e{leader}"}


def run_etcd_availability(trials: int) -> list[dict[str, Any]]:
    results = []
    for trial in range(trials):
        workdir = tempfile.TemporaryDirectory(prefix="leaderless-etcd-")
        procs, endpoints = start_etcd(Path(workdir.name))
        try:
            result = asyncio.run(etcd_trial(endpoints, procs, 6.0, 2.0))
            results.append(result)
            print(f"etcd trial {trial + 1}: {result}")
        finally:
            stop_cluster(procs)
            workdir.cleanup()
    return results


def run_availability(opts: argparse.Namespace) -> None:
    trials = []
    for trial in range(opts.trials):
        workdir = tempfile.TemporaryDirectory(prefix="leaderless-avail-")
        procs, nodes = start_cluster(3, Path(workdir.name))
        try:
            asyncio.run(wait_ready(nodes, 3, 60, PLAIN_CLIENT))
            # The victim is the node that coordinates the key (the client's first choice).
            result = asyncio.run(availability_trial(nodes, procs[trial % 3], 6.0, 2.0))
            result["killed"] = f"node{trial % 3 + 1}"
            trials.append(result)
            print(f"trial {trial + 1}: {result}")
        finally:
            stop_cluster(procs)
            workdir.cleanup()
    etcd = run_etcd_availability(opts.trials) if shutil.which("etcd") else []
    if not etcd:
        print("etcd is not on PATH (apt-get install etcd-server): its side is skipped")
    out = Path(opts.out).with_name("strong_availability.json")
    out.write_text(json.dumps({"benchmark": "strong availability", "cpus": os.cpu_count(),
                               "trials": trials, "etcd_trials": etcd}, indent=2) + "\n")
    print(f"leaderless: longest gap over {len(trials)} trials "
          f"{max(t['longest_gap_ms'] for t in trials)} ms")
    if etcd:
        print(f"etcd: longest gap over {len(etcd)} trials "
              f"{max(t['longest_gap_ms'] for t in etcd)} ms")
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--clients", default="1,32")
    parser.add_argument("--ops", default=",".join(OPS),
                        help=f"comma-separated, of {', '.join(OPS)}")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--availability", action="store_true",
                        help="measure the write gap while a node is killed (see above)")
    parser.add_argument("--trials", type=int, default=5)
    opts = parser.parse_args()
    if opts.availability:
        run_availability(opts)
        return
    levels = [int(c) for c in opts.clients.split(",")]
    ops = opts.ops.split(",")
    if unknown := set(ops) - set(OPS):
        parser.error(f"unknown ops {sorted(unknown)}; choose from {', '.join(OPS)}")
    workdir = tempfile.TemporaryDirectory(prefix="leaderless-strong-")
    procs, nodes = start_cluster(3, Path(workdir.name))
    rows: list[dict[str, Any]] = []
    try:
        asyncio.run(wait_ready(nodes, 3, 60, PLAIN_CLIENT))

        async def create() -> None:
            async with AsyncClient(nodes) as kv:
                await kv.create_keyspace(KEYSPACE, 3, "strong", if_not_exists=True)
            await asyncio.sleep(1.0)

        asyncio.run(create())
        plan = ([("cas", c) for c in levels] + [("cas-contended", max(levels)),
                                                 ("incr-contended", max(levels))]
                + [("lock", c) for c in levels] + [("lock-contended", max(levels))])
        for mode, clients in [(m, c) for m, c in plan if m in ops]:
            row = asyncio.run(run(nodes, mode, clients, opts.duration, opts.warmup))
            rows.append(row)
            print_table([row])
            if row["conflicts"]:
                print(f"     ({row['conflicts']} conflicts retried)")
            if "acquire_p50_ms" in row:
                print(f"     (acquire alone: p50 {row['acquire_p50_ms']} ms, "
                      f"p99 {row['acquire_p99_ms']} ms)")
    finally:
        stop_cluster(procs)
        workdir.cleanup()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "strong", "commit": commit,
                               "cpus": os.cpu_count(), "cluster": "local 3 nodes",
                               "duration_s": opts.duration, "runs": rows}, indent=2) + "\n")
    print(f"\nwrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
