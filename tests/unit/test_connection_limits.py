"""Connection caps and slow-loris deadlines on the three TCP listeners of a node (native
client port, node port, HTTP port), over real sockets against a real single node.

Deadlines are shortened through the listeners' parameters so the tests run in seconds;
every wait has a timeout, so a deadline that fails to fire fails the test instead of
hanging it. Nothing here asserts how long anything took.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest

from leaderless.api.http import make_app
from leaderless.api.http_limits import serve_guarded
from leaderless.api.kv_messages import ClientReply, Failure, Keyspaces, ListKeyspaces
from leaderless.api.kv_server import abort_connections, serve_clients
from leaderless.config import load_config
from leaderless.core.codec import FrameDecoder, encode_frame
from leaderless.runtime.connection_limits import ConnectionCaps, client_address
from leaderless.runtime.counters import RuntimeCounters
from leaderless.runtime.drops import Drops
from leaderless.runtime.logs import NodeLogger
from leaderless.runtime.node import InboundFrame, Node
from leaderless.runtime.tcp import ServerConnection

WAIT_S = 10.0
"""Upper bound on any wait: a deadline under test fires well within it."""

# -- pure parts -------------------------------------------------------------------------------


def test_client_address_groups_what_one_host_controls() -> None:
    assert client_address(("10.0.0.7", 5000)) == "10.0.0.7"
    assert client_address(("::ffff:10.0.0.7", 5000, 0, 0)) == "10.0.0.7"
    one = client_address(("2001:db8:1:2:aaaa::1", 5000, 0, 0))
    assert one == client_address(("2001:db8:1:2:ffff::9", 5001, 0, 0)) == "2001:db8:1:2::/64"
    assert one != client_address(("2001:db8:1:3::1", 5000, 0, 0))
    assert client_address(("fe80::1%eth0", 5000, 0, 2)) == "fe80::/64"
    assert client_address("/run/leaderless.sock") == "/run/leaderless.sock"
    assert client_address(None) == "None"


class Open:
    def __init__(self, client: str) -> None:
        self.client = client


def test_caps_refuse_a_full_listener_then_a_greedy_client() -> None:
    caps = ConnectionCaps("client", total_max=3, per_client_max=2)
    assert caps.refusal("a", [Open("a")]) is None
    greedy = caps.refusal("a", [Open("a"), Open("a")])
    assert greedy is not None and greedy.kind == "client_connections_per_client"
    assert "a already holds 2 connections" in greedy.reason
    assert caps.refusal("b", [Open("a"), Open("a")]) is None
    full = caps.refusal("c", [Open("a"), Open("a"), Open("b")])
    assert full is not None and full.kind == "client_connections"
    assert "limit of 3 connections" in full.reason
    with pytest.raises(ValueError, match="at least 1"):
        ConnectionCaps("http", 10, 0)


# -- a real node ------------------------------------------------------------------------------


@asynccontextmanager
async def running_node(tmp_path: Path) -> AsyncIterator[Node]:
    config = load_config({"name": "limits", "bind": "127.0.0.1:0",
                          "data_dir": str(tmp_path / "limits")}, env={})
    node = Node(config)
    await node.start()
    try:
        yield node
    finally:
        await node.stop()


def run(tmp_path: Path, body: Callable[[Node], Awaitable[None]]) -> None:
    async def main() -> None:
        async with running_node(tmp_path) as node:
            await body(node)

    asyncio.run(asyncio.wait_for(main(), 60))


async def connect(port: int, source: str = "127.0.0.1"
                  ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def read_replies(reader: asyncio.StreamReader) -> list[ClientReply]:
    """Every reply frame until the node closes the connection."""
    decoder: FrameDecoder[ClientReply] = FrameDecoder(ClientReply)
    replies: list[ClientReply] = []
    async with asyncio.timeout(WAIT_S):
        while chunk := await reader.read(65536):
            replies += decoder.feed(chunk)
    return replies


async def read_all(reader: asyncio.StreamReader) -> bytes:
    async with asyncio.timeout(WAIT_S):
        return await reader.read()


def drops() -> Drops:
    return Drops(RuntimeCounters(), NodeLogger("limits", "test"))


# -- the native client port -------------------------------------------------------------------


def test_client_port_refuses_a_client_over_its_share(tmp_path: Path) -> None:
    async def body(node: Node) -> None:
        refusals = drops()
        server = await serve_clients(node.kv, "127.0.0.1", 0, max_connections=10,
                                     max_connections_per_client=2, drops=refusals)
        port = server.sockets[0].getsockname()[1]
        held = [await connect(port) for _ in range(2)]
        reader, writer = await connect(port)
        replies = await read_replies(reader)
        assert len(replies) == 1 and isinstance(replies[0], Failure)
        assert replies[0].code == "overloaded" and replies[0].id == 0
        assert "127.0.0.1 already holds 2 connections" in replies[0].message
        assert refusals.counters.dropped_overload_total["client_connections_per_client"] == 1
        # Another address still gets in, and the held connections still serve.
        other_reader, other_writer = await connect(port, source="127.0.0.2")
        for r, w in [*held, (other_reader, other_writer)]:
            w.write(encode_frame(ListKeyspaces(7)))
            decoder: FrameDecoder[ClientReply] = FrameDecoder(ClientReply)
            async with asyncio.timeout(WAIT_S):
                got = decoder.feed(await r.read(65536))
            assert isinstance(got[0], Keyspaces) and got[0].id == 7
            w.close()
        writer.close()
        server.close()
        abort_connections(server)

    run(tmp_path, body)


@pytest.mark.parametrize("trickle", [False, True])
def test_client_port_closes_a_frame_that_never_completes(tmp_path: Path,
                                                         trickle: bool) -> None:
    async def body(node: Node) -> None:
        refusals = drops()
        server = await serve_clients(node.kv, "127.0.0.1", 0, partial_frame_timeout_s=0.4,
                                     drops=refusals)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await connect(port)
        frame = encode_frame(ListKeyspaces(1))
        writer.write(struct.pack(">I", 1000) + frame[4:])  # says 1,000 bytes, sends few
        if trickle:  # a byte at a time: the deadline runs from the frame's first byte
            async def drip() -> None:
                for _ in range(200):
                    await asyncio.sleep(0.05)
                    if writer.is_closing():
                        return
                    writer.write(b"\x00")
            dripping = asyncio.ensure_future(drip())
        replies = await read_replies(reader)
        assert [(r.id, r.code) for r in replies if isinstance(r, Failure)] == [(0, "timeout")]
        assert "still incomplete" in replies[0].message  # type: ignore[union-attr]
        assert refusals.counters.dropped_overload_total["client_partial_frame"] == 1
        if trickle:
            dripping.cancel()
        writer.close()
        server.close()
        abort_connections(server)

    run(tmp_path, body)


def test_client_port_closes_idle_connections_but_not_busy_ones(tmp_path: Path) -> None:
    async def body(node: Node) -> None:
        server = await serve_clients(node.kv, "127.0.0.1", 0, idle_timeout_s=0.4)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await connect(port)
        writer.write(encode_frame(ListKeyspaces(3)))
        replies = await read_replies(reader)  # answered, then closed once idle
        assert [type(r) for r in replies] == [Keyspaces]
        writer.close()
        server.close()
        abort_connections(server)

    run(tmp_path, body)


# -- the node port ----------------------------------------------------------------------------


def test_node_port_refuses_a_client_over_its_share(tmp_path: Path) -> None:
    async def body(node: Node) -> None:
        refusals = drops()
        registry: set[ServerConnection] = set()
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: ServerConnection(node, InboundFrame, refusals, registry,
                                     connections_per_client_max=2), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        held = [await connect(port) for _ in range(2)]
        reader, writer = await connect(port)
        assert await read_all(reader) == b""  # closed on accept
        assert refusals.counters.dropped_overload_total["tcp_connections_per_client"] == 1
        assert len(registry) == 2
        other = await connect(port, source="127.0.0.2")
        async with asyncio.timeout(WAIT_S):
            while len(registry) < 3:
                await asyncio.sleep(0.01)
        for _, w in [*held, other, (reader, writer)]:
            w.close()
        server.close()
        for conn in list(registry):
            conn.abort()

    run(tmp_path, body)


def test_node_port_closes_a_frame_that_never_completes(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from leaderless.runtime import tcp
    monkeypatch.setattr(tcp, "IDLE_TIMEOUT_S", 0.2)
    monkeypatch.setattr(tcp, "PARTIAL_FRAME_TIMEOUT_S", 0.4)

    async def body(node: Node) -> None:
        refusals = drops()
        registry: set[ServerConnection] = set()
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: ServerConnection(node, InboundFrame, refusals, registry), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await connect(port)
        frame = struct.pack(">I", 1000) + b"\x00" * 10
        # One byte every 50 ms: never idle, never whole.
        async with asyncio.timeout(WAIT_S):
            for byte in frame:
                if writer.is_closing() or reader.at_eof():
                    break
                writer.write(bytes([byte]))
                await asyncio.sleep(0.05)
            assert await read_all(reader) == b""
        assert refusals.counters.dropped_malformed_total["tcp_partial_frame"] == 1
        writer.close()
        server.close()

    run(tmp_path, body)


# -- the HTTP port ----------------------------------------------------------------------------


@asynccontextmanager
async def guarded_http(node: Node, refusals: Drops, **limits: Any) -> AsyncIterator[int]:
    runner = await serve_guarded(make_app(node.kv), "127.0.0.1", 0, drops=refusals,
                                 **limits)
    try:
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


def status_of(response: bytes) -> int:
    return int(response[9:12]) if response[:9] in (b"HTTP/1.1 ", b"HTTP/1.0 ") else 0


def test_http_closes_headers_that_trickle_past_the_idle_deadline(tmp_path: Path) -> None:
    async def body(node: Node) -> None:
        async with guarded_http(node, drops(), idle_timeout_s=0.5) as port:
            reader, writer = await connect(port)
            request = b"GET /v1/keyspaces HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 400

            async def drip() -> None:
                for i in range(len(request)):
                    if writer.is_closing():
                        return
                    writer.write(request[i:i + 1])
                    await asyncio.sleep(0.02)
            dripping = asyncio.ensure_future(drip())
            assert await read_all(reader) == b""  # closed without an answer
            assert not dripping.done()  # it was cut off mid-headers, not after them
            dripping.cancel()
            writer.close()

            # An idle keep-alive connection is closed after a completed request too.
            reader, writer = await connect(port)
            writer.write(b"GET /v1/keyspaces HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = await read_all(reader)
            assert status_of(answer) == 200 and b"keyspaces" in answer
            writer.close()

    run(tmp_path, body)


def test_http_answers_408_to_a_body_that_trickles(tmp_path: Path) -> None:
    async def body(node: Node) -> None:
        async with guarded_http(node, drops(), body_timeout_base_s=0.3,
                                body_bytes_per_s_min=10_000) as port:
            reader, writer = await connect(port)
            writer.write(b"POST /v1/keyspaces HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")

            async def drip() -> None:
                for _ in range(999):
                    if writer.is_closing():
                        return
                    writer.write(b" ")
                    await asyncio.sleep(0.05)
            dripping = asyncio.ensure_future(drip())
            answer = await read_all(reader)
            dripping.cancel()
            assert status_of(answer) == 408
            error = msgspec.json.decode(answer.split(b"\r\n\r\n", 1)[1])
            assert error["error"] == "request_timeout"
            writer.close()

    run(tmp_path, body)


def test_http_refuses_a_client_over_its_share(tmp_path: Path) -> None:
    async def body(node: Node) -> None:
        refusals = drops()
        async with guarded_http(node, refusals, connections_per_client_max=2) as port:
            held = [await connect(port) for _ in range(2)]
            await asyncio.sleep(0)  # let the server accept them
            reader, writer = await connect(port)
            answer = await read_all(reader)
            assert status_of(answer) == 503
            error = msgspec.json.decode(answer.split(b"\r\n\r\n", 1)[1])
            assert error["error"] == "overloaded" and "limit per client" in error["message"]
            assert refusals.counters.dropped_overload_total["http_connections_per_client"] == 1
            r, w = held[0]
            w.write(b"GET /v1/ring HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert status_of(await read_all(r)) == 200
            for _, w in [*held, (reader, writer)]:
                w.close()

    run(tmp_path, body)



def test_http_garbage_is_logged_once_as_a_warning_not_an_error(tmp_path: Path) -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keep = Keep(logging.DEBUG)
    server_log = logging.getLogger("leaderless.http_server")
    server_log.addHandler(keep)
    old_level = server_log.level
    server_log.setLevel(logging.DEBUG)

    async def body(node: Node) -> None:
        async with guarded_http(node, drops()) as port:
            for _ in range(5):
                reader, writer = await connect(port)
                writer.write(b"GET /v1/ring HTTP/1.1\r\nHost: x\r\nBad\x00Header: 1\r\n\r\n")
                assert status_of(await read_all(reader)) == 400
                writer.close()

    try:
        run(tmp_path, body)
    finally:
        server_log.removeHandler(keep)
        server_log.setLevel(old_level)
    parse_errors = [r for r in records if "unparsable HTTP request" in r.getMessage()]
    assert len(parse_errors) == 1  # four more within the interval were left out
    assert parse_errors[0].levelno == logging.WARNING and parse_errors[0].exc_info is None
    assert not [r for r in records if r.levelno >= logging.ERROR]


def test_http_body_that_ends_early_is_not_a_server_error(tmp_path: Path) -> None:
    async def body(node: Node) -> None:
        async with guarded_http(node, drops()) as port:
            reader, writer = await connect(port)
            writer.write(b"PUT /v1/kv/ks/k HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab")
            writer.write_eof()  # the client gives up mid-body
            answer = await read_all(reader)
            assert answer == b"" or status_of(answer) == 400
            writer.close()

    run(tmp_path, body)
