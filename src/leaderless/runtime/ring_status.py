"""The operator's side of ring changes, on the node a client asked.

``leaderless node decommission | set-capacity | cleanup`` act on the asked node
(``runtime.ring_changes.RingService``, ``runtime.cleanup``); every operation, and
``leaderless ring status``, answers with the cluster's ring status: gossip gives each
member's ring state, token counts and address, the asked node's placement gives each
member's share of the current ring, and what gossip does not carry (stream progress,
what a leave waits for, errors, cleanup) each alive member reports itself
(``RingReportRequest`` -> ``RingReport`` over the node port), all at once and within
``REPORT_TIMEOUT_S``, as the doctor gathers its reports.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import msgspec

from leaderless.api.messages import (
    WAITING_FOR_MAX,
    CleanupFigures,
    RingMember,
    RingOperation,
    RingReply,
    RingReport,
    RingReportRequest,
    RingSummary,
    StreamFigures,
)
from leaderless.core.membership import Member
from leaderless.core.messages import Address, MemberStatus
from leaderless.core.placement import Placement, RingState
from leaderless.core.streaming import StreamProgress
from leaderless.runtime.cleanup import Cleanup

REPORT_TIMEOUT_S = 3.0
"""How long the asked node waits for every member's report (all asked at once): a
member slower than this is listed without its own figures."""
RING_STATE_NAMES = {RingState.NORMAL: "normal", RingState.JOINING: "joining",
                    RingState.LEAVING: "leaving"}
STATES = ("normal", "joining", "leaving", "left", "dead")
"""A member's ``state`` in a ring status (``leaderless_ring_state`` labels these)."""

PeerRequest = Callable[[Address, Any, Any, float], Awaitable[Any]]
"""``Transport.request``: send one frame to a peer, return its reply (or raise)."""


def stream_figures(progress: StreamProgress) -> StreamFigures:
    return StreamFigures(
        ranges_total=progress.ranges_total, ranges_done=progress.ranges_done,
        ranges_active=progress.ranges_active, bytes_received=progress.bytes_received,
        bytes_per_s=round(progress.bytes_per_s, 1),
        eta_s=None if progress.eta_s is None else round(progress.eta_s, 1))


def cleanup_figures(cleanup: Cleanup | None) -> CleanupFigures:
    if cleanup is None:
        return CleanupFigures(False, 0, None)
    finished = cleanup.last_finished_at
    return CleanupFigures(cleanup.running, cleanup.deleted_rows,
                          None if finished is None else round(finished, 3),
                          cleanup.error[:1000])


def own_report(name: str, status: Mapping[str, Any], cleanup: Cleanup | None) -> RingReport:
    """This node's report from ``RingService.status()``."""
    waiting = list(status["waiting_for"])
    return RingReport(
        node=name, state=status["state"], token_count=status["token_count"],
        next_token_count=status["next_token_count"], replacing=status["replacing"],
        stream=stream_figures(status["stream"]), waiting_for=waiting[:WAITING_FOR_MAX],
        waiting_more=max(0, len(waiting) - WAITING_FOR_MAX), error=status["error"][:1000],
        settled=bool(status["settled"]), cleanup=cleanup_figures(cleanup))


def ring_metrics(report: RingReport) -> dict[str, Any]:
    """What ``obs.metrics.ring_families`` exports of this node's report."""
    stream = report.stream
    return {"state": report.state,
            "pending_ranges": max(0, stream.ranges_total - stream.ranges_done),
            "waiting_for": len(report.waiting_for) + report.waiting_more,
            "cleanup_deleted_rows": report.cleanup.deleted_rows,
            "cleanup_running": report.cleanup.running}


async def ask_report(member: Member, send: PeerRequest) -> RingReport | str:
    """The member's report, or why there is none (within ``REPORT_TIMEOUT_S`` in all)."""
    try:
        reply = await asyncio.wait_for(
            send(member.address, RingReportRequest(), RingReport, REPORT_TIMEOUT_S),
            REPORT_TIMEOUT_S)
    except TimeoutError:
        return f"no answer within {REPORT_TIMEOUT_S:g} s"
    except (OSError, ConnectionError, ValueError) as exc:  # MalformedInput too
        return f"unreachable at {member.address}: {exc or type(exc).__name__}"
    if not isinstance(reply, RingReport):
        return f"answered {type(reply).__name__} (an older version?)"
    return reply


