"""Who may do what: users, roles and grants, signed tokens, TOTP codes, the password policy
and the login back-off, as pure logic (no I/O, no clock: time arrives as ``now``).

The records here are what the strong system keyspace ``system_auth`` holds
(``runtime.auth`` reads and changes them by compare-and-set). Each table is one register,
so one compare-and-set changes it atomically and two admins changing it at once cannot lose
each other's change (the loser re-applies its change to the winner's table):

=============== =====================================================================
partition key   register value
=============== =====================================================================
``secret``      ``SigningSecret``: the cluster's HMAC key for tokens (made once)
``users``       ``UserTable``: every user with its password hash, roles and TOTP state
``roles``       ``RoleTable``: every role with its grants
``api_tokens``  ``ApiTokenTable``: the API tokens in force (an allow-list)
``revoked``     ``RevokedTable``: revoked session tokens until they expire (a deny-list)
=============== =====================================================================

Tokens are ``ll1.<claims>.<mac>`` (base64url, no padding): the claims (msgpack) say the
token's id, its user (and the user's ``uid``, so a user deleted and created again does not
inherit old tokens), its kind and its lifetime; the MAC is HMAC-SHA256 of the claims under
the cluster secret. Any node checks a token by itself; revocation is a table lookup.
"""

from __future__ import annotations

import base64
import binascii
import collections
import dataclasses
import hashlib
import hmac
import re
from typing import Annotated

import msgspec
import pyotp

from leaderless.core.keys import KeyError_, check_keyspace_name

AUTH_KEYSPACE = "system_auth"
AUTH_REPLICATION = 3
"""Like ``system_locks``: a majority (2 of 3 replicas) must be up to log in for the first
time in ``VIEW_STALE_MAX_S`` or to change users, roles or tokens."""
SECRET_KEY = b"secret"
USERS_KEY = b"users"
ROLES_KEY = b"roles"
API_TOKENS_KEY = b"api_tokens"
REVOKED_KEY = b"revoked"
TABLE_KEYS = (SECRET_KEY, USERS_KEY, ROLES_KEY, API_TOKENS_KEY, REVOKED_KEY)

LEVELS = ("read", "write", "execute", "admin")
"""admin ⊃ execute ⊃ write ⊃ read: a grant of one level allows the levels before it.
``execute`` matters on ``system_tasks`` only: submitting a pickled task (arbitrary code
run on the nodes) needs it; registered task functions need ``write``."""
ALL_KEYSPACES = "*"
ADMIN_ROLE = "admin"
"""The built-in role with ``admin`` on every keyspace: user, role and keyspace management."""
ADMIN_USER = "admin"
"""The user the first node of an auth-enabled cluster creates (``runtime.auth``)."""

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
"""User and role names: 1-64 characters, e.g. ``alice``, ``ci-bot``, ``bob@example.org``."""
USERS_MAX = 1000
"""Users in a cluster: the users table is one register (~250 bytes a user, so ~250 KB at
the bound, written on every change and TOTP login)."""
ROLES_MAX = 1000
ROLES_PER_USER_MAX = 32
GRANTS_PER_ROLE_MAX = 100
GRANT_PREFIX_BYTES_MAX = 1024
"""As long as a partition key may be (``core.keys``)."""
API_TOKENS_MAX = 1000
API_TOKEN_NAME_CHARS_MAX = 64
REVOKED_MAX = 20_000
"""Session tokens revoked and not yet expired (~40 bytes each: ~800 KB at the bound).
Beyond it a logout is refused with ``overloaded``; a shorter ``token_ttl_s`` frees room
sooner."""

PASSWORD_CHARS_MIN = 12
PASSWORD_CHARS_MAX = 1024
"""Bounds the work a hash costs (argon2 reads the whole password)."""
ARGON2_TIME_COST = 2
ARGON2_MEMORY_KIB = 19_456
ARGON2_PARALLELISM = 1
"""argon2id with OWASP's first recommendation (19 MiB, 2 passes, 1 lane): about 22 ms a
hash on the 2-core test machine (RFC 9106's 64 MiB / 3 / 4 measured 127 ms there, too slow
for a login path that must also resist floods). Hashes made with other parameters are
re-hashed at the next successful login."""

TOKEN_VERSION = "ll1"
TOKEN_CHARS_MAX = 1024
"""A token is ~150 characters; longer input is refused before any decoding."""
TOKEN_KINDS = ("session", "api")
SECRET_BYTES = 32
"""HMAC-SHA256 key length (the hash's block is 64 bytes; 32 random bytes is its strength)."""

