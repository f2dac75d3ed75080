"""The dynamic snitch (core.snitch), the coordinator's reads and the client's choice of
coordinator through it, and the hot-partition sketch (core.hot_partitions)."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections import Counter

import pytest

from leaderless.api.kv_messages import RingMember
from leaderless.client.async_client import AsyncClient
from leaderless.client.sync_client import Client
from leaderless.core.coordinator import (
    Coordinator,
    CoordinatorConfig,
    ReadDone,
    Respond,
    SendReplica,
    Topology,
)
from leaderless.core.hot_partitions import (
    HotPartitions,
    HotPartitionsConfig,
    SpaceSaving,
    partition_label,
)
from leaderless.core.keys import token
from leaderless.core.kv_messages import ReplicaReadReply
from leaderless.core.ring import Ring, RingNode
from leaderless.core.snitch import Snitch, SnitchConfig


def measured(snitch: Snitch, name: str, latency_s: float, now: float, times: int = 20) -> None:
    """``times`` requests to ``name``, each answered after ``latency_s``."""
    for _ in range(times):
        snitch.on_send(name, now)
        snitch.on_reply(name, now + latency_s, latency_s)


# -- ordering ------------------------------------------------------------------------------


def test_a_fast_replica_is_preferred_over_a_slow_one() -> None:
    snitch = Snitch("me")
    measured(snitch, "a", 0.050, 0.0)
    measured(snitch, "b", 0.002, 0.0)
    assert snitch.order(1.0, ["a", "b"]) == ["b", "a"]
    assert snitch.score("b", 1.0) < snitch.score("a", 1.0)


def test_this_node_comes_first_when_it_is_a_replica_however_slow() -> None:
    snitch = Snitch("me")
    measured(snitch, "me", 0.5, 0.0)
    measured(snitch, "a", 0.001, 0.0)
    assert snitch.order(1.0, ["a", "me"]) == ["me", "a"]


def test_near_ties_keep_the_given_ring_order() -> None:
    """Hysteresis: 20 % worse is under the badness threshold, so ring order stands; a
    clear difference reorders."""
    snitch = Snitch("me", SnitchConfig(badness_threshold=0.5))
    measured(snitch, "a", 0.0012, 0.0)
    measured(snitch, "b", 0.0010, 0.0)
    assert snitch.order(1.0, ["a", "b"]) == ["a", "b"]
    assert snitch.order(1.0, ["b", "a"]) == ["b", "a"]
    measured(snitch, "a", 0.010, 1.0)
    assert snitch.order(2.0, ["a", "b"]) == ["b", "a"]


def test_unmeasured_peers_tie_and_keep_ring_order() -> None:
    snitch = Snitch(None)
    assert snitch.order(0.0, ["c", "a", "b"]) == ["c", "a", "b"]


def test_outstanding_requests_raise_the_score_and_spread_the_load() -> None:
    snitch = Snitch("me")
    measured(snitch, "a", 0.001, 0.0)
    measured(snitch, "b", 0.001, 0.0)
    for _ in range(3):
        snitch.on_send("a", 1.0)
    assert snitch.outstanding("a") == 3
    assert snitch.score("a", 1.0) == pytest.approx(4 * snitch.score("b", 1.0))
    assert snitch.order(1.0, ["a", "b"]) == ["b", "a"]
    snitch.on_reply("a", 1.001)
    snitch.on_reply("a", 1.001)
    snitch.on_timeout("a", 3.0, 2.0)
    assert snitch.outstanding("a") == 0
    assert snitch.view(3.0, ["a"])[0].timeouts == 1


def test_a_silent_peer_gets_worse_while_requests_wait() -> None:
    snitch = Snitch("me")
    measured(snitch, "a", 0.001, 0.0)
    measured(snitch, "b", 0.001, 0.0)
    snitch.on_send("a", 1.0)
    snitch.on_send("b", 1.0)
    snitch.on_reply("b", 1.001, 0.001)
    snitch.on_send("b", 1.095)
    # 100 ms later "a" has not answered; "b" answered and has a fresh request out.
    assert snitch.latency_s("a", 1.1) >= 0.099
    assert snitch.order(1.1, ["a", "b"]) == ["b", "a"]


def test_a_timeout_counts_as_a_slow_sample() -> None:
    snitch = Snitch("me")
    measured(snitch, "a", 0.001, 0.0)
    measured(snitch, "b", 0.001, 0.0)
    snitch.on_send("a", 1.0)
    snitch.on_timeout("a", 3.0, 2.0)
    assert snitch.latency_s("a", 3.0) > 0.3
    assert snitch.order(3.0, ["a", "b"]) == ["b", "a"]


def test_suspect_replicas_go_last() -> None:
    snitch = Snitch("me")
    measured(snitch, "a", 0.001, 0.0)
    measured(snitch, "b", 0.050, 0.0)
    assert snitch.order(1.0, ["a", "b", "me"], alive={"b", "me"}) == ["me", "b", "a"]


# -- decay ---------------------------------------------------------------------------------


def test_an_idle_slow_peer_decays_toward_the_mean_and_is_retried() -> None:
    config = SnitchConfig(idle_after_s=1.0, idle_half_life_s=2.0)
    snitch = Snitch("me", config)
    measured(snitch, "fast", 0.001, 0.0)
    measured(snitch, "slow", 0.100, 0.0)
    assert snitch.order(0.5, ["slow", "fast"]) == ["fast", "slow"]
    # Only "fast" keeps answering; "slow" is not asked, so it has no new samples.
    for t in range(1, 40):
        measured(snitch, "fast", 0.001, float(t), times=1)
    later = 40.0
    assert snitch.latency_s("slow", later) == pytest.approx(0.001, abs=0.001)
    assert snitch.latency_s("slow", 1.0) == pytest.approx(0.100, rel=0.01)
    # Near the others' latency again, and within the threshold: ring order gives it another chance.
    relaxed = Snitch("me", SnitchConfig(idle_after_s=1.0, idle_half_life_s=2.0,
                                        badness_threshold=30.0))
    measured(relaxed, "fast", 0.001, 0.0)
    measured(relaxed, "slow", 0.100, 0.0)
    assert relaxed.order(60.0, ["slow", "fast"]) == ["slow", "fast"]


# -- zones ---------------------------------------------------------------------------------


def test_the_local_zone_is_preferred_even_when_a_remote_replica_is_faster() -> None:
    snitch = Snitch("me")
    snitch.set_peers({"me": "z1", "a": "z2", "b": "z1", "c": "z2"})
    measured(snitch, "a", 0.001, 0.0)
    measured(snitch, "b", 0.010, 0.0)
    measured(snitch, "c", 0.002, 0.0)
    assert snitch.zone == "z1"
    assert snitch.order(1.0, ["a", "b", "c"]) == ["b", "a", "c"]


def test_a_client_zone_is_given_and_no_zone_means_no_preference() -> None:
    client = Snitch(None, zone="z2")
    client.set_peers({"a": "z1", "b": "z2"})
    assert client.order(0.0, ["a", "b"]) == ["b", "a"]
    plain = Snitch(None)
    plain.set_peers({"a": "z1", "b": "z2"})
    assert plain.order(0.0, ["a", "b"]) == ["a", "b"]


# -- memory --------------------------------------------------------------------------------


def test_peers_that_left_the_ring_are_forgotten_and_the_mean_follows() -> None:
    snitch = Snitch("me")
    measured(snitch, "a", 0.001, 0.0)
    measured(snitch, "gone", 1.0, 0.0)
    assert len(snitch) == 2
    snitch.set_peers({"me": "", "a": ""})
    assert len(snitch) == 1
    assert snitch.mean_latency_s() == pytest.approx(0.001)


def test_the_number_of_peers_tracked_is_bounded() -> None:
    snitch = Snitch("me", SnitchConfig(peers_max=4))
    for i in range(10):
        snitch.on_send(f"n{i}", 0.0)
    assert len(snitch) == 4
    snitch.on_reply("n9", 1.0, 0.5)  # untracked: ignored, not an error
    assert snitch.score("n9", 1.0) > 0


# -- the hot-partition sketch ----------------------------------------------------------------


def test_space_saving_finds_the_heavy_hitters_with_bounded_counters() -> None:
    rng = random.Random(7)
    sketch = SpaceSaving(16)
    truth: Counter[bytes] = Counter()
    heavy = [b"hot-1", b"hot-2", b"hot-3"]
    for _ in range(20_000):
        key = rng.choice(heavy) if rng.random() < 0.3 else f"k{rng.randrange(5000)}".encode()
        truth[key] += 1
        sketch.add(key, 1.0, write=False)
    assert len(sketch.counters) == 16
    top = [k for k, _ in sketch.top(3)]
    assert set(top) == set(heavy)
    for key, counter in sketch.counters.items():
        # Space-saving's guarantees: count >= true >= count - error.
        assert counter.count >= truth[key] >= counter.count - counter.error
    assert sketch.total == 20_000


def test_hot_partition_rates_follow_a_steady_load_and_decay_when_it_stops() -> None:
    hot = HotPartitions(HotPartitionsConfig(capacity=8, half_life_s=10.0))
    t = 0.0
    for i in range(3000):  # 100 requests/s for 30 s: 50/s to one key, 50/s spread
        t = i / 100
        key = b"user:42" if i % 2 == 0 else f"other-{i}".encode()
        hot.record(t, "ks", key, write=i % 4 == 0)
    [first] = hot.top(t, 1, "ks")
    assert first.partition == b"user:42"
    assert first.requests_per_s == pytest.approx(50, rel=0.1)
    assert first.writes_per_s == pytest.approx(25, rel=0.15)
    assert first.reads_per_s == pytest.approx(25, rel=0.15)
    assert first.share == pytest.approx(0.5, rel=0.1)
    assert hot.keyspace_rate(t, "ks") == pytest.approx(100, rel=0.05)
    # No requests for three half-lives: the rate falls to about an eighth (a bit less:
    # the window it is averaged over is now full, 63/64 against 7/8 before).
    [cooled] = hot.top(t + 30, 1, "ks")
    assert cooled.requests_per_s == pytest.approx(first.requests_per_s / 8 * (7 / 8) / (63 / 64),
                                                  rel=0.02)


def test_hot_partitions_rescale_over_long_runs_without_losing_rates() -> None:
    hot = HotPartitions(HotPartitionsConfig(capacity=4, half_life_s=1.0))
    t = 0.0
    for i in range(20_000):  # 200 s at 100/s: past the 64 half-lives of a rescale
        t = i / 100
        hot.record(t, "ks", b"k", write=False)
    [only] = hot.top(t, 5)
    assert only.requests_per_s == pytest.approx(100, rel=0.05)


def test_hot_partitions_are_per_keyspace_and_bounded() -> None:
    hot = HotPartitions(HotPartitionsConfig(capacity=2, keyspaces_max=2))
    for ks in ("a", "b", "c"):
        for key in (b"1", b"2", b"3"):
            hot.record(1.0, ks, key, write=True)
    assert hot.keyspaces() == ["a", "b"]
    assert hot.untracked == 3
    assert {h.keyspace for h in hot.top(2.0, 10)} == {"a", "b"}
    assert len(hot.top(2.0, 10, "a")) == 2


def test_partition_labels_are_printable_and_short() -> None:
    assert partition_label(b"user:42") == "user:42"
    assert partition_label(b"\x00\xff") == "0x00ff"
    long = partition_label(b"x" * 500)
    assert len(long) == 64 and long.endswith("...")
    assert partition_label("caf\u00e9".encode()) == "0x" + "caf\u00e9".encode().hex()


# -- the coordinator reads through the snitch ------------------------------------------------


def _top(zones: dict[str, str] | None = None) -> Topology:
    names = ("a", "b", "c", "d")
    ring = Ring([RingNode(n, seed, 64, (zones or {}).get(n, ""))
                 for seed, n in enumerate(names, start=1)])
    return Topology(ring, frozenset(names), frozenset(names))


def _read(coordinator: Coordinator, now: float, op_id: int, top: Topology,
          consistency: str) -> list[SendReplica]:
    effects = coordinator.read(now, op_id, top, "ks", 3, b"pk", b"", consistency)
    return [e for e in effects if isinstance(e, SendReplica)]


def _answer(coordinator: Coordinator, now: float, send: SendReplica) -> list[object]:
    return list(coordinator.on_reply(now, send.to, ReplicaReadReply(send.message.id, None)))


def test_the_coordinator_reads_from_the_fast_replica_not_the_slow_ring_first_one() -> None:
    top = _top()
    first, second, third = top.ring.preference_list(token(b"pk"), 3)
    outsider = next(n for n in "abcd" if n not in (first, second, third))
    coordinator = Coordinator(outsider, CoordinatorConfig(), itertools.count(1))
    # Before anything is measured, ring order decides (as before the snitch).
    [send] = _read(coordinator, 0.0, 1, top, "ONE")
    assert send.to == first
    _answer(coordinator, 0.001, send)
    # Warm up with ALL reads: the ring-first replica answers in 50 ms, the others in 1 ms.
    now = 1.0
    for op_id in range(2, 12):
        for send in _read(coordinator, now, op_id, top, "ALL"):
            _answer(coordinator, now + (0.050 if send.to == first else 0.001), send)
        now += 0.1
    [send] = _read(coordinator, now, 100, top, "ONE")
    assert send.to in (second, third)
    assert coordinator.snitch.outstanding(send.to) == 1
    done = _answer(coordinator, now + 0.001, send)
    assert any(isinstance(e, Respond) and isinstance(e.result, ReadDone) for e in done)
    assert coordinator.snitch.outstanding(send.to) == 0


def test_a_speculative_read_goes_to_the_next_best_replica() -> None:
    top = _top()
    first, second, third = top.ring.preference_list(token(b"pk"), 3)
    coordinator = Coordinator(first, CoordinatorConfig(), itertools.count(1))
    now = 1.0
    for op_id in range(1, 11):  # the second in ring order is slow, the third fast
        for send in _read(coordinator, now, op_id, top, "ALL"):
            latency = {first: 0.0001, second: 0.040, third: 0.002}[send.to]
            _answer(coordinator, now + latency, send)
        now += 0.1
    [send] = _read(coordinator, now, 50, top, "ONE")
    assert send.to == first  # this node: no network hop
    # It does not answer; past the speculative delay the next best is asked: the fast one.
    later = coordinator.next_deadline()
    assert later < now + 1.0
    retry = [e for e in coordinator.on_tick(later) if isinstance(e, SendReplica)]
    assert [e.to for e in retry] == [third]
    assert coordinator.counters.speculative_retries == 1


def test_the_coordinator_prefers_its_own_zone() -> None:
    zones = {"a": "z1", "b": "z2", "c": "z1", "d": "z2"}
    top = _top(zones)
    replicas = top.ring.preference_list(token(b"pk"), 3)
    outsider = next(n for n in "abcd" if n not in replicas)
    local = [r for r in replicas if zones[r] == zones[outsider]]
    assert local  # the ring spans both zones
    remote_fast = [r for r in replicas if r not in local]
    coordinator = Coordinator(outsider, CoordinatorConfig(), itertools.count(1))
    now = 1.0
    for op_id in range(1, 11):  # the other zone answers 10x faster: still not preferred
        for send in _read(coordinator, now, op_id, top, "ALL"):
            _answer(coordinator, now + (0.010 if send.to in local else 0.001), send)
        now += 0.1
    [send] = _read(coordinator, now, 20, top, "ONE")
    assert send.to in local and remote_fast


def test_a_timed_out_replica_request_is_counted_against_it_and_forgotten() -> None:
    top = _top()
    first, second, third = top.ring.preference_list(token(b"pk"), 3)
    outsider = next(n for n in "abcd" if n not in (first, second, third))
    coordinator = Coordinator(outsider, CoordinatorConfig(), itertools.count(1))
    sends = _read(coordinator, 0.0, 1, top, "ALL")
    for send in sends:
        if send.to != first:
            _answer(coordinator, 0.001, send)
    coordinator.on_tick(coordinator.config.read_timeout_s + 0.01)
    assert coordinator.snitch.outstanding(first) == 0
    assert coordinator.snitch.view(3.0, [first])[0].timeouts == 1
    assert not any(coordinator.owns(s.message.id) for s in sends)
    [send] = _read(coordinator, 3.0, 2, top, "ONE")
    assert send.to != first


# -- the client picks its coordinator through its own snitch ---------------------------------


def _client_with_ring(zone: str | None = None) -> AsyncClient:
    client = AsyncClient(["127.0.0.1:7001"], zone=zone, ring_refresh_s=0,
                         rng=random.Random(3))
    client._set_ring([RingMember(n, f"127.0.0.1:700{i}", i, 16, z, "alive")
                      for i, (n, z) in enumerate([("a", "z1"), ("b", "z2"), ("c", "z1")],
                                                 start=1)])
    return client


def test_the_client_sends_to_the_fastest_replica_and_spreads_near_ties() -> None:
    async def main() -> None:
        client = _client_with_ring()
        replicas = ["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"]
        # Nothing measured: the choice is spread over the replicas (shuffled near-ties).
        firsts = {client._candidates(replicas, None)[0] for _ in range(30)}
        assert len(firsts) > 1
        now = asyncio.get_running_loop().time()
        for address, latency in zip(replicas, (0.040, 0.002, 0.030), strict=True):
            measured(client.snitch, address, latency, now)
        assert {client._candidates(replicas, None)[0] for _ in range(30)} == {replicas[1]}
        # Requests piling up on the fast one move the next ones elsewhere.
        for _ in range(30):
            client.snitch.on_send(replicas[1], now)
        assert client._candidates(replicas, None)[0] != replicas[1]
        # Strong keyspaces keep ring order whatever the scores.
        assert client._candidates(replicas, None, ordered=True)[:3] == replicas

    asyncio.run(main())


def test_the_client_prefers_replicas_of_its_zone() -> None:
    async def main() -> None:
        client = _client_with_ring(zone="z2")
        replicas = ["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"]
        assert {client._candidates(replicas, None)[0] for _ in range(20)} == {replicas[1]}

    asyncio.run(main())


def test_the_sync_client_takes_a_zone() -> None:
    client = Client(["127.0.0.1:7001"], zone="z9", connect=False)
    try:
        assert client._client.zone == "z9" and client._client.snitch.zone == "z9"
    finally:
        client.close()
