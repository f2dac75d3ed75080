"""obs: request statistics, the machine sampler and the Prometheus exposition of a node."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from leaderless.api.messages import StatusReply
from leaderless.core.anti_entropy import AntiEntropyCounters
from leaderless.core.coordinator import CoordinatorCounters
from leaderless.core.hints import HandoffCounters
from leaderless.core.membership import MembershipCounters
from leaderless.core.paxos import AcceptorCounters, ProposerCounters
from leaderless.core.replica import ReplicaCounters
from leaderless.obs import RequestStats, SystemSample, SystemSampler, make_registry, render
from leaderless.obs.metrics import AUTH_EVENTS, CONTENT_TYPE, KV_METRICS
from leaderless.obs.requests import BUCKET_BOUNDS_S, OTHER, WINDOW_S
from leaderless.runtime.auth import AuthError
from leaderless.runtime.counters import RuntimeCounters
from leaderless.runtime.kv import KvNode
from leaderless.security.auth import Grant, Principal
from leaderless.storage.memory import MemoryStore
from tests.unit.test_runtime_node import make_node, run_test


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- RequestStats ----------------------------------------------------------------------


def _series(stats: RequestStats) -> dict[tuple[str, str], tuple[tuple[int, ...], float]]:
    return {(s.operation, s.consistency): (s.bucket_counts, s.sum_s)
            for s in stats.snapshot().latency}


def test_observe_puts_a_latency_in_the_bucket_whose_bound_is_at_or_above_it() -> None:
    stats = RequestStats()
    bounds = list(BUCKET_BOUNDS_S)
    stats.observe("get", "QUORUM", 0.001)        # exactly on a bound: that bucket (le)
    stats.observe("get", "QUORUM", 0.0010001)    # just above: the next one
    stats.observe("get", "QUORUM", 0.0)          # the first bucket
    stats.observe("get", "QUORUM", 11.0)         # past the last bound: +Inf
    counts, sum_s = _series(stats)[("get", "QUORUM")]
    assert len(counts) == len(bounds) + 1
    assert counts[bounds.index(0.001)] == 1
    assert counts[bounds.index(0.0025)] == 1
    assert counts[0] == 1
    assert counts[-1] == 1
    assert sum(counts) == 4
    assert sum_s == pytest.approx(0.001 + 0.0010001 + 11.0)


def test_series_are_kept_per_operation_and_consistency_and_snapshot_is_ordered() -> None:
    stats = RequestStats()
    stats.observe("put", "ONE", 0.002)
    stats.observe("get", "ALL", 0.002)
    stats.observe("get", "QUORUM", 0.002)
    stats.observe("get", "QUORUM", 0.003)
    snapshot = stats.snapshot()
    assert [(s.operation, s.consistency, s.count) for s in snapshot.latency] == [
        ("get", "ALL", 1), ("get", "QUORUM", 2), ("put", "ONE", 1)]
    assert snapshot.latency[1].cumulative()[-1] == 2


def test_a_bad_duration_counts_as_zero_and_keeps_the_sum_finite() -> None:
    stats = RequestStats()
    for bad in (math.nan, -1.0, math.inf):
        stats.observe("get", "ONE", bad)
    counts, sum_s = _series(stats)[("get", "ONE")]
    assert counts[0] == 3
    assert sum_s == 0.0


def test_errors_are_counted_per_operation_and_code() -> None:
    stats = RequestStats()
    stats.error("put", "timeout")
    stats.error("put", "timeout")
    stats.error("put", "unavailable")
    stats.error("cas", "contention")
    assert [(e.operation, e.code, e.count) for e in stats.snapshot().errors] == [
        ("cas", "contention", 1), ("put", "timeout", 2), ("put", "unavailable", 1)]


def test_pairs_over_the_bound_share_the_other_series() -> None:
    stats = RequestStats(series_max=3, error_series_max=2)
    for op in ("get", "put", "scan", "cas", "incr"):
        stats.observe(op, "ONE", 0.001)
    stats.observe("get", "ONE", 0.001)  # a pair kept before the bound still counts alone
    series = _series(stats)
    assert set(series) == {("get", "ONE"), ("put", "ONE"), ("scan", "ONE"), (OTHER, OTHER)}
    assert sum(series[("get", "ONE")][0]) == 2
    assert sum(series[(OTHER, OTHER)][0]) == 2
    for code in ("timeout", "unavailable", "contention", "fenced"):
        stats.error("put", code)
    errors = {(e.operation, e.code): e.count for e in stats.snapshot().errors}
    assert errors == {("put", "timeout"): 1, ("put", "unavailable"): 1, (OTHER, OTHER): 2}


def test_malformed_labels_are_never_stored_as_given() -> None:
    stats = RequestStats()
    stats.observe("get", "BOGUS", 0.001)          # not a consistency level
    stats.observe("get", "BOGUS2", 0.001)
    stats.observe("Get", "ONE", 0.001)            # not lower case
    stats.observe("x" * 65, "ONE", 0.001)         # too long
    stats.observe('get"} 1\n', "ONE", 0.001)      # an injection attempt
    stats.error("get", "Not A Code")
    series = _series(stats)
    assert set(series) == {("get", OTHER), (OTHER, "ONE")}
    assert sum(series[("get", OTHER)][0]) == 2
    assert sum(series[(OTHER, "ONE")][0]) == 3
    assert [(e.operation, e.code) for e in stats.snapshot().errors] == [("get", OTHER)]


@pytest.mark.parametrize("bounds", [(), (0.1, 0.1), (0.2, 0.1), (-1.0, 1.0), (1.0, math.inf)])
def test_bad_bucket_bounds_are_refused(bounds: tuple[float, ...]) -> None:
    with pytest.raises(ValueError):
        RequestStats(bounds)


def test_recent_rate_counts_complete_seconds_only() -> None:
    clock = FakeClock(100.0)
    stats = RequestStats(clock=clock)
    assert stats.ops_per_s() == 0.0
    clock.now = 100.2
    for _ in range(50):
        stats.observe("get", "ONE", 0.001)
    assert stats.ops_per_s() == 0.0  # the current second is not complete yet
    clock.now = 101.5
    assert stats.ops_per_s() == 50.0  # one complete second since the start
    for second in range(101, 130):
        clock.now = second + 0.5
        for _ in range(10):
            stats.observe("get", "ONE", 0.001)
    clock.now = 130.0
    assert stats.ops_per_s() == 10.0  # the last WINDOW_S seconds, 10 each
    clock.now = 130.0 + WINDOW_S + 5
    assert stats.ops_per_s() == 0.0  # idle: everything aged out


def test_a_reused_ring_slot_forgets_its_old_second() -> None:
    clock = FakeClock(100.0)
    stats = RequestStats(clock=clock)
    clock.now = 100.5
    for _ in range(7):
        stats.observe("get", "ONE", 0.001)
    clock.now = 100.5 + WINDOW_S + 1  # the same slot of the ring, one lap later
    stats.observe("get", "ONE", 0.001)
    clock.now += 1
    assert stats.ops_per_s() == pytest.approx(1 / WINDOW_S)


def test_recent_p99_interpolates_within_its_bucket() -> None:
    clock = FakeClock(100.0)
    stats = RequestStats(clock=clock)
    assert stats.p99_ms() == 0.0
    for _ in range(99):
        stats.observe("get", "ONE", 0.002)    # (1 ms, 2.5 ms]
    stats.observe("get", "ONE", 0.4)          # (250 ms, 500 ms]
    clock.now = 101.0
    assert stats.p99_ms() == pytest.approx(2.5)  # rank 99 is the top of the fast bucket
    for _ in range(98):
        stats.observe("get", "ONE", 0.002)
    stats.observe("get", "ONE", 0.4)
    stats.observe("get", "ONE", 0.4)
    clock.now = 102.0
    # 200 requests over two seconds, 3 slow: rank 198 is the first of them, interpolated
    # within 250-500 ms like histogram_quantile
    assert stats.p99_ms() == pytest.approx(250 + 250 * (198 - 197) / 3)


def test_recent_p99_above_the_last_bound_reports_the_last_bound() -> None:
    clock = FakeClock(100.0)
    stats = RequestStats(clock=clock)
    stats.observe("get", "ONE", 30.0)
    clock.now = 101.0
    assert stats.p99_ms() == BUCKET_BOUNDS_S[-1] * 1000


# -- SystemSampler ---------------------------------------------------------------------


def test_system_sample_is_sane_for_a_data_dir(tmp_path: Path) -> None:
    sample = SystemSampler(tmp_path).sample()
    assert 0.0 <= sample.cpu_percent <= 100.0
    assert 0.0 <= sample.process_cpu_percent <= 100.0 * sample.cpu_count
    assert 0 < sample.memory_used_bytes <= sample.memory_total_bytes
    assert 0 < sample.process_rss_bytes < sample.memory_total_bytes
    assert sample.disk_usage_available
    assert sample.disk_total_bytes > 0
    assert sample.disk_used_bytes + sample.disk_free_bytes <= sample.disk_total_bytes
    counters = (sample.disk_read_bytes, sample.disk_write_bytes, sample.disk_reads,
                sample.disk_writes, sample.network_sent_bytes, sample.network_received_bytes,
                sample.network_sent_packets, sample.network_received_packets)
    assert all(n >= 0 for n in counters)
    if not sample.disk_io_available:
        assert sample.disk_read_bytes == sample.disk_write_bytes == 0
    assert min(sample.load_1m, sample.load_5m, sample.load_15m) >= 0.0


def test_system_sample_is_cached_for_a_second(tmp_path: Path) -> None:
    clock = FakeClock()
    sampler = SystemSampler(tmp_path, clock=clock)
    first = sampler.sample()
    clock.now += 0.5
    assert sampler.sample() is first
    clock.now += 0.6
    assert sampler.sample() is not first


def test_a_missing_data_dir_is_reported_not_raised(tmp_path: Path) -> None:
    sample = SystemSampler(tmp_path / "gone").sample()
    assert not sample.disk_usage_available
    assert sample.disk_total_bytes == sample.disk_used_bytes == sample.disk_free_bytes == 0


# -- the exposition --------------------------------------------------------------------


def _status(kv: Mapping[str, int]) -> dict[str, Any]:
    """A node's status exactly as the node will hand it over: a real StatusReply as a dict."""
    membership = MembershipCounters(probes_sent=7, suspicions_raised=2, refutations=1)
    runtime = RuntimeCounters()
    runtime.dropped_malformed_total["udp_packet"] += 4
    runtime.dropped_overload_total["udp_peer_queue"] += 2
    reply = StatusReply(
        name="n1", address="127.0.0.1:7946", incarnation=3, version="0.1.0", uptime_s=12.5,
        states={"alive": 3, "suspect": 1}, pending_broadcasts=6,
        membership=dataclasses.asdict(membership),
        runtime={**runtime.as_dict(), "kv": dict(kv)})
    return msgspec.structs.asdict(reply)


