"""The data plane under the simulator: hints, hint expiry + anti-entropy, read repair,
crashes that lose unsynced writes, and many seeds of random faults under a QUORUM
workload. Each failure names its seed; ``KvSim(config, seed)`` replays it exactly."""

from __future__ import annotations

import pytest

from leaderless.core.cells import decode_cell
from leaderless.core.coordinator import Failed, ReadDone, Result, WriteDone
from leaderless.sim.kv import KvSim, KvSimConfig
from leaderless.sim.kv_faults import run_kv_faults


def write_keys(sim: KvSim, via: str, count: int, value: bytes, consistency: str = "QUORUM",
               prefix: bytes = b"k") -> list[Result]:
    results: list[Result] = []
    for i in range(count):
        sim.put(via, prefix + str(i).encode(), value, consistency, results.append)
        sim.run_for(0.005)
    sim.run_for(2.0)
    return results


def holds_all(sim: KvSim, name: str, count: int, value: bytes, prefix: bytes = b"k") -> bool:
    node = sim.nodes[name]
    return all((c := node.local(prefix + str(i).encode())) is not None and c.value == value
               for i in range(count))


def test_a_replica_down_during_writes_gets_them_by_hint() -> None:
    sim = KvSim(KvSimConfig(nodes=3, anti_entropy_interval_s=1e6), seed=1)
    sim.crash("n03")
    sim.run_for(2.0)  # the others now see it down
    results = write_keys(sim, "n01", 200, b"v1")
    assert all(isinstance(r, WriteDone) for r in results), results[:3]
    assert not holds_all(sim, "n03", 200, b"v1")
    assert sum(n.hints.total() for n in sim.nodes.values()) == 200
    sim.restart("n03")
    sim.run_for(5.0)
    assert holds_all(sim, "n03", 200, b"v1")
    assert sum(n.hints.total() for n in sim.nodes.values()) == 0
    assert sum(n.handoff.counters.replayed for n in sim.nodes.values()) == 200


def test_hints_go_to_the_next_healthy_node_when_there_is_one() -> None:
    sim = KvSim(KvSimConfig(nodes=5, anti_entropy_interval_s=1e6), seed=2)
    sim.crash("n05")
    sim.run_for(2.0)
    results = write_keys(sim, "n01", 100, b"v")
    assert all(isinstance(r, WriteDone) for r in results)
    holders = {name for name, node in sim.nodes.items() if node.hints.pending.get("n05")}
    keys_for_n05 = [i for i in range(100) if "n05" in sim.replicas(b"k" + str(i).encode())]
    assert keys_for_n05, "the seed should give n05 some keys"
    assert holders and "n05" not in holders
    assert sum(n.hints.total() for n in sim.nodes.values()) == len(keys_for_n05)


def test_a_replica_whose_hints_expired_converges_by_anti_entropy() -> None:
    sim = KvSim(KvSimConfig(nodes=3, hint_window_s=1.0, anti_entropy_interval_s=2.0), seed=3)
    sim.crash("n03")
    sim.run_for(5.0)  # down longer than the hint window: no hints are kept for it
    results = write_keys(sim, "n01", 300, b"late")
    assert all(isinstance(r, WriteDone) for r in results)
    assert sum(n.hints.total() for n in sim.nodes.values()) == 0
    sim.restart("n03")
    sim.run_for(30.0)
    assert holds_all(sim, "n03", 300, b"late")
    received = sim.nodes["n03"].anti_entropy.counters
    assert received.rows_received + sum(
        n.anti_entropy.counters.rows_sent for n in sim.nodes.values()) >= 300


def test_a_stale_replica_is_repaired_by_a_quorum_read() -> None:
    sim = KvSim(KvSimConfig(nodes=3, hint_window_s=0.0, anti_entropy_interval_s=1e6), seed=4)
    write_keys(sim, "n01", 1, b"old")
    sim.crash("n03")
    sim.run_for(2.0)
    write_keys(sim, "n01", 1, b"new")
    sim.restart("n03")
    sim.run_for(2.0)
    assert sim.nodes["n03"].local(b"k0").value == b"old"  # type: ignore[union-attr]
    results: list[Result] = []
    sim.get("n03", b"k0", "QUORUM", results.append)  # n03 reads itself and one other
    sim.run_for(1.0)
    assert isinstance(results[0], ReadDone) and results[0].cell is not None
    assert results[0].cell.value == b"new"
    assert sim.nodes["n03"].local(b"k0").value == b"new"  # type: ignore[union-attr]
    assert sim.nodes["n03"].coordinator.counters.read_repairs >= 1


def test_too_few_replicas_is_a_specific_error_naming_the_counts() -> None:
    sim = KvSim(KvSimConfig(nodes=3), seed=5)
    sim.crash("n02")
    sim.crash("n03")
    sim.run_for(2.0)
    results = write_keys(sim, "n01", 1, b"x")
    assert isinstance(results[0], Failed) and results[0].code == "unavailable"
    assert (results[0].received, results[0].required) == (1, 2)


