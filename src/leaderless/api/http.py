"""The HTTP/JSON API, on its own listener (aiohttp). Same operations as the native
protocol, for curl, browsers and languages without a native client.

Keys are URL path segments, percent-encoded, and may hold any bytes (``%2F`` for a ``/``
inside a key, ``%00`` for a zero byte); values travel raw in the body.

==========================================  ================================================
``PUT    /v1/kv/{keyspace}/{key}``           body = the value (raw bytes). Query: ``sort``,
                                             ``consistency`` (ONE/TWO/QUORUM/ALL), ``ttl``
                                             (seconds). 200 ``{"hlc": n}``
``GET    /v1/kv/{keyspace}/{key}``           200 the raw value, ``Content-Type:
                                             application/octet-stream``, headers
                                             ``X-Leaderless-Hlc`` and (with a TTL)
                                             ``X-Leaderless-Expires-At-Ms``; 404 when absent.
                                             ``?format=json``: ``{"keyspace", "key", "sort",
                                             "value_b64", "value_utf8" (null unless UTF-8),
                                             "hlc", "expires_at_ms"}``. Query: ``sort``,
                                             ``consistency``
``DELETE /v1/kv/{keyspace}/{key}``           200 ``{"hlc": n}`` (deleting an absent key is
                                             not an error). Query: ``sort``, ``consistency``
``GET    /v1/scan/{keyspace}/{key}``         rows of one partition with start <= sort < end:
                                             ``{"rows": [{"sort", "sort_b64", "value_b64",
                                             "value_utf8", "hlc", "expires_at_ms"}], "more",
                                             "next_start"}``; ``next_start`` (percent-encoded)
                                             continues the scan. Query: ``start``, ``end``,
                                             ``limit`` (1..10000, default 1000),
                                             ``consistency``
``POST   /v1/cas/{keyspace}/{key}``          strong keyspaces: compare-and-set; body = the
                                             new value. Query: exactly one of
                                             ``expected_version``, ``expected_value``
                                             (percent-encoded bytes), ``expected_absent=1``;
                                             ``sort``, ``idempotency`` (reuse on a retry).
                                             200 ``{"version"}``; 409 ``conflict`` with the
                                             current ``version`` and ``value_b64``
``POST   /v1/incr/{keyspace}/{key}``         strong keyspaces: ``?delta=N`` (default 1),
                                             ``sort``, ``idempotency``; 200 ``{"value",
                                             "version"}``
``POST   /v1/keyspaces``                     JSON ``{"name", "replication": 3, "mode":
                                             "eventual"|"strong", "read_consistency",
                                             "write_consistency", "if_not_exists": false}``;
                                             201 the keyspace
``GET    /v1/keyspaces``                     ``{"keyspaces": [{"name", "replication", "mode",
                                             "read_consistency", "write_consistency"}]}``
``GET    /v1/ring``                          ``{"members": [{"name", "client_address",
                                             "token_seed", "token_count", "zone", "state"}]}``
``GET    /v1/watch/{keyspace}/{key}``        strong keyspaces: server-sent events
                                             (``text/event-stream``), one ``change`` event
                                             per chosen change: ``{"key", "key_b64",
                                             "sort", "sort_b64", "version", "deleted",
                                             "value_b64", "value_utf8"}``, first the current
                                             value. Query: ``sort``, ``prefix=1`` (every key
                                             whose partition key starts with ``key``),
                                             ``since_version`` (one key: only newer; an
                                             EventSource's ``Last-Event-ID`` does the same).
                                             A failure ends it with an ``error`` event
``POST   /v1/locks/{name}``                  acquire: ``ttl`` (s, default 10), ``wait`` (s,
                                             default 0), ``owner`` (default: a random one);
                                             200 ``{"name", "owner", "token", "ttl_s"}``;
                                             409 ``lock_held``
``PUT    /v1/locks/{name}``                  renew: ``owner``, ``token``, ``ttl``; 409
                                             ``lease_lost``
``DELETE /v1/locks/{name}``                  release: ``owner``, ``token``; 409
                                             ``lease_lost``
``GET    /v1/locks/{name}``                  ``{"name", "held", "holder", "token",
                                             "expires_in_ms"}``
``POST|GET /v1/tasks``, ``GET|DELETE         tasks: submit, list, status, cancel
/v1/tasks/{id}``                             (``api.tasks_http``)
==========================================  ================================================

Writes (``PUT``/``DELETE /v1/kv``, ``/v1/cas``, ``/v1/incr``) take ``fence=LOCK:TOKEN``: made
under that lease, refused with 409 ``fenced`` once the lock has granted a newer token.

Authentication (when the node runs with ``--auth``): every route needs a token, sent as
``Authorization: Bearer TOKEN`` or, on GET and logout, the ``leaderless_token`` cookie, except
``/health/live``, ``/health/ready``, the dashboard page and its static files, and:

==========================================  ================================================
``POST   /v1/auth/login``                    JSON ``{"user", "password", "totp"?}``; 200
                                             ``{"token", "user", "expires_at"}`` and the
                                             ``leaderless_token`` cookie (HttpOnly,
                                             SameSite=Strict; Secure over TLS)
``POST   /v1/auth/logout``                   revokes the caller's token; 200, cookie cleared
``GET    /v1/auth/whoami``                   ``{"user", "roles", "expires_at", "auth":
                                             true}``, 401 without a valid token; auth off:
                                             ``{"user": null, "auth": false}``
``GET|POST /v1/auth/users``                  list ``{"users": [{"name", "roles", "totp",
                                             "created_at"}]}`` / create ``{"name",
                                             "password", "roles"?}``
``DELETE /v1/auth/users/{name}``             (and ``PUT .../password`` ``{"password"}``,
                                             ``PUT|DELETE .../roles/{role}``,
                                             ``POST|DELETE .../totp``: ``{"uri"}``)
``GET|POST /v1/auth/roles``                  list (grants with ``prefix``, ``prefix_b64``) /
                                             create ``{"name"}``; ``DELETE .../{name}``;
                                             ``POST|DELETE .../{name}/grants`` ``{"level",
                                             "keyspace", "prefix"?}``
``POST   /v1/auth/tokens``                   ``{"user", "name", "ttl_s"}`` -> ``{"token",
                                             "token_id", "user", "expires_at"}``;
                                             ``DELETE /v1/auth/tokens/{token_id}``
==========================================  ================================================

The administration routes are the native protocol's requests (``kv_server.execute_auth``):
admins only, except that users may change their own password, TOTP and API tokens.

A request is checked against the caller's roles: reads need ``read`` on the keyspace (and
key), writes ``write``, creating a keyspace ``admin`` on it, locks ``write`` (status:
``read``) on ``system_locks``; ``GET /v1/keyspaces`` lists only the keyspaces the caller's
grants name. Errors: 401 ``unauthenticated`` / ``bad_credentials`` / ``totp_required``, 403
``permission_denied``, 429 ``too_many_attempts`` (with ``Retry-After`` and
``retry_after_s``).

Keys and sort keys in JSON answers are given as ``sort`` (text, when valid UTF-8, else null)
and ``sort_b64`` (always). Errors are JSON ``{"error": code, "message", "received",
"required"}`` with status 400 ``bad_request``, 404 ``unknown_keyspace`` / ``not_found`` /
``no_route``, 405 ``method_not_allowed``, 409 ``keyspace_exists``, 413 ``value_too_large``,
503 ``unavailable`` / ``overloaded`` (with ``Retry-After: 1``), 504 ``timeout``, 500
``storage`` / ``internal``, 501 ``not_supported``. Unknown query parameters are a 400, so a
typo (``?consistncy=ONE``) never passes silently.
"""

