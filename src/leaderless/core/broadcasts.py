"""The queue of updates waiting to be piggybacked (memberlist's TransmitLimitedQueue).

Each update is sent at most ``limit`` times, where the caller computes the limit from the
cluster size (λ·log(n+1)). Least-sent updates go first, and among equals the newest, so a
fresh update overtakes old chatter. A newer update about the same subject (a member name,
or a user event id) replaces the older one: there is no point finishing stale news.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable

from leaderless.core.codec import encoded_size
from leaderless.core.messages import Update

ITEM_OVERHEAD_BYTES = 1
"""msgpack needs no per-item framing inside an array; the array header is counted apart."""


@dataclasses.dataclass
class _Queued:
    key: Hashable
    update: Update
    size: int
    order: int
    transmits: int = 0


class BroadcastQueue:
    def __init__(self, capacity: int) -> None:
        assert capacity > 0
        self._capacity = capacity
        self._items: dict[Hashable, _Queued] = {}
        self._order = 0

    def __len__(self) -> int:
        return len(self._items)

    def push(self, key: Hashable, update: Update) -> None:
        self._order += 1
        self._items.pop(key, None)
        self._items[key] = _Queued(key, update, encoded_size(update), self._order)
        if len(self._items) > self._capacity:
            # Drop the update that has already been sent the most (ties: the oldest).
            victim = max(self._items.values(), key=lambda q: (q.transmits, -q.order))
            del self._items[victim.key]

    def has(self, key: Hashable) -> bool:
        return key in self._items

    def take(self, budget_bytes: int, limit: int, count_max: int) -> list[Update]:
        """Updates that fit in ``budget_bytes``, each counted as one more transmission."""
        if not self._items or budget_bytes <= 0 or count_max <= 0:
            return []
        chosen: list[Update] = []
        spent = 0
        for q in sorted(self._items.values(), key=lambda q: (q.transmits, -q.order)):
            cost = q.size + ITEM_OVERHEAD_BYTES
            if spent + cost > budget_bytes:
                continue
            spent += cost
            chosen.append(q.update)
            q.transmits += 1
            if q.transmits >= limit:
                del self._items[q.key]
            if budget_bytes - spent < 8 or len(chosen) >= count_max:
                break
        return chosen
