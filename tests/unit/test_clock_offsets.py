"""The clock offset estimator (``core.clock_offsets``), how membership feeds it from probe
round trips whose acks carry the responder's wall clock, the node's ``clock_skew`` refusal
and the test-only skew fault hook (``runtime.wall_clock``)."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from leaderless.api.service import KvError
from leaderless.core.clock_offsets import (
    PEERS_MAX,
    SAMPLES_PER_PEER,
    SKEW_PEERS_MIN,
    ClockOffsets,
    skew_refusal,
)
from leaderless.core.locks import CLOCK_SKEW_MAX_MS
from leaderless.core.messages import Ack, Dead, Left, MemberStatus, Packet, Ping
from leaderless.runtime import wall_clock
from leaderless.runtime.errors import StartupError
from leaderless.runtime.logs import NodeLogger
from leaderless.runtime.wall_clock import FAULT_CLOCK_SKEW_ENV
from tests.unit.membership_harness import Net
from tests.unit.test_runtime_node import make_node, run_test

T0 = 1_764_000_000_000  # a Unix time in ms


def round_trip(offsets: ClockOffsets, peer: str, sent_ms: float, out_ms: float,
               back_ms: float, peer_ahead_ms: float) -> None:
    """A probe sent at ``sent_ms`` (our clock) whose ping takes ``out_ms`` and whose ack
    takes ``back_ms``, to a peer whose clock is ``peer_ahead_ms`` ahead of ours."""
    stamp = sent_ms + out_ms + peer_ahead_ms
    offsets.record(peer, sent_ms, stamp, sent_ms + out_ms + back_ms)


def test_symmetric_delays_measure_the_offset_exactly() -> None:
    offsets = ClockOffsets()
    round_trip(offsets, "b", T0, 3, 3, peer_ahead_ms=250)
    round_trip(offsets, "c", T0, 40, 40, peer_ahead_ms=-1200)
    b, c = offsets.estimate("b"), offsets.estimate("c")
    assert b is not None and (b.offset_ms, b.error_ms, b.samples) == (250, 3, 1)
    assert c is not None and (c.offset_ms, c.error_ms) == (-1200, 40)
    assert offsets.offsets_ms() == {"b": 250, "c": -1200}


@pytest.mark.parametrize(("out_ms", "back_ms"), [(1, 99), (99, 1), (0, 100), (70, 30)])
def test_asymmetric_delays_stay_within_half_the_round_trip(out_ms: float,
                                                            back_ms: float) -> None:
    offsets = ClockOffsets()
    round_trip(offsets, "b", T0, out_ms, back_ms, peer_ahead_ms=600)
    estimate = offsets.estimate("b")
    assert estimate is not None and estimate.error_ms == 50
    assert estimate.offset_ms != 600 or out_ms == back_ms
    assert abs(estimate.offset_ms - 600) <= estimate.error_ms


def test_the_sample_with_the_smallest_round_trip_is_used() -> None:
    offsets = ClockOffsets()
    round_trip(offsets, "b", T0, 2, 300, peer_ahead_ms=100)  # a slow ack: -49 ms off
    round_trip(offsets, "b", T0 + 1000, 5, 5, peer_ahead_ms=100)  # precise
    round_trip(offsets, "b", T0 + 2000, 200, 10, peer_ahead_ms=100)  # a slow ping
    estimate = offsets.estimate("b")
    assert estimate is not None
    assert (estimate.offset_ms, estimate.error_ms, estimate.samples) == (100, 5, 3)


def test_old_samples_give_way_to_new_ones() -> None:
    """A clock that was fixed (stepped back into line) is re-measured: after
    SAMPLES_PER_PEER new round trips, none of the old precise ones decides any more."""
    offsets = ClockOffsets()
    round_trip(offsets, "b", T0, 1, 1, peer_ahead_ms=-2000)  # the most precise ever
    for i in range(SAMPLES_PER_PEER):
        round_trip(offsets, "b", T0 + 1000 * (i + 1), 4, 4, peer_ahead_ms=0)
    estimate = offsets.estimate("b")
    assert estimate is not None
    assert (estimate.offset_ms, estimate.samples) == (0, SAMPLES_PER_PEER)
    assert offsets.skew_ms() == 0


def test_own_skew_is_the_median_with_this_node_counted() -> None:
    # Three nodes, one 2 s ahead. A node with a good clock is not dragged along ...
    healthy = ClockOffsets()
    round_trip(healthy, "good", T0, 1, 1, peer_ahead_ms=3)
    round_trip(healthy, "skewed", T0, 1, 1, peer_ahead_ms=2000)
    assert healthy.skew_ms() == -3  # median of {0, 3, 2000} is 3: we are 3 ms behind
    assert skew_refusal(healthy.skew_ms(), CLOCK_SKEW_MAX_MS) is None
    # ... while the skewed node sees every peer 2 s behind it: it is 2 s ahead.
    skewed = ClockOffsets()
    round_trip(skewed, "a", T0, 1, 1, peer_ahead_ms=-2000)
    round_trip(skewed, "b", T0, 1, 1, peer_ahead_ms=-1997)
    assert skewed.skew_ms() == 1997  # median of {0, -2000, -1997}
    # Four members (an even count): the mean of the two middle values.
    four = ClockOffsets()
    for peer, ahead in (("a", 10), ("b", 30), ("c", 5000)):
        round_trip(four, peer, T0, 1, 1, peer_ahead_ms=ahead)
    assert four.skew_ms() == -20  # median of {0, 10, 30, 5000}
    # Two nodes cannot tell whose clock is wrong: each sees half the difference.
    two = ClockOffsets()
    round_trip(two, "other", T0, 1, 1, peer_ahead_ms=-1200)
    assert two.skew_ms() == 600


def test_skew_is_unknown_until_a_peer_is_sampled_and_after_all_are_forgotten() -> None:
    offsets = ClockOffsets()
    assert offsets.skew_ms() is None and offsets.offsets_ms() == {}
    assert skew_refusal(offsets.skew_ms(), CLOCK_SKEW_MAX_MS) is None
    round_trip(offsets, "a", T0, 1, 1, peer_ahead_ms=-900)
    round_trip(offsets, "b", T0, 1, 1, peer_ahead_ms=-900)
    assert offsets.skew_ms() == 900
    offsets.forget("a")
    offsets.forget("never-seen")  # no error
    assert offsets.estimate("a") is None and len(offsets) == 1
    assert offsets.skew_ms() == 450  # {0, -900}
    offsets.forget("b")
    assert offsets.skew_ms() is None and len(offsets) == 0


def test_memory_is_bounded_per_peer_and_in_peers() -> None:
    offsets = ClockOffsets(samples_per_peer=3, peers_max=4)
    for i in range(10):
        round_trip(offsets, "a", T0 + i, 1, 1, peer_ahead_ms=i)
    a = offsets.estimate("a")
    assert a is not None and a.samples == 3
    for name in ("b", "c", "d"):
        round_trip(offsets, name, T0, 1, 1, peer_ahead_ms=0)
    round_trip(offsets, "a", T0 + 20, 1, 1, peer_ahead_ms=0)  # a is sampled again: recent
    round_trip(offsets, "e", T0, 1, 1, peer_ahead_ms=0)  # a fifth peer: b goes
    assert len(offsets) == 4 and set(offsets.offsets_ms()) == {"a", "c", "d", "e"}
    assert SAMPLES_PER_PEER >= 2 and PEERS_MAX >= 100


def test_bad_input_is_refused_clearly() -> None:
    offsets = ClockOffsets()
    with pytest.raises(ValueError, match="ended before it began"):
        offsets.record("b", T0 + 10, T0, T0)
    with pytest.raises(ValueError, match="at least 1"):
        ClockOffsets(samples_per_peer=0)
    with pytest.raises(ValueError, match="at least 1"):
        ClockOffsets(peers_max=0)


def test_the_refusal_names_the_offset_the_bound_and_the_fix() -> None:
    assert skew_refusal(CLOCK_SKEW_MAX_MS, CLOCK_SKEW_MAX_MS) is None
    assert skew_refusal(-CLOCK_SKEW_MAX_MS, CLOCK_SKEW_MAX_MS) is None
    ahead = skew_refusal(2003.5, CLOCK_SKEW_MAX_MS)
    assert ahead is not None
    assert "2004 ms ahead of" in ahead and f"{CLOCK_SKEW_MAX_MS} ms" in ahead
    assert "check NTP on this host" in ahead
    behind = skew_refusal(-812, CLOCK_SKEW_MAX_MS)
    assert behind is not None and "812 ms behind" in behind


# -- membership: probes measure, acks carry the stamp -----------------------------------


def test_ack_stamp_is_optional_and_compatible_with_old_peers() -> None:
    class OldAck(msgspec.Struct, frozen=True, array_like=True, tag=12):
        seq: int

    stamped = msgspec.msgpack.encode(Ack(7, T0))
    assert msgspec.msgpack.decode(stamped, type=OldAck) == OldAck(7)  # old peer: ignored
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(OldAck(7)), type=Ack) == Ack(7)
    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.decode(msgspec.msgpack.encode([12, 7, -1]), type=Ack)


def probe_once(net: Net, prober: str, now: float, wall_ms: dict[str, int],
               out_s: float, back_s: float) -> str:
    """``prober`` pings its next target; the ping takes ``out_s``, the ack ``back_s``;
    each node's wall clock at a moment is ``wall_ms[name] + 1000 * moment``."""
    node = net.nodes[prober]
    at = max(now, node._next_probe_at)
    net.tick(prober, at)
    (sent,) = [s for s in net.take() if s.packet.probes]  # not the gossip
    (ping,) = sent.packet.probes
    assert isinstance(ping, Ping)
    target = ping.target
    arrive = at + out_s
    effects = net.nodes[target].on_packet(arrive, sent.packet,
                                          wall_ms[target] + round(1000 * arrive))
    net.apply(target, effects, arrive)
    (ack_sent,) = [s for s in net.take() if s.packet.probes]
    assert isinstance(ack_sent.packet.probes[0], Ack)
    back = arrive + back_s
    net.apply(prober, node.on_packet(back, ack_sent.packet,
                                     wall_ms[prober] + round(1000 * back)), back)
    return target


