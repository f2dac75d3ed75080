"""Task distribution benchmark (issue 9): leaderless nodes vs Celery + Redis vs a local
ProcessPoolExecutor, in one run.

    .venv/bin/python bench/tasks.py            # everything (~3 min on a 2-core machine)
    .venv/bin/python bench/tasks.py --quick    # smaller counts

What is measured (all real processes on this machine, nodes started with
``--tasks tests.task_functions``, first members ``--no-bootstrap``, RocksDB, lease TTL 2 s):

1. leaderless, 3 nodes x ``--slots`` (2) worker slots: trivial-task throughput (``add``
   submitted through ``AsyncClient.submit_task`` with bounded concurrency, completions found
   by ``wait_tasks`` long polls via ``client.tasks.TaskWatcher``; first submit to last
   completion), and the per-task overhead at low load (one task at a time: submit to result).
   A py-spy profile of one node during a second trivial-task run.
2. CPU-bound speed-up: 24 x ``cpu_burn`` (~0.25 s each) on a 3-node cluster with 1 slot per
   node where tags let 1, 2 or 3 nodes run them (n1 has tags w1,w2,w3; n2 w2,w3; n3 w3).
3. A dead node's tasks running elsewhere: a node holding long tasks is SIGKILLed; from the
   kill to each task's first ``claimed`` by another node (task histories), vs failure
   detection (the kill to a survivor no longer listing it alive) plus one lease TTL.
4. Celery (prefork, concurrency 2, Redis broker + result backend, no persistence): trivial
   throughput and the broker SIGKILLed during 1,000 tasks; ProcessPoolExecutor(2) for trivial
   and CPU-bound tasks; leaderless with one of 3 nodes SIGKILLed during 1,000 tasks.

Writes ``bench/results/tasks.json`` and prints markdown tables.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from processes import free_ports, live, spawn, stop, stop_all, wait_alive

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "tasks.json"
MODULE = "tests.task_functions"
LEASE_TTL_S = 2.0

# -- Celery app (imported by the celery worker as ``-A tasks``, cwd = bench/) -------------

if os.environ.get("BENCH_CELERY_BROKER"):
    import celery  # type: ignore[import-untyped]

    sys.path.insert(0, str(REPO))
    from tests import task_functions as _tf

    app = celery.Celery("tasks", broker=os.environ["BENCH_CELERY_BROKER"],
                        backend=os.environ["BENCH_CELERY_BROKER"])
    app.conf.update(broker_connection_retry_on_startup=True, result_expires=3600,
                    worker_hijack_root_logger=False)

    @app.task(name="add")  # type: ignore[untyped-decorator]
    def c_add(a: int, b: int) -> int:
        return _tf.add(a, b)

    @app.task(name="cpu_burn")  # type: ignore[untyped-decorator]
    def c_cpu_burn(n: int) -> int:
        return _tf.cpu_burn(n)

    @app.task(name="record")  # type: ignore[untyped-decorator]
    def c_record(i: int, path: str, seconds: float) -> int:
        time.sleep(seconds)
        with open(path, "a") as f:
            f.write(f"{i}\n")
        return i


# -- processes ------------------------------------------------------------------------------


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[max(0, min(len(s) - 1, int(round(p / 100 * len(s))) - 1))]


# -- leaderless -----------------------------------------------------------------------------


class Cluster:
    def __init__(self, workdir: Path, n: int, slots: int,
                 tags: list[list[str]] | None = None) -> None:
        self.workdir, self.n, self.slots = workdir, n, slots
        self.tags = tags or [[] for _ in range(n)]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.clients: list[str] = []
        self.names = [f"n{i + 1}" for i in range(n)]

    def start(self) -> None:
        exe = Path(sys.executable).parent / "leaderless"
        ports = free_ports(3 * self.n)
        seed = f"127.0.0.1:{ports[0]}"
        env = {"LEADERLESS_TASKS_SLOTS": str(self.slots),
               "LEADERLESS_TASKS_LEASE_TTL_S": str(LEASE_TTL_S)}
        for i, name in enumerate(self.names):
            bind, client, http = ports[3 * i: 3 * i + 3]
            data = self.workdir / name
            data.mkdir(parents=True, exist_ok=True)
            cmd = [str(exe), "node", "start", "--name", name, "--bind", f"127.0.0.1:{bind}",
                   "--client", f"127.0.0.1:{client}", "--http", f"127.0.0.1:{http}",
                   "--data-dir", str(data), "--log-level", "warning", "--no-bootstrap",
                   "--parent-pid", str(os.getpid()), "--tasks", MODULE]
            for tag in self.tags[i]:
                cmd += ["--tag", f"{tag}=1"]
            if i:
                cmd += ["--join", seed]
            self.procs.append(spawn(cmd, self.workdir / f"{name}.log", env, cwd=REPO))
            self.clients.append(f"127.0.0.1:{client}")

    async def ready(self, timeout_s: float = 60) -> None:
        await wait_alive(self.clients, self.n, timeout_s, each=True)
        await asyncio.sleep(1.0)

    def stop(self) -> None:
        stop(self.procs)


def targs(*positional: Any) -> bytes:
    import msgspec
    return msgspec.msgpack.encode([list(positional), {}])


async def run_batch(client: Any, calls: list[tuple[str, bytes]], concurrency: int,
                    timeout_s: float, *, tags: tuple[str, ...] = (),
                    on_progress: Any = None) -> dict[str, Any]:
    """Submit every call (``concurrency`` submits in flight), find completions with a
    ``TaskWatcher`` (WaitTasks long polls). Returns timings, the finished infos by index,
    submit errors and the indices that never finished."""
    from leaderless.client import LeaderlessError
    from leaderless.client.tasks import TaskWatcher

    n = len(calls)
    ids: list[bytes] = [b""] * n
    index: dict[bytes, int] = {}
    infos: dict[int, Any] = {}
    done = asyncio.Event()
    submit_errors = 0
    times = {"first_submit": 0.0, "last_submit": 0.0, "last_done": 0.0}

    def deliver(task_id: bytes, info: Any) -> None:
        i = index.get(task_id)
        if i is None or i in infos:
            return
        infos[i] = info
        times["last_done"] = time.perf_counter()
        if on_progress is not None:
            on_progress(len(infos))
        if len(infos) == n:
            done.set()

    watcher = TaskWatcher(client, deliver)
    pending = iter(range(n))
    times["first_submit"] = time.perf_counter()

    async def submitter() -> None:
        nonlocal submit_errors
        for i in pending:
            task_id = os.urandom(16)
            for _attempt in range(5):
                try:
                    got = await client.submit_task(calls[i][0], calls[i][1], tags=tags,
                                                   task_id=task_id)
                    break
                except LeaderlessError:
                    submit_errors += 1
                    await asyncio.sleep(0.2)
            else:
                continue
            ids[i] = got
            index[got] = i
            watcher.add(got)

    await asyncio.gather(*(submitter() for _ in range(concurrency)))
    times["last_submit"] = time.perf_counter()
    try:
        await asyncio.wait_for(done.wait(), timeout_s)
    except TimeoutError:
        pass
    await watcher.close()
    elapsed = times["last_done"] - times["first_submit"]
    return {"n": n, "completed": len(infos), "elapsed_s": elapsed,
            "submit_s": times["last_submit"] - times["first_submit"],
            "per_s": len(infos) / elapsed if elapsed > 0 else 0.0,
            "submit_errors": submit_errors, "ids": ids, "infos": infos,
            "never_finished": [i for i in range(n) if i not in infos]}


def check_results(batch: dict[str, Any], expected: list[Any]) -> dict[str, int]:
    import msgspec
    wrong = failed = 0
    for i, info in batch["infos"].items():
        if isinstance(info, BaseException) or info.state != "succeeded":
            failed += 1
        elif msgspec.msgpack.decode(info.result) != expected[i]:
            wrong += 1
    return {"failed": failed, "wrong": wrong}


def cpu_split(pids: list[int]) -> dict[str, float]:
    """CPU seconds used so far by the node processes, by their worker processes, and by
    this process (the load generator)."""
    import psutil
    nodes = workers = 0.0
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            t = proc.cpu_times()
            nodes += t.user + t.system
            for child in proc.children(recursive=True):
                c = child.cpu_times()
                workers += c.user + c.system
        except psutil.Error:
            pass
    me = os.times()
    return {"nodes": nodes, "workers": workers, "bench": me.user + me.system}


async def trivial_throughput(client: Any, n: int, concurrency: int,
                             pids: list[int]) -> dict[str, Any]:
    calls = [(f"{MODULE}:add", targs(i, i)) for i in range(n)]
    before = cpu_split(pids)
    batch = await run_batch(client, calls, concurrency, timeout_s=300)
    after = cpu_split(pids)
    cpu = {k: round(after[k] - before[k], 2) for k in after}
    checks = check_results(batch, [2 * i for i in range(n)])
    return {"tasks": n, "concurrency": concurrency, "completed": batch["completed"],
            "tasks_per_s": round(batch["per_s"]), "elapsed_s": round(batch["elapsed_s"], 2),
            "submit_phase_s": round(batch["submit_s"], 2),
            "submit_errors": batch["submit_errors"], "cpu_s": cpu,
            "cpu_ms_per_task": {k: round(1000 * v / max(1, n), 2) for k, v in cpu.items()},
            **checks}


async def sequential_overhead(client: Any, n: int) -> dict[str, Any]:
    """One task at a time: submit, then WaitTasks until it is done (``add``: its own run time
    in the worker is microseconds, so the latency is the scheduling overhead)."""
    submit_ms, total_ms = [], []
    for i in range(n):
        t0 = time.perf_counter()
        task_id = await client.submit_task(f"{MODULE}:add", targs(i, 1))
        t1 = time.perf_counter()
        while True:
            reply = await client.wait_tasks([task_id], 10.0)
            if reply.tasks:
                break
        t2 = time.perf_counter()
        assert reply.tasks[0].state == "succeeded"
        submit_ms.append((t1 - t0) * 1000)
        total_ms.append((t2 - t0) * 1000)
    return {"tasks": n, "p50_ms": round(statistics.median(total_ms), 2),
            "p99_ms": round(pct(total_ms, 99), 2), "mean_ms": round(statistics.mean(total_ms), 2),
            "submit_p50_ms": round(statistics.median(submit_ms), 2),
            "submit_p99_ms": round(pct(submit_ms, 99), 2)}


def py_spy(pid: int, seconds: int, out: Path) -> subprocess.Popen[bytes]:
    exe = Path(sys.executable).parent / "py-spy"
    return subprocess.Popen([str(exe), "record", "-p", str(pid), "-d", str(seconds), "-r",
                             "100", "-f", "raw", "-o", str(out), "--nonblocking"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)


def summarize_profile(path: Path, top: int = 15) -> dict[str, Any]:
    """Top self (leaf) frames and top inclusive functions of a py-spy raw (collapsed) file."""
    leaf: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    if not path.exists():
        return {"samples": 0}
    for line in path.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = stack.split(";")
        total += count
        leaf[frames[-1]] += count
        for f in set(frames):
            inclusive[f] += count
    # Inclusive by function (line numbers dropped), leaderless code only, without the
    # frames every sample of the main thread has (cli, process.run, the event loop).
    functions: collections.Counter[str] = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        names = {f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0] + ")"
                 for f in stack.split(";") if "leaderless/" in f}
        for name in names:
            if not any(skip in name for skip in ("cli.py", "process.py")):
                functions[name] += int(count_s)

    def share(c: collections.Counter[str]) -> list[list[Any]]:
        return [[f, round(100 * k / total, 1)] for f, k in c.most_common(top)]
    return {"samples": total, "top_self_pct": share(leaf), "top_inclusive_pct": share(inclusive),
            "top_leaderless_functions_inclusive_pct": share(functions)}


async def profile_run(cluster: Cluster, client: Any, n: int, concurrency: int,
                      workdir: Path) -> dict[str, Any]:
    out = workdir / "node1.pyspy.txt"
    spy = py_spy(cluster.procs[0].pid, 10, out)
    await asyncio.sleep(0.5)
    calls = [(f"{MODULE}:add", targs(i, i)) for i in range(n)]
    batch = await run_batch(client, calls, concurrency, timeout_s=300)
    await asyncio.to_thread(spy.wait, 60)
    summary = summarize_profile(out)
    summary["during_run_tasks_per_s"] = round(batch["per_s"])
    summary["raw_file_lines"] = (len(out.read_text().splitlines()) if out.exists() else 0)
    return summary


async def detection_time(cluster: Cluster, survivor: int, victim: str, kill_t: float,
                         timeout_s: float = 30) -> dict[str, float | None]:
    """Seconds from the kill until a survivor lists the victim as not alive (suspect) and
    as dead (or gone)."""
    from leaderless.client import AsyncClient, LeaderlessError
    seen: dict[str, float | None] = {"suspect_s": None, "dead_s": None}
    async with AsyncClient([cluster.clients[survivor]], ring_refresh_s=0) as kv:
        while time.time() - kill_t < timeout_s:
            try:
                ring = await kv.describe_ring()
                states = [m.state for m in ring if m.name == victim]
                now = round(time.time() - kill_t, 2)
                if seen["suspect_s"] is None and states != ["alive"]:
                    seen["suspect_s"] = now
                if not states or states[0] not in ("alive", "suspect"):
                    seen["dead_s"] = now
                    return seen
            except LeaderlessError:
                pass
            await asyncio.sleep(0.05)
    return seen


def reclaim_delays(infos: list[Any], victim: str, kill_ms: int) -> list[float]:
    """For every task the victim held at the kill: seconds from the kill to its first
    ``claimed`` by another node."""
    delays = []
    for info in infos:
        held = None
        for t in info.history:
            if t.at_ms > kill_ms:
                break
            if t.state in ("claimed", "running"):
                held = t.node
            elif t.state in ("succeeded", "failed", "cancelled", "pending", "retrying"):
                held = None
        if held != victim:
            continue
        after = [t for t in info.history if t.state == "claimed" and t.node != victim
                 and t.at_ms >= kill_ms]
        if after:
            delays.append((after[0].at_ms - kill_ms) / 1000)
    return delays


async def death_to_reclaim(cluster: Cluster, tasks: int, run_s: float) -> dict[str, Any]:
    """Long tasks submitted, the node that holds the first one SIGKILLed while it runs it,
    then each of the victim's tasks' first claim elsewhere (from the task histories)."""
    from leaderless.client import AsyncClient
    async with AsyncClient(cluster.clients, timeout_s=20) as kv:
        ids = [await kv.submit_task(f"{MODULE}:sleep_for", targs(run_s, i))
               for i in range(tasks)]
        deadline = time.monotonic() + 30
        while True:
            # claimed = running: there is no separate start round (finish carries it)
            infos = [await kv.task_status(t) for t in ids]
            if all(i is not None and i.state in ("claimed", "running") for i in infos):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"tasks not all running: {[i and i.state for i in infos]}")
            await asyncio.sleep(0.05)
    holders = [i.holder if i else "" for i in infos]
    victim = holders[0]
    victim_i = cluster.names.index(victim)
    survivors = [i for i in range(cluster.n) if i != victim_i]
    await asyncio.sleep(0.5)
    kill_t = time.time()
    cluster.procs[victim_i].send_signal(signal.SIGKILL)
    detect = asyncio.create_task(detection_time(cluster, survivors[0], victim, kill_t))
    async with AsyncClient([cluster.clients[i] for i in survivors], timeout_s=20) as kv:
        final: list[Any] = []
        deadline = time.monotonic() + 120
        for task_id in ids:
            while True:
                reply = await kv.wait_tasks([task_id], 10.0)
                if reply.tasks or time.monotonic() > deadline:
                    break
            final.append(await kv.task_status(task_id))
    detected = await detect
    delays = reclaim_delays([f for f in final if f is not None], victim, int(kill_t * 1000))
    return {"victim": victim, "tasks": tasks, "holders_at_kill": holders,
            "task_run_s": run_s, "lease_ttl_s": LEASE_TTL_S,
            "suspected_s": detected["suspect_s"], "detection_s": detected["dead_s"],
            "reclaim_s": [round(d, 2) for d in delays],
            "succeeded": sum(1 for f in final if f is not None and f.state == "succeeded")}


async def kill_during_batch(cluster: Cluster, victim_i: int, n: int, concurrency: int,
                            task_s: float, kill_after: int) -> dict[str, Any]:
    """n tasks through all nodes; the victim SIGKILLed once ``kill_after`` have finished.
    Lost = acknowledged tasks that never finish; also duplicates and wrong results."""
    from leaderless.client import AsyncClient
    victim = cluster.names[victim_i]
    state: dict[str, Any] = {"kill_t": None}

    def progress(done: int) -> None:
        if done >= kill_after and state["kill_t"] is None:
            state["kill_t"] = time.time()
            cluster.procs[victim_i].send_signal(signal.SIGKILL)

    async with AsyncClient(cluster.clients, timeout_s=20) as client:
        calls = [(f"{MODULE}:sleep_for", targs(task_s, i)) for i in range(n)]
        batch = await run_batch(client, calls, concurrency, timeout_s=180,
                                on_progress=progress)
        checks = check_results(batch, list(range(n)))
        full = []
        for i in batch["infos"]:
            info = await client.task_status(batch["ids"][i])
            if info is not None:
                full.append(info)
        unfinished: collections.Counter[str] = collections.Counter()
        sample: list[Any] = []
        for i in batch["never_finished"]:
            info = await client.task_status(batch["ids"][i]) if batch["ids"][i] else None
            if info is None:
                unfinished["no task"] += 1
                continue
            unfinished[f"{info.state} holder={info.holder or '-'}"] += 1
            if len(sample) < 3:
                sample.append([[t.state, t.node, t.at_ms - kill_ms_of(state), t.note]
                               for t in info.history])
    twice = sum(1 for f in full if len([t for t in f.history if t.state in
                                        ("succeeded", "failed", "cancelled")]) > 1)
    rerun = sum(1 for f in full if victim in {t.node for t in f.history
                                              if t.state in ("claimed", "running")}
                and f.history[-1].node != victim)
    kill_ms = int((state["kill_t"] or 0) * 1000)
    delays = reclaim_delays(full, victim, kill_ms) if state["kill_t"] else []
    return {"victim": victim, "tasks": n, "task_s": task_s, "killed_after_done": kill_after,
            "acknowledged": sum(1 for i in batch["ids"] if i),
            "completed": batch["completed"], "lost": len(batch["never_finished"]),
            "submit_errors": batch["submit_errors"], "recorded_twice": twice,
            "ran_again_after_kill": rerun,
            "elapsed_s": round(batch["elapsed_s"], 2),
            "reclaim_s": [round(d, 2) for d in delays],
            "unfinished_states": dict(unfinished),
            "unfinished_history_sample_ms_from_kill": sample, **checks}


def kill_ms_of(state: dict[str, Any]) -> int:
    return int((state["kill_t"] or 0) * 1000)


async def cpu_speedup(workdir: Path, tasks: int, burn_n: int) -> dict[str, Any]:
    from leaderless.client import AsyncClient
    tags = [["w1", "w2", "w3"], ["w2", "w3"], ["w3"]]
    cluster = Cluster(workdir / "cpu", 3, slots=1, tags=tags)
    cluster.start()
    out: dict[str, Any] = {"tasks": tasks, "burn_n": burn_n, "slots_per_node": 1}
    try:
        await cluster.ready()
        async with AsyncClient(cluster.clients, timeout_s=20) as client:
            # warm the path (queue name seen, workers imported)
            await run_batch(client, [(f"{MODULE}:add", targs(1, 1))] * 3, 3, 60,
                            tags=("w3",))
            for k in (1, 2, 3):
                calls = [(f"{MODULE}:cpu_burn", targs(burn_n))] * tasks
                batch = await run_batch(client, calls, 8, 300, tags=(f"w{k}",))
                nodes: collections.Counter[str] = collections.Counter()
                for i in batch["infos"]:
                    info = await client.task_status(batch["ids"][i])
                    nodes[next((t.node for t in info.history if t.state == "claimed"),
                               "?") if info else "?"] += 1
                out[f"nodes_{k}"] = {"elapsed_s": round(batch["elapsed_s"], 2),
                                     "completed": batch["completed"],
                                     "ran_on": dict(sorted(nodes.items()))}
                log(f"cpu batch on {k} node(s): {batch['elapsed_s']:.2f} s {dict(nodes)}")
        base = out["nodes_1"]["elapsed_s"]
        for k in (1, 2, 3):
            out[f"nodes_{k}"]["speedup"] = round(base / out[f"nodes_{k}"]["elapsed_s"], 2)
        # a dead node's tasks running elsewhere: 1-slot nodes, so n3 holds one task
        out["death"] = [await death_to_reclaim(cluster, 2, 8.0)]
    finally:
        cluster.stop()
    return out


# -- Celery ---------------------------------------------------------------------------------


class Redis:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_ports(1)[0]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
               "--appendonly", "no", "--dir", str(self.workdir), "--protected-mode", "no",
               "--loglevel", "warning"]
        self.proc = spawn(cmd, self.workdir / "redis.log", cwd=REPO)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not listen")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def celery_app(url: str) -> Any:
    os.environ["BENCH_CELERY_BROKER"] = url
    import importlib
    sys.path.insert(0, str(REPO / "bench"))
    mod = importlib.import_module("tasks")
    return mod


def celery_worker(url: str, workdir: Path, concurrency: int) -> subprocess.Popen[bytes]:
    exe = Path(sys.executable).parent / "celery"
    cmd = [str(exe), "-A", "tasks", "worker", "--pool", "prefork", "--concurrency",
           str(concurrency), "--loglevel", "warning", "--without-gossip", "--without-mingle",
           "--without-heartbeat"]
    return spawn(cmd, workdir / "celery.log",
                 {"BENCH_CELERY_BROKER": url, "PYTHONPATH": f"{REPO}:{REPO / 'bench'}"},
                 cwd=REPO / "bench")


def celery_bench(workdir: Path, n: int, concurrency: int, lost_n: int) -> dict[str, Any]:
    out: dict[str, Any] = {"worker": f"prefork --concurrency {concurrency}",
                           "celery": None}
    import celery as celery_pkg
    out["celery"] = celery_pkg.__version__
    redis = Redis(workdir)
    redis.start()
    mod = celery_app(redis.url)
    worker = celery_worker(redis.url, workdir, concurrency)
    try:
        # wait for the worker
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if mod.c_add.delay(1, 1).get(timeout=2) == 2:
                    break
            except Exception:
                pass
        t0 = time.perf_counter()
        results = [mod.c_add.delay(i, i) for i in range(n)]
        submit_s = time.perf_counter() - t0
        values = [r.get(timeout=120) for r in results]
        elapsed = time.perf_counter() - t0
        out["trivial"] = {"tasks": n, "tasks_per_s": round(n / elapsed),
                          "elapsed_s": round(elapsed, 2), "submit_phase_s": round(submit_s, 2),
                          "wrong": sum(v != 2 * i for i, v in enumerate(values))}
        log(f"celery trivial: {n / elapsed:.0f} tasks/s")
        # the broker dies: 1,000 tasks queued, SIGKILL redis once 100 have run
        marks = workdir / "celery_done.txt"
        marks.write_text("")
        submitted = 0
        for i in range(lost_n):
            mod.c_record.apply_async((i, str(marks), 0.01), ignore_result=True)
            submitted += 1
        deadline = time.monotonic() + 60
        while len(marks.read_text().splitlines()) < 100 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert redis.proc is not None
        redis.proc.send_signal(signal.SIGKILL)
        redis.proc.wait()
        done_at_kill = len(marks.read_text().splitlines())
        t = time.perf_counter()
        submit_error = None
        try:
            mod.c_record.apply_async((lost_n, str(marks), 0.01), ignore_result=True,
                                     retry=False)
        except Exception as exc:
            submit_error = f"{type(exc).__name__}: {str(exc)[:120]}"
        submit_fail_s = time.perf_counter() - t
        time.sleep(3.0)
        redis.proc = None
        restart = Redis(workdir)
        restart.port = redis.port
        restart.start()  # same port, empty (no persistence): the worker reconnects
        time.sleep(15.0)
        done = {int(x) for x in marks.read_text().split()}
        out["broker_killed"] = {
            "tasks": lost_n, "done_when_killed": done_at_kill,
            "completed": len(done & set(range(lost_n))), "lost": lost_n - len(
                done & set(range(lost_n))),
            "submit_while_down": submit_error or "accepted",
            "submit_while_down_s": round(submit_fail_s, 2),
            "redis_restarted_empty_after_s": 3.0, "waited_after_restart_s": 15.0,
            "worker_alive": worker.poll() is None}
        log(f"celery broker killed: {out['broker_killed']}")
    finally:
        stop([worker])
        stop([p for p in live() if isinstance(p.args, list) and p.args
              and p.args[0] == "redis-server"])
    return out


# -- ProcessPoolExecutor ------------------------------------------------------------------


def pool_bench(n: int, cpu_tasks: int, burn_n: int) -> dict[str, Any]:
    sys.path.insert(0, str(REPO))
    from tests import task_functions as tf
    with concurrent.futures.ProcessPoolExecutor(2) as ex:
        list(ex.map(tf.add, range(4), range(4)))  # workers started
        t0 = time.perf_counter()
        futures = [ex.submit(tf.add, i, i) for i in range(n)]
        values = [f.result() for f in futures]
        trivial_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        list(ex.map(tf.cpu_burn, [burn_n] * cpu_tasks))
        cpu_s = time.perf_counter() - t0
    assert values == [2 * i for i in range(n)]
    return {"workers": 2, "trivial_tasks_per_s": round(n / trivial_s),
            "trivial_elapsed_s": round(trivial_s, 3), "cpu_elapsed_s": round(cpu_s, 2)}


def calibrate_burn(target_s: float) -> tuple[int, float]:
    sys.path.insert(0, str(REPO))
    from tests import task_functions as tf
    n = 200_000
    while True:
        t0 = time.perf_counter()
        tf.cpu_burn(n)
        took = time.perf_counter() - t0
        if took > 0.05:
            n = int(n * target_s / took)
            t0 = time.perf_counter()
            tf.cpu_burn(n)
            return n, time.perf_counter() - t0
        n *= 4


# -- main -----------------------------------------------------------------------------------


async def leaderless_bench(workdir: Path, opts: argparse.Namespace) -> dict[str, Any]:
    from leaderless.client import AsyncClient
    out: dict[str, Any] = {"nodes": 3, "slots_per_node": opts.slots, "lease_ttl_s": LEASE_TTL_S}
    cluster = Cluster(workdir / "main", 3, opts.slots)
    cluster.start()
    try:
        await cluster.ready()
        async with AsyncClient(cluster.clients, timeout_s=20) as client:
            await run_batch(client, [(f"{MODULE}:add", targs(1, 1))] * 50, 16, 60)  # warm
            out["trivial"] = await trivial_throughput(client, opts.tasks, opts.concurrency,
                                                      [p.pid for p in cluster.procs])
            log(f"leaderless trivial: {out['trivial']}")
            out["overhead"] = await sequential_overhead(client, opts.sequential)
            log(f"leaderless overhead: {out['overhead']}")
            out["profile"] = await profile_run(cluster, client, opts.tasks, opts.concurrency,
                                               workdir)
            log(f"profile: {out['profile'].get('samples')} samples")
        out["node_killed"] = await kill_during_batch(cluster, 2, opts.lost_tasks,
                                                     opts.concurrency, 0.01,
                                                     opts.lost_tasks // 4)
        log(f"leaderless node killed: {out['node_killed']}")
    finally:
        cluster.stop()
    return out


def markdown(r: dict[str, Any]) -> str:
    L, C, P = r["leaderless"], r.get("celery", {}), r["process_pool"]
    cpu = r["cpu"]
    lines = [
        "| | leaderless (3 nodes x 2 slots) | Celery + Redis (prefork 2) | "
        "ProcessPoolExecutor(2) |",
        "|---|---|---|---|",
        f"| trivial tasks/s ({L['trivial']['tasks']} `add`) | {L['trivial']['tasks_per_s']} | "
        f"{C.get('trivial', {}).get('tasks_per_s', '-')} | {P['trivial_tasks_per_s']} |",
        f"| one task at a time, submit→result p50 / p99 ms | {L['overhead']['p50_ms']} / "
        f"{L['overhead']['p99_ms']} | - | - |",
        f"| CPU batch {cpu['tasks']} x cpu_burn ({r['burn_s']:.2f} s), wall s | "
        f"1 node {cpu['nodes_1']['elapsed_s']}, 2 nodes {cpu['nodes_2']['elapsed_s']}, "
        f"3 nodes {cpu['nodes_3']['elapsed_s']} (1 slot each) | - | {P['cpu_elapsed_s']} |",
        f"| lost of {L['node_killed']['tasks']} when one node / the broker is SIGKILLed | "
        f"{L['node_killed']['lost']} (node {L['node_killed']['victim']}) | "
        f"{C.get('broker_killed', {}).get('lost', '-')} (Redis) | - |",
        "",
        "| CPU batch | wall s | speed-up vs 1 node | ran on (tasks) |",
        "|---|---|---|---|",
    ]
    for k in (1, 2, 3):
        v = cpu[f"nodes_{k}"]
        lines.append(f"| {k} node(s), 1 slot each | {v['elapsed_s']} | {v['speedup']} | "
                     f"{v['ran_on']} |")
    lines.append(f"| ProcessPoolExecutor(2) | {P['cpu_elapsed_s']} | "
                 f"{round(cpu['nodes_1']['elapsed_s'] / P['cpu_elapsed_s'], 2)} | - |")
    lines.append(f"| serial ({cpu['tasks']} x {r['burn_s']:.2f} s) | "
                 f"{round(cpu['tasks'] * r['burn_s'], 2)} | - | - |")
    d = cpu["death"][0]
    k = L["node_killed"]
    lines += ["", "| node death | declared dead after s (suspect) | "
              "kill → first claim elsewhere, s (per task) | "
              "goal (detection + lease TTL) s |", "|---|---|---|---|",
              f"| {d['victim']} holding {d['tasks']} long task(s) | {d['detection_s']} "
              f"({d['suspected_s']}) | "
              f"{d['reclaim_s']} | {r['reclaim_goal_s']} |",
              f"| {k['victim']} during {k['tasks']} tasks | - | "
              f"max {max(k['reclaim_s'], default='-')} over {len(k['reclaim_s'])} tasks | "
              f"{r['reclaim_goal_s']} |"]
    return "\n".join(lines)


def goals(r: dict[str, Any]) -> list[str]:
    L = r["leaderless"]
    out = []
    tps = L["trivial"]["tasks_per_s"]
    out.append(f">= 1,000 trivial tasks/s through 3 nodes: {'met' if tps >= 1000 else 'missed'}"
               f" ({tps}/s, x{tps / 1000:.2f} of the goal)")
    p50 = L["overhead"]["p50_ms"]
    out.append(f"scheduling overhead <= 2 ms per task at low load: "
               f"{'met' if p50 <= 2 else 'missed'} (median {p50} ms, p99 "
               f"{L['overhead']['p99_ms']} ms; x{p50 / 2:.1f} of the goal)")
    lost = L["node_killed"]["lost"]
    out.append(f"zero lost tasks when any one node dies: {'met' if lost == 0 else 'missed'} "
               f"({lost} of {L['node_killed']['tasks']} lost, "
               f"{L['node_killed']['recorded_twice']} recorded twice, "
               f"{L['node_killed']['wrong']} wrong; Celery lost "
               f"{r.get('celery', {}).get('broker_killed', {}).get('lost', '-')} when its "
               "broker died)")
    reclaims = r["cpu"]["death"][0]["reclaim_s"] + L["node_killed"]["reclaim_s"]
    worst = max(reclaims, default=None)
    goal = r["reclaim_goal_s"]
    out.append(f"a dead node's tasks running elsewhere within detection + one lease TTL "
               f"({goal} s): {'met' if worst is not None and worst <= goal else 'missed'} "
               f"(worst {worst} s over {len(reclaims)} tasks)")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=3000, help="trivial tasks per run")
    parser.add_argument("--concurrency", type=int, default=64, help="submits in flight")
    parser.add_argument("--sequential", type=int, default=200)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--cpu-tasks", type=int, default=24)
    parser.add_argument("--burn-s", type=float, default=0.25)
    parser.add_argument("--lost-tasks", type=int, default=1000)
    parser.add_argument("--no-celery", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--keep-logs", action="store_true")
    parser.add_argument("--out", default=str(RESULTS))
    opts = parser.parse_args()
    if opts.quick:
        opts.tasks, opts.sequential, opts.cpu_tasks, opts.lost_tasks = 500, 50, 8, 300
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.path.insert(0, str(REPO))
    workdir = Path(tempfile.mkdtemp(prefix="leaderless-tasks-bench-"))
    result: dict[str, Any] = {"benchmark": "tasks", "cpus": os.cpu_count(),
                              "loadavg_at_start": os.getloadavg(),
                              "options": {k: v for k, v in vars(opts).items() if k != "out"}}
    try:
        burn_n, burn_s = calibrate_burn(opts.burn_s)
        result["burn_n"], result["burn_s"] = burn_n, burn_s
        log(f"cpu_burn({burn_n}) takes {burn_s:.3f} s here")
        result["process_pool"] = pool_bench(opts.tasks, opts.cpu_tasks, burn_n)
        log(f"process pool: {result['process_pool']}")
        try:
            import uvloop
            runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
        except ImportError:
            runner = asyncio.Runner()
        with runner:
            result["leaderless"] = runner.run(leaderless_bench(workdir, opts))
            result["cpu"] = runner.run(cpu_speedup(workdir, opts.cpu_tasks, burn_n))
        if not opts.no_celery:
            (workdir / "celery").mkdir()
            result["celery"] = celery_bench(workdir / "celery", opts.tasks, 2, opts.lost_tasks)
    finally:
        stop_all()
        if opts.keep_logs:
            log(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    detections = [d["detection_s"] for d in result["cpu"]["death"] if d["detection_s"]]
    result["detection_s"] = max(detections, default=None)
    result["reclaim_goal_s"] = round((result["detection_s"] or 0) + LEASE_TTL_S, 2)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=REPO).stdout.strip()
    result["commit"] = commit
    result["loadavg_at_end"] = os.getloadavg()  # other work on the machine skews the run
    result["table"] = markdown(result)
    result["goals"] = goals(result)
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(result["table"])
    print()
    for g in result["goals"]:
        print(f"- {g}")
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
