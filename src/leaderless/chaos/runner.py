"""One chaos run: a real cluster, a workload, a nemesis, a verdict.

``run_chaos(ChaosConfig(...))``:

1. starts a ``ChaosCluster`` of ``nodes`` real node processes (network namespaces when
   possible, else loopback with transport fault hooks: ``mode`` says which);
2. creates the workload's keyspace and connects ``concurrency`` clients (one per worker);
3. prints the nemesis's seeded schedule, then runs the workload and the nemesis together
   for ``duration_s``; the nemesis heals everything at the end;
4. waits until every node is back and sees every other alive, then ``settle_s`` more (hints
   replay, read repair, anti-entropy), and makes the workload's final reads;
5. checks the history (``chaos.checkers``) and writes into ``out_dir``: ``history.jsonl``
   (every operation), ``faults.json`` (every fault with its start and end), ``result.json``
   (the summary and the checker's full result), ``timeline.png`` (operations per process
   over time, faults as shaded spans; needs matplotlib: ``pip install leaderless[chaos]``)
   and ``cluster/`` (the nodes' data dirs and logs).

The summary (``--json`` prints it) has ``valid``, ``workload``, ``seed``, ``nodes``,
``mode``, ``ok``, ``failed``, ``indeterminate``, ``lost_acknowledged_writes``,
``anomalies`` (the first 20), ``unknown`` (what the linearizability search could not
decide within its budget: flagged, not counted as invalid), ``duration_s``, ``faults``
(how many), ``out`` and ``recovered`` (whether every node came back healthy after the
faults).
A setup failure (no cluster, no keyspace, no client connection) raises ``ChaosSetupError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import random
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from leaderless.chaos.cluster import ChaosCluster, ChaosUnsupported
from leaderless.chaos.history import FINAL_PROCESS, History, write_jsonl
from leaderless.chaos.nemesis import Nemesis, format_schedule, parse_kinds
from leaderless.chaos.workloads import WORKLOADS, Workload, make_workload, run_workload
from leaderless.client import AsyncClient
from leaderless.client.errors import LeaderlessError

__all__ = ["ChaosConfig", "ChaosSetupError", "plot_timeline", "run_chaos"]

ANOMALIES_SHOWN = 20
RECOVERY_TIMEOUT_S = 90.0
"""After healing: how long the nodes get to come back and see each other alive."""
SETUP_TIMEOUT_S = 60.0


class ChaosSetupError(RuntimeError):
    """The run could not start (cluster, keyspace or clients): no verdict."""


@dataclasses.dataclass
class ChaosConfig:
    workload: str = "register"
    nodes: int = 5
    nemesis: str = "partition,kill"
    """Comma-separated kinds (``chaos.nemesis.KINDS``), ``all``, or ``none``."""
    duration_s: float = 60.0
    seed: int = 42
    out_dir: Path = Path("chaos-out")
    mode: str = "auto"
    concurrency: int = 5
    interval_s: float = 5.0
    """A fault starts about every this many seconds."""
    op_timeout_s: float = 5.0
    settle_s: float = 5.0

    def kinds(self) -> set[str]:
        return set() if self.nemesis.strip() in ("", "none") else parse_kinds(self.nemesis)

    def validate(self) -> None:
        if self.workload not in WORKLOADS:
            raise ValueError(f"unknown workload {self.workload!r}; choose from "
                             f"{', '.join(WORKLOADS)}")
        if self.nodes < 1 or self.concurrency < 1 or self.duration_s <= 0:
            raise ValueError("nodes, concurrency and duration must be positive")
        self.kinds()


def run_chaos(config: ChaosConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole run (see the module doc); returns the summary, with the checker's full
    result under ``result``. Raises ``ChaosSetupError`` when it cannot start."""
    config.validate()
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cluster = ChaosCluster(config.nodes, out / "cluster", config.seed, mode=config.mode,
                           echo=echo)
    try:
        try:
            cluster.start(SETUP_TIMEOUT_S)
        except (ChaosUnsupported, TimeoutError, OSError, RuntimeError) as exc:
            raise ChaosSetupError(f"the cluster did not start: {exc}") from exc
        return asyncio.run(_run(config, cluster, out, echo))
    finally:
        cluster.stop()


