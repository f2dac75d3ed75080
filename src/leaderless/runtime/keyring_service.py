"""A node's gossip keyring at run time: loaded at start, kept in the data dir, rotated live.

The keyring a node starts with is the copy in its data dir (``DATA_DIR/keyring``) when there
is one, else the initial file (``[gossip] keyring`` / ``--gossip-keyring``), which is then
copied into the data dir. So a rotation, which rewrites the data-dir copy, survives restarts
without anyone editing the initial file. The copy is written durably (temp file, fsync,
rename, fsync of the directory) with mode 0600.

A keyring operation from a client (``api.messages.KeyringRequest``) is applied here first,
then sent to every other alive member as a ``KeyringChange`` sealed under this node's
primary key, and the reply lists every node's result. The UDP endpoint reads the current
keyring on every datagram (``seal`` / ``open``), so a change applies to the next datagram.

The full-state syncs over TCP (``PushPull``) are sealed the same way (``sync_frame`` /
``open_sync_frame``), as memberlist seals its push-pull: without that, a node holding no
current key would still join through a seed's sync and reappear in every view between the
probes it cannot answer.
"""

from __future__ import annotations

import asyncio
import stat
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec

from leaderless.api.messages import (
    KeyringChange,
    KeyringChangeReply,
    KeyringNodeResult,
    KeyringReply,
    KeyringRequest,
)
from leaderless.core.messages import Address, PushPull, SealedPushPull
from leaderless.durable_files import write_atomically
from leaderless.runtime.errors import StartupError
from leaderless.runtime.logs import NodeLogger
from leaderless.security.keyring import (
    KEYRING_TEXT_BYTES_MAX,
    Keyring,
    KeyringError,
    OpenError,
    decode_key,
    key_id_text,
)

KEYRING_FILE = "keyring"
"""The node's current keyring, in its data dir."""
KEYRING_FILE_MODE = 0o600
FORBIDDEN_MODE_BITS = stat.S_IRWXO
"""An initial keyring file any user of the machine may read is refused: ``chmod 600``."""
CHANGE_OPERATIONS = ("list", "install", "use", "remove")

SyncFrame = PushPull | SealedPushPull
"""A full-state sync as it travels: plain without a keyring, sealed with one."""

PeerRequest = Callable[[Address, Any, Any, float], Awaitable[Any]]
"""``Transport.request``: send one frame to a peer, return its reply (or raise)."""


class KeyringStartupError(StartupError):
    """The keyring file is missing, unreadable, unsafe or malformed."""


