"""``leaderless keyring ...``: the gossip encryption keys, made and rotated from the shell.

    leaderless keyring generate                     # prints a new base64 key
    leaderless keyring list    [--node HOST:PORT]   # key ids, on how many nodes each
    leaderless keyring install KEY [--node HOST:PORT]
    leaderless keyring use     KEY [--node HOST:PORT]
    leaderless keyring remove  KEY [--node HOST:PORT]

The asked node applies the change and sends it on to every alive member; the command
prints on how many nodes it took and which failed. Rotation without downtime: install the
new key, use it, then remove the old one (each step on every node before the next).
KEY may be ``-`` to read it from stdin (keeps it out of the shell history). On a cluster
with TLS, set ``LEADERLESS_TLS_CA``, ``LEADERLESS_TLS_CERT`` and ``LEADERLESS_TLS_KEY`` (a
client certificate: the node port is mutual TLS).

Exit codes: 0 every node applied it; 1 the node is unreachable, refused, or some node
failed (listed on stderr); 2 invalid usage.
"""

from __future__ import annotations

import collections
import json
import sys
from typing import Any, NoReturn

import click

from leaderless.api.messages import KeyringOperation, KeyringReply
from leaderless.config import DEFAULT_BIND
from leaderless.runtime.process import EXIT_CONFIG, EXIT_FATAL
from leaderless.security.keyring import KeyringError, decode_key, generate_key, key_id_text

KEYRING_TIMEOUT_S = 30.0
"""The asked node waits up to its io_timeout_s (5 s) for every member at once; 30 s
leaves room for a slow member without hanging a script forever."""
PAST_TENSE = {"install": "installed", "use": "now primary", "remove": "removed"}

_node = click.option("--node", "node", default=DEFAULT_BIND, show_default=True,
                     metavar="HOST:PORT", help="The node to ask (its node port; any node).")
_json = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
_timeout = click.option("--timeout", "timeout_s", type=click.FloatRange(min=0.1),
                        default=KEYRING_TIMEOUT_S, show_default=True,
                        help="Seconds to wait for the cluster's answers.")


def _fail(message: str, code: int = EXIT_FATAL) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _ask(node: str, timeout_s: float, operation: KeyringOperation, key: str = ""
         ) -> KeyringReply:
    # The CLI's node-port call (TLS from LEADERLESS_TLS_*, clear exits); imported here
    # because leaderless.cli imports this module to register the group.
    from leaderless.cli import _call

    return _call(node, lambda client: client.keyring(operation, key), timeout_s)


def _read_key(key: str) -> str:
    """The key argument (``-``: the first line of stdin), checked before anything is sent."""
    if key == "-":
        key = sys.stdin.readline()
    try:
        decode_key(key, "KEY")
    except KeyringError as exc:
        _fail(str(exc), EXIT_CONFIG)
    return key.strip()


def _failures(reply: KeyringReply) -> list[dict[str, str]]:
    return [{"node": r.node, "error": r.error} for r in reply.results if not r.ok]


def _report_failures(failed: list[dict[str, str]]) -> None:
    for failure in failed:
        click.echo(f"  {failure['node']}: {failure['error']}", err=True)


@click.group()
def keyring() -> None:
    """Gossip encryption keys: generate, list, install, use (make primary), remove."""


@keyring.command("generate")
def keyring_generate() -> None:
    """Print a new random AES-256 key (base64), for a keyring file or `install`."""
    click.echo(generate_key())


@keyring.command("list")
@_node
@_timeout
@_json
def keyring_list(node: str, timeout_s: float, as_json: bool) -> None:
    """Every key in the cluster by id (never the key), on how many nodes it is installed
    and on how many it is the primary."""
    reply = _ask(node, timeout_s, "list")
    answered = [r for r in reply.results if r.ok]
    installed: collections.Counter[str] = collections.Counter()
    primary: collections.Counter[str] = collections.Counter()
    for result in answered:
        installed.update(result.key_ids)
        if result.key_ids:
            primary[result.key_ids[0]] += 1
    keys = [{"id": kid, "installed": n, "primary": primary[kid]}
            for kid, n in sorted(installed.items(), key=lambda kv: (-primary[kv[0]], kv[0]))]
    failed = _failures(reply)
    if as_json:
        click.echo(json.dumps({"nodes": len(reply.results), "answered": len(answered),
                               "keys": keys, "failed": failed}))
    else:
        click.echo(f"{len(answered)}/{len(reply.results)} nodes answered")
        for k in keys:
            role = f", primary on {k['primary']}" if k["primary"] else ""
            click.echo(f"  {k['id']}  installed on {k['installed']}/{len(answered)}{role}")
        _report_failures(failed)
    if failed:
        sys.exit(EXIT_FATAL)


def _change(operation: KeyringOperation, key: str, node: str, timeout_s: float,
            as_json: bool) -> None:
    key = _read_key(key)
    reply = _ask(node, timeout_s, operation, key)
    done = sum(r.ok for r in reply.results)
    failed = _failures(reply)
    kid = key_id_text(decode_key(key))
    if as_json:
        out: dict[str, Any] = {"operation": operation, "key_id": kid, "ok": done,
                               "nodes": len(reply.results), "failed": failed}
        click.echo(json.dumps(out))
    else:
        click.echo(f"key {kid} {PAST_TENSE[operation]} on {done}/{len(reply.results)} nodes")
        _report_failures(failed)
    if failed:
        sys.exit(EXIT_FATAL)


@keyring.command("install")
@click.argument("key")
@_node
@_timeout
@_json
def keyring_install(key: str, node: str, timeout_s: float, as_json: bool) -> None:
    """Add KEY to every node's keyring (they can then open datagrams sealed with it)."""
    _change("install", key, node, timeout_s, as_json)


@keyring.command("use")
@click.argument("key")
@_node
@_timeout
@_json
def keyring_use(key: str, node: str, timeout_s: float, as_json: bool) -> None:
    """Make KEY the primary on every node (seal with it); it must be installed first."""
    _change("use", key, node, timeout_s, as_json)


@keyring.command("remove")
@click.argument("key")
@_node
@_timeout
@_json
def keyring_remove(key: str, node: str, timeout_s: float, as_json: bool) -> None:
    """Remove KEY from every node's keyring; refused where it is the primary."""
    _change("remove", key, node, timeout_s, as_json)
