"""The gossip keyring: AES-256-GCM keys that seal every UDP datagram between nodes, and
the full-state syncs (push-pull) they exchange over TCP.

Like Serf's and memberlist's keyring, a cluster holds several keys at once and one of them is
the *primary*: a node seals what it sends with its primary and opens what it receives with
whichever installed key the datagram names. That is what lets keys rotate without downtime:
install the new key everywhere (everyone can now open it), make it primary everywhere
(everyone now seals with it), then remove the old one.

A sealed datagram::

    0xC1 | key id (4 bytes) | nonce (12 random bytes) | AES-GCM ciphertext + 16-byte tag

The first byte is both the marker and the format version: 0xC1 is the one byte msgpack never
uses, so no plaintext packet can start with it and a receiver tells sealed from plaintext
without trying to decode. The key id is a short digest of the key, so the receiver picks the
key at once instead of trying each. The marker and key id are authenticated as associated
data. Keys travel as standard base64 text (``leaderless keyring generate``); a keyring file
holds one per line, the first being the primary.

This module is pure (no files, no sockets); ``runtime.keyring_service`` persists it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32
"""AES-256 only, so no cluster ends up on a weaker key by accident."""
KEY_ID_BYTES = 4
"""Enough to tell apart the handful of keys a keyring holds (a collision between two keys
of one keyring is refused at install); short, because every datagram carries it."""
NONCE_BYTES = 12
"""GCM's native 96-bit nonce, drawn at random for every datagram."""
TAG_BYTES = 16
"""GCM's full-length authentication tag."""
SEALED_MARKER = 0xC1
"""Version 1 of the sealed format. 0xC1 is never used by msgpack, so a plaintext packet
(a msgpack array) can never be mistaken for a sealed one, nor the reverse."""
HEADER_BYTES = 1 + KEY_ID_BYTES
SEAL_OVERHEAD_BYTES = HEADER_BYTES + NONCE_BYTES + TAG_BYTES
"""Bytes sealing adds to a datagram (33): subtracted from the packet budget when a keyring
is set, so a sealed datagram still fits ``packet_bytes_max``. A sealed sync grows by the
same 33 bytes (and a few of framing); nothing sizes a sync in bytes (its member and event
counts bound it), so there is no sync budget to shrink."""
KEYS_MAX = 16
"""Keys installed at once. A rotation needs two; a long list means old keys never leave."""
KEY_TEXT_BYTES_MAX = 64
"""Base64 of 32 bytes is 44 characters; anything much longer is not a key."""
KEYRING_TEXT_BYTES_MAX = KEYS_MAX * (KEY_TEXT_BYTES_MAX + 2) + 4096
"""A keyring file: the keys plus room for comments."""
_KEY_ID_CONTEXT = b"leaderless gossip key id\x00"


class KeyringError(ValueError):
    """A key or keyring is malformed, or an operation on it is refused. ``code`` is the
    API error code (``bad_request``, ``not_found``, ``conflict``); the message says what
    to do."""

    def __init__(self, message: str, code: str = "bad_request") -> None:
        super().__init__(message)
        self.code = code


