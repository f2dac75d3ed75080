"""The native client protocol: msgpack frames on the node's TCP port.

Clients (the CLI, tests, tools) use the same port and the same length-prefixed framing
as peers (``core.codec``). A connection carries requests one after another; each request
gets exactly one reply frame, except ``EventWatchRequest`` which gets ``WatchStarted`` and
then an ``EventNotification`` per delivered user event until either side closes.

Tags start at 100 so they never clash with the membership protocol's tags (1..20), which
share the frame decoder. Like those, they are the wire protocol: append-only.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from leaderless.core.messages import (
    EVENT_NAME_BYTES_MAX,
    EVENT_PAYLOAD_BYTES_MAX,
    TAG_COUNT_MAX,
    Incarnation,
    LamportTime,
    LoadSummary,
    Name,
    TagKey,
    TagValue,
)
from leaderless.security.keyring import KEY_TEXT_BYTES_MAX, KEYS_MAX, SEAL_OVERHEAD_BYTES

MEMBERS_MAX = 20_000
"""A members reply lists at most this many members: the largest cluster we support."""
TEXT_BYTES_MAX = 1024
COUNTERS_MAX = 256
KEYRING_CHANGE_BYTES_MAX = SEAL_OVERHEAD_BYTES + 64
"""A sealed keyring change: an operation name and a 32-byte key inside the envelope."""

Text = Annotated[str, msgspec.Meta(max_length=TEXT_BYTES_MAX)]
EventName = Annotated[str, msgspec.Meta(min_length=1, max_length=EVENT_NAME_BYTES_MAX)]
Payload = Annotated[bytes, msgspec.Meta(max_length=EVENT_PAYLOAD_BYTES_MAX)]
CounterMap = Annotated[dict[Text, int], msgspec.Meta(max_length=COUNTERS_MAX)]


# -- requests ---------------------------------------------------------------------------


class MembersRequest(msgspec.Struct, frozen=True, array_like=True, tag=100):
    """List every member this node knows, itself included."""


class EventSendRequest(msgspec.Struct, frozen=True, array_like=True, tag=102):
    """Broadcast a user event from this node to the whole cluster."""

    name: EventName
    payload: Payload


class EventWatchRequest(msgspec.Struct, frozen=True, array_like=True, tag=104):
    """Stream every user event this node delivers from now on."""


class StatusRequest(msgspec.Struct, frozen=True, array_like=True, tag=107):
    """This node's identity, counts and counters."""


KEYRING_OPERATIONS = ("list", "install", "use", "remove")
KeyringOperation = Literal["list", "install", "use", "remove"]
KeyText = Annotated[str, msgspec.Meta(max_length=KEY_TEXT_BYTES_MAX)]


class KeyringRequest(msgspec.Struct, frozen=True, array_like=True, tag=230):
    """Change (or list) the gossip keyring of every alive member: the node that receives
    this applies it, sends it on to the others (``KeyringChange``) and answers with each
    node's result (``KeyringReply``)."""

    operation: KeyringOperation
    key: KeyText = ""
    """The base64 key for install, use and remove; empty for list."""


# -- replies ----------------------------------------------------------------------------


class MemberInfo(msgspec.Struct, frozen=True, array_like=True):
    name: Name
    address: Text
    state: Text
    """alive | suspect | dead | left"""
    incarnation: Incarnation
    zone: Text
    weight: float
    tags: Annotated[dict[TagKey, TagValue], msgspec.Meta(max_length=TAG_COUNT_MAX)]
    changed_at: float
    """Unix time (seconds) when this node saw the state change."""
    load: LoadSummary | None = None
    """What the member last gossiped about its load (None: nothing yet)."""


class MembersReply(msgspec.Struct, frozen=True, array_like=True, tag=101):
    members: Annotated[list[MemberInfo], msgspec.Meta(max_length=MEMBERS_MAX)]


class EventSendReply(msgspec.Struct, frozen=True, array_like=True, tag=103):
    origin: Name
    ltime: LamportTime


class WatchStarted(msgspec.Struct, frozen=True, array_like=True, tag=105):
    """Events delivered after this frame will be streamed."""


class EventNotification(msgspec.Struct, frozen=True, array_like=True, tag=106):
    name: EventName
    origin: Name
    ltime: LamportTime
    payload: Payload


class StatusReply(msgspec.Struct, frozen=True, array_like=True, tag=108):
    name: Name
    address: Text
    incarnation: Incarnation
    version: Text
    uptime_s: float
    states: CounterMap
    """Members by state as this node sees them, e.g. {"alive": 5}."""
    pending_broadcasts: int
    membership: CounterMap
    """The membership protocol's counters (core.MembershipCounters)."""
    runtime: Annotated[dict[Text, CounterMap], msgspec.Meta(max_length=16)]
    """The I/O layer's counters by name and kind (runtime.RuntimeCounters)."""


