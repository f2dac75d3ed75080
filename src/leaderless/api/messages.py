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


Request = (MembersRequest | EventSendRequest | EventWatchRequest | StatusRequest
           | KeyringRequest)
Reply = (MembersReply | EventSendReply | WatchStarted | EventNotification | StatusReply
         | ErrorReply | KeyringReply)
