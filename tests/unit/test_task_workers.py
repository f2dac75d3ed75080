"""The task worker pool with real worker processes: results, failures, timeouts, crashes,
registration and pickle rules, slot accounting, abort, and a clean close."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import cloudpickle  # type: ignore[import-untyped]
import msgspec
import psutil
import pytest

from leaderless.core.tasks import ARGS_BYTES_MAX, RESULT_BYTES_MAX, TaskOutcome, TaskSpec
from leaderless.runtime.task_workers import WorkerPool, module_allowed

pytestmark = pytest.mark.timeout(60)

T = TypeVar("T")
MOD = "tests.task_functions"


def spec(name: str, *args: Any, timeout_s: float = 30.0, slots: int = 1,
         **kwargs: Any) -> TaskSpec:
    return TaskSpec(f"{MOD}:{name}", msgspec.msgpack.encode([list(args), kwargs]),
                    timeout_s=timeout_s, slots=slots)


def value(outcome: TaskOutcome) -> Any:
    assert outcome.ok, outcome.error
    return msgspec.msgpack.decode(outcome.result)


_OTHERS: set[int] = set()
"""Children of the test process that are not the pool's (e.g. a multiprocessing resource
tracker an earlier test in the same session left behind)."""


def children(recursive: bool = False) -> list[psutil.Process]:
    """The test process's children, less those that were there before the pool started."""
    return [p for p in psutil.Process().children(recursive=recursive) if p.pid not in _OTHERS]


def with_pool(body: Callable[[WorkerPool], Awaitable[T]], slots: int = 2,
              modules: tuple[str, ...] = (MOD,), allow_pickle: bool = False,
              **options: Any) -> T:
    async def main() -> T:
        _OTHERS.clear()
        _OTHERS.update(p.pid for p in psutil.Process().children(recursive=True))
        pool = WorkerPool(slots, modules, allow_pickle, **options)
        await pool.start()
        try:
            return await body(pool)
        finally:
            await pool.close()
            assert children(recursive=True) == []
    return asyncio.run(main())


def test_module_allowed() -> None:
    assert module_allowed("a.b:f", ("a",))
    assert module_allowed("a.b:f", ("a.b",))
    assert module_allowed("a:C.method", ("a",))
    assert not module_allowed("ab:f", ("a",))
    assert not module_allowed("a.b:f", ("a.b.c",))
    assert not module_allowed("a.b", ("a",))
    assert not module_allowed("a:", ("a",))


def test_results_args_kwargs_and_async() -> None:
    async def body(pool: WorkerPool) -> None:
        before = children()
        assert len(before) == 2 and pool.free_slots() == 2
        outcome = await pool.run(spec("add", 2, 3))
        assert value(outcome) == 5 and outcome.started_ms > 0
        assert value(await pool.run(spec("add", 2, b=40))) == 42
        assert value(await pool.run(spec("echo", 1, "x", k=[1, 2]))) == [[1, "x"], {"k": [1, 2]}]
        assert value(await pool.run(spec("async_add", 1, 2))) == 3
        no_args = TaskSpec(f"{MOD}:record_pid")
        assert value(await pool.run(no_args)) in {p.pid for p in before}
        assert pool.counts["ok"] == 5
    with_pool(body)


def test_exception_is_a_retryable_failure_with_its_traceback() -> None:
    async def body(pool: WorkerPool) -> None:
        outcome = await pool.run(spec("raise_error", "it broke"))
        assert not outcome.ok and outcome.retryable
        assert "ValueError: it broke" in outcome.error
        assert "Traceback" in outcome.error and "raise_error" in outcome.error
        bad_args = TaskSpec(f"{MOD}:add", msgspec.msgpack.encode({"a": 1}))
        outcome = await pool.run(bad_args)
        assert not outcome.ok and not outcome.retryable and "[args, kwargs]" in outcome.error
        assert value(await pool.run(spec("add", 1, 1))) == 2  # the worker lives on
    with_pool(body)


def test_timeout_kills_the_worker_and_the_pool_recovers() -> None:
    async def body(pool: WorkerPool) -> None:
        pids = {p.pid for p in children()}
        slow, stubborn = await asyncio.gather(
            pool.run(spec("sleep_for", 60, timeout_s=0.3)),
            pool.run(spec("ignore_sigterm_and_sleep", 60, timeout_s=0.3)))
        for outcome in (slow, stubborn):
            assert not outcome.ok and outcome.retryable
            assert outcome.error.startswith("timeout after 0.3s"), outcome.error
            assert outcome.started_ms > 0
        assert pool.counts["timeout"] == 2
        # Both workers were replaced; the new ones run tasks.
        results = await asyncio.gather(*(pool.run(spec("record_pid")) for _ in range(4)))
        new_pids = {value(r) for r in results}
        assert new_pids and not new_pids & pids
        now_children = {p.pid for p in children()}
        assert len(now_children) == 2 and new_pids <= now_children and not pids & now_children
    with_pool(body)


