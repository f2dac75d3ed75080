"""Connection caps of a listener: how many connections it serves at once, and how many of
them one client address may hold.

A total cap alone lets one host take every slot (a connection flood, or a buggy client
that opens a connection per request and never closes it), locking out everyone else. A
per-client cap keeps a share for the others: a host that reaches it is refused while the
rest of the cluster's clients keep connecting.

"One client" is one IPv4 address, or one IPv6 /64 network: a single host usually owns a
whole /64, so counting single IPv6 addresses would let it pose as 2^64 clients. An
IPv4-mapped IPv6 address (``::ffff:10.0.0.7``, from a dual-stack socket) counts as its
IPv4 address.

Each listener checks here when it accepts a connection (``ConnectionCaps.refusal``) and,
on a refusal, closes the connection, counts it (``Drops.overload`` with the refusal's
``kind``, exported as ``dropped_overload_total{kind=...}``) and logs it rate-limited. The
open count per client is taken by scanning the listener's open connections: a listener
holds at most a few thousand, the scan happens once per accepted connection, and there
is no second record to keep in step with the first.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

IPV6_CLIENT_PREFIX_BITS = 64
"""IPv6 addresses that share this many leading bits count as one client (one host's /64)."""


class HasClient(Protocol):
    @property
    def client(self) -> str:
        """The client address the connection counts against (``client_address``)."""


def client_address(peername: object) -> str:
    """The address a connection counts against, from ``transport.get_extra_info
    ("peername")``: an IPv4 address, an IPv6 /64 network, or (a Unix socket, an unknown
    transport) the peername as text, so such connections share one count."""
    if not isinstance(peername, tuple) or not peername:
        return str(peername)
    host = str(peername[0]).split("%", 1)[0]  # drop an IPv6 zone id (fe80::1%eth0)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        network = ipaddress.IPv6Network((address, IPV6_CLIENT_PREFIX_BITS), strict=False)
        return str(network)
    return str(address)


@dataclass(frozen=True)
class Refusal:
    """Why a new connection was refused."""

    kind: str
    """The ``dropped_overload_total`` kind: ``<listener>_connections`` (the listener is
    full) or ``<listener>_connections_per_client`` (this client holds its share)."""
    reason: str
    """A sentence for the client and the log, naming the limit and what to do."""


@dataclass(frozen=True)
class ConnectionCaps:
    """The two caps of one listener, named for its drop kinds (``client``, ``http``,
    ``tcp``)."""

    listener: str
    total_max: int
    per_client_max: int

    def __post_init__(self) -> None:
        if self.total_max < 1 or self.per_client_max < 1:
            raise ValueError(f"{self.listener}: connection caps must be at least 1 (got "
                             f"total {self.total_max}, per client {self.per_client_max})")

    def refusal(self, client: str, open_connections: Iterable[HasClient]) -> Refusal | None:
        """None to admit a new connection from ``client``; otherwise why not.
        ``open_connections`` are the listener's admitted connections (not the new one)."""
        total = 0
        from_client = 0
        for conn in open_connections:
            total += 1
            if conn.client == client:
                from_client += 1
        if total >= self.total_max:
            return Refusal(f"{self.listener}_connections",
                           f"this node's {self.listener} port is serving its limit of "
                           f"{self.total_max} connections; retry shortly or use another "
                           "node")
        if from_client >= self.per_client_max:
            return Refusal(f"{self.listener}_connections_per_client",
                           f"{client} already holds {from_client} connections to this "
                           f"node's {self.listener} port, the limit per client address; "
                           "close idle connections or share a connection pool")
        return None
