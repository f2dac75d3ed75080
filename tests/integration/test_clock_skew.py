"""A node whose clock is beyond the skew bound (the test-only fault hook
``LEADERLESS_FAULT_CLOCK_SKEW_MS``) refuses to coordinate strong operations and lock
leases with ``clock_skew``; the other nodes are unaffected, and so is eventual mode.

Requests go over HTTP, which is served by exactly the node asked (the native client would
discover the ring and could send a request to another node); one native call checks that
the client library raises ``ClockSkewError``."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import pytest

from leaderless.api.kv_messages import Failure, Put
from leaderless.client import ClockSkewError
from leaderless.client.connection import NodeConnection
from leaderless.client.errors import error_for
from leaderless.config import parse_host_port
from leaderless.core.locks import CLOCK_SKEW_MAX_MS
from leaderless.runtime.ports import free_port
from leaderless.runtime.wall_clock import FAULT_CLOCK_SKEW_ENV
from tests.integration.helpers import DEADLINE_S, NodeProcess, Processes, wait_until
from tests.integration.test_ops import get

pytestmark = pytest.mark.integration


class Api:
    """One node's HTTP API."""

    def __init__(self, node: NodeProcess, client: str, url: str) -> None:
        self.node, self.client, self.url = node, client, url

    def call(self, method: str, path: str, body: bytes = b"") -> tuple[int, dict[str, object]]:
        request = urllib.request.Request(self.url + path, data=body or None, method=method)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def strong_and_lock_ops(self, tag: str) -> list[tuple[int, dict[str, object]]]:
        """A strong put, cas, incr and lock acquire coordinated by this node; replies."""
        return [self.call("PUT", f"/v1/kv/s/put-{tag}", b"v"),
                self.call("POST", f"/v1/cas/s/cas-{tag}?expected_absent=1", b"v"),
                self.call("POST", f"/v1/incr/s/n-{tag}"),
                self.call("POST", f"/v1/locks/job-{tag}?ttl=30&owner=o-{tag}")]


def start_cluster(processes: Processes, skew_ms: int) -> list[Api]:
    """Three nodes, the last with its clock shifted by ``skew_ms``, ready and seeing each
    other alive, with keyspaces ``s`` (strong) and ``e`` (eventual)."""
    apis = []
    for name, skew in (("good1", 0), ("good2", 0), ("skewed", skew_ms)):
        client, http = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        env = {FAULT_CLOCK_SKEW_ENV: str(skew)} if skew else None
        node = processes.start_node(name, None, apis[0].node.address if apis else None, env,
                                    "--client", client, "--http", http,
                                    "--log-level", "warning")
        apis.append(Api(node, client, f"http://{http}"))
        if len(apis) == 1:  # the seed first: the others join without a refused attempt
            wait_until(lambda: get(apis[0].url + "/health/live")[0] == 200, "seed is live")
    wait_until(lambda: all(get(a.url + "/health/ready")[0] == 200 for a in apis)
               and all(sum(m.state == "alive" for m in a.node.members().values()) == 3
                       for a in apis), "all nodes are ready and see each other alive")
    assert apis[0].call("POST", "/v1/keyspaces", b'{"name": "s", "mode": "strong"}')[0] == 201
    assert apis[0].call("POST", "/v1/keyspaces", b'{"name": "e"}')[0] == 201
    return apis


def clock_refusal(api: Api, skew_ms: int) -> str:
    """Strong puts through ``api`` until one is refused for the clock with an offset
    within 100 ms of ``skew_ms``; its message. (A few probe rounds measure the peers: with
    one peer measured, the node sees half the skew, as a node of two would.)"""
    found: list[str] = []

    def refused() -> bool:
        status, body = api.call("PUT", "/v1/kv/s/probe", b"v")
        if body.get("error") != "clock_skew":
            return False
        assert status == 503
        message = str(body["message"])
        measured_ms = int(message.split("clock is ")[1].split(" ms")[0])
        if abs(measured_ms - abs(skew_ms)) < 100:
            found.append(message)
        return bool(found)

    wait_until(refused, f"the skewed node refuses a strong put, naming ~{skew_ms} ms")
    return found[0]


