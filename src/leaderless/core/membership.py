"""SWIM membership and failure detection with Lifeguard, as a sans-I/O state machine.

Inputs: ``on_packet`` (a decoded UDP datagram), ``on_push_pull`` / ``on_push_pull_reply`` /
``on_push_pull_failed`` (TCP full-state sync), ``on_tick`` (time passed), and the local
commands ``join``, ``leave``, ``update_meta``, ``broadcast_event``. Outputs: a list of
effects (core.effects) to execute in order. Time is the ``now`` argument (monotonic
seconds) and randomness comes from the injected ``random.Random``, so the simulator can
replay a run exactly.

References: Das et al., "SWIM" (DSN 2002); Dadgar et al., "Lifeguard: Local Health
Awareness for More Accurate Failure Detection" (2018); hashicorp/memberlist.
"""

from __future__ import annotations

import dataclasses
import random
from collections import deque
from collections.abc import Hashable

from leaderless.core.awareness import LocalHealth
from leaderless.core.broadcasts import BroadcastQueue
from leaderless.core.clock_offsets import ClockOffsets
from leaderless.core.codec import encoded_size
from leaderless.core.effects import (
    DeliverUserEvent,
    Effect,
    MemberEvent,
    MemberEventKind,
    SaveIncarnation,
    SendPacket,
    StartPushPull,
)
from leaderless.core.membership_config import MembershipConfig
from leaderless.core.messages import (
    EVENT_NAME_BYTES_MAX,
    EVENT_PAYLOAD_BYTES_MAX,
    PACKET_MESSAGES_MAX,
    PUSH_PULL_EVENTS_MAX,
    Ack,
    Address,
    Alive,
    Dead,
    IndirectPing,
    Left,
    MemberRecord,
    MemberStatus,
    Nack,
    NodeMeta,
    Packet,
    Ping,
    Probe,
    PushPull,
    Suspect,
    Update,
    UserEvent,
)
from leaderless.core.suspicion import Suspicion
from leaderless.core.user_events import UserEvents, event_id

ARRAY_HEADER_GROWTH_BYTES = 2
"""A msgpack array header grows from 1 to 3 bytes past 15 items; keep room for that."""
REAP_CHECK_INTERVAL_S = 10.0
NACK_TIMEOUT_FRACTION = 0.8
"""A helper nacks after this fraction of its probe timeout (Lifeguard suggests 80 %)."""
SUSPECT_PROBES_MAX = 4
"""Suspected members queued for an early probe; more at once (a partition) wait their
turn in the round-robin."""


@dataclasses.dataclass
class Member:
    name: str
    address: Address
    meta: NodeMeta
    incarnation: int
    status: MemberStatus
    changed_at: float
    """``now`` when the status last changed (monotonic seconds of this node)."""


@dataclasses.dataclass
class _Probe:
    target: str
    target_incarnation: int
    seq: int
    timeout_at: float
    deadline: float
    indirect_sent: bool = False
    expected_nacks: int = 0
    nacks: int = 0
    acked: bool = False
    sent_at: float = 0.0
    """``now`` when the ping left: the start of the round trip its ack closes."""


@dataclasses.dataclass
class _Relay:
    """An indirect probe we run for someone else."""

    origin_seq: int
    reply_to: Address
    deadline: float
    want_nack: bool


@dataclasses.dataclass
class MembershipCounters:
    """Monotonic counters for metrics; names end in what they count."""

    packets_received: int = 0
    updates_received: int = 0
    probes_sent: int = 0
    probe_failures: int = 0
    indirect_probes_sent: int = 0
    nacks_received: int = 0
    suspicions_raised: int = 0
    suspicions_heard: int = 0
    refutations: int = 0
    reassertions: int = 0
    deaths_declared: int = 0
    misdirected_pings: int = 0
    address_conflicts: int = 0
    push_pulls_started: int = 0
    push_pulls_failed: int = 0
    events_too_old: int = 0


