"""runtime.auth on real in-process nodes (3 of them, loopback sockets): the auth tables live
in the strong keyspace ``system_auth`` of their data planes, nothing is mocked.

Each test builds its own ``AuthService`` per node over the node's ``KvNode`` (the nodes
themselves run with auth off, so the test controls bootstrap and clock), except the last,
which starts the nodes with ``auth.enabled`` as a user would."""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pyotp
import pytest

from leaderless.runtime.auth import (
    REVOCATION_DELAY_MAX_S,
    AuthError,
    AuthService,
    IssuedToken,
)
from leaderless.runtime.errors import StartupError
from leaderless.runtime.node import Node
from leaderless.security.auth import (
    ADMIN_USER,
    FAILURES_FREE,
    TOTP_STEP_S,
    Grant,
    Principal,
)
from tests.unit.test_runtime_node import make_node, run_test, start_cluster, stop_all

PASSWORD = "a long enough passphrase"
PEER = "127.0.0.1:50000"
WAIT_S = 4 * REVOCATION_DELAY_MAX_S


class FrozenClock:
    """Wall time that moves only when a test says so (back-off, TOTP steps), shared by the
    three services as real nodes share (roughly) one time."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class Cluster:
    def __init__(self, nodes: list[Node], clock: FrozenClock) -> None:
        self.nodes = nodes
        self.clock = clock
        self.banners = [io.StringIO() for _ in nodes]
        self.auth: list[AuthService] = []
        for node, banner in zip(nodes, self.banners, strict=True):
            assert node.kv is not None
            self.auth.append(AuthService(node.kv, enabled=True, token_ttl_s=3600.0,
                                         banner=banner, clock=clock))
        self.admin_password = ""

    async def start(self) -> None:
        for service in self.auth:
            service.start()
        await asyncio.gather(*(asyncio.wait_for(s.bootstrapped.wait(), 30) for s in self.auth))
        printed = [b.getvalue() for b in self.banners if b.getvalue()]
        assert len(printed) == 1, printed
        found = re.search(r"with the password\n\n    (\S+)\n", printed[0])
        assert found is not None, printed[0]
        self.admin_password = found.group(1)

    async def admin(self, node: int = 0) -> Principal:
        issued = await self.auth[node].login(ADMIN_USER, self.admin_password, None, PEER)
        return await self.auth[node].authenticate(issued.token, PEER)

    async def close(self) -> None:
        for service in self.auth:
            await service.close()


def with_auth(tmp_path: Path, body: Callable[[Cluster], Awaitable[None]]) -> None:
    async def main() -> None:
        nodes = await start_cluster(tmp_path, 3)
        cluster = Cluster(nodes, FrozenClock())
        try:
            await cluster.start()
            await body(cluster)
        finally:
            await cluster.close()
            await stop_all(nodes)

    run_test(main())


async def refused(code: str, action: Awaitable[object]) -> AuthError:
    with pytest.raises(AuthError) as caught:
        await action
    assert caught.value.code == code, caught.value.message
    return caught.value


async def eventually_refused(service: AuthService, token: str, what: str) -> None:
    """Poll until ``service`` refuses ``token`` (bounded by REVOCATION_DELAY_MAX_S; the
    poll allows generous slack and asserts nothing about the time taken)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while True:
        try:
            await service.authenticate(token, PEER)
        except AuthError as exc:
            assert exc.code == "unauthenticated", exc.message
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.05)


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.05)


def test_three_concurrent_bootstraps_make_one_admin_usable_everywhere(tmp_path: Path) -> None:
    async def body(cluster: Cluster) -> None:
        # Cluster.start checked that exactly one node printed a password (the CAS winner).
        assert len(cluster.admin_password) >= 20
        for i in range(len(cluster.auth)):
            principal = await cluster.admin(i)
            assert principal.user == ADMIN_USER and principal.is_admin
            assert principal.allows("admin", "anything")
        users = await cluster.auth[2].list_users(await cluster.admin(1))
        assert [(u.name, u.roles, u.totp) for u in users] == [(ADMIN_USER, ("admin",), False)]
        # Bootstrapping again (a restart) changes nothing and prints nothing.
        printed = [banner.getvalue() for banner in cluster.banners]
        assert not any([await service.bootstrap() for service in cluster.auth])
        assert [banner.getvalue() for banner in cluster.banners] == printed
        await cluster.admin(2)

    with_auth(tmp_path, body)


