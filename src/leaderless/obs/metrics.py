"""A node's Prometheus exposition: one registry per node, filled at scrape time.

``make_registry`` registers one custom collector on a fresh ``CollectorRegistry`` (never the
process-wide default: several nodes may run in one process). At every scrape the collector
reads the node's status (the ``StatusReply`` shape as a plain dict), a ``RequestStats``
snapshot and a ``SystemSample``, and turns them into metric families. Nothing is kept
between scrapes, so the hot path pays nothing for metrics it does not touch.

Node and membership (``status``)::

    name, version                    leaderless_node_info{name, version}            gauge (1)
    states                           leaderless_members{state}                      gauge
                                     (alive, suspect, dead and left always present)
    incarnation                      leaderless_incarnation                         gauge
    uptime_s                         leaderless_uptime_seconds                      gauge
    pending_broadcasts               leaderless_pending_broadcasts                  gauge
    membership[<field>]              leaderless_membership_<field>_total            counter
    runtime[<name>_total][<kind>]    leaderless_<name>_total{kind}                  counter
      (dropped_malformed, dropped_overload, send_errors; a runtime group whose name does
       not end in _total becomes a gauge leaderless_<name>{kind})

KV (``status["runtime"]["kv"]``, i.e. ``KvNode.counters()``); counters count events since
the node started, gauges are current levels::

    coordinator_<f>   leaderless_coordinator_<f>_total   counter  f: writes reads scans
                      unavailable timeouts (replica timeouts) hints_sent read_repairs
                      speculative_retries replica_errors
    in_flight         leaderless_coordinator_in_flight   gauge
    replica_<f>       leaderless_replica_<f>_total       counter  f: writes_applied
                      writes_stale reads scans hints_stored
    hints_pending     leaderless_hints_pending           gauge
    handoff_<f>       leaderless_handoff_<f>_total       counter  f: replayed expired failed
    anti_entropy_<f>  leaderless_anti_entropy_<f>_total  counter  f: sessions_started
                      sessions_completed sessions_timed_out sessions_failed
                      segments_compared (ranges compared) segments_differing keys_compared
                      rows_sent (keys streamed) rows_requested rows_received rows_accepted
                      rows_refused requests_answered stale_replies
    proposer_<f>      leaderless_proposer_<f>_total      counter  f: changes rounds
                      one_rtt_rounds refused_rounds (conflicts) retries unavailable
                      timeouts contention duplicates purges
    acceptor_<f>      leaderless_acceptor_<f>_total      counter  f: promises accepts
                      refusals purges
    commit_<f>        leaderless_commit_<f>_total        counter  f: syncs writes batches
    purged            leaderless_purged_rows_total       counter
    lock_<f>          leaderless_lock_<f>_total          counter  f: grants refusals
                      fenced_writes
    lock_waiting      leaderless_lock_waiting            gauge
    watches           leaderless_watches                 gauge
    watch_subscriptions leaderless_watch_subscriptions   gauge
    watch_<f>         leaderless_watch_<f>_total         counter  f: reports
                      events_delivered resyncs
    stream_<f>        leaderless_stream_<f>_total        counter  f: bytes_in bytes_out
                      rows_in pages_in pages_served failed_checksum failed_error
                      failed_invalid failed_timeout source_switches
    stream_<g>        leaderless_stream_<g>              gauge    g: ranges_done
                      ranges_active ranges_pending rate_bytes_per_second
                      eta_seconds (-1: unknown)
    anything else     leaderless_kv_<name>               gauge    (a counter added to
                      KvNode.counters() but not yet to ``KV_METRICS`` is still exported)

Requests (``RequestStats``)::

    leaderless_request_duration_seconds{operation, consistency}   histogram
    leaderless_request_errors_total{operation, code}              counter
    leaderless_request_recent_ops_per_second                      gauge (last 10 s)
    leaderless_request_recent_p99_seconds                         gauge (last 10 s)

Machine (``SystemSample``; no label carries a path of the machine)::

    leaderless_system_cpu_percent, leaderless_system_cpus,
    leaderless_process_cpu_percent (of one CPU), leaderless_process_resident_memory_bytes,
    leaderless_system_memory_used_bytes, leaderless_system_memory_total_bytes,
    leaderless_system_disk_{used,free,total}_bytes (the filesystem of the data dir),
    leaderless_system_disk_{read,written}_bytes_total, leaderless_system_disk_{reads,writes}_total,
    leaderless_system_network_{sent,received}_{bytes,packets}_total,
    leaderless_system_load1, leaderless_system_load5, leaderless_system_load15,
    leaderless_system_source_available{source="disk_usage"|"disk_io"|"network_io"}

Storage, when ``make_registry`` is given ``commit_group_sizes`` (``GroupCommit.group_sizes``)::

    leaderless_commit_group_batches   histogram of batches per sync (power-of-two buckets;
                                      no _sum or _count: the sizes are only known bucketed)

and, given ``commit_sync_latency``::

    leaderless_commit_sync_duration_seconds   histogram of storage sync (fsync) durations

Authentication, given ``auth_events`` (``AuthService.counters()``; every event always
present, 0 with auth off)::

    auth_logins              leaderless_auth_events_total{event="login"}              counter
    auth_failed_logins       leaderless_auth_events_total{event="login_failed"}
    auth_throttled_logins    leaderless_auth_events_total{event="login_throttled"}
    auth_permission_denied   leaderless_auth_events_total{event="permission_denied"}
    auth_unauthenticated     leaderless_auth_events_total{event="unauthenticated"}

Health and the doctor, given ``member_health`` (member name -> its gossiped health label)
and ``doctor_findings`` (the last diagnosis on this node, by severity; None before one)::

    leaderless_member_health{member, status}   gauge: 1 for each member's current status
                                               (healthy, degraded, read-only, leaving), 0
                                               for the others, every status present
    leaderless_doctor_findings{severity}       gauge: findings of the last diagnosis run on
                                               this node (``leaderless doctor``, GET
                                               /api/doctor, the dashboard's Doctor panel);
                                               absent until one ran

Routing, given ``routing`` (``KvNode.routing()``: the coordinator's snitch, one entry per
replica it has asked) and ``hot_partitions`` (``KvNode.hot(HOT_PARTITIONS_EXPORTED)``)::

    leaderless_requests_by_peer_total{peer}        counter: replica requests this node sent
    leaderless_replica_latency_seconds{peer}       gauge: the snitch's latency (EWMA of read
                                                   replies, silence and idle decay applied)
    leaderless_replica_outstanding{peer}           gauge: requests awaiting that replica
    leaderless_replica_score{peer}                 gauge: latency x (1 + outstanding); lower
                                                   is asked first
    leaderless_replica_timeouts_total{peer}        counter: requests it did not answer in time
    leaderless_hot_partition_requests_per_second{keyspace, partition}
                                                   gauge: the 10 busiest partitions this node
                                                   coordinates (decaying window,
                                                   ``core.hot_partitions``); ``partition`` is
                                                   printable text or 0x-hex, cut to 64 chars

Ring changes, given ``ring`` (``runtime.ring_status.ring_metrics``: this node's ring state
and cleanup; None before the node started)::

    leaderless_ring_state{state}                   gauge: 1 for this node's ring state
                                                   (normal, joining, leaving, left), 0 for
                                                   the others, every state present
    leaderless_ring_pending_ranges                 gauge: ranges this node still has to fetch
                                                   (its stream plan; the leaderless_stream_*
                                                   series above have the details)
    leaderless_ring_waiting_for_members            gauge: members this node's leave (or
                                                   capacity shrink) waits for
    leaderless_cleanup_deleted_rows_total          counter: rows deleted by cleanup (ranges
                                                   this node no longer holds)
    leaderless_cleanup_running                     gauge: 1 while a cleanup pass runs
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Final, Literal

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from leaderless.core.hot_partitions import HotPartition, partition_label
from leaderless.core.snitch import PeerScore
from leaderless.obs.requests import RequestSnapshot, RequestStats
from leaderless.obs.system import SystemSample, SystemSampler

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
"""The Prometheus text format that ``render`` writes without an Accept header."""

PREFIX: Final = "leaderless_"

MEMBER_STATES: Final = ("alive", "suspect", "dead", "left")
"""Always exported (0 when none), so that an alert on ``dead > 0`` has a series to read."""
HEALTH_STATUSES: Final = ("healthy", "degraded", "read-only", "leaving")
"""``core.health.HealthStatus`` labels, each exported per member (1 for the current one)."""
FINDING_SEVERITIES: Final = ("critical", "warning", "info")
RING_STATES: Final = ("normal", "joining", "leaving", "left")
"""A node's own ring state (``runtime.ring_changes``), each exported (1 for the current one)."""
HOT_PARTITIONS_EXPORTED: Final = 10
"""Hot partitions exported as series: the top ten, so the label set stays small however
many keys a node serves (the sketch itself keeps 64 per keyspace; GET /api/hot-partitions)."""

