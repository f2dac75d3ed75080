"""``leaderless keyspace ...`` and ``leaderless kv ...``: the key-value store from the shell.

    leaderless keyspace create users --replication 3 --mode eventual [--if-not-exists]
    leaderless keyspace list
    leaderless kv put users alice '{"age": 30}' [--sort S] [--consistency C] [--ttl SECONDS]
    echo -n data | leaderless kv put users bob -
    leaderless kv get users alice            # the raw value on stdout
    leaderless kv delete users alice
    leaderless kv scan users alice [--start S] [--end E] [--limit N]
    leaderless kv cas config leader node2 --expect-version 7     # strong keyspaces
    leaderless kv incr counters visits 5                          # strong keyspaces
    leaderless kv watch config leader [--prefix] [--since-version V]  # strong keyspaces

``--node HOST:PORT`` (repeatable or comma-separated) names client listeners to contact;
the default is ``$LEADERLESS_CLIENT_NODE`` or 127.0.0.1:7400. Every command takes ``--json``
and ``--token`` (a cluster with auth: default ``$LEADERLESS_TOKEN`` or the token
``leaderless login`` stored, see ``cli_auth``).

Exit codes: 0 ok; 1 no node reachable, connection lost, or the node failed (storage,
internal); 2 invalid usage or a request the node refused as invalid (bad_request);
4 ``kv get``: no such key; 5 the cluster could not serve it now (unavailable, timeout,
overloaded, contention: retry later); 6 schema: unknown keyspace, or keyspace exists
already; 7 ``kv cas``: the expectation did not hold (the message has the current version);
8 a write with ``--fence LOCK:TOKEN`` was refused because the lock granted a newer token
(and, for ``leaderless lock``, the lock is held or the lease was lost).
"""

from __future__ import annotations

import base64
import json
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console
from rich.table import Table

from leaderless.api.kv_messages import CONSISTENCY_LEVELS, MODES, REPLICATION_MAX
from leaderless.cli_certs import client_ssl_from_env
from leaderless.client.async_client import AsyncClient
from leaderless.client.errors import (
    BadRequestError,
    ConflictError,
    ContentionError,
    FencedError,
    KeyspaceExistsError,
    LeaderlessError,
    LeaseLostError,
    LockHeldError,
    OverloadedError,
    RequestTimeoutError,
    UnavailableError,
    UnknownKeyspaceError,
)
from leaderless.runtime.process import EXIT_CONFIG, EXIT_FATAL, run

T = TypeVar("T")
DEFAULT_CLIENT = "127.0.0.1:7400"
CLIENT_ENV = "LEADERLESS_CLIENT_NODE"
EXIT_NOT_FOUND = 4
EXIT_UNAVAILABLE = 5
EXIT_SCHEMA = 6
EXIT_CONFLICT = 7
EXIT_NOT_HOLDER = 8


def exit_code_for(exc: LeaderlessError) -> int:
    if isinstance(exc, BadRequestError):
        return EXIT_CONFIG
    if isinstance(exc, UnavailableError | RequestTimeoutError | OverloadedError
                  | ContentionError):
        return EXIT_UNAVAILABLE
    if isinstance(exc, ConflictError):
        return EXIT_CONFLICT
    if isinstance(exc, LockHeldError | LeaseLostError | FencedError):
        return EXIT_NOT_HOLDER
    if isinstance(exc, UnknownKeyspaceError | KeyspaceExistsError):
        return EXIT_SCHEMA
    return EXIT_FATAL


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _nodes(given: tuple[str, ...]) -> list[str]:
    raw = list(given) or [os.environ.get(CLIENT_ENV) or DEFAULT_CLIENT]
    nodes = [n.strip() for item in raw for n in item.replace(" ", ",").split(",") if n.strip()]
    for n in nodes:
        host, sep, port = n.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
            _fail(f"--node: {n!r} is not HOST:PORT with port 1..65535", EXIT_CONFIG)
    return nodes


def _call(nodes: tuple[str, ...], timeout_s: float,
          action: Callable[[AsyncClient], Awaitable[T]]) -> T:
    addresses = _nodes(nodes)

    from leaderless.cli_auth import context_token  # cli_auth builds on this module

    credential = context_token()
    context = client_ssl_from_env()  # a TLS cluster: LEADERLESS_TLS_CA

    async def go() -> T:
        async with AsyncClient(addresses, timeout_s=timeout_s, connections_per_node=1,
                               ring_refresh_s=0, token=credential,
                               ssl_context=context) as client:
            return await action(client)

    try:
        return run(go())
    except LeaderlessError as exc:
        _fail(str(exc), exit_code_for(exc))


