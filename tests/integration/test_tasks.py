"""Task distribution on real processes: 1,000 tasks over 3 nodes, a node killed while it
runs tasks, a paused "zombie" whose late result is refused, capability routing, slot
limits, and a node started mid-run taking a share of the work."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import defaultdict
from typing import Any

import msgspec
import pytest

from leaderless.client import AsyncClient, Client
from leaderless.client.errors import RequestTimeoutError
from leaderless.runtime.ports import free_port
from tests import task_functions
from tests.integration.helpers import NodeProcess, Processes, wait_until

pytestmark = pytest.mark.integration
MODULE = "tests.task_functions"
FAST_LEASE = {"LEADERLESS_TASKS_LEASE_TTL_S": "2"}


def start(processes: Processes, name: str, join: str | None, *extra: str,
          env: dict[str, str] | None = None) -> tuple[NodeProcess, str]:
    client = f"127.0.0.1:{free_port()}"
    node = processes.start_node(name, None, join, env, "--client", client, "--tasks", MODULE,
                                "--log-level", "warning", *extra)
    return node, client


def cluster(processes: Processes, count: int = 3, extra: dict[str, tuple[str, ...]] | None = None,
            env: dict[str, str] | None = None) -> tuple[list[NodeProcess], list[str]]:
    extra = extra or {}
    first, first_client = start(processes, "n1", None, *extra.get("n1", ()), env=env)
    nodes, clients = [first], [first_client]
    for i in range(2, count + 1):
        node, client = start(processes, f"n{i}", first.address, *extra.get(f"n{i}", ()),
                             env=env)
        nodes.append(node)
        clients.append(client)
    wait_until(lambda: all(sum(m.state == "alive" for m in n.members().values()) == count
                           for n in nodes), f"{count} nodes alive")
    return nodes, clients


def args(*positional: Any, **named: Any) -> bytes:
    return msgspec.msgpack.encode([list(positional), named])


async def submit_all(client: AsyncClient, calls: list[tuple[str, bytes]],
                     **options: Any) -> list[bytes]:
    ids: list[bytes] = [b""] * len(calls)
    queue = iter(enumerate(calls))

    async def worker() -> None:
        for i, (function, encoded) in queue:
            ids[i] = await client.submit_task(function, encoded, **options)

    await asyncio.gather(*(worker() for _ in range(32)))
    return ids


async def read(call: Any) -> Any:
    """A read, asked again when it times out: a client sends a request to a node it
    believes alive, and a paused node never answers (reads are safe to repeat)."""
    for _ in range(20):
        try:
            return await call()
        except RequestTimeoutError:
            continue
    raise AssertionError("a read timed out 20 times")


async def wait_all(client: AsyncClient, ids: list[bytes], timeout_s: float) -> dict[bytes, Any]:
    """Every task's final info (GetTask: with its full result and history)."""
    pending = set(ids)
    deadline = time.monotonic() + timeout_s
    while pending:
        assert time.monotonic() < deadline, f"{len(pending)} tasks never finished"
        batch = list(pending)[:1000]
        reply = await read(lambda b=batch: client.wait_tasks(b, timeout_s=5.0))
        for info in reply.tasks:
            pending.discard(info.task_id)
        assert not reply.missing, f"tasks vanished: {reply.missing[:3]}"
    infos = {}
    for task_id in ids:
        info = await read(lambda t=task_id: client.task_status(t))
        assert info is not None
        infos[task_id] = info
    return infos


def terminal(info: Any) -> list[Any]:
    return [t for t in info.history if t.state in ("succeeded", "failed", "cancelled")]


def ran_on(info: Any) -> set[str]:
    return {t.node for t in info.history if t.state in ("claimed", "running")}


def test_a_thousand_tasks_over_three_nodes_each_with_one_outcome(processes: Processes) -> None:
    _, clients = cluster(processes)

    async def go() -> None:
        async with AsyncClient(clients, timeout_s=20.0) as client:
            calls = [(f"{MODULE}:add", args(i, i)) for i in range(1000)]
            ids = await submit_all(client, calls)
            assert len(set(ids)) == 1000
            infos = await wait_all(client, ids, timeout_s=300)
        nodes_used: set[str] = set()
        for i, task_id in enumerate(ids):
            info = infos[task_id]
            assert info.state == "succeeded", (info.state, info.error)
            assert msgspec.msgpack.decode(info.result) == 2 * i
            assert len(terminal(info)) == 1, info.history
            nodes_used |= ran_on(info)
        assert nodes_used == {"n1", "n2", "n3"}, nodes_used

    asyncio.run(go())
    # The standard interface, end to end: concurrent.futures over the same cluster.
    with Client(clients, timeout_s=20.0) as client, client.executor() as executor:
        assert list(executor.map(task_functions.add, range(50), range(50), timeout=120)) == [
            2 * i for i in range(50)]
        future = executor.submit(task_functions.raise_error, "nope")
        with pytest.raises(Exception, match="nope"):
            future.result(timeout=60)


