"""``Client``: the blocking client. It runs an ``AsyncClient`` on a private event loop in a
background thread, so it works from plain scripts, threads and Jupyter (whose own loop is
already running) alike. Methods and arguments are the ``AsyncClient``'s."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine, Iterator, Sequence
from typing import Any, TypeVar

from leaderless.api.kv_messages import (
    Authenticated,
    KeyspaceInfo,
    LockInfo,
    RingMember,
    RoleEntry,
    Row,
    TaskInfo,
    TaskInfos,
    Token,
    UserEntry,
)
from leaderless.client.async_client import (
    CONNECT_TIMEOUT_S,
    DEFAULT_CONNECTIONS_PER_NODE,
    DEFAULT_REPLICATION,
    DEFAULT_TIMEOUT_S,
    AsyncClient,
    BytesLike,
    FenceLike,
    Item,
)
from leaderless.client.locks import Lease
from leaderless.client.tasks import TaskExecutor, TaskOptions
from leaderless.core.tasks import RESULT_TTL_S_DEFAULT

T = TypeVar("T")


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class Client:
    """``with Client(["127.0.0.1:7400"]) as kv: kv.put("ks", "k", b"v")``. Thread-safe:
    calls from several threads are pipelined over the same connections.

    With auth on, pass ``token=``, or ``connect=False`` then ``login(user, password)``
    (connecting first needs a token)."""

    def __init__(self, nodes: Sequence[str], *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 connections_per_node: int = DEFAULT_CONNECTIONS_PER_NODE,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S, connect: bool = True,
                 **options: Any) -> None:
        self._loop = _new_loop()
        self._thread = threading.Thread(target=self._loop.run_forever,
                                        name="leaderless-client", daemon=True)
        self._thread.start()
        self._closed = False

        async def make() -> AsyncClient:
            return AsyncClient(nodes, timeout_s=timeout_s,
                               connections_per_node=connections_per_node,
                               connect_timeout_s=connect_timeout_s, **options)

        try:
            self._client = self._run(make())
            if connect:
                self._run(self._client.connect())
        except BaseException:
            self.close()
            raise

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            coro.close()
            raise RuntimeError("the client is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        client = getattr(self, "_client", None)
        if client is not None:
            try:
                self._run(client.close())
            except Exception:  # closing must not fail; the loop goes away regardless
                pass
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()

    def put(self, keyspace: str, key: BytesLike, value: BytesLike, *,
            sort: BytesLike | None = None, consistency: str | None = None,
            ttl: float | None = None, idempotency: bytes | None = None,
            fence: FenceLike | None = None) -> int:
        return self._run(self._client.put(keyspace, key, value, sort=sort,
                                          consistency=consistency, ttl=ttl,
                                          idempotency=idempotency, fence=fence))

    def get(self, keyspace: str, key: BytesLike, *, sort: BytesLike | None = None,
            consistency: str | None = None) -> bytes | None:
        return self._run(self._client.get(keyspace, key, sort=sort, consistency=consistency))

    def get_with_meta(self, keyspace: str, key: BytesLike, *, sort: BytesLike | None = None,
                      consistency: str | None = None) -> Item | None:
        return self._run(self._client.get_with_meta(keyspace, key, sort=sort,
                                                    consistency=consistency))

    def delete(self, keyspace: str, key: BytesLike, *, sort: BytesLike | None = None,
               consistency: str | None = None, idempotency: bytes | None = None,
               fence: FenceLike | None = None) -> int:
        return self._run(self._client.delete(keyspace, key, sort=sort,
                                             consistency=consistency,
                                             idempotency=idempotency, fence=fence))

    def cas(self, keyspace: str, key: BytesLike, value: BytesLike, *,
            expected_version: int | None = None, expected_value: BytesLike | None = None,
            expected_absent: bool = False, sort: BytesLike | None = None,
            idempotency: bytes | None = None, fence: FenceLike | None = None) -> int:
        return self._run(self._client.cas(
            keyspace, key, value, expected_version=expected_version,
            expected_value=expected_value, expected_absent=expected_absent, sort=sort,
            idempotency=idempotency, fence=fence))

    def incr(self, keyspace: str, key: BytesLike, delta: int = 1, *,
             sort: BytesLike | None = None, idempotency: bytes | None = None,
             fence: FenceLike | None = None) -> int:
        return self._run(self._client.incr(keyspace, key, delta, sort=sort,
                                           idempotency=idempotency, fence=fence))

    def acquire(self, name: str, ttl: float = 10.0, *, wait: float | None = 0.0,
                owner: str | None = None) -> Lease:
        return self._run(self._client.acquire(name, ttl, wait=wait, owner=owner))

    def renew(self, lease: Lease, ttl: float | None = None) -> Lease:
        return self._run(self._client.renew(lease, ttl))

    def release(self, lease: Lease) -> None:
        self._run(self._client.release(lease))

    def lock_status(self, name: str) -> LockInfo:
        return self._run(self._client.lock_status(name))

    @contextlib.contextmanager
    def lock(self, name: str, ttl: float = 10.0, *, wait: float | None = None,
             owner: str | None = None) -> Iterator[Lease]:
        """``with client.lock("name", ttl=10) as lease:``: as ``AsyncClient.lock`` (renewed
        in the client's background loop while the block runs, released after)."""
        manager = self._client.lock(name, ttl, wait=wait, owner=owner)
        lease = self._run(manager.__aenter__())
        try:
            yield lease
        except BaseException as exc:
            if not self._run(manager.__aexit__(type(exc), exc, exc.__traceback__)):
                raise
        else:
            self._run(manager.__aexit__(None, None, None))

    # -- tasks (see ``AsyncClient`` and ``client.tasks``) -------------------------------------

    def submit_task(self, function: str, args: bytes = b"", **options: Any) -> bytes:
        return self._run(self._client.submit_task(function, args, **options))

    def task_status(self, task_id: bytes) -> TaskInfo | None:
        return self._run(self._client.task_status(task_id))

    def cancel_task(self, task_id: bytes) -> TaskInfo:
        return self._run(self._client.cancel_task(task_id))

    def list_tasks(self, queue: str = "default", state: str | None = None,
                   limit: int = 100) -> list[TaskInfo]:
        return self._run(self._client.list_tasks(queue, state, limit))

    def wait_tasks(self, task_ids: Sequence[bytes], timeout_s: float) -> TaskInfos:
        return self._run(self._client.wait_tasks(task_ids, timeout_s))

    def executor(self, *, queue: str = "default", priority: int = 0, tags: Sequence[str] = (),
                 timeout_s: float = 300.0, max_retries: int = 0, slots: int = 1,
                 backoff_s: float = 1.0, result_ttl_s: float = RESULT_TTL_S_DEFAULT,
                 pickle: bool = False) -> TaskExecutor:
        """``with client.executor(queue="etl") as ex: ex.submit(fn, *args)``: a
        ``concurrent.futures.Executor`` whose calls run as tasks on the cluster
        (``client.tasks.TaskExecutor``). ``timeout_s`` bounds one run; ``max_retries``
        re-runs a failed task (after ``backoff_s``, doubling); ``tags``: only nodes with
        every tag run it; ``pickle``: send any callable with cloudpickle (the cluster must
        allow it)."""
        options = TaskOptions(queue, priority, tuple(tags), timeout_s, max_retries, slots,
                              backoff_s, result_ttl_s, pickle)
        return TaskExecutor(self, options)

    def scan(self, keyspace: str, key: BytesLike, *, start: BytesLike | None = None,
             end: BytesLike | None = None, limit: int | None = None,
             consistency: str | None = None) -> list[Row]:
        return self._run(self._client.scan(keyspace, key, start=start, end=end, limit=limit,
                                           consistency=consistency))

    def create_keyspace(self, name: str, replication: int = DEFAULT_REPLICATION,
                        mode: str = "eventual", *, read_consistency: str = "QUORUM",
                        write_consistency: str = "QUORUM", if_not_exists: bool = False
                        ) -> None:
        self._run(self._client.create_keyspace(
            name, replication, mode, read_consistency=read_consistency,
            write_consistency=write_consistency, if_not_exists=if_not_exists))

    def list_keyspaces(self) -> list[KeyspaceInfo]:
        return self._run(self._client.list_keyspaces())

    def describe_ring(self) -> list[RingMember]:
        return self._run(self._client.describe_ring())

    # -- authentication and administration (see ``AsyncClient``) ---------------------------

    def login(self, user: str, password: str, totp: str | None = None) -> str:
        return self._run(self._client.login(user, password, totp))

    def logout(self) -> None:
        self._run(self._client.logout())

    def whoami(self) -> Authenticated:
        return self._run(self._client.whoami())

    def create_user(self, name: str, password: str, roles: Sequence[str] = ()) -> None:
        self._run(self._client.create_user(name, password, roles))

    def delete_user(self, name: str) -> None:
        self._run(self._client.delete_user(name))

    def set_password(self, name: str, password: str) -> None:
        self._run(self._client.set_password(name, password))

    def list_users(self) -> list[UserEntry]:
        return self._run(self._client.list_users())

    def grant_role(self, user: str, role: str) -> None:
        self._run(self._client.grant_role(user, role))

    def revoke_role(self, user: str, role: str) -> None:
        self._run(self._client.revoke_role(user, role))

    def create_role(self, name: str) -> None:
        self._run(self._client.create_role(name))

    def delete_role(self, name: str) -> None:
        self._run(self._client.delete_role(name))

    def role_grant(self, role: str, level: str, keyspace: str, prefix: BytesLike = b"") -> None:
        self._run(self._client.role_grant(role, level, keyspace, prefix))

    def role_revoke(self, role: str, level: str, keyspace: str,
                    prefix: BytesLike = b"") -> None:
        self._run(self._client.role_revoke(role, level, keyspace, prefix))

    def list_roles(self) -> list[RoleEntry]:
        return self._run(self._client.list_roles())

    def enable_totp(self, user: str) -> str:
        return self._run(self._client.enable_totp(user))

    def disable_totp(self, user: str) -> None:
        self._run(self._client.disable_totp(user))

    def create_api_token(self, user: str, name: str, ttl_s: float) -> Token:
        return self._run(self._client.create_api_token(user, name, ttl_s))

    def revoke_token(self, token_id: str) -> None:
        self._run(self._client.revoke_token(token_id))