def test_login_authenticate_logout_and_revocation_reach_every_node(tmp_path: Path) -> None:
    async def body(cluster: Cluster) -> None:
        a1, a2, a3 = cluster.auth
        issued = await a1.login(ADMIN_USER, cluster.admin_password, None, PEER)
        assert isinstance(issued, IssuedToken) and issued.user == ADMIN_USER
        assert issued.expires_at == cluster.clock.now + 3600.0
        for service in cluster.auth:
            principal = await service.authenticate(issued.token, PEER)
            assert principal.token_id == issued.token_id
        second = await a2.login(ADMIN_USER, cluster.admin_password, None, PEER)
        await a1.logout(await a1.authenticate(issued.token, PEER))
        await refused("unauthenticated", a1.authenticate(issued.token, PEER))
        await eventually_refused(a2, issued.token, "node 2 refuses the logged-out token")
        await eventually_refused(a3, issued.token, "node 3 refuses the logged-out token")
        assert (await a3.authenticate(second.token, PEER)).user == ADMIN_USER  # only that one
        # Expiry: the same token a moment after its end.
        cluster.clock.now += 3601.0
        error = await refused("unauthenticated", a3.authenticate(second.token, PEER))
        assert "expired" in error.message
        await refused("unauthenticated", a1.authenticate("ll1.garbage.mac", PEER))
        assert a1.unauthenticated >= 2

    with_auth(tmp_path, body)


def test_wrong_password_and_unknown_user_are_the_same_refusal(tmp_path: Path) -> None:
    async def body(cluster: Cluster) -> None:
        auth = cluster.auth[0]
        wrong = await refused("bad_credentials",
                              auth.login(ADMIN_USER, "not the password!", None, PEER))
        unknown = await refused("bad_credentials",
                                auth.login("nobody", cluster.admin_password, None, PEER))
        assert wrong.message == unknown.message
        assert auth.failed_logins == 2
        await cluster.admin()

    with_auth(tmp_path, body)


def test_failed_logins_back_off_per_user_then_recover(tmp_path: Path) -> None:
    async def body(cluster: Cluster) -> None:
        auth = cluster.auth[0]
        for _ in range(FAILURES_FREE + 1):
            await refused("bad_credentials", auth.login(ADMIN_USER, "guess guess guess",
                                                        None, "10.0.0.9:1"))
        # Now even the right password waits, from any address (the user is throttled).
        error = await refused("too_many_attempts", auth.login(
            ADMIN_USER, cluster.admin_password, None, "10.0.0.7:2"))
        assert error.retry_after_s > 0
        assert auth.throttled_logins == 1
        # Another node keeps its own count; after the wait, the right password works.
        await cluster.admin(1)
        cluster.clock.now += error.retry_after_s
        await cluster.admin(0)

    with_auth(tmp_path, body)


def test_totp_needs_the_code_refuses_wrong_and_reused_codes(tmp_path: Path) -> None:
    async def body(cluster: Cluster) -> None:
        a1, a2, _ = cluster.auth
        admin = await cluster.admin()
        await a1.create_user(admin, "carol", PASSWORD)
        uri = await a1.enable_totp(admin, "carol")
        assert uri.startswith("otpauth://totp/")
        totp = pyotp.parse_uri(uri)
        assert isinstance(totp, pyotp.TOTP)
        await eventually(lambda: _totp_on(a2, admin, "carol"), "node 2 knows carol has TOTP")
        await refused("totp_required", a2.login("carol", PASSWORD, None, PEER))
        await refused("bad_credentials", a2.login("carol", "wrong password!!", None, PEER))
        code = totp.at(cluster.clock.now)
        wrong = next(str(d) * 6 for d in range(10) if str(d) * 6 != code)
        await refused("bad_credentials", a2.login("carol", PASSWORD, wrong, PEER))
        issued = await a2.login("carol", PASSWORD, code, PEER)
        assert (await a1.authenticate(issued.token, PEER)).user == "carol"
        # The same code again, on either node, within its window: refused.
        await refused("bad_credentials", a2.login("carol", PASSWORD, code, PEER))
        await refused("bad_credentials", a1.login("carol", PASSWORD, code, PEER))
        cluster.clock.now += TOTP_STEP_S
        await a1.login("carol", PASSWORD, totp.at(cluster.clock.now), PEER)
        # An API token needs no code; turning TOTP off makes the password enough again.
        carol = await a1.authenticate(issued.token, PEER)
        api = await a1.create_api_token(carol, "carol", "ci", 600.0)
        assert (await a2.authenticate(api.token, PEER)).user == "carol"
        await a1.disable_totp(carol, "carol")
        await a1.login("carol", PASSWORD, None, PEER)

    with_auth(tmp_path, body)


