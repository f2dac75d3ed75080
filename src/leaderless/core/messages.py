"""Wire messages of the membership protocol.

Every message is a typed msgspec ``Struct`` with an explicit bound on every field a peer
controls, so a hostile or broken peer cannot make us allocate without limit: decoding
validates the bounds and rejects the frame (see ``core.codec``). Text limits count
characters, as msgspec does (up to 4 bytes each in UTF-8); the packet builder measures
encoded bytes, so a long name costs room, never correctness.

The integer tags are the wire protocol: they are append-only. Never renumber or reuse one.
"""

from __future__ import annotations

import enum
from typing import Annotated

import msgspec

from leaderless.core.health import HealthState

# -- limits (each one is a promise to peers and a defence against them) ------------------

NAME_BYTES_MAX = 64
"""A node name: short enough to print in a table, long enough for a host name."""
HOST_BYTES_MAX = 253
"""A DNS name is at most 253 characters; an IPv6 literal is far shorter."""
TAG_COUNT_MAX = 16
TAG_BYTES_MAX = 64
ZONE_BYTES_MAX = 64
VERSION_BYTES_MAX = 32
EVENT_NAME_BYTES_MAX = 64
EVENT_PAYLOAD_BYTES_MAX = 512
"""The issue's promise for user events: a payload of up to 512 bytes."""
PACKET_MESSAGES_MAX = 64
"""Messages in one UDP packet; a 1,400-byte packet cannot honestly hold more."""
PUSH_PULL_MEMBERS_MAX = 20_000
"""Members in one full-state sync: the largest cluster we claim to support, with margin."""
PUSH_PULL_EVENTS_MAX = 256

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=NAME_BYTES_MAX)]
Host = Annotated[str, msgspec.Meta(min_length=1, max_length=HOST_BYTES_MAX)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Incarnation = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Seq = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
LamportTime = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
TagKey = Annotated[str, msgspec.Meta(min_length=1, max_length=TAG_BYTES_MAX)]
TagValue = Annotated[str, msgspec.Meta(max_length=TAG_BYTES_MAX)]


class Address(msgspec.Struct, frozen=True, array_like=True):
    """Where a node listens: the same port serves UDP (probes, gossip) and TCP (sync, RPC)."""

    host: Host
    port: Port

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


class LoadSummary(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True):
    """How busy a member is, as it last said (``runtime.node`` refreshes it every few
    seconds when it changed enough): any node can show every member's load without a
    central collector. About 20 bytes on the wire."""

    cpu_pct: Annotated[int, msgspec.Meta(ge=0, le=100)] = 0
    mem_pct: Annotated[int, msgspec.Meta(ge=0, le=100)] = 0
    disk_pct: Annotated[int, msgspec.Meta(ge=0, le=100)] = 0
    """Of the filesystem holding the member's data dir."""
    ops_per_s: Annotated[int, msgspec.Meta(ge=0, le=2**31)] = 0
    """Client requests per second served, over the last seconds."""
    p99_ms: Annotated[float, msgspec.Meta(ge=0, le=1e6)] = 0.0


class RingMeta(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True):
    """A member's ring-change fields (``core.placement``)."""

    state: Annotated[int, msgspec.Meta(ge=0, le=2)] = 0
    """``core.placement.RingState``: normal, joining (streaming its ranges in) or leaving
    (streaming them away)."""
    replacing: Annotated[str, msgspec.Meta(max_length=NAME_BYTES_MAX)] = ""
    """The dead member whose tokens this joining member takes over (``--replace``)."""
    next_token_count: Annotated[int, msgspec.Meta(ge=0, le=4096)] = 0
    """A capacity change in progress: the token count this member is moving to."""
    synced: Annotated[int, msgspec.Meta(ge=0)] = 0
    """Digest of the base ring (``core.placement``) whose ranges this member holds."""


class NodeMeta(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True):
    """What a member says about itself; spreads like any other update."""

    zone: Annotated[str, msgspec.Meta(max_length=ZONE_BYTES_MAX)] = ""
    weight_milli: Annotated[int, msgspec.Meta(gt=0, le=1_000_000)] = 1000
    """Capacity weight in thousandths (``weight``): 3 bytes on the wire where a float
    takes 9, in every alive update."""
    tags: Annotated[dict[TagKey, TagValue], msgspec.Meta(max_length=TAG_COUNT_MAX)] = {}
    version: Annotated[str, msgspec.Meta(max_length=VERSION_BYTES_MAX)] = ""
    token_seed: Annotated[int, msgspec.Meta(ge=0)] = 0
    """The ring tokens are derived from (token_seed, token_count) (``core.ring``): two
    integers instead of hundreds of tokens keep an alive update in one datagram."""
    token_count: Annotated[int, msgspec.Meta(ge=0, le=4096)] = 0
    """0: the member holds no data (it is not on the ring)."""
    client_port: Port = 0
    """The member's native client port (same host as its address); 0: none."""
    http_port: Port = 0
    load: LoadSummary | None = None
    health: HealthState | None = None
    """What the member says of its own health (``core.health``); None: healthy, or a
    member from before health was gossiped. At most ~70 bytes (REASON_BYTES_MAX), so an
    alive update with load and health still fits one datagram."""
    ring: RingMeta | None = None
    """Where the member stands in ring changes (``core.placement``); None: normal, no
    change, nothing synced (one byte on the wire: every alive update carries the meta, and
    its size is what a datagram's piggybacked updates are counted in)."""

    @property
    def weight(self) -> float:
        return self.weight_milli / 1000

    @property
    def ring_state(self) -> int:
        return self.ring.state if self.ring is not None else 0

    @property
    def replacing(self) -> str:
        return self.ring.replacing if self.ring is not None else ""

    @property
    def next_token_count(self) -> int:
        return self.ring.next_token_count if self.ring is not None else 0

    @property
    def synced(self) -> int:
        return self.ring.synced if self.ring is not None else 0


RING_FIELDS = ("ring_state", "replacing", "next_token_count", "synced")
"""``NodeMeta``'s ring fields (in ``NodeMeta.ring``), as ``with_fields`` takes them."""


def with_fields(meta: NodeMeta, **fields: object) -> NodeMeta:
    """``meta`` with the given fields changed: top-level ones, and the ring fields
    (``RING_FIELDS``), which live in ``meta.ring``."""
    ring = {name: fields.pop(name) for name in RING_FIELDS if name in fields}
    if ring:
        current = meta.ring or RingMeta()
        names = {"ring_state": "state"}
        changed = msgspec.structs.replace(
            current, **{names.get(k, k): v for k, v in ring.items()})
        fields["ring"] = None if changed == RingMeta() else changed
    return msgspec.structs.replace(meta, **fields)


class MemberStatus(enum.IntEnum):
    """A member's state as this node sees it. Values are on the wire: append-only."""

    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3


# -- gossip updates (piggybacked on UDP packets) ------------------------------------------


class Alive(msgspec.Struct, frozen=True, array_like=True, tag=1):
    name: Name
    incarnation: Incarnation
    address: Address
    meta: NodeMeta


class Suspect(msgspec.Struct, frozen=True, array_like=True, tag=2):
    name: Name
    incarnation: Incarnation
    accuser: Name


class Dead(msgspec.Struct, frozen=True, array_like=True, tag=3):
    name: Name
    incarnation: Incarnation
    accuser: Name


class Left(msgspec.Struct, frozen=True, array_like=True, tag=4):
    """A graceful leave, announced by the leaving node itself."""

    name: Name
    incarnation: Incarnation


class UserEvent(msgspec.Struct, frozen=True, array_like=True, tag=5):
    """A named event broadcast by ``origin``; (origin, origin_incarnation, ltime) identifies
    it. The incarnation keeps ids unique across restarts, since the Lamport clock is not
    persisted and a restarted node counts again from where the cluster lets it."""

    origin: Name
    origin_incarnation: Incarnation
    ltime: LamportTime
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=EVENT_NAME_BYTES_MAX)]
    payload: Annotated[bytes, msgspec.Meta(max_length=EVENT_PAYLOAD_BYTES_MAX)]


