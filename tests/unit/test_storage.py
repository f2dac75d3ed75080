"""The ``Store`` behaviour suite, run against every engine, plus engine-specific durability."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from leaderless.core.keys import data_key, partition_prefix, prefix_end
from leaderless.storage.memory import MemoryStore
from leaderless.storage.rocks import SCAN_CHUNK_ROWS, RocksStore
from leaderless.storage.store import StorageError, Store

ENGINES = ["memory", "rocks", "rocks-buffered"]


@pytest.fixture(params=ENGINES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s: Store
    if request.param == "memory":
        s = MemoryStore()
    else:
        s = RocksStore(tmp_path / "db", buffer_writes=request.param == "rocks-buffered")
    yield s
    s.close()


def keys_of(rows: object) -> list[bytes]:
    return [k for k, _ in rows]  # type: ignore[attr-defined]


def test_get_write_delete(store: Store) -> None:
    assert store.get(b"a") is None
    store.write([(b"a", b"1"), (b"b", b"2")])
    assert store.get(b"a") == b"1"
    store.write([(b"a", b"3"), (b"b", None)])
    assert store.get(b"a") == b"3"
    assert store.get(b"b") is None
    store.write([(b"missing", None)])  # deleting what is not there is fine
    assert store.get(b"missing") is None


def test_batch_applies_in_order(store: Store) -> None:
    store.write([(b"k", b"1"), (b"k", None), (b"k", b"2"), (b"j", b"x"), (b"j", None)])
    assert store.get(b"k") == b"2"
    assert store.get(b"j") is None


def test_empty_value_is_a_value(store: Store) -> None:
    store.write([(b"e", b"")])
    assert store.get(b"e") == b""
    assert list(store.scan(b"e", b"f")) == [(b"e", b"")]


def fill(store: Store, n: int = 20) -> list[bytes]:
    keys = [b"k%03d" % i for i in range(n)]
    store.write([(k, k.upper()) for k in keys])
    store.write([(b"a", b"before"), (b"z", b"after")])
    return keys


def test_scan_order_and_bounds(store: Store) -> None:
    keys = fill(store)
    assert keys_of(store.scan(b"k", b"l")) == keys
    assert keys_of(store.scan(b"k005", b"k008")) == keys[5:8]  # end excluded
    assert keys_of(store.scan(b"k005\x00", b"k008")) == keys[6:8]
    assert keys_of(store.scan(b"k")) == [*keys, b"z"]  # no upper bound
    assert keys_of(store.scan(b"")) == [b"a", *keys, b"z"]
    assert list(store.scan(b"k005", b"k005")) == []
    assert list(store.scan(b"m", b"n")) == []
    assert dict(store.scan(b"k", b"l"))[b"k003"] == b"K003"


def test_scan_limit_and_reverse(store: Store) -> None:
    keys = fill(store)
    assert keys_of(store.scan(b"k", b"l", limit=3)) == keys[:3]
    assert keys_of(store.scan(b"k", b"l", limit=0)) == []
    assert keys_of(store.scan(b"k", b"l", reverse=True)) == keys[::-1]
    assert keys_of(store.scan(b"k", b"l", limit=2, reverse=True)) == keys[:-3:-1]
    assert keys_of(store.scan(b"k005", b"k008", reverse=True)) == keys[7:4:-1]
    assert keys_of(store.scan(b"k", reverse=True)) == [b"z", *keys[::-1]]
    assert keys_of(store.scan(b"", b"k000", reverse=True)) == [b"a"]


def test_scan_skips_deleted(store: Store) -> None:
    keys = fill(store)
    store.write([(keys[1], None), (keys[2], None)])
    assert keys_of(store.scan(b"k", b"k004")) == [keys[0], keys[3]]
    assert keys_of(store.scan(b"k", b"k004", reverse=True)) == [keys[3], keys[0]]


def test_scan_longer_than_a_chunk(store: Store) -> None:
    n = SCAN_CHUNK_ROWS * 2 + 7
    keys = [b"r%06d" % i for i in range(n)]
    store.write([(k, b"v") for k in keys])
    assert keys_of(store.scan(b"r", b"s")) == keys
    assert keys_of(store.scan(b"r", b"s", reverse=True)) == keys[::-1]
    assert keys_of(store.scan(b"r", b"s", limit=SCAN_CHUNK_ROWS + 1)) == keys[:SCAN_CHUNK_ROWS + 1]
    assert keys_of(store.scan(b"r", limit=SCAN_CHUNK_ROWS, reverse=True)) == \
        keys[::-1][:SCAN_CHUNK_ROWS]


def test_scan_while_writing(store: Store) -> None:
    keys = fill(store)
    seen = []
    for key, _ in store.scan(b"k", b"l"):
        seen.append(key)
        store.write([(key + b"x", b"new")])  # writes during a scan do not break it
    assert seen[: len(keys)] == keys or set(keys) <= set(seen)


def test_partition_scan_with_data_keys(store: Store) -> None:
    rows = [(data_key("ks", b"user1", b"%04d" % i), b"v%d" % i) for i in range(50)]
    other = [(data_key("ks", b"user2", b"%04d" % i), b"w") for i in range(50)]
    store.write(rows + other)
    prefix = partition_prefix("ks", b"user1")
    got = list(store.scan(prefix + b"0010", prefix_end(prefix), limit=5))
    assert got == rows[10:15]
    got = list(store.scan(prefix, prefix_end(prefix), limit=3, reverse=True))
    assert got == rows[:-4:-1]


def test_binary_keys_sort_bytewise(store: Store) -> None:
    keys = [b"\x00", b"\x00\x00", b"\x01", b"\x7f", b"\x80", b"\xff", b"\xff\xff"]
    store.write([(k, k) for k in reversed(keys)])
    assert keys_of(store.scan(b"")) == keys
    assert keys_of(store.scan(b"", reverse=True)) == keys[::-1]


def test_sync_then_use(store: Store) -> None:
    store.write([(b"a", b"1")])
    store.sync()
    store.sync()  # nothing new: still fine
    assert store.get(b"a") == b"1"


# --- engine-specific -------------------------------------------------------------------


def test_memory_crash_loses_only_unsynced() -> None:
    s = MemoryStore()
    s.write([(b"a", b"1"), (b"b", b"1")])
    s.sync()
    s.write([(b"a", b"2"), (b"b", None), (b"c", b"3")])
    assert s.get(b"c") == b"3"
    s.crash()
    assert s.get(b"a") == b"1"
    assert s.get(b"b") == b"1"
    assert s.get(b"c") is None
    assert keys_of(s.scan(b"")) == [b"a", b"b"]


def test_memory_fault_injection() -> None:
    s = MemoryStore()
    s.fail_writes = "disk on fire"
    with pytest.raises(StorageError, match="disk on fire"):
        s.write([(b"a", b"1")])
    with pytest.raises(StorageError):
        s.sync()


def test_rocks_reopen_keeps_data(tmp_path: Path) -> None:
    s = RocksStore(tmp_path / "db")
    s.write([(b"a", b"1"), (b"b", b"2")])
    s.write([(b"b", None)])
    s.sync()
    s.close()
    s.close()  # idempotent
    s = RocksStore(tmp_path / "db")
    assert s.get(b"a") == b"1"
    assert s.get(b"b") is None
    s.close()


def test_rocks_close_releases_lock_even_after_abandoned_scan(tmp_path: Path) -> None:
    s = RocksStore(tmp_path / "db")
    s.write([(b"k%04d" % i, b"v") for i in range(SCAN_CHUNK_ROWS * 3)])
    it = s.scan(b"k")
    next(it)  # a scan left half-read must not keep the database open
    s.close()
    s2 = RocksStore(tmp_path / "db")
    assert s2.get(b"k0001") == b"v"
    s2.close()
    with pytest.raises(StorageError, match="closed"):
        list(it)


def test_rocks_second_open_is_a_clear_error(tmp_path: Path) -> None:
    s = RocksStore(tmp_path / "db")
    with pytest.raises(StorageError, match="in use"):
        RocksStore(tmp_path / "db")
    s.close()


def test_rocks_use_after_close(tmp_path: Path) -> None:
    s = RocksStore(tmp_path / "db")
    s.close()
    for call in (lambda: s.get(b"a"), lambda: s.write([(b"a", b"1")]), s.sync,
                 lambda: list(s.scan(b""))):
        with pytest.raises(StorageError, match="closed"):
            call()


def test_rocks_unusable_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"not a directory")
    with pytest.raises(StorageError):
        RocksStore(blocker / "db")


def test_rocks_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        RocksStore(tmp_path / "db", sync_mode="sometimes")
    with pytest.raises(ValueError):
        RocksStore(tmp_path / "db", compression="brotli")


WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from leaderless.storage.rocks import RocksStore
    s = RocksStore(Path(sys.argv[1]))
    n = 0
    while True:
        s.write([(b"b%08d/%03d" % (n, i), b"x" * 100) for i in range(16)])
        s.sync()
        print(n, flush=True)
        n += 1
""")


