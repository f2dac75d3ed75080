"""``python -m leaderless.sim``: run a simulated cluster from a seed and print what happened.

    python -m leaderless.sim membership --nodes 1000 --seed 7 --loss 0.05 --duration 120
    python -m leaderless.sim partition --nodes 50 --seed 7
    python -m leaderless.sim kv --seed 7
    python -m leaderless.sim locks --seed 7
    python -m leaderless.sim elastic --seeds 1000
"""

from __future__ import annotations

import dataclasses
import json

import click

from leaderless.core.membership_config import MembershipConfig
from leaderless.core.paxos import Done
from leaderless.sim.elastic import BROKEN_VARIANTS, ElasticSimConfig, run_elastic
from leaderless.sim.kv_faults import run_kv_faults
from leaderless.sim.lock_check import LockOp, WriteOp, check_lock_history, describe
from leaderless.sim.locks import LockSimConfig, counts, run_lock_seed
from leaderless.sim.scenarios import JOIN_SPACING_S, run_membership, run_partition_heal

JOIN_NODES_MAX = 1000
"""Above this, ``--bootstrap auto`` builds the cluster converged (joins cost O(n^2))."""
DETECTION_ROOM_S = 30.0
SYNC_NODES_MAX = 4000
"""Above this many converged nodes, full-state syncs are too costly to simulate (O(n^2))."""
FIRST_SYNC_S = MembershipConfig().push_pull_interval_s / 2
"""The earliest first full-state sync of a node: 0.5 * push_pull_interval_s after start."""
LARGE_DURATION_S = 14.0


def membership_command(nodes: int, seed: int, loss: float, duration: float, bootstrap: str,
                       window: float, stop_early: bool, min_duration: float = 0.0) -> str:
    """The one-line command that reproduces a ``run_membership`` call."""
    cmd = (f"python -m leaderless.sim membership --nodes {nodes} --seed {seed} --loss {loss} "
           f"--duration {duration} --bootstrap {bootstrap} --window {window} --window-start 0")
    if stop_early:
        cmd += f" --stop-early --min-duration {min_duration}"
    return cmd


def default_window_start(nodes: int, bootstrap: str, duration: float, window: float) -> float:
    """After every node's first full-state sync (15-30 s after it starts, whatever n), if
    that leaves the window plus ~30 s for detection; else right after convergence."""
    last_start = (nodes - 1) * JOIN_SPACING_S if bootstrap == "join" else 0.0
    start = last_start + MembershipConfig().push_pull_interval_s
    return start if start + window + DETECTION_ROOM_S <= duration else 0.0


def partition_command(nodes: int, seed: int, loss: float, hold: float,
                      split_max: float = 60.0) -> str:
    return (f"python -m leaderless.sim partition --nodes {nodes} --seed {seed} --loss {loss} "
            f"--hold {hold} --split-max {split_max}")


def _fmt(value: float | None, unit: str = "s") -> str:
    return "never" if value is None else f"{value:.3f} {unit}"


@click.group()
def main() -> None:
    """Deterministic simulations of a leaderless cluster (same core code, simulated world)."""


@main.command()
@click.option("--nodes", type=click.IntRange(3, 20_000), default=50, show_default=True)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--loss", type=click.FloatRange(0, 0.99), default=0.0, show_default=True,
              help="Probability that a datagram is lost (each direction, each packet).")
@click.option("--duration", type=click.FloatRange(min=1), default=None,
              help=f"Simulated seconds to run in all. Default: 120, or {LARGE_DURATION_S:g} "
                   f"above {SYNC_NODES_MAX:,} converged nodes.")
@click.option("--bootstrap", type=click.Choice(["auto", "join", "converged"]), default="auto",
              show_default=True, help=f"auto: join up to {JOIN_NODES_MAX} nodes, else converged.")
@click.option("--window", type=click.FloatRange(min=0), default=None,
              help="Quiet seconds after convergence over which traffic is measured. "
                   "Default: a quarter of the duration, at most 10.")
@click.option("--window-start", type=float, default=None,
              help="Start the quiet window no earlier than this. Default: once every node "
                   "had its first full-state sync (start + 30 s), if the duration allows.")