async def _connect(addresses: list[str], config: ChaosConfig, i: int) -> AsyncClient:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETUP_TIMEOUT_S
    while True:
        client = AsyncClient(addresses, timeout_s=config.op_timeout_s,
                             rng=random.Random(f"{config.seed}-client-{i}"))
        try:
            await client.connect()
            return client
        except (LeaderlessError, OSError, TimeoutError) as exc:
            await client.close()
            if loop.time() > deadline:
                raise ChaosSetupError(f"no client connection to {addresses}: {exc}") from exc
            await asyncio.sleep(0.5)


async def _run(config: ChaosConfig, cluster: ChaosCluster, out: Path,
               echo: Callable[[str], None]) -> dict[str, Any]:
    workload = make_workload(config.workload, config.seed, concurrency=config.concurrency,
                             op_timeout_s=config.op_timeout_s)
    addresses = cluster.client_addresses()
    clients: list[AsyncClient] = []
    try:
        admin = await _connect(addresses, config, -1)
        clients.append(admin)
        try:
            await workload.setup(admin)
        except (LeaderlessError, OSError, TimeoutError) as exc:
            raise ChaosSetupError(f"the workload's keyspace could not be made: {exc}") from exc
        workers = [await _connect(addresses, config, i) for i in range(config.concurrency)]
        clients.extend(workers)
        return await _measure(config, cluster, workload, admin, workers, out, echo)
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                await client.close()


async def _measure(config: ChaosConfig, cluster: ChaosCluster, workload: Workload,
                   admin: AsyncClient, workers: list[AsyncClient], out: Path,
                   echo: Callable[[str], None]) -> dict[str, Any]:
    kinds = config.kinds()
    nemesis = (Nemesis(cluster, kinds, config.seed, config.interval_s, log=echo)
               if kinds else None)
    if nemesis is not None:
        echo(format_schedule(nemesis.schedule(config.duration_s), config.seed))
    else:
        echo("nemesis: none")
    history = History()
    started = time.monotonic()
    echo(f"chaos: {config.workload} workload, {config.concurrency} clients, "
         f"{config.duration_s:g} s")
    tasks: list[Coroutine[Any, Any, Any]] = [
        run_workload(workload, workers, history, config.duration_s)]
    if nemesis is not None:
        tasks.append(nemesis.run(config.duration_s))
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    history.close("the run ended before an answer")
    if isinstance(outcomes[0], BaseException):
        raise outcomes[0]
    nemesis_error = (f"{type(outcomes[1]).__name__}: {outcomes[1]}"
                     if len(outcomes) > 1 and isinstance(outcomes[1], BaseException) else None)
    if nemesis_error:
        echo(f"chaos: the nemesis failed (its faults are healed): {nemesis_error}")
    faults = nemesis.faults if nemesis is not None else []
    recovered = True
    try:
        await asyncio.to_thread(cluster.wait_healthy, RECOVERY_TIMEOUT_S)
    except TimeoutError as exc:
        recovered = False
        echo(f"chaos: after healing, the cluster did not recover: {exc}")
    await asyncio.sleep(config.settle_s)
    await workload.final(admin, history)
    ended = time.monotonic()
    result = await asyncio.to_thread(workload.check, history)
    summary = _summary(config, cluster, result, faults, ended - started, out, recovered)
    summary["nemesis_error"] = nemesis_error
    write_jsonl(history, out / "history.jsonl")
    (out / "faults.json").write_text(json.dumps(
        {"origin": started, "faults": faults}, indent=1, default=str))
    (out / "result.json").write_text(json.dumps(
        {**summary, "result": result, "cluster": cluster.describe()}, indent=1,
        default=str))
    plotted = plot_timeline(history, faults, out / "timeline.png", origin=started,
                            title=f"{config.workload}, seed {config.seed}, "
                                  f"{config.nodes} nodes ({cluster.mode}): "
                                  f"{'valid' if result['valid'] else 'INVALID'}")
    summary["timeline"] = plotted
    summary["result"] = result
    return summary


