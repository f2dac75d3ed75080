"""The simulator's own machinery: clock, network, pause/resume, crash/restart, shared views,
the CLI. Small clusters, a few seeds; bounds are on simulated time."""

from __future__ import annotations

import json
import random

import pytest
from click.testing import CliRunner

from leaderless.core.effects import MemberEventKind
from leaderless.core.membership import Member
from leaderless.core.messages import Address, MemberStatus, NodeMeta
from leaderless.sim.__main__ import main
from leaderless.sim.checks import all_agree, trace, view_disagreements, view_of
from leaderless.sim.clock import SimClock
from leaderless.sim.cluster import Cluster
from leaderless.sim.network import LinkModel, Network
from leaderless.sim.node import NodeState
from leaderless.sim.views import FrozenMember, MemberOverlay, SharedView


def test_clock_runs_events_in_time_then_scheduling_order() -> None:
    clock = SimClock()
    seen: list[object] = []
    clock.at(2.0, lambda a, b: seen.append(a), "late")
    clock.at(1.0, lambda a, b: seen.append(a), "first")
    clock.at(1.0, lambda a, b: seen.append(a), "second")
    clock.at(1.0, lambda a, b: clock.after(0.5, lambda x, y: seen.append(x), "nested"))
    clock.run_until(1.9)
    assert seen == ["first", "second", "nested"] and clock.now == 1.9
    clock.run_until(3.0)
    assert seen[-1] == "late" and clock.now == 3.0


def test_clock_stops_at_the_first_checkpoint_where_the_condition_holds() -> None:
    clock = SimClock()
    fired: list[float] = []
    for i in range(10):
        clock.at(i * 0.3, lambda a, b: fired.append(clock.now))
    assert clock.run_until(100.0, lambda: len(fired) >= 4, check_every_s=0.25)
    assert clock.now == pytest.approx(1.0) and len(fired) == 4


def test_partition_cuts_both_ways_and_heal_restores() -> None:
    net = Network(4, random.Random(1))
    assert net.datagram_delays(0, 3)
    net.partition([[0, 1], [2, 3]])
    assert net.datagram_delays(0, 3) == () and net.datagram_delays(3, 0) == ()
    assert net.datagram_delays(0, 1) and net.datagram_delays(2, 3)
    net.heal()
    assert net.datagram_delays(0, 3) and net.connected(1, 2)


def test_loss_duplication_and_latency_follow_the_link_model() -> None:
    net = Network(2, random.Random(7), LinkModel(loss=0.1, duplicate=0.05))
    draws = [net.datagram_delays(0, 1) for _ in range(20_000)]
    lost = sum(1 for d in draws if not d) / len(draws)
    doubled = sum(1 for d in draws if len(d) == 2) / len(draws)
    assert 0.09 < lost < 0.11 and 0.04 < doubled < 0.06
    assert all(0.0002 <= x <= 0.001 for d in draws for x in d)
    tail = LinkModel(lognormal_sigma=1.0)
    rng = random.Random(3)
    assert all(0.0002 <= tail.latency(rng) <= 0.1 for _ in range(1000))


def test_paused_node_is_declared_dead_then_refutes_when_resumed() -> None:
    """A node frozen (SIGSTOP) for 20 s is dead at every other node (20 s > a probe round
    of 9 intervals + suspicion_max_s(10) = 8.4 s); on resume it first reads the datagrams
    that queued up (accusations among them), refutes, and every view agrees again within
    30 s (the accusers hear of the refutation by gossip or at worst the 15 s reconnect)."""
    cluster = Cluster(10, seed=11)
    cluster.bootstrap_converged()
    cluster.run_for(2.0)
    frozen = cluster.nodes[4]
    cluster.pause(frozen)
    paused_at = cluster.clock.now
    cluster.run_for(20.0)
    dead_at = {i for t, i, kind, name, _ in cluster.recorder.member_events
               if kind is MemberEventKind.DEAD and name == frozen.name}
    assert dead_at == {nd.index for nd in cluster.nodes if nd is not frozen}
    assert not [e for e in cluster.recorder.member_events
                if e[1] == frozen.index and e[0] >= paused_at], "a paused node did things"
    assert frozen.inbox, "datagrams to a paused node queue up"
    before = frozen.m().incarnation
    cluster.resume(frozen)
    assert cluster.clock.run_until(cluster.clock.now + 30.0, lambda: all_agree(cluster), 0.05)
    assert view_disagreements(cluster) == []
    assert frozen.m().incarnation > before
    assert frozen.saved_incarnation == frozen.m().incarnation


def test_crashed_node_restarts_above_its_saved_incarnation_and_rejoins() -> None:
    cluster = Cluster(12, seed=5)
    cluster.bootstrap_converged()
    cluster.run_for(1.0)
    node = cluster.nodes[3]
    cluster.crash(node)
    assert node.membership is None and node.state is NodeState.CRASHED
    assert cluster.clock.run_until(60.0, lambda: all_agree(cluster), 0.05)
    saved = node.saved_incarnation
    cluster.restart(node)
    assert node.m().incarnation == saved + 1
    assert cluster.clock.run_until(cluster.clock.now + 30.0, lambda: all_agree(cluster), 0.05)
    for other in cluster.running():
        seen = other.m().member(node.name)
        assert seen is not None and seen.status is MemberStatus.ALIVE
        assert seen.incarnation >= saved + 1


