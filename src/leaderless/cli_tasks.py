"""``leaderless task ...``: submit, inspect, cancel and list tasks from the shell.

    leaderless task submit mypkg.jobs:resize '["img-42"]' --kwargs '{"width": 640}' \\
        [--queue Q] [--priority P] [--tag io]... [--timeout S] [--retries N] \\
        [--idempotency-key K] [--wait] [--json]          # prints the task id (hex)
    leaderless task status ID [--json]
    leaderless task cancel ID [--json]
    leaderless task list [--queue Q] [--state pending] [--limit N] [--json]

``FUNCTION`` is a registered ``module:function`` (a module the nodes run with ``--tasks``);
``ARGS_JSON`` a JSON array of its positional arguments (default ``[]``), ``--kwargs`` a JSON
object of its keyword arguments. ``--wait`` waits until the task finishes and prints its
result as JSON (a result that is not JSON-able is printed as base64 under ``result_b64``
with ``--json``). Task ids are printed and taken in hex.

``--node HOST:PORT`` (repeatable) names client listeners, as for ``leaderless kv`` (default
``$LEADERLESS_CLIENT_NODE`` or 127.0.0.1:7400); ``--token`` as there. Exit codes: 0 done;
1 the task failed or was cancelled (``--wait``), there is no such task, the request was
refused or no node could be reached (the reason on stderr); 2 invalid usage.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import click
import msgspec
from rich.console import Console
from rich.table import Table

from leaderless.api.kv_messages import TASK_LIST_MAX, TaskInfo
from leaderless.api.service import KvError
from leaderless.api.task_api import STATES, decoded_result, info_json, parse_task_id
from leaderless.cli_certs import client_ssl_from_env
from leaderless.cli_kv import CLIENT_ENV, DEFAULT_CLIENT, _keep_token, _nodes
from leaderless.client.async_client import AsyncClient
from leaderless.client.errors import LeaderlessError
from leaderless.core.tasks import FINISHED, PRIORITY_MAX, RETRIES_MAX, TIMEOUT_S_MAX
from leaderless.runtime.process import EXIT_CONFIG, EXIT_FATAL, run

T = TypeVar("T")
WAIT_POLL_S = 30.0
"""One long poll of ``--wait`` (re-sent until the task finishes)."""


def _fail(message: str, code: int = EXIT_FATAL) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _call(nodes: tuple[str, ...], timeout_s: float,
          action: Callable[[AsyncClient], Awaitable[T]]) -> T:
    addresses = _nodes(nodes)

    from leaderless.cli_auth import context_token

    credential = context_token()
    context = client_ssl_from_env()

    async def go() -> T:
        async with AsyncClient(addresses, timeout_s=timeout_s, connections_per_node=1,
                               ring_refresh_s=0, token=credential,
                               ssl_context=context) as client:
            return await action(client)

    try:
        return run(go())
    except LeaderlessError as exc:
        _fail(str(exc))


def _client_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--token", callback=_keep_token, expose_value=False, metavar="TOKEN",
                      help="Authenticate with this token [default: $LEADERLESS_TOKEN, or "
                           "the one `leaderless login` stored].")(fn)
    fn = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")(fn)
    fn = click.option("--request-timeout", "request_timeout_s",
                      type=click.FloatRange(min=0.1), default=10.0, show_default=True,
                      help="Seconds to wait for each request.")(fn)
    return click.option(
        "--node", "nodes", multiple=True, metavar="HOST:PORT",
        help=f"A node's client address (repeatable) [default: ${CLIENT_ENV} or "
             f"{DEFAULT_CLIENT}].")(fn)


def _task_id(text: str) -> bytes:
    try:
        return parse_task_id(text)
    except KvError as exc:
        _fail(exc.message, EXIT_CONFIG)


@click.group()
def task() -> None:
    """Submit, inspect, cancel and list tasks (functions run on the cluster's nodes)."""


@task.command("submit")
@click.argument("function")
@click.argument("args_json", default="[]", metavar="[ARGS_JSON]")
@click.option("--kwargs", "kwargs_json", default="{}", metavar="JSON",
              help="Keyword arguments, a JSON object.")
@click.option("--queue", default="default", show_default=True)
@click.option("--priority", type=click.IntRange(0, PRIORITY_MAX), default=0,
              show_default=True, help="Higher runs first within the queue.")
@click.option("--tag", "tags", multiple=True, help="A node tag the task needs (repeatable).")
@click.option("--slots", type=click.IntRange(1, 64), default=1, show_default=True)
@click.option("--timeout", "task_timeout_s", type=click.FloatRange(0.001, TIMEOUT_S_MAX),
              default=300.0, show_default=True, help="Seconds one run may take.")
@click.option("--retries", type=click.IntRange(0, RETRIES_MAX), default=0, show_default=True,
              help="Runs again after a failure, with back-off.")
@click.option("--idempotency-key", default="",
              help="Submitting the same key again returns the first task (no second one).")
@click.option("--wait", is_flag=True, help="Wait for the task to finish; print its result.")
@_client_options
def task_submit(function: str, args_json: str, kwargs_json: str, queue: str, priority: int,
                tags: tuple[str, ...], slots: int, task_timeout_s: float, retries: int,
                idempotency_key: str, wait: bool, nodes: tuple[str, ...],
                request_timeout_s: float, as_json: bool) -> None:
    """Run FUNCTION (module:function) with ARGS_JSON (a JSON array) on the cluster."""
    args, kwargs = _arguments(args_json, kwargs_json)
    payload = msgspec.msgpack.encode([args, kwargs])

    async def submit(client: AsyncClient) -> tuple[bytes, TaskInfo | None]:
        task_id = await client.submit_task(
            function, payload, queue=queue, priority=priority, slots=slots, tags=tags,
            timeout_s=task_timeout_s, max_retries=retries, idempotency_key=idempotency_key)
        return task_id, (await _wait(client, task_id) if wait else None)

    task_id, info = _call(nodes, request_timeout_s, submit)
    if info is None:
        click.echo(json.dumps({"id": task_id.hex()}) if as_json else task_id.hex())
        if not as_json:
            click.echo(f"submitted {function} to queue {queue!r}", err=True)
        return
    _print_outcome(info, as_json)


@task.command("status")
@click.argument("task_id", metavar="ID")
@_client_options
def task_status(task_id: str, nodes: tuple[str, ...], request_timeout_s: float,
                as_json: bool) -> None:
    """Show task ID: state, attempts, holder, history, result or error."""
    ident = _task_id(task_id)
    info = _call(nodes, request_timeout_s, lambda c: c.task_status(ident))
    if info is None:
        if as_json:
            click.echo(json.dumps({"id": ident.hex(), "found": False}))
        _fail(f"there is no task {ident.hex()} (never submitted, or its result's TTL "
              "passed)")
    if as_json:
        click.echo(json.dumps(info_json(info)))
        return
    _print_info(info)


@task.command("cancel")
@click.argument("task_id", metavar="ID")
@_client_options
def task_cancel(task_id: str, nodes: tuple[str, ...], request_timeout_s: float,
                as_json: bool) -> None:
    """Cancel task ID if it has not finished (a running one is stopped)."""
    ident = _task_id(task_id)
    info = _call(nodes, request_timeout_s, lambda c: c.cancel_task(ident))
    click.echo(json.dumps(info_json(info)) if as_json else f"cancelled task {ident.hex()}")


@task.command("list")
@click.option("--queue", default="default", show_default=True)
@click.option("--state", type=click.Choice(STATES), help="Only tasks in this state.")
@click.option("--limit", type=click.IntRange(1, TASK_LIST_MAX), default=100,
              show_default=True)
@_client_options
def task_list(queue: str, state: str | None, limit: int, nodes: tuple[str, ...],
              request_timeout_s: float, as_json: bool) -> None:
    """The tasks of a queue not yet finished (and those finished recently through the node
    asked), highest priority first."""
    infos = _call(nodes, request_timeout_s, lambda c: c.list_tasks(queue, state, limit))
    if as_json:
        click.echo(json.dumps({"queue": queue, "tasks": [info_json(i) for i in infos]}))
        return
    if not infos:
        click.echo(f"no tasks in queue {queue!r}" + (f" in state {state}" if state else ""))
        return
    table = Table(box=None, pad_edge=False)
    for column in ("ID", "STATE", "FUNCTION", "PRIORITY", "ATTEMPT", "HOLDER", "SUBMITTED"):
        table.add_column(column)
    for info in infos:
        table.add_row(info.task_id.hex(), info.state, info.function, str(info.priority),
                      str(info.attempt), info.holder or "-", _when(info.submitted_ms))
    Console(width=200).print(table)


# -- helpers -----------------------------------------------------------------------------


def _arguments(args_json: str, kwargs_json: str) -> tuple[list[Any], dict[str, Any]]:
    try:
        args = json.loads(args_json)
        kwargs = json.loads(kwargs_json)
    except json.JSONDecodeError as exc:
        _fail(f"the arguments are not JSON: {exc}", EXIT_CONFIG)
    if not isinstance(args, list):
        _fail("ARGS_JSON must be a JSON array of positional arguments, e.g. '[1, \"a\"]' "
              "(keyword arguments go in --kwargs)", EXIT_CONFIG)
    if not isinstance(kwargs, dict):
        _fail("--kwargs must be a JSON object, e.g. '{\"width\": 640}'", EXIT_CONFIG)
    return args, kwargs


async def _wait(client: AsyncClient, task_id: bytes) -> TaskInfo:
    while True:
        reply = await client.wait_tasks([task_id], WAIT_POLL_S)
        for info in reply.tasks:
            if info.result_omitted:
                full = await client.task_status(task_id)
                return full if full is not None else info
            return info
        if reply.missing:
            raise LeaderlessError(f"task {task_id.hex()} no longer exists", code="not_found")
        await asyncio.sleep(0)


def _print_outcome(info: TaskInfo, as_json: bool) -> None:
    """A finished task: its result on stdout (exit 0), or its error on stderr (exit 1)."""
    assert info.state in FINISHED
    if as_json:
        click.echo(json.dumps(info_json(info)))
    elif info.state == "succeeded":
        value = decoded_result(info)
        click.echo(json.dumps(value) if value is not None or not info.result
                   else "0x" + info.result.hex())
    if info.state == "succeeded":
        return
    if not as_json:
        click.echo(info.error.rstrip() or f"the task was {info.state}", err=True)
    _fail(f"task {info.task_id.hex()} {info.state} after {info.attempt} attempt(s)")


def _print_info(info: TaskInfo) -> None:
    lines = [
        f"task      {info.task_id.hex()}",
        f"state     {info.state}",
        f"function  {info.function}" + (" (pickled)" if info.pickled else ""),
        f"queue     {info.queue}  priority {info.priority}  slots {info.slots}"
        + (f"  tags {','.join(info.tags)}" if info.tags else ""),
        f"attempt   {info.attempt} of {info.max_retries + 1}"
        + (f"  held by {info.holder} (token {info.token})" if info.holder else ""),
        f"submitted {_when(info.submitted_ms)}"
        + (f" by {info.submitter}" if info.submitter else "")
        + (f"  finished {_when(info.finished_ms)}" if info.finished_ms else ""),
        "history:"]
    lines += [f"  {_when(t.at_ms)}  {t.state:<9} {t.node}" + (f"  {t.note}" if t.note else "")
              for t in info.history]
    if info.state == "succeeded":
        value = decoded_result(info)
        lines.append("result    " + (json.dumps(value) if value is not None or not info.result
                                     else f"{len(info.result)} bytes (not JSON)"))
    if info.error:
        lines += ["error:", *("  " + line for line in info.error.rstrip().splitlines())]
    click.echo("\n".join(lines))


def _when(ms: int) -> str:
    if not ms:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) + f".{ms % 1000:03d}"
