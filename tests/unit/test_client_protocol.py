"""The client-facing protocol layers: native listener (``api.kv_server``), HTTP API
(``api.http``) and the client library (``leaderless.client``).

They are driven against ``DictKvService``, a TEST DOUBLE of ``KvService`` defined here that
keeps rows in a dict. It exists only to exercise the protocol layers (framing, pipelining,
error mapping, limits, routing); it has none of the data plane's replication. End-to-end
tests against real nodes live in tests/integration.

Special keys make the double misbehave on purpose: ``error:<code>`` raises
``KvError(code)`` with received=1, required=2; ``crash`` raises a plain exception (a bug);
``slow:<ms>`` sleeps before answering.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import msgspec
import pytest

from leaderless.api.http import serve_http
from leaderless.api.kv_messages import (
    ERROR_CODES,
    ClientReply,
    Failure,
    Get,
    KeyspaceInfo,
    Put,
    RingMember,
    Row,
    Value,
)
from leaderless.api.kv_server import abort_connections, connection_count, serve_clients
from leaderless.api.service import KvError
from leaderless.client import (
    AsyncClient,
    BadRequestError,
    Client,
    FencedError,
    InternalError,
    KeyspaceExistsError,
    LeaderlessError,
    NoNodeAvailableError,
    UnknownKeyspaceError,
)
from leaderless.client.connection import NodeConnection
from leaderless.client.errors import ERRORS_BY_CODE
from leaderless.core.codec import FrameDecoder, encode_frame
from leaderless.core.keys import KeyError_, check_key, check_keyspace_name

VALUE_LIMIT = 10_000


class DictKvService:
    """Test double of ``KvService``: a dict, no replication (see the module docstring)."""

    def __init__(self, store: dict[Any, Any] | None = None,
                 keyspaces: dict[str, KeyspaceInfo] | None = None) -> None:
        self.rows: dict[tuple[str, bytes, bytes], tuple[bytes, int, int]] = (
            store if store is not None else {})
        self.keyspaces = keyspaces if keyspaces is not None else {}
        self.members: list[RingMember] = []
        self.hlc = 0
        self.calls = 0
        self.running = 0
        self.running_max = 0

    async def _enter(self, keyspace: str | None, key: bytes, sort: bytes = b"") -> None:
        self.calls += 1
        if key.startswith(b"slow:"):
            self.running += 1
            self.running_max = max(self.running_max, self.running)
            try:
                await asyncio.sleep(int(key[5:].split(b"/")[0]) / 1000)
            finally:
                self.running -= 1
        if key.startswith(b"error:"):
            raise KvError(key[6:].decode(), f"forced {key[6:].decode()}", 1, 2)
        if key == b"crash":
            raise RuntimeError("boom")
        if keyspace is not None and keyspace not in self.keyspaces:
            raise KvError("unknown_keyspace", f"no keyspace {keyspace!r}; create it first")
        try:
            check_key(key, sort)
        except KeyError_ as exc:
            raise KvError("bad_request", str(exc)) from None

    async def put(self, keyspace: str, key: bytes, value: bytes, sort: bytes = b"",
                  consistency: str | None = None, ttl_s: float | None = None,
                  idempotency: bytes = b"", fence: tuple[str, int] | None = None, *,
                  retry_ms: int = 0) -> int:
        await self._enter(keyspace, key, sort)
        self._fence(fence)
        if len(value) > VALUE_LIMIT:
            raise KvError("bad_request", f"the value has {len(value)} bytes; the limit is "
                          f"{VALUE_LIMIT}")
        self.hlc += 1
        self.rows[(keyspace, key, sort)] = (value, self.hlc, 5000 if ttl_s else 0)
        return self.hlc

    async def get(self, keyspace: str, key: bytes, sort: bytes = b"",
                  consistency: str | None = None) -> Value:
        await self._enter(keyspace, key, sort)
        row = self.rows.get((keyspace, key, sort))
        if row is None:
            return Value(0, False)
        return Value(0, True, row[0], row[1], row[2])

    async def delete(self, keyspace: str, key: bytes, sort: bytes = b"",
                     consistency: str | None = None, idempotency: bytes = b"",
                     fence: tuple[str, int] | None = None, *, retry_ms: int = 0) -> int:
        await self._enter(keyspace, key, sort)
        self._fence(fence)
        self.rows.pop((keyspace, key, sort), None)
        self.hlc += 1
        return self.hlc

    def _fence(self, fence: tuple[str, int] | None) -> None:
        """The double has no locks: a fence naming token 0 stands for a stale one."""
        if fence is not None and fence[1] == 0:
            raise KvError("fenced", f"lock {fence[0]!r} has granted a newer token")

    async def scan(self, keyspace: str, key: bytes, start: bytes | None = None,
                   end: bytes | None = None, limit: int = 1000,
                   consistency: str | None = None) -> tuple[list[Row], bool]:
        await self._enter(keyspace, key)
        found = sorted((s, v) for (ks, k, s), v in self.rows.items()
                       if ks == keyspace and k == key and (start is None or s >= start)
                       and (end is None or s < end))
        rows = [Row(s, v[0], v[1]) for s, v in found[:limit]]
        return rows, len(found) > limit

    async def create_keyspace(self, name: str, replication: int = 3, mode: str = "eventual",
                              read_consistency: str = "QUORUM",
                              write_consistency: str = "QUORUM",
                              if_not_exists: bool = False) -> None:
        try:
            check_keyspace_name(name)
        except KeyError_ as exc:
            raise KvError("bad_request", str(exc)) from None
        if name in self.keyspaces:
            if if_not_exists:
                return
            raise KvError("keyspace_exists", f"keyspace {name!r} exists already")
        self.keyspaces[name] = KeyspaceInfo(name, replication, mode, read_consistency,
                                            write_consistency)

    async def list_keyspaces(self) -> list[KeyspaceInfo]:
        return list(self.keyspaces.values())

    def ring_members(self) -> list[RingMember]:
        return self.members


def run(coro: Awaitable[Any]) -> Any:
    async def main() -> Any:
        return await asyncio.wait_for(coro, 30)

    return asyncio.run(main())


def port_of(server: asyncio.Server) -> int:
    return int(server.sockets[0].getsockname()[1])


async def with_server(body: Callable[[DictKvService, str], Awaitable[Any]],
                      **options: Any) -> Any:
    service = DictKvService()
    service.keyspaces["ks"] = KeyspaceInfo("ks", 3, "eventual", "QUORUM", "QUORUM")
    server = await serve_clients(service, "127.0.0.1", 0, **options)
    try:
        return await body(service, f"127.0.0.1:{port_of(server)}")
    finally:
        server.close()
        abort_connections(server)
        await server.wait_closed()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- native protocol ---------------------------------------------------------------------


def test_pipelined_requests_on_one_connection_are_matched_by_id() -> None:
    async def body(service: DictKvService, address: str) -> None:
        host, port = address.split(":")
        conn = await NodeConnection.open(host, int(port), 5)
        # Later requests finish first: replies leave out of order and still match.
        keys = [f"slow:{(200 - i) % 40}".encode() + b"/" + str(i).encode() for i in range(200)]
        for k in keys:
            service.rows[("ks", k, b"")] = (k, 1, 0)
        replies = await asyncio.gather(*(conn.call(Get, ("ks", k), 5) for k in keys))
        assert [r.value for r in replies if isinstance(r, Value)] == keys
        assert conn.in_flight == 0
        conn.close()

    run(with_server(body))


def test_put_get_delete_scan_through_async_client() -> None:
    async def body(service: DictKvService, address: str) -> None:
        async with AsyncClient([address], connections_per_node=1) as kv:
            hlcs = await asyncio.gather(*(kv.put("ks", f"k{i}", f"v{i}") for i in range(300)))
            assert len(set(hlcs)) == 300
            values = await asyncio.gather(*(kv.get("ks", f"k{i}") for i in range(300)))
            assert values == [f"v{i}".encode() for i in range(300)]
            assert await kv.get("ks", "absent") is None
            await kv.put("ks", b"\x00bin", b"\xff", sort="s", ttl=10)
            item = await kv.get_with_meta("ks", b"\x00bin", sort="s")
            assert item is not None and item.value == b"\xff" and item.expires_at_ms == 5000
            await kv.delete("ks", "k1")
            assert await kv.get("ks", "k1") is None
            for i in range(2500):
                service.rows[("ks", b"part", b"%05d" % i)] = (b"x", 1, 0)
            rows = await kv.scan("ks", "part")
            assert [r.sort for r in rows] == [b"%05d" % i for i in range(2500)]
            rows = await kv.scan("ks", "part", start="00100", end="00200", limit=50)
            assert [r.sort for r in rows] == [b"%05d" % i for i in range(100, 150)]
            await kv.create_keyspace("other", replication=1)
            with pytest.raises(KeyspaceExistsError):
                await kv.create_keyspace("other")
            await kv.create_keyspace("other", if_not_exists=True)
            assert {k.name for k in await kv.list_keyspaces()} == {"ks", "other"}

    run(with_server(body))


def test_fence_travels_with_writes_and_fenced_is_its_own_error() -> None:
    async def body(service: DictKvService, address: str) -> None:
        async with AsyncClient([address], connections_per_node=1) as kv:
            await kv.put("ks", "k", b"v", fence=("L", 3))
            with pytest.raises(FencedError):
                await kv.put("ks", "k", b"stale", fence=("L", 0))
            with pytest.raises(FencedError):
                await kv.delete("ks", "k", fence=("L", 0))
            assert await kv.get("ks", "k") == b"v"
            with pytest.raises(BadRequestError):
                await kv.put("ks", "k", b"v", fence=("", 1))

    run(with_server(body))


@pytest.mark.parametrize("code", sorted(ERROR_CODES))
def test_every_error_code_maps_to_its_exception(code: str) -> None:
    async def body(service: DictKvService, address: str) -> None:
        async with AsyncClient([address]) as kv:
            with pytest.raises(ERRORS_BY_CODE[code]) as info:
                await kv.put("ks", f"error:{code}", b"v")
            err = info.value
            assert isinstance(err, LeaderlessError)
            assert (err.code, err.message, err.received, err.required) == (
                code, f"forced {code}", 1, 2)

    run(with_server(body))


def test_unknown_keyspace_and_internal_errors() -> None:
    async def body(service: DictKvService, address: str) -> None:
        async with AsyncClient([address]) as kv:
            with pytest.raises(UnknownKeyspaceError):
                await kv.get("nope", "k")
            with pytest.raises(InternalError):
                await kv.get("ks", "crash")
            assert await kv.get("ks", "fine") is None  # the connection survives both

    run(with_server(body))


def test_oversized_values_are_rejected_and_the_connection_survives() -> None:
    async def body(service: DictKvService, address: str) -> None:
        async with AsyncClient([address], connections_per_node=1) as kv:
            with pytest.raises(BadRequestError, match="limit"):
                await kv.put("ks", "big", b"x" * (VALUE_LIMIT + 1))
            with pytest.raises(BadRequestError, match="no node accepts"):
                await kv.put("ks", "huge", b"x" * (8 << 20))  # refused before sending
            with pytest.raises(BadRequestError, match="partition key"):
                await kv.put("ks", "k" * 2000, b"v")
            await kv.put("ks", "small", b"v")
            assert await kv.get("ks", "small") == b"v"

    run(with_server(body))


def read_frames(sock: socket.socket) -> list[ClientReply]:
    decoder: FrameDecoder[ClientReply] = FrameDecoder(ClientReply)
    frames: list[ClientReply] = []
    while True:
        data = sock.recv(65536)
        if not data:
            return frames
        frames.extend(decoder.feed(data))


def test_malformed_frame_gets_failure_and_close_while_others_are_served() -> None:
    async def body(service: DictKvService, address: str) -> None:
        host, port = address.split(":")
        async with AsyncClient([address]) as kv:
            await kv.put("ks", "k", b"v")

            def bad_client(payload: bytes) -> list[ClientReply]:
                with socket.create_connection((host, int(port)), timeout=5) as sock:
                    sock.sendall(payload)
                    return read_frames(sock)

            garbage = struct.pack(">I", 5) + b"\xc1\xc1\xc1\xc1\xc1"
            for payload in (garbage, struct.pack(">I", 1 << 30),
                            encode_frame(Put(1, "ks", b"k", b"v")) + garbage):
                frames = await asyncio.to_thread(bad_client, payload)
                failure = frames[-1]
                assert isinstance(failure, Failure)
                assert (failure.id, failure.code) == (0, "bad_request")
            assert await kv.get("ks", "k") == b"v"

    run(with_server(body))


def test_in_flight_bound_applies_backpressure_without_errors() -> None:
    async def body(service: DictKvService, address: str) -> None:
        host, port = address.split(":")
        conn = await NodeConnection.open(host, int(port), 5)
        replies = await asyncio.gather(*(conn.call(Get, ("ks", f"slow:5/{i}".encode()), 10)
                                         for i in range(100)))
        assert all(isinstance(r, Value) for r in replies)
        assert service.running_max <= 4
        conn.close()

    run(with_server(body, max_in_flight_per_connection=4))


def test_connections_beyond_the_bound_are_closed() -> None:
    async def body(service: DictKvService, address: str) -> None:
        host, port = address.split(":")
        first = await NodeConnection.open(host, int(port), 5)
        await first.call(Get, ("ks", b"k"), 5)
        second = await NodeConnection.open(host, int(port), 5)
        with pytest.raises(LeaderlessError):
            await second.call(Get, ("ks", b"k"), 5)
        assert isinstance(await first.call(Get, ("ks", b"k"), 5), Value)
        first.close()

    run(with_server(body, max_connections=1))


def test_no_reachable_node_raises_no_node_available() -> None:
    async def main() -> None:
        kv = AsyncClient([f"127.0.0.1:{free_port()}"], connect_timeout_s=1)
        with pytest.raises(NoNodeAvailableError, match="no node answers"):
            await kv.connect()
        await kv.close()

    run(main())


def test_client_skips_a_dead_seed_and_routes_by_token() -> None:
    """Three listeners share one dict; keyspace N=1, so each key has exactly one replica
    and every request must go to that replica's listener."""

    async def main() -> None:
        rows: dict[Any, Any] = {}
        spaces = {"one": KeyspaceInfo("one", 1, "eventual", "ONE", "ONE")}
        services = [DictKvService(rows, spaces) for _ in range(3)]
        servers = [await serve_clients(s, "127.0.0.1", 0) for s in services]
        members = [RingMember(f"n{i}", f"127.0.0.1:{port_of(srv)}", 1000 + i, 16, "", "alive")
                   for i, srv in enumerate(servers)]
        for s in services:
            s.members = members
        dead = f"127.0.0.1:{free_port()}"
        try:
            async with AsyncClient([dead, members[0].client_address]) as kv:
                for i in range(60):
                    key = f"key{i}".encode()
                    before = [s.calls for s in services]
                    await kv.put("one", key, b"v")
                    owner = kv.ring.preference_list(__import__("leaderless.core.keys",
                                                               fromlist=["token"]).token(key),
                                                    1)[0]
                    served = [s.calls - b for s, b in zip(services, before, strict=True)]
                    assert served[int(owner[1:])] == 1, (key, owner, served)
        finally:
            for srv in servers:
                srv.close()
                abort_connections(srv)

    run(main())


