"""Scripted runs that measure the membership protocol: what the CLI, bench and tests use.

``run_membership``: start a cluster, wait until every node sees every other alive, measure
steady-state traffic over a quiet window, then at one instant crash one node and change
another's metadata, and measure how long until every live node declared the crash dead
(detection) and saw the new metadata (dissemination); keep running to ``duration_s`` and
count false suspicions and deaths (about nodes that never crashed).

``run_partition_heal``: cut a converged cluster in two halves until each side holds the
other dead, heal, and measure how long until every node sees every node alive again.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Literal

from leaderless.core.codec import encode_frame
from leaderless.core.effects import MemberEventKind
from leaderless.core.membership import Membership
from leaderless.core.membership_config import MembershipConfig
from leaderless.core.messages import MemberRecord, NodeMeta, PushPull
from leaderless.sim.checks import all_agree, false_deaths, false_suspicions
from leaderless.sim.cluster import Cluster
from leaderless.sim.network import LinkModel

Bootstrap = Literal["join", "converged"]
CHECK_EVERY_S = 0.05
"""How often (simulated) a scenario polls its stop condition: the resolution of its times."""
JOIN_SPACING_S = 0.01

UPDATED_KINDS = frozenset({MemberEventKind.UPDATED, MemberEventKind.ALIVE,
                           MemberEventKind.JOINED})
DEAD_KINDS = frozenset({MemberEventKind.DEAD})


@dataclasses.dataclass
class MembershipResult:
    nodes: int
    seed: int
    loss: float
    bootstrap: str
    duration_s: float
    converged_s: float | None
    """Simulated seconds from start until every node saw every node alive (None: never)."""
    dissemination_s: float | None
    """From the metadata change until every live node saw it (None: not by the end)."""
    detection_s: float | None
    """From the crash until every live node declared the crashed node dead."""
    false_deaths: int
    false_suspicions: int
    msgs_per_node_s: float
    bytes_per_node_s: float
    """UDP + TCP sent per node per simulated second over the quiet window."""
    window_s: float
    udp_bytes_per_node_s: float
    """The UDP part of bytes_per_node_s (probes and gossip)."""
    sync_bytes_per_node_s: float
    """Full-state sync cost in steady state, amortized: one request and one reply of the
    whole view per push-pull period (a short window sees few syncs, or none at 10,000)."""
    crashed: str
    updated: str
    agreed_at_end: bool
    events: int
    wall_s: float

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def _latest(first_seen: dict[int, float], observers: list[int], since: float) -> float | None:
    if not all(i in first_seen for i in observers):
        return None
    return max((first_seen[i] for i in observers), default=since) - since


def run_membership(
    nodes: int,
    seed: int,
    loss: float = 0.0,
    duration_s: float = 120.0,
    bootstrap: Bootstrap = "join",
    window_s: float = 10.0,
    stop_early: bool = False,
    min_duration_s: float = 0.0,
    config: MembershipConfig | None = None,
    on_done: Callable[[Cluster], None] | None = None,
    window_start_s: float = 0.0,
) -> tuple[MembershipResult, Cluster]:
    """The CLI's scenario. With ``stop_early`` the run ends once detection, dissemination
    and agreement are all reached, instead of at ``duration_s``; but not before
    ``min_duration_s``, after which it ends at the first moment all views agree.
    ``on_done`` sees the cluster at the moment the stop condition first held.

    The quiet window starts at convergence, or at ``window_start_s`` if later: every node's
    first full-state sync comes 15–30 s after it starts whatever n is (core's initial
    push-pull timer), so a window meant to show steady state should start after that."""
    assert nodes >= 3, "needs a node to crash, one to update and one to watch"
    wall_start = time.perf_counter()
    cluster = Cluster(nodes, seed, config, LinkModel(loss=loss))
    clock = cluster.clock
    if bootstrap == "join":
        cluster.bootstrap_join(JOIN_SPACING_S)
    else:
        cluster.bootstrap_converged()
    converged = clock.run_until(duration_s, lambda: _all_started(cluster) and all_agree(cluster),
                                CHECK_EVERY_S)
    converged_s = clock.now if converged else None

    clock.run_until(min(duration_s, max(clock.now, window_start_s)))
    window_start, before = clock.now, cluster.recorder.traffic.copy()
    clock.run_until(min(duration_s, clock.now + window_s))
    window = clock.now - window_start
    after = cluster.recorder.traffic
    per = nodes * window if window > 0 else math.nan
    msgs = (after.messages - before.messages) / per
    sent_bytes = (after.bytes - before.bytes) / per
    udp_bytes = (after.udp_bytes - before.udp_bytes) / per
    sync_bytes = 2 * full_state_frame_bytes(cluster.nodes[0].m()) / (
        cluster.config.push_pull_period_s(nodes))

    victim, updater = cluster.rng.sample(cluster.nodes, 2)
    t0 = clock.now
    cluster.crash(victim)
    m = updater.m()
    new_meta = NodeMeta(tags={"rev": str(seed)}, version="sim-2")
    cluster._execute(updater, m.update_meta(t0, new_meta))  # noqa: SLF001 - local command
    spread = cluster.recorder.watch(updater.name, UPDATED_KINDS, m.incarnation, t0)
    death = cluster.recorder.watch(victim.name, DEAD_KINDS, 0, t0)
    observers = [nd.index for nd in cluster.running()]
    spread.first_seen[updater.index] = t0

    def done() -> bool:
        return (death.seen_by_all(observers) and spread.seen_by_all(observers)
                and all_agree(cluster))

    if stop_early:
        clock.run_until(duration_s, done, CHECK_EVERY_S)
        if on_done is not None:
            on_done(cluster)
        if clock.now < min_duration_s:
            clock.run_until(min_duration_s)
            clock.run_until(duration_s, lambda: all_agree(cluster), CHECK_EVERY_S)
    else:
        clock.run_until(duration_s)
    result = MembershipResult(
        nodes=nodes, seed=seed, loss=loss, bootstrap=bootstrap, duration_s=clock.now,
        converged_s=converged_s,
        dissemination_s=_latest(spread.first_seen, observers, t0),
        detection_s=_latest(death.first_seen, observers, t0),
        false_deaths=false_deaths(cluster), false_suspicions=false_suspicions(cluster),
        msgs_per_node_s=msgs, bytes_per_node_s=sent_bytes, window_s=window,
        udp_bytes_per_node_s=udp_bytes, sync_bytes_per_node_s=sync_bytes,
        crashed=victim.name, updated=updater.name, agreed_at_end=all_agree(cluster),
        events=clock.events_run, wall_s=time.perf_counter() - wall_start)
    return result, cluster


def full_state_frame_bytes(m: Membership) -> int:
    """Size on the wire of one full-state sync of ``m``'s view (public API only)."""
    records = [MemberRecord(x.name, x.address, x.incarnation, x.status, x.meta)
               for x in m.members()]
    return len(encode_frame(PushPull(m.name, False, True, records, 0, [])))


