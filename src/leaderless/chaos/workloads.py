"""Workloads: clients that drive a store while the nemesis breaks it, recording a history.

A workload runs ``concurrency`` worker processes (asyncio tasks), each with its own client
and at most one operation pending, for a fixed time; every operation has a deadline
(``op_timeout_s``). After the faults are healed the harness calls ``final`` for the reads
its checker needs (process ``FINAL_PROCESS``). The workloads:

- ``register``: read, write and compare-and-set of small integers on a few keys of a strong
  keyspace; the keys rotate every ``ops_per_key`` operations, so each key's history stays
  small enough for the linearizability search.
- ``set``: unique adds (element n is key ``s<n>``) at QUORUM to an eventual keyspace; the
  final read reads every attempted element at ALL (QUORUM if ALL cannot answer).
- ``counter``: ``incr`` by 1 of one key of a strong keyspace; the final read reads it.
- ``lock``: acquire a lease (TTL ``lock_ttl_s``), write the data key of a strong keyspace
  fenced by it, hold it briefly, release it; the final read reads the data key.

How an error is recorded. A read that fails changed nothing: ``fail``. A change is ``fail``
only when it surely did not apply: the client never reached a node
(``NoNodeAvailableError``), or the store answered with a definite refusal that the
change's idempotency id makes final (a compare-and-set conflict, recorded as ``ok`` with
``False``; ``lock_held``; ``lease_lost``; ``fenced``). Everything else is ``info``: a
timeout or a lost connection may hide an applied change, and so may ``unavailable`` or
``overloaded``, because the client retries a lost connection once on another node and
reports only the last error (a strong change can also have reached a minority of
acceptors before it failed, and be completed later by another proposer).
"""

from __future__ import annotations

import abc
import asyncio
import itertools
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from leaderless.chaos.checkers import Result, check_counter, check_lock, check_register
from leaderless.chaos.checkers import check_set as check_set_history
from leaderless.chaos.history import FINAL_PROCESS, History
from leaderless.client.errors import (
    ConflictError,
    FencedError,
    KeyspaceExistsError,
    LeaderlessError,
    LeaseLostError,
    LockHeldError,
    NoNodeAvailableError,
)

__all__ = [
    "WORKLOADS",
    "CounterWorkload",
    "LockWorkload",
    "RegisterWorkload",
    "SetWorkload",
    "StoreClient",
    "Workload",
    "make_workload",
    "run_workload",
]

OP_TIMEOUT_S = 5.0
"""Per operation: longer than a node's replica timeout, so the node usually answers first."""
FINAL_TIMEOUT_S = 60.0
"""The final reads keep retrying (healing takes a while) until this deadline."""
THINK_S = 0.01
"""Up to this long between a worker's operations (random), so workers interleave."""


class StoreClient(Protocol):
    """What the workloads use of ``leaderless.client.AsyncClient`` (and what an in-test
    fake store implements)."""

    async def create_keyspace(self, name: str, replication: int = ..., mode: str = ..., *,
                              read_consistency: str = ..., write_consistency: str = ...,
                              if_not_exists: bool = ...) -> None: ...

    async def get(self, keyspace: str, key: str, *, sort: Any = ...,
                  consistency: str | None = ...) -> bytes | None: ...

    async def put(self, keyspace: str, key: str, value: str, *, sort: Any = ...,
                  consistency: str | None = ..., ttl: float | None = ...,
                  idempotency: bytes | None = ..., fence: Any = ...) -> int: ...

    async def cas(self, keyspace: str, key: str, value: str, *, expected_version: Any = ...,
                  expected_value: str | None = ..., expected_absent: bool = ...,
                  sort: Any = ..., idempotency: bytes | None = ..., fence: Any = ...
                  ) -> int: ...

    async def incr(self, keyspace: str, key: str, delta: int = ..., *, sort: Any = ...,
                   idempotency: bytes | None = ..., fence: Any = ...) -> int: ...

    async def acquire(self, name: str, ttl: float = ..., *, wait: float | None = ...,
                      owner: str | None = ...) -> Any: ...

    async def release(self, lease: Any) -> None: ...


