"""Watches on a running node: the acceptor side (subscriptions, reports) and the watcher
side (one ``Learner`` per client watch, resynchronisation, delivery), over peer links.

See ``core.watch`` for the protocol. Here: a client watch subscribes at every member that
is up (and at members as they come up), renews every ``RENEW_S``, and resynchronises (a
linearizable read for one key; a snapshot from every member for a prefix, with reads for
the keys no majority agrees on) when it opens, when an acceptor says it lost the
subscription, and when a report was lost. Delivered events go to a bounded queue; a
client that does not keep up gets its watch ended with ``overloaded`` (and can resume).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from leaderless.api.service import KvError
from leaderless.core import paxos
from leaderless.core.paxos_messages import Accept, Change, Read, Register
from leaderless.core.schema import KeyspaceDef
from leaderless.core.watch import Learner, Subscriptions
from leaderless.core.watch_messages import (
    WatchAccepted,
    WatchFilter,
    WatchMessage,
    WatchSnapshot,
    WatchSnapshotReply,
    WatchSubscribe,
    WatchSubscribed,
    WatchUnsubscribe,
)
from leaderless.storage.store import Store

RENEW_S = 2.0
"""How often a watcher renews its subscriptions (and notices an acceptor that lost one)."""
LEASE_S = 10.0
"""An acceptor drops a subscription not renewed for this long (its watcher died)."""
WATCHES_MAX = 10_000
"""Client watches one node serves at once; beyond it: ``overloaded``."""
QUEUE_EVENTS_MAX = 10_000
"""Events waiting for one slow client; beyond it the watch ends with ``overloaded``."""
SNAPSHOT_WAIT_S = 3.0
"""How long a resync waits for members' snapshots (a member that does not answer is
covered by the others as long as a majority of each key's replicas answer)."""
SETTLE_READS_IN_FLIGHT = 32


@dataclasses.dataclass(frozen=True, slots=True)
class WatchEvent:
    partition: bytes
    sort: bytes
    version: int
    value: bytes | None
    """None: the key was deleted."""


Propose = Callable[[KeyspaceDef, bytes, bytes, Change, bytes], Awaitable[paxos.Outcome]]