@click.option("--stop-early", is_flag=True, help="Stop once detection and dissemination are done.")
@click.option("--min-duration", type=click.FloatRange(min=0), default=0.0,
              help="With --stop-early: run at least this long, then until all views agree.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def membership(nodes: int, seed: int, loss: float, duration: float | None, bootstrap: str,
               window: float | None, window_start: float | None, stop_early: bool,
               min_duration: float, as_json: bool) -> None:
    """Converge, crash one node and change another's metadata, and measure."""
    mode = bootstrap if bootstrap != "auto" else (
        "join" if nodes <= JOIN_NODES_MAX else "converged")
    large = mode == "converged" and nodes > SYNC_NODES_MAX
    if duration is None:
        duration = LARGE_DURATION_S if large else 120.0
    if large and duration >= FIRST_SYNC_S:
        raise click.UsageError(
            f"{nodes:,} converged nodes can run at most {FIRST_SYNC_S:g} simulated s: then "
            f"every node starts its first full-state sync (core's initial push-pull timer does "
            f"not scale with n), which costs O(n^2) to simulate and gives every node its own "
            f"copy of the whole view (~2 MB per node at 10,000). Use --duration "
            f"{LARGE_DURATION_S:g}, or at most {SYNC_NODES_MAX:,} nodes.")
    if window is None:
        window = min(10.0, duration / 4)
    if window_start is None:
        window_start = default_window_start(nodes, mode, duration, window)
    result, _ = run_membership(nodes, seed, loss, duration, mode,  # type: ignore[arg-type]
                               window, stop_early, min_duration,
                               window_start_s=window_start)
    if as_json:
        click.echo(json.dumps(result.to_json(), sort_keys=True))
        return
    r = result
    click.echo(f"{r.nodes} nodes, seed {r.seed}, loss {r.loss:.1%}, {r.bootstrap} bootstrap, "
               f"{r.duration_s:.1f} simulated s in {r.wall_s:.1f} wall s ({r.events} events)")
    click.echo(f"  converged after        {_fmt(r.converged_s)}")
    click.echo(f"  traffic (quiet {r.window_s:.1f} s)  {r.msgs_per_node_s:.2f} msgs and "
               f"{r.bytes_per_node_s:.0f} bytes per node per s "
               f"({r.udp_bytes_per_node_s:.0f} of them UDP)")
    click.echo(f"  full-state syncs       {r.sync_bytes_per_node_s:.0f} bytes per node per s "
               "amortized over the push-pull period")
    click.echo(f"  dissemination          {_fmt(r.dissemination_s)} (metadata of {r.updated})")
    click.echo(f"  detection              {_fmt(r.detection_s)} (crash of {r.crashed})")
    click.echo(f"  false suspicions       {r.false_suspicions}")
    click.echo(f"  false deaths           {r.false_deaths}")
    click.echo(f"  all views agree at end {r.agreed_at_end}")


@main.command()
@click.option("--nodes", type=click.IntRange(4, 20_000), default=50, show_default=True)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--loss", type=click.FloatRange(0, 0.99), default=0.0, show_default=True)
@click.option("--hold", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Seconds to keep the cut after each side holds the other dead.")
@click.option("--split-max", type=click.FloatRange(min=1), default=200.0, show_default=True,
              help="Heal after this long even if the sides do not hold each other dead.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def partition(nodes: int, seed: int, loss: float, hold: float, split_max: float,
              as_json: bool) -> None:
    """Cut the cluster in two until each side holds the other dead, heal, reconverge."""
    result, _ = run_partition_heal(nodes, seed, loss, hold, split_max)
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(result), sort_keys=True))
        return
    click.echo(f"{result.nodes} nodes, seed {result.seed}, loss {result.loss:.1%}: "
               f"split after {_fmt(result.split_s)}, healed at {result.healed_at:.1f} s, "
               f"reconverged {_fmt(result.reconverged_s)} later ({result.wall_s:.1f} wall s)")


@main.command("kv")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--steps", type=click.IntRange(1, 100_000), default=400, show_default=True,
              help="Client operations, each followed by up to 50 ms of simulated time.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def kv(seed: int, steps: int, as_json: bool) -> None:
    """QUORUM reads and writes on 5 nodes (N=3) through crashes, partitions and 1 % loss;
    check that no read is stale and that every replica converges after healing."""
    report = run_kv_faults(seed, steps)
    if as_json:
        click.echo(json.dumps({**dataclasses.asdict(report), "ok": report.ok}, sort_keys=True))
    else:
        click.echo(f"seed {seed}: {report.writes_acked} writes and {report.reads_ok} reads "
                   f"acknowledged, {report.failed} failed (unavailable or timeout), "
                   f"{report.crashes} crashes, {report.partitions} partitions")
        click.echo(f"  stale QUORUM reads      {len(report.stale_reads)}")
        click.echo(f"  unconverged replicas    {len(report.unconverged)}")
        for line in report.stale_reads[:5] + report.unconverged[:5]:
            click.echo(f"  {line}")
    if not report.ok:
        raise SystemExit(1)


