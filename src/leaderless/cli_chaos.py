"""``leaderless chaos``: a Jepsen-style run on real processes, with a verdict.

    leaderless chaos --nodes 5 --workload register --nemesis partition,kill \\
        --duration 60 --seed 42 [--json] [--out DIR]

Starts a cluster of real nodes (each in its own network namespace when this machine
allows it, else on loopback ports with transport fault hooks; the output says which),
runs the workload (register, set, counter, lock) against it while the nemesis injects a
seeded schedule of faults (kill, pause, partition, clock, disk; ``all``; ``none``), heals,
waits, reads back and checks the history (``leaderless.chaos``). Prints a verdict table
(``--json``: one JSON object) and writes DIR/history.jsonl, DIR/faults.json,
DIR/result.json and DIR/timeline.png.

Exit codes: 0 the history is valid; 1 it is not (anomalies listed); 2 the run could not be
set up (or invalid usage).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from leaderless.chaos.nemesis import KINDS
from leaderless.chaos.workloads import WORKLOADS

EXIT_VALID, EXIT_INVALID, EXIT_SETUP = 0, 1, 2


@click.command()
@click.option("--nodes", type=click.IntRange(1, 32), default=5, show_default=True,
              help="Real node processes to start.")
@click.option("--workload", type=click.Choice(list(WORKLOADS)), default="register",
              show_default=True)
@click.option("--nemesis", default="partition,kill", show_default=True,
              help=f"Comma-separated fault kinds: {', '.join(KINDS)}; or all, or none.")
@click.option("--duration", type=click.FloatRange(min=1.0), default=60.0, show_default=True,
              help="Seconds of workload under faults.")
@click.option("--seed", type=int, default=42, show_default=True,
              help="Seeds the fault schedule and the workload's choices.")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory for history.jsonl, faults.json, result.json, timeline.png "
                   "(default: a new temporary directory).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object, not a table.")
@click.option("--concurrency", type=click.IntRange(1, 64), default=5, show_default=True,
              help="Client workers, each with one operation in flight.")
@click.option("--interval", type=click.FloatRange(min=0.5), default=5.0, show_default=True,
              help="A fault starts about every this many seconds.")
@click.option("--mode", type=click.Choice(["auto", "netns", "loopback"]), default="auto",
              show_default=True, help="Network namespaces (root) or loopback ports.")
@click.option("--settle", type=click.FloatRange(min=0.0), default=5.0, show_default=True,
              help="Seconds to wait after healing before the final reads.")
def chaos(nodes: int, workload: str, nemesis: str, duration: float, seed: int,
          out: Path | None, as_json: bool, concurrency: int, interval: float, mode: str,
          settle: float) -> None:
    """Run a workload against a real cluster under faults and check its history.

    Exits 0 when the history is valid, 1 when it is not, 2 when the run cannot start."""
    from leaderless.chaos.runner import ChaosConfig, ChaosSetupError, run_chaos

    out_dir = out or Path(tempfile.mkdtemp(prefix=f"leaderless-chaos-{workload}-{seed}-"))
    config = ChaosConfig(workload=workload, nodes=nodes, nemesis=nemesis,
                         duration_s=duration, seed=seed, out_dir=out_dir, mode=mode,
                         concurrency=concurrency, interval_s=interval, settle_s=settle)
    try:
        config.validate()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    err = Console(stderr=True)

    def echo(line: str) -> None:
        err.print(line, markup=False, highlight=False, soft_wrap=True)

    try:
        summary = run_chaos(config, echo=echo)
    except ChaosSetupError as exc:
        if as_json:
            click.echo(json.dumps({"valid": None, "workload": workload, "seed": seed,
                                   "error": str(exc), "out": str(out_dir)}))
        else:
            err.print(f"[bold red]chaos: setup failed:[/] {exc}")
        sys.exit(EXIT_SETUP)
    summary.pop("result", None)
    if as_json:
        click.echo(json.dumps(summary))
    else:
        _print_table(summary)
    sys.exit(EXIT_VALID if summary["valid"] else EXIT_INVALID)


def _print_table(summary: dict[str, Any]) -> None:
    console = Console()
    verdict = "[bold green]VALID[/]" if summary["valid"] else "[bold red]INVALID[/]"
    table = Table(title=f"chaos {summary['workload']}: {verdict}", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    rows = [
        ("workload", summary["workload"]),
        ("seed", str(summary["seed"])),
        ("nodes", f"{summary['nodes']} ({summary['mode']})"),
        ("nemesis", ", ".join(summary["nemesis"]) or "none"),
        ("faults injected", str(summary["faults"])),
        ("duration", f"{summary['duration_s']} s"),
        ("ok / failed / indeterminate",
         f"{summary['ok']} / {summary['failed']} / {summary['indeterminate']}"),
        ("lost acknowledged writes", str(summary["lost_acknowledged_writes"])),
        ("undecided (search budget spent)", ", ".join(summary["unknown"]) or "none"),
        ("recovered after healing", "yes" if summary["recovered"] else "NO"),
        ("output", summary["out"]),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    for anomaly in summary["anomalies"]:
        console.print(Text(f"anomaly: {anomaly}", style="red"))