TOTP_STEP_S = 30
TOTP_DIGITS = 6
TOTP_WINDOW_STEPS = 1
"""A code of the step before or after the current one is accepted (RFC 6238 §5.2: clock
drift and typing time)."""
TOTP_ISSUER = "leaderless"

FAILURES_FREE = 5
"""Failed logins per user and per peer address before back-off starts."""
BACKOFF_INITIAL_S = 1.0
BACKOFF_MAX_S = 300.0
"""The wait after the 6th failure is 1 s and doubles per further failure, up to 5 min."""
FAILURE_MEMORY_S = 900.0
"""A user or address with no failure for 15 minutes starts again with free attempts."""
THROTTLE_ENTRIES_MAX = 10_000
"""Users and addresses tracked each (~200 bytes an entry: ~4 MB at the bound); the least
recently failed is forgotten first."""

UserName = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN.pattern)]
RoleName = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN.pattern)]


class AuthInputError(ValueError):
    """A name, password, grant or token parameter breaks a rule; the message says which."""


# -- grants and principals --------------------------------------------------------------


class Grant(msgspec.Struct, frozen=True):
    """A role's permission: ``level`` on ``keyspace`` (or every keyspace, ``*``), limited to
    the partition keys starting with ``prefix`` (``b""``: the whole keyspace)."""

    level: str
    keyspace: str
    prefix: bytes = b""

    def covers(self, level: str, keyspace: str, key: bytes | None) -> bool:
        if LEVELS.index(self.level) < LEVELS.index(level):
            return False
        if self.keyspace != ALL_KEYSPACES and self.keyspace != keyspace:
            return False
        if key is None:
            return not self.prefix
        return key.startswith(self.prefix)

    def __str__(self) -> str:
        prefix = f" prefix {self.prefix!r}" if self.prefix else ""
        return f"{self.level} on {self.keyspace}{prefix}"


ADMIN_GRANT = Grant("admin", ALL_KEYSPACES)


def check_grant(grant: Grant) -> None:
    if grant.level not in LEVELS:
        raise AuthInputError(f"grant level {grant.level!r} is unknown; use one of "
                             f"{', '.join(LEVELS)}")
    if grant.keyspace != ALL_KEYSPACES:
        try:
            check_keyspace_name(grant.keyspace)
        except KeyError_ as exc:
            raise AuthInputError(f"grant: {exc} (or '*' for every keyspace)") from None
    if len(grant.prefix) > GRANT_PREFIX_BYTES_MAX:
        raise AuthInputError(f"a grant's key prefix has at most {GRANT_PREFIX_BYTES_MAX} bytes "
                             f"(got {len(grant.prefix)})")


@dataclasses.dataclass(frozen=True)
class Principal:
    """Who is calling, resolved from a token: the user, its roles' grants at the time of
    resolution, and the token's id and expiry."""

    user: str
    roles: tuple[str, ...]
    grants: tuple[Grant, ...]
    token_id: str
    expires_at: float
    """Unix seconds."""
    is_admin: bool
    """Has role ``admin`` (admin on ``*``): user and role management, keyspace creation."""

    def allows(self, level: str, keyspace: str, key: bytes | None = None) -> bool:
        """``key`` None means the whole keyspace (a scan, a watch of prefix b""): only a
        grant without prefix allows that; a key is allowed by a grant whose prefix it
        starts with."""
        return any(grant.covers(level, keyspace, key) for grant in self.grants)

    def sees_keyspace(self, keyspace: str) -> bool:
        """Any grant on it (or on ``*``): the keyspace is listed to this caller."""
        return any(g.keyspace in (keyspace, ALL_KEYSPACES) for g in self.grants)


def check_name(what: str, name: str) -> None:
    """``what`` is "user" or "role"."""
    if not NAME_PATTERN.match(name):
        raise AuthInputError(f"{what} name {name[:70]!r} is invalid: use 1-64 letters, "
                             "digits or '_.@-', starting with a letter or digit")


def check_password(password: str) -> None:
    if len(password) < PASSWORD_CHARS_MIN:
        raise AuthInputError(f"the password has {len(password)} characters; it needs at least "
                             f"{PASSWORD_CHARS_MIN} (a passphrase of a few words is easiest)")
    if len(password) > PASSWORD_CHARS_MAX:
        raise AuthInputError(f"the password has {len(password)} characters; the limit is "
                             f"{PASSWORD_CHARS_MAX}")


# -- the records in system_auth ------------------------------------------------------------


