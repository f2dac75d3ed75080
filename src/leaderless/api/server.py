"""Serving the native client protocol (``api.messages``) on a node's TCP port."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from leaderless.api.messages import (
    DoctorReply,
    DoctorRequest,
    ErrorReply,
    EventNotification,
    EventSendReply,
    EventSendRequest,
    EventWatchRequest,
    KeyringReply,
    KeyringRequest,
    MemberInfo,
    MembersReply,
    MembersRequest,
    Request,
    RingReply,
    RingRequest,
    StatusReply,
    StatusRequest,
    WatchStarted,
)
from leaderless.core.membership import Member
from leaderless.core.messages import UserEvent
from leaderless.security.keyring import KeyringError

WATCHERS_MAX = 256
"""Concurrent event watchers per node; each costs a subscriber call per delivered event."""


class Connection(Protocol):
    """The side of a client connection the handler needs (``runtime.tcp.ServerConnection``)."""

    streaming: bool

    def send(self, message: object, drop_kind: str = ...) -> bool: ...

    def on_close(self, callback: Callable[[], None]) -> None: ...


class NodeApi(Protocol):
    """What the client protocol needs from a running node."""

    def members(self) -> list[Member]: ...

    def wall_time(self, monotonic_s: float) -> float: ...

    def broadcast_event(self, name: str, payload: bytes) -> UserEvent: ...

    def subscribe_user_events(self, callback: Callable[[UserEvent], None]
                              ) -> Callable[[], None]: ...

    def status(self) -> StatusReply: ...

    async def keyring_operation(self, request: KeyringRequest) -> KeyringReply: ...

    async def doctor(self) -> DoctorReply: ...

    async def ring_operation(self, request: RingRequest) -> RingReply: ...


def member_info(member: Member, wall_time: Callable[[float], float]) -> MemberInfo:
    return MemberInfo(
        name=member.name,
        address=str(member.address),
        state=member.status.name.lower(),
        incarnation=member.incarnation,
        zone=member.meta.zone,
        weight=member.meta.weight,
        tags=dict(member.meta.tags),
        changed_at=round(wall_time(member.changed_at), 3),
        load=member.meta.load,
    )


class ApiHandler:
    """Answers one request frame at a time; a watch keeps streaming until the client goes."""

    def __init__(self, node: NodeApi) -> None:
        self._node = node
        self._watchers = 0
        self._keyring_tasks: set[asyncio.Task[None]] = set()

    def handle(self, request: Request, conn: Connection) -> None:
        if isinstance(request, MembersRequest):
            members = [member_info(m, self._node.wall_time) for m in self._node.members()]
            conn.send(MembersReply(members))
        elif isinstance(request, EventSendRequest):
            try:
                event = self._node.broadcast_event(request.name, request.payload)
            except ValueError as exc:
                conn.send(ErrorReply("bad_event", str(exc)))
                return
            conn.send(EventSendReply(event.origin, event.ltime))
        elif isinstance(request, EventWatchRequest):
            self._watch(conn)
        elif isinstance(request, StatusRequest):
            conn.send(self._node.status())
        elif isinstance(request, KeyringRequest):
            self._keyring(request, conn)
        elif isinstance(request, DoctorRequest):
            self._doctor(conn)
        elif isinstance(request, RingRequest):
            self._ring(request, conn)

    def _ring(self, request: RingRequest, conn: Connection) -> None:
        """Answered once every alive member reported (or timed out), so it runs as a task;
        a refusal (``RingChangeError``, ``CleanupRefusedError``) is ``ring_refused``."""
        # Imported here: the runtime modules import this one.
        from leaderless.runtime.cleanup import CleanupRefusedError
        from leaderless.runtime.ring_changes import RingChangeError

        async def run() -> None:
            try:
                reply = await self._node.ring_operation(request)
            except (RingChangeError, CleanupRefusedError) as exc:
                conn.send(ErrorReply("ring_refused", str(exc)[:1000]))
                return
            except Exception as exc:  # a bug must still get the client an answer
                message = f"the ring operation failed: {exc!r}"[:900]
                conn.send(ErrorReply("ring_failed", f"{message}; see this node's log"))
                raise
            conn.send(reply)

        task = asyncio.get_running_loop().create_task(run())
        self._keyring_tasks.add(task)  # held until done: the loop keeps only weak refs
        task.add_done_callback(self._keyring_tasks.discard)

    def _doctor(self, conn: Connection) -> None:
        """Answered once every alive member reported (or timed out), so it runs as a task."""

        async def run() -> None:
            try:
                reply = await self._node.doctor()
            except Exception as exc:  # a bug in a check must still get the client an answer
                conn.send(ErrorReply("doctor_failed", f"the diagnosis failed: {exc!r}; "
                                     "see this node's log"))
                raise
            conn.send(reply)

        task = asyncio.get_running_loop().create_task(run())
        self._keyring_tasks.add(task)  # held until done: the loop keeps only weak refs
        task.add_done_callback(self._keyring_tasks.discard)

    def _keyring(self, request: KeyringRequest, conn: Connection) -> None:
        """Answered once every alive member answered (or timed out), so it runs as a task."""

        async def run() -> None:
            try:
                reply = await self._node.keyring_operation(request)
            except KeyringError as exc:
                conn.send(ErrorReply(exc.code, str(exc)))
                return
            conn.send(reply)

        task = asyncio.get_running_loop().create_task(run())
        self._keyring_tasks.add(task)  # held until done: the loop keeps only weak refs
        task.add_done_callback(self._keyring_tasks.discard)

    def _watch(self, conn: Connection) -> None:
        if conn.streaming:
            conn.send(ErrorReply("already_watching", "this connection is already watching"))
            return
        if self._watchers >= WATCHERS_MAX:
            conn.send(ErrorReply("too_many_watchers",
                                 f"this node serves at most {WATCHERS_MAX} watchers; retry later"))
            return

        def forward(event: UserEvent) -> None:
            # A watcher that cannot keep up is disconnected (and counted) by conn.send.
            conn.send(EventNotification(event.name, event.origin, event.ltime, event.payload),
                      "watch_slow_reader")

        self._watchers += 1
        conn.streaming = True
        conn.send(WatchStarted())
        unsubscribe = self._node.subscribe_user_events(forward)

        def stop() -> None:
            self._watchers -= 1
            unsubscribe()

        conn.on_close(stop)
