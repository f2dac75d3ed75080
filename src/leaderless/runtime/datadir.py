"""A node's data directory: an exclusive lock and the durable incarnation number.

The incarnation must survive a crash: a node that restarted with a lower number than it
had announced would be outvoted by stale accusations against it. So it is written the
durable way (temp file, fsync, rename, fsync the directory), and the node saves it before
any message that depends on it leaves.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from leaderless.durable_files import write_atomically
from leaderless.runtime.errors import DataDirError

INCARNATION_FILE = "incarnation"
TOKEN_SEED_FILE = "token_seed"
LOCK_FILE = "LOCK"


class DataDir:
    """Owns ``path`` for the life of a node: ``open`` locks it, ``close`` releases it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_fd: int | None = None

    def open(self) -> None:
        """Create the directory if needed, check it is writable and lock it. Raises
        DataDirError with what to do if any of that fails."""
        hint = "pass --data-dir with a directory this user can write"
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DataDirError(
                f"data_dir: cannot create {str(self.path)!r}: {exc.strerror}; {hint}") from None
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise DataDirError(f"data_dir: {str(self.path)!r} is not writable; {hint}")
        try:
            fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise DataDirError(
                f"data_dir: {str(self.path)!r} is not writable: {exc.strerror}; {hint}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise DataDirError(
                f"data_dir: {str(self.path)!r} is in use by another running node; "
                "stop it or give this node its own --data-dir") from None
        self._lock_fd = fd
        # Prove we can really write (a read-only mount passes os.access for root).
        self._write_durably(".write-test", b"ok\n")
        (self.path / ".write-test").unlink(missing_ok=True)

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def load_incarnation(self) -> int | None:
        """The last saved incarnation, or None on first start."""
        path = self.path / INCARNATION_FILE
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise DataDirError(f"data_dir: cannot read {str(path)!r}: {exc.strerror}") from None
        if not text.isdigit():
            raise DataDirError(
                f"data_dir: {str(path)!r} is corrupt (expected a number, found {text[:20]!r}); "
                "restore it, or start this node with a new --name and an empty --data-dir")
        return int(text)

    def token_seed(self, draw: int) -> int:
        """The ring token seed chosen at first start (``draw``, persisted), ever after the
        same: a node that changed its tokens on restart would move data around."""
        path = self.path / TOKEN_SEED_FILE
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            self._write_durably(TOKEN_SEED_FILE, f"{draw}\n".encode())
            return draw
        except OSError as exc:
            raise DataDirError(f"data_dir: cannot read {str(path)!r}: {exc.strerror}") from None
        if not text.isdigit() or int(text) >= 2**64:
            raise DataDirError(f"data_dir: {str(path)!r} is corrupt (expected a number); "
                               "restore it from a backup of this node's data dir")
        return int(text)

    def save_incarnation(self, incarnation: int) -> None:
        """Write durably: after this returns the number survives a crash or power loss."""
        assert incarnation >= 0
        self._write_durably(INCARNATION_FILE, f"{incarnation}\n".encode())

    def _write_durably(self, name: str, data: bytes) -> None:
        target = self.path / name
        try:
            write_atomically(target, data, 0o644)
        except OSError as exc:
            raise DataDirError(
                f"data_dir: cannot write {str(target)!r}: {exc.strerror}; "
                "check free space and permissions of --data-dir") from None
