"""Scenario tests of the membership state machine, one scenario each, driven by hand."""

from __future__ import annotations

from leaderless.core.membership_config import MembershipConfig
from leaderless.core.messages import (
    Ack,
    Address,
    IndirectPing,
    MemberStatus,
    Nack,
    NodeMeta,
    Packet,
    Ping,
    Suspect,
)
from tests.unit.membership_harness import Net

CFG = MembershipConfig()


def first_probe(net: Net, name: str, now: float) -> tuple[float, str]:
    """Tick ``name`` at its probe time; return (time, probed member)."""
    node = net.nodes[name]
    at = max(now, node._next_probe_at)
    before = len(net.queue)
    net.tick(name, at)
    pings = [(s, p) for s in list(net.queue)[before:] if s.sender == name
             for p in s.packet.probes if isinstance(p, Ping)]
    assert len(pings) == 1, pings
    return at, pings[0][1].target


def test_probe_is_acked_and_nothing_is_suspected() -> None:
    net = Net(["a", "b"])
    net.converge()
    t, target = first_probe(net, "a", 0.0)
    assert target == "b"
    ping = net.queue[0].packet.probes[0]
    net.deliver(t + 0.001)
    probe = net.nodes["a"]._probe
    assert probe is not None and probe.acked and probe.seq == ping.seq
    net.tick("a", t + CFG.probe_interval_s)
    assert net.status("a", "b") == MemberStatus.ALIVE
    assert net.events["a"] == []
    assert net.nodes["a"].health.score == 0


def test_probe_without_direct_ack_is_confirmed_indirectly() -> None:
    net = Net(["a", "b", "c", "d"])
    net.converge()
    t, target = first_probe(net, "a", 0.0)
    net.take()  # the direct ping is lost
    net.tick("a", t + CFG.probe_timeout_s)
    indirect = net.take()
    helpers = {net.by_address[s.to] for s in indirect}
    assert len(helpers) == 2 and target not in helpers and "a" not in helpers
    assert all(isinstance(s.packet.probes[0], IndirectPing) for s in indirect)
    net.queue.extend(indirect)
    net.deliver(t + CFG.probe_timeout_s + 0.001)  # helpers ping the target, relay its ack
    net.tick("a", t + CFG.probe_interval_s)
    assert net.status("a", target) == MemberStatus.ALIVE
    assert net.kinds("a", target) == []
    assert net.nodes["a"].counters.probe_failures == 0


def test_silent_member_is_suspected_then_declared_dead() -> None:
    net = Net(["a", "b", "c"])
    net.converge()
    t, target = first_probe(net, "a", 0.0)
    helper = ({"b", "c"} - {target}).pop()
    net.down.add(target)
    net.tick("a", t + CFG.probe_timeout_s)
    net.deliver(t + CFG.probe_timeout_s)  # indirect ping reaches the helper
    # The helper's own ping to the target times out: it nacks back to a.
    net.tick(helper, t + 2 * CFG.probe_timeout_s)
    nacks = [p for s in net.queue for p in s.packet.probes if isinstance(p, Nack)]
    assert len(nacks) == 1
    net.deliver(t + 2 * CFG.probe_timeout_s)
    assert net.nodes["a"]._probe is not None and net.nodes["a"]._probe.nacks == 1
    net.tick("a", t + CFG.probe_interval_s)
    assert net.status("a", target) == MemberStatus.SUSPECT
    assert net.kinds("a", target) == ["suspect"]
    # The helper answered (nack), so a does not blame itself.
    assert net.nodes["a"].health.score == 0
    suspicion = net.nodes["a"]._suspicions[target]
    net.tick("a", suspicion.deadline() - 0.001)
    assert net.status("a", target) == MemberStatus.SUSPECT
    net.tick("a", suspicion.deadline())
    assert net.status("a", target) == MemberStatus.DEAD
    assert net.kinds("a", target) == ["suspect", "dead"]
    # The death spreads to the helper by gossip.
    net.tick("a", suspicion.deadline() + CFG.gossip_interval_s)
    net.deliver(suspicion.deadline() + CFG.gossip_interval_s)
    assert net.status(helper, target) == MemberStatus.DEAD


