"""Membership in the deterministic simulator at 100, 1,000 and 10,000 nodes, and under loss.

Each run (``leaderless.sim.scenarios.run_membership``) converges, measures traffic over a
quiet window, then crashes one node and changes another's metadata at one instant, and
runs on to its duration counting false suspicions and deaths. Prints a markdown table and
writes bench/results/membership_sim.json. Measures only; nothing asserts a timing.

    python bench/membership_sim.py            # every run below (~10 min on 2 cores)
    python bench/membership_sim.py --quick    # skip 10,000 nodes

Bootstrap: ``join`` (nodes start 10 ms apart and join through three running seeds) up to
1,000 nodes; ``converged`` (every node starts knowing every other alive) at 10,000, where
10,000 joins with full-state syncs would be O(n^2).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import click

from leaderless.sim.scenarios import Bootstrap, run_membership

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "membership_sim.json"


@dataclasses.dataclass(frozen=True)
class Run:
    nodes: int
    loss: float
    duration_s: float
    bootstrap: Bootstrap
    window_s: float
    window_start_s: float
    seed: int = 1


SCALE_RUNS = [
    Run(100, 0.0, 70.0, "join", 10.0, 32.0),
    Run(1000, 0.0, 90.0, "join", 10.0, 41.0),
    Run(10_000, 0.0, 14.0, "converged", 3.0, 0.0),
]
"""Steady-state cost and speed as n grows (no loss). The traffic window starts after every
node's first full-state sync (30 s after the last node started) at 100 and 1,000 nodes; at
10,000 it is the first 3 s, before any sync (the first would come at 15-30 s and cost
O(n^2) to simulate), so its sync cost is only in the amortized column."""
LOSS_RUNS = [Run(100, loss, 900.0, "join", 10.0, 32.0) for loss in (0.01, 0.05, 0.10)]
"""False positives under loss: 100 nodes for 15 simulated minutes (25 node-hours) each."""


def _row(run: Run) -> dict[str, object]:
    result, _ = run_membership(run.nodes, run.seed, run.loss, run.duration_s, run.bootstrap,
                               run.window_s, window_start_s=run.window_start_s)
    row = result.to_json()
    node_hours = run.nodes * result.duration_s / 3600
    row["node_hours"] = node_hours
    row["false_deaths_per_node_hour"] = result.false_deaths / node_hours
    row["false_suspicions_per_node_hour"] = result.false_suspicions / node_hours
    return row


def _fmt(value: object, digits: int = 2) -> str:
    if value is None:
        return "never"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(rows: list[dict[str, object]]) -> str:
    head = ("| nodes | bootstrap | loss | converged (s) | dissemination (s) | detection (s) "
            "| msgs/node/s | bytes/node/s (UDP) | sync B/node/s amortized "
            "| false susp. / node-h | false deaths / node-h | false deaths | node-h "
            "| sim s | wall s |")
    lines = [head, "|" + "---|" * 15]
    for r in rows:
        lines.append(
            f"| {r['nodes']:,} | {r['bootstrap']} | {r['loss']:.0%} | {_fmt(r['converged_s'])} "
            f"| {_fmt(r['dissemination_s'])} | {_fmt(r['detection_s'])} "
            f"| {_fmt(r['msgs_per_node_s'])} | {_fmt(r['bytes_per_node_s'], 0)} "
            f"({_fmt(r['udp_bytes_per_node_s'], 0)}) | {_fmt(r['sync_bytes_per_node_s'], 0)} "
            f"| {_fmt(r['false_suspicions_per_node_hour'])} "
            f"| {_fmt(r['false_deaths_per_node_hour'], 3)} | {r['false_deaths']} "
            f"| {_fmt(r['node_hours'], 1)} | {_fmt(r['duration_s'], 0)} "
            f"| {_fmt(r['wall_s'], 1)} |")
    return "\n".join(lines)


def run_sim_bench(quick: bool = False, write: bool = True) -> list[dict[str, object]]:
    """Run every configured simulation; print the table; write the JSON; return the rows."""
    runs = [r for r in SCALE_RUNS + LOSS_RUNS if not (quick and r.nodes > 1000)]
    rows: list[dict[str, object]] = []
    started = time.perf_counter()
    for run in runs:
        rows.append(_row(run))
        click.echo(f"  {run.nodes} nodes, loss {run.loss:.0%}: "
                   f"{rows[-1]['wall_s']:.1f} s wall", err=True)
    click.echo(markdown(rows))
    if write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        payload = {"runs": rows, "wall_s": time.perf_counter() - started,
                   "command": "python bench/membership_sim.py"}
        RESULTS.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        click.echo(f"wrote {RESULTS}", err=True)
    return rows


@click.command()
@click.option("--quick", is_flag=True, help="Skip the 10,000-node run.")
def main(quick: bool) -> None:
    run_sim_bench(quick=quick)


if __name__ == "__main__":
    main()
