"""``leaderless up``: a local cluster of N node processes on 127.0.0.1, watched live.

Each node is a child ``leaderless node start`` process with its own port (free for both
UDP and TCP) and data directory; all join the first. A table of members and their states,
as the nodes report them over the native protocol, refreshes in place on a terminal and
is printed as plain text otherwise. SIGINT/SIGTERM stops the cluster: every child gets
SIGTERM (a graceful leave), stragglers get SIGKILL after a timeout, and no child outlives
the supervisor (children also watch their parent and leave if it disappears).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import IO, Any

from rich import box
from rich.console import Console
from rich.live import Live
from rich.table import Table

from leaderless.api.client import Client
from leaderless.api.messages import MemberInfo
from leaderless.core.messages import Address
from leaderless.runtime.ports import find_free_ports
from leaderless.runtime.process import run

HOST = "127.0.0.1"
STOP_TIMEOUT_S = 5.0
"""SIGTERM -> SIGKILL grace: a node's leave takes at most its leave_timeout_s (2 s)."""
REFRESH_INTERVAL_S = 1.0
PLAIN_REPRINT_S = 10.0
"""Without a terminal, a table is printed when it changes, and at least this often."""
QUERY_TIMEOUT_S = 1.0
CLIENT_BASE_PORT = 7400
"""Native client ports of ``up`` start here (the CLI's default --node for data commands)."""
HTTP_BASE_PORT = 7500
STATE_STYLES = {"alive": "green", "suspect": "yellow", "dead": "red", "left": "dim"}


@dataclasses.dataclass
class Child:
    name: str
    port: int
    data_dir: Path
    log_path: Path
    client_port: int = 0
    http_port: int = 0
    process: asyncio.subprocess.Process | None = None
    log_file: IO[bytes] | None = None
    view: list[MemberInfo] | None = None
    """The members this node reported at the last refresh (None if it did not answer)."""

    @property
    def address(self) -> Address:
        return Address(HOST, self.port)

    def process_state(self) -> str:
        if self.process is None:
            return "not started"
        if self.process.returncode is None:
            return f"pid {self.process.pid}"
        return f"exited {self.process.returncode}"