async def _totp_on(service: AuthService, admin: Principal, user: str) -> bool:
    return any(u.name == user and u.totp for u in await service.list_users(admin))


def test_users_roles_and_grants_take_effect_on_every_node(tmp_path: Path) -> None:
    async def body(cluster: Cluster) -> None:
        a1, a2, a3 = cluster.auth
        admin = await cluster.admin()
        await a1.create_role(admin, "reader")
        await a1.role_grant(admin, "reader", Grant("read", "orders"))
        await a2.role_grant(admin, "reader", Grant("write", "orders", b"eu/"))
        await a1.create_user(admin, "alice", PASSWORD, ["reader"])
        roles = {r.name: r.grants for r in await a3.list_roles(admin)}
        assert roles["reader"] == (Grant("read", "orders"), Grant("write", "orders", b"eu/"))
        await refused("conflict", a2.create_user(admin, "alice", PASSWORD))
        await refused("not_found", a2.create_user(admin, "bob", PASSWORD, ["nope"]))
        await refused("bad_request", a2.create_user(admin, "bob", "short"))
        await refused("bad_request", a2.create_user(admin, "bad name", PASSWORD))

        token = (await a3.login("alice", PASSWORD, None, PEER)).token
        alice = await a3.authenticate(token, PEER)
        assert alice.allows("read", "orders", b"k") and alice.allows("write", "orders", b"eu/1")
        assert not alice.allows("write", "orders", b"us/1") and not alice.is_admin
        a3.check(alice, "read", "orders", None, operation="scan", peer=PEER)

        # A grant revoked through node 1 stops working on node 2.
        await a1.role_revoke(admin, "reader", Grant("read", "orders"))
        await eventually(lambda: _denied(a2, token, "read", "orders"), "node 2 sees the revoke")
        # Deleting the role takes it from alice; deleting alice ends her token everywhere.
        await a2.delete_role(admin, "reader")
        assert [u.roles for u in await a1.list_users(admin) if u.name == "alice"] == [()]
        await a1.delete_user(admin, "alice")
        await eventually_refused(a3, token, "node 3 refuses a deleted user's token")
        # Created again under the same name, she does not inherit the old token.
        await a1.create_user(admin, "alice", PASSWORD)
        await refused("unauthenticated", a1.authenticate(token, PEER))
        # The last admin stays.
        await refused("conflict", a1.delete_user(admin, ADMIN_USER))
        await refused("conflict", a1.revoke_role(admin, ADMIN_USER, "admin"))
        await refused("conflict", a1.delete_role(admin, "admin"))
        await a1.grant_role(admin, "alice", "admin")
        await a2.revoke_role(admin, ADMIN_USER, "admin")
        await refused("permission_denied", a2.list_users(await cluster.admin(2)))

    with_auth(tmp_path, body)


async def _denied(service: AuthService, token: str, level: str, keyspace: str) -> bool:
    principal = await service.authenticate(token, PEER)
    return not principal.allows(level, keyspace, b"k")


