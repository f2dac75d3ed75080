"""Helpers for integration tests: real node processes started through the CLI, on free
loopback ports and tmp dirs.

Every process a test starts is registered with a ``Processes`` owner whose fixture kills it
at the end, pass or fail. Children also get ``--parent-pid`` so that even a killed
pytest leaves no node behind. Waiting is always polling with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from leaderless.api.client import Client
from leaderless.api.messages import MemberInfo, StatusReply
from leaderless.config import parse_host_port
from leaderless.runtime.ports import free_port

LEADERLESS = str(Path(sys.executable).parent / "leaderless")
DEADLINE_S = 30.0
"""Generous: the default failure detection takes a few seconds; CI machines are slow."""


def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting until {what}")
        time.sleep(0.1)


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The test's environment without LEADERLESS_* settings that could leak in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEADERLESS_")}
    env.update(extra or {})
    return env


class LineReader:
    """Collects a pipe's lines on a thread so tests can wait for them with a deadline."""

    def __init__(self, pipe: IO[str]) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._run, args=(pipe,), daemon=True)
        self._thread.start()

    def _run(self, pipe: IO[str]) -> None:
        for line in pipe:
            self.lines.put(line.rstrip("\n"))

    def next(self, timeout_s: float = DEADLINE_S) -> str:
        try:
            return self.lines.get(timeout=timeout_s)
        except queue.Empty:
            raise AssertionError(f"no line within {timeout_s:g} s") from None


class NodeProcess:
    def __init__(self, name: str, port: int, data_dir: Path, log_path: Path,
                 process: subprocess.Popen[bytes]) -> None:
        self.name = name
        self.port = port
        self.data_dir = data_dir
        self.log_path = log_path
        self.process = process

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> list[dict[str, Any]]:
        """Every JSON line the node wrote so far (all of its lines must be JSON)."""
        text = self.log_path.read_text() if self.log_path.exists() else ""
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def members(self) -> dict[str, MemberInfo]:
        """This node's view by member name; empty if it does not answer."""
        try:
            return {m.name: m for m in _ask(self.address, "members")}
        except (OSError, TimeoutError, ConnectionError):
            return {}

    def status(self) -> StatusReply:
        reply: StatusReply = _ask(self.address, "status")
        return reply


def _ask(address: str, what: str) -> Any:
    async def go() -> Any:
        async with Client(parse_host_port(address), timeout_s=5.0) as client:
            return await (client.members() if what == "members" else client.status())

    return asyncio.run(go())


class Processes:
    """Starts node and CLI processes and owns them: ``kill_all`` leaves none behind."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._children: list[subprocess.Popen[Any]] = []

    def start_node(self, name: str, port: int | None = None, join: str | None = None,
                   env: dict[str, str] | None = None, *extra: str,
                   bootstrap: bool = False) -> NodeProcess:
        """A node process; ``bootstrap`` False (the default here) starts it as one of the
        first members of a new cluster (it serves its ranges at once), True as a node
        joining a cluster that holds data (it streams its ranges first)."""
        port = port or free_port()
        data_dir = self.root / name
        data_dir.mkdir(parents=True, exist_ok=True)
        log_path = data_dir / "stderr.log"
        args = [LEADERLESS, "node", "start", "--name", name, "--bind", f"127.0.0.1:{port}",
                "--data-dir", str(data_dir), "--parent-pid", str(os.getpid()), *extra]
        if join:
            args += ["--join", join]
        if not bootstrap:
            args.append("--no-bootstrap")
        with log_path.open("ab") as log:
            process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                       env=clean_env(env))
        self._children.append(process)
        return NodeProcess(name, port, data_dir, log_path, process)

    def spawn(self, *args: str) -> subprocess.Popen[str]:
        """A CLI process with text pipes for stdout and stderr."""
        process = subprocess.Popen([LEADERLESS, *args], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env=clean_env())
        self._children.append(process)
        return process

    def kill_all(self) -> None:
        for process in self._children:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
        for process in self._children:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass  # unkillable (D state): nothing more a test can do
        self._children.clear()


def run_cli(*args: str, timeout_s: float = DEADLINE_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LEADERLESS, *args], capture_output=True, text=True,
                          timeout=timeout_s, env=clean_env(), stdin=subprocess.DEVNULL)
