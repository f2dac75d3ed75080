"""Passive failover's pieces: which faults, who takes the hints, the hand-off with acks and a
deadline, the fsync fault hook, hints kept for a left target until the window, and a left
member remembered from a push-pull."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from leaderless.api.service import KvError
from leaderless.config import load_config
from leaderless.core.cells import Cell
from leaderless.core.health import REASON_BYTES_MAX
from leaderless.core.hints import DeleteHint, Handoff, Hint, HintConfig, HintLog
from leaderless.core.kv_messages import ReplicaAck, ReplicaWrite
from leaderless.core.membership import Membership
from leaderless.core.membership_config import MembershipConfig
from leaderless.core.messages import Address, MemberRecord, MemberStatus, NodeMeta, PushPull
from leaderless.core.replica import Replica
from leaderless.runtime.failover import FaultKind, classify, hand_off_hints, holders_for
from leaderless.runtime.group_commit import (
    FAULT_FSYNC_FAIL_AFTER_ENV,
    GroupCommit,
    SyncFailedError,
    fsync_fault_from_env,
)
from leaderless.runtime.node import Node
from leaderless.storage.encrypted import DecryptionError
from leaderless.storage.memory import MemoryStore
from leaderless.storage.store import StorageError
from tests.unit.test_runtime_node import wait_until

# -- which faults ------------------------------------------------------------------------


@pytest.mark.parametrize(("error", "kind"), [
    (SyncFailedError("fsync failed: [Errno 5] Input/output error"), FaultKind.FSYNC),
    (StorageError("the data in /d is corrupt (get); restore this node"), FaultKind.CORRUPTION),
    (DecryptionError("record failed authentication", key_id="k1", store_key=b"d"),
     FaultKind.CORRUPTION),
    (StorageError("the disk holding /d is full (write failed): free space"),
     FaultKind.DISK_FULL),
    (StorageError("RocksDB write failed in /d: IO error"), FaultKind.STORAGE),
    ("cannot save the incarnation in /d: [Errno 30] Read-only file system",
     FaultKind.DATA_DIR),
])
def test_each_operating_error_is_named_as_a_fault(error: str | StorageError,
                                                   kind: FaultKind) -> None:
    fault = classify(error)
    assert fault.kind is kind
    assert fault.detail == str(error)
    message = fault.exit_message()
    assert kind.value in message and str(error) in message and "What to do" in message
    assert len(fault.reason.encode()) <= REASON_BYTES_MAX  # gossiped in leaving(reason)


# -- who takes the hints -----------------------------------------------------------------


def test_holders_are_live_nodes_other_than_me_and_the_target_then_the_target() -> None:
    live = ["a", "b", "c", "d"]
    holders = holders_for("c", "a", live)
    assert sorted(holders[:-1]) == ["b", "d"] and holders[-1] == "c"
    assert holders_for("x", "a", live)[-1] != "x"  # a target that is not live comes never
    assert sorted(holders_for("x", "a", live)) == ["b", "c", "d"]
    assert holders_for("c", "a", ["a"]) == []  # nobody to take them
    # Different targets start at different holders, so their hints spread.
    firsts = {holders_for(t, "a", live)[0] for t in ("e", "f", "g", "h", "i", "j")}
    assert len(firsts) > 1


# -- the hand-off --------------------------------------------------------------------------


class Holder:
    """A peer that takes handed-off hints: a real Replica on its own store, acking after
    its write is committed, or never (``down``)."""

    def __init__(self, name: str, down: bool = False) -> None:
        self.name = name
        self.store = MemoryStore()
        self.hints = HintLog(self.store)
        self.replica = Replica(self.store, self.hints)
        self.down = down

    def receive(self, write: ReplicaWrite, on_ack: Callable[[ReplicaAck], None]) -> None:
        if self.down:
            return
        ack, writes = self.replica.handle(write, wall_ms=1_000)
        self.store.write(writes)
        self.store.sync()
        asyncio.get_running_loop().call_soon(on_ack, ack)


def hint_log_with(targets: dict[str, int]) -> HintLog:
    store = MemoryStore()
    log = HintLog(store)
    hlc = 1 << 20
    for target, count in targets.items():
        for i in range(count):
            hlc += 1
            cell = Cell(hlc, "me", f"{target}-{i}".encode())
            store.write([log.add(target, Hint("ks", f"k{i}".encode(), b"", cell, 500))])
    return log


def sender(holders: dict[str, Holder], sent: list[tuple[str, str]]
           ) -> Callable[[str, str, Hint, Callable[[ReplicaAck], None]], Callable[[], None]]:
    ids = iter(range(1, 1 << 30))

    def send(holder: str, target: str, hint: Hint, on_ack: Callable[[ReplicaAck], None]
             ) -> Callable[[], None]:
        sent.append((holder, target))
        write = ReplicaWrite(next(ids), hint.keyspace, hint.partition, hint.sort, hint.cell,
                             hint_for=None if holder == target else target)
        holders[holder].receive(write, on_ack)
        return lambda: None

    return send


def test_every_hint_reaches_a_holder_that_acknowledged_it() -> None:
    log = hint_log_with({"c": 30, "d": 20})
    holders = {name: Holder(name) for name in ("b", "e")}
    sent: list[tuple[str, str]] = []
    report = asyncio.run(hand_off_hints(log, sender(holders, sent), "a", ["a", "b", "e"],
                                        in_flight_max=4))
    assert report.count == 50 and report.not_handed_off == 0
    stored = {t: sum(h.hints.pending.get(t, 0) for h in holders.values()) for t in "cd"}
    assert stored == {"c": 30, "d": 20}
    assert sum(report.handed_off.values()) == len(sent)  # nothing sent twice
    # The new holders keep the hints' cells, under the right target.
    values = sorted(hint.cell.value for h in holders.values()
                    for _, hint in h.hints.scan("c", None, 100))
    assert values == sorted(f"c-{i}".encode() for i in range(30))


def test_a_holder_that_does_not_answer_is_skipped_for_the_next() -> None:
    log = hint_log_with({"c": 5})
    holders = {"b": Holder("b", down=True), "d": Holder("d")}
    sent: list[tuple[str, str]] = []
    report = asyncio.run(hand_off_hints(log, sender(holders, sent), "a", ["a", "b", "d"],
                                        ack_timeout_s=0.05))
    assert report.handed_off == {"d": 5} and report.not_handed_off == 0
    assert holders["d"].hints.pending == {"c": 5}


def test_a_live_target_with_no_other_holder_gets_its_writes_directly() -> None:
    log = hint_log_with({"c": 3})
    holders = {"c": Holder("c")}
    report = asyncio.run(hand_off_hints(log, sender(holders, []), "a", ["a", "c"]))
    assert report.handed_off == {"c": 3}
    assert holders["c"].hints.pending == {}  # applied as data, not kept as hints
    assert holders["c"].replica.read("ks", b"k0", b"") is not None


def test_hints_nobody_acknowledges_are_counted_when_the_deadline_passes() -> None:
    log = hint_log_with({"c": 4, "d": 2})
    holders = {"b": Holder("b", down=True)}
    report = asyncio.run(hand_off_hints(log, sender(holders, []), "a", ["a", "b"],
                                        deadline_s=0.2, ack_timeout_s=0.05))
    assert report.count == 0 and report.not_handed_off == 6
    alone = asyncio.run(hand_off_hints(log, sender({}, []), "a", ["a"]))
    assert alone.count == 0 and alone.not_handed_off == 6


# -- the fsync fault hook ------------------------------------------------------------------


def test_the_fault_hook_fails_every_sync_after_n_and_nothing_after_is_acknowledged() -> None:
    store = MemoryStore()
    results: list[StorageError | None] = []
    errors: list[StorageError] = []

    async def main() -> None:
        commit = GroupCommit(store, on_error=errors.append, fault_fsync_fail_after=2)
        for i in range(4):
            commit.commit([(f"k{i}".encode(), b"v")], results.append)
            for _ in range(3):
                await asyncio.sleep(0)
        await commit.close()
        assert commit.syncs == 2 and commit.sync_failures == 1

    asyncio.run(main())
    assert results[:2] == [None, None]
    assert all(isinstance(r, SyncFailedError) for r in results[2:]), results
    assert "Input/output error" in str(results[2]) and FAULT_FSYNC_FAIL_AFTER_ENV in str(
        results[2])
    assert len(errors) == 1 and isinstance(errors[0], SyncFailedError)


def test_the_fault_hook_is_off_unless_set_and_refuses_a_bad_value() -> None:
    assert fsync_fault_from_env({}) is None
    assert fsync_fault_from_env({FAULT_FSYNC_FAIL_AFTER_ENV: "0"}) == 0
    assert fsync_fault_from_env({FAULT_FSYNC_FAIL_AFTER_ENV: "25"}) == 25
    for bad in ("-1", "ten", "1.5"):
        with pytest.raises(ValueError, match=FAULT_FSYNC_FAIL_AFTER_ENV):
            fsync_fault_from_env({FAULT_FSYNC_FAIL_AFTER_ENV: bad})


# -- hints for a target that left are kept until the window --------------------------------


def test_hints_for_a_target_that_is_not_alive_are_kept_until_the_window_then_dropped() -> None:
    store = MemoryStore()
    log = HintLog(store)
    window_s = 60.0
    for stored_at_ms, hlc in ((1_000, 1 << 20), (50_000, (1 << 20) + 1)):
        hint = Hint("ks", b"k", b"", Cell(hlc, "me", b"v"), stored_at_ms)
        store.write([log.add("gone", hint)])
    handoff = Handoff(log, HintConfig(hint_window_s=window_s, expire_interval_s=1.0))
    ids = iter(range(1, 1000))
    # Inside the window: both kept although the target is not alive (dead or left).
    assert handoff.on_tick(0.0, 30_000, frozenset(), ids) == []
    # The first is past the window, the second not yet.
    effects = handoff.on_tick(2.0, 62_000, frozenset(), ids)
    assert len(effects) == 1 and isinstance(effects[0], DeleteHint)
    store.write([effects[0].write])
    assert log.pending == {"gone": 1} and handoff.counters.expired == 1
    assert handoff.on_tick(2.5, 200_000, frozenset(), ids) == []  # not before the interval
    effects = handoff.on_tick(4.0, 200_000, frozenset(), ids)
    assert len(effects) == 1
    store.write([effects[0].write])
    assert log.pending == {}


# -- a left member is remembered from a push-pull --------------------------------------------


def test_a_member_that_left_is_shown_left_by_a_node_that_never_saw_it() -> None:
    me = Membership("c", Address("127.0.0.1", 7002), NodeMeta(), MembershipConfig(),
                    random.Random(1), 0.0)
    records = [MemberRecord("b", Address("127.0.0.1", 7001), 3, MemberStatus.ALIVE,
                            NodeMeta()),
               MemberRecord("a", Address("127.0.0.1", 7000), 5, MemberStatus.LEFT,
                            NodeMeta())]
    me.on_push_pull(1.0, PushPull("b", True, False, records, 0, []))
    left = me.member("a")
    assert left is not None and left.status is MemberStatus.LEFT and left.incarnation == 5
    assert me.live_count() == 2  # c and b; a is not probed


# -- the sequence in a node ------------------------------------------------------------------


def test_a_node_whose_store_fails_hands_off_its_hints_and_leaves(tmp_path: Path) -> None:
    async def main() -> None:
        survivor = make_node(tmp_path, "n2")
        await survivor.start()
        failing = make_node(tmp_path, "n1", join=[survivor.address])
        await failing.start()
        try:
            await wait_until(lambda: failing.joined.is_set() and all(
                m.status is MemberStatus.ALIVE for m in survivor.members())
                and len(survivor.members()) == 2, "n2 sees n1 alive")
            assert failing.kv is not None and survivor.kv is not None
            # A hint n1 keeps for a node that is down (written as the replica would).
            hint = Hint("ks", b"k", b"", Cell(1 << 30, "n1", b"v"), time.time_ns() // 10**6)
            failing.kv.store.write([failing.kv.hints.add("n3", hint)])
            memory = failing.kv.store
            while not isinstance(memory, MemoryStore):  # under the health monitor's wrapper
                memory = memory.inner  # type: ignore[attr-defined]
            memory.fail_writes = "I/O error on the data disk"
            with pytest.raises(KvError):  # its write fails: nothing is acknowledged
                await failing.kv.create_keyspace("ks", replication=2)
            await asyncio.wait_for(failing.stopped.wait(), 30)
            assert failing.failover is not None
            assert failing.failover.fault.kind is FaultKind.STORAGE
            report = failing.failover.report
            assert report is not None and report.handed_off == {"n2": 1}
            assert survivor.kv.hints.pending == {"n3": 1}
            await wait_until(lambda: {m.name: m.status for m in survivor.members()}
                             .get("n1") is MemberStatus.LEFT, "n2 shows n1 left")
        finally:
            await failing.stop()
            await survivor.stop()

    asyncio.run(asyncio.wait_for(main(), 60))


def make_node(tmp_path: Path, name: str, join: list[Address] | None = None) -> Node:
    config = load_config({"name": name, "bind": "127.0.0.1:0", "storage": "memory",
                          "data_dir": str(tmp_path / name),
                          "join": [str(a) for a in join or []],
                          "ring.bootstrap": False}, env={})
    return Node(config)
