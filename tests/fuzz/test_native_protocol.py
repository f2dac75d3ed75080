"""Fuzz the native client protocol: the request decoder, and ``ClientConnection`` on a
real node's client port over real sockets.

Properties: the decoder raises nothing but its three decode errors; a connection fed any
stream (shaped requests, damaged ones, random bytes, in random chunks, with right or
wrong lengths) answers every request it could decode, answers the first frame it could
not with ``Failure(id=0, code="bad_request")`` and closes, never answers ``internal``, and
the node logs no error; memory stays bounded over many hostile connections.
"""

from __future__ import annotations

import asyncio
import gc
import random
import socket
import struct
import tracemalloc
from typing import Any

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from leaderless.api.kv_messages import (
    ERROR_CODES,
    ClientReply,
    ClientRequest,
    CompareAndSet,
    Failure,
    Get,
    Increment,
    Put,
    Scan,
    Watch,
    WatchEvent,
)
from leaderless.api.kv_messages import Delete as Delete
from leaderless.core.codec import FRAME_BYTES_MAX, FrameDecoder
from tests.fuzz.conftest import LiveNode
from tests.fuzz.shapes import mutated, settings_for, shaped_bytes, shaped_or_mutated

DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError)
REPLY_TIMEOUT_S = 15.0
KEYSPACES = st.sampled_from(["fz", "fzs", "missing", "system_locks", ""])
OVERRIDES: dict[str, st.SearchStrategy[Any]] = {
    # Requests that would legitimately wait long are kept short: the property is about
    # answers, not about waiting out a lock or a lease.
    "AcquireLock.wait_ms": st.integers(-1, 50),
    "AcquireLock.ttl_ms": st.integers(0, 2000),
    **{f"{t}.keyspace": KEYSPACES for t in ("Put", "Get", "Delete", "Scan", "CompareAndSet",
                                             "Increment", "Watch")},
    "CreateKeyspace.replication": st.integers(0, 2),
    **{f"{t}.key": st.binary(max_size=6) for t in ("Put", "Get", "Delete", "Scan",
                                                    "CompareAndSet", "Increment", "Watch")},
}
DATA_PLANE = Put | Get | Delete | Scan | CompareAndSet | Increment | Watch
bodies = shaped_or_mutated(ClientRequest, OVERRIDES)
requests = shaped_bytes(ClientRequest, OVERRIDES) | shaped_bytes(DATA_PLANE, OVERRIDES)
stream_bodies = st.integers(0, 9).flatmap(
    lambda i: requests.flatmap(mutated) if i == 0 else st.binary(max_size=64) if i == 1
    else requests)
"""A stream's frames: mostly well-shaped requests, so a stream gets past its first frame."""
_decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(ClientRequest)


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[bytes], bytes]:
    """(bodies, wire bytes): frames mostly with their true length, sometimes a wrong one."""
    clean = draw(st.integers(0, 4)) < 3  # most streams hold only well-shaped requests
    frames = draw(st.lists(requests if clean else stream_bodies, min_size=1, max_size=6))
    wire = bytearray()
    for body in frames:
        length = len(body)
        if not clean and draw(st.integers(0, 9)) == 0:
            length = draw(st.sampled_from([0, len(body) + 1, max(0, len(body) - 1),
                                           FRAME_BYTES_MAX + 1, 2**32 - 1]))
        wire += struct.pack(">I", length) + body
    return frames, bytes(wire)


def test_the_request_decoder_only_raises_decode_errors() -> None:
    @settings_for(600)
    @given(bodies)
    def check(body: bytes) -> None:
        try:
            _decoder.decode(body)
        except DECODE_ERRORS:
            pass

    check()


