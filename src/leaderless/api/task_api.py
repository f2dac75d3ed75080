"""The user-facing task operations, shared by the native protocol (``api.kv_server``) and
HTTP (``api.tasks_http``): they translate requests into calls of the node's task service
(``runtime.tasks.TaskService``) and its ``core.tasks.TaskState`` into ``TaskInfo`` replies.

Permissions (with auth on), all on the keyspace ``system_tasks`` as a whole (grants with a
key prefix do not count): submitting a registered function needs ``write``, a pickled
callable ``execute`` (arbitrary code on the nodes; ``admin`` includes it); cancelling needs
``write``; status, list and wait need ``read``. The submitter recorded with a task is the
caller's user, whatever the client sent.
"""

from __future__ import annotations

import builtins
from typing import Any, Protocol

import msgspec

from leaderless.api.kv_messages import (
    TASK_IDS_PER_WAIT_MAX,
    TASK_REPLY_RESULT_BYTES_MAX,
    TASK_WAIT_MS_MAX,
    CancelTask,
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
from leaderless.core.tasks import FINISHED, TASK_KEYSPACE, TaskSpec, TaskState

TASK_REQUEST_TYPES: frozenset[type] = frozenset({SubmitTask, GetTask, CancelTask, ListTasks,
                                                 WaitTasks})
STATES = ("pending", "claimed", "running", "succeeded", "failed", "retrying", "cancelled")
OMITTED_ERROR_CHARS = 400
"""A task whose result does not fit an answer keeps this much of its error's end."""

TaskRequest = SubmitTask | GetTask | CancelTask | ListTasks | WaitTasks
Permission = tuple[str, str, bytes | None]


class TaskApi(Protocol):
    """What the protocols need of a node's task service (``runtime.tasks.TaskService``)."""

    async def submit(self, spec: TaskSpec, task_id: bytes | None = None,
                     idempotency_key: str = "") -> bytes: ...

    async def status(self, task_id: bytes) -> TaskState | None: ...

    async def cancel(self, task_id: bytes) -> TaskState: ...

    async def list(self, queue: str = "default", state: str | None = None,
                   limit: int = 100) -> builtins.list[tuple[bytes, TaskState]]: ...

    async def wait(self, task_ids: builtins.list[bytes], timeout_s: float
                   ) -> dict[bytes, TaskState]: ...

    def stats(self) -> dict[str, Any]: ...


def permission(request: TaskRequest) -> Permission:
    """The grant a task request needs (``api.kv_server.PERMISSIONS``)."""
    if isinstance(request, SubmitTask):
        return ("execute" if request.spec.pickled else "write", TASK_KEYSPACE, None)
    if isinstance(request, CancelTask):
        return ("write", TASK_KEYSPACE, None)
    return ("read", TASK_KEYSPACE, None)


def tasks_of(service: object) -> TaskApi:
    """The task service behind a node's KV service (``KvNode.tasks``), or ``not_supported``
    if the node runs none."""
    tasks = getattr(service, "tasks", None)
    if tasks is None:
        raise KvError("not_supported", "this node runs no task service (it is starting, "
                      "stopping, or too old): send the request to another node")
    return tasks  # type: ignore[no-any-return]


def pickle_allowed(tasks: TaskApi) -> bool:
    """Whether the cluster takes pickled callables (``[tasks] allow_pickle``)."""
    return bool(getattr(getattr(tasks, "config", None), "allow_pickle", False))


async def execute_task(service: object, request: TaskRequest, user: str = ""
                       ) -> TaskSubmitted | TaskInfo | TaskInfos | TaskList:
    """Run one task request for ``user`` (the authenticated caller, "" with auth off;
    the permission was checked before) and build its reply. ``KvError`` propagates."""
    tasks = tasks_of(service)
    if isinstance(request, SubmitTask):
        task_id = await submit(tasks, request.spec, request.task_id, request.idempotency_key,
                               user)
        return TaskSubmitted(request.id, task_id)
    if isinstance(request, GetTask):
        state = await tasks.status(request.task_id)
        if state is None:
            return TaskInfo(request.id, request.task_id, found=False)
        return task_info(request.task_id, state, request_id=request.id)
    if isinstance(request, CancelTask):
        state = await tasks.cancel(request.task_id)
        return task_info(request.task_id, state, request_id=request.id)
    if isinstance(request, ListTasks):
        infos, more = await list_tasks(tasks, request.queue, request.state or None,
                                       request.limit)
        return TaskList(request.id, [msgspec.structs.replace(i, id=request.id)
                                     for i in infos], more)
    assert isinstance(request, WaitTasks)
    finished, missing = await wait_tasks(tasks, request.task_ids, request.timeout_ms / 1000)
    return TaskInfos(request.id, [msgspec.structs.replace(i, id=request.id) for i in finished],
                     missing)


async def submit(tasks: TaskApi, spec: TaskSpec, task_id: bytes, idempotency_key: str,
                 user: str) -> bytes:
    """Queue ``spec`` as ``user``; the id of the task (the existing one's when the id or
    idempotency key was submitted before)."""
    if spec.pickled and not pickle_allowed(tasks):
        raise KvError("permission_denied", "this cluster does not run pickled callables; "
                      "submit a registered function (module:function) instead, or have the "
                      "operator set [tasks] allow_pickle = true on every node")
    spec = msgspec.structs.replace(spec, submitter=user[:64])
    return await tasks.submit(spec, task_id or None, idempotency_key)


async def list_tasks(tasks: TaskApi, queue: str, state: str | None, limit: int
                     ) -> tuple[list[TaskInfo], bool]:
    """The unfinished tasks of ``queue`` (results omitted); (infos, more)."""
    if state is not None and state not in STATES:
        raise KvError("bad_request", f"task state {state[:20]!r} is unknown; use one of "
                      + ", ".join(STATES))
    found = await tasks.list(queue, state, limit + 1)
    infos = [task_info(task_id, task, with_result=False) for task_id, task in found[:limit]]
    return infos, len(found) > limit


async def wait_tasks(tasks: TaskApi, task_ids: list[bytes], timeout_s: float
                     ) -> tuple[list[TaskInfo], list[bytes]]:
    """Wait (at most ``timeout_s``) until one of ``task_ids`` has finished: (the finished
    ones, with results while ``TASK_REPLY_RESULT_BYTES_MAX`` allows; the ids of tasks that
    do not exist)."""
    if len(task_ids) > TASK_IDS_PER_WAIT_MAX:
        raise KvError("bad_request", f"wait for at most {TASK_IDS_PER_WAIT_MAX} tasks at once "
                      f"(got {len(task_ids)}); split the ids over several waits")
    timeout_s = min(max(0.0, timeout_s), TASK_WAIT_MS_MAX / 1000)
    ids = list(dict.fromkeys(task_ids))
    states: dict[bytes, TaskState | None] = dict(await tasks.wait(ids, timeout_s))
    missing = [i for i in ids if i in states and states[i] is None]
    budget = TASK_REPLY_RESULT_BYTES_MAX
    finished: list[TaskInfo] = []
    for task_id in ids:
        state = states.get(task_id)
        if state is None or state.state not in FINISHED:
            continue
        size = len(state.result or b"") + len(state.error)
        fits = size <= budget
        if fits:
            budget -= size
        finished.append(task_info(task_id, state, with_result=fits))
    return finished, missing


def task_info(task_id: bytes, task: TaskState, *, with_result: bool = True,
              request_id: int = 0) -> TaskInfo:
    """``task`` as a reply (without its arguments; without its result and with only the
    end of its error unless ``with_result``)."""
    spec = task.spec
    history = [TaskTransition(t.state[:16], t.node[:64], t.at_ms, t.note[:1024])
               for t in task.history]
    error = task.error if with_result else task.error[-OMITTED_ERROR_CHARS:]
    omitted = not with_result and (task.result is not None or error != task.error)
    return TaskInfo(request_id, task_id, True, task.state, spec.function, spec.pickled,
                    spec.queue, spec.priority, spec.slots, list(spec.tags), spec.timeout_s,
                    spec.max_retries, spec.submitter, task.attempt, task.holder, task.token,
                    task.lease_expires_ms, task.not_before_ms, task.submitted_ms,
                    task.finished_ms, history, task.result if with_result else None, error,
                    omitted)


def info_json(info: TaskInfo, *, id_text: str | None = None) -> dict[str, Any]:
    """A ``TaskInfo`` as JSON (HTTP, ``leaderless task ... --json``): ids in hex, the
    result decoded when it is msgpack (``result``; ``result_b64`` always)."""
    import base64

    body: dict[str, Any] = {
        "id": id_text or info.task_id.hex(), "found": info.found}
    if not info.found:
        return body
    body.update({
        "state": info.state, "function": info.function, "pickled": info.pickled,
        "queue": info.queue, "priority": info.priority, "slots": info.slots,
        "tags": list(info.tags), "timeout_s": info.timeout_s,
        "max_retries": info.max_retries, "submitter": info.submitter,
        "attempt": info.attempt, "holder": info.holder, "token": info.token,
        "lease_expires_ms": info.lease_expires_ms, "not_before_ms": info.not_before_ms,
        "submitted_ms": info.submitted_ms, "finished_ms": info.finished_ms,
        "history": [{"state": t.state, "node": t.node, "at_ms": t.at_ms, "note": t.note}
                    for t in info.history],
        "error": info.error, "result_omitted": info.result_omitted,
        "result_b64": None if info.result is None else base64.b64encode(info.result).decode(),
        "result": decoded_result(info)})
    return body


def decoded_result(info: TaskInfo) -> Any:
    """The result as a JSON-able value when it is msgpack of one (None otherwise, or
    when there is none: read ``result_b64``)."""
    if info.result is None or info.pickled:
        return None
    try:
        value = msgspec.msgpack.decode(info.result)
        msgspec.json.encode(value)
    except (msgspec.DecodeError, msgspec.EncodeError, TypeError, ValueError):
        return None
    return value


def parse_task_id(text: str) -> bytes:
    """A task id as the CLI and HTTP show it (hex) back to bytes."""
    text = text.strip()
    try:
        task_id = bytes.fromhex(text)
    except ValueError:
        raise KvError("bad_request", f"task id {text[:40]!r} is not hex (ids are shown as "
                      "hex, e.g. by `leaderless task submit`)") from None
    if not 1 <= len(task_id) <= 128:
        raise KvError("bad_request", "a task id has 1 to 128 bytes")
    return task_id