def _kv_counters(**known: int) -> dict[str, int]:
    result: dict[str, int] = {}
    for prefix, counters in (("coordinator", CoordinatorCounters()),
                             ("proposer", ProposerCounters()),
                             ("acceptor", AcceptorCounters()),
                             ("replica", ReplicaCounters()),
                             ("handoff", HandoffCounters()),
                             ("anti_entropy", AntiEntropyCounters())):
        for field, value in dataclasses.asdict(counters).items():
            result[f"{prefix}_{field}"] = value
    result.update(hints_pending=0, commit_syncs=0, commit_writes=0, commit_batches=0,
                  purged=0, in_flight=0, lock_grants=0, lock_refusals=0,
                  lock_fenced_writes=0, lock_waiting=0, watches=0, watch_subscriptions=0,
                  watch_reports=0, watch_events_delivered=0, watch_resyncs=0)
    result.update(known)
    return result


class Scrape:
    """A rendered registry parsed back with prometheus_client's own parser."""

    def __init__(self, body: bytes) -> None:
        self.text = body.decode()
        self.families = {f.name: f for f in text_string_to_metric_families(self.text)}

    def type(self, family: str) -> str:
        return self.families[family].type

    def samples(self, family: str) -> list[Sample]:
        return self.families[family].samples

    def value(self, sample: str, **labels: str) -> float:
        found = [s.value for f in self.families.values() for s in f.samples
                 if s.name == sample and s.labels == labels]
        assert len(found) == 1, (sample, labels, found)
        return found[0]


