"""What the membership state machine asks its environment to do.

The runtime (real sockets) and the simulator (simulated network) execute effects in the
order given. ``SaveIncarnation`` must be durable before any later ``SendPacket`` leaves,
because a refutation that is forgotten on restart could be outvoted by an old accusation.
"""

from __future__ import annotations

import dataclasses
import enum

from leaderless.core.messages import Address, NodeMeta, Packet, PushPull, UserEvent


@dataclasses.dataclass(frozen=True, slots=True)
class SendPacket:
    """Send one UDP datagram (already within packet_bytes_max when encoded)."""

    to: Address
    packet: Packet


@dataclasses.dataclass(frozen=True, slots=True)
class StartPushPull:
    """Open a TCP connection to ``to``, send ``request``, feed the reply to
    ``Membership.on_push_pull_reply`` or the failure to ``on_push_pull_failed``."""

    to: Address
    request: PushPull


@dataclasses.dataclass(frozen=True, slots=True)
class SaveIncarnation:
    incarnation: int


class MemberEventKind(enum.Enum):
    JOINED = "joined"
    SUSPECT = "suspect"
    ALIVE = "alive"
    DEAD = "dead"
    LEFT = "left"
    UPDATED = "updated"
    REAPED = "reaped"


@dataclasses.dataclass(frozen=True, slots=True)
class MemberEvent:
    kind: MemberEventKind
    name: str
    address: Address
    incarnation: int
    meta: NodeMeta


@dataclasses.dataclass(frozen=True, slots=True)
class DeliverUserEvent:
    event: UserEvent


Effect = SendPacket | StartPushPull | SaveIncarnation | MemberEvent | DeliverUserEvent
