"""``leaderless login``, ``logout``, ``whoami``, ``user ...``, ``role ...`` and ``token ...``:
users, roles and tokens of a cluster started with ``--auth``, from the shell.

    leaderless login [--user admin]          # prompts for the password (and a TOTP code)
    leaderless whoami
    leaderless user create alice --role readers     # prompts for alice's password
    leaderless user grant alice writers
    leaderless user totp-enable alice         # prints the otpauth:// URI once
    leaderless role create tenant-a
    leaderless role grant tenant-a write tenant_a_data [--prefix users/]
    leaderless token create ci-bot --name deploy --ttl 86400   # prints the token
    leaderless token revoke TOKEN_ID
    leaderless logout

``login`` stores the token in ``$XDG_CONFIG_HOME/leaderless/token`` (default
``~/.config/leaderless/token``), readable by you only (0600). Every client command
(``kv``, ``keyspace``, ``lock``, these) sends a token, the first of: ``--token``,
``$LEADERLESS_TOKEN``, that file. Passwords are prompted for (never taken as arguments, so
they stay out of shell history and ``ps``); ``--password-stdin`` reads one line from stdin
for scripts.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from leaderless.cli_certs import client_ssl_from_env
from leaderless.cli_kv import TOKEN_META, _common, _fail, _nodes, exit_code_for
from leaderless.client.async_client import AsyncClient
from leaderless.client.errors import LeaderlessError, TotpRequiredError, UnauthenticatedError
from leaderless.durable_files import write_atomically
from leaderless.runtime.process import EXIT_CONFIG, run

T = TypeVar("T")
TOKEN_ENV = "LEADERLESS_TOKEN"
TOKEN_FILE_NAME = "token"


# -- the stored token ---------------------------------------------------------------------


def token_path() -> Path:
    """``$XDG_CONFIG_HOME/leaderless/token`` (XDG default: ``~/.config``)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "leaderless" / TOKEN_FILE_NAME


def store_token(token: str) -> Path:
    """Write the token readable and writable by its owner only (0600; directory 0700)."""
    path = token_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomically(path, token.encode() + b"\n", 0o600)
    return path


def forget_token() -> None:
    try:
        token_path().unlink()
    except FileNotFoundError:
        pass


def client_token(given: str | None = None) -> str | None:
    """The token a client command sends: ``--token``, else ``$LEADERLESS_TOKEN``, else the
    one ``leaderless login`` stored (None: none anywhere)."""
    if given:
        return given.strip()
    env = os.environ.get(TOKEN_ENV, "").strip()
    if env:
        return env
    try:
        stored = token_path().read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        _fail(f"cannot read the stored token {token_path()}: {exc.strerror or exc}; "
              f"log in again or pass --token", EXIT_CONFIG)
    return stored or None


def context_token() -> str | None:
    """The token of the running command (``--token``, which ``cli_kv._common`` adds to
    every client command, else env or file)."""
    ctx = click.get_current_context(silent=True)
    given = ctx.meta.get(TOKEN_META) if ctx is not None else None
    return client_token(given)


# -- running a client ---------------------------------------------------------------------


def _with_client(nodes: tuple[str, ...], timeout_s: float,
                 action: Callable[[AsyncClient], Awaitable[T]], *,
                 token: str | None = None, authenticated: bool = True) -> T:
    """Run ``action`` on a client (with the command's token unless ``authenticated`` is
    False, as for ``login``); node errors become the CLI's exit codes."""
    addresses = _nodes(nodes)
    credential = token if token is not None else (context_token() if authenticated else None)
    context = client_ssl_from_env()  # a TLS cluster: LEADERLESS_TLS_CA

    async def go() -> T:
        client = AsyncClient(addresses, timeout_s=timeout_s, connections_per_node=1,
                             ring_refresh_s=0, token=credential, ssl_context=context)
        try:
            return await action(client)
        finally:
            await client.close()

    try:
        return run(go())
    except LeaderlessError as exc:
        hint = ("; log in with `leaderless login` (or pass --token)"
                if exc.code == "unauthenticated" else "")
        _fail(f"{exc}{hint}", exit_code_for(exc))


