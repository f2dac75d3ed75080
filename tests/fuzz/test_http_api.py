"""Fuzz the HTTP API of a real node (``api.http`` behind ``api.http_limits``) with random
methods, paths, query strings, headers and bodies, and with damaged raw requests.

Properties: every answer is a 4xx, a success, or one of the 5xx a well-formed request
can meet on a one-node cluster (``unavailable``/``overloaded``/``contention``/``timeout``,
e.g. a lock in a keyspace of replication 3) — never a 500; a raw request that does not
parse is answered 4xx or closed; the node logs no error; memory stays bounded.
"""

from __future__ import annotations

import asyncio
import gc
import random
import re
import tracemalloc
from typing import Any
from urllib.parse import quote_from_bytes

import aiohttp
import msgspec
from hypothesis import given
from hypothesis import strategies as st
from yarl import URL

from tests.fuzz.conftest import LiveNode
from tests.fuzz.shapes import mutated, settings_for

REQUEST_TIMEOUT_S = 10.0
STREAM_READ_S = 0.3
"""A body still coming after this long is a stream (a watch, the dashboard's events)."""
SERVER_SIDE_5XX = {"unavailable", "overloaded", "contention", "timeout"}
"""5xx codes that say the cluster cannot serve a well-formed request now, not a bug."""

ROUTES = ["/v1/kv/", "/v1/scan/", "/v1/cas/", "/v1/incr/", "/v1/keyspaces", "/v1/ring",
          "/v1/locks/", "/v1/watch/", "/v1/auth/login", "/v1/auth/logout",
          "/v1/auth/whoami", "/v1/auth/users", "/", "/metrics", "/health", "/v1/status",
          "/v1/logs", "/static/app.js", "/v2/kv/", "//", "/v1/kv"]
PARAMS = ["sort", "consistency", "ttl", "fence", "format", "start", "end", "limit",
          "expected_version", "expected_value", "expected_absent", "idempotency", "delta",
          "prefix", "since_version", "ttl", "owner", "token", "wait", "name", "x", ""]
VALUES = st.one_of(
    st.sampled_from(["ONE", "QUORUM", "ALL", "one", "json", "raw", "1", "0", "-1", "1e308",
                     "nan", "inf", "9" * 30, "lock:7", ":", "true", ""]),
    st.binary(max_size=12).map(lambda b: quote_from_bytes(b, safe="")),
    st.text(max_size=12).map(lambda t: quote_from_bytes(t.encode(), safe="")),
)
segments = st.one_of(st.sampled_from(["fz", "fzs", "fz", "fzs", "missing", "system_locks",
                                      "", "%", "%ZZ", "..", "%2F", "%00", "a" * 300]),
                     st.binary(min_size=1, max_size=10).map(
                         lambda b: quote_from_bytes(b, safe="")))
methods = st.sampled_from(["GET", "PUT", "POST", "DELETE", "HEAD", "PATCH", "OPTIONS",
                           "TRACE", "PROPFIND"])
headers = st.dictionaries(
    st.sampled_from(["Content-Type", "Authorization", "Cookie", "Last-Event-ID", "Accept",
                     "X-Request-Id", "Origin", "Range", "If-None-Match", "Expect"]),
    st.one_of(st.sampled_from(["application/json", "text/plain", "Bearer ", "Bearer x.y.z",
                               "leaderless_token=abc", "bytes=0-1", "*/*", "100-continue"]),
              st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)),
    max_size=2)
bodies = st.one_of(
    st.just(b""), st.binary(max_size=200),
    st.fixed_dictionaries({"name": st.sampled_from(["fzx", "Fz_2", "", "1bad", "a" * 60]),
                           "replication": st.integers(-1, 20),
                           "mode": st.sampled_from(["eventual", "strong", "x", ""])},
                          optional={"if_not_exists": st.booleans(),
                                    "read_consistency": st.sampled_from(["ONE", "nope"]),
                                    "user": st.text(max_size=8),
                                    "password": st.text(max_size=8),
                                    "extra": st.integers()}).map(msgspec.json.encode),
)


ENDPOINTS = [("PUT", "/v1/kv/{ks}/{key}"), ("GET", "/v1/kv/{ks}/{key}"),
             ("DELETE", "/v1/kv/{ks}/{key}"), ("HEAD", "/v1/kv/{ks}/{key}"),
             ("GET", "/v1/scan/{ks}/{key}"), ("POST", "/v1/cas/{ks}/{key}"),
             ("POST", "/v1/incr/{ks}/{key}"), ("POST", "/v1/keyspaces"),
             ("GET", "/v1/keyspaces"), ("GET", "/v1/ring"), ("POST", "/v1/locks/{key}"),
             ("PUT", "/v1/locks/{key}"), ("DELETE", "/v1/locks/{key}"),
             ("GET", "/v1/locks/{key}"), ("GET", "/v1/watch/{ks}/{key}"),
             ("POST", "/v1/auth/login"), ("POST", "/v1/auth/logout"),
             ("GET", "/v1/auth/whoami")]
"""Real routes with their methods: three requests in four aim at one, so most get past
routing into the handlers' parsing and the data plane."""


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, dict[str, str], bytes]:
    if draw(st.integers(0, 3)):
        method, template = draw(st.sampled_from(ENDPOINTS))
        path = template.format(ks=draw(segments), key=draw(segments))
    else:
        method = draw(methods)
        path = draw(st.sampled_from(ROUTES)) + "/".join(draw(st.lists(segments, max_size=3)))
    params = draw(st.lists(st.tuples(st.sampled_from(PARAMS), VALUES), max_size=3))
    query = "&".join(f"{name}={value}" if value != "" or draw(st.booleans()) else name
                     for name, value in params if name != "wait")
    if any(name == "wait" for name, _ in params):  # an acquire may wait: keep it short
        query += "&wait=0.01"
    target = path + (f"?{query}" if query else "")
    return method, target, draw(headers), draw(bodies)


