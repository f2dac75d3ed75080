"""The native client protocol for data: msgpack frames on the node's client port.

A connection carries any number of requests in flight (pipelining): each has a client-
chosen ``id`` and gets exactly one reply with the same id, in whatever order they finish.
Framing is ``core.codec``'s (4-byte big-endian length, then msgpack). Tags 120-149 are
this module's data messages, 150-179 its authentication messages (requests 150-169,
replies 170-179), 180-199 its task messages (requests 180-189, replies 190-199); all
append-only.

Consistency is one of ONE, TWO, QUORUM, ALL (None: the keyspace's default).
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from leaderless.core.cells import VALUE_BYTES_HARD_MAX
from leaderless.core.kv_messages import (
    ErrorText,
    RequestId,
    SortKey,
)
from leaderless.core.messages import Name
from leaderless.core.paxos_messages import LEASE_TTL_MS_MAX, LOCK_NAME_BYTES_MAX, OWNER_BYTES_MAX
from leaderless.core.tasks import (
    ERROR_BYTES_MAX,
    FUNCTION_BYTES_MAX,
    HISTORY_MAX,
    QUEUE_BYTES_MAX,
    RESULT_BYTES_MAX,
    TAG_BYTES_MAX,
    TAGS_MAX,
    TASK_ID_BYTES_MAX,
    TaskSpec,
)

CONSISTENCY_LEVELS = ("ONE", "TWO", "QUORUM", "ALL")
MODES = ("eventual", "strong")
REPLICATION_MAX = 15
TTL_S_MAX = 10 * 365 * 86400
CLIENT_SCAN_ROWS_MAX = 10_000

Consistency = Annotated[str, msgspec.Meta(max_length=8)]
# Keys are checked by the node (core.keys.check_key) so an oversized key gets a specific
# error instead of a generic decode failure; the frame bound still caps memory.
AnyKey = Annotated[bytes, msgspec.Meta(max_length=64 * 1024)]
AnyValue = Annotated[bytes, msgspec.Meta(max_length=VALUE_BYTES_HARD_MAX)]
Text = Annotated[str, msgspec.Meta(max_length=256)]
Idempotency = Annotated[bytes, msgspec.Meta(max_length=64)]
Counter = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


class Put(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True, tag=120):
    id: RequestId
    keyspace: Text
    key: AnyKey
    value: AnyValue
    sort: AnyKey = b""
    consistency: Consistency | None = None
    ttl_s: Annotated[float, msgspec.Meta(gt=0, le=TTL_S_MAX)] | None = None
    idempotency: Idempotency = b""
    """Strong keyspaces: the change's id, the same on every retry of it (see Cas)."""
    fence_lock: Text = ""
    """Write under a lock: the lock's name, with ``fence_token`` the lease's fencing token.
    The write is refused (``fenced``) if the lock has granted a newer token."""
    fence_token: Annotated[int, msgspec.Meta(ge=0)] = 0
    retry_ms: Annotated[int, msgspec.Meta(ge=0, le=86_400_000)] = 0
    """A retry after an ambiguous failure (the connection was lost after sending): how
    long ago, by the client's clock, it first sent this change; 0: the first attempt. With
    the same ``idempotency`` the node applies it only if it can tell it was not applied
    already, else answers ``contention`` (maybe applied)."""


class Get(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True, tag=121):
    id: RequestId
    keyspace: Text
    key: AnyKey
    sort: AnyKey = b""
    consistency: Consistency | None = None


class Delete(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True, tag=122):
    id: RequestId
    keyspace: Text
    key: AnyKey
    sort: AnyKey = b""
    consistency: Consistency | None = None
    idempotency: Idempotency = b""
    fence_lock: Text = ""
    """Write under a lock: the lock's name, with ``fence_token`` the lease's fencing token.
    The write is refused (``fenced``) if the lock has granted a newer token."""
    fence_token: Annotated[int, msgspec.Meta(ge=0)] = 0
    retry_ms: Annotated[int, msgspec.Meta(ge=0, le=86_400_000)] = 0
    """A retry after an ambiguous failure (the connection was lost after sending): how
    long ago, by the client's clock, it first sent this change; 0: the first attempt. With
    the same ``idempotency`` the node applies it only if it can tell it was not applied
    already, else answers ``contention`` (maybe applied)."""