class ErrorReply(msgspec.Struct, frozen=True, array_like=True, tag=109):
    """The request was understood but refused; ``message`` says why and what to do."""

    code: Text
    message: Text


class KeyringNodeResult(msgspec.Struct, frozen=True, array_like=True):
    """One node's answer to a keyring operation."""

    node: Name
    ok: bool
    error: Text = ""
    """Why this node did not apply it (refused, unreachable, timed out)."""
    key_ids: Annotated[list[Text], msgspec.Meta(max_length=KEYS_MAX)] = []
    """The node's installed keys by id (never the keys), its primary first."""


class KeyringReply(msgspec.Struct, frozen=True, array_like=True, tag=231):
    operation: KeyringOperation
    results: Annotated[list[KeyringNodeResult], msgspec.Meta(max_length=MEMBERS_MAX)]
    """One per alive member, the answering node first."""


# -- peer frames (node to node; not client requests) ------------------------------------


class KeyringChange(msgspec.Struct, frozen=True, array_like=True, tag=232):
    """A keyring operation sent on by the node a client asked. ``sealed`` is the operation
    and key sealed under the sender's primary gossip key: only a holder of a current
    cluster key can change a node's keyring, and the key never crosses the wire in clear."""

    sealed: Annotated[bytes, msgspec.Meta(max_length=KEYRING_CHANGE_BYTES_MAX)]


class KeyringChangeReply(msgspec.Struct, frozen=True, array_like=True, tag=233):
    result: KeyringNodeResult


# -- doctor (``leaderless doctor``): a client request, and the per-node report peers give --

FINDINGS_MAX = 4096
"""Findings in one doctor reply: a handful per member of the largest cluster we diagnose
in full; past it the reply keeps the most severe (``obs.doctor``)."""
RANGES_MAX = 4096
"""Anti-entropy ranges (keyspace, peer) in one node's report."""
PEER_OFFSETS_MAX = 1024
"""Clock offsets in one node's report: its estimate for each peer it probes."""
Severity = Literal["critical", "warning", "info"]


class DoctorRequest(msgspec.Struct, frozen=True, array_like=True, tag=234):
    """Diagnose the whole cluster: the asked node gathers every alive member's report
    (``DoctorReportRequest``) and answers with the findings (``DoctorReply``)."""


class Finding(msgspec.Struct, frozen=True, array_like=True):
    """One thing wrong (or worth knowing) in the cluster, and what to do about it."""

    severity: Severity
    check: Text
    """The check that found it: members, health, clock, disk, hints, anti_entropy, tls,
    versions, replication, reachability."""
    subject: Text
    """What it is about: a member's name, a keyspace, ``cluster``."""
    message: Text
    fix: Text


class DoctorReply(msgspec.Struct, frozen=True, array_like=True, tag=235):
    findings: Annotated[list[Finding], msgspec.Meta(max_length=FINDINGS_MAX)]
    """The most severe first."""
    checked_at: float
    """Unix time when the asked node finished gathering."""
    asked: Name
    """The node that gathered the reports."""


class DoctorReportRequest(msgspec.Struct, frozen=True, array_like=True, tag=236):
    """A node asks a peer for its local facts (peer frame)."""


class RangeLag(msgspec.Struct, frozen=True, array_like=True):
    """How long since this node last compared the ranges it shares with ``peer`` for
    ``keyspace`` (a completed anti-entropy session)."""

    keyspace: Text
    peer: Name
    lag_s: float
    """Since the last completed comparison, or since the node started if none yet."""
    compared: bool
    """False: never compared since this node started."""
    expected_s: float
    """About how often this pair is compared (``AntiEntropyConfig.interval_s`` formula)."""


class DoctorReport(msgspec.Struct, frozen=True, array_like=True, tag=237):
    """One node's local facts for the doctor: what gossip does not carry."""

    node: Name
    version: Text
    uptime_s: float
    hints_pending: int
    oldest_hint_age_s: float | None
    """Age of the oldest stored hint (None: no hints)."""
    disk_free_pct: float | None
    """Free space of the data dir's filesystem (None: the OS does not tell)."""
    disk_free_bytes: int
    disk_growth_bytes_per_h: float | None
    """Growth of the used space over the last hour of samples (None: too few yet)."""
    ranges: Annotated[list[RangeLag], msgspec.Meta(max_length=RANGES_MAX)]
    clock_offsets_ms: Annotated[dict[Name, float], msgspec.Meta(max_length=PEER_OFFSETS_MAX)]
    """This node's estimate of each peer's clock minus its own."""
    cert_expires_at: float | None
    """Unix time its node certificate expires (None: TLS off)."""