from __future__ import annotations

import asyncio
import base64
import math
import secrets
import ssl
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import quote_from_bytes, unquote_to_bytes

import msgspec
from aiohttp import web

from leaderless.api.doctor_http import add_doctor_routes
from leaderless.api.http_limits import serve_guarded
from leaderless.api.kv_messages import (
    CLIENT_SCAN_ROWS_MAX,
    CONSISTENCY_LEVELS,
    MODES,
    PASSWORD_CHARS_MAX,
    REPLICATION_MAX,
    TOTP_CODE_CHARS_MAX,
    TTL_S_MAX,
    Conflict,
    CreateApiToken,
    CreateRole,
    CreateUser,
    DeleteRole,
    DeleteUser,
    DisableTotp,
    EnableTotp,
    ListRoles,
    ListUsers,
    RevokeToken,
    RoleGrant,
    Roles,
    SetPassword,
    Token,
    TotpProvisioning,
    UserRole,
    Users,
)
from leaderless.api.kv_server import execute_auth
from leaderless.api.logs_http import add_log_routes
from leaderless.api.ops_http import OpsSource, add_ops_routes
from leaderless.api.ring_http import add_ring_routes
from leaderless.api.routing_http import add_routing_routes
from leaderless.api.service import KvError, KvService
from leaderless.api.tasks_http import add_task_routes, add_task_stats_routes
from leaderless.core.cells import VALUE_BYTES_MAX_DEFAULT
from leaderless.core.locks import LOCK_KEYSPACE
from leaderless.runtime.counters import RuntimeCounters
from leaderless.runtime.drops import Drops
from leaderless.runtime.logs import NodeLogger
from leaderless.security.auth import Principal
from leaderless.web.handlers import add_web_routes

if TYPE_CHECKING:
    from leaderless.runtime.auth import AuthService

TOKEN_COOKIE = "leaderless_token"
"""The HttpOnly cookie ``POST /v1/auth/login`` sets (the dashboard's session)."""
LOGIN_BODY_BYTES_MAX = 8 * 1024
"""A login body is a user name, a password and a code: anything larger is refused."""
PUBLIC_PATHS = frozenset({"/", "/health/live", "/health/ready", "/v1/auth/login",
                          "/v1/auth/whoami"})
"""Routes open without a token: the probes, the dashboard page (its login form), login,
and whoami (which says itself whether the caller is logged in)."""
PUBLIC_PREFIXES = ("/static/",)
COOKIE_CHANGE_PATHS = frozenset({"/v1/auth/logout"})
"""Changes the login cookie may authorize besides GETs: the dashboard's log out (its script
cannot read the HttpOnly cookie to send a Bearer header). A forged cross-site logout could
only log the user out, and SameSite=Strict keeps the browser from sending it anyway."""
PRINCIPAL = web.RequestKey("principal", Principal)
"""Who is calling (set by the ``authenticate`` middleware when auth is on)."""

BODY_MARGIN_BYTES = 64 * 1024
"""Bodies may exceed the value limit by this much (a keyspace JSON body is tiny), so a
value just over the limit gets a precise 413 rather than a connection reset."""

