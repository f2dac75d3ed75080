"""Ring changes from the command line: decommission, capacity, cleanup, ring status.

    leaderless node decommission [--node HOST:PORT] [--no-wait] [--json]
    leaderless node set-capacity WEIGHT [--node HOST:PORT] [--json]
    leaderless node cleanup [--node HOST:PORT] [--no-wait] [--json]
    leaderless ring status [--node HOST:PORT] [--json] [--watch]

``--node`` is the node port of the node to act on (for ``ring status``: any node). Every
command answers with the cluster's ring status as the asked node gathers it (each alive
member reports its own figures within 3 s: ``runtime.ring_status``).

``decommission`` waits (unless ``--no-wait``) until the node has left: it shows the
fetches of the members that take over its ranges as progress bars (ranges done/total,
bytes, rate, ETA), refreshed every second; once the node stops answering it asks another
member whether it left, then prints one line. ``cleanup`` waits until the node's cleanup
pass ends and prints the rows it deleted. ``--json`` prints one JSON object: the ring
status (``GET /api/ring`` has the same shape; for a decommission that waited, the last
status, from a remaining member). ``ring status --watch`` refreshes every second until
Ctrl-C (with ``--json``: one object per line).

On a cluster with TLS, set ``LEADERLESS_TLS_CA``, ``LEADERLESS_TLS_CERT`` and
``LEADERLESS_TLS_KEY``. Exit codes: 0 done; 1 the node refused (the reason on stderr),
is unreachable, or the change failed (the node died instead of leaving, cleanup stopped);
2 invalid usage.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress import BarColumn, Progress, TaskID, TextColumn
from rich.table import Table

from leaderless.api.client import ApiError, Client, NodeUnreachableError
from leaderless.api.messages import RingMember, RingOperation, RingReply
from leaderless.config import DEFAULT_BIND, parse_host_port
from leaderless.core.messages import Address
from leaderless.runtime.process import EXIT_CONFIG, EXIT_FATAL, run
from leaderless.runtime.ring_status import REPORT_TIMEOUT_S, ring_json, streaming

T = TypeVar("T")
REFRESH_S = 1.0
"""How often waiting commands and ``--watch`` ask again."""
CALL_TIMEOUT_S = REPORT_TIMEOUT_S + 5.0
"""The asked node waits up to REPORT_TIMEOUT_S for the members' reports."""
LEFT_CONFIRM_S = 60.0
"""After the decommissioned node stops answering, how long to wait for another member
to see it left (gossip spreads it in seconds)."""
STATE_STYLES = {"normal": "green", "joining": "cyan", "leaving": "yellow", "left": "dim",
                "dead": "red"}

node_option = click.option(
    "--node", "node", default=DEFAULT_BIND, show_default=True, metavar="HOST:PORT",
    help="The node's node port.")
json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print one JSON object (the ring status).")
no_wait_option = click.option("--no-wait", "no_wait", is_flag=True,
                              help="Return once the node has started (do not wait).")


class RingCommandError(Exception):
    """A ring command failed (the message says why); exits 1."""


def _fail(message: str, code: int = EXIT_FATAL) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _address(text: str) -> Address:
    try:
        return parse_host_port(text)
    except ValueError as exc:
        _fail(f"--node: {text!r} {exc}", EXIT_CONFIG)


def _ssl() -> ssl.SSLContext | None:
    from leaderless.cli_certs import client_ssl_from_env  # (it imports the cli module)

    return client_ssl_from_env()


async def ask(address: Address, context: ssl.SSLContext | None,
              operation: RingOperation = "status", weight: float = 0.0) -> RingReply:
    """One ring request on a fresh connection (a node that leaves closes its own)."""
    async with Client(address, CALL_TIMEOUT_S, ssl_context=context) as client:
        return await client.ring(operation, weight)


