"""runtime.tasks on 3 real in-process nodes (loopback sockets, real worker processes running
``tests.task_functions``): submit, claim across nodes, results, retries, idempotency,
cancel, capability routing, lease expiry reclaim with a zombie's late result refused, and
hand-back on a graceful stop. Nothing is mocked; tests wait on outcomes, never on timings."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from leaderless.api.service import KvError
from leaderless.core import paxos
from leaderless.core.tasks import (
    INDEX_KEYSPACE,
    TaskChange,
    TaskOutcome,
    TaskSpec,
    TaskState,
    decode_state,
    encode,
)
from leaderless.runtime.node import Node
from leaderless.runtime.tasks import TASK_KEYSPACE_DEF, TaskService, task_id_for
from tests.unit.test_runtime_node import make_node, run_test, states, stop_all, wait_until

MOD = "tests.task_functions"
NAMES = ("n1", "n2", "n3")


def spec(function: str, *args: Any, **fields: Any) -> TaskSpec:
    return TaskSpec(f"{MOD}:{function}", msgspec.msgpack.encode([list(args), {}]), **fields)


def result(state: TaskState) -> Any:
    assert state.state == "succeeded", (state.state, state.error)
    return msgspec.msgpack.decode(state.result or b"")


def task_flags(slots: int = 2, **more: Any) -> dict[str, Any]:
    return {"tasks.modules": [MOD], "tasks.slots": slots, "tasks.load_ceiling_pct": 100,
            "tasks.lease_ttl_s": 3.0, **more}


async def start_nodes(tmp_path: Path, flags: list[dict[str, Any]]) -> list[Node]:
    first = make_node(tmp_path, "n1", **flags[0])
    await first.start()
    nodes = [first]
    for i, extra in enumerate(flags[1:], start=2):
        node = make_node(tmp_path, f"n{i}", join=[first.address], **extra)
        await node.start()
        nodes.append(node)
    names = {f"n{i}" for i in range(1, len(flags) + 1)}
    await wait_until(lambda: all(set(states(n)) == names for n in nodes), "all see all")
    return nodes


def with_nodes(tmp_path: Path, body: Callable[[list[Node]], Awaitable[None]],
               flags: list[dict[str, Any]] | None = None) -> None:
    async def main() -> None:
        nodes = await start_nodes(tmp_path, flags or [task_flags()] * 3)
        try:
            await body(nodes)
        finally:
            await stop_all(nodes)

    run_test(main())


def svc(node: Node) -> TaskService:
    assert node.tasks is not None
    return node.tasks


async def wait_all(service: TaskService, ids: list[bytes], timeout_s: float = 60.0
                   ) -> dict[bytes, TaskState]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    done: dict[bytes, TaskState] = {}
    while len(done) < len(set(ids)):
        left = [i for i in ids if i not in done]
        remaining = deadline - loop.time()
        assert remaining > 0, f"{len(left)} tasks unfinished"
        done.update(await service.wait(left, remaining))
    return done


def test_tasks_run_across_nodes_with_one_outcome_each(tmp_path: Path) -> None:
    async def body(nodes: list[Node]) -> None:
        # Trivial tasks through every node, plus sleepers that keep the slots of the
        # submitting node busy so the others must take a share.
        ids = await asyncio.gather(*(svc(nodes[i % 3]).submit(spec("add", i, 1))
                                     for i in range(60)))
        sleepers = await asyncio.gather(*(svc(nodes[0]).submit(spec("sleep_for", 0.3, i))
                                          for i in range(12)))
        done = await wait_all(svc(nodes[1]), [*ids, *sleepers])
        assert [result(done[i]) for i in ids] == [i + 1 for i in range(60)]
        assert [result(done[i]) for i in sleepers] == list(range(12))
        ran_on = {s.history[-1].node for s in done.values()}
        assert len(ran_on) >= 2, ran_on
        for state in done.values():
            assert [t.state for t in state.history].count("succeeded") == 1
            assert state.attempt == 1
        # Index entries of finished tasks are gone.
        for node in nodes:
            assert await svc(node).list("default") == [] or all(
                s.state == "succeeded" for _, s in await svc(node).list("default"))
        claimed = sum(svc(n).counters()["tasks_claimed"] for n in nodes)
        succeeded = sum(svc(n).counters()["tasks_succeeded"] for n in nodes)
        assert claimed == succeeded == 72
        status = await svc(nodes[2]).status(ids[5])
        assert status is not None and result(status) == 6
        metrics = nodes[0].metrics()[0].decode()
        assert "leaderless_tasks_claimed_total" in metrics
        assert "leaderless_tasks_free_slots" in metrics

    with_nodes(tmp_path, body)


def test_retries_then_failure_with_the_traceback(tmp_path: Path) -> None:
    async def body(nodes: list[Node]) -> None:
        task_id = await svc(nodes[0]).submit(
            spec("raise_error", "kaput", max_retries=2, backoff_s=0.05))
        state = (await wait_all(svc(nodes[0]), [task_id]))[task_id]
        assert (state.state, state.attempt) == ("failed", 3)
        assert "ValueError: kaput" in state.error and "Traceback" in state.error
        states_seen = [t.state for t in state.history]
        assert states_seen.count("retrying") == 2 and states_seen[-1] == "failed"
        assert sum(svc(n).counters()["tasks_retried"] for n in nodes) == 2
        # A function no node registered fails at once, saying what to do.
        bad = await svc(nodes[1]).submit(TaskSpec("os:getcwd", max_retries=5))
        state = (await wait_all(svc(nodes[1]), [bad]))[bad]
        assert (state.state, state.attempt) == ("failed", 1)
        assert "--tasks os" in state.error

    with_nodes(tmp_path, body)


def test_submit_idempotency_pickle_refusal_cancel_and_list(tmp_path: Path) -> None:
    async def body(nodes: list[Node]) -> None:
        # No node runs tasks here: submitted tasks stay pending.
        one = await svc(nodes[0]).submit(spec("add", 1, 2), idempotency_key="job-1")
        assert one == task_id_for("default", "job-1")
        assert await svc(nodes[1]).submit(spec("add", 1, 2), idempotency_key="job-1") == one
        with pytest.raises(KvError, match="exists with another spec"):
            await svc(nodes[2]).submit(spec("add", 9, 9), idempotency_key="job-1")
        assert sum(svc(n).counters()["tasks_submitted"] for n in nodes) == 1
        with pytest.raises(KvError, match="does not run pickled callables"):
            await svc(nodes[0]).submit(TaskSpec("lambda", b"x", pickled=True))
        with pytest.raises(KvError, match="invalid task"):
            await svc(nodes[0]).submit(TaskSpec("m:f", priority=5000))
        other = await svc(nodes[0]).submit(spec("add", 3, 4, queue="batch", priority=7))
        listed = await svc(nodes[2]).list("default")
        assert [(i, s.state) for i, s in listed] == [(one, "pending")]
        assert [i for i, _ in await svc(nodes[1]).list("batch", "pending")] == [other]
        assert await svc(nodes[1]).list("batch", "running") == []
        # Cancel: a waiter hears it at once, through a watch on another node.
        waiter = asyncio.create_task(svc(nodes[2]).wait([one, other], 30))
        await asyncio.sleep(0.2)
        cancelled = await svc(nodes[1]).cancel(one)
        assert cancelled.state == "cancelled"
        got = await waiter
        assert list(got) == [one] and got[one].state == "cancelled"
        with pytest.raises(KvError, match="cancelled already") as info:
            await svc(nodes[0]).cancel(one)
        assert info.value.code == "conflict"
        with pytest.raises(KvError) as missing:
            await svc(nodes[0]).cancel(b"\x00" * 16)
        assert missing.value.code == "not_found"
        assert await svc(nodes[0]).status(b"\x00" * 16) is None
        assert await svc(nodes[0]).wait([other], 0.3) == {}
        # The cancelled task's index entry is gone.
        assert [i for i, _ in await svc(nodes[0]).list("default")] in ([], [one])
        stats = svc(nodes[0]).stats()
        assert stats["queues"]["default"]["cancelled"] == 0  # cancelled through n2
        assert svc(nodes[1]).stats()["queues"]["default"]["cancelled"] == 1

    with_nodes(tmp_path, body, [{}, {}, {}])


def test_tasks_needing_a_tag_run_only_on_tagged_nodes(tmp_path: Path) -> None:
    async def body(nodes: list[Node]) -> None:
        ids = await asyncio.gather(*(svc(nodes[0]).submit(spec("sleep_for", 0.05, i,
                                                               tags=["io"]))
                                     for i in range(10)))
        done = await wait_all(svc(nodes[0]), list(ids))
        assert {s.history[-1].node for s in done.values()} == {"n3"}
        assert all(s.attempt == 1 for s in done.values())

    flags = [task_flags(), task_flags(), task_flags(tags=["io=1"])]
    with_nodes(tmp_path, body, flags)


def test_expired_lease_is_reclaimed_and_the_zombie_result_refused(tmp_path: Path) -> None:
    async def body(nodes: list[Node]) -> None:
        kv = nodes[0].kv
        assert kv is not None
        # No node runs tasks yet: a "ghost" node claims the task with a short lease, as a
        # node that then pauses (SIGSTOP) would.
        task_id = await svc(nodes[0]).submit(spec("add", 20, 22))
        claim = await kv.propose(TASK_KEYSPACE_DEF, task_id, b"",
                                 TaskChange("claim", "ghost", ttl_ms=300), b"")
        assert isinstance(claim, paxos.Done) and claim.value is not None
        ghost_token = decode_state(claim.value).token
        # A node that runs tasks joins; it finds the task, is refused while the ghost's
        # lease runs, then reclaims it and runs it.
        runner = make_node(tmp_path, "n4", join=[nodes[0].address], **task_flags())
        await runner.start()
        nodes.append(runner)
        state = (await wait_all(svc(nodes[1]), [task_id]))[task_id]
        assert result(state) == 42
        assert (state.attempt, state.token, state.history[-1].node) == (2, 2, "n4")
        assert any("lease of ghost expired" in t.note for t in state.history)
        # The ghost wakes up and reports: refused by the fencing token.
        late = await kv.propose(TASK_KEYSPACE_DEF, task_id, b"", TaskChange(
            "finish", "ghost", ghost_token, payload=encode(TaskOutcome(True, b"\x01"))), b"")
        assert isinstance(late, paxos.Conflict) and late.reason.startswith("fenced")
        again = await svc(nodes[2]).status(task_id)
        assert again is not None and result(again) == 42

    with_nodes(tmp_path, body, [{}, {}, {}])


def test_a_graceful_stop_hands_running_tasks_back(tmp_path: Path) -> None:
    async def body(nodes: list[Node]) -> None:
        leaver = nodes[2]
        # Only the leaver runs tasks at first; its task outlives the drain time.
        task_id = await svc(leaver).submit(spec("sleep_for", 3.0, "late"))
        await wait_until(lambda: svc(leaver).counters()["tasks_running"] == 1,
                         "the leaver runs the task")
        await leaver.stop()
        assert svc(leaver).counters()["tasks_released"] == 1
        runner = make_node(tmp_path, "n4", join=[nodes[0].address], **task_flags())
        await runner.start()
        nodes.append(runner)
        done = (await wait_all(svc(nodes[0]), [task_id]))[task_id]
        assert result(done) == "late"
        assert done.history[-1].node == "n4" and done.attempt == 1
        assert [(t.state, t.node, t.note) for t in done.history[1:3]] == [
            ("claimed", "n3", ""), ("pending", "n3", "handed back")]

    flags = [{}, {}, {**task_flags(), "tasks.drain_s": 0.2}]
    with_nodes(tmp_path, body, flags)


def test_the_index_keyspace_is_readable(tmp_path: Path) -> None:
    async def body(nodes: list[Node]) -> None:
        kv = nodes[0].kv
        assert kv is not None
        await svc(nodes[0]).submit(spec("add", 1, 1, queue="q1"))
        rows, _ = await kv.scan(INDEX_KEYSPACE, b"queues")
        assert [r.sort for r in rows] == [b"q1"]

    with_nodes(tmp_path, body, [{}, {}, {}])


def test_finished_tasks_are_deleted_past_their_result_ttl(tmp_path: Path) -> None:
    async def body(nodes: list[Node]) -> None:
        short = await svc(nodes[0]).submit(spec("add", 1, 2, result_ttl_s=0.2))
        kept = await svc(nodes[0]).submit(spec("add", 3, 4))
        done = await wait_all(svc(nodes[1]), [short, kept])
        assert result(done[short]) == 3 and result(done[kept]) == 7
        await asyncio.sleep(0.5)
        deleted = 0
        for node in nodes:  # each task is expired by one node: its first live replica
            deleted += await svc(node).sweep_expired()
        assert deleted == 1
        assert await svc(nodes[2]).status(short) is None
        kept_state = await svc(nodes[2]).status(kept)
        assert kept_state is not None and result(kept_state) == 7
        # A waiter on a task that does not exist learns it (None), instead of waiting on.
        assert await svc(nodes[1]).wait([b"no-such-task"], 0.2) == {b"no-such-task": None}
        assert sum(svc(n).counters()["tasks_expired"] for n in nodes) == 1

    with_nodes(tmp_path, body)


def test_a_task_claimed_at_submit_then_lost_is_found_without_an_index_entry(
        tmp_path: Path) -> None:
    async def body(nodes: list[Node]) -> None:
        kv = nodes[0].kv
        assert kv is not None
        # A node claims a task in its submit round (no index entry yet) and vanishes: the
        # "ghost" is not a member, as a node killed right after the submit would soon be.
        lost = b"lost-at-submit-1"
        held = await kv.propose(TASK_KEYSPACE_DEF, lost, b"", TaskChange(
            "submit", "ghost", ttl_ms=500, payload=encode(spec("add", 2, 3))), b"")
        assert isinstance(held, paxos.Done) and held.value is not None
        state = decode_state(held.value)
        assert (state.state, state.holder, state.token) == ("claimed", "ghost", 1)
        assert [t.state for t in state.history] == ["pending", "claimed"]
        # A pending task whose submitter (n3) went down before writing its index entry.
        orphan = b"orphaned-pending-1"
        pending = await kv.propose(TASK_KEYSPACE_DEF, orphan, b"", TaskChange(
            "submit", "n3", payload=encode(spec("add", 4, 5))), b"")
        assert isinstance(pending, paxos.Done)
        assert await svc(nodes[0]).list("default") == []  # no index entry leads to either
        # (A submitter that dies within a moment of joining is found by the periodic pass;
        # here the survivors have looked at the members since n3 joined.)
        await wait_until(lambda: all("n3" in svc(n)._up_seen for n in nodes[:2]), "n3 seen")
        await nodes[2].stop()
        # Nodes that run tasks join: their own copies of the registers lead them there.
        for name in ("n4", "n5"):
            runner = make_node(tmp_path, name, join=[nodes[0].address], **task_flags())
            await runner.start()
            nodes.append(runner)
        done = await wait_all(svc(nodes[0]), [lost, orphan])
        assert result(done[lost]) == 5 and result(done[orphan]) == 9
        assert done[lost].token == 2 and "lease of ghost expired" in done[lost].history[2].note
        assert sum(svc(n).counters()["tasks_recovered"] for n in nodes) >= 1

    with_nodes(tmp_path, body, [{}, {}, {}])


def test_a_node_runs_what_is_submitted_through_it_without_the_index(tmp_path: Path) -> None:
    async def body(nodes: list[Node]) -> None:
        local = svc(nodes[0])
        await wait_until(lambda: local.stats()["claiming"], "n1 runs tasks")
        ids = [await local.submit(spec("add", i, 10)) for i in range(5)]
        done = await wait_all(local, ids)
        assert [result(done[i]) for i in ids] == [i + 10 for i in range(5)]
        for state in done.values():
            assert [(t.state, t.node) for t in state.history] == [
                ("pending", "n1"), ("claimed", "n1"), ("running", "n1"), ("succeeded", "n1")]
        assert local.counters()["tasks_claimed_at_submit"] == 5
        # Beyond the free slots (prefetch 0 here) the rest waits in the index for anyone.
        many = await asyncio.gather(*(local.submit(spec("sleep_for", 0.2, i))
                                      for i in range(12)))
        assert local.counters()["tasks_claimed_at_submit"] <= 5 + 2
        # Waited for where they were submitted: those that ran elsewhere are learned of
        # through watches opened when they left the way to a local claim (_unfresh).
        done = await wait_all(local, many)
        assert sorted(result(done[i]) for i in many) == list(range(12))
        assert len({s.history[-1].node for s in done.values()}) >= 2

    flags = [task_flags(**{"tasks.prefetch_s": 0}), task_flags(), task_flags()]
    with_nodes(tmp_path, body, flags)