def test_probe_round_trips_estimate_each_peers_offset() -> None:
    net = Net(["a", "b", "c"])
    net.converge()
    wall = {"a": T0, "b": T0 + 2000, "c": T0 - 30}  # b is 2 s ahead, c 30 ms behind
    now = 0.0
    seen = set()
    for _ in range(4):
        seen.add(probe_once(net, "a", now, wall, out_s=0.004, back_s=0.004))
        now = net.nodes["a"]._next_probe_at
    assert seen == {"b", "c"}
    a = net.nodes["a"].clock_offsets
    assert a.offsets_ms() == {"b": pytest.approx(2000), "c": pytest.approx(-30)}
    assert a.skew_ms() == pytest.approx(0)  # median of {0, 2000, -30}
    assert net.nodes["a"].clock_skew_ms() == pytest.approx(0)  # both live peers measured
    # b measures both others 2 s behind: b is the one to refuse.
    now = 0.0
    for _ in range(4):
        probe_once(net, "b", now, wall, out_s=0.002, back_s=0.010)
        now = net.nodes["b"]._next_probe_at
    skew = net.nodes["b"].clock_offsets.skew_ms()
    # b is 2000 ms ahead of a (the median peer); legs of 2 and 10 ms: within rtt/2.
    assert skew is not None and abs(skew - 2000) <= 6
    assert skew_refusal(skew, CLOCK_SKEW_MAX_MS) is not None


