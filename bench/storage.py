"""Storage engines under the KV workload: RocksDB (rocksdict, our RocksStore) vs LMDB vs
SQLite-WAL, each with one durable commit per batch. Prints a markdown table and writes
bench/results/storage.json. Measures only; nothing here asserts a timing.

    python bench/storage.py                 # about 2 minutes
    python bench/storage.py --seconds 0.5   # quicker, noisier
    python bench/storage.py --dir /mnt/ssd  # data on another disk (default: system temp)

Workload: 100-byte values under ``data_key`` keys (keyspace "bench", partitions of
ROWS_PER_PARTITION rows by sort key). Point writes in batches of 1/16/64/256 with one
durable commit (fsync) per batch; point reads of random existing keys; range reads of 100
rows by sort key within a partition; crash recovery (kill -9 a writer subprocess
mid-stream, reopen, check every acknowledged batch is there). Last, group commit with the
sync inline on the loop vs in a thread.

LMDB is measured two ways, to be fair to its design: ``lmdb-sync`` syncs the B-tree on
every commit (LMDB's own durability), ``lmdb+log`` appends each batch to our own fsync'd
log and commits to LMDB unsynced (replayed into LMDB on open), which is the durability
model RocksDB's WAL gives us for free. The LMDB code lives only here.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import click

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from leaderless.core.keys import data_key, partition_prefix, prefix_end  # noqa: E402
from leaderless.runtime.group_commit import GroupCommit  # noqa: E402
from leaderless.storage.rocks import RocksStore  # noqa: E402

VALUE_POOL = [random.Random(7).randbytes(100) for _ in range(4096)]
"""Random (incompressible) 100-byte values, so compression gets no help from the values."""
VALUE = VALUE_POOL[0]
PARTITIONS = 500
ROWS_PER_PARTITION = 200
BATCH_SIZES = (1, 16, 64, 256)
RANGE_ROWS = 100
KEYSPACE = "bench"
Row = tuple[bytes, bytes]


def row_key(p: int, s: int) -> bytes:
    return data_key(KEYSPACE, b"user%06d" % p, b"%08d" % s)


class Engine(Protocol):
    def put_durable(self, rows: list[Row]) -> None: ...
    def get(self, key: bytes) -> bytes | None: ...
    def range(self, start: bytes, end: bytes, limit: int) -> list[Row]: ...
    def close(self) -> None: ...


class Rocks:
    def __init__(self, path: Path, compression: str = "lz4") -> None:
        self.store = RocksStore(path, compression=compression)

    def put_durable(self, rows: list[Row]) -> None:
        self.store.write(rows)
        self.store.sync()

    def get(self, key: bytes) -> bytes | None:
        return self.store.get(key)

    def range(self, start: bytes, end: bytes, limit: int) -> list[Row]:
        return list(self.store.scan(start, end, limit=limit))

    def close(self) -> None:
        self.store.close()


class Lmdb:
    """LMDB; ``own_log`` False: sync the tree per commit; True: fsync'd append-only log of
    our own, LMDB unsynced, the log replayed into LMDB on open."""

    _REC = struct.Struct(">HI")

    def __init__(self, path: Path, own_log: bool) -> None:
        import lmdb

        path.mkdir(parents=True, exist_ok=True)
        self.env = lmdb.open(str(path / "lmdb"), map_size=4 << 30, subdir=True,
                             sync=not own_log, metasync=not own_log, writemap=False,
                             max_dbs=0, lock=True)
        self.log = None
        if own_log:
            log_path = path / "wal.log"
            if log_path.exists():
                self._replay(log_path)
            self.log = open(log_path, "ab", buffering=0)  # noqa: SIM115

    def _replay(self, log_path: Path) -> None:
        data = log_path.read_bytes()
        at = 0
        with self.env.begin(write=True) as txn:
            while at + self._REC.size <= len(data):
                klen, vlen = self._REC.unpack_from(data, at)
                end = at + self._REC.size + klen + vlen
                if end > len(data):
                    break  # torn tail: a record never acknowledged
                k = data[at + self._REC.size: at + self._REC.size + klen]
                txn.put(k, data[end - vlen:end])
                at = end

    def put_durable(self, rows: list[Row]) -> None:
        if self.log is not None:
            self.log.write(b"".join(self._REC.pack(len(k), len(v)) + k + v for k, v in rows))
            os.fdatasync(self.log.fileno())
        with self.env.begin(write=True) as txn:
            for k, v in rows:
                txn.put(k, v)

    def get(self, key: bytes) -> bytes | None:
        with self.env.begin(buffers=False) as txn:
            value: bytes | None = txn.get(key)
            return value

    def range(self, start: bytes, end: bytes, limit: int) -> list[Row]:
        out: list[Row] = []
        with self.env.begin() as txn:
            cur = txn.cursor()
            if not cur.set_range(start):
                return out
            for k, v in cur:
                if k >= end or len(out) >= limit:
                    break
                out.append((k, v))
        return out

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
        self.env.close()


class Sqlite:
    """SQLite in WAL mode with synchronous=FULL: each commit fsyncs the WAL."""

    def __init__(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path / "kv.sqlite"), isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS kv (k BLOB PRIMARY KEY, v BLOB) "
                        "WITHOUT ROWID")

    def put_durable(self, rows: list[Row]) -> None:
        self.db.execute("BEGIN")
        self.db.executemany("INSERT OR REPLACE INTO kv VALUES (?, ?)", rows)
        self.db.execute("COMMIT")

    def get(self, key: bytes) -> bytes | None:
        row = self.db.execute("SELECT v FROM kv WHERE k = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def range(self, start: bytes, end: bytes, limit: int) -> list[Row]:
        return [(bytes(k), bytes(v)) for k, v in self.db.execute(
            "SELECT k, v FROM kv WHERE k >= ? AND k < ? ORDER BY k LIMIT ?",
            (start, end, limit))]

    def close(self) -> None:
        self.db.close()


ENGINES: dict[str, Callable[[Path], Engine]] = {
    "rocksdict (lz4)": lambda p: Rocks(p, "lz4"),
    "rocksdict (none)": lambda p: Rocks(p, "none"),
    "lmdb-sync": lambda p: Lmdb(p, own_log=False),
    "lmdb+log": lambda p: Lmdb(p, own_log=True),
    "sqlite-wal": Sqlite,
}


def rate(fn: Callable[[], int], seconds: float) -> float:
    """Call ``fn`` (which returns how many operations it did) for about ``seconds``."""
    done = 0
    start = time.perf_counter()
    while True:
        done += fn()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done / elapsed


def load(engine: Engine) -> None:
    for p in range(PARTITIONS):
        engine.put_durable([(row_key(p, s), VALUE_POOL[(p * 7919 + s) % 4096])
                            for s in range(ROWS_PER_PARTITION)])


def bench_engine(name: str, root: Path, seconds: float) -> dict[str, Any]:
    path = root / name.replace(" ", "_").replace("(", "").replace(")", "")
    engine = ENGINES[name](path)
    rng = random.Random(1)
    result: dict[str, Any] = {}
    t = time.perf_counter()
    load(engine)
    result["load_rows_per_s"] = PARTITIONS * ROWS_PER_PARTITION / (time.perf_counter() - t)
    seq = iter(range(10**9))
    for size in BATCH_SIZES:
        def write(size: int = size) -> int:
            n = next(seq)
            engine.put_durable([(row_key(PARTITIONS + n % 1000, n * 256 + i),
                                 VALUE_POOL[(n + i) % 4096]) for i in range(size)])
            return size
        result[f"writes_per_s_batch_{size}"] = rate(write, seconds)

    def read() -> int:
        for _ in range(100):
            p, s = rng.randrange(PARTITIONS), rng.randrange(ROWS_PER_PARTITION)
            assert engine.get(row_key(p, s)) == VALUE_POOL[(p * 7919 + s) % 4096]
        return 100
    result["reads_per_s"] = rate(read, seconds)

    def scan() -> int:
        p = rng.randrange(PARTITIONS)
        prefix = partition_prefix(KEYSPACE, b"user%06d" % p)
        start = row_key(p, rng.randrange(ROWS_PER_PARTITION - RANGE_ROWS))
        rows = engine.range(start, prefix_end(prefix), RANGE_ROWS)
        assert len(rows) == RANGE_ROWS
        return 1
    result["ranges_per_s"] = rate(scan, seconds)
    engine.close()
    result.update(bench_crash(name, root, seconds))
    result["disk_bytes"] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return result


def crash_writer(name: str, path: Path) -> None:
    """Subprocess: write 64-row batches durably, print each batch number after its commit."""
    engine = ENGINES[name](path)
    n = 0
    while True:
        engine.put_durable([(data_key(KEYSPACE, b"crash", b"%08d/%02d" % (n, i)), VALUE)
                            for i in range(64)])
        sys.stdout.write(f"{n}\n")
        sys.stdout.flush()
        n += 1


def bench_crash(name: str, root: Path, seconds: float) -> dict[str, Any]:
    path = root / ("crash-" + name.replace(" ", "_").replace("(", "").replace(")", ""))
    proc = subprocess.Popen([sys.executable, __file__, "--crash-writer", name, str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    acked = -1
    deadline = time.monotonic() + max(seconds, 0.5)
    while time.monotonic() < deadline or acked < 0:
        line = proc.stdout.readline()
        if not line:
            break
        acked = int(line)
    proc.kill()  # SIGKILL, mid-stream
    proc.wait(timeout=30)
    t = time.perf_counter()
    engine = ENGINES[name](path)
    open_s = time.perf_counter() - t
    missing = sum(1 for n in range(acked + 1) for i in (0, 63)
                  if engine.get(data_key(KEYSPACE, b"crash", b"%08d/%02d" % (n, i))) != VALUE)
    engine.close()
    return {"crash_acked_batches": acked + 1, "crash_open_s": open_s,
            "crash_missing_acked_batches": missing}


def bench_group_commit(root: Path, seconds: float) -> dict[str, Any]:
    """Group commit on RocksStore: 64 writers in flight, each request costing some loop CPU
    (decode, route, encode), while 4 readers serve gets on the same loop. The sync inline on
    the loop (the loop stalls for each fsync) vs in the background thread (it keeps serving
    reads while the disk works)."""
    out: dict[str, Any] = {}
    for in_thread in (False, True):
        path = root / f"gc-{in_thread}"
        store = RocksStore(path)

        async def run(store: RocksStore = store, in_thread: bool = in_thread) -> dict[str, Any]:
            gc = GroupCommit(store, on_error=lambda e: None, sync_in_thread=in_thread)
            loop = asyncio.get_running_loop()
            stop = loop.time() + seconds
            count = 0

            async def client(c: int) -> None:
                nonlocal count
                i = 0
                while loop.time() < stop:
                    sum(range(300))  # stand-in for a request's own CPU work
                    fut: asyncio.Future[Any] = loop.create_future()
                    gc.commit([(data_key(KEYSPACE, b"gc%d" % c, b"%08d" % i), VALUE)],
                              fut.set_result)
                    await fut
                    i += 1
                    count += 1

            reads = 0

            async def reader() -> None:
                nonlocal reads
                while loop.time() < stop:
                    for i in range(20):
                        store.get(data_key(KEYSPACE, b"gc0", b"%08d" % i))
                    reads += 20
                    await asyncio.sleep(0)

            t = time.perf_counter()
            await asyncio.gather(*(client(c) for c in range(64)), *(reader() for _ in range(4)))
            elapsed = time.perf_counter() - t
            await gc.close()
            return {"commits_per_s": count / elapsed, "syncs_per_s": gc.syncs / elapsed,
                    "mean_batches_per_sync": gc.commits / max(gc.syncs, 1),
                    "reads_per_s": reads / elapsed}

        out["thread" if in_thread else "inline"] = asyncio.run(run())
        store.close()
    return out


def print_table(results: dict[str, dict[str, Any]]) -> None:
    cols = [f"writes_per_s_batch_{s}" for s in BATCH_SIZES] + ["reads_per_s", "ranges_per_s"]
    head = ([f"durable writes/s, batch {s}" for s in BATCH_SIZES]
            + ["reads/s", "ranges/s (100 rows)", "crash: reopen", "acked lost"])
    print("| engine | " + " | ".join(head) + " |")
    print("|---" * (len(head) + 1) + "|")
    for name, r in results.items():
        cells = [f"{r[c]:,.0f}" for c in cols]
        cells += [f"{r['crash_open_s'] * 1000:.0f} ms",
                  f"{r['crash_missing_acked_batches']} of {r['crash_acked_batches']}"]
        print(f"| {name} | " + " | ".join(cells) + " |")


@click.command()
@click.option("--seconds", default=1.0, help="seconds per measurement")
@click.option("--dir", "dir_", default=None, help="where to put the data (a real disk)")
@click.option("--engines", default=",".join(ENGINES), help="comma-separated engine names")
@click.option("--crash-writer", nargs=2, default=None, hidden=True)
def main(seconds: float, dir_: str | None, engines: str,
         crash_writer: tuple[str, str] | None) -> None:
    if crash_writer:
        globals()["crash_writer"](crash_writer[0], Path(crash_writer[1]))
        return
    root = Path(tempfile.mkdtemp(prefix="leaderless-bench-storage-", dir=dir_))
    try:
        results: dict[str, dict[str, Any]] = {}
        for name in engines.split(","):
            t = time.perf_counter()
            results[name] = bench_engine(name, root, seconds)
            print(f"{name}: {time.perf_counter() - t:.1f} s", file=sys.stderr)
        gc = bench_group_commit(root, seconds * 2)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print_table(results)
    print()
    print("| group commit (RocksStore, 64 writers + 4 readers) | commits/s | syncs/s "
          "| batches per sync | reads/s on the same loop |")
    print("|---|---|---|---|---|")
    for mode, r in gc.items():
        print(f"| sync {mode} | {r['commits_per_s']:,.0f} | {r['syncs_per_s']:,.0f} | "
              f"{r['mean_batches_per_sync']:.1f} | {r['reads_per_s']:,.0f} |")
    out = ROOT / "bench" / "results" / "storage.json"
    out.write_text(json.dumps({
        "command": "python bench/storage.py " + " ".join(sys.argv[1:]),
        "seconds_per_measurement": seconds, "value_bytes": len(VALUE),
        "preloaded_rows": PARTITIONS * ROWS_PER_PARTITION, "cpus": os.cpu_count(),
        "engines": results, "group_commit": gc,
    }, indent=2) + "\n")
    print(f"\nwrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
