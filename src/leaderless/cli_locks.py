"""``leaderless lock ...``: leases with fencing tokens from the shell.

    leaderless lock acquire backup --ttl 30 [--wait 60] [--owner me]   # prints the token
    leaderless lock renew backup --owner me --token 7 [--ttl 30]
    leaderless lock release backup --owner me --token 7
    leaderless lock status backup

A shell script holds a lock by acquiring with an ``--owner`` it chose, renewing before the
TTL runs out, and passing ``--fence backup:TOKEN`` to ``kv put``/``kv delete`` made under it.

Exit codes as for ``kv`` (see ``cli_kv``), plus 8: the lock is held by someone else
(``acquire``), or this lease is no longer the lock's current one (``renew``, ``release``,
a fenced write).
"""

from __future__ import annotations

import json

import click

from leaderless.cli_kv import _call, _common
from leaderless.client.locks import Lease


@click.group()
def lock() -> None:
    """Acquire, renew, release and inspect locks (leases with fencing tokens)."""


_owner = click.option("--owner", help="The holder's id (default for acquire: a random one, "
                      "printed; renew and release need the same).")
_ttl = click.option("--ttl", type=click.FloatRange(min=0.1, max=86400), default=10.0,
                    show_default=True, help="Lease length in seconds.")


@lock.command("acquire")
@click.argument("name")
@_ttl
@click.option("--wait", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Seconds to wait for the lock to be released or expire.")
@_owner
@_common
def lock_acquire(name: str, ttl: float, wait: float, owner: str | None,
                 nodes: tuple[str, ...], timeout_s: float, as_json: bool) -> None:
    """Take lock NAME; prints its fencing token (stdout) and owner."""
    lease = _call(nodes, timeout_s + wait,
                  lambda c: c.acquire(name, ttl, wait=wait, owner=owner))
    if as_json:
        click.echo(json.dumps({"name": name, "owner": lease.owner, "token": lease.token,
                               "ttl_s": lease.ttl_s}))
    else:
        click.echo(lease.token)
        click.echo(f"granted lock {name!r} to {lease.owner} with token {lease.token} for "
                   f"{ttl:g} s", err=True)


@lock.command("renew")
@click.argument("name")
@click.option("--owner", required=True, help="The holder's id given at acquire.")
@click.option("--token", type=click.IntRange(min=0), required=True)
@_ttl
@_common
def lock_renew(name: str, owner: str, token: int, ttl: float, nodes: tuple[str, ...],
               timeout_s: float, as_json: bool) -> None:
    """Extend the lease TOKEN of lock NAME by --ttl seconds from now."""
    lease = Lease(name, owner, token, ttl, 0.0)
    _call(nodes, timeout_s, lambda c: c.renew(lease, ttl))
    click.echo(json.dumps({"name": name, "token": token, "ttl_s": ttl}) if as_json else
               f"renewed lease {token} of {name!r} for {ttl:g} s")


@lock.command("release")
@click.argument("name")
@click.option("--owner", required=True, help="The holder's id given at acquire.")
@click.option("--token", type=click.IntRange(min=0), required=True)
@_common
def lock_release(name: str, owner: str, token: int, nodes: tuple[str, ...],
                 timeout_s: float, as_json: bool) -> None:
    """Free lock NAME if TOKEN is still its lease."""
    lease = Lease(name, owner, token, 1.0, 0.0)
    _call(nodes, timeout_s, lambda c: c.release(lease))
    click.echo(json.dumps({"name": name, "released": token}) if as_json else
               f"released lease {token} of {name!r}")


@lock.command("status")
@click.argument("name")
@_common
def lock_status(name: str, nodes: tuple[str, ...], timeout_s: float, as_json: bool) -> None:
    """Who holds lock NAME, with which token, for how long."""
    info = _call(nodes, timeout_s, lambda c: c.lock_status(name))
    if as_json:
        click.echo(json.dumps({"name": name, "held": info.held, "holder": info.holder,
                               "token": info.token, "expires_in_ms": info.expires_in_ms}))
    elif info.held:
        click.echo(f"{name}: held by {info.holder} with token {info.token}, lease ends in "
                   f"{info.expires_in_ms / 1000:.1f} s")
    else:
        click.echo(f"{name}: free (last token {info.token})")