class KeyringService:
    """The current keyring of one node, its file, and the cluster-wide operations."""

    def __init__(self, node_name: str, keyring: Keyring, path: Path, log: NodeLogger) -> None:
        self._node_name = node_name
        self._keyring = keyring
        self._path = path
        self._log = log
        self._changing = asyncio.Lock()

    @classmethod
    def load(cls, node_name: str, data_dir: Path, initial: Path | None,
             log: NodeLogger) -> KeyringService | None:
        """The node's keyring: the data-dir copy if it exists, else ``initial`` (copied
        into the data dir), else None (gossip in plaintext). Raises KeyringStartupError."""
        path = data_dir / KEYRING_FILE
        source = path if path.exists() else initial
        if source is None:
            return None
        keyring = _read_keyring(source, "gossip.keyring" if source == initial else
                                f"the node's keyring {str(path)!r}")
        service = cls(node_name, keyring, path, log)
        if source != path:
            try:
                write_keyring(path, keyring)
            except OSError as exc:
                raise KeyringStartupError(f"data_dir: cannot write {str(path)!r}: "
                                          f"{exc.strerror or exc}; check --data-dir") from None
        elif initial is not None:
            log.info("keyring_from_data_dir", path=str(path), initial=str(initial),
                     note="the data-dir copy (kept by rotations) wins over gossip.keyring")
        log.info("keyring_loaded", keys=len(keyring.keys), primary=keyring.key_ids()[0])
        return service

    @property
    def keyring(self) -> Keyring:
        return self._keyring

    # -- the UDP endpoint's side (runtime.udp.GossipSealer) ------------------------------

    def seal(self, plaintext: bytes) -> bytes:
        return self._keyring.seal(plaintext)

    def open(self, datagram: bytes) -> bytes:
        """Raises ``OpenError`` with the drop reason."""
        return self._keyring.open(datagram)

    # -- the node's full-state syncs (TCP push-pull) ------------------------------------

    def seal_sync(self, sync: PushPull) -> SealedPushPull:
        return SealedPushPull(self._keyring.seal(_sync_encoder.encode(sync)))

    def open_sync(self, frame: SealedPushPull) -> PushPull:
        """The push-pull inside ``frame``, opened with any installed key; raises OpenError
        with the drop reason (``malformed``: it opened, but holds no push-pull)."""
        try:
            return _sync_decoder.decode(self._keyring.open(frame.sealed))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise OpenError("malformed", f"a sealed sync that holds no push-pull: {exc}"
                            ) from None

    # -- local changes -------------------------------------------------------------------

    def apply(self, operation: str, key: bytes | None) -> KeyringNodeResult:
        """Apply one operation to this node's keyring (durably first); this node's result,
        with ``ok`` False and the reason if it refused."""
        try:
            keyring = self._changed(operation, key)
        except KeyringError as exc:
            return KeyringNodeResult(self._node_name, False, str(exc), self._keyring.key_ids())
        if keyring is not self._keyring:
            try:
                write_keyring(self._path, keyring)
            except OSError as exc:
                error = f"cannot write {str(self._path)!r}: {exc.strerror or exc}"
                self._log.error("keyring_write_failed", error=error)
                return KeyringNodeResult(self._node_name, False, error,
                                         self._keyring.key_ids())
            self._keyring = keyring
            self._log.info("keyring_changed", operation=operation,
                           key=key_id_text(key) if key else None,
                           keys=keyring.key_ids())
        return KeyringNodeResult(self._node_name, True, "", self._keyring.key_ids())

    def _changed(self, operation: str, key: bytes | None) -> Keyring:
        keyring = self._keyring
        if operation == "list":
            return keyring
        if key is None:
            raise KeyringError(f"{operation} needs a key")
        if operation == "install":
            return keyring.install(key)
        if operation == "use":
            return keyring.use(key)
        if operation == "remove":
            return keyring.remove(key)
        raise KeyringError(f"unknown keyring operation {operation!r}; "
                           f"use one of {', '.join(CHANGE_OPERATIONS)}")

    def handle_change(self, change: KeyringChange) -> KeyringChangeReply:
        """A peer sent on an operation: open it with our keyring, apply it, answer."""
        try:
            operation, key = _unpack_change(self._keyring.open(change.sealed))
        except OpenError as exc:
            self._log.warning("keyring_change_refused", reason=exc.reason, error=str(exc))
            return KeyringChangeReply(KeyringNodeResult(
                self._node_name, False, f"refused a change it cannot open: {exc}"))
        except KeyringError as exc:
            return KeyringChangeReply(KeyringNodeResult(self._node_name, False, str(exc)))
        return KeyringChangeReply(self.apply(operation, key))

    # -- cluster-wide --------------------------------------------------------------------

    async def run(self, request: KeyringRequest, peers: Sequence[tuple[str, Address]],
                  send: PeerRequest, timeout_s: float) -> KeyringReply:
        """Apply ``request`` here, then on every peer (name, address) at once. Raises
        KeyringError (nothing changed anywhere) if the key is malformed or this node
        refuses; otherwise every node's result, this node's first."""
        key = None if request.operation == "list" else decode_key(request.key, "KEY")
        async with self._changing:  # one operation at a time, in the order they came
            local = self.apply(request.operation, key)
            if not local.ok:
                raise KeyringError(f"{self._node_name}: {local.error}",
                                   _refusal_code(request.operation))
            # Sealed after the local change: after `use`, peers that already have the new
            # primary (install came first) can open it; the ones that cannot would not be
            # able to open our gossip either, and say so in their result.
            change = KeyringChange(self._keyring.seal(_pack_change(request.operation, key)))
            results = await asyncio.gather(*(
                self._send_change(name, address, change, send, timeout_s)
                for name, address in peers))
        return KeyringReply(request.operation, [local, *results])

    async def _send_change(self, name: str, address: Address, change: KeyringChange,
                           send: PeerRequest, timeout_s: float) -> KeyringNodeResult:
        try:
            reply = await send(address, change, KeyringChangeReply, timeout_s)
        except (OSError, TimeoutError, ConnectionError, ValueError) as exc:
            return KeyringNodeResult(name, False, f"unreachable at {address}: "
                                                  f"{exc or type(exc).__name__}")
        if not isinstance(reply, KeyringChangeReply):
            return KeyringNodeResult(name, False, f"answered {type(reply).__name__}")
        # The peer names itself; we report under the member name we asked.
        result: KeyringNodeResult = reply.result
        return KeyringNodeResult(name, result.ok, result.error, result.key_ids)