@pytest.fixture
def scrape(tmp_path: Path) -> Scrape:
    requests = RequestStats()
    for _ in range(3):
        requests.observe("get", "QUORUM", 0.002)
    requests.observe("put", "ONE", 0.3)
    requests.error("put", "timeout")
    kv = _kv_counters(coordinator_read_repairs=3, coordinator_timeouts=5, hints_pending=9,
                      handoff_replayed=4, in_flight=11, proposer_refused_rounds=6,
                      anti_entropy_segments_compared=12, anti_entropy_rows_sent=13,
                      commit_syncs=14, lock_waiting=2, brand_new_counter=42)
    registry = make_registry(lambda: _status(kv), requests, SystemSampler(tmp_path),
                             commit_group_sizes=lambda: {1: 5, 4: 2})
    body, content_type = render(registry)
    assert content_type == CONTENT_TYPE
    return Scrape(body)


def test_node_and_membership_families(scrape: Scrape) -> None:
    assert scrape.value("leaderless_node_info", name="n1", version="0.1.0") == 1
    assert scrape.type("leaderless_members") == "gauge"
    assert scrape.value("leaderless_members", state="alive") == 3
    assert scrape.value("leaderless_members", state="suspect") == 1
    assert scrape.value("leaderless_members", state="dead") == 0  # present even when none
    assert scrape.value("leaderless_incarnation") == 3
    assert scrape.value("leaderless_uptime_seconds") == 12.5
    assert scrape.value("leaderless_pending_broadcasts") == 6
    for field in dataclasses.asdict(MembershipCounters()):
        assert scrape.type(f"leaderless_membership_{field}") == "counter"
    assert scrape.value("leaderless_membership_probes_sent_total") == 7
    assert scrape.value("leaderless_membership_suspicions_raised_total") == 2
    assert scrape.value("leaderless_membership_refutations_total") == 1


