"""The user-facing task APIs: the native messages and their bounds, how the executors name
and encode functions, and the sync and async executors, the HTTP routes and the CLI end to
end against in-process nodes running ``tests.task_functions``."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
import types
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from leaderless.api.kv_messages import (
    ERROR_CODES,
    TASK_IDS_PER_WAIT_MAX,
    CancelTask,
    ClientReply,
    ClientRequest,
    GetTask,
    ListTasks,
    SubmitTask,
    TaskInfo,
    TaskInfos,
    TaskList,
    TaskSubmitted,
    TaskTransition,
    WaitTasks,
)
from leaderless.api.service import KvError
from leaderless.api.task_api import info_json, parse_task_id, task_info
from leaderless.client import AsyncClient, Client, TaskFailedError
from leaderless.client.errors import ERRORS_BY_CODE, NotFoundError
from leaderless.client.tasks import encode_call, function_name, outcome
from leaderless.core.tasks import TaskSpec, TaskState, Transition
from leaderless.runtime.node import Node
from leaderless.security.auth import Grant
from tests import task_functions
from tests.unit.test_auth_api import wait_for
from tests.unit.test_auth_api import with_cluster as auth_cluster

TEST_TIMEOUT_S = 120.0
MODULE = "tests.task_functions"


# -- messages --------------------------------------------------------------------------------

SPEC = TaskSpec("tests.task_functions:add", msgspec.msgpack.encode([[1, 2], {}]),
                queue="q", priority=5, tags=["io"], timeout_s=30.0, max_retries=2)
REQUESTS: list[Any] = [
    SubmitTask(1, SPEC, b"\x01" * 16), SubmitTask(2, SPEC, idempotency_key="job-7"),
    GetTask(3, b"id"), CancelTask(4, b"id"), ListTasks(5, "q", "pending", 10),
    WaitTasks(6, [b"a", b"b"], 5000),
]
INFO = TaskInfo(7, b"id", True, "succeeded", "m:f", False, "q", 1, 1, ["io"], 30.0, 2, "alice",
                1, "n1", 3, 0, 0, 100, 200, [TaskTransition("pending", "n1", 100)],
                b"\x03", "", False)
REPLIES: list[Any] = [TaskSubmitted(1, b"id"), INFO, TaskInfos(8, [INFO], [b"gone"]),
                      TaskList(9, [INFO], True), TaskInfo(10, b"x", found=False)]


def test_every_task_request_and_reply_round_trips() -> None:
    requests = msgspec.msgpack.Decoder(ClientRequest)
    replies = msgspec.msgpack.Decoder(ClientReply)
    for request in REQUESTS:
        assert requests.decode(msgspec.msgpack.encode(request)) == request
    for reply in REPLIES:
        assert replies.decode(msgspec.msgpack.encode(reply)) == reply


def test_task_fields_are_bounded_on_decode() -> None:
    requests = msgspec.msgpack.Decoder(ClientRequest)
    oversized = [
        WaitTasks(1, [b"x"] * (TASK_IDS_PER_WAIT_MAX + 1), 10),
        WaitTasks(1, [b"x"], 300_001),
        WaitTasks(1, [b""], 10),
        GetTask(1, b"x" * 129),
        ListTasks(1, "q", "", 1001),
        ListTasks(1, "q" * 65),
        SubmitTask(1, SPEC, idempotency_key="k" * 257),
        SubmitTask(1, TaskSpec("m:f", b"x" * (256 * 1024 + 1))),
        SubmitTask(1, TaskSpec("m:f", tags=["t"] * 17)),
        SubmitTask(1, TaskSpec("m:f", priority=1001)),
        SubmitTask(1, TaskSpec("")),
    ]
    for request in oversized:
        with pytest.raises(msgspec.ValidationError):
            requests.decode(msgspec.msgpack.encode(request))


def test_not_found_has_an_exception_and_execute_is_a_level_above_write() -> None:
    assert "not_found" in ERROR_CODES and ERRORS_BY_CODE["not_found"] is NotFoundError
    execute = Grant("execute", "system_tasks")
    assert execute.covers("write", "system_tasks", None)
    assert execute.covers("read", "system_tasks", None)
    assert not Grant("write", "system_tasks").covers("execute", "system_tasks", None)
    assert Grant("admin", "*").covers("execute", "system_tasks", None)


def test_task_info_carries_the_state_without_arguments_and_json_decodes_results() -> None:
    state = TaskState(SPEC, "failed", attempt=3, holder="", token=3,
                      history=[Transition("pending", "n1", 1), Transition("failed", "n2", 9,
                                                                           "ValueError: x")],
                      result=msgspec.msgpack.encode({"a": [1, 2]}), error="Traceback\nboom",
                      submitted_ms=1, finished_ms=9)
    info = task_info(b"\xab\xcd", state)
    assert (info.state, info.attempt, info.function, info.queue, info.tags) == (
        "failed", 3, SPEC.function, "q", ["io"])
    assert [t.state for t in info.history] == ["pending", "failed"]
    body = info_json(info)
    assert body["id"] == "abcd" and body["result"] == {"a": [1, 2]}
    assert body["history"][1] == {"state": "failed", "node": "n2", "at_ms": 9,
                                  "note": "ValueError: x"}
    slim = task_info(b"\xab", state, with_result=False)
    assert slim.result is None and slim.result_omitted
    assert parse_task_id("abcd") == b"\xab\xcd"
    with pytest.raises(KvError):
        parse_task_id("not hex")


# -- naming and encoding functions -----------------------------------------------------------


def test_functions_resolve_to_module_and_qualified_name() -> None:
    assert function_name(task_functions.add) == "tests.task_functions:add"
    assert function_name("pkg.mod:fn") == "pkg.mod:fn"
    with pytest.raises(TypeError, match="module:function"):
        function_name("no colon")
    with pytest.raises(TypeError, match="module-level"):
        function_name(lambda: 1)

    def nested() -> None: ...

    with pytest.raises(TypeError, match="module-level"):
        function_name(nested)
    with pytest.raises(TypeError, match="bound method"):
        function_name(threading.Thread().start)
    main_function = types.FunctionType(nested.__code__, {"__name__": "__main__"}, "fn")
    main_function.__module__ = "__main__"
    main_function.__qualname__ = "fn"
    with pytest.raises(TypeError, match="__main__"):
        function_name(main_function)


def test_calls_encode_as_msgpack_or_cloudpickle() -> None:
    label, payload, pickled = encode_call(task_functions.add, (1,), {"b": 2})
    assert (label, pickled) == ("tests.task_functions:add", False)
    assert msgspec.msgpack.decode(payload) == [[1], {"b": 2}]
    with pytest.raises(TypeError, match="msgpack"):
        encode_call(task_functions.add, (object(),), {})
    with pytest.raises(ValueError, match="KV store"):
        encode_call("m:f", (b"x" * (300 * 1024),), {})
    import cloudpickle  # type: ignore[import-untyped]

    label, payload, pickled = encode_call(lambda x: x * 3, (2,), {}, pickle=True)
    fn, args, kwargs = cloudpickle.loads(payload)
    assert pickled and fn(*args, **kwargs) == 6
    assert encode_call("m:f", (1,), {}, pickle=True)[2] is False  # a name needs no pickle


def test_outcomes_become_values_errors_or_cancellation() -> None:
    done = TaskInfo(0, b"\x01", state="succeeded", result=msgspec.msgpack.encode([1, "a"]))
    assert outcome(done) == [1, "a"]
    assert outcome(TaskInfo(0, b"\x01", state="succeeded")) is None
    failed = TaskInfo(0, b"\x01", state="failed", function="m:f", attempt=2,
                      error="Traceback (most recent call last):\n  ...\nValueError: boom\n")
    with pytest.raises(TaskFailedError) as caught:
        outcome(failed)
    assert "ValueError: boom" in str(caught.value)
    assert caught.value.remote_traceback.startswith("Traceback")
    assert caught.value.attempts == 2 and caught.value.task_id == b"\x01"
    with pytest.raises(concurrent.futures.CancelledError):
        outcome(TaskInfo(0, b"\x01", state="cancelled"))


# -- in-process nodes ------------------------------------------------------------------------


def with_cluster(tmp_path: Path,
                 body: Callable[[list[Node], list[str], list[str]], Awaitable[None]]) -> None:
    """Run ``body(nodes, client addresses, HTTP base URLs)`` on three in-process nodes
    that run ``tests.task_functions``."""
    auth_cluster(tmp_path, False, body, **{"tasks.modules": [MODULE], "tasks.slots": 2})


def test_async_client_submits_waits_reads_lists_and_cancels(tmp_path: Path) -> None:
    async def body(nodes: list[Node], clients: list[str], urls: list[str]) -> None:
        async with AsyncClient(clients, timeout_s=10, ring_refresh_s=0) as client:
            args = msgspec.msgpack.encode([[2, 3], {}])
            task_id = await client.submit_task("tests.task_functions:add", args)
            finished: list[TaskInfo] = []
            while not finished:
                finished = list((await client.wait_tasks([task_id], 10.0)).tasks)
            assert finished[0].state == "succeeded"
            assert msgspec.msgpack.decode(finished[0].result or b"") == 5
            info = await client.task_status(task_id)
            assert info is not None and info.state == "succeeded" and info.attempt == 1
            assert [t.state for t in info.history][0] == "pending"
            assert await client.task_status(b"\x00" * 16) is None
            # The same idempotency key is the same task.
            first = await client.submit_task("tests.task_functions:add", args,
                                             idempotency_key="once")
            again = await client.submit_task("tests.task_functions:add", args,
                                             idempotency_key="once")
            assert first == again
            # A task on a queue with a tag no node has stays pending: list, then cancel it.
            stuck = await client.submit_task("tests.task_functions:add", args,
                                             queue="nowhere", tags=["gpu"])
            listed = await client.list_tasks("nowhere")
            assert [i.task_id for i in listed] == [stuck] and listed[0].state == "pending"
            assert await client.list_tasks("nowhere", state="running") == []
            cancelled = await client.cancel_task(stuck)
            assert cancelled.state == "cancelled"
            with pytest.raises(Exception, match="cancel"):
                await client.cancel_task(stuck)
            with pytest.raises(NotFoundError):
                await client.cancel_task(b"\x00" * 16)

    with_cluster(tmp_path, body)


def test_sync_executor_submits_maps_fails_cancels_and_calls_back(tmp_path: Path) -> None:
    def sync_body(clients: list[str]) -> None:
        with Client(clients, timeout_s=10, ring_refresh_s=0) as client, \
                client.executor(queue="work", max_retries=0) as ex:
            assert isinstance(ex, concurrent.futures.Executor)
            fut = ex.submit(task_functions.add, 2, b=40)
            assert isinstance(fut, concurrent.futures.Future)
            called = threading.Event()
            fut.add_done_callback(lambda f: called.set())
            assert fut.result(timeout=60) == 42
            assert called.wait(10)
            assert ex.submit("tests.task_functions:echo", "a", k=1).result(60) == [["a"],
                                                                                  {"k": 1}]
            assert list(ex.map(task_functions.add, range(20), range(20), timeout=60)) == [
                2 * i for i in range(20)]
            failing = ex.submit(task_functions.raise_error, "bad input")
            with pytest.raises(TaskFailedError) as caught:
                failing.result(timeout=60)
            assert "ValueError: bad input" in caught.value.remote_traceback
            futures = [ex.submit(task_functions.add, i, 1) for i in range(10)]
            done = {f.result() for f in concurrent.futures.as_completed(futures, timeout=60)}
            assert done == set(range(1, 11))
            # A task that waits for a tag no node has: cancel() cancels it on the cluster.
            with client.executor(queue="nowhere", tags=["gpu"]) as stuck:
                waiting = stuck.submit(task_functions.add, 1, 1)
                assert waiting.cancel() and waiting.cancelled()
                with pytest.raises(concurrent.futures.CancelledError):
                    waiting.result(timeout=1)
                info = client.task_status(waiting.task_id)
                assert info is not None and info.state == "cancelled"
            # A finished task cannot be cancelled: cancel() is False, the result stays.
            assert not fut.cancel() and fut.result() == 42
            with pytest.raises(TypeError, match="__main__|module-level"):
                ex.submit(lambda: 1)
        with pytest.raises(RuntimeError, match="shutdown"):
            ex.submit(task_functions.add, 1, 1)

    async def body(nodes: list[Node], clients: list[str], urls: list[str]) -> None:
        await asyncio.to_thread(sync_body, clients)

    with_cluster(tmp_path, body)


def test_async_executor_submits_maps_and_fails(tmp_path: Path) -> None:
    async def body(nodes: list[Node], clients: list[str], urls: list[str]) -> None:
        async with AsyncClient(clients, timeout_s=10, ring_refresh_s=0) as client:
            async with client.async_executor(queue="async") as ex:
                fut = await ex.submit(task_functions.add, 20, 22)
                assert isinstance(fut, asyncio.Future)
                assert await asyncio.wait_for(fut, 60) == 42
                results = [r async for r in ex.map(task_functions.add, range(10), range(10))]
                assert results == [2 * i for i in range(10)]
                many = [await ex.submit(task_functions.add, i) for i in range(5)]
                assert await asyncio.wait_for(asyncio.gather(*many), 60) == list(range(5))
                with pytest.raises(TaskFailedError, match="boom"):
                    await asyncio.wait_for(await ex.submit(task_functions.raise_error), 60)
            async with client.async_executor(queue="nowhere", tags=["gpu"]) as stuck:
                waiting = await stuck.submit(task_functions.add, 1, 1)
                # Its id before the cancel: once cancelled, its index entry may be gone.
                task_id = next(iter(await client.list_tasks("nowhere"))).task_id
                waiting.cancel()

                async def cancelled() -> bool:
                    info = await client.task_status(task_id)
                    return info is not None and info.state == "cancelled"

                await wait_for(cancelled, "the cancelled future's task is cancelled")

    with_cluster(tmp_path, body)


def test_http_routes_submit_read_list_cancel_and_show_stats(tmp_path: Path) -> None:
    async def body(nodes: list[Node], clients: list[str], urls: list[str]) -> None:
        async with aiohttp.ClientSession() as http:
            async def call(method: str, path: str, **kw: Any) -> tuple[int, Any]:
                async with http.request(method, urls[0] + path, **kw) as reply:
                    return reply.status, await reply.json()

            status, made = await call("POST", "/v1/tasks", json={
                "function": "tests.task_functions:add", "args": [1], "kwargs": {"b": 41}})
            assert status == 201
            task_id = made["id"]

            async def finished() -> bool:
                code, got = await call("GET", f"/v1/tasks/{task_id}")
                return code == 200 and got["state"] == "succeeded"

            await wait_for(finished, "the HTTP task succeeded")
            _, got = await call("GET", f"/v1/tasks/{task_id}")
            assert got["result"] == 42 and got["function"] == "tests.task_functions:add"
            assert got["history"][0]["state"] == "pending"
            assert (await call("GET", "/v1/tasks/00ff"))[0] == 404
            assert (await call("GET", "/v1/tasks/zz"))[0] == 400
            assert (await call("POST", "/v1/tasks", json={"args": []}))[0] == 400
            assert (await call("GET", "/v1/tasks?limit=0"))[0] == 400
            _, stuck = await call("POST", "/v1/tasks", json={
                "function": "tests.task_functions:add", "args": [1], "queue": "nowhere",
                "tags": ["gpu"]})
            status, listed = await call("GET", "/v1/tasks?queue=nowhere&state=pending")
            assert status == 200 and [t["id"] for t in listed["tasks"]] == [stuck["id"]]
            status, cancelled = await call("DELETE", f"/v1/tasks/{stuck['id']}")
            assert status == 200 and cancelled["state"] == "cancelled"
            assert (await call("DELETE", f"/v1/tasks/{stuck['id']}"))[0] == 409
            status, stats = await call("GET", "/api/tasks/stats")
            assert status == 200
            assert sorted(s["node"] for s in stats["nodes"]) == ["n1", "n2", "n3"]
            assert all("free_slots" in s and "queues" in s for s in stats["nodes"])
            assert stats["queues"]["default"]["succeeded"] >= 1

    with_cluster(tmp_path, body)


def test_cli_submits_waits_and_reports_as_json(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from leaderless.cli import main

    def cli(*args: str) -> tuple[int, str]:
        result = CliRunner().invoke(main, list(args), catch_exceptions=False)
        return result.exit_code, result.output

    def sync_body(node: str) -> None:
        code, out = cli("task", "submit", "tests.task_functions:add", "[2]", "--kwargs",
                        '{"b": 3}', "--wait", "--json", "--node", node)
        assert code == 0, out
        done = json.loads(out)
        assert done["state"] == "succeeded" and done["result"] == 5
        code, out = cli("task", "status", done["id"], "--json", "--node", node)
        assert code == 0 and json.loads(out)["attempt"] == 1
        code, out = cli("task", "submit", "tests.task_functions:raise_error", '["nope"]',
                        "--wait", "--json", "--node", node)
        assert code == 1 and json.loads(out.splitlines()[0])["state"] == "failed"
        code, out = cli("task", "submit", "tests.task_functions:add", "[1]", "--queue",
                        "nowhere", "--tag", "gpu", "--json", "--node", node)
        assert code == 0
        stuck = json.loads(out)["id"]
        code, out = cli("task", "list", "--queue", "nowhere", "--json", "--node", node)
        assert code == 0 and [t["id"] for t in json.loads(out)["tasks"]] == [stuck]
        code, out = cli("task", "cancel", stuck, "--json", "--node", node)
        assert code == 0 and json.loads(out)["state"] == "cancelled"
        code, out = cli("task", "cancel", stuck, "--node", node)
        assert code == 1 and "cancel" in out
        code, out = cli("task", "status", "00ff", "--node", node)
        assert code == 1 and "no task" in out
        assert cli("task", "submit", "m:f", "{}", "--node", node)[0] == 2
        assert cli("task", "status", "xyz", "--node", node)[0] == 2

    async def body(nodes: list[Node], clients: list[str], urls: list[str]) -> None:
        await asyncio.to_thread(sync_body, clients[0])

    with_cluster(tmp_path, body)