class Scan(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True, tag=123):
    """Rows of partition ``key`` with start <= sort < end, in sort-key order."""

    id: RequestId
    keyspace: Text
    key: AnyKey
    start: AnyKey | None = None
    end: AnyKey | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=CLIENT_SCAN_ROWS_MAX)] = 1000
    consistency: Consistency | None = None


class CreateKeyspace(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True,
                     tag=124):
    id: RequestId
    name: Text
    replication: Annotated[int, msgspec.Meta(ge=1, le=REPLICATION_MAX)] = 3
    mode: Text = "eventual"
    read_consistency: Consistency = "QUORUM"
    write_consistency: Consistency = "QUORUM"
    if_not_exists: bool = False


class CompareAndSet(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True,
                    tag=127):
    """Strong keyspaces: set ``value`` if the key's current version is ``expected_version``
    (or its value is ``expected_value``, or it is absent with ``expected_absent``); exactly
    one expectation. A retry after an ambiguous failure must reuse ``idempotency`` (1-64
    bytes; the node remembers the last 32 changes of each key), so it is not applied twice."""

    id: RequestId
    keyspace: Text
    key: AnyKey
    value: AnyValue
    sort: AnyKey = b""
    expected_version: Annotated[int, msgspec.Meta(ge=0)] | None = None
    expected_value: AnyValue | None = None
    expected_absent: bool = False
    idempotency: Idempotency = b""
    fence_lock: Text = ""
    """Write under a lock: the lock's name, with ``fence_token`` the lease's fencing token.
    The write is refused (``fenced``) if the lock has granted a newer token."""
    fence_token: Annotated[int, msgspec.Meta(ge=0)] = 0
    retry_ms: Annotated[int, msgspec.Meta(ge=0, le=86_400_000)] = 0
    """A retry after an ambiguous failure (the connection was lost after sending): how
    long ago, by the client's clock, it first sent this change; 0: the first attempt. With
    the same ``idempotency`` the node applies it only if it can tell it was not applied
    already, else answers ``contention`` (maybe applied)."""


class Increment(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True, tag=128):
    """Strong keyspaces: add ``delta`` to the key's counter (a decimal int64; absent is 0)."""

    id: RequestId
    keyspace: Text
    key: AnyKey
    delta: Counter = 1
    sort: AnyKey = b""
    idempotency: Idempotency = b""
    fence_lock: Text = ""
    """Write under a lock: the lock's name, with ``fence_token`` the lease's fencing token.
    The write is refused (``fenced``) if the lock has granted a newer token."""
    fence_token: Annotated[int, msgspec.Meta(ge=0)] = 0
    retry_ms: Annotated[int, msgspec.Meta(ge=0, le=86_400_000)] = 0
    """A retry after an ambiguous failure (the connection was lost after sending): how
    long ago, by the client's clock, it first sent this change; 0: the first attempt. With
    the same ``idempotency`` the node applies it only if it can tell it was not applied
    already, else answers ``contention`` (maybe applied)."""


LockName = Annotated[str, msgspec.Meta(max_length=LOCK_NAME_BYTES_MAX)]
Owner = Annotated[str, msgspec.Meta(max_length=OWNER_BYTES_MAX)]
TtlMs = Annotated[int, msgspec.Meta(ge=0, le=LEASE_TTL_MS_MAX)]


class AcquireLock(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True, tag=138):
    """Take lock ``name`` for ``owner`` (an id the client chose, unique per holder) with a
    lease of ``ttl_ms``; if it is held, wait up to ``wait_ms`` for its release or expiry.
    Answered with ``Lease`` or ``Failure(lock_held)``."""

    id: RequestId
    name: LockName
    owner: Owner
    ttl_ms: TtlMs
    wait_ms: Annotated[int, msgspec.Meta(ge=0, le=3_600_000)] = 0
    idempotency: Idempotency = b""


class RenewLock(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True, tag=139):
    """Extend lease ``token`` by ``ttl_ms`` from now: ``Lease``, or ``Failure(lease_lost)``."""

    id: RequestId
    name: LockName
    owner: Owner
    token: Annotated[int, msgspec.Meta(ge=0)]
    ttl_ms: TtlMs
    idempotency: Idempotency = b""