def test_runtime_drop_counters_carry_their_kind(scrape: Scrape) -> None:
    assert scrape.type("leaderless_dropped_malformed") == "counter"
    assert scrape.value("leaderless_dropped_malformed_total", kind="udp_packet") == 4
    assert scrape.value("leaderless_dropped_overload_total", kind="udp_peer_queue") == 2
    assert scrape.type("leaderless_send_errors") == "counter"


def test_kv_counters_are_named_by_area_and_typed_by_meaning(scrape: Scrape) -> None:
    assert scrape.value("leaderless_coordinator_read_repairs_total") == 3
    assert scrape.value("leaderless_coordinator_timeouts_total") == 5
    assert scrape.value("leaderless_handoff_replayed_total") == 4
    assert scrape.value("leaderless_proposer_refused_rounds_total") == 6
    assert scrape.value("leaderless_anti_entropy_segments_compared_total") == 12
    assert scrape.value("leaderless_anti_entropy_rows_sent_total") == 13
    assert scrape.value("leaderless_commit_syncs_total") == 14
    assert scrape.type("leaderless_commit_syncs") == "counter"
    for gauge, value in (("leaderless_hints_pending", 9), ("leaderless_coordinator_in_flight", 11),
                         ("leaderless_lock_waiting", 2), ("leaderless_watches", 0)):
        assert scrape.type(gauge) == "gauge"
        assert scrape.value(gauge) == value


def test_an_unknown_kv_counter_is_exported_as_a_gauge(scrape: Scrape) -> None:
    assert scrape.type("leaderless_kv_brand_new_counter") == "gauge"
    assert scrape.value("leaderless_kv_brand_new_counter") == 42


def test_every_counter_of_a_real_kv_node_has_a_described_metric() -> None:
    async def counters() -> dict[str, int]:
        # Built, never started: nothing runs, so there is nothing to close.
        kv = KvNode("n1", MemoryStore(), value_bytes_max=1024, fsync="always",
                    fsync_interval_ms=5.0, tombstone_grace_s=1.0, hint_window_s=1.0,
                    anti_entropy_interval_s=1.0,
                    peers=lambda *args: None,  # type: ignore[arg-type]
                    on_fatal=lambda reason: None, rng_seed=1)
        return kv.counters()

    undescribed = set(asyncio.run(counters())) - set(KV_METRICS)
    assert not undescribed, f"name and type these in obs.metrics.KV_METRICS: {undescribed}"
    names = [m.name for m in KV_METRICS.values()]
    assert len(names) == len(set(names))


