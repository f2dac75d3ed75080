"""Hostile input: whatever bytes arrive, only MalformedInput escapes the codec, and a live
node drops garbage (counting it) and keeps serving."""

from __future__ import annotations

import asyncio
import socket
import struct
from pathlib import Path
from typing import Any

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from leaderless.api.client import Client
from leaderless.config import load_config
from leaderless.core.codec import (
    FRAME_BYTES_MAX,
    PACKET_BYTES_MAX,
    FrameDecoder,
    MalformedInput,
    decode_packet,
    encode_frame,
    encode_packet,
)
from leaderless.core.messages import (
    Ack,
    Address,
    Alive,
    MemberRecord,
    MemberStatus,
    NodeMeta,
    Packet,
    Ping,
    PushPull,
    Suspect,
    UserEvent,
)
from leaderless.runtime.node import InboundFrame, Node

ADDRESS = Address("127.0.0.1", 7946)
SAMPLE_PACKET = Packet(
    "node-a",
    [Ping(7, "node-b", ADDRESS), Ack(3)],
    [Alive("node-c", 4, ADDRESS, NodeMeta(zone="z1", tags={"k": "v"})),
     Suspect("node-d", 1, "node-a"), UserEvent("node-a", 0, 9, "deploy", b"\x00\xffpayload")],
)
SAMPLE_PUSH_PULL = PushPull(
    "node-a", True, False,
    [MemberRecord("node-a", ADDRESS, 2, MemberStatus.ALIVE, NodeMeta())], 5, [])

# Every property below runs with settings(deadline=None): CI machines are small and busy,
# and these tests check behaviour, not speed.
msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=40) | st.binary(max_size=40),
    lambda children: st.lists(children, max_size=6)
    | st.dictionaries(st.text(max_size=8), children, max_size=6),
    max_leaves=30,
)


def decode_or_malformed(data: bytes) -> Packet | None:
    try:
        return decode_packet(data)
    except MalformedInput:
        return None


def feed_or_malformed(decoder: FrameDecoder[Any], chunks: list[bytes]) -> list[Any] | None:
    out: list[Any] = []
    try:
        for chunk in chunks:
            out += decoder.feed(chunk)
    except MalformedInput:
        return None
    return out


@settings(deadline=None)
@given(st.binary(max_size=PACKET_BYTES_MAX + 100))
def test_random_datagrams_only_raise_malformed(data: bytes) -> None:
    decode_or_malformed(data)


@settings(deadline=None)
@given(msgpack_values)
def test_wrong_types_only_raise_malformed(value: Any) -> None:
    decode_or_malformed(msgspec.msgpack.encode(value))


@settings(deadline=None)
@given(st.integers(0, len(encode_packet(SAMPLE_PACKET)) - 1))
def test_truncated_packets_are_malformed(cut: int) -> None:
    assert decode_or_malformed(encode_packet(SAMPLE_PACKET)[:cut]) is None


@settings(deadline=None)
@given(st.integers(0, len(encode_packet(SAMPLE_PACKET)) - 1), st.integers(0, 255))
def test_corrupted_packets_only_raise_malformed(index: int, byte: int) -> None:
    data = bytearray(encode_packet(SAMPLE_PACKET))
    data[index] = byte
    decode_or_malformed(bytes(data))


INVALID_UTF8_PACKET = b"\x93\xa1\x80\x90\x90"
"""A Packet whose sender name is the one byte 0x80: valid msgpack, invalid UTF-8."""


def test_invalid_utf8_is_malformed() -> None:
    assert decode_or_malformed(INVALID_UTF8_PACKET) is None
    frame = struct.pack(">I", len(INVALID_UTF8_PACKET)) + INVALID_UTF8_PACKET
    assert feed_or_malformed(FrameDecoder(Packet), [frame]) is None


def test_oversized_datagram_is_malformed() -> None:
    assert decode_or_malformed(b"\x90" * (PACKET_BYTES_MAX + 1)) is None


