"""The auth service of a node: logins, tokens, permission checks and the administration of
users, roles and API tokens, over the strong system keyspace ``system_auth``.

Every node keeps a copy of the auth tables (``security.auth`` has the layout) and answers
``authenticate`` and ``check`` from it without a network round trip. The copy follows the
cluster two ways: a watch of each table's key delivers a change chosen anywhere within
milliseconds, and the node re-reads every table (linearizably) every ``VIEW_REFRESH_S`` in
case a watch report was lost. A node whose copy is older than ``REVOCATION_DELAY_MAX_S``
refreshes it before answering, and refuses (``unavailable``) if it cannot: so a revocation,
a user's deletion or a role change takes effect on every node within that bound at worst.

Changes are compare-and-set on the table's version: an admin whose change lost a race
re-applies it to the winner's table, so concurrent changes are never lost.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import math
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, TypeVar

import argon2
import msgspec
import pyotp

from leaderless.api.service import KvError
from leaderless.core import paxos
from leaderless.core.paxos_messages import Cas, Read
from leaderless.core.schema import KeyspaceDef
from leaderless.runtime.errors import StartupError
from leaderless.runtime.kv import KvNode
from leaderless.runtime.logs import NodeLogger, RateLimitedLog
from leaderless.security.auth import (
    ADMIN_GRANT,
    ADMIN_ROLE,
    ADMIN_USER,
    API_TOKEN_NAME_CHARS_MAX,
    API_TOKENS_KEY,
    API_TOKENS_MAX,
    ARGON2_MEMORY_KIB,
    ARGON2_PARALLELISM,
    ARGON2_TIME_COST,
    AUTH_KEYSPACE,
    AUTH_REPLICATION,
    GRANTS_PER_ROLE_MAX,
    PASSWORD_CHARS_MAX,
    REVOKED_KEY,
    REVOKED_MAX,
    ROLES_KEY,
    ROLES_MAX,
    ROLES_PER_USER_MAX,
    SECRET_BYTES,
    SECRET_KEY,
    TABLE_KEYS,
    USERS_KEY,
    USERS_MAX,
    ApiTokenRecord,
    ApiTokenTable,
    AuthInputError,
    Grant,
    LoginThrottle,
    Principal,
    RevokedTable,
    RoleRecord,
    RoleTable,
    SigningSecret,
    Table,
    TokenClaims,
    TokenError,
    UserRecord,
    UserTable,
    check_grant,
    check_name,
    check_password,
    decode_secret,
    decode_table,
    encode_record,
    sign_token,
    totp_match,
    totp_uri,
    verify_token,
)

AUTH_KEYSPACE_DEF = KeyspaceDef(AUTH_KEYSPACE, AUTH_REPLICATION, "strong")
REVOCATION_DELAY_MAX_S = 5.0
"""The longest a node goes on accepting a revoked token (or a deleted user's, or acting on
a role as it was before a change): a node never answers from a copy of the auth tables
older than this. Usually the watch makes it milliseconds."""
VIEW_REFRESH_S = 2.0
"""How often a node re-reads the auth tables in the background (5 linearizable reads),
well inside ``REVOCATION_DELAY_MAX_S`` so requests do not wait for a refresh."""
PRINCIPALS_CACHED_MAX = 10_000
"""Resolved tokens kept per node (~1 KB each); the cache empties when full, and on any
change of the auth tables."""
CAS_ATTEMPTS_MAX = 10
"""Compare-and-set attempts of one change racing others before ``contention``."""
TABLE_BYTES_MAX = 1 << 20
"""An auth table's encoded size (the default ``value_bytes_max``)."""
HASH_THREADS = 2
"""argon2 hashes computed at once (one per core here): a login flood costs CPU, not the
event loop, which keeps serving requests."""
LOGINS_WAITING_MAX = 64
"""Logins waiting for a hashing thread; beyond it ``too_many_attempts`` (retry in 1 s)."""
BOOTSTRAP_RETRY_MAX_S = 5.0
"""The bootstrap retries (doubling from 0.5 s) until a majority of ``system_auth``'s
replicas is up: a cluster needs 2 nodes before anyone can log in."""
GENERATED_PASSWORD_BYTES = 18
"""A generated admin password: 18 random bytes, 24 URL-safe characters (144 bits)."""
TOKEN_ID_BYTES = 16
API_TOKEN_TTL_S_MAX = 366 * 86400.0
T = TypeVar("T", bound=Table)
T_ = TypeVar("T_")


class AuthError(KvError):
    """An auth refusal with its API code (``unauthenticated``, ``bad_credentials``,
    ``totp_required``, ``too_many_attempts``, ``permission_denied``, ``not_found``,
    ``conflict``, ``bad_request``); ``retry_after_s`` for ``too_many_attempts``."""

    def __init__(self, code: str, message: str, retry_after_s: float = 0.0) -> None:
        super().__init__(code, message)
        self.retry_after_s = retry_after_s


@dataclasses.dataclass(frozen=True)
class IssuedToken:
    token: str
    """The secret to present (``Authorization: Bearer``); shown once, never stored."""
    token_id: str
    user: str
    expires_at: float


@dataclasses.dataclass(frozen=True)
class UserInfo:
    name: str
    roles: tuple[str, ...]
    totp: bool
    created_at: float


@dataclasses.dataclass(frozen=True)
class RoleInfo:
    name: str
    grants: tuple[Grant, ...]


