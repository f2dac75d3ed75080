"""Data keys for encryption at rest: their text format, loading and validation.

A node's data keys are AES-256 keys, each with a short id that is stored in every record
it encrypts, so that keys can rotate: new writes use the *primary* key, and a record
written under an older key stays readable while that key is still configured. Keys come
either from a key file (``[encryption] key_file`` / ``--encryption-key-file``) or from the
environment variable ``LEADERLESS_ENCRYPTION_KEY`` (for secrets injected by a platform).

Format: one entry per key, ``ID:BASE64`` (standard base64 of 32 bytes); the FIRST entry is
the primary. In a file, one entry per line, ``#`` comments and blank lines ignored; in the
variable, entries separated by commas::

    # leaderless data keys; the first is the primary
    k2026b:7cH0Qm0VZ2u5m1Ff4q0mJbF5r0u1uVJ6d2Ejk9oT0Rk=
    k2026a:bN7w0Xn1Sd7Q6u3CkKjq3Q6W0M0Kq1Wn3Y8r3GfE7r4=

    LEADERLESS_ENCRYPTION_KEY='k2026b:7cH0...Rk=,k2026a:bN7w...r4='

This module is pure validation plus one file read; it knows nothing about stores.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path

DATA_KEY_BYTES = 32
"""AES-256: the one key size accepted, so no deployment ends up on a weaker one by accident."""
KEY_ID_BYTES_MAX = 32
"""A key id is stored in every encrypted record: short, but room for a date and a name."""
KEY_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$")
DATA_KEYS_MAX = 64
"""Keys configured at once. Rotation needs two or three; a list this long means old keys
are never retired (``leaderless encryption status`` tells which are still in use)."""
KEY_FILE_BYTES_MAX = 64 << 10
"""A key file holds at most ``DATA_KEYS_MAX`` lines of ~80 bytes plus comments."""
KEY_FILE_MODE_FORBIDDEN = stat.S_IRWXO
"""A key file any user of the machine may read (or write) is refused: ``chmod 600``."""
ENV_VAR = "LEADERLESS_ENCRYPTION_KEY"


class DataKeyError(ValueError):
    """The data keys are missing, malformed or unsafe; the message names the source (file
    or variable), the entry, and what to do."""


@dataclasses.dataclass(frozen=True)
class DataKeys:
    """The configured data keys: ``keys`` by id, ``primary_id`` the one new writes use."""

    primary_id: str
    keys: Mapping[str, bytes]
    source: str = "data keys"
    """Where they came from (a file path or the variable), for error messages."""

    def __post_init__(self) -> None:
        assert self.primary_id in self.keys, (self.primary_id, list(self.keys))
        assert all(len(k) == DATA_KEY_BYTES for k in self.keys.values())

    @property
    def primary(self) -> bytes:
        return self.keys[self.primary_id]

    def key(self, key_id: str) -> bytes | None:
        return self.keys.get(key_id)


def parse_data_keys(text: str, *, source: str) -> DataKeys:
    """Data keys from their text (file lines or the variable's comma-separated entries)."""
    lines = text.splitlines()
    entries: list[tuple[str, str]] = []  # (where, entry)
    for number, line in enumerate(lines, start=1):
        for part in line.split("#", 1)[0].split(","):
            if part.strip():
                where = f"line {number}" if len(lines) > 1 else f"entry {len(entries) + 1}"
                entries.append((where, part.strip()))
    if not entries:
        raise DataKeyError(f"{source}: no data key found; write one entry ID:BASE64 per "
                           "key (`leaderless encryption generate-key` makes one)")
    if len(entries) > DATA_KEYS_MAX:
        raise DataKeyError(f"{source}: {len(entries)} keys; at most {DATA_KEYS_MAX} may be "
                           "configured: remove keys no record uses any more "
                           "(`leaderless encryption status`)")
    keys: dict[str, bytes] = {}
    for where, entry in entries:
        key_id, key = _parse_entry(entry, f"{source}, {where}")
        if key_id in keys:
            raise DataKeyError(f"{source}, {where}: key id {key_id!r} appears twice; "
                               "every key needs its own id")
        for other_id, other in keys.items():
            if other == key:
                raise DataKeyError(f"{source}, {where}: key {key_id!r} is the same key as "
                                   f"{other_id!r}; generate a new key for a new id")
        keys[key_id] = key
    primary_id = entries[0][1].partition(":")[0].strip()  # the first entry
    return DataKeys(primary_id=primary_id, keys=keys, source=source)


def _parse_entry(entry: str, where: str) -> tuple[str, bytes]:
    key_id, sep, encoded = entry.partition(":")
    key_id, encoded = key_id.strip(), encoded.strip()
    if not sep:
        raise DataKeyError(f"{where}: no key id; write ID:BASE64 (e.g. k1:...); the id is "
                           "stored with every record so that keys can rotate")
    check_key_id(key_id, where)
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise DataKeyError(f"{where}: key {key_id!r} is not valid base64") from None
    if len(key) != DATA_KEY_BYTES:
        raise DataKeyError(f"{where}: key {key_id!r} is {len(key)} bytes; data keys are "
                           f"{DATA_KEY_BYTES} bytes (AES-256): `leaderless encryption "
                           "generate-key` makes one")
    return key_id, key


def check_key_id(key_id: str, where: str = "key id") -> None:
    if not KEY_ID_PATTERN.match(key_id):
        raise DataKeyError(f"{where}: key id {key_id[:40]!r} is invalid: use 1-"
                           f"{KEY_ID_BYTES_MAX} letters, digits, '.', '_' or '-', starting "
                           "with a letter or digit")


def load_key_file(path: Path) -> DataKeys:
    """Data keys from ``path``; refuses a file other users may read."""
    source = f"encryption.key_file {str(path)!r}"
    try:
        with path.open("rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            data = f.read(KEY_FILE_BYTES_MAX + 1)
    except OSError as exc:
        raise DataKeyError(f"{source}: cannot read it: {exc.strerror or exc}") from None
    if mode & KEY_FILE_MODE_FORBIDDEN:
        raise DataKeyError(f"{source}: other users may access it (mode "
                           f"{stat.S_IMODE(mode):03o}); run `chmod 600 {path}`")
    if len(data) > KEY_FILE_BYTES_MAX:
        raise DataKeyError(f"{source}: larger than {KEY_FILE_BYTES_MAX} bytes; a key file "
                           f"holds at most {DATA_KEYS_MAX} lines ID:BASE64")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise DataKeyError(f"{source}: not ASCII text; write one ID:BASE64 per line") from None
    return parse_data_keys(text, source=source)


def load_data_keys(key_file: Path | None, key_value: str | None) -> DataKeys | None:
    """The node's data keys from its settings: the file, or the variable's value; None when
    neither is set (encryption at rest is off)."""
    if key_file is not None and key_value is not None:
        raise DataKeyError(f"encryption: give the data keys as a file (encryption.key_file) "
                           f"or in {ENV_VAR}, not both")
    if key_file is not None:
        return load_key_file(key_file)
    if key_value is not None:
        return parse_data_keys(key_value, source=ENV_VAR)
    return None


def new_key_id(now: datetime.datetime | None = None) -> str:
    """A default id for a new key: ``k`` and the UTC time, so ids sort by age."""
    now = now or datetime.datetime.now(datetime.UTC)
    return now.strftime("k%Y%m%dT%H%M%S")


def generate_entry(key_id: str) -> str:
    """A fresh random key as one ``ID:BASE64`` entry."""
    check_key_id(key_id)
    return f"{key_id}:{base64.b64encode(os.urandom(DATA_KEY_BYTES)).decode()}"