async def exchange(port: int, wire: bytes, cuts: list[int]) -> bytes:
    """Send ``wire`` in pieces, half-close, and read everything until the node closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        at = 0
        for cut in [*sorted(cuts), len(wire)]:
            writer.write(wire[at:cut])
            at = max(at, cut)
            await writer.drain()
        writer.write_eof()
        data = bytearray()
        async with asyncio.timeout(REPLY_TIMEOUT_S):
            while chunk := await reader.read(65536):
                data += chunk
        return bytes(data)
    except (ConnectionResetError, BrokenPipeError):
        return b""  # the node closed first (after a bad frame): fine, nothing to read
    finally:
        writer.close()


def first_bad_frame(frames: list[bytes], wire: bytes) -> int | None:
    """Index of the first frame the node cannot decode (as the node splits ``wire``)."""
    at = index = 0
    while len(wire) - at >= 4:
        (length,) = struct.unpack_from(">I", wire, at)
        if length > FRAME_BYTES_MAX:
            return index
        end = at + 4 + length
        if end > len(wire):
            return None  # truncated: waits for more, then EOF
        try:
            _decoder.decode(wire[at + 4:end])
        except DECODE_ERRORS:
            return index
        at, index = end, index + 1
    return None


def test_client_connection_answers_every_stream(live_node: LiveNode) -> None:
    @settings_for(300)
    @given(streams(), st.lists(st.integers(0, 4096), max_size=4))
    def check(stream: tuple[list[bytes], bytes], cuts: list[int]) -> None:
        frames, wire = stream
        errors_before = len(live_node.errors)
        raw = live_node.run(exchange(live_node.client_port, wire, cuts), REPLY_TIMEOUT_S + 5)
        replies: list[ClientReply] = FrameDecoder(ClientReply).feed(raw)
        failures = [r for r in replies if isinstance(r, Failure)]
        for failure in failures:
            assert failure.code in ERROR_CODES and failure.code != "internal", failure
        bad = first_bad_frame(frames, wire)
        connection_errors = [f for f in failures if f.id == 0 and f.code == "bad_request"]
        if bad is not None and raw:
            assert connection_errors and replies[-1] == connection_errors[-1], replies
        if bad is None:
            requests = []
            at = 0
            while len(wire) - at >= 4:
                (length,) = struct.unpack_from(">I", wire, at)
                if at + 4 + length > len(wire):
                    break
                requests.append(_decoder.decode(wire[at + 4:at + 4 + length]))
                at += 4 + length
            answers = [r for r in replies if not isinstance(r, WatchEvent)]
            expected = sum(1 for r in requests if not isinstance(r, Watch))
            assert len(answers) >= expected, (requests, replies)
        assert live_node.errors[errors_before:] == []

    check()


def hostile_stream(rng: random.Random) -> bytes:
    """One connection's worth of garbage, from cheap to memory-hungry-looking."""
    kind = rng.randrange(4)
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 2048))
    if kind == 1:  # claims the largest frame, sends a sliver of it
        return struct.pack(">I", FRAME_BYTES_MAX) + rng.randbytes(rng.randrange(0, 4096))
    if kind == 2:  # claims more than any frame may be
        return struct.pack(">I", FRAME_BYTES_MAX + 1 + rng.randrange(1 << 20))
    body = msgspec.msgpack.encode([120, rng.randrange(1 << 30), "fz", rng.randbytes(8),
                                   rng.randbytes(rng.randrange(0, 512))])
    return (struct.pack(">I", len(body)) + body) * rng.randrange(1, 20)


def test_memory_stays_bounded_over_many_hostile_connections(live_node: LiveNode) -> None:
    rng = random.Random(20261126)

    async def batch(count: int) -> None:
        for _ in range(count):
            await exchange(live_node.client_port, hostile_stream(rng), [])

    live_node.run(batch(100), 120)  # warm caches, pools and lazily built tables
    gc.collect()
    tracemalloc.start()
    try:
        baseline, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        live_node.run(batch(300), 240)
        gc.collect()
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # 300 connections of up to 8 MiB claimed each: nothing near that may be held, and
    # nothing per connection may stay behind (writes to `fz` add a few hundred KB of rows).
    assert peak - baseline < 32 * 1024 * 1024, (baseline, peak)
    assert current - baseline < 8 * 1024 * 1024, (baseline, current)
    assert live_node.errors == []


def test_node_still_serves_after_the_fuzzing(live_node: LiveNode) -> None:
    with socket.create_connection(("127.0.0.1", live_node.client_port), timeout=10) as sock:
        body = msgspec.msgpack.encode([126, 42])  # ListKeyspaces(id=42)
        sock.sendall(struct.pack(">I", len(body)) + body)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    replies = FrameDecoder(ClientReply).feed(data)
    assert len(replies) == 1 and replies[0].id == 42 and not isinstance(replies[0], Failure)
