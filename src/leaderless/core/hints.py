"""Hinted handoff: writes kept for a replica that was down, replayed when it is back.

A hint is stored under ``b"h" | len(target):u8 | target | hlc:u64be | seq:u32be``, so one
target's hints scan in timestamp order. ``HintLog`` reads and writes them through the Store;
``Handoff`` is the state machine that replays them to their target while it is alive,
throttled (``hints_in_flight_max`` at once, ``hints_per_s``) and deleting each hint only
after the target acknowledged it durably. Hints older than ``hint_window_s`` are dropped:
a replica down that long converges by anti-entropy instead (Cassandra's
max_hint_window_in_ms plays the same role). Hints for a target that is not alive -- dead,
or left (a node that stepped out on a fault may come back, or be replaced under its name)
-- are kept until then too, and dropped by a slow sweep (``expire_interval_s``) so hints
for a node that never returns do not stay forever.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterator
from collections.abc import Set as AbstractSet

import msgspec

from leaderless.core.cells import Cell
from leaderless.core.kv_messages import ReplicaAck, ReplicaWrite
from leaderless.storage.store import Store, Write

HINT_PREFIX = b"h"
_SUFFIX = struct.Struct(">QI")


@dataclasses.dataclass(frozen=True)
class HintConfig:
    hint_window_s: float = 3 * 3600.0
    """Cassandra's default: a replica down longer than this gets no more hints."""
    hints_in_flight_max: int = 64
    """Replay writes outstanding per target; bounds the load a returning node gets."""
    hints_per_s: float = 2000.0
    """Replay rate per node across targets, so a returning node is not swamped."""
    replay_timeout_s: float = 5.0
    expire_interval_s: float = 10.0
    """How often hints for targets that are not alive are checked against the window: a
    scan of each such target's oldest hints, so rarely is enough."""
    expire_scan_max: int = 1000
    """Hints looked at per target and sweep (the oldest first); the rest wait a sweep."""


class Hint(msgspec.Struct, frozen=True, array_like=True):
    keyspace: str
    partition: bytes
    sort: bytes
    cell: Cell
    stored_at_ms: int


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Hint)


def target_prefix(target: str) -> bytes:
    name = target.encode()
    return HINT_PREFIX + bytes([len(name)]) + name


class HintLog:
    """Hints in the store, with a count per target kept in memory."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._seq = 0
        self.pending: dict[str, int] = {}
        for key, _ in store.scan(HINT_PREFIX, b"i"):
            target = key[2:2 + key[1]].decode()
            self.pending[target] = self.pending.get(target, 0) + 1

    def add(self, target: str, hint: Hint) -> Write:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        key = target_prefix(target) + _SUFFIX.pack(hint.cell.hlc, self._seq)
        self.pending[target] = self.pending.get(target, 0) + 1
        return (key, _encoder.encode(hint))

    def remove(self, target: str, key: bytes) -> Write:
        left = self.pending.get(target, 0) - 1
        if left > 0:
            self.pending[target] = left
        else:
            self.pending.pop(target, None)
        return (key, None)

    def scan(self, target: str, after: bytes | None, limit: int) -> Iterator[tuple[bytes, Hint]]:
        prefix = target_prefix(target)
        start = prefix if after is None else after + b"\x00"
        end = prefix + b"\xff" * 13
        for key, value in self._store.scan(start, end, limit=limit):
            yield key, _decoder.decode(value)

    def total(self) -> int:
        return sum(self.pending.values())


@dataclasses.dataclass(frozen=True, slots=True)
class SendHint:
    """Send this write to ``to`` (the hint's target)."""

    to: str
    message: ReplicaWrite


@dataclasses.dataclass(frozen=True, slots=True)
class DeleteHint:
    """The target has it durably: delete the hint (``write`` is the store deletion)."""

    write: Write


@dataclasses.dataclass
class HandoffCounters:
    replayed: int = 0
    expired: int = 0
    failed: int = 0


class Handoff:
    """Replays hints to alive targets. Request ids come from the caller's id source so they
    never clash with the coordinator's."""

    def __init__(self, log: HintLog, config: HintConfig) -> None:
        self.log = log
        self.config = config
        self.counters = HandoffCounters()
        self._in_flight: dict[int, tuple[str, bytes, float]] = {}
        self._cursor: dict[str, bytes] = {}
        self._tokens = 0.0
        self._last_refill = 0.0
        self._next_expiry = 0.0

    def on_tick(self, now: float, wall_ms: int, alive: AbstractSet[str],
                next_id: Iterator[int]) -> list[SendHint | DeleteHint]:
        effects: list[SendHint | DeleteHint] = []
        for request_id, (target, _key, sent_at) in list(self._in_flight.items()):
            if now - sent_at > self.config.replay_timeout_s:
                del self._in_flight[request_id]
                self.counters.failed += 1
                self._cursor.pop(target, None)  # start over from the oldest unacked hint
        self._tokens = min(self.config.hints_per_s,
                           self._tokens + (now - self._last_refill) * self.config.hints_per_s)
        self._last_refill = now
        window_ms = int(self.config.hint_window_s * 1000)
        if now >= self._next_expiry:
            self._next_expiry = now + self.config.expire_interval_s
            effects.extend(self._expire_absent(wall_ms, window_ms, alive))
        for target in list(self.log.pending):
            if target not in alive:
                continue
            busy = sum(1 for t, _, _ in self._in_flight.values() if t == target)
            room = min(self.config.hints_in_flight_max - busy, int(self._tokens))
            if room <= 0:
                continue
            for key, hint in self.log.scan(target, self._cursor.get(target), room):
                self._cursor[target] = key
                if wall_ms - hint.stored_at_ms > window_ms:
                    self.counters.expired += 1
                    effects.append(DeleteHint(self.log.remove(target, key)))
                    continue
                request_id = next(next_id)
                self._in_flight[request_id] = (target, key, now)
                self._tokens -= 1
                effects.append(SendHint(target, ReplicaWrite(
                    request_id, hint.keyspace, hint.partition, hint.sort, hint.cell)))
        return effects

    def _expire_absent(self, wall_ms: int, window_ms: int, alive: AbstractSet[str]
                       ) -> list[DeleteHint]:
        """Drop the hints older than the window of targets that are not alive (kept until
        then, whether the target is dead or left). Hints are in timestamp order, so the
        scan stops at the first one still inside the window."""
        effects: list[DeleteHint] = []
        for target in list(self.log.pending):
            if target in alive:
                continue
            for key, hint in self.log.scan(target, None, self.config.expire_scan_max):
                if wall_ms - hint.stored_at_ms <= window_ms:
                    break
                self.counters.expired += 1
                effects.append(DeleteHint(self.log.remove(target, key)))
        return effects

    def owns(self, request_id: int) -> bool:
        return request_id in self._in_flight

    def on_ack(self, ack: ReplicaAck) -> list[DeleteHint]:
        entry = self._in_flight.pop(ack.id, None)
        if entry is None:
            return []
        target, key, _ = entry
        if ack.error:
            self.counters.failed += 1
            self._cursor.pop(target, None)
            return []
        self.counters.replayed += 1
        return [DeleteHint(self.log.remove(target, key))]

    def busy(self) -> bool:
        return bool(self._in_flight) or bool(self.log.pending)

