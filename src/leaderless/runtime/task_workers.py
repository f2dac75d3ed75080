"""The worker processes that run a node's tasks.

A ``WorkerPool`` keeps one worker process per slot, started with ``subprocess`` (fork and
exec of a fresh interpreter, never a bare ``fork`` of the node: the node runs an event loop
and threads). Each worker talks to the pool over its own socket pair, one frame at a time
(a 4-byte length, then msgpack): the pool sends a job, the worker runs it and answers with
a ``TaskOutcome``. A worker is reused for the next task (imports stay warm), so a trivial
task costs one round trip on a local socket.

What the pool guarantees:

- A task occupies ``spec.slots`` slots while it runs (it runs in one worker; the other
  slots stay reserved for what it starts itself, e.g. threads of a native library). At
  most ``slots`` slots are in use: ``run`` waits for free slots, and refuses a task that
  needs more slots than the pool has.
- ``spec.function`` ``module:function`` runs only if the module or one of its parent
  packages is registered (``modules``, the node's ``--tasks``); the worker imports it.
  A pickled callable (``spec.pickled``) runs only with ``allow_pickle``.
- A task that raises is a retryable failure with its traceback. A task that outlives
  ``spec.timeout_s`` is stopped (SIGTERM, then SIGKILL after ``KILL_GRACE_S``); a worker
  that dies mid-task (``os._exit``, a segfault, the OOM killer) is a retryable failure
  naming its exit code. Either way a new worker takes its place; the node is unaffected.
- ``kill(key)`` (or cancelling the coroutine awaiting ``run``) stops a running task at once
  (a cancelled task, a lost lease).
- ``close`` stops every worker and reaps it: no child process is left behind. A worker
  also dies with the node if the node is killed (Linux: parent-death signal).
- Recycling (Celery's ``worker_max_tasks_per_child`` / ``worker_max_memory_per_child``): a
  worker that has run ``max_tasks_per_worker`` tasks, or whose resident memory is above
  ``max_worker_memory_mb`` after a task, is replaced by a fresh one once that task has
  finished (never during it; the task's outcome stands). ``recycled`` counts them by reason.

The pool uses no threads.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import ctypes
import importlib
import inspect
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import traceback
from collections.abc import Hashable
from typing import Any

import msgspec

from leaderless.core.tasks import (
    ARGS_BYTES_MAX,
    ERROR_BYTES_MAX,
    FUNCTION_BYTES_MAX,
    RESULT_BYTES_MAX,
    SLOTS_MAX,
    TaskOutcome,
    TaskSpec,
    decode_outcome,
    encode,
)

KILL_GRACE_S = 0.5
"""Between SIGTERM and SIGKILL when a task is stopped (timeout, abort, close)."""
WORKER_START_TIMEOUT_S = 60.0
"""A new worker must say it is ready (interpreter up, registered modules imported) within
this, or it is killed and another is started."""
RESPAWN_DELAY_S = 1.0
"""After a worker failed to start, before the next attempt (a broken interpreter or an
unimportable module must not turn into a fork loop)."""
REAP_TIMEOUT_S = 10.0
"""How long to wait for a SIGKILLed process to be reaped before giving up on it (a process
stuck in uninterruptible I/O); it is retried at ``close``."""
WORKERS_MAX = SLOTS_MAX * 4
"""Slots (= worker processes) of one pool."""
JOB_FRAME_MAX = ARGS_BYTES_MAX + FUNCTION_BYTES_MAX + 1024
REPLY_FRAME_MAX = RESULT_BYTES_MAX + ERROR_BYTES_MAX + 1024
INIT_FRAME_MAX = 1024 * 1024
"""The worker's start message (sys.path and the registered modules)."""
MAX_TASKS_PER_WORKER_MAX = 1_000_000_000
"""Highest ``max_tasks_per_worker`` (0: a worker is never recycled for its task count)."""
MAX_WORKER_MEMORY_MB_MAX = 1024 * 1024
"""Highest ``max_worker_memory_mb`` (1 TiB; 0: no memory limit)."""

_LEN = struct.Struct(">I")
_PR_SET_PDEATHSIG = 1


_InLine = tuple[int, int, int, "asyncio.Future[None]"]
"""A run waiting for slots: (-priority, arrival number, slots, granted when set)."""