def _run(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``main``, turning failures into exits with the reason on stderr."""
    try:
        return run(main())
    except ApiError as exc:
        _fail(f"the node refused: {exc}" if exc.code == "ring_refused" else str(exc))
    except NodeUnreachableError as exc:
        _fail(str(exc))
    except RingCommandError as exc:
        _fail(str(exc))
    except (OSError, TimeoutError, ConnectionError) as exc:
        _fail(f"lost the connection: {exc or type(exc).__name__}")


# -- rendering ------------------------------------------------------------------------------


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def human_eta(eta_s: float | None) -> str:
    if eta_s is None:
        return "ETA ?"
    seconds = int(round(eta_s))
    if seconds >= 3600:
        return f"ETA {seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"ETA {seconds // 60}:{seconds % 60:02d}"


def _tokens(m: RingMember) -> str:
    return (f"{m.token_count} -> {m.next_token_count}" if m.next_token_count
            else str(m.token_count))


def _stream_cell(m: RingMember) -> str:
    s = m.stream
    if s is None or s.ranges_total == 0:
        return "" if m.reported else "?"
    if not streaming(s):
        return f"fetched {s.ranges_total} ranges ({human_bytes(s.bytes_received)})"
    return (f"{s.ranges_done}/{s.ranges_total} ranges, {human_bytes(s.bytes_received)}, "
            f"{human_bytes(s.bytes_per_s)}/s, {human_eta(s.eta_s)}")


def _notes(m: RingMember) -> str:
    notes = []
    if m.replacing:
        notes.append(f"replacing {m.replacing}")
    if m.waiting_for:
        more = f" +{m.waiting_more}" if m.waiting_more else ""
        notes.append(f"waits for {', '.join(m.waiting_for)}{more}")
    if m.cleanup is not None and m.cleanup.running:
        notes.append(f"cleanup running ({m.cleanup.deleted_rows} rows deleted)")
    if m.error:
        notes.append(m.error if m.reported else f"no report: {m.error}")
    return "; ".join(notes)


def status_table(reply: RingReply) -> Table:
    table = Table(title=f"ring (asked {reply.asked})", title_justify="left")
    for column in ("member", "state", "tokens", "owns", "stream", "notes"):
        table.add_column(column, overflow="fold")
    for m in reply.members:
        style = STATE_STYLES.get(m.state, "")
        state = m.state if m.status in ("alive", m.state) else f"{m.state} ({m.status})"
        table.add_row(m.name, f"[{style}]{state}[/]", _tokens(m), f"{m.ownership:.1%}",
                      _stream_cell(m), _notes(m))
    return table


def summary_line(reply: RingReply) -> str:
    s = reply.summary
    states = ", ".join(f"{count} {state}" for state, count in sorted(s.states.items()))
    line = f"{s.members} members ({states})"
    if s.streaming:
        line += (f"; {s.streaming} streaming: {s.ranges_done}/{s.ranges_total} ranges, "
                 f"{human_bytes(s.bytes_per_s)}/s, {human_eta(s.eta_s)}")
    line += "; a ring change is in progress" if s.changing else "; the ring is stable"
    return line


class StreamBars:
    """One rich progress bar per member with ranges to fetch, updated from each reply."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(),
            TextColumn("{task.completed:.0f}/{task.total:.0f} ranges"),
            TextColumn("{task.fields[bytes]}"), TextColumn("{task.fields[rate]}"),
            TextColumn("{task.fields[eta]}"), auto_refresh=False)
        self._tasks: dict[str, TaskID] = {}

    def update(self, reply: RingReply) -> None:
        for m in reply.members:
            s = m.stream
            if s is None or s.ranges_total == 0:
                continue
            size = human_bytes(s.bytes_received)
            rate = f"{human_bytes(s.bytes_per_s)}/s"
            eta = "done" if not streaming(s) else human_eta(s.eta_s)
            task = self._tasks.get(m.name)
            if task is None:
                task = self.progress.add_task(f"{m.name} ({m.state}) fetching",
                                              total=s.ranges_total, bytes=size, rate=rate,
                                              eta=eta)
                self._tasks[m.name] = task
            self.progress.update(task, total=s.ranges_total, completed=s.ranges_done,
                                 bytes=size, rate=rate, eta=eta)

    @property
    def empty(self) -> bool:
        return not self._tasks


