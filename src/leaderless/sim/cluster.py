"""A simulated cluster: nodes running the real ``Membership`` on a simulated clock and network.

The cluster executes each node's effects exactly as the runtime would, but against the
simulated network: ``SendPacket`` is encoded with the real codec, maybe lost, duplicated or
delayed, and decoded at the receiver; ``StartPushPull`` is a TCP request/reply of encoded
frames, or a failure after a connect timeout; ``SaveIncarnation`` writes the simulated disk
(before later sends leave, trivially, since effects run in order at one instant).

After every input a node gets a wakeup at its ``next_deadline()``; only the most recently
scheduled wakeup of a node is live (the others are stale and skipped).
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence

from leaderless.core.codec import FrameDecoder, decode_packet, encode_frame, encode_packet
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
from leaderless.core.messages import Address, NodeMeta, PushPull
from leaderless.sim.clock import SimClock
from leaderless.sim.network import TCP_CONNECT_TIMEOUT_S, LinkModel, Network
from leaderless.sim.node import NodeState, SimNode
from leaderless.sim.recorder import Recorder
from leaderless.sim.views import install_converged

PORT = 7946
SEEDS_PER_JOIN = 3


class SimulationError(AssertionError):
    """The simulation reached a state the protocol promises never to reach."""


@dataclasses.dataclass(slots=True)
class _Exchange:
    """One TCP push-pull in flight."""

    src: SimNode
    src_generation: int
    to: Address
    dst: SimNode | None
    request: PushPull
    started_at: float


def node_name(i: int) -> str:
    return f"n{i:05d}"


def node_address(i: int) -> Address:
    return Address(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", PORT)


class Cluster:
    """The world: one clock, one network, one ``random.Random(seed)``, n nodes."""

    def __init__(self, n: int, seed: int, config: MembershipConfig | None = None,
                 link: LinkModel | None = None) -> None:
        assert n >= 1
        self.seed = seed
        self.config = config or MembershipConfig()
        self.rng = random.Random(seed)
        self.clock = SimClock()
        self.net = Network(n, self.rng, link)
        self.recorder = Recorder(n)
        self.nodes: list[SimNode] = []
        self._by_address: dict[Address, SimNode] = {}
        for _ in range(n):
            self.add_node()

    # -- nodes --------------------------------------------------------------------------

    def add_node(self, meta: NodeMeta | None = None) -> SimNode:
        """A new, stopped node (start it with ``start`` or ``bootstrap_*``)."""
        i = len(self.nodes)
        node = SimNode(i, node_name(i), node_address(i), meta or NodeMeta())
        self.nodes.append(node)
        self._by_address[node.address] = node
        self.net.grow(i + 1)
        self.recorder.grow(i + 1)
        return node

    def running(self) -> list[SimNode]:
        return [nd for nd in self.nodes if nd.state is NodeState.RUNNING]

    def _new_process(self, node: SimNode) -> Membership:
        """Start a process: incarnation is the saved one + 1, and is saved at once."""
        incarnation = node.saved_incarnation + 1
        node.saved_incarnation = incarnation
        node.generation += 1
        node.state = NodeState.RUNNING
        node.inbox.clear()
        node.wake_at = math.inf
        node.wake_token += 1
        self.recorder.reset_view(node.index)
        node_rng = random.Random(self.rng.getrandbits(64))
        node.membership = Membership(node.name, node.address, node.meta, self.config,
                                     node_rng, self.clock.now, incarnation)
        return node.membership

    def start(self, node: SimNode, seeds: Sequence[SimNode] = ()) -> None:
        """Start (or restart) ``node`` now and join through ``seeds`` (none: it is first)."""
        assert node.state in (NodeState.STOPPED, NodeState.CRASHED), node.state
        m = self._new_process(node)
        effects = m.join(self.clock.now, [s.address for s in seeds]) if seeds else []
        self._execute(node, effects)

    def pick_seeds(self, exclude: SimNode, count: int = SEEDS_PER_JOIN) -> list[SimNode]:
        candidates = [nd for nd in self.running() if nd is not exclude]
        return self.rng.sample(candidates, min(count, len(candidates)))

    def bootstrap_join(self, spacing_s: float = 0.01) -> None:
        """Node 0 starts alone; node i starts at i * spacing_s and joins through up to three
        random nodes already running."""
        self.start(self.nodes[0])
        for i in range(1, len(self.nodes)):
            self.clock.at(self.clock.now + i * spacing_s, self._start_joining, self.nodes[i])

    def _start_joining(self, node: SimNode, _: object) -> None:
        self.start(node, self.pick_seeds(node))

    def bootstrap_converged(self, shared: bool | None = None) -> None:
        """Start every node at once, each already knowing every other as alive.

        ``shared`` (default: above 500 nodes) shares the initial view between nodes, copy on
        access, to keep 10,000 nodes in memory (see sim.views).
        """
        if shared is None:
            shared = len(self.nodes) > 500
        processes = [self._new_process(nd) for nd in self.nodes]
        install_converged(processes, self.clock.now, shared, self.rng)
        for nd in self.nodes:
            self._schedule_wake(nd)

    def crash(self, node: SimNode) -> None:
        """Kill the process: in-flight replies to it are lost, its memory is gone."""
        assert node.state in (NodeState.RUNNING, NodeState.PAUSED), node.state
        node.state = NodeState.CRASHED
        node.membership = None
        node.inbox.clear()
        node.wake_token += 1
        node.ever_crashed = True

    def restart(self, node: SimNode, seeds: Sequence[SimNode] | None = None) -> None:
        self.start(node, self.pick_seeds(node) if seeds is None else seeds)

    def pause(self, node: SimNode) -> None:
        assert node.state is NodeState.RUNNING, node.state
        node.state = NodeState.PAUSED
        node.ever_paused = True

    def resume(self, node: SimNode) -> None:
        """Deliver what queued up (as the event loop would, I/O first), then fire timers."""
        assert node.state is NodeState.PAUSED, node.state
        node.state = NodeState.RUNNING
        held, node.inbox = node.inbox, []
        for callback, a, b in held:
            callback(a, b)
            if node.state is not NodeState.RUNNING:
                return
        node.wake_at = math.inf
        self._schedule_wake(node)

    def partition(self, groups: list[list[SimNode]]) -> None:
        self.net.partition([[nd.index for nd in g] for g in groups])

    def heal(self) -> None:
        self.net.heal()

    # -- running ------------------------------------------------------------------------

    def run_for(self, seconds: float) -> None:
        self.clock.run_until(self.clock.now + seconds)

    # -- effects ------------------------------------------------------------------------

    def _execute(self, node: SimNode, effects: list[Effect], ticked: bool = False) -> None:
        now = self.clock.now
        for e in effects:
            kind = type(e)
            if kind is SendPacket:
                self._send_datagram(node, e)  # type: ignore[arg-type]
            elif kind is MemberEvent:
                self.recorder.on_member_event(now, node.index, e)  # type: ignore[arg-type]
            elif kind is StartPushPull:
                self._start_push_pull(node, e)  # type: ignore[arg-type]
            elif kind is SaveIncarnation:
                node.saved_incarnation = e.incarnation  # type: ignore[union-attr]
            elif kind is DeliverUserEvent:
                self.recorder.on_user_event(now, node.index, e.event)  # type: ignore[union-attr]
            else:
                raise SimulationError(f"unknown effect {e!r}")
        if node.state is NodeState.RUNNING:
            self._schedule_wake(node, ticked)

    def _schedule_wake(self, node: SimNode, ticked: bool = False) -> None:
        now = self.clock.now
        deadline = node.m().next_deadline()
        if deadline <= now:
            if ticked:
                raise SimulationError(
                    f"{node.name}: next_deadline() {deadline} is not after now {now} right "
                    f"after on_tick: a runtime would spin (seed {self.seed})")
            deadline = now
        if deadline < node.wake_at or node.wake_at < now:
            node.wake_at = deadline
            node.wake_token += 1
            self.clock.at(deadline, self._wake, node, node.wake_token)

    def _wake(self, node: SimNode, token: int) -> None:
        if token != node.wake_token:
            return
        node.wake_at = math.inf
        if node.state is not NodeState.RUNNING:
            return  # paused: resume() reschedules
        now = self.clock.now
        self._execute(node, node.m().on_tick(now), ticked=True)

    # -- UDP ----------------------------------------------------------------------------

    def _send_datagram(self, src: SimNode, e: SendPacket) -> None:
        data = encode_packet(e.packet)
        now = self.clock.now
        self.recorder.on_datagram(now, data)
        dst = self._by_address.get(e.to)
        if dst is None:
            self.recorder.traffic.udp_dropped += 1
            return
        delays = self.net.datagram_delays(src.index, dst.index)
        if not delays:
            self.recorder.traffic.udp_dropped += 1
        for delay in delays:
            self.clock.at(now + delay, self._deliver_datagram, dst, data)

    def _deliver_datagram(self, dst: SimNode, data: bytes) -> None:
        state = dst.state
        if state is not NodeState.RUNNING:
            if state is NodeState.PAUSED:
                dst.inbox.append((self._deliver_datagram, dst, data))
            else:
                self.recorder.traffic.udp_dropped += 1
            return
        packet = decode_packet(data)
        self._execute(dst, dst.m().on_packet(self.clock.now, packet))

    # -- TCP push-pull ------------------------------------------------------------------

    def _reachable(self, src: SimNode, dst: SimNode | None) -> bool:
        return (dst is not None and dst.state is NodeState.RUNNING
                and self.net.connected(src.index, dst.index))

    def _start_push_pull(self, src: SimNode, e: StartPushPull) -> None:
        now = self.clock.now
        dst = self._by_address.get(e.to)
        x = _Exchange(src, src.generation, e.to, dst, e.request, now)
        if dst is None or not self._reachable(src, dst):
            self.clock.at(now + TCP_CONNECT_TIMEOUT_S, self._push_pull_failed, x)
            return
        frame = encode_frame(e.request)
        self.recorder.on_frame(frame)
        # Connect (one round trip) then the request itself.
        delay = 2 * self.net.stream_delay(src.index, dst.index)
        delay += self.net.stream_delay(src.index, dst.index)
        self.clock.at(now + delay, self._push_pull_request, x, frame)

    def _push_pull_request(self, x: _Exchange, frame: bytes) -> None:
        dst = x.dst
        assert dst is not None
        if not self._reachable(x.src, dst):
            # The peer died, froze or was cut off before it answered: the initiator's
            # read times out (we charge the connect timeout from the start).
            at = max(self.clock.now, x.started_at + TCP_CONNECT_TIMEOUT_S)
            self.clock.at(at, self._push_pull_failed, x)
            return
        request = _decode_push_pull(frame)
        reply, effects = dst.m().on_push_pull(self.clock.now, request)
        reply_frame = encode_frame(reply)
        self.recorder.on_frame(reply_frame)
        self._execute(dst, effects)
        delay = self.net.stream_delay(dst.index, x.src.index)
        self.clock.at(self.clock.now + delay, self._push_pull_reply, x, reply_frame)

    def _push_pull_reply(self, x: _Exchange, frame: bytes) -> None:
        src = x.src
        if src.generation != x.src_generation or src.state is NodeState.CRASHED:
            return  # the process that asked is gone
        if src.state is NodeState.PAUSED:
            src.inbox.append((self._push_pull_reply, x, frame))
            return
        if x.dst is None or not self.net.connected(x.dst.index, src.index):
            self._push_pull_failed(x, None)
            return
        reply = _decode_push_pull(frame)
        m = src.m()
        self._execute(src, m.on_push_pull_reply(self.clock.now, reply, join=x.request.join))

    def _push_pull_failed(self, x: _Exchange, _: object) -> None:
        src = x.src
        if src.generation != x.src_generation or src.state is NodeState.CRASHED:
            return
        if src.state is NodeState.PAUSED:
            src.inbox.append((self._push_pull_failed, x, None))
            return
        self._execute(src, src.m().on_push_pull_failed(self.clock.now, x.to))


def _decode_push_pull(frame: bytes) -> PushPull:
    messages: list[PushPull] = FrameDecoder(PushPull).feed(frame)
    if len(messages) != 1:
        raise SimulationError(f"expected one push-pull frame, decoded {len(messages)}")
    return messages[0]