def test_a_timeout_also_kills_what_the_task_started() -> None:
    async def body(pool: WorkerPool) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            pid_file = os.path.join(tmp, "child.pid")
            outcome = await pool.run(spec("spawn_child_and_sleep", pid_file, 60,
                                          timeout_s=1.0))
            assert outcome.error.startswith("timeout after 1s"), outcome.error
            child = int(open(pid_file).read())
            for _ in range(500):  # a killed process takes a moment to finish exiting
                if not psutil.pid_exists(child) or \
                        psutil.Process(child).status() == psutil.STATUS_ZOMBIE:
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError(f"the task's child {child} outlived the task")
            assert value(await pool.run(spec("add", 1, 2))) == 3
    with_pool(body, slots=1)


def test_a_crashing_worker_is_replaced() -> None:
    async def body(pool: WorkerPool) -> None:
        first = value(await pool.run(spec("record_pid")))
        outcome = await pool.run(spec("crash_hard", 13))
        assert not outcome.ok and outcome.retryable
        assert "worker process died (exit code 13)" in outcome.error
        assert pool.counts["died"] == 1
        results = await asyncio.gather(*(pool.run(spec("add", i, 1)) for i in range(6)))
        assert [value(r) for r in results] == [i + 1 for i in range(6)]
        assert len(children()) == 1
        assert value(await pool.run(spec("record_pid"))) != first
    with_pool(body, slots=1)


def test_unregistered_and_unloadable_functions_are_refused() -> None:
    async def body(pool: WorkerPool) -> None:
        outcome = await pool.run(TaskSpec("os:system", msgspec.msgpack.encode([["true"], {}])))
        assert not outcome.ok and not outcome.retryable
        assert "'os:system' is not registered" in outcome.error
        assert "--tasks os" in outcome.error
        assert not (await pool.run(TaskSpec("no_colon_here"))).retryable
        missing = await pool.run(spec("no_such_function"))
        assert not missing.ok and not missing.retryable and "no_such_function" in missing.error
        not_callable = await pool.run(spec("not_a_function"))
        assert not not_callable.ok and not not_callable.retryable
        assert "not a function" in not_callable.error
        # A registered module that does not import here: retryable (another node may).
        absent = await pool.run(TaskSpec("no_such_module_xyz:f"))
        assert not absent.ok and absent.retryable and "No module named" in absent.error
    with_pool(body, modules=(MOD, "no_such_module_xyz"))


def test_pickled_callables_refused_unless_allowed() -> None:
    k = 40
    closure = cloudpickle.dumps((lambda x, y=0: x + y + k, (1,), {"y": 1}))
    pickled = TaskSpec("lambda", closure, pickled=True)

    async def refused(pool: WorkerPool) -> None:
        outcome = await pool.run(pickled)
        assert not outcome.ok and not outcome.retryable and "pickle" in outcome.error

    async def allowed(pool: WorkerPool) -> None:
        outcome = await pool.run(pickled)
        assert outcome.ok, outcome.error
        assert cloudpickle.loads(outcome.result) == 42
        failing = cloudpickle.dumps((lambda: 1 / 0, (), {}))
        outcome = await pool.run(TaskSpec("div", failing, pickled=True))
        assert not outcome.ok and outcome.retryable and "ZeroDivisionError" in outcome.error
        garbage = await pool.run(TaskSpec("junk", b"not a pickle", pickled=True))
        assert not garbage.ok and not garbage.retryable

    with_pool(refused, slots=1)
    with_pool(allowed, slots=1, modules=(), allow_pickle=True)


def test_a_result_too_big_or_not_encodable_is_refused() -> None:
    async def body(pool: WorkerPool) -> None:
        ok = await pool.run(spec("big_result", RESULT_BYTES_MAX - 16))
        assert ok.ok and len(value(ok)) == RESULT_BYTES_MAX - 16
        big = await pool.run(spec("big_result", RESULT_BYTES_MAX))
        assert not big.ok and not big.retryable
        assert "bytes" in big.error and str(RESULT_BYTES_MAX) in big.error
        huge_args = await pool.run(spec("add", "x" * ARGS_BYTES_MAX))
        assert not huge_args.ok and not huge_args.retryable and "bytes" in huge_args.error
        odd = await pool.run(spec("unencodable"))
        assert not odd.ok and not odd.retryable and "object" in odd.error
    with_pool(body, slots=1)