def test_retry_on_another_node_after_a_connection_failure() -> None:
    async def main() -> None:
        rows: dict[Any, Any] = {}
        spaces = {"ks": KeyspaceInfo("ks", 3, "eventual", "QUORUM", "QUORUM")}
        a, b = DictKvService(rows, spaces), DictKvService(rows, spaces)
        srv_a = await serve_clients(a, "127.0.0.1", 0)
        srv_b = await serve_clients(b, "127.0.0.1", 0)
        addr_a, addr_b = (f"127.0.0.1:{port_of(s)}" for s in (srv_a, srv_b))
        try:
            async with AsyncClient([addr_a, addr_b], token_aware=False) as kv:
                await kv.put("ks", "k", b"v")
                # Requests go to a random node: send until the client holds a connection
                # to b, the one that must serve the retries once a is gone.
                for _ in range(200):
                    if connection_count(srv_b):
                        break
                    await kv.get("ks", "k")
                assert connection_count(srv_b) >= 1
                srv_a.close()
                abort_connections(srv_a)
                srv_b.close()  # stops accepting; the open connection still serves
                for _ in range(5):
                    assert await kv.get("ks", "k") == b"v"
                assert connection_count(srv_b) >= 1
        finally:
            abort_connections(srv_b)

    run(main())


