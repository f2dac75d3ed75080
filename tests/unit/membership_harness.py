"""A hand-driven network of Membership state machines for scenario tests.

Nothing runs by itself: a test ticks a node at a chosen time and delivers (or drops) the
packets that are queued, so every interleaving is explicit. Packets go through the real
codec, exactly as on the wire.
"""

from __future__ import annotations

import dataclasses
import random
from collections import deque

from leaderless.core.codec import PACKET_BYTES_MAX, decode_packet, encode_packet
from leaderless.core.effects import (
    DeliverUserEvent,
    Effect,
    MemberEvent,
    SaveIncarnation,
    SendPacket,
    StartPushPull,
)
from leaderless.core.membership import Membership
from leaderless.core.membership_config import MembershipConfig
from leaderless.core.messages import Address, MemberStatus, NodeMeta, Packet


@dataclasses.dataclass
class Sent:
    sender: str
    to: Address
    packet: Packet


class Net:
    def __init__(self, names: list[str], config: MembershipConfig | None = None,
                 seed: int = 1) -> None:
        self.config = config or MembershipConfig()
        self.rng = random.Random(seed)
        self.nodes: dict[str, Membership] = {}
        self.by_address: dict[Address, str] = {}
        self.queue: deque[Sent] = deque()
        self.events: dict[str, list[MemberEvent]] = {}
        self.user_events: dict[str, list[DeliverUserEvent]] = {}
        self.saved_incarnation: dict[str, int] = {}
        self.down: set[str] = set()
        for i, name in enumerate(names):
            self.add(name, Address("127.0.0.1", 7000 + i))

    def add(self, name: str, address: Address, incarnation: int = 0,
            now: float = 0.0) -> Membership:
        node = Membership(name, address, NodeMeta(), self.config,
                          random.Random(self.rng.random()), now, incarnation)
        self.nodes[name] = node
        self.by_address[address] = name
        self.events.setdefault(name, [])
        self.user_events.setdefault(name, [])
        self.down.discard(name)
        return node

    def converge(self, now: float = 0.0) -> None:
        """Every node joins the first one, then the first one syncs with everyone."""
        names = list(self.nodes)
        seed = self.nodes[names[0]]
        for name in names[1:]:
            self.apply(name, self.nodes[name].join(now, [seed.address]), now)
        for name in names[1:]:
            request = seed._push_pull_message(join=False)
            self.apply(name, self.nodes[name].on_push_pull(now, request)[1], now)
        self.clear_events()
        self.queue.clear()

    def apply(self, name: str, effects: list[Effect], now: float) -> None:
        for effect in effects:
            if isinstance(effect, SendPacket):
                data = encode_packet(effect.packet)
                assert len(data) <= PACKET_BYTES_MAX, len(data)
                self.queue.append(Sent(name, effect.to, decode_packet(data)))
            elif isinstance(effect, StartPushPull):
                self._push_pull(name, effect, now)
            elif isinstance(effect, MemberEvent):
                self.events[name].append(effect)
            elif isinstance(effect, DeliverUserEvent):
                self.user_events[name].append(effect)
            elif isinstance(effect, SaveIncarnation):
                self.saved_incarnation[name] = effect.incarnation

    def _push_pull(self, name: str, effect: StartPushPull, now: float) -> None:
        node = self.nodes[name]
        target = self.by_address.get(effect.to)
        if target is None or target in self.down:
            self.apply(name, node.on_push_pull_failed(now, effect.to), now)
            return
        reply, effects = self.nodes[target].on_push_pull(now, effect.request)
        self.apply(target, effects, now)
        self.apply(name, node.on_push_pull_reply(now, reply, effect.request.join), now)

    def tick(self, name: str, now: float) -> None:
        self.apply(name, self.nodes[name].on_tick(now), now)

    def tick_all(self, now: float) -> None:
        for name in self.nodes:
            if name not in self.down:
                self.tick(name, now)

    def deliver(self, now: float, drop: set[str] | None = None, rounds: int = 100) -> int:
        """Deliver queued packets (and the packets they cause) until the queue is empty."""
        drop = (drop or set()) | self.down
        delivered = 0
        for _ in range(rounds):
            if not self.queue:
                break
            batch = list(self.queue)
            self.queue.clear()
            for sent in batch:
                to = self.by_address.get(sent.to)
                if to is None or to in drop or sent.sender in drop:
                    continue
                delivered += 1
                self.apply(to, self.nodes[to].on_packet(now, sent.packet), now)
        return delivered

    def take(self) -> list[Sent]:
        sent = list(self.queue)
        self.queue.clear()
        return sent

    def run(self, start: float, end: float, step: float = 0.05) -> float:
        """Tick every live node and deliver everything, step by step."""
        now = start
        while now < end:
            self.tick_all(now)
            self.deliver(now)
            now = round(now + step, 9)
        return now

    def status(self, observer: str, member: str) -> MemberStatus:
        m = self.nodes[observer].member(member)
        assert m is not None, f"{observer} does not know {member}"
        return m.status

    def kinds(self, observer: str, member: str) -> list[str]:
        return [e.kind.value for e in self.events[observer] if e.name == member]

    def clear_events(self) -> None:
        for name in self.events:
            self.events[name].clear()
            self.user_events[name].clear()