def test_request_latency_is_a_histogram_per_operation_and_consistency(scrape: Scrape) -> None:
    name = "leaderless_request_duration_seconds"
    assert scrape.type(name) == "histogram"
    assert scrape.value(f"{name}_bucket", operation="get", consistency="QUORUM",
                        le="0.001") == 0
    assert scrape.value(f"{name}_bucket", operation="get", consistency="QUORUM",
                        le="0.0025") == 3
    assert scrape.value(f"{name}_bucket", operation="get", consistency="QUORUM",
                        le="+Inf") == 3
    assert scrape.value(f"{name}_count", operation="get", consistency="QUORUM") == 3
    assert scrape.value(f"{name}_sum", operation="get", consistency="QUORUM") == (
        pytest.approx(0.006))
    assert scrape.value(f"{name}_bucket", operation="put", consistency="ONE", le="0.25") == 0
    assert scrape.value(f"{name}_bucket", operation="put", consistency="ONE", le="0.5") == 1
    les = [s.labels["le"] for s in scrape.samples(name)
           if s.name.endswith("_bucket") and s.labels["operation"] == "get"]
    assert len(les) == len(BUCKET_BOUNDS_S) + 1
    assert scrape.type("leaderless_request_errors") == "counter"
    assert scrape.value("leaderless_request_errors_total", operation="put", code="timeout") == 1
    assert scrape.type("leaderless_request_recent_ops_per_second") == "gauge"
    assert scrape.type("leaderless_request_recent_p99_seconds") == "gauge"


def test_the_machine_families_are_exported_without_paths(scrape: Scrape,
                                                         tmp_path: Path) -> None:
    gauges = ("system_cpu_percent", "process_cpu_percent", "system_cpus",
              "process_resident_memory_bytes", "system_memory_used_bytes",
              "system_memory_total_bytes", "system_disk_used_bytes", "system_disk_free_bytes",
              "system_disk_total_bytes", "system_load1", "system_load5", "system_load15")
    counters = ("system_disk_read_bytes", "system_disk_written_bytes", "system_disk_reads",
                "system_disk_writes", "system_network_sent_bytes",
                "system_network_received_bytes", "system_network_sent_packets",
                "system_network_received_packets")
    for name in gauges:
        assert scrape.type(f"leaderless_{name}") == "gauge", name
    for name in counters:
        assert scrape.type(f"leaderless_{name}") == "counter", name
    assert scrape.value("leaderless_system_memory_total_bytes") > 0
    assert scrape.value("leaderless_system_disk_total_bytes") > 0
    assert scrape.value("leaderless_system_source_available", source="disk_usage") == 1
    assert str(tmp_path) not in scrape.text
    assert tmp_path.name not in scrape.text
    labels = {k for f in scrape.families.values() for s in f.samples for k in s.labels}
    assert "path" not in labels and "device" not in labels


def test_commit_group_sizes_are_a_histogram(scrape: Scrape) -> None:
    assert scrape.type("leaderless_commit_group_batches") == "histogram"
    assert scrape.value("leaderless_commit_group_batches_bucket", le="1.0") == 5
    assert scrape.value("leaderless_commit_group_batches_bucket", le="2.0") == 5
    assert scrape.value("leaderless_commit_group_batches_bucket", le="4.0") == 7
    assert scrape.value("leaderless_commit_group_batches_bucket", le="+Inf") == 7


def test_each_node_has_its_own_registry(tmp_path: Path) -> None:
    kv = _kv_counters()
    one, two = RequestStats(), RequestStats()
    one.observe("get", "ONE", 0.001)
    sampler = SystemSampler(tmp_path)
    first = Scrape(render(make_registry(lambda: _status(kv), one, sampler))[0])
    second = Scrape(render(make_registry(lambda: _status(kv), two, sampler))[0])
    name = "leaderless_request_duration_seconds_count"
    assert first.value(name, operation="get", consistency="ONE") == 1
    assert not [s for s in second.samples("leaderless_request_duration_seconds")]
    assert not [n for n in REGISTRY._names_to_collectors if n.startswith("leaderless_")]


def test_a_node_not_started_still_exports_requests_and_machine(tmp_path: Path) -> None:
    def not_started() -> Mapping[str, Any]:
        raise RuntimeError("the node is not started; await Node.start() first")

    scrape = Scrape(render(make_registry(not_started, RequestStats(),
                                         SystemSampler(tmp_path)))[0])
    assert "leaderless_members" not in scrape.families
    assert "leaderless_request_duration_seconds" in scrape.families
    assert "leaderless_system_cpu_percent" in scrape.families