class ReleaseLock(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True, tag=140):
    """Free the lock if ``token`` is still its lease: ``Done`` or ``Failure(lease_lost)``."""

    id: RequestId
    name: LockName
    owner: Owner
    token: Annotated[int, msgspec.Meta(ge=0)]
    idempotency: Idempotency = b""


class LockStatus(msgspec.Struct, frozen=True, array_like=True, tag=141):
    """Who holds lock ``name`` (a linearizable read): ``LockInfo``."""

    id: RequestId
    name: LockName


class Watch(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True, tag=144):
    """Strong keyspaces: stream the changes of key (``prefix`` False) or of every key whose
    partition key starts with ``key`` (``prefix`` True), as ``WatchEvent`` replies carrying
    this request's id, until ``Unwatch`` or a ``Failure`` (with this id) ends it. First
    comes the current state: one key's value if its version is above ``since_version``; for
    a prefix, every key's (a client resuming skips the versions it has seen)."""

    id: RequestId
    keyspace: Text
    key: AnyKey
    sort: AnyKey = b""
    prefix: bool = False
    since_version: Annotated[int, msgspec.Meta(ge=0)] = 0


class Unwatch(msgspec.Struct, frozen=True, array_like=True, tag=145):
    """End the watch started by request ``watch_id`` on this connection: ``Done``."""

    id: RequestId
    watch_id: RequestId


class DescribeRing(msgspec.Struct, frozen=True, array_like=True, tag=125):
    """The ring as this node sees it, for token-aware clients."""

    id: RequestId


class ListKeyspaces(msgspec.Struct, frozen=True, array_like=True, tag=126):
    id: RequestId


# -- replies ----------------------------------------------------------------------------


class Done(msgspec.Struct, frozen=True, array_like=True, tag=130):
    """A put, delete or keyspace creation succeeded; ``hlc`` is the write's timestamp in
    an eventual keyspace, the key's new version in a strong one."""

    id: RequestId
    hlc: int = 0


class Value(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True, tag=131):
    """A get's answer: ``found`` False means absent, deleted or expired."""

    id: RequestId
    found: bool
    value: AnyValue = b""
    hlc: int = 0
    expires_at_ms: int = 0
    version: int = 0
    """Strong keyspaces: the key's version (what ``CompareAndSet`` compares)."""


class Row(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True):
    sort: SortKey
    value: AnyValue
    hlc: int = 0
    expires_at_ms: int = 0


class Rows(msgspec.Struct, frozen=True, array_like=True, tag=132):
    id: RequestId
    rows: Annotated[list[Row], msgspec.Meta(max_length=CLIENT_SCAN_ROWS_MAX)]
    more: bool = False
    """True if the limit cut the answer short: continue from the last sort key + b"\\0"."""


class Failure(msgspec.Struct, frozen=True, array_like=True, tag=133):
    """The request failed. ``code`` is stable (see ``leaderless.client.errors``);
    ``message`` says what happened and what to do."""

    id: RequestId
    code: Text
    message: ErrorText
    received: int = 0
    """For ``unavailable``/``timeout``: replicas that answered..."""
    required: int = 0
    """...of how many the consistency level needed."""
    retry_after_s: float = 0.0
    """For ``too_many_attempts``: seconds to wait before the next login attempt."""


class RingMember(msgspec.Struct, frozen=True, array_like=True):
    name: Name
    client_address: Text
    """host:port of the member's client listener ("" if it has none)."""
    token_seed: int
    token_count: int
    zone: Text
    state: Text


class RingDescription(msgspec.Struct, frozen=True, array_like=True, tag=134):
    id: RequestId
    members: Annotated[list[RingMember], msgspec.Meta(max_length=20_000)]


class KeyspaceInfo(msgspec.Struct, frozen=True, array_like=True):
    name: Text
    replication: int
    mode: Text
    read_consistency: Text
    write_consistency: Text


class Keyspaces(msgspec.Struct, frozen=True, array_like=True, tag=135):
    id: RequestId
    keyspaces: Annotated[list[KeyspaceInfo], msgspec.Meta(max_length=10_000)]


class Changed(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True, tag=136):
    """A compare-and-set or increment was applied: the key's new version and value."""

    id: RequestId
    version: int
    value: AnyValue = b""
    duplicate: bool = False
    """The idempotency id had been applied before: this is that earlier outcome."""