class _Init(msgspec.Struct, array_like=True):
    sys_path: list[str]
    modules: list[str]
    allow_pickle: bool
    parent_pid: int


class _Hello(msgspec.Struct, array_like=True):
    pid: int


class _Job(msgspec.Struct, array_like=True):
    function: str
    args: bytes
    pickled: bool


_encoder = msgspec.msgpack.Encoder()
_init_decoder = msgspec.msgpack.Decoder(_Init)
_hello_decoder = msgspec.msgpack.Decoder(_Hello)
_job_decoder = msgspec.msgpack.Decoder(_Job)


def module_allowed(function: str, modules: tuple[str, ...] | list[str]) -> bool:
    """Whether ``module:function`` is in a registered module or below a registered package."""
    module, sep, name = function.partition(":")
    if not sep or not module or not name:
        return False
    return any(module == m or module.startswith(m + ".") for m in modules)


def _failure(error: str, *, retryable: bool, started_ms: int = 0) -> TaskOutcome:
    return TaskOutcome(ok=False, error=_cut(error), started_ms=started_ms, retryable=retryable)


def _cut(error: str) -> str:
    """``error`` within ERROR_BYTES_MAX bytes of UTF-8, keeping the end (the raise site)."""
    data = error.encode("utf-8", "replace")
    if len(data) <= ERROR_BYTES_MAX:
        return data.decode("utf-8", "replace")
    return data[-ERROR_BYTES_MAX:].decode("utf-8", "ignore")


def _wall_ms() -> int:
    return int(time.time() * 1000)


def _exit_text(code: int | None) -> str:
    if code is None:
        return "exit code unknown"
    if code < 0:
        try:
            return f"exit code {code}, {signal.Signals(-code).name}"
        except ValueError:
            return f"exit code {code}"
    return f"exit code {code}"


# ----------------------------------------------------------------------------- the pool


