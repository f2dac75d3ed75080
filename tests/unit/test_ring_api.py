"""The operator's surface of ring changes: the RingRequest/RingReply messages and their
bounds, the ring status gathered over in-process nodes (native port, GET /api/ring,
metrics), refusals, and the CLI's ``ring status --json`` and ``node cleanup``."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest
from click.testing import CliRunner

from leaderless.api.client import ApiError, Client
from leaderless.api.messages import (
    TEXT_BYTES_MAX,
    WAITING_FOR_MAX,
    CleanupFigures,
    Reply,
    Request,
    RingMember,
    RingReply,
    RingReport,
    RingReportRequest,
    RingRequest,
    RingSummary,
    StreamFigures,
)
from leaderless.cli import main as cli_main
from leaderless.core.codec import FrameDecoder, MalformedInput, encode_frame
from leaderless.runtime.node import InboundFrame, Node
from leaderless.runtime.ring_status import ring_json
from tests.unit.test_metrics import Scrape
from tests.unit.test_runtime_node import make_node, run_test, wait_until

STREAM = StreamFigures(10, 4, 2, 123_456, 5000.0, 12.5)
CLEANUP = CleanupFigures(False, 7, 1_800_000_000.0)


def report(**fields: object) -> RingReport:
    values: dict[str, object] = dict(
        node="n1", state="leaving", token_count=256, next_token_count=0, replacing="",
        stream=STREAM, waiting_for=["n2"], waiting_more=0, error="", settled=True,
        cleanup=CLEANUP)
    values.update(fields)
    return RingReport(**values)  # type: ignore[arg-type]


def member(name: str, **fields: object) -> RingMember:
    values: dict[str, object] = dict(
        name=name, address="127.0.0.1:7000", state="normal", status="alive",
        token_count=256, next_token_count=0, replacing="", ownership=0.5, reported=True,
        stream=STREAM, cleanup=CLEANUP)
    values.update(fields)
    return RingMember(**values)  # type: ignore[arg-type]


def roundtrip(message: object, union: object) -> object:
    decoded: list[object] = FrameDecoder(union).feed(encode_frame(message))
    assert len(decoded) == 1
    return decoded[0]


def test_ring_messages_round_trip_on_their_sockets() -> None:
    for request in (RingRequest("status"), RingRequest("set_capacity", 2.5),
                    RingRequest("decommission"), RingRequest("cleanup")):
        assert roundtrip(request, Request) == request
        assert roundtrip(request, InboundFrame) == request  # the node port decodes it
    assert roundtrip(RingReportRequest(), InboundFrame) == RingReportRequest()
    assert roundtrip(report(), RingReport) == report()
    reply = RingReply("status", "n1", 1_800_000_000.0,
                      [member("n1"), member("n2", reported=False, stream=None, cleanup=None,
                                            error="no answer within 3 s")],
                      RingSummary(2, {"normal": 2}, False, 1, 10, 4, 123_456, 5000.0, 12.5))
    assert roundtrip(reply, Reply) == reply


def test_ring_messages_are_bounded() -> None:
    with pytest.raises(MalformedInput):
        roundtrip(RingRequest("rebalance"), Request)  # type: ignore[arg-type]
    too_many = report(waiting_for=[f"n{i}" for i in range(WAITING_FOR_MAX + 1)])
    with pytest.raises(MalformedInput):
        roundtrip(too_many, RingReport)
    with pytest.raises(MalformedInput):
        roundtrip(report(error="x" * (TEXT_BYTES_MAX + 1)), RingReport)
    with pytest.raises(MalformedInput):
        roundtrip(report(node=""), RingReport)


def test_ring_json_names_every_field() -> None:
    reply = RingReply("status", "n1", 1.0, [member("n1")],
                      RingSummary(1, {"normal": 1}, False, 0, 0, 0, 0, 0.0, None))
    result = ring_json(reply)
    assert json.loads(json.dumps(result)) == result
    assert result["members"][0]["stream"]["ranges_total"] == 10
    assert result["members"][0]["cleanup"]["deleted_rows"] == 7
    assert result["summary"]["states"] == {"normal": 1}
    assert set(result) == {"operation", "asked", "checked_at", "members", "summary"}


# -- over in-process nodes ----------------------------------------------------------------


async def start_two(tmp_path: Path) -> list[Node]:
    n1 = make_node(tmp_path, "n1", http="127.0.0.1:0")
    await n1.start()
    n2 = make_node(tmp_path, "n2", join=[n1.address])
    await n2.start()
    await wait_until(lambda: all(len([m for m in n.members() if m.meta.token_count]) == 2
                                 for n in (n1, n2)), "both see both on the ring")
    await wait_until(lambda: not any(n.kv is not None and n.kv.placement.changing
                                     for n in (n1, n2)), "the ring is stable")
    return [n1, n2]


def test_ring_status_gathers_every_member_over_the_node_port(tmp_path: Path) -> None:
    async def main() -> None:
        nodes = await start_two(tmp_path)
        n1, n2 = nodes
        try:
            async with Client(n2.address) as client:
                reply = await client.ring()
            assert n1.http_address is not None
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://{n1.http_address}/api/ring") as r:
                    assert r.status == 200
                    body = await r.json()
            scrape = Scrape(n1.metrics()[0])

            assert reply.operation == "status" and reply.asked == "n2"
            assert [m.name for m in reply.members] == ["n1", "n2"]
            for m in reply.members:
                assert (m.state, m.status, m.reported) == ("normal", "alive", True)
                assert m.token_count == 256 and m.next_token_count == 0
                assert m.stream is not None and m.cleanup is not None
                assert m.address in (str(n1.address), str(n2.address))
            assert sum(m.ownership for m in reply.members) == pytest.approx(1.0, abs=1e-3)
            assert reply.summary.members == 2 and reply.summary.states == {"normal": 2}
            assert not reply.summary.changing and reply.summary.streaming == 0

            assert body["asked"] == "n1"
            assert [m["name"] for m in body["members"]] == ["n1", "n2"]
            assert body["summary"]["states"] == {"normal": 2}

            assert scrape.value("leaderless_ring_state", state="normal") == 1
            assert scrape.value("leaderless_ring_state", state="leaving") == 0
            assert scrape.value("leaderless_ring_pending_ranges") == 0
            assert scrape.value("leaderless_cleanup_deleted_rows_total") == 0
        finally:
            await asyncio.gather(*(n.stop() for n in nodes))

    run_test(main())


def test_refusals_carry_the_nodes_reason(tmp_path: Path) -> None:
    async def main() -> None:
        nodes = await start_two(tmp_path)
        n1, _ = nodes
        try:
            assert n1.kv is not None
            await n1.kv.create_keyspace("app", replication=2)
            async with Client(n1.address) as client:
                with pytest.raises(ApiError, match="add a node first") as refused:
                    await client.ring("decommission")
                assert refused.value.code == "ring_refused"
                with pytest.raises(ApiError, match="out of range"):
                    await client.ring("set_capacity", 0.0)
                reply = await client.ring("set_capacity", 1.0)  # unchanged: nothing to do
                assert [m.next_token_count for m in reply.members] == [0, 0]
                reply = await client.ring("cleanup")  # a stable ring: allowed
                assert reply.operation == "cleanup"
            assert n1.ring is not None and n1.ring.fields["state"] == "normal"
        finally:
            await asyncio.gather(*(n.stop() for n in nodes))

    run_test(main())


def test_cli_ring_status_json_and_cleanup(tmp_path: Path) -> None:
    async def main() -> None:
        nodes = await start_two(tmp_path)
        n1, _ = nodes
        runner = CliRunner()
        try:
            status = await asyncio.to_thread(
                runner.invoke, cli_main, ["ring", "status", "--node", str(n1.address),
                                          "--json"])
            assert status.exit_code == 0, status.output
            body = json.loads(status.output)
            assert body["operation"] == "status" and body["asked"] == "n1"
            assert [(m["name"], m["state"], m["reported"]) for m in body["members"]] == [
                ("n1", "normal", True), ("n2", "normal", True)]
            assert set(body["summary"]) == {
                "members", "states", "changing", "streaming", "ranges_total", "ranges_done",
                "bytes_received", "bytes_per_s", "eta_s"}

            table = await asyncio.to_thread(
                runner.invoke, cli_main, ["ring", "status", "--node", str(n1.address)])
            assert table.exit_code == 0, table.output
            assert "n2" in table.output and "the ring is stable" in table.output

            cleaned = await asyncio.to_thread(
                runner.invoke, cli_main, ["node", "cleanup", "--node", str(n1.address)])
            assert cleaned.exit_code == 0, cleaned.output
            assert "n1: cleanup deleted 0 rows" in cleaned.output

            assert n1.kv is not None
            await n1.kv.create_keyspace("app", replication=2)
            refused = await asyncio.to_thread(
                runner.invoke, cli_main, ["node", "decommission", "--node", str(n1.address)])
            assert refused.exit_code == 1
            assert "the node refused" in refused.output and "add a node first" in refused.output
        finally:
            await asyncio.gather(*(n.stop() for n in nodes))

    run_test(main())