@dataclasses.dataclass(frozen=True)
class ApiTokenInfo:
    token_id: str
    user: str
    name: str
    created_at: float
    expires_at: float


class AuthService:
    """``start()`` once the node has joined; ``close()`` when it stops."""

    def __init__(self, kv: KvNode, *, enabled: bool, token_ttl_s: float,
                 admin_password_file: Path | None = None, banner: IO[str] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.enabled = enabled
        self._kv = kv
        self._token_ttl_s = token_ttl_s
        self._banner = banner
        """Where the generated admin password is printed (None: stderr)."""
        self._clock = clock
        """Unix seconds (token expiry, TOTP steps, back-off)."""
        self.audit = NodeLogger(kv.name, "audit")
        self._refusals = RateLimitedLog(self.audit)
        self._hasher = argon2.PasswordHasher(time_cost=ARGON2_TIME_COST,
                                             memory_cost=ARGON2_MEMORY_KIB,
                                             parallelism=ARGON2_PARALLELISM)
        self._admin_password: str | None = None
        if enabled and admin_password_file is not None:
            self._admin_password = _read_admin_password(admin_password_file)
        self._secret: bytes | None = None
        self._tables: dict[bytes, Table] = {key: decode_table(key, None)
                                            for key in TABLE_KEYS if key != SECRET_KEY}
        self._fresh_at = -math.inf
        self._generation = 0
        self._principals: dict[str, tuple[int, Principal]] = {}
        self._refreshing: asyncio.Task[None] | None = None
        self._throttle = LoginThrottle()
        self._logins_waiting = 0
        self._threads: concurrent.futures.ThreadPoolExecutor | None = None
        self._dummy_hash: str | None = None
        self._bootstrap_users: bytes | None = None
        self._admin_generated = False
        self._admin_settled = False
        """This node's bootstrap of the admin user is decided (made here, or elsewhere)."""
        self._bootstrap_id = secrets.token_bytes(16)
        """The idempotency id of this node's bootstrap change: a retry after a timeout
        learns whether the first attempt was chosen (and so whether to print)."""
        self._task: asyncio.Task[None] | None = None
        self._let_go: list[Callable[[], None]] = []
        self.bootstrapped = asyncio.Event()
        """Set once the auth tables exist and this node has read them."""
        self.logins = 0
        self.failed_logins = 0
        self.throttled_logins = 0
        self.denials = 0
        self.unauthenticated = 0

    # -- lifecycle ---------------------------------------------------------------------

    def start(self, joined: asyncio.Event | None = None) -> None:
        """Follow the auth tables and bootstrap them (once ``joined`` is set)."""
        if not self.enabled or self._task is not None:
            return
        self._threads = concurrent.futures.ThreadPoolExecutor(HASH_THREADS, "auth-hash")
        self._task = asyncio.get_running_loop().create_task(self._run(joined))
        self._task.add_done_callback(self._task_ended)

    async def close(self) -> None:
        for task in (self._task, self._refreshing):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for let_go in self._let_go:
            let_go()
        self._let_go.clear()
        if self._on_key_changed in self._kv.key_listeners:
            self._kv.key_listeners.remove(self._on_key_changed)
        if self._threads is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)

    def _task_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.audit.error("auth_failed", error=repr(task.exception()))

    async def _run(self, joined: asyncio.Event | None) -> None:
        if joined is not None:
            await joined.wait()
        self._kv.key_listeners.append(self._on_key_changed)
        for key in TABLE_KEYS:
            self._let_go.append(self._kv.watches.hold_key(AUTH_KEYSPACE_DEF, key))
        delay_s = 0.5
        loop = asyncio.get_running_loop()
        while True:
            try:
                await self.bootstrap()
                break
            except KvError as exc:
                self._refusals.warning("bootstrap", "auth_bootstrap_waiting", loop.time(),
                                       code=exc.code, error=exc.message[:300])
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, BOOTSTRAP_RETRY_MAX_S)
        while True:
            await asyncio.sleep(VIEW_REFRESH_S)
            try:
                await self._refresh_shared()
            except KvError as exc:
                self._refusals.warning("refresh", "auth_refresh_failed", loop.time(),
                                       code=exc.code, error=exc.message[:300])

    # -- bootstrap -----------------------------------------------------------------------

    async def bootstrap(self) -> bool:
        """Create what a fresh cluster lacks, each by compare-and-set on absence so exactly
        one node's attempt wins: the signing secret, the ``admin`` role, and the ``admin``
        user. True if this call created the admin user (then, unless its password came
        from ``admin_password_file``, it printed the generated password)."""
        now = self._clock()
        secret = SigningSecret(secrets.token_bytes(SECRET_BYTES), now)
        await self._create_if_absent(SECRET_KEY, encode_record(secret), b"")
        roles = RoleTable(1, {ADMIN_ROLE: RoleRecord(ADMIN_ROLE, (ADMIN_GRANT,), now)})
        await self._create_if_absent(ROLES_KEY, encode_record(roles), b"")
        created = False
        if not self._admin_settled:
            if self._bootstrap_users is None:
                # Made once: a retry after a timeout proposes the same change with the same
                # id, and learns whether the first attempt was chosen.
                self._admin_generated = self._admin_password is None
                password = self._admin_password or secrets.token_urlsafe(
                    GENERATED_PASSWORD_BYTES)
                self._admin_password = password
                admin = UserRecord(ADMIN_USER, _uid(), await self._hash(password),
                                   (ADMIN_ROLE,), now)
                self._bootstrap_users = encode_record(UserTable(1, {ADMIN_USER: admin}))
            created = await self._create_if_absent(USERS_KEY, self._bootstrap_users,
                                                   self._bootstrap_id)
            self._admin_settled = True
            if created:
                self.audit.info("admin_bootstrapped", user=ADMIN_USER, password=(
                    "generated" if self._admin_generated else "from admin_password_file"))
                if self._admin_generated:
                    self._print_banner(self._admin_password or "")
            self._admin_password = None
            self._bootstrap_users = None
        await self._refresh_shared()
        self.bootstrapped.set()
        return created

    async def _create_if_absent(self, key: bytes, value: bytes, idempotency: bytes) -> bool:
        outcome = await self._kv.propose(AUTH_KEYSPACE_DEF, key, b"",
                                         Cas(value, expected_absent=True), idempotency)
        return isinstance(outcome, paxos.Done)

    def _print_banner(self, password: str) -> None:
        rule = "=" * 72
        print(f"\n{rule}\nleaderless auth: this node created the bootstrap user "
              f"'{ADMIN_USER}' with the password\n\n    {password}\n\nIt is shown only this "
              "once, only here. Log in with it and change it now\n(or start the first nodes "
              f"with [auth] admin_password_file to choose it).\n{rule}\n",
              file=self._banner or sys.stderr, flush=True)

    # -- the local copy of the tables ------------------------------------------------------

    def _on_key_changed(self, keyspace: str, partition: bytes, sort: bytes,
                        value: bytes | None) -> None:
        """A change of an auth table chosen here or (through the watch) anywhere."""
        if keyspace != AUTH_KEYSPACE or sort or partition not in TABLE_KEYS:
            return
        try:
            self._adopt(partition, value)
        except msgspec.DecodeError as exc:
            self.audit.error("auth_table_unreadable", table=partition.decode(),
                             error=str(exc)[:300])

    def _adopt(self, key: bytes, value: bytes | None) -> None:
        """Take a table's value if it is newer than ours (changes are ordered by serial)."""
        if key == SECRET_KEY:
            secret = decode_secret(value)
            if secret is not None and self._secret is None:
                self._secret = secret.key
            return
        table = decode_table(key, value)
        if table.serial > self._tables[key].serial:
            self._tables[key] = table
            self._generation += 1
            self._principals.clear()

    async def _refresh(self) -> None:
        started = asyncio.get_running_loop().time()
        reads = await asyncio.gather(*(self._read(key) for key in TABLE_KEYS))
        for key, (_, value) in zip(TABLE_KEYS, reads, strict=True):
            self._adopt(key, value)
        self._fresh_at = max(self._fresh_at, started)

    async def _refresh_shared(self) -> None:
        """One refresh at a time; everyone asking meanwhile waits for the same one."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh())
            # Its waiters may all be gone (cancelled at close): the failure is theirs to
            # see, so nobody left must not make it "never retrieved".
            self._refreshing.add_done_callback(
                lambda task: task.cancelled() or task.exception())
        await asyncio.shield(self._refreshing)

    async def _fresh(self) -> None:
        """Refresh the copy first if it is older than ``REVOCATION_DELAY_MAX_S``."""
        if asyncio.get_running_loop().time() - self._fresh_at > REVOCATION_DELAY_MAX_S:
            await self._refresh_shared()

    async def _read(self, key: bytes) -> tuple[int, bytes | None]:
        outcome = await self._kv.propose(AUTH_KEYSPACE_DEF, key, b"", Read(), b"")
        assert isinstance(outcome, paxos.Done), outcome
        return outcome.version, outcome.value

    async def _change(self, key: bytes, change: Callable[[T], T | None]) -> T:
        """Apply ``change`` (a pure function of the table; None: nothing to do, or raise
        AuthError to refuse) by compare-and-set, re-applying it to the newer table when
        another change won the race."""
        version, value = await self._read(key)
        for _ in range(CAS_ATTEMPTS_MAX):
            current: T = decode_table(key, value)  # type: ignore[assignment]
            new = change(current)
            if new is None:
                return current
            new = msgspec.structs.replace(new, serial=version + 1)
            encoded = encode_record(new)
            if len(encoded) > TABLE_BYTES_MAX:
                raise AuthError("bad_request", f"the {key.decode()} table would exceed "
                                f"{TABLE_BYTES_MAX} bytes; remove unused entries first")
            cas = (Cas(encoded, expected_absent=True) if value is None
                   else Cas(encoded, expected_version=version))
            outcome = await self._kv.propose(AUTH_KEYSPACE_DEF, key, b"", cas, b"")
            if isinstance(outcome, paxos.Done):
                self._adopt(key, encoded)
                return new
            assert isinstance(outcome, paxos.Conflict), outcome
            version, value = outcome.version, outcome.value
        raise AuthError("contention", f"the {key.decode()} table changed {CAS_ATTEMPTS_MAX} "
                        "times during this change; retry")

    def _users(self) -> UserTable:
        table = self._tables[USERS_KEY]
        assert isinstance(table, UserTable)
        return table

    def _roles(self) -> RoleTable:
        table = self._tables[ROLES_KEY]
        assert isinstance(table, RoleTable)
        return table

    def _api_tokens(self) -> ApiTokenTable:
        table = self._tables[API_TOKENS_KEY]
        assert isinstance(table, ApiTokenTable)
        return table

    def _revoked(self) -> RevokedTable:
        table = self._tables[REVOKED_KEY]
        assert isinstance(table, RevokedTable)
        return table

    # -- passwords ---------------------------------------------------------------------------

    async def _in_thread(self, work: Callable[[], T_]) -> T_:
        if self._threads is None:
            self._threads = concurrent.futures.ThreadPoolExecutor(HASH_THREADS, "auth-hash")
        return await asyncio.get_running_loop().run_in_executor(self._threads, work)

    async def _hash(self, password: str) -> str:
        return await self._in_thread(lambda: self._hasher.hash(password))

    async def _verify(self, password_hash: str | None, password: str) -> bool:
        """Whether ``password`` matches; with no user (hash None) the same work is done
        against a dummy hash (and fails), so the answer's timing does not tell whether a
        user exists."""
        if password_hash is None:
            if self._dummy_hash is None:
                self._dummy_hash = await self._hash(secrets.token_urlsafe(16))
            password_hash = self._dummy_hash

        def verify() -> bool:
            try:
                return self._hasher.verify(password_hash, password)
            except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
                return False

        return await self._in_thread(verify)


    # -- logins and tokens -------------------------------------------------------------------

    def _require_enabled(self) -> None:
        if not self.enabled:
            raise AuthError("bad_request", "authentication is off on this cluster; start "
                            "the nodes with --auth (or [auth] enabled = true)")

    async def login(self, user: str, password: str, totp: str | None, peer: str
                    ) -> IssuedToken:
        """A session token for ``user`` if ``password`` (and, with TOTP on, the code) is
        right. Failures are counted per user and per peer address (``LoginThrottle``)."""
        self._require_enabled()
        if self._logins_waiting >= LOGINS_WAITING_MAX:
            self.throttled_logins += 1
            raise AuthError("too_many_attempts", f"{LOGINS_WAITING_MAX} logins are waiting "
                            "on this node; retry in a second", retry_after_s=1.0)
        self._logins_waiting += 1
        try:
            return await self._login(user, password, totp, peer)
        finally:
            self._logins_waiting -= 1

    async def _login(self, user: str, password: str, totp: str | None, peer: str
                     ) -> IssuedToken:
        address = _peer_host(peer)
        wait_s = self._throttle.retry_after(user, address, self._clock())
        if wait_s > 0:
            self.throttled_logins += 1
            self.audit.warning("login_failed", user=user, peer=peer, reason="throttled")
            raise AuthError("too_many_attempts", "too many failed logins for this user or "
                            f"from this address; retry in {math.ceil(wait_s)} s",
                            retry_after_s=wait_s)
        await self._fresh()
        record = self._users().users.get(user)
        if len(password) > PASSWORD_CHARS_MAX:
            password = password[:PASSWORD_CHARS_MAX + 1]  # cannot match; bounded work
        matched = await self._verify(record.password_hash if record else None, password)
        if record is None or not matched:
            raise self._failed(user, peer, "unknown_user" if record is None else "bad_password")
        if record.totp_secret:
            if not totp:
                self.audit.info("login_failed", user=user, peer=peer, reason="totp_missing")
                raise AuthError("totp_required", f"user {user!r} has a second factor: give "
                                "the current code of the authenticator app (TOTP)")
            step = totp_match(record.totp_secret, totp, self._clock(), record.totp_last_step)
            if step is None:
                raise self._failed(user, peer, "bad_totp")
            await self._use_totp_step(record, step, peer, password)
        elif self._hasher.check_needs_rehash(record.password_hash):
            await self._rehash(record, password)
        self._throttle.succeeded(user)
        issued = self._issue(record, "session", self._token_ttl_s)
        self.logins += 1
        self.audit.info("login_ok", user=user, peer=peer, token_id=issued.token_id,
                        expires_at=round(issued.expires_at, 3))
        return issued

    def _failed(self, user: str, peer: str, reason: str) -> AuthError:
        """Count and log a failed login; the error the client gets (never saying why)."""
        self._throttle.failed(user, _peer_host(peer), self._clock())
        self.failed_logins += 1
        self.audit.warning("login_failed", user=user, peer=peer, reason=reason)
        return AuthError("bad_credentials", "wrong user name, password or code")

    async def _use_totp_step(self, record: UserRecord, step: int, peer: str,
                             password: str) -> None:
        """Record the step of the code just used, so it cannot be used again anywhere
        (compare-and-set: of two logins racing with one code, one wins); a stale password
        hash is replaced in the same change."""
        rehash = await self._hash_if_stale(record, password)

        def change(table: UserTable) -> UserTable:
            current = table.users.get(record.name)
            if current is None or current.uid != record.uid or current.totp_last_step >= step:
                raise self._failed(record.name, peer, "totp_reused")
            updated = msgspec.structs.replace(current, totp_last_step=step)
            if rehash is not None and current.password_hash == record.password_hash:
                updated = msgspec.structs.replace(updated, password_hash=rehash)
            return _with_user(table, updated)

        await self._change(USERS_KEY, change)

    async def _hash_if_stale(self, record: UserRecord, password: str) -> str | None:
        if not self._hasher.check_needs_rehash(record.password_hash):
            return None
        return await self._hash(password)

    async def _rehash(self, record: UserRecord, password: str) -> None:
        """Store the password hashed with the current parameters (best effort: a failure
        leaves the old hash, which still verifies)."""
        new_hash = await self._hash(password)

        def change(table: UserTable) -> UserTable | None:
            current = table.users.get(record.name)
            if current is None or current.password_hash != record.password_hash:
                return None
            return _with_user(table, msgspec.structs.replace(current, password_hash=new_hash))

        try:
            await self._change(USERS_KEY, change)
            self.audit.info("password_rehashed", user=record.name)
        except KvError as exc:
            self.audit.warning("password_rehash_failed", user=record.name, code=exc.code)

    def _issue(self, record: UserRecord, kind: str, ttl_s: float, token_id: str = ""
               ) -> IssuedToken:
        if self._secret is None:
            raise AuthError("unavailable", "auth is starting: the cluster's signing secret "
                            "is not readable yet (2 of 3 replicas of system_auth must be up)")
        now = self._clock()
        claims = TokenClaims(token_id or _token_id(), record.name, record.uid, kind, now,
                             now + ttl_s)
        return IssuedToken(sign_token(claims, self._secret), claims.id, record.name,
                           claims.expires_at)

    async def authenticate(self, token: str, peer: str) -> Principal:
        """Who presents ``token``: checked locally (signature, expiry), then against the
        revocations, the user and its roles as this node knows them (at most
        ``REVOCATION_DELAY_MAX_S`` old). Cached: a hit costs two dict lookups."""
        self._require_enabled()
        await self._fresh()
        now = self._clock()
        cached = self._principals.get(token)
        if cached is not None and cached[0] == self._generation and cached[1].expires_at > now:
            return cached[1]
        try:
            principal = self._resolve(token, now)
        except TokenError as exc:
            self.unauthenticated += 1
            self._refusals.warning(f"token:{peer}", "token_refused",
                                   asyncio.get_running_loop().time(), peer=peer,
                                   reason=exc.reason)
            raise AuthError("unauthenticated", _TOKEN_REFUSALS.get(
                exc.reason, "the token is not valid for this cluster; log in again")) from None
        if len(self._principals) >= PRINCIPALS_CACHED_MAX:
            self._principals.clear()
        self._principals[token] = (self._generation, principal)
        return principal

    def _resolve(self, token: str, now: float) -> Principal:
        if self._secret is None:
            raise TokenError("not_bootstrapped")
        claims = verify_token(token, self._secret, now)
        if claims.id in self._revoked().tokens:
            raise TokenError("revoked")
        if claims.kind == "api":
            listed = self._api_tokens().tokens.get(claims.id)
            if listed is None or listed.user != claims.user:
                raise TokenError("revoked")
        record = self._users().users.get(claims.user)
        if record is None or record.uid != claims.uid:
            raise TokenError("user_deleted")
        roles = self._roles().roles
        grants = tuple(g for name in record.roles if name in roles for g in roles[name].grants)
        return Principal(record.name, record.roles, grants, claims.id, claims.expires_at,
                         ADMIN_ROLE in record.roles and ADMIN_ROLE in roles)

    def unauthenticated_error(self, message: str) -> AuthError:
        """The refusal of a request that brought no token, or one expired since it was
        checked: counted with the tokens this service refused itself."""
        self.unauthenticated += 1
        return AuthError("unauthenticated", message)

    def check(self, principal: Principal | None, level: str, keyspace: str,
              key: bytes | None, *, operation: str, peer: str) -> None:
        """Raise ``unauthenticated`` without a principal, ``permission_denied`` (counted and
        audit-logged) if its grants do not allow ``level`` on ``keyspace`` (and ``key``:
        None = the whole keyspace). Synchronous and cheap: it runs on every request."""
        if not self.enabled:
            return
        if principal is None:
            raise self.unauthenticated_error("this needs a token: log in (`leaderless "
                                             "login`) or pass an API token")
        if principal.allows(level, keyspace, key):
            return
        raise self._denied(principal, operation, keyspace, peer, level)

    def _denied(self, principal: Principal, operation: str, keyspace: str, peer: str,
                level: str) -> AuthError:
        self.denials += 1
        self._refusals.warning(f"denied:{principal.user}:{operation}:{keyspace}",
                               "permission_denied", time.monotonic(), user=principal.user,
                               operation=operation, keyspace=keyspace, level=level, peer=peer)
        return AuthError("permission_denied", f"{operation} on keyspace {keyspace!r} needs "
                         f"{level} permission, which the roles of user {principal.user!r} "
                         "do not grant")

    async def logout(self, principal: Principal) -> None:
        """Revoke the token ``principal`` came from."""
        self._require_enabled()
        await self._revoke(principal.token_id, principal.expires_at, principal.user,
                           principal.user)

    async def _revoke(self, token_id: str, expires_at: float, user: str, by: str) -> None:
        """An API token leaves the allow-list; a session token joins the deny-list until it
        expires."""
        if token_id in self._api_tokens().tokens:
            def drop(table: ApiTokenTable) -> ApiTokenTable | None:
                if token_id not in table.tokens:
                    return None
                return ApiTokenTable(table.serial, {i: t for i, t in table.tokens.items()
                                                    if i != token_id})
            await self._change(API_TOKENS_KEY, drop)
        else:
            now = self._clock()

            def deny(table: RevokedTable) -> RevokedTable | None:
                if token_id in table.tokens:
                    return None
                kept = table.pruned(now)
                if len(kept) >= REVOKED_MAX:
                    raise AuthError("overloaded", f"{REVOKED_MAX} revoked session tokens "
                                    "have not expired yet; retry later (a shorter "
                                    "token_ttl_s frees room sooner)")
                kept[token_id] = expires_at
                return RevokedTable(table.serial, kept)
            await self._change(REVOKED_KEY, deny)
        self.audit.info("token_revoked", token_id=token_id, user=user, by=by)

    # -- administration ------------------------------------------------------------------------

    def _require_admin(self, by: Principal, operation: str) -> None:
        self._require_enabled()
        if not by.is_admin:
            raise self._refused(by, operation)

    def _require_self_or_admin(self, by: Principal, user: str, operation: str) -> None:
        self._require_enabled()
        if by.user != user and not by.is_admin:
            raise self._refused(by, operation)

    def _refused(self, by: Principal, operation: str) -> AuthError:
        self.denials += 1
        self.audit.warning("permission_denied", user=by.user, operation=operation,
                           keyspace=AUTH_KEYSPACE, peer="")
        return AuthError("permission_denied", f"{operation} needs the {ADMIN_ROLE} role "
                         f"(or to be done by the user itself), which user {by.user!r} lacks")

    async def _require_roles(self, roles: Sequence[str]) -> None:
        if len(roles) > ROLES_PER_USER_MAX:
            raise AuthError("bad_request", f"a user has at most {ROLES_PER_USER_MAX} roles "
                            f"(got {len(roles)})")
        await self._fresh()
        for role in roles:
            _valid(check_name, "role", role)
            if role not in self._roles().roles:
                raise AuthError("not_found", f"role {role!r} does not exist; create it "
                                f"first: leaderless role create {role}")

    async def _update_user(self, name: str,
                           update: Callable[[UserTable, UserRecord], UserRecord | None]
                           ) -> None:
        """Change one user (``not_found`` if it does not exist); None: nothing to do."""
        def change(table: UserTable) -> UserTable | None:
            current = table.users.get(name)
            if current is None:
                raise AuthError("not_found", f"user {name!r} does not exist")
            updated = update(table, current)
            return None if updated is None or updated == current else _with_user(table, updated)
        await self._change(USERS_KEY, change)

    async def _update_role(self, name: str, update: Callable[[RoleRecord], RoleRecord]) -> None:
        if name == ADMIN_ROLE:
            raise AuthError("conflict", f"role {ADMIN_ROLE!r} is built in (admin on every "
                            "keyspace); its grants cannot change")

        def change(table: RoleTable) -> RoleTable | None:
            current = table.roles.get(name)
            if current is None:
                raise AuthError("not_found", f"role {name!r} does not exist")
            updated = update(current)
            if updated == current:
                return None
            return RoleTable(table.serial, {**table.roles, name: updated})
        await self._change(ROLES_KEY, change)

    async def create_user(self, by: Principal, name: str, password: str,
                          roles: Sequence[str] = ()) -> None:
        self._require_admin(by, "create user")
        _valid(check_name, "user", name)
        _valid_password(password)
        wanted = tuple(dict.fromkeys(roles))
        await self._require_roles(wanted)
        record = UserRecord(name, _uid(), await self._hash(password), wanted, self._clock())

        def change(table: UserTable) -> UserTable:
            if name in table.users:
                raise AuthError("conflict", f"user {name!r} exists already")
            if len(table.users) >= USERS_MAX:
                raise AuthError("bad_request", f"the cluster has {USERS_MAX} users, the "
                                "limit; delete unused ones first")
            return _with_user(table, record)
        await self._change(USERS_KEY, change)
        self.audit.info("user_created", user=name, roles=list(wanted), by=by.user)

    async def delete_user(self, by: Principal, name: str) -> None:
        self._require_admin(by, "delete user")

        def change(table: UserTable) -> UserTable:
            current = table.users.get(name)
            if current is None:
                raise AuthError("not_found", f"user {name!r} does not exist")
            _keep_an_admin(table, name)
            return UserTable(table.serial, {n: u for n, u in table.users.items() if n != name})
        await self._change(USERS_KEY, change)
        self.audit.info("user_deleted", user=name, by=by.user)
        # Its API tokens are refused already (no such user); drop them from the table.
        await self._change(API_TOKENS_KEY, lambda table: _tokens_without(
            table, lambda t: t.user == name))

    async def set_password(self, by: Principal, name: str, password: str) -> None:
        self._require_self_or_admin(by, name, "change another user's password")
        _valid_password(password)
        new_hash = await self._hash(password)
        await self._update_user(name, lambda _, user: msgspec.structs.replace(
            user, password_hash=new_hash))
        self.audit.info("password_changed", user=name, by=by.user)

    async def list_users(self, by: Principal) -> list[UserInfo]:
        self._require_admin(by, "list users")
        await self._fresh()
        return [UserInfo(u.name, u.roles, bool(u.totp_secret), u.created_at)
                for u in sorted(self._users().users.values(), key=lambda u: u.name)]

    async def grant_role(self, by: Principal, user: str, role: str) -> None:
        self._require_admin(by, "grant a role")
        await self._require_roles([role])

        def update(_: UserTable, record: UserRecord) -> UserRecord | None:
            if role in record.roles:
                return None
            if len(record.roles) >= ROLES_PER_USER_MAX:
                raise AuthError("bad_request", f"user {user!r} has {ROLES_PER_USER_MAX} "
                                "roles, the limit")
            return msgspec.structs.replace(record, roles=(*record.roles, role))
        await self._update_user(user, update)
        self.audit.info("role_granted", user=user, role=role, by=by.user)

    async def revoke_role(self, by: Principal, user: str, role: str) -> None:
        self._require_admin(by, "revoke a role")

        def update(table: UserTable, record: UserRecord) -> UserRecord:
            if role not in record.roles:
                raise AuthError("not_found", f"user {user!r} does not have role {role!r}")
            if role == ADMIN_ROLE:
                _keep_an_admin(table, user)
            return msgspec.structs.replace(record, roles=tuple(
                r for r in record.roles if r != role))
        await self._update_user(user, update)
        self.audit.info("role_revoked", user=user, role=role, by=by.user)

    async def create_role(self, by: Principal, name: str) -> None:
        self._require_admin(by, "create role")
        _valid(check_name, "role", name)
        record = RoleRecord(name, (), self._clock())

        def change(table: RoleTable) -> RoleTable:
            if name in table.roles:
                raise AuthError("conflict", f"role {name!r} exists already")
            if len(table.roles) >= ROLES_MAX:
                raise AuthError("bad_request", f"the cluster has {ROLES_MAX} roles, the "
                                "limit; delete unused ones first")
            return RoleTable(table.serial, {**table.roles, name: record})
        await self._change(ROLES_KEY, change)
        self.audit.info("role_created", role=name, by=by.user)

    async def delete_role(self, by: Principal, name: str) -> None:
        """Delete a role and take it from every user (so a role created later under the
        same name gives nobody its grants by surprise)."""
        self._require_admin(by, "delete role")
        if name == ADMIN_ROLE:
            raise AuthError("conflict", f"role {ADMIN_ROLE!r} is built in; it cannot be "
                            "deleted")

        def change(table: RoleTable) -> RoleTable:
            if name not in table.roles:
                raise AuthError("not_found", f"role {name!r} does not exist")
            return RoleTable(table.serial, {n: r for n, r in table.roles.items() if n != name})
        await self._change(ROLES_KEY, change)

        def strip(table: UserTable) -> UserTable | None:
            holders = [u for u in table.users.values() if name in u.roles]
            if not holders:
                return None
            users = dict(table.users)
            for user in holders:
                users[user.name] = msgspec.structs.replace(
                    user, roles=tuple(r for r in user.roles if r != name))
            return UserTable(table.serial, users)
        await self._change(USERS_KEY, strip)
        self.audit.info("role_deleted", role=name, by=by.user)

    async def role_grant(self, by: Principal, role: str, grant: Grant) -> None:
        self._require_admin(by, "change a role")
        _valid(check_grant, grant)

        def update(record: RoleRecord) -> RoleRecord:
            if grant in record.grants:
                return record
            if len(record.grants) >= GRANTS_PER_ROLE_MAX:
                raise AuthError("bad_request", f"role {role!r} has {GRANTS_PER_ROLE_MAX} "
                                "grants, the limit")
            return msgspec.structs.replace(record, grants=(*record.grants, grant))
        await self._update_role(role, update)
        self.audit.info("role_changed", role=role, granted=str(grant), by=by.user)

    async def role_revoke(self, by: Principal, role: str, grant: Grant) -> None:
        self._require_admin(by, "change a role")

        def update(record: RoleRecord) -> RoleRecord:
            if grant not in record.grants:
                raise AuthError("not_found", f"role {role!r} has no grant {grant}")
            return msgspec.structs.replace(record, grants=tuple(
                g for g in record.grants if g != grant))
        await self._update_role(role, update)
        self.audit.info("role_changed", role=role, revoked=str(grant), by=by.user)

    async def list_roles(self, by: Principal) -> list[RoleInfo]:
        self._require_admin(by, "list roles")
        await self._fresh()
        return [RoleInfo(r.name, r.grants)
                for r in sorted(self._roles().roles.values(), key=lambda r: r.name)]

    async def enable_totp(self, by: Principal, user: str) -> str:
        """Turn on (or re-enrol) TOTP for ``user``: from now on its logins need a code.
        Returns the ``otpauth://`` URI holding the new secret, for an authenticator app."""
        self._require_self_or_admin(by, user, "set another user's TOTP")
        secret = pyotp.random_base32()
        await self._update_user(user, lambda _, record: msgspec.structs.replace(
            record, totp_secret=secret, totp_last_step=0))
        self.audit.info("totp_enabled", user=user, by=by.user)
        return totp_uri(secret, user)

    async def disable_totp(self, by: Principal, user: str) -> None:
        self._require_self_or_admin(by, user, "set another user's TOTP")
        await self._update_user(user, lambda _, record: msgspec.structs.replace(
            record, totp_secret="", totp_last_step=0))
        self.audit.info("totp_disabled", user=user, by=by.user)

    async def create_api_token(self, by: Principal, user: str, name: str, ttl_s: float
                               ) -> IssuedToken:
        """A token for a program acting as ``user``: no TOTP, valid for ``ttl_s`` unless
        revoked (``revoke_token`` with its id; ``list_api_tokens`` shows them)."""
        self._require_self_or_admin(by, user, "create another user's API token")
        if not name or len(name) > API_TOKEN_NAME_CHARS_MAX or not name.isprintable():
            raise AuthError("bad_request", "an API token's name has 1-"
                            f"{API_TOKEN_NAME_CHARS_MAX} printable characters")
        if not 0 < ttl_s <= API_TOKEN_TTL_S_MAX:
            raise AuthError("bad_request", f"ttl_s {ttl_s} is out of range: more than 0, at "
                            f"most {API_TOKEN_TTL_S_MAX:.0f} (366 days)")
        await self._fresh()
        record = self._users().users.get(user)
        if record is None:
            raise AuthError("not_found", f"user {user!r} does not exist")
        issued = self._issue(record, "api", ttl_s)
        entry = ApiTokenRecord(issued.token_id, user, name, self._clock(), issued.expires_at)

        def change(table: ApiTokenTable) -> ApiTokenTable:
            now = self._clock()
            tokens = {i: t for i, t in table.tokens.items() if t.expires_at > now}
            if len(tokens) >= API_TOKENS_MAX:
                raise AuthError("bad_request", f"the cluster has {API_TOKENS_MAX} API tokens, "
                                "the limit; revoke unused ones first")
            return ApiTokenTable(table.serial, {**tokens, entry.id: entry})
        await self._change(API_TOKENS_KEY, change)
        self.audit.info("token_issued", user=user, kind="api", name=name,
                        token_id=issued.token_id, expires_at=round(issued.expires_at, 3),
                        by=by.user)
        return issued

    async def list_api_tokens(self, by: Principal, user: str | None = None
                              ) -> list[ApiTokenInfo]:
        """The API tokens in force of ``user`` (None: of every user, admin only)."""
        if user is None:
            self._require_admin(by, "list every user's API tokens")
        else:
            self._require_self_or_admin(by, user, "list another user's API tokens")
        await self._fresh()
        now = self._clock()
        return [ApiTokenInfo(t.id, t.user, t.name, t.created_at, t.expires_at)
                for t in sorted(self._api_tokens().tokens.values(), key=lambda t: t.created_at)
                if (user is None or t.user == user) and t.expires_at > now]

    async def revoke_token(self, by: Principal, token_id: str) -> None:
        """Revoke an API token (its user's or an admin's right) or a session token (an
        admin's, by the id the audit log shows at login; or the caller's own)."""
        self._require_enabled()
        if not token_id or len(token_id) > 64:
            raise AuthError("bad_request", "a token id has 1-64 characters")
        await self._fresh()
        listed = self._api_tokens().tokens.get(token_id)
        if listed is not None:
            if listed.user != by.user and not by.is_admin:
                raise self._refused(by, "revoke another user's API token")
            await self._revoke(token_id, listed.expires_at, listed.user, by.user)
        elif token_id == by.token_id:
            await self._revoke(token_id, by.expires_at, by.user, by.user)
        elif by.is_admin:
            # A session token's expiry is not stored: keep the revocation as long as a
            # session token made now would live.
            await self._revoke(token_id, self._clock() + self._token_ttl_s, "", by.user)
        else:
            raise AuthError("not_found", f"user {by.user!r} has no API token {token_id!r}; "
                            "a session token is revoked by logging out with it")

    def counters(self) -> dict[str, int]:
        return {"auth_logins": self.logins, "auth_failed_logins": self.failed_logins,
                "auth_throttled_logins": self.throttled_logins,
                "auth_permission_denied": self.denials,
                "auth_unauthenticated": self.unauthenticated}


