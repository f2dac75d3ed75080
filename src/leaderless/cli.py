"""The ``leaderless`` command.

    leaderless node start [--name N] [--bind HOST:PORT] [--join SEED[,SEED]]
                          [--client HOST:PORT] [--http HOST:PORT] ...
    leaderless up --nodes 3
    leaderless keyspace create NAME [--replication 3]
    leaderless kv put|get|delete|scan KEYSPACE KEY ... [--consistency QUORUM]
    leaderless members --node HOST:PORT [--json]
    leaderless status --node HOST:PORT [--json]
    leaderless event send NAME PAYLOAD --node HOST:PORT [--json]
    leaderless event watch --node HOST:PORT [--json]
    leaderless doctor [--node HOST:PORT] [--json]
    leaderless node decommission|set-capacity W|cleanup [--node HOST:PORT] [--json]
    leaderless ring status [--node HOST:PORT] [--json] [--watch]
    leaderless task submit|status|cancel|list ... [--json]

Exit codes: 0 success; 1 the node is unreachable, refused the request or failed while
running; 2 invalid configuration or usage; 3 the node cannot start here (port in use,
data directory not writable or locked).
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
import msgspec
from rich.console import Console
from rich.table import Table

from leaderless import __version__
from leaderless.api.client import ApiError, Client, NodeUnreachableError
from leaderless.api.messages import EventNotification, MemberInfo
from leaderless.cli_certs import client_ssl_from_env
from leaderless.config import DEFAULT_BIND, LOG_FORMATS, LOG_LEVELS, ConfigError, load_config
from leaderless.config import parse_host_port as _parse_host_port
from leaderless.core.messages import Address
from leaderless.runtime.node import payload_text
from leaderless.runtime.process import EXIT_CONFIG, EXIT_FATAL, run, run_node

T = TypeVar("T")
STATE_STYLES = {"alive": "green", "suspect": "yellow", "dead": "red", "left": "dim"}

node_option = click.option(
    "--node", "node", default=DEFAULT_BIND, show_default=True, metavar="HOST:PORT",
    help="The node to ask (any node: all are equal).")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")


def _fail(message: str, code: int = EXIT_FATAL) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _address(text: str) -> Address:
    try:
        return _parse_host_port(text)
    except ValueError as exc:
        _fail(f"--node: {text!r} {exc}", EXIT_CONFIG)


def _call(node: str, action: Callable[[Client], Awaitable[T]],
          timeout_s: float | None = None) -> T:
    """Run one client action against ``node``, turning failures into clear exits. A TLS
    cluster: ``LEADERLESS_TLS_CA``, ``_CERT``, ``_KEY`` (``cli_certs``)."""
    context = client_ssl_from_env()
    options: dict[str, Any] = {} if timeout_s is None else {"timeout_s": timeout_s}

    async def go() -> T:
        async with Client(_address(node), ssl_context=context, **options) as client:
            return await action(client)

    try:
        return run(go())
    except NodeUnreachableError as exc:
        _fail(str(exc))
    except ApiError as exc:
        _fail(f"the node refused: {exc}")
    except (OSError, TimeoutError, ConnectionError) as exc:
        _fail(f"lost the connection to {node}: {exc or type(exc).__name__}")


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=None if isinstance(value, dict) else 2))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="leaderless")
def main() -> None:
    """leaderless: a cluster in which every node is equal."""


# -- node ---------------------------------------------------------------------------------


@main.group()
def node() -> None:
    """Run a node."""


SECURITY_FLAGS = {
    "tls_ca": "tls.ca", "tls_cert": "tls.cert", "tls_key": "tls.key",
    "auth_enabled": "auth.enabled",
    "admin_password_file": "auth.admin_password_file", "gossip_keyring": "gossip.keyring",
    "encryption_key_file": "encryption.key_file",
}
"""``node start`` flags whose settings live in a TOML table (``--tls-ca`` is ``[tls] ca``)."""


@node.command("start")
@click.option("--config", "config_file", metavar="FILE", help="TOML file with settings "
              "(lowest precedence; also $LEADERLESS_CONFIG).")
@click.option("--name", help="Unique node name [default: <hostname>-<port>].")
@click.option("--bind", metavar="HOST:PORT", help=f"UDP and TCP address [default: {DEFAULT_BIND}].")
@click.option("--advertise", metavar="HOST:PORT",
              help="Address other nodes use to reach this one [default: --bind].")
@click.option("--join", multiple=True, metavar="SEED[,SEED]",
              help="Seed nodes to join (repeatable). Without it: a new cluster of one.")
@click.option("--data-dir", metavar="DIR",
              help="Where the node keeps its state [default: ~/.local/share/leaderless/NAME].")
@click.option("--zone", help="Failure zone (rack, availability zone) of this node.")
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE", help="Metadata (repeatable).")
@click.option("--weight", type=float, help="Capacity weight, (0, 1000] [default: 1].")
@click.option("--client", metavar="HOST:PORT",
              help="Listen for native clients (data: leaderless.client, `leaderless kv`).")
@click.option("--http", metavar="HOST:PORT", help="Listen for the HTTP/JSON API.")
@click.option("--storage", type=click.Choice(("rocksdb", "memory")),
              help="Storage engine; memory loses everything on exit [default: rocksdb].")
@click.option("--fsync", type=click.Choice(("always", "interval")),
              help="always: acknowledge writes after their fsync (group commit); interval: "
              "fsync every --fsync-interval-ms, faster, may lose that much on a machine "
              "crash [default: always].")
@click.option("--fsync-interval-ms", type=float, help="[default: 100]")
@click.option("--value-bytes-max", type=int, help="Largest value [default: 1048576].")
@click.option("--log-format", type=click.Choice(LOG_FORMATS), help="[default: json]")
@click.option("--log-level", type=click.Choice(LOG_LEVELS), help="[default: info]")
@click.option("--tls-ca", metavar="FILE", help="Cluster CA certificate: TLS on every port "
              "(with --tls-cert and --tls-key; see `leaderless certs`).")
@click.option("--tls-cert", metavar="FILE", help="This node's certificate.")
@click.option("--tls-key", metavar="FILE", help="This node's private key.")
@click.option("--auth", "auth_enabled", is_flag=True, default=None,
              help="Require a token from clients and check roles (see `leaderless login`).")
@click.option("--admin-password-file", metavar="FILE",
              help="With --auth: the bootstrap admin's password [default: random, printed once].")
@click.option("--gossip-keyring", metavar="FILE",
              help="Base64 AES-256 keys, one per line, first primary: gossip is encrypted.")
@click.option("--encryption-key-file", metavar="FILE",
              help="Data keys: values are encrypted at rest (or LEADERLESS_ENCRYPTION_KEY).")
@click.option("--replace", metavar="NAME",
              help="Take over the tokens of this dead member and stream its data first.")
@click.option("--tasks", "task_modules", multiple=True, metavar="MODULE",
              help="Run tasks by name from this Python module (repeatable; [tasks] modules).")
@click.option("--no-bootstrap", "no_bootstrap", is_flag=True, default=False,
              help="Serve this node's ranges at once instead of streaming them first: only "
                   "for the first members of a new cluster (they hold no data yet).")
@click.option("--parent-pid", type=int, hidden=True,
              help="Leave when this process is no longer our parent (used by `leaderless up`).")
def node_start(config_file: str | None, parent_pid: int | None, **flags: Any) -> None:
    """Start a node and serve until SIGTERM or Ctrl-C (then leave gracefully)."""
    flags["join"] = list(flags["join"])
    if flags.pop("no_bootstrap"):
        flags["ring.bootstrap"] = False
    flags["tags"] = list(flags["tags"])
    flags["tasks.modules"] = list(flags.pop("task_modules"))
    for flag, key in SECURITY_FLAGS.items():
        flags[key] = flags.pop(flag)
    try:
        config = load_config(flags, config_file=config_file)
    except ConfigError as exc:
        _fail(str(exc), EXIT_CONFIG)
    sys.exit(run_node(config, parent_pid=parent_pid))


# -- up -----------------------------------------------------------------------------------


@main.command()
@click.option("--nodes", type=click.IntRange(1, 64), default=3, show_default=True,
              help="How many nodes to start.")
@click.option("--base-port", type=click.IntRange(1, 65535), default=7946, show_default=True,
              help="First port to try; taken ports (UDP or TCP) are skipped.")
@click.option("--data-dir", default="data", show_default=True, metavar="DIR",
              help="Each node keeps its state and log in DIR/<name>/.")
@json_option
def up(nodes: int, base_port: int, data_dir: str, as_json: bool) -> None:
    """Run a local cluster on 127.0.0.1 and show its members live (Ctrl-C stops it).
    With --json: a JSON object per change, {"ts", "members": [...]}, one per line."""
    from leaderless.runtime.supervisor import run_up

    try:
        # Without a terminal rich assumes 80 columns; the table needs a little more.
        console = Console() if sys.stdout.isatty() else Console(width=120)
        code = run_up(nodes, base_port, Path(data_dir).resolve(), console, as_json)
    except OSError as exc:
        _fail(str(exc))
    sys.exit(code)


# -- members and status ------------------------------------------------------------------


def member_dict(member: MemberInfo) -> dict[str, Any]:
    """The JSON shape of a member: name, address, state, incarnation, zone, weight, tags,
    changed_at (unix seconds), load (``{cpu_pct, mem_pct, disk_pct, ops_per_s, p99_ms}`` as
    the member last gossiped it, or null)."""
    data = msgspec.structs.asdict(member)
    if member.load is not None:
        data["load"] = msgspec.structs.asdict(member.load)
    return data


def _ago(unix_s: float) -> str:
    seconds = max(0, int(time.time() - unix_s))
    same_day = time.localtime(unix_s)[:3] == time.localtime()[:3]
    clock = time.strftime("%H:%M:%S" if same_day else "%Y-%m-%d %H:%M:%S",
                          time.localtime(unix_s))
    if seconds < 120:
        return f"{clock} ({seconds}s ago)"
    if seconds < 7200:
        return f"{clock} ({seconds // 60}m ago)"
    return f"{clock} ({seconds // 3600}h ago)"


@main.command()
@node_option
@json_option
def members(node: str, as_json: bool) -> None:
    """List the members a node knows, with their states."""
    found = _call(node, lambda c: c.members())
    if as_json:
        _print_json([member_dict(m) for m in found])
        return
    table = Table(title=f"members seen by {node}")
    for column in ("name", "address", "state", "incarnation", "zone", "last change"):
        table.add_column(column)
    for m in found:
        style = STATE_STYLES.get(m.state, "")
        table.add_row(m.name, m.address, f"[{style}]{m.state}[/]", str(m.incarnation),
                      m.zone, _ago(m.changed_at))
    Console().print(table)


@main.command()
@node_option
@json_option
def status(node: str, as_json: bool) -> None:
    """A node's identity, member counts and counters."""
    reply = _call(node, lambda c: c.status())
    data = msgspec.structs.asdict(reply)
    if as_json:
        _print_json(data)
        return
    console = Console()
    console.print(f"[bold]{reply.name}[/] at {reply.address}, incarnation {reply.incarnation}, "
                  f"version {reply.version}, up {reply.uptime_s:.0f} s")
    console.print("members: " + ", ".join(f"{n} {s}" for s, n in sorted(reply.states.items())))
    console.print(f"pending broadcasts: {reply.pending_broadcasts}")
    for name, kinds in reply.runtime.items():
        if kinds and name != "kv":
            console.print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in sorted(kinds.items())))
    members = _call(node, lambda c: c.members())
    table = Table(title="cluster (load as each member last gossiped it)")
    for column in ("name", "state", "zone", "cpu %", "mem %", "disk %", "ops/s", "p99 ms"):
        table.add_column(column, justify="left" if column in ("name", "state", "zone")
                         else "right")
    for m in sorted(members, key=lambda m: m.name):
        load = m.load
        cells = (["-"] * 5 if load is None else
                 [str(load.cpu_pct), str(load.mem_pct), str(load.disk_pct),
                  str(load.ops_per_s), f"{load.p99_ms:g}"])
        table.add_row(m.name, m.state, m.zone or "-", *cells)
    console.print(table)


