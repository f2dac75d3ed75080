"""The dashboard's HTTP routes on a node's HTTP listener.

=================================  ===================================================
``GET /``                          the dashboard page (``static/index.html``)
``GET /static/{path}``             files under this package's ``static`` dir only (no
                                   path traversal, no symlinks out, no directory
                                   listings); ECharts is vendored under
                                   ``static/vendor/echarts``, nothing is fetched from
                                   the internet at run time
``GET /api/dashboard/stream``      server-sent events (``text/event-stream``): one
                                   ``snapshot`` event per ``STREAM_INTERVAL_S`` (1 s)
                                   with this node's view, as JSON ``{"node", "time",
                                   "system": {...} | null, "requests": {"ops_per_s",
                                   "p99_ms"} | null, "members": [...] (``/api/cluster``),
                                   "alerts": [...] | null}``. At most ``STREAMS_MAX``
                                   at once per node: beyond, 503 ``overloaded``.
=================================  ===================================================

With auth on (the node's ``auth.enabled``), the page and its static files stay open (they
hold the login form, no data) but the stream needs a valid token: the ``leaderless_token``
cookie the login sets (an ``EventSource`` cannot send headers) or ``Authorization: Bearer``.
Without one it answers 401 ``unauthenticated``; a stream whose token expires or is revoked
ends with an ``unauthenticated`` event, so the page returns to its login form. Any
authenticated user may watch: the stream holds cluster health, no keyspace data.

``system`` holds ``cpu_pct``, ``mem_pct``, ``memory_used_bytes``, ``memory_total_bytes``,
``disk_pct``, ``disk_used_bytes``, ``disk_total_bytes``, ``disk_read_bps``,
``disk_write_bps``, ``net_in_bps``, ``net_out_bps`` (bytes per second, from the cumulative
counters between two samples; 0 for the first), ``load_1m``, ``load_5m``, ``load_15m``,
``disk_io_available`` and ``network_io_available`` (False where the OS gives no counters).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any, Final, Protocol

import msgspec
from aiohttp import web

from leaderless.api.ops_http import OpsSource
from leaderless.api.service import KvError
from leaderless.obs.system import SystemSample

STATIC_DIR: Final = Path(__file__).resolve().parent / "static"
STREAMS_MAX: Final = 32
"""Concurrent dashboard streams per node: each costs a task and a write per second."""
STREAM_INTERVAL_S: Final = 1.0
"""At most one event per second per stream (the issue's bound)."""
SNAPSHOT_AGE_S_MAX: Final = 0.9
"""A snapshot younger than this is sent again, so many streams cost one snapshot."""

TOKEN_COOKIE: Final = "leaderless_token"
"""The HttpOnly cookie ``POST /v1/auth/login`` sets: the browser's session."""

_log = logging.getLogger(__name__)
_json = msgspec.json.Encoder()


class DashboardAuth(Protocol):
    """What the dashboard needs of the node's ``AuthService`` (``runtime.auth``)."""

    @property
    def enabled(self) -> bool: ...

    async def authenticate(self, token: str, peer: str) -> Any:
        """The caller's principal; raises a ``KvError`` (``AuthError``) such as
        ``unauthenticated`` for a missing, invalid, expired or revoked token."""


def request_token(request: web.Request) -> str:
    """The token a request carries: ``Authorization: Bearer`` first, else the login
    cookie (all an ``EventSource`` can send); "" for none."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.cookies.get(TOKEN_COOKIE, "")


def _auth_of(ops: OpsSource) -> DashboardAuth | None:
    """The node's auth service when auth is on; None when off (or the node has none)."""
    auth = getattr(ops, "auth", None)
    return auth if auth is not None and getattr(auth, "enabled", False) else None


class Snapshots:
    """Builds the stream's JSON snapshots of one node, shared by all its streams."""

    def __init__(self, ops: OpsSource) -> None:
        self._ops = ops
        self._body = b""
        self._built_at = -SNAPSHOT_AGE_S_MAX
        self._previous: tuple[SystemSample, float] | None = None
        self._alerts_failed = False
        self._rates = {"disk_read_bps": 0.0, "disk_write_bps": 0.0, "net_in_bps": 0.0,
                       "net_out_bps": 0.0}

    def body(self) -> bytes:
        now = time.monotonic()
        if now - self._built_at >= SNAPSHOT_AGE_S_MAX or not self._body:
            self._body = _json.encode(self.snapshot())
            self._built_at = now
        return self._body

    def snapshot(self) -> dict[str, Any]:
        ops = self._ops
        try:
            members: list[dict[str, Any]] = ops.cluster()
        except RuntimeError:  # not started yet
            members = []
        return {"node": ops.name, "time": round(time.time(), 3), "system": self._system(),
                "requests": self._requests(), "members": members, "alerts": self._alerts()}

    def _system(self) -> dict[str, Any] | None:
        # The node's SystemSampler (``Node.system``), shared with /metrics and the gossiped
        # load: one pass over /proc per second for all of them.
        sampler = getattr(self._ops, "system", None)
        if sampler is None or not hasattr(sampler, "sample"):
            return None
        sample: SystemSample = sampler.sample()
        now = time.monotonic()
        previous = self._previous
        if previous is None:
            self._previous = (sample, now)
        elif previous[0] is not sample:  # the sampler caches; a new one means new counters
            old, at = previous
            elapsed = now - at
            if elapsed > 0:
                self._rates = {
                    "disk_read_bps": _rate(sample.disk_read_bytes, old.disk_read_bytes,
                                           elapsed),
                    "disk_write_bps": _rate(sample.disk_write_bytes, old.disk_write_bytes,
                                            elapsed),
                    "net_in_bps": _rate(sample.network_received_bytes,
                                        old.network_received_bytes, elapsed),
                    "net_out_bps": _rate(sample.network_sent_bytes, old.network_sent_bytes,
                                         elapsed)}
            self._previous = (sample, now)
        return {
            "cpu_pct": sample.cpu_percent,
            "process_cpu_pct": sample.process_cpu_percent,
            "mem_pct": sample.memory_used_pct,
            "memory_used_bytes": sample.memory_used_bytes,
            "memory_total_bytes": sample.memory_total_bytes,
            "disk_pct": sample.disk_used_pct,
            "disk_used_bytes": sample.disk_used_bytes,
            "disk_total_bytes": sample.disk_total_bytes,
            **self._rates,
            "load_1m": round(sample.load_1m, 2), "load_5m": round(sample.load_5m, 2),
            "load_15m": round(sample.load_15m, 2),
            "disk_io_available": sample.disk_io_available,
            "network_io_available": sample.network_io_available}

    def _requests(self) -> dict[str, float] | None:
        stats = getattr(self._ops, "requests", None)
        if stats is None or not hasattr(stats, "ops_per_s"):
            return None
        return {"ops_per_s": round(stats.ops_per_s(), 2), "p99_ms": round(stats.p99_ms(), 3)}

    def _alerts(self) -> list[Any] | None:
        alerts = getattr(self._ops, "alerts", None)
        if not callable(alerts):
            return None  # this node has no alert rules (yet)
        try:
            found = alerts()
            # Whatever shape the rules give (dicts, Structs, dataclasses): plain JSON values.
            decoded: Any = msgspec.json.decode(_json.encode(found))
        except Exception:  # an alert rule failing must not end the dashboard
            if not self._alerts_failed:  # once, not every second of every stream
                _log.exception("alerts() failed; the dashboard shows none")
            self._alerts_failed = True
            return None
        self._alerts_failed = False
        if isinstance(decoded, dict):
            decoded = decoded.get("alerts", [decoded])
        return decoded if isinstance(decoded, list) else [decoded]


def _rate(new: int, old: int, elapsed_s: float) -> float:
    return round(max(0, new - old) / elapsed_s, 1)  # counters reset: 0, not negative


def add_web_routes(app: web.Application, ops: OpsSource) -> None:
    """Add the dashboard (``/``, ``/static/...``, ``/api/dashboard/stream``) for ``ops``."""
    snapshots = Snapshots(ops)
    streams: set[asyncio.Task[Any]] = set()
    stopping = asyncio.Event()

    async def index(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC_DIR / "index.html",
                                headers={"Cache-Control": "no-cache"})

    async def static(request: web.Request) -> web.StreamResponse:
        path = _static_file(request.match_info["path"])
        if path is None:
            raise web.HTTPNotFound(text="not found")
        return web.FileResponse(path, headers={"Cache-Control": "no-cache"})

    async def authenticated(request: web.Request) -> KvError | None:
        """None when the caller may watch (auth off, or a valid token), else why not.
        Asked on every event: a stream ends when its token expires or is revoked."""
        auth = _auth_of(ops)
        if auth is None:
            return None
        token = request_token(request)
        if not token:
            return KvError("unauthenticated", "log in first: this node requires a token "
                           f"(the {TOKEN_COOKIE} cookie POST /v1/auth/login sets, or an "
                           "Authorization: Bearer header)")
        try:
            await auth.authenticate(token, request.remote or "")
        except KvError as exc:
            return exc
        return None

    async def stream(request: web.Request) -> web.StreamResponse:
        refused = await authenticated(request)
        if refused is not None:
            return web.json_response(
                {"error": refused.code, "message": refused.message},
                status=429 if refused.code == "too_many_attempts" else 401)
        if len(streams) >= STREAMS_MAX:
            return web.json_response(
                {"error": "overloaded",
                 "message": f"this node serves at most {STREAMS_MAX} dashboard streams at "
                            "once; close one or use another node",
                 "received": len(streams) + 1, "required": STREAMS_MAX},
                status=503, headers={"Retry-After": "5"})
        task = asyncio.current_task()
        assert task is not None
        streams.add(task)
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no"})
        try:
            await response.prepare(request)
            await response.write(b"retry: 2000\n\n")
            while not stopping.is_set():
                transport = request.transport
                if transport is None or transport.is_closing():
                    break  # the client went
                refused = await authenticated(request)
                if refused is not None:  # expired or revoked meanwhile: back to the login
                    await response.write(b"event: unauthenticated\ndata: " + _json.encode(
                        {"error": refused.code, "message": refused.message}) + b"\n\n")
                    break
                await response.write(b"event: snapshot\ndata: " + snapshots.body() + b"\n\n")
                try:
                    await asyncio.wait_for(stopping.wait(), STREAM_INTERVAL_S)
                except TimeoutError:
                    pass
        except (ConnectionResetError, asyncio.CancelledError):
            pass  # the client went, or the server stops
        finally:
            streams.discard(task)
        return response

    async def on_shutdown(app: web.Application) -> None:
        stopping.set()  # end every stream now instead of waiting out the shutdown timeout

    app.on_shutdown.append(on_shutdown)
    app.router.add_get("/", index)
    app.router.add_get("/static/{path:.+}", static)
    app.router.add_get("/api/dashboard/stream", stream)


def _static_file(relative: str) -> Path | None:
    """The file ``relative`` names under STATIC_DIR, or None: absolute paths, ``..``,
    hidden names, symlinks leading out of the dir and directories are all refused."""
    parts = relative.replace("\\", "/").split("/")
    if any(part in ("", ".", "..") or part.startswith(".") or "\x00" in part
           for part in parts):
        return None
    try:
        path = STATIC_DIR.joinpath(*parts).resolve(strict=True)
    except (OSError, RuntimeError, ValueError):
        return None
    if not path.is_relative_to(STATIC_DIR) or not path.is_file():
        return None
    return path