def test_sync_client_works_from_plain_code() -> None:
    async def body(service: DictKvService, address: str) -> None:
        def use() -> None:
            with Client([address]) as kv:
                kv.create_keyspace("sync", if_not_exists=True)
                kv.put("sync", "k", "v", sort="s")
                assert kv.get("sync", "k", sort="s") == b"v"
                assert [r.value for r in kv.scan("sync", "k")] == [b"v"]
                kv.delete("sync", "k", sort="s")
                assert kv.get("sync", "k", sort="s") is None
                with pytest.raises(UnknownKeyspaceError):
                    kv.get("missing", "k")

        await asyncio.to_thread(use)

    run(with_server(body))


# -- HTTP --------------------------------------------------------------------------------


async def with_http(body: Callable[[aiohttp.ClientSession, str], Awaitable[None]]) -> None:
    service = DictKvService()
    service.keyspaces["ks"] = KeyspaceInfo("ks", 3, "eventual", "QUORUM", "QUORUM")
    service.members = [RingMember("n1", "127.0.0.1:7400", 1, 16, "", "alive")]
    runner = await serve_http(service, "127.0.0.1", 0, value_bytes_max=VALUE_LIMIT)
    host, port = runner.addresses[0][:2]
    try:
        async with aiohttp.ClientSession() as session:
            await body(session, f"http://{host}:{port}")
    finally:
        await runner.cleanup()


