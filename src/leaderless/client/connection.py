"""One pipelined connection to one node's client listener.

Requests get ids from a per-connection counter and wait on futures keyed by id; replies
may arrive in any order. Requests issued in the same loop turn go out in one
``transport.write`` (``call_soon`` flush), which is what lets 64 concurrent callers share
one socket cheaply. Per-request timeouts are enforced by one sweep timer per connection
rather than a timer per request (cheaper on the hot path; a timeout fires up to
``SWEEP_INTERVAL_S`` late).

With an ``ssl_context`` (``security.tls.client_context``) the connection is TLS: the node's
certificate must come from the cluster CA and name the address dialled. A failed handshake
raises ``TlsHandshakeError`` with OpenSSL's reason; a connection that a node closes before
any reply, without TLS, says that the node may require TLS.
"""

from __future__ import annotations

import asyncio
import ssl
import struct
from typing import Any, cast

import msgspec

from leaderless.api.kv_messages import ClientReply, WatchEvent
from leaderless.client.errors import ConnectionLostError, LeaderlessError, RequestTimeoutError
from leaderless.core.codec import FRAME_BYTES_MAX, FrameDecoder, MalformedInput
from leaderless.security.tls import ENV_CA, TLS_HANDSHAKE_TIMEOUT_S, tls_failure_reason

SWEEP_INTERVAL_S = 0.05
"""How often a connection with requests in flight checks their deadlines."""
PENDING_MAX = 65_536
"""Requests in flight on one connection; beyond it ``send`` waits for room (the node
itself stops reading beyond its own bound, so more would only queue in memory)."""

_HEADER = struct.Struct(">I")
_encoder = msgspec.msgpack.Encoder()


class TlsHandshakeError(LeaderlessError):
    """TLS with the node failed (wrong CA, a certificate that does not name the address,
    a node without TLS); the message has OpenSSL's reason. A configuration error, so it
    is raised rather than retried on another node."""

    code = "tls"