def test_push_pull_to_an_unreachable_node_fails_after_the_connect_timeout() -> None:
    cluster = Cluster(3, seed=2)
    cluster.bootstrap_converged()
    a, b, _ = cluster.nodes
    cluster.crash(b)
    m = a.m()
    cluster._execute(a, m.join(cluster.clock.now, [b.address]))  # noqa: SLF001
    cluster.run_for(0.99)
    assert m.counters.push_pulls_failed == 0
    cluster.run_for(0.02)
    assert m.counters.push_pulls_failed == 1
    assert cluster.recorder.traffic.tcp_frames == 0


def _scripted_run(shared: bool) -> Cluster:
    cluster = Cluster(40, seed=9, link=LinkModel(loss=0.02))
    cluster.bootstrap_converged(shared=shared)
    cluster.run_for(2.0)
    cluster.crash(cluster.nodes[7])
    node = cluster.nodes[12]
    cluster._execute(node, node.m().update_meta(  # noqa: SLF001
        cluster.clock.now, NodeMeta(zone="b")))
    cluster.run_for(12.0)
    cluster.partition([cluster.nodes[:20], cluster.nodes[20:]])
    cluster.run_for(15.0)
    cluster.heal()
    cluster.restart(cluster.nodes[7])
    cluster.run_for(40.0)
    return cluster


def test_shared_views_behave_exactly_like_plain_views() -> None:
    """The copy-on-access overlays used for 10,000 nodes change nothing observable: the
    same scripted run (crash, update, partition, heal, restart) gives the identical trace
    and identical final views with and without sharing."""
    plain, shared = _scripted_run(shared=False), _scripted_run(shared=True)
    assert trace(plain) == trace(shared)
    for nd in plain.running():
        assert view_of(plain, nd.index) == view_of(shared, nd.index)


def test_member_overlay_is_a_dict_with_copy_on_access() -> None:
    def member(name: str, inc: int = 0) -> Member:
        return Member(name, Address("10.0.0.1", 1), NodeMeta(), inc, MemberStatus.ALIVE, 0.0)

    names = [f"m{i}" for i in range(30)]
    view = SharedView([member(n) for n in names])
    overlay = MemberOverlay(view.members, view.index)
    ref = {n: member(n) for n in names}
    rng = random.Random(4)
    for step in range(3000):
        name = f"m{rng.randrange(40)}"
        op = rng.randrange(4)
        if op == 0:
            got, want = overlay.get(name), ref.get(name)
            assert (got is None) == (want is None)
            if got is not None:
                assert not isinstance(got, FrozenMember)
                got.incarnation = want.incarnation = step  # a caller may mutate
        elif op == 1:
            overlay[name] = ref[name] = member(name, step)
        elif op == 2 and name in ref:
            del overlay[name]
            del ref[name]
        assert (name in overlay) == (name in ref) and len(overlay) == len(ref)
        assert [k for k, _ in overlay.items()] == list(ref)
        assert [m.incarnation for m in overlay.values()] == [m.incarnation
                                                             for m in ref.values()]
    with pytest.raises(AttributeError):
        view.members["m0"].status = MemberStatus.DEAD


def test_cli_prints_one_json_object_with_the_measurements() -> None:
    result = CliRunner().invoke(main, ["membership", "--nodes", "20", "--seed", "3",
                                       "--duration", "15", "--window", "2", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    for key in ("dissemination_s", "detection_s", "false_deaths", "false_suspicions",
                "msgs_per_node_s", "bytes_per_node_s", "converged_s", "nodes", "seed", "loss"):
        assert key in out
    assert out["nodes"] == 20 and out["seed"] == 3 and out["detection_s"] is not None


def test_user_event_is_delivered_once_by_every_node_even_under_loss() -> None:
    """A user event broadcast at 10 % loss is delivered exactly once at each of 30 nodes
    within 60 s (gossip, repaired by full-state syncs, which carry recent events)."""
    cluster = Cluster(30, seed=21, link=LinkModel(loss=0.1))
    cluster.bootstrap_converged()
    cluster.run_for(1.0)
    origin = cluster.nodes[5]
    cluster._execute(origin, origin.m().broadcast_event(  # noqa: SLF001
        cluster.clock.now, "deploy", b"v2"))
    rows = cluster.recorder.user_events

    def everyone() -> bool:
        return len({row[1] for row in rows if row[5] == "deploy"}) == 30

    assert cluster.clock.run_until(60.0, everyone, 0.05)
    cluster.run_for(30.0)
    deliveries = [row[1] for row in rows if row[5] == "deploy"]
    assert sorted(deliveries) == list(range(30)), "each node delivers it exactly once"
