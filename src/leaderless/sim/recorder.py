"""What happened in a run: member events, user events and traffic, as checkers need them.

Every ``MemberEvent`` and ``DeliverUserEvent`` effect is kept with its simulated time and
the observing node, in order; that list is the run's trace (two runs from one seed must
produce identical traces). Traffic is counted as it is sent. Small incremental summaries
(who suspects whom now; watches on one member) let a scenario stop as soon as a condition
holds without rescanning the trace.
"""

from __future__ import annotations

import dataclasses
import math
import struct
import zlib

from leaderless.core.effects import MemberEvent, MemberEventKind
from leaderless.core.messages import UserEvent

MemberRecordRow = tuple[float, int, MemberEventKind, str, int]
"""(time, observer index, kind, member name, incarnation)."""
UserEventRow = tuple[float, int, str, int, int, str]
"""(time, observer index, origin, origin incarnation, Lamport time, event name)."""
_TIME = struct.Struct("<d")


@dataclasses.dataclass
class Traffic:
    udp_packets: int = 0
    udp_bytes: int = 0
    tcp_frames: int = 0
    tcp_bytes: int = 0
    udp_dropped: int = 0
    """Datagrams lost, cut off by a partition, or sent to a crashed node."""

    @property
    def messages(self) -> int:
        return self.udp_packets + self.tcp_frames

    @property
    def bytes(self) -> int:
        return self.udp_bytes + self.tcp_bytes

    def copy(self) -> Traffic:
        return dataclasses.replace(self)


class Watch:
    """First time each observer saw ``member`` reach one of ``kinds`` at an incarnation of at
    least ``incarnation_min``."""

    def __init__(self, member: str, kinds: frozenset[MemberEventKind], incarnation_min: int,
                 since: float) -> None:
        self.member = member
        self.kinds = kinds
        self.incarnation_min = incarnation_min
        self.since = since
        self.first_seen: dict[int, float] = {}

    def seen_by_all(self, observers: list[int]) -> bool:
        return all(i in self.first_seen for i in observers)

    def latest(self, observers: list[int]) -> float:
        """When the last of ``observers`` saw it (inf if one has not)."""
        return max((self.first_seen.get(i, math.inf) for i in observers), default=self.since)


class Recorder:
    def __init__(self, n: int) -> None:
        self.member_events: list[MemberRecordRow] = []
        self.user_events: list[UserEventRow] = []
        self.traffic = Traffic()
        self.digest = 0
        """crc32 over every datagram sent with its time: cheap proof that two runs match."""
        self.suspects: list[dict[str, None]] = [{} for _ in range(n)]
        """Per observer: members it suspects now (from its events)."""
        self.down: list[dict[str, None]] = [{} for _ in range(n)]
        """Per observer: members it holds dead or left now (from its events)."""
        self.watches: list[Watch] = []

    def grow(self, n: int) -> None:
        while len(self.suspects) < n:
            self.suspects.append({})
            self.down.append({})

    def reset_view(self, observer: int) -> None:
        """The observer's process restarted: it suspects no one."""
        self.suspects[observer] = {}
        self.down[observer] = {}

    def on_member_event(self, now: float, observer: int, e: MemberEvent) -> None:
        kind = e.kind
        self.member_events.append((now, observer, kind, e.name, e.incarnation))
        if kind is MemberEventKind.SUSPECT:
            self.suspects[observer][e.name] = None
        elif kind is MemberEventKind.DEAD or kind is MemberEventKind.LEFT:
            self.suspects[observer].pop(e.name, None)
            self.down[observer][e.name] = None
        elif kind is MemberEventKind.ALIVE or kind is MemberEventKind.REAPED:
            self.suspects[observer].pop(e.name, None)
            self.down[observer].pop(e.name, None)
        for w in self.watches:
            if (e.name == w.member and kind in w.kinds and e.incarnation >= w.incarnation_min
                    and observer not in w.first_seen):
                w.first_seen[observer] = now

    def on_user_event(self, now: float, observer: int, event: UserEvent) -> None:
        self.user_events.append((now, observer, event.origin, event.origin_incarnation,
                                 event.ltime, event.name))

    def on_datagram(self, now: float, data: bytes) -> None:
        self.traffic.udp_packets += 1
        self.traffic.udp_bytes += len(data)
        self.digest = zlib.crc32(data, zlib.crc32(_TIME.pack(now), self.digest))

    def on_frame(self, frame: bytes) -> None:
        self.traffic.tcp_frames += 1
        self.traffic.tcp_bytes += len(frame)

    def watch(self, member: str, kinds: frozenset[MemberEventKind], incarnation_min: int,
              since: float) -> Watch:
        w = Watch(member, kinds, incarnation_min, since)
        self.watches.append(w)
        return w
