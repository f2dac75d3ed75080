"""The native client listener: ``api.kv_messages`` requests over length-prefixed msgpack.

One ``asyncio.Protocol`` per connection (Protocol, not streams: about 3x the requests per
core here, see DESIGN.md). Each decoded request runs as its own task against the node's
``KvService``; its reply carries the request's id, so replies leave in whatever order the
requests finish (pipelining). Replies that finish in the same loop turn on one connection
are encoded into one buffer and written with one ``transport.write`` (one syscall, one
TCP segment train) by a ``call_soon`` flush.

Limits and what happens at them:

- ``max_in_flight_per_connection``: when a connection has that many requests running, we
  stop *starting* its requests and pause reading its socket; decoded bytes wait in the
  connection's buffer and TCP pushes back on the client. Requests resume when the count
  falls to half. We chose backpressure over ``overloaded`` replies: a pipelining client
  that sends faster than the node serves just sees latency, never spurious errors, and
  memory per connection stays bounded (in-flight requests + one socket read).
- ``max_connections`` and ``max_connections_per_client`` (``runtime.connection_limits``):
  a connection beyond either gets ``Failure(id=0, code="overloaded")`` naming the limit and
  is closed; the refusal is counted (``dropped_overload_total{kind="client_connections"}``
  or ``..._per_client``) and logged rate-limited.
- ``partial_frame_timeout_s``: a frame must arrive whole within this long of its first
  byte, however slowly its bytes trickle in (time we ourselves stop reading does not
  count), or the connection gets ``Failure(id=0, code="timeout")`` and is closed: a
  client that opens connections and sends half a frame cannot pin slots forever.
- ``idle_timeout_s``: a connection with nothing buffered, running or watched for this long
  is closed quietly (the client's pool opens a new one when it needs it).
- A frame that is not a valid request (bad length, bad msgpack, unknown tag, a field over
  its limit) gets ``Failure(id=0, code="bad_request")`` and the connection is closed: we can
  no longer trust where the next frame starts. Other connections are unaffected.
- A slow reader (the transport's write buffer over its high-water mark) also pauses
  reading and starting requests until the buffer drains.

Errors: ``KvError`` becomes ``Failure(code, message, received, required)``; any other
exception is a bug: ``Failure(code="internal")`` and an error log line with the traceback.

Authentication (``auth`` given and enabled): a connection starts unauthenticated and acts
as a user once an ``Authenticate`` (token) or ``Login`` succeeds. Every other request is
checked against that principal before it starts (``AuthService.check``, synchronous, so
the fast callback path stays free of tasks); a refused request is answered at once with
``unauthenticated`` or ``permission_denied``. The principal's expiry is re-read on every
request, so a token stops working on the first request after it expires; its revocation
(or its user's deletion, or a change of its roles) reaches an open connection within
``PRINCIPAL_RECHECK_S`` (one background re-check per connection, never per request).
"""

from __future__ import annotations

import asyncio
import ssl
import struct
import time
import traceback
import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

import msgspec

from leaderless.api.kv_messages import (
    AUTH_REQUEST_TYPES,
    AcquireLock,
    Authenticate,
    Authenticated,
    CancelTask,
    ClientReply,
    ClientRequest,
    CompareAndSet,
    CreateApiToken,
    CreateKeyspace,
    CreateRole,
    CreateUser,
    DeleteRole,
    DeleteUser,
    DescribeRing,
    DisableTotp,
    EnableTotp,
    Failure,
    Get,
    GetTask,
    GrantEntry,
    Increment,
    Keyspaces,
    ListKeyspaces,
    ListRoles,
    ListTasks,
    ListUsers,
    LockStatus,
    Login,
    Logout,
    Put,
    ReleaseLock,
    RenewLock,
    RevokeToken,
    RingDescription,
    RoleEntry,
    RoleGrant,
    Roles,
    Rows,
    Scan,
    SetPassword,
    SubmitTask,
    Token,
    TotpProvisioning,
    Unwatch,
    UserEntry,
    UserRole,
    Users,
    WaitTasks,
    Watch,
    WatchEvent,
)
from leaderless.api.kv_messages import (
    Delete as DeleteRequest,
)
from leaderless.api.kv_messages import (
    Done as DoneReply,
)
from leaderless.api.service import Fence, KvError, KvService
from leaderless.api.task_api import TASK_REQUEST_TYPES, TaskRequest, execute_task
from leaderless.api.task_api import permission as task_permission
from leaderless.core.codec import FRAME_BYTES_MAX
from leaderless.core.kv_messages import ERROR_TEXT_MAX
from leaderless.core.locks import LOCK_KEYSPACE
from leaderless.obs.requests import RequestStats
from leaderless.runtime.connection_limits import ConnectionCaps, client_address
from leaderless.runtime.counters import RuntimeCounters
from leaderless.runtime.drops import Drops
from leaderless.runtime.logs import NodeLogger
from leaderless.security.auth import Grant, Principal
from leaderless.security.tls import TLS_HANDSHAKE_TIMEOUT_S

