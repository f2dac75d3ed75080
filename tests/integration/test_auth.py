"""Authentication and authorization on real processes: a 3-node cluster started with
``--auth --admin-password-file``, driven through the native client, HTTP and the CLI."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import stat
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pyotp
import pytest

from leaderless.client import AsyncClient
from leaderless.client.errors import (
    BadCredentialsError,
    PermissionDeniedError,
    TotpRequiredError,
    UnauthenticatedError,
)
from tests.integration.helpers import LEADERLESS, Processes, clean_env, wait_until
from tests.integration.test_ops import start_ready_cluster

pytestmark = pytest.mark.integration

ADMIN_PASSWORD = "correct horse battery staple"
PASSWORD = "a long enough passphrase"
SECRET = b"tenant-b-secret-value"


def http(method: str, url: str, body: dict[str, Any] | None = None,
         token: str | None = None) -> tuple[int, Any]:
    """(status, decoded JSON body or None)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            raw, status = response.read(), response.status
    except urllib.error.HTTPError as err:
        raw, status = err.read(), err.code
    except (urllib.error.URLError, ConnectionError):
        return 0, None
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, None


async def set_up_tenants(admin: AsyncClient) -> None:
    """Keyspaces ``shared``, ``tenant_a``, ``tenant_b``; role ``reader`` (read on shared)
    and ``tenant-a``/``tenant-b`` (write on their own); users reader1 and carol (reader),
    alice (tenant-a) and bob (tenant-b), each with ``PASSWORD``; a value in shared and
    ``SECRET`` in tenant_b."""
    for name in ("shared", "tenant_a", "tenant_b"):
        await admin.create_keyspace(name, if_not_exists=True)
    await admin.create_role("reader")
    await admin.role_grant("reader", "read", "shared")
    for tenant in ("a", "b"):
        await admin.create_role(f"tenant-{tenant}")
        await admin.role_grant(f"tenant-{tenant}", "write", f"tenant_{tenant}")
    await admin.create_user("reader1", PASSWORD, ["reader"])
    await admin.create_user("alice", PASSWORD, ["tenant-a"])
    await admin.create_user("bob", PASSWORD, ["tenant-b"])
    await admin.create_user("carol", PASSWORD, ["reader"])
    await admin.put("shared", "k", b"shared value")
    await admin.put("tenant_b", "k", SECRET)


def admin_login(url: str) -> str:
    """The bootstrap admin's token, once a node has created the admin (it waits)."""
    token: str | None = None

    def logged_in() -> bool:
        nonlocal token
        status, body = http("POST", url + "/v1/auth/login",
                            {"user": "admin", "password": ADMIN_PASSWORD})
        token = body["token"] if status == 200 else None
        return token is not None

    wait_until(logged_in, "the bootstrap admin can log in", timeout_s=60)
    assert token
    return token


