"""The boundary between a node and the network.

``Transport`` is what the node needs: fire-and-forget datagrams and request/reply frames.
``NetTransport`` implements it with UDP and TCP on one address (same port number for
both); with TLS contexts (``security.tls``) every TCP connection, inbound and outbound, is
mutual TLS, and with a keyring every datagram is sealed.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
from collections.abc import Callable
from typing import Any, Protocol

from leaderless.core.messages import Address, Packet
from leaderless.runtime.drops import Drops
from leaderless.runtime.errors import PortInUseError, StartupError
from leaderless.runtime.fault_partition import blocked
from leaderless.runtime.tcp import FrameClient, FrameHandler, ServerConnection
from leaderless.runtime.udp import GossipSealer, UdpEndpoint

EPHEMERAL_BIND_ATTEMPTS = 20
"""With port 0, TCP picks a free port and UDP must get the same number; retry if taken."""


class Transport(Protocol):
    """How a node talks to its peers."""

    @property
    def address(self) -> Address:
        """Where this transport listens (the real port when bound to port 0)."""

    def send_packet(self, to: Address, packet: Packet) -> None:
        """Send one datagram; may be dropped (and counted), never blocks."""

    async def request(self, to: Address, message: Any, reply_type: Any,
                      timeout_s: float) -> Any:
        """Send one frame and return the first reply frame decoded as ``reply_type``.
        Raises OSError, TimeoutError, ConnectionError or MalformedInput on failure."""

    async def close(self) -> None:
        """Flush pending datagrams and stop serving."""


class NetTransport:
    """UDP datagrams and TCP frames on the same HOST:PORT."""

    def __init__(self, address: Address, udp: UdpEndpoint, server: asyncio.Server,
                 connections: set[ServerConnection],
                 client_ssl: ssl.SSLContext | None = None) -> None:
        self._address = address
        self._udp = udp
        self._server = server
        self._connections = connections
        self._client_ssl = client_ssl

    @classmethod
    async def bind(cls, address: Address, on_packet: Callable[[Packet], None],
                   handler: FrameHandler, frame_type: Any, drops: Drops, *,
                   keyring: GossipSealer | None = None,
                   server_ssl: ssl.SSLContext | None = None,
                   client_ssl: ssl.SSLContext | None = None) -> NetTransport:
        """Listen on ``address`` (UDP and TCP). Raises PortInUseError naming the side that
        is taken. Port 0 picks a port that is free for both. With ``keyring`` every
        datagram is sealed and opened under it (``runtime.keyring_service``). With
        ``server_ssl`` every inbound TCP connection must complete TLS (``security.tls``:
        ``NodeTls.node_server``), and ``request`` dials peers with ``client_ssl``."""
        attempts = EPHEMERAL_BIND_ATTEMPTS if address.port == 0 else 1
        for attempt in range(attempts):
            try:
                return await cls._bind_once(address, on_packet, handler, frame_type, drops,
                                            keyring, server_ssl, client_ssl)
            except PortInUseError:
                if attempt + 1 == attempts:
                    raise
        raise AssertionError("unreachable")

    @classmethod
    async def _bind_once(cls, address: Address, on_packet: Callable[[Packet], None],
                         handler: FrameHandler, frame_type: Any, drops: Drops,
                         keyring: GossipSealer | None = None,
                         server_ssl: ssl.SSLContext | None = None,
                         client_ssl: ssl.SSLContext | None = None) -> NetTransport:
        loop = asyncio.get_running_loop()
        connections: set[ServerConnection] = set()
        try:
            server = await loop.create_server(
                lambda: ServerConnection(handler, frame_type, drops, connections,
                                         tls=server_ssl),
                address.host, address.port, reuse_address=True, backlog=256)
        except OSError as exc:
            raise _bind_error(address, "TCP", exc) from None
        port = server.sockets[0].getsockname()[1]
        udp = UdpEndpoint(on_packet, drops, keyring)
        try:
            await loop.create_datagram_endpoint(lambda: udp, local_addr=(address.host, port),
                                                family=_family(address.host))
        except OSError as exc:
            server.close()
            await server.wait_closed()
            raise _bind_error(Address(address.host, port), "UDP", exc) from None
        return cls(Address(address.host, port), udp, server, connections, client_ssl)

    @property
    def address(self) -> Address:
        return self._address

    def send_packet(self, to: Address, packet: Packet) -> None:
        self._udp.send(to, packet)

    async def request(self, to: Address, message: Any, reply_type: Any,
                      timeout_s: float) -> Any:
        if blocked(to.host, to.port):  # test-only partition fault: as if unreachable
            raise TimeoutError(f"{to} is cut off by the test-only partition fault")
        client = await FrameClient.connect(to, reply_type, timeout_s, self._client_ssl)
        try:
            client.send(message)
            return await client.recv(timeout_s)
        finally:
            client.close()

    async def close(self) -> None:
        self._udp.close()
        self._server.close()
        for conn in list(self._connections):
            conn.abort()
        await self._server.wait_closed()


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _errno(exc: BaseException) -> int | None:
    """uvloop wraps the bind error and keeps the errno on ``__cause__``."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc.errno
        exc = exc.__cause__  # type: ignore[assignment]
    return None


def _bind_error(address: Address, side: str, exc: OSError) -> StartupError:
    code = _errno(exc)
    if code == errno.EADDRINUSE:
        return PortInUseError(
            f"bind: {address} is already in use ({side}); stop the process using it or "
            f"choose another port with --bind")
    if code == errno.EADDRNOTAVAIL:
        return StartupError(f"bind: {address.host} is not an address of this machine; "
                            "choose one it has (e.g. 127.0.0.1) with --bind")
    if code == errno.EACCES:
        return StartupError(f"bind: permission denied for {address} ({side}); "
                            "use a port above 1023 or run with the needed privilege")
    return StartupError(f"bind: cannot listen on {address} ({side}): {exc.strerror or exc}")