if TYPE_CHECKING:
    from leaderless.runtime.auth import AuthService

CLIENT_CONNECTIONS_MAX = 1024
"""Client connections served at once. A pooling client opens a few per node; 1,024 covers
hundreds of application processes, and each idle connection costs only a few KiB."""
CLIENT_CONNECTIONS_PER_CLIENT_MAX = 256
"""Of those, the connections one client address may hold (an IPv4 address or an IPv6
/64): an application host's pools fit, and one host flooding leaves three quarters of the
slots to everyone else."""
PARTIAL_FRAME_TIMEOUT_S = 60.0
"""A frame must arrive whole within this long of its first byte: 8 MiB (the largest
frame) needs ~140 KB/s, a 1 MiB value ~17 KB/s. Bounds a slow-loris that trickles bytes."""
CLIENT_IDLE_TIMEOUT_S = 600.0
"""A connection that does nothing for this long (no bytes, requests, replies or watches)
is closed: pooled connections stay warm for ten minutes, abandoned ones go."""
IN_FLIGHT_PER_CONNECTION_MAX = 1024
"""Requests running at once per connection. The DESIGN prototype gained throughput up to
256 in flight per node; 1,024 leaves room for one connection to carry a whole client's
load while bounding the memory one connection can pin (1,024 x the largest request)."""
WATCHES_PER_CONNECTION_MAX = 1024
"""Watches one connection may have open (each costs a subscription on every node)."""
WRITE_BUFFER_HIGH_BYTES = 4 * 1024 * 1024
"""Queued reply bytes at which we stop reading a connection until its reader catches up."""

_HEADER = struct.Struct(">I")
_HEADER_SIZE = _HEADER.size
_decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(ClientRequest)
_encoder = msgspec.msgpack.Encoder()
_connections: weakref.WeakKeyDictionary[asyncio.AbstractServer, set[ClientConnection]] = (
    weakref.WeakKeyDictionary())


OPERATION_NAMES: dict[type, str] = {
    Put: "put", Get: "get", DeleteRequest: "delete", Scan: "scan",
    CreateKeyspace: "create_keyspace", DescribeRing: "describe_ring",
    ListKeyspaces: "list_keyspaces", CompareAndSet: "cas", Increment: "incr",
    AcquireLock: "acquire_lock", RenewLock: "renew_lock", ReleaseLock: "release_lock",
    LockStatus: "lock_status", SubmitTask: "submit_task", GetTask: "get_task",
    CancelTask: "cancel_task", ListTasks: "list_tasks",
}
"""The ``operation`` label of request metrics (``obs.requests``)."""

PRINCIPAL_RECHECK_S = 1.0
"""An authenticated connection in use has its token re-resolved by the auth service this
often (in the background, one at a time), so a revocation, a deleted user or a role change
takes effect on open connections within about this long plus the service's own delay
(``runtime.auth.REVOCATION_DELAY_MAX_S`` at worst)."""

Permission = tuple[str, str, bytes | None]
"""(level, keyspace, key): what a request needs (key None: the whole keyspace)."""
PERMISSIONS: dict[type, Callable[[Any], Permission]] = {
    Get: lambda r: ("read", r.keyspace, r.key),
    Scan: lambda r: ("read", r.keyspace, r.key),
    Watch: lambda r: ("read", r.keyspace, r.key),
    Put: lambda r: ("write", r.keyspace, r.key),
    DeleteRequest: lambda r: ("write", r.keyspace, r.key),
    CompareAndSet: lambda r: ("write", r.keyspace, r.key),
    Increment: lambda r: ("write", r.keyspace, r.key),
    CreateKeyspace: lambda r: ("admin", r.name, None),
    AcquireLock: lambda r: ("write", LOCK_KEYSPACE, r.name.encode()),
    RenewLock: lambda r: ("write", LOCK_KEYSPACE, r.name.encode()),
    ReleaseLock: lambda r: ("write", LOCK_KEYSPACE, r.name.encode()),
    LockStatus: lambda r: ("read", LOCK_KEYSPACE, r.name.encode()),
    **{kind: task_permission for kind in TASK_REQUEST_TYPES},
}
"""The permission each request needs. A prefix watch's key is its prefix (a grant covers
it when the grant's prefix starts it). Requests absent here (DescribeRing, ListKeyspaces,
Unwatch) need only an authenticated connection; ListKeyspaces is filtered to the
keyspaces the caller can see."""