def test_without_wall_clock_acks_are_unstamped_and_nothing_is_measured() -> None:
    """The simulator passes no wall clock: probes work as before, no samples."""
    net = Net(["a", "b"])
    net.converge()
    at = net.nodes["a"]._next_probe_at
    net.tick("a", at)
    net.deliver(at + 0.001)
    probe = net.nodes["a"]._probe
    assert probe is not None and probe.acked
    assert len(net.nodes["a"].clock_offsets) == 0


def test_a_member_that_dies_or_leaves_is_forgotten() -> None:
    net = Net(["a", "b", "c"])
    net.converge()
    wall = {"a": T0, "b": T0 + 700, "c": T0 + 700}
    now = 0.0
    for _ in range(4):
        probe_once(net, "a", now, wall, out_s=0.001, back_s=0.001)
        now = net.nodes["a"]._next_probe_at
    a = net.nodes["a"]
    assert set(a.clock_offsets.offsets_ms()) == {"b", "c"}
    a.on_packet(now, Packet("c", [], [Left("c", 1)]))
    assert net.status("a", "c") == MemberStatus.LEFT
    a.on_packet(now, Packet("c", [], [Dead("b", 0, "c")]))
    assert net.status("a", "b") == MemberStatus.DEAD
    assert a.clock_offsets.offsets_ms() == {} and a.clock_offsets.skew_ms() is None


