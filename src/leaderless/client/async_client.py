"""``AsyncClient``: the asyncio client for the native protocol, token-aware, with retries.

Routing: at connect (and every ``ring_refresh_s``, and soon after a connection fails) the
client asks any node for the ring (``DescribeRing``) and the keyspaces (``ListKeyspaces``).
It builds the same ``core.ring.Ring`` the nodes use from the alive members' (name,
token_seed, token_count, zone) and sends each keyed request to one of the key's N replicas
(N: the keyspace's replication factor, 3 if unknown) that it can reach, so the coordinator
is a replica and one network hop is saved. Which replica: the client keeps its own dynamic
snitch (``core.snitch``) over the nodes it talks to, fed with each request's round trip
and the requests in flight to each node; it picks the best-scored replica (with
``zone=``, those of its own zone first), and among near-ties (within the snitch's badness
threshold) a random one, so the load spreads while no node is clearly slower. Strong
keyspaces keep ring order (see ``_keyed``). When no replica is reachable (or the ring has
no client addresses) any reachable node serves the request: every node can coordinate
every key.

Retries: a request whose connection fails, or that a node answers with ``overloaded``, is
retried once on another node. That is safe for every data operation: gets and scans are
reads; a retried put or delete is stamped with a *new* timestamp by the node that
coordinates the retry, so if the first attempt did apply, the retry simply overwrites it
with the same value (last-writer-wins registers make that harmless, but a reader may see
the write's timestamp change). ``timeout`` and ``unavailable`` are raised, never retried
silently: a timed-out write may or may not have applied, and the error says how many
replicas acknowledged (``received``) of how many were needed (``required``).
Creating a keyspace is retried only with ``if_not_exists`` (otherwise a retry of a create
that did apply would report ``keyspace_exists``).

Authentication (clusters started with ``--auth``): give ``token=`` (from ``leaderless
login`` or ``create_api_token``), or call ``await client.login(user, password)`` before
anything else. The client sends the token as ``Authenticate`` on every connection it
opens, before any request; a refused token raises ``UnauthenticatedError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import random
import socket
import ssl
import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from leaderless.api.kv_messages import (
    CLIENT_SCAN_ROWS_MAX,
    IDEMPOTENCY_KEY_CHARS_MAX,
    TASK_IDS_PER_WAIT_MAX,
    TASK_LIST_MAX,
    TASK_WAIT_MS_MAX,
    AcquireLock,
    Authenticate,
    Authenticated,
    CancelTask,
    Changed,
    ClientReply,
    CompareAndSet,
    Conflict,
    CreateApiToken,
    CreateKeyspace,
    CreateRole,
    CreateUser,
    Delete,
    DeleteRole,
    DeleteUser,
    DescribeRing,
    DisableTotp,
    Done,
    EnableTotp,
    Failure,
    Get,
    GetTask,
    Increment,
    KeyspaceInfo,
    Keyspaces,
    ListKeyspaces,
    ListRoles,
    ListTasks,
    ListUsers,
    LockInfo,
    LockStatus,
    Login,
    Logout,
    Put,
    ReleaseLock,
    RenewLock,
    RevokeToken,
    RingDescription,
    RingMember,
    RoleEntry,
    RoleGrant,
    Roles,
    Row,
    Rows,
    Scan,
    SetPassword,
    SubmitTask,
    TaskInfo,
    TaskInfos,
    TaskList,
    TaskSubmitted,
    Token,
    TotpProvisioning,
    Unwatch,
    UserEntry,
    UserRole,
    Users,
    Value,
    WaitTasks,
    WatchEvent,
)
from leaderless.api.kv_messages import Lease as LeaseReply
from leaderless.api.kv_messages import Watch as WatchRequest
from leaderless.client.connection import NodeConnection
from leaderless.client.errors import (
    BadRequestError,
    ConflictError,
    ConnectionLostError,
    ContentionError,
    LeaderlessError,
    LockHeldError,
    NoNodeAvailableError,
    OverloadedError,
    RequestTimeoutError,
    UnavailableError,
    error_for,
)
from leaderless.client.locks import Lease, held
from leaderless.core.cells import VALUE_BYTES_HARD_MAX
from leaderless.core.keys import token
from leaderless.core.locks import LOCK_KEYSPACE, LOCK_REPLICATION
from leaderless.core.paxos_messages import LEASE_TTL_MS_MAX, LEASE_TTL_MS_MIN, LOCK_NAME_BYTES_MAX
from leaderless.core.ring import Ring, RingNode
from leaderless.core.snitch import Snitch
from leaderless.core.tasks import (
    RESULT_TTL_S_DEFAULT,
    TASK_ID_BYTES_MAX,
    TASK_KEYSPACE,
    TaskSpec,
)
from leaderless.security.tls import ClientTls, client_ssl

if TYPE_CHECKING:
    from leaderless.client.tasks import AsyncTaskExecutor

DEFAULT_TIMEOUT_S = 10.0
"""Per request, client side. Longer than a node's own replica timeout, so a slow quorum is
reported by the node (with received/required) rather than cut short here."""
CONNECT_TIMEOUT_S = 3.0
DEFAULT_CONNECTIONS_PER_NODE = 2
"""Pipelining makes one connection enough for throughput; a second keeps a large value
from delaying every small request behind it."""
RING_REFRESH_S = 10.0
"""How often the ring and keyspace list are re-read (and 0.5 s after a failure)."""
NODE_RETRY_AFTER_S = 1.0
"""A node we failed to reach is skipped for this long before we try it again."""
DEFAULT_REPLICATION = 3
_TIMED: frozenset[type[Any]] = frozenset({Get, Put, Delete, Scan, CompareAndSet, Increment})
"""Requests whose round trip is a latency sample for the snitch (not lock waits, watches
or administration, whose time is not the node's speed)."""
SCAN_PAGE_ROWS = 1000
KEYSPACE_TEXT_MAX = 256
KEY_BYTES_MAX = 64 * 1024
"""The wire limits (``api.kv_messages``): over them the node could not even decode the frame,
so the client refuses locally with a clear error instead."""

BytesLike = bytes | str
FenceLike = Lease | tuple[str, int]
RETRYABLE_WATCH_ERRORS = (UnavailableError, RequestTimeoutError, OverloadedError,
                          ContentionError)
"""A watch that ends with one of these is resumed on another node (after a back-off)."""


@dataclasses.dataclass(frozen=True, slots=True)
class KeyChange:
    """A change delivered by ``watch``: the key's new version and value (None: deleted)."""

    key: bytes
    sort: bytes
    version: int
    value: bytes | None
LOCK_WAIT_CHUNK_S = 60.0
"""A blocking acquire waits on the node in requests of at most this long (a long wait is
several requests, so a node dying mid-wait costs at most one chunk's retry)."""
R = TypeVar("R")


@dataclasses.dataclass(frozen=True, slots=True)
class Item:
    """A value with its version: ``hlc`` is the write's hybrid-logical-clock timestamp;
    ``expires_at_ms`` is its TTL expiry in unix milliseconds (0: never)."""

    value: bytes
    hlc: int
    expires_at_ms: int
    version: int = 0
    """Strong keyspaces: the key's version (what ``cas(expected_version=...)`` compares)."""


def _new_id(rng: random.Random) -> bytes:
    """A change's idempotency id: 16 random bytes (collisions are not a concern)."""
    return rng.getrandbits(128).to_bytes(16, "big")


def _b(data: BytesLike, what: str) -> bytes:
    if isinstance(data, str):
        return data.encode()
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    raise TypeError(f"{what} must be bytes or str, not {type(data).__name__}")


def _split(address: str) -> tuple[str, int]:
    host, sep, port = address.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"node address {address!r} is not HOST:PORT")
    return ("127.0.0.1" if host == "localhost" else host), int(port)


