"""The UDP side of a node: one ``Packet`` per datagram, decoded and validated on arrival.

Sends are queued per peer and flushed once per event-loop turn, so a burst of effects
costs one wake-up; each peer's queue and the socket's buffer have a stated bound, and a
datagram beyond either is dropped and counted (UDP may lose it anyway; gossip and
push-pull are built for that).

With a gossip keyring (``security.keyring``) every datagram is sealed on the way out and
opened on the way in; one that cannot be opened (plaintext, unknown key, failed
authentication) is dropped and counted as malformed with kind ``gossip_<reason>``, and so is
a sealed datagram arriving at a node without a keyring (``gossip_sealed``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol, cast

from leaderless.config import is_ip_literal
from leaderless.core.codec import PACKET_BYTES_MAX, MalformedInput, decode_packet, encode_packet
from leaderless.core.messages import Address, Packet
from leaderless.runtime.drops import Drops
from leaderless.runtime.fault_partition import blocked
from leaderless.security.keyring import OpenError, is_sealed

PEER_QUEUE_DATAGRAMS_MAX = 64
"""Datagrams queued for one peer within one loop turn. The protocol sends a handful per
peer per probe interval; 64 fills only when something is badly wrong."""
SEND_BUFFER_BYTES_MAX = 1024 * 1024
"""Bytes the event loop may hold for a socket the kernel cannot drain (~750 datagrams)."""


class GossipSealer(Protocol):
    """Seals and opens datagrams under the current keyring (``runtime.keyring_service``)."""

    def seal(self, plaintext: bytes) -> bytes: ...

    def open(self, datagram: bytes) -> bytes:
        """The plaintext; raises ``security.keyring.OpenError`` with the drop reason."""
        ...


class UdpEndpoint(asyncio.DatagramProtocol):
    """Receives datagrams into ``on_packet`` and sends queued packets once per loop turn;
    with a ``keyring`` every datagram is sealed and must open under it."""

    def __init__(self, on_packet: Callable[[Packet], None], drops: Drops,
                 keyring: GossipSealer | None = None) -> None:
        self._on_packet = on_packet
        self._drops = drops
        self._keyring = keyring
        self._packets = drops.counters.gossip_packets_total
        self._bytes = drops.counters.gossip_bytes_total
        self._transport: asyncio.DatagramTransport | None = None
        self._queues: dict[Address, list[bytes]] = {}
        self._flush_scheduled = False

    # -- asyncio callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio's, so no isinstance check here.
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if blocked(*addr[:2]):  # test-only partition fault (off: one call)
            return
        self._packets["received"] += 1
        self._bytes["received"] += len(data)
        if len(data) > PACKET_BYTES_MAX:
            self._drops.malformed("udp_oversized", _peer(addr), f"{len(data)} bytes")
            return
        if self._keyring is not None:
            try:
                data = self._keyring.open(data)
            except OpenError as exc:
                self._drops.malformed(f"gossip_{exc.reason}", _peer(addr), exc)
                return
        elif is_sealed(data):
            self._drops.malformed("gossip_sealed", _peer(addr), "a sealed datagram, but this "
                                  "node has no gossip keyring (start it with --gossip-keyring)")
            return
        try:
            packet = decode_packet(data)
        except MalformedInput as exc:
            self._drops.malformed("udp_packet", _peer(addr), exc)
            return
        self._on_packet(packet)

    def error_received(self, exc: Exception) -> None:
        # Linux reports an ICMP "port unreachable" from an earlier send here: a dead peer.
        self._drops.send_error("udp", "", exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    # -- sending -----------------------------------------------------------------------

    def send(self, to: Address, packet: Packet) -> None:
        """Queue ``packet`` for ``to``; it leaves at the end of this loop turn."""
        queue = self._queues.setdefault(to, [])
        if len(queue) >= PEER_QUEUE_DATAGRAMS_MAX:
            self._drops.overload("udp_peer_queue", to)
            return
        data = encode_packet(packet)
        queue.append(data if self._keyring is None else self._keyring.seal(data))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Hand every queued datagram to the socket (also called before closing)."""
        self._flush_scheduled = False
        queues, self._queues = self._queues, {}
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        for to, datagrams in queues.items():
            if not is_ip_literal(to.host):
                # Members advertise IP addresses; a name here came from a bad peer.
                self._drops.send_error("udp_address", to, "not an IP address")
                continue
            if blocked(to.host, to.port):  # test-only partition fault (off: one call)
                continue
            for data in datagrams:
                if _buffered_bytes(transport) > SEND_BUFFER_BYTES_MAX:
                    self._drops.overload("udp_send_buffer", to)
                    continue
                try:
                    transport.sendto(data, (to.host, to.port))
                except (OSError, ValueError) as exc:
                    self._drops.send_error("udp", to, exc)
                    continue
                self._packets["sent"] += 1
                self._bytes["sent"] += len(data)

    def close(self) -> None:
        self.flush()
        if self._transport is not None:
            self._transport.close()


def _buffered_bytes(transport: asyncio.DatagramTransport) -> int:
    # Both asyncio's and uvloop's datagram transports have it; typeshed does not know.
    size: int = getattr(transport, "get_write_buffer_size", lambda: 0)()
    return size


def _peer(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"{addr[0]}:{addr[1]}"
    return str(addr)
