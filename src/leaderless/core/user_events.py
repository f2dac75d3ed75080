"""User events: a named payload any node broadcasts, delivered once by every live member.

Events are ordered by a Lamport clock and identified by (origin, origin incarnation,
ltime). We remember the
last ``buffer`` event ids to drop duplicates (gossip delivers most events several times);
an event older than the window (ltime below the newest seen minus ``buffer``) is dropped as
too old, since we could no longer tell whether we delivered it.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from leaderless.core.messages import UserEvent


class LamportClock:
    def __init__(self) -> None:
        self.time = 0

    def tick(self) -> int:
        self.time += 1
        return self.time

    def witness(self, ltime: int) -> None:
        if ltime > self.time:
            self.time = ltime


class UserEvents:
    def __init__(self, buffer: int) -> None:
        assert buffer > 0
        self._buffer = buffer
        self.clock = LamportClock()
        self._seen: OrderedDict[tuple[str, int, int], None] = OrderedDict()
        self.recent: deque[UserEvent] = deque(maxlen=buffer)
        self.too_old = 0

    def create(self, origin: str, incarnation: int, name: str, payload: bytes) -> UserEvent:
        event = UserEvent(origin=origin, origin_incarnation=incarnation,
                          ltime=self.clock.tick(), name=name, payload=payload)
        self._remember(event)
        return event

    def accept(self, event: UserEvent) -> bool:
        """True exactly once per event id, and only for events inside the window."""
        self.clock.witness(event.ltime)
        if event.ltime + self._buffer < self.clock.time:
            self.too_old += 1
            return False
        if event_id(event) in self._seen:
            return False
        self._remember(event)
        return True

    def skip_before(self, ltime: int) -> None:
        """On join: events up to ``ltime`` happened before we were here; do not replay them."""
        self.clock.witness(ltime)

    def _remember(self, event: UserEvent) -> None:
        self._seen[event_id(event)] = None
        while len(self._seen) > self._buffer:
            self._seen.popitem(last=False)
        self.recent.append(event)


def event_id(event: UserEvent) -> tuple[str, int, int]:
    return (event.origin, event.origin_incarnation, event.ltime)