class AsyncClient:
    """``async with AsyncClient(["127.0.0.1:7400"]) as kv: await kv.put("ks", "k", b"v")``.

    ``nodes`` are client-listener addresses (``HOST:PORT``) of any nodes of the cluster;
    the rest are discovered from the ring. Keys and values are ``bytes`` or ``str`` (UTF-8).
    A cluster with TLS needs ``tls=ClientTls("certs/ca.crt")`` (``security.tls``; a client
    certificate is optional here) or a ready ``ssl_context=``. ``zone``: the client's own
    zone (as the nodes' ``--zone``): requests go to a replica in that zone when one is
    reachable.
    """

    def __init__(self, nodes: Sequence[str], *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 connections_per_node: int = DEFAULT_CONNECTIONS_PER_NODE,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S,
                 ring_refresh_s: float = RING_REFRESH_S, token_aware: bool = True,
                 rng: random.Random | None = None, token: str | None = None,
                 tls: ClientTls | None = None,
                 ssl_context: ssl.SSLContext | None = None, zone: str | None = None) -> None:
        if isinstance(nodes, str):
            nodes = [n for n in nodes.split(",") if n.strip()]
        if not nodes:
            raise ValueError("give at least one node address (HOST:PORT)")
        if timeout_s <= 0 or connections_per_node < 1:
            raise ValueError("timeout_s must be > 0 and connections_per_node >= 1")
        self.seeds = [f"{h}:{p}" for h, p in map(_split, nodes)]
        self.ssl_context = client_ssl(tls, ssl_context)
        self.timeout_s = timeout_s
        self.connections_per_node = connections_per_node
        self.connect_timeout_s = connect_timeout_s
        self.ring_refresh_s = ring_refresh_s
        self.token_aware = token_aware
        self.token = token or None
        """Sent as ``Authenticate`` on every new connection (None: none is sent)."""
        self._rng = rng or random.Random()
        self.zone = zone or ""
        self.snitch = Snitch(None, zone=self.zone)
        """Round trip and requests in flight per node address: which replica to ask."""
        self._pools: dict[str, list[NodeConnection]] = {}
        self._connecting: dict[str, asyncio.Future[NodeConnection]] = {}
        self._next_conn: dict[str, int] = {}
        self._growing: set[str] = set()
        self._down_until: dict[str, float] = {}
        self._ring = Ring(())
        self._addresses: dict[str, str] = {}  # member name -> client address
        self._replication: dict[str, int] = {}
        self._modes: dict[str, str] = {}
        self._refresher: asyncio.Task[None] | None = None
        self._refresh_soon: asyncio.TimerHandle | None = None
        self._connected = False
        self._closed = False
        self.owner = f"{socket.gethostname()[:40]}-{os.getpid()}-{self._rng.getrandbits(48):012x}"
        """The prefix of this client's lock owner ids: each ``acquire`` holds as its own
        owner (``owner-1``, ``owner-2``, ...), so two tasks or threads sharing the client
        exclude each other like any two clients."""
        self._acquires = itertools.count(1)

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> AsyncClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Reach a node and learn the ring; raises ``NoNodeAvailableError`` if none answers."""
        if self._closed:
            raise LeaderlessError("the client is closed", code="closed")
        if self._connected:
            return
        await self.refresh()
        self._connected = True
        if self.ring_refresh_s > 0 and self._refresher is None:
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def close(self) -> None:
        self._closed = True
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None
        if self._refresh_soon is not None:
            self._refresh_soon.cancel()
        for pool in self._pools.values():
            for conn in pool:
                conn.close()
        self._pools.clear()

    async def refresh(self) -> None:
        """Re-read the ring and the keyspaces from any reachable node."""
        reply = await self._request(None, DescribeRing, (), retry=True)
        assert isinstance(reply, RingDescription)
        self._set_ring(reply.members)
        spaces = await self._request(None, ListKeyspaces, (), retry=True)
        assert isinstance(spaces, Keyspaces)
        self._replication = {ks.name: ks.replication for ks in spaces.keyspaces}
        self._modes = {ks.name: ks.mode for ks in spaces.keyspaces}

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.ring_refresh_s)
            with contextlib.suppress(LeaderlessError):
                await self.refresh()

    def _schedule_refresh(self) -> None:
        if self._refresh_soon is not None or self._closed or not self._connected:
            return
        loop = asyncio.get_running_loop()

        def go() -> None:
            self._refresh_soon = None
            task = loop.create_task(self._quiet_refresh())
            task.add_done_callback(lambda t: None)

        self._refresh_soon = loop.call_later(0.5, go)

    async def _quiet_refresh(self) -> None:
        with contextlib.suppress(LeaderlessError):
            await self.refresh()

    def _set_ring(self, members: list[RingMember]) -> None:
        alive = [m for m in members if m.state == "alive" and m.client_address
                 and m.token_count > 0]
        self._ring = Ring(RingNode(m.name, m.token_seed, m.token_count, m.zone) for m in alive)
        self._addresses = {m.name: m.client_address for m in alive}
        self.snitch.set_peers({m.client_address: m.zone for m in alive})

    @property
    def ring(self) -> Ring:
        return self._ring

    # -- data operations -------------------------------------------------------------------

    async def put(self, keyspace: str, key: BytesLike, value: BytesLike, *,
                  sort: BytesLike | None = None, consistency: str | None = None,
                  ttl: float | None = None, idempotency: bytes | None = None,
                  fence: FenceLike | None = None) -> int:
        """Write ``value`` under (key, sort); returns the write's HLC timestamp once the
        consistency level's replicas have it durably (strong keyspaces: the key's new
        version, after a Paxos round). ``ttl`` is in seconds. ``idempotency``: strong
        keyspaces remember it so a retry is not applied twice (default: a random id, the
        same on this call's own retry). ``fence``: a ``Lease`` (or (lock, token)) this
        write is made under; it is refused with ``FencedError`` if the lock has granted a
        newer token since."""
        k, s = self._key(keyspace, key, sort)
        v = _b(value, "value")
        if len(v) > VALUE_BYTES_HARD_MAX:
            raise BadRequestError(f"the value has {len(v)} bytes; no node accepts more than "
                                  f"{VALUE_BYTES_HARD_MAX}")
        if ttl is not None and ttl <= 0:
            raise BadRequestError(f"ttl must be > 0 seconds, got {ttl}")
        reply = await self._keyed(keyspace, k, Put,
                                  (keyspace, k, v, s, _level(consistency), ttl,
                                   self._idempotency(keyspace, idempotency), *_fence(fence)))
        assert isinstance(reply, Done)
        return reply.hlc

    async def get(self, keyspace: str, key: BytesLike, *, sort: BytesLike | None = None,
                  consistency: str | None = None) -> bytes | None:
        """The value, or None when absent, deleted or expired."""
        item = await self.get_with_meta(keyspace, key, sort=sort, consistency=consistency)
        return None if item is None else item.value

    async def get_with_meta(self, keyspace: str, key: BytesLike, *,
                            sort: BytesLike | None = None,
                            consistency: str | None = None) -> Item | None:
        k, s = self._key(keyspace, key, sort)
        reply = await self._keyed(keyspace, k, Get, (keyspace, k, s, _level(consistency)))
        assert isinstance(reply, Value)
        if not reply.found:
            return None
        return Item(reply.value, reply.hlc, reply.expires_at_ms, reply.version)

    async def delete(self, keyspace: str, key: BytesLike, *, sort: BytesLike | None = None,
                     consistency: str | None = None, idempotency: bytes | None = None,
                     fence: FenceLike | None = None) -> int:
        """Delete (write a tombstone); returns its HLC timestamp. Deleting an absent key
        succeeds. ``fence``: as for ``put``."""
        k, s = self._key(keyspace, key, sort)
        reply = await self._keyed(keyspace, k, Delete,
                                  (keyspace, k, s, _level(consistency),
                                   self._idempotency(keyspace, idempotency), *_fence(fence)))
        assert isinstance(reply, Done)
        return reply.hlc

    async def cas(self, keyspace: str, key: BytesLike, value: BytesLike, *,
                  expected_version: int | None = None,
                  expected_value: BytesLike | None = None, expected_absent: bool = False,
                  sort: BytesLike | None = None, idempotency: bytes | None = None,
                  fence: FenceLike | None = None) -> int:
        """Strong keyspaces: set ``value`` if the key is at ``expected_version`` (or holds
        ``expected_value``, or is absent with ``expected_absent``); returns the new
        version. Raises ``ConflictError`` (with the current ``version`` and ``value``) when
        the expectation does not hold. Pass the same ``idempotency`` when you retry a call
        that failed ambiguously (timeout, connection lost), so it is not applied twice."""
        k, s = self._key(keyspace, key, sort)
        v = _b(value, "value")
        expected = None if expected_value is None else _b(expected_value, "expected_value")
        args = (keyspace, k, v, s, expected_version, expected, expected_absent,
                idempotency or _new_id(self._rng), *_fence(fence))
        reply = await self._keyed(keyspace, k, CompareAndSet, args)
        if isinstance(reply, Conflict):
            raise ConflictError(
                f"the expectation did not hold: the key is at version {reply.version}",
                version=reply.version, value=reply.value if reply.found else None)
        assert isinstance(reply, Changed)
        return reply.version

    async def incr(self, keyspace: str, key: BytesLike, delta: int = 1, *,
                   sort: BytesLike | None = None, idempotency: bytes | None = None,
                   fence: FenceLike | None = None) -> int:
        """Strong keyspaces: add ``delta`` to the key's counter atomically; returns the new
        value. Reuse ``idempotency`` on a retry after an ambiguous failure."""
        k, s = self._key(keyspace, key, sort)
        reply = await self._keyed(keyspace, k, Increment,
                                  (keyspace, k, delta, s, idempotency or _new_id(self._rng),
                                   *_fence(fence)))
        assert isinstance(reply, Changed)
        return int(reply.value)

    # -- locks -----------------------------------------------------------------------------

    async def acquire(self, name: str, ttl: float = 10.0, *, wait: float | None = 0.0,
                      owner: str | None = None) -> Lease:
        """A lease on lock ``name`` for ``ttl`` seconds, with a fencing token that grows with
        every grant. ``wait``: seconds to wait for the lock to be released or to expire
        (None: forever; 0: fail at once with ``LockHeldError``). The waiting happens on the
        node (it is told of the release; no polling). ``owner``: the holder's id (default: a
        new one per call); an owner that already holds the lock gets its lease back, so
        give one explicitly only to resume a lease, never to two concurrent holders."""
        key = self._lock_key(name)
        ttl_ms = _ttl_ms(ttl)
        who = owner or f"{self.owner}-{next(self._acquires)}"
        idempotency = _new_id(self._rng)
        loop = asyncio.get_running_loop()
        deadline = None if wait is None else loop.time() + max(0.0, wait)
        while True:
            left = LOCK_WAIT_CHUNK_S if deadline is None else max(0.0, deadline - loop.time())
            wait_ms = int(min(left, LOCK_WAIT_CHUNK_S) * 1000)
            sent_at = time.monotonic()
            try:
                reply = await self._keyed(LOCK_KEYSPACE, key, AcquireLock,
                                          (name, who, ttl_ms, wait_ms, idempotency),
                                          timeout_s=self.timeout_s + wait_ms / 1000)
            except LockHeldError:
                if deadline is not None and loop.time() >= deadline:
                    raise
                continue
            assert isinstance(reply, LeaseReply)
            return Lease(name, who, reply.token, ttl_ms / 1000, sent_at)

    async def renew(self, lease: Lease, ttl: float | None = None) -> Lease:
        """Extend ``lease`` by ``ttl`` (default: its own) from now; ``LeaseLostError`` if it
        is no longer the lock's current lease."""
        ttl_ms = _ttl_ms(lease.ttl_s if ttl is None else ttl)
        sent_at = time.monotonic()
        reply = await self._keyed(LOCK_KEYSPACE, self._lock_key(lease.name), RenewLock,
                                  (lease.name, lease.owner, lease.token, ttl_ms,
                                   _new_id(self._rng)))
        assert isinstance(reply, LeaseReply)
        return Lease(lease.name, lease.owner, lease.token, ttl_ms / 1000, sent_at)

    async def release(self, lease: Lease) -> None:
        """Free the lock; ``LeaseLostError`` if the lease had already ended."""
        reply = await self._keyed(LOCK_KEYSPACE, self._lock_key(lease.name), ReleaseLock,
                                  (lease.name, lease.owner, lease.token, _new_id(self._rng)))
        assert isinstance(reply, Done)

    async def lock_status(self, name: str) -> LockInfo:
        """Who holds lock ``name`` now (a linearizable read): ``LockInfo(held, holder,
        token, expires_in_ms)``."""
        reply = await self._keyed(LOCK_KEYSPACE, self._lock_key(name), LockStatus, (name,))
        assert isinstance(reply, LockInfo)
        return reply

    def lock(self, name: str, ttl: float = 10.0, *, wait: float | None = None,
             owner: str | None = None) -> contextlib.AbstractAsyncContextManager[Lease]:
        """``async with client.lock("name", ttl=10) as lease:`` acquires (waiting up to
        ``wait`` seconds, None: forever), renews every ttl/3 while the block runs, and
        releases at its end. Pass ``fence=lease`` to writes made under it. If a renewal
        finds the lease gone, ``lease.lost`` becomes True (and fenced writes fail)."""

        @contextlib.asynccontextmanager
        async def run() -> AsyncIterator[Lease]:
            lease = await self.acquire(name, ttl, wait=wait, owner=owner)
            async with held(lease, self.renew, self.release) as kept:
                yield kept

        return run()

    # -- tasks (the Executor interface: ``async_executor``, ``client.tasks``) ---------------

    async def submit_task(self, function: str, args: bytes = b"", *, pickled: bool = False,
                          queue: str = "default", priority: int = 0, slots: int = 1,
                          tags: Sequence[str] = (), timeout_s: float = 300.0,
                          max_retries: int = 0, backoff_s: float = 1.0,
                          result_ttl_s: float = RESULT_TTL_S_DEFAULT,
                          idempotency_key: str = "", task_id: bytes | None = None) -> bytes:
        """Queue a task; returns its id. ``function`` is a registered ``module:function``
        and ``args`` the msgpack of ``[args, kwargs]`` (``client.tasks.encode_call`` makes
        both; with ``pickled``, ``args`` is cloudpickle of ``(callable, args, kwargs)``).
        ``idempotency_key``: submitting the same key again returns the first task's id
        (no second task). Without one the client picks the id, so its own retry after a
        lost reply is the same task."""
        spec = task_spec(function, args, pickled=pickled, queue=queue, priority=priority,
                         slots=slots, tags=tags, timeout_s=timeout_s,
                         max_retries=max_retries, backoff_s=backoff_s,
                         result_ttl_s=result_ttl_s)
        if len(idempotency_key) > IDEMPOTENCY_KEY_CHARS_MAX:
            raise BadRequestError(f"an idempotency key has at most {IDEMPOTENCY_KEY_CHARS_MAX} "
                                  "characters")
        if idempotency_key:
            reply = await self._request(None, SubmitTask, (spec, b"", idempotency_key),
                                        retry=True)
        else:
            chosen = task_id or _new_id(self._rng)
            reply = await self._keyed(TASK_KEYSPACE, chosen, SubmitTask, (spec, chosen, ""))
        assert isinstance(reply, TaskSubmitted)
        return reply.task_id

    async def task_status(self, task_id: bytes) -> TaskInfo | None:
        """The task's state, attempts, history, result (encoded) and error; None if there
        is no such task (or its result's TTL has passed)."""
        reply = await self._keyed(TASK_KEYSPACE, _task_id(task_id), GetTask, (task_id,))
        assert isinstance(reply, TaskInfo)
        return reply if reply.found else None

    async def cancel_task(self, task_id: bytes) -> TaskInfo:
        """Cancel a task that has not finished (a running one is stopped); its new state.
        ``NotFoundError`` for no such task; an error for one that finished already."""
        reply = await self._keyed(TASK_KEYSPACE, _task_id(task_id), CancelTask, (task_id,))
        assert isinstance(reply, TaskInfo)
        return reply

    async def list_tasks(self, queue: str = "default", state: str | None = None,
                         limit: int = 100) -> list[TaskInfo]:
        """Unfinished tasks of ``queue`` (``state``: only those), highest priority first;
        results are omitted (``task_status`` has them)."""
        if not 1 <= limit <= TASK_LIST_MAX:
            raise BadRequestError(f"limit must be 1..{TASK_LIST_MAX}, got {limit}")
        reply = await self._request(None, ListTasks, (queue, state or "", limit), retry=True)
        assert isinstance(reply, TaskList)
        return list(reply.tasks)

    async def wait_tasks(self, task_ids: Sequence[bytes], timeout_s: float) -> TaskInfos:
        """Wait until at least one of ``task_ids`` (at most 1,000) has finished, or
        ``timeout_s``: ``TaskInfos(tasks=finished ones, missing=ids with no task)``. A
        finished task's ``result_omitted`` means the reply had no room for its result:
        read it with ``task_status``."""
        ids = [_task_id(i) for i in task_ids]
        if len(ids) > TASK_IDS_PER_WAIT_MAX:
            raise BadRequestError(f"wait for at most {TASK_IDS_PER_WAIT_MAX} tasks at once")
        wait_ms = int(min(max(0.0, timeout_s), TASK_WAIT_MS_MAX / 1000) * 1000)
        if not ids:
            return TaskInfos(0)
        # To the first id's node: the one a task is submitted through runs it if it can,
        # and learns of its end without watching (``TaskWatcher`` groups ids by node).
        reply = await self._keyed(TASK_KEYSPACE, ids[0], WaitTasks, (ids, wait_ms),
                                  timeout_s=self.timeout_s + wait_ms / 1000)
        assert isinstance(reply, TaskInfos)
        return reply

    def task_home(self, task_id: bytes) -> str | None:
        """The node a task's requests go to first (its register's first replica), by this
        client's view of the ring; None before the ring is known."""
        if not len(self._ring):
            return None
        return self._ring.preference_list(token(task_id), 1)[0]

    def async_executor(self, *, queue: str = "default", priority: int = 0,
                       tags: Sequence[str] = (), timeout_s: float = 300.0,
                       max_retries: int = 0, **options: Any) -> AsyncTaskExecutor:
        """``async with client.async_executor() as ex: fut = await ex.submit(fn, x)``:
        run functions on the cluster (``client.tasks.AsyncTaskExecutor``)."""
        from leaderless.client.tasks import AsyncTaskExecutor

        return AsyncTaskExecutor(self, queue=queue, priority=priority, tags=tags,
                                 timeout_s=timeout_s, max_retries=max_retries, **options)

    # -- watches -----------------------------------------------------------------------------

    async def watch(self, keyspace: str, key: BytesLike, *, sort: BytesLike | None = None,
                    prefix: bool = False, since_version: int = 0
                    ) -> AsyncIterator[KeyChange]:
        """Strong keyspaces: ``async for change in client.watch("ks", "k"):`` yields each
        change of the key (``KeyChange``: key, sort, version, value; value None = deleted),
        first its current value if its version is above ``since_version``. With ``prefix``,
        every key whose partition key starts with ``key``, starting with their current
        values. The watch survives node failures: it reconnects to another node and resumes
        after the versions it has delivered (intermediate versions that changed while it
        was disconnected are skipped; the latest is never missed). Leave the loop (or
        ``aclose()`` the iterator) to stop."""
        k, s = self._key(keyspace, key, None if prefix else sort)
        if prefix and sort is not None:
            raise BadRequestError("a prefix watch matches partition keys only; give no sort")
        if not self._connected:
            await self.connect()
        seen: dict[tuple[bytes, bytes], int] = {}
        if since_version and not prefix:
            seen[(k, s)] = since_version
        backoff_s = 0.05
        failed: str | None = None
        while True:
            n = self._replication.get(keyspace, DEFAULT_REPLICATION)
            replicas = ([self._addresses[name] for name in
                         self._ring.preference_list(token(k), n)]
                        if self.token_aware and len(self._ring) and not prefix else [])
            conn = await self._any_connection(self._candidates(replicas, failed), set(),
                                              dedicated=True)
            if conn is None:
                raise NoNodeAvailableError("no node answers at " + ", ".join(self.seeds))
            since = 0 if prefix else seen.get((k, s), 0)
            request_id, queue = conn.open_stream(WatchRequest, (keyspace, k, s, prefix, since))
            try:
                while True:
                    item = await queue.get()
                    if isinstance(item, WatchEvent):
                        backoff_s = 0.05
                        slot = (item.key, item.sort)
                        if item.version <= seen.get(slot, 0):
                            continue
                        seen[slot] = item.version
                        yield KeyChange(item.key, item.sort, item.version,
                                        item.value if item.found else None)
                        continue
                    if isinstance(item, Failure):
                        err = _failure_error(item)
                        if not isinstance(err, RETRYABLE_WATCH_ERRORS):
                            raise err
                    failed = conn.address
                    break
            finally:
                conn.close_stream(request_id, Unwatch)
                conn.close()
            await asyncio.sleep(backoff_s)
            backoff_s = min(1.0, backoff_s * 2)

    def _lock_key(self, name: str) -> bytes:
        if not isinstance(name, str) or not name or len(name.encode()) > LOCK_NAME_BYTES_MAX:
            raise BadRequestError(f"a lock name is text of 1..{LOCK_NAME_BYTES_MAX} bytes")
        return name.encode()

    def _idempotency(self, keyspace: str, given: bytes | None) -> bytes:
        if given is not None:
            return given
        return _new_id(self._rng) if self._modes.get(keyspace) == "strong" else b""

    async def scan(self, keyspace: str, key: BytesLike, *, start: BytesLike | None = None,
                   end: BytesLike | None = None, limit: int | None = None,
                   consistency: str | None = None) -> list[Row]:
        """Rows of partition ``key`` with start <= sort < end in sort-key order (``Row``:
        sort, value, hlc, expires_at_ms), paging through the node's replies until ``limit``
        rows (None: the whole range)."""
        k, _ = self._key(keyspace, key, None)
        lo = None if start is None else _b(start, "start")
        hi = None if end is None else _b(end, "end")
        if limit is not None and limit < 1:
            raise BadRequestError(f"limit must be >= 1, got {limit}")
        level = _level(consistency)
        rows: list[Row] = []
        while True:
            want = SCAN_PAGE_ROWS if limit is None else min(limit - len(rows),
                                                            CLIENT_SCAN_ROWS_MAX)
            reply = await self._keyed(keyspace, k, Scan, (keyspace, k, lo, hi, want, level))
            assert isinstance(reply, Rows)
            rows.extend(reply.rows)
            if not reply.more or not reply.rows or (limit is not None and len(rows) >= limit):
                return rows
            lo = reply.rows[-1].sort + b"\0"

    # -- keyspaces -------------------------------------------------------------------------

    async def create_keyspace(self, name: str, replication: int = DEFAULT_REPLICATION,
                              mode: str = "eventual", *, read_consistency: str = "QUORUM",
                              write_consistency: str = "QUORUM",
                              if_not_exists: bool = False) -> None:
        _check_text(name, "keyspace name")
        args = (name, replication, mode, read_consistency.upper(), write_consistency.upper(),
                if_not_exists)
        await self._request(None, CreateKeyspace, args, retry=if_not_exists)
        self._replication.setdefault(name, replication)
        self._modes.setdefault(name, mode)

    async def list_keyspaces(self) -> list[KeyspaceInfo]:
        reply = await self._request(None, ListKeyspaces, (), retry=True)
        assert isinstance(reply, Keyspaces)
        self._replication = {ks.name: ks.replication for ks in reply.keyspaces}
        self._modes = {ks.name: ks.mode for ks in reply.keyspaces}
        return list(reply.keyspaces)

    async def describe_ring(self) -> list[RingMember]:
        reply = await self._request(None, DescribeRing, (), retry=True)
        assert isinstance(reply, RingDescription)
        self._set_ring(reply.members)
        return list(reply.members)

    # -- authentication and administration ----------------------------------------------

    async def login(self, user: str, password: str, totp: str | None = None) -> str:
        """Log in as ``user`` (``totp``: the current code, for a user with TOTP on); returns
        the token, which this client then sends on all its connections (the open ones are
        re-authenticated). Raises ``BadCredentialsError``, ``TotpRequiredError`` or
        ``TooManyAttemptsError`` (``retry_after_s``). Call it before ``connect`` on a
        cluster with auth (``async with`` connects, which needs a token)."""
        reply = await self._request(None, Login, (user, password, totp or ""), retry=False)
        assert isinstance(reply, Token)
        await self.use_token(reply.token)
        return reply.token

    async def use_token(self, token: str | None) -> None:
        """Act as ``token``'s user from now on: every open connection is re-authenticated
        (None: forget the token; open connections are closed)."""
        self.token = token or None
        for pool in list(self._pools.values()):
            for conn in list(pool):
                if not conn.is_open:
                    continue
                if self.token is None:
                    conn.close()
                    continue
                try:
                    await _authenticate(conn, self.token, self.timeout_s)
                except ConnectionLostError:
                    continue

    async def whoami(self) -> Authenticated:
        """Who the token names (``user``, ``roles``, ``expires_at``); ``auth`` False if
        the cluster runs without authentication. ``UnauthenticatedError`` if it runs with
        it and this client has no valid token."""
        conn = await self._any_connection(self._candidates(None, None), set())
        if conn is None:
            raise NoNodeAvailableError("no node answers at " + ", ".join(self.seeds))
        return await _authenticate(conn, self.token or "", self.timeout_s)

    async def logout(self) -> None:
        """Revoke this client's token on the cluster and forget it."""
        if self.token is None:
            return
        await self._request(None, Logout, (), retry=False)
        await self.use_token(None)

    async def create_user(self, name: str, password: str, roles: Sequence[str] = ()
                          ) -> None:
        await self._admin(CreateUser, (name, password, list(roles)))

    async def delete_user(self, name: str) -> None:
        await self._admin(DeleteUser, (name,))

    async def set_password(self, name: str, password: str) -> None:
        """Admins, or the user itself."""
        await self._admin(SetPassword, (name, password))

    async def list_users(self) -> list[UserEntry]:
        reply = await self._admin(ListUsers, (), retry=True)
        assert isinstance(reply, Users)
        return list(reply.users)

    async def grant_role(self, user: str, role: str) -> None:
        """Give ``user`` the role (``leaderless user grant USER ROLE``)."""
        await self._admin(UserRole, (user, role, False))

    async def revoke_role(self, user: str, role: str) -> None:
        await self._admin(UserRole, (user, role, True))

    async def create_role(self, name: str) -> None:
        await self._admin(CreateRole, (name,))

    async def delete_role(self, name: str) -> None:
        await self._admin(DeleteRole, (name,))

    async def role_grant(self, role: str, level: str, keyspace: str,
                         prefix: BytesLike = b"") -> None:
        """Let ``role`` do ``level`` (read, write or admin) on ``keyspace`` ("*": all),
        limited to partition keys starting with ``prefix``."""
        await self._admin(RoleGrant, (role, level, keyspace, _b(prefix, "prefix"), False))

    async def role_revoke(self, role: str, level: str, keyspace: str,
                          prefix: BytesLike = b"") -> None:
        await self._admin(RoleGrant, (role, level, keyspace, _b(prefix, "prefix"), True))

    async def list_roles(self) -> list[RoleEntry]:
        reply = await self._admin(ListRoles, (), retry=True)
        assert isinstance(reply, Roles)
        return list(reply.roles)

    async def enable_totp(self, user: str) -> str:
        """Turn TOTP on for ``user``; returns the otpauth:// URI (it holds the secret)."""
        reply = await self._admin(EnableTotp, (user,))
        assert isinstance(reply, TotpProvisioning)
        return reply.uri

    async def disable_totp(self, user: str) -> None:
        await self._admin(DisableTotp, (user,))

    async def create_api_token(self, user: str, name: str, ttl_s: float) -> Token:
        """A token for a program (no TOTP), valid ``ttl_s`` seconds: ``Token(token,
        token_id, user, expires_at)``; revoke it with ``revoke_token(token_id)``."""
        reply = await self._admin(CreateApiToken, (user, name, float(ttl_s)))
        assert isinstance(reply, Token)
        return reply

    async def revoke_token(self, token_id: str) -> None:
        await self._admin(RevokeToken, (token_id,))

    async def _admin(self, kind: type[Any], args: tuple[Any, ...], *, retry: bool = False
                     ) -> ClientReply:
        """Auth administration goes to any node (each serves it through the system
        keyspace); changes are not retried, so a lost reply is reported, not repeated."""
        return await self._request(None, kind, args, retry=retry)

    # -- routing and retries ---------------------------------------------------------------

    def _key(self, keyspace: str, key: BytesLike, sort: BytesLike | None
             ) -> tuple[bytes, bytes]:
        _check_text(keyspace, "keyspace name")
        k = _b(key, "key")
        s = b"" if sort is None else _b(sort, "sort")
        if len(k) > KEY_BYTES_MAX or len(s) > KEY_BYTES_MAX:
            raise BadRequestError(f"keys are limited to {KEY_BYTES_MAX} bytes on the wire "
                                  "(and the node's own limit is lower)")
        return k, s

    async def _keyed(self, keyspace: str, key: bytes, kind: type[Any], args: tuple[Any, ...],
                     timeout_s: float | None = None) -> ClientReply:
        if not self._connected:
            await self.connect()
        replicas: list[str] = []
        if self.token_aware and len(self._ring):
            n = (LOCK_REPLICATION if keyspace == LOCK_KEYSPACE
                 else self._replication.get(keyspace, DEFAULT_REPLICATION))
            names = self._ring.preference_list(token(key), n)
            replicas = [self._addresses[name] for name in names]
        # Strong keyspaces: every client sends a key's changes to the same replica (the
        # first reachable in ring order), whose proposer then batches them and keeps the
        # one-round-trip path, instead of proposers on several nodes duelling over ballots.
        ordered = (keyspace in (LOCK_KEYSPACE, TASK_KEYSPACE)
                   or self._modes.get(keyspace) == "strong")
        return await self._request(replicas, kind, args, retry=True, ordered=ordered,
                                   timeout_s=timeout_s)

    def _candidates(self, preferred: list[str] | None, exclude: str | None,
                    ordered: bool = False) -> list[str]:
        """Addresses to try, best first: reachable replicas (by the snitch's score, near-ties
        shuffled; or in ring order with ``ordered``), then every other known node
        (shuffled), then nodes recently down (last resort)."""
        now = asyncio.get_running_loop().time()
        known = list(dict.fromkeys([*self._addresses.values(), *self.seeds]))
        first = [a for a in (preferred or []) if a != exclude]
        if not ordered:
            self._rng.shuffle(first)
            first = self.snitch.order(now, first)
        rest = [a for a in known if a != exclude and a not in first]
        self._rng.shuffle(rest)
        candidates = first + rest
        up = [a for a in candidates if self._down_until.get(a, 0.0) <= now]
        down = [a for a in candidates if self._down_until.get(a, 0.0) > now]
        return up + down

    async def _request(self, preferred: list[str] | None, kind: type[Any],
                       args: tuple[Any, ...], *, retry: bool, ordered: bool = False,
                       timeout_s: float | None = None) -> ClientReply:
        if self._closed:
            raise LeaderlessError("the client is closed", code="closed")
        attempts = 2 if retry else 1
        failed: str | None = None
        last: LeaderlessError | None = None
        tried_connect: set[str] = set()
        first_sent: float | None = None  # set once an attempt was lost after sending
        while attempts > 0:
            conn = await self._any_connection(self._candidates(preferred, failed, ordered),
                                              tried_connect)
            if conn is None:
                break
            attempts -= 1
            sent = args
            if first_sent is not None and kind in _RETRY_MARKED:
                # Tell the node how long ago the lost attempt went out: a strong change is
                # then applied only if the key provably did not take it already.
                assert len(args) == len(kind.__struct_fields__) - 2, kind
                elapsed_ms = int((asyncio.get_running_loop().time() - first_sent) * 1000)
                sent = (*args, max(1, elapsed_ms))
            started = asyncio.get_running_loop().time()
            try:
                reply = await self._timed_call(conn, kind, sent, timeout_s or self.timeout_s)
            except ConnectionLostError as exc:
                last, failed = exc, conn.address
                self._mark_down(conn.address)
                if first_sent is None:
                    first_sent = started
                continue
            if isinstance(reply, Failure):
                err = _failure_error(reply)
                if isinstance(err, OverloadedError):
                    last, failed = err, conn.address
                    continue
                raise err
            return reply
        if last is not None:
            raise last
        raise NoNodeAvailableError(
            "no node answers at " + ", ".join(tried_connect or self.seeds)
            + "; are the nodes running, and are these their client (not gossip) ports?")

    async def _timed_call(self, conn: NodeConnection, kind: type[Any], args: tuple[Any, ...],
                          timeout_s: float) -> ClientReply:
        """``conn.call``, telling the snitch: in flight while it runs; its round trip as a
        latency sample when a data request is answered; a timeout as that much time lost
        (a lost connection marks the node down instead)."""
        loop = asyncio.get_running_loop()
        address = conn.address
        started = loop.time()
        self.snitch.on_send(address, started)
        try:
            reply = await conn.call(kind, args, timeout_s)
        except RequestTimeoutError:
            now = loop.time()
            self.snitch.on_timeout(address, now, now - started)
            raise
        except BaseException:
            self.snitch.on_reply(address, loop.time())
            raise
        now = loop.time()
        timed = kind in _TIMED and not isinstance(reply, Failure)
        self.snitch.on_reply(address, now, now - started if timed else None)
        return reply

    async def _any_connection(self, candidates: list[str], tried: set[str],
                              dedicated: bool = False) -> NodeConnection | None:
        for address in candidates:
            if dedicated:
                try:
                    return await self._connect(address)
                except (OSError, TimeoutError):
                    self._mark_down(address)
                    continue
            conn = self._pooled(address)
            if conn is not None:
                return conn
            if address in tried:
                continue
            tried.add(address)
            try:
                return await self._open(address)
            except (OSError, TimeoutError):
                self._mark_down(address)
        return None

    def _pooled(self, address: str) -> NodeConnection | None:
        pool = self._pools.get(address)
        if not pool:
            return None
        live = [c for c in pool if c.is_open]
        if len(live) != len(pool):
            self._pools[address] = pool = live
        if (pool and len(pool) < self.connections_per_node and address not in self._growing
                and not self._closed):
            # Grow the pool in the background; use what we have meanwhile.
            self._growing.add(address)
            task = asyncio.get_running_loop().create_task(self._open(address))

            def grown(t: asyncio.Task[Any]) -> None:
                self._growing.discard(address)
                _ignore_result(t)

            task.add_done_callback(grown)
        if not pool:
            return None
        i = self._next_conn.get(address, 0)
        self._next_conn[address] = i + 1
        return pool[i % len(pool)]

    async def _open(self, address: str) -> NodeConnection:
        pending = self._connecting.get(address)
        if pending is not None:
            return await asyncio.shield(pending)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[NodeConnection] = loop.create_future()
        self._connecting[address] = future
        try:
            conn = await self._connect(address)
        except (OSError, TimeoutError, LeaderlessError) as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, nobody else must
            raise
        finally:
            self._connecting.pop(address, None)
        if self._closed:
            conn.close()
            raise ConnectionLostError("the client is closed")
        self._pools.setdefault(address, []).append(conn)
        self._down_until.pop(address, None)
        future.set_result(conn)
        return conn

    async def _connect(self, address: str) -> NodeConnection:
        """A new connection to ``address``, authenticated with ``self.token`` if set
        (raises OSError/TimeoutError if unreachable, the node's error if it refuses the
        token)."""
        host, port = _split(address)
        conn = await NodeConnection.open(host, port, self.connect_timeout_s, self.ssl_context)
        credential = self.token
        if credential is not None:
            try:
                await _authenticate(conn, credential, self.timeout_s)
            except BaseException:
                conn.close()
                raise
        return conn

    def _mark_down(self, address: str) -> None:
        self._down_until[address] = asyncio.get_running_loop().time() + NODE_RETRY_AFTER_S
        self._schedule_refresh()