class OpenError(ValueError):
    """A datagram or sync that this keyring cannot open; ``reason`` is the drop kind:
    ``not_sealed`` (plaintext while a keyring is set), ``truncated``, ``unknown_key``
    (sealed under a key not installed here) or ``auth_failed`` (tampered or forged); for a
    sync also ``sealed`` (this node has no keyring) and ``malformed``
    (``runtime.keyring_service.open_sync_frame``)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def generate_key() -> str:
    """A new random key as base64 text (what ``leaderless keyring generate`` prints)."""
    return encode_key(AESGCM.generate_key(bit_length=KEY_BYTES * 8))


def encode_key(key: bytes) -> str:
    return base64.b64encode(key).decode("ascii")


def decode_key(text: str, where: str = "key") -> bytes:
    """The 32 bytes of a base64 key; KeyringError naming ``where`` if it is not one."""
    text = text.strip()
    if len(text) > KEY_TEXT_BYTES_MAX:
        raise KeyringError(f"{where}: not a key ({len(text)} characters; a key is 44 "
                           "characters of base64); make one with `leaderless keyring generate`")
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise KeyringError(f"{where}: not valid base64; make a key with "
                           "`leaderless keyring generate`") from None
    if len(key) != KEY_BYTES:
        raise KeyringError(f"{where}: decodes to {len(key)} bytes; a gossip key is "
                           f"{KEY_BYTES} bytes (AES-256); make one with "
                           "`leaderless keyring generate`")
    return key


def key_id(key: bytes) -> bytes:
    """The short digest that names ``key`` in every datagram it seals. A digest, not a
    prefix of the key, so it reveals nothing about the key."""
    return hashlib.sha256(_KEY_ID_CONTEXT + key).digest()[:KEY_ID_BYTES]


def key_id_text(key: bytes) -> str:
    """How people see a key: its id in hex (the key itself is never shown)."""
    return key_id(key).hex()


def is_sealed(datagram: bytes) -> bool:
    return datagram[:1] == bytes([SEALED_MARKER])


class Keyring:
    """An immutable set of keys with one primary; changes return a new keyring."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        """``keys[0]`` is the primary. Raises KeyringError on an empty, oversized or
        duplicated list, or a key of the wrong size."""
        if not keys:
            raise KeyringError("the keyring is empty; it needs at least one key "
                               "(`leaderless keyring generate`)")
        if len(keys) > KEYS_MAX:
            raise KeyringError(f"the keyring holds {len(keys)} keys; at most {KEYS_MAX} "
                               "(remove retired keys with `leaderless keyring remove`)")
        ciphers: dict[bytes, AESGCM] = {}
        for key in keys:
            if len(key) != KEY_BYTES:
                raise KeyringError(f"a gossip key is {KEY_BYTES} bytes, not {len(key)}")
            kid = key_id(key)
            if kid in ciphers:
                raise KeyringError(f"key {kid.hex()} is listed twice (or two keys share "
                                   "an id: generate another key)", "conflict")
            ciphers[kid] = AESGCM(key)
        self.keys: tuple[bytes, ...] = tuple(keys)
        self._ciphers = ciphers
        self._primary_header = bytes([SEALED_MARKER]) + key_id(keys[0])

    @property
    def primary(self) -> bytes:
        return self.keys[0]

    def key_ids(self) -> list[str]:
        """Every key's id in hex, the primary first."""
        return [key_id_text(k) for k in self.keys]

    def has(self, key: bytes) -> bool:
        return key in self.keys

    # -- rotation ------------------------------------------------------------------------

    def install(self, key: bytes) -> Keyring:
        """The keyring with ``key`` added (not primary). Installing a key already here is
        a no-op, so a retried rotation step is harmless."""
        if key in self.keys:
            return self
        return Keyring([*self.keys, key])

    def use(self, key: bytes) -> Keyring:
        """The keyring with ``key`` as primary; it must be installed first, so that every
        node can already open what this node is about to seal with it."""
        if key not in self.keys:
            raise KeyringError(f"key {key_id_text(key)} is not installed; run `leaderless "
                               "keyring install KEY` first", "not_found")
        return Keyring([key, *(k for k in self.keys if k != key)])

    def remove(self, key: bytes) -> Keyring:
        """The keyring without ``key``. Refuses the primary (this node seals with it);
        removing a key that is not here is a no-op, so a retried step is harmless."""
        if key == self.primary:
            raise KeyringError(f"key {key_id_text(key)} is the primary; make another key "
                               "primary with `leaderless keyring use KEY` first", "conflict")
        if key not in self.keys:
            return self
        return Keyring([k for k in self.keys if k != key])

    # -- sealing -------------------------------------------------------------------------

    def seal(self, plaintext: bytes) -> bytes:
        """``plaintext`` encrypted and authenticated under the primary key."""
        header = self._primary_header
        nonce = os.urandom(NONCE_BYTES)
        cipher = self._ciphers[header[1:]]
        return header + nonce + cipher.encrypt(nonce, plaintext, header)

    def open(self, datagram: bytes) -> bytes:
        """The plaintext of a sealed datagram; raises OpenError with the drop reason."""
        if not is_sealed(datagram):
            raise OpenError("not_sealed", "a plaintext datagram, but this node's gossip is "
                            "encrypted (is the sender started without --gossip-keyring?)")
        if len(datagram) < SEAL_OVERHEAD_BYTES:
            raise OpenError("truncated", f"a sealed datagram of {len(datagram)} bytes is "
                            f"shorter than the {SEAL_OVERHEAD_BYTES} bytes of its envelope")
        header = datagram[:HEADER_BYTES]
        cipher = self._ciphers.get(header[1:])
        if cipher is None:
            raise OpenError("unknown_key", f"sealed under key {header[1:].hex()}, which is "
                            "not installed here (a node of another cluster, or a key not "
                            "yet installed with `leaderless keyring install`)")
        nonce = datagram[HEADER_BYTES:HEADER_BYTES + NONCE_BYTES]
        try:
            return cipher.decrypt(nonce, datagram[HEADER_BYTES + NONCE_BYTES:], header)
        except InvalidTag:
            raise OpenError("auth_failed", f"a datagram under key {header[1:].hex()} failed "
                            "authentication (corrupted or forged)") from None

    # -- text form -----------------------------------------------------------------------

    def to_text(self) -> str:
        """The keyring file format: one base64 key per line, the primary first."""
        return "".join(f"{encode_key(k)}\n" for k in self.keys)

    @classmethod
    def from_text(cls, text: str, source: str) -> Keyring:
        """Parse a keyring file (blank lines and ``#`` comments ignored); errors name
        ``source`` and the line."""
        if len(text) > KEYRING_TEXT_BYTES_MAX:
            raise KeyringError(f"{source}: {len(text)} bytes is too large for a keyring "
                               f"(at most {KEYS_MAX} keys, one per line)")
        keys: list[bytes] = []
        for number, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            keys.append(decode_key(line, f"{source} line {number}"))
        if not keys:
            raise KeyringError(f"{source}: no key found; put one base64 key per line "
                               "(`leaderless keyring generate`), the primary first")
        try:
            return cls(keys)
        except KeyringError as exc:
            raise KeyringError(f"{source}: {exc}", exc.code) from None