def _read_admin_password(path: Path) -> str:
    """The bootstrap admin's password from ``[auth] admin_password_file`` (one line)."""
    try:
        password = path.read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise StartupError(f"auth.admin_password_file {path}: cannot read it: {exc}") from None
    try:
        check_password(password)
    except AuthInputError as exc:
        raise StartupError(f"auth.admin_password_file {path}: {exc}") from None
    return password


def _uid() -> str:
    return secrets.token_hex(8)


def _peer_host(peer: str) -> str:
    """The address part of ``host:port`` / ``[v6]:port`` (the back-off is per address:
    each connection has a new port)."""
    if peer.startswith("["):
        return peer[1:].split("]", 1)[0]
    if peer.count(":") == 1:
        return peer.split(":", 1)[0]
    return peer


def _token_id() -> str:
    return secrets.token_urlsafe(TOKEN_ID_BYTES)


_TOKEN_REFUSALS = {
    "expired": "the token has expired; log in again",
    "revoked": "the token was revoked; log in again",
    "user_deleted": "the token's user no longer exists",
    "not_bootstrapped": "auth is starting on this node; retry in a few seconds",
}


def _valid(check: Callable[..., None], *args: object) -> None:
    """Run a ``security.auth`` check; its refusal as ``bad_request``."""
    try:
        check(*args)
    except AuthInputError as exc:
        raise AuthError("bad_request", str(exc)) from None


def _valid_password(password: str) -> None:
    _valid(check_password, password)


def _with_user(table: UserTable, record: UserRecord) -> UserTable:
    return UserTable(table.serial, {**table.users, record.name: record})


def _keep_an_admin(table: UserTable, losing: str) -> None:
    """Refuse a change that leaves the cluster without a user of role admin."""
    admins = {u.name for u in table.users.values() if ADMIN_ROLE in u.roles}
    if admins == {losing}:
        raise AuthError("conflict", f"user {losing!r} is the last user with role "
                        f"{ADMIN_ROLE!r}; grant it to another user first")


def _tokens_without(table: ApiTokenTable, drop: Callable[[ApiTokenRecord], bool]
                    ) -> ApiTokenTable | None:
    kept = {i: t for i, t in table.tokens.items() if not drop(t)}
    return None if len(kept) == len(table.tokens) else ApiTokenTable(table.serial, kept)
