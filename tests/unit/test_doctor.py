"""The doctor's checks (``obs.doctor``), one rule at a time on hand-built snapshots."""

from __future__ import annotations

import pytest

from leaderless.api.messages import TEXT_BYTES_MAX, DoctorReport, RangeLag
from leaderless.core.locks import CLOCK_SKEW_MAX_MS
from leaderless.obs.doctor import (
    CERT_CRITICAL_S,
    CERT_WARN_S,
    CLOCK_WARN_MS,
    ClusterSnapshot,
    MemberFacts,
    diagnose,
    severity_counts,
)

NOW = 1_800_000_000.0


def report(node: str, **fields: object) -> DoctorReport:
    values: dict[str, object] = dict(
        node=node, version="1.0", uptime_s=100.0, hints_pending=0, oldest_hint_age_s=None,
        disk_free_pct=50.0, disk_free_bytes=50 << 30, disk_growth_bytes_per_h=None,
        ranges=[], clock_offsets_ms={}, cert_expires_at=None)
    values.update(fields)
    return DoctorReport(**values)  # type: ignore[arg-type]


def healthy(n: int = 3) -> list[MemberFacts]:
    return [MemberFacts(f"n{i}", "alive", f"127.0.0.1:{7000 + i}", "1.0") for i in range(n)]


def snapshot(members: list[MemberFacts] | None = None, **fields: object) -> ClusterSnapshot:
    members = healthy() if members is None else members
    values: dict[str, object] = dict(
        reports={m.name: report(m.name) for m in members if m.state == "alive"},
        replication={"app": 3})
    values.update(fields)
    return ClusterSnapshot("n0", NOW, members, **values)  # type: ignore[arg-type]


def found(snap: ClusterSnapshot) -> list[tuple[str, str, str]]:
    return [(f.severity, f.check, f.subject) for f in diagnose(snap)]


def test_a_healthy_cluster_has_no_findings() -> None:
    assert diagnose(snapshot()) == []


@pytest.mark.parametrize(("state", "severity"), [
    ("dead", "critical"), ("suspect", "warning"), ("left", "info")])
def test_members_not_alive(state: str, severity: str) -> None:
    members = [*healthy(3), MemberFacts("n3", state, "127.0.0.1:7003", "1.0")]
    assert (severity, "members", "n3") in found(snapshot(members))


@pytest.mark.parametrize(("health", "severity"), [
    ("read-only", "critical"), ("degraded", "warning"), ("leaving", "warning")])
def test_health_states_name_the_reason_and_a_fix(health: str, severity: str) -> None:
    members = healthy(3)
    members[1] = MemberFacts("n1", "alive", "a", "1.0", health, "disk 3% free")
    [finding] = diagnose(snapshot(members))
    assert (finding.severity, finding.check, finding.subject) == (severity, "health", "n1")
    assert "disk 3% free" in finding.message and finding.fix


def test_a_dead_members_old_health_is_not_reported_twice() -> None:
    members = [*healthy(3), MemberFacts("n3", "dead", "a", "1.0", "read-only", "disk")]
    assert [c for _, c, _ in found(snapshot(members, replication={}))] == ["members"]


def test_an_alive_member_that_sent_no_report() -> None:
    snap = snapshot(unanswered={"n2": "no answer within 3 s"})
    assert found(snap) == [("warning", "reachability", "n2")]


@pytest.mark.parametrize(("offset_ms", "expected"), [
    (CLOCK_WARN_MS - 1, []),
    (CLOCK_WARN_MS + 1, [("warning", "clock", "n0/n1")]),
    (-(CLOCK_SKEW_MAX_MS + 1), [("critical", "clock", "n0/n1")])])
def test_clock_offsets_against_the_bound(offset_ms: float,
                                         expected: list[tuple[str, str, str]]) -> None:
    reports = {m.name: report(m.name) for m in healthy()}
    reports["n0"] = report("n0", clock_offsets_ms={"n1": offset_ms})
    reports["n1"] = report("n1", clock_offsets_ms={"n0": -offset_ms / 2})
    assert found(snapshot(reports=reports)) == expected


def test_clock_finding_says_who_is_ahead() -> None:
    reports = {m.name: report(m.name) for m in healthy()}
    reports["n2"] = report("n2", clock_offsets_ms={"n0": -800.0})  # n0 is behind n2
    [finding] = diagnose(snapshot(reports=reports))
    assert finding.message.startswith("n2's clock is 800 ms ahead of n0's")