def test_slots_bound_concurrency() -> None:
    async def body(pool: WorkerPool) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            runs = [asyncio.ensure_future(pool.run(spec("mark_running", tmp, f"t{i}", 0.5)))
                    for i in range(6)]
            await asyncio.sleep(0.1)
            assert pool.free_slots() == 0 and len(pool.running()) == 6
            seen = [value(r) for r in await asyncio.gather(*runs)]
            assert max(seen) == 2  # two at once, never three
            assert pool.free_slots() == 2
            # Separate processes: two tasks at once run in two workers.
            pids = await asyncio.gather(*(pool.run(spec("mark_running", tmp, f"p{i}", 0.5))
                                          for i in range(2)))
            assert [value(p) for p in pids] == [2, 2]
    with_pool(body, slots=2)


def test_a_task_can_take_several_slots() -> None:
    async def body(pool: WorkerPool) -> None:
        too_big = await pool.run(spec("add", 1, 1, slots=4))
        assert not too_big.ok and not too_big.retryable and "4 slots" in too_big.error
        with tempfile.TemporaryDirectory() as tmp:
            double = asyncio.ensure_future(pool.run(spec("mark_running", tmp, "a", 0.4,
                                                         slots=2)))
            await asyncio.sleep(0.1)
            assert pool.free_slots() == 1
            # Another 2-slot task must wait for the first; a 1-slot one behind it in line
            # waits too (first come, first served: big tasks are not starved).
            second = asyncio.ensure_future(pool.run(spec("mark_running", tmp, "b", 0.8,
                                                         slots=2)))
            await asyncio.sleep(0.05)
            single = asyncio.ensure_future(pool.run(spec("mark_running", tmp, "c", 0.6)))
            assert value(await double) == 1  # alone all along
            assert value(await second) == 2  # beside the 1-slot task, 3 slots in all
            assert value(await single) == 2
            assert pool.free_slots() == 3
            # A 1-slot task fits beside a 2-slot one when nobody waits.
            double = asyncio.ensure_future(pool.run(spec("mark_running", tmp, "d", 0.8,
                                                         slots=2)))
            await asyncio.sleep(0.05)
            assert value(await pool.run(spec("mark_running", tmp, "e", 0.3))) == 2
            await double
    with_pool(body, slots=3)


def test_kill_and_cancel_stop_a_running_task() -> None:
    async def body(pool: WorkerPool) -> None:
        first = value(await pool.run(spec("record_pid")))
        task = asyncio.ensure_future(pool.run(spec("sleep_for", 60), key=b"task-1"))
        await asyncio.sleep(0.2)
        assert pool.running() == [b"task-1"]
        with pytest.raises(ValueError):
            await pool.run(spec("add", 1), key=b"task-1")
        # A run still waiting for a slot can be killed too.
        queued = asyncio.ensure_future(pool.run(spec("add", 1), key=b"task-2"))
        await asyncio.sleep(0.05)
        assert pool.kill(b"task-2", "cancelled")
        assert (await queued).error == "aborted: cancelled"
        assert pool.kill(b"task-1", "lease lost")
        outcome = await task
        assert not outcome.ok and outcome.error == "aborted: lease lost"
        assert not pool.kill(b"task-1")
        assert first not in {p.pid for p in children()}
        # Cancelling the coroutine kills the worker too.
        with tempfile.TemporaryDirectory() as tmp:
            task = asyncio.ensure_future(pool.run(spec("mark_running", tmp, "m", 60)))
            mark = os.path.join(tmp, "m.running")
            for _ in range(3000):  # until the task runs (a new worker is starting)
                if os.path.exists(mark) and open(mark).read():
                    break
                await asyncio.sleep(0.01)
            busy = [int(open(mark).read())]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pool.free_slots() == 1
        assert value(await pool.run(spec("add", 2, 2))) == 4
        for _ in range(500):  # it was killed at once and is reaped in the background
            if not set(busy) & {p.pid for p in children()}:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError(f"the cancelled task's worker {busy} is still there")
    with_pool(body, slots=1)


def test_close_stops_running_tasks_and_leaves_no_children() -> None:
    async def main() -> None:
        _OTHERS.clear()
        _OTHERS.update(p.pid for p in psutil.Process().children(recursive=True))
        pool = WorkerPool(3, (MOD,), False)
        await pool.start()
        assert len(children(recursive=True)) == 3
        runs = [asyncio.ensure_future(pool.run(spec("sleep_for", 60))) for _ in range(4)]
        await asyncio.sleep(0.2)
        await pool.close()
        outcomes = await asyncio.gather(*runs)
        assert all(not o.ok and "closed" in o.error for o in outcomes)
        assert children(recursive=True) == []
        assert pool.free_slots() == 0
        assert not (await pool.run(spec("add", 1))).ok
    asyncio.run(main())