def _all_started(cluster: Cluster) -> bool:
    return all(nd.membership is not None for nd in cluster.nodes)


@dataclasses.dataclass
class PartitionResult:
    nodes: int
    seed: int
    loss: float
    split_s: float | None
    """From the cut until each side held every node of the other dead."""
    healed_at: float
    reconverged_s: float | None
    """From the heal until every node saw every node alive again."""
    wall_s: float


def run_partition_heal(
    nodes: int,
    seed: int,
    loss: float = 0.0,
    hold_s: float = 0.0,
    split_max_s: float = 200.0,
    reconverge_max_s: float = 120.0,
    config: MembershipConfig | None = None,
) -> tuple[PartitionResult, Cluster]:
    """Converged cluster, cut into two random halves; once each side holds the other dead
    (or after ``split_max_s``), wait ``hold_s`` more, heal, and wait for agreement."""
    wall_start = time.perf_counter()
    cluster = Cluster(nodes, seed, config, LinkModel(loss=loss))
    clock = cluster.clock
    cluster.bootstrap_converged()
    clock.run_until(1.0)
    shuffled = list(cluster.nodes)
    cluster.rng.shuffle(shuffled)
    a, b = shuffled[: nodes // 2], shuffled[nodes // 2:]
    cut_at = clock.now
    cluster.partition([a, b])
    down = cluster.recorder.down

    def split() -> bool:
        return (all(len(down[nd.index]) >= len(b) for nd in a)
                and all(len(down[nd.index]) >= len(a) for nd in b))

    was_split = clock.run_until(cut_at + split_max_s, split, CHECK_EVERY_S)
    split_s = clock.now - cut_at if was_split else None
    clock.run_until(clock.now + hold_s)
    healed_at = clock.now
    cluster.heal()
    agreed = clock.run_until(healed_at + reconverge_max_s, lambda: all_agree(cluster),
                             CHECK_EVERY_S)
    return PartitionResult(
        nodes=nodes, seed=seed, loss=loss, split_s=split_s, healed_at=healed_at,
        reconverged_s=clock.now - healed_at if agreed else None,
        wall_s=time.perf_counter() - wall_start), cluster