TOKEN_META = "leaderless_token"
"""Where ``--token`` leaves its value in the click context (``cli_auth.context_token``)."""


def _keep_token(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value:
        ctx.meta[TOKEN_META] = value


def _common(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--token", callback=_keep_token, expose_value=False, metavar="TOKEN",
                      help="Authenticate with this token [default: $LEADERLESS_TOKEN, or "
                           "the one `leaderless login` stored].")(fn)
    fn = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")(fn)
    fn = click.option("--timeout", "timeout_s", type=click.FloatRange(min=0.1), default=10.0,
                      show_default=True, help="Seconds to wait for each request.")(fn)
    return click.option(
        "--node", "nodes", multiple=True, metavar="HOST:PORT",
        help=f"A node's client address (repeatable) [default: ${CLIENT_ENV} or "
             f"{DEFAULT_CLIENT}].")(fn)


def _text_or_b64(data: bytes) -> dict[str, Any]:
    try:
        return {"text": data.decode(), "b64": base64.b64encode(data).decode()}
    except UnicodeDecodeError:
        return {"text": None, "b64": base64.b64encode(data).decode()}


def _shown(data: bytes) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError:
        return "0x" + data.hex()


consistency_option = click.option(
    "--consistency", type=click.Choice(CONSISTENCY_LEVELS, case_sensitive=False),
    help="Replicas that must answer [default: the keyspace's].")
sort_option = click.option("--sort", default=None, help="Sort key within the partition.")


# -- keyspace -----------------------------------------------------------------------------


@click.group()
def keyspace() -> None:
    """Create and list keyspaces (replication factor, mode, default consistency)."""


@keyspace.command("create")
@click.argument("name")
@click.option("--replication", type=click.IntRange(1, REPLICATION_MAX), default=3,
              show_default=True, help="Replicas of every row (N).")
@click.option("--mode", type=click.Choice(MODES), default="eventual", show_default=True)
@click.option("--read-consistency", type=click.Choice(CONSISTENCY_LEVELS, case_sensitive=False),
              default="QUORUM", show_default=True)
@click.option("--write-consistency",
              type=click.Choice(CONSISTENCY_LEVELS, case_sensitive=False), default="QUORUM",
              show_default=True)
@click.option("--if-not-exists", is_flag=True, help="Succeed if it exists already.")
@_common
def keyspace_create(name: str, replication: int, mode: str, read_consistency: str,
                    write_consistency: str, if_not_exists: bool, nodes: tuple[str, ...],
                    timeout_s: float, as_json: bool) -> None:
    """Create keyspace NAME."""
    _call(nodes, timeout_s, lambda c: c.create_keyspace(
        name, replication, mode, read_consistency=read_consistency.upper(),
        write_consistency=write_consistency.upper(), if_not_exists=if_not_exists))
    info = {"name": name, "replication": replication, "mode": mode,
            "read_consistency": read_consistency.upper(),
            "write_consistency": write_consistency.upper()}
    if as_json:
        click.echo(json.dumps(info))
    else:
        click.echo(f"keyspace {name}: replication {replication}, {mode}, reads "
                   f"{info['read_consistency']}, writes {info['write_consistency']}")


@keyspace.command("list")
@_common
def keyspace_list(nodes: tuple[str, ...], timeout_s: float, as_json: bool) -> None:
    """List keyspaces."""
    spaces = _call(nodes, timeout_s, lambda c: c.list_keyspaces())
    rows: list[dict[str, Any]] = [{"name": k.name, "replication": k.replication, "mode": k.mode,
             "read_consistency": k.read_consistency, "write_consistency": k.write_consistency}
            for k in sorted(spaces, key=lambda k: k.name)]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table()
    for column in ("name", "replication", "mode", "reads", "writes"):
        table.add_column(column)
    for r in rows:
        table.add_row(r["name"], str(r["replication"]), r["mode"], r["read_consistency"],
                      r["write_consistency"])
    Console().print(table)


# -- kv -----------------------------------------------------------------------------------


def _parse_fence(ctx: click.Context, param: click.Parameter, value: str | None
                 ) -> tuple[str, int] | None:
    if value is None:
        return None
    lock, sep, token = value.rpartition(":")
    if not sep or not lock or not token.isdigit():
        raise click.BadParameter(f"{value!r} is not LOCK:TOKEN (e.g. backup:7)")
    return lock, int(token)


fence_option = click.option(
    "--fence", callback=_parse_fence, metavar="LOCK:TOKEN",
    help="Write under this lease of a lock: refused (exit 8) if the lock has granted a "
         "newer token.")


@click.group()
def kv() -> None:
    """Put, get, delete and scan rows (keyspace -> partition key -> sort key -> value)."""


@kv.command("put")
@click.argument("keyspace_name", metavar="KEYSPACE")
@click.argument("key")
@click.argument("value")
@sort_option
@consistency_option
@click.option("--ttl", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="Expire the value after this many seconds.")
@fence_option
@_common
def kv_put(keyspace_name: str, key: str, value: str, sort: str | None,
           consistency: str | None, ttl: float | None, fence: tuple[str, int] | None,
           nodes: tuple[str, ...], timeout_s: float, as_json: bool) -> None:
    """Write VALUE (``-``: read it from stdin) under KEY."""
    # fsencode: arguments that are not valid UTF-8 reach us surrogate-escaped; store the
    # bytes the user gave.
    data = sys.stdin.buffer.read() if value == "-" else os.fsencode(value)
    k = os.fsencode(key)
    s = None if sort is None else os.fsencode(sort)
    hlc = _call(nodes, timeout_s, lambda c: c.put(keyspace_name, k, data, sort=s,
                                                   consistency=consistency, ttl=ttl,
                                                   fence=fence))
    if as_json:
        click.echo(json.dumps({"hlc": hlc, "bytes": len(data)}))
    else:
        click.echo(f"ok ({len(data)} bytes, hlc {hlc})", err=True)


@kv.command("get")
@click.argument("keyspace_name", metavar="KEYSPACE")
@click.argument("key")
@sort_option
@consistency_option
@_common
def kv_get(keyspace_name: str, key: str, sort: str | None, consistency: str | None,
           nodes: tuple[str, ...], timeout_s: float, as_json: bool) -> None:
    """Print KEY's value raw on stdout (exit code 4 if there is none)."""
    k = os.fsencode(key)
    s = None if sort is None else os.fsencode(sort)
    item = _call(nodes, timeout_s, lambda c: c.get_with_meta(keyspace_name, k, sort=s,
                                                             consistency=consistency))
    if item is None:
        if as_json:
            click.echo(json.dumps({"found": False}))
        _fail(f"no value for key {key!r}" + (f" sort {sort!r}" if sort else "")
              + f" in keyspace {keyspace_name!r}", EXIT_NOT_FOUND)
    if as_json:
        value = _text_or_b64(item.value)
        click.echo(json.dumps({"found": True, "value": value["text"], "value_b64": value["b64"],
                               "hlc": item.hlc, "expires_at_ms": item.expires_at_ms}))
        return
    out = sys.stdout.buffer
    out.write(item.value)
    if sys.stdout.isatty() and not item.value.endswith(b"\n"):
        out.write(b"\n")  # for people; a pipe gets the exact bytes
    out.flush()


@kv.command("delete")
@click.argument("keyspace_name", metavar="KEYSPACE")
@click.argument("key")
@sort_option
@consistency_option
@fence_option
@_common
def kv_delete(keyspace_name: str, key: str, sort: str | None, consistency: str | None,
              fence: tuple[str, int] | None, nodes: tuple[str, ...], timeout_s: float,
              as_json: bool) -> None:
    """Delete KEY (succeeds if it is absent)."""
    k = os.fsencode(key)
    s = None if sort is None else os.fsencode(sort)
    hlc = _call(nodes, timeout_s, lambda c: c.delete(keyspace_name, k, sort=s,
                                                      consistency=consistency, fence=fence))
    if as_json:
        click.echo(json.dumps({"hlc": hlc}))
    else:
        click.echo(f"deleted (hlc {hlc})", err=True)


@kv.command("cas")
@click.argument("keyspace_name", metavar="KEYSPACE")
@click.argument("key")
@click.argument("value")
@click.option("--expect-version", type=int, help="Apply only if the key is at this version.")
@click.option("--expect-value", help="Apply only if the key holds this value.")
@click.option("--expect-absent", is_flag=True, help="Apply only if the key is absent.")
@sort_option
@_common
def kv_cas(keyspace_name: str, key: str, value: str, expect_version: int | None,
           expect_value: str | None, expect_absent: bool, sort: str | None,
           nodes: tuple[str, ...], timeout_s: float, as_json: bool) -> None:
    """Compare-and-set in a strong keyspace; prints the new version. Exit code 7 with the
    current version if the expectation does not hold."""
    if (expect_version is not None) + (expect_value is not None) + expect_absent != 1:
        _fail("give exactly one of --expect-version, --expect-value, --expect-absent",
              EXIT_CONFIG)
    k = os.fsencode(key)
    s = None if sort is None else os.fsencode(sort)
    expected = None if expect_value is None else os.fsencode(expect_value)
    version = _call(nodes, timeout_s, lambda c: c.cas(
        keyspace_name, k, os.fsencode(value), expected_version=expect_version,
        expected_value=expected, expected_absent=expect_absent, sort=s))
    if as_json:
        click.echo(json.dumps({"version": version}))
    else:
        click.echo(f"ok (version {version})", err=True)


@kv.command("incr")
@click.argument("keyspace_name", metavar="KEYSPACE")
@click.argument("key")
@click.argument("delta", type=int, default=1)
@sort_option
@_common
def kv_incr(keyspace_name: str, key: str, delta: int, sort: str | None,
            nodes: tuple[str, ...], timeout_s: float, as_json: bool) -> None:
    """Add DELTA (default 1) to a counter in a strong keyspace; prints the new value."""
    k = os.fsencode(key)
    s = None if sort is None else os.fsencode(sort)
    value = _call(nodes, timeout_s, lambda c: c.incr(keyspace_name, k, delta, sort=s))
    click.echo(json.dumps({"value": value}) if as_json else str(value))


@kv.command("scan")
@click.argument("keyspace_name", metavar="KEYSPACE")
@click.argument("key")
@click.option("--start", default=None, help="First sort key (inclusive).")
@click.option("--end", default=None, help="Last sort key (exclusive).")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="At most this many rows [default: all].")
@consistency_option
@_common
def kv_scan(keyspace_name: str, key: str, start: str | None, end: str | None,
            limit: int | None, consistency: str | None, nodes: tuple[str, ...],
            timeout_s: float, as_json: bool) -> None:
    """Print the rows of partition KEY in sort-key order: SORT<TAB>VALUE per line."""
    lo = None if start is None else os.fsencode(start)
    hi = None if end is None else os.fsencode(end)
    rows = _call(nodes, timeout_s, lambda c: c.scan(keyspace_name, os.fsencode(key), start=lo,
                                                     end=hi, limit=limit,
                                                     consistency=consistency))
    if as_json:
        out = []
        for r in rows:
            sort_key, value = _text_or_b64(r.sort), _text_or_b64(r.value)
            out.append({"sort": sort_key["text"], "sort_b64": sort_key["b64"],
                        "value": value["text"], "value_b64": value["b64"], "hlc": r.hlc,
                        "expires_at_ms": r.expires_at_ms})
        click.echo(json.dumps(out, indent=2))
        return
    for r in rows:
        click.echo(f"{_shown(r.sort)}\t{_shown(r.value)}")