def test_a_module_that_fails_at_start_does_not_stop_the_pool() -> None:
    # Start imports registered modules eagerly but only as a warm-up.
    async def body(pool: WorkerPool) -> None:
        assert value(await pool.run(spec("add", 1, 2))) == 3
    with_pool(body, slots=1, modules=(MOD, "no_such_module_xyz"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal")
def test_workers_die_with_a_killed_node() -> None:
    # Busy workers (an idle one also exits at end of input): only the signal stops them.
    script = (
        "import asyncio, sys, msgspec\n"
        "from leaderless.core.tasks import TaskSpec\n"
        "from leaderless.runtime.task_workers import WorkerPool\n"
        "async def main():\n"
        f"    pool = WorkerPool(2, ({MOD!r},), False)\n"
        "    await pool.start()\n"
        f"    s = TaskSpec('{MOD}:sleep_for', msgspec.msgpack.encode([[60], {{}}]))\n"
        "    runs = [asyncio.ensure_future(pool.run(s)) for _ in range(2)]\n"
        "    await asyncio.sleep(0.3)\n"
        "    print(' '.join(str(p.pid) for p in pool._procs), flush=True)\n"
        "    await asyncio.gather(*runs)\n"
        "asyncio.run(main())\n")
    node = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    try:
        assert node.stdout is not None
        workers = [int(pid) for pid in node.stdout.readline().split()]
        assert len(workers) == 2
        node.kill()
        node.wait(10)
        for _ in range(500):
            if not any(psutil.pid_exists(pid) and psutil.Process(pid).status() !=
                       psutil.STATUS_ZOMBIE for pid in workers):
                break
            time.sleep(0.01)
        else:
            raise AssertionError("a worker outlived its killed node")
    finally:
        if node.poll() is None:
            node.kill()
            node.wait(10)


def test_a_worker_is_recycled_after_max_tasks_per_worker() -> None:
    async def body(pool: WorkerPool) -> list[int]:
        return [value(await pool.run(spec("record_pid"))) for _ in range(5)]

    pids = with_pool(body, slots=1, max_tasks_per_worker=2)
    # 2 + 2 + 1: every task succeeded, each worker ran at most 2 of them.
    assert len(set(pids)) >= 3
    assert all(pids.count(pid) <= 2 for pid in pids)
    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4]


class Log:
    def __init__(self) -> None:
        self.warnings: list[tuple[str, dict[str, Any]]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.warnings.append((event, fields))


def test_a_worker_over_max_worker_memory_mb_is_recycled_after_its_task() -> None:
    limit_mb = 100
    log = Log()

    async def body(pool: WorkerPool) -> None:
        first = value(await pool.run(spec("record_pid")))
        assert value(await pool.run(spec("record_pid"))) == first  # under the limit: kept
        assert pool.recycled == {"max_tasks": 0, "max_memory": 0}
        # The task that grows the worker past the limit still returns its result ...
        assert value(await pool.run(spec("hold_memory", limit_mb + 50))) == first
        assert pool.recycled == {"max_tasks": 0, "max_memory": 1}
        # ... and the next task runs in a fresh worker.
        second = value(await pool.run(spec("record_pid")))
        assert second != first
        assert value(await pool.run(spec("record_pid"))) == second
        [(event, fields)] = log.warnings
        assert event == "task_worker_recycled_for_memory"
        assert fields["pid"] == first and fields["limit_mb"] == limit_mb
        assert fields["rss_mb"] > limit_mb

    with_pool(body, slots=1, max_worker_memory_mb=limit_mb, log=log)


def test_recycling_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="max_tasks_per_worker must be 0"):
        WorkerPool(1, (MOD,), False, max_tasks_per_worker=-1)
    with pytest.raises(ValueError, match="max_worker_memory_mb must be 0"):
        WorkerPool(1, (MOD,), False, max_worker_memory_mb=-5)


def test_waiting_runs_get_slots_by_priority_then_in_order() -> None:
    async def body(pool: WorkerPool) -> None:
        started: list[str] = []

        async def run(name: str, priority: int, seconds: float = 0.0) -> None:
            job = msgspec.structs.replace(spec("sleep_for", seconds, name), priority=priority)
            outcome = await pool.run(job)
            started.append(value(outcome))

        busy = asyncio.ensure_future(run("busy", 0, 0.3))
        while pool.free_slots():  # the only slot is taken
            await asyncio.sleep(0.01)
        waiting = [asyncio.ensure_future(run(name, priority)) for name, priority in
                   (("low-1", 0), ("low-2", 0), ("high", 9), ("mid", 5))]
        await asyncio.gather(busy, *waiting)
        assert started == ["busy", "high", "mid", "low-1", "low-2"]
    with_pool(body, slots=1)