class SigningSecret(msgspec.Struct, frozen=True, array_like=True):
    key: Annotated[bytes, msgspec.Meta(min_length=SECRET_BYTES, max_length=SECRET_BYTES)]
    created_at: float


class UserRecord(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True):
    name: UserName
    uid: str
    """Random, new for each creation: tokens carry it, so a user deleted and created again
    under the same name does not inherit the old user's tokens."""
    password_hash: str
    roles: Annotated[tuple[RoleName, ...], msgspec.Meta(max_length=ROLES_PER_USER_MAX)]
    created_at: float
    totp_secret: str = ""
    """Base32 RFC 6238 secret; "" = TOTP off."""
    totp_last_step: int = 0
    """The step of the last code accepted: a code is good once (RFC 6238 §5.2)."""


class RoleRecord(msgspec.Struct, frozen=True, array_like=True):
    name: RoleName
    grants: Annotated[tuple[Grant, ...], msgspec.Meta(max_length=GRANTS_PER_ROLE_MAX)]
    created_at: float


class ApiTokenRecord(msgspec.Struct, frozen=True, array_like=True):
    id: str
    user: UserName
    name: str
    created_at: float
    expires_at: float


class UserTable(msgspec.Struct, frozen=True, array_like=True):
    serial: int
    """The register version this table was written at (so a copy learned from a watch can
    be ordered against one read)."""
    users: Annotated[dict[str, UserRecord], msgspec.Meta(max_length=USERS_MAX)]


class RoleTable(msgspec.Struct, frozen=True, array_like=True):
    serial: int
    roles: Annotated[dict[str, RoleRecord], msgspec.Meta(max_length=ROLES_MAX)]


class ApiTokenTable(msgspec.Struct, frozen=True, array_like=True):
    serial: int
    tokens: Annotated[dict[str, ApiTokenRecord], msgspec.Meta(max_length=API_TOKENS_MAX)]


class RevokedTable(msgspec.Struct, frozen=True, array_like=True):
    serial: int
    tokens: Annotated[dict[str, float], msgspec.Meta(max_length=REVOKED_MAX)]
    """Token id -> its expiry (unix s): an entry is dropped once its token has expired."""

    def pruned(self, now: float) -> dict[str, float]:
        return {tid: exp for tid, exp in self.tokens.items() if exp > now}


Table = UserTable | RoleTable | ApiTokenTable | RevokedTable
EMPTY_TABLES: dict[bytes, Table] = {
    USERS_KEY: UserTable(0, {}), ROLES_KEY: RoleTable(0, {}),
    API_TOKENS_KEY: ApiTokenTable(0, {}), REVOKED_KEY: RevokedTable(0, {})}
_TABLE_TYPES: dict[bytes, type[Table]] = {key: type(t) for key, t in EMPTY_TABLES.items()}
_encoder = msgspec.msgpack.Encoder()
_decoders = {key: msgspec.msgpack.Decoder(kind) for key, kind in _TABLE_TYPES.items()}
_secret_decoder = msgspec.msgpack.Decoder(SigningSecret)


def encode_record(record: Table | SigningSecret) -> bytes:
    return _encoder.encode(record)


def decode_table(key: bytes, value: bytes | None) -> Table:
    """The table in a register (absent: empty, serial 0)."""
    if value is None:
        return EMPTY_TABLES[key]
    return _decoders[key].decode(value)


def decode_secret(value: bytes | None) -> SigningSecret | None:
    return None if value is None else _secret_decoder.decode(value)


# -- tokens ----------------------------------------------------------------------------------


class TokenClaims(msgspec.Struct, frozen=True, array_like=True):
    id: str
    user: str
    uid: str
    kind: str
    """``session`` (a login) or ``api`` (for programs; valid while in the API-token table)."""
    issued_at: float
    expires_at: float


class TokenError(Exception):
    """A token is malformed, forged or expired: ``reason`` says which (for the audit log;
    the caller hears only ``unauthenticated``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_claims_decoder = msgspec.msgpack.Decoder(TokenClaims)
_B64URL = re.compile(r"[A-Za-z0-9_-]+")
"""Each part of a token: base64url without padding (anything else is refused, so one token
has exactly one spelling)."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: bytes, signed: str) -> bytes:
    return hmac.new(secret, signed.encode("ascii"), hashlib.sha256).digest()


def sign_token(claims: TokenClaims, secret: bytes) -> str:
    signed = f"{TOKEN_VERSION}.{_b64(_encoder.encode(claims))}"
    return f"{signed}.{_b64(_mac(secret, signed))}"