def test_a_killed_nodes_tasks_run_elsewhere_and_all_complete(processes: Processes) -> None:
    nodes, clients = cluster(processes, env=FAST_LEASE)

    async def go() -> None:
        async with AsyncClient(clients[:2], timeout_s=20.0) as client:
            calls = [(f"{MODULE}:sleep_for", args(0.3, i)) for i in range(300)]
            ids = await submit_all(client, calls)
            victim = nodes[2]

            async def running_on_victim() -> bool:
                for task_id in ids[:100]:
                    info = await client.task_status(task_id)
                    if info is not None and info.state in ("claimed", "running") \
                            and info.holder == victim.name:
                        return True
                return False

            deadline = time.monotonic() + 60
            while not await running_on_victim():
                assert time.monotonic() < deadline, "n3 never ran a task"
                await asyncio.sleep(0.1)
            victim.process.send_signal(signal.SIGKILL)
            infos = await wait_all(client, ids, timeout_s=300)
        rerun = 0
        for i, task_id in enumerate(ids):
            info = infos[task_id]
            assert info.state == "succeeded", (info.state, info.error)
            assert msgspec.msgpack.decode(info.result) == i
            assert len(terminal(info)) == 1, info.history
            if "n3" in ran_on(info) and terminal(info)[0].node != "n3":
                rerun += 1
        assert rerun >= 1, "no task of the killed node ran again elsewhere"

    asyncio.run(go())


def test_a_paused_zombies_late_result_is_refused(processes: Processes) -> None:
    tagged = ("--tag", "z=1")
    nodes, clients = cluster(processes, extra={"n2": tagged, "n3": tagged}, env=FAST_LEASE)
    by_name = {n.name: n for n in nodes}

    async def go() -> None:
        # A client may send a request to the stopped node: it waits its own timeout (3 s)
        # and asks again (``read``).
        async with AsyncClient(clients[:1], timeout_s=8.0) as client:
            task_id = await client.submit_task(f"{MODULE}:sleep_for", args(3.0, "done"),
                                               tags=["z"])
            deadline = time.monotonic() + 30
            while True:
                info = await read(lambda: client.task_status(task_id))
                assert info is not None
                if info.state in ("claimed", "running") and info.holder:
                    break
                assert time.monotonic() < deadline, "the task was never claimed"
                await asyncio.sleep(0.05)
            zombie = by_name[info.holder]
            zombie.process.send_signal(signal.SIGSTOP)
            try:
                final = (await wait_all(client, [task_id], timeout_s=60))[task_id]
                # Its worker process ran on and finished while the node was stopped.
                await asyncio.sleep(4.0)
            finally:
                zombie.process.send_signal(signal.SIGCONT)
            assert final.state == "succeeded"
            assert terminal(final)[0].node != zombie.name
            assert zombie.name in ran_on(final)

            def refused() -> bool:
                return any(line.get("msg") == "zombie_result_rejected"
                           for line in zombie.log())

            await asyncio.to_thread(wait_until, refused,
                                    "the zombie's late result is refused and logged", 30)
            again = await read(lambda: client.task_status(task_id))
            assert again is not None and again.state == "succeeded"
            assert len(terminal(again)) == 1

    asyncio.run(go())


def test_capabilities_slots_and_a_node_joining_mid_run(processes: Processes) -> None:
    nodes, clients = cluster(processes, extra={
        "n1": ("--tag", "io=1"), "n2": (), "n3": ("--tag", "io=1")},
        env={"LEADERLESS_TASKS_SLOTS": "2"})

    async def go() -> None:
        async with AsyncClient(clients, timeout_s=20.0) as client:
            io_ids = await submit_all(client, [(f"{MODULE}:sleep_for", args(0.05, i))
                                               for i in range(60)], tags=["io"])
            plain = [(f"{MODULE}:sleep_for", args(0.2, i)) for i in range(240)]
            plain_ids = await submit_all(client, plain[:80])
            await asyncio.sleep(1.0)
            n4, _ = await asyncio.to_thread(start, processes, "n4", nodes[0].address,
                                            env={"LEADERLESS_TASKS_SLOTS": "2"})
            plain_ids += await submit_all(client, plain[80:])
            infos = await wait_all(client, io_ids + plain_ids, timeout_s=300)
        for task_id in io_ids:
            assert ran_on(infos[task_id]) <= {"n1", "n3"}, infos[task_id].history
        late = [infos[t] for t in plain_ids[80:]]
        assert any("n4" in ran_on(info) for info in late), "n4 took no share of the work"
        # No node ran more than its 2 slots at once (from the recorded transitions).
        spans: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for info in infos.values():
            started = next(t for t in info.history if t.state == "running")
            spans[started.node].append((started.at_ms, terminal(info)[0].at_ms))
        for node, intervals in spans.items():
            events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
            running = peak = 0
            for _, step in events:
                running += step
                peak = max(peak, running)
            assert peak <= 2, f"{node} ran {peak} tasks at once with 2 slots"

    asyncio.run(go())