def cli(config_home: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([LEADERLESS, *args], input=stdin, capture_output=True, text=True,
                          timeout=60, env=clean_env({"XDG_CONFIG_HOME": str(config_home)}))


def wrong_code(uri: str) -> str:
    """A 6-digit code that is none of the codes accepted now (the current step ± 1)."""
    totp = pyotp.parse_uri(uri)
    assert isinstance(totp, pyotp.TOTP)
    now = totp.timecode(datetime.datetime.now())
    valid = {totp.generate_otp(step) for step in range(now - 2, now + 3)}
    return next(code for code in (str(d) * 6 for d in range(10)) if code not in valid)


@pytest.mark.timeout(300)
def test_auth_on_a_three_node_cluster(processes: Processes, tmp_path: Path) -> None:
    password_file = tmp_path / "admin-password"
    password_file.write_text(ADMIN_PASSWORD + "\n")
    password_file.chmod(0o600)
    nodes, urls = start_ready_cluster(processes, ("a1", "a2", "a3"), "--auth",
                                      "--admin-password-file", str(password_file))

    admin_token = admin_login(urls[0])

    # HTTP: no token, no data and no ops views; probes stay open.
    assert http("GET", urls[1] + "/v1/ring")[0] == 401
    status, body = http("GET", urls[1] + "/v1/keyspaces")
    assert status == 401 and body["error"] == "unauthenticated"
    assert http("GET", urls[2] + "/api/cluster")[0] == 401
    assert http("GET", urls[2] + "/health/ready")[0] == 200
    assert http("GET", urls[2] + "/v1/auth/whoami")[0] == 401
    status, me = http("GET", urls[2] + "/v1/auth/whoami", token=admin_token)
    assert status == 200 and me["user"] == "admin" and "admin" in me["roles"]
    status, ring = http("GET", urls[0] + "/v1/ring", token=admin_token)
    assert status == 200
    clients = [m["client_address"] for m in ring["members"]]

    asyncio.run(native_scenario(clients, urls))
    cli_scenario(tmp_path, clients)


async def native_scenario(clients: list[str], urls: list[str]) -> None:
    # No token: the client cannot even learn the ring.
    with pytest.raises(UnauthenticatedError):
        async with AsyncClient(clients, timeout_s=10):
            pass

    admin = AsyncClient(clients, timeout_s=10)
    await admin.login("admin", ADMIN_PASSWORD)
    try:
        await set_up_tenants(admin)
        names = {u.name for u in await admin.list_users()}
        assert {"admin", "reader1", "alice", "bob", "carol"} <= names

        # A read-only user reads but cannot write.
        reader = AsyncClient(clients, timeout_s=10)
        await reader.login("reader1", PASSWORD)
        try:
            assert await reader.get("shared", "k") == b"shared value"
            with pytest.raises(PermissionDeniedError) as denied:
                await reader.put("shared", "k", b"overwritten")
            assert "put" in denied.value.message and "shared" in denied.value.message
            with pytest.raises(PermissionDeniedError):
                await reader.create_user("mallory", PASSWORD)
        finally:
            await reader.close()
        assert await admin.get("shared", "k") == b"shared value"

        # A tenant sees and touches only its own keyspace; a refusal leaks no data.
        alice = AsyncClient(clients, timeout_s=10)
        await alice.login("alice", PASSWORD)
        try:
            assert [k.name for k in await alice.list_keyspaces()] == ["tenant_a"]
            await alice.put("tenant_a", "k", b"alice's")
            assert await alice.get("tenant_a", "k") == b"alice's"
            with pytest.raises(PermissionDeniedError) as denied:
                await alice.get("tenant_b", "k")
            assert "tenant_b" in denied.value.message
            assert SECRET.decode() not in denied.value.message
        finally:
            await alice.close()
        status, listed = http("GET", urls[1] + "/v1/keyspaces",
                              token=await token_of("bob", clients))
        assert status == 200 and [k["name"] for k in listed["keyspaces"]] == ["tenant_b"]

        # TOTP: the password alone is not enough; a wrong code fails; the right one works.
        uri = await admin.enable_totp("carol")
        carol = AsyncClient(clients, timeout_s=10)
        try:
            with pytest.raises(TotpRequiredError):
                await carol.login("carol", PASSWORD)
            with pytest.raises(BadCredentialsError):
                await carol.login("carol", PASSWORD, wrong_code(uri))
            totp = pyotp.parse_uri(uri)
            assert isinstance(totp, pyotp.TOTP)
            carol_token = await carol.login("carol", PASSWORD, totp.now())
            assert await carol.get("shared", "k") == b"shared value"

            # Logout revokes the token everywhere: a new connection with it is refused.
            await carol.logout()
        finally:
            await carol.close()
        with pytest.raises(UnauthenticatedError):
            async with AsyncClient(clients, timeout_s=10, token=carol_token):
                pass
        wait_until(lambda: all(http("GET", url + "/v1/auth/whoami", token=carol_token)[0]
                               == 401 for url in urls), "every node refuses the revoked token",
                   timeout_s=15)
    finally:
        await admin.close()


async def token_of(user: str, clients: list[str]) -> str:
    client = AsyncClient(clients, timeout_s=10)
    try:
        return await client.login(user, PASSWORD)
    finally:
        await client.close()


def cli_scenario(tmp_path: Path, clients: list[str]) -> None:
    home = tmp_path / "config"
    node = ["--node", clients[0]]
    refused = cli(home, "keyspace", "list", *node)
    assert refused.returncode == 1 and "unauthenticated" in refused.stderr
    logged_in = cli(home, "login", "--user", "admin", "--password-stdin", *node,
                    stdin=ADMIN_PASSWORD + "\n")
    assert logged_in.returncode == 0, logged_in.stderr
    token_file = home / "leaderless" / "token"
    assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
    listed = cli(home, "keyspace", "list", "--json", *node)
    assert listed.returncode == 0, listed.stderr
    assert {"shared", "tenant_a", "tenant_b"} <= {k["name"] for k in json.loads(listed.stdout)}
    created = cli(home, "user", "create", "dave", "--role", "reader", "--password-stdin",
                  *node, stdin=PASSWORD + "\n")
    assert created.returncode == 0, created.stderr
    users = json.loads(cli(home, "user", "list", "--json", *node).stdout)
    assert any(u["name"] == "dave" and u["roles"] == ["reader"] for u in users)
    issued = cli(home, "token", "create", "dave", "--name", "ci", "--ttl", "600", "--json",
                 *node)
    assert issued.returncode == 0, issued.stderr
    dave_token = json.loads(issued.stdout)["token"]
    denied = cli(home, "kv", "put", "shared", "k", "v", "--token", dave_token, *node)
    assert denied.returncode == 1 and "permission_denied" in denied.stderr
    assert cli(home, "logout", *node).returncode == 0
    assert not token_file.exists()
    assert cli(home, "keyspace", "list", *node).returncode == 1