def test_suspected_member_refutes_with_a_higher_incarnation() -> None:
    net = Net(["a", "b"])
    net.converge()
    t, _ = first_probe(net, "a", 0.0)
    net.take()
    net.tick("a", t + CFG.probe_interval_s)  # no ack, no helpers: suspect b
    assert net.status("a", "b") == MemberStatus.SUSPECT
    assert net.nodes["a"].health.score == 1  # nobody could nack: a blames itself a bit
    # The suspicion reaches b piggybacked on a's next probe (Lifeguard's buddy system).
    t2, _ = first_probe(net, "a", t + CFG.probe_interval_s)
    updates = net.queue[-1].packet.updates
    assert isinstance(updates[0], Suspect) and updates[0].name == "b"
    net.deliver(t2)
    assert net.nodes["b"].incarnation == 1
    assert net.saved_incarnation["b"] == 1
    # b's refutation rides on its ack; a believes it.
    assert net.status("a", "b") == MemberStatus.ALIVE
    assert net.kinds("a", "b") == ["suspect", "alive"]
    assert net.nodes["a"].member("b").incarnation == 1  # type: ignore[union-attr]


def test_independent_confirmations_shorten_the_suspicion() -> None:
    net = Net([f"n{i}" for i in range(6)])
    net.converge()
    a = net.nodes["n0"]
    a.on_packet(0.0, _packet_with(Suspect("n5", 0, "n1")))
    alone = a._suspicions["n5"].timeout_s()
    assert alone == CFG.suspicion_max_s(6)
    for accuser in ["n2", "n3", "n4"]:
        a.on_packet(0.0, _packet_with(Suspect("n5", 0, accuser)))
    confirmed = a._suspicions["n5"].timeout_s()
    assert confirmed == CFG.suspicion_min_s(6) < alone
    # A repeated accuser is not an independent confirmation.
    b = net.nodes["n1"]
    b.on_packet(0.0, _packet_with(Suspect("n5", 0, "n2")))
    b.on_packet(0.0, _packet_with(Suspect("n5", 0, "n2")))
    assert b._suspicions["n5"].confirmations == 0


def test_missing_nacks_raise_local_health_and_slow_probing() -> None:
    net = Net(["a", "b", "c", "d"])
    net.converge()
    t, _ = first_probe(net, "a", 0.0)
    net.take()
    net.tick("a", t + CFG.probe_timeout_s)
    net.take()  # a is cut off: indirect pings and any nacks are lost
    t2 = t + CFG.probe_interval_s
    net.tick("a", t2)  # the probe fails and the next one starts at once
    a = net.nodes["a"]
    assert a.health.score == 2  # two helpers expected to nack, none did
    assert abs(a._next_probe_at - (t2 + 3 * CFG.probe_interval_s)) < 1e-9  # 3x slower
    # The next probe gets a clean direct ack, which lowers the score again.
    net.deliver(t2 + 0.001)
    assert a.health.score == 1


def test_graceful_leave_is_left_not_dead() -> None:
    net = Net(["a", "b", "c"])
    net.converge()
    net.apply("b", net.nodes["b"].leave(1.0), 1.0)
    net.deliver(1.0)
    for observer in ["a", "c"]:
        assert net.status(observer, "b") == MemberStatus.LEFT
        assert net.kinds(observer, "b") == ["left"]
    # Nobody probes a member that left.
    net.run(1.0, 5.0)
    assert net.status("a", "b") == MemberStatus.LEFT
    assert all(s.to != net.nodes["b"].address for s in net.queue)


def test_restarted_node_rejoins_with_a_higher_incarnation() -> None:
    net = Net(["a", "b", "c"])
    net.converge()
    net.down.add("c")
    end = net.run(0.0, 12.0)
    assert net.status("a", "c") == MemberStatus.DEAD
    assert net.status("b", "c") == MemberStatus.DEAD
    # c restarts with no memory of its incarnation: the cluster tells it it is dead,
    # and it refutes with a higher incarnation.
    c = net.add("c", net.nodes["c"].address, incarnation=0, now=end)
    net.apply("c", c.join(end, [net.nodes["a"].address]), end)
    assert c.incarnation >= 1
    net.run(end, end + 3.0)
    for observer in ["a", "b"]:
        assert net.status(observer, "c") == MemberStatus.ALIVE
        assert net.kinds(observer, "c")[-1] == "alive"
        assert net.nodes[observer].member("c").incarnation == c.incarnation  # type: ignore[union-attr]


