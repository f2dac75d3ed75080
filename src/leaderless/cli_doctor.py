"""``leaderless doctor``: what is wrong with the cluster, and what to do about it.

    leaderless doctor [--node HOST:PORT] [--json]

The asked node (any node: its node port) gathers a report from every alive member and
runs the checks (``obs.doctor``): members not alive, health states, clock offsets, disk
space and growth, hints, anti-entropy lag, certificate expiry, mixed versions, keyspaces
with more replicas than live nodes. It prints the findings, the most severe first, each
with a suggested fix; ``--json`` prints ``{"asked", "checked_at", "findings": [...],
"critical", "warning", "info"}`` (the same as ``GET /api/doctor``). On a cluster with TLS,
set ``LEADERLESS_TLS_CA``, ``LEADERLESS_TLS_CERT`` and ``LEADERLESS_TLS_KEY``.

Exit codes: 0 nothing critical (warnings and info may be listed); 1 at least one critical
finding, or the node is unreachable or refused; 2 invalid usage.
"""

from __future__ import annotations

import json
import sys

import click
from rich.console import Console
from rich.table import Table

from leaderless.config import DEFAULT_BIND
from leaderless.runtime.doctor import REPORT_TIMEOUT_S, findings_json
from leaderless.runtime.process import EXIT_FATAL

DOCTOR_TIMEOUT_S = REPORT_TIMEOUT_S + 10.0
"""The asked node waits REPORT_TIMEOUT_S for the members' reports; the rest is margin for
the connection and its own checks."""
EXIT_CRITICAL = EXIT_FATAL
"""At least one critical finding: scripts and cron jobs alert on a non-zero exit."""
SEVERITY_STYLES = {"critical": "bold red", "warning": "yellow", "info": "dim"}


@click.command()
@click.option("--node", "node", default=DEFAULT_BIND, show_default=True, metavar="HOST:PORT",
              help="The node to ask (its node port; any node).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def doctor(node: str, as_json: bool) -> None:
    """Diagnose the whole cluster: findings by severity, each with a fix.

    Exits 0 when nothing is critical, 1 when something is (or the node is unreachable)."""
    # The CLI's node-port call (TLS from LEADERLESS_TLS_*, clear exits); imported here
    # because leaderless.cli imports this module to register the command.
    from leaderless.cli import _call

    reply = _call(node, lambda client: client.doctor(), DOCTOR_TIMEOUT_S)
    result = findings_json(reply)
    if as_json:
        click.echo(json.dumps(result))
    else:
        _print_table(result)
    sys.exit(EXIT_CRITICAL if result["critical"] else 0)


def _print_table(result: dict[str, object]) -> None:
    findings = result["findings"]
    assert isinstance(findings, list)
    console = Console(highlight=False)
    if not findings:
        console.print(f"no findings: the cluster looks healthy (asked {result['asked']})")
        return
    table = Table(show_lines=True)
    for column in ("severity", "check", "subject", "finding", "fix"):
        table.add_column(column, overflow="fold")
    for f in findings:
        style = SEVERITY_STYLES[f["severity"]]
        table.add_row(f"[{style}]{f['severity']}[/]", f["check"], f["subject"],
                      f["message"], f["fix"])
    console.print(table)
    console.print(f"{result['critical']} critical, {result['warning']} warning, "
                  f"{result['info']} info (asked {result['asked']})")