class NodeConnection(asyncio.Protocol):
    """``conn = await NodeConnection.open(host, port, t)``; ``await conn.call(Get, ...)``."""

    def __init__(self, address: str, tls: bool = False) -> None:
        self.address = address
        self.tls = tls
        self._answered = False
        """A frame came from the node: a close after that is not a TLS mismatch."""
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._decoder: FrameDecoder[ClientReply] = FrameDecoder(ClientReply, FRAME_BYTES_MAX)
        self._pending: dict[int, tuple[asyncio.Future[ClientReply], float]] = {}
        self._streams: dict[int, asyncio.Queue[ClientReply | Exception]] = {}
        self._next_id = 1
        self._outbuf = bytearray()
        self._flush_scheduled = False
        self._sweep: asyncio.TimerHandle | None = None
        self._error: Exception | None = None
        self._room = asyncio.Event()
        self._room.set()
        self._write_ready = asyncio.Event()
        self._write_ready.set()

    @classmethod
    async def open(cls, host: str, port: int, timeout_s: float,
                   ssl_context: ssl.SSLContext | None = None) -> NodeConnection:
        """Connect within ``timeout_s`` (raises OSError or TimeoutError, and
        ``TlsHandshakeError`` when ``ssl_context`` is given and the handshake fails)."""
        loop = asyncio.get_running_loop()
        address = f"{host}:{port}"
        tls = ssl_context is not None
        try:
            async with asyncio.timeout(timeout_s):
                _, protocol = await loop.create_connection(
                    lambda: cls(address, tls), host, port, ssl=ssl_context,
                    server_hostname=host if tls else None,
                    ssl_handshake_timeout=min(timeout_s, TLS_HANDSHAKE_TIMEOUT_S)
                    if tls else None)
        except ssl.SSLError as exc:
            raise TlsHandshakeError(
                f"TLS with {address} failed: {tls_failure_reason(exc)}; is this the "
                "cluster's CA, and does the node serve TLS?") from None
        return protocol

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio's, so no isinstance check here.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._answered = True
        try:
            replies = self._decoder.feed(data)
        except MalformedInput as exc:
            self._fail(ConnectionLostError(f"{self.address} sent a bad frame: {exc}"))
            self.close()
            return
        pending = self._pending
        streams = self._streams
        for reply in replies:
            if streams and reply.id in streams:
                stream = streams[reply.id]
                if not isinstance(reply, WatchEvent):
                    del streams[reply.id]  # a Failure ends the stream
                stream.put_nowait(reply)
                continue
            entry = pending.pop(reply.id, None)
            if entry is None:
                if reply.id == 0:  # the node refused our framing; it closes the connection
                    self._fail(ConnectionLostError(
                        f"{self.address} refused a frame: {getattr(reply, 'message', reply)}"))
                continue  # a reply to a request that already timed out
            future = entry[0]
            if not future.done():
                future.set_result(reply)
        if not self._room.is_set() and len(pending) < PENDING_MAX // 2:
            self._room.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if isinstance(exc, ssl.SSLError):  # e.g. the node refused our client certificate
            self._fail(TlsHandshakeError(f"TLS with {self.address} failed: "
                                         f"{tls_failure_reason(exc)}"))
            return
        hint = ""
        if not self.tls and not self._answered:
            hint = (f" before answering; if the node serves TLS, give the client "
                    f"tls=ClientTls(ca) or set {ENV_CA}")
        self._fail(ConnectionLostError(
            f"the connection to {self.address} broke" + (f": {exc}" if exc else "") + hint))

    def pause_writing(self) -> None:
        self._write_ready.clear()

    def resume_writing(self) -> None:
        self._write_ready.set()

    # -- requests --------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._error is None and self._transport is not None

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    async def call(self, kind: type[Any], args: tuple[Any, ...], timeout_s: float
                   ) -> ClientReply:
        """Send ``kind(id, *args)`` and wait for its reply (raises ``ConnectionLostError``
        or ``RequestTimeoutError``)."""
        if self._error is not None:
            raise self._error
        if not self._room.is_set() or not self._write_ready.is_set():
            await self._room.wait()
            await self._write_ready.wait()
            if self._error is not None:
                raise self._error
        request_id = self._next_id
        self._next_id += 1
        self._write(kind(request_id, *args))
        future: asyncio.Future[ClientReply] = self._loop.create_future()
        self._pending[request_id] = (future, self._loop.time() + timeout_s)
        if len(self._pending) >= PENDING_MAX:
            self._room.clear()
        if self._sweep is None:
            self._sweep = self._loop.call_later(SWEEP_INTERVAL_S, self._on_sweep)
        try:
            return await future
        except asyncio.CancelledError:
            self._pending.pop(request_id, None)
            raise

    def open_stream(self, kind: type[Any], args: tuple[Any, ...]
                    ) -> tuple[int, asyncio.Queue[ClientReply | Exception]]:
        """Send ``kind(id, *args)`` whose replies are a stream (a watch): every reply with
        that id goes to the queue; a ``Failure`` or the connection's error ends it."""
        if self._error is not None:
            raise self._error
        request_id = self._next_id
        self._next_id += 1
        queue: asyncio.Queue[ClientReply | Exception] = asyncio.Queue()
        self._streams[request_id] = queue
        self._write(kind(request_id, *args))
        return request_id, queue

    def close_stream(self, request_id: int, unwatch: type[Any]) -> None:
        if self._streams.pop(request_id, None) is not None and self._error is None:
            self._write(unwatch(self._next_id, request_id))
            self._next_id += 1

    def _write(self, request: Any) -> None:
        out = self._outbuf
        start = len(out)
        out += b"\0\0\0\0"
        _encoder.encode_into(request, out, start + 4)
        _HEADER.pack_into(out, start, len(out) - start - 4)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._outbuf and self._transport is not None and not self._transport.is_closing():
            self._transport.write(bytes(self._outbuf))
        self._outbuf.clear()

    def _on_sweep(self) -> None:
        self._sweep = None
        if not self._pending:
            return
        now = self._loop.time()
        expired = [rid for rid, (_, deadline) in self._pending.items() if deadline <= now]
        for rid in expired:
            future, _ = self._pending.pop(rid)
            if not future.done():
                future.set_exception(RequestTimeoutError(
                    f"no reply from {self.address} in time; a write may or may not have "
                    "applied", code="timeout"))
        if self._pending:
            self._sweep = self._loop.call_later(SWEEP_INTERVAL_S, self._on_sweep)
        if not self._room.is_set() and len(self._pending) < PENDING_MAX // 2:
            self._room.set()

    def _fail(self, exc: Exception) -> None:
        if self._error is None:
            self._error = exc
        pending, self._pending = self._pending, {}
        for future, _ in pending.values():
            if not future.done():
                future.set_exception(exc)
        streams, self._streams = self._streams, {}
        for queue in streams.values():
            queue.put_nowait(exc)
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        self._room.set()  # wake waiters so they see the error
        self._write_ready.set()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        self._fail(ConnectionLostError(f"the connection to {self.address} was closed"))
