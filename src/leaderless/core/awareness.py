"""Lifeguard's local health multiplier (LHM).

A node that keeps missing acks is more likely to be the slow one itself (CPU starved,
paused, overloaded) than to be surrounded by dead peers. Each sign of that raises the
score; each clean probe lowers it. Probe interval and timeouts scale by (1 + score), so a
struggling node probes more slowly and gives peers longer before it accuses them.
"""

from __future__ import annotations


class LocalHealth:
    def __init__(self, score_max: int) -> None:
        assert score_max >= 0
        self._max = score_max
        self.score = 0

    def apply(self, delta: int) -> None:
        self.score = min(self._max, max(0, self.score + delta))

    def scale(self, seconds: float) -> float:
        return seconds * (1 + self.score)
