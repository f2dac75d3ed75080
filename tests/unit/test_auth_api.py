"""The auth API: the native messages, the client's typed errors and token store, and the
checks every native and HTTP path makes, against a real ``AuthService`` on in-process
nodes (three, since ``system_auth`` needs a majority of three replicas)."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from leaderless.api.kv_messages import (
    ERROR_CODES,
    Authenticate,
    Authenticated,
    AuthRequest,
    ClientReply,
    ClientRequest,
    CreateApiToken,
    CreateRole,
    CreateUser,
    DeleteRole,
    DeleteUser,
    DescribeRing,
    DisableTotp,
    EnableTotp,
    Failure,
    Get,
    GrantEntry,
    ListRoles,
    ListUsers,
    Login,
    Logout,
    RevokeToken,
    RoleEntry,
    RoleGrant,
    Roles,
    SetPassword,
    Token,
    TotpProvisioning,
    UserEntry,
    UserRole,
    Users,
)
from leaderless.client import AsyncClient
from leaderless.client.errors import (
    ERRORS_BY_CODE,
    BadCredentialsError,
    PermissionDeniedError,
    TooManyAttemptsError,
    UnauthenticatedError,
    error_for,
)
from leaderless.config import load_config
from leaderless.core.codec import FrameDecoder, encode_frame
from leaderless.core.messages import MemberStatus
from leaderless.runtime.node import Node
from leaderless.runtime.process import run

ADMIN_PASSWORD = "admin passphrase for tests"
PASSWORD = "user passphrase for tests"
TEST_TIMEOUT_S = 120.0

# -- messages and errors --------------------------------------------------------------------

REQUESTS: list[Any] = [
    Authenticate(1, "ll1.abc.def"), Login(2, "alice", "pw", "123456"), Login(3, "bob", "pw"),
    Logout(4), CreateUser(5, "carol", "pw", ["readers", "writers"]), DeleteUser(6, "carol"),
    SetPassword(7, "carol", "new"), ListUsers(8), UserRole(9, "carol", "readers"),
    UserRole(10, "carol", "readers", revoke=True), CreateRole(11, "readers"),
    DeleteRole(12, "readers"), RoleGrant(13, "readers", "read", "ks", b"users/\xff"),
    RoleGrant(14, "readers", "write", "*", revoke=True), ListRoles(15),
    EnableTotp(16, "carol"), DisableTotp(17, "carol"), CreateApiToken(18, "ci", "deploy", 60.0),
    RevokeToken(19, "0123abcd"),
]
REPLIES: list[Any] = [
    Authenticated(1, "alice", ["readers"], 1.5e9), Authenticated(2, "", [], 0.0, auth=False),
    Token(3, "ll1.x.y", "tid", "alice", 1.7e9),
    Users(4, [UserEntry("alice", ["readers"], True, 1.6e9)]),
    Roles(5, [RoleEntry("readers", [GrantEntry("read", "ks", b"p/"), GrantEntry("admin", "*")])]),
    TotpProvisioning(6, "otpauth://totp/leaderless:alice?secret=ABC"),
    Failure(7, "too_many_attempts", "wait", retry_after_s=2.5),
]


def test_every_auth_request_and_reply_round_trips() -> None:
    assert {type(r) for r in REQUESTS} == set(AuthRequest.__args__)  # type: ignore[attr-defined]
    requests = msgspec.msgpack.Decoder(ClientRequest)
    replies = msgspec.msgpack.Decoder(ClientReply)
    for request in REQUESTS:
        assert requests.decode(msgspec.msgpack.encode(request)) == request
    for reply in REPLIES:
        assert replies.decode(msgspec.msgpack.encode(reply)) == reply


def test_auth_fields_are_bounded_on_decode() -> None:
    requests = msgspec.msgpack.Decoder(ClientRequest)
    for oversized in (Login(1, "u", "p" * 1025), Authenticate(1, "t" * 2049),
                      Login(1, "u", "p", "1" * 17), CreateApiToken(1, "u", "n", -1.0)):
        with pytest.raises(msgspec.ValidationError):
            requests.decode(msgspec.msgpack.encode(oversized))


def test_auth_error_codes_have_exceptions_and_keep_the_retry_delay() -> None:
    for code in ("unauthenticated", "bad_credentials", "totp_required", "too_many_attempts",
                 "permission_denied"):
        assert code in ERROR_CODES and ERRORS_BY_CODE[code].code == code
    err = error_for("too_many_attempts", "wait", retry_after_s=2.5)
    assert isinstance(err, TooManyAttemptsError) and err.retry_after_s == 2.5
    assert isinstance(error_for("permission_denied", "no"), PermissionDeniedError)


def test_the_cli_token_file_is_private_and_flags_win(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from leaderless.cli_auth import client_token, forget_token, store_token, token_path

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.delenv("LEADERLESS_TOKEN", raising=False)
    assert token_path() == tmp_path / "cfg" / "leaderless" / "token"
    assert client_token() is None
    path = store_token("stored-token")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert client_token() == "stored-token"
    monkeypatch.setenv("LEADERLESS_TOKEN", "env-token")
    assert client_token() == "env-token"
    assert client_token("flag-token") == "flag-token"
    os.chmod(path, 0o644)
    store_token("again")  # an existing file is made private again
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    forget_token()
    assert not path.exists()


# -- a real cluster with auth ---------------------------------------------------------------


def make_node(tmp_path: Path, name: str, join: str | None, auth: bool, **extra: Any) -> Node:
    password_file = tmp_path / "admin-password"
    password_file.write_text(ADMIN_PASSWORD + "\n")
    settings: dict[str, Any] = {
        "name": name, "bind": "127.0.0.1:0", "data_dir": str(tmp_path / name),
        "join": [join] if join else [], "client": "127.0.0.1:0", "http": "127.0.0.1:0",
        "storage": "memory", "log_level": "error", "ring.bootstrap": False}
    if auth:
        settings.update({"auth.enabled": True,
                         "auth.admin_password_file": str(password_file)})
    settings.update(extra)
    return Node(load_config(settings, env={}))


async def wait_for(predicate: Callable[[], Awaitable[bool]], what: str,
                   timeout_s: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.1)


def with_cluster(tmp_path: Path, auth: bool,
                 body: Callable[[list[Node], list[str], list[str]], Awaitable[None]],
                 **extra: Any) -> None:
    """Run ``body(nodes, client addresses, HTTP base URLs)`` on a 3-node cluster, once the
    admin can log in (with auth); ``extra``: more node settings."""

    async def main() -> None:
        nodes: list[Node] = []
        try:
            first = make_node(tmp_path, "n1", None, auth, **extra)
            await first.start()
            nodes.append(first)
            for name in ("n2", "n3"):
                node = make_node(tmp_path, name, str(first.address), auth, **extra)
                await node.start()
                nodes.append(node)
            clients = [str(n.client_address) for n in nodes]
            urls = [f"http://{n.http_address}" for n in nodes]

            async def ready() -> bool:
                if not all(sum(m.status == MemberStatus.ALIVE for m in n.members()) == 3
                           for n in nodes):
                    return False
                if not auth:
                    return True
                probe = AsyncClient(clients, timeout_s=5, ring_refresh_s=0)
                try:
                    await probe.login("admin", ADMIN_PASSWORD)
                    return True
                except Exception:
                    return False
                finally:
                    await probe.close()

            await wait_for(ready, "the cluster is up and the admin can log in")
            await body(nodes, clients, urls)
        finally:
            await asyncio.gather(*(n.stop() for n in nodes))

    run(asyncio.wait_for(main(), TEST_TIMEOUT_S))


def raw_call(address: str, *requests: Any) -> list[Any]:
    """Send requests on one fresh connection and read one reply per request."""
    host, port = address.rsplit(":", 1)
    decoder: FrameDecoder[Any] = FrameDecoder(ClientReply, 1 << 24)
    replies: list[Any] = []
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        for request in requests:  # one at a time: Authenticate must finish first
            sock.sendall(encode_frame(request))
            wanted = len(replies) + 1
            while len(replies) < wanted:
                data = sock.recv(65536)
                assert data, "the node closed the connection"
                replies.extend(decoder.feed(data))
    return replies


async def raw(address: str, *requests: Any) -> list[Any]:
    return await asyncio.to_thread(raw_call, address, *requests)


async def setup_tenants(admin: AsyncClient) -> None:
    for name in ("shared", "tenant_a", "tenant_b"):
        await admin.create_keyspace(name, if_not_exists=True)
    await admin.create_keyspace("feed", mode="strong", if_not_exists=True)
    await admin.create_role("reader")
    await admin.role_grant("reader", "read", "shared")
    await admin.role_grant("reader", "read", "feed")
    await admin.create_role("tenant-a")
    await admin.role_grant("tenant-a", "write", "tenant_a", b"users/")
    await admin.create_user("reader1", PASSWORD, ["reader"])
    await admin.create_user("alice", PASSWORD, ["tenant-a"])
    await admin.put("shared", "k", b"shared value")
    await admin.put("tenant_b", "k", b"secret of b")


def test_native_paths_authenticate_and_authorize(tmp_path: Path) -> None:
    async def body(nodes: list[Node], clients: list[str], urls: list[str]) -> None:
        # A fresh connection is unauthenticated: every request is refused, even the ring.
        refused = await raw(clients[0], Get(1, "shared", b"k"), DescribeRing(2))
        assert [(r.id, r.code) for r in refused] == [(1, "unauthenticated"),
                                                     (2, "unauthenticated")]
        with pytest.raises(UnauthenticatedError):
            async with AsyncClient(clients, timeout_s=10, ring_refresh_s=0):
                pass
        with pytest.raises(BadCredentialsError):
            await AsyncClient(clients, ring_refresh_s=0).login("admin", "wrong password!")

        admin = AsyncClient(clients, timeout_s=10, ring_refresh_s=0)
        await admin.login("admin", ADMIN_PASSWORD)
        try:
            await setup_tenants(admin)
            reader = AsyncClient(clients, timeout_s=10, ring_refresh_s=0)
            await reader.login("reader1", PASSWORD)
            alice = AsyncClient(clients, timeout_s=10, ring_refresh_s=0)
            await alice.login("alice", PASSWORD)
            try:
                await check_reader_and_tenant(nodes, reader, alice)
            finally:
                await reader.close()
                await alice.close()
            await check_token_lifecycle(admin, clients)
        finally:
            await admin.close()

    with_cluster(tmp_path, True, body)


async def check_reader_and_tenant(nodes: list[Node], reader: AsyncClient,
                                  alice: AsyncClient) -> None:
    denials_before = sum(n.auth.denials for n in nodes if n.auth is not None)
    assert await reader.get("shared", "k") == b"shared value"
    assert sorted(k.name for k in await reader.list_keyspaces()) == ["feed", "shared"]
    with pytest.raises(PermissionDeniedError) as denied:
        await reader.put("shared", "k", b"x")
    assert denied.value.message.startswith("put on keyspace 'shared'")
    with pytest.raises(PermissionDeniedError):
        await reader.create_keyspace("mine")
    with pytest.raises(PermissionDeniedError):
        await reader.acquire("a-lock", 5)
    with pytest.raises(PermissionDeniedError):
        await reader.create_user("mallory", PASSWORD)

    # A tenant with a prefix grant: its keys under the prefix only, its keyspace only.
    assert [k.name for k in await alice.list_keyspaces()] == ["tenant_a"]
    await alice.put("tenant_a", "users/1", b"one")
    assert await alice.get("tenant_a", "users/1") == b"one"
    with pytest.raises(PermissionDeniedError):
        await alice.put("tenant_a", "orders/1", b"x")
    with pytest.raises(PermissionDeniedError) as denied:
        await alice.get("tenant_b", "k")
    assert "tenant_b" in denied.value.message and "secret" not in denied.value.message
    with pytest.raises(PermissionDeniedError):
        async for _ in alice.watch("tenant_b", "k"):
            break
    assert sum(n.auth.denials for n in nodes if n.auth is not None) >= denials_before + 7


async def check_token_lifecycle(admin: AsyncClient, clients: list[str]) -> None:
    # An API token works on a connection until it is revoked; then the open connection
    # stops working too (on a request shortly after).
    issued = await admin.create_api_token("reader1", "ci", 600)
    bot = AsyncClient(clients, timeout_s=10, ring_refresh_s=0, token=issued.token)
    await admin.put("feed", "k", b"0")
    changes = bot.watch("feed", "k")
    try:
        assert await bot.get("shared", "k") == b"shared value"
        assert (await anext(changes)).value == b"0"
        await admin.revoke_token(issued.token_id)

        async def watch_ended() -> bool:
            await admin.put("feed", "k", b"more")
            try:
                await asyncio.wait_for(anext(changes), 5)
            except UnauthenticatedError:
                return True
            return False

        await wait_for(watch_ended, "a watch under the revoked token ends", timeout_s=15)

        async def refused() -> bool:
            try:
                await bot.get("shared", "k")
            except UnauthenticatedError:
                return True
            return False

        await wait_for(refused, "the revoked token stops working on an open connection",
                       timeout_s=15)
    finally:
        await changes.aclose()
        await bot.close()

    # A short-lived token stops working on the first request after it expires.
    brief = await admin.create_api_token("reader1", "brief", 1.0)
    replies = await raw(clients[1], Authenticate(1, brief.token), Get(2, "shared", b"k"))
    assert isinstance(replies[0], Authenticated) and replies[1].found
    await asyncio.sleep(max(0.0, brief.expires_at - time.time()) + 0.2)
    with pytest.raises(UnauthenticatedError):
        async with AsyncClient(clients, timeout_s=10, ring_refresh_s=0, token=brief.token):
            pass

    # Logout revokes the session token.
    session = AsyncClient(clients, timeout_s=10, ring_refresh_s=0)
    token = await session.login("alice", PASSWORD)
    await session.logout()
    await session.close()
    with pytest.raises(UnauthenticatedError):
        async with AsyncClient(clients, timeout_s=10, ring_refresh_s=0, token=token):
            pass


def test_http_paths_authenticate_and_authorize(tmp_path: Path) -> None:
    async def body(nodes: list[Node], clients: list[str], urls: list[str]) -> None:
        admin = AsyncClient(clients, timeout_s=10, ring_refresh_s=0)
        await admin.login("admin", ADMIN_PASSWORD)
        try:
            await setup_tenants(admin)
        finally:
            await admin.close()
        url = urls[1]
        # unsafe: keep cookies of an IP-address host (the nodes listen on 127.0.0.1).
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            for path in ("/v1/kv/shared/k", "/v1/keyspaces", "/v1/ring", "/metrics",
                         "/api/cluster", "/api/alerts", "/api/logs", "/api/doctor"):
                async with http.get(url + path) as response:
                    assert response.status == 401, path
                    assert (await response.json())["error"] == "unauthenticated"
            for path in ("/health/live", "/health/ready", "/"):
                async with http.get(url + path) as response:
                    assert response.status == 200, path
            async with http.get(url + "/v1/auth/whoami") as response:
                assert response.status == 401

            async with http.post(url + "/v1/auth/login",
                                 json={"user": "reader1", "password": "not it at all"}
                                 ) as response:
                assert response.status == 401, await response.text()
                assert (await response.json())["error"] == "bad_credentials"
            async with http.post(url + "/v1/auth/login",
                                 json={"user": "reader1", "password": PASSWORD}) as response:
                assert response.status == 200
                login = await response.json()
                cookie = response.headers["Set-Cookie"]
            assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
            bearer = {"Authorization": f"Bearer {login['token']}"}

            # The cookie (kept by the session) authenticates GETs only.
            async with http.get(url + "/v1/kv/shared/k") as response:
                assert response.status == 200 and await response.read() == b"shared value"
            async with http.get(url + "/v1/auth/whoami") as response:
                me = await response.json()
                assert me["user"] == "reader1" and me["roles"] == ["reader"]
            async with http.put(url + "/v1/kv/shared/k", data=b"x") as response:
                assert response.status == 401
            async with http.put(url + "/v1/kv/shared/k", data=b"x",
                                headers=bearer) as response:
                assert response.status == 403
                denied = await response.json()
                assert denied["error"] == "permission_denied"
                assert "put" in denied["message"] and "'shared'" in denied["message"]
            async with http.get(url + "/v1/kv/tenant_b/k", headers=bearer) as response:
                assert response.status == 403
                assert "secret" not in await response.text()
            async with http.get(url + "/v1/keyspaces", headers=bearer) as response:
                listed = (await response.json())["keyspaces"]
                assert sorted(k["name"] for k in listed) == ["feed", "shared"]
            async with http.post(url + "/v1/keyspaces", json={"name": "mine"},
                                 headers=bearer) as response:
                assert response.status == 403
            async with http.get(url + "/metrics", headers=bearer) as response:
                assert response.status == 200

            await check_http_administration(http, url, bearer)

            # Log out with the cookie alone, as the dashboard does (its script cannot read it).
            async with http.post(url + "/v1/auth/logout") as response:
                assert response.status == 200

            async def revoked() -> bool:
                async with http.get(urls[2] + "/v1/auth/whoami", headers=bearer) as response:
                    return response.status == 401

            await wait_for(revoked, "the logged-out token is refused", timeout_s=15)

    with_cluster(tmp_path, True, body)


async def check_http_administration(http: aiohttp.ClientSession, url: str,
                                    reader: dict[str, str]) -> None:
    async with aiohttp.ClientSession() as own, own.post(  # keeps the caller's cookie
            url + "/v1/auth/login", json={"user": "admin", "password": ADMIN_PASSWORD}
    ) as response:
        admin = {"Authorization": f"Bearer {(await response.json())['token']}"}
    async with http.post(url + "/v1/auth/roles", json={"name": "ops"},
                         headers=reader) as response:
        assert response.status == 403, await response.text()
    calls: list[tuple[str, str, dict[str, Any] | None, int]] = [
        ("POST", "/v1/auth/roles", {"name": "ops"}, 201),
        ("POST", "/v1/auth/roles/ops/grants", {"level": "read", "keyspace": "shared",
                                               "prefix": "p/"}, 201),
        ("POST", "/v1/auth/users", {"name": "olga", "password": PASSWORD}, 201),
        ("PUT", "/v1/auth/users/olga/roles/ops", None, 200),
        ("PUT", "/v1/auth/users/olga/password", {"password": PASSWORD + "!"}, 200),
        ("POST", "/v1/auth/users", {"name": "x", "pasword": "typo"}, 400),
    ]
    for method, path, body, status in calls:
        async with http.request(method, url + path, json=body, headers=admin) as response:
            assert response.status == status, (path, await response.text())
    async with http.get(url + "/v1/auth/users", headers=admin) as response:
        users = {u["name"]: u for u in (await response.json())["users"]}
        assert users["olga"]["roles"] == ["ops"] and users["olga"]["totp"] is False
    async with http.get(url + "/v1/auth/roles", headers=admin) as response:
        roles = {r["name"]: r for r in (await response.json())["roles"]}
        assert roles["ops"]["grants"] == [{"level": "read", "keyspace": "shared",
                                           "prefix": "p/", "prefix_b64": "cC8="}]
    async with http.post(url + "/v1/auth/tokens", headers=admin,
                         json={"user": "olga", "name": "job", "ttl_s": 60}) as response:
        issued = await response.json()
        assert response.status == 201 and issued["user"] == "olga"
    async with http.delete(url + f"/v1/auth/tokens/{issued['token_id']}",
                           headers=admin) as response:
        assert response.status == 200
    async with http.delete(url + "/v1/auth/users/olga", headers=admin) as response:
        assert response.status == 200


def test_without_auth_tokens_are_not_needed(tmp_path: Path) -> None:
    async def body(nodes: list[Node], clients: list[str], urls: list[str]) -> None:
        async with AsyncClient(clients, timeout_s=10, ring_refresh_s=0,
                               token="anything") as client:
            await client.create_keyspace("open", if_not_exists=True)
            await client.put("open", "k", b"v")
            assert (await client.whoami()).auth is False
            with pytest.raises(Exception) as refused:
                await client.create_user("u", PASSWORD)
            assert "authentication is off" in str(refused.value)
        async with aiohttp.ClientSession() as http:
            async with http.get(urls[0] + "/v1/auth/whoami") as response:
                assert await response.json() == {"user": None, "auth": False}
            async with http.get(urls[0] + "/v1/kv/open/k") as response:
                assert response.status == 200

    with_cluster(tmp_path, False, body)

