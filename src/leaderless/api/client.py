"""An asyncio client for the native protocol (used by the CLI, tests and tools).

On a cluster with TLS the node port is mutual TLS: give ``ssl_context`` from
``security.tls.client_context(ca, cert, key)`` with a client (or node) certificate.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from typing import Any

from leaderless.api.messages import (
    DoctorReply,
    DoctorRequest,
    ErrorReply,
    EventNotification,
    EventSendReply,
    EventSendRequest,
    EventWatchRequest,
    KeyringOperation,
    KeyringReply,
    KeyringRequest,
    MemberInfo,
    MembersReply,
    MembersRequest,
    Reply,
    RingOperation,
    RingReply,
    RingRequest,
    StatusReply,
    StatusRequest,
    WatchStarted,
)
from leaderless.core.messages import EVENT_NAME_BYTES_MAX, EVENT_PAYLOAD_BYTES_MAX, Address
from leaderless.runtime.tcp import ConnectionClosedError, FrameClient
from leaderless.security.tls import ENV_CA, ENV_CERT, ENV_KEY, tls_failure_reason

DEFAULT_TIMEOUT_S = 5.0


class ApiError(Exception):
    """The node refused the request; the message is the node's explanation."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class NodeUnreachableError(ConnectionError):
    """No node answers at the address (not running, wrong address, or firewalled)."""


class TlsFailedError(NodeUnreachableError):
    """TLS with the node failed, or the node closed a plaintext connection at once (it
    serves TLS); the message says why and which setting to give."""


class Client:
    """One connection to one node: ``async with Client(addr) as c: await c.members()``."""

    def __init__(self, address: Address, timeout_s: float = DEFAULT_TIMEOUT_S, *,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.ssl_context = ssl_context
        self._conn: FrameClient | None = None

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    async def connect(self) -> None:
        try:
            self._conn = await FrameClient.connect(self.address, Reply, self.timeout_s,
                                                   self.ssl_context)
        except ssl.SSLError as exc:
            raise self._tls_failed(exc) from None
        except (OSError, TimeoutError) as exc:
            raise NodeUnreachableError(
                f"no node answers at {self.address} ({exc or type(exc).__name__}); "
                "is it running, and is --node its HOST:PORT?") from None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _call(self, request: Any, reply_type: type) -> Any:
        if self._conn is None:
            await self.connect()
        assert self._conn is not None
        try:
            self._conn.send(request)
            reply = await self._conn.recv(self.timeout_s)
        except ssl.SSLError as exc:
            raise self._tls_failed(exc) from None
        except ConnectionClosedError:
            if self.ssl_context is not None:
                raise
            raise TlsFailedError(
                f"{self.address} closed the connection without answering; if the cluster "
                f"uses TLS, set {ENV_CA} (and {ENV_CERT}, {ENV_KEY} to a client "
                "certificate)") from None
        if isinstance(reply, ErrorReply):
            raise ApiError(reply.code, reply.message)
        if not isinstance(reply, reply_type):
            raise ApiError("unexpected_reply", f"expected {reply_type.__name__}, got {reply!r}")
        return reply

    def _tls_failed(self, exc: ssl.SSLError) -> TlsFailedError:
        reason = tls_failure_reason(exc)
        hint = "is the node's certificate from this CA, and does it serve TLS?"
        if "certificate required" in reason:
            hint = (f"the node port needs a client certificate: set {ENV_CERT} and {ENV_KEY} "
                    "(`leaderless certs issue-client NAME --ca DIR`)")
        elif "unknown ca" in reason or "bad certificate" in reason:
            hint = "the node does not trust our certificate: is it from the cluster's CA?"
        return TlsFailedError(f"TLS with {self.address} failed: {reason}; {hint}")

    async def members(self) -> list[MemberInfo]:
        """Every member the node knows, itself included."""
        reply: MembersReply = await self._call(MembersRequest(), MembersReply)
        return reply.members

    async def status(self) -> StatusReply:
        result: StatusReply = await self._call(StatusRequest(), StatusReply)
        return result

    async def send_event(self, name: str, payload: bytes) -> EventSendReply:
        """Broadcast a user event from the node; raises ApiError if it is refused."""
        # Checked here too: the node drops (and disconnects) a frame beyond the limits.
        if not 1 <= len(name.encode()) <= EVENT_NAME_BYTES_MAX:
            raise ApiError("bad_event", f"event name must be 1..{EVENT_NAME_BYTES_MAX} bytes")
        if len(payload) > EVENT_PAYLOAD_BYTES_MAX:
            raise ApiError("bad_event", f"event payload is {len(payload)} bytes; "
                                        f"the limit is {EVENT_PAYLOAD_BYTES_MAX}")
        result: EventSendReply = await self._call(EventSendRequest(name, payload),
                                                  EventSendReply)
        return result

    async def keyring(self, operation: KeyringOperation, key: str = "") -> KeyringReply:
        """Apply a gossip keyring operation (list, install, use, remove) on every alive
        member through this node; each node's result. Raises ApiError if it refuses."""
        result: KeyringReply = await self._call(KeyringRequest(operation, key), KeyringReply)
        return result

    async def doctor(self) -> DoctorReply:
        """Diagnose the whole cluster through this node (``leaderless doctor``): the
        findings, most severe first."""
        result: DoctorReply = await self._call(DoctorRequest(), DoctorReply)
        return result

    async def ring(self, operation: RingOperation = "status", weight: float = 0.0
                   ) -> RingReply:
        """A ring operation through this node (``status``; ``decommission``,
        ``set_capacity`` with ``weight``, ``cleanup`` act on this node) and the cluster's
        ring status. Raises ApiError ``ring_refused`` with the node's reason."""
        result: RingReply = await self._call(RingRequest(operation, weight), RingReply)
        return result

    async def watch_events(self) -> AsyncIterator[EventNotification]:
        """Every user event the node delivers from now on (until the connection ends).
        The first ``__anext__`` returns only once the watch is registered on the node."""
        await self._call(EventWatchRequest(), WatchStarted)
        return self._stream()

    async def _stream(self) -> AsyncIterator[EventNotification]:
        assert self._conn is not None
        while True:
            frame = await self._conn.recv(None)
            if isinstance(frame, EventNotification):
                yield frame
