"""A suspicion timer that shrinks as independent members confirm it (Lifeguard).

The timeout starts at ``max_s`` and falls toward ``min_s`` logarithmically in the number of
distinct confirmations, reaching ``min_s`` after ``expected`` of them:

    timeout = max(min_s, max_s - (max_s - min_s) * log(c + 1) / log(expected + 1))
"""

from __future__ import annotations

import math


class Suspicion:
    def __init__(
        self, started_at: float, accuser: str, min_s: float, max_s: float, expected: int
    ) -> None:
        assert 0 < min_s <= max_s
        self.started_at = started_at
        self._min_s = min_s
        self._max_s = max_s
        self._expected = expected
        self._accusers = {accuser}

    @property
    def confirmations(self) -> int:
        return len(self._accusers) - 1

    def confirm(self, accuser: str) -> bool:
        """Record an accuser; True if it is a new, independent one that counts."""
        if accuser in self._accusers or self.confirmations >= self._expected:
            return False
        self._accusers.add(accuser)
        return True

    def timeout_s(self) -> float:
        if self._expected < 1:
            return self._min_s
        frac = math.log(self.confirmations + 1) / math.log(self._expected + 1)
        return max(self._min_s, self._max_s - (self._max_s - self._min_s) * frac)

    def deadline(self) -> float:
        return self.started_at + self.timeout_s()
