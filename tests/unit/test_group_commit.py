"""GroupCommit: one sync per loop turn, acknowledgements only after it, errors to every waiter."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from leaderless.runtime.group_commit import GroupCommit
from leaderless.storage.memory import MemoryStore
from leaderless.storage.rocks import RocksStore
from leaderless.storage.store import StorageError


class Recorder:
    """Collects ``done`` results, and what the store had synced when each came."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store
        self.results: list[tuple[int, StorageError | None, int]] = []

    def done(self, n: int) -> Callable[[StorageError | None], None]:
        def callback(err: StorageError | None) -> None:
            self.results.append((n, err, self.store.unsynced_writes()))
        return callback


class SlowStore(MemoryStore):
    """A MemoryStore whose sync blocks until released (to hold a sync in flight)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.entered = threading.Event()

    def sync(self) -> None:
        self.entered.set()
        assert self.release.wait(10)
        self.release.clear()
        super().sync()


def errors() -> tuple[list[StorageError], dict[str, Any]]:
    """A list that collects ``on_error`` calls, and the keyword argument that feeds it."""
    seen: list[StorageError] = []
    return seen, {"on_error": seen.append}


@pytest.mark.parametrize("in_thread", [True, False])
def test_one_sync_per_loop_turn_and_done_after_it(in_thread: bool) -> None:
    store = MemoryStore()
    rec = Recorder(store)
    seen, kw = errors()

    async def main() -> None:
        gc = GroupCommit(store, sync_in_thread=in_thread, **kw)
        for n in range(50):
            gc.commit([(b"k%d" % n, b"v"), (b"j%d" % n, b"w")], rec.done(n))
            assert store.get(b"k%d" % n) == b"v"  # visible at once
        assert rec.results == []  # nothing acknowledged before the sync
        await asyncio.sleep(0.05)
        for _ in range(100):
            if len(rec.results) == 50:
                break
            await asyncio.sleep(0.01)
        assert store.syncs == 1
        assert gc.syncs == 1 and gc.commits == 50 and gc.writes == 100
        assert gc.last_batch_commits == 50 and gc.last_batch_writes == 100
        assert gc.group_sizes == {64: 1}
        assert sum(gc.sync_counts) == 1 and gc.sync_seconds >= 0  # the sync is timed
        assert len(gc.sync_counts) == len(gc.sync_bounds_s) + 1
        await gc.close()

    asyncio.run(main())
    assert sorted(n for n, _, _ in rec.results) == list(range(50))
    assert all(err is None and unsynced == 0 for _, err, unsynced in rec.results)
    assert seen == []


def test_commits_during_a_sync_wait_for_the_next_one() -> None:
    store = SlowStore()
    rec = Recorder(store)
    seen, kw = errors()

    async def main() -> None:
        gc = GroupCommit(store, sync_in_thread=True, **kw)
        gc.commit([(b"a", b"1")], rec.done(0))
        await asyncio.sleep(0)
        await asyncio.get_running_loop().run_in_executor(None, store.entered.wait, 10)
        for n in range(1, 6):  # these arrive while the first sync is in flight
            gc.commit([(b"b%d" % n, b"2")], rec.done(n))
            await asyncio.sleep(0)
        assert rec.results == []
        store.release.set()  # first sync finishes; the next starts at once for 1..5
        while len(rec.results) < 1:
            await asyncio.sleep(0.005)
        assert [n for n, _, _ in rec.results] == [0]
        store.release.set()
        while len(rec.results) < 6:
            await asyncio.sleep(0.005)
        assert store.syncs == 2
        assert gc.last_batch_commits == 5
        await gc.close()

    asyncio.run(main())
    assert all(err is None for _, err, _ in rec.results)


def test_sync_error_reaches_every_waiter_and_on_error_once() -> None:
    store = MemoryStore()
    rec = Recorder(store)
    seen, kw = errors()

    async def main() -> None:
        gc = GroupCommit(store, **kw)
        for n in range(3):
            gc.commit([(b"k%d" % n, b"v")], rec.done(n))
        store.fail_writes = "disk full"  # the sync will fail
        await asyncio.sleep(0.05)
        for _ in range(100):
            if len(rec.results) == 3:
                break
            await asyncio.sleep(0.01)
        gc.commit([(b"later", b"v")], rec.done(3))  # sticky: fails at once
        assert gc.failed is not None
        await gc.close()

    asyncio.run(main())
    assert [n for n, _, _ in rec.results] == [0, 1, 2, 3]
    assert all(isinstance(err, StorageError) for _, err, _ in rec.results)
    assert len(seen) == 1 and "disk full" in str(seen[0])


def test_write_error_fails_the_waiting_batches() -> None:
    store = MemoryStore()
    rec = Recorder(store)
    seen, kw = errors()

    async def main() -> None:
        gc = GroupCommit(store, **kw)
        gc.commit([(b"a", b"1")], rec.done(0))
        store.fail_writes = "I/O error"
        gc.commit([(b"b", b"1")], rec.done(1))  # this write fails, and so does batch 0
        await asyncio.sleep(0.05)
        await gc.close()

    asyncio.run(main())
    assert sorted(n for n, _, _ in rec.results) == [0, 1]
    assert all(isinstance(err, StorageError) for _, err, _ in rec.results)
    assert len(seen) == 1


def test_interval_policy_acks_at_once_and_syncs_on_a_timer() -> None:
    store = MemoryStore()
    rec = Recorder(store)
    seen, kw = errors()

    async def main() -> None:
        gc = GroupCommit(store, "interval", interval_ms=20, **kw)
        gc.commit([(b"a", b"1")], rec.done(0))
        assert [(n, e) for n, e, _ in rec.results] == [(0, None)]  # before any sync
        assert store.syncs == 0 and store.unsynced_writes() == 1
        for _ in range(200):
            if store.syncs:
                break
            await asyncio.sleep(0.01)
        assert store.syncs == 1 and store.unsynced_writes() == 0
        await asyncio.sleep(0.1)  # idle: the timer does not sync nothing
        assert store.syncs == 1
        gc.commit([(b"b", b"1")], rec.done(1))
        await gc.close()  # close syncs what the timer has not
        assert store.unsynced_writes() == 0

    asyncio.run(main())
    assert seen == []


def test_interval_policy_sync_error_calls_on_error() -> None:
    store = MemoryStore()
    seen, kw = errors()

    async def main() -> None:
        gc = GroupCommit(store, "interval", interval_ms=10, **kw)
        gc.commit([(b"a", b"1")], lambda err: None)
        store.fail_writes = "EIO"
        for _ in range(200):
            if seen:
                break
            await asyncio.sleep(0.01)
        results: list[StorageError | None] = []
        gc.commit([(b"b", b"1")], results.append)
        assert isinstance(results[0], StorageError)
        await gc.close()

    asyncio.run(main())
    assert len(seen) == 1


def test_close_syncs_pending_and_refuses_more() -> None:
    store = MemoryStore()
    rec = Recorder(store)
    seen, kw = errors()

    async def main() -> None:
        gc = GroupCommit(store, **kw)
        gc.commit([(b"a", b"1")], rec.done(0))
        await gc.close()  # same turn: close does the sync
        assert store.unsynced_writes() == 0
        assert [(n, e) for n, e, _ in rec.results] == [(0, None)]
        with pytest.raises(RuntimeError):
            gc.commit([(b"b", b"1")], rec.done(1))
        await gc.close()  # idempotent

    asyncio.run(main())


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        GroupCommit(MemoryStore(), "sometimes", on_error=lambda e: None)
    with pytest.raises(ValueError):
        GroupCommit(MemoryStore(), "interval", interval_ms=0, on_error=lambda e: None)


@pytest.mark.parametrize("in_thread", [True, False])
def test_with_rocks_store(tmp_path: Path, in_thread: bool) -> None:
    store = RocksStore(tmp_path / "db")
    acked: list[int] = []

    async def main() -> None:
        gc = GroupCommit(store, on_error=lambda e: None, sync_in_thread=in_thread)

        async def client(c: int) -> None:
            for i in range(20):
                fut: asyncio.Future[StorageError | None] = \
                    asyncio.get_running_loop().create_future()
                gc.commit([(b"c%02d/%03d" % (c, i), b"v")], fut.set_result)
                assert await fut is None
                acked.append(c)

        await asyncio.gather(*(client(c) for c in range(16)))
        assert gc.syncs < gc.commits  # batches shared syncs
        await gc.close()

    asyncio.run(main())
    assert len(acked) == 320
    store.close()
    store = RocksStore(tmp_path / "db")
    assert len(list(store.scan(b"c"))) == 320
    store.close()
