"""What is wrong with the cluster, and what to do: the doctor's checks.

Pure: ``diagnose`` takes a ``ClusterSnapshot`` (what one node knows from gossip, plus the
``DoctorReport`` each alive member sent it; ``runtime.doctor`` gathers it) and returns the
findings, most severe first. Each check is a small function of the snapshot, so a test
builds a snapshot by hand and checks one rule at a time; nothing here reads a clock, a
socket or a file.

Severities: ``critical`` (data at risk or a node not serving: the command exits 1),
``warning`` (needs attention soon), ``info`` (worth knowing, nothing to do now).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

from leaderless.api.messages import (
    FINDINGS_MAX,
    TEXT_BYTES_MAX,
    DoctorReport,
    Finding,
    Severity,
)
from leaderless.core.locks import CLOCK_SKEW_MAX_MS

__all__ = ["ClusterSnapshot", "Finding", "MemberFacts", "diagnose", "severity_counts"]

SEVERITY_ORDER: dict[Severity, int] = {"critical": 0, "warning": 1, "info": 2}

CLOCK_WARN_MS = CLOCK_SKEW_MAX_MS / 2
"""Half the skew bound: a clock drifting this far will soon refuse strong operations."""
DISK_FREE_CRITICAL_PCT = 5.0
"""The default stop-writes threshold of ``[health]``: at this point a node is read-only."""
DISK_FREE_WARN_PCT = 10.0
"""The default warn threshold of ``[health]``."""
DISK_FULL_CRITICAL_S = 24 * 3600.0
"""Full within a day at the current growth: critical, nobody can order disks that fast."""
DISK_FULL_WARN_S = 7 * 24 * 3600.0
"""Full within a week: time to plan capacity."""
HINTS_BACKLOG_WARN = 100_000
"""Hints pending on one node beyond which its replay will take minutes (2,000/s)."""
HINT_AGE_WARN_S = 3600.0
"""An hour-old hint: its target has been away long; past the hint window (3 h by
default) hints are dropped and the target converges only by anti-entropy."""
AE_LAG_WARN_FACTOR = 10.0
"""A range pair not compared for this many times its expected period is lagging."""
CERT_WARN_S = 30 * 86400.0
"""A node certificate expiring within 30 days: renew it."""
CERT_CRITICAL_S = 7 * 86400.0
"""Within 7 days (or expired): peers will refuse the node."""

HEALTH_SEVERITY: dict[str, Severity] = {"read-only": "critical", "degraded": "warning",
                                        "leaving": "warning"}
MEMBER_SEVERITY: dict[str, Severity] = {"dead": "critical", "suspect": "warning",
                                        "left": "info"}


@dataclasses.dataclass(frozen=True)
class MemberFacts:
    """One member as the asked node knows it from gossip."""

    name: str
    state: str
    """alive | suspect | dead | left"""
    address: str = ""
    version: str = ""
    health: str = "healthy"
    """healthy | degraded | read-only | leaving (as gossiped; healthy if none yet)"""
    health_reason: str = ""


@dataclasses.dataclass(frozen=True)
class ClusterSnapshot:
    asked: str
    """The node that gathered it."""
    now: float
    """Unix time of the gathering (certificate expiry is compared with it)."""
    members: list[MemberFacts]
    reports: dict[str, DoctorReport] = dataclasses.field(default_factory=dict)
    """Each answering member's own facts, by name."""
    unanswered: dict[str, str] = dataclasses.field(default_factory=dict)
    """Alive members that sent no report, with why (timed out, refused, unreachable)."""
    replication: dict[str, int] = dataclasses.field(default_factory=dict)
    """Each keyspace's replication factor."""


def _finding(severity: Severity, check: str, subject: str, message: str,
             fix: str) -> Finding:
    return Finding(severity, check, _fit(subject), _fit(message), _fit(fix))


def _fit(text: str) -> str:
    """``text`` within the wire limit of a finding's field (a long member list is cut)."""
    if len(text.encode()) <= TEXT_BYTES_MAX:
        return text
    return text.encode()[:TEXT_BYTES_MAX - 3].decode(errors="ignore") + "..."


