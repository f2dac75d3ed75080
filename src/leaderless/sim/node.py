"""One simulated node: a ``Membership`` plus what its process and disk would hold."""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any

from leaderless.core.membership import Membership
from leaderless.core.messages import Address, NodeMeta


class NodeState(enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"
    """Like SIGSTOP: nothing is received (it queues) and no timer fires until resumed."""
    CRASHED = "crashed"
    """The process is gone with its memory; only ``saved_incarnation`` (its disk) survives."""
    STOPPED = "stopped"
    """Not started yet."""


@dataclasses.dataclass(slots=True, eq=False)
class SimNode:
    index: int
    name: str
    address: Address
    meta: NodeMeta
    state: NodeState = NodeState.STOPPED
    membership: Membership | None = None
    saved_incarnation: int = -1
    """The simulated disk: the last ``SaveIncarnation`` (-1: nothing saved yet)."""
    generation: int = 0
    """Bumped when a process starts: replies owed to an older process are dropped."""
    wake_at: float = math.inf
    wake_token: int = 0
    """Only the most recently scheduled wakeup is live; older ones are stale and ignored."""
    inbox: list[tuple[Any, Any, Any]] = dataclasses.field(default_factory=list)
    """Deliveries held while paused, replayed in order on resume."""
    ever_crashed: bool = False
    ever_paused: bool = False

    @property
    def running(self) -> bool:
        return self.state is NodeState.RUNNING

    def m(self) -> Membership:
        """The live process's state machine (a programming error to ask a dead node)."""
        assert self.membership is not None, f"{self.name} has no running process"
        return self.membership