def test_concurrent_admin_changes_are_all_kept(tmp_path: Path) -> None:
    async def body(cluster: Cluster) -> None:
        admin = await cluster.admin()
        names = [f"role{i}" for i in range(9)]
        await asyncio.gather(*(cluster.auth[i % 3].create_role(admin, name)
                               for i, name in enumerate(names)))
        listed = {r.name for r in await cluster.auth[0].list_roles(admin)}
        assert set(names) <= listed

    with_auth(tmp_path, body)


def test_non_admin_is_refused_administration_but_manages_itself(tmp_path: Path) -> None:
    async def body(cluster: Cluster) -> None:
        a1, a2, _ = cluster.auth
        admin = await cluster.admin()
        await a1.create_user(admin, "alice", PASSWORD)
        await a1.create_user(admin, "bob", PASSWORD)
        alice = await a2.authenticate((await a2.login("alice", PASSWORD, None, PEER)).token,
                                      PEER)
        before = a2.denials
        for action in (a2.create_user(alice, "mallory", PASSWORD), a2.list_users(alice),
                       a2.create_role(alice, "mine"), a2.grant_role(alice, "alice", "admin"),
                       a2.set_password(alice, "bob", "taken over by alice"),
                       a2.enable_totp(alice, "bob"),
                       a2.create_api_token(alice, "bob", "steal", 60.0)):
            await refused("permission_denied", action)
        assert a2.denials == before + 7
        with pytest.raises(AuthError) as denied:
            a2.check(alice, "write", "orders", b"k", operation="put", peer=PEER)
        assert denied.value.code == "permission_denied"
        assert "put" in denied.value.message and "orders" in denied.value.message
        with pytest.raises(AuthError) as anonymous:
            a2.check(None, "read", "orders", b"k", operation="get", peer=PEER)
        assert anonymous.value.code == "unauthenticated"
        # Her own password, TOTP and API tokens are hers to manage.
        await a2.set_password(alice, "alice", "a new long passphrase")
        await a1.login("alice", "a new long passphrase", None, PEER)
        api = await a2.create_api_token(alice, "alice", "script", 600.0)
        assert [t.name for t in await a1.list_api_tokens(alice, "alice")] == ["script"]
        await refused("permission_denied", a1.list_api_tokens(alice, "bob"))
        bob = await a1.authenticate((await a1.login("bob", PASSWORD, None, PEER)).token, PEER)
        await refused("permission_denied", a1.revoke_token(bob, api.token_id))
        await a1.revoke_token(alice, api.token_id)
        await refused("unauthenticated", a1.authenticate(api.token, PEER))
        await eventually_refused(a2, api.token, "node 2 refuses the revoked API token")

    with_auth(tmp_path, body)


def test_nodes_started_with_auth_bootstrap_the_admin_from_the_password_file(
        tmp_path: Path) -> None:
    password_file = tmp_path / "admin-password"
    password_file.write_text("correct horse battery staple\n")
    flags: dict[str, Any] = {"auth.enabled": True,
                             "auth.admin_password_file": str(password_file)}

    async def main() -> None:
        first = make_node(tmp_path, "n1", **flags)
        await first.start()
        nodes = [first]
        try:
            for name in ("n2", "n3"):
                node = make_node(tmp_path, name, join=[first.address], **flags)
                await node.start()
                nodes.append(node)
            services = [node.auth for node in nodes]
            assert all(s is not None and s.enabled for s in services)
            for service in services:
                assert service is not None
                await asyncio.wait_for(service.bootstrapped.wait(), 60)
                issued = await service.login(ADMIN_USER, "correct horse battery staple", None,
                                             PEER)
                assert (await service.authenticate(issued.token, PEER)).is_admin
        finally:
            await stop_all(nodes)

    run_test(main())


def test_a_too_short_admin_password_file_stops_the_node_with_the_reason(
        tmp_path: Path) -> None:
    password_file = tmp_path / "admin-password"
    password_file.write_text("short\n")
    flags: dict[str, Any] = {"auth.enabled": True,
                             "auth.admin_password_file": str(password_file)}

    async def main() -> None:
        node = make_node(tmp_path, "n1", **flags)
        with pytest.raises(StartupError, match="admin_password_file .* at least 12"):
            await node.start()

    run_test(main())
