"""Encryption at rest: a ``Store`` that seals every value with AES-256-GCM around another.

What is encrypted: every stored value -- cells (user values with their versions), hints
(a write kept for a replica that was down), Paxos acceptor state (proposed values). What
is not: store keys (keyspace, token, partition key, sort key), because ranges, token scans
and Merkle trees work on the key order; so partition and sort keys, the number of rows and
value sizes (+/- the constant overhead below) are visible on disk. Everything above this
wrapper (replica, hints, anti-entropy, watch) sees plaintext cells, so it changes nothing
in core/; what replicas send each other is plaintext cells in peer frames, which TLS
encrypts on the wire when it is on.

Record layout (``FORMAT_V1``)::

    format:u8 = 1 | len(key_id):u8 | key_id | salt:16 | nonce:12 | ciphertext | tag:16

The AEAD's associated data is the header (format .. salt) followed by the record's store
key: a ciphertext copied under another key, or with its key id or salt edited, fails to
decrypt. Decryption failures raise ``DecryptionError`` (a ``StorageError``), never garbage.

Nonces: each ``EncryptedStore`` (one per node start) draws a random 16-byte salt and
derives a session key = HKDF-SHA256(data key, salt); records then use a 96-bit counter as
the nonce under that session key. Nonces never repeat within a session and sessions never
share a key (salt collisions are ~2**-64 after 2**32 sessions), so the cluster can write at
any rate with one data key -- with random nonces under one key, NIST's bound is 2**32
records, half a day at 100k writes/s. A session is renewed after ``SESSION_RECORDS_MAX``
records to keep the usual per-key data limits of GCM.

Whether a store is encrypted is recorded by a marker row (``MARKER_KEY``, plaintext, below
every other key): a node with data keys refuses a store that holds rows but no marker
(written without encryption: ``rewrap`` with ``encrypt_plaintext`` converts it), and a node
without keys refuses a marked store. ``rewrap`` also re-encrypts old records under the
primary key after a rotation, so the old key can be removed.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Iterator, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from leaderless.security.data_keys import DataKeys
from leaderless.storage.store import StorageError, Store, Write

FORMAT_V1 = 0x01
"""The first byte of an encrypted record. Plaintext rows written by core are msgpack
arrays or maps (first byte 0x80-0x9f or 0xdc-0xdf), so the two never look alike."""
SALT_BYTES = 16
NONCE_BYTES = 12
TAG_BYTES = 16
HKDF_INFO = b"leaderless encryption at rest v1"
SESSION_RECORDS_MAX = 1 << 32
"""Records sealed under one session key before a fresh salt is drawn: keeps each derived
key far inside GCM's data limits (and costs one HKDF, ~20 us, per 4 billion writes)."""
SESSION_KEYS_CACHED_MAX = 4096
"""Session keys kept for reads. A store holds one session per node start (and per
``rewrap``); past this bound the oldest are dropped and re-derived when read again."""
MARKER_KEY = b"\x00leaderless/encryption-at-rest"
"""Below every key core writes (``d``, ``h``, ``p``...): no core scan ever reaches it."""
MARKER_VALUE = b'{"format": 1, "cipher": "AES-256-GCM", "kdf": "HKDF-SHA256"}'
REWRAP_BATCH_ROWS = 1000
"""Rows re-encrypted per store write during ``rewrap``: bounds its memory."""
PLAINTEXT = "plaintext"
"""``census`` key for rows not encrypted (a store written without encryption)."""


class DecryptionError(StorageError):
    """A record cannot be decrypted: its key id is not configured, or the record (or its
    store key) was altered. The store's integrity is in question: the node stops."""

    def __init__(self, message: str, *, key_id: str | None, store_key: bytes) -> None:
        super().__init__(message)
        self.key_id = key_id
        self.store_key = store_key


class PlaintextStoreError(StorageError):
    """Data keys are configured but the store was written without encryption."""


class EncryptedStoreError(StorageError):
    """The store is encrypted but no data keys are configured."""


def _show(store_key: bytes) -> str:
    """A store key for an error message (keys are not secret: they are stored in clear)."""
    return store_key[:64].hex() + ("..." if len(store_key) > 64 else "")


def record_key_id(record: bytes) -> str | None:
    """The key id of an encrypted record, or None if the record is not one."""
    if len(record) < 2 or record[0] != FORMAT_V1 or len(record) < 2 + record[1]:
        return None
    return record[2:2 + record[1]].decode("ascii", "replace")