# -- the runtime: the refusal, and the test-only fault hook ------------------------------


def test_a_node_refuses_strong_operations_and_leases_while_skewed_then_resumes(
        tmp_path: Path) -> None:
    skew: list[float | None] = [None]

    async def main() -> None:
        node = make_node(tmp_path, "solo", storage="memory")
        await node.start()
        try:
            kv = node.kv
            assert kv is not None and node.clock_skew_ms() is None  # no peer probed yet
            await kv.create_keyspace("s", replication=1, mode="strong")
            await kv.create_keyspace("e", replication=1)
            kv.clock_skew_ms = lambda: skew[0]
            await kv.put("s", b"k", b"v1")  # unknown skew: nothing is refused
            skew[0] = -CLOCK_SKEW_MAX_MS - 1.0
            for operation in (kv.put("s", b"k", b"v2"), kv.get("s", b"k"),
                              kv.cas("s", b"k", b"v3", expected_value=b"v1"),
                              kv.incr("s", b"n"), kv.delete("s", b"k"),
                              kv.acquire_lock("job", "me", 5000),
                              kv.renew_lock("job", "me", 1, 5000)):
                with pytest.raises(KvError) as refused:
                    await operation
                assert refused.value.code == "clock_skew"
                assert "501 ms behind its peers'" in refused.value.message
            await kv.put("e", b"k", b"eventual")  # eventual mode is not refused
            skew[0] = CLOCK_SKEW_MAX_MS  # back within bound: served again, no restart
            assert (await kv.get("s", b"k")).value == b"v1"
            assert kv.counters()["lock_grants"] == 0
        finally:
            await node.stop()

    run_test(main())


def test_the_fault_hook_shifts_the_wall_clock_and_refuses_bad_values() -> None:
    log = NodeLogger("n", "test")
    try:
        before = wall_clock.wall_ms()
        assert wall_clock.install_fault_skew({FAULT_CLOCK_SKEW_ENV: "-5000"}, log) == -5000
        assert wall_clock.fault_skew_ms() == -5000
        assert wall_clock.wall_ms() - before < -4000
        for bad in ("2s", "1e3", str(wall_clock.FAULT_CLOCK_SKEW_MS_MAX + 1)):
            with pytest.raises(StartupError, match=FAULT_CLOCK_SKEW_ENV):
                wall_clock.install_fault_skew({FAULT_CLOCK_SKEW_ENV: bad}, log)
    finally:
        assert wall_clock.install_fault_skew({}, log) == 0
    assert abs(wall_clock.wall_ms() - before) < 4000


def test_skew_is_judged_only_once_enough_peers_are_measured() -> None:
    """A good node of three that measured only the bad peer would see half its error as
    its own: it waits for both (and for SKEW_PEERS_MIN peers in a larger cluster)."""
    offsets = ClockOffsets()
    round_trip(offsets, "skewed", T0, 1, 1, peer_ahead_ms=2000)
    assert offsets.skew_ms() == -1000 and offsets.judged_skew_ms(live_peers=2) is None
    round_trip(offsets, "good", T0, 1, 1, peer_ahead_ms=0)
    assert offsets.judged_skew_ms(live_peers=2) == 0
    # A big cluster: SKEW_PEERS_MIN peers suffice; 2 bad clocks among them move nothing.
    assert offsets.judged_skew_ms(live_peers=100) is None
    round_trip(offsets, "skewed2", T0, 1, 1, peer_ahead_ms=2000)
    assert offsets.judged_skew_ms(live_peers=100) is None
    round_trip(offsets, "good2", T0, 1, 1, peer_ahead_ms=0)
    assert SKEW_PEERS_MIN == 4 and offsets.judged_skew_ms(live_peers=100) == 0
    # Two nodes: the one peer is the whole cluster.
    two = ClockOffsets()
    round_trip(two, "other", T0, 1, 1, peer_ahead_ms=-1200)
    assert two.judged_skew_ms(live_peers=1) == 600
    assert ClockOffsets().judged_skew_ms(live_peers=0) is None
