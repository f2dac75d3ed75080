"""The gossip keyring: sealing, opening, rotation, its file in the data dir, the change
sent between nodes, and the datagram size budget once sealed."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import random
import stat
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from leaderless.api.messages import KeyringChange, KeyringChangeReply, KeyringRequest
from leaderless.config import load_config
from leaderless.core.codec import (
    PACKET_BYTES_MAX,
    FrameDecoder,
    decode_packet,
    encode_frame,
    encode_packet,
)
from leaderless.core.effects import SendPacket
from leaderless.core.membership import Membership
from leaderless.core.membership_config import MembershipConfig
from leaderless.core.messages import (
    Address,
    Alive,
    MemberRecord,
    MemberStatus,
    NodeMeta,
    Packet,
    Ping,
    PushPull,
    SealedPushPull,
    Update,
)
from leaderless.runtime.counters import RuntimeCounters
from leaderless.runtime.drops import Drops
from leaderless.runtime.keyring_service import (
    KEYRING_FILE,
    KeyringService,
    KeyringStartupError,
    open_sync_frame,
    sync_frame,
    write_keyring,
)
from leaderless.runtime.logs import NodeLogger
from leaderless.runtime.node import InboundFrame, Node
from leaderless.runtime.udp import UdpEndpoint
from leaderless.security.keyring import (
    NONCE_BYTES,
    SEAL_OVERHEAD_BYTES,
    SEALED_MARKER,
    Keyring,
    KeyringError,
    OpenError,
    decode_key,
    generate_key,
    is_sealed,
    key_id,
    key_id_text,
)

K1, K2, K3 = (decode_key(generate_key()) for _ in range(3))
PLAINTEXT = encode_packet(Packet("n1", [Ping(7, "n2", Address("127.0.0.1", 7000))], []))


def reason(keyring: Keyring, datagram: bytes) -> str:
    with pytest.raises(OpenError) as info:
        keyring.open(datagram)
    return info.value.reason


# -- sealing and opening -------------------------------------------------------------------


def test_seal_open_round_trip_and_envelope() -> None:
    keyring = Keyring([K1, K2])
    sealed = keyring.seal(PLAINTEXT)
    assert len(sealed) == len(PLAINTEXT) + SEAL_OVERHEAD_BYTES == len(PLAINTEXT) + 33
    assert sealed[0] == SEALED_MARKER and is_sealed(sealed)
    assert sealed[1:5].hex() == key_id_text(K1)  # sealed under the primary
    assert PLAINTEXT not in sealed
    assert keyring.open(sealed) == PLAINTEXT
    assert decode_packet(Keyring([K2, K1]).open(sealed)) == decode_packet(PLAINTEXT)
    # A fresh random nonce every time: the same packet never seals to the same bytes.
    again = keyring.seal(PLAINTEXT)
    assert again[5:5 + NONCE_BYTES] != sealed[5:5 + NONCE_BYTES] and again != sealed


def test_a_keyring_without_the_key_drops_as_unknown_key() -> None:
    assert reason(Keyring([K2, K3]), Keyring([K1]).seal(PLAINTEXT)) == "unknown_key"


def test_tampering_anywhere_fails_authentication() -> None:
    keyring = Keyring([K1])
    sealed = keyring.seal(PLAINTEXT)
    for index in (5, 5 + NONCE_BYTES, len(sealed) // 2, len(sealed) - 1):  # nonce, body, tag
        tampered = bytearray(sealed)
        tampered[index] ^= 0x01
        assert reason(keyring, bytes(tampered)) == "auth_failed", index
    # The key id is authenticated too: relabelled under another installed key, it fails.
    both = Keyring([K1, K2])
    relabelled = Keyring([K2]).seal(b"x")[:5] + sealed[5:]
    assert reason(both, relabelled) == "auth_failed"
    assert reason(keyring, sealed[:-1]) == "auth_failed"


def test_plaintext_and_truncated_datagrams_are_refused() -> None:
    keyring = Keyring([K1])
    assert not is_sealed(PLAINTEXT)  # a msgpack packet never starts with the marker
    assert reason(keyring, PLAINTEXT) == "not_sealed"
    assert reason(keyring, b"") == "not_sealed"
    assert reason(keyring, keyring.seal(b"")[:SEAL_OVERHEAD_BYTES - 1]) == "truncated"


# -- keys and rotation -----------------------------------------------------------------------


def test_keys_are_checked_with_clear_errors() -> None:
    assert len(decode_key(generate_key())) == 32
    with pytest.raises(KeyringError, match="not valid base64"):
        decode_key("not a key!")
    with pytest.raises(KeyringError, match="decodes to 16 bytes"):
        decode_key("AAAAAAAAAAAAAAAAAAAAAA==")
    with pytest.raises(KeyringError, match="listed twice"):
        Keyring([K1, K1])
    with pytest.raises(KeyringError, match="empty"):
        Keyring([])


def test_use_needs_an_installed_key_and_remove_refuses_the_primary() -> None:
    keyring = Keyring([K1])
    with pytest.raises(KeyringError, match="not installed") as info:
        keyring.use(K2)
    assert info.value.code == "not_found"
    with pytest.raises(KeyringError, match="is the primary") as info:
        keyring.remove(K1)
    assert info.value.code == "conflict"
    installed = keyring.install(K2)
    assert installed.keys == (K1, K2) and installed.install(K2) is installed  # idempotent
    assert installed.use(K2).keys == (K2, K1)
    assert installed.use(K2).remove(K1).keys == (K2,)
    assert keyring.remove(K3) is keyring  # a retried remove is harmless


def test_rotation_install_use_remove_keeps_every_datagram_decodable() -> None:
    """Three nodes rotate K1 -> K2 one node at a time, as the fan-out reaches them: at every
    intermediate state, what any node seals every other node can open."""
    nodes = [Keyring([K1]) for _ in range(3)]

    def all_pairs_open() -> None:
        for sender in nodes:
            sealed = sender.seal(PLAINTEXT)
            for receiver in nodes:
                assert receiver.open(sealed) == PLAINTEXT

    all_pairs_open()
    for step in ("install", "use", "remove"):
        for i in range(len(nodes)):
            nodes[i] = (nodes[i].install(K2) if step == "install" else
                        nodes[i].use(K2) if step == "use" else nodes[i].remove(K1))
            all_pairs_open()
    assert all(n.keys == (K2,) for n in nodes)
    # Skipping install is what breaks it, which is why `use` refuses a key not installed.
    assert reason(Keyring([K1]), Keyring([K2]).seal(PLAINTEXT)) == "unknown_key"


def test_keyring_text_format() -> None:
    text = f"# cluster keys\n\n{Keyring([K2]).to_text()}  {Keyring([K1]).to_text()}"
    keyring = Keyring.from_text(text, "keys.txt")
    assert keyring.keys == (K2, K1) and keyring.primary == K2
    assert Keyring.from_text(keyring.to_text(), "x").keys == keyring.keys
    with pytest.raises(KeyringError, match="keys.txt line 2: not valid base64"):
        Keyring.from_text(f"{generate_key()}\nno-pe\n", "keys.txt")
    with pytest.raises(KeyringError, match="keys.txt: no key found"):
        Keyring.from_text("# nothing\n", "keys.txt")


# -- the file in the data dir ----------------------------------------------------------------


def initial_file(path: Path, *keys: bytes) -> Path:
    path.write_text(Keyring(list(keys)).to_text())
    path.chmod(0o600)
    return path


def service(data_dir: Path, initial: Path | None, name: str = "n1") -> KeyringService | None:
    data_dir.mkdir(exist_ok=True)
    return KeyringService.load(name, data_dir, initial, NodeLogger(name, "keyring"))


def test_the_data_dir_copy_is_written_0600_and_wins_after_a_rotation(tmp_path: Path) -> None:
    initial = initial_file(tmp_path / "initial", K1)
    data_dir = tmp_path / "data"
    first = service(data_dir, initial)
    assert first is not None and first.keyring.keys == (K1,)
    copy = data_dir / KEYRING_FILE
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    assert first.apply("install", K2).ok and first.apply("use", K2).ok
    assert Keyring.from_text(copy.read_text(), "copy").keys == (K2, K1)
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    assert not list(data_dir.glob(".*.tmp"))  # written by rename, nothing left behind
    # Restart: the rotated copy wins over the (unchanged) initial file.
    again = service(data_dir, initial)
    assert again is not None and again.keyring.keys == (K2, K1)
    assert Keyring.from_text(initial.read_text(), "initial").keys == (K1,)


def test_refused_changes_leave_the_file_alone(tmp_path: Path) -> None:
    keys = service(tmp_path / "data", initial_file(tmp_path / "initial", K1))
    assert keys is not None
    before = (tmp_path / "data" / KEYRING_FILE).read_bytes()
    result = keys.apply("remove", K1)
    assert not result.ok and "is the primary" in result.error
    assert result.key_ids == [key_id_text(K1)]
    assert not keys.apply("use", K3).ok
    assert (tmp_path / "data" / KEYRING_FILE).read_bytes() == before


def test_no_keyring_means_plaintext_and_bad_files_stop_the_start(tmp_path: Path) -> None:
    assert service(tmp_path / "plain", None) is None
    with pytest.raises(KeyringStartupError, match="does not exist"):
        service(tmp_path / "a", tmp_path / "missing")
    loose = initial_file(tmp_path / "loose", K1)
    loose.chmod(0o644)
    with pytest.raises(KeyringStartupError, match="chmod 600"):
        service(tmp_path / "b", loose)
    broken = tmp_path / "broken"
    broken.write_text("hello\n")
    broken.chmod(0o600)
    with pytest.raises(KeyringStartupError, match="gossip.keyring line 1"):
        service(tmp_path / "c", broken)


def test_write_keyring_replaces_a_loose_mode(tmp_path: Path) -> None:
    path = tmp_path / "keyring"
    path.write_text("old")
    os.chmod(path, 0o644)
    write_keyring(path, Keyring([K1]))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Keyring.from_text(path.read_text(), "k").keys == (K1,)


# -- the cluster-wide operation over an in-memory network ------------------------------------


def cluster(tmp_path: Path, *keys: bytes) -> dict[str, KeyringService]:
    initial = initial_file(tmp_path / "initial", *keys)
    out = {}
    for name in ("n1", "n2", "n3"):
        s = service(tmp_path / name, initial, name)
        assert s is not None
        out[name] = s
    return out


def run_op(nodes: dict[str, KeyringService], asked: str, operation: Any, key: bytes | None,
           down: frozenset[str] = frozenset()) -> dict[str, tuple[bool, str]]:
    addresses = {name: Address("127.0.0.1", 7000 + i) for i, name in enumerate(nodes)}
    by_address = {a: n for n, a in addresses.items()}

    async def send(to: Address, message: Any, reply_type: Any, timeout_s: float) -> Any:
        name = by_address[to]
        if name in down:
            raise ConnectionRefusedError("connection refused")
        assert isinstance(message, KeyringChange) and reply_type is KeyringChangeReply
        return nodes[name].handle_change(message)

    peers = [(n, a) for n, a in addresses.items() if n != asked]
    text = "" if key is None else Keyring([key]).to_text().strip()
    reply = asyncio.run(nodes[asked].run(KeyringRequest(operation, text), peers, send, 1.0))
    assert reply.results[0].node == asked
    return {r.node: (r.ok, r.error) for r in reply.results}


def test_an_operation_reaches_every_node_and_reports_each(tmp_path: Path) -> None:
    nodes = cluster(tmp_path, K1)
    assert run_op(nodes, "n2", "install", K2) == {n: (True, "") for n in nodes}
    assert run_op(nodes, "n1", "use", K2) == {n: (True, "") for n in nodes}
    assert all(s.keyring.keys == (K2, K1) for s in nodes.values())
    results = run_op(nodes, "n3", "remove", K1, down=frozenset({"n1"}))
    assert results["n2"] == (True, "") and results["n3"] == (True, "")
    assert not results["n1"][0] and "unreachable" in results["n1"][1]
    assert nodes["n1"].keyring.keys == (K2, K1) and nodes["n2"].keyring.keys == (K2,)
    assert set(run_op(nodes, "n1", "list", None)) == set(nodes)


def test_a_refusal_on_the_asked_node_changes_nothing_anywhere(tmp_path: Path) -> None:
    nodes = cluster(tmp_path, K1)
    with pytest.raises(KeyringError, match="n1: .*not installed"):
        run_op(nodes, "n1", "use", K2)
    with pytest.raises(KeyringError, match="is the primary") as info:
        run_op(nodes, "n1", "remove", K1)
    assert info.value.code == "conflict"
    with pytest.raises(KeyringError, match="KEY: not valid base64"):
        asyncio.run(nodes["n1"].run(KeyringRequest("install", "no-pe"), [], _never, 1.0))
    assert all(s.keyring.keys == (K1,) for s in nodes.values())


async def _never(*_: Any) -> Any:
    raise AssertionError("nothing may be sent")


def test_a_change_sealed_under_a_foreign_key_is_refused(tmp_path: Path) -> None:
    ours = service(tmp_path / "ours", initial_file(tmp_path / "a", K1))
    assert ours is not None
    forged = KeyringChange(Keyring([K3]).seal(b"install\x00" + K3))
    reply = ours.handle_change(forged)
    assert not reply.result.ok and "cannot open" in reply.result.error
    assert ours.keyring.keys == (K1,)
    garbled = KeyringChange(Keyring([K1]).seal(b"install\x00short"))
    assert not ours.handle_change(garbled).result.ok


# -- full-state syncs (TCP push-pull) ----------------------------------------------------------

SYNC = PushPull("n1", True, False, [MemberRecord("n1", Address("10.0.0.1", 7000), 3,
                                                 MemberStatus.ALIVE, NodeMeta(zone="zone-a"))],
                0, [])


def keyed(tmp_path: Path, name: str, *keys: bytes) -> KeyringService:
    s = service(tmp_path / name, initial_file(tmp_path / f"{name}.keys", *keys), name)
    assert s is not None
    return s


def sync_refusal(keyring: KeyringService | None, frame: PushPull | SealedPushPull) -> str:
    with pytest.raises(OpenError) as info:
        open_sync_frame(keyring, frame)
    return info.value.reason


def test_a_sealed_sync_crosses_the_wire_and_opens_under_any_installed_key(
        tmp_path: Path) -> None:
    sender, receiver = keyed(tmp_path, "a", K1), keyed(tmp_path, "b", K2, K1)
    frame = sync_frame(sender, SYNC)
    assert isinstance(frame, SealedPushPull) and frame.sealed[1:5] == key_id(K1)
    assert b"zone-a" not in frame.sealed  # the view is not readable on the wire
    wire = encode_frame(frame)
    assert len(wire) - len(encode_frame(SYNC)) <= SEAL_OVERHEAD_BYTES + 8  # 33 + framing
    decoder: FrameDecoder[Any] = FrameDecoder(InboundFrame)
    [decoded] = decoder.feed(wire)
    assert open_sync_frame(receiver, decoded) == SYNC
    # Without a keyring a node syncs in plaintext, as before.
    assert sync_frame(None, SYNC) is SYNC and open_sync_frame(None, SYNC) is SYNC


def test_a_sync_under_a_wrong_key_or_tampered_or_in_plaintext_is_refused(
        tmp_path: Path) -> None:
    ours, theirs = keyed(tmp_path, "ours", K1), keyed(tmp_path, "theirs", K3)
    assert sync_refusal(ours, sync_frame(theirs, SYNC)) == "unknown_key"
    sealed = sync_frame(ours, SYNC)
    assert isinstance(sealed, SealedPushPull)
    flipped = sealed.sealed[:-1] + bytes([sealed.sealed[-1] ^ 1])
    assert sync_refusal(ours, SealedPushPull(flipped)) == "auth_failed"
    assert sync_refusal(ours, SYNC) == "not_sealed"
    assert sync_refusal(None, sealed) == "sealed"
    assert sync_refusal(ours, SealedPushPull(Keyring([K1]).seal(b"\x93\x01"))) == "malformed"


async def started(tmp_path: Path, name: str, keys: tuple[bytes, ...],
                  seed: Address | None = None) -> Node:
    raw: dict[str, Any] = {"name": name, "bind": "127.0.0.1:0", "storage": "memory",
                           "data_dir": str(tmp_path / name)}
    if keys:
        raw["gossip.keyring"] = str(initial_file(tmp_path / f"{name}.keys", *keys))
    if seed is not None:
        raw["join"] = [str(seed)]
        raw["ring.bootstrap"] = False  # first members of a new cluster
    node = Node(load_config(raw, env={}))
    await node.start()
    return node


async def eventually(predicate: Any, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while not predicate():
        assert loop.time() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.02)


def test_only_holders_of_a_cluster_key_join_through_a_seed(tmp_path: Path) -> None:
    join_failures: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage() == "join_push_pull_failed":
                join_failures.append(record)

    keep = Keep(logging.WARNING)
    node_log = logging.getLogger("leaderless.node")
    node_log.addHandler(keep)

    async def main() -> None:
        seed = await started(tmp_path, "seed", (K1,))
        plain_seed = await started(tmp_path, "plain-seed", ())
        friend = await started(tmp_path, "friend", (K1, K2), seed.address)
        outsiders = [await started(tmp_path, "intruder", (K3,), seed.address),
                     await started(tmp_path, "plain", (), seed.address),
                     await started(tmp_path, "keyed", (K1,), plain_seed.address)]
        try:
            await asyncio.wait_for(friend.joined.wait(), 20)
            drops = seed.counters.dropped_malformed_total
            await eventually(lambda: drops["sync_unknown_key"] > 0
                             and drops["sync_not_sealed"] > 0
                             and plain_seed.counters.dropped_malformed_total["sync_sealed"] > 0,
                             "the seeds refuse the outsiders' syncs")
            # A forged sync under the cluster's key id is closed unanswered.
            reader, writer = await asyncio.open_connection(seed.address.host,
                                                           seed.address.port)
            forged = bytes([SEALED_MARKER]) + key_id(K1) + bytes(NONCE_BYTES + 40)
            writer.write(encode_frame(SealedPushPull(forged)))
            assert await asyncio.wait_for(reader.read(), 10) == b""
            writer.close()
            await eventually(lambda: drops["sync_auth_failed"] == 1, "the forgery is counted")
            assert {m.name for m in seed.members()} == {"seed", "friend"}
            assert {m.name for m in plain_seed.members()} == {"plain-seed"}
            assert not any(o.joined.is_set() for o in outsiders)
        finally:
            for node in [*outsiders, friend, plain_seed, seed]:
                await node.stop()

    try:
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        node_log.removeHandler(keep)
    # The joiner says why: the seed closed the connection, and what to check.
    failed = {r.node for r in join_failures}  # type: ignore[attr-defined]
    assert {"intruder", "plain", "keyed"} <= failed and "friend" not in failed
    hints = [r.fields["hint"] for r in join_failures]  # type: ignore[attr-defined]
    assert all("--gossip-keyring" in h for h in hints)


# -- the datagram budget ---------------------------------------------------------------------


def gossip_datagrams(packet_bytes_max: int, overhead: int) -> list[bytes]:
    """Plaintext gossip datagrams of a node with far more pending updates than fit."""
    config = MembershipConfig(packet_bytes_max=packet_bytes_max)
    me = Membership("me", Address("10.0.0.1", 7000), NodeMeta(), config, random.Random(3),
                    0.0, datagram_overhead_bytes=overhead)
    # Updates of this size pack the three budgets tight (the last one fills all but a few
    # bytes); a byte more per update (NodeMeta gained ``health``) leaves 65 of 1,000 free.
    meta = NodeMeta(zone="zone-a", tags={"rack": "r" * 39, "role": "storage"})
    updates: list[Update] = [Alive(f"node-{i:03d}", 1, Address(f"10.0.1.{i}", 7000), meta)
                             for i in range(1, 120)]
    for start in range(0, len(updates), 8):
        me.on_packet(0.0, Packet("node-001", [], updates[start:start + 8]))
    datagrams: list[bytes] = []
    now = 0.0
    for _ in range(10):
        now += config.gossip_interval_s
        datagrams += [encode_packet(e.packet) for e in me.on_tick(now)
                      if isinstance(e, SendPacket)]
    assert datagrams
    return datagrams


@pytest.mark.parametrize("packet_bytes_max", [600, 1000, PACKET_BYTES_MAX])
def test_sealed_gossip_fits_the_datagram_limit(packet_bytes_max: int) -> None:
    keyring = Keyring([K1])
    sealed = [keyring.seal(d) for d in gossip_datagrams(packet_bytes_max, SEAL_OVERHEAD_BYTES)]
    assert max(len(s) for s in sealed) <= packet_bytes_max
    # The budget binds: the fullest datagram uses all but a few bytes of it...
    assert max(len(s) for s in sealed) > packet_bytes_max - 150
    # ...so without taking the overhead off, sealing would have overflowed the limit.
    plain = gossip_datagrams(packet_bytes_max, 0)
    assert max(len(d) for d in plain) + SEAL_OVERHEAD_BYTES > packet_bytes_max


# -- the UDP endpoint on real loopback sockets -----------------------------------------------


def test_udp_endpoints_seal_open_and_count_drops_by_reason() -> None:
    async def main() -> dict[str, tuple[list[Packet], RuntimeCounters]]:
        loop = asyncio.get_running_loop()
        sealers: dict[str, Keyring | None] = {"k1": Keyring([K1]), "k1k2": Keyring([K2, K1]),
                                              "k3": Keyring([K3]), "plain": None}
        out: dict[str, tuple[list[Packet], RuntimeCounters]] = {}
        endpoints: dict[str, tuple[UdpEndpoint, Address]] = {}
        for name, keyring in sealers.items():
            received: list[Packet] = []
            counters = RuntimeCounters()
            endpoint = UdpEndpoint(received.append, Drops(counters, NodeLogger(name, "t")),
                                   keyring)
            transport, _ = await loop.create_datagram_endpoint(
                functools.partial(lambda e: e, endpoint), local_addr=("127.0.0.1", 0))
            port = transport.get_extra_info("sockname")[1]
            endpoints[name] = (endpoint, Address("127.0.0.1", port))
            out[name] = (received, counters)
        packet = decode_packet(PLAINTEXT)
        for sender in sealers:
            for receiver in sealers:
                if sender != receiver:
                    endpoints[sender][0].send(endpoints[receiver][1], packet)
        deadline = loop.time() + 10
        while loop.time() < deadline and sum(
                len(r) + sum(c.dropped_malformed_total.values()) for r, c in out.values()) < 12:
            await asyncio.sleep(0.01)
        for endpoint, _ in endpoints.values():
            endpoint.close()
        return out

    out = asyncio.run(main())
    # k1 and k1k2 share K1: k1k2 seals with K2, which k1 lacks.
    assert len(out["k1k2"][0]) == 1 and len(out["k1"][0]) == 0
    assert out["k1"][1].dropped_malformed_total == {"gossip_unknown_key": 2,
                                                    "gossip_not_sealed": 1}
    assert out["k3"][1].dropped_malformed_total == {"gossip_unknown_key": 2,
                                                    "gossip_not_sealed": 1}
    assert out["plain"][1].dropped_malformed_total == {"gossip_sealed": 3}
    assert out["k1k2"][0] == [decode_packet(PLAINTEXT)]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=PACKET_BYTES_MAX + 64), st.booleans())
def test_any_bytes_either_open_or_are_refused_with_a_reason(data: bytes, keyed: bool) -> None:
    """Hostile input: random bytes, or random bytes behind a real key id, never crash."""
    keyring = Keyring([K1])
    if keyed:
        data = bytes([SEALED_MARKER]) + bytes.fromhex(key_id_text(K1)) + data
    try:
        keyring.open(data)
    except OpenError as exc:
        assert exc.reason in ("not_sealed", "truncated", "unknown_key", "auth_failed")
        assert exc.reason != "unknown_key" or not keyed