async def _authenticate(conn: NodeConnection, credential: str, timeout_s: float
                        ) -> Authenticated:
    reply = await conn.call(Authenticate, (credential,), timeout_s)
    if isinstance(reply, Failure):
        raise _failure_error(reply)
    assert isinstance(reply, Authenticated)
    return reply


_RETRY_MARKED: frozenset[type[Any]] = frozenset({Put, Delete, CompareAndSet, Increment})
"""Requests that carry ``retry_ms`` as their last field (strong changes)."""


def _failure_error(reply: Failure) -> LeaderlessError:
    return error_for(reply.code, reply.message, reply.received, reply.required,
                     reply.retry_after_s)


def _ignore_result(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


def _task_id(task_id: bytes) -> bytes:
    if not isinstance(task_id, bytes) or not 1 <= len(task_id) <= TASK_ID_BYTES_MAX:
        raise BadRequestError(f"a task id is 1 to {TASK_ID_BYTES_MAX} bytes, as "
                              "submit_task returned it")
    return task_id


def task_spec(function: str, args: bytes = b"", **fields: Any) -> TaskSpec:
    """A ``TaskSpec`` checked against its wire limits here (``BadRequestError`` names the
    field), so a bad one never reaches a node."""
    tags = list(fields.pop("tags", ()))
    try:
        spec = TaskSpec(function, args, tags=tags, **fields)
        return msgspec.msgpack.decode(msgspec.msgpack.encode(spec), type=TaskSpec)
    except (msgspec.ValidationError, TypeError) as exc:
        raise BadRequestError(f"task: {exc}") from None


def _fence(fence: FenceLike | None) -> tuple[str, int]:
    if fence is None:
        return ("", 0)
    if isinstance(fence, Lease):
        return fence.fence
    lock, token = fence
    if not isinstance(lock, str) or not lock or not isinstance(token, int) or token < 0:
        raise BadRequestError("fence is a Lease or a (lock name, token) pair")
    return (lock, token)


def _ttl_ms(ttl: float) -> int:
    ttl_ms = int(ttl * 1000)
    if not LEASE_TTL_MS_MIN <= ttl_ms <= LEASE_TTL_MS_MAX:
        raise BadRequestError(f"a lease ttl is {LEASE_TTL_MS_MIN / 1000}.."
                              f"{LEASE_TTL_MS_MAX // 1000} seconds, got {ttl}")
    return ttl_ms


def _level(consistency: str | None) -> str | None:
    if consistency is None:
        return None
    level = consistency.upper()
    if len(level) > 8:
        raise BadRequestError(f"consistency {consistency[:20]!r} is not one of ONE, TWO, "
                              "QUORUM, ALL")
    return level


def _check_text(text: str, what: str) -> None:
    if not isinstance(text, str):
        raise TypeError(f"{what} must be str, not {type(text).__name__}")
    if len(text) > KEYSPACE_TEXT_MAX:
        raise BadRequestError(f"the {what} has {len(text)} characters; the limit is "
                              f"{KEYSPACE_TEXT_MAX}")