DEFINITE_REFUSALS: dict[type[LeaderlessError], str] = {
    LockHeldError: "lock_held",
    LeaseLostError: "lease_lost",
    FencedError: "fenced",
}


def outcome(exc: BaseException, *, changes: bool) -> str:
    """``fail`` or ``info`` for an operation that raised ``exc`` (see the module doc)."""
    if not changes or isinstance(exc, NoNodeAvailableError):
        return "fail"
    if isinstance(exc, tuple(DEFINITE_REFUSALS)):
        return "fail"
    return "info"


def describe_error(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, LeaderlessError):
        return {"error": exc.code, "message": str(exc)[:200]}
    if isinstance(exc, TimeoutError):
        return {"error": "timeout", "message": "no answer within the operation's deadline"}
    return {"error": type(exc).__name__, "message": str(exc)[:200]}


class Workload(abc.ABC):
    """One kind of client load with its checker."""

    name: str = "workload"
    keyspace: str = ""

    def __init__(self, seed: int, *, concurrency: int = 5,
                 op_timeout_s: float = OP_TIMEOUT_S) -> None:
        self.seed = seed
        self.concurrency = concurrency
        self.op_timeout_s = op_timeout_s
        self.rng = random.Random(seed)

    @abc.abstractmethod
    async def setup(self, client: StoreClient) -> None:
        """Create what the workload needs (idempotent), retrying while the cluster settles."""

    @abc.abstractmethod
    async def step(self, process: int, client: StoreClient, history: History) -> None:
        """One operation (or one lock cycle) of ``process``, recorded in ``history``."""

    @abc.abstractmethod
    async def final(self, client: StoreClient, history: History) -> None:
        """The reads the checker needs, after healing."""

    @abc.abstractmethod
    def check(self, history: History) -> Result: ...

    async def op(self, history: History, process: int, f: str, key: Any, value: Any,
                 call: Callable[[], Awaitable[Any]], *, changes: bool,
                 record: Callable[[Any], Any] = lambda result: None,
                 timeout_s: float | None = None) -> tuple[str, Any]:
        """Run ``call`` as one recorded operation: (``ok``/``fail``/``info``, its result or
        the exception). An ``ok`` records ``record(result)`` as its value; a cas that
        raised ``ConflictError`` is ``ok`` with ``False``."""
        invoked = history.invoke(process, f, key, value)
        try:
            result = await asyncio.wait_for(call(), timeout_s or self.op_timeout_s)
        except ConflictError as exc:
            if f == "cas":
                history.ok(invoked, False)
                return "ok", False
            history.info(invoked, describe_error(exc))
            return "info", exc
        except (LeaderlessError, TimeoutError, OSError) as exc:
            kind = outcome(exc, changes=changes)
            (history.fail if kind == "fail" else history.info)(invoked, describe_error(exc))
            return kind, exc
        except BaseException as exc:
            history.info(invoked, describe_error(exc))
            raise
        history.ok(invoked, record(result))
        return "ok", result


async def _create_keyspace(client: StoreClient, name: str, mode: str,
                           deadline_s: float = FINAL_TIMEOUT_S) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    while True:
        try:
            await client.create_keyspace(name, 3, mode, if_not_exists=True)
            return
        except KeyspaceExistsError:
            return
        except (LeaderlessError, OSError, TimeoutError):
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.5)


