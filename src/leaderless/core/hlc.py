"""Hybrid logical clock (Kulkarni et al., 2014): a timestamp that follows wall time but never
goes backwards and always exceeds every timestamp this node has seen.

A timestamp is one 64-bit integer: wall milliseconds in the high 48 bits, a logical counter in
the low 16. Comparing integers compares timestamps. The wall clock is an argument (core/ owns
no clock); a remote timestamp further ahead than ``max_offset_ms`` is refused, so one node
with a wrong clock cannot drag every other node's clock into the future.
"""

from __future__ import annotations

LOGICAL_BITS = 16
LOGICAL_MAX = (1 << LOGICAL_BITS) - 1
HLC_MAX = (1 << 63) - 1
MAX_OFFSET_MS_DEFAULT = 500
"""How far ahead of our wall clock a peer's timestamp may be: NTP keeps clocks within a few
ms; half a second leaves room for a bad day without letting a broken clock poison ours."""


class ClockSkewError(ValueError):
    """A peer's timestamp is further ahead of our wall clock than the skew bound allows."""


def physical_ms(timestamp: int) -> int:
    return timestamp >> LOGICAL_BITS


def make(wall_ms: int, logical: int = 0) -> int:
    assert 0 <= logical <= LOGICAL_MAX
    return (wall_ms << LOGICAL_BITS) | logical


class HybridClock:
    """One node's clock. ``now`` stamps a local event; ``observe`` merges a peer's stamp."""

    def __init__(self, max_offset_ms: int = MAX_OFFSET_MS_DEFAULT) -> None:
        self.max_offset_ms = max_offset_ms
        self.last = 0

    def now(self, wall_ms: int) -> int:
        """A timestamp greater than every one issued or observed before."""
        candidate = make(wall_ms)
        self.last = candidate if candidate > self.last else self._tick(self.last)
        return self.last

    def observe(self, remote: int, wall_ms: int) -> int:
        """Merge a peer's timestamp; raises ClockSkewError if it is too far ahead."""
        if physical_ms(remote) - wall_ms > self.max_offset_ms:
            raise ClockSkewError(
                f"a peer's timestamp is {physical_ms(remote) - wall_ms} ms ahead of this "
                f"node's clock (bound {self.max_offset_ms} ms); check NTP on both hosts")
        self.last = max(self.last, remote, make(wall_ms))
        return self.last

    @staticmethod
    def _tick(timestamp: int) -> int:
        # The counter overflowing carries into the millisecond: still monotonic, and only
        # 65,536 events in one ms on one node could cause it.
        return timestamp + 1
