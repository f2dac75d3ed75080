"""The embedded durable ``Store``: RocksDB through rocksdict (see docs/storage.md).

Durability model (WAL group commit): every ``write`` is one RocksDB ``WriteBatch`` (atomic)
appended to RocksDB's write-ahead log with ``sync=False`` -- the bytes reach the OS page
cache at once, so they are visible to reads and survive a kill -9 of this process, but not
a power cut. ``sync`` then fsyncs the append-only WAL once (``flush_wal(True)``) for every
batch written since the previous sync: one sequential fsync per event-loop turn instead of
one per write, and never the scattered pages of a tree. On reopen RocksDB replays the WAL
in "point in time" mode: it stops at the first torn or corrupt record, so the store holds a
prefix of the batches, each whole.

With ``buffer_writes=True`` (what a node uses with ``fsync = "always"``) a ``write`` does
not touch RocksDB at all: it goes into one pending ``WriteBatch`` and an in-memory overlay
that ``get`` reads first (``scan`` hands the pending batch to RocksDB before it reads).
``sync`` appends the whole pending batch to the WAL in one call and then fsyncs it. That
turns one WAL append (a write syscall and a memtable insert under RocksDB's write mutex)
per replica write into one per group; what is lost on a crash is still only what no sync
covered, so nothing acknowledged (docs/storage.md).

Threading: ``sync`` may run in another thread while the event loop thread calls ``write``,
``get`` and ``scan`` (RocksDB is thread-safe, ``flush_wal`` releases the GIL, and the
pending batch is swapped under a lock). ``close`` must not race with any other call.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import rocksdict

from leaderless.storage.store import StorageError, Write

SYNC_MODES = ("always", "off")
"""``always``: ``sync`` fsyncs the WAL (the production setting). ``off``: ``sync`` only
hands the WAL to the OS -- survives kill -9, not a power cut; for tests and throwaway data."""
COMPRESSIONS = ("lz4", "none")

WRITE_BUFFER_BYTES = 64 << 20
"""Memtable size. Large enough that small 100-byte writes are flushed to SST files in big
sequential runs; small enough that the WAL replayed on restart stays short (RocksDB replays
at most ~2 memtables' worth of WAL, well under a second here)."""
MAX_WRITE_BUFFERS = 2
"""One memtable taking writes while the other is flushed: memory bound 2 x 64 MiB."""
BLOCK_CACHE_BYTES = 64 << 20
"""Uncompressed blocks kept in memory for reads; a small-server default."""
BLOOM_BITS_PER_KEY = 10
"""~1 % false positives: a get for a missing key skips nearly every SST file."""
BACKGROUND_JOBS = 2
"""Flushes and compactions in the background: one per core on a 2-core machine."""
INFO_LOG_FILES_KEPT = 5
"""RocksDB's own text LOG files; old ones are deleted so the data dir does not fill up."""
SCAN_CHUNK_ROWS = 256
"""A scan reads this many rows per RocksDB iterator, then lets it go and seeks again. No
iterator outlives a chunk, so an abandoned scan never pins files or keeps the DB open."""


class RocksStore:
    """A ``Store`` on RocksDB in ``path`` (created if missing; one process at a time)."""

    def __init__(self, path: Path, *, sync_mode: str = "always",
                 compression: str = "lz4", buffer_writes: bool = False) -> None:
        if sync_mode not in SYNC_MODES:
            raise ValueError(f"sync_mode {sync_mode!r} is not one of {SYNC_MODES}")
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression {compression!r} is not one of {COMPRESSIONS}")
        self.path = Path(path)
        self.sync_mode = sync_mode
        self.syncs = 0
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the data directory {self.path}: {exc}") from exc
        self._write_options = rocksdict.WriteOptions()
        # Unsynced WAL append: visible and kill -9 safe at once, power-safe after ``sync``.
        self._write_options.sync = False  # (the WAL is on by default)
        self.buffer_writes = buffer_writes
        self._lock = threading.Lock()
        self._pending: rocksdict.WriteBatch | None = None
        self._overlay: dict[bytes, bytes | None] = {}
        """Writes not yet handed to RocksDB (buffer_writes): newest value, None = deleted."""
        self._flushing: dict[bytes, bytes | None] = {}
        """The overlay of the batch a sync is handing to RocksDB right now."""
        try:
            self._db: rocksdict.Rdict | None = rocksdict.Rdict(
                str(self.path), _options(compression))
        except Exception as exc:  # rocksdict raises bare Exception with RocksDB's status text
            raise _error("open", self.path, exc) from exc

    def get(self, key: bytes) -> bytes | None:
        db = self._open_db()
        if self.buffer_writes:
            overlay, flushing = self._overlay, self._flushing
            if key in overlay:
                return overlay[key]
            if key in flushing:
                return flushing[key]
        try:
            value = db.get(key)
        except Exception as exc:
            raise _error("read", self.path, exc) from exc
        assert value is None or isinstance(value, bytes)
        return value

    def write(self, batch: Sequence[Write]) -> None:
        db = self._open_db()
        if self.buffer_writes:
            with self._lock:
                if self._pending is None:
                    self._pending = rocksdict.WriteBatch(raw_mode=True)
                wb = self._pending
                overlay = self._overlay
                for key, value in batch:
                    if value is None:
                        wb.delete(key)
                    else:
                        wb.put(key, value)
                    overlay[key] = value
            return
        wb = rocksdict.WriteBatch(raw_mode=True)
        for key, value in batch:
            if value is None:
                wb.delete(key)
            else:
                wb.put(key, value)
        try:
            db.write(wb, self._write_options)
        except Exception as exc:
            raise _error("write", self.path, exc) from exc

    def _hand_over(self, db: rocksdict.Rdict) -> None:
        """Append the pending batch (buffer_writes) to the WAL and memtable, unsynced."""
        with self._lock:
            wb, self._pending = self._pending, None
            self._flushing, self._overlay = self._overlay, {}
        try:
            if wb is not None:
                db.write(wb, self._write_options)
        except Exception as exc:
            raise _error("write", self.path, exc) from exc
        finally:
            with self._lock:
                self._flushing = {}

    def sync(self) -> None:
        db = self._open_db()
        if self.buffer_writes:
            self._hand_over(db)
        try:
            db.flush_wal(self.sync_mode == "always")
        except Exception as exc:
            raise _error("sync", self.path, exc) from exc
        self.syncs += 1

    def scan(self, start: bytes, end: bytes | None = None, *, limit: int | None = None,
             reverse: bool = False) -> Iterator[tuple[bytes, bytes]]:
        if limit is not None and limit <= 0:
            return
        if self.buffer_writes and self._pending is not None:
            self._hand_over(self._open_db())  # so the scan sees them (not yet durable)
        left = limit
        lo, hi = start, end
        while True:
            want = SCAN_CHUNK_ROWS if left is None else min(left, SCAN_CHUNK_ROWS)
            rows = self._scan_chunk(lo, hi, want, reverse)
            yield from rows
            if len(rows) < want:
                return
            if left is not None:
                left -= len(rows)
                if left == 0:
                    return
            # Resume just past the last row: the smallest key above it, or below it as the
            # exclusive upper bound.
            if reverse:
                hi = rows[-1][0]
            else:
                lo = rows[-1][0] + b"\x00"

    def close(self) -> None:
        """Flush and close; releases the directory lock so this process may reopen it."""
        db, self._db = self._db, None
        if db is None:
            return
        try:
            if self.buffer_writes:
                self._hand_over(db)
            if self.sync_mode == "always":
                db.flush_wal(True)
            db.close()
        except Exception as exc:
            raise _error("close", self.path, exc) from exc
        finally:
            del db

    def _scan_chunk(self, lo: bytes, hi: bytes | None, want: int,
                    reverse: bool) -> list[tuple[bytes, bytes]]:
        db = self._open_db()
        read_options = rocksdict.ReadOptions()
        if hi is not None:
            # The upper bound lets RocksDB stop inside the SST block (and skip tombstones
            # past it). rocksdict does not apply a lower bound, so that one is checked here.
            read_options.set_iterate_upper_bound(hi)
        rows: list[tuple[bytes, bytes]] = []
        try:
            if reverse:
                items = db.items(backwards=True, from_key=hi, read_opt=read_options)
                for key, value in _rows(items):
                    if key < lo:
                        break
                    rows.append((key, value))
                    if len(rows) >= want:
                        break
            else:
                items = db.items(from_key=lo, read_opt=read_options)
                for key, value in _rows(items):
                    if hi is not None and key >= hi:
                        break
                    rows.append((key, value))
                    if len(rows) >= want:
                        break
            del items  # drop the iterator now, before any row is handed to the caller
        except Exception as exc:
            raise _error("scan", self.path, exc) from exc
        return rows

    def _open_db(self) -> rocksdict.Rdict:
        if self._db is None:
            raise StorageError(f"the store in {self.path} is closed")
        return self._db


def _rows(items: Iterable[tuple[object, object]]) -> Iterator[tuple[bytes, bytes]]:
    """The (key, value) pairs of a raw-mode iterator, typed (raw mode holds only bytes)."""
    for key, value in items:
        assert isinstance(key, bytes) and isinstance(value, bytes)
        yield key, value


def _options(compression: str) -> rocksdict.Options:
    opts = rocksdict.Options(raw_mode=True)  # bytes keys and values, no pickling
    opts.create_if_missing(True)
    opts.set_write_buffer_size(WRITE_BUFFER_BYTES)
    opts.set_max_write_buffer_number(MAX_WRITE_BUFFERS)
    opts.set_max_background_jobs(BACKGROUND_JOBS)
    opts.set_keep_log_file_num(INFO_LOG_FILES_KEPT)
    opts.set_level_compaction_dynamic_level_bytes(True)
    # Replay the WAL up to the first torn record (a power cut mid-append) and no further:
    # a consistent prefix of whole batches, which is what ``Store`` promises.
    opts.set_wal_recovery_mode(rocksdict.DBRecoveryMode.point_in_time())
    # LZ4 costs little CPU and shrinks the repeated key prefixes (keyspace, token, pk) of
    # one partition's rows; docs/storage.md has the measured difference against none.
    opts.set_compression_type(rocksdict.DBCompressionType.lz4() if compression == "lz4"
                              else rocksdict.DBCompressionType.none())
    table = rocksdict.BlockBasedOptions()
    table.set_bloom_filter(BLOOM_BITS_PER_KEY, False)
    table.set_block_cache(rocksdict.Cache(BLOCK_CACHE_BYTES))
    opts.set_block_based_table_factory(table)
    return opts


def _error(op: str, path: Path, exc: BaseException) -> StorageError:
    text = str(exc)
    low = text.lower()
    if isinstance(exc, rocksdict.DbClosedError):
        return StorageError(f"the store in {path} is closed ({op})")
    if "lock" in low and ("no locks available" in low or "resource temporarily" in low
                          or "lock hold" in low or "while lock file" in low):
        return StorageError(
            f"the data directory {path} is in use (its RocksDB LOCK is held, by another "
            "node process or by a store in this process not yet closed): stop that node "
            "or give this one another data directory")
    if "no space left" in low or f"errno {errno.ENOSPC}" in low:
        return StorageError(f"the disk holding {path} is full ({op} failed): free space "
                            f"and restart the node. RocksDB said: {text}")
    if "permission denied" in low or "read-only file system" in low:
        return StorageError(f"cannot {op} in {path}: the node process may not write there "
                            f"(check owner, mode and mount). RocksDB said: {text}")
    if "corrupt" in low:
        return StorageError(f"the data in {path} is corrupt ({op}); restore this node from "
                            f"its replicas (repair) or a backup. RocksDB said: {text}")
    return StorageError(f"RocksDB {op} failed in {path}: {text}")