def native_put(client: str, keyspace: str) -> Exception | None:
    """A put over one native connection to exactly this node: its error, or None."""
    address = parse_host_port(client)

    async def go() -> Exception | None:
        conn = await NodeConnection.open(address.host, address.port, DEADLINE_S)
        try:
            reply = await conn.call(Put, (keyspace, b"native", b"v"), DEADLINE_S)
        finally:
            conn.close()
        return error_for(reply.code, reply.message) if isinstance(reply, Failure) else None

    return asyncio.run(go())


@pytest.mark.timeout(120)
def test_a_clock_ahead_beyond_the_bound_refuses_strong_operations_and_leases(
        processes: Processes) -> None:
    good1, good2, skewed = start_cluster(processes, 2000)
    warnings = [line for line in skewed.node.log() if line.get("msg") == "fault_clock_skew"]
    assert warnings and (warnings[0]["level"], warnings[0]["skew_ms"]) == ("warning", 2000)

    message = clock_refusal(skewed, 2000)
    assert f"ms ahead of its peers' (the bound is {CLOCK_SKEW_MAX_MS} ms)" in message
    assert "check NTP on this host" in message
    for status, body in skewed.strong_and_lock_ops("skewed"):
        assert (status, body["error"]) == (503, "clock_skew"), body
    assert isinstance(native_put(skewed.client, "s"), ClockSkewError)
    # The other two nodes coordinate the same operations, the skewed one as a replica.
    for api in (good1, good2):
        for status, body in api.strong_and_lock_ops(api.node.name):
            assert status == 200, body
    # Eventual mode: the skewed node still coordinates writes. Its replicas refuse cells
    # stamped 2 s in their future (the hybrid clock's own bound, which keeps a fast clock
    # from winning last-writer-wins), so such a write reaches ONE, its own replica.
    assert skewed.call("PUT", "/v1/kv/e/k?consistency=ONE", b"v")[0] == 200
    assert good1.call("PUT", "/v1/kv/e/k2", b"v")[0] == 200  # QUORUM through a good node
    assert skewed.call("GET", "/v1/kv/e/k2?format=json")[0] == 200
    lines = [line for line in skewed.node.log() if line.get("msg") == "refused_clock_skew"]
    assert lines and "check NTP" in lines[0]["error"]


@pytest.mark.timeout(120)
def test_a_clock_behind_beyond_the_bound_refuses_strong_but_writes_eventual(
        processes: Processes) -> None:
    good1, _, skewed = start_cluster(processes, -2000)
    assert "ms behind its peers'" in clock_refusal(skewed, -2000)
    for status, body in skewed.strong_and_lock_ops("skewed"):
        assert (status, body["error"]) == (503, "clock_skew"), body
    for status, body in good1.strong_and_lock_ops("good1"):
        assert status == 200, body
    # Its stamps are in the others' past: they take its eventual writes at QUORUM.
    assert skewed.call("PUT", "/v1/kv/e/k", b"v")[0] == 200
    assert good1.call("GET", "/v1/kv/e/k?format=json")[0] == 200


@pytest.mark.timeout(120)
def test_a_skew_within_the_bound_changes_nothing(processes: Processes) -> None:
    skew_ms = CLOCK_SKEW_MAX_MS * 3 // 5  # 300 ms: past the doctor's warning, in bound
    good1, _, skewed = start_cluster(processes, skew_ms)
    # Probes measured it: the doctor warns about the skewed node's clock, no more.
    wait_until(lambda: len(clock_findings(good1)) == 2, "the doctor sees the skewed clock")
    for finding in clock_findings(good1):
        assert finding["severity"] == "warning" and "skewed" in str(finding["subject"])
        assert "skewed's clock is" in str(finding["message"]), finding
    # It coordinates everything, strong and eventual (QUORUM), as the others do.
    for status, body in skewed.strong_and_lock_ops("skewed"):
        assert status == 200, body
    assert skewed.call("PUT", "/v1/kv/e/k", b"v")[0] == 200
    assert native_put(skewed.client, "s") is None


def clock_findings(api: Api) -> list[dict[str, object]]:
    """The clock findings of ``leaderless doctor`` asked at ``api``."""
    status, body = api.call("GET", "/api/doctor")
    assert status == 200, body
    findings = body["findings"]
    assert isinstance(findings, list)
    return [f for f in findings if f["check"] == "clock"]