FastSubmit = Callable[[ClientRequest, Callable[[ClientReply], None]], bool]
"""Optional on a service (``KvNode.try_submit``): start the request and call back with
its reply, or return False to have it served through the async methods."""


async def serve_clients(service: KvService, host: str, port: int, *,
                        max_connections: int = CLIENT_CONNECTIONS_MAX,
                        max_connections_per_client: int = CLIENT_CONNECTIONS_PER_CLIENT_MAX,
                        partial_frame_timeout_s: float = PARTIAL_FRAME_TIMEOUT_S,
                        idle_timeout_s: float = CLIENT_IDLE_TIMEOUT_S,
                        drops: Drops | None = None,
                        max_in_flight_per_connection: int = IN_FLIGHT_PER_CONNECTION_MAX,
                        log: NodeLogger | None = None,
                        stats: RequestStats | None = None,
                        auth: AuthService | None = None,
                        ssl_context: ssl.SSLContext | None = None) -> asyncio.Server:
    """Listen for native clients on ``host:port`` (port 0: any free port; read it from
    ``server.sockets[0].getsockname()``). Stop with ``server.close()`` then
    ``abort_connections(server)`` (open connections outlive ``close`` in Python 3.11).
    With ``auth`` enabled, every request needs an authenticated connection. With
    ``ssl_context`` (``security.tls.NodeTls.client_server``) clients must speak TLS."""
    assert max_connections > 0
    assert max_in_flight_per_connection > 0
    assert partial_frame_timeout_s > 0 and idle_timeout_s > 0
    registry: set[ClientConnection] = set()
    logger = log or NodeLogger("", "kv_server")
    caps = ConnectionCaps("client", max_connections, max_connections_per_client)
    refusals = drops or Drops(RuntimeCounters(), logger)
    timeouts = (partial_frame_timeout_s, idle_timeout_s)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: ClientConnection(service, registry, max_connections,
                                 max_in_flight_per_connection, logger, stats, auth,
                                 caps=caps, drops=refusals, timeouts=timeouts),
        host, port, ssl=ssl_context,
        ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT_S if ssl_context is not None else None)
    _connections[server] = registry
    return server


def abort_connections(server: asyncio.AbstractServer) -> None:
    """Close every open connection of a server made by ``serve_clients`` (for shutdown)."""
    for conn in list(_connections.get(server, ())):
        conn.abort()


def connection_count(server: asyncio.AbstractServer) -> int:
    return len(_connections.get(server, ()))


