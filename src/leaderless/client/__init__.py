"""The Python client for leaderless's key-value store.

    from leaderless.client import Client
    with Client(["127.0.0.1:7400"]) as kv:
        kv.create_keyspace("users", replication=3, if_not_exists=True)
        kv.put("users", "alice", b"...")
        kv.get("users", "alice")

``AsyncClient`` is the asyncio version with the same methods. Both are token-aware (each
request goes to a replica of its key) and retry once on another node after a connection
failure or ``overloaded``; errors are the exceptions below, one per protocol error code.

Tasks: ``with client.executor() as ex: ex.submit(fn, *args)`` runs functions on the
cluster (a ``concurrent.futures.Executor``; ``AsyncClient.async_executor`` for asyncio),
see ``leaderless.client.tasks``.
"""

from leaderless.api.kv_messages import KeyspaceInfo, LockInfo, RingMember, Row, TaskInfo
from leaderless.client.async_client import AsyncClient, Item, KeyChange
from leaderless.client.errors import (
    BadCredentialsError,
    BadRequestError,
    ClockSkewError,
    ConflictError,
    ConnectionLostError,
    ContentionError,
    FencedError,
    InternalError,
    KeyspaceExistsError,
    LeaderlessError,
    LeaseLostError,
    LockHeldError,
    NoNodeAvailableError,
    NotFoundError,
    NotSupportedError,
    OverloadedError,
    PermissionDeniedError,
    ReadOnlyError,
    RequestTimeoutError,
    StorageError,
    TaskFailedError,
    TooManyAttemptsError,
    TotpRequiredError,
    UnauthenticatedError,
    UnavailableError,
    UnknownKeyspaceError,
)
from leaderless.client.locks import Lease
from leaderless.client.sync_client import Client
from leaderless.client.tasks import AsyncTaskExecutor, TaskExecutor, TaskFuture
from leaderless.security.tls import ClientTls

__all__ = [
    "AsyncClient",
    "AsyncTaskExecutor",
    "BadCredentialsError",
    "BadRequestError",
    "ClockSkewError",
    "Client",
    "ClientTls",
    "ConflictError",
    "ConnectionLostError",
    "ContentionError",
    "FencedError",
    "InternalError",
    "Item",
    "KeyChange",
    "KeyspaceExistsError",
    "KeyspaceInfo",
    "LeaderlessError",
    "Lease",
    "LeaseLostError",
    "LockHeldError",
    "LockInfo",
    "NoNodeAvailableError",
    "NotFoundError",
    "NotSupportedError",
    "OverloadedError",
    "PermissionDeniedError",
    "ReadOnlyError",
    "RequestTimeoutError",
    "RingMember",
    "Row",
    "StorageError",
    "TaskExecutor",
    "TaskFailedError",
    "TaskFuture",
    "TaskInfo",
    "TooManyAttemptsError",
    "TotpRequiredError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnknownKeyspaceError",
]
