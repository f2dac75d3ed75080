"""Writing a small file so that it is whole, durable and never readable by more than its
mode allows: a temporary file created with that mode from the start, written, fsynced,
then linked or renamed into place, and its directory synced. Used for the incarnation and
token seed (data dir), the gossip keyring, certificates and keys, data keys and the CLI's
stored token: a crash leaves the old file or the new one, never half of either."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_atomically(path: Path, data: bytes, mode: int, *, replace: bool = True) -> None:
    """Write ``data`` to ``path`` with exactly ``mode`` (whatever the umask). Without
    ``replace`` an existing ``path`` raises FileExistsError (checked atomically, by
    linking). Raises OSError."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        try:
            os.fchmod(fd, mode)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(temp, path)
        else:
            os.link(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    sync_directory(path.parent)


def sync_directory(directory: Path) -> None:
    """Make a rename or link in ``directory`` durable (where the filesystem can)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot sync a directory; the file itself is synced
    finally:
        os.close(fd)