class _Worker:
    __slots__ = ("proc", "reader", "tasks", "writer")

    def __init__(self, proc: subprocess.Popen[bytes], reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.proc = proc
        self.reader = reader
        self.writer = writer
        self.tasks = 0
        """Tasks this worker has answered (for ``max_tasks_per_worker``)."""


class _Run:
    __slots__ = ("abort", "key")

    def __init__(self, key: Hashable, abort: asyncio.Future[str]) -> None:
        self.key = key
        self.abort = abort


class WorkerPool:
    """``slots`` worker processes running tasks, at most ``slots`` slots' worth at once."""

    def __init__(self, slots: int, modules: tuple[str, ...], allow_pickle: bool, *,
                 max_tasks_per_worker: int = 0, max_worker_memory_mb: int = 0,
                 log: Any = None) -> None:
        if not 1 <= slots <= WORKERS_MAX:
            raise ValueError(f"slots must be 1..{WORKERS_MAX}, not {slots}")
        if not 0 <= max_tasks_per_worker <= MAX_TASKS_PER_WORKER_MAX:
            raise ValueError(f"max_tasks_per_worker must be 0 (never recycle) .. "
                             f"{MAX_TASKS_PER_WORKER_MAX}, not {max_tasks_per_worker}")
        if not 0 <= max_worker_memory_mb <= MAX_WORKER_MEMORY_MB_MAX:
            raise ValueError(f"max_worker_memory_mb must be 0 (no limit) .. "
                             f"{MAX_WORKER_MEMORY_MB_MAX}, not {max_worker_memory_mb}")
        self.slots = slots
        self.max_tasks_per_worker = max_tasks_per_worker
        """Replace a worker once it has run this many tasks (0: never)."""
        self.max_worker_memory_mb = max_worker_memory_mb
        """Replace a worker whose RSS is above this many MiB after a task (0: no limit)."""
        self.modules = tuple(modules)
        self.allow_pickle = allow_pickle
        self._log = log
        self._used = 0
        self._idle: list[_Worker] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._slot_queue: list[_InLine] = []
        """Runs waiting for slots, highest ``spec.priority`` first, then first come first
        served (a big task is not starved by small ones behind it)."""
        self._line_seq = 0
        self._spawners: set[asyncio.Task[None]] = set()
        self._reapers: set[asyncio.Task[Any]] = set()
        self._procs: set[subprocess.Popen[bytes]] = set()
        self._runs: dict[Hashable, _Run] = {}
        self._started = False
        self._closed = False
        self._spawn_error = ""
        self.counts: dict[str, int] = {"run": 0, "ok": 0, "failed": 0, "timeout": 0,
                                       "died": 0, "aborted": 0, "spawned": 0,
                                       "spawn_failed": 0}
        """Totals since start, for metrics."""
        self.recycled: dict[str, int] = {"max_tasks": 0, "max_memory": 0}
        """Workers replaced after a task by ``max_tasks_per_worker`` / ``max_worker_memory_mb``,
        since start."""

    # -- lifecycle

    async def start(self) -> None:
        """Start ``slots`` workers and wait until they are ready (raises if one cannot
        start: a broken interpreter or an unimportable registered module shows at once)."""
        if self._started:
            return
        self._started = True
        results = await asyncio.gather(*(self._spawn() for _ in range(self.slots)),
                                       return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        for r in results:
            if isinstance(r, _Worker):
                self._idle.append(r)
        if errors:
            await self.close()
            raise RuntimeError(f"task worker could not start: {errors[0]}") from errors[0]

    def free_slots(self) -> int:
        return 0 if self._closed else self.slots - self._used

    def running(self) -> list[Hashable]:
        """Keys of the tasks running now."""
        return list(self._runs)

    def kill(self, key: Hashable, reason: str = "aborted") -> bool:
        """Stop the task run with ``key`` (its worker is killed and replaced); its ``run``
        returns a failure ``aborted: <reason>``. False if no such task runs."""
        run = self._runs.get(key)
        if run is None or run.abort.done():
            return False
        run.abort.set_result(reason)
        self._wake()
        return True

    async def close(self) -> None:
        """Stop every task and worker; returns once each worker process is reaped."""
        if self._closed:
            return
        self._closed = True
        for run in list(self._runs.values()):
            if not run.abort.done():
                run.abort.set_result("worker pool closed")
        self._wake()
        for task in list(self._spawners):
            task.cancel()
        await asyncio.gather(*self._spawners, return_exceptions=True)
        # Runs end once their workers are stopped (they were told to abort).
        deadline = time.monotonic() + KILL_GRACE_S + REAP_TIMEOUT_S
        while self._runs and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        idle, self._idle = self._idle, []
        for worker in idle:
            worker.writer.close()  # the worker exits at end of input
        await asyncio.gather(*(self._stop(w.proc, graceful=True) for w in idle),
                             return_exceptions=True)
        await asyncio.gather(*self._reapers, return_exceptions=True)
        for proc in list(self._procs):  # anything left (a reap that timed out)
            await self._stop(proc)
        for worker in idle:
            with contextlib.suppress(Exception):
                await worker.writer.wait_closed()

    # -- running a task

    async def run(self, spec: TaskSpec, *, key: Hashable | None = None) -> TaskOutcome:
        """Run ``spec`` in a worker and return its outcome; never raises for a task's
        failure. Waits for ``spec.slots`` free slots first. ``key`` (e.g. the task id)
        names the run for ``kill``. Cancelling this coroutine kills the task's worker."""
        if self._closed or not self._started:
            return _failure("worker pool not running", retryable=True)
        if len(spec.args) > ARGS_BYTES_MAX:
            return _failure(f"task arguments are {len(spec.args)} bytes, more than the "
                            f"{ARGS_BYTES_MAX} allowed: pass a KV key instead",
                            retryable=False)
        if spec.slots > self.slots:
            return _failure(f"task needs {spec.slots} slots; this node has {self.slots} "
                            f"(run it on a node with more, or lower its slots)",
                            retryable=False)
        if spec.pickled and not self.allow_pickle:
            return _failure(f"pickled callable {spec.function!r} refused: this cluster "
                            f"does not allow pickled tasks (allow_pickle is off); register "
                            f"the function in a module instead", retryable=False)
        if not spec.pickled and not module_allowed(spec.function, self.modules):
            module = spec.function.partition(":")[0] or spec.function
            return _failure(f"function {spec.function!r} is not registered on this node: "
                            f"start the node with --tasks {module} (registered: "
                            f"{', '.join(self.modules) or 'none'})", retryable=False)
        if key is None:
            key = object()
        if key in self._runs:
            raise ValueError(f"a task with key {key!r} is already running")
        run = _Run(key, asyncio.get_running_loop().create_future())
        self._runs[key] = run
        try:
            if not await self._take_slots(spec.slots, run, spec.priority):
                return self._aborted(run, 0)
            try:
                return await self._run_in_worker(spec, run)
            finally:
                self._used -= spec.slots
                self._grant_slots()
                self._wake()
        finally:
            del self._runs[key]

    def _aborted(self, run: _Run, started_ms: int) -> TaskOutcome:
        self.counts["aborted"] += 1
        reason = run.abort.result() if run.abort.done() else "worker pool closed"
        return _failure(f"aborted: {reason}", retryable=True, started_ms=started_ms)

    async def _take_slots(self, slots: int, run: _Run, priority: int = 0) -> bool:
        """Reserve ``slots`` (waiting in line for them, by priority); False if aborted
        first."""
        if self._closed or run.abort.done():
            return False
        if not self._slot_queue and self._used + slots <= self.slots:
            self._used += slots
            return True
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._line_seq += 1
        entry = (-priority, self._line_seq, slots, granted)
        bisect.insort(self._slot_queue, entry)
        try:
            waits: set[asyncio.Future[Any]] = {granted, run.abort}
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            self._leave_line(entry)
            raise
        if granted.done() and not self._closed and not run.abort.done():
            return True
        self._leave_line(entry)
        return False

    def _leave_line(self, entry: _InLine) -> None:
        _, _, slots, granted = entry
        if granted.done():
            self._used -= slots  # granted, but too late: give them back
        else:
            granted.cancel()
            self._slot_queue.remove(entry)
        self._grant_slots()  # those behind it may fit now

    def _grant_slots(self) -> None:
        while self._slot_queue and self._used + self._slot_queue[0][2] <= self.slots:
            _, _, slots, granted = self._slot_queue.pop(0)
            self._used += slots
            granted.set_result(None)

    async def _changed(self, timeout: float | None) -> None:
        """Wait until slots or workers free up, a run is aborted or the pool closes (or
        ``timeout`` passes); callers check again what they wait for."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait({waiter}, timeout=timeout)
        finally:
            if not waiter.done():
                waiter.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _pop_idle(self) -> _Worker | None:
        while self._idle:
            worker = self._idle.pop()
            if not _exited(worker.proc):
                return worker
            self._replace(worker, kill=True)  # it died while idle (killed from outside)
        return None

    async def _run_in_worker(self, spec: TaskSpec, run: _Run) -> TaskOutcome:
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        while (worker := self._pop_idle()) is None:
            if self._closed or run.abort.done():
                return self._aborted(run, 0)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return _failure(f"no task worker ready within {WORKER_START_TIMEOUT_S:g}s"
                                + (f" (last start failure: {self._spawn_error})"
                                   if self._spawn_error else ""), retryable=True)
            await self._changed(remaining)
        if self._closed or run.abort.done():
            self._idle_again(worker)
            return self._aborted(run, 0)
        self.counts["run"] += 1
        started_ms = _wall_ms()
        reply: asyncio.Future[bytes] | None = None
        try:
            _write_frame(worker.writer, _encoder.encode(
                _Job(spec.function, spec.args, spec.pickled)))
            reply = asyncio.ensure_future(_read_frame(worker.reader, REPLY_FRAME_MAX))
            waits: set[asyncio.Future[Any]] = {reply, run.abort}
            done, _ = await asyncio.wait(waits, timeout=spec.timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            # Cancelled (or the write failed): the worker is in an unknown state.
            if reply is not None and not reply.done():
                reply.cancel()
            self._replace(worker, kill=True)
            raise
        if reply in done:
            try:
                outcome = decode_outcome(reply.result())
            except (asyncio.IncompleteReadError, ConnectionError, OSError):
                code = await self._stop(worker.proc, graceful=True)
                self._replace(worker)
                self.counts["died"] += 1
                self._note("task_worker_died", function=spec.function,
                           exit_code=code, pid=worker.proc.pid)
                return _failure(f"worker process died ({_exit_text(code)}) while running "
                                f"{spec.function}", retryable=True, started_ms=started_ms)
            except (ValueError, msgspec.ValidationError, msgspec.DecodeError) as exc:
                self._replace(worker, kill=True)
                return _failure(f"worker sent a bad reply: {exc}", retryable=True,
                                started_ms=started_ms)
            self.counts["ok" if outcome.ok else "failed"] += 1
            self._after_task(worker)
            return outcome
        reply.cancel()
        if run.abort.done():
            await self._stop(worker.proc)
            self._replace(worker)
            return self._aborted(run, started_ms)
        self.counts["timeout"] += 1
        self._note("task_timeout", function=spec.function, timeout_s=spec.timeout_s,
                   pid=worker.proc.pid)
        await self._stop(worker.proc)
        self._replace(worker)
        return _failure(f"timeout after {spec.timeout_s:g}s running {spec.function} (its "
                        f"worker process was killed)", retryable=True, started_ms=started_ms)

    # -- workers

    def _idle_again(self, worker: _Worker) -> None:
        self._idle.append(worker)
        self._wake()

    def _after_task(self, worker: _Worker) -> None:
        """``worker`` answered a task: back to idle, or recycled if it has run its
        ``max_tasks_per_worker`` or its RSS is above ``max_worker_memory_mb``."""
        worker.tasks += 1
        if self.max_tasks_per_worker and worker.tasks >= self.max_tasks_per_worker:
            self.recycled["max_tasks"] += 1
            self._replace(worker, graceful=True)
            return
        if self.max_worker_memory_mb:
            rss = _rss(worker.proc.pid)
            if rss is not None and rss > self.max_worker_memory_mb * 1024 * 1024:
                self.recycled["max_memory"] += 1
                self._note("task_worker_recycled_for_memory", pid=worker.proc.pid,
                           rss_mb=round(rss / (1024 * 1024), 1),
                           limit_mb=self.max_worker_memory_mb)
                self._replace(worker, graceful=True)
                return
        self._idle_again(worker)

    def _replace(self, worker: _Worker, *, kill: bool = False,
                 graceful: bool = False) -> None:
        """Drop ``worker`` (killing it if asked, or, if ``graceful``, letting it exit at
        end of input first; reaped in the background) and start a new one in its place
        unless the pool is closing."""
        worker.writer.close()
        if kill:
            _signal(worker.proc, signal.SIGKILL)
        if worker.proc in self._procs:
            task = asyncio.ensure_future(self._stop(worker.proc, graceful=graceful))
            self._reapers.add(task)
            task.add_done_callback(self._reapers.discard)
        if not self._closed:
            spawner = asyncio.ensure_future(self._respawn())
            self._spawners.add(spawner)
            spawner.add_done_callback(self._spawners.discard)

    async def _respawn(self) -> None:
        while not self._closed:
            try:
                worker = await self._spawn()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 -- logged, retried after a pause
                self._spawn_error = str(exc)
                self.counts["spawn_failed"] += 1
                self._note("task_worker_start_failed", error=str(exc))
                await asyncio.sleep(RESPAWN_DELAY_S)
                continue
            if self._closed:
                worker.writer.close()
                await self._stop(worker.proc, graceful=True)
                return
            self._spawn_error = ""
            self._idle_again(worker)
            return

    async def _spawn(self) -> _Worker:
        parent_sock, child_sock = socket.socketpair()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", _BOOT, str(child_sock.fileno()), _HOME],
                pass_fds=(child_sock.fileno(),), stdin=subprocess.DEVNULL, close_fds=True,
                start_new_session=True)
        except BaseException:
            parent_sock.close()
            raise
        finally:
            child_sock.close()
        self._procs.add(proc)
        self.counts["spawned"] += 1
        try:
            reader, writer = await asyncio.open_connection(sock=parent_sock)
        except BaseException:
            parent_sock.close()
            await self._stop(proc)
            raise
        try:
            path = list(sys.path)
            cwd = os.getcwd()
            if cwd not in path and "" not in path:
                path.append(cwd)  # modules next to where the node was started
            _write_frame(writer, _encoder.encode(
                _Init(path, list(self.modules), self.allow_pickle, os.getpid())))
            async with asyncio.timeout(WORKER_START_TIMEOUT_S):
                hello = _hello_decoder.decode(await _read_frame(reader, 1024))
            if hello.pid != proc.pid:
                raise RuntimeError(f"worker said it is pid {hello.pid}, not {proc.pid}")
        except BaseException as exc:
            writer.close()
            await self._stop(proc)
            if isinstance(exc, asyncio.IncompleteReadError | ConnectionError):
                raise RuntimeError(f"worker process exited at start "
                                   f"({_exit_text(proc.returncode)})") from exc
            if isinstance(exc, TimeoutError):
                raise RuntimeError(f"worker process not ready within "
                                   f"{WORKER_START_TIMEOUT_S:g}s") from exc
            raise
        return _Worker(proc, reader, writer)

    async def _stop(self, proc: subprocess.Popen[bytes], *,
                    graceful: bool = False) -> int | None:
        """Stop ``proc`` with its process group (what its task started), reap it and
        return its exit code: (graceful: give it KILL_GRACE_S to exit on its own first,)
        SIGTERM, then SIGKILL after KILL_GRACE_S. None: it would not die (it is retried
        at close)."""
        if not (graceful and await _wait_exit(proc, KILL_GRACE_S)):
            _signal(proc, signal.SIGTERM)
            if not await _wait_exit(proc, KILL_GRACE_S):
                _signal(proc, signal.SIGKILL)
                if not await _wait_exit(proc, REAP_TIMEOUT_S):
                    self._note("task_worker_unreaped", pid=proc.pid)
                    return None
        # It has exited but is not reaped yet, so its pid (= its group id) is still ours:
        # kill what is left of its group (a task's own children), then reap it.
        _signal(proc, signal.SIGKILL)
        code = proc.wait()  # at once: it has exited
        self._procs.discard(proc)
        return code

    def _note(self, event: str, **fields: Any) -> None:
        if self._log is not None:
            self._log.warning(event, **fields)


def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Signal the process group of ``proc`` (a worker leads its own group) while ``proc``
    is not reaped (until then its pid cannot be reused)."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        try:
            os.killpg(proc.pid, sig)
        except PermissionError:  # not its group after all (it left it): the worker alone
            proc.send_signal(sig)


def _rss(pid: int) -> int | None:
    """Resident memory of process ``pid`` in bytes (its own, not its children's); None if
    it cannot be read (it has just exited)."""
    import psutil  # here, not at the top: workers import this module and never need it

    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return None


def _exited(proc: subprocess.Popen[bytes]) -> bool:
    """Whether ``proc`` has exited, without reaping it."""
    if proc.returncode is not None:
        return True
    if not hasattr(os, "waitid"):
        return proc.poll() is not None
    try:
        return os.waitid(os.P_PID, proc.pid,
                         os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # reaped by someone else
        proc.poll()
        return True


async def _wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Whether ``proc`` exits within ``timeout`` (it is not reaped)."""
    deadline = time.monotonic() + timeout
    pause = 0.001
    while not _exited(proc):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.02)
    return True


def _write_frame(writer: asyncio.StreamWriter, body: bytes) -> None:
    writer.write(_LEN.pack(len(body)) + body)


async def _read_frame(reader: asyncio.StreamReader, limit: int) -> bytes:
    (size,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    if size > limit:
        raise ValueError(f"frame of {size} bytes, more than {limit}")
    return await reader.readexactly(size)


# ----------------------------------------------------------------------------- the worker

_BOOT = "import sys; sys.path.insert(0, sys.argv[2]); " \
        "from leaderless.runtime.task_workers import worker_main; worker_main(int(sys.argv[1]))"
"""A worker's first line: import this module from where the node has it (the worker's
sys.path is then set to the node's)."""
_HOME = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def worker_main(fd: int) -> None:
    """A worker process: read jobs from the socket ``fd``, run each, answer its outcome;
    exit at end of input (the pool closed it or the node died)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the node's to handle
    sock = socket.socket(fileno=fd)
    stream = sock.makefile("rwb", buffering=0)
    init = _init_decoder.decode(_recv(stream, INIT_FRAME_MAX) or b"")
    _die_with_parent(init.parent_pid)
    sys.path[:] = init.sys_path
    for module in init.modules:
        # Import now so the first task starts warm; a failure shows again at run time.
        with contextlib.suppress(Exception):
            importlib.import_module(module)
    _send(stream, _encoder.encode(_Hello(os.getpid())))
    modules = tuple(init.modules)
    while True:
        frame = _recv(stream, JOB_FRAME_MAX)
        if frame is None:
            return
        job = _job_decoder.decode(frame)
        outcome = _execute(job, modules, init.allow_pickle)
        _send(stream, encode(outcome))


def _recv(stream: Any, limit: int) -> bytes | None:
    head = _read_exactly(stream, _LEN.size)
    if head is None:
        return None
    (size,) = _LEN.unpack(head)
    if size > limit:
        raise SystemExit(f"task worker: frame of {size} bytes, more than {limit}")
    return _read_exactly(stream, size)


def _read_exactly(stream: Any, size: int) -> bytes | None:
    chunks = []
    while size:
        chunk = stream.read(size)
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _send(stream: Any, body: bytes) -> None:
    stream.write(_LEN.pack(len(body)) + body)


def _die_with_parent(parent_pid: int) -> None:
    """Linux: get SIGKILL when the node exits, so a killed node leaves no worker running."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)  # the node is already gone


def _execute(job: _Job, modules: tuple[str, ...], allow_pickle: bool) -> TaskOutcome:
    started_ms = _wall_ms()
    # 1. What to call (a failure here will not get better on retry, unless the import
    #    itself failed: another node may have the module).
    try:
        if job.pickled:
            if not allow_pickle:
                return _failure(f"pickled callable {job.function!r} refused", retryable=False,
                                started_ms=started_ms)
            import cloudpickle  # type: ignore[import-untyped]

            fn, args, kwargs = cloudpickle.loads(job.args)
        else:
            if not module_allowed(job.function, modules):
                return _failure(f"function {job.function!r} is not registered",
                                retryable=False, started_ms=started_ms)
            fn = _resolve(job.function)
            args, kwargs = _decode_args(job.args)
        if not callable(fn):
            raise TypeError(f"{job.function} is a {type(fn).__name__}, not a function")
    except ImportError:
        return _failure(f"cannot import the module of {job.function}:\n"
                        f"{traceback.format_exc()}", retryable=True, started_ms=started_ms)
    except BaseException:
        return _failure(f"cannot load task {job.function}:\n{traceback.format_exc()}",
                        retryable=False, started_ms=started_ms)
    # 2. Run it.
    try:
        value = fn(*args, **kwargs)
        if inspect.isawaitable(value):
            value = asyncio.run(_awaited(value))
    except BaseException:
        return _failure(traceback.format_exc(), retryable=True, started_ms=started_ms)
    # 3. Encode the result.
    try:
        if job.pickled:
            import cloudpickle

            result = cloudpickle.dumps(value)
        else:
            result = msgspec.msgpack.encode(value)
    except BaseException as exc:
        how = "pickled" if job.pickled else "encoded as msgpack"
        return _failure(f"the result of {job.function} (a {type(value).__name__}) cannot be "
                        f"{how}: {exc}", retryable=False, started_ms=started_ms)
    if len(result) > RESULT_BYTES_MAX:
        return _failure(f"the result of {job.function} (a {type(value).__name__}) is "
                        f"{len(result)} bytes encoded, more than the {RESULT_BYTES_MAX} "
                        f"allowed: store big outputs in the KV store and return the key",
                        retryable=False, started_ms=started_ms)
    return TaskOutcome(ok=True, result=result, started_ms=started_ms)


async def _awaited(value: Any) -> Any:
    return await value


def _resolve(function: str) -> Any:
    module_name, _, qualname = function.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise LookupError(f"module {module_name} has no {qualname!r}") from None
    return obj


def _decode_args(data: bytes) -> tuple[list[Any], dict[str, Any]]:
    if not data:
        return [], {}
    value = msgspec.msgpack.decode(data)
    if (not isinstance(value, list | tuple) or len(value) != 2
            or not isinstance(value[0], list | tuple) or not isinstance(value[1], dict)):
        raise TypeError("task arguments must be msgpack of [args, kwargs]")
    return list(value[0]), dict(value[1])