def test_valid_packet_round_trips() -> None:
    assert decode_packet(encode_packet(SAMPLE_PACKET)) == SAMPLE_PACKET


@settings(deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=20))
def test_random_stream_only_raises_malformed(chunks: list[bytes]) -> None:
    feed_or_malformed(FrameDecoder(InboundFrame), chunks)


@settings(deadline=None)
@given(msgpack_values)
def test_frame_of_wrong_type_only_raises_malformed(value: Any) -> None:
    body = msgspec.msgpack.encode(value)
    feed_or_malformed(FrameDecoder(InboundFrame), [struct.pack(">I", len(body)) + body])


@settings(deadline=None)
@given(st.integers(FRAME_BYTES_MAX + 1, 2**32 - 1))
def test_oversized_frame_rejected_from_its_header(length: int) -> None:
    decoder: FrameDecoder[Any] = FrameDecoder(InboundFrame)
    assert feed_or_malformed(decoder, [struct.pack(">I", length) + b"\x00" * 10]) is None
    assert decoder.buffered_bytes <= 14  # nothing like `length` was buffered


@settings(deadline=None)
@given(st.data())
def test_truncated_and_split_frames(data: st.DataObject) -> None:
    stream = encode_frame(SAMPLE_PUSH_PULL) * 2
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    assert feed_or_malformed(FrameDecoder(InboundFrame), chunks) == [SAMPLE_PUSH_PULL] * 2
    end = data.draw(st.integers(0, len(stream) - 1))
    decoder: FrameDecoder[Any] = FrameDecoder(InboundFrame)
    got = feed_or_malformed(decoder, [stream[:end]])
    assert got is not None and len(got) < 2  # a truncated frame waits for the rest


# -- a live node ----------------------------------------------------------------------------


async def _read_until_closed(reader: asyncio.StreamReader) -> bytes:
    data = b""
    while chunk := await reader.read(4096):
        data += chunk
    return data


async def _garbage_against_live_node(tmp_path: Path) -> None:
    config = load_config({"name": "target", "bind": "127.0.0.1:0",
                          "data_dir": str(tmp_path / "target")}, env={})
    node = Node(config)
    await node.start()
    try:
        port = node.address.port
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for datagram in [b"", b"\xff" * 50, INVALID_UTF8_PACKET, b"\x93\x01\x02",
                             msgspec.msgpack.encode({"a": 1}), encode_packet(SAMPLE_PACKET)[:-3],
                             b"\x90" * 2000]:
                sock.sendto(datagram, ("127.0.0.1", port))
        # A PushPull whose sender name is invalid UTF-8.
        bad_utf8_body = b"\x97\x14\xa1\x80\xc2\xc2\x90\x00\x90"
        bad_utf8_frame = struct.pack(">I", len(bad_utf8_body)) + bad_utf8_body
        for garbage in [b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1", b"\xff\xff\xff\xff",
                        bad_utf8_frame,
                        encode_frame(["not", "a", "request"])]:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(garbage)
            await writer.drain()
            # The node closes a connection that sent garbage (EOF, nothing answered).
            assert await asyncio.wait_for(_read_until_closed(reader), 5) == b""
            writer.close()
        async with Client(node.address) as client:
            members = await client.members()
            status = await client.status()
        assert [m.name for m in members] == ["target"]
        malformed = status.runtime["dropped_malformed_total"]
        assert malformed.get("tcp_frame", 0) == 4
        # Datagrams may be lost even on loopback in theory; those that arrived were counted.
        udp_dropped = malformed.get("udp_packet", 0) + malformed.get("udp_oversized", 0)
        assert udp_dropped >= 1
        assert udp_dropped == node.counters.dropped_malformed_total["udp_packet"] + \
            node.counters.dropped_malformed_total["udp_oversized"]
        assert node.membership.counters.packets_received == 0
    finally:
        await node.stop()


def test_live_node_survives_garbage(tmp_path: Path) -> None:
    asyncio.run(asyncio.wait_for(_garbage_against_live_node(tmp_path), 60))
