"""Passive failover: a node whose own storage failed for good steps out of the cluster.

Active failover is the peers' job (membership declares a silent node dead, coordinators
hint its writes). Passive failover is the sick node's own: when its store cannot be trusted
any more -- an fsync failed (``SyncFailedError``: a failed fsync cannot be retried safely,
so the store acknowledges nothing more), the store reports corruption, or the data dir
cannot keep the incarnation -- the node

1. logs ``passive_failover`` naming the fault and gossips ``leaving(<fault>)``;
2. refuses client requests (its client and HTTP listeners close);
3. hands off its pending hints: each goes to a live node that is not its target, which
   stores it durably as its own hint and replays it when the target is back
   (``KvNode.hand_off_hint``); a hint counts as handed off only once its new holder has
   acknowledged it, within ``HANDOFF_DEADLINE_S``; logs ``hints_handed_off``;
4. leaves gracefully (peers mark it ``left``, not ``dead``) and exits with
   ``EXIT_FAILOVER`` and a line naming the fault and what to do.

Acknowledged writes are not lost by this: a write was acknowledged only after a sync that
covered it succeeded (``GroupCommit``), so it is on W replicas; the hints this node held for
the others now live on other nodes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

from leaderless.core.hints import Hint, HintLog
from leaderless.core.kv_messages import ReplicaAck
from leaderless.runtime.group_commit import SyncFailedError
from leaderless.runtime.logs import NodeLogger
from leaderless.storage.encrypted import DecryptionError
from leaderless.storage.store import StorageError

HANDOFF_DEADLINE_S = 10.0
"""How long a failing node waits for its hints' new holders to acknowledge them: long
enough for tens of thousands of hints over a LAN, short enough that a failing node does
not linger (what is not handed off by then stays in its data dir and anti-entropy repairs
the target from the other replicas)."""
HANDOFF_IN_FLIGHT_MAX = 256
"""Hints sent and not yet acknowledged at once: bounds the memory and the burst a holder
takes while the failing node reads its hint log."""
HINTS_SCANNED_MAX = 10_000_000
"""Hints read per target at most (a bound on the scan, far above any real backlog)."""
HANDOFF_ACK_TIMEOUT_S = 2.0
"""A hint not acknowledged this soon is sent to the next holder (the first may be down)."""


class FaultKind(enum.Enum):
    """Why a node fails over; the value is what logs and the exit message say."""

    FSYNC = "fsync"
    CORRUPTION = "corruption"
    DISK_FULL = "disk_full"
    STORAGE = "storage"
    DATA_DIR = "data_dir"


_ADVICE = {
    FaultKind.FSYNC: "the disk holding the data dir failed an fsync: check the device "
    "(dmesg, SMART), replace it or move the data dir, then start the node again (it "
    "rejoins and is repaired from its replicas)",
    FaultKind.CORRUPTION: "the store is corrupt: move the data dir aside and start the "
    "node with an empty one; it rejoins and is repaired from its replicas",
    FaultKind.DISK_FULL: "the disk is full: free space, then start the node again",
    FaultKind.STORAGE: "the store failed: check the disk and the log above, then start "
    "the node again",
    FaultKind.DATA_DIR: "the data dir cannot be written: check the disk, its mount and "
    "permissions, then start the node again",
}


@dataclasses.dataclass(frozen=True)
class Fault:
    """An unrecoverable local fault."""

    kind: FaultKind
    detail: str

    @property
    def advice(self) -> str:
        return _ADVICE[self.kind]

    @property
    def reason(self) -> str:
        """The short phrase gossiped in ``leaving(reason)``."""
        return f"{self.kind.value} failure" if self.kind is not FaultKind.CORRUPTION \
            else "store corrupt"

    def exit_message(self) -> str:
        return (f"passive failover: {self.kind.value} fault ({self.detail}); the node "
                f"handed off its hints and left the cluster. What to do: {self.advice}")


def classify(error: str | BaseException) -> Fault:
    """The fault an operating error stands for (every storage failure is unrecoverable
    for this process: the store fails for good after one, see ``GroupCommit``)."""
    text = str(error)
    low = text.lower()
    if isinstance(error, SyncFailedError) or "fsync" in low:
        kind = FaultKind.FSYNC
    elif isinstance(error, DecryptionError) or "corrupt" in low:
        kind = FaultKind.CORRUPTION
    elif "disk" in low and "full" in low or "no space left" in low:
        kind = FaultKind.DISK_FULL
    elif isinstance(error, StorageError):
        kind = FaultKind.STORAGE
    else:
        kind = FaultKind.DATA_DIR
    return Fault(kind, text)


def holders_for(target: str, me: str, live: Iterable[str]) -> list[str]:
    """Who may take ``target``'s hints, in order: the live nodes other than this one and
    the target, rotated by the target's name so several targets' hints spread over them;
    the target itself last when it is live (then the hint is simply delivered)."""
    others = sorted(n for n in set(live) if n not in (me, target))
    if others:
        start = sum(target.encode()) % len(others)
        others = others[start:] + others[:start]
    if target in live and target != me:
        others.append(target)
    return others


@dataclasses.dataclass
class HandoffReport:
    handed_off: Counter[str] = dataclasses.field(default_factory=Counter)
    """Hints acknowledged, by new holder."""
    not_handed_off: int = 0
    """Hints no holder acknowledged before the deadline (or with no live holder)."""

    @property
    def count(self) -> int:
        return sum(self.handed_off.values())


SendHint = Callable[[str, str, Hint, Callable[[ReplicaAck], None]], Callable[[], None]]
"""``KvNode.hand_off_hint``: (holder, target, hint, on_ack) -> forget."""


async def hand_off_hints(hints: HintLog, send: SendHint, me: str, live: Sequence[str],
                         deadline_s: float = HANDOFF_DEADLINE_S,
                         in_flight_max: int = HANDOFF_IN_FLIGHT_MAX,
                         ack_timeout_s: float = HANDOFF_ACK_TIMEOUT_S) -> HandoffReport:
    """Give every hint in ``hints`` to a live holder and wait for its acknowledgement,
    trying the next holder on a refusal or timeout, until ``deadline_s``."""
    report = HandoffReport()
    gate = asyncio.Semaphore(in_flight_max)
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + deadline_s

    async def one(target: str, hint: Hint, holders: list[str]) -> None:
        try:
            for holder in holders:
                if loop.time() >= stop_at:
                    break
                acked: asyncio.Future[ReplicaAck] = loop.create_future()
                forget = send(holder, target, hint, _resolver(acked))
                try:
                    ack = await asyncio.wait_for(
                        acked, min(ack_timeout_s, max(0.0, stop_at - loop.time())))
                except TimeoutError:
                    forget()
                    continue
                if not ack.error:
                    report.handed_off[holder] += 1
                    return
            report.not_handed_off += 1
        finally:
            gate.release()

    running: set[asyncio.Task[None]] = set()
    for target in list(hints.pending):
        holders = holders_for(target, me, live)
        for _key, hint in hints.scan(target, None, HINTS_SCANNED_MAX):
            if not holders:
                report.not_handed_off += 1
                continue
            await gate.acquire()  # read the log no faster than holders acknowledge
            task = loop.create_task(one(target, hint, holders))
            running.add(task)
            task.add_done_callback(running.discard)
    if running:
        await asyncio.gather(*running)
    return report


def _resolver(future: asyncio.Future[ReplicaAck]) -> Callable[[ReplicaAck], None]:
    def resolve(ack: ReplicaAck) -> None:
        if not future.done():
            future.set_result(ack)
    return resolve


class PassiveFailover:
    """The sequence, run once per process by ``Node`` on its first unrecoverable fault.
    The node supplies the steps that touch its parts; this class orders and logs them."""

    def __init__(self, name: str, fault: Fault) -> None:
        self.fault = fault
        self.report: HandoffReport | None = None
        self.log = NodeLogger(name, "failover")

    def started(self) -> None:
        self.log.error("passive_failover", fault=self.fault.kind.value,
                       error=self.fault.detail, advice=self.fault.advice)

    def handed_off(self, report: HandoffReport) -> None:
        self.report = report
        log = self.log.warning if report.not_handed_off else self.log.info
        log("hints_handed_off", count=report.count, holders=dict(report.handed_off),
            not_handed_off=report.not_handed_off)

    def hand_off_failed(self, error: StorageError) -> None:
        self.log.error("hints_not_handed_off", error=str(error),
                       consequence="the hints stay in this data dir; anti-entropy repairs "
                       "their targets from the other replicas")

    def exiting(self) -> None:
        self.log.error("passive_failover_exit", fault=self.fault.kind.value,
                       message=self.fault.exit_message())