STATUS_BY_CODE = {
    "bad_request": 400,
    "not_found": 404,
    "no_route": 404,
    "unknown_keyspace": 404,
    "method_not_allowed": 405,
    "keyspace_exists": 409,
    "conflict": 409,
    "lock_held": 409,
    "lease_lost": 409,
    "fenced": 409,
    "value_too_large": 413,
    "unavailable": 503,
    "overloaded": 503,
    "read_only": 503,
    "clock_skew": 503,
    "contention": 503,
    "timeout": 504,
    "storage": 500,
    "internal": 500,
    "not_supported": 501,
    "unauthenticated": 401,
    "bad_credentials": 401,
    "totp_required": 401,
    "permission_denied": 403,
    "too_many_attempts": 429,
}

_json = msgspec.json.Encoder()
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HttpError(KvError):
    """A request the HTTP layer itself refuses (bad path, query or body): the same shape
    as the data plane's errors, so one handler turns both into a response."""


def error_response(code: str, message: str, received: int = 0,
                   required: int = 0, retry_after_s: float = 0.0) -> web.Response:
    body: dict[str, Any] = {"error": code, "message": message, "received": received,
                            "required": required}
    headers = {"Retry-After": "1"} if code == "overloaded" else None
    if code == "too_many_attempts":
        body["retry_after_s"] = retry_after_s
        headers = {"Retry-After": str(max(1, math.ceil(retry_after_s)))}
    elif STATUS_BY_CODE.get(code) == 401:
        headers = {"WWW-Authenticate": 'Bearer realm="leaderless"'}
    return web.Response(body=_json.encode(body), status=STATUS_BY_CODE.get(code, 500),
                        content_type="application/json", headers=headers)


def json_response(value: Any, status: int = 200) -> web.Response:
    return web.Response(body=_json.encode(value), status=status,
                        content_type="application/json")


async def serve_http(service: KvService, host: str, port: int, *,
                     value_bytes_max: int = VALUE_BYTES_MAX_DEFAULT,
                     log: NodeLogger | None = None, ops: OpsSource | None = None,
                     auth: AuthService | None = None,
                     drops: Drops | None = None,
                     ssl_context: ssl.SSLContext | None = None) -> web.AppRunner:
    """Start the HTTP API on ``host:port`` (0: any free port, see ``runner.addresses``),
    with the health and metrics endpoints of ``ops`` (``api.ops_http``). Stop it with
    ``await runner.cleanup()``. Connection caps, slow-loris deadlines and size limits:
    ``api.http_limits`` (refused connections are counted in ``drops``). ``auth``
    (default: ``ops.auth``): when enabled, every route but the public ones needs a
    token. With ``ssl_context`` (``security.tls.NodeTls.client_server``) it is HTTPS."""
    if auth is None:
        auth = getattr(ops, "auth", None)
    app = make_app(service, value_bytes_max=value_bytes_max, log=log, auth=auth)
    if ops is not None:
        add_ops_routes(app, ops)
        add_web_routes(app, ops)
        add_log_routes(app, ops.name)
        doctor = getattr(ops, "doctor", None)  # a node has one; a bare OpsSource may not
        if doctor is not None:
            add_doctor_routes(app, doctor)
        ring_status = getattr(ops, "ring_status", None)  # likewise
        if ring_status is not None:
            add_ring_routes(app, ring_status)
        add_routing_routes(app, ops.name, service, lambda r: r.get(PRINCIPAL))
        tls = getattr(ops, "tls", None)  # peers' HTTPS listeners take the node certificate
        add_task_stats_routes(app, ops.name, service, ops.cluster,
                              getattr(tls, "node_client", None))
    refusals = drops or Drops(RuntimeCounters(), log or NodeLogger("", "http"))
    return await serve_guarded(app, host, port, drops=refusals, ssl_context=ssl_context)


def make_app(service: KvService, *, value_bytes_max: int = VALUE_BYTES_MAX_DEFAULT,
             log: NodeLogger | None = None, auth: AuthService | None = None
             ) -> web.Application:
    api = HttpApi(service, value_bytes_max, log or NodeLogger("", "http"), auth)
    app = web.Application(client_max_size=value_bytes_max + BODY_MARGIN_BYTES,
                          middlewares=[api.errors, api.authenticate])
    app.router.add_post("/v1/auth/login", api.login)
    app.router.add_post("/v1/auth/logout", api.logout)
    app.router.add_get("/v1/auth/whoami", api.whoami)
    for path, methods in ADMIN_ROUTES.items():
        for method in methods:
            app.router.add_route(method, path, api.administer)
    app.router.add_route("*", "/v1/kv/{tail:.*}", api.kv)
    app.router.add_route("GET", "/v1/scan/{tail:.*}", api.scan)
    app.router.add_route("POST", "/v1/cas/{tail:.*}", api.cas)
    app.router.add_route("POST", "/v1/incr/{tail:.*}", api.incr)
    app.router.add_post("/v1/keyspaces", api.create_keyspace)
    app.router.add_get("/v1/keyspaces", api.list_keyspaces)
    app.router.add_get("/v1/ring", api.ring)
    app.router.add_route("*", "/v1/locks/{tail:.*}", api.locks)
    app.router.add_get("/v1/watch/{tail:.*}", api.watch)
    add_task_routes(app, service, api._check, lambda r: r.get(PRINCIPAL))
    return app