async def _retrying(call: Callable[[], Awaitable[Any]], deadline: float,
                    timeout_s: float) -> Any:
    """``call`` until it succeeds or the loop time passes ``deadline`` (then re-raise)."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            return await asyncio.wait_for(call(), timeout_s)
        except (LeaderlessError, OSError, TimeoutError):
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.2)


# -- register -------------------------------------------------------------------------------------


class RegisterWorkload(Workload):
    name = "register"
    keyspace = "chaos_register"
    VALUES = 5
    """Values are 0..VALUES-1, so compare-and-sets often succeed (and reads are ambiguous
    enough to make the search work)."""

    def __init__(self, seed: int, *, keys: int = 3, ops_per_key: int = 300,
                 **kwargs: Any) -> None:
        super().__init__(seed, **kwargs)
        self.keys = keys
        self.ops_per_key = ops_per_key
        self._ops = itertools.count()

    async def setup(self, client: StoreClient) -> None:
        await _create_keyspace(client, self.keyspace, "strong")

    def _key(self) -> str:
        generation = next(self._ops) // (self.ops_per_key * self.keys)
        return f"r{self.seed}-{generation}-{self.rng.randrange(self.keys)}"

    async def step(self, process: int, client: StoreClient, history: History) -> None:
        key, ks = self._key(), self.keyspace
        roll = self.rng.random()
        if roll < 0.5:
            await self.op(history, process, "read", key, None, lambda: client.get(ks, key),
                          changes=False, record=lambda got: None if got is None else int(got))
        elif roll < 0.75:
            value = self.rng.randrange(self.VALUES)
            await self.op(history, process, "write", key, value,
                          lambda: client.put(ks, key, str(value)), changes=True)
        else:
            expected, new = (self.rng.randrange(self.VALUES), self.rng.randrange(self.VALUES))
            await self.op(history, process, "cas", key, [expected, new],
                          lambda: client.cas(ks, key, str(new), expected_value=str(expected)),
                          changes=True, record=lambda version: True)

    async def final(self, client: StoreClient, history: History) -> None:
        """None: every read during the run is already checked for linearizability."""

    def check(self, history: History) -> Result:
        return check_register(history)


# -- set ------------------------------------------------------------------------------------------


class SetWorkload(Workload):
    name = "set"
    keyspace = "chaos_set"

    def __init__(self, seed: int, **kwargs: Any) -> None:
        super().__init__(seed, **kwargs)
        self._next = itertools.count()
        self.attempted: list[int] = []

    async def setup(self, client: StoreClient) -> None:
        await _create_keyspace(client, self.keyspace, "eventual")

    def _element_key(self, n: int) -> str:
        return f"s{self.seed}-{n}"

    async def step(self, process: int, client: StoreClient, history: History) -> None:
        n = next(self._next)
        self.attempted.append(n)
        key = self._element_key(n)
        await self.op(history, process, "add", key, n,
                      lambda: client.put(self.keyspace, key, "1", consistency="QUORUM"),
                      changes=True)

    async def final(self, client: StoreClient, history: History) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FINAL_TIMEOUT_S
        found: list[int] = []
        unreadable: list[int] = []
        queue = iter(sorted(self.attempted))

        async def read_one(n: int) -> bool:
            key = self._element_key(n)
            while True:
                for level in ("ALL", "QUORUM"):
                    try:
                        got = await asyncio.wait_for(
                            client.get(self.keyspace, key, consistency=level),
                            self.op_timeout_s)
                        return got is not None
                    except (LeaderlessError, OSError, TimeoutError):
                        continue
                if loop.time() > deadline:
                    raise TimeoutError(f"element {n} could not be read")
                await asyncio.sleep(0.2)

        async def reader() -> None:
            for n in queue:
                try:
                    if await read_one(n):
                        found.append(n)
                except TimeoutError:
                    unreadable.append(n)

        invoked = history.invoke(FINAL_PROCESS, "final_read", None, None)
        await asyncio.gather(*(reader() for _ in range(16)))
        value = {"found": sorted(found), "unreadable": sorted(unreadable)}
        (history.info if unreadable else history.ok)(invoked, value)

    def check(self, history: History) -> Result:
        return check_set_history(history)


# -- counter --------------------------------------------------------------------------------------


class CounterWorkload(Workload):
    name = "counter"
    keyspace = "chaos_counter"

    async def setup(self, client: StoreClient) -> None:
        await _create_keyspace(client, self.keyspace, "strong")

    @property
    def key(self) -> str:
        return f"counter-{self.seed}"

    async def step(self, process: int, client: StoreClient, history: History) -> None:
        await self.op(history, process, "incr", self.key, 1,
                      lambda: client.incr(self.keyspace, self.key, 1), changes=True,
                      record=int)

    async def final(self, client: StoreClient, history: History) -> None:
        loop = asyncio.get_running_loop()
        invoked = history.invoke(FINAL_PROCESS, "read", self.key, None)
        try:
            got = await _retrying(lambda: client.get(self.keyspace, self.key),
                                  loop.time() + FINAL_TIMEOUT_S, self.op_timeout_s)
        except (LeaderlessError, OSError, TimeoutError) as exc:
            history.fail(invoked, describe_error(exc))
            return
        history.ok(invoked, 0 if got is None else int(got))

    def check(self, history: History) -> Result:
        return check_counter(history)


# -- lock -----------------------------------------------------------------------------------------


class LockWorkload(Workload):
    name = "lock"
    keyspace = "chaos_lock_data"

    def __init__(self, seed: int, *, lock_ttl_s: float = 3.0, wait_s: float = 1.0,
                 hold_s: tuple[float, float] = (0.05, 0.25), **kwargs: Any) -> None:
        super().__init__(seed, **kwargs)
        self.lock_ttl_s = lock_ttl_s
        self.wait_s = wait_s
        self.hold_s = hold_s
        self._cycles = itertools.count()

    @property
    def lock_name(self) -> str:
        return f"chaos-lock-{self.seed}"

    @property
    def data_key(self) -> str:
        return f"data-{self.seed}"

    async def setup(self, client: StoreClient) -> None:
        await _create_keyspace(client, self.keyspace, "strong")

    async def step(self, process: int, client: StoreClient, history: History) -> None:
        owner = f"chaos-{self.seed}-p{process}-{next(self._cycles)}"
        ttl_ms = int(self.lock_ttl_s * 1000)
        status, lease = await self.op(
            history, process, "acquire", self.lock_name, {"owner": owner, "ttl_ms": ttl_ms},
            lambda: client.acquire(self.lock_name, self.lock_ttl_s, wait=self.wait_s,
                                   owner=owner),
            changes=True, record=lambda lease: {"token": int(lease.token)},
            timeout_s=self.op_timeout_s + self.wait_s)
        if status != "ok":
            await asyncio.sleep(self.rng.uniform(0.05, 0.2))
            return
        token = int(lease.token)
        value = f"{owner}:{token}"
        await self.op(history, process, "write", self.data_key,
                      {"owner": owner, "token": token, "value": value},
                      lambda: client.put(self.keyspace, self.data_key, value, fence=lease),
                      changes=True)
        await asyncio.sleep(self.rng.uniform(*self.hold_s))
        await self.op(history, process, "release", self.lock_name,
                      {"owner": owner, "token": token},
                      lambda: client.release(lease), changes=True)

    async def final(self, client: StoreClient, history: History) -> None:
        loop = asyncio.get_running_loop()
        invoked = history.invoke(FINAL_PROCESS, "final_read", self.data_key, None)
        try:
            got = await _retrying(lambda: client.get(self.keyspace, self.data_key),
                                  loop.time() + FINAL_TIMEOUT_S, self.op_timeout_s)
        except (LeaderlessError, OSError, TimeoutError) as exc:
            history.fail(invoked, describe_error(exc))
            return
        history.ok(invoked, {"value": None if got is None else got.decode()})

    def check(self, history: History) -> Result:
        return check_lock(history)


WORKLOADS: dict[str, type[Workload]] = {
    "register": RegisterWorkload,
    "set": SetWorkload,
    "counter": CounterWorkload,
    "lock": LockWorkload,
}


def make_workload(name: str, seed: int, **kwargs: Any) -> Workload:
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    return WORKLOADS[name](seed, **kwargs)


async def run_workload(workload: Workload, clients: Sequence[StoreClient], history: History,
                       duration_s: float) -> None:
    """Run one worker per client (process = its index) for ``duration_s`` seconds; each
    finishes its pending operation (bounded by its deadline) before returning."""
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + duration_s
    rngs = [random.Random(f"{workload.seed}-{i}") for i in range(len(clients))]

    async def worker(process: int, client: StoreClient) -> None:
        while loop.time() < stop_at:
            await workload.step(process, client, history)
            await asyncio.sleep(rngs[process].uniform(0, THINK_S))

    await asyncio.gather(*(worker(i, c) for i, c in enumerate(clients)))