def test_http_kv_routes() -> None:
    async def body(http: aiohttp.ClientSession, base: str) -> None:
        async with http.put(f"{base}/v1/kv/ks/a%2Fb%00?sort=s1&ttl=5",
                            data=b"\x00\xffraw") as r:
            assert r.status == 200
            assert (await r.json())["hlc"] > 0
        async with http.get(f"{base}/v1/kv/ks/a%2Fb%00?sort=s1") as r:
            assert r.status == 200
            assert await r.read() == b"\x00\xffraw"
            assert r.headers["Content-Type"] == "application/octet-stream"
            assert int(r.headers["X-Leaderless-Hlc"]) > 0
            assert r.headers["X-Leaderless-Expires-At-Ms"] == "5000"
        async with http.get(f"{base}/v1/kv/ks/a%2Fb%00?sort=s1&format=json") as r:
            doc = await r.json()
            assert base64.b64decode(doc["value_b64"]) == b"\x00\xffraw"
            assert doc["value_utf8"] is None and doc["key"] == "a/b\x00"
        async with http.get(f"{base}/v1/kv/ks/a%2Fb%00") as r:  # no sort key: another row
            assert r.status == 404
            assert (await r.json())["error"] == "not_found"
        for i in range(5):
            async with http.put(f"{base}/v1/kv/ks/p?sort=r{i}", data=f"v{i}") as r:
                assert r.status == 200
        async with http.get(f"{base}/v1/scan/ks/p?start=r1&limit=2") as r:
            doc = await r.json()
            assert [row["sort"] for row in doc["rows"]] == ["r1", "r2"]
            assert doc["more"] is True
        async with http.get(f"{base}/v1/scan/ks/p?start={doc['next_start']}") as r:
            assert [row["value_utf8"] for row in (await r.json())["rows"]] == ["v3", "v4"]
        async with http.delete(f"{base}/v1/kv/ks/p?sort=r0") as r:
            assert r.status == 200
        async with http.get(f"{base}/v1/kv/ks/p?sort=r0") as r:
            assert r.status == 404

    run(with_http(body))