def test_metadata_update_spreads_as_updated_event() -> None:
    net = Net(["a", "b", "c"])
    net.converge()
    meta = NodeMeta(zone="z1", weight_milli=2000, tags={"role": "io"}, version="0.1.0")
    net.apply("b", net.nodes["b"].update_meta(1.0, meta), 1.0)
    net.run(1.0, 2.0)
    for observer in ["a", "c"]:
        assert net.nodes[observer].member("b").meta == meta  # type: ignore[union-attr]
        assert net.kinds(observer, "b") == ["updated"]


def test_user_event_is_delivered_once_everywhere() -> None:
    net = Net([f"n{i}" for i in range(8)])
    net.converge()
    net.apply("n3", net.nodes["n3"].broadcast_event(1.0, "deploy", b"v42"), 1.0)
    net.run(1.0, 4.0)
    for name in net.nodes:
        got = [d.event for d in net.user_events[name]]
        assert [(e.name, e.payload, e.origin) for e in got] == [("deploy", b"v42", "n3")]


def test_user_event_limits_are_enforced_locally() -> None:
    import pytest

    net = Net(["a"])
    with pytest.raises(ValueError, match="payload"):
        net.nodes["a"].broadcast_event(0.0, "x", b"x" * 513)
    with pytest.raises(ValueError, match="name"):
        net.nodes["a"].broadcast_event(0.0, "", b"")


def test_packets_stay_within_the_size_limit_under_many_updates() -> None:
    names = [f"node-with-a-long-name-{i:03d}" for i in range(120)]
    net = Net(names)
    net.converge()
    node = net.nodes[names[0]]
    for i, name in enumerate(names[1:]):
        node.on_packet(0.0, _packet_with(Suspect(name, 0, names[(i + 2) % len(names)])))
    net.take()
    net.tick(names[0], node._next_probe_at)
    sent = net.take()  # Net.apply asserts every encoded packet is <= 1,400 bytes
    assert sent and len(sent[0].packet.updates) > 5


def test_newest_updates_go_first() -> None:
    net = Net(["a", "b", "c", "d"])
    net.converge()
    a = net.nodes["a"]
    a.on_packet(0.0, _packet_with(Suspect("b", 0, "c")))
    a.on_packet(0.0, _packet_with(Suspect("c", 0, "d")))
    packet = a._packet([], [])
    assert [u.name for u in packet.updates][:2] == ["c", "b"]


def test_dead_members_are_reaped_after_retention() -> None:
    cfg = MembershipConfig(dead_retention_s=30.0)
    net = Net(["a", "b", "c"], config=cfg)
    net.converge()
    net.down.add("c")
    net.run(0.0, 12.0)
    assert net.status("a", "c") == MemberStatus.DEAD
    net.run(12.0, 60.0, step=0.5)
    assert net.nodes["a"].member("c") is None
    assert net.kinds("a", "c")[-1] == "reaped"


def test_ping_for_another_name_is_ignored() -> None:
    net = Net(["a", "b"])
    net.converge()
    b = net.nodes["b"]
    effects = b.on_packet(0.0, _packet_with(probe=Ping(1, "someone-else", Address("127.0.0.1", 1))))
    assert effects == [] and b.counters.misdirected_pings == 1


def test_ack_relay_forwards_original_sequence() -> None:
    net = Net(["a", "b", "c"])
    net.converge()
    b = net.nodes["b"]
    relay = IndirectPing(77, "c", net.nodes["c"].address, net.nodes["a"].address, True)
    net.apply("b", b.on_packet(0.0, _packet_with(probe=relay)), 0.0)
    net.deliver(0.0, drop={"a"})  # let c answer b, but do not let b's relay reach a yet
    net.apply("b", [], 0.0)
    acks = [p for s in net.nodes["b"]._relays.values() for p in [s]]
    assert acks == []  # the relay was consumed by c's ack


def _packet_with(update: object = None, probe: object = None):  # type: ignore[no-untyped-def]


    return Packet("test", [probe] if probe else [], [update] if update else [])


