"""Finding a port number that is free for both UDP and TCP (a node needs both)."""

from __future__ import annotations

import socket

PORT_SEARCH_SPAN = 1000
"""How far above a base port ``find_free_ports`` looks before giving up."""


def port_is_free(host: str, port: int) -> bool:
    """True if ``port`` can be bound on ``host`` for TCP and for UDP right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(family, kind) as sock:
            if kind == socket.SOCK_STREAM:
                # Same option the node uses, so a port in TIME_WAIT counts as free.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError:
                return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS calls free for TCP that is also free for UDP."""
    for _ in range(100):
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port_is_free(host, port):
            return port
    raise OSError(f"no port on {host} is free for both TCP and UDP")


def find_free_ports(host: str, count: int, base: int | None = None) -> list[int]:
    """``count`` distinct ports free for TCP and UDP: from ``base`` upwards, or any."""
    if base is None:
        ports: list[int] = []
        while len(ports) < count:
            port = free_port(host)
            if port not in ports:
                ports.append(port)
        return ports
    found: list[int] = []
    for port in range(base, min(base + PORT_SEARCH_SPAN, 65536)):
        if len(found) == count:
            break
        if port_is_free(host, port):
            found.append(port)
    if len(found) < count:
        raise OSError(f"fewer than {count} free ports in {base}..{base + PORT_SEARCH_SPAN} "
                      f"on {host}; choose another --base-port")
    return found
