"""The membership protocol over 200 seeds of a simulated 50-node cluster.

Each seed is one deterministic run (tests/sim/seed_runs.py); runs go to worker processes,
one per core. A failure names the seed and the one-line command that reproduces it. Bounds
are on simulated time (deterministic properties of a seed), never on wall-clock time.
"""

from __future__ import annotations

import pytest

from tests.sim import seed_runs
from tests.sim.seed_runs import (
    CONVERGE_BOUND_S,
    DETECTION_BOUND_S,
    DISSEMINATION_BOUND_S,
    LOSS,
    NODES,
    RECONVERGE_BOUND_S,
    SEEDS,
    SPLIT_BOUND_S,
    SeedReport,
    crash_seed,
    partition_seed,
    run_seeds,
)


@pytest.fixture(scope="module")
def crash_runs() -> list[SeedReport]:
    return run_seeds(crash_seed, SEEDS, hash_seed="1")


@pytest.fixture(scope="module")
def partition_runs() -> list[SeedReport]:
    return run_seeds(partition_seed, SEEDS, hash_seed="1")


def _failures(reports: list[SeedReport], check: str) -> str:
    lines = [line for r in reports for line in r.failed(check)]
    return f"{len(lines)} of {len(reports)} seeds failed:\n" + "\n".join(lines[:20])


def test_bounds_are_the_ones_stated() -> None:
    """The docstrings below quote these numbers (default config, n=50)."""
    assert len(SEEDS) >= 200 and NODES == 50 and LOSS == 0.05
    assert CONVERGE_BOUND_S == pytest.approx(32.5)
    assert DETECTION_BOUND_S == pytest.approx(30.16, abs=0.01)
    assert DISSEMINATION_BOUND_S == pytest.approx(53.5625)
    assert RECONVERGE_BOUND_S == pytest.approx(43.16, abs=0.01)
    assert SPLIT_BOUND_S == pytest.approx(184.56, abs=0.01)


def test_joined_nodes_converge_to_one_view(crash_runs: list[SeedReport]) -> None:
    """50 nodes joining at 5 % loss all see all 50 alive within 32.5 s
    (join window + one full-state sync interval + 2 s); and at the end of each run every
    live node holds the same view: the same members with the same status, the crashed one
    dead."""
    assert not any(r.failed("converged") for r in crash_runs), \
        _failures(crash_runs, "converged")
    assert not any(r.failed("views") for r in crash_runs), _failures(crash_runs, "views")


def test_crash_is_detected_by_every_live_node_within_bound(
        crash_runs: list[SeedReport]) -> None:
    """A crashed node is dead at every live node within 30.16 s at n=50:
    (n-1) probe intervals (a full probe round) + one probe interval + suspicion_max_s(n)
    + 2 s of dissemination slack; see seed_runs.DETECTION_BOUND_S."""
    assert not any(r.failed("detection") for r in crash_runs), \
        _failures(crash_runs, "detection")


def test_update_reaches_every_live_node(crash_runs: list[SeedReport]) -> None:
    """A metadata change reaches every live node within 53.6 s
    (gossip, or failing that the next full-state sync) and every node holds it at the end."""
    assert not any(r.failed("dissemination") for r in crash_runs), \
        _failures(crash_runs, "dissemination")


def test_no_false_deaths_at_5_percent_loss(crash_runs: list[SeedReport]) -> None:
    """At 5 % packet loss no node that never crashed is declared dead by anyone, over at
    least 20 simulated seconds per seed (suspicions are allowed; they must be refuted)."""
    assert not any(r.failed("false_deaths") for r in crash_runs), \
        _failures(crash_runs, "false_deaths")


def test_healed_partition_reconverges(partition_runs: list[SeedReport]) -> None:
    """Two halves cut until each holds the other dead (within 184.56 s, see
    seed_runs.SPLIT_BOUND_S; plus 31 s, past gossip_to_dead_s,
    for one seed in eight), then healed: every node sees every node alive again within
    43.16 s (two reconnect intervals + suspicion_max_s(n) + 5 s)."""
    assert not any(r.failed("split") for r in partition_runs), \
        _failures(partition_runs, "split")
    assert not any(r.failed("reconverged") for r in partition_runs), \
        _failures(partition_runs, "reconverged")


def test_same_seed_same_trace(crash_runs: list[SeedReport]) -> None:
    """Every seed, run again in other processes with another PYTHONHASHSEED, produces the
    identical trace (up to the moment detection, dissemination and agreement were all
    reached): every member and user event with its time, every datagram's bytes and send
    time, traffic totals and the number of events run."""
    again = run_seeds(seed_runs.crash_seed_until_done, SEEDS, hash_seed="2")
    differ = [a.seed for a, b in zip(crash_runs, again, strict=True) if a.digest != b.digest]
    assert not differ, f"seeds whose trace differs between two runs: {differ[:20]}"