def test_relay_without_answer_sends_nack() -> None:
    net = Net(["a", "b", "c"])
    net.converge()
    b = net.nodes["b"]
    relay = IndirectPing(77, "c", net.nodes["c"].address, net.nodes["a"].address, True)
    net.apply("b", b.on_packet(0.0, _packet_with(probe=relay)), 0.0)
    net.take()
    net.tick("b", CFG.probe_timeout_s)
    probes = [p for s in net.take() for p in s.packet.probes if not isinstance(p, Ping)]
    assert probes == [Nack(77)]
    assert not [p for p in probes if isinstance(p, Ack)]


def test_join_learns_dead_members_so_a_partition_can_heal() -> None:
    net = Net(["a", "b", "c"])
    net.converge()
    net.down.add("c")
    end = net.run(0.0, 12.0)
    assert net.status("a", "c") == MemberStatus.DEAD
    d = net.add("d", Address("127.0.0.1", 7010), now=end)
    net.apply("d", d.join(end, [net.nodes["a"].address]), end)
    assert net.status("d", "c") == MemberStatus.DEAD
    assert net.kinds("d", "c") == []  # never seen alive: no joined/dead events


def test_stale_accusation_is_answered_with_the_current_alive() -> None:
    """A refutation lost on the way to one member must not let that member's old
    suspicion run out: the next ping carrying it is answered with the current alive."""
    net = Net(["a", "b", "c"])
    net.converge()
    b = net.nodes["b"]
    net.apply("b", b.on_packet(0.0, _packet_with(Suspect("b", 0, "c"))), 0.0)
    assert b.incarnation == 1
    # Drain b's queue so the refutation is no longer pending anywhere.
    while b.pending_broadcasts():
        b._packet([], [])
    a = net.nodes["a"]
    a.on_packet(0.0, _packet_with(Suspect("b", 0, "c")))  # a never heard the refutation
    assert net.status("a", "b") == MemberStatus.SUSPECT
    ping = Ping(5, "b", a.address)
    from leaderless.core.messages import Alive

    effects = b.on_packet(0.1, Packet("a", [ping], [Suspect("b", 0, "a")]))
    assert b.incarnation == 1 and b.counters.reassertions == 1
    ack = effects[0].packet  # type: ignore[union-attr]
    assert ack.probes == [Ack(5)]
    assert Alive("b", 1, b.address, b.meta) in ack.updates
    net.apply("a", a.on_packet(0.1, ack), 0.1)
    assert net.status("a", "b") == MemberStatus.ALIVE


def test_member_heard_suspected_is_probed_early_and_again_while_it_answers() -> None:
    net = Net([f"n{i}" for i in range(6)])
    net.converge()
    a = net.nodes["n0"]
    a.on_packet(0.0, _packet_with(Suspect("n5", 0, "n1")))
    # The next probe goes to n5 (at most every other probe serves suspects) ...
    targets = []
    now = 0.0
    for _ in range(2):
        now, target = first_probe(net, "n0", now)
        targets.append(target)
        sent = net.take()
        if target == "n5":
            # ... carrying the suspicion, and n5's ack is lost, so the suspicion stands.
            ping = next(x for x in sent if any(isinstance(p, Ping) for p in x.packet.probes))
            assert any(isinstance(u, Suspect) and u.name == "n5" for u in ping.packet.updates)
            ack = Packet("n5", [Ack(a._probe.seq)], [])  # type: ignore[union-attr]
            a.on_packet(now, ack)
        now += CFG.probe_interval_s
    assert "n5" in targets
    # It answered while still suspected: it is queued for another probe.
    assert list(a._suspects_to_probe) == ["n5"]


def test_joiner_syncs_again_soon_after_joining() -> None:
    net = Net(["a", "b"])
    b = net.nodes["b"]
    assert b._next_push_pull_at >= 0.5 * CFG.push_pull_interval_s
    net.apply("b", b.join(0.0, [net.nodes["a"].address]), 0.0)
    assert 1.0 <= b._next_push_pull_at <= 3.0


def test_idle_node_does_not_wake_for_gossip() -> None:
    net = Net(["a", "b"])
    net.converge()
    a = net.nodes["a"]
    while a.pending_broadcasts():
        a._packet([], [])
    timers = [a._next_probe_at, a._next_push_pull_at, a._next_reap_at, a._next_reconnect_at]
    assert a.next_deadline() == min(timers)
    a.on_packet(0.0, _packet_with(Suspect("b", 0, "x")))
    assert a.pending_broadcasts() and a.next_deadline() <= a._next_gossip_at