async def gather(operation: RingOperation, me: str, own: RingReport,
                 members: list[Member], placement: Placement,
                 send: PeerRequest) -> RingReply:
    """The cluster's ring status: ``own`` for this node, every other alive member's
    report (asked at once), gossip for the rest."""
    peers = [m for m in members if m.status is MemberStatus.ALIVE and m.name != me]
    answers = await asyncio.gather(*(ask_report(m, send) for m in peers))
    reports: dict[str, RingReport | str] = {me: own}
    reports.update((m.name, a) for m, a in zip(peers, answers, strict=True))
    return build_reply(operation, me, members, placement, reports, time.time())


def build_reply(operation: RingOperation, me: str, members: Iterable[Member],
                placement: Placement, reports: Mapping[str, RingReport | str],
                now: float) -> RingReply:
    """The reply from gossip (``members``), the placement and the reports (a report, or
    why there is none; members not in it were not asked: they are not alive)."""
    ownership = placement.current.ownership()
    entries = [member_entry(m, ownership.get(m.name, 0.0), reports.get(m.name))
               for m in sorted(members, key=lambda m: m.name)]
    return RingReply(operation, me, round(now, 3), entries,
                     summarize(entries, placement.changing))


def member_entry(member: Member, share: float, report: RingReport | str | None
                 ) -> RingMember:
    meta = member.meta
    status = member.status.name.lower()
    if member.status in (MemberStatus.DEAD, MemberStatus.LEFT):
        state = status
    elif isinstance(report, RingReport):
        state = report.state
    else:
        state = RING_STATE_NAMES.get(RingState(meta.ring_state), "normal")
    entry = RingMember(
        name=member.name, address=str(member.address), state=state, status=status,
        token_count=meta.token_count, next_token_count=meta.next_token_count,
        replacing=meta.replacing, ownership=round(share, 6), reported=False,
        error=report if isinstance(report, str) else "")
    if not isinstance(report, RingReport):
        return entry
    return msgspec.structs.replace(
        entry, reported=True, stream=report.stream, waiting_for=report.waiting_for,
        waiting_more=report.waiting_more, error=report.error, settled=report.settled,
        cleanup=report.cleanup)


def streaming(stream: StreamFigures | None) -> bool:
    """The member still has ranges to fetch."""
    return stream is not None and stream.ranges_done < stream.ranges_total


def summarize(entries: list[RingMember], changing: bool) -> RingSummary:
    active = [e.stream for e in entries if streaming(e.stream)]
    etas = [s.eta_s for s in active if s is not None and s.eta_s is not None]
    return RingSummary(
        members=len(entries), states=dict(Counter(e.state for e in entries)),
        changing=changing, streaming=len(active),
        ranges_total=sum(s.ranges_total for s in active if s is not None),
        ranges_done=sum(s.ranges_done for s in active if s is not None),
        bytes_received=sum(s.bytes_received for s in active if s is not None),
        bytes_per_s=round(sum(s.bytes_per_s for s in active if s is not None), 1),
        eta_s=max(etas) if etas and len(etas) == len(active) else None)


def ring_json(reply: RingReply) -> dict[str, Any]:
    """The ``leaderless ring status --json`` and ``GET /api/ring`` shape: the reply's
    fields by name (``{"operation", "asked", "checked_at", "members": [...],
    "summary": {...}}``)."""
    result = _plain(reply)
    assert isinstance(result, dict)
    return result


def _plain(value: Any) -> Any:
    """Structs as dicts by field name (``array_like`` structs encode as lists)."""
    if isinstance(value, msgspec.Struct):
        return {f: _plain(getattr(value, f)) for f in value.__struct_fields__}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
