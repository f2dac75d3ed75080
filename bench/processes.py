"""Processes of a benchmark run: free ports, children that die with the bench, and stopping
them (SIGTERM, then SIGKILL after a grace period). Shared by the bench scripts, which run
with this directory on ``sys.path`` (``python bench/<name>.py``)."""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

_LIVE: list[subprocess.Popen[bytes]] = []


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 now (all bound at once, then released)."""
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def die_with_parent() -> None:
    """In the child: SIGKILL when the bench dies (PR_SET_PDEATHSIG), so nothing outlives it."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except OSError:
        pass


def spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None,
          cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start ``cmd`` with stdout and stderr appended to ``log``, without the caller's
    ``LEADERLESS_*`` settings (``env`` adds what the run needs); stopped at exit."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LEADERLESS_")}
    full_env.update(env or {})
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
                                env=full_env, cwd=cwd)
    _LIVE.append(proc)
    return proc


def stop(procs: list[subprocess.Popen[bytes]], grace_s: float = 10.0) -> None:
    """SIGTERM each, wait up to ``grace_s`` in all, SIGKILL what is left."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        if p in _LIVE:
            _LIVE.remove(p)


def live() -> list[subprocess.Popen[bytes]]:
    """The processes started by ``spawn`` and not stopped yet."""
    return list(_LIVE)


@atexit.register
def stop_all() -> None:
    """Stop every process ``spawn`` started (also at exit)."""
    stop(list(_LIVE))


async def wait_alive(addresses: list[str], members: int, timeout_s: float = 60.0, *,
                     each: bool = False) -> None:
    """Wait until ``members`` members with client addresses are alive in the ring seen
    through the first of ``addresses`` (through every one with ``each``); RuntimeError
    naming the last state seen after ``timeout_s``."""
    import asyncio

    from leaderless.client import AsyncClient, LeaderlessError

    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            seen = []
            for address in addresses if each else addresses[:1]:
                async with AsyncClient([address], connect_timeout_s=1,
                                       ring_refresh_s=0) as kv:
                    ring = await kv.describe_ring()
                seen.append(sum(m.state == "alive" and bool(m.client_address) for m in ring))
            if min(seen) >= members:
                return
            last = f"{min(seen)} of {members} members alive"
        except LeaderlessError as exc:
            last = exc
        await asyncio.sleep(0.5)
    raise RuntimeError(f"the cluster did not become ready in {timeout_s:.0f} s: {last}")
