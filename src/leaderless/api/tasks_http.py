"""Tasks over HTTP/JSON, on a node's HTTP listener.

==========================================  ================================================
``POST   /v1/tasks``                         JSON ``{"function": "module:function", "args":
                                             [], "kwargs": {}, "queue": "default",
                                             "priority": 0, "tags": [], "slots": 1,
                                             "timeout_s": 300, "max_retries": 0,
                                             "backoff_s": 1, "idempotency_key": ""}`` (only
                                             ``function`` is required); 201 ``{"id"}``
                                             (hex). The same ``idempotency_key`` again: the
                                             first task's id
``GET    /v1/tasks/{id}``                    the task: ``{"id", "found", "state",
                                             "function", "queue", "priority", "slots",
                                             "tags", "timeout_s", "max_retries",
                                             "submitter", "attempt", "holder", "token",
                                             "lease_expires_ms", "not_before_ms",
                                             "submitted_ms", "finished_ms", "history":
                                             [{"state", "node", "at_ms", "note"}], "result"
                                             (the return value, when JSON-able),
                                             "result_b64", "error", "result_omitted"}``;
                                             404 ``not_found``
``DELETE /v1/tasks/{id}``                    cancel (unless finished: 409 ``conflict``);
                                             200 the task
``GET    /v1/tasks``                         ``?queue=default&state=&limit=100``: ``{"queue",
                                             "tasks": [...], "more"}`` (results omitted)
``GET    /api/tasks/stats``                  the dashboard's panel: ``{"node", "nodes":
                                             [{"node", "slots", "running", "free_slots",
                                             "claiming", "tags", "queues": {queue:
                                             {"pending", "running", "succeeded", "failed",
                                             "cancelled"}}, "error"?}], "queues": {queue:
                                             {...summed over the nodes}}}``: each alive
                                             member's figures, fetched from its HTTP
                                             listener within ``PEER_TIMEOUT_S``
                                             (``?scope=node``: this node's only)
==========================================  ================================================

Ids are hex. Permissions (auth on) as on the native port (``api.task_api``): ``write`` on
``system_tasks`` to submit or cancel, ``read`` to look; the stats need only a token.
Pickled callables are not taken over HTTP (a JSON client has none to send).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, Any

import aiohttp
import msgspec
from aiohttp import web

from leaderless.api.kv_messages import TASK_LIST_MAX
from leaderless.api.service import KvError
from leaderless.api.task_api import (
    STATES,
    info_json,
    list_tasks,
    parse_task_id,
    submit,
    task_info,
    tasks_of,
)
from leaderless.core.tasks import (
    ARGS_BYTES_MAX,
    FUNCTION_BYTES_MAX,
    PRIORITY_MAX,
    QUEUE_BYTES_MAX,
    RESULT_TTL_S_DEFAULT,
    RETRIES_MAX,
    SLOTS_MAX,
    TAG_BYTES_MAX,
    TAGS_MAX,
    TASK_KEYSPACE,
    TIMEOUT_S_MAX,
    TaskSpec,
)
from leaderless.security.auth import Principal

BODY_BYTES_MAX = ARGS_BYTES_MAX + 64 * 1024
"""A submit body: the arguments' limit plus room for the rest."""
PEER_TIMEOUT_S = 2.0
"""How long the stats wait for each other member's figures (the dashboard refreshes)."""
PEERS_MAX = 256
"""Members asked for their figures at most (a bigger cluster shows the first ones)."""
DONE_STATES = ("succeeded", "failed", "cancelled")


class SubmitBody(msgspec.Struct, forbid_unknown_fields=True):
    function: Annotated[str, msgspec.Meta(min_length=1, max_length=FUNCTION_BYTES_MAX)]
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    queue: Annotated[str, msgspec.Meta(min_length=1, max_length=QUEUE_BYTES_MAX)] = "default"
    priority: Annotated[int, msgspec.Meta(ge=0, le=PRIORITY_MAX)] = 0
    tags: Annotated[list[Annotated[str, msgspec.Meta(max_length=TAG_BYTES_MAX)]],
                    msgspec.Meta(max_length=TAGS_MAX)] = []
    slots: Annotated[int, msgspec.Meta(ge=1, le=SLOTS_MAX)] = 1
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=TIMEOUT_S_MAX)] = 300.0
    max_retries: Annotated[int, msgspec.Meta(ge=0, le=RETRIES_MAX)] = 0
    backoff_s: Annotated[float, msgspec.Meta(ge=0, le=86400.0)] = 1.0
    result_ttl_s: Annotated[float, msgspec.Meta(gt=0, le=366 * 86400.0)] = RESULT_TTL_S_DEFAULT
    idempotency_key: Annotated[str, msgspec.Meta(max_length=256)] = ""


Check = Callable[[web.Request, str, str, bytes | None, str], None]
"""``HttpApi._check``: raises ``permission_denied`` unless the caller may."""
PrincipalOf = Callable[[web.Request], Principal | None]