class Watch:
    """One watch: iterate it for events; ``close()`` ends it."""

    def __init__(self, hub: WatchHub, sub: int, definition: KeyspaceDef,
                 flt: WatchFilter, internal: bool) -> None:
        self.hub = hub
        self.sub = sub
        self.definition = definition
        self.filter = flt
        self.internal = internal
        self.learner = Learner(definition.replication // 2 + 1)
        self.queue: asyncio.Queue[WatchEvent | KvError | None] = asyncio.Queue()
        self.resync_needed = False
        self.resyncing: asyncio.Task[None] | None = None
        self.snapshots: dict[str, WatchSnapshotReply] = {}
        self.snapshot_waiter: asyncio.Future[None] | None = None
        self.closed = False

    def deliver(self, partition: bytes, sort: bytes, register: Register) -> None:
        if self.closed:
            return
        if self.internal:
            self.hub.on_internal_change(self.definition.name, partition, sort, register.value)
            return
        if self.queue.qsize() >= QUEUE_EVENTS_MAX:
            self.fail(KvError("overloaded", f"the watch fell {QUEUE_EVENTS_MAX} events "
                              "behind; resume it from the last version you saw"))
            return
        self.queue.put_nowait(WatchEvent(partition, sort, register.version, register.value))

    def fail(self, error: KvError) -> None:
        if not self.closed:
            self.queue.put_nowait(error)
            self.hub.close(self)

    async def events(self) -> AsyncIterator[WatchEvent]:
        try:
            while True:
                item = await self.queue.get()
                if item is None:
                    return
                if isinstance(item, KvError):
                    raise item
                yield item
        finally:
            self.hub.close(self)

    def close(self) -> None:
        self.hub.close(self)


class WatchHub:
    def __init__(self, me: str, store: Store, send: Callable[[str, Any], None],
                 members_up: Callable[[], list[str]], propose: Propose,
                 on_change: Callable[[str, bytes, bytes, bytes | None], None]) -> None:
        self.me = me
        self.store = store
        self._send = send
        self._members_up = members_up
        self._propose = propose
        self._on_change = on_change
        self.subscriptions = Subscriptions()
        self._watches: dict[int, Watch] = {}
        self._sub_ids = itertools.count(1)
        self._internal: dict[tuple[str, bytes], tuple[Watch, int]] = {}
        self._next_renew = 0.0
        self.delivered = 0
        self.resyncs = 0

    # -- the watcher side ----------------------------------------------------------------

    def open(self, definition: KeyspaceDef, flt: WatchFilter, since_version: int = 0,
             internal: bool = False) -> Watch:
        if definition.mode != "strong":
            raise KvError("bad_request", f"watches need a strong keyspace; {definition.name!r} "
                          "is eventual")
        if len(self._watches) >= WATCHES_MAX:
            raise KvError("overloaded", f"this node serves {WATCHES_MAX} watches already; "
                          "watch through another node")
        watch = Watch(self, next(self._sub_ids), definition, flt, internal)
        if since_version and not flt.prefix:
            watch.learner.learned((flt.partition, flt.sort), Register(since_version, b""))
        self._watches[watch.sub] = watch
        subscribe = WatchSubscribe(watch.sub, flt, LEASE_S)
        for member in self._members_up():
            self._send(member, subscribe)
        self._resync(watch)
        return watch

    def close(self, watch: Watch) -> None:
        if watch.closed:
            return
        watch.closed = True
        watch.queue.put_nowait(None)
        self._watches.pop(watch.sub, None)
        if watch.resyncing is not None:
            watch.resyncing.cancel()
        for member in self._members_up():
            self._send(member, WatchUnsubscribe(watch.sub))

    def hold_key(self, definition: KeyspaceDef, partition: bytes) -> Callable[[], None]:
        """Learn of changes of one key (``on_change``), shared by everyone holding it (e.g.
        acquires waiting for a lock held through another node); call the result to let go."""
        slot = (definition.name, partition)
        held = self._internal.get(slot)
        if held is None:
            watch = self.open(definition, WatchFilter(definition.name, partition),
                              internal=True)
            held = (watch, 0)
        self._internal[slot] = (held[0], held[1] + 1)

        def release() -> None:
            watch, count = self._internal[slot]
            if count <= 1:
                del self._internal[slot]
                self.close(watch)
            else:
                self._internal[slot] = (watch, count - 1)

        return release

    def on_internal_change(self, keyspace: str, partition: bytes, sort: bytes,
                           value: bytes | None) -> None:
        self._on_change(keyspace, partition, sort, value)

    def _resync(self, watch: Watch) -> None:
        """Resynchronise now, or right after the resync under way."""
        if watch.resyncing is not None and not watch.resyncing.done():
            watch.resync_needed = True
            return
        watch.resync_needed = False
        self.resyncs += 1
        watch.resyncing = asyncio.get_running_loop().create_task(self._run_resync(watch))

    async def _run_resync(self, watch: Watch) -> None:
        try:
            if watch.filter.prefix:
                await self._snapshot(watch)
            else:
                await self._settle(watch, [(watch.filter.partition, watch.filter.sort)])
        except KvError as exc:
            if exc.code in ("unavailable", "timeout", "contention", "overloaded"):
                watch.resync_needed = True  # try again at the next renewal
            else:
                watch.fail(exc)
        except asyncio.CancelledError:
            return
        if watch.resync_needed and not watch.closed:
            loop = asyncio.get_running_loop()
            loop.call_later(RENEW_S, lambda: None if watch.closed else self._resync(watch))

    async def _snapshot(self, watch: Watch) -> None:
        members = self._members_up()
        watch.snapshots = {}
        watch.snapshot_waiter = asyncio.get_running_loop().create_future()
        for member in members:
            self._send(member, WatchSnapshot(watch.sub))
        try:
            await asyncio.wait_for(asyncio.shield(watch.snapshot_waiter), SNAPSHOT_WAIT_S)
        except TimeoutError:
            pass
        watch.snapshot_waiter = None
        replies, watch.snapshots = watch.snapshots, {}
        if len(replies) < len(members) // 2 + 1:
            raise KvError("unavailable", f"{len(replies)} of {len(members)} members answered "
                          "the watch's snapshot")
        for acceptor, reply in replies.items():
            if reply.truncated:
                raise KvError("bad_request", "the watched prefix holds too many keys to "
                              "snapshot on one node; watch a narrower prefix")
            for (partition, sort), register in watch.learner.snapshot(acceptor, reply):
                watch.deliver(partition, sort, register)
        await self._settle(watch, watch.learner.unsettled())

    async def _settle(self, watch: Watch, keys: list[tuple[bytes, bytes]]) -> None:
        """Read keys linearizably and deliver what is newer than delivered."""
        gate = asyncio.Semaphore(SETTLE_READS_IN_FLIGHT)

        async def read(partition: bytes, sort: bytes) -> None:
            async with gate:
                done = await self._propose(watch.definition, partition, sort, Read(), b"")
            assert isinstance(done, paxos.Done)
            register = Register(done.version, done.value, done.changed_at_ms)
            if done.version and watch.learner.learned((partition, sort), register):
                watch.deliver(partition, sort, register)

        await asyncio.gather(*(read(p, s) for p, s in keys))

    def _watcher_message(self, sender: str, msg: Any) -> None:
        watch = self._watches.get(msg.sub)
        if watch is None:
            return
        if isinstance(msg, WatchAccepted):
            register, gap = watch.learner.report(sender, msg)
            if register is not None:
                self.delivered += 1
                watch.deliver(msg.partition, msg.sort, register)
            if gap:
                self._resync(watch)
        elif isinstance(msg, WatchSubscribed):
            if watch.learner.subscribed(sender, msg):
                self._resync(watch)
        elif isinstance(msg, WatchSnapshotReply):
            waiter = watch.snapshot_waiter
            if waiter is None or waiter.done():
                return
            watch.snapshots[sender] = msg
            if len(watch.snapshots) >= len(self._members_up()):
                waiter.set_result(None)

    # -- the acceptor side ---------------------------------------------------------------

    def on_message(self, now: float, sender: str, msg: WatchMessage) -> None:
        if isinstance(msg, WatchSubscribe):
            self._send(sender, self.subscriptions.subscribe(now, sender, msg))
        elif isinstance(msg, WatchUnsubscribe):
            self.subscriptions.unsubscribe(sender, msg.sub)
        elif isinstance(msg, WatchSnapshot):
            self._send(sender, self.subscriptions.snapshot(self.store, sender, msg.sub))
        else:
            self._watcher_message(sender, msg)

    def on_accept_durable(self, accept: Accept) -> None:
        if not self.subscriptions.watched(accept.keyspace):
            return
        for subscriber, report in self.subscriptions.on_accepted(
                accept.keyspace, accept.partition, accept.sort, accept.ballot,
                accept.register):
            self._send(subscriber, report)

    # -- time and membership -------------------------------------------------------------

    def on_tick(self, now: float) -> None:
        if now < self._next_renew:
            return
        self._next_renew = now + RENEW_S
        self.subscriptions.expire(now)
        members = self._members_up()
        for watch in list(self._watches.values()):
            subscribe = WatchSubscribe(watch.sub, watch.filter, LEASE_S)
            for member in members:
                self._send(member, subscribe)
            if watch.resync_needed:
                self._resync(watch)

    def on_member_up(self, name: str) -> None:
        for watch in self._watches.values():
            watch.learner.forget_acceptor(name)
            self._send(name, WatchSubscribe(watch.sub, watch.filter, LEASE_S))

    def counters(self) -> dict[str, int]:
        return {"watches": len(self._watches), "watch_subscriptions": len(self.subscriptions),
                "watch_reports": self.subscriptions.reports,
                "watch_events_delivered": self.delivered, "watch_resyncs": self.resyncs}