class RecordCipher:
    """Seals values under the primary data key and opens records under any configured key.
    Not thread-safe for ``seal`` (the event loop thread writes; see storage.rocks)."""

    def __init__(self, keys: DataKeys) -> None:
        self.keys = keys
        self._key_id = keys.primary_id.encode("ascii")
        self._sessions: dict[bytes, AESGCM] = {}
        """Session keys by record header (format, key id, salt)."""
        self._new_session()

    def _new_session(self) -> None:
        salt = os.urandom(SALT_BYTES)
        self._header = bytes([FORMAT_V1, len(self._key_id)]) + self._key_id + salt
        self._aead = self._session_key(self._header, self.keys.primary, salt)
        self._counter = itertools.count()

    def _session_key(self, header: bytes, data_key: bytes, salt: bytes) -> AESGCM:
        derived = HKDF(algorithm=hashes.SHA256(), length=len(data_key), salt=salt,
                       info=HKDF_INFO).derive(data_key)
        aead = AESGCM(derived)
        if len(self._sessions) >= SESSION_KEYS_CACHED_MAX:
            del self._sessions[next(iter(self._sessions))]
        self._sessions[header] = aead
        return aead

    def seal(self, store_key: bytes, value: bytes) -> bytes:
        n = next(self._counter)
        if n >= SESSION_RECORDS_MAX:
            self._new_session()
            n = next(self._counter)
        nonce = n.to_bytes(NONCE_BYTES, "big")
        header = self._header
        return header + nonce + self._aead.encrypt(nonce, value, header + store_key)

    def open(self, store_key: bytes, record: bytes) -> bytes:
        # The hot path (a read at 100k/s) is one slice, one dict hit and the AEAD call;
        # every check that costs more runs only on a cache miss or a failure.
        header_end = 2 + record[1] + SALT_BYTES if len(record) >= 2 else 0
        header = record[:header_end]
        aead = self._sessions.get(header)
        if aead is None or len(record) < header_end + NONCE_BYTES + TAG_BYTES:
            aead = self._session_of(store_key, record, header)
        body_at = header_end + NONCE_BYTES
        try:
            return aead.decrypt(record[header_end:body_at], record[body_at:],
                                header + store_key)
        except InvalidTag:
            key_id = record_key_id(record)
            raise DecryptionError(
                f"the record at store key {_show(store_key)} does not decrypt under data key "
                f"{key_id!r}: the key with that id is not the one that wrote it, or the record "
                "was altered or moved on disk", key_id=key_id, store_key=store_key) from None

    def _session_of(self, store_key: bytes, record: bytes, header: bytes) -> AESGCM:
        """The session key for a record whose header is not cached, after checking it."""
        if len(record) < 2 or record[0] != FORMAT_V1:
            raise DecryptionError(
                f"the record at store key {_show(store_key)} is not encrypted (format byte "
                f"{record[:1].hex() or 'none'}), in a store whose values are encrypted: it "
                "was written by a node without encryption or altered on disk; restore this "
                "node from its replicas (repair) or a backup", key_id=None, store_key=store_key)
        key_id = record_key_id(record)
        if key_id is None or len(record) < len(header) + NONCE_BYTES + TAG_BYTES:
            raise DecryptionError(
                f"the record at store key {_show(store_key)} (key id {key_id!r}) is "
                f"truncated ({len(record)} bytes)", key_id=key_id, store_key=store_key)
        data_key = self.keys.key(key_id)
        if data_key is None:
            raise DecryptionError(
                f"the record at store key {_show(store_key)} was encrypted under data key "
                f"{key_id!r}, which is not configured (configured: "
                f"{', '.join(self.keys.keys)}); add that key back to "
                f"{self.keys.source}", key_id=key_id, store_key=store_key)
        return self._sessions.get(header) or self._session_key(
            header, data_key, header[-SALT_BYTES:])