_sync_encoder = msgspec.msgpack.Encoder()
_sync_decoder = msgspec.msgpack.Decoder(PushPull)


def sync_frame(keyring: KeyringService | None, sync: PushPull) -> SyncFrame:
    """How a node sends a push-pull (request or reply): sealed under its primary key when
    it has a keyring, plain otherwise."""
    return sync if keyring is None else keyring.seal_sync(sync)


def open_sync_frame(keyring: KeyringService | None, frame: SyncFrame) -> PushPull:
    """The push-pull a peer sent, if this node may accept it: sealed under one of its keys
    when it has a keyring, plain when it has none. Raises OpenError with the reason, which
    the node counts as the drop kind ``sync_<reason>``."""
    if isinstance(frame, SealedPushPull):
        if keyring is None:
            raise OpenError("sealed", "a sealed sync, but this node has no gossip keyring "
                            "(start it with the cluster's --gossip-keyring)")
        return keyring.open_sync(frame)
    if keyring is not None:
        raise OpenError("not_sealed", "a plaintext sync, but this node's gossip is "
                        "encrypted (is the sender started without --gossip-keyring?)")
    return frame


def _refusal_code(operation: str) -> str:
    return {"use": "not_found", "remove": "conflict"}.get(operation, "bad_request")


def _pack_change(operation: str, key: bytes | None) -> bytes:
    return operation.encode() + b"\x00" + (key or b"")


def _unpack_change(payload: bytes) -> tuple[str, bytes | None]:
    name, _, key = payload.partition(b"\x00")
    operation = name.decode("ascii", errors="replace")
    if operation not in CHANGE_OPERATIONS:
        raise KeyringError(f"unknown keyring operation {operation!r}")
    if operation == "list":
        return operation, None
    try:
        return operation, Keyring([key]).primary
    except KeyringError as exc:
        raise KeyringError(f"a {operation} change carries a bad key: {exc}") from None


def _read_keyring(path: Path, setting: str) -> Keyring:
    try:
        mode = path.stat().st_mode
        if mode & FORBIDDEN_MODE_BITS:
            raise KeyringStartupError(
                f"{setting}: {str(path)!r} may be read by any user of this machine "
                f"(mode {stat.S_IMODE(mode):04o}); run `chmod 600 {path}`")
        with path.open("rb") as file:
            data = file.read(KEYRING_TEXT_BYTES_MAX + 1)
    except FileNotFoundError:
        raise KeyringStartupError(f"{setting}: {str(path)!r} does not exist; create it with "
                                  "`leaderless keyring generate > FILE`") from None
    except OSError as exc:
        raise KeyringStartupError(f"{setting}: cannot read {str(path)!r}: "
                                  f"{exc.strerror or exc}") from None
    try:
        return Keyring.from_text(data.decode("utf-8", errors="replace"), setting)
    except KeyringError as exc:
        raise KeyringStartupError(str(exc)) from None


def write_keyring(path: Path, keyring: Keyring) -> None:
    """Replace ``path`` with ``keyring`` durably and atomically, readable by its owner
    only. Raises OSError."""
    write_atomically(path, keyring.to_text().encode("ascii"), KEYRING_FILE_MODE)