class Conflict(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True, tag=137):
    """A compare-and-set's expectation did not hold: the current version and value."""

    id: RequestId
    version: int
    found: bool
    value: AnyValue = b""


class Lease(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True, tag=142):
    """A granted (or renewed) lease. ``token`` is the fencing token: it grows with every
    grant of the lock; pass it with writes made under the lock (``fence_token``). The
    lease lasts ``ttl_ms`` from when the request was sent, less the clock skew bound."""

    id: RequestId
    name: LockName
    owner: Owner
    token: int
    ttl_ms: int
    version: int = 0
    duplicate: bool = False


class LockInfo(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True, tag=143):
    id: RequestId
    name: LockName
    held: bool
    holder: Owner = ""
    token: int = 0
    """The newest token granted (the current lease's, when held)."""
    expires_in_ms: int = 0
    version: int = 0


class WatchEvent(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True, tag=146):
    """A change chosen for a watched key (``id``: the ``Watch`` request's). ``found`` False:
    the key was deleted. Versions of one key only grow."""

    id: RequestId
    key: AnyKey
    version: int
    found: bool
    value: AnyValue = b""
    sort: AnyKey = b""


# -- authentication and administration (tags 150-179) ----------------------------------

TOKEN_CHARS_MAX = 2048
"""A token's text (the auth service's signed tokens are far shorter; this only bounds the
frame field)."""
PASSWORD_CHARS_MAX = 1024
"""A password's length on the wire (the auth service applies its own policy within it)."""
TOTP_CODE_CHARS_MAX = 16
"""A TOTP code (RFC 6238 codes are 6-8 digits)."""
AUTH_LIST_MAX = 10_000
"""Users, roles or grants in one listing."""

TokenText = Annotated[str, msgspec.Meta(max_length=TOKEN_CHARS_MAX)]
Password = Annotated[str, msgspec.Meta(max_length=PASSWORD_CHARS_MAX)]
TotpCode = Annotated[str, msgspec.Meta(max_length=TOTP_CODE_CHARS_MAX)]
NameList = Annotated[list[Text], msgspec.Meta(max_length=AUTH_LIST_MAX)]


class Authenticate(msgspec.Struct, frozen=True, array_like=True, tag=150):
    """Make this connection act as the token's user (a login token or an API token):
    ``Authenticated``, or ``Failure(unauthenticated)``. With auth on, a connection must
    do this (or ``Login``) before any other request."""

    id: RequestId
    token: TokenText


class Login(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True, tag=151):
    """Check a user's password (and TOTP code, when the user has TOTP on): ``Token``, and
    the connection is authenticated as that user. Failures: ``bad_credentials``,
    ``totp_required``, ``too_many_attempts``."""

    id: RequestId
    user: Text
    password: Password
    totp: TotpCode = ""


class Logout(msgspec.Struct, frozen=True, array_like=True, tag=152):
    """Revoke the connection's token (everywhere, not only here): ``Done``; the connection
    is unauthenticated afterwards."""

    id: RequestId


class CreateUser(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True, tag=153):
    """Admins: a new user with ``roles``: ``Done``."""

    id: RequestId
    name: Text
    password: Password
    roles: NameList = msgspec.field(default_factory=list)


class DeleteUser(msgspec.Struct, frozen=True, array_like=True, tag=154):
    id: RequestId
    name: Text


class SetPassword(msgspec.Struct, frozen=True, array_like=True, tag=155):
    """Admins, or the user itself: ``Done``."""

    id: RequestId
    name: Text
    password: Password


class ListUsers(msgspec.Struct, frozen=True, array_like=True, tag=156):
    """Admins: ``Users``."""

    id: RequestId


class UserRole(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True, tag=157):
    """Admins: give ``user`` the role (``revoke``: take it away): ``Done``."""

    id: RequestId
    user: Text
    role: Text
    revoke: bool = False


class CreateRole(msgspec.Struct, frozen=True, array_like=True, tag=158):
    id: RequestId
    name: Text


class DeleteRole(msgspec.Struct, frozen=True, array_like=True, tag=159):
    id: RequestId
    name: Text