class EncryptedStore:
    """A ``Store`` that encrypts values on the way in and decrypts them on the way out of
    ``inner``; keys pass through unchanged. Use ``at_rest`` to build one for a node (it
    checks and marks the store); this class assumes the store is an encrypted one."""

    def __init__(self, inner: Store, keys: DataKeys) -> None:
        self.inner = inner
        self.cipher = RecordCipher(keys)

    def get(self, key: bytes) -> bytes | None:
        record = self.inner.get(key)
        return None if record is None else self.cipher.open(key, record)

    def write(self, batch: Sequence[Write]) -> None:
        seal = self.cipher.seal
        self.inner.write([(key, None if value is None else seal(key, value))
                          for key, value in batch])

    def sync(self) -> None:
        self.inner.sync()

    def scan(self, start: bytes, end: bytes | None = None, *, limit: int | None = None,
             reverse: bool = False) -> Iterator[tuple[bytes, bytes]]:
        open_ = self.cipher.open
        # The marker row is not encrypted and not data: leave it out of any scan reaching it.
        marker_in_range = start <= MARKER_KEY and (end is None or MARKER_KEY < end)
        asked = limit + 1 if limit is not None and marker_in_range else limit
        given = 0
        for key, record in self.inner.scan(start, end, limit=asked, reverse=reverse):
            if key == MARKER_KEY:
                continue
            if limit is not None and given >= limit:
                return
            given += 1
            yield key, open_(key, record)

    def close(self) -> None:
        self.inner.close()


def store_state(store: Store) -> str:
    """``encrypted`` (marked), ``empty`` or ``plaintext`` (rows but no marker)."""
    if store.get(MARKER_KEY) is not None:
        return "encrypted"
    for _ in store.scan(b"", limit=1):
        return "plaintext"
    return "empty"


def at_rest(store: Store, keys: DataKeys | None, *, where: str) -> Store:
    """The store a node should use: ``store`` itself without data keys, else an
    ``EncryptedStore`` around it (an empty store is marked as encrypted first). Refuses a
    store whose state does not match the configuration, with what to do."""
    state = store_state(store)
    if keys is None:
        if state == "encrypted":
            raise EncryptedStoreError(
                f"the store in {where} is encrypted at rest, and this node has no data keys: "
                "start it with --encryption-key-file FILE (or LEADERLESS_ENCRYPTION_KEY) "
                "holding the keys it was written with")
        return store
    if state == "plaintext":
        raise PlaintextStoreError(
            f"the store in {where} holds values written without encryption, and this node "
            f"has data keys ({keys.source}): encrypt it first, with the node stopped: "
            f"`leaderless encryption rewrap --data-dir {where} --encrypt-plaintext` (with "
            "the same key setting), or start the node without data keys")
    if state == "empty":
        store.write([(MARKER_KEY, MARKER_VALUE)])
        store.sync()
    return EncryptedStore(store, keys)


def census(store: Store) -> dict[str, int]:
    """Rows by the data key id that encrypted them (``PLAINTEXT`` for rows without
    encryption); reads only headers, so it needs no keys."""
    counts: dict[str, int] = {}
    for key, record in store.scan(b""):
        if key != MARKER_KEY:
            key_id = record_key_id(record) or PLAINTEXT
            counts[key_id] = counts.get(key_id, 0) + 1
    return counts


@dataclasses.dataclass
class RewrapReport:
    rows: int = 0
    """Rows examined."""
    rewrapped: dict[str, int] = dataclasses.field(default_factory=dict)
    """Rows re-encrypted under the primary, by their former key id (or ``PLAINTEXT``)."""


def rewrap(store: Store, keys: DataKeys, *, encrypt_plaintext: bool = False) -> RewrapReport:
    """Re-encrypt every row not under the primary data key (``store`` is the raw store of a
    stopped node). Rows under another configured key are decrypted and sealed again; rows
    without encryption are encrypted only with ``encrypt_plaintext`` (converting a store
    written without encryption; the marker is written last, after every row, so an
    interrupted conversion is refused at start and simply run again). Synced at the end."""
    state = store_state(store)
    if state == "plaintext" and not encrypt_plaintext:
        raise PlaintextStoreError(
            "the store holds values written without encryption; pass --encrypt-plaintext "
            "to encrypt them under the primary key")
    cipher = RecordCipher(keys)
    report = RewrapReport()
    batch: list[Write] = []
    for key, record in store.scan(b""):
        if key == MARKER_KEY:
            continue
        report.rows += 1
        key_id = record_key_id(record)
        if key_id == keys.primary_id:
            continue
        if key_id is None and state == "plaintext":
            value = record
        else:
            value = cipher.open(key, record)  # raises for plaintext in an encrypted store
        batch.append((key, cipher.seal(key, value)))
        former = key_id or PLAINTEXT
        report.rewrapped[former] = report.rewrapped.get(former, 0) + 1
        if len(batch) >= REWRAP_BATCH_ROWS:
            store.write(batch)
            batch = []
    if state != "encrypted":
        batch.append((MARKER_KEY, MARKER_VALUE))
    store.write(batch)
    store.sync()
    return report
