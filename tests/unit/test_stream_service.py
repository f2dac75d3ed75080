"""Range streaming between in-process nodes over real TCP: a node fetches a range from two
peers page by page and ends with the newest of every row; a stopped source is replaced."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from leaderless.core.cells import Cell, decode_cell
from leaderless.core.keys import data_key
from leaderless.core.paxos import decode_state, encode_state, paxos_key
from leaderless.core.paxos_messages import AcceptorState, Ballot, Register
from leaderless.core.streaming import RangeFetch, StreamConfig
from leaderless.runtime.node import Node
from leaderless.runtime.streaming import StreamService
from tests.unit.test_runtime_node import run_test, start_cluster, stop_all

KS = "streamed"
ROWS = 300
WHOLE_RING = (0, 0)
"""(0, 0] wraps all the way round: every token."""


def put(node: Node, i: int, hlc: int, value: bytes) -> None:
    assert node.kv is not None
    writes = node.kv.replica.apply(KS, f"key{i}".encode(), b"", Cell(hlc, node.name, value))
    node.kv.store.write(writes)


def cell(node: Node, i: int) -> Cell | None:
    assert node.kv is not None
    raw = node.kv.store.get(data_key(KS, f"key{i}".encode()))
    return decode_cell(raw) if raw is not None else None


def small_pages(node: Node, timeout_s: float = 10.0) -> StreamService:
    """Swap in a fetcher with small pages, so a few hundred rows take many pages."""
    assert node.kv is not None
    node.kv.streaming.close()
    config = StreamConfig(page_bytes=2000, request_timeout_s=timeout_s,
                          retry_backoff_s=timeout_s)
    node.kv.streaming = StreamService(node.kv, config, random.Random(7))
    return node.kv.streaming


def test_a_node_fetches_a_range_from_two_peers_over_tcp(tmp_path: Path) -> None:
    async def main() -> None:
        nodes = await start_cluster(tmp_path, 3)
        try:
            n1, n2, n3 = nodes
            for i in range(ROWS):
                put(n1, i, 1000 + i, b"one" * 10)
                if i % 3 == 0:
                    put(n2, i, 5000 + i, b"two" * 10)  # newer on n2
            put(n3, 7, 99_999, b"mine")  # newer here than on either source
            assert n1.kv is not None and n2.kv is not None and n3.kv is not None
            strong = paxos_key(KS, b"strong", b"")
            n1.kv.store.write([(strong, encode_state(AcceptorState(
                Ballot(9, "n1"), Ballot(3, "n1"), Register(1, b"old"))))])
            n2.kv.store.write([(strong, encode_state(AcceptorState(
                Ballot(4, "n2"), Ballot(4, "n2"), Register(2, b"new"))))])

            service = small_pages(n3)
            service.set_plan([RangeFetch(KS, *WHOLE_RING, ("n1", "n2"), 2)])
            await asyncio.wait_for(service.wait_done(), 30)

            for i in range(ROWS):
                if i == 7:
                    assert cell(n3, i) == Cell(99_999, "n3", b"mine")
                elif i % 3 == 0:
                    assert cell(n3, i) == Cell(5000 + i, "n2", b"two" * 10)
                else:
                    assert cell(n3, i) == Cell(1000 + i, "n1", b"one" * 10)
            raw = n3.kv.store.get(strong)
            assert raw is not None
            assert decode_state(raw) == AcceptorState(Ballot(9, "n1"), Ballot(4, "n2"),
                                                      Register(2, b"new"))
            progress = service.progress()
            assert (progress.ranges_total, progress.ranges_done) == (1, 1)
            assert set(progress.bytes_by_source) == {"n1", "n2"}
            counters = n3.kv.counters()
            assert counters["stream_pages_in"] > 10
            assert counters["stream_ranges_done"] == 1
            assert n1.kv.counters()["stream_pages_served"] > 0
            assert n1.kv.counters()["stream_bytes_out"] > 0
            service.forget_progress()
            assert list(n3.kv.store.scan(b"s", b"t")) == []
        finally:
            await stop_all(nodes)

    run_test(main())


def test_a_stopped_source_is_replaced_by_the_next(tmp_path: Path) -> None:
    async def main() -> None:
        nodes = await start_cluster(tmp_path, 3)
        try:
            n1, n2, n3 = nodes
            for i in range(50):
                put(n1, i, 100 + i, b"x")
                put(n2, i, 100 + i, b"x")
            await n1.stop()
            service = small_pages(n3, timeout_s=0.5)
            service.set_plan([RangeFetch(KS, *WHOLE_RING, ("n1", "n2"), 1)])
            await asyncio.wait_for(service.wait_done(), 30)
            assert all(cell(n3, i) == Cell(100 + i, "n2", b"x") for i in range(50))
            assert service.fetcher.counters.timeouts >= 1
            assert set(service.progress().bytes_by_source) == {"n2"}
        finally:
            await stop_all(nodes)

    run_test(main())