COMMIT_GROUP_BOUNDS: Final = tuple(float(1 << i) for i in range(13))
"""Batches per sync: 1, 2, 4 ... 4096; larger groups land in +Inf."""

_NAME_CHARS: Final = re.compile(r"[^a-zA-Z0-9_]")

Kind = Literal["counter", "gauge"]


@dataclasses.dataclass(frozen=True, slots=True)
class KvMetric:
    name: str
    """Full metric name, without the ``_total`` that counters get in the exposition."""
    kind: Kind
    help: str


def _kv(area: str, kind: Kind, fields: Mapping[str, str]) -> dict[str, KvMetric]:
    """``<area>_<field>`` -> ``leaderless_<area>_<field>``, one kind for the area."""
    return {f"{area}_{f}": KvMetric(f"{PREFIX}{area}_{f}", kind, h) for f, h in fields.items()}


KV_METRICS: Final[Mapping[str, KvMetric]] = {
    **_kv("coordinator", "counter", {
        "writes": "Client writes this node coordinated (eventual mode).",
        "reads": "Client reads this node coordinated (eventual mode).",
        "scans": "Client scans this node coordinated.",
        "unavailable": "Requests refused: too few live replicas for the consistency level.",
        "timeouts": "Requests that timed out waiting for replicas (replica timeouts).",
        "hints_sent": "Writes for a down replica sent to a stand-in as a hint.",
        "read_repairs": "Stale replicas repaired by a read.",
        "speculative_retries": "Reads also sent to another replica because one was slow.",
        "replica_errors": "Replica replies that reported an error."}),
    "in_flight": KvMetric(PREFIX + "coordinator_in_flight", "gauge",
                          "Requests this node coordinates right now."),
    **_kv("replica", "counter", {
        "writes_applied": "Replica writes stored.",
        "writes_stale": "Replica writes ignored: older than the stored version.",
        "reads": "Replica reads served.",
        "scans": "Replica scans served.",
        "hints_stored": "Hints stored here for a down replica."}),
    "hints_pending": KvMetric(PREFIX + "hints_pending", "gauge",
                              "Hints stored here and not yet replayed."),
    **_kv("handoff", "counter", {
        "replayed": "Hints replayed to their replica.",
        "expired": "Hints dropped: older than the hint window (anti-entropy repairs them).",
        "failed": "Hint replays that failed (retried later)."}),
    **_kv("anti_entropy", "counter", {
        "sessions_started": "Anti-entropy sessions started with a peer.",
        "sessions_completed": "Anti-entropy sessions completed.",
        "sessions_timed_out": "Anti-entropy sessions abandoned: the peer did not answer.",
        "sessions_failed": "Anti-entropy sessions dropped: the peer broke the protocol.",
        "segments_compared": "Merkle segments (token ranges) compared by digest.",
        "segments_differing": "Merkle segments whose digests differed.",
        "keys_compared": "Keys compared one by one in differing segments.",
        "rows_sent": "Rows streamed to peers that lacked them or held older versions.",
        "rows_requested": "Rows this node lacked or held older and asked a peer for.",
        "rows_received": "Rows received from peers and applied.",
        "rows_accepted": "Rows pushed to this node and passed to the write path.",
        "rows_refused": "Rows pushed to this node for ranges it does not replicate.",
        "requests_answered": "Anti-entropy requests this node answered.",
        "stale_replies": "Anti-entropy replies for sessions no longer waiting."}),
    **_kv("proposer", "counter", {
        "changes": "Strong changes (CAS, incr, strong writes, locks) proposed here.",
        "rounds": "Paxos rounds started.",
        "one_rtt_rounds": "Paxos rounds that skipped the prepare phase (one round trip).",
        "refused_rounds": "Paxos rounds refused by a higher ballot (conflicts).",
        "retries": "Paxos rounds retried after a backoff.",
        "unavailable": "Strong changes refused: too few replicas up.",
        "timeouts": "Strong changes that timed out.",
        "contention": "Strong changes failed after too many conflicting rounds.",
        "duplicates": "Strong changes found already applied (idempotent retries).",
        "purges": "Strong tombstone purges proposed."}),
    **_kv("acceptor", "counter", {
        "promises": "Paxos prepares this node promised.",
        "accepts": "Paxos accepts this node accepted.",
        "refusals": "Paxos prepares or accepts refused for a lower ballot.",
        "purges": "Strong registers purged."}),
    **_kv("commit", "counter", {
        "syncs": "Storage syncs (fsyncs) completed by group commit.",
        "writes": "Rows (puts and deletes) written through group commit.",
        "batches": "Batches committed through group commit."}),
    "purged": KvMetric(PREFIX + "purged_rows", "counter",
                       "Tombstones and expired rows purged after the grace period."),
    **_kv("lock", "counter", {
        "grants": "Lock leases granted.",
        "refusals": "Lock acquisitions refused (held by another owner).",
        "fenced_writes": "Writes refused for a stale fencing token."}),
    "lock_waiting": KvMetric(PREFIX + "lock_waiting", "gauge",
                             "Lock acquisitions waiting here for the lock to be freed."),
    "watches": KvMetric(PREFIX + "watches", "gauge", "Watches held by this node's clients."),
    "watch_subscriptions": KvMetric(PREFIX + "watch_subscriptions", "gauge",
                                    "Watchers' subscriptions this node reports accepts to."),
    **_kv("watch", "counter", {
        "reports": "Accepted changes reported to subscribed watchers.",
        "events_delivered": "Watch events delivered to this node's clients.",
        "resyncs": "Watches resynchronised after reports may have been missed."}),
    **_kv("stream", "counter", {
        "bytes_in": "Bytes of rows this node fetched by range streaming (keys and values).",
        "bytes_out": "Bytes of rows this node served to peers fetching ranges.",
        "rows_in": "Rows this node fetched by range streaming.",
        "pages_in": "Stream pages received and accepted.",
        "pages_served": "Stream pages served to peers.",
        "failed_checksum": "Stream pages refused: checksum mismatch (retried).",
        "failed_error": "Stream pages that carried the source's error (retried).",
        "failed_invalid": "Stream pages refused: rows out of range or order (retried).",
        "failed_timeout": "Stream page requests unanswered in time (source set aside).",
        "source_switches": "Stream sources set aside for another after failures."}),
    **_kv("stream", "gauge", {
        "ranges_done": "Ranges of the current stream plan fetched in full.",
        "ranges_active": "Ranges of the current stream plan being fetched now.",
        "ranges_pending": "Ranges of the current stream plan not started yet.",
        "rate_bytes_per_second": "Range streaming rate over the last 10 s, bytes per second.",
        "eta_seconds": "Estimated seconds until the stream plan is fetched (-1: no estimate)."}),
    **_kv("tasks", "counter", {
        "submitted": "Tasks submitted through this node.",
        "claimed": "Tasks this node claimed (a lease with a new fencing token).",
        "succeeded": "Tasks this node ran that succeeded.",
        "failed": "Tasks this node ran that failed for good (retries exhausted or not "
                  "retryable, or lost on their last attempt).",
        "retried": "Failed runs here that were scheduled to run again after a back-off.",
        "cancelled": "Tasks cancelled through this node.",
        "released": "Tasks this node handed back as it left.",
        "lost": "Tasks this node lost while holding them (cancelled or reclaimed).",
        "zombie_results_rejected": "Results of this node refused by the fencing token (its "
                                   "lease had expired and the task was reclaimed).",
        "claim_refusals": "Claims refused (held by another node, backing off, finished).",
        "stale_entries_deleted": "Index entries of finished or vanished tasks deleted.",
        "renewals": "Task leases renewed.",
        "renew_refusals": "Task lease renewals refused (the task was cancelled or "
                          "reclaimed: its worker was stopped)."}),
    **_kv("tasks", "gauge", {
        "running": "Tasks this node holds now (claimed, running, finishing).",
        "free_slots": "Task slots of this node not in use."}),
}
"""The meaning of every key of ``KvNode.counters()``: its metric name and type."""

