"""The simulated network: per-link latency, loss and duplication, and partitions.

Nodes are numbered 0..n-1. The network decides only *whether* and *when* bytes arrive;
the cluster (sim.cluster) does the delivering. Every random draw comes from the world's
``random.Random``, in the order packets are sent, so a seed replays a run exactly.
"""

from __future__ import annotations

import dataclasses
import math
import random

LAN_LATENCY_MIN_S = 0.0002
LAN_LATENCY_MAX_S = 0.001
"""One-way latency on a LAN: 0.2–1 ms."""
TCP_CONNECT_TIMEOUT_S = 1.0
"""A TCP connect to an unreachable node fails after this long."""
TCP_RTO_S = 0.2
"""Linux's minimum retransmission timeout: what one lost TCP segment adds to a delay."""
TCP_RETRANSMITS_MAX = 6


@dataclasses.dataclass(frozen=True)
class LinkModel:
    """How one direction of a link behaves.

    Latency is uniform in [latency_min_s, latency_max_s], or lognormal with that median when
    ``lognormal_sigma`` > 0 (clamped to [latency_min_s, 100 * latency_max_s]: a long tail,
    but never an arrival before the minimum).
    """

    latency_min_s: float = LAN_LATENCY_MIN_S
    latency_max_s: float = LAN_LATENCY_MAX_S
    loss: float = 0.0
    duplicate: float = 0.0
    lognormal_sigma: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.latency_min_s <= self.latency_max_s:
            raise ValueError("need 0 <= latency_min_s <= latency_max_s")
        if not 0 <= self.loss < 1:
            raise ValueError("loss must be in [0, 1)")
        if not 0 <= self.duplicate < 1:
            raise ValueError("duplicate must be in [0, 1)")
        if self.lognormal_sigma < 0:
            raise ValueError("lognormal_sigma must be >= 0")

    def latency(self, rng: random.Random) -> float:
        if self.lognormal_sigma > 0:
            median = (self.latency_min_s + self.latency_max_s) / 2
            draw = median * math.exp(rng.gauss(0.0, self.lognormal_sigma))
            return min(max(draw, self.latency_min_s), 100 * self.latency_max_s)
        return rng.uniform(self.latency_min_s, self.latency_max_s)


class Network:
    """Links between n nodes: a default model, per-link overrides, and partition groups."""

    def __init__(self, n: int, rng: random.Random, default: LinkModel | None = None) -> None:
        self._rng = rng
        self.default = default or LinkModel()
        self._links: dict[tuple[int, int], LinkModel] = {}
        self._group = [0] * n  # nodes in different groups cannot reach each other
        self.partitioned = False

    def grow(self, n: int) -> None:
        """Make room for nodes up to index n-1 (new nodes join group 0)."""
        if n > len(self._group):
            self._group.extend([0] * (n - len(self._group)))

    def set_link(self, src: int, dst: int, model: LinkModel, both_ways: bool = True) -> None:
        self._links[(src, dst)] = model
        if both_ways:
            self._links[(dst, src)] = model

    def link(self, src: int, dst: int) -> LinkModel:
        if self._links:
            return self._links.get((src, dst), self.default)
        return self.default

    def partition(self, groups: list[list[int]]) -> None:
        """Cut the network into ``groups``; nodes in no group form one more group."""
        self._group = [0] * len(self._group)
        for gid, members in enumerate(groups, start=1):
            for i in members:
                self._group[i] = gid
        self.partitioned = True

    def heal(self) -> None:
        self._group = [0] * len(self._group)
        self.partitioned = False

    def connected(self, src: int, dst: int) -> bool:
        return self._group[src] == self._group[dst]

    def datagram_delays(self, src: int, dst: int) -> tuple[float, ...]:
        """Delays after which copies of one datagram arrive: () if lost or cut off."""
        if self._group[src] != self._group[dst]:
            return ()
        model = self._links.get((src, dst), self.default) if self._links else self.default
        rng = self._rng
        if model.loss and rng.random() < model.loss:
            return ()
        first = model.latency(rng)
        if model.duplicate and rng.random() < model.duplicate:
            return (first, model.latency(rng))
        return (first,)

    def stream_delay(self, src: int, dst: int) -> float:
        """One-way delay of a TCP message: it always arrives (TCP retransmits), and each
        loss on the way costs one retransmission timeout."""
        model = self.link(src, dst)
        delay = model.latency(self._rng)
        if model.loss:
            for _ in range(TCP_RETRANSMITS_MAX):
                if self._rng.random() >= model.loss:
                    break
                delay += TCP_RTO_S
        return delay