def test_http_keyspaces_and_ring() -> None:
    async def body(http: aiohttp.ClientSession, base: str) -> None:
        spec = {"name": "users", "replication": 3, "write_consistency": "all"}
        async with http.post(f"{base}/v1/keyspaces", json=spec) as r:
            assert r.status == 201
            assert (await r.json())["write_consistency"] == "ALL"
        async with http.post(f"{base}/v1/keyspaces", json=spec) as r:
            assert r.status == 409 and (await r.json())["error"] == "keyspace_exists"
        async with http.post(f"{base}/v1/keyspaces", json={**spec, "if_not_exists": True}) as r:
            assert r.status == 201
        async with http.get(f"{base}/v1/keyspaces") as r:
            assert {k["name"] for k in (await r.json())["keyspaces"]} == {"ks", "users"}
        async with http.get(f"{base}/v1/ring") as r:
            assert (await r.json())["members"][0]["client_address"] == "127.0.0.1:7400"

    run(with_http(body))


@pytest.mark.parametrize(("method", "path", "data", "status", "code", "says"), [
    ("POST", "/v1/keyspaces", b"{not json", 400, "bad_request", "not valid JSON"),
    ("POST", "/v1/keyspaces", b'{"name": "x", "replication": 99}', 400, "bad_request",
     "replication"),
    ("POST", "/v1/keyspaces", b'{"nme": "x"}', 400, "bad_request", "nme"),
    ("POST", "/v1/keyspaces", b'{"name": "9bad"}', 400, "bad_request", "invalid"),
    ("PUT", "/v1/kv/ks/k", b"x" * (VALUE_LIMIT + 1), 413, "value_too_large", "limit"),
    ("PUT", "/v1/kv/ks/k", b"x" * (VALUE_LIMIT + 200_000), 413, "value_too_large", "limit"),
    ("PUT", "/v1/kv/ks/k?consistncy=ONE", b"v", 400, "bad_request", "consistncy"),
    ("PUT", "/v1/kv/ks/k?consistency=SOME", b"v", 400, "bad_request", "QUORUM"),
    ("PUT", "/v1/kv/ks/k?ttl=-1", b"v", 400, "bad_request", "ttl"),
    ("GET", "/v1/kv/ks", b"", 400, "bad_request", "path"),
    ("GET", "/v1/kv/nope/k", b"", 404, "unknown_keyspace", "nope"),
    ("GET", "/v1/scan/ks/k?limit=0", b"", 400, "bad_request", "limit"),
    ("GET", "/v1/nothing", b"", 404, "no_route", "no such route"),
    ("POST", "/v1/kv/ks/k", b"", 405, "method_not_allowed", "PUT"),
    ("GET", "/v1/kv/ks/error:unavailable", b"", 503, "unavailable", "forced"),
    ("GET", "/v1/kv/ks/error:overloaded", b"", 503, "overloaded", "forced"),
    ("PUT", "/v1/kv/ks/error:timeout", b"v", 504, "timeout", "forced"),
    ("GET", "/v1/kv/ks/crash", b"", 500, "internal", "RuntimeError"),
])
def test_http_errors(method: str, path: str, data: bytes, status: int, code: str,
                     says: str) -> None:
    async def body(http: aiohttp.ClientSession, base: str) -> None:
        async with http.request(method, base + path, data=data) as r:
            assert r.status == status
            doc = await r.json()
            assert doc["error"] == code
            assert says in doc["message"]
            if code == "timeout":
                assert (doc["received"], doc["required"]) == (1, 2)

    run(with_http(body))