def verify_token(token: str, secret: bytes, now: float) -> TokenClaims:
    """The token's claims if ``secret`` signed it and it has not expired at ``now`` (unix
    s); else ``TokenError``. The MAC is checked before the claims are decoded."""
    if len(token) > TOKEN_CHARS_MAX:
        raise TokenError("too_long")
    parts = token.split(".")
    if (len(parts) != 3 or parts[0] != TOKEN_VERSION
            or not all(_B64URL.fullmatch(part) for part in parts[1:])):
        raise TokenError("malformed")
    signed = f"{parts[0]}.{parts[1]}"
    try:
        mac = _unb64(parts[2])
    except (binascii.Error, ValueError):
        raise TokenError("malformed") from None
    if not hmac.compare_digest(mac, _mac(secret, signed)):
        raise TokenError("bad_signature")
    try:
        claims = _claims_decoder.decode(_unb64(parts[1]))
    except (binascii.Error, ValueError, msgspec.DecodeError):
        raise TokenError("malformed") from None
    if claims.kind not in TOKEN_KINDS:
        raise TokenError("malformed")
    if claims.expires_at <= now:
        raise TokenError("expired")
    return claims


# -- TOTP (RFC 6238) ------------------------------------------------------------------------


def totp_step(now: float) -> int:
    return int(now // TOTP_STEP_S)


def totp_code(secret: str, step: int) -> str:
    return pyotp.TOTP(secret, digits=TOTP_DIGITS, interval=TOTP_STEP_S).generate_otp(step)


def totp_match(secret: str, code: str, now: float, last_step: int) -> int | None:
    """The step whose code ``code`` is (within ±``TOTP_WINDOW_STEPS`` of ``now``), if that
    step is after ``last_step`` (the last code used); else None (wrong or replayed)."""
    code = code.strip()
    if len(code) != TOTP_DIGITS or not code.isdigit():
        return None
    current = totp_step(now)
    for step in range(current - TOTP_WINDOW_STEPS, current + TOTP_WINDOW_STEPS + 1):
        if step > last_step and hmac.compare_digest(totp_code(secret, step), code):
            return step
    return None


def totp_uri(secret: str, user: str) -> str:
    """The ``otpauth://`` URI an authenticator app reads (usually from a QR code)."""
    return pyotp.TOTP(secret, digits=TOTP_DIGITS, interval=TOTP_STEP_S).provisioning_uri(
        name=user, issuer_name=TOTP_ISSUER)


# -- login back-off ------------------------------------------------------------------------


@dataclasses.dataclass
class _Failures:
    count: int
    blocked_until: float
    last_failure: float


class LoginThrottle:
    """Failed logins per user name and per peer address, with exponential back-off after
    ``FAILURES_FREE`` failures; bounded to ``THROTTLE_ENTRIES_MAX`` entries of each kind.
    Per node: an attacker spreading guesses over the nodes gets each node's allowance."""

    def __init__(self) -> None:
        self._by_user: collections.OrderedDict[str, _Failures] = collections.OrderedDict()
        self._by_peer: collections.OrderedDict[str, _Failures] = collections.OrderedDict()

    def retry_after(self, user: str, peer: str, now: float) -> float:
        """Seconds until a login for ``user`` from ``peer`` may be tried (0: now)."""
        wait = 0.0
        for table, key in ((self._by_user, user), (self._by_peer, peer)):
            entry = table.get(key)
            if entry is not None:
                wait = max(wait, entry.blocked_until - now)
        return wait

    def failed(self, user: str, peer: str, now: float) -> None:
        for table, key in ((self._by_user, user), (self._by_peer, peer)):
            entry = table.pop(key, None)
            if entry is None or now - entry.last_failure > FAILURE_MEMORY_S:
                entry = _Failures(0, 0.0, now)
            entry.count += 1
            entry.last_failure = now
            beyond = entry.count - FAILURES_FREE
            if beyond > 0:
                entry.blocked_until = now + min(BACKOFF_MAX_S,
                                                BACKOFF_INITIAL_S * 2 ** min(beyond - 1, 30))
            table[key] = entry  # most recent last
            while len(table) > THROTTLE_ENTRIES_MAX:
                table.popitem(last=False)

    def succeeded(self, user: str) -> None:
        """The user proved its password: its count starts again (the address's does not, so
        an attacker cannot clear its count by logging in to its own account)."""
        self._by_user.pop(user, None)

    def __len__(self) -> int:
        return len(self._by_user) + len(self._by_peer)