class RoleGrant(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True, tag=160):
    """Admins: add to role ``role`` the permission ``level`` (read, write, execute, admin) on
    ``keyspace`` ("*": every keyspace), limited to partition keys starting with ``prefix``
    (b"": the whole keyspace); ``revoke``: remove that permission. ``Done``."""

    id: RequestId
    role: Text
    level: Text
    keyspace: Text
    prefix: AnyKey = b""
    revoke: bool = False


class ListRoles(msgspec.Struct, frozen=True, array_like=True, tag=161):
    """Admins: ``Roles``."""

    id: RequestId


class EnableTotp(msgspec.Struct, frozen=True, array_like=True, tag=162):
    """Admins, or the user itself: turn on TOTP for ``user``: ``TotpProvisioning`` (the
    otpauth:// URI holds the secret: show it once, as a QR code or text)."""

    id: RequestId
    user: Text


class DisableTotp(msgspec.Struct, frozen=True, array_like=True, tag=163):
    id: RequestId
    user: Text


class CreateApiToken(msgspec.Struct, frozen=True, array_like=True, tag=164):
    """Admins, or the user itself: a token for a program, valid ``ttl_s`` seconds (no
    TOTP): ``Token``. Revocable by its ``token_id``."""

    id: RequestId
    user: Text
    name: Text
    ttl_s: Annotated[float, msgspec.Meta(gt=0, le=TTL_S_MAX)]


class RevokeToken(msgspec.Struct, frozen=True, array_like=True, tag=165):
    """Admins, or the token's user: ``Done``."""

    id: RequestId
    token_id: Text


class Authenticated(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True,
                    tag=170):
    """Who the connection now acts as. ``auth`` False: the cluster runs without
    authentication (the token was not needed, and every request is allowed)."""

    id: RequestId
    user: Text
    roles: NameList = msgspec.field(default_factory=list)
    expires_at: float = 0.0
    """Unix seconds."""
    auth: bool = True


class Token(msgspec.Struct, frozen=True, array_like=True, tag=171):
    """A token issued by ``Login`` or ``CreateApiToken``: send it as ``Authenticate`` on
    each new connection (or as an HTTP ``Authorization: Bearer`` header)."""

    id: RequestId
    token: TokenText
    token_id: Text
    user: Text
    expires_at: float


class UserEntry(msgspec.Struct, frozen=True, array_like=True):
    name: Text
    roles: NameList
    totp: bool
    created_at: float


class Users(msgspec.Struct, frozen=True, array_like=True, tag=172):
    id: RequestId
    users: Annotated[list[UserEntry], msgspec.Meta(max_length=AUTH_LIST_MAX)]


class GrantEntry(msgspec.Struct, frozen=True, array_like=True):
    level: Text
    keyspace: Text
    prefix: AnyKey = b""


class RoleEntry(msgspec.Struct, frozen=True, array_like=True):
    name: Text
    grants: Annotated[list[GrantEntry], msgspec.Meta(max_length=AUTH_LIST_MAX)]


class Roles(msgspec.Struct, frozen=True, array_like=True, tag=173):
    id: RequestId
    roles: Annotated[list[RoleEntry], msgspec.Meta(max_length=AUTH_LIST_MAX)]


class TotpProvisioning(msgspec.Struct, frozen=True, array_like=True, tag=174):
    id: RequestId
    uri: Annotated[str, msgspec.Meta(max_length=2048)]
    """otpauth://totp/...?secret=...: give it to an authenticator app."""


# -- tasks (tags 180-199: requests 180-189, replies 190-199) ----------------------------

TASK_IDS_PER_WAIT_MAX = 1000
"""Tasks one ``WaitTasks`` watches: a client with more outstanding sends several."""
TASK_WAIT_MS_MAX = 300_000
"""The longest one ``WaitTasks`` holds (5 min): a long poll must end some time, and a
client re-polls at once."""
TASK_LIST_MAX = 1000
"""Tasks in one ``ListTasks`` answer."""
TASK_REPLY_RESULT_BYTES_MAX = 4 * 1024 * 1024
"""Result and error bytes in one ``TaskInfos``/``TaskList`` answer: beyond, the remaining
tasks come with ``result_omitted`` (fetch each with ``GetTask``), so a reply stays well
under the 8 MiB frame however large the results."""
IDEMPOTENCY_KEY_CHARS_MAX = 256

TaskId = Annotated[bytes, msgspec.Meta(min_length=1, max_length=TASK_ID_BYTES_MAX)]