Update = Alive | Suspect | Dead | Left | UserEvent

# -- probe messages (UDP) -----------------------------------------------------------------


class Ping(msgspec.Struct, frozen=True, array_like=True, tag=10):
    """Are you alive? ``target`` lets a node reject pings meant for a previous owner of its
    address; the ack goes to ``reply_to``."""

    seq: Seq
    target: Name
    reply_to: Address


class IndirectPing(msgspec.Struct, frozen=True, array_like=True, tag=11):
    """Please probe ``target`` for me and forward its ack (or a nack) to ``reply_to``."""

    seq: Seq
    target: Name
    target_address: Address
    reply_to: Address
    want_nack: bool


class Ack(msgspec.Struct, frozen=True, array_like=True, tag=12):
    seq: Seq
    stamp_ms: Annotated[int, msgspec.Meta(ge=0, le=2**53)] | None = None
    """The responder's wall clock (Unix ms) when it answered: with the probe's round trip,
    the prober estimates the responder's clock offset (``core.clock_offsets``). Optional
    and last, so old peers ignore it (msgspec drops extra trailing array items) and acks
    from them decode with None; it costs 9 bytes of the datagram (``_packet`` counts it)."""


class Nack(msgspec.Struct, frozen=True, array_like=True, tag=13):
    """Lifeguard: 'I am alive and relaying, but the target did not answer me either'."""

    seq: Seq


Probe = Ping | IndirectPing | Ack | Nack


class Packet(msgspec.Struct, frozen=True, array_like=True):
    """One UDP datagram: probe messages plus as many piggybacked updates as fit."""

    sender: Name
    probes: Annotated[list[Probe], msgspec.Meta(max_length=PACKET_MESSAGES_MAX)]
    updates: Annotated[list[Update], msgspec.Meta(max_length=PACKET_MESSAGES_MAX)]


# -- full-state sync (TCP) ------------------------------------------------------------------


class MemberRecord(msgspec.Struct, frozen=True, array_like=True):
    """One member in a full-state sync."""

    name: Name
    address: Address
    incarnation: Incarnation
    status: MemberStatus
    meta: NodeMeta


class PushPull(msgspec.Struct, frozen=True, array_like=True, tag=20):
    """The sender's whole view; the receiver answers with its own (``reply=True``)."""

    sender: Name
    join: bool
    reply: bool
    members: Annotated[list[MemberRecord], msgspec.Meta(max_length=PUSH_PULL_MEMBERS_MAX)]
    event_ltime: LamportTime
    events: Annotated[list[UserEvent], msgspec.Meta(max_length=PUSH_PULL_EVENTS_MAX)]


class SealedPushPull(msgspec.Struct, frozen=True, array_like=True, tag=21):
    """A ``PushPull`` (request or reply) sealed under the sender's primary gossip key, sent
    instead of the plain one when the node has a keyring: a node without a current cluster
    key can then neither join nor sync. ``sealed`` is ``security.keyring.Keyring.seal`` of
    the encoded push-pull; the frame limit (``core.codec.FRAME_BYTES_MAX``) bounds it."""

    sealed: bytes