@pytest.mark.parametrize(("free_pct", "growth", "expected"), [
    (4.0, None, ["critical"]), (8.0, None, ["warning"]),
    (50.0, float(50 << 30) / 12, ["critical"]),   # full in 12 h
    (50.0, float(50 << 30) / 72, ["warning"]),    # full in 3 days
    (50.0, float(50 << 30) / 720, []),            # a month
    (50.0, -1000.0, [])])
def test_disk_space_and_growth(free_pct: float, growth: float | None,
                               expected: list[str]) -> None:
    reports = {m.name: report(m.name) for m in healthy()}
    reports["n1"] = report("n1", disk_free_pct=free_pct, disk_growth_bytes_per_h=growth)
    assert [s for s, c, _ in found(snapshot(reports=reports)) if c == "disk"] == expected


@pytest.mark.parametrize(("pending", "age_s", "expected"), [
    (0, None, []), (10, 30.0, ["info"]), (10, 7200.0, ["warning"]),
    (1_000_000, 5.0, ["warning"])])
def test_hints_backlog_and_age(pending: int, age_s: float | None, expected: list[str]) -> None:
    reports = {m.name: report(m.name) for m in healthy()}
    reports["n2"] = report("n2", hints_pending=pending, oldest_hint_age_s=age_s)
    assert [s for s, c, _ in found(snapshot(reports=reports)) if c == "hints"] == expected


def test_anti_entropy_lag_only_for_alive_peers_beyond_the_factor() -> None:
    members = [*healthy(3), MemberFacts("n3", "dead", "a", "1.0")]
    ranges = [RangeLag("app", "n1", 30.0, True, 60.0),     # fine
              RangeLag("app", "n2", 6000.0, True, 60.0),   # lagging
              RangeLag("app", "n3", 6000.0, False, 60.0)]  # peer dead: members says so
    reports = {m.name: report(m.name) for m in healthy()}
    reports["n0"] = report("n0", ranges=ranges)
    lagging = [s for _, c, s in found(snapshot(members, reports=reports, replication={}))
               if c == "anti_entropy"]
    assert lagging == ["n0/n2/app"]


@pytest.mark.parametrize(("left_s", "expected"), [
    (CERT_WARN_S + 60, []), (CERT_WARN_S - 60, ["warning"]),
    (CERT_CRITICAL_S - 60, ["critical"]), (-60.0, ["critical"])])
def test_certificate_expiry(left_s: float, expected: list[str]) -> None:
    reports = {m.name: report(m.name) for m in healthy()}
    reports["n1"] = report("n1", cert_expires_at=NOW + left_s)
    findings = [f for f in diagnose(snapshot(reports=reports)) if f.check == "tls"]
    assert [f.severity for f in findings] == expected
    if left_s < 0:
        assert "expired" in findings[0].message


def test_mixed_versions() -> None:
    members = healthy(3)
    members[2] = MemberFacts("n2", "alive", "a", "1.1")
    [finding] = diagnose(snapshot(members))
    assert (finding.severity, finding.check) == ("warning", "versions")
    assert "1.0: n0, n1" in finding.message and "1.1: n2" in finding.message


@pytest.mark.parametrize(("alive", "expected"), [
    (3, []), (2, ["warning"]), (1, ["critical"])])
def test_replication_factor_above_live_nodes(alive: int, expected: list[str]) -> None:
    members = [MemberFacts(f"n{i}", "alive" if i < alive else "dead", "a", "1.0")
               for i in range(3)]
    assert [s for s, c, _ in found(snapshot(members)) if c == "replication"] == expected


def test_findings_are_sorted_by_severity_and_counted() -> None:
    members = [*healthy(2), MemberFacts("n2", "suspect", "a", "1.0"),
               MemberFacts("n3", "dead", "a", "1.0"), MemberFacts("n4", "left", "a", "1.0")]
    findings = diagnose(snapshot(members, replication={}))
    assert [f.severity for f in findings] == ["critical", "warning", "info"]
    assert severity_counts(findings) == {"critical": 1, "warning": 1, "info": 1}


def test_a_long_finding_is_cut_to_the_wire_limit() -> None:
    members = [MemberFacts(f"node-with-a-long-name-{i:04d}", "alive", "a", f"1.{i % 2}")
               for i in range(200)]
    [finding] = diagnose(snapshot(members, reports={}, replication={}))
    assert finding.check == "versions"
    assert len(finding.message.encode()) <= TEXT_BYTES_MAX
    assert finding.message.endswith("...")
