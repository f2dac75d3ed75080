"""Run Python functions on the cluster: a ``concurrent.futures.Executor`` and its asyncio
twin, over the leaderless task queues.

    from leaderless.client import Client
    with Client(["127.0.0.1:7400"]) as client, client.executor(queue="etl") as ex:
        fut = ex.submit("mypkg.jobs:resize", "img-42", width=640)   # or ex.submit(resize, ...)
        print(fut.result(timeout=60))
        print(list(ex.map(resize, images, timeout=600)))

    async with AsyncClient([...]) as client:
        async with client.async_executor() as ex:
            fut = await ex.submit(resize, "img-42")   # an asyncio.Future
            print(await fut)
            async for result in ex.map(resize, images): ...

What runs: ``fn`` is a string ``"module:function"`` or a module-level function (sent as
``f"{fn.__module__}:{fn.__qualname__}"``); a node runs it only if the module is one of its
registered task modules (``leaderless node start --tasks module``). Arguments and the
return value travel as msgpack (``[args, kwargs]``): numbers, strings, bytes, lists, dicts,
None, bools. With ``pickle=True`` any callable and any picklable arguments go as
cloudpickle, if the cluster allows it (``[tasks] allow_pickle``) and, with auth on, the
user holds ``execute`` on ``system_tasks``.

At least once: a task whose node dies, or whose lease expires while it is paused, runs
again elsewhere; its recorded outcome is exactly one (the fencing token refuses a zombie's
late result), and that is what the future gets. Write tasks so that running twice does no
harm (``docs/tasks.md``).

Completion is found without polling each task: one long poll (``WaitTasks``) per batch of
up to 1,000 outstanding tasks, answered as soon as one finishes, at most ``POLLS_MAX`` in
flight per executor. The sync executor resolves its futures (and runs their callbacks) in
one background thread; the async one in the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import queue as queue_module
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from leaderless.api.kv_messages import TASK_IDS_PER_WAIT_MAX, TaskInfo
from leaderless.client.errors import (
    BadRequestError,
    LeaderlessError,
    NotFoundError,
    PermissionDeniedError,
    TaskFailedError,
    UnauthenticatedError,
)
from leaderless.core.tasks import ARGS_BYTES_MAX, FUNCTION_BYTES_MAX, RESULT_TTL_S_DEFAULT

if TYPE_CHECKING:
    from leaderless.client.async_client import AsyncClient
    from leaderless.client.sync_client import Client

POLL_S = 10.0
"""How long one long poll waits on the node when nothing finishes (then it is re-sent)."""
POLLS_MAX = 4
"""Long polls in flight per executor: tasks submitted while every poll is out join the
next one, so a burst costs at most this many waiting requests on the nodes."""
POLL_BACKOFF_S = 0.5
"""After a failed poll (no node reachable, a node overloaded), wait this long."""
SUBMITS_IN_FLIGHT = 256
"""``map`` submits this many tasks at once."""
FUNCTION_PATTERN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
PERMANENT_ERRORS = (PermissionDeniedError, UnauthenticatedError, BadRequestError)
"""A poll failing with these will not succeed by retrying: its futures fail with it."""


# -- what is sent ----------------------------------------------------------------------


def function_name(fn: Callable[..., Any] | str) -> str:
    """``"module:function"`` for a registered task function: the string itself (checked),
    or a module-level function's ``module:qualname``. Raises ``TypeError`` for what a node
    could not import (lambdas, nested functions, ``__main__``, bound methods)."""
    if isinstance(fn, str):
        if not FUNCTION_PATTERN.match(fn) or len(fn) > FUNCTION_BYTES_MAX:
            raise TypeError(f"task function {fn[:80]!r} is not 'module:function' (e.g. "
                            "'mypkg.jobs:resize')")
        return fn
    if not callable(fn):
        raise TypeError(f"a task function must be callable or 'module:function', not "
                        f"{type(fn).__name__}")
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    hint = ("define it at the top level of a module the nodes register (--tasks MODULE), "
            "or use an executor with pickle=True")
    if inspect.ismethod(fn):
        raise TypeError(f"{qualname} is a bound method: a node cannot rebuild its object; "
                        + hint)
    if not module or not qualname or "<" in qualname:
        raise TypeError(f"{qualname or fn!r} is not a module-level function; " + hint)
    if module == "__main__":
        raise TypeError(f"{qualname} is defined in __main__, which the nodes cannot "
                        "import; " + hint)
    name = f"{module}:{qualname}"
    if len(name) > FUNCTION_BYTES_MAX:
        raise TypeError(f"task function name {name[:80]!r}... is over "
                        f"{FUNCTION_BYTES_MAX} characters")
    return name


def encode_call(fn: Callable[..., Any] | str, args: Sequence[Any], kwargs: dict[str, Any],
                pickle: bool = False) -> tuple[str, bytes, bool]:
    """(function label, encoded arguments, pickled) for a task: msgpack of ``[args,
    kwargs]``, or with ``pickle`` (and ``fn`` not a name) cloudpickle of ``(fn, args,
    kwargs)``."""
    if pickle:
        if isinstance(fn, str):
            return encode_call(fn, args, kwargs)  # a registered name needs no pickling
        cloudpickle = _cloudpickle()
        label = (f"{getattr(fn, '__module__', '?')}:"
                 f"{getattr(fn, '__qualname__', type(fn).__name__)}")[:FUNCTION_BYTES_MAX]
        payload = cloudpickle.dumps((fn, tuple(args), dict(kwargs)))
    else:
        label = function_name(fn)
        try:
            payload = msgspec.msgpack.encode([list(args), dict(kwargs)])
        except (TypeError, msgspec.EncodeError) as exc:
            raise TypeError(f"the arguments of {label} cannot travel as msgpack ({exc}); "
                            "pass plain data, or use an executor with pickle=True") from None
    if len(payload) > ARGS_BYTES_MAX:
        raise ValueError(f"the arguments of {label} encode to {len(payload)} bytes, over "
                         f"{ARGS_BYTES_MAX}: store large inputs in the KV store and pass "
                         "their keys")
    return label, payload, pickle


def outcome(info: TaskInfo) -> Any:
    """A finished task's return value; raises ``TaskFailedError`` for a failed one and
    ``concurrent.futures.CancelledError`` for a cancelled one."""
    if info.state == "succeeded":
        if info.result is None or info.result == b"":
            return None
        if info.pickled:
            return _cloudpickle().loads(info.result)
        return msgspec.msgpack.decode(info.result)
    if info.state == "cancelled":
        raise concurrent.futures.CancelledError(f"task {info.task_id.hex()} was cancelled")
    lines = [line for line in info.error.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else f"task ended {info.state}"
    raise TaskFailedError(f"task {info.task_id.hex()} ({info.function}) failed after "
                          f"{info.attempt} attempt(s): {last[:300]}", task_id=info.task_id,
                          remote_traceback=info.error, attempts=info.attempt)


def _cloudpickle() -> Any:
    try:
        import cloudpickle  # type: ignore[import-untyped]
    except ImportError:
        raise RuntimeError("pickle=True needs the cloudpickle package (pip install "
                           "cloudpickle)") from None
    return cloudpickle


class TaskOptions(msgspec.Struct, frozen=True):
    """What every task of one executor is submitted with (``core.tasks.TaskSpec``)."""

    queue: str = "default"
    priority: int = 0
    tags: tuple[str, ...] = ()
    timeout_s: float = 300.0
    max_retries: int = 0
    slots: int = 1
    backoff_s: float = 1.0
    result_ttl_s: float = RESULT_TTL_S_DEFAULT
    pickle: bool = False


Encoded = tuple[str, bytes, bool]


async def _submit(client: AsyncClient, options: TaskOptions, call: Encoded) -> bytes:
    label, payload, pickled = call
    return await client.submit_task(
        label, payload, pickled=pickled,
        queue=options.queue, priority=options.priority, slots=options.slots,
        tags=options.tags, timeout_s=options.timeout_s, max_retries=options.max_retries,
        backoff_s=options.backoff_s, result_ttl_s=options.result_ttl_s)


# -- finding completions ---------------------------------------------------------------


class TaskWatcher:
    """Long-polls the cluster for the tasks it is given (in the client's event loop) and
    hands each finished task's ``TaskInfo`` (or an error) to ``deliver``."""

    def __init__(self, client: AsyncClient,
                 deliver: Callable[[bytes, TaskInfo | BaseException], None], *,
                 poll_s: float = POLL_S, polls_max: int = POLLS_MAX) -> None:
        assert poll_s > 0 and polls_max > 0
        self._client = client
        self._deliver = deliver
        self._poll_s = poll_s
        self._polls_max = polls_max
        self._watched: set[bytes] = set()
        self._pending: dict[bytes, None] = {}
        """Watched ids no poll in flight covers (insertion-ordered)."""
        self._polls: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._closed = False
        self._runner = asyncio.get_running_loop().create_task(self._run())

    def add(self, task_id: bytes) -> None:
        if task_id not in self._watched:
            self._watched.add(task_id)
            self._pending[task_id] = None
            self._wake.set()

    def discard(self, task_id: bytes) -> None:
        self._watched.discard(task_id)
        self._pending.pop(task_id, None)

    async def close(self) -> None:
        self._closed = True
        tasks = [self._runner, *self._polls]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _run(self) -> None:
        while not self._closed:
            while self._pending and len(self._polls) < self._polls_max:
                # One poll per node, for the tasks submitted through it: that node runs
                # them when it can and then answers without watching their registers.
                home = self._client.task_home(next(iter(self._pending)))
                batch = [task_id for task_id in self._pending
                         if self._client.task_home(task_id) == home][:TASK_IDS_PER_WAIT_MAX]
                for task_id in batch:
                    del self._pending[task_id]
                poll = asyncio.get_running_loop().create_task(self._poll(batch))
                self._polls.add(poll)
                poll.add_done_callback(self._polls.discard)
            self._wake.clear()
            await self._wake.wait()

    async def _poll(self, batch: list[bytes]) -> None:
        try:
            reply = await self._client.wait_tasks(batch, self._poll_s)
            for info in reply.tasks:
                if info.task_id not in self._watched:
                    continue
                if info.result_omitted:
                    full = await self._client.task_status(info.task_id)
                    info = full if full is not None else info
                self._finish(info.task_id, info)
            for task_id in reply.missing:
                if task_id in self._watched:
                    self._finish(task_id, NotFoundError(
                        f"task {task_id.hex()} does not exist (its result's TTL passed, or "
                        "it was never submitted)"))
        except asyncio.CancelledError:
            raise
        except PERMANENT_ERRORS as exc:
            for task_id in batch:
                if task_id in self._watched:
                    self._finish(task_id, exc)
        except LeaderlessError:
            await asyncio.sleep(POLL_BACKOFF_S)  # the cluster is unreachable or busy
        except Exception as exc:  # a result that does not decode, a bug: fail those tasks
            for task_id in batch:
                if task_id in self._watched:
                    self._finish(task_id, exc)
        finally:
            for task_id in batch:
                if task_id in self._watched:
                    self._pending[task_id] = None
            self._wake.set()

    def _finish(self, task_id: bytes, result: TaskInfo | BaseException) -> None:
        self.discard(task_id)
        self._deliver(task_id, result)


# -- the concurrent.futures executor ---------------------------------------------------


class TaskFuture(concurrent.futures.Future[Any]):
    """A task's future: ``cancel()`` cancels the task on the cluster unless it has
    finished (then it returns False and the result arrives as usual)."""

    def __init__(self, executor: TaskExecutor, task_id: bytes) -> None:
        super().__init__()
        self.task_id = task_id
        self._executor = executor

    def cancel(self) -> bool:
        if self.done():
            return self.cancelled()
        if not self._executor._cancel_remote(self.task_id):
            return False
        return self._cancel_locally()

    def _cancel_locally(self) -> bool:
        # The caller's cancel() and the resolver thread (the task's cancelled state
        # arriving) may race: the future's own (reentrant) lock makes it happen once.
        with self._condition:
            if self.cancelled():
                return True
            if self.done() or not super().cancel():
                return False
            self.set_running_or_notify_cancel()  # wakes concurrent.futures.wait/as_completed
            return True


class TaskExecutor(concurrent.futures.Executor):
    """``with client.executor() as ex:`` (``Client.executor``): submits each call as a task
    and returns a ``concurrent.futures.Future`` (``TaskFuture``). ``shutdown`` (the end of
    the ``with``) waits for the outstanding tasks unless ``wait=False``;
    ``cancel_futures=True`` cancels them on the cluster."""

    def __init__(self, client: Client, options: TaskOptions, *, poll_s: float = POLL_S,
                 polls_max: int = POLLS_MAX) -> None:
        self._client = client
        self._aclient: AsyncClient = client._client
        self.options = options
        self._futures: dict[bytes, TaskFuture] = {}
        self._lock = threading.Lock()
        self._inbox: queue_module.SimpleQueue[tuple[bytes, TaskInfo | BaseException]
                                              | None] = queue_module.SimpleQueue()
        self._shutdown = False
        self._stopped = False

        async def make() -> TaskWatcher:
            return TaskWatcher(self._aclient, self._inbox_put, poll_s=poll_s,
                               polls_max=polls_max)

        self._watcher = client._run(make())
        self._resolver = threading.Thread(target=self._resolve, daemon=True,
                                          name="leaderless-task-results")
        self._resolver.start()

    # -- Executor --------------------------------------------------------------------------

    def submit(self, fn: Callable[..., Any] | str, /, *args: Any,
               **kwargs: Any) -> TaskFuture:
        """Queue ``fn(*args, **kwargs)`` on the cluster; the future of its result."""
        return self._submit_many(fn, [(args, kwargs)])[0]

    def map(self, fn: Callable[..., Any] | str, *iterables: Iterable[Any],
            timeout: float | None = None, chunksize: int = 1) -> Iterator[Any]:
        """Like ``Executor.map``: every call is submitted at once (``SUBMITS_IN_FLIGHT`` at
        a time), results come in order; ``timeout`` (seconds from this call) raises
        ``TimeoutError`` and cancels the tasks not yet done, as does any error."""
        end = None if timeout is None else time.monotonic() + timeout
        futures = self._submit_many(fn, [(args, {}) for args in zip(*iterables, strict=False)])

        def results() -> Iterator[Any]:
            try:
                futures.reverse()
                while futures:
                    future = futures.pop()
                    if end is None:
                        yield future.result()
                    else:
                        yield future.result(end - time.monotonic())
            finally:
                self._cancel_all(futures)

        return results()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Take no more tasks. ``cancel_futures``: cancel the outstanding ones on the
        cluster. ``wait``: return when every outstanding future is done; otherwise the
        background thread stops by itself after the last one."""
        with self._lock:
            self._shutdown = True
            outstanding: list[TaskFuture] = list(self._futures.values())
        if cancel_futures:
            self._cancel_all(outstanding)
        while wait:
            _, not_done = concurrent.futures.wait(outstanding, timeout=1.0)
            if not not_done:
                break
            if self._client._closed:  # nothing can resolve them any more
                for future in outstanding:
                    if future.done():
                        continue
                    self._inbox_put(future.task_id, LeaderlessError(
                        "the client was closed before the task finished", code="closed"))
                concurrent.futures.wait(not_done, timeout=5.0)
                break
        self._finish_if_idle()
        if wait and threading.current_thread() is not self._resolver:
            self._resolver.join(timeout=5)

    # -- internals -------------------------------------------------------------------------

    def _submit_many(self, fn: Callable[..., Any] | str,
                     calls: list[tuple[Sequence[Any], dict[str, Any]]]) -> list[TaskFuture]:
        if self._shutdown:
            raise RuntimeError("cannot schedule new tasks after shutdown")
        encoded = [encode_call(fn, args, kwargs, self.options.pickle) for args, kwargs in calls]
        ids = self._client._run(_submit_all(self._aclient, self.options, encoded))
        futures = [TaskFuture(self, task_id) for task_id in ids]
        with self._lock:
            for future in futures:
                self._futures[future.task_id] = future
        loop = self._client._loop
        loop.call_soon_threadsafe(self._watch, ids)
        return futures

    def _watch(self, ids: list[bytes]) -> None:
        for task_id in ids:
            self._watcher.add(task_id)

    def _inbox_put(self, task_id: bytes, result: TaskInfo | BaseException) -> None:
        self._inbox.put((task_id, result))

    def _resolve(self) -> None:
        """The resolver thread: set each finished task's future (its callbacks run here)."""
        while True:
            item = self._inbox.get()
            if item is None:
                return
            task_id, result = item
            with self._lock:
                future = self._futures.pop(task_id, None)
            if future is not None and not future.done():
                _settle(future, result)
            self._finish_if_idle()

    def _finish_if_idle(self) -> None:
        """After shutdown, once no task is outstanding: stop polling and the thread."""
        with self._lock:
            if not self._shutdown or self._futures or self._stopped:
                return
            self._stopped = True
        loop = self._client._loop
        with contextlib.suppress(RuntimeError):  # the client (and its loop) closed first
            loop.call_soon_threadsafe(lambda: loop.create_task(self._watcher.close()))
        self._inbox.put(None)

    def _cancel_remote(self, task_id: bytes) -> bool:
        """Cancel the task on the cluster: True if it is cancelled now (or was), False if
        it finished first or the cluster could not be asked."""
        if threading.current_thread() is self._client._thread:
            raise RuntimeError("cancel a task future from your own thread, not the client's "
                               "event loop")
        try:
            info = self._client._run(self._aclient.cancel_task(task_id))
        except LeaderlessError:
            return False
        if info.state != "cancelled":
            return False
        self._forget(task_id)
        return True

    def _cancel_all(self, futures: Sequence[TaskFuture]) -> None:
        live = [f for f in futures if not f.done()]
        if not live:
            return
        cancelled = self._client._run(_cancel_all(self._aclient, [f.task_id for f in live]))
        for future in live:
            if future.task_id in cancelled:
                self._forget(future.task_id)
                future._cancel_locally()

    def _forget(self, task_id: bytes) -> None:
        with self._lock:
            self._futures.pop(task_id, None)
        with contextlib.suppress(RuntimeError):
            self._client._loop.call_soon_threadsafe(self._watcher.discard, task_id)
        self._finish_if_idle()


def _settle(future: TaskFuture | asyncio.Future[Any],
            result: TaskInfo | BaseException) -> None:
    if isinstance(result, BaseException):
        future.set_exception(result)
        return
    try:
        value = outcome(result)
    except concurrent.futures.CancelledError:
        if isinstance(future, TaskFuture):
            future._cancel_locally()
        else:
            future.cancel()
    except BaseException as exc:
        future.set_exception(exc)
    else:
        future.set_result(value)


async def _submit_all(client: AsyncClient, options: TaskOptions,
                      encoded: list[Encoded]) -> list[bytes]:
    """Submit every call (``SUBMITS_IN_FLIGHT`` at once); on a failure, cancel the ones
    that were submitted and raise it."""
    room = asyncio.Semaphore(SUBMITS_IN_FLIGHT)

    async def one(call: Encoded) -> bytes:
        async with room:
            return await _submit(client, options, call)

    results = await asyncio.gather(*(one(call) for call in encoded), return_exceptions=True)
    ids = [r for r in results if isinstance(r, bytes)]
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        await _cancel_all(client, ids)
        raise errors[0]
    return ids


async def _cancel_all(client: AsyncClient, task_ids: list[bytes]) -> set[bytes]:
    """Cancel these tasks on the cluster; the ids that are cancelled now."""
    room = asyncio.Semaphore(SUBMITS_IN_FLIGHT)

    async def one(task_id: bytes) -> bytes | None:
        async with room:
            try:
                info = await client.cancel_task(task_id)
            except LeaderlessError:
                return None
            return task_id if info.state == "cancelled" else None

    return {i for i in await asyncio.gather(*(one(i) for i in task_ids)) if i is not None}


# -- the asyncio executor ---------------------------------------------------------------


class AsyncTaskExecutor:
    """``async with client.async_executor() as ex:`` (``AsyncClient.async_executor``):
    ``await ex.submit(fn, ...)`` queues a task and returns an ``asyncio.Future`` of its
    result; cancelling that future cancels the task on the cluster (unless it finished).
    ``async for result in ex.map(fn, items):`` yields results in order. The end of the
    ``async with`` waits for the outstanding tasks."""

    def __init__(self, client: AsyncClient, *, queue: str = "default", priority: int = 0,
                 tags: Sequence[str] = (), timeout_s: float = 300.0, max_retries: int = 0,
                 slots: int = 1, backoff_s: float = 1.0,
                 result_ttl_s: float = RESULT_TTL_S_DEFAULT, pickle: bool = False,
                 poll_s: float = POLL_S, polls_max: int = POLLS_MAX) -> None:
        self._client = client
        self.options = TaskOptions(queue, priority, tuple(tags), timeout_s, max_retries,
                                   slots, backoff_s, result_ttl_s, pickle)
        self._futures: dict[bytes, asyncio.Future[Any]] = {}
        self._poll = (poll_s, polls_max)
        self._watcher: TaskWatcher | None = None
        self._shutdown = False

    async def __aenter__(self) -> AsyncTaskExecutor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown(wait=exc[0] is None)

    async def submit(self, fn: Callable[..., Any] | str, /, *args: Any, **kwargs: Any
                     ) -> asyncio.Future[Any]:
        """Queue ``fn(*args, **kwargs)``; returns once the cluster has the task."""
        return (await self._submit_many(fn, [(args, kwargs)]))[0]

    async def map(self, fn: Callable[..., Any] | str, *iterables: Iterable[Any],
                  timeout: float | None = None) -> AsyncIterator[Any]:
        """Submit every call at once, then yield the results in order; ``timeout``
        (seconds from the call) raises ``TimeoutError``; an error or an early exit cancels
        the tasks not yet done."""
        loop = asyncio.get_running_loop()
        end = None if timeout is None else loop.time() + timeout
        futures = await self._submit_many(fn, [(args, {}) for args in
                                               zip(*iterables, strict=False)])
        try:
            for future in futures:
                if end is None:
                    yield await asyncio.shield(future)
                else:
                    yield await asyncio.wait_for(asyncio.shield(future),
                                                 max(0.0, end - loop.time()))
        finally:
            for future in futures:
                future.cancel()

    async def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._shutdown = True
        outstanding = [f for f in self._futures.values() if not f.done()]
        if cancel_futures:
            for future in outstanding:
                future.cancel()
        if wait and outstanding:
            await asyncio.wait(outstanding)
        if self._watcher is not None and (wait or not outstanding):
            await self._watcher.close()
            self._watcher = None

    async def _submit_many(self, fn: Callable[..., Any] | str,
                           calls: list[tuple[Sequence[Any], dict[str, Any]]]
                           ) -> list[asyncio.Future[Any]]:
        if self._shutdown:
            raise RuntimeError("cannot schedule new tasks after shutdown")
        encoded = [encode_call(fn, args, kwargs, self.options.pickle) for args, kwargs in calls]
        ids = await _submit_all(self._client, self.options, encoded)
        loop = asyncio.get_running_loop()
        if self._watcher is None:
            self._watcher = TaskWatcher(self._client, self._deliver, poll_s=self._poll[0],
                                        polls_max=self._poll[1])
        futures = []
        for task_id in ids:
            future: asyncio.Future[Any] = loop.create_future()
            future.add_done_callback(lambda f, i=task_id: self._done(i, f))  # type: ignore[misc]
            self._futures[task_id] = future
            self._watcher.add(task_id)
            futures.append(future)
        return futures

    def _deliver(self, task_id: bytes, result: TaskInfo | BaseException) -> None:
        future = self._futures.pop(task_id, None)
        if future is not None and not future.done():
            _settle(future, result)

    def _done(self, task_id: bytes, future: asyncio.Future[Any]) -> None:
        """A future cancelled here (``cancel()``, ``wait_for``'s timeout) cancels its task
        on the cluster, unless the task is what cancelled it."""
        if not future.cancelled() or self._futures.pop(task_id, None) is None:
            return
        if self._watcher is not None:
            self._watcher.discard(task_id)
        task = asyncio.get_running_loop().create_task(self._client.cancel_task(task_id))
        task.add_done_callback(_ignore)


def _ignore(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: a task that finished first is not an error here
