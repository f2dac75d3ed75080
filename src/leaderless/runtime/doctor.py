"""Gathering what the doctor needs, on the node a client asked.

The asked node knows from gossip every member's state, version and health; what gossip
does not carry (hints, disk free and growth, anti-entropy lag, clock offsets, certificate
expiry) each alive member reports itself (``DoctorReportRequest`` -> ``DoctorReport`` over
the node port), all at once and within ``REPORT_TIMEOUT_S``, as the keyring service sends
its changes. A member that does not answer is itself a finding. The checks are pure
(``obs.doctor``); this module only gathers and keeps the disk samples growth needs.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from leaderless.api.messages import (
    PEER_OFFSETS_MAX,
    RANGES_MAX,
    DoctorReply,
    DoctorReport,
    DoctorReportRequest,
    Finding,
    RangeLag,
)
from leaderless.core.membership import Member
from leaderless.core.messages import Address, MemberStatus
from leaderless.obs.doctor import ClusterSnapshot, MemberFacts, diagnose, severity_counts
from leaderless.runtime.kv import KvNode
from leaderless.runtime.logs import NodeLogger
from leaderless.security.pki import PkiError, certificate_expiry

REPORT_TIMEOUT_S = 3.0
"""How long the asked node waits for every member's report (all asked at once): a
healthy member answers in milliseconds; one slower than this is reported as such."""
DISK_SAMPLE_INTERVAL_S = 60.0
"""How often a node samples its data dir's used bytes, for the growth rate."""
DISK_SAMPLES_MAX = 61
"""An hour of samples (plus one): growth is measured over the last hour at most."""
DISK_GROWTH_SPAN_MIN_S = 60.0
"""Growth needs two samples at least this far apart; before that it is unknown."""

PeerRequest = Callable[[Address, Any, Any, float], Awaitable[Any]]
"""``Transport.request``: send one frame to a peer, return its reply (or raise)."""


class DoctorNode(Protocol):
    """What the doctor needs from a running node (``runtime.node.Node``)."""

    @property
    def name(self) -> str: ...

    def members(self) -> list[Member]: ...

    def wall_time(self, monotonic_s: float) -> float: ...


