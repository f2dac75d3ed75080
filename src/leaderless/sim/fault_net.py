"""The simulated network and failure view shared by the data-plane simulations
(``sim.kv``, ``sim.paxos``): random latency (so messages reorder), loss, duplication,
partitions, crashes and restarts, and an oracle failure detector with a delay.

A message to a node that is down, or across a partition, is dropped at delivery time.
``detection_s`` after a node crashes (restarts) every other node treats it as down (up);
a partition looks like a crash to the other side at once.
"""

from __future__ import annotations

import random
from typing import Any, Protocol

from leaderless.sim.clock import SimClock

EPOCH_MS = 1_800_000_000_000
"""Wall clock at simulated time 0 (any fixed value: runs must not depend on the host)."""


class SimNode(Protocol):
    up: bool

    def crash(self) -> None: ...

    def restart(self) -> None: ...

    def receive(self, sender: str, message: Any) -> None: ...


class FaultyNet:
    def __init__(self, rng: random.Random, clock: SimClock, latency_s: tuple[float, float],
                 loss: float, detection_s: float, duplicate: float = 0.0) -> None:
        self.rng = rng
        self.clock = clock
        self.latency_s = latency_s
        self.loss = loss
        self.duplicate = duplicate
        self.detection_s = detection_s
        self.nodes: dict[str, Any] = {}
        """Filled by the simulation: name -> a ``SimNode``."""
        self.messages_sent = 0
        self.messages_dropped = 0
        self._seen_down: set[str] = set()
        self.down_since: dict[str, float] = {}
        self._partition: dict[str, int] = {}

    def wall_ms(self) -> int:
        return EPOCH_MS + int(self.clock.now * 1000)

    def send(self, sender: str, to: str, message: Any) -> None:
        """Deliver after a random latency, or lose it; a message to oneself is immediate."""
        self.messages_sent += 1
        copies = 1
        if sender != to:
            if self.rng.random() < self.loss or not self.connected(sender, to):
                self.messages_dropped += 1
                return
            if self.duplicate and self.rng.random() < self.duplicate:
                copies = 2
        for _ in range(copies):
            delay = 0.0 if sender == to else self.rng.uniform(*self.latency_s)
            self.clock.after(delay, self._deliver, (sender, to), message)

    def _deliver(self, route: tuple[str, str], message: Any) -> None:
        sender, to = route
        node = self.nodes[to]
        if node.up and self.connected(sender, to):
            node.receive(sender, message)
        else:
            self.messages_dropped += 1

    def connected(self, a: str, b: str) -> bool:
        return self._partition.get(a, 0) == self._partition.get(b, 0)

    def partition(self, groups: list[list[str]]) -> None:
        self._partition = {name: i for i, group in enumerate(groups) for name in group}

    def heal(self) -> None:
        self._partition = {}

    def crash(self, name: str) -> None:
        self.nodes[name].crash()
        self.clock.after(self.detection_s, self._detect, name, True)

    def restart(self, name: str) -> None:
        self.nodes[name].restart()
        self.clock.after(self.detection_s, self._detect, name, False)

    def _detect(self, name: str, down: bool) -> None:
        if down and not self.nodes[name].up:
            self._seen_down.add(name)
            self.down_since[name] = self.clock.now
        elif not down and self.nodes[name].up:
            self._seen_down.discard(name)
            self.down_since.pop(name, None)

    def up_as_seen_by(self, viewer: str) -> frozenset[str]:
        """The nodes ``viewer`` believes up: not detected down, and on its side."""
        return frozenset(name for name in self.nodes if name not in self._seen_down
                         and self.connected(viewer, name))