def test_failure_messages_fit_the_wire_limit() -> None:
    reply = Failure(1, "bad_request", "x" * 512)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(reply), type=Failure) == reply


# -- CLI ---------------------------------------------------------------------------------


@pytest.fixture()
def threaded_node() -> Any:
    """A native listener over the dict double, on its own loop in a thread (the CLI runs
    its own event loop in the test's thread)."""
    import threading

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    service = DictKvService()

    async def start() -> asyncio.Server:
        return await serve_clients(service, "127.0.0.1", 0)

    server = asyncio.run_coroutine_threadsafe(start(), loop).result()
    yield f"127.0.0.1:{port_of(server)}"

    async def stop() -> None:
        server.close()
        abort_connections(server)

    asyncio.run_coroutine_threadsafe(stop(), loop).result()
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def test_cli_keyspace_and_kv_commands(threaded_node: str) -> None:
    from click.testing import CliRunner

    from leaderless.cli import main

    runner = CliRunner()
    node = ["--node", threaded_node]

    def cli(*args: str, stdin: bytes | None = None) -> Any:
        return runner.invoke(main, [*args, *node], input=stdin)

    assert cli("keyspace", "create", "users", "--replication", "1").exit_code == 0
    assert cli("keyspace", "create", "users").exit_code == 6
    assert cli("keyspace", "create", "users", "--if-not-exists").exit_code == 0
    listed = cli("keyspace", "list", "--json")
    assert json_loads(listed.stdout)[0]["name"] == "users"
    assert cli("kv", "put", "users", "alice", "hello", "--ttl", "5").exit_code == 0
    assert cli("kv", "put", "users", "bob", "-", stdin=b"\x00\x01").exit_code == 0
    got = cli("kv", "get", "users", "alice")
    assert (got.exit_code, got.stdout_bytes) == (0, b"hello")
    assert cli("kv", "get", "users", "bob").stdout_bytes == b"\x00\x01"
    missing = cli("kv", "get", "users", "carol")
    assert missing.exit_code == 4 and "no value" in missing.stderr
    assert cli("kv", "get", "nope", "alice").exit_code == 6
    assert cli("kv", "put", "users", "error:timeout", "v").exit_code == 5
    assert cli("kv", "put", "users", "k" * 2000, "v").exit_code == 2
    for i in range(3):
        cli("kv", "put", "users", "p", f"v{i}", "--sort", f"s{i}")
    scanned = cli("kv", "scan", "users", "p", "--start", "s1")
    assert scanned.stdout == "s1\tv1\ns2\tv2\n"
    assert cli("kv", "delete", "users", "alice").exit_code == 0
    assert cli("kv", "get", "users", "alice").exit_code == 4
    as_json = cli("kv", "get", "users", "bob", "--json")
    assert json_loads(as_json.stdout)["value_b64"] == "AAE="