def add_task_routes(app: web.Application, service: object, check: Check,
                    principal: PrincipalOf) -> None:
    """Serve ``/v1/tasks`` from ``service``'s task service (``KvNode.tasks``)."""

    async def submit_task(request: web.Request) -> web.StreamResponse:
        _no_query(request, set())
        check(request, "write", TASK_KEYSPACE, None, "submit_task")
        raw = await request.read()
        if len(raw) > BODY_BYTES_MAX:
            raise KvError("bad_request", f"the body is over {BODY_BYTES_MAX} bytes; store "
                          "large inputs in the KV store and pass their keys")
        try:
            body = msgspec.json.decode(raw, type=SubmitBody)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise KvError("bad_request", f"send JSON {{\"function\": \"module:function\", "
                          f"\"args\": [...], ...}}: {exc}") from None
        payload = msgspec.msgpack.encode([body.args, body.kwargs])
        if len(payload) > ARGS_BYTES_MAX:
            raise KvError("bad_request", f"the arguments encode to {len(payload)} bytes, over "
                          f"{ARGS_BYTES_MAX}: store large inputs in the KV store")
        spec = TaskSpec(body.function, payload, False, body.queue, body.priority, body.slots,
                        list(body.tags), body.timeout_s, body.max_retries, body.backoff_s,
                        body.result_ttl_s)
        who = principal(request)
        task_id = await submit(tasks_of(service), spec, b"", body.idempotency_key,
                               who.user if who is not None else "")
        return web.json_response({"id": task_id.hex()}, status=201)

    async def one_task(request: web.Request) -> web.StreamResponse:
        _no_query(request, set())
        task_id = parse_task_id(request.match_info["id"])
        tasks = tasks_of(service)
        if request.method == "DELETE":
            check(request, "write", TASK_KEYSPACE, None, "cancel_task")
            return web.json_response(info_json(task_info(task_id, await tasks.cancel(task_id))))
        check(request, "read", TASK_KEYSPACE, None, "get_task")
        state = await tasks.status(task_id)
        if state is None:
            raise KvError("not_found", f"there is no task {task_id.hex()} (never submitted, "
                          "or its result's TTL passed)")
        return web.json_response(info_json(task_info(task_id, state)))

    async def all_tasks(request: web.Request) -> web.StreamResponse:
        _no_query(request, {"queue", "state", "limit"})
        check(request, "read", TASK_KEYSPACE, None, "list_tasks")
        queue = request.query.get("queue", "default")
        state = request.query.get("state") or None
        if state is not None and state not in STATES:
            raise KvError("bad_request", f"state must be one of {', '.join(STATES)}")
        text = request.query.get("limit", "100")
        if not text.isdigit() or not 1 <= int(text) <= TASK_LIST_MAX:
            raise KvError("bad_request", f"limit must be 1..{TASK_LIST_MAX}, got {text[:20]!r}")
        infos, more = await list_tasks(tasks_of(service), queue, state, int(text))
        return web.json_response({"queue": queue, "tasks": [info_json(i) for i in infos],
                                  "more": more})

    app.router.add_post("/v1/tasks", submit_task)
    app.router.add_get("/v1/tasks", all_tasks)
    app.router.add_route("GET", "/v1/tasks/{id}", one_task)
    app.router.add_route("DELETE", "/v1/tasks/{id}", one_task)


def add_task_stats_routes(app: web.Application, node: str, service: object,
                          members: Callable[[], list[dict[str, Any]]],
                          ssl_context: Any = None) -> None:
    """Serve ``GET /api/tasks/stats``; ``members`` is the node's ``cluster()`` (each
    member's state and HTTP address)."""

    async def stats(request: web.Request) -> web.StreamResponse:
        _no_query(request, {"scope"})
        own = _own_stats(node, service)
        if request.query.get("scope") == "node":
            return web.json_response(own)
        peers = [m for m in members() if m.get("state") == "alive" and m.get("http")
                 and m.get("name") != node][:PEERS_MAX]
        scheme = "https" if request.secure else "http"
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() in ("authorization", "cookie")}
        timeout = aiohttp.ClientTimeout(total=PEER_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            others = await asyncio.gather(*(
                _peer_stats(session, f"{scheme}://{m['http']}/api/tasks/stats?scope=node",
                            str(m["name"]), headers, ssl_context) for m in peers))
        nodes = sorted([own, *others], key=lambda s: str(s.get("node")))
        return web.json_response({"node": node, "nodes": nodes, "queues": _summed(nodes)})

    app.router.add_get("/api/tasks/stats", stats)


def _own_stats(node: str, service: object) -> dict[str, Any]:
    tasks = getattr(service, "tasks", None)
    if tasks is None:
        return {"node": node, "error": "no task service (starting or stopping)"}
    return dict(tasks.stats())


async def _peer_stats(session: aiohttp.ClientSession, url: str, name: str,
                      headers: dict[str, str], ssl_context: Any) -> dict[str, Any]:
    try:
        async with session.get(url, headers=headers,
                               ssl=ssl_context if ssl_context is not None else True) as reply:
            if reply.status != 200:
                return {"node": name, "error": f"HTTP {reply.status}"}
            body = await reply.json()
            return body if isinstance(body, dict) else {"node": name, "error": "bad answer"}
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return {"node": name, "error": f"unreachable: {type(exc).__name__}"}


def _summed(nodes: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per queue over the nodes: running and finished add up; pending is what each node
    saw in its last scans of the same shards, so the largest is shown."""
    total: dict[str, dict[str, int]] = {}
    for stats in nodes:
        for queue, counts in (stats.get("queues") or {}).items():
            row = total.setdefault(queue, {"pending": 0, "running": 0,
                                           **dict.fromkeys(DONE_STATES, 0)})
            row["pending"] = max(row["pending"], int(counts.get("pending", 0)))
            for key in ("running", *DONE_STATES):
                row[key] += int(counts.get(key, 0))
    return total


def _no_query(request: web.Request, allowed: set[str]) -> None:
    unknown = set(request.query) - allowed
    if unknown:
        raise KvError("bad_request", f"unknown query parameter(s) "
                      f"{', '.join(sorted(unknown))[:100]}"
                      + (f"; this route takes {', '.join(sorted(allowed))}" if allowed else ""))
