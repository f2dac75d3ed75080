"""Self-health: the pure rule (thresholds, hysteresis, reasons), its wire form in the member
metadata, the coordinator's routing around read-only replicas, and the monitor's readings
from a real machine and real stores."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

import msgspec
import pytest

from leaderless.config import HealthConfig
from leaderless.core.cells import Cell
from leaderless.core.coordinator import (
    Coordinator,
    CoordinatorConfig,
    Failed,
    Respond,
    SendReplica,
    Topology,
)
from leaderless.core.health import (
    HEALTHY,
    REASON_BYTES_MAX,
    HealthReadings,
    HealthRule,
    HealthState,
    HealthStatus,
    HealthThresholds,
    short_reason,
)
from leaderless.core.keys import token
from leaderless.core.kv_messages import ReplicaAck, ReplicaRead, ReplicaWrite
from leaderless.core.messages import Address, Alive, LoadSummary, NodeMeta
from leaderless.core.ring import Ring, RingNode
from leaderless.obs.system import SystemSampler
from leaderless.runtime.health import HealthMonitor, StoreErrors
from leaderless.runtime.logs import NodeLogger
from leaderless.security.data_keys import generate_entry, parse_data_keys
from leaderless.storage.encrypted import at_rest
from leaderless.storage.memory import MemoryStore
from leaderless.storage.rocks import RocksStore
from leaderless.storage.store import StorageError

# -- the rule ------------------------------------------------------------------------------


def rule(**thresholds: float) -> HealthRule:
    return HealthRule(HealthThresholds(**thresholds))


def test_disk_below_stop_writes_is_read_only_and_says_why() -> None:
    state = rule().assess(HealthReadings(disk_free_pct=3.14))
    assert state == HealthState(HealthStatus.READ_ONLY,
                                "disk 3.1% free (stop-writes below 5%)")
    assert str(state) == "read-only (disk 3.1% free (stop-writes below 5%))"


def test_disk_between_the_thresholds_is_degraded_and_above_them_healthy() -> None:
    assert rule().assess(HealthReadings(disk_free_pct=8.0)) == HealthState(
        HealthStatus.DEGRADED, "disk 8.0% free (warn below 10%)")
    assert rule().assess(HealthReadings(disk_free_pct=50.0)) == HEALTHY
    assert rule().assess(HealthReadings()) == HEALTHY  # nothing measured: nothing concluded


def test_a_disk_hovering_at_the_stop_writes_line_does_not_flap() -> None:
    r = rule(disk_warn_free_pct=10, disk_stop_writes_free_pct=5)
    statuses = [r.assess(HealthReadings(disk_free_pct=free)).status
                for free in (4.9, 5.1, 4.95, 6.9, 7.0, 6.0)]
    # In at 4.9; 5.1, 4.95 and 6.9 stay read-only (within the 2-point margin); out at 7.0
    # (degraded: still under warn); 6.0 does not re-enter (it is above 5).
    assert statuses == [HealthStatus.READ_ONLY] * 4 + [HealthStatus.DEGRADED] * 2


def test_warn_threshold_has_hysteresis_too() -> None:
    r = rule()
    assert r.assess(HealthReadings(disk_free_pct=9.9)).status is HealthStatus.DEGRADED
    assert r.assess(HealthReadings(disk_free_pct=11.0)).status is HealthStatus.DEGRADED
    assert r.assess(HealthReadings(disk_free_pct=12.0)) == HEALTHY


def test_loop_lag_memory_and_clock_each_degrade_with_a_reason_and_clear_with_margin() -> None:
    r = rule(loop_lag_warn_ms=200)
    assert r.assess(HealthReadings(loop_lag_ms=250)) == HealthState(
        HealthStatus.DEGRADED, "event loop 250 ms late (warn at 200 ms)")
    assert r.assess(HealthReadings(loop_lag_ms=150)).status is HealthStatus.DEGRADED
    assert r.assess(HealthReadings(loop_lag_ms=99)) == HEALTHY
    r = rule(memory_warn_pct=90)
    assert r.assess(HealthReadings(memory_used_pct=93.2)).reason == \
        "memory 93% used (warn at 90%)"
    assert r.assess(HealthReadings(memory_used_pct=88)).status is HealthStatus.DEGRADED
    assert r.assess(HealthReadings(memory_used_pct=84)) == HEALTHY
    r = rule()
    assert r.assess(HealthReadings(clock_skew_ms=812.4)).reason == \
        "clock 812 ms ahead of peers (bound 500 ms)"
    assert r.assess(HealthReadings(clock_skew_ms=-450)).reason == \
        "clock 450 ms behind peers (bound 500 ms)"
    assert r.assess(HealthReadings(clock_skew_ms=-10)) == HEALTHY


def test_storage_errors_and_corrupt_reads_degrade_and_the_worst_problem_leads() -> None:
    state = rule().assess(HealthReadings(disk_free_pct=8.0, storage_errors=2,
                                         corrupt_reads=1, loop_lag_ms=900))
    assert state.status is HealthStatus.DEGRADED
    assert state.reason == "1 corrupt reads in the store (+3 more)"
    # Read-only wins over any degradation: it changes what the node may do.
    state = rule().assess(HealthReadings(disk_free_pct=1.0, storage_errors=5))
    assert state.status is HealthStatus.READ_ONLY


def test_reasons_fit_their_wire_bound() -> None:
    long = "é" * 100
    assert len(short_reason(long).encode()) <= REASON_BYTES_MAX
    assert short_reason("short") == "short"
    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.decode(msgspec.msgpack.encode(HealthState(HealthStatus.DEGRADED,
                                                                  "x" * 65)), type=HealthState)


def test_thresholds_are_checked_together() -> None:
    with pytest.raises(ValueError, match="disk_warn_free_pct must be in"):
        HealthThresholds(disk_warn_free_pct=3, disk_stop_writes_free_pct=5)
    with pytest.raises(ValueError, match="loop_lag_warn_ms must be > 0"):
        HealthThresholds(loop_lag_warn_ms=0)


# -- on the wire ---------------------------------------------------------------------------


def test_health_rides_in_the_member_metadata_and_an_alive_update_stays_small() -> None:
    state = HealthState(HealthStatus.READ_ONLY, "r" * REASON_BYTES_MAX)
    meta = NodeMeta(zone="z" * 64, version="v" * 32, token_seed=2**63, token_count=4096,
                    client_port=65535, http_port=65535,
                    load=LoadSummary(100, 100, 100, 2**31, 1e6), health=state)
    alive = Alive("n" * 64, 2**63 - 1, Address("h" * 253, 65535), meta)
    wire = msgspec.msgpack.encode(alive)
    assert msgspec.msgpack.decode(wire, type=Alive).meta.health == state
    # Everything at its limit, no tags: well inside a 1,400-byte datagram with room for
    # the packet's other updates.
    assert len(wire) < 700
    # A member that says nothing about health (an older node) decodes as None.
    old = msgspec.msgpack.encode(NodeMeta(zone="a"))
    assert msgspec.msgpack.decode(old, type=NodeMeta).health is None
    assert HealthStatus.READ_ONLY.label == "read-only"


# -- routing around read-only replicas -----------------------------------------------------


def topology(read_only: dict[str, str], nodes: tuple[str, ...] = ("a", "b", "c", "d")
             ) -> Topology:
    ring = Ring([RingNode(name, seed, 64) for seed, name in enumerate(nodes, start=1)])
    up = frozenset(nodes)
    return Topology(ring, up, up, {}, read_only)


def replicas_of(top: Topology, partition: bytes) -> tuple[str, ...]:
    return top.ring.preference_list(token(partition), 3)


def test_a_read_only_replica_gets_no_write_its_write_becomes_a_hint_elsewhere() -> None:
    plain = topology({})
    first, second, third = replicas_of(plain, b"pk")
    outsider = next(n for n in "abcd" if n not in (first, second, third))
    me = outsider  # coordinate from the one node that is not a replica
    top = topology({second: "disk 3.0% free (stop-writes below 5%)"})
    coordinator = Coordinator(me, CoordinatorConfig(), itertools.count(1))
    effects = coordinator.write(0.0, 1, top, "ks", 3, b"pk", b"", Cell(1, me, b"v"),
                                "QUORUM")
    sends = [e for e in effects if isinstance(e, SendReplica)]
    direct = {e.to for e in sends if e.message.hint_for is None}  # type: ignore[union-attr]
    hints = [e for e in sends if isinstance(e.message, ReplicaWrite) and e.message.hint_for]
    assert direct == {first, third}
    assert len(hints) == 1 and hints[0].message.hint_for == second  # type: ignore[union-attr]
    assert hints[0].to not in (second,)  # never held by the read-only node itself
    # Two acks make the QUORUM write.
    done = []
    for e in sends:
        if e.message.hint_for is None:  # type: ignore[union-attr]
            done += coordinator.on_reply(0.1, e.to, ReplicaAck(e.message.id))
    assert any(isinstance(e, Respond) and not isinstance(e.result, Failed) for e in done)


def test_reads_still_use_a_read_only_replica() -> None:
    plain = topology({})
    first, second, third = replicas_of(plain, b"pk")
    top = topology({first: "disk 1.0% free (stop-writes below 5%)"})
    coordinator = Coordinator(first, CoordinatorConfig(), itertools.count(1))
    effects = coordinator.read(0.0, 1, top, "ks", 3, b"pk", b"", "QUORUM")
    asked = [e.to for e in effects if isinstance(e, SendReplica)]
    assert first in asked and all(isinstance(e.message, ReplicaRead) for e in effects
                                  if isinstance(e, SendReplica))


def test_a_read_only_node_refuses_to_coordinate_a_write_naming_the_reason() -> None:
    top = topology({"a": "disk 3.0% free (stop-writes below 5%)"})
    coordinator = Coordinator("a", CoordinatorConfig(), itertools.count(1))
    [effect] = coordinator.write(0.0, 7, top, "ks", 3, b"pk", b"", Cell(1, "a", b"v"), "ONE")
    assert isinstance(effect, Respond) and isinstance(effect.result, Failed)
    assert effect.result.code == "read_only"
    assert "disk 3.0% free (stop-writes below 5%)" in effect.result.message


def test_too_few_writable_replicas_is_unavailable_and_names_the_read_only_ones() -> None:
    plain = topology({})
    first, second, third = replicas_of(plain, b"pk")
    outsider = next(n for n in "abcd" if n not in (first, second, third))
    top = topology({first: "disk", second: "disk"})
    coordinator = Coordinator(outsider, CoordinatorConfig(), itertools.count(1))
    [effect] = coordinator.write(0.0, 1, top, "ks", 3, b"pk", b"", Cell(1, "x", b"v"),
                                 "QUORUM")
    assert isinstance(effect, Respond) and isinstance(effect.result, Failed)
    assert effect.result.code == "unavailable"
    assert "1 of 3 replicas are alive and writable" in effect.result.message
    assert first in effect.result.message and second in effect.result.message


def test_a_replica_refusing_as_read_only_before_we_heard_of_it_gets_a_hint() -> None:
    top = topology({})
    first, second, third = replicas_of(top, b"pk")
    outsider = next(n for n in "abcd" if n not in (first, second, third))
    coordinator = Coordinator(outsider, CoordinatorConfig(), itertools.count(1))
    effects = coordinator.write(0.0, 1, top, "ks", 3, b"pk", b"", Cell(1, "x", b"v"),
                                "QUORUM")
    to_second = next(e for e in effects if isinstance(e, SendReplica) and e.to == second)
    out = coordinator.on_reply(0.1, second, ReplicaAck(
        to_second.message.id, "read_only: this node is read-only (disk)"))
    hints = [e for e in out if isinstance(e, SendReplica)]
    assert [h.message.hint_for for h in hints] == [second]  # type: ignore[union-attr]


# -- the monitor's readings ----------------------------------------------------------------


class Published:
    def __init__(self) -> None:
        self.states: list[HealthState] = []

    def __call__(self, state: HealthState) -> None:
        self.states.append(state)


def monitor(tmp_path: Path, store_errors: StoreErrors | None = None,
            **thresholds: float) -> tuple[HealthMonitor, Published]:
    published = Published()
    config = HealthConfig(interval_s=0.01, thresholds=HealthThresholds(**thresholds))
    return HealthMonitor(config, SystemSampler(tmp_path, max_age_s=0.0), publish=published,
                         log=NodeLogger("n1", "health"), store_errors=store_errors), published


def test_the_monitor_reads_the_data_dirs_free_space_and_publishes_a_change_once(
        tmp_path: Path) -> None:
    m, published = monitor(tmp_path)
    assert m.check() == HEALTHY and published.states == []
    free = m.readings()["disk_free_pct"]
    assert free is not None and 0 <= free <= 100
    assert m.readings()["memory_used_pct"] is not None
    # Thresholds above this filesystem's free space: the same disk is now "full".
    m, published = monitor(tmp_path, disk_warn_free_pct=99.9999,
                           disk_stop_writes_free_pct=99.999)
    if free >= 99.999:
        pytest.skip(f"{tmp_path} is {free}% free: no threshold can sit above it")
    state = m.check()
    assert state.status is HealthStatus.READ_ONLY and "stop-writes below 99.999%" in state.reason
    m.check()
    assert published.states == [state]  # unchanged: not published again
    m.leave("fsync failed 3 times")
    m.check()
    assert published.states[-1] == HealthState(HealthStatus.LEAVING, "fsync failed 3 times")
    assert m.state.status is HealthStatus.LEAVING  # later readings do not undo leaving


def test_store_errors_count_failed_writes_and_corrupt_reads(tmp_path: Path) -> None:
    rocks = StoreErrors(RocksStore(tmp_path / "db"))
    rocks.write([(b"k", b"v")])
    rocks.close()
    with pytest.raises(StorageError):
        rocks.write([(b"k", b"w")])
    with pytest.raises(StorageError):
        rocks.sync()
    assert (rocks.write_errors, rocks.sync_errors, rocks.corrupt_reads) == (1, 1, 0)
    # A record that fails its authentication check under encryption at rest is corrupt.
    inner = MemoryStore()
    keys = parse_data_keys(generate_entry("k1"), source="test keys")
    store = StoreErrors(at_rest(inner, keys, where="mem"))
    store.write([(b"dkey", b"value")])
    record = bytearray(inner.get(b"dkey") or b"")
    record[-1] ^= 1
    inner.write([(b"dkey", bytes(record))])
    with pytest.raises(StorageError):
        store.get(b"dkey")
    with pytest.raises(StorageError):
        list(store.scan(b"d"))
    assert (store.read_errors, store.corrupt_reads) == (2, 2)
    m, _ = monitor(tmp_path, store_errors=store)
    state = m.check()
    assert state.status is HealthStatus.DEGRADED
    assert state.reason == "2 corrupt reads in the store"
    assert m.readings()["corrupt_reads"] == 2


def test_the_monitor_measures_how_late_its_timer_fires(tmp_path: Path) -> None:
    async def run() -> list[HealthState]:
        m, published = monitor(tmp_path, loop_lag_warn_ms=100)
        m.start()
        await asyncio.sleep(0.05)  # the monitor's timer is armed (10 ms rounds)
        time.sleep(0.3)  # a stalled loop: that timer fires about 290 ms late
        await asyncio.sleep(0.05)
        await m.stop()
        return published.states

    states = asyncio.run(run())
    assert states and states[0].status is HealthStatus.DEGRADED
    assert states[0].reason.startswith("event loop ") and "(warn at 100 ms)" in states[0].reason
    assert int(states[0].reason.split()[2]) >= 200