class SubmitTask(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True, tag=180):
    """Queue a task: ``TaskSubmitted``. ``task_id`` (chosen by the client, so a retry of a
    submit whose reply was lost is the same task, not a second one) or
    ``idempotency_key`` (the node derives the id from it: submitting the same key again
    returns the first task's id). ``spec.submitter`` is set by the node (the caller's
    user). A pickled task needs the cluster to allow them, and with auth the ``execute``
    permission on ``system_tasks``."""

    id: RequestId
    spec: TaskSpec
    task_id: Annotated[bytes, msgspec.Meta(max_length=TASK_ID_BYTES_MAX)] = b""
    idempotency_key: Annotated[str, msgspec.Meta(max_length=IDEMPOTENCY_KEY_CHARS_MAX)] = ""


class GetTask(msgspec.Struct, frozen=True, array_like=True, tag=181):
    """A task's state, result and history (a linearizable read): ``TaskInfo`` (``found``
    False: no such task, or its result's TTL has passed)."""

    id: RequestId
    task_id: TaskId


class CancelTask(msgspec.Struct, frozen=True, array_like=True, tag=182):
    """Cancel a task that has not finished (a running one's worker is stopped at its next
    lease renewal): the new ``TaskInfo``. ``Failure(not_found)`` for no such task,
    ``Failure(conflict)`` for one that finished already."""

    id: RequestId
    task_id: TaskId


class ListTasks(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True, tag=183):
    """Unfinished tasks of ``queue`` (from the index; ``state`` filters): ``TaskList``,
    results omitted."""

    id: RequestId
    queue: Annotated[str, msgspec.Meta(max_length=QUEUE_BYTES_MAX)] = "default"
    state: Annotated[str, msgspec.Meta(max_length=16)] = ""
    limit: Annotated[int, msgspec.Meta(ge=1, le=TASK_LIST_MAX)] = 100


class WaitTasks(msgspec.Struct, frozen=True, array_like=True, tag=184):
    """Long poll: answered (``TaskInfos``) as soon as at least one of ``task_ids`` has
    finished, with every finished one, or after ``timeout_ms`` with none. Ids of tasks
    that do not exist (never submitted, or past their result TTL) come back in
    ``missing``."""

    id: RequestId
    task_ids: Annotated[list[TaskId], msgspec.Meta(max_length=TASK_IDS_PER_WAIT_MAX)]
    timeout_ms: Annotated[int, msgspec.Meta(ge=0, le=TASK_WAIT_MS_MAX)]


class TaskSubmitted(msgspec.Struct, frozen=True, array_like=True, tag=190):
    """The task's id (the first submission's, for an id or key submitted again)."""

    id: RequestId
    task_id: TaskId


class TaskTransition(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True):
    state: Annotated[str, msgspec.Meta(max_length=16)]
    node: Annotated[str, msgspec.Meta(max_length=64)]
    at_ms: int
    note: Annotated[str, msgspec.Meta(max_length=1024)] = ""


class TaskInfo(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True, tag=191):
    """A task as its register holds it (``core.tasks.TaskState``), without its arguments.
    Times are unix milliseconds (0: not yet). ``result`` is the function's encoded return
    value (msgpack, or cloudpickle for a pickled task); ``error`` the remote traceback."""

    id: RequestId
    task_id: TaskId
    found: bool = True
    state: Annotated[str, msgspec.Meta(max_length=16)] = ""
    function: Annotated[str, msgspec.Meta(max_length=FUNCTION_BYTES_MAX)] = ""
    pickled: bool = False
    queue: Annotated[str, msgspec.Meta(max_length=QUEUE_BYTES_MAX)] = ""
    priority: int = 0
    slots: int = 1
    tags: Annotated[list[Annotated[str, msgspec.Meta(max_length=TAG_BYTES_MAX)]],
                    msgspec.Meta(max_length=TAGS_MAX)] = []
    timeout_s: float = 0.0
    max_retries: int = 0
    submitter: Annotated[str, msgspec.Meta(max_length=64)] = ""
    attempt: int = 0
    holder: Annotated[str, msgspec.Meta(max_length=64)] = ""
    token: int = 0
    lease_expires_ms: int = 0
    not_before_ms: int = 0
    submitted_ms: int = 0
    finished_ms: int = 0
    history: Annotated[list[TaskTransition], msgspec.Meta(max_length=HISTORY_MAX)] = []
    result: Annotated[bytes, msgspec.Meta(max_length=RESULT_BYTES_MAX)] | None = None
    error: Annotated[str, msgspec.Meta(max_length=ERROR_BYTES_MAX)] = ""
    result_omitted: bool = False
    """The answer had no room for this task's result and full error (``GetTask`` has)."""


