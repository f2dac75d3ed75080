"""Per-seed simulation checks, run over many seeds in worker processes.

Each function runs one seed and returns a ``SeedReport``: the failed checks (each with the
one-line command that reproduces it), a few metrics, and a digest of the whole trace.
Workers are fresh interpreters started with a chosen PYTHONHASHSEED, so comparing digests
from two pools with different hash seeds shows a run depends on its seed alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor

from leaderless.core.membership_config import MembershipConfig
from leaderless.core.messages import MemberStatus
from leaderless.sim.__main__ import membership_command, partition_command
from leaderless.sim.checks import trace, view_disagreements, view_of
from leaderless.sim.cluster import Cluster
from leaderless.sim.scenarios import JOIN_SPACING_S, run_membership, run_partition_heal

NODES = 50
SEEDS = range(200)
LOSS = 0.05
CONFIG = MembershipConfig()
DISSEMINATION_SLACK_S = 2.0
"""Room for the Dead update to reach every node: at n=50 an update needs about three gossip
rounds of 0.2 s; 2 s is ten rounds."""
DETECTION_BOUND_S = ((NODES - 1) * CONFIG.probe_interval_s + CONFIG.probe_interval_s
                     + CONFIG.suspicion_max_s(NODES) + DISSEMINATION_SLACK_S)
"""Crash -> dead at every live node. Each live node probes every member once per round of
(n-1) probe intervals, so the crashed node is probed within a round (19.6 s at n=50); the
probe fails one interval later (0.4 s); the suspicion then expires within
suspicion_max_s(n) (8.16 s, the bound with no confirmations); the Dead update spreads
within the slack (2 s): 30.16 s at n=50. Measured detection is ~3-5 s."""
CONVERGE_BOUND_S = NODES * JOIN_SPACING_S + CONFIG.push_pull_interval_s + 2.0
"""Start -> every node sees every node alive. Gossip spreads most joins within a second,
but at 5 % loss a node sometimes misses one (limited retransmits); every node's first
full-state sync, at most push_pull_interval_s (30 s) after it starts, repairs that. The
last node starts at 0.5 s; 2 s of slack: 32.5 s at n=50."""
DISSEMINATION_BOUND_S = 1.1 * CONFIG.push_pull_period_s(NODES) + 2.0
"""Update -> seen by every live node. Gossip usually takes < 1 s; a node that missed it is
repaired by its next full-state sync, at most 1.1 push-pull periods later (51.6 s at n=50),
plus 2 s of slack: 53.6 s."""
CRASH_RUN = {"window_s": 1.0, "min_duration_s": 10.0,
             "duration_s": float(math.ceil(CONVERGE_BOUND_S + 1.0 + DISSEMINATION_BOUND_S))}
"""Converge, measure 1 s, crash + update, stop once all is seen and every view agrees but
not before 10 s (so each seed watches 50 nodes under 5 % loss for at least ~8 s)."""
RECONVERGE_BOUND_S = 2 * CONFIG.reconnect_interval_s + CONFIG.suspicion_max_s(NODES) + 5.0
"""Heal -> every node sees every node alive. Every node tries a sync with a random dead
member each reconnect_interval_s (15 s), so the first sync across the healed cut starts
within one interval and, allowing for one missed pairing, surely within two; that sync
makes both ends refute and resurrect each other, and the refutations spread by gossip,
racing at most one suspicion timeout (8.16 s at n=50) started by the merge; 5 s of slack
for gossip: 43.16 s in all."""
SPLIT_BOUND_S = (NODES - 1) * CONFIG.probe_interval_s * (1 + CONFIG.awareness_max) \
    + CONFIG.suspicion_max_s(NODES)
"""Cut -> each half holds every node of the other dead. Probes across the cut fail and
their helpers on the far side send no nacks, so local health climbs and probing slows by
up to (1 + awareness_max); every node of the other half is still probed within one such
round (176.4 s at n=50) and dead a suspicion_max_s (8.16 s) later: 184.56 s. Measured:
median ~44 s, since core probes a member next when it hears it suspected (8e6bc92), so
probes keep going to members already suspected (~17 s before that change)."""
LONG_HOLD_S = 31.0
"""One seed in eight keeps the cut 31 s after the last death: longer than gossip_to_dead_s
(30 s), so only reconnect syncs can heal it."""


@dataclasses.dataclass
class SeedReport:
    seed: int
    failures: dict[str, list[str]]
    """Check name -> what failed (each line ends with the command that reproduces it)."""
    metrics: dict[str, float | None]
    digest: str

    def failed(self, check: str) -> list[str]:
        return self.failures.get(check, [])


def digest(cluster: Cluster) -> str:
    return hashlib.sha256(repr(trace(cluster)).encode()).hexdigest()


def _check_views(cluster: Cluster) -> list[str]:
    problems = view_disagreements(cluster)
    views = {view_of(cluster, nd.index) for nd in cluster.running()}
    if len(views) != 1:
        problems.append(f"{len(views)} different views among running nodes")
    return problems[:5]


def _stamp(seed: int, failures: dict[str, list[str]], cmd: str) -> dict[str, list[str]]:
    return {check: [f"seed {seed}: {line}\n  reproduce: {cmd}" for line in lines]
            for check, lines in failures.items() if lines}


def crash_seed(seed: int) -> SeedReport:
    """Join 50 nodes at 5 % loss; crash one and update another's metadata; then check
    convergence, detection, dissemination, agreement of every view, and that no live
    node was ever declared dead."""
    at_done: list[str] = []
    r, cluster = run_membership(NODES, seed, LOSS, bootstrap="join", stop_early=True,
                                on_done=lambda c: at_done.append(digest(c)), **CRASH_RUN)
    f: dict[str, list[str]] = {}
    if r.converged_s is None or r.converged_s > CONVERGE_BOUND_S:
        f["converged"] = [f"converged after {r.converged_s} s, bound {CONVERGE_BOUND_S} s"]
    if r.detection_s is None or r.detection_s > DETECTION_BOUND_S:
        f["detection"] = [f"detection {r.detection_s} s, bound {DETECTION_BOUND_S:.2f} s"]
    f["dissemination"] = []
    if r.dissemination_s is None or r.dissemination_s > DISSEMINATION_BOUND_S:
        f["dissemination"].append(f"metadata update reached every live node after "
                                  f"{r.dissemination_s} s, bound {DISSEMINATION_BOUND_S} s")
    updater = next(nd for nd in cluster.nodes if nd.name == r.updated)
    stale = [nd.name for nd in cluster.running()
             if (seen := nd.m().member(updater.name)) is None or seen.meta != updater.m().meta]
    if stale:
        f["dissemination"].append(f"{stale} hold stale metadata of {updater.name} at the end")
    if r.false_deaths:
        f["false_deaths"] = [f"{r.false_deaths} false deaths at {LOSS:.0%} loss"]
    f["views"] = _check_views(cluster)
    cmd = membership_command(NODES, seed, LOSS, CRASH_RUN["duration_s"], "join",
                             CRASH_RUN["window_s"], True, CRASH_RUN["min_duration_s"])
    metrics = {"detection_s": r.detection_s, "dissemination_s": r.dissemination_s,
               "converged_s": r.converged_s, "false_suspicions": r.false_suspicions,
               "false_deaths": r.false_deaths, "sim_s": r.duration_s}
    return SeedReport(seed, _stamp(seed, f, cmd), metrics, at_done[0])


def crash_seed_until_done(seed: int) -> SeedReport:
    """``crash_seed``'s run again, up to the moment it first saw detection, dissemination
    and agreement (that is where ``crash_seed`` takes its digest)."""
    run = dict(CRASH_RUN, min_duration_s=0.0)
    _, cluster = run_membership(NODES, seed, LOSS, bootstrap="join", stop_early=True, **run)
    return SeedReport(seed, {}, {}, digest(cluster))


def partition_seed(seed: int) -> SeedReport:
    """Cut 50 converged nodes into two halves until each holds the other dead (plus 31 s
    for one seed in eight), heal, and check every node sees every node alive again within
    RECONVERGE_BOUND_S, with identical views."""
    hold = LONG_HOLD_S if seed % 8 == 3 else 0.0
    r, cluster = run_partition_heal(NODES, seed, hold_s=hold, split_max_s=SPLIT_BOUND_S,
                                    reconverge_max_s=RECONVERGE_BOUND_S + 30.0)
    f: dict[str, list[str]] = {"split": [], "reconverged": []}
    if r.split_s is None:
        f["split"].append(f"the two sides did not hold each other dead within "
                          f"{SPLIT_BOUND_S:.2f} s")
    if r.reconverged_s is None or r.reconverged_s > RECONVERGE_BOUND_S:
        f["reconverged"].append(f"reconverged after {r.reconverged_s} s, bound "
                                f"{RECONVERGE_BOUND_S:.2f} s")
    else:
        f["reconverged"] += _check_views(cluster)
        statuses = {st for nd in cluster.running() for _, st in view_of(cluster, nd.index)}
        if statuses != {MemberStatus.ALIVE}:
            f["reconverged"].append(f"statuses after heal: {sorted(statuses)}")
    cmd = partition_command(NODES, seed, 0.0, hold, SPLIT_BOUND_S)
    metrics = {"split_s": r.split_s, "reconverged_s": r.reconverged_s, "hold_s": hold,
               "sim_s": cluster.clock.now}
    return SeedReport(seed, _stamp(seed, f, cmd), metrics, digest(cluster))


@contextlib.contextmanager
def _hash_seed(value: str) -> Iterator[None]:
    old = os.environ.get("PYTHONHASHSEED")
    os.environ["PYTHONHASHSEED"] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ["PYTHONHASHSEED"]
        else:
            os.environ["PYTHONHASHSEED"] = old


def run_seeds(check: Callable[[int], SeedReport], seeds: Iterable[int],
              hash_seed: str = "1") -> list[SeedReport]:
    """Run ``check`` for every seed in fresh worker processes (one per core)."""
    workers = max(1, len(os.sched_getaffinity(0)))
    context = multiprocessing.get_context("spawn")
    with _hash_seed(hash_seed), ProcessPoolExecutor(workers, mp_context=context) as pool:
        return list(pool.map(check, seeds, chunksize=5))