def _password(prompt: str, from_stdin: bool, confirm: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline().rstrip("\r\n")
        if not line:
            _fail("--password-stdin: stdin gave no password line", EXIT_CONFIG)
        return line
    return str(click.prompt(prompt, hide_input=True, confirmation_prompt=confirm))


password_stdin_option = click.option(
    "--password-stdin", is_flag=True,
    help="Read the password from the first line of stdin instead of prompting.")


def _when(unix_s: float) -> str:
    return datetime.datetime.fromtimestamp(unix_s).isoformat(sep=" ", timespec="seconds")


def _done(as_json: bool, text: str, **fields: Any) -> None:
    click.echo(json.dumps({"ok": True, **fields}) if as_json else text)


# -- login, logout, whoami ----------------------------------------------------------------


@click.command("login")
@click.option("--user", default=None, help="The user name [default: prompt].")
@click.option("--totp", default=None, metavar="CODE",
              help="The current TOTP code [default: prompt if the user has TOTP on].")
@password_stdin_option
@_common
def login(user: str | None, totp: str | None, password_stdin: bool, nodes: tuple[str, ...],
          timeout_s: float, as_json: bool) -> None:
    """Log in and store the token for later commands."""
    name = user or str(click.prompt("user"))
    password = _password("password", password_stdin, confirm=False)

    async def attempt(client: AsyncClient) -> tuple[str, float]:
        code = totp
        while True:
            try:
                token = await client.login(name, password, code)
            except TotpRequiredError:
                if code is not None or password_stdin or not sys.stdin.isatty():
                    raise
                code = str(click.prompt("TOTP code"))
                continue
            who = await client.whoami()
            return token, who.expires_at

    token, expires_at = _with_client(nodes, timeout_s, attempt, authenticated=False)
    path = store_token(token)
    _done(as_json, f"logged in as {name} until {_when(expires_at)} (token in {path})",
          user=name, expires_at=expires_at, token_file=str(path))


@click.command("logout")
@_common
def logout(nodes: tuple[str, ...], timeout_s: float, as_json: bool) -> None:
    """Revoke the token on the cluster and delete the stored copy."""
    token = context_token()
    if token is None:
        _fail("not logged in: no --token, $LEADERLESS_TOKEN or stored token", EXIT_CONFIG)

    async def revoke(client: AsyncClient) -> bool:
        try:
            await client.logout()
        except UnauthenticatedError:
            return False  # expired or revoked already: nothing left to revoke
        return True

    revoked = _with_client(nodes, timeout_s, revoke, token=token)
    forget_token()
    _done(as_json, "logged out (the token is revoked)" if revoked
          else "logged out (the token was no longer valid)", revoked=revoked)


@click.command("whoami")
@_common
def whoami(nodes: tuple[str, ...], timeout_s: float, as_json: bool) -> None:
    """Who the token names, its roles and expiry."""
    who = _with_client(nodes, timeout_s, lambda c: c.whoami())
    if as_json:
        click.echo(json.dumps({"user": who.user or None, "roles": who.roles,
                               "expires_at": who.expires_at, "auth": who.auth}))
    elif not who.auth:
        click.echo("authentication is off on this cluster" if context_token() is None
                   else "authentication is off on this cluster (the token is not needed)")
    else:
        click.echo(f"{who.user} (roles: {', '.join(who.roles) or 'none'}; token valid until "
                   f"{_when(who.expires_at)})")


# -- users --------------------------------------------------------------------------------


@click.group()
def user() -> None:
    """Create, delete and list users; their passwords, roles and TOTP (admins; a user may
    change its own password and TOTP)."""


@user.command("create")
@click.argument("name")
@click.option("--role", "roles", multiple=True, help="A role to give (repeatable).")
@password_stdin_option
@_common
def user_create(name: str, roles: tuple[str, ...], password_stdin: bool,
                nodes: tuple[str, ...], timeout_s: float, as_json: bool) -> None:
    """Create user NAME (prompts for its password)."""
    password = _password(f"password for {name}", password_stdin, confirm=True)
    _with_client(nodes, timeout_s, lambda c: c.create_user(name, password, roles))
    _done(as_json, f"user {name} created" + (f" with roles {', '.join(roles)}" if roles
                                             else ""), user=name, roles=list(roles))


@user.command("delete")
@click.argument("name")
@_common
def user_delete(name: str, nodes: tuple[str, ...], timeout_s: float, as_json: bool) -> None:
    """Delete user NAME (its tokens stop working)."""
    _with_client(nodes, timeout_s, lambda c: c.delete_user(name))
    _done(as_json, f"user {name} deleted", user=name)


@user.command("passwd")
@click.argument("name")
@password_stdin_option
@_common
def user_passwd(name: str, password_stdin: bool, nodes: tuple[str, ...], timeout_s: float,
                as_json: bool) -> None:
    """Set NAME's password (prompts for the new one)."""
    password = _password(f"new password for {name}", password_stdin, confirm=True)
    _with_client(nodes, timeout_s, lambda c: c.set_password(name, password))
    _done(as_json, f"password of {name} changed", user=name)


@user.command("list")
@_common
def user_list(nodes: tuple[str, ...], timeout_s: float, as_json: bool) -> None:
    """List users with their roles and whether TOTP is on."""
    users = _with_client(nodes, timeout_s, lambda c: c.list_users())
    rows: list[dict[str, Any]] = [{"name": u.name, "roles": list(u.roles), "totp": u.totp,
             "created_at": u.created_at} for u in sorted(users, key=lambda u: u.name)]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table()
    for column in ("name", "roles", "totp", "created"):
        table.add_column(column)
    for r in rows:
        table.add_row(r["name"], ", ".join(r["roles"]), "on" if r["totp"] else "off",
                      _when(r["created_at"]))
    Console().print(table)


@user.command("grant")
@click.argument("name")
@click.argument("role")
@_common
def user_grant(name: str, role: str, nodes: tuple[str, ...], timeout_s: float,
               as_json: bool) -> None:
    """Give user NAME the role ROLE."""
    _with_client(nodes, timeout_s, lambda c: c.grant_role(name, role))
    _done(as_json, f"user {name} has role {role}", user=name, role=role)


@user.command("revoke")
@click.argument("name")
@click.argument("role")
@_common
def user_revoke(name: str, role: str, nodes: tuple[str, ...], timeout_s: float,
                as_json: bool) -> None:
    """Take the role ROLE from user NAME."""
    _with_client(nodes, timeout_s, lambda c: c.revoke_role(name, role))
    _done(as_json, f"user {name} no longer has role {role}", user=name, role=role)


@user.command("totp-enable")
@click.argument("name")
@_common
def user_totp_enable(name: str, nodes: tuple[str, ...], timeout_s: float,
                     as_json: bool) -> None:
    """Turn on TOTP for NAME and print the otpauth:// URI for an authenticator app (it
    holds the secret: it is shown this once)."""
    uri = _with_client(nodes, timeout_s, lambda c: c.enable_totp(name))
    _done(as_json, uri, user=name, uri=uri)


@user.command("totp-disable")
@click.argument("name")
@_common
def user_totp_disable(name: str, nodes: tuple[str, ...], timeout_s: float,
                      as_json: bool) -> None:
    """Turn off TOTP for NAME."""
    _with_client(nodes, timeout_s, lambda c: c.disable_totp(name))
    _done(as_json, f"TOTP off for {name}", user=name)


# -- roles --------------------------------------------------------------------------------

LEVEL_CHOICE = click.Choice(("read", "write", "execute", "admin"))
prefix_option = click.option(
    "--prefix", default="", help="Only partition keys starting with this [default: all].")


@click.group()
def role() -> None:
    """Create roles and grant them read, write or admin on keyspaces and key prefixes
    (admins)."""


@role.command("create")
@click.argument("name")
@_common
def role_create(name: str, nodes: tuple[str, ...], timeout_s: float, as_json: bool) -> None:
    """Create role NAME (with no permissions yet)."""
    _with_client(nodes, timeout_s, lambda c: c.create_role(name))
    _done(as_json, f"role {name} created", role=name)


@role.command("delete")
@click.argument("name")
@_common
def role_delete(name: str, nodes: tuple[str, ...], timeout_s: float, as_json: bool) -> None:
    """Delete role NAME."""
    _with_client(nodes, timeout_s, lambda c: c.delete_role(name))
    _done(as_json, f"role {name} deleted", role=name)


@role.command("grant")
@click.argument("name")
@click.argument("level", type=LEVEL_CHOICE)
@click.argument("keyspace_name", metavar="KEYSPACE")
@prefix_option
@_common
def role_grant(name: str, level: str, keyspace_name: str, prefix: str,
               nodes: tuple[str, ...], timeout_s: float, as_json: bool) -> None:
    """Let role NAME do LEVEL (read, write, execute, admin) on KEYSPACE ('*': every keyspace)."""
    data = os.fsencode(prefix)
    _with_client(nodes, timeout_s, lambda c: c.role_grant(name, level, keyspace_name, data))
    _done(as_json, f"role {name}: {level} on {keyspace_name}"
          + (f" prefix {prefix!r}" if prefix else ""), role=name, level=level,
          keyspace=keyspace_name, prefix=prefix)


@role.command("revoke")
@click.argument("name")
@click.argument("level", type=LEVEL_CHOICE)
@click.argument("keyspace_name", metavar="KEYSPACE")
@prefix_option
@_common
def role_revoke(name: str, level: str, keyspace_name: str, prefix: str,
                nodes: tuple[str, ...], timeout_s: float, as_json: bool) -> None:
    """Remove the permission LEVEL on KEYSPACE (and --prefix) from role NAME."""
    data = os.fsencode(prefix)
    _with_client(nodes, timeout_s, lambda c: c.role_revoke(name, level, keyspace_name, data))
    _done(as_json, f"role {name}: no more {level} on {keyspace_name}"
          + (f" prefix {prefix!r}" if prefix else ""), role=name, level=level,
          keyspace=keyspace_name, prefix=prefix)


@role.command("list")
@_common
def role_list(nodes: tuple[str, ...], timeout_s: float, as_json: bool) -> None:
    """List roles with their permissions."""
    roles = _with_client(nodes, timeout_s, lambda c: c.list_roles())
    rows: list[dict[str, Any]] = [{"name": r.name, "grants": [
        {"level": g.level, "keyspace": g.keyspace, "prefix": os.fsdecode(g.prefix)}
        for g in r.grants]} for r in sorted(roles, key=lambda r: r.name)]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table()
    table.add_column("role")
    table.add_column("permissions")
    for r in rows:
        table.add_row(r["name"], "; ".join(
            f"{g['level']} on {g['keyspace']}" + (f" prefix {g['prefix']!r}" if g["prefix"]
                                                 else "") for g in r["grants"]) or "none")
    Console().print(table)


# -- API tokens ---------------------------------------------------------------------------


@click.group()
def token() -> None:
    """Create and revoke API tokens: long-lived tokens for programs (no TOTP)."""


@token.command("create")
@click.argument("user_name", metavar="USER")
@click.option("--name", "token_name", required=True, help="What the token is for.")
@click.option("--ttl", "ttl_s", type=click.FloatRange(min=1), default=30 * 86400.0,
              show_default=True, metavar="SECONDS", help="How long it is valid.")
@_common
def token_create(user_name: str, token_name: str, ttl_s: float, nodes: tuple[str, ...],
                 timeout_s: float, as_json: bool) -> None:
    """Create an API token for USER and print it (shown this once; pass it to programs
    as token= or $LEADERLESS_TOKEN)."""
    issued = _with_client(nodes, timeout_s,
                          lambda c: c.create_api_token(user_name, token_name, ttl_s))
    if as_json:
        click.echo(json.dumps({"token": issued.token, "token_id": issued.token_id,
                               "user": issued.user, "expires_at": issued.expires_at}))
        return
    click.echo(issued.token)
    click.echo(f"token id {issued.token_id} for {issued.user}, valid until "
               f"{_when(issued.expires_at)}", err=True)


@token.command("revoke")
@click.argument("token_id")
@_common
def token_revoke(token_id: str, nodes: tuple[str, ...], timeout_s: float,
                 as_json: bool) -> None:
    """Revoke the token with id TOKEN_ID."""
    _with_client(nodes, timeout_s, lambda c: c.revoke_token(token_id))
    _done(as_json, f"token {token_id} revoked", token_id=token_id)


COMMANDS = (login, logout, whoami, user, role, token)
"""Registered on the ``leaderless`` group by ``cli``."""