def render(reply: RingReply, bars: StreamBars | None = None) -> RenderableType:
    parts: list[RenderableType] = [status_table(reply), summary_line(reply)]
    if bars is not None:
        bars.update(reply)
        if not bars.empty:
            parts.append(bars.progress)
    return Group(*parts)


def _print_json(reply: RingReply) -> None:
    click.echo(json.dumps(ring_json(reply)))


def _me(reply: RingReply, name: str) -> RingMember | None:
    return next((m for m in reply.members if m.name == name), None)


# -- ring status ----------------------------------------------------------------------------


@click.group("ring")
def ring() -> None:
    """The ring: who owns what, and the changes in progress."""


@ring.command("status")
@node_option
@json_option
@click.option("--watch", is_flag=True, help="Refresh every second until Ctrl-C.")
def ring_status(node: str, as_json: bool, watch: bool) -> None:
    """Every member's ring state, token count, share of the ring, stream progress (ranges,
    bytes, rate, ETA), what a leave waits for, and cleanup."""
    address, context = _address(node), _ssl()
    if not watch:
        reply = _run(lambda: ask(address, context))
        if as_json:
            _print_json(reply)
        else:
            Console(highlight=False).print(render(reply))
        return

    async def forever() -> None:
        if as_json:
            while True:
                _print_json(await ask(address, context))
                await asyncio.sleep(REFRESH_S)
        bars = StreamBars()
        with Live(render(await ask(address, context), bars), auto_refresh=False) as live:
            while True:
                await asyncio.sleep(REFRESH_S)
                live.update(render(await ask(address, context), bars), refresh=True)

    try:
        _run(forever)
    except KeyboardInterrupt:
        pass


# -- node commands --------------------------------------------------------------------------


@click.command("decommission")
@node_option
@no_wait_option
@json_option
def decommission(node: str, no_wait: bool, as_json: bool) -> None:
    """Stream this node's ranges to their next owners, then leave the cluster.

    Waits (progress bars of the members fetching its ranges) until the node has left."""
    address, context = _address(node), _ssl()
    started = time.monotonic()
    first = _run(lambda: ask(address, context, "decommission"))
    name = first.asked
    if no_wait:
        if as_json:
            _print_json(first)
        else:
            click.echo(f"{name} is leaving: it streams its ranges to their next owners, "
                       "then leaves (`leaderless ring status --watch` shows the progress)")
        return
    last = _run(lambda: _wait_left(address, context, first, as_json))
    elapsed = time.monotonic() - started
    if as_json:
        _print_json(last)
        return
    gainers = sorted(m.name for m in last.members
                     if m.stream is not None and m.stream.ranges_total and m.name != name)
    taken = f": its ranges are held by {', '.join(gainers)}" if gainers else ""
    click.echo(f"{name} left the ring in {elapsed:.0f} s{taken}")


async def _wait_left(address: Address, context: ssl.SSLContext | None, first: RingReply,
                     quiet: bool) -> RingReply:
    """Show the progress until the asked node has left; the last status (from another
    member once it stopped answering). Raises RingCommandError if it died instead."""
    name = first.asked
    last = first
    bars = StreamBars()
    console = Console(highlight=False, stderr=quiet)
    with Live(render(first, bars), console=console, auto_refresh=False,
              transient=True) as live:
        while True:
            await asyncio.sleep(REFRESH_S)
            try:
                last = await ask(address, context)
            except (ApiError, OSError, TimeoutError, ConnectionError):
                break  # it stopped answering: it left (or died)
            me = _me(last, name)
            if me is not None and me.state == "left":
                break
            live.update(render(last, bars), refresh=True)
    return await _confirm_left(name, last, context)