class TaskInfos(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True, tag=192):
    """``WaitTasks``'s answer: the finished tasks (empty: the wait timed out)."""

    id: RequestId
    tasks: Annotated[list[TaskInfo], msgspec.Meta(max_length=TASK_IDS_PER_WAIT_MAX)] = []
    missing: Annotated[list[TaskId], msgspec.Meta(max_length=TASK_IDS_PER_WAIT_MAX)] = []


class TaskList(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True, tag=193):
    id: RequestId
    tasks: Annotated[list[TaskInfo], msgspec.Meta(max_length=TASK_LIST_MAX)] = []
    more: bool = False
    """The limit cut the list short."""


AuthRequest = (Authenticate | Login | Logout | CreateUser | DeleteUser | SetPassword
               | ListUsers | UserRole | CreateRole | DeleteRole | RoleGrant | ListRoles
               | EnableTotp | DisableTotp | CreateApiToken | RevokeToken)
AUTH_REQUEST_TYPES: frozenset[type] = frozenset(AuthRequest.__args__)
"""Requests served by the auth service rather than the data plane."""


ClientRequest = (Put | Get | Delete | Scan | CreateKeyspace | DescribeRing | ListKeyspaces
                 | CompareAndSet | Increment | AcquireLock | RenewLock | ReleaseLock
                 | LockStatus | Watch | Unwatch | AuthRequest
                 | SubmitTask | GetTask | CancelTask | ListTasks | WaitTasks)
ClientReply = (Done | Value | Rows | Failure | RingDescription | Keyspaces | Changed
               | Conflict | Lease | LockInfo | WatchEvent | Authenticated | Token | Users
               | Roles | TotpProvisioning | TaskSubmitted | TaskInfo | TaskInfos | TaskList)

ERROR_CODES = {
    "bad_request": "the request breaks a limit or is malformed; the message says which",
    "unknown_keyspace": "no keyspace of that name; create it first",
    "keyspace_exists": "a keyspace of that name exists already",
    "unavailable": "too few replicas are alive to reach the consistency level",
    "timeout": "replicas did not answer in time; the write may or may not have applied",
    "contention": "too many concurrent changes of one strong key; retry with back-off (reuse "
                  "the idempotency id)",
    "conflict": "a compare-and-set's expectation did not hold (the reply carries the "
                "current version and value)",
    "lock_held": "the lock is held by another owner and was not released or expired within "
                 "the wait time",
    "lease_lost": "the lease is no longer the lock's current one (expired and granted again, "
                  "or released); stop acting as the holder",
    "fenced": "a write under a lock's token was refused: the lock has granted a newer token "
              "(the writer's lease ended)",
    "overloaded": "the node has too many requests in flight; retry with back-off",
    "storage": "the node's storage failed; it did not apply the request",
    "read_only": "the node is read-only (its disk is nearly full, the message says why); "
                 "it takes no writes until it is healthy again: write through another node",
    "clock_skew": "the node's clock is beyond the skew bound against its peers' (the message "
                  "names the offset): it coordinates no strong-mode operation or lock lease "
                  "until it is back within bound; send it to another node, check NTP there",
    "not_supported": "the node does not support this yet",
    "not_found": "no such task (never submitted, or its result's TTL has passed)",
    "internal": "a bug: please report it with the node's log",
    "unauthenticated": "no token, or the token is invalid, expired or revoked; log in "
                       "(`leaderless login`) or pass a valid token",
    "bad_credentials": "wrong user name, password or TOTP code",
    "totp_required": "the password is right and the user has TOTP on: send the code too",
    "too_many_attempts": "too many failed logins from this address or for this user; "
                         "wait before trying again",
    "permission_denied": "the caller's roles do not allow this operation on this keyspace "
                         "(or key prefix)",
}
"""Every ``Failure.code`` with its meaning (the client library maps each to an exception)."""