def test_a_replica_that_does_not_answer_times_out_with_counts() -> None:
    sim = KvSim(KvSimConfig(nodes=3, detection_s=100.0), seed=6)
    sim.crash("n02")
    sim.crash("n03")  # not yet detected: the coordinator still sends to them
    results = write_keys(sim, "n01", 1, b"x", consistency="ALL")
    assert isinstance(results[0], Failed) and results[0].code == "timeout"
    assert (results[0].received, results[0].required) == (1, 3)


def test_deletes_win_and_converge() -> None:
    sim = KvSim(KvSimConfig(nodes=3, anti_entropy_interval_s=1.0), seed=7)
    write_keys(sim, "n01", 10, b"v")
    sim.crash("n02")
    sim.run_for(2.0)
    for i in range(10):
        sim.put("n01", b"k" + str(i).encode(), b"", "QUORUM", lambda r: None, tombstone=True)
    sim.run_for(2.0)
    sim.restart("n02")
    sim.run_for(20.0)
    for node in sim.nodes.values():
        for i in range(10):
            cell = node.local(b"k" + str(i).encode())
            assert cell is not None and cell.tombstone


def test_acknowledged_replica_writes_survive_crashes() -> None:
    sim = KvSim(KvSimConfig(nodes=3, fsync_s=0.002), seed=8)
    for round_ in range(20):
        for i in range(20):
            sim.put("n01", f"k{round_}-{i}".encode(), b"v", "ONE", lambda r: None)
            sim.run_for(0.0007)
        sim.crash("n02")  # mid-stream: some writes applied but not yet synced
        sim.run_for(0.01)
        sim.restart("n02")
    node = sim.nodes["n02"]
    assert node.acked_writes
    for key, cell in node.acked_writes:
        raw = node.store.get(key)
        assert raw is not None, f"acknowledged write {key!r} lost"
        assert not cell.newer_than(decode_cell(raw)), f"acknowledged write {key!r} rolled back"


@pytest.mark.parametrize("seed", range(40))
def test_random_faults_keep_quorum_reads_and_converge(seed: int) -> None:
    report = run_kv_faults(seed)
    assert report.ok, (f"reproduce: python -m leaderless.sim kv --seed {seed}",
                       report.stale_reads[:3], report.unconverged[:3])
    assert report.writes_acked > 0 and report.reads_ok > 0


def test_a_slow_read_replica_is_replaced_by_a_speculative_retry() -> None:
    sim = KvSim(KvSimConfig(nodes=3, detection_s=100.0, read_timeout_s=2.0), seed=9)
    write_keys(sim, "n01", 20, b"v")
    # n02 stops answering but nobody has noticed: reads that ask it must not wait for the
    # timeout; after the speculative delay the coordinator asks n03 instead.
    sim.crash("n02")
    results: list[Result] = []
    for i in range(20):
        sim.get("n01", b"k" + str(i).encode(), "QUORUM", results.append)
    sim.run_for(1.0)  # well before the 2 s read timeout
    assert len(results) == 20
    assert all(isinstance(r, ReadDone) and r.cell is not None and r.cell.value == b"v"
               for r in results)
    assert sim.nodes["n01"].coordinator.counters.speculative_retries >= 1
    assert sim.nodes["n01"].coordinator.counters.timeouts == 0


def test_hints_survive_a_crash_of_the_node_that_holds_them() -> None:
    sim = KvSim(KvSimConfig(nodes=3, anti_entropy_interval_s=1e6), seed=10)
    sim.crash("n03")
    sim.run_for(2.0)
    results = write_keys(sim, "n01", 50, b"h")
    assert all(isinstance(r, WriteDone) for r in results)
    holders = [n for n in ("n01", "n02") if sim.nodes[n].hints.total()]
    assert holders
    for name in holders:  # the holders crash (losing only what was not synced) and return
        sim.crash(name)
        sim.restart(name)
    assert sum(sim.nodes[n].hints.total() for n in holders) == 50
    sim.run_for(2.0)
    sim.restart("n03")
    sim.run_for(5.0)
    assert holds_all(sim, "n03", 50, b"h")


def test_replicas_whose_disk_fails_refuse_and_the_client_hears_why() -> None:
    sim = KvSim(KvSimConfig(nodes=3), seed=11)
    sim.nodes["n02"].store.fail_writes = "disk full"
    assert isinstance(write_keys(sim, "n01", 1, b"x")[0], WriteDone)  # n01 + n03 suffice
    sim.nodes["n03"].store.fail_writes = "disk full"
    result = write_keys(sim, "n01", 1, b"y", prefix=b"other")[0]
    assert isinstance(result, Failed) and result.code == "storage"
    assert "disk full" in result.message and (result.received, result.required) == (1, 2)
