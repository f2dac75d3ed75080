"""The simulated clock: a heap of timed callbacks, run in (time, sequence) order.

Ties at the same simulated instant run in the order they were scheduled (the sequence
number), so a run depends on nothing but its inputs and its seed.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from typing import Any

Callback = Callable[[Any, Any], None]


class SimClock:
    """Discrete-event scheduler. ``now`` only moves forward, and only in ``run_until``."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callback, Any, Any]] = []
        self._seq = 0
        self.events_run = 0

    def at(self, time: float, callback: Callback, a: Any = None, b: Any = None) -> None:
        """Run ``callback(a, b)`` at simulated ``time`` (never earlier than now)."""
        assert time >= self.now, f"scheduling into the past: {time} < {self.now}"
        self._seq += 1
        heapq.heappush(self._heap, (time, self._seq, callback, a, b))

    def after(self, delay_s: float, callback: Callback, a: Any = None, b: Any = None) -> None:
        assert delay_s >= 0
        self.at(self.now + delay_s, callback, a, b)

    def pending(self) -> int:
        return len(self._heap)

    def run_until(
        self,
        end: float,
        stop: Callable[[], bool] | None = None,
        check_every_s: float = math.inf,
    ) -> bool:
        """Run every event due at or before ``end``; then ``now`` is ``end``.

        With ``stop``, it is evaluated every ``check_every_s`` of simulated time, and the run
        returns early (True) the first time it holds; ``now`` is then that checkpoint.
        """
        heap = self._heap
        pop = heapq.heappop
        next_check = self.now + check_every_s if stop is not None else math.inf
        if stop is not None and stop():
            return True
        run = 0
        while heap and heap[0][0] <= end:
            if heap[0][0] > next_check:
                self.now = next_check
                assert stop is not None
                if stop():
                    self.events_run += run
                    return True
                next_check += check_every_s
                continue
            time, _, callback, a, b = pop(heap)
            self.now = time
            callback(a, b)
            run += 1
        self.events_run += run
        while next_check <= end:
            self.now = next_check
            assert stop is not None
            if stop():
                return True
            next_check += check_every_s
        self.now = end
        return False