def check_members(snap: ClusterSnapshot) -> Iterator[Finding]:
    for m in snap.members:
        severity = MEMBER_SEVERITY.get(m.state)
        if severity is None:
            continue
        if m.state == "dead":
            yield _finding(severity, "members", m.name, f"{m.name} ({m.address}) is dead: "
                           "it stopped answering probes and nobody refuted it",
                           f"restart the node on {m.address or 'its host'}, or if it is gone "
                           "for good, start a replacement; hints for it are kept for the "
                           "hint window, then anti-entropy repairs it")
        elif m.state == "suspect":
            yield _finding(severity, "members", m.name,
                           f"{m.name} is suspected of failure (missed probes)",
                           "check its process, network and CPU; it is declared dead unless "
                           "it refutes within the suspicion timeout")
        else:
            yield _finding(severity, "members", m.name, f"{m.name} left the cluster",
                           "nothing, if it was meant to; a passive failover names its fault "
                           "in that node's log")


def check_health(snap: ClusterSnapshot) -> Iterator[Finding]:
    fixes = {
        "read-only": "free space in its data dir (or grow the volume); it turns healthy by "
                     "itself once space is above the stop-writes threshold",
        "degraded": "look at the reason and that node's log (`leaderless logs`)",
        "leaving": "it is stepping out of the cluster; read its log for the fault, repair it "
                   "and restart the node",
    }
    for m in snap.members:
        severity = HEALTH_SEVERITY.get(m.health)
        if severity is None or m.state in ("dead", "left"):
            continue
        reason = f": {m.health_reason}" if m.health_reason else ""
        yield _finding(severity, "health", m.name, f"{m.name} is {m.health}{reason}",
                       fixes[m.health])


def check_reachability(snap: ClusterSnapshot) -> Iterator[Finding]:
    for name, why in sorted(snap.unanswered.items()):
        yield _finding("warning", "reachability", name,
                       f"{name} is alive in gossip but sent no report: {why}",
                       "check that its node port is reachable from the asked node "
                       f"({snap.asked}) and that the process is not stalled")


def check_clocks(snap: ClusterSnapshot) -> Iterator[Finding]:
    worst: dict[tuple[str, str], float] = {}
    for observer, report in snap.reports.items():
        for peer, offset_ms in report.clock_offsets_ms.items():
            pair = (min(observer, peer), max(observer, peer))
            sign = 1 if observer == pair[0] else -1  # offset of pair[1] relative to pair[0]
            if abs(offset_ms) > abs(worst.get(pair, 0.0)):
                worst[pair] = sign * offset_ms
    for (a, b), offset_ms in sorted(worst.items()):
        size = abs(offset_ms)
        if size <= CLOCK_WARN_MS:
            continue
        ahead, behind = (b, a) if offset_ms > 0 else (a, b)
        severity: Severity = "critical" if size > CLOCK_SKEW_MAX_MS else "warning"
        yield _finding(severity, "clock", f"{a}/{b}",
                       f"{ahead}'s clock is {size:.0f} ms ahead of {behind}'s "
                       f"(bound {CLOCK_SKEW_MAX_MS} ms)",
                       "run NTP (chrony or systemd-timesyncd) on every host and check "
                       f"`chronyc tracking` on {ahead} and {behind}; beyond the bound a node "
                       "refuses strong operations and lock leases")


def check_disks(snap: ClusterSnapshot) -> Iterator[Finding]:
    for name, r in sorted(snap.reports.items()):
        if r.disk_free_pct is not None and r.disk_free_pct < DISK_FREE_WARN_PCT:
            severity: Severity = ("critical" if r.disk_free_pct < DISK_FREE_CRITICAL_PCT
                                  else "warning")
            yield _finding(severity, "disk", name,
                           f"{name}'s data dir has {r.disk_free_pct:.1f}% free "
                           f"({_bytes(r.disk_free_bytes)})",
                           "free space or grow the volume; below the stop-writes threshold "
                           "the node refuses writes")
        growth = r.disk_growth_bytes_per_h
        if growth is None or growth <= 0:
            continue
        full_in_s = r.disk_free_bytes / growth * 3600
        if full_in_s < DISK_FULL_WARN_S:
            severity = "critical" if full_in_s < DISK_FULL_CRITICAL_S else "warning"
            yield _finding(severity, "disk", name,
                           f"{name}'s disk grows {_bytes(int(growth))}/h: full in "
                           f"{_duration(full_in_s)}",
                           "add capacity (a bigger volume or more nodes), or shorten TTLs "
                           "and the tombstone grace")