# -- logs ---------------------------------------------------------------------------------


@main.command()
@click.option("--node", "node", default="127.0.0.1:7500", show_default=True, metavar="HOST:PORT",
              help="The node's HTTP address (its --http listener).")
@click.option("--lines", "lines", type=click.IntRange(1, 5000), default=50, show_default=True,
              help="How many of the most recent lines to show first.")
@click.option("--level", type=click.Choice(["debug", "info", "warning", "error"]),
              help="Only this level and above.")
@click.option("--component", help="Only this component (e.g. kv, membership, api).")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines until Ctrl-C.")
@json_option
def logs(node: str, lines: int, level: str | None, component: str | None, follow: bool,
         as_json: bool) -> None:
    """Show a node's recent log lines (kept in its memory; the full log is its stderr)."""
    since = 0
    limit = lines
    context = client_ssl_from_env()  # a TLS cluster serves HTTPS
    scheme = "http" if context is None else "https"
    try:
        while True:
            query = urllib.parse.urlencode(
                {k: v for k, v in (("since", since), ("limit", limit), ("level", level),
                                   ("component", component)) if v})
            try:
                with urllib.request.urlopen(f"{scheme}://{node}/api/logs?{query}",
                                            timeout=10, context=context) as response:
                    answer = json.loads(response.read())
            except urllib.error.HTTPError as err:
                _fail(f"{node} refused: {err.read().decode(errors='replace')[:300]}",
                      EXIT_FATAL)
            except (urllib.error.URLError, OSError) as err:
                _fail(f"cannot reach {node}: {getattr(err, 'reason', err)}; is it the "
                      "node's --http address?", EXIT_FATAL)
            for line in answer["lines"]:
                if as_json:
                    click.echo(json.dumps(line))
                else:
                    fields = " ".join(f"{k}={v}" for k, v in line.items() if k not in
                                      ("seq", "ts", "level", "node", "component", "msg"))
                    clock = time.strftime("%H:%M:%S", time.localtime(line.get("ts", 0)))
                    click.echo(f"{clock} {line.get('level', ''):<7} {line.get('node', '')} "
                               f"{line.get('component', '')} {line.get('msg', '')} "
                               f"{fields}".rstrip())
            since, limit = answer["next"], 5000
            if not follow:
                return
            sys.stdout.flush()
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass


