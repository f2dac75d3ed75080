"""Outbound links to peers for the data plane: one TCP connection per peer, frames of one
loop turn coalesced into one write.

Each link opens lazily on the first send, says who we are (``PeerHello``) and then carries
requests (replica writes and reads, anti-entropy) to the peer; the peer's replies come back
on the same connection and go to ``on_message``. A link to a peer that cannot be reached
drops what it was given (the coordinator's timeout and hints deal with that) and does not
retry connecting for ``RECONNECT_BACKOFF_S``, so a dead peer costs no connect storm.

With TLS (``ssl_context``, ``security.tls.NodeTls.node_client``) a link verifies the peer's
certificate against the cluster CA and the address it dialled against the SANs, and the
certificate must be the node certificate of the member the link is for (its CN is the
member's name), so data meant for one node never goes to another that took its address.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any, cast

from leaderless.core.codec import FrameDecoder, MalformedInput, encode_frame
from leaderless.core.messages import Address
from leaderless.runtime.drops import Drops
from leaderless.runtime.fault_partition import blocked
from leaderless.security.tls import NODE_ROLE, PeerIdentity, tls_failure_reason

LINK_BUFFER_BYTES_MAX = 64 << 20
"""Bytes queued to one peer (in our buffer and the socket's) before we drop new frames:
a peer that does not read is either dead or overloaded, and memory is not a queue."""
RECONNECT_BACKOFF_S = 1.0
CONNECT_TIMEOUT_S = 2.0


class PeerLink(asyncio.Protocol):
    def __init__(self, links: PeerLinks, name: str, address: Address) -> None:
        self._links = links
        self.name = name
        self.address = address
        self._decoder: FrameDecoder[Any] = FrameDecoder(links.reply_type)
        self._transport: asyncio.Transport | None = None
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._flush_scheduled = False

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tcp = cast(asyncio.Transport, transport)
        if self._links.ssl_context is not None:
            identity = PeerIdentity.from_ssl_object(tcp.get_extra_info("ssl_object"))
            if identity is None or identity.role != NODE_ROLE or identity.name != self.name:
                self._links.refuse(self, f"the certificate is {identity or 'not leaderless'}"
                                         f", not node {self.name}'s")
                tcp.abort()
                return
        self._transport = tcp
        self._flush()

    def data_received(self, data: bytes) -> None:
        if blocked(self.address.host, self.address.port):  # test-only partition fault
            self.close()
            return
        try:
            messages = self._decoder.feed(data)
        except MalformedInput as exc:
            self._links.drops.malformed("peer_frame", self.name, exc)
            self.close()
            return
        for message in messages:
            self._links.on_message(self.name, message)

    def connection_lost(self, exc: Exception | None) -> None:
        if isinstance(exc, ssl.SSLError):  # e.g. the peer refused our certificate
            self._links.refuse(self, tls_failure_reason(exc))
        self._transport = None
        self._decoder = FrameDecoder(self._links.reply_type)
        self._links.forget(self)

    # -- sending -----------------------------------------------------------------------

    def send(self, message: Any) -> bool:
        frame = encode_frame(message)
        buffered = self._pending_bytes
        if self._transport is not None:
            buffered += self._transport.get_write_buffer_size()
        if buffered + len(frame) > LINK_BUFFER_BYTES_MAX:
            self._links.drops.overload("peer_buffer_full", self.name)
            return False
        self._pending.append(frame)
        self._pending_bytes += len(frame)
        if not self._flush_scheduled and self._transport is not None:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return True

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._transport is None or self._transport.is_closing() or not self._pending:
            return
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        self._transport.write(b"".join(pending))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class PeerLinks:
    """Every outbound link of this node, by peer name."""

    def __init__(self, me: str, hello: Any, reply_type: Any, drops: Drops,
                 on_message: Callable[[str, Any], None], *,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.me = me
        self.reply_type = reply_type
        self.drops = drops
        self.on_message = on_message
        self.ssl_context = ssl_context
        self._hello = hello
        self._links: dict[str, PeerLink] = {}
        self._failed_at: dict[str, float] = {}
        self._closed = False

    def send(self, name: str, address: Address, message: Any) -> bool:
        """Queue ``message`` to the peer; False if it was dropped (unreachable, full)."""
        if blocked(address.host, address.port):  # test-only partition fault: unreachable
            link = self._links.pop(name, None)
            if link is not None:
                link.close()
            return False
        link = self._links.get(name)
        if link is not None and link.address != address:
            link.close()  # the peer came back on another address
            link = None
        if link is None:
            loop = asyncio.get_running_loop()
            if self._closed or loop.time() - self._failed_at.get(name, -1e9) < RECONNECT_BACKOFF_S:
                return False
            link = PeerLink(self, name, address)
            self._links[name] = link
            link.send(self._hello)
            loop.create_task(self._connect(link))
        return link.send(message)

    async def _connect(self, link: PeerLink) -> None:
        loop = asyncio.get_running_loop()
        host, port = link.address.host, link.address.port
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                if self.ssl_context is None:
                    await loop.create_connection(lambda: link, host, port)
                else:
                    await loop.create_connection(
                        lambda: link, host, port, ssl=self.ssl_context, server_hostname=host,
                        ssl_handshake_timeout=CONNECT_TIMEOUT_S)
        except ssl.SSLError as exc:
            self.refuse(link, tls_failure_reason(exc))
            self.forget(link)
        except (OSError, TimeoutError) as exc:
            self._failed_at[link.name] = loop.time()
            self.drops.send_error("peer_connect", link.name, exc or "timed out")
            self.forget(link)

    def refuse(self, link: PeerLink, reason: str) -> None:
        """TLS failed or the peer is not who the link is for: count and log it
        (``send_errors_total{kind="peer_tls"}``), and back off as from a failed connect."""
        self._failed_at[link.name] = asyncio.get_running_loop().time()
        self.drops.send_error("peer_tls", f"{link.name} at {link.address}", reason)

    def forget(self, link: PeerLink) -> None:
        if self._links.get(link.name) is link:
            del self._links[link.name]

    def close(self) -> None:
        self._closed = True
        for link in list(self._links.values()):
            link.close()
        self._links.clear()