def _summary(config: ChaosConfig, cluster: ChaosCluster, result: dict[str, Any],
             faults: list[dict[str, Any]], duration_s: float, out: Path,
             recovered: bool) -> dict[str, Any]:
    counts = result["counts"]
    return {
        "valid": bool(result["valid"]),
        "workload": config.workload,
        "seed": config.seed,
        "nodes": config.nodes,
        "mode": cluster.mode,
        "nemesis": sorted(config.kinds()),
        "ok": counts["ok"],
        "failed": counts["failed"],
        "indeterminate": counts["indeterminate"],
        "lost_acknowledged_writes": result["lost_acknowledged_writes"],
        "anomalies": result["anomalies"][:ANOMALIES_SHOWN],
        "unknown": [str(k) for k in result.get("unknown_keys", [])]
        + (["counter"] if result.get("linearizability") == "unknown" else []),
        "duration_s": round(duration_s, 1),
        "faults": len(faults),
        "recovered": recovered,
        "out": str(out),
    }


# -- the timeline plot ------------------------------------------------------------------------

FAULT_COLOURS = {"kill": "#d62728", "pause": "#9467bd", "partition": "#1f77b4",
                 "clock": "#bcbd22", "disk": "#8c564b"}
OP_COLOURS = {"ok": "#2ca02c", "fail": "#d62728", "info": "#ff7f0e"}


def plot_timeline(history: History, faults: list[dict[str, Any]], path: Path, *,
                  origin: float, title: str = "") -> str | None:
    """Operations per process over time (a line from invocation to answer, a mark at the
    answer: ok ●, fail ✕, info ▲ at the invocation; final reads on the top lane) and the
    faults as shaded spans. Returns the path written, or None (with why printed in the
    file's place) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        return None
    ops = history.operations()
    processes = sorted({op.process for op in ops if op.process != FINAL_PROCESS})
    lane = {p: i for i, p in enumerate(processes)}
    lane[FINAL_PROCESS] = len(processes)
    end_all = max((e.time for e in history.entries), default=origin) - origin
    fig, ax = plt.subplots(figsize=(14, 1.5 + 0.45 * len(lane)))
    for fault in faults:
        start = float(fault["start"]) - origin
        stop = (float(fault["end"]) - origin) if fault.get("end") is not None else end_all
        colour = FAULT_COLOURS.get(fault["kind"], "#7f7f7f")
        ax.axvspan(start, stop, color=colour, alpha=0.15, lw=0)
        ax.text(start, len(lane) - 0.4, f"{fault['kind']} {' '.join(fault['targets'])}",
                fontsize=7, color=colour, va="bottom", rotation=0, clip_on=True)
    for kind, marker in (("ok", "o"), ("fail", "x"), ("info", "^")):
        chosen = [op for op in ops if op.type == kind]
        if not chosen:
            continue
        ys = [lane[op.process] for op in chosen]
        starts = [op.start - origin for op in chosen]
        ends = [(op.completion.time if op.completion is not None else op.start) - origin
                for op in chosen]
        ax.hlines(ys, starts, ends, colors=OP_COLOURS[kind], lw=1.0, alpha=0.6)
        at = starts if kind == "info" else ends
        ax.scatter(at, ys, s=9 if kind != "info" else 16, marker=marker,
                   c=OP_COLOURS[kind], label=f"{kind} ({len(chosen)})", lw=0.8)
    ax.set_yticks(range(len(lane)))
    ax.set_yticklabels([f"process {p}" for p in processes] + ["final reads"])
    ax.set_ylim(-0.7, len(lane) + 0.3)
    ax.set_xlabel("seconds since the workload started")
    ax.set_title(title)
    handles, _ = ax.get_legend_handles_labels()
    handles += [Patch(color=c, alpha=0.3, label=k) for k, c in FAULT_COLOURS.items()
                if any(f["kind"] == k for f in faults)]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
