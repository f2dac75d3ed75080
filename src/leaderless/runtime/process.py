"""Running a node as a process: the event loop, signals, exit codes."""

from __future__ import annotations

import asyncio
import os
import signal
import traceback
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from leaderless.config import NodeConfig
from leaderless.runtime.errors import StartupError
from leaderless.runtime.logs import NodeLogger, configure_logging
from leaderless.runtime.node import Node

EXIT_OK = 0
EXIT_FATAL = 1
"""The node started but had to stop on an operating error (e.g. its disk failed)."""
EXIT_CONFIG = 2
"""Invalid configuration (also click's code for bad command-line usage)."""
EXIT_STARTUP = 3
"""The environment refused: port in use, data dir not writable or locked."""
EXIT_FAILOVER = 4
"""An unrecoverable local fault (failed fsync, corrupt store): the node handed off its
hints and left the cluster (passive failover, ``runtime.failover``); the last log line
names the fault and what to do."""
PARENT_CHECK_INTERVAL_S = 1.0

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop's loop if it imports, else asyncio's default one."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on a fresh uvloop (or default) event loop."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)


def run_node(config: NodeConfig, parent_pid: int | None = None) -> int:
    """Start a node and serve until SIGTERM/SIGINT; returns the process exit code."""
    configure_logging(config.log_format, config.log_level)
    return run(_serve(config, parent_pid))


async def _serve(config: NodeConfig, parent_pid: int | None) -> int:
    log = NodeLogger(config.name, "process")
    node = Node(config)
    try:
        await node.start()
    except StartupError as exc:
        log.error("start_failed", error=str(exc))
        return EXIT_STARTUP
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_log_unhandled(log))
    stop_requested = asyncio.Event()

    def on_signal(signum: int) -> None:
        # Later signals are ignored: the first already started a bounded graceful leave,
        # and a terminal's Ctrl-C often arrives together with a supervisor's SIGTERM.
        if not stop_requested.is_set():
            log.info("signal", signal=signal.Signals(signum).name)
            stop_requested.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    watcher = None
    if parent_pid is not None:
        watcher = loop.create_task(_watch_parent(parent_pid, stop_requested, log))
    stopped = loop.create_task(node.stopped.wait())
    requested = loop.create_task(stop_requested.wait())
    await asyncio.wait([stopped, requested], return_when=asyncio.FIRST_COMPLETED)
    for task in (stopped, requested, watcher):
        if task is not None:
            task.cancel()
    await node.stop()
    if node.failover is not None:
        node.failover.exiting()
        return EXIT_FAILOVER
    return EXIT_FATAL if node.fatal_error else EXIT_OK


def _log_unhandled(log: NodeLogger) -> Callable[[asyncio.AbstractEventLoop, dict[str, Any]],
                                                 None]:
    """Errors escaping a callback are bugs; log them as JSON (stderr stays parseable)."""

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        trace = "".join(traceback.format_exception(exc)) if exc is not None else ""
        log.error("unhandled_error", context=str(context.get("message", "")),
                  error=repr(exc), traceback=trace)

    return handler


async def _watch_parent(parent_pid: int, stop: asyncio.Event, log: NodeLogger) -> None:
    """Leave when the supervisor that started us is gone, so a killed ``leaderless up``
    leaves no orphan nodes behind. The supervisor passes its pid: if it died before we
    got here, ``getppid()`` already differs and we leave at once."""
    while os.getppid() == parent_pid:
        await asyncio.sleep(PARENT_CHECK_INTERVAL_S)
    log.warning("parent_exited", parent_pid=parent_pid)
    stop.set()
