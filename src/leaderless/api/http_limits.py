"""Hostile-input limits of the HTTP listener: connection caps, slow-loris deadlines, sizes.

aiohttp bounds the size of what a client sends (request line, header fields, header count,
body) but not the time it takes to send it. Here is what bounds the time, and why each is
sound:

- **Headers**: aiohttp arms its keep-alive timer when a connection opens and after each
  response, and bytes arriving do *not* re-arm it; when it fires while no complete request
  head has arrived, aiohttp closes the connection. So ``HTTP_IDLE_TIMEOUT_S`` is both the
  idle keep-alive close and the deadline for a request's headers, however slowly they
  trickle (tests/unit/test_connection_limits.py trickles them over a real socket).
- **Body**: ``read_body_within`` (a middleware, innermost: after authentication) reads
  the whole body before the handler, within ``HTTP_BODY_TIMEOUT_BASE_S`` plus the time
  the body needs at ``HTTP_BODY_BYTES_PER_S_MIN``; a client that trickles slower gets 408
  and the connection is closed. aiohttp keeps the bytes, so the handler's ``read`` is free.
- **Replies**: ``GuardedConnection`` closes a connection whose reader has not taken a
  byte for ``HTTP_WRITE_STALL_TIMEOUT_S`` while we had a reply to write (a slow-read
  attack, or a dashboard tab left on a watch over a dead network).
- **Log flooding**: aiohttp logs every request it cannot parse at ERROR with a traceback;
  ``ParseErrorLogFilter`` keeps one warning line per kind of parse error per
  ``HTTP_PARSE_ERROR_LOG_INTERVAL_S`` (with how many it left out), so garbage sent to the
  port cannot fill the disk.
- **Connections**: ``HTTP_CONNECTIONS_MAX`` in all, ``HTTP_CONNECTIONS_PER_CLIENT_MAX``
  per client address (``runtime.connection_limits``); beyond either, a 503 naming the
  limit, the connection closed, the refusal counted and logged rate-limited.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from leaderless.runtime.connection_limits import ConnectionCaps, client_address
from leaderless.runtime.drops import Drops

HTTP_CONNECTIONS_MAX = 1024
"""HTTP connections served at once (dashboards, curl, programs without a native client)."""
HTTP_CONNECTIONS_PER_CLIENT_MAX = 128
"""Of those, the connections one client address may hold: a browser opens six per site,
an office behind one NAT address a few hundred at most; a flood from one host leaves
seven eighths of the slots to everyone else."""
HTTP_IDLE_TIMEOUT_S = 15.0
"""An idle keep-alive connection is closed after this long, and a request's headers must
arrive whole within this long of the connection opening or of the previous response."""
HTTP_BODY_TIMEOUT_BASE_S = 10.0
"""A request body may take this long plus its size at ``HTTP_BODY_BYTES_PER_S_MIN``."""
HTTP_BODY_BYTES_PER_S_MIN = 64 * 1024
"""The slowest upload we wait for: 64 KiB/s, so a 1 MiB value has 26 s, 8 MiB 138 s."""
HTTP_WRITE_STALL_TIMEOUT_S = 60.0
"""A connection whose reader takes none of our reply bytes for this long is closed."""
HTTP_LINE_BYTES_MAX = 8190
"""The longest request line (method, path, query) or header line: aiohttp's default,
stated here so the table of limits is complete; longer gets 400 (URL too long: 414)."""
HTTP_HEADER_BYTES_MAX = 8190
"""The longest header field; longer gets 400."""
HTTP_HEADERS_MAX = 128
"""The most header fields in one request; more gets 400."""
HTTP_LINGER_S = 5.0
"""After a reply, an unread request body is drained (and dropped) for at most this long
before the connection is closed, so a client that sent a body nobody reads is bounded."""

HTTP_PARSE_ERROR_LOG_INTERVAL_S = 10.0
"""At most one log line per kind of unparsable request per this many seconds."""


class ParseErrorLogFilter(logging.Filter):
    """Turns aiohttp's ERROR-with-traceback for a request it could not parse (the client's
    fault: ``HttpProcessingError``) into one warning line per kind per interval, counting
    those left out. Other records pass unchanged."""

    def __init__(self, interval_s: float = HTTP_PARSE_ERROR_LOG_INTERVAL_S,
                 kinds_max: int = 256) -> None:
        super().__init__()
        self._interval_s = interval_s
        self._kinds_max = kinds_max
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        kind = type(exc).__name__
        last = self._last.get(kind)
        if last is not None and record.created - last < self._interval_s:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return False
        if len(self._last) >= self._kinds_max and kind not in self._last:
            self._last.clear()
            self._suppressed.clear()
        self._last[kind] = record.created
        suppressed = self._suppressed.pop(kind, 0)
        record.msg = (f"unparsable HTTP request from %s: {kind}: "
                      f"{str(exc.message)[:200]!r} ({suppressed} more left out)")
        record.exc_info = None
        record.exc_text = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


HTTP_SERVER_LOGGER = logging.getLogger("leaderless.http_server")
"""aiohttp's per-connection logger for our listeners (parse errors, rate-limited)."""
HTTP_SERVER_LOGGER.addFilter(ParseErrorLogFilter())

