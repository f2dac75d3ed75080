"""Bytes <-> typed messages, with limits. Sans-I/O: the runtime and the simulator share it.

A UDP datagram is one msgpack-encoded ``Packet``. A TCP stream is a sequence of frames, each
a 4-byte big-endian length followed by that many bytes of msgpack. Anything malformed,
oversized or unknown raises ``MalformedInput`` (the remote peer's fault); callers count it
and drop it, they never crash on it.
"""

from __future__ import annotations

import struct
from typing import Any, Generic, TypeVar

import msgspec

from leaderless.core.messages import Packet

PACKET_BYTES_MAX = 1400
"""Fits an Ethernet MTU of 1,500 with IP/UDP headers and room for encryption overhead."""
FRAME_BYTES_MAX = 8 * 1024 * 1024
"""A TCP frame: a full-state sync of 20,000 members is ~2 MB; 8 MB leaves room."""
FRAME_HEADER = struct.Struct(">I")

T = TypeVar("T")


class MalformedInput(ValueError):
    """Bytes from a peer that are not a valid message: the peer's fault, not ours."""


_packet_encoder = msgspec.msgpack.Encoder()
_packet_decoder = msgspec.msgpack.Decoder(Packet)


def encode_packet(packet: Packet) -> bytes:
    return _packet_encoder.encode(packet)


def decode_packet(data: bytes) -> Packet:
    if len(data) > PACKET_BYTES_MAX:
        raise MalformedInput(f"datagram of {len(data)} bytes exceeds {PACKET_BYTES_MAX}")
    try:
        return _packet_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise MalformedInput(f"bad packet: {exc}") from None


def encoded_size(obj: Any) -> int:
    """Exact msgpack size of ``obj`` as it would appear inside a packet."""
    return len(_packet_encoder.encode(obj))


class FrameDecoder(Generic[T]):
    """Splits a TCP byte stream into length-prefixed frames and decodes each as ``T``.

    Feed it whatever arrived; it returns the complete messages and keeps the rest. A frame
    longer than ``frame_bytes_max`` is rejected from its header alone, before we buffer it.
    """

    def __init__(self, message_type: Any, frame_bytes_max: int = FRAME_BYTES_MAX) -> None:
        assert frame_bytes_max > 0
        self._decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(message_type)
        self._frame_bytes_max = frame_bytes_max
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[T]:
        self._buffer += data
        messages: list[T] = []
        while len(self._buffer) >= FRAME_HEADER.size:
            (length,) = FRAME_HEADER.unpack_from(self._buffer)
            if length > self._frame_bytes_max:
                raise MalformedInput(f"frame of {length} bytes exceeds {self._frame_bytes_max}")
            end = FRAME_HEADER.size + length
            if len(self._buffer) < end:
                break
            body = bytes(self._buffer[FRAME_HEADER.size : end])
            del self._buffer[:end]
            try:
                messages.append(self._decoder.decode(body))
            except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
                raise MalformedInput(f"bad frame: {exc}") from None
        return messages

    @property
    def buffered_bytes(self) -> int:
        return len(self._buffer)


_frame_encoder = msgspec.msgpack.Encoder()


def encode_frame(message: Any) -> bytes:
    body = _frame_encoder.encode(message)
    if len(body) > FRAME_BYTES_MAX:
        raise ValueError(f"frame of {len(body)} bytes exceeds {FRAME_BYTES_MAX}")
    return FRAME_HEADER.pack(len(body)) + body