async def call(port: int, method: str, target: str, head: dict[str, str],
               body: bytes) -> tuple[int, bytes]:
    url = URL(f"http://127.0.0.1:{port}{target}", encoded=True)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
        async with session.request(method, url, headers=head, data=body or None,
                                   allow_redirects=False) as response:
            try:
                async with asyncio.timeout(STREAM_READ_S):
                    data = await response.read()
            except TimeoutError:
                data = b""  # a stream: its status is what we check
            return response.status, data


def assert_no_server_bug(status: int, body: bytes, what: object) -> None:
    if status < 500:
        return
    try:
        code = msgspec.json.decode(body).get("error")
    except (msgspec.DecodeError, AttributeError):
        code = None
    code = code.get("code") if isinstance(code, dict) else code
    assert status in (503, 504) and code in SERVER_SIDE_5XX, (what, status, body[:300])


def test_random_requests_never_get_a_server_error(live_node: LiveNode) -> None:
    @settings_for(400)
    @given(requests())
    def check(request: tuple[str, str, dict[str, str], bytes]) -> None:
        errors_before = len(live_node.errors)
        status, body = live_node.run(call(live_node.http_port, *request),
                                     REQUEST_TIMEOUT_S + 5)
        assert_no_server_bug(status, body, request)
        assert live_node.errors[errors_before:] == []

    check()


def valid_raw(method: str, target: str, body: bytes) -> bytes:
    return (f"{method} {target} HTTP/1.1\r\nHost: fuzz\r\nContent-Length: {len(body)}\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + body


async def exchange(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        writer.write_eof()
        out = bytearray()
        try:
            async with asyncio.timeout(STREAM_READ_S * 3):
                while chunk := await reader.read(65536):
                    out += chunk
        except TimeoutError:
            pass  # a stream, or a request still waiting for the body it was promised
        return bytes(out)
    except (ConnectionResetError, BrokenPipeError):
        return b""
    finally:
        writer.close()


def statuses(response: bytes) -> list[tuple[int, bytes]]:
    """(status, body start) of each response on a raw connection (pipelined requests)."""
    found = []
    for part in re.split(rb"HTTP/1\.[01] ", response)[1:]:
        status = part[:3]
        if status.isdigit():
            found.append((int(status), part.split(b"\r\n\r\n", 1)[-1][:500]))
    return found


def test_damaged_raw_requests_get_4xx_or_are_closed(live_node: LiveNode) -> None:
    raw = st.builds(valid_raw, methods, st.sampled_from(["/v1/kv/fz/k", "/v1/keyspaces",
                                                         "/v1/scan/fz/k?limit=2", "/v1/ring",
                                                         "/v1/cas/fzs/k?expected_absent=1"]),
                    st.binary(max_size=40))

    @settings_for(250)
    @given(raw.flatmap(mutated) | st.binary(max_size=300))
    def check(data: bytes) -> None:
        errors_before = len(live_node.errors)
        response = live_node.run(exchange(live_node.http_port, data), 30)
        for status, body in statuses(response):
            assert_no_server_bug(status, body, data)
        assert live_node.errors[errors_before:] == []

    check()


def hostile_request(rng: random.Random) -> bytes:
    kind = rng.randrange(5)
    if kind == 0:  # promises a huge body, sends a sliver
        return (b"PUT /v1/kv/fz/k HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n"
                + rng.randbytes(rng.randrange(4096)))
    if kind == 1:  # a header line past the limit
        return b"GET /v1/ring HTTP/1.1\r\nX-Big: " + b"a" * rng.randrange(8000, 70000) + b"\r\n\r\n"
    if kind == 2:  # too many headers
        return b"GET /v1/ring HTTP/1.1\r\n" + b"".join(
            b"X-%d: v\r\n" % i for i in range(rng.randrange(100, 400))) + b"\r\n"
    if kind == 3:  # a request line past the limit
        return b"GET /v1/kv/fz/" + b"k" * rng.randrange(8000, 40000) + b" HTTP/1.1\r\n\r\n"
    return rng.randbytes(rng.randrange(1, 3000))


def test_memory_stays_bounded_over_many_hostile_requests(live_node: LiveNode) -> None:
    rng = random.Random(20261126)

    async def batch(count: int) -> list[tuple[int, bytes]]:
        seen: list[tuple[int, bytes]] = []
        for _ in range(count):
            seen += statuses(await exchange(live_node.http_port, hostile_request(rng)))
        return seen

    live_node.run(batch(50), 120)
    gc.collect()
    tracemalloc.start()
    try:
        baseline, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        seen = live_node.run(batch(150), 240)
        gc.collect()
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    for status, body in seen:
        assert_no_server_bug(status, body, "hostile request")
    assert peak - baseline < 32 * 1024 * 1024, (baseline, peak)
    assert current - baseline < 8 * 1024 * 1024, (baseline, current)
    assert live_node.errors == []


def test_node_still_answers_after_the_fuzzing(live_node: LiveNode) -> None:
    status, body = live_node.run(call(live_node.http_port, "GET", "/v1/keyspaces", {}, b""))
    assert status == 200
    names: Any = [k["name"] for k in msgspec.json.decode(body)["keyspaces"]]
    assert "fz" in names and "fzs" in names