async def _confirm_left(name: str, last: RingReply, context: ssl.SSLContext | None
                        ) -> RingReply:
    """Ask the other members (from the last status) until one sees ``name`` left."""
    others = [m for m in last.members if m.name != name and m.status == "alive"]
    if not others:
        raise RingCommandError(f"{name} stopped answering and no other member is known "
                               "to ask whether it left")
    deadline = time.monotonic() + LEFT_CONFIRM_S
    seen = "unknown"
    while time.monotonic() < deadline:
        for member in others:
            try:
                reply = await ask(parse_host_port(member.address), context)
            except (ApiError, OSError, TimeoutError, ConnectionError, ValueError):
                continue
            me = _me(reply, name)
            if me is None or me.state == "left":  # (a left member is forgotten in time)
                return reply
            seen = f"{me.state} ({me.status})"
            if me.state == "dead":
                raise RingCommandError(
                    f"{name} stopped answering and {member.name} sees it dead, not left: "
                    "it crashed during the decommission; restart it (it resumes leaving) "
                    f"or replace it (`leaderless node start --replace {name}`)")
        await asyncio.sleep(REFRESH_S)
    raise RingCommandError(f"{name} stopped answering but the other members still see it "
                           f"{seen} after {LEFT_CONFIRM_S:g} s; check its log")


@click.command("set-capacity")
@click.argument("weight", type=click.FloatRange(0, 1000, min_open=True))
@node_option
@json_option
def set_capacity(weight: float, node: str, as_json: bool) -> None:
    """Change the node's capacity WEIGHT, (0, 1000]: its token count follows (256 per unit
    of weight), and the ranges it gains or gives up stream like a join's."""
    address, context = _address(node), _ssl()
    reply = _run(lambda: ask(address, context, "set_capacity", weight))
    if as_json:
        _print_json(reply)
        return
    me = _me(reply, reply.asked)
    if me is None or not me.next_token_count:
        click.echo(f"{reply.asked}: the capacity is already {weight:g} "
                   f"({me.token_count if me else '?'} tokens); nothing to change")
        return
    click.echo(f"{reply.asked}: capacity change from {me.token_count} to "
               f"{me.next_token_count} tokens started (`leaderless ring status --watch` shows "
               "the progress)")


@click.command("cleanup")
@node_option
@no_wait_option
@json_option
def cleanup(node: str, no_wait: bool, as_json: bool) -> None:
    """Delete the rows of the ranges this node no longer holds (refused while the ring
    changes). Waits until the pass ends and prints the rows deleted."""
    address, context = _address(node), _ssl()
    started = time.monotonic()
    first = _run(lambda: ask(address, context, "cleanup"))
    me = _me(first, first.asked)
    before = me.cleanup.deleted_rows if me is not None and me.cleanup is not None else 0
    last = first if no_wait else _run(lambda: _wait_cleanup(address, context, first.asked))
    if as_json:
        _print_json(last)
        return
    if no_wait:
        click.echo(f"{first.asked}: cleanup started")
        return
    me = _me(last, last.asked)
    figures = me.cleanup if me is not None else None
    if figures is None:
        _fail(f"{last.asked} gave no cleanup figures")
    if figures.error:
        _fail(f"{last.asked}: cleanup stopped: {figures.error}")
    click.echo(f"{last.asked}: cleanup deleted {figures.deleted_rows - before} rows in "
               f"{time.monotonic() - started:.1f} s")


async def _wait_cleanup(address: Address, context: ssl.SSLContext | None,
                        name: str) -> RingReply:
    while True:
        reply = await ask(address, context)
        me = _me(reply, name)
        if me is None or me.cleanup is None or not me.cleanup.running:
            return reply
        await asyncio.sleep(REFRESH_S)


def register(main: click.Group, node: click.Group) -> None:
    """Add ``ring status`` and the ``node`` ring commands to the CLI."""
    main.add_command(ring)
    for command in (decommission, set_capacity, cleanup):
        node.add_command(command)
