"""How far this node's clock is from its peers', estimated from probe round trips.

Every SWIM probe is a round trip: we send a ping at ``sent_ms`` (our clock), the peer
stamps its ack with its own wall clock (``peer_stamp_ms``), and the ack arrives at
``received_ms``. If the two legs took equally long, the peer stamped its ack at our
``(sent_ms + received_ms) / 2``, so its clock minus ours is

    offset = peer_stamp_ms - (sent_ms + received_ms) / 2

and, whatever the legs took, the true offset lies within half the round trip of that
(NTP's clock filter; Mills, RFC 5905 §10). The sample with the smallest round trip is
the most precise, so we keep a few recent samples per peer and use that one.

This node's own skew is where its clock stands against the cluster: the median of the
offsets of the cluster's clocks as seen from here, this node's own (0) included. With the
median, one peer with a wrong clock moves nobody else's estimate (three nodes, one 2 s
ahead: the others see {0, 0, +2000}, median 0), while the node with the wrong clock sees
every peer off the same way ({0, -2000, -2000}, median -2000: it is 2 s ahead). Two nodes
cannot tell whose clock is wrong: each sees half the difference.

Pure: times are arguments (milliseconds of this node's wall clock), nothing is read here.
"""

from __future__ import annotations

import dataclasses
from collections import deque

SAMPLES_PER_PEER = 8
"""Recent round trips kept per peer: enough that one sample delayed by a busy loop or a
queue does not decide the estimate (the smallest round trip of the last 8 is used), few
enough that a clock that was stepped (NTP fixed it) is re-measured within 8 probes of
each peer, a few rounds of the probe cycle."""
PEERS_MAX = 1024
"""Peers with samples kept at once: beyond it the peer sampled longest ago is dropped. The
median of 1,024 peers says as much about this node's clock as that of 20,000, and memory
and the median's cost stay bounded in the largest cluster."""
SKEW_PEERS_MIN = 4
"""Peers that must be measured before this node judges its own skew (all of them in a
smaller cluster): a median of 5 clocks, this node's and 4 peers', is moved by no 2 wrong
clocks. Judged sooner, a node with a good clock that happened to measure the one bad peer
first (3 nodes: {0, +2000}) would see half the error as its own and wrongly refuse."""


@dataclasses.dataclass(frozen=True)
class OffsetEstimate:
    """One peer's clock minus ours, from the sample with the smallest round trip."""

    offset_ms: float
    error_ms: float
    """Half that sample's round trip: the true offset lies within ``offset_ms ± error_ms``."""
    samples: int
    """Samples kept for this peer (at most ``SAMPLES_PER_PEER``)."""


class ClockOffsets:
    """Per-peer offset estimates from probe round trips, and this node's own skew."""

    def __init__(self, samples_per_peer: int = SAMPLES_PER_PEER,
                 peers_max: int = PEERS_MAX) -> None:
        if samples_per_peer < 1 or peers_max < 1:
            raise ValueError("samples_per_peer and peers_max must be at least 1")
        self.samples_per_peer = samples_per_peer
        self.peers_max = peers_max
        self._samples: dict[str, deque[tuple[float, float]]] = {}
        """Peer -> recent (round trip ms, offset ms), oldest first; the dict's order is
        the order in which peers were last sampled (least recent first)."""
        self._skew_ms: float | None = None
        self._skew_stale = False

    def record(self, peer: str, sent_ms: float, peer_stamp_ms: float,
               received_ms: float) -> None:
        """One round trip to ``peer``: ``sent_ms`` and ``received_ms`` by our clock, the
        peer's stamp by its clock."""
        round_trip_ms = received_ms - sent_ms
        if round_trip_ms < 0:
            raise ValueError(f"a round trip to {peer!r} ended before it began "
                             f"(sent at {sent_ms} ms, received at {received_ms} ms)")
        offset_ms = peer_stamp_ms - (sent_ms + received_ms) / 2
        samples = self._samples.pop(peer, None)
        if samples is None:
            samples = deque(maxlen=self.samples_per_peer)
            if len(self._samples) >= self.peers_max:
                del self._samples[next(iter(self._samples))]
        samples.append((round_trip_ms, offset_ms))
        self._samples[peer] = samples  # last sampled: moves to the end
        self._skew_stale = True

    def forget(self, peer: str) -> None:
        """Drop a peer's samples (it left or died: its clock no longer matters here)."""
        if self._samples.pop(peer, None) is not None:
            self._skew_stale = True

    def estimate(self, peer: str) -> OffsetEstimate | None:
        samples = self._samples.get(peer)
        if not samples:
            return None
        round_trip_ms, offset_ms = min(samples)
        return OffsetEstimate(offset_ms, round_trip_ms / 2, len(samples))

    def offsets_ms(self) -> dict[str, float]:
        """Each sampled peer's clock minus ours, in ms, by peer name (sorted)."""
        result: dict[str, float] = {}
        for peer in sorted(self._samples):
            estimate = self.estimate(peer)
            assert estimate is not None
            result[peer] = estimate.offset_ms
        return result

    def skew_ms(self) -> float | None:
        """How far this node's clock is ahead of the cluster's (negative: behind), in ms;
        None until some peer was sampled. Recomputed only after a change (this is asked
        on every strong operation)."""
        if self._skew_stale:
            self._skew_stale = False
            offsets = [estimate.offset_ms for peer in self._samples
                       if (estimate := self.estimate(peer)) is not None]
            self._skew_ms = -_median([0.0, *offsets]) if offsets else None
        return self._skew_ms

    def judged_skew_ms(self, live_peers: int) -> float | None:
        """``skew_ms`` once enough of the ``live_peers`` are measured to judge by
        (``SKEW_PEERS_MIN``, or all of them in a smaller cluster); None before."""
        if len(self._samples) < min(max(live_peers, 1), SKEW_PEERS_MIN):
            return None
        return self.skew_ms()

    def __len__(self) -> int:
        """Peers with samples."""
        return len(self._samples)


def skew_refusal(skew_ms: float | None, bound_ms: int) -> str | None:
    """Why this node must not coordinate strong-mode operations or lock leases (its clock
    is more than ``bound_ms`` off its peers'), or None when it may."""
    if skew_ms is None or abs(skew_ms) <= bound_ms:
        return None
    side = "ahead of" if skew_ms > 0 else "behind"
    return (f"this node's clock is {abs(skew_ms):.0f} ms {side} its peers' (the bound is "
            f"{bound_ms} ms): it coordinates no strong-mode operation or lock lease until "
            "it is back within bound; check NTP on this host, or send the request to "
            "another node")


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2