# -- ring changes (``leaderless node decommission|set-capacity|cleanup``, ``ring status``) --

RING_OPERATIONS = ("status", "decommission", "set_capacity", "cleanup")
RingOperation = Literal["status", "decommission", "set_capacity", "cleanup"]
WAITING_FOR_MAX = 1024
"""Members named in one report's ``waiting_for`` (the rest are counted, not named)."""
RING_STATES_MAX = 16
"""Distinct states in a summary's ``states`` (there are six)."""


class RingRequest(msgspec.Struct, frozen=True, array_like=True, tag=238):
    """A ring operation on the asked node, answered with the cluster's ring status
    (``RingReply``): ``status`` only gathers it; ``decommission``, ``set_capacity``
    (``weight``: the new capacity weight) and ``cleanup`` act on the asked node first.
    A refusal is an ``ErrorReply`` with code ``ring_refused``."""

    operation: RingOperation
    weight: float = 0.0


class StreamFigures(msgspec.Struct, frozen=True, array_like=True):
    """A member's range fetch (``core.streaming.StreamProgress``)."""

    ranges_total: int
    ranges_done: int
    ranges_active: int
    bytes_received: int
    bytes_per_s: float
    eta_s: float | None
    """Estimated seconds left (None: no estimate yet)."""


class CleanupFigures(msgspec.Struct, frozen=True, array_like=True):
    """A member's cleanup of the ranges it no longer holds (``runtime.cleanup``)."""

    running: bool
    deleted_rows: int
    """Rows deleted since the node started."""
    last_finished_at: float | None
    """Unix time the last complete pass ended (None: none yet)."""
    error: Text = ""
    """Why the last pass stopped or was refused (empty: it did not)."""


class RingReportRequest(msgspec.Struct, frozen=True, array_like=True, tag=240):
    """A node asks a peer for its own ring figures (peer frame)."""


class RingReport(msgspec.Struct, frozen=True, array_like=True, tag=241):
    """One member's own view of its ring change: what gossip does not carry."""

    node: Name
    state: Text
    """normal | joining | leaving | left (its saved ring state)."""
    token_count: int
    next_token_count: int
    replacing: Text
    stream: StreamFigures
    waiting_for: Annotated[list[Name], msgspec.Meta(max_length=WAITING_FOR_MAX)]
    """Members a leave or a shrink waits for (not yet synced)."""
    waiting_more: int
    """Members it also waits for, beyond ``waiting_for``."""
    error: Text
    """Why its change cannot go on now (empty: nothing stops it)."""
    settled: bool
    """Its view of the placement has been unchanged for ``ring.settle_s``."""
    cleanup: CleanupFigures


class RingMember(msgspec.Struct, frozen=True, array_like=True):
    """One member in a ring status: gossip's view, plus its own report if it gave one."""

    name: Name
    address: Text
    """Its node port (HOST:PORT)."""
    state: Text
    """normal | joining | leaving | left | dead: the ring state, or the member status when
    it is dead or left."""
    status: Text
    """alive | suspect | dead | left (membership)."""
    token_count: int
    next_token_count: int
    replacing: Text
    ownership: float
    """Its share of the token space in the current ring (as primary), 0..1."""
    reported: bool
    """It answered the report request (False: the figures below are empty)."""
    stream: StreamFigures | None = None
    waiting_for: Annotated[list[Name], msgspec.Meta(max_length=WAITING_FOR_MAX)] = []
    waiting_more: int = 0
    error: Text = ""
    """Its own error, or why it gave no report."""
    settled: bool = False
    cleanup: CleanupFigures | None = None


class RingSummary(msgspec.Struct, frozen=True, array_like=True):
    members: int
    states: Annotated[dict[Text, int], msgspec.Meta(max_length=RING_STATES_MAX)]
    changing: bool
    """A change is in progress in the asked node's view (writes reach pending replicas)."""
    streaming: int
    """Members with ranges still to fetch."""
    ranges_total: int
    ranges_done: int
    bytes_received: int
    bytes_per_s: float
    eta_s: float | None
    """The longest ETA of the streaming members (None: none streams, or no estimate)."""


class RingReply(msgspec.Struct, frozen=True, array_like=True, tag=239):
    operation: RingOperation
    asked: Name
    checked_at: float
    """Unix time when the asked node finished gathering."""
    members: Annotated[list[RingMember], msgspec.Meta(max_length=MEMBERS_MAX)]
    """By name."""
    summary: RingSummary


Request = (MembersRequest | EventSendRequest | EventWatchRequest | StatusRequest
           | KeyringRequest | DoctorRequest | RingRequest)
Reply = (MembersReply | EventSendReply | WatchStarted | EventNotification | StatusReply
         | ErrorReply | KeyringReply | DoctorReply | RingReply)