def check_hints(snap: ClusterSnapshot) -> Iterator[Finding]:
    for name, r in sorted(snap.reports.items()):
        age = r.oldest_hint_age_s
        if r.hints_pending > HINTS_BACKLOG_WARN or (age is not None and age > HINT_AGE_WARN_S):
            yield _finding("warning", "hints", name,
                           f"{name} holds {r.hints_pending} hints, the oldest "
                           f"{_duration(age or 0)} old",
                           "bring their targets back (see dead members); hints older than "
                           "the hint window are dropped and anti-entropy repairs the rest")
        elif r.hints_pending > 0:
            yield _finding("info", "hints", name,
                           f"{name} holds {r.hints_pending} hints, the oldest "
                           f"{_duration(age or 0)} old",
                           "nothing: they are replayed when their targets answer")


def check_anti_entropy(snap: ClusterSnapshot) -> Iterator[Finding]:
    alive = {m.name for m in snap.members if m.state == "alive"}
    for name, r in sorted(snap.reports.items()):
        for lag in r.ranges:
            if lag.peer not in alive or lag.lag_s <= AE_LAG_WARN_FACTOR * lag.expected_s:
                continue
            when = ("never compared since it started " if not lag.compared
                    else "last compared ") + f"{_duration(lag.lag_s)} ago"
            yield _finding("warning", "anti_entropy", f"{name}/{lag.peer}/{lag.keyspace}",
                           f"{name} and {lag.peer}: keyspace {lag.keyspace!r} {when} "
                           f"(expected about every {_duration(lag.expected_s)})",
                           "check the anti-entropy counters (sessions_timed_out, "
                           "sessions_failed) in /metrics and the network between them")


def check_certificates(snap: ClusterSnapshot) -> Iterator[Finding]:
    for name, r in sorted(snap.reports.items()):
        if r.cert_expires_at is None:
            continue
        left_s = r.cert_expires_at - snap.now
        if left_s >= CERT_WARN_S:
            continue
        fix = (f"issue a new certificate (`leaderless certs issue {name}`) and restart the "
               "node with it")
        if left_s <= 0:
            yield _finding("critical", "tls", name, f"{name}'s node certificate expired "
                           f"{_duration(-left_s)} ago", fix)
        else:
            severity: Severity = "critical" if left_s < CERT_CRITICAL_S else "warning"
            yield _finding(severity, "tls", name, f"{name}'s node certificate expires in "
                           f"{_duration(left_s)}", fix)


def check_versions(snap: ClusterSnapshot) -> Iterator[Finding]:
    by_version: dict[str, list[str]] = {}
    for m in snap.members:
        if m.state in ("alive", "suspect") and m.version:
            by_version.setdefault(m.version, []).append(m.name)
    if len(by_version) > 1:
        listing = "; ".join(f"{v}: {', '.join(sorted(names))}"
                            for v, names in sorted(by_version.items()))
        yield _finding("warning", "versions", "cluster",
                       f"members run different versions ({listing})",
                       "finish the rolling upgrade: restart the remaining nodes on the new "
                       "version, one at a time")


def check_replication(snap: ClusterSnapshot) -> Iterator[Finding]:
    live = sum(1 for m in snap.members if m.state == "alive")
    for keyspace, factor in sorted(snap.replication.items()):
        if factor <= live:
            continue
        quorum = factor // 2 + 1
        severity: Severity = "critical" if live < quorum else "warning"
        yield _finding(severity, "replication", keyspace,
                       f"keyspace {keyspace!r} keeps {factor} replicas but only {live} "
                       f"nodes are alive" + ("; QUORUM cannot be reached" if live < quorum
                                             else "; ALL operations fail"),
                       "bring the dead nodes back or add nodes; replicas for the missing "
                       "ones are kept as hints meanwhile")


CHECKS: tuple[Callable[[ClusterSnapshot], Iterator[Finding]], ...] = (
    check_members, check_health, check_reachability, check_clocks, check_disks,
    check_hints, check_anti_entropy, check_certificates, check_versions, check_replication)


def diagnose(snap: ClusterSnapshot) -> list[Finding]:
    """Every check's findings, most severe first (then by check and subject), at most
    ``FINDINGS_MAX``."""
    findings = [f for check in CHECKS for f in check(snap)]
    findings.sort(key=lambda f: (SEVERITY_ORDER[f.severity], f.check, f.subject))
    return findings[:FINDINGS_MAX]


def severity_counts(findings: list[Finding]) -> dict[str, int]:
    """{"critical": n, "warning": n, "info": n}, every severity present."""
    counts: dict[str, int] = dict.fromkeys(SEVERITY_ORDER, 0)
    for f in findings:
        counts[f.severity] += 1
    return counts


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _duration(seconds: float) -> str:
    s = max(0.0, seconds)
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 2 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"
