"""The TCP side: length-prefixed msgpack frames (``core.codec``) over ``asyncio.Protocol``.

``ServerConnection`` serves one inbound connection: peers' push-pull syncs and clients'
native requests arrive on the same port and go to a ``FrameHandler``. A peer that sends
bytes that do not decode gets its connection closed. ``FrameClient`` is the outbound side
(push-pull, the CLI): send a frame, await reply frames.

With TLS (``security.tls``) a ``ServerConnection`` runs the server side of TLS itself
(``TlsSession``, over memory buffers) instead of leaving it to the event loop: a failed
handshake (a certificate from another CA, a plaintext client) is then logged with its
reason and counted (``dropped_malformed_total{kind="tls_handshake"}``) rather than vanishing
silently, and the connection knows its peer's verified identity before the first frame.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Callable
from typing import Any, Protocol, cast

from leaderless.core.codec import FRAME_BYTES_MAX, FrameDecoder, MalformedInput, encode_frame
from leaderless.core.messages import Address
from leaderless.runtime.connection_limits import ConnectionCaps, client_address
from leaderless.runtime.drops import Drops
from leaderless.security.tls import (
    TLS_HANDSHAKE_TIMEOUT_S,
    PeerIdentity,
    TlsSession,
    tls_failure_reason,
)

CONNECTIONS_MAX = 512
"""Inbound connections served at once: peers sync one at a time and clients are few; a
flood beyond this is refused (closed on accept) rather than allowed to exhaust memory."""
CONNECTIONS_PER_CLIENT_MAX = 128
"""Of those, the connections one client address (``runtime.connection_limits``) may hold:
a peer keeps one data link plus a sync or two, so even a loopback cluster of dozens of
nodes fits, while one flooding host leaves three quarters of the slots to the others."""
WRITE_BUFFER_BYTES_MAX = 2 * FRAME_BYTES_MAX
"""Bytes queued to a reader that does not read: two of the largest frames, then we give up."""
IDLE_TIMEOUT_S = 60.0
"""A connection that sends nothing for this long (and is not watching) is closed."""
PARTIAL_FRAME_TIMEOUT_S = 60.0
"""A frame must be whole this long after its first byte arrived (checked with the idle
timer, so a trickler is cut within twice this): a peer sending one byte a minute would
otherwise pin a connection slot forever. The largest frame (8 MiB) needs ~140 KB/s."""
CLIENT_QUEUE_FRAMES_MAX = 1024
"""Frames a client buffers before it stops reading the socket (backpressure to the node)."""


class ConnectionClosedError(ConnectionError):
    """The other side closed the connection before answering."""


class FrameHandler(Protocol):
    def handle_frame(self, message: Any, conn: ServerConnection) -> None:
        """One decoded frame from ``conn``; reply with ``conn.send``."""


class ServerConnection(asyncio.Protocol):
    """One inbound TCP connection: decode frames, hand them to the handler, send replies."""

    def __init__(self, handler: FrameHandler, frame_type: Any, drops: Drops,
                 registry: set[ServerConnection], *,
                 connections_per_client_max: int = CONNECTIONS_PER_CLIENT_MAX,
                 tls: ssl.SSLContext | None = None) -> None:
        self._handler = handler
        self._tls = tls
        self._session: TlsSession | None = None
        self._handshake_deadline: asyncio.TimerHandle | None = None
        self._caps = ConnectionCaps("tcp", CONNECTIONS_MAX, connections_per_client_max)
        self._decoder: FrameDecoder[Any] = FrameDecoder(frame_type)
        self._drops = drops
        self._registry = registry
        self._transport: asyncio.Transport | None = None
        self._close_callbacks: list[Callable[[], None]] = []
        self._idle: asyncio.TimerHandle | None = None
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._last_activity = 0.0
        self._partial_since: float | None = None
        """When the frame now half-received began (None: none is)."""
        self.peer = ""
        self.client = ""
        """The address this connection counts against for ``CONNECTIONS_PER_CLIENT_MAX``."""
        self.peer_name: str | None = None
        """The node name a peer announced (``PeerHello``); None for clients."""
        self.streaming = False
        """True while the connection carries a stream (a watch): it is not idle."""
        self.peer_identity: PeerIdentity | None = None
        """With TLS: the role and name in the peer's verified certificate; None without."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio's, so no isinstance check here.
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.client = client_address(peer)
        refusal = self._caps.refusal(self.client, self._registry)
        if refusal is not None:
            self._drops.overload(refusal.kind, self.peer)
            self._transport.abort()
            return
        self._registry.add(self)
        if self._tls is not None:
            self._session = TlsSession(self._tls)
            self._handshake_deadline = asyncio.get_running_loop().call_later(
                TLS_HANDSHAKE_TIMEOUT_S, self._handshake_timed_out)
        self._touch()

    def data_received(self, data: bytes) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        if self._session is not None:
            data = self._decrypt(self._transport, self._session, data)
            if not data:
                return
        self._touch()
        try:
            messages = self._decoder.feed(data)
        except MalformedInput as exc:
            self._drops.malformed("tcp_frame", self.peer, exc)
            self.close()
            return
        if not self._decoder.buffered_bytes:
            self._partial_since = None
        elif self._partial_since is None or messages:
            self._partial_since = self._last_activity
        for message in messages:
            if self._transport.is_closing():
                return
            self._handler.handle_frame(message, self)

    def _decrypt(self, transport: asyncio.Transport, session: TlsSession, data: bytes
                 ) -> bytes:
        """The application bytes in ``data``; on the handshake's end, the peer's identity."""
        handshaking = not session.established
        try:
            plain = session.receive(data)
        except ssl.SSLError as exc:
            transport.write(session.outgoing())  # the alert tells the peer why
            kind = "tls_handshake" if handshaking else "tls_record"
            self._drops.malformed(kind, self.peer, tls_failure_reason(exc))
            transport.close()
            return b""
        out = session.outgoing()
        if out:
            transport.write(out)
        if handshaking and session.established:
            if self._handshake_deadline is not None:
                self._handshake_deadline.cancel()
            self.peer_identity = PeerIdentity.from_ssl_object(session.ssl_object)
            if self.peer_identity is None:
                self._drops.malformed("tls_identity", self.peer, "the certificate names no "
                                      "leaderless role (OU) and name (CN)")
                transport.close()
                return b""
        if session.closed:
            self.close()
        return plain

    def _handshake_timed_out(self) -> None:
        self._handshake_deadline = None
        session = self._session
        if self._transport is not None and session is not None and not session.established:
            session.failed = True
            self._drops.malformed("tls_handshake", self.peer,
                                  f"no TLS handshake within {TLS_HANDSHAKE_TIMEOUT_S:g} s")
            self._transport.abort()

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._registry.discard(self)
        if self._idle is not None:
            self._idle.cancel()
        self._transport = None
        if self._handshake_deadline is not None:
            self._handshake_deadline.cancel()
        if self._session is not None and self._session.abandoned():
            self._drops.malformed("tls_handshake", self.peer, "the peer hung up during the "
                                  "handshake: it may not trust this node's certificate "
                                  "(another cluster's CA?)")
        callbacks, self._close_callbacks = self._close_callbacks, []
        for callback in callbacks:
            callback()

    def pause_writing(self) -> None:
        # The reader is slow: stop reading its requests until it catches up.
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    def _touch(self) -> None:
        # One timer per connection, re-armed lazily: a busy peer sends thousands of
        # frames a second and must not cost a timer each.
        loop = asyncio.get_running_loop()
        self._last_activity = loop.time()
        if self._idle is None:
            self._idle = loop.call_later(IDLE_TIMEOUT_S, self._on_idle)

    def _on_idle(self) -> None:
        self._idle = None
        now = asyncio.get_running_loop().time()
        idle_s = now - self._last_activity
        if (self._partial_since is not None
                and now - self._partial_since > PARTIAL_FRAME_TIMEOUT_S):
            self._drops.malformed("tcp_partial_frame", self.peer,
                                  f"a frame not whole {PARTIAL_FRAME_TIMEOUT_S:g} s after its "
                                  "first byte")
            self.close()
        elif self.streaming or idle_s < IDLE_TIMEOUT_S:
            self._idle = asyncio.get_running_loop().call_later(
                max(0.1, IDLE_TIMEOUT_S - idle_s), self._on_idle)
        else:
            self.close()

    # -- for handlers ------------------------------------------------------------------

    def send(self, message: Any, drop_kind: str = "tcp_slow_reader") -> bool:
        """Write one frame; False (and the connection closed) if the reader is too slow."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return False
        if transport.get_write_buffer_size() + self._pending_bytes > WRITE_BUFFER_BYTES_MAX:
            self._drops.overload(drop_kind, self.peer)
            self.close()
            return False
        # Replies of one loop turn leave in one write (one syscall), not one each.
        frame = encode_frame(message)
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(frame)
        self._pending_bytes += len(frame)
        return True

    def _flush(self) -> None:
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        transport = self._transport
        if transport is not None and not transport.is_closing() and pending:
            data = b"".join(pending)
            session = self._session
            if session is not None:  # frames exist only after the handshake
                data = session.encrypt(data)
            transport.write(data)

    def on_close(self, callback: Callable[[], None]) -> None:
        self._close_callbacks.append(callback)

    def close(self) -> None:
        if self._transport is not None:
            self._flush()
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


class FrameClient(asyncio.Protocol):
    """An outbound connection: ``send`` frames, ``recv`` decoded replies in order."""

    def __init__(self, reply_type: Any) -> None:
        self._decoder: FrameDecoder[Any] = FrameDecoder(reply_type)
        self._transport: asyncio.Transport | None = None
        self._frames: collections.deque[Any] = collections.deque()
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False

    @classmethod
    async def connect(cls, address: Address, reply_type: Any, timeout_s: float,
                      ssl_context: ssl.SSLContext | None = None) -> FrameClient:
        """Connect within ``timeout_s`` (raises TimeoutError or OSError, ssl.SSLError when
        the TLS handshake fails). With ``ssl_context`` the node's certificate must name
        ``address.host``."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout_s):
            if ssl_context is None:
                _, protocol = await loop.create_connection(
                    lambda: cls(reply_type), address.host, address.port)
            else:
                _, protocol = await loop.create_connection(
                    lambda: cls(reply_type), address.host, address.port, ssl=ssl_context,
                    server_hostname=address.host, ssl_handshake_timeout=timeout_s)
        return protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio's, so no isinstance check here.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._frames.extend(self._decoder.feed(data))
        except MalformedInput as exc:
            self._fail(MalformedInput(f"the node sent a bad frame: {exc}"))
            self.close()
            return
        if len(self._frames) >= CLIENT_QUEUE_FRAMES_MAX and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._fail(exc or ConnectionClosedError("the node closed the connection"))

    def _fail(self, exc: Exception) -> None:
        if self._error is None:
            self._error = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def send(self, message: Any) -> None:
        if self._transport is None or self._transport.is_closing():
            raise self._error or ConnectionClosedError("the connection is closed")
        self._transport.write(encode_frame(message))

    async def recv(self, timeout_s: float | None = None) -> Any:
        """The next frame; raises the connection's error once no frames are left."""
        async with asyncio.timeout(timeout_s):
            while not self._frames:
                if self._error is not None:
                    raise self._error
                self._waiter = asyncio.get_running_loop().create_future()
                await self._waiter
        frame = self._frames.popleft()
        if self._paused and len(self._frames) < CLIENT_QUEUE_FRAMES_MAX // 2:
            self._paused = False
            if self._transport is not None:
                self._transport.resume_reading()
        return frame

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