class Membership:
    """One node's view of the cluster and the protocol that keeps it current."""

    def __init__(
        self,
        name: str,
        address: Address,
        meta: NodeMeta,
        config: MembershipConfig,
        rng: random.Random,
        now: float,
        incarnation: int = 0,
        datagram_overhead_bytes: int = 0,
    ) -> None:
        """``datagram_overhead_bytes``: what the transport adds around each encoded packet
        (gossip encryption: ``security.keyring.SEAL_OVERHEAD_BYTES``), taken off the packet
        budget so the datagram on the wire still fits ``config.packet_bytes_max``."""
        assert 0 <= datagram_overhead_bytes < config.packet_bytes_max // 2
        self.name = name
        self.address = address
        self.config = config
        self._packet_budget_bytes = config.packet_bytes_max - datagram_overhead_bytes
        self._rng = rng
        self._me = Member(name, address, meta, incarnation, MemberStatus.ALIVE, now)
        self._members: dict[str, Member] = {name: self._me}
        self._live: list[str] = []  # alive or suspect, not me; O(1) random choice
        self._live_index: dict[str, int] = {}
        self._dead: dict[str, None] = {}  # DEAD (not LEFT) members, ordered for determinism
        self._suspicions: dict[str, Suspicion] = {}
        self._broadcasts = BroadcastQueue(config.broadcast_queue_max)
        self.health = LocalHealth(config.awareness_max)
        self._events = UserEvents(config.event_buffer)
        self.clock_offsets = ClockOffsets()
        """Peers' clock offsets from probe round trips (acks carry the peer's wall clock
        when the runtime gives ``on_packet`` its ``wall_ms``)."""
        self.counters = MembershipCounters()
        self._seq = 0
        self._probe_order: list[str] = []
        self._suspects_to_probe: deque[str] = deque(maxlen=SUSPECT_PROBES_MAX)
        self._last_probe_was_suspect = False
        self._probe: _Probe | None = None
        self._relays: dict[int, _Relay] = {}
        self._left = False
        interval = config.probe_interval_s
        # Random phases so that nodes started together do not probe in lockstep.
        self._next_probe_at = now + rng.uniform(0, interval)
        self._next_gossip_at = now + rng.uniform(0, config.gossip_interval_s)
        self._next_push_pull_at = now + rng.uniform(0.5, 1.0) * config.push_pull_interval_s
        self._next_reconnect_at = now + rng.uniform(0.5, 1.0) * config.reconnect_interval_s
        self._next_reap_at = now + REAP_CHECK_INTERVAL_S

    # -- queries -----------------------------------------------------------------------

    @property
    def incarnation(self) -> int:
        return self._me.incarnation

    @property
    def meta(self) -> NodeMeta:
        return self._me.meta

    @property
    def has_left(self) -> bool:
        return self._left

    def members(self) -> list[Member]:
        """Every known member, this node included, sorted by name (copies)."""
        return [dataclasses.replace(m) for _, m in sorted(self._members.items())]

    def member(self, name: str) -> Member | None:
        m = self._members.get(name)
        return dataclasses.replace(m) if m is not None else None

    def live_count(self) -> int:
        """Members alive or suspect, this node included: the n in every formula."""
        return len(self._live) + 1

    def pending_broadcasts(self) -> int:
        return len(self._broadcasts)

    def clock_skew_ms(self) -> float | None:
        """How far this node's clock is ahead of its live peers' (ms; negative: behind),
        once enough of them are measured to judge (``ClockOffsets.judged_skew_ms``)."""
        return self.clock_offsets.judged_skew_ms(len(self._live))

    def recent_events(self) -> list[UserEvent]:
        return list(self._events.recent)

    def next_deadline(self) -> float:
        """The earliest ``now`` at which ``on_tick`` has work to do."""
        times = [self._next_push_pull_at, self._next_reap_at]
        if self._broadcasts:  # an idle node does not wake up to gossip nothing
            times.append(self._next_gossip_at)
        times.extend(r.deadline for r in self._relays.values())
        if self._left:  # a node that left stops probing and judging others
            return min(times)
        times += [self._next_probe_at, self._next_reconnect_at]
        if self._probe is not None and not self._probe.acked:
            times.append(self._probe.timeout_at if not self._probe.indirect_sent
                         else self._probe.deadline)
        times.extend(s.deadline() for s in self._suspicions.values())
        return min(times)

    # -- local commands ----------------------------------------------------------------

    def join(self, now: float, seeds: list[Address]) -> list[Effect]:
        """Full-state sync with each seed; the first reply makes us part of the cluster."""
        effects: list[Effect] = []
        for seed in seeds:
            if seed != self.address:
                self.counters.push_pulls_started += 1
                effects.append(StartPushPull(seed, self._push_pull_message(join=True)))
        return effects

    def leave(self, now: float) -> list[Effect]:
        """Announce a graceful leave. Keep ticking until ``pending_broadcasts()`` is 0 (or
        a timeout) so the announcement spreads, then stop."""
        if self._left:
            return []
        self._left = True
        self._me.incarnation += 1
        self._set_status(self._me, MemberStatus.LEFT, now)
        self._broadcast(self.name, Left(self.name, self._me.incarnation))
        effects: list[Effect] = [SaveIncarnation(self._me.incarnation)]
        effects += self._gossip(now)
        return effects

    def update_meta(self, now: float, meta: NodeMeta) -> list[Effect]:
        """Change our metadata; it spreads as an alive update with a higher incarnation."""
        if meta == self._me.meta or self._left:
            return []
        self._me.meta = meta
        self._me.incarnation += 1
        self._broadcast(self.name, self._alive_of(self._me))
        return [SaveIncarnation(self._me.incarnation), self._event(MemberEventKind.UPDATED,
                                                                   self._me)]

    def broadcast_event(self, now: float, name: str, payload: bytes) -> list[Effect]:
        """Send a user event to every live member (and deliver it here too)."""
        if not 1 <= len(name.encode()) <= EVENT_NAME_BYTES_MAX:
            raise ValueError(f"event name must be 1..{EVENT_NAME_BYTES_MAX} bytes")
        if len(payload) > EVENT_PAYLOAD_BYTES_MAX:
            raise ValueError(
                f"event payload is {len(payload)} bytes; the limit is {EVENT_PAYLOAD_BYTES_MAX}")
        event = self._events.create(self.name, self._me.incarnation, name, payload)
        self._broadcast(("event", *event_id(event)), event)
        return [DeliverUserEvent(event), *self._gossip(now)]

    # -- inputs from the network -------------------------------------------------------

    def on_packet(self, now: float, packet: Packet, wall_ms: int | None = None
                  ) -> list[Effect]:
        """``wall_ms``: this node's wall clock (Unix ms) now. Given, acks carry it and
        acks stamped by peers become clock offset samples; None (the simulator): neither."""
        self.counters.packets_received += 1
        effects: list[Effect] = []
        for update in packet.updates:
            self.counters.updates_received += 1
            effects += self._on_update(now, update)
        for probe in packet.probes:
            effects += self._on_probe(now, probe, wall_ms)
        return effects

    def on_push_pull(self, now: float, request: PushPull) -> tuple[PushPull, list[Effect]]:
        """A peer sent its full state: merge it, answer with ours."""
        effects = self._merge(now, request, deliver_events=not request.join)
        return self._push_pull_message(join=False, reply=True), effects

    def on_push_pull_reply(self, now: float, reply: PushPull, join: bool) -> list[Effect]:
        if join:
            # History from before we joined is not ours to replay.
            self._events.skip_before(reply.event_ltime)
            # Members that joined through other seeds while we joined may have finished
            # gossiping before we were there to hear it: sync again soon, not in 30 s.
            soon = now + self._rng.uniform(1.0, 3.0)
            self._next_push_pull_at = min(self._next_push_pull_at, soon)
        return self._merge(now, reply, deliver_events=not join)

    def on_push_pull_failed(self, now: float, to: Address) -> list[Effect]:
        self.counters.push_pulls_failed += 1
        return []

    # -- time ----------------------------------------------------------------------------

    def on_tick(self, now: float) -> list[Effect]:
        effects: list[Effect] = []
        if not self._left:
            effects += self._advance_probe(now)
            effects += self._expire_suspicions(now)
        effects += self._expire_relays(now)
        if now >= self._next_gossip_at:
            self._next_gossip_at = now + self.config.gossip_interval_s
            effects += self._gossip(now)
        if now >= self._next_push_pull_at:
            period = self.config.push_pull_period_s(self.live_count())
            self._next_push_pull_at = now + period * self._rng.uniform(0.9, 1.1)
            effects += self._sync_with(self._random_live(), join=False)
        if now >= self._next_reconnect_at and not self._left:
            self._next_reconnect_at = now + self.config.reconnect_interval_s
            if self._dead:
                name = self._rng.choice(list(self._dead))
                effects += self._sync_with(name, join=False)
        if now >= self._next_reap_at:
            self._next_reap_at = now + REAP_CHECK_INTERVAL_S
            effects += self._reap(now)
        return effects

    # -- probing -------------------------------------------------------------------------

    def _advance_probe(self, now: float) -> list[Effect]:
        effects: list[Effect] = []
        probe = self._probe
        if probe is not None and not probe.acked:
            if not probe.indirect_sent and now >= probe.timeout_at:
                effects += self._send_indirect(probe)
            if now >= probe.deadline:
                effects += self._probe_failed(now, probe)
        if now >= self._next_probe_at:
            self._probe = None
            effects += self._start_probe(now)
        return effects

    def _start_probe(self, now: float) -> list[Effect]:
        interval = self.health.scale(self.config.probe_interval_s)
        self._next_probe_at = now + interval
        target = self._next_probe_target()
        if target is None:
            return []
        self._seq += 1
        timeout = self.health.scale(self.config.probe_timeout_s)
        self._probe = _Probe(target.name, target.incarnation, self._seq, now + timeout,
                             now + interval, sent_at=now)
        self.counters.probes_sent += 1
        first: list[Update] = []
        if target.status == MemberStatus.SUSPECT:
            # Lifeguard's buddy system: tell the suspect directly so it can refute at once.
            first.append(Suspect(target.name, target.incarnation, self.name))
        ping = Ping(self._seq, target.name, self.address)
        return [self._send(target.address, [ping], first)]

    def _next_probe_target(self) -> Member | None:
        # A member someone suspects is probed next (newest first), so that suspicions are
        # confirmed or refuted fast; never twice in a row, so the round-robin still
        # advances at half speed when many members are suspected at once (a partition).
        if not self._last_probe_was_suspect:
            while self._suspects_to_probe:
                m = self._members.get(self._suspects_to_probe.pop())
                if m is not None and m.status == MemberStatus.SUSPECT:
                    self._last_probe_was_suspect = True
                    return m
        self._last_probe_was_suspect = False
        for _ in range(2):
            while self._probe_order:
                name = self._probe_order.pop()
                m = self._members.get(name)
                if m is not None and m.status in (MemberStatus.ALIVE, MemberStatus.SUSPECT):
                    return m
            if not self._live:
                return None
            self._probe_order = list(self._live)
            self._rng.shuffle(self._probe_order)
        return None

    def _send_indirect(self, probe: _Probe) -> list[Effect]:
        probe.indirect_sent = True
        target = self._members.get(probe.target)
        if target is None:
            return []
        helpers = self._indirect_helpers(probe.target)
        probe.expected_nacks = len(helpers)
        effects: list[Effect] = []
        for name in helpers:
            msg = IndirectPing(probe.seq, target.name, target.address, self.address, True)
            effects.append(self._send(self._members[name].address, [msg]))
            self.counters.indirect_probes_sent += 1
        return effects

    def _indirect_helpers(self, target: str) -> list[str]:
        """Up to k random members that are alive (not merely suspect: a suspect helper
        would likely not answer, and its missing nack would wrongly lower our health)."""
        k = self.config.indirect_checks
        chosen: dict[str, None] = {}
        for _ in range(4 * k + 8):  # random picks, bounded: O(k), not O(n)
            if len(chosen) >= k or not self._live:
                break
            name = self._live[self._rng.randrange(len(self._live))]
            if name != target and self._members[name].status == MemberStatus.ALIVE:
                chosen[name] = None
        return list(chosen)

    def _probe_failed(self, now: float, probe: _Probe) -> list[Effect]:
        self._probe = None
        self.counters.probe_failures += 1
        # Lifeguard: if the helpers could not nack either, the fault may be ours.
        if probe.expected_nacks > 0:
            self.health.apply(probe.expected_nacks - probe.nacks)
        else:
            self.health.apply(1)
        target = self._members.get(probe.target)
        if target is None or target.incarnation != probe.target_incarnation:
            return []
        if target.status not in (MemberStatus.ALIVE, MemberStatus.SUSPECT):
            return []
        if target.status == MemberStatus.ALIVE:
            self.counters.suspicions_raised += 1
        return self._on_suspect(now, Suspect(target.name, target.incarnation, self.name))

    def _on_probe(self, now: float, msg: Probe, wall_ms: int | None) -> list[Effect]:
        if isinstance(msg, Ping):
            if msg.target != self.name:
                self.counters.misdirected_pings += 1
                return []
            return [self._send(msg.reply_to, [Ack(msg.seq, wall_ms)])]
        if isinstance(msg, IndirectPing):
            self._seq += 1
            # Nack before the requester's probe period ends (it sent us this at its probe
            # timeout, so only interval - timeout is left): a nack that arrives late counts
            # as missing and wrongly lowers the requester's local health.
            deadline = now + NACK_TIMEOUT_FRACTION * self.health.scale(self.config.probe_timeout_s)
            self._relays[self._seq] = _Relay(msg.seq, msg.reply_to, deadline, msg.want_nack)
            if len(self._relays) > 4 * self.config.broadcast_queue_max:
                self._relays.pop(next(iter(self._relays)))  # bound: drop the oldest
            return [self._send(msg.target_address, [Ping(self._seq, msg.target, self.address)])]
        if isinstance(msg, Ack):
            relay = self._relays.pop(msg.seq, None)
            if relay is not None:
                # The target's stamp still falls within the requester's round trip.
                return [self._send(relay.reply_to, [Ack(relay.origin_seq, msg.stamp_ms)])]
            probe = self._probe
            if probe is not None and probe.seq == msg.seq and not probe.acked:
                probe.acked = True
                if msg.stamp_ms is not None and wall_ms is not None:
                    # The round trip by the monotonic clock, placed on the wall clock.
                    sent_ms = wall_ms - (now - probe.sent_at) * 1000
                    self.clock_offsets.record(probe.target, sent_ms, msg.stamp_ms, wall_ms)
                if not probe.indirect_sent:
                    self.health.apply(-1)
                target = self._members.get(probe.target)
                if target is not None and target.status == MemberStatus.SUSPECT:
                    # It answers but we still suspect it: its refutation has not reached
                    # us. Probe it again next period; each ping carries the suspicion, so
                    # it answers with its current alive.
                    self._suspects_to_probe.append(target.name)
            return []
        probe = self._probe
        if probe is not None and probe.seq == msg.seq:
            probe.nacks += 1
            self.counters.nacks_received += 1
        return []

    def _expire_relays(self, now: float) -> list[Effect]:
        effects: list[Effect] = []
        for seq in [s for s, r in self._relays.items() if now >= r.deadline]:
            relay = self._relays.pop(seq)
            if relay.want_nack:
                effects.append(self._send(relay.reply_to, [Nack(relay.origin_seq)]))
        return effects

    # -- updates -------------------------------------------------------------------------

    def _on_update(self, now: float, update: Update) -> list[Effect]:
        if isinstance(update, Alive):
            return self._on_alive(now, update)
        if isinstance(update, Suspect):
            self.counters.suspicions_heard += 1
            return self._on_suspect(now, update)
        if isinstance(update, Dead):
            return self._on_dead(now, update)
        if isinstance(update, Left):
            return self._on_left(now, update)
        return self._on_user_event(update, deliver=True)

    def _on_alive(self, now: float, a: Alive) -> list[Effect]:
        if a.name == self.name:
            me = self._me
            stale = a.incarnation < me.incarnation
            same = (a.incarnation == me.incarnation and a.address == me.address
                    and a.meta == me.meta)
            if self._left or stale or same:
                return []
            return self._refute(a.incarnation)
        m = self._members.get(a.name)
        if m is None:
            m = Member(a.name, a.address, a.meta, a.incarnation, MemberStatus.ALIVE, now)
            self._members[a.name] = m
            self._add_live(a.name)
            self._broadcast(a.name, a)
            return [self._event(MemberEventKind.JOINED, m)]
        gone = m.status in (MemberStatus.DEAD, MemberStatus.LEFT)
        if a.address != m.address:
            if not gone:
                self.counters.address_conflicts += 1
                return []
            m.address = a.address  # a dead member came back elsewhere: it may have moved
        elif a.incarnation <= m.incarnation:
            return []
        old_status, old_meta = m.status, m.meta
        m.incarnation = a.incarnation
        m.meta = a.meta
        self._suspicions.pop(a.name, None)
        self._set_status(m, MemberStatus.ALIVE, now)
        self._broadcast(a.name, a)
        if old_status != MemberStatus.ALIVE:
            return [self._event(MemberEventKind.ALIVE, m)]
        if old_meta != a.meta:
            return [self._event(MemberEventKind.UPDATED, m)]
        return []

    def _on_suspect(self, now: float, s: Suspect) -> list[Effect]:
        m = self._members.get(s.name)
        if m is None:
            return []
        if s.incarnation < m.incarnation:
            if s.name == self.name:
                self._reassert()
            return []
        if m.status in (MemberStatus.DEAD, MemberStatus.LEFT):
            return []
        if s.name == self.name:
            return self._refute(s.incarnation)
        if m.status == MemberStatus.SUSPECT and s.incarnation == m.incarnation:
            suspicion = self._suspicions[s.name]
            if suspicion.confirm(s.accuser):
                self._broadcast(s.name, s)
            return []
        n = self.live_count()
        cfg = self.config
        self._suspicions[s.name] = Suspicion(
            now, s.accuser, cfg.suspicion_min_s(n), cfg.suspicion_max_s(n),
            cfg.expected_confirmations(n))
        m.incarnation = s.incarnation
        self._set_status(m, MemberStatus.SUSPECT, now)
        self._broadcast(s.name, s)
        if s.accuser != self.name:
            # Probe it next: our own probe either confirms the suspicion (Lifeguard counts
            # it) or carries it to the member, whose answer is the refutation we may have
            # missed. Without this, a node that lost every copy of a refutation could wait
            # a whole probe round (n - 1 intervals) and declare a live member dead.
            self._suspects_to_probe.append(s.name)
        return [self._event(MemberEventKind.SUSPECT, m)]

    def _on_dead(self, now: float, d: Dead) -> list[Effect]:
        m = self._members.get(d.name)
        if m is None:
            return []
        if d.incarnation < m.incarnation:
            if d.name == self.name:
                self._reassert()
            return []
        if m.status in (MemberStatus.DEAD, MemberStatus.LEFT):
            return []
        if d.name == self.name:
            return self._refute(d.incarnation)
        m.incarnation = d.incarnation
        self._suspicions.pop(d.name, None)
        self._set_status(m, MemberStatus.DEAD, now)
        self._broadcast(d.name, d)
        return [self._event(MemberEventKind.DEAD, m)]

    def _on_left(self, now: float, left: Left) -> list[Effect]:
        m = self._members.get(left.name)
        if m is None or left.name == self.name or left.incarnation < m.incarnation:
            return []
        if m.status == MemberStatus.LEFT:
            return []
        m.incarnation = left.incarnation
        self._suspicions.pop(left.name, None)
        self._set_status(m, MemberStatus.LEFT, now)
        self._broadcast(left.name, left)
        return [self._event(MemberEventKind.LEFT, m)]

    def _on_user_event(self, event: UserEvent, deliver: bool) -> list[Effect]:
        accepted = self._events.accept(event)
        self.counters.events_too_old = self._events.too_old
        if not accepted:
            return []
        self._broadcast(("event", *event_id(event)), event)
        return [DeliverUserEvent(event)] if deliver else []

    def _refute(self, accused_incarnation: int) -> list[Effect]:
        """Someone thinks we are suspect/dead (or has old news of us): outvote it."""
        self.counters.refutations += 1
        self.health.apply(1)
        self._me.incarnation = max(self._me.incarnation, accused_incarnation) + 1
        self._broadcast(self.name, self._alive_of(self._me))
        return [SaveIncarnation(self._me.incarnation)]

    def _reassert(self) -> None:
        """Someone still accuses an incarnation we already refuted: our refutation did not
        reach them. Send it again (first in line, so it rides the very next datagram —
        usually the ack to the accuser's ping) without raising the incarnation again."""
        if not self._left:
            self.counters.reassertions += 1
            self._broadcast(self.name, self._alive_of(self._me))

    def _expire_suspicions(self, now: float) -> list[Effect]:
        effects: list[Effect] = []
        expired = [n for n, s in self._suspicions.items() if now >= s.deadline()]
        for name in expired:
            m = self._members[name]
            self.counters.deaths_declared += 1
            effects += self._on_dead(now, Dead(name, m.incarnation, self.name))
        return effects

    # -- full-state sync -----------------------------------------------------------------

    def _sync_with(self, name: str | None, join: bool) -> list[Effect]:
        if name is None:
            return []
        self.counters.push_pulls_started += 1
        return [StartPushPull(self._members[name].address, self._push_pull_message(join))]

    def _push_pull_message(self, join: bool, reply: bool = False) -> PushPull:
        records = [MemberRecord(m.name, m.address, m.incarnation, m.status, m.meta)
                   for m in self._members.values()]
        events = list(self._events.recent)[-PUSH_PULL_EVENTS_MAX:]
        return PushPull(self.name, join, reply, records, self._events.clock.time, events)

    def _merge(self, now: float, remote: PushPull, deliver_events: bool) -> list[Effect]:
        effects: list[Effect] = []
        for r in remote.members:
            if r.status == MemberStatus.ALIVE:
                effects += self._on_alive(now, Alive(r.name, r.incarnation, r.address, r.meta))
            elif r.status == MemberStatus.LEFT:
                if r.name not in self._members:
                    # Remember it as left, like a dead member below: every member then
                    # shows a node that stepped out (passive failover) as left until it
                    # is reaped, a node that joined or restarted since included.
                    self._members[r.name] = Member(r.name, r.address, r.meta, r.incarnation,
                                                   MemberStatus.ALIVE, now)
                    self._set_status(self._members[r.name], MemberStatus.LEFT, now)
                    continue
                effects += self._on_left(now, Left(r.name, r.incarnation))
            elif r.name not in self._members and r.status == MemberStatus.DEAD:
                # Remember members we never saw alive, so reconnect attempts can find them
                # when a partition that hid them heals.
                self._members[r.name] = Member(r.name, r.address, r.meta, r.incarnation,
                                               MemberStatus.ALIVE, now)
                self._set_status(self._members[r.name], MemberStatus.DEAD, now)
            else:
                if r.name not in self._members:
                    effects += self._on_alive(now, Alive(r.name, r.incarnation, r.address,
                                                         r.meta))
                # Another node's "dead" is only a suspicion here: the member gets its
                # chance to refute before we believe it (as memberlist does).
                effects += self._on_suspect(now, Suspect(r.name, r.incarnation, remote.sender))
        self._events.clock.witness(remote.event_ltime)
        for event in remote.events:
            effects += self._on_user_event(event, deliver=deliver_events)
        return effects

    # -- housekeeping --------------------------------------------------------------------

    def _reap(self, now: float) -> list[Effect]:
        effects: list[Effect] = []
        horizon = now - self.config.dead_retention_s
        for m in [m for m in self._members.values()
                  if m.status in (MemberStatus.DEAD, MemberStatus.LEFT) and m.changed_at < horizon]:
            if m.name == self.name:
                continue
            del self._members[m.name]
            self._dead.pop(m.name, None)
            effects.append(self._event(MemberEventKind.REAPED, m))
        return effects

    def _set_status(self, m: Member, status: MemberStatus, now: float) -> None:
        if m.status == status:
            return
        m.status = status
        m.changed_at = now
        if m.name == self.name:
            return
        if status in (MemberStatus.ALIVE, MemberStatus.SUSPECT):
            self._add_live(m.name)
            self._dead.pop(m.name, None)
        else:
            self._remove_live(m.name)
            self.clock_offsets.forget(m.name)
            if status == MemberStatus.DEAD:
                self._dead[m.name] = None
            else:
                self._dead.pop(m.name, None)

    def _add_live(self, name: str) -> None:
        if name in self._live_index:
            return
        self._live_index[name] = len(self._live)
        self._live.append(name)
        # A newcomer gets probed within this round, at a random place in the order.
        self._probe_order.insert(self._rng.randint(0, len(self._probe_order)), name)

    def _remove_live(self, name: str) -> None:
        index = self._live_index.pop(name, None)
        if index is None:
            return
        last = self._live.pop()
        if last != name:
            self._live[index] = last
            self._live_index[last] = index

    def _random_live(self) -> str | None:
        return self._rng.choice(self._live) if self._live else None

    # -- sending -------------------------------------------------------------------------

    def _gossip(self, now: float) -> list[Effect]:
        if not self._broadcasts:
            return []
        targets = self._gossip_targets(now)
        effects: list[Effect] = []
        for name in targets:
            packet = self._packet([], [])
            if not packet.updates:
                break
            effects.append(SendPacket(self._members[name].address, packet))
        return effects

    def _gossip_targets(self, now: float) -> list[str]:
        k = self.config.gossip_nodes
        horizon = now - self.config.gossip_to_dead_s
        recent_dead = [n for n in self._dead if self._members[n].changed_at >= horizon]
        pool_size = len(self._live) + len(recent_dead)
        if pool_size <= k:
            return self._live + recent_dead
        chosen: dict[str, None] = {}
        while len(chosen) < k:
            i = self._rng.randrange(pool_size)
            live = len(self._live)
            chosen[self._live[i] if i < live else recent_dead[i - live]] = None
        return list(chosen)

    def _send(self, to: Address, probes: list[Probe], first: list[Update] | None = None
              ) -> SendPacket:
        return SendPacket(to, self._packet(probes, first or []))

    def _packet(self, probes: list[Probe], first: list[Update]) -> Packet:
        """A datagram with ``probes`` and as many pending updates as fit the size limit."""
        base = encoded_size(Packet(self.name, probes, first))
        budget = self._packet_budget_bytes - base - ARRAY_HEADER_GROWTH_BYTES
        limit = self.config.retransmit_limit(self.live_count())
        room = PACKET_MESSAGES_MAX - len(first)
        updates = first + [u for u in self._broadcasts.take(budget, limit, room)
                           if u not in first]
        return Packet(self.name, probes, updates)

    def _broadcast(self, key: Hashable, update: Update) -> None:
        self._broadcasts.push(key, update)

    def _alive_of(self, m: Member) -> Alive:
        return Alive(m.name, m.incarnation, m.address, m.meta)

    def _event(self, kind: MemberEventKind, m: Member) -> MemberEvent:
        return MemberEvent(kind, m.name, m.address, m.incarnation, m.meta)