def test_openmetrics_is_served_when_the_scraper_asks(tmp_path: Path) -> None:
    registry = make_registry(lambda: _status(_kv_counters()), RequestStats(),
                             SystemSampler(tmp_path))
    body, content_type = render(registry, accept="application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    body, content_type = render(registry, accept="text/plain")
    assert content_type.startswith("text/plain")


def test_system_sample_fields_are_all_exported(scrape: Scrape) -> None:
    # A field added to SystemSample without a metric would silently be dropped.
    from leaderless.obs import metrics
    exported = {field for _, field, _ in metrics._SYSTEM_GAUGES + metrics._SYSTEM_COUNTERS}
    flags = {f.name for f in dataclasses.fields(SystemSample) if f.name.endswith("_available")}
    assert {f.name for f in dataclasses.fields(SystemSample)} == exported | flags


def test_process_cpu_shows_work_done_since_the_last_sample(tmp_path: Path) -> None:
    clock = FakeClock()
    sampler = SystemSampler(tmp_path, clock=clock)
    until = time.monotonic() + 0.3
    while time.monotonic() < until:  # burn CPU in this process
        pass
    clock.now += 2.0
    sample = sampler.sample()
    assert 0.0 < sample.process_cpu_percent <= 100.0 * sample.cpu_count
    assert 0.0 < sample.cpu_percent <= 100.0


def test_auth_events_are_exported_by_event_and_present_at_zero(tmp_path: Path) -> None:
    # A real node with auth on: a request without a token and a denied write are counted
    # by its AuthService, and the node's own /metrics body shows them.
    async def main() -> None:
        flags: dict[str, Any] = {"auth.enabled": True}
        node = make_node(tmp_path, "n1", **flags)
        await node.start()
        try:
            auth = node.auth
            assert auth is not None and auth.enabled
            with pytest.raises(AuthError) as refused:
                auth.check(None, "read", "orders", b"k", operation="get", peer="127.0.0.1:1")
            assert refused.value.code == "unauthenticated"
            reader = Principal("alice", ("reader",), (Grant("read", "orders"),), "t1",
                               time.time() + 60, False)
            auth.check(reader, "read", "orders", b"k", operation="get", peer="127.0.0.1:1")
            for _ in range(2):
                with pytest.raises(AuthError) as denied:
                    auth.check(reader, "write", "orders", b"k", operation="put",
                               peer="127.0.0.1:1")
                assert denied.value.code == "permission_denied"
            scrape = Scrape(node.metrics()[0])
        finally:
            await node.stop()
        assert scrape.type("leaderless_auth_events") == "counter"
        assert scrape.value("leaderless_auth_events_total", event="unauthenticated") == 1
        assert scrape.value("leaderless_auth_events_total", event="permission_denied") == 2
        for event in ("login", "login_failed", "login_throttled"):
            assert scrape.value("leaderless_auth_events_total", event=event) == 0

    run_test(main())


def test_every_auth_counter_has_an_event_and_a_new_one_is_not_dropped(tmp_path: Path) -> None:
    def scrape_of(counters: dict[str, int]) -> Scrape:
        registry = make_registry(lambda: _status(_kv_counters()), RequestStats(),
                                 SystemSampler(tmp_path), auth_events=lambda: counters)
        return Scrape(render(registry)[0])

    # Before the auth service exists (the node is starting) every event reads 0.
    empty = scrape_of({})
    assert {s.labels["event"] for s in empty.samples("leaderless_auth_events")} == set(
        AUTH_EVENTS.values())
    scrape = scrape_of({"auth_logins": 5, "auth_failed_logins": 3,
                        "auth_throttled_logins": 1, "auth_new-thing": 7})
    assert scrape.value("leaderless_auth_events_total", event="login") == 5
    assert scrape.value("leaderless_auth_events_total", event="login_failed") == 3
    assert scrape.value("leaderless_auth_events_total", event="login_throttled") == 1
    assert scrape.value("leaderless_auth_events_total", event="new_thing") == 7
    # Without an auth_events source there is no family at all (the collector is generic).
    bare = make_registry(lambda: _status(_kv_counters()), RequestStats(),
                         SystemSampler(tmp_path))
    assert "leaderless_auth_events" not in Scrape(render(bare)[0]).families