class NodeDoctor:
    """One node's side of the doctor: its own report, and the cluster-wide diagnosis."""

    def __init__(self, node: DoctorNode, kv: KvNode, *, version: str,
                 tls_cert: Path | None, disk_usage: Callable[[], tuple[int, int, int, bool]],
                 clock_offsets: Callable[[], dict[str, float]],
                 log: NodeLogger) -> None:
        self._node = node
        self._kv = kv
        self._version = version
        self._disk_usage = disk_usage
        """(used, free, total, available) bytes of the data dir's filesystem."""
        self._clock_offsets = clock_offsets
        self._log = log
        self._started_at = time.monotonic()
        self._disk_samples: collections.deque[tuple[float, int]] = collections.deque(
            maxlen=DISK_SAMPLES_MAX)
        self._task: asyncio.Task[None] | None = None
        self.cert_expires_at: float | None = None
        """Unix time the node certificate expires (None: TLS off or unreadable)."""
        if tls_cert is not None:
            try:
                self.cert_expires_at = certificate_expiry(tls_cert).timestamp()
            except PkiError as exc:
                log.warning("doctor_cert_unreadable", path=str(tls_cert), error=str(exc))
        self.last_findings: list[Finding] | None = None
        """The findings of the last diagnosis on this node (None: none yet), for metrics."""

    def finding_counts(self) -> dict[str, int] | None:
        """The last diagnosis's findings by severity (None: none ran yet), for metrics."""
        return None if self.last_findings is None else severity_counts(self.last_findings)

    # -- disk growth samples --------------------------------------------------------------

    def start(self) -> None:
        self.sample_disk()
        self._task = asyncio.get_running_loop().create_task(self._sample_loop())

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _sample_loop(self) -> None:
        while True:
            await asyncio.sleep(DISK_SAMPLE_INTERVAL_S)
            self.sample_disk()

    def sample_disk(self, now: float | None = None) -> None:
        used, _, _, available = self._disk_usage()
        if available:
            self._disk_samples.append((time.monotonic() if now is None else now, used))

    def disk_growth_bytes_per_h(self) -> float | None:
        if len(self._disk_samples) < 2:
            return None
        (t0, used0), (t1, used1) = self._disk_samples[0], self._disk_samples[-1]
        if t1 - t0 < DISK_GROWTH_SPAN_MIN_S:
            return None
        return (used1 - used0) / (t1 - t0) * 3600

    # -- this node's report ---------------------------------------------------------------

    def report(self) -> DoctorReport:
        """This node's local facts (the answer to a peer's ``DoctorReportRequest``)."""
        now = time.monotonic()
        _, free, total, available = self._disk_usage()
        offsets = dict(sorted(self._clock_offsets().items())[:PEER_OFFSETS_MAX])
        return DoctorReport(
            node=self._node.name, version=self._version,
            uptime_s=round(now - self._started_at, 3),
            hints_pending=self._kv.hints.total(),
            oldest_hint_age_s=self._oldest_hint_age_s(),
            disk_free_pct=round(free * 100 / total, 2) if available and total else None,
            disk_free_bytes=free,
            disk_growth_bytes_per_h=self.disk_growth_bytes_per_h(),
            ranges=self._range_lags(),
            clock_offsets_ms={peer: round(ms, 1) for peer, ms in offsets.items()},
            cert_expires_at=self.cert_expires_at)

    def _oldest_hint_age_s(self) -> float | None:
        """The first hint of each target is its oldest (hints scan in timestamp order)."""
        oldest_ms: int | None = None
        for target in list(self._kv.hints.pending):
            for _, hint in self._kv.hints.scan(target, None, 1):
                if oldest_ms is None or hint.stored_at_ms < oldest_ms:
                    oldest_ms = hint.stored_at_ms
        if oldest_ms is None:
            return None
        return max(0.0, round(time.time() - oldest_ms / 1000, 3))

    def _range_lags(self) -> list[RangeLag]:
        ae = self._kv.anti_entropy
        now = asyncio.get_running_loop().time()  # the clock the kv node ticks AE with
        uptime_s = time.monotonic() - self._started_at
        lags = []
        for keyspace, peer, expected_s in ae.compared_pairs()[:RANGES_MAX]:
            last = ae.last_compared.get((keyspace, peer))
            lags.append(RangeLag(keyspace, peer,
                                 round(uptime_s if last is None else now - last, 3),
                                 last is not None, round(expected_s, 3)))
        return lags

    # -- the cluster-wide diagnosis -------------------------------------------------------

    async def diagnose(self, send: PeerRequest) -> DoctorReply:
        """Ask every other alive member for its report (at once, within
        ``REPORT_TIMEOUT_S``), add what gossip says, and run the checks."""
        members = self._node.members()
        me = self._node.name
        peers = [m for m in members if m.status is MemberStatus.ALIVE and m.name != me]
        answers = await asyncio.gather(*(self._ask(m, send) for m in peers))
        reports = {me: self.report()}
        unanswered: dict[str, str] = {}
        for member, answer in zip(peers, answers, strict=True):
            if isinstance(answer, DoctorReport):
                reports[member.name] = answer
            else:
                unanswered[member.name] = answer
        keyspaces = await self._kv.list_keyspaces()
        checked_at = time.time()
        snapshot = ClusterSnapshot(
            asked=me, now=checked_at, members=[member_facts(m) for m in members],
            reports=reports, unanswered=unanswered,
            replication={k.name: k.replication for k in keyspaces})
        findings = diagnose(snapshot)
        self.last_findings = findings
        counts = severity_counts(findings)
        self._log.info("doctor", members=len(members), reports=len(reports), **counts)
        return DoctorReply(findings, round(checked_at, 3), me)

    async def _ask(self, member: Member, send: PeerRequest) -> DoctorReport | str:
        """The member's report, or why there is none."""
        try:
            reply = await send(member.address, DoctorReportRequest(), DoctorReport,
                               REPORT_TIMEOUT_S)
        except TimeoutError:
            return f"no answer within {REPORT_TIMEOUT_S:g} s"
        except (OSError, ConnectionError, ValueError) as exc:  # MalformedInput too
            return f"unreachable at {member.address}: {exc or type(exc).__name__}"
        if not isinstance(reply, DoctorReport):
            return f"answered {type(reply).__name__} (an older version?)"
        return reply


def member_facts(member: Member) -> MemberFacts:
    """What gossip says about ``member``: state, version and health (``NodeMeta.health``;
    healthy until the member gossips one)."""
    health = member.meta.health
    status = "healthy" if health is None else health.status.label
    return MemberFacts(
        name=member.name, state=member.status.name.lower(), address=str(member.address),
        version=member.meta.version, health=status,
        health_reason="" if health is None else health.reason)


def findings_json(reply: DoctorReply) -> dict[str, Any]:
    """The ``GET /api/doctor`` and ``leaderless doctor --json`` shape."""
    findings = [{"severity": f.severity, "check": f.check, "subject": f.subject,
                 "message": f.message, "fix": f.fix} for f in reply.findings]
    counts = severity_counts(list(reply.findings))
    return {"asked": reply.asked, "checked_at": reply.checked_at, "findings": findings,
            "critical": counts["critical"], "warning": counts["warning"],
            "info": counts["info"]}