def test_rocks_synced_batches_survive_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "db"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    acked: list[int] = []
    try:
        # Read acknowledgements until 200 have arrived, then kill without warning.
        while len(acked) < 200:
            line = proc.stdout.readline()
            if not line:
                break
            acked.append(int(line))
    finally:
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
    assert len(acked) == 200, err.decode(errors="replace")[-2000:]
    s = RocksStore(path)
    try:
        for n in acked:
            for i in range(16):
                key = b"b%08d/%03d" % (n, i)
                assert s.get(key) == b"x" * 100, key
        # Each batch is whole: no batch after the last acknowledged one is half there.
        first_unacked = acked[-1] + 1
        present = keys_of(s.scan(b"b%08d/" % first_unacked, b"b%08d/" % (first_unacked + 1)))
        assert len(present) in (0, 16)
    finally:
        s.close()


def test_buffered_rocks_reads_its_writes_before_and_after_a_sync_and_reopens(
        tmp_path: Path) -> None:
    s = RocksStore(tmp_path / "db", buffer_writes=True)
    s.write([(b"a", b"1"), (b"b", b"2")])
    s.write([(b"a", b"3"), (b"b", None)])
    assert (s.get(b"a"), s.get(b"b")) == (b"3", None)
    assert keys_of(s.scan(b"")) == [b"a"]
    s.write([(b"c", b"4")])
    s.sync()
    assert (s.get(b"a"), s.get(b"c")) == (b"3", b"4")
    s.close()
    again = RocksStore(tmp_path / "db", buffer_writes=True)
    assert [(k, v) for k, v in again.scan(b"")] == [(b"a", b"3"), (b"c", b"4")]
    again.close()
