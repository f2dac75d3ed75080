"""Task functions for tests (register with ``--tasks tests.task_functions``).

Plain module-level functions, importable in a worker process: each does one thing a test
needs (return a value, sleep, crash, raise, burn CPU, return too much, say where it ran).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path


def add(a: int, b: int = 0) -> int:
    return a + b


def echo(*args: object, **kwargs: object) -> list[object]:
    return [list(args), kwargs]


def sleep_for(seconds: float, value: object = None) -> object:
    time.sleep(seconds)
    return value


async def async_add(a: int, b: int) -> int:
    await asyncio.sleep(0)
    return a + b


def crash_hard(code: int = 13) -> None:
    """The worker process exits at once, without a reply (like a segfault would)."""
    os._exit(code)


def raise_error(message: str = "boom") -> None:
    raise ValueError(message)


def cpu_burn(n: int) -> int:
    """Pure-Python CPU work (holds the GIL): sum of squares below n."""
    total = 0
    for i in range(n):
        total += i * i
    return total


def big_result(size: int) -> bytes:
    return b"x" * size


def unencodable() -> object:
    return object()


def record_pid() -> int:
    return os.getpid()


_HELD: list[bytes] = []
"""What ``hold_memory`` keeps alive in its worker."""


def hold_memory(mb: int) -> int:
    """Allocate ``mb`` MiB (written, so resident) and keep it for the worker's life;
    return the worker's pid."""
    _HELD.append(b"x" * (mb * 1024 * 1024))
    return os.getpid()


def mark_running(directory: str, name: str, seconds: float) -> int:
    """Create ``directory/name`` while running (for ``seconds``), delete it, return the
    number of marks seen at once (so a test can check how many tasks ran together)."""
    mark = Path(directory) / f"{name}.running"
    mark.write_text(str(os.getpid()))
    try:
        seen = len(list(Path(directory).glob("*.running")))
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            seen = max(seen, len(list(Path(directory).glob("*.running"))))
            time.sleep(0.01)
        return seen
    finally:
        mark.unlink()


def ignore_sigterm_and_sleep(seconds: float) -> None:
    """Ignores SIGTERM, so stopping it needs the SIGKILL."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(seconds)


not_a_function = 42


def spawn_child_and_sleep(pid_file: str, seconds: float) -> None:
    """Start a child process (as a task running a command would), note its pid, sleep."""
    import subprocess

    child = subprocess.Popen(["sleep", str(seconds)])
    Path(pid_file).write_text(str(child.pid))
    time.sleep(seconds)