def test_cli_unreachable_node_exits_1() -> None:
    from click.testing import CliRunner

    from leaderless.cli import main

    result = CliRunner().invoke(main, ["kv", "get", "ks", "k", "--node",
                                       f"127.0.0.1:{free_port()}"])
    assert result.exit_code == 1
    assert "no node answers" in result.stderr


def json_loads(text: str) -> Any:
    import json

    return json.loads(text)


def test_a_change_retried_after_a_lost_connection_says_how_long_ago_it_was_sent() -> None:
    """The node may have applied a change before its connection died: the retry on another
    node carries ``retry_ms`` so a strong keyspace can refuse to apply it twice."""
    async def main() -> None:
        rows: dict[Any, Any] = {}
        spaces = {"ks": KeyspaceInfo("ks", 3, "eventual", "QUORUM", "QUORUM")}
        seen: list[tuple[str, bytes, int]] = []
        servers: list[asyncio.Server] = []
        addresses: list[str] = []
        clients: list[AsyncClient] = []

        class Recording(DictKvService):
            def __init__(self, name: str) -> None:
                super().__init__(rows, spaces)
                self.name = name

            async def put(self, keyspace: str, key: bytes, value: bytes, sort: bytes = b"",
                          consistency: str | None = None, ttl_s: float | None = None,
                          idempotency: bytes = b"", fence: tuple[str, int] | None = None,
                          *, retry_ms: int = 0) -> int:
                seen.append((self.name, idempotency, retry_ms))
                if self.name == "a":  # dies with the request in hand
                    clients[0].seeds.append(addresses[1])  # the only other node it knows
                    await asyncio.sleep(0.05)
                    abort_connections(servers[0])
                    await asyncio.sleep(10)
                return await super().put(keyspace, key, value, sort, consistency, ttl_s,
                                         idempotency, fence)

        servers.append(await serve_clients(Recording("a"), "127.0.0.1", 0))
        servers.append(await serve_clients(Recording("b"), "127.0.0.1", 0))
        addresses.extend(f"127.0.0.1:{port_of(s)}" for s in servers)
        try:
            async with AsyncClient(addresses[:1], token_aware=False) as kv:
                clients.append(kv)  # knows only a until a has the put in hand
                await kv.put("ks", "k", b"v", idempotency=b"change-1")
            assert [(name, retry_ms > 0) for name, _, retry_ms in seen] == [
                ("a", False), ("b", True)]
            assert seen[0][1] == seen[1][1] == b"change-1"
            assert seen[1][2] >= 40  # it waited ~50 ms on a before the connection died
        finally:
            for server in servers:
                server.close()
                abort_connections(server)

    run(main())