AUTH_EVENTS: Final[Mapping[str, str]] = {
    "auth_logins": "login",
    "auth_failed_logins": "login_failed",
    "auth_throttled_logins": "login_throttled",
    "auth_permission_denied": "permission_denied",
    "auth_unauthenticated": "unauthenticated",
}
"""``AuthService.counters()`` key -> the ``event`` label of ``leaderless_auth_events_total``.
Each event is exported even at 0, so that an alert on failed logins has a series to read;
a key not listed here is exported under its own name without the ``auth_`` prefix."""


class NodeCollector:
    """The custom collector behind ``make_registry``: reads everything at scrape time."""

    def __init__(self, status: Callable[[], Mapping[str, Any]], requests: RequestStats,
                 system: SystemSampler,
                 commit_group_sizes: Callable[[], Mapping[int, int]] | None = None,
                 commit_sync_latency: Callable[[], SyncLatency | None] | None = None,
                 auth_events: Callable[[], Mapping[str, int]] | None = None,
                 member_health: Callable[[], Mapping[str, str]] | None = None,
                 doctor_findings: Callable[[], Mapping[str, int] | None] | None = None,
                 routing: Callable[[], Sequence[PeerScore]] | None = None,
                 hot_partitions: Callable[[], Sequence[HotPartition]] | None = None,
                 ring: Callable[[], Mapping[str, Any] | None] | None = None
                 ) -> None:
        self._ring = ring
        self._status = status
        self._routing = routing
        self._hot_partitions = hot_partitions
        self._member_health = member_health
        self._doctor_findings = doctor_findings
        self._requests = requests
        self._system = system
        self._commit_group_sizes = commit_group_sizes
        self._commit_sync_latency = commit_sync_latency
        self._auth_events = auth_events

    def describe(self) -> list[Metric]:
        """Nothing: names vary with the status (unknown kv counters), so the registry does
        not check them for clashes, and registering does not scrape."""
        return []

    def collect(self) -> Iterator[Metric]:
        try:
            status = self._status()
        except RuntimeError:
            status = None  # the node is not started (or stopped): export the rest
        if status is not None:
            yield from status_families(status)
        yield from request_families(self._requests)
        yield from system_families(self._system.sample())
        if self._commit_group_sizes is not None:
            yield commit_group_family(self._commit_group_sizes())
        latency = self._commit_sync_latency() if self._commit_sync_latency else None
        if latency is not None:
            yield commit_sync_family(latency)
        if self._auth_events is not None:
            yield auth_family(self._auth_events())
        if self._member_health is not None:
            try:
                yield member_health_family(self._member_health())
            except RuntimeError:
                pass  # not started
        findings = self._doctor_findings() if self._doctor_findings else None
        if findings is not None:
            yield doctor_findings_family(findings)
        try:
            if self._routing is not None:
                yield from routing_families(self._routing())
            if self._hot_partitions is not None:
                yield hot_partitions_family(self._hot_partitions())
            ring = self._ring() if self._ring is not None else None
            if ring is not None:
                yield from ring_families(ring)
        except RuntimeError:
            pass  # not started