class HttpApi:
    def __init__(self, service: KvService, value_bytes_max: int, log: NodeLogger,
                 auth: AuthService | None = None) -> None:
        self._service = service
        self._value_bytes_max = value_bytes_max
        self._log = log
        self._auth = auth if auth is not None and auth.enabled else None
        """Set when requests must be authenticated and authorized."""

    # -- authentication --------------------------------------------------------------------

    @web.middleware
    async def authenticate(self, request: web.Request, handler: Handler
                           ) -> web.StreamResponse:
        """With auth on, resolve the caller's token to ``request[PRINCIPAL]`` (401 if
        none or invalid) before any non-public route runs."""
        path = request.path
        if (self._auth is not None and path not in PUBLIC_PATHS
                and not path.startswith(PUBLIC_PREFIXES)):
            request[PRINCIPAL] = await self._principal(request)
        return await handler(request)

    async def _principal(self, request: web.Request) -> Principal:
        assert self._auth is not None
        token = _request_token(request)
        if not token:
            raise self._auth.unauthenticated_error(
                "this node requires a token: send Authorization: Bearer TOKEN (from POST "
                "/v1/auth/login or `leaderless login`)")
        return await self._auth.authenticate(token, request.remote or "")

    def _check(self, request: web.Request, level: str, keyspace: str, key: bytes | None,
               operation: str) -> None:
        """Raise ``permission_denied`` unless the caller may do ``operation``."""
        if self._auth is not None:
            self._auth.check(request[PRINCIPAL], level, keyspace, key,
                             operation=operation, peer=request.remote or "")

    async def login(self, request: web.Request) -> web.StreamResponse:
        _query(request, set())
        if self._auth is None:
            raise HttpError("bad_request", "authentication is off on this node: there is "
                            "nothing to log in to (start the nodes with --auth)")
        length = request.content_length
        if length is not None and length > LOGIN_BODY_BYTES_MAX:
            raise HttpError("bad_request", f"the login body is over {LOGIN_BODY_BYTES_MAX} "
                            "bytes")
        raw = await request.read()  # bounded by client_max_size; cached if read already
        if len(raw) > LOGIN_BODY_BYTES_MAX:
            raise HttpError("bad_request", f"the login body is over {LOGIN_BODY_BYTES_MAX} "
                            "bytes")
        try:
            body = msgspec.json.decode(raw, type=LoginBody)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise HttpError("bad_request", f"send JSON {{\"user\", \"password\", "
                            f"\"totp\"?}}: {exc}") from None
        issued = await self._auth.login(body.user, body.password, body.totp or None,
                                        request.remote or "")
        response = json_response({"token": issued.token, "user": issued.user,
                                  "expires_at": issued.expires_at})
        max_age = max(0, int(issued.expires_at - _now()))
        response.set_cookie(TOKEN_COOKIE, issued.token, max_age=max_age, path="/",
                            httponly=True, samesite="Strict", secure=request.secure)
        return response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        _query(request, set())
        if self._auth is not None:
            await self._auth.logout(request[PRINCIPAL])
        response = json_response({"logged_out": True})
        response.del_cookie(TOKEN_COOKIE, path="/")
        return response

    async def whoami(self, request: web.Request) -> web.StreamResponse:
        _query(request, set())
        if self._auth is None:
            return json_response({"user": None, "auth": False})
        principal = await self._principal(request)
        return json_response({"user": principal.user, "roles": list(principal.roles),
                              "expires_at": principal.expires_at, "auth": True})

    async def administer(self, request: web.Request) -> web.StreamResponse:
        """The user, role and token routes: each becomes the native protocol's request
        and runs through the same code (``kv_server.execute_auth``)."""
        _query(request, set())
        if self._auth is None:
            raise HttpError("bad_request", "authentication is off on this node: there are "
                            "no users, roles or tokens (start the nodes with --auth)")
        route = request.match_info.route.resource
        path = route.canonical if route is not None else ""
        build = ADMIN_ROUTES[path][request.method]
        body = await request.read()  # cached when the limits middleware read it
        if len(body) > LOGIN_BODY_BYTES_MAX:
            raise HttpError("bad_request", f"the body is over {LOGIN_BODY_BYTES_MAX} bytes")
        try:
            message = build(dict(request.match_info), body)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise HttpError("bad_request", f"invalid JSON body for {request.method} {path}: "
                            f"{exc}") from None
        reply = await execute_auth(self._auth, request[PRINCIPAL], message)
        return json_response(_admin_reply(reply), status=201 if request.method == "POST"
                             else 200)

    @web.middleware
    async def errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except KvError as exc:  # HttpError and AuthError too
            return error_response(exc.code, exc.message, exc.received, exc.required,
                                  float(getattr(exc, "retry_after_s", 0.0)))
        except web.HTTPRequestEntityTooLarge:
            return error_response("value_too_large", self._too_large())
        except web.HTTPMethodNotAllowed as exc:
            return error_response("method_not_allowed",
                                  f"{request.method} is not allowed on {request.path}; use "
                                  + ", ".join(sorted(exc.allowed_methods)))
        except web.HTTPNotFound:
            return error_response("no_route", f"no such route: {request.path} (see /v1/kv, "
                                  "/v1/scan, /v1/keyspaces, /v1/ring)")
        except web.HTTPException:
            raise
        except Exception as exc:  # a bug: answer 500 and log it
            self._log.error("http_request_failed", method=request.method, path=request.path,
                            error=repr(exc)[:500], traceback=traceback.format_exc()[-4000:])
            return error_response("internal", f"the node failed on this request "
                                  f"({type(exc).__name__}); please report it with its log")

    def _too_large(self) -> str:
        return (f"the value is larger than this node's limit of {self._value_bytes_max} "
                "bytes (value_bytes_max)")

    # -- /v1/kv ----------------------------------------------------------------------------

    async def kv(self, request: web.Request) -> web.StreamResponse:
        keyspace, key = _keyspace_and_key(request, "/v1/kv/")
        method = request.method
        if method in ("PUT", "DELETE"):
            self._check(request, "write", keyspace, key, method.lower()
                        if method == "DELETE" else "put")
        elif method in ("GET", "HEAD"):
            self._check(request, "read", keyspace, key, "get")
        if method == "PUT":
            query = _query(request, {"sort", "consistency", "ttl", "fence"})
            length = request.content_length
            if length is not None and length > self._value_bytes_max:
                raise HttpError("value_too_large", self._too_large())
            value = await request.read()
            if len(value) > self._value_bytes_max:
                raise HttpError("value_too_large", self._too_large())
            hlc = await self._service.put(keyspace, key, value, query.get("sort", b""),
                                          _consistency(query), _ttl(query),
                                          query.get("idempotency", b""), _fence(query))
            return json_response({"hlc": hlc})
        if method in ("GET", "HEAD"):
            query = _query(request, {"sort", "consistency", "format"})
            as_json = _format(query)
            sort = query.get("sort", b"")
            found = await self._service.get(keyspace, key, sort, _consistency(query))
            if not found.found:
                raise HttpError("not_found", f"no value for key {_show(key)}"
                                + (f" sort {_show(sort)}" if sort else "")
                                + f" in keyspace {keyspace!r}")
            if as_json:
                return json_response({
                    "keyspace": keyspace, "key": _utf8(key), "key_b64": _b64(key),
                    "sort": _utf8(sort), "sort_b64": _b64(sort),
                    "value_b64": _b64(found.value), "value_utf8": _utf8(found.value),
                    "hlc": found.hlc, "expires_at_ms": found.expires_at_ms})
            headers = {"X-Leaderless-Hlc": str(found.hlc), "ETag": f'"{found.hlc}"'}
            if found.expires_at_ms:
                headers["X-Leaderless-Expires-At-Ms"] = str(found.expires_at_ms)
            return web.Response(body=found.value, headers=headers,
                                content_type="application/octet-stream")
        if method == "DELETE":
            query = _query(request, {"sort", "consistency", "fence"})
            hlc = await self._service.delete(keyspace, key, query.get("sort", b""),
                                             _consistency(query), b"", _fence(query))
            return json_response({"hlc": hlc})
        raise web.HTTPMethodNotAllowed(method, ["GET", "HEAD", "PUT", "DELETE"])

    async def scan(self, request: web.Request) -> web.StreamResponse:
        keyspace, key = _keyspace_and_key(request, "/v1/scan/")
        self._check(request, "read", keyspace, key, "scan")
        query = _query(request, {"start", "end", "limit", "consistency"})
        limit = _int(query, "limit", 1000, 1, CLIENT_SCAN_ROWS_MAX)
        rows, more = await self._service.scan(keyspace, key, query.get("start"),
                                              query.get("end"), limit, _consistency(query))
        body: dict[str, Any] = {
            "rows": [{"sort": _utf8(r.sort), "sort_b64": _b64(r.sort),
                      "value_b64": _b64(r.value), "value_utf8": _utf8(r.value),
                      "hlc": r.hlc, "expires_at_ms": r.expires_at_ms} for r in rows],
            "more": more,
            "next_start": quote_from_bytes(rows[-1].sort + b"\0", safe="")
            if more and rows else None,
        }
        return json_response(body)

    # -- strong keyspaces ------------------------------------------------------------------

    async def cas(self, request: web.Request) -> web.StreamResponse:
        keyspace, key = _keyspace_and_key(request, "/v1/cas/")
        self._check(request, "write", keyspace, key, "cas")
        query = _query(request, {"sort", "expected_version", "expected_value",
                                 "expected_absent", "idempotency", "fence"})
        value = await request.read()
        if len(value) > self._value_bytes_max:
            raise HttpError("value_too_large", self._too_large())
        version = (None if "expected_version" not in query
                   else _int(query, "expected_version", 0, 0, 2**62))
        absent = query.get("expected_absent", b"") in (b"1", b"true")
        outcome = await self._service.cas(keyspace, key, value, query.get("sort", b""),
                                          version, query.get("expected_value"), absent,
                                          query.get("idempotency", b""), _fence(query))
        if isinstance(outcome, Conflict):
            body = {"error": "conflict", "message": "the expectation did not hold",
                    "version": outcome.version,
                    "value_b64": _b64(outcome.value) if outcome.found else None}
            return json_response(body, status=409)
        return json_response({"version": outcome.version, "duplicate": outcome.duplicate})

    async def incr(self, request: web.Request) -> web.StreamResponse:
        keyspace, key = _keyspace_and_key(request, "/v1/incr/")
        self._check(request, "write", keyspace, key, "incr")
        query = _query(request, {"sort", "delta", "idempotency", "fence"})
        delta = _int(query, "delta", 1, -(2**63), 2**63 - 1)
        changed = await self._service.incr(keyspace, key, delta, query.get("sort", b""),
                                           query.get("idempotency", b""), _fence(query))
        return json_response({"value": int(changed.value), "version": changed.version,
                              "duplicate": changed.duplicate})

    # -- watches (server-sent events) -------------------------------------------------------

    async def watch(self, request: web.Request) -> web.StreamResponse:
        keyspace, key = _keyspace_and_key(request, "/v1/watch/")
        self._check(request, "read", keyspace, key, "watch")
        query = _query(request, {"sort", "prefix", "since_version"})
        prefix = query.get("prefix", b"") in (b"1", b"true")
        since = _int(query, "since_version", 0, 0, 2**62)
        last_id = request.headers.get("Last-Event-ID", "")
        if not prefix and last_id.isdigit():
            since = max(since, int(last_id))  # an EventSource reconnecting resumes
        watch = await self._service.watch(keyspace, key, query.get("sort", b""), prefix,
                                          since)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        try:
            async for event in watch.events():
                if self._auth is not None:  # the token may expire or be revoked meanwhile
                    principal = await self._principal(request)
                    if not principal.allows("read", keyspace, key):
                        raise HttpError("permission_denied", f"watch on keyspace {keyspace!r} "
                                        "is no longer allowed: the caller's roles changed")
                body = {"key": _utf8(event.partition), "key_b64": _b64(event.partition),
                        "sort": _utf8(event.sort), "sort_b64": _b64(event.sort),
                        "version": event.version, "deleted": event.value is None,
                        "value_b64": None if event.value is None else _b64(event.value),
                        "value_utf8": None if event.value is None else _utf8(event.value)}
                event_id = f"id: {event.version}\n" if not prefix else ""
                await response.write(f"{event_id}event: change\ndata: ".encode()
                                     + _json.encode(body) + b"\n\n")
        except KvError as exc:
            await response.write(b"event: error\ndata: " + _json.encode(
                {"error": exc.code, "message": exc.message}) + b"\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            watch.close()
        return response

    # -- locks -------------------------------------------------------------------------------

    async def locks(self, request: web.Request) -> web.StreamResponse:
        name = _lock_name(request)
        method = request.method
        if method in LOCK_OPERATIONS:
            self._check(request, "read" if method == "GET" else "write", LOCK_KEYSPACE,
                        name.encode(), LOCK_OPERATIONS[method])
        if method == "GET":
            _query(request, set())
            info = await self._service.lock_status(name)
            return json_response({"name": name, "held": info.held, "holder": info.holder,
                                  "token": info.token, "expires_in_ms": info.expires_in_ms})
        if method == "POST":
            query = _query(request, {"ttl", "wait", "owner", "idempotency"})
            owner = _text(query, "owner") or _random_owner()
            ttl_ms = _ms(query, "ttl", 10.0)
            lease = await self._service.acquire_lock(
                name, owner, ttl_ms, _ms(query, "wait", 0.0, lo=0), query.get("idempotency", b""))
            return json_response({"name": name, "owner": owner, "token": lease.token,
                                  "ttl_s": ttl_ms / 1000, "duplicate": lease.duplicate})
        if method == "PUT":
            query = _query(request, {"ttl", "owner", "token", "idempotency"})
            owner, token = _holder(query)
            ttl_ms = _ms(query, "ttl", 10.0)
            await self._service.renew_lock(name, owner, token, ttl_ms,
                                           query.get("idempotency", b""))
            return json_response({"name": name, "token": token, "ttl_s": ttl_ms / 1000})
        if method == "DELETE":
            query = _query(request, {"owner", "token", "idempotency"})
            owner, token = _holder(query)
            await self._service.release_lock(name, owner, token, query.get("idempotency", b""))
            return json_response({"name": name, "released": token})
        raise web.HTTPMethodNotAllowed(method, ["GET", "POST", "PUT", "DELETE"])

    # -- keyspaces and ring ----------------------------------------------------------------

    async def create_keyspace(self, request: web.Request) -> web.StreamResponse:
        _query(request, set())
        raw = await request.read()
        try:
            spec = msgspec.json.decode(raw, type=KeyspaceSpec)
        except msgspec.ValidationError as exc:
            raise HttpError("bad_request", f"invalid keyspace JSON: {exc}") from None
        except msgspec.DecodeError as exc:
            raise HttpError("bad_request", f"the body is not valid JSON ({exc}); send "
                            '{"name": "...", "replication": 3, "mode": "eventual"}') from None
        mode = spec.mode.lower()
        if mode not in MODES:
            raise HttpError("bad_request", f"mode {spec.mode!r} is not one of {', '.join(MODES)}")
        read = _level(spec.read_consistency, "read_consistency")
        write = _level(spec.write_consistency, "write_consistency")
        self._check(request, "admin", spec.name, None, "create_keyspace")
        await self._service.create_keyspace(spec.name, spec.replication, mode, read, write,
                                            spec.if_not_exists)
        return json_response({"name": spec.name, "replication": spec.replication, "mode": mode,
                              "read_consistency": read, "write_consistency": write},
                             status=201)

    async def list_keyspaces(self, request: web.Request) -> web.StreamResponse:
        _query(request, set())
        spaces = await self._service.list_keyspaces()
        if self._auth is not None:
            principal = request[PRINCIPAL]
            spaces = [k for k in spaces if principal.sees_keyspace(k.name)]
        return json_response({"keyspaces": [msgspec.structs.asdict(k) for k in spaces]})

    async def ring(self, request: web.Request) -> web.StreamResponse:
        _query(request, set())
        members = self._service.ring_members()
        return json_response({"members": [msgspec.structs.asdict(m) for m in members]})


class NewUser(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    password: str
    roles: list[str] = msgspec.field(default_factory=list)


class NewPassword(msgspec.Struct, forbid_unknown_fields=True):
    password: str


class NewRole(msgspec.Struct, forbid_unknown_fields=True):
    name: str


class GrantSpec(msgspec.Struct, forbid_unknown_fields=True):
    level: str
    keyspace: str
    prefix: str = ""
    """UTF-8 text (partition keys are bytes: use the native client for other prefixes)."""


class NewApiToken(msgspec.Struct, forbid_unknown_fields=True):
    user: str
    name: str
    ttl_s: float


def _body(body: bytes, kind: type[Any]) -> Any:
    return msgspec.json.decode(body or b"{}", type=kind)


def _new_user(body: bytes) -> CreateUser:
    user = _body(body, NewUser)
    return CreateUser(0, user.name, user.password, user.roles)


def _new_api_token(body: bytes) -> CreateApiToken:
    spec = _body(body, NewApiToken)
    return CreateApiToken(0, spec.user, spec.name, spec.ttl_s)


def _grant(role: str, body: bytes, revoke: bool) -> RoleGrant:
    spec = _body(body, GrantSpec)
    return RoleGrant(0, role, spec.level, spec.keyspace, spec.prefix.encode(), revoke)


AdminBuilder = Callable[[dict[str, str], bytes], Any]
ADMIN_ROUTES: dict[str, dict[str, AdminBuilder]] = {
    "/v1/auth/users": {
        "GET": lambda m, b: ListUsers(0),
        "POST": lambda m, b: _new_user(b)},
    "/v1/auth/users/{name}": {"DELETE": lambda m, b: DeleteUser(0, m["name"])},
    "/v1/auth/users/{name}/password": {
        "PUT": lambda m, b: SetPassword(0, m["name"], _body(b, NewPassword).password)},
    "/v1/auth/users/{name}/roles/{role}": {
        "PUT": lambda m, b: UserRole(0, m["name"], m["role"]),
        "DELETE": lambda m, b: UserRole(0, m["name"], m["role"], revoke=True)},
    "/v1/auth/users/{name}/totp": {
        "POST": lambda m, b: EnableTotp(0, m["name"]),
        "DELETE": lambda m, b: DisableTotp(0, m["name"])},
    "/v1/auth/roles": {
        "GET": lambda m, b: ListRoles(0),
        "POST": lambda m, b: CreateRole(0, _body(b, NewRole).name)},
    "/v1/auth/roles/{name}": {"DELETE": lambda m, b: DeleteRole(0, m["name"])},
    "/v1/auth/roles/{name}/grants": {
        "POST": lambda m, b: _grant(m["name"], b, revoke=False),
        "DELETE": lambda m, b: _grant(m["name"], b, revoke=True)},
    "/v1/auth/tokens": {
        "POST": lambda m, b: _new_api_token(b)},
    "/v1/auth/tokens/{token_id}": {"DELETE": lambda m, b: RevokeToken(0, m["token_id"])},
}
"""Administration over HTTP: path -> method -> the native request it becomes."""


def _admin_reply(reply: Any) -> Any:
    if isinstance(reply, Users):
        return {"users": [{"name": u.name, "roles": u.roles, "totp": u.totp,
                           "created_at": u.created_at} for u in reply.users]}
    if isinstance(reply, Roles):
        return {"roles": [{"name": r.name, "grants": [
            {"level": g.level, "keyspace": g.keyspace, "prefix": _utf8(g.prefix),
             "prefix_b64": _b64(g.prefix)} for g in r.grants]} for r in reply.roles]}
    if isinstance(reply, TotpProvisioning):
        return {"uri": reply.uri}
    if isinstance(reply, Token):
        return {"token": reply.token, "token_id": reply.token_id, "user": reply.user,
                "expires_at": reply.expires_at}
    return {"ok": True}


LOCK_OPERATIONS = {"GET": "lock_status", "POST": "acquire_lock", "PUT": "renew_lock",
                   "DELETE": "release_lock"}


class LoginBody(msgspec.Struct, forbid_unknown_fields=True):
    user: Annotated[str, msgspec.Meta(max_length=256)]
    password: Annotated[str, msgspec.Meta(max_length=PASSWORD_CHARS_MAX)]
    totp: Annotated[str, msgspec.Meta(max_length=TOTP_CODE_CHARS_MAX)] | None = None


def _request_token(request: web.Request) -> str:
    """``Authorization: Bearer`` on any route; the login cookie on GET only, and on
    logout (a cookie is sent by the browser on its own, so it must not authorize a
    change: CSRF)."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    if request.method in ("GET", "HEAD") or request.path in COOKIE_CHANGE_PATHS:
        return request.cookies.get(TOKEN_COOKIE, "")
    return ""


def _now() -> float:
    return time.time()


class KeyspaceSpec(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    replication: Annotated[int, msgspec.Meta(ge=1, le=REPLICATION_MAX)] = 3
    mode: str = "eventual"
    read_consistency: str = "QUORUM"
    write_consistency: str = "QUORUM"
    if_not_exists: bool = False


# -- request parsing ----------------------------------------------------------------------


def _keyspace_and_key(request: web.Request, prefix: str) -> tuple[str, bytes]:
    """(keyspace, key bytes) from the raw path, so %2F and non-UTF-8 bytes survive."""
    raw = request.raw_path.split("?", 1)[0]
    tail = raw[len(prefix):] if raw.startswith(prefix) else ""
    keyspace_raw, sep, key_raw = tail.partition("/")
    if not sep or not keyspace_raw or not key_raw:
        raise HttpError("bad_request", f"the path must be {prefix}{{keyspace}}/{{key}} "
                        "(percent-encode a '/' inside a key as %2F)")
    try:
        keyspace = unquote_to_bytes(keyspace_raw).decode()
    except UnicodeDecodeError:
        raise HttpError("bad_request", "the keyspace name is not UTF-8") from None
    return keyspace, unquote_to_bytes(key_raw)


def _query(request: web.Request, allowed: set[str]) -> dict[str, bytes]:
    """Query parameters as raw bytes (percent-decoded; '+' is a space)."""
    result: dict[str, bytes] = {}
    for part in request.query_string.split("&"):
        if not part:
            continue
        name_raw, _, value_raw = part.partition("=")
        name = unquote_to_bytes(name_raw.replace("+", " ")).decode(errors="replace")
        if name not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            raise HttpError("bad_request", f"unknown query parameter {name[:40]!r} "
                            f"(this route takes: {known})")
        result[name] = unquote_to_bytes(value_raw.replace("+", " "))
    return result


def _lock_name(request: web.Request) -> str:
    raw = request.raw_path.split("?", 1)[0][len("/v1/locks/"):]
    try:
        name = unquote_to_bytes(raw).decode()
    except UnicodeDecodeError:
        raise HttpError("bad_request", "a lock name must be UTF-8 text") from None
    if not name:
        raise HttpError("bad_request", "the path must be /v1/locks/{name}")
    return name


def _fence(query: dict[str, bytes]) -> tuple[str, int] | None:
    raw = _text(query, "fence")
    if raw is None:
        return None
    lock, sep, token = raw.rpartition(":")
    if not sep or not lock or not token.isdigit():
        raise HttpError("bad_request", f"fence {raw!r} is not LOCK:TOKEN (e.g. backup:7)")
    return lock, int(token)


def _holder(query: dict[str, bytes]) -> tuple[str, int]:
    owner = _text(query, "owner")
    if not owner or "token" not in query:
        raise HttpError("bad_request", "give the lease's owner and token: "
                        "?owner=...&token=N (as the acquire answered)")
    return owner, _int(query, "token", 0, 0, 2**62)


def _ms(query: dict[str, bytes], name: str, default_s: float, lo: float = 0.1) -> int:
    raw = _text(query, name)
    if raw is None:
        return int(default_s * 1000)
    try:
        seconds = float(raw)
    except ValueError:
        raise HttpError("bad_request", f"{name} must be seconds, got {raw!r}") from None
    if not lo <= seconds <= 86400:
        raise HttpError("bad_request", f"{name} {raw} is out of range {lo}..86400 seconds")
    return int(seconds * 1000)


def _random_owner() -> str:
    return "http-" + secrets.token_hex(8)


def _text(query: dict[str, bytes], name: str) -> str | None:
    raw = query.get(name)
    if raw is None:
        return None
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise HttpError("bad_request", f"{name} is not UTF-8") from None


def _level(text: str, name: str) -> str:
    level = text.upper()
    if level not in CONSISTENCY_LEVELS:
        raise HttpError("bad_request", f"{name} {text[:20]!r} is not one of "
                        + ", ".join(CONSISTENCY_LEVELS))
    return level


def _consistency(query: dict[str, bytes]) -> str | None:
    text = _text(query, "consistency")
    return None if text is None or text == "" else _level(text, "consistency")


def _ttl(query: dict[str, bytes]) -> float | None:
    text = _text(query, "ttl")
    if text is None or text == "":
        return None
    try:
        ttl = float(text)
    except ValueError:
        raise HttpError("bad_request", f"ttl {text[:20]!r} is not a number of seconds") from None
    if not 0 < ttl <= TTL_S_MAX:
        raise HttpError("bad_request", f"ttl must be in (0, {TTL_S_MAX}] seconds, got {text}")
    return ttl


def _int(query: dict[str, bytes], name: str, default: int, lo: int, hi: int) -> int:
    text = _text(query, name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise HttpError("bad_request", f"{name} {text[:20]!r} is not an integer") from None
    if not lo <= value <= hi:
        raise HttpError("bad_request", f"{name} must be in {lo}..{hi}, got {value}")
    return value


def _format(query: dict[str, bytes]) -> bool:
    text = _text(query, "format")
    if text in (None, "", "raw"):
        return False
    if text == "json":
        return True
    raise HttpError("bad_request", f"format {text!r} is not raw or json")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _utf8(data: bytes) -> str | None:
    try:
        return data.decode()
    except UnicodeDecodeError:
        return None


def _show(data: bytes) -> str:
    text = _utf8(data)
    return repr(text[:80]) if text is not None else data[:40].hex()


__all__ = ["STATUS_BY_CODE", "make_app", "serve_http"]
