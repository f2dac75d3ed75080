"""``leaderless encryption ...``: data keys and the encrypted store of a stopped node.

    leaderless encryption generate-key [--id ID] [--key-file FILE]   # new primary key
    leaderless encryption status --data-dir DIR                      # rows per key id
    leaderless encryption rewrap --data-dir DIR [--key-file FILE] [--encrypt-plaintext]

``rewrap`` re-encrypts every row not under the primary key (after a rotation, so the old
key can be removed) and, with ``--encrypt-plaintext``, encrypts a store written without
encryption. It works on a stopped node's data directory (it takes the node's lock), then
compacts RocksDB so that the superseded records leave the live files.

Exit codes: 0 done, 2 bad usage or keys, 3 the data directory is in use or unreadable.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn

import click
import rocksdict

from leaderless.durable_files import write_atomically
from leaderless.runtime.datadir import DataDir
from leaderless.runtime.errors import DataDirError
from leaderless.security.data_keys import (
    ENV_VAR,
    DataKeyError,
    DataKeys,
    generate_entry,
    load_data_keys,
    load_key_file,
    new_key_id,
)
from leaderless.storage.encrypted import census, rewrap
from leaderless.storage.rocks import RocksStore
from leaderless.storage.store import StorageError

STORE_SUBDIR = "data"
"""Where a node keeps its RocksDB store inside its data directory (runtime.node)."""
EXIT_USAGE = 2
EXIT_DATA_DIR = 3


@click.group()
def encryption() -> None:
    """Data keys for encryption at rest, and re-encrypting a stopped node's store."""


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


@encryption.command("generate-key")
@click.option("--id", "key_id", metavar="ID", help="The key's id, stored with every record "
              "it encrypts [default: k<UTC date and time>].")
@click.option("--key-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Add the key to this file as its new primary (first line), keeping the "
                   "others; the file is created with mode 0600 if missing. Without it the "
                   "entry ID:BASE64 is printed.")
def generate_key(key_id: str | None, key_file: Path | None) -> None:
    """Make a random AES-256 data key."""
    try:
        entry = generate_entry(key_id or new_key_id())
        if key_file is None:
            click.echo(entry)
            return
        old = load_key_file(key_file) if key_file.exists() else None
        if old is not None and entry.partition(":")[0] in old.keys:
            raise DataKeyError(f"{key_file}: it already has a key with id "
                               f"{entry.partition(':')[0]!r}; pick another --id")
        text = key_file.read_text() if old is not None else (
            "# leaderless data keys, one ID:BASE64 per line; the first is the primary\n")
        lines = text.splitlines(keepends=True)
        at = next((i for i, line in enumerate(lines) if line.split("#", 1)[0].strip()),
                  len(lines))
        lines.insert(at, entry + "\n")
        _write_private(key_file, "".join(lines))
    except DataKeyError as exc:
        _fail(str(exc), EXIT_USAGE)
    click.echo(f"added key {entry.partition(':')[0]!r} as the primary of {key_file}; "
               "restart each node with it to use it for new writes", err=True)


def _write_private(path: Path, text: str) -> None:
    """Replace ``path`` atomically with a 0600 file holding ``text``."""
    write_atomically(path, text.encode(), 0o600)


_data_dir = click.option("--data-dir", required=True, metavar="DIR",
                         type=click.Path(file_okay=False, path_type=Path),
                         help="The stopped node's data directory.")


def _open_store(data_dir: Path) -> tuple[DataDir, RocksStore]:
    if not (data_dir / STORE_SUBDIR).is_dir():
        _fail(f"data_dir: {str(data_dir)!r} holds no node store ({STORE_SUBDIR}/)", EXIT_USAGE)
    lock = DataDir(data_dir)
    try:
        lock.open()
    except DataDirError as exc:
        _fail(str(exc), EXIT_DATA_DIR)
    try:
        return lock, RocksStore(data_dir / STORE_SUBDIR)
    except StorageError as exc:
        lock.close()
        _fail(str(exc), EXIT_DATA_DIR)


@encryption.command("status")
@_data_dir
def status(data_dir: Path) -> None:
    """Count a stopped node's rows by the data key that encrypted them."""
    lock, store = _open_store(data_dir)
    try:
        counts = census(store)
    finally:
        store.close()
        lock.close()
    if not counts:
        click.echo("no rows")
    for key_id, rows in sorted(counts.items()):
        click.echo(f"{key_id}\t{rows}")


@encryption.command("rewrap")
@_data_dir
@click.option("--key-file", type=click.Path(dir_okay=False, path_type=Path),
              help=f"The data keys (first = primary) [default: ${ENV_VAR}].")
@click.option("--encrypt-plaintext", is_flag=True,
              help="Also encrypt rows written without encryption (turning encryption on for "
                   "an existing node).")
def rewrap_command(data_dir: Path, key_file: Path | None, encrypt_plaintext: bool) -> None:
    """Re-encrypt a stopped node's rows under the primary data key, then compact."""
    keys = _keys(key_file)
    lock, store = _open_store(data_dir)
    try:
        try:
            report = rewrap(store, keys, encrypt_plaintext=encrypt_plaintext)
        finally:
            store.close()
        _compact(data_dir / STORE_SUBDIR)
    except StorageError as exc:
        _fail(str(exc), EXIT_USAGE)
    finally:
        lock.close()
    moved = ", ".join(f"{n} from {key_id}" for key_id, n in sorted(report.rewrapped.items()))
    click.echo(f"{report.rows} rows; re-encrypted under {keys.primary_id!r}: "
               f"{moved or 'none'}")


def _keys(key_file: Path | None) -> DataKeys:
    try:
        keys = load_data_keys(key_file, None if key_file else os.environ.get(ENV_VAR))
    except DataKeyError as exc:
        _fail(str(exc), EXIT_USAGE)
    if keys is None:
        _fail(f"no data keys: pass --key-file FILE or set {ENV_VAR}", EXIT_USAGE)
    return keys


def _compact(path: Path) -> None:
    """Rewrite every SST file and drop the memtable's WAL, so superseded records (old
    ciphertexts, or plaintext after --encrypt-plaintext) leave the live files. The freed
    disk blocks are not overwritten: see docs/security.md."""
    options = rocksdict.Options(raw_mode=True)
    options.set_compression_type(rocksdict.DBCompressionType.lz4())
    try:
        db = rocksdict.Rdict(str(path), options)
        try:
            db.flush(True)
            compact = rocksdict.CompactOptions()
            compact.set_bottommost_level_compaction(
                rocksdict.BottommostLevelCompaction.force())
            db.compact_range(None, None, compact)
        finally:
            db.close()
    except Exception as exc:  # rocksdict raises bare Exception with RocksDB's status text
        raise StorageError(f"the rows are re-encrypted, but compacting {path} failed, so "
                           f"superseded records may stay in its files until RocksDB "
                           f"compacts them on its own: {exc}") from exc
