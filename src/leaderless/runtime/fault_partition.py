"""Test-only network partition fault: drop this node's traffic to and from listed peers.

**Test-only fault hook**: ``LEADERLESS_FAULT_DROP_FILE=<path>`` names a file of peer
addresses, one ``HOST:PORT`` (a peer's node address, as it advertises it) per line; while
a peer is listed, this node sends it no UDP datagram, ignores the datagrams it sends,
connects to it by TCP neither for push-pull nor for the data plane, and closes the data
link it had to it. The file is read *live* (again at most every ``REFRESH_S`` while a
packet asks), so a test harness (``leaderless.chaos.cluster`` in loopback mode, where
network namespaces are not available) cuts and heals links of a running node by rewriting
it. A missing or empty file drops nothing. Set at start only; logged at warning when set;
never set it in production.

When the variable is unset, ``blocked`` returns at its first test: the hot paths pay one
function call.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from leaderless.runtime.logs import NodeLogger

FAULT_DROP_FILE_ENV = "LEADERLESS_FAULT_DROP_FILE"
REFRESH_S = 0.1
"""How stale the list may be: a rewrite of the file takes effect within this long."""

_path: str | None = None
_blocked: frozenset[tuple[str, int]] = frozenset()
_read_at = float("-inf")


def install_fault_partition(environ: Mapping[str, str], log: NodeLogger) -> str | None:
    """Read ``LEADERLESS_FAULT_DROP_FILE`` from ``environ`` and arm the hook for this
    process; warn loudly when set. Returns the path (None: unset, the hook is off)."""
    global _path, _blocked, _read_at
    path = environ.get(FAULT_DROP_FILE_ENV, "").strip() or None
    _path, _blocked, _read_at = path, frozenset(), float("-inf")
    if path is not None:
        log.warning("fault_partition", path=path,
                    warning=f"TEST-ONLY FAULT HOOK {FAULT_DROP_FILE_ENV} is set: this node "
                    "drops its traffic to and from the peers listed in that file; never "
                    "use it in production")
    return path


def blocked(host: str, port: int) -> bool:
    """True while the hook lists the peer at ``host:port`` (always False when unset)."""
    if _path is None:
        return False
    return (host, port) in _current(_path)


def _current(path: str) -> frozenset[tuple[str, int]]:
    global _blocked, _read_at
    now = time.monotonic()
    if now - _read_at >= REFRESH_S:
        _read_at = now
        _blocked = _parse(path)
    return _blocked


def _parse(path: str) -> frozenset[tuple[str, int]]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return frozenset()
    peers = set()
    for line in text.splitlines():
        host, _, port = line.strip().rpartition(":")
        if host and port.isdigit():
            peers.add((host.strip("[]"), int(port)))
    return frozenset(peers)


def reset() -> None:
    """Disarm the hook (for unit tests of this module)."""
    global _path, _blocked, _read_at
    _path, _blocked, _read_at = None, frozenset(), float("-inf")