class Supervisor:
    def __init__(self, nodes: int, base_port: int | None, data_dir: Path,
                 console: Console, json_output: bool = False) -> None:
        self.json_output = json_output
        # With --json, stdout carries only JSON; messages for people go to stderr.
        self.messages = Console(stderr=True) if json_output else console
        self.nodes = nodes
        self.base_port = base_port
        self.data_dir = data_dir
        self.console = console
        self.children: list[Child] = []
        self._stop = asyncio.Event()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._stop.set)
        ports = find_free_ports(HOST, self.nodes, self.base_port)
        taken = set(ports)
        client_ports = _other_ports(self.nodes, CLIENT_BASE_PORT if self.base_port else None,
                                    taken)
        http_ports = _other_ports(self.nodes, HTTP_BASE_PORT if self.base_port else None,
                                  taken)
        try:
            await self._start_children(ports, client_ports, http_ports)
            self.messages.print(f"[bold]{self.nodes} nodes[/] on {HOST}; data and logs in "
                               f"{self.data_dir}/<name>/ . Ctrl-C stops the cluster.")
            for child in self.children:
                self.messages.print(
                    f"  {child.name}: cluster {HOST}:{child.port}  client "
                    f"{HOST}:{child.client_port}  http http://{HOST}:{child.http_port}/")
            await self._display()
        finally:
            await self._stop_children()
        self.messages.print(f"stopped {len(self.children)} nodes")
        return 0

    async def _start_children(self, ports: list[int], client_ports: list[int],
                              http_ports: list[int]) -> None:
        seed = f"{HOST}:{ports[0]}"
        for i, port in enumerate(ports, start=1):
            name = f"node{i}"
            data_dir = self.data_dir / name
            data_dir.mkdir(parents=True, exist_ok=True)
            child = Child(name, port, data_dir, data_dir / "node.log", client_ports[i - 1],
                          http_ports[i - 1])
            self.children.append(child)
            args = [sys.executable, "-m", "leaderless", "node", "start", "--name", name,
                    "--bind", f"{HOST}:{port}", "--data-dir", str(data_dir),
                    "--client", f"{HOST}:{child.client_port}",
                    "--http", f"{HOST}:{child.http_port}",
                    "--parent-pid", str(os.getpid()), "--no-bootstrap"]
            if i > 1:
                args += ["--join", seed]
            child.log_file = child.log_path.open("ab")
            child.process = await asyncio.create_subprocess_exec(
                *args, stdin=asyncio.subprocess.DEVNULL, stdout=child.log_file,
                stderr=child.log_file)

    async def _stop_children(self) -> None:
        running = [c.process for c in self.children
                   if c.process is not None and c.process.returncode is None]
        for process in running:
            _signal(process, signal.SIGTERM)
        waits = [asyncio.create_task(p.wait()) for p in running]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=STOP_TIMEOUT_S)
            for process in running:
                if process.returncode is None:
                    self.messages.print(f"pid {process.pid} did not stop in "
                                       f"{STOP_TIMEOUT_S:g} s; killing it")
                    _signal(process, signal.SIGKILL)
            await asyncio.gather(*pending)
        for child in self.children:
            if child.log_file is not None:
                child.log_file.close()

    async def _display(self) -> None:
        if self.console.is_terminal and not self.json_output:
            with Live(self._table(), console=self.console, auto_refresh=False) as live:
                while not await self._wait_stop(REFRESH_INTERVAL_S):
                    await self._refresh()
                    live.update(self._table(), refresh=True)
            return
        last_rows: list[dict[str, Any]] = []
        last_at = 0.0
        while not await self._wait_stop(REFRESH_INTERVAL_S):
            await self._refresh()
            rows = self.rows()
            now = time.monotonic()
            if rows == last_rows and now - last_at < PLAIN_REPRINT_S:
                continue
            last_rows, last_at = rows, now
            if self.json_output:
                print(json.dumps({"ts": round(time.time(), 3), "members": rows}), flush=True)
            else:
                self.console.print(f"-- {time.strftime('%H:%M:%S')}")
                self.console.print(self._table())

    async def _wait_stop(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self._stop.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def _refresh(self) -> None:
        await asyncio.gather(*(self._query(child) for child in self.children))

    async def _query(self, child: Child) -> None:
        if child.process is None or child.process.returncode is not None:
            child.view = None
            return
        try:
            async with Client(child.address, QUERY_TIMEOUT_S) as client:
                child.view = await client.members()
        except (OSError, TimeoutError, ConnectionError):
            child.view = None

    def rows(self) -> list[dict[str, Any]]:
        """One row per member: its process (if ours), its state and incarnation as the
        first answering node sees them, and how many nodes see it alive."""
        views = [c.view for c in self.children if c.view is not None]
        reference = {m.name: m for m in views[0]} if views else {}
        processes = {c.name: c for c in self.children}
        rows = []
        for name in sorted({*processes, *(m.name for view in views for m in view)}):
            child = processes.get(name)
            member = reference.get(name)
            rows.append({
                "name": name,
                "address": member.address if member else (str(child.address) if child else ""),
                "process": child.process_state() if child else "external",
                "pid": child.process.pid if child and child.process else None,
                "state": member.state if member else None,
                "incarnation": member.incarnation if member else None,
                "seen_alive_by": sum(1 for view in views for m in view
                                     if m.name == name and m.state == "alive"),
                "views": len(views),
                "changed_at": member.changed_at if member else None,
            })
        return rows

    def _table(self) -> Table:
        table = Table(title=f"leaderless: {len(self.children)} local nodes",
                      box=box.SIMPLE if self.console.is_terminal else box.ASCII)
        for column in ("name", "address", "process", "state", "incarnation",
                       "seen alive by", "last change"):
            table.add_column(column)
        for row in self.rows():
            state = row["state"] or "?"
            style = STATE_STYLES.get(state, "")
            changed = row["changed_at"]
            table.add_row(
                row["name"], row["address"], row["process"],
                f"[{style}]{state}[/]" if style else state,
                "" if row["incarnation"] is None else str(row["incarnation"]),
                f"{row['seen_alive_by']}/{row['views']}",
                time.strftime("%H:%M:%S", time.localtime(changed)) if changed else "",
            )
        return table


def _other_ports(count: int, base: int | None, taken: set[int]) -> list[int]:
    """``count`` free ports (from ``base`` up, or any) that are not in ``taken``."""
    found: list[int] = []
    start = base
    while len(found) < count:
        for port in find_free_ports(HOST, count + len(taken), start):
            if port not in taken and port not in found and len(found) < count:
                found.append(port)
        start = None if start is None else start + count + len(taken)
    taken.update(found)
    return found


def _signal(process: asyncio.subprocess.Process, signum: int) -> None:
    try:
        process.send_signal(signum)  # a no-op once the child has been reaped
    except ProcessLookupError:
        pass  # it exited between our check and the signal


def run_up(nodes: int, base_port: int | None, data_dir: Path, console: Console,
           json_output: bool = False) -> int:
    """Run the local cluster until SIGINT/SIGTERM; returns the exit code. With
    ``json_output``, one JSON object per changed table on stdout instead of tables."""
    return run(Supervisor(nodes, base_port, data_dir, console, json_output).run())