def make_registry(status: Callable[[], Mapping[str, Any]], requests: RequestStats,
                  system: SystemSampler, *,
                  commit_group_sizes: Callable[[], Mapping[int, int]] | None = None,
                  commit_sync_latency: Callable[[], SyncLatency | None] | None = None,
                  auth_events: Callable[[], Mapping[str, int]] | None = None,
                  member_health: Callable[[], Mapping[str, str]] | None = None,
                  doctor_findings: Callable[[], Mapping[str, int] | None] | None = None,
                  routing: Callable[[], Sequence[PeerScore]] | None = None,
                  hot_partitions: Callable[[], Sequence[HotPartition]] | None = None,
                  ring: Callable[[], Mapping[str, Any] | None] | None = None,
                  ) -> CollectorRegistry:
    """A fresh registry exposing one node. ``status`` returns the node's ``StatusReply``
    as a plain dict (``msgspec.structs.asdict``); it may raise ``RuntimeError`` while the
    node is not started, and the scrape then has only the request and machine families.
    ``auth_events`` returns ``AuthService.counters()`` ({} before the service exists)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(status, requests, system, commit_group_sizes,
                                    commit_sync_latency, auth_events, member_health,
                                    doctor_findings, routing, hot_partitions, ring))
    return registry


def render(registry: CollectorRegistry, accept: str | None = None) -> tuple[bytes, str]:
    """The exposition body and its content type. Without ``accept`` (the request's Accept
    header) it is the classic text format; with one, OpenMetrics when the scraper asks."""
    if accept is None:
        return generate_latest(registry), CONTENT_TYPE
    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type


# -- status ----------------------------------------------------------------------------


def status_families(status: Mapping[str, Any]) -> Iterator[Metric]:
    info = GaugeMetricFamily(PREFIX + "node_info", "This node's name and version.",
                             labels=["name", "version"])
    info.add_metric([str(status["name"]), str(status["version"])], 1)
    yield info
    members = GaugeMetricFamily(PREFIX + "members", "Members by state, as this node sees "
                                "them (itself included).", labels=["state"])
    states: dict[str, int] = dict.fromkeys(MEMBER_STATES, 0)
    states.update(status["states"])
    for state, n in sorted(states.items()):
        members.add_metric([state], n)
    yield members
    yield GaugeMetricFamily(PREFIX + "incarnation", "This node's incarnation (raised to "
                            "refute a suspicion).", value=status["incarnation"])
    yield GaugeMetricFamily(PREFIX + "uptime_seconds", "Seconds since the node started.",
                            value=status["uptime_s"])
    yield GaugeMetricFamily(PREFIX + "pending_broadcasts", "Membership updates waiting to "
                            "be gossiped.", value=status["pending_broadcasts"])
    for field, value in status["membership"].items():
        yield CounterMetricFamily(
            _name(f"membership_{field}"),
            f"Membership protocol: {field.replace('_', ' ')} since the node started.",
            value=value)
    runtime: Mapping[str, Mapping[str, int]] = status["runtime"]
    for group, kinds in runtime.items():
        if group != "kv":
            yield _kind_family(group, kinds)
    yield from kv_families(runtime.get("kv", {}))


def _kind_family(group: str, kinds: Mapping[str, int]) -> Metric:
    what = f"I/O layer: {group.removesuffix('_total').replace('_', ' ')}, by kind."
    family: CounterMetricFamily | GaugeMetricFamily
    if group.endswith("_total"):
        family = CounterMetricFamily(_name(group), what, labels=["kind"])
    else:
        family = GaugeMetricFamily(_name(group), what, labels=["kind"])
    for kind, n in sorted(kinds.items()):
        family.add_metric([kind], n)
    return family


def kv_families(counters: Mapping[str, int]) -> Iterator[Metric]:
    seen: set[str] = set()
    for key, value in sorted(counters.items()):
        spec = KV_METRICS.get(key)
        if spec is None:
            spec = KvMetric(_name(f"kv_{key}"), "gauge",
                            f"KV counter {key!r} (not yet described in obs.metrics).")
        if spec.name in seen:
            continue  # two unknown keys that differ only in characters a name cannot hold
        seen.add(spec.name)
        if spec.kind == "counter":
            yield CounterMetricFamily(spec.name, spec.help, value=value)
        else:
            yield GaugeMetricFamily(spec.name, spec.help, value=value)


def _le(bound: float) -> str:
    """A bucket bound as prometheus_client writes its own (Go's float format)."""
    return str(floatToGoString(bound))  # type: ignore[no-untyped-call]


def _name(suffix: str) -> str:
    """``leaderless_<suffix>`` with characters a metric name cannot hold replaced."""
    return PREFIX + _NAME_CHARS.sub("_", suffix)


# -- requests --------------------------------------------------------------------------


def request_families(requests: RequestStats) -> Iterator[Metric]:
    snapshot = requests.snapshot()
    yield _latency_family(snapshot)
    errors = CounterMetricFamily(PREFIX + "request_errors_total", "Client requests that "
                                 "failed, by operation and error code.",
                                 labels=["operation", "code"])
    for e in snapshot.errors:
        errors.add_metric([e.operation, e.code], e.count)
    yield errors
    yield GaugeMetricFamily(PREFIX + "request_recent_ops_per_second", "Client requests per "
                            "second over the last 10 complete seconds.",
                            value=requests.ops_per_s())
    yield GaugeMetricFamily(PREFIX + "request_recent_p99_seconds", "99th percentile client "
                            "request latency over the last 10 complete seconds.",
                            value=requests.p99_ms() / 1000.0)


def _latency_family(snapshot: RequestSnapshot) -> HistogramMetricFamily:
    family = HistogramMetricFamily(
        PREFIX + "request_duration_seconds", "Client request latency as this node served "
        "it, by operation and consistency level.", labels=["operation", "consistency"])
    les = [_le(b) for b in snapshot.bounds_s] + ["+Inf"]
    for series in snapshot.latency:
        buckets = list(zip(les, series.cumulative(), strict=True))
        family.add_metric([series.operation, series.consistency], buckets, series.sum_s)
    return family


# -- machine ---------------------------------------------------------------------------


_SYSTEM_GAUGES: Final = (
    ("system_cpu_percent", "cpu_percent", "Busy share of all the machine's CPUs (0-100)."),
    ("system_cpus", "cpu_count", "Logical CPUs of the machine."),
    ("process_cpu_percent", "process_cpu_percent",
     "This node process's CPU use in percent of one CPU."),
    ("process_resident_memory_bytes", "process_rss_bytes", "This node process's RSS."),
    ("system_memory_used_bytes", "memory_used_bytes", "Machine memory in use (total minus "
     "available)."),
    ("system_memory_total_bytes", "memory_total_bytes", "Machine memory."),
    ("system_disk_used_bytes", "disk_used_bytes", "Used space of the data dir's filesystem."),
    ("system_disk_free_bytes", "disk_free_bytes", "Free space of the data dir's filesystem "
     "(for an unprivileged user)."),
    ("system_disk_total_bytes", "disk_total_bytes", "Size of the data dir's filesystem."),
    ("system_load1", "load_1m", "Machine load average over 1 minute."),
    ("system_load5", "load_5m", "Machine load average over 5 minutes."),
    ("system_load15", "load_15m", "Machine load average over 15 minutes."),
)
_SYSTEM_COUNTERS: Final = (
    ("system_disk_read_bytes_total", "disk_read_bytes", "Bytes read from the machine's disks."),
    ("system_disk_written_bytes_total", "disk_write_bytes", "Bytes written to the machine's "
     "disks."),
    ("system_disk_reads_total", "disk_reads", "Reads completed by the machine's disks."),
    ("system_disk_writes_total", "disk_writes", "Writes completed by the machine's disks."),
    ("system_network_sent_bytes_total", "network_sent_bytes", "Bytes the machine sent."),
    ("system_network_received_bytes_total", "network_received_bytes",
     "Bytes the machine received."),
    ("system_network_sent_packets_total", "network_sent_packets", "Packets the machine sent."),
    ("system_network_received_packets_total", "network_received_packets",
     "Packets the machine received."),
)


def system_families(sample: SystemSample) -> Iterable[Metric]:
    families: list[Metric] = [
        GaugeMetricFamily(PREFIX + name, help_, value=getattr(sample, field))
        for name, field, help_ in _SYSTEM_GAUGES]
    families += [CounterMetricFamily(PREFIX + name, help_, value=getattr(sample, field))
                 for name, field, help_ in _SYSTEM_COUNTERS]
    available = GaugeMetricFamily(PREFIX + "system_source_available", "1 if the OS gives "
                                  "this source's figures; 0: they read as zeros.",
                                  labels=["source"])
    for source in ("disk_usage", "disk_io", "network_io"):
        available.add_metric([source], 1 if getattr(sample, f"{source}_available") else 0)
    families.append(available)
    return families


# -- storage ---------------------------------------------------------------------------


SyncLatency = tuple[Sequence[float], Sequence[int], float]
"""(bucket bounds in seconds, counts per bound then +Inf, total seconds):
``GroupCommit.sync_bounds_s``, ``sync_counts``, ``sync_seconds``."""


def commit_sync_family(latency: SyncLatency) -> HistogramMetricFamily:
    """How long each storage sync (the fsync of a group commit) took."""
    bounds, counts, total_s = latency
    family = HistogramMetricFamily(PREFIX + "commit_sync_duration_seconds", "Duration of "
                                   "one storage sync (group commit fsync).", labels=[])
    buckets: list[tuple[str, float]] = []
    running = 0
    for bound, count in zip(bounds, counts, strict=False):
        running += count
        buckets.append((_le(bound), running))
    buckets.append(("+Inf", sum(counts)))
    family.add_metric([], buckets, total_s)
    return family


def commit_group_family(group_sizes: Mapping[int, int]) -> HistogramMetricFamily:
    """``GroupCommit.group_sizes`` (power-of-two bucket -> syncs) as a histogram."""
    family = HistogramMetricFamily(PREFIX + "commit_group_batches", "Batches covered by one "
                                   "storage sync (group commit).", labels=[])
    buckets: list[tuple[str, float]] = []
    running = 0
    for bound in COMMIT_GROUP_BOUNDS:
        running += sum(n for size, n in group_sizes.items() if bound / 2 < size <= bound)
        buckets.append((_le(bound), running))
    buckets.append(("+Inf", sum(group_sizes.values())))
    family.add_metric([], buckets, None)
    return family


# -- authentication ----------------------------------------------------------------------


def auth_family(counters: Mapping[str, int]) -> CounterMetricFamily:
    """Logins, failed and throttled logins, permission denials and requests refused for a
    missing or invalid token (``AuthService.counters()``), one series per event."""
    family = CounterMetricFamily(PREFIX + "auth_events_total", "Authentication and "
                                 "authorization events since the node started: logins, "
                                 "failed logins, throttled logins, permission denials, "
                                 "requests without a valid token.", labels=["event"])
    events: dict[str, int] = dict.fromkeys(AUTH_EVENTS.values(), 0)
    for key, n in counters.items():
        event = AUTH_EVENTS.get(key) or _NAME_CHARS.sub("_", key.removeprefix("auth_"))
        events[event] = n
    for event, n in sorted(events.items()):
        family.add_metric([event], n)
    return family


def member_health_family(health: Mapping[str, str]) -> GaugeMetricFamily:
    """Each member's gossiped health status: 1 for its current one, 0 for the others."""
    family = GaugeMetricFamily(PREFIX + "member_health", "Each member's health status as "
                               "gossiped (1: its current status).", labels=["member", "status"])
    for member, current in sorted(health.items()):
        for status in HEALTH_STATUSES:
            family.add_metric([member, status], 1 if status == current else 0)
    return family


def doctor_findings_family(counts: Mapping[str, int]) -> GaugeMetricFamily:
    """Findings of the last doctor run on this node, by severity (every severity present)."""
    family = GaugeMetricFamily(PREFIX + "doctor_findings", "Findings of the last doctor "
                               "diagnosis run on this node, by severity.", labels=["severity"])
    for severity in FINDING_SEVERITIES:
        family.add_metric([severity], counts.get(severity, 0))
    return family



# -- routing ---------------------------------------------------------------------------


def routing_families(peers: Sequence[PeerScore]) -> Iterator[Metric]:
    """The coordinator's snitch (``core.snitch``): per replica it asks, requests sent, the
    latency and score it routes reads by, requests outstanding and timeouts."""
    sent = CounterMetricFamily(PREFIX + "requests_by_peer_total", "Replica requests this "
                               "node sent to each peer (reads, writes, repairs).",
                               labels=["peer"])
    latency = GaugeMetricFamily(PREFIX + "replica_latency_seconds", "Each replica's reply "
                                "latency as the dynamic snitch sees it (EWMA of read replies; "
                                "at least the current silence; decays to the mean when idle).",
                                labels=["peer"])
    outstanding = GaugeMetricFamily(PREFIX + "replica_outstanding", "Requests sent to each "
                                    "replica and not yet answered.", labels=["peer"])
    score = GaugeMetricFamily(PREFIX + "replica_score", "The dynamic snitch's score of each "
                              "replica: latency x (1 + outstanding); reads ask the lowest "
                              "first.", labels=["peer"])
    timeouts = CounterMetricFamily(PREFIX + "replica_timeouts_total", "Replica requests "
                                   "that got no answer before the request's timeout.",
                                   labels=["peer"])
    for peer in peers:
        sent.add_metric([peer.name], peer.requests)
        latency.add_metric([peer.name], peer.latency_s)
        outstanding.add_metric([peer.name], peer.outstanding)
        score.add_metric([peer.name], peer.score)
        timeouts.add_metric([peer.name], peer.timeouts)
    yield from (sent, latency, outstanding, score, timeouts)


def hot_partitions_family(hot: Sequence[HotPartition]) -> GaugeMetricFamily:
    """The busiest partitions this node coordinates (at most ``HOT_PARTITIONS_EXPORTED``)."""
    family = GaugeMetricFamily(PREFIX + "hot_partition_requests_per_second", "Requests per "
                               "second to the busiest partitions this node coordinates "
                               "(top 10, decaying window; partition: text or 0x-hex, cut "
                               "to 64 characters).", labels=["keyspace", "partition"])
    seen: set[tuple[str, str]] = set()
    for h in hot[:HOT_PARTITIONS_EXPORTED]:
        labels = (h.keyspace, partition_label(h.partition))
        if labels in seen:
            continue  # two long keys that share their first 61 characters
        seen.add(labels)
        family.add_metric(list(labels), h.requests_per_s)
    return family


# -- ring changes -----------------------------------------------------------------------


def ring_families(ring: Mapping[str, Any]) -> Iterator[Metric]:
    """This node's ring state, ranges to fetch, members a leave waits for, and cleanup
    (``runtime.ring_status.ring_metrics``)."""
    state = GaugeMetricFamily(PREFIX + "ring_state", "This node's ring state: 1 for the "
                              "current one (normal, joining, leaving, left).", labels=["state"])
    for name in RING_STATES:
        state.add_metric([name], 1 if ring["state"] == name else 0)
    yield state
    yield GaugeMetricFamily(PREFIX + "ring_pending_ranges", "Ranges this node still has to "
                            "fetch (its stream plan, during a join, replace or capacity "
                            "change, or while taking over a leaver's ranges).",
                            value=ring["pending_ranges"])
    yield GaugeMetricFamily(PREFIX + "ring_waiting_for_members", "Members this node's leave "
                            "(or capacity shrink) waits for: they have not fetched its "
                            "ranges yet.", value=ring["waiting_for"])
    yield CounterMetricFamily(PREFIX + "cleanup_deleted_rows", "Rows this node deleted by "
                              "cleanup: ranges it no longer holds.",
                              value=ring["cleanup_deleted_rows"])
    yield GaugeMetricFamily(PREFIX + "cleanup_running", "1 while a cleanup pass runs here.",
                            value=1 if ring["cleanup_running"] else 0)