@kv.command("watch")
@click.argument("keyspace_name", metavar="KEYSPACE")
@click.argument("key")
@sort_option
@click.option("--prefix", is_flag=True, help="Every key whose partition key starts with KEY.")
@click.option("--since-version", type=click.IntRange(min=0), default=0,
              help="One key: only versions above this one.")
@click.option("--count", type=click.IntRange(min=1), default=None,
              help="Stop after this many changes [default: run until interrupted].")
@_common
def kv_watch(keyspace_name: str, key: str, sort: str | None, prefix: bool,
             since_version: int, count: int | None, nodes: tuple[str, ...],
             timeout_s: float, as_json: bool) -> None:
    """Print each change of KEY (strong keyspaces), first its current value: one line per
    change, KEY<TAB>VERSION<TAB>VALUE (or ``(deleted)``), or JSON lines with --json."""
    k = os.fsencode(key)
    s = None if sort is None else os.fsencode(sort)

    async def follow(client: AsyncClient) -> None:
        seen = 0
        async for change in client.watch(keyspace_name, k, sort=s, prefix=prefix,
                                         since_version=since_version):
            if as_json:
                out = {"key": _text_or_b64(change.key)["text"],
                       "key_b64": _text_or_b64(change.key)["b64"],
                       "version": change.version, "deleted": change.value is None,
                       "value": None if change.value is None
                       else _text_or_b64(change.value)["text"],
                       "value_b64": None if change.value is None
                       else _text_or_b64(change.value)["b64"]}
                click.echo(json.dumps(out))
            else:
                shown = "(deleted)" if change.value is None else _shown(change.value)
                click.echo(f"{_shown(change.key)}\t{change.version}\t{shown}")
            sys.stdout.flush()
            seen += 1
            if count is not None and seen >= count:
                return

    try:
        _call(nodes, timeout_s, follow)
    except KeyboardInterrupt:
        pass