@main.command("locks")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--skew-spread", type=click.IntRange(0, 10_000), default=None,
              help="Spread of the node wall clocks in ms. Default: the bound the clients "
                   f"assume ({LockSimConfig().skew_max_ms} ms); wider breaks that assumption.")
@click.option("--history", "show_history", is_flag=True, help="Print every operation.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def locks(seed: int, skew_spread: int | None, show_history: bool, as_json: bool) -> None:
    """Clients take lock L on 3 nodes (N=3) through crashes, partitions, loss, duplication
    and skewed clocks, and write a data key under fencing tokens; check the history (one
    owner per token, tokens follow real time, no two holders while a lease is safe, fenced
    writes never go back) and that, healed, every node grants the lock."""
    sim, ended = run_lock_seed(seed, LockSimConfig(skew_spread_ms=skew_spread))
    history = sim.final
    violations = check_lock_history(history)
    if not ended:
        violations.insert(0, f"seed {seed}: the clients did not finish")
    if not history.final_read:
        violations.insert(0, f"seed {seed}: the data key or the lock could not be read "
                             "after healing")
    live = [name for name, acquired, released in sim.liveness()
            if not (isinstance(acquired, Done) and isinstance(released, Done))]
    if live:
        violations.append(f"seed {seed}: after healing, no grant and release through {live}")
    summary = counts(history)
    if as_json:
        click.echo(json.dumps({"seed": seed, "counts": summary, "violations": violations,
                               "skew_ms": sim.wall_skew_ms, "ok": not violations},
                              sort_keys=True))
    else:
        if show_history:
            ops: list[LockOp | WriteOp] = [*history.locks, *history.writes]
            ops.sort(key=lambda op: op.invoke_s)
            for op in ops:
                click.echo(f"  {describe(op)}")
        click.echo(f"seed {seed}: " + ", ".join(f"{k} {v}" for k, v in summary.items()))
        click.echo(f"  node clocks (ms off) {sim.wall_skew_ms}")
        click.echo(f"  final value {history.final_value!r} under token {history.final_fence}; "
                   f"lock {history.final_lock}")
        click.echo(f"  violations {len(violations)}")
        for line in violations[:20]:
            click.echo(f"  {line}")
    if violations:
        raise SystemExit(1)


@main.command("elastic")
@click.option("--seed", type=int, default=None, help="Run this seed only (and print it).")
@click.option("--seeds", type=click.IntRange(1, 1_000_000), default=100, show_default=True,
              help="Without --seed: run seeds 0..N-1.")
@click.option("--broken", type=click.Choice(["", *BROKEN_VARIANTS]), default="",
              help="Take a piece of the design out, to see the checker catch it.")
@click.option("--loss", type=click.FloatRange(0, 0.5), default=0.0, show_default=True)
def elastic(seed: int | None, seeds: int, broken: str, loss: float) -> None:
    """Concurrent joins, leaves and crashes under a QUORUM writer and reader (N=3); check
    that no read misses an acknowledged write and that every change completes."""
    config = ElasticSimConfig(broken=broken, loss=loss)
    failed = 0
    totals = [0, 0, 0, 0]
    for s in ([seed] if seed is not None else range(seeds)):
        report = run_elastic(s, config)
        totals = [a + b for a, b in zip(totals, (report.writes_ok, report.writes_failed,
                                                 report.reads_ok, report.reads_failed),
                                        strict=True)]
        if seed is not None or not report.ok:
            click.echo(report.summary())
            for line in (report.misses + report.problems)[:10]:
                click.echo(f"  {line}")
        failed += not report.ok
    runs = 1 if seed is not None else seeds
    click.echo(f"{runs} seeds, {failed} failed; writes {totals[0]} ok / {totals[1]} failed, "
               f"reads {totals[2]} ok / {totals[3]} failed")
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