class ClientConnection(asyncio.Protocol):
    """One client connection: split frames, start requests, coalesce replies."""

    def __init__(self, service: KvService, registry: set[ClientConnection],
                 max_connections: int, max_in_flight: int, log: NodeLogger,
                 stats: RequestStats | None = None, auth: AuthService | None = None, *,
                 caps: ConnectionCaps | None = None, drops: Drops | None = None,
                 timeouts: tuple[float, float] = (PARTIAL_FRAME_TIMEOUT_S,
                                                  CLIENT_IDLE_TIMEOUT_S)) -> None:
        self._service = service
        self._auth_service = auth
        self._auth = auth if auth is not None and auth.enabled else None
        """Set when requests must be authenticated and authorized."""
        self.principal: Principal | None = None
        """Who this connection acts as (after Authenticate or Login)."""
        self._token: str | None = None
        """The token ``principal`` came from (re-resolved every ``PRINCIPAL_RECHECK_S``)."""
        self._checked_at = 0.0
        self._rechecking = False
        self._refusal = ""
        """Why the principal was dropped (expired, revoked), for the next request's error."""
        self._stats = stats
        self._submit: FastSubmit | None = getattr(service, "try_submit", None)
        self._registry = registry
        self._max_connections = max_connections
        self._max_in_flight = max_in_flight
        self._log = log
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._inbuf = bytearray()
        self._outbuf = bytearray()
        self._flush_scheduled = False
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._watches: dict[int, asyncio.Task[None]] = {}
        self._reading_paused = False
        self._writing_paused = False
        self._eof = False
        self._bad = False
        self.peer = ""
        self.client = ""
        """The address this connection counts against (``runtime.connection_limits``)."""
        self._caps = caps or ConnectionCaps("client", max_connections,
                                            CLIENT_CONNECTIONS_PER_CLIENT_MAX)
        self._drops = drops or Drops(RuntimeCounters(), log)
        self._partial_frame_timeout_s, self._idle_timeout_s = timeouts
        self._partial_since: float | None = None
        """When the incomplete frame at the head of ``_inbuf`` began arriving."""
        self._last_activity = 0.0
        self._deadline: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio's, so no isinstance check here.
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.client = client_address(peer)
        refusal = self._caps.refusal(self.client, self._registry)
        if refusal is not None:
            self._drops.overload(refusal.kind, self.peer)
            self._bad = True
            self._reply(Failure(0, "overloaded", _text(refusal.reason)))
            self._flush()
            self._transport.close()  # after the Failure is written
            self._transport = None
            return
        self._registry.add(self)
        self._transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH_BYTES)
        self._last_activity = self._loop.time()
        self._deadline = self._loop.call_later(self._check_interval_s(), self._check_deadlines)

    def data_received(self, data: bytes) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        self._last_activity = self._loop.time()
        self._inbuf += data
        self._process_input()

    def eof_received(self) -> bool | None:
        # The client half-closed (e.g. `nc -N`): answer what it sent, then close.
        self._eof = True
        if self._in_flight or self._outbuf:
            return True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._registry.discard(self)
        self._transport = None
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        for task in [*self._tasks, *self._watches.values()]:
            task.cancel()

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._update_reading()
        self._process_input()

    # -- input -----------------------------------------------------------------------------

    def _process_input(self) -> None:
        """Start every complete request in the buffer, until the in-flight bound."""
        buf = self._inbuf
        view = memoryview(buf)
        at = 0
        try:
            while (not self._bad and len(buf) - at >= _HEADER_SIZE
                   and self._in_flight < self._max_in_flight
                   and not self._writing_paused and self._transport is not None):
                (length,) = _HEADER.unpack_from(buf, at)
                if length > FRAME_BYTES_MAX:
                    self._malformed(f"frame of {length} bytes exceeds {FRAME_BYTES_MAX}")
                    return
                end = at + _HEADER_SIZE + length
                if len(buf) < end:
                    break
                try:
                    request = _decoder.decode(view[at + _HEADER_SIZE:end])
                except (msgspec.DecodeError, msgspec.ValidationError,
                        UnicodeDecodeError) as exc:
                    self._malformed(f"bad frame: {exc}")
                    return
                at = end
                self._start(request)
        finally:
            view.release()
            if self._bad:
                buf.clear()
            elif at:
                del buf[:at]
            if not buf:
                self._partial_since = None
            elif at or self._partial_since is None:
                self._partial_since = self._loop.time()  # a new frame began arriving
        self._update_reading()

    # -- deadlines -------------------------------------------------------------------------

    def _check_interval_s(self) -> float:
        return min(self._partial_frame_timeout_s, self._idle_timeout_s) / 4

    def _check_deadlines(self) -> None:
        """Close a connection stuck mid-frame or idle too long. One periodic check per
        connection (not a timer per frame): a busy connection sends thousands a second."""
        self._deadline = None
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        now = self._loop.time()
        if self._reading_paused and self._partial_since is not None:
            self._partial_since = now  # we stopped reading it: not the client's stall
        if (self._partial_since is not None
                and now - self._partial_since >= self._partial_frame_timeout_s):
            self._drops.overload("client_partial_frame", self.peer)
            self._bad = True
            self._inbuf.clear()
            self._reply(Failure(0, "timeout", _text(
                f"a frame began arriving {now - self._partial_since:.0f} s ago and is "
                f"still incomplete (the limit is {self._partial_frame_timeout_s:g} s, "
                "partial_frame_timeout_s); closing the connection")))
            self._flush()
            transport.close()
            return
        if (not self._inbuf and not self._in_flight and not self._watches
                and not self._outbuf
                and now - self._last_activity >= self._idle_timeout_s):
            self._log.debug("client_connection_idle", peer=self.peer,
                            idle_s=round(now - self._last_activity, 1))
            transport.close()
            return
        self._deadline = self._loop.call_later(self._check_interval_s(), self._check_deadlines)

    def _update_reading(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        want_pause = self._writing_paused or self._in_flight >= self._max_in_flight
        if want_pause and not self._reading_paused:
            self._reading_paused = True
            transport.pause_reading()
        elif not want_pause and self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()

    def _malformed(self, reason: str) -> None:
        self._log.warning("client_bad_frame", peer=self.peer, error=reason[:200])
        self._bad = True
        self._reply(Failure(0, "bad_request",
                            _text(f"{reason}; closing the connection (is the client speaking "
                                  "the leaderless native protocol?)")))
        self._flush()
        if self._transport is not None:
            self._transport.close()  # after the Failure is written

    def _start(self, request: ClientRequest) -> None:
        kind = type(request)
        if kind in AUTH_REQUEST_TYPES:
            self._start_auth(request)
            return
        auth = self._auth
        if auth is not None and self._refused(request, kind, auth):
            return
        if kind is Watch or kind is Unwatch:
            self._start_watch(request)  # type: ignore[arg-type]
            return
        self._in_flight += 1
        on_reply: Callable[[ClientReply], None] = self._on_fast_reply
        stats = self._stats
        if stats is not None and kind is not WaitTasks:  # a long poll is not latency
            on_reply = self._timed(request, stats)
        if kind is ListKeyspaces and auth is not None:
            on_reply = self._visible_keyspaces(on_reply)
        # The hot path (get/put/delete on a known keyspace) runs on callbacks: no task,
        # coroutine or future per request, which is most of a request's CPU on a node.
        submit = self._submit
        if submit is not None and submit(request, on_reply):
            return
        run = self._execute_task if kind in TASK_REQUEST_TYPES else None
        task = self._loop.create_task(self._serve(request, on_reply, run))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _execute_task(self, request: ClientRequest) -> ClientReply:
        """Task requests run as the connection's user (the submitter they record)."""
        user = self.principal.user if self._auth is not None and self.principal else ""
        return await execute_task(self._service, cast(TaskRequest, request), user)

    # -- authentication ----------------------------------------------------------------------

    def _principal(self) -> Principal:
        """The connection's principal if its token has not expired (raises
        ``unauthenticated`` otherwise). Revocation is the auth service's to check."""
        principal = self.principal
        assert self._auth is not None
        if principal is None:
            raise self._auth.unauthenticated_error(
                self._refusal or "this connection is not authenticated: send Authenticate "
                "with a token, or Login, first (`leaderless login`)")
        if principal.expires_at <= time.time():
            self._forget(f"the token of user {principal.user!r} has expired; log in again")
            raise self._auth.unauthenticated_error(self._refusal or "the token has expired")
        if (not self._rechecking and self._token is not None
                and self._loop.time() - self._checked_at >= PRINCIPAL_RECHECK_S):
            self._rechecking = True
            task = self._loop.create_task(self._recheck(self._token))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return principal

    def _authenticated(self, principal: Principal, token: str) -> None:
        self.principal, self._token, self._refusal = principal, token, ""
        self._checked_at = self._loop.time()

    def _forget(self, reason: str) -> None:
        self.principal, self._token, self._refusal = None, None, reason

    async def _recheck(self, token: str) -> None:
        """Re-resolve the connection's token: a revoked token, a deleted user or changed
        roles take effect here (a cache hit in the auth service costs little)."""
        assert self._auth is not None
        try:
            principal = await self._auth.authenticate(token, self.peer)
        except KvError as exc:
            if exc.code == "unauthenticated" and self._token == token:
                self._forget(exc.message)
        else:
            if self._token == token:
                self.principal = principal
        finally:
            self._rechecking = False
            self._checked_at = self._loop.time()

    def _refused(self, request: ClientRequest, kind: type, auth: AuthService) -> bool:
        """Check the request against the connection's principal; if refused, answer it
        (and count it) here and return True."""
        permission = PERMISSIONS.get(kind)
        try:
            principal = self._principal()
            if permission is not None:
                level, keyspace, key = permission(request)
                auth.check(principal, level, keyspace, key,
                           operation=OPERATION_NAMES.get(kind, "watch"), peer=self.peer)
        except KvError as exc:
            if self._stats is not None:
                self._stats.error(OPERATION_NAMES.get(kind, "other"), exc.code)
            self._reply(Failure(request.id, exc.code, _text(exc.message)))
            return True
        return False

    def _still_allowed(self, watch: Watch) -> None:
        """Before each event of a watch: its token must still be valid (not expired, not
        revoked) and still allow reading what it watches, else the watch ends."""
        principal = self._principal()
        if not principal.allows("read", watch.keyspace, watch.key):
            raise KvError("permission_denied", f"watch on keyspace {watch.keyspace!r} is no "
                          f"longer allowed: the roles of user {principal.user!r} changed")

    def _visible_keyspaces(self, on_reply: Callable[[ClientReply], None]
                           ) -> Callable[[ClientReply], None]:
        """Tenants see only the keyspaces their grants name."""
        principal = self.principal
        assert principal is not None

        def filtered(reply: ClientReply) -> None:
            if type(reply) is Keyspaces:
                reply = Keyspaces(reply.id, [k for k in reply.keyspaces
                                             if principal.sees_keyspace(k.name)])
            on_reply(reply)

        return filtered

    def _start_auth(self, request: ClientRequest) -> None:
        self._in_flight += 1
        task = self._loop.create_task(self._serve(request, self._on_fast_reply,
                                                        self._execute_auth))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _execute_auth(self, request: ClientRequest) -> ClientReply:
        auth = self._auth
        if auth is None:
            if isinstance(request, Authenticate):
                # A token sent to a cluster without auth: nothing to check, all allowed.
                return Authenticated(request.id, "", [], 0.0, auth=False)
            raise KvError("bad_request", "authentication is off on this cluster: there are "
                          "no users, roles or tokens (start the nodes with --auth)")
        if isinstance(request, Authenticate):
            self._forget("")
            principal = await auth.authenticate(request.token, self.peer)
            self._authenticated(principal, request.token)
            return Authenticated(request.id, principal.user, list(principal.roles),
                                 principal.expires_at)
        if isinstance(request, Login):
            self._forget("")
            issued = await auth.login(request.user, request.password, request.totp or None,
                                      self.peer)
            self._authenticated(await auth.authenticate(issued.token, self.peer),
                                issued.token)
            return Token(request.id, issued.token, issued.token_id, issued.user,
                         issued.expires_at)
        principal = self._principal()
        reply = await execute_auth(auth, principal, request)
        if isinstance(request, Logout):
            self._forget("this connection logged out; log in again")
        return reply

    # -- watches ---------------------------------------------------------------------------

    def _start_watch(self, request: Watch | Unwatch) -> None:
        """A watch streams replies until it ends; it does not count as in flight (it would
        pin a slot for its whole life), but a connection holds at most
        ``WATCHES_PER_CONNECTION_MAX``."""
        if isinstance(request, Unwatch):
            task = self._watches.pop(request.watch_id, None)
            if task is not None:
                task.cancel()
            self._reply(DoneReply(request.id))
            return
        if request.id in self._watches or len(self._watches) >= WATCHES_PER_CONNECTION_MAX:
            self._reply(Failure(request.id, "bad_request", _text(
                f"watch id {request.id} is in use, or this connection has "
                f"{WATCHES_PER_CONNECTION_MAX} watches open")))
            return
        task = self._loop.create_task(self._stream(request))
        self._watches[request.id] = task
        task.add_done_callback(lambda _: self._watches.pop(request.id, None))

    async def _stream(self, request: Watch) -> None:
        try:
            watch = await self._service.watch(request.keyspace, request.key, request.sort,
                                              request.prefix, request.since_version)
            async for event in watch.events():
                if self._auth is not None:
                    self._still_allowed(request)
                value = event.value
                self._reply(WatchEvent(request.id, event.partition, event.version,
                                       value is not None, value or b"", event.sort))
        except KvError as exc:
            self._reply(Failure(request.id, exc.code, _text(exc.message), exc.received,
                                exc.required))
        except asyncio.CancelledError:
            return
        except Exception as exc:  # a bug: end the watch, tell the client, log it
            self._log.error("client_watch_failed", peer=self.peer, error=repr(exc)[:500],
                            traceback=traceback.format_exc()[-4000:])
            self._reply(Failure(request.id, "internal", "the watch failed; please report "
                                "it with the node's log"))

    # -- requests --------------------------------------------------------------------------

    def _on_fast_reply(self, reply: ClientReply) -> None:
        # May run inside _process_input (a request refused at once): never re-enter it.
        self._in_flight -= 1
        self._reply(reply)
        if self._in_flight <= self._max_in_flight // 2 and self._inbuf:
            self._loop.call_soon(self._process_input)
        elif self._reading_paused:
            self._update_reading()

    def _timed(self, request: ClientRequest, stats: RequestStats
               ) -> Callable[[ClientReply], None]:
        """The reply callback that also records the request's latency and failure."""
        loop = self._loop
        began = loop.time()
        operation = OPERATION_NAMES.get(type(request), "other")
        consistency = getattr(request, "consistency", None) or "-"

        def done(reply: ClientReply) -> None:
            stats.observe(operation, consistency, loop.time() - began)
            if type(reply) is Failure:
                stats.error(operation, reply.code)
            self._on_fast_reply(reply)

        return done

    async def _serve(self, request: ClientRequest, on_reply: Callable[[ClientReply], None],
                     run: Callable[[ClientRequest], Awaitable[ClientReply]] | None = None
                     ) -> None:
        """Run ``request`` (on the data plane, or ``run``: the auth requests) and reply."""
        try:
            reply = await (run(request) if run else execute(self._service, request))
        except KvError as exc:  # AuthError too, with its retry_after_s
            reply = Failure(request.id, exc.code, _text(exc.message), exc.received,
                            exc.required, float(getattr(exc, "retry_after_s", 0.0)))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: tell the client, log it
            self._log.error("client_request_failed", peer=self.peer,
                            request=type(request).__name__, error=repr(exc)[:500],
                            traceback=traceback.format_exc()[-4000:])
            reply = Failure(request.id, "internal",
                            _text(f"the node failed on this request ({type(exc).__name__}); "
                                  "please report it with the node's log"))
        on_reply(reply)

    # -- output ----------------------------------------------------------------------------

    def _reply(self, reply: ClientReply) -> None:
        if self._transport is None:
            return
        out = self._outbuf
        start = len(out)
        out += b"\0\0\0\0"
        _encoder.encode_into(reply, out, start + _HEADER_SIZE)
        length = len(out) - start - _HEADER_SIZE
        if length > FRAME_BYTES_MAX:
            del out[start:]
            failure = Failure(getattr(reply, "id", 0), "bad_request",
                              f"the reply would be {length} bytes, over the frame limit of "
                              f"{FRAME_BYTES_MAX}; ask for fewer rows (a smaller limit)")
            out += b"\0\0\0\0"
            _encoder.encode_into(failure, out, start + _HEADER_SIZE)
            length = len(out) - start - _HEADER_SIZE
        _HEADER.pack_into(out, start, length)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._outbuf:
            return
        data = bytes(self._outbuf)
        self._outbuf.clear()
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(data)
            if self._eof and not self._in_flight:
                transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


async def execute(service: KvService, request: ClientRequest) -> ClientReply:
    """Run one request against the service and build its reply (KvError propagates)."""
    kind = type(request)
    if kind is Put:
        put = cast(Put, request)
        hlc = await service.put(put.keyspace, put.key, put.value, put.sort, put.consistency,
                                put.ttl_s, put.idempotency,
                                _fence(put.fence_lock, put.fence_token), retry_ms=put.retry_ms)
        return DoneReply(put.id, hlc)
    if kind is Get:
        get = cast(Get, request)
        value = await service.get(get.keyspace, get.key, get.sort, get.consistency)
        return msgspec.structs.replace(value, id=get.id)
    if kind is DeleteRequest:
        delete = cast(DeleteRequest, request)
        hlc = await service.delete(delete.keyspace, delete.key, delete.sort,
                                   delete.consistency, delete.idempotency,
                                   _fence(delete.fence_lock, delete.fence_token),
                                   retry_ms=delete.retry_ms)
        return DoneReply(delete.id, hlc)
    if kind is Scan:
        scan = cast(Scan, request)
        rows, more = await service.scan(scan.keyspace, scan.key, scan.start, scan.end,
                                        scan.limit, scan.consistency)
        return Rows(scan.id, rows, more)
    if kind is CreateKeyspace:
        create = cast(CreateKeyspace, request)
        await service.create_keyspace(create.name, create.replication, create.mode,
                                      create.read_consistency, create.write_consistency,
                                      create.if_not_exists)
        return DoneReply(create.id)
    if kind is CompareAndSet:
        cas = cast(CompareAndSet, request)
        outcome = await service.cas(cas.keyspace, cas.key, cas.value, cas.sort,
                                    cas.expected_version, cas.expected_value,
                                    cas.expected_absent, cas.idempotency,
                                    _fence(cas.fence_lock, cas.fence_token),
                                    retry_ms=cas.retry_ms)
        return msgspec.structs.replace(outcome, id=cas.id)
    if kind is Increment:
        incr = cast(Increment, request)
        changed = await service.incr(incr.keyspace, incr.key, incr.delta, incr.sort,
                                     incr.idempotency, _fence(incr.fence_lock, incr.fence_token),
                                     retry_ms=incr.retry_ms)
        return msgspec.structs.replace(changed, id=incr.id)
    if kind is AcquireLock:
        acquire = cast(AcquireLock, request)
        lease = await service.acquire_lock(acquire.name, acquire.owner, acquire.ttl_ms,
                                           acquire.wait_ms, acquire.idempotency)
        return msgspec.structs.replace(lease, id=acquire.id)
    if kind is RenewLock:
        renew = cast(RenewLock, request)
        lease = await service.renew_lock(renew.name, renew.owner, renew.token, renew.ttl_ms,
                                         renew.idempotency)
        return msgspec.structs.replace(lease, id=renew.id)
    if kind is ReleaseLock:
        release = cast(ReleaseLock, request)
        version = await service.release_lock(release.name, release.owner, release.token,
                                             release.idempotency)
        return DoneReply(release.id, version)
    if kind is LockStatus:
        status = cast(LockStatus, request)
        info = await service.lock_status(status.name)
        return msgspec.structs.replace(info, id=status.id)
    if kind is ListKeyspaces:
        return Keyspaces(request.id, await service.list_keyspaces())
    if kind is DescribeRing:
        return RingDescription(request.id, service.ring_members())
    raise AssertionError(f"unhandled request type {kind.__name__}")


async def execute_auth(auth: AuthService, by: Principal, request: ClientRequest
                       ) -> ClientReply:
    """Run one user, role or token request as ``by`` (the service checks that ``by`` may;
    its ``AuthError`` propagates)."""
    if isinstance(request, Logout):
        await auth.logout(by)
    elif isinstance(request, CreateUser):
        await auth.create_user(by, request.name, request.password, request.roles)
    elif isinstance(request, DeleteUser):
        await auth.delete_user(by, request.name)
    elif isinstance(request, SetPassword):
        await auth.set_password(by, request.name, request.password)
    elif isinstance(request, ListUsers):
        users = await auth.list_users(by)
        return Users(request.id, [UserEntry(u.name, list(u.roles), u.totp, u.created_at)
                                  for u in users])
    elif isinstance(request, UserRole):
        if request.revoke:
            await auth.revoke_role(by, request.user, request.role)
        else:
            await auth.grant_role(by, request.user, request.role)
    elif isinstance(request, CreateRole):
        await auth.create_role(by, request.name)
    elif isinstance(request, DeleteRole):
        await auth.delete_role(by, request.name)
    elif isinstance(request, RoleGrant):
        grant = Grant(request.level, request.keyspace, request.prefix)
        if request.revoke:
            await auth.role_revoke(by, request.role, grant)
        else:
            await auth.role_grant(by, request.role, grant)
    elif isinstance(request, ListRoles):
        roles = await auth.list_roles(by)
        return Roles(request.id, [RoleEntry(r.name, [GrantEntry(g.level, g.keyspace, g.prefix)
                                                     for g in r.grants]) for r in roles])
    elif isinstance(request, EnableTotp):
        return TotpProvisioning(request.id, await auth.enable_totp(by, request.user))
    elif isinstance(request, DisableTotp):
        await auth.disable_totp(by, request.user)
    elif isinstance(request, CreateApiToken):
        issued = await auth.create_api_token(by, request.user, request.name, request.ttl_s)
        return Token(request.id, issued.token, issued.token_id, issued.user,
                     issued.expires_at)
    elif isinstance(request, RevokeToken):
        await auth.revoke_token(by, request.token_id)
    else:
        raise AssertionError(f"unhandled auth request {type(request).__name__}")
    return DoneReply(request.id)


def _fence(lock: str, token: int) -> Fence | None:
    return (lock, token) if lock else None


def _text(message: str) -> str:
    """Fit a message into ``Failure.message``'s limit (it is validated on decode)."""
    if len(message) <= ERROR_TEXT_MAX:
        return message
    return message[:ERROR_TEXT_MAX - 3] + "..."