# -- events -------------------------------------------------------------------------------


@main.group()
def event() -> None:
    """Send and watch user events (a name and a payload of up to 512 bytes)."""


@event.command("send")
@click.argument("name")
@click.argument("payload", default="")
@node_option
@json_option
def event_send(name: str, payload: str, node: str, as_json: bool) -> None:
    """Broadcast event NAME with PAYLOAD (up to 512 bytes) from a node to the cluster."""
    # fsencode: arguments that are not valid UTF-8 reach us surrogate-escaped; send the
    # bytes the user gave.
    reply = _call(node, lambda c: c.send_event(name, os.fsencode(payload)))
    if as_json:
        _print_json({"name": name, "origin": reply.origin, "ltime": reply.ltime})
    else:
        click.echo(f"sent {name!r} from {reply.origin} (ltime {reply.ltime})")


def event_dict(e: EventNotification) -> dict[str, Any]:
    """The JSON shape of a delivered event (same fields as the node's user_event log)."""
    payload, encoding = payload_text(e.payload)
    return {"name": e.name, "origin": e.origin, "ltime": e.ltime, "payload": payload,
            "payload_encoding": encoding}


@event.command("watch")
@node_option
@json_option
def event_watch(node: str, as_json: bool) -> None:
    """Print every user event the node delivers, as it happens, until Ctrl-C.
    With --json: one JSON object per line."""

    async def watch(client: Client) -> None:
        stream = await client.watch_events()
        # On stderr even with --json: tells a reader (or a test) that the watch is live.
        click.echo(f"watching events on {node} (Ctrl-C to stop)", err=True)
        async for e in stream:
            if as_json:
                click.echo(json.dumps(event_dict(e)))
            else:
                payload, _ = payload_text(e.payload)
                click.echo(f"{e.name} from {e.origin} (ltime {e.ltime}): {payload}")
            sys.stdout.flush()

    try:
        _call(node, watch)
    except KeyboardInterrupt:
        pass


from leaderless.cli_kv import keyspace, kv  # noqa: E402  (registered last: see cli_kv.py)
from leaderless.cli_locks import lock  # noqa: E402

main.add_command(keyspace); main.add_command(kv); main.add_command(lock)  # noqa: E702
from leaderless.cli_auth import COMMANDS as AUTH_COMMANDS  # noqa: E402, I001

for _auth_command in AUTH_COMMANDS:
    main.add_command(_auth_command)
from leaderless.cli_encryption import encryption; main.add_command(encryption)  # noqa: E402, E702, I001
from leaderless.cli_keyring import keyring; main.add_command(keyring)  # noqa: E402, E702, I001
from leaderless.cli_certs import certs; main.add_command(certs)  # noqa: E402, E702, I001
from leaderless.cli_doctor import doctor; main.add_command(doctor)  # noqa: E402, E702, I001
from leaderless.cli_chaos import chaos; main.add_command(chaos)  # noqa: E402, E702, I001
from leaderless.cli_ring import register as _register_ring; _register_ring(main, node)  # noqa: E402, E702, I001
from leaderless.cli_tasks import task; main.add_command(task)  # noqa: E402, E702, I001