RUNNER_OPTIONS: dict[str, Any] = {
    "logger": HTTP_SERVER_LOGGER,
    "keepalive_timeout": HTTP_IDLE_TIMEOUT_S,
    "max_line_size": HTTP_LINE_BYTES_MAX,
    "max_field_size": HTTP_HEADER_BYTES_MAX,
    "max_headers": HTTP_HEADERS_MAX,
    "lingering_time": HTTP_LINGER_S,
}
"""Keyword arguments for ``web.AppRunner`` (passed on to each connection's handler)."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": code, "message": message, "received": 0,
                       "required": 0}).encode()


def read_body_within(base_s: float = HTTP_BODY_TIMEOUT_BASE_S,
                     bytes_per_s_min: float = HTTP_BODY_BYTES_PER_S_MIN) -> Any:
    """A middleware that reads a request's whole body within ``base_s`` plus its declared
    length (or, chunked, the app's ``client_max_size``) at ``bytes_per_s_min``, before
    the handler runs; a slower body gets 408 ``request_timeout`` and the connection is
    closed. Put it innermost, after authentication, so only a caller allowed in can make
    us wait for a body."""

    @web.middleware
    async def read_body_in_time(request: web.Request, handler: Handler
                                ) -> web.StreamResponse:
        if request.can_read_body:
            declared = request.content_length
            expected = min(request.client_max_size, declared if declared is not None
                           else request.client_max_size)
            deadline = base_s + expected / bytes_per_s_min
            try:
                async with asyncio.timeout(deadline):
                    await request.read()
            except TimeoutError:
                response = web.Response(
                    status=408, content_type="application/json",
                    body=_error_body("request_timeout",
                                     f"the request body did not arrive within "
                                     f"{deadline:.1f} s ({base_s:g} s plus its size at "
                                     f"{bytes_per_s_min / 1024:g} KiB/s); closing the "
                                     "connection"))
                response.force_close()
                return response
            except (ConnectionResetError, HttpProcessingError) as exc:
                # The client closed, or its body broke its own framing (a chunk or the
                # Content-Length): its fault, answered (if it still listens) with 400.
                response = web.Response(
                    status=400, content_type="application/json",
                    body=_error_body("bad_request", "the request body ended before its "
                                     f"declared end or was malformed ({type(exc).__name__})"))
                response.force_close()
                return response
        return await handler(request)

    return read_body_in_time


async def serve_guarded(app: web.Application, host: str, port: int, *, drops: Drops,
                        ssl_context: Any = None,
                        connections_max: int = HTTP_CONNECTIONS_MAX,
                        connections_per_client_max: int = HTTP_CONNECTIONS_PER_CLIENT_MAX,
                        idle_timeout_s: float = HTTP_IDLE_TIMEOUT_S,
                        body_timeout_base_s: float = HTTP_BODY_TIMEOUT_BASE_S,
                        body_bytes_per_s_min: float = HTTP_BODY_BYTES_PER_S_MIN,
                        write_stall_timeout_s: float = HTTP_WRITE_STALL_TIMEOUT_S
                        ) -> web.AppRunner:
    """Serve ``app`` on ``host:port`` with every limit of this module (defaults: the
    constants above). Stop with ``await runner.cleanup()``."""
    app.middlewares.append(read_body_within(body_timeout_base_s, body_bytes_per_s_min))
    options = {**RUNNER_OPTIONS, "keepalive_timeout": idle_timeout_s}
    runner = web.AppRunner(app, access_log=None, handle_signals=False, **options)
    await runner.setup()
    site = GuardedSite(runner, host, port, drops=drops, ssl_context=ssl_context,
                       connections_max=connections_max,
                       connections_per_client_max=connections_per_client_max,
                       write_stall_timeout_s=write_stall_timeout_s)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


class GuardedConnection(asyncio.Protocol):
    """Stands in front of aiohttp's handler of one connection: applies the connection
    caps on accept and the write-stall deadline, and passes everything else through."""

    def __init__(self, inner: asyncio.Protocol, site: GuardedSite) -> None:
        self._inner = inner
        self._site = site
        self._transport: asyncio.Transport | None = None
        self._stall: asyncio.TimerHandle | None = None
        self.client = ""
        """The address this connection counts against (``runtime.connection_limits``)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self.client = client_address(peer)
        refusal = self._site.caps.refusal(self.client, self._site.connections)
        if refusal is not None:
            self._site.drops.overload(refusal.kind, peer)
            body = _error_body("overloaded", refusal.reason)
            transport = cast(asyncio.Transport, transport)
            transport.write(b"HTTP/1.1 503 Service Unavailable\r\n"
                            b"Content-Type: application/json\r\nRetry-After: 1\r\n"
                            b"Connection: close\r\n"
                            + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            transport.close()
            return
        self._transport = cast(asyncio.Transport, transport)
        self._site.connections.add(self)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._transport is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self._transport is not None:
            return self._inner.eof_received()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        if self._transport is None:
            return  # refused: aiohttp never saw it
        self._transport = None
        self._site.connections.discard(self)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._stall is None:
            self._stall = asyncio.get_running_loop().call_later(
                self._site.write_stall_timeout_s, self._on_stall)
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        self._inner.resume_writing()

    def _on_stall(self) -> None:
        self._stall = None
        if self._transport is not None:
            self._site.drops.overload("http_write_stall", self._transport.get_extra_info(
                "peername"))
            self._transport.abort()


class GuardedSite(web.BaseSite):
    """A TCP site whose every connection is a ``GuardedConnection``."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, drops: Drops,
                 ssl_context: Any = None,
                 connections_max: int = HTTP_CONNECTIONS_MAX,
                 connections_per_client_max: int = HTTP_CONNECTIONS_PER_CLIENT_MAX,
                 write_stall_timeout_s: float = HTTP_WRITE_STALL_TIMEOUT_S) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self._host = host
        self._port = port
        self.caps = ConnectionCaps("http", connections_max, connections_per_client_max)
        self.drops = drops
        self.write_stall_timeout_s = write_stall_timeout_s
        self.connections: set[GuardedConnection] = set()

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: GuardedConnection(server(), self), self._host, self._port,
            ssl=self._ssl_context, backlog=self._backlog, reuse_address=True)
