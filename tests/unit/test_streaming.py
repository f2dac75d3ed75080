"""Range streaming between in-memory stores: a fetcher reads ranges page by page from real
page servers (``serve_page``) through a tiny message pump over simulated time, and merges
what it reads into its own store through the replica write path."""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable

import msgspec
import pytest

from leaderless.core.cells import Cell, decode_cell, encode_cell
from leaderless.core.hints import HintLog
from leaderless.core.keys import TOKEN_MAX, data_key, parse_data_key, token
from leaderless.core.paxos import decode_state, encode_state, paxos_key
from leaderless.core.paxos_messages import AcceptorState, Ballot, Register
from leaderless.core.replica import Replica
from leaderless.core.ring import TokenRange
from leaderless.core.streaming import (
    PROGRESS_PREFIX,
    ApplyStreamRows,
    Fetcher,
    RangeFetch,
    SendStream,
    StreamConfig,
    StreamEffect,
    merge_acceptor,
    merge_rows,
    page_checksum,
    serve_page,
)
from leaderless.core.streaming_messages import (
    StreamMessage,
    StreamPage,
    StreamRequest,
    StreamRow,
)
from leaderless.storage.memory import MemoryStore

KS = "ks"
WRAP = (3 << 62, 1 << 62)
"""A range that wraps past TOKEN_MAX: (0.75, 1] and [0, 0.25] of the ring."""
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(StreamMessage)


def keys_in(rng: tuple[int, int], count: int, inside: bool = True, tag: str = "k") -> list[bytes]:
    """``count`` partition keys whose tokens are (or are not) in ``rng``."""
    span = TokenRange(*rng)
    found: list[bytes] = []
    i = 0
    while len(found) < count:
        key = f"{tag}{i}".encode()
        if span.contains(token(key)) == inside:
            found.append(key)
        i += 1
    return found


def put_cell(store: MemoryStore, key: bytes, hlc: int, value: bytes, writer: str = "w") -> None:
    store.write([(data_key(KS, key), encode_cell(Cell(hlc, writer, value)))])


def cell_of(store: MemoryStore, key: bytes) -> Cell | None:
    raw = store.get(data_key(KS, key))
    return decode_cell(raw) if raw is not None else None


def data_rows(store: MemoryStore, within: tuple[int, int] | None = None) -> dict[bytes, bytes]:
    """The data rows of ``store`` (whose tokens are in range ``within``)."""
    rows = dict(store.scan(b"d", b"e"))
    if within is None:
        return rows
    span = TokenRange(*within)
    return {k: v for k, v in rows.items() if span.contains(parse_data_key(k)[1])}


class Pump:
    """Delivers the fetcher's requests to the sources' page servers (over msgpack, like the
    wire) one at a time, advancing simulated time by ``latency_s`` per delivery, and applies
    its effects to ``store`` as the runtime does (merge and progress in one batch, then the
    follow-up effects)."""

    def __init__(self, sources: dict[str, MemoryStore], config: StreamConfig,
                 store: MemoryStore | None = None, latency_s: float = 0.001) -> None:
        self.sources = sources
        self.config = config
        self.store = store if store is not None else MemoryStore()
        self.replica = Replica(self.store, HintLog(self.store))
        self.fetcher = Fetcher("me", config, self.store)
        self.queue: deque[tuple[str, StreamRequest]] = deque()
        self.now = 0.0
        self.latency_s = latency_s
        self.silent: set[str] = set()
        self.tamper: Callable[[str, StreamPage], StreamPage] = lambda _, page: page
        self.asked: list[tuple[str, StreamRequest]] = []
        self.received: list[tuple[float, int]] = []
        """(now, bytes received so far) after each page."""

    def plan(self, fetches: list[RangeFetch]) -> None:
        self.execute(self.fetcher.set_plan(self.now, fetches))

    def execute(self, effects: list[StreamEffect]) -> None:
        for effect in effects:
            if isinstance(effect, SendStream):
                request = _decoder.decode(_encoder.encode(effect.message))
                assert isinstance(request, StreamRequest)
                self.queue.append((effect.to, request))
                self.asked.append((effect.to, request))
            else:
                assert isinstance(effect, ApplyStreamRows)
                writes = merge_rows(self.store, effect.rows, self.replica.apply)
                self.store.write(writes + effect.progress)
                self.execute(effect.then)

    def step(self) -> None:
        if self.queue:
            to, request = self.queue.popleft()
            self.now += self.latency_s
            if to in self.silent:
                return
            page = self.tamper(to, serve_page(self.sources[to], request, self.config))
            page = _decoder.decode(_encoder.encode(page))
            assert isinstance(page, StreamPage)
            self.execute(self.fetcher.on_message(self.now, to, page))
            self.received.append((self.now, self.fetcher.counters.bytes_received))
            return
        deadline = self.fetcher.next_deadline()
        assert deadline != float("inf"), "the fetcher is stuck: nothing to wait for"
        self.now = max(self.now, deadline)
        self.execute(self.fetcher.on_tick(self.now))

    def run(self, steps_max: int = 100_000) -> None:
        for _ in range(steps_max):
            if self.fetcher.done():
                return
            self.step()
        raise AssertionError("the fetch did not finish")


SMALL = StreamConfig(page_bytes=600, page_rows=8)
"""Pages of a few rows, so every fetch below takes many pages."""


def test_wrapping_range_from_two_sources_merges_newest_wins() -> None:
    a, b = MemoryStore(), MemoryStore()
    inside = keys_in(WRAP, 60)
    outside = keys_in(WRAP, 20, inside=False)
    for i, key in enumerate(inside):
        put_cell(a, key, 100 + i, b"a")
        if i % 2 == 0:
            put_cell(b, key, 200 + i, b"b")  # newer on b
        if i % 3 == 0:
            put_cell(b, key, 50, b"old", writer="x")  # older on b: a must win
    for key in outside:
        put_cell(a, key, 999, b"outside")
        put_cell(b, key, 999, b"outside")
    pump = Pump({"a": a, "b": b}, SMALL)
    put_cell(pump.store, inside[1], 10_000, b"mine")  # newer here than anywhere
    put_cell(pump.store, inside[4], 1, b"stale")  # older here than both
    pump.plan([RangeFetch(KS, *WRAP, ("a", "b"), 2)])
    pump.run()

    for i, key in enumerate(inside):
        expected = newest_of(a, b, key)
        if i == 1:
            expected = Cell(10_000, "w", b"mine")
        assert cell_of(pump.store, key) == expected, i
    assert all(cell_of(pump.store, key) is None for key in outside)
    # Both sources were read to the end, in many pages, spread over both.
    assert pump.fetcher.counters.pages_received > 10
    assert {to for to, _ in pump.asked} == {"a", "b"}
    progress = pump.fetcher.progress()
    assert (progress.ranges_total, progress.ranges_done, progress.fraction_done) == (1, 1, 1.0)
    assert progress.rows_received == 60 + len(data_rows(b)) - 20
    assert set(progress.bytes_by_source) == {"a", "b"}


def newest_of(*stores_and_key: object) -> Cell | None:
    *stores, key = stores_and_key
    assert isinstance(key, bytes)
    cells = [cell_of(s, key) for s in stores if isinstance(s, MemoryStore)]
    best = None
    for cell in cells:
        if cell is not None and cell.newer_than(best):
            best = cell
    return best


def state(promised: int, accepted: int | None = None, value: bytes = b"") -> AcceptorState:
    return AcceptorState(Ballot(promised, "n"),
                         Ballot(accepted, "n") if accepted is not None else None,
                         Register(1, value) if accepted is not None else None)


def put_state(store: MemoryStore, key: bytes, acceptor: AcceptorState) -> None:
    store.write([(paxos_key(KS, key, b""), encode_state(acceptor))])


def state_of(store: MemoryStore, key: bytes) -> AcceptorState | None:
    raw = store.get(paxos_key(KS, key, b""))
    return decode_state(raw) if raw is not None else None


def test_merge_acceptor_takes_the_highest_promise_and_the_highest_accepted_ballot() -> None:
    assert merge_acceptor(state(5, 3, b"x"), state(4, 4, b"y")) == AcceptorState(
        Ballot(5, "n"), Ballot(4, "n"), Register(1, b"y"))
    assert merge_acceptor(state(9), state(4, 4, b"y")) == AcceptorState(
        Ballot(9, "n"), Ballot(4, "n"), Register(1, b"y"))
    assert merge_acceptor(state(7, 6, b"x"), state(8)) == AcceptorState(
        Ballot(8, "n"), Ballot(6, "n"), Register(1, b"x"))


def test_paxos_states_merge_by_ballot() -> None:
    a, b = MemoryStore(), MemoryStore()
    k1, k2, k3, k4 = keys_in(WRAP, 4)
    (out,) = keys_in(WRAP, 1, inside=False)
    put_state(a, k1, state(5, 3, b"x"))
    put_state(b, k1, state(4, 4, b"y"))  # higher accepted on b, higher promise on a
    put_state(a, k2, state(2, 2, b"only-a"))
    put_state(b, k3, state(3, 3, b"b"))
    put_state(a, k4, state(1, 1, b"old"))
    put_state(a, out, state(9, 9, b"outside"))
    put_cell(a, k1, 5, b"eventual row too")
    pump = Pump({"a": a, "b": b}, SMALL)
    put_state(pump.store, k3, state(6))  # promised more here, accepted nothing
    put_state(pump.store, k4, state(2, 2, b"newer here"))
    pump.plan([RangeFetch(KS, *WRAP, ("a", "b"), 2)])
    pump.run()

    assert state_of(pump.store, k1) == AcceptorState(Ballot(5, "n"), Ballot(4, "n"),
                                                     Register(1, b"y"))
    assert state_of(pump.store, k2) == state(2, 2, b"only-a")
    assert state_of(pump.store, k3) == AcceptorState(Ballot(6, "n"), Ballot(3, "n"),
                                                     Register(1, b"b"))
    assert state_of(pump.store, k4) == state(2, 2, b"newer here")
    assert state_of(pump.store, out) is None
    assert cell_of(pump.store, k1) == Cell(5, "w", b"eventual row too")


def filled(count: int, rng: tuple[int, int] = WRAP, value: bytes = b"v" * 40,
           tag: str = "k") -> MemoryStore:
    store = MemoryStore()
    for i, key in enumerate(keys_in(rng, count, tag=tag)):
        put_cell(store, key, 1 + i, value)
    return store


def test_a_corrupt_page_is_retried_and_counted() -> None:
    source = filled(40)
    pump = Pump({"a": source}, SMALL)
    corrupted: list[int] = []

    def corrupt_once(to: str, page: StreamPage) -> StreamPage:
        if len(corrupted) == 0 and pump.fetcher.counters.pages_received == 3:
            corrupted.append(page.id)
            rows = list(page.rows)
            rows[0] = StreamRow(rows[0].key, rows[0].value[:-1] + b"X")
            return StreamPage(page.id, rows, page.next_after, page.checksum)
        return page

    pump.tamper = corrupt_once
    pump.plan([RangeFetch(KS, *WRAP, ("a",), 1)])
    pump.run()
    assert corrupted and pump.fetcher.counters.checksum_failures == 1
    assert pump.fetcher.counters.source_switches == 0  # one bad page: same source again
    assert data_rows(pump.store) == data_rows(source)
    # The bad page's cursor was asked twice, from the same source.
    afters = [request.after for to, request in pump.asked]
    assert len(afters) == len(set(afters)) + 1


def test_a_source_that_keeps_sending_bad_pages_is_replaced() -> None:
    a, b = filled(30), filled(30)
    pump = Pump({"a": a, "b": b}, SMALL)
    pump.tamper = lambda to, page: (StreamPage(page.id, [], None, 0, "disk on fire")
                                    if to == "a" else page)
    pump.plan([RangeFetch(KS, *WRAP, ("a", "b"), 1)])
    pump.run()
    assert pump.fetcher.counters.page_errors == SMALL.page_failures_max
    assert pump.fetcher.counters.source_switches == 1
    assert data_rows(pump.store) == data_rows(b)


def test_a_silent_source_times_out_and_another_is_used() -> None:
    a, b, c = filled(30), filled(30), filled(30)
    put_cell(a, keys_in(WRAP, 1, tag="only-a")[0], 5, b"a")
    pump = Pump({"a": a, "b": b, "c": c}, SMALL)
    pump.silent.add("a")
    pump.plan([RangeFetch(KS, *WRAP, ("a", "b", "c"), 2)])
    first = {to for to, _ in pump.asked}
    assert first == {"a", "b"}  # the two preferred sources first
    pump.run()
    assert pump.fetcher.counters.timeouts == 1
    assert pump.fetcher.counters.source_switches == 1
    assert [to for to, _ in pump.asked].count("a") == 1
    assert data_rows(pump.store) == data_rows(b) == data_rows(c)
    assert pump.now >= SMALL.request_timeout_s  # (simulated time: it did wait)


def test_a_late_page_after_a_timeout_is_ignored() -> None:
    source = filled(10)
    pump = Pump({"a": source, "b": filled(10)}, SMALL)
    pump.plan([RangeFetch(KS, *WRAP, ("a", "b"), 1)])
    (to, request), = pump.queue
    pump.queue.clear()
    effects = pump.fetcher.on_tick(SMALL.request_timeout_s + 1)
    assert pump.fetcher.counters.timeouts == 1
    late = serve_page(source, request, SMALL)
    assert pump.fetcher.on_message(SMALL.request_timeout_s + 2, to, late) == []
    assert pump.fetcher.counters.stale_pages == 1
    assert [e.to for e in effects if isinstance(e, SendStream)] == ["b"]


def test_throttle_limits_bytes_per_simulated_second() -> None:
    rate = 20_000.0
    source = filled(300, value=b"v" * 200)  # ~75 KB of rows
    config = StreamConfig(bytes_per_s=rate, page_bytes=8192, sessions_max=4)
    pump = Pump({"a": source, "b": filled(300, value=b"v" * 200)}, config)
    pump.plan([RangeFetch(KS, *WRAP, ("a", "b"), 2)])
    pump.run()
    total = pump.fetcher.counters.bytes_received
    assert total > 4 * rate  # enough to need several seconds at the rate
    burst = max(config.request_bytes(), rate)  # the bucket's capacity
    for now, received in pump.received:
        assert received <= burst + rate * now, (now, received)
    assert pump.now >= (total - burst) / rate
    unthrottled = Pump(pump.sources, dataclasses.replace(config, bytes_per_s=0))
    unthrottled.plan([RangeFetch(KS, *WRAP, ("a", "b"), 2)])
    unthrottled.run()
    assert unthrottled.now < 1.0 < pump.now


def test_requests_spread_over_sources_and_stay_within_sessions_max() -> None:
    ranges = [(i << 60, ((i + 1) << 60) & TOKEN_MAX) for i in range(16)]  # the whole ring
    stores = {name: filled(200, rng=(0, TOKEN_MAX)) for name in ("a", "b", "c")}
    config = StreamConfig(page_bytes=600, page_rows=8, sessions_max=3)
    pump = Pump(stores, config)
    pump.plan([RangeFetch(KS, s, e, ("a", "b", "c"), 1) for s, e in ranges])
    # One range per source at first: several sources stream in parallel.
    assert sorted(to for to, _ in pump.queue) == ["a", "b", "c"]
    while not pump.fetcher.done():
        assert len(pump.fetcher.active()) <= config.sessions_max
        pump.step()
    assert data_rows(pump.store) == data_rows(stores["a"])


def test_restart_resumes_from_the_saved_cursor_and_skips_done_ranges() -> None:
    first_range, second_range = (0, 1 << 62), (1 << 62, 3 << 62)
    stores = {"a": filled(200, rng=(0, TOKEN_MAX))}
    config = StreamConfig(page_bytes=600, page_rows=8, sessions_max=1)
    plan = [RangeFetch(KS, *first_range, ("a",), 1), RangeFetch(KS, *second_range, ("a",), 1)]
    pump = Pump(stores, config)
    pump.plan(plan)
    while pump.fetcher.progress().ranges_done == 0:
        pump.step()
    for _ in range(5):  # a few pages into the second range, then "crash"
        pump.step()
    rows_before = pump.fetcher.counters.rows_received
    assert any(k.startswith(PROGRESS_PREFIX) for k, _ in pump.store.scan(b"s", b"t"))

    again = Pump(stores, config, store=pump.store)
    again.plan(plan)
    ((to, request),) = again.asked
    assert (request.start, request.end) == second_range
    assert request.after != b""  # from the cursor, not from the start
    again.run()
    assert all(r.start == second_range[0] for _, r in again.asked)  # the done range: never
    assert data_rows(again.store) == data_rows(stores["a"], (0, 3 << 62))
    everything = len(data_rows(stores["a"], (0, 3 << 62)))
    assert again.fetcher.counters.rows_received < everything - rows_before + config.page_rows
    effects = again.fetcher.forget_progress()
    again.execute(effects)
    assert list(again.store.scan(b"s", b"t")) == []
    assert again.fetcher.done()


def test_set_plan_change_keeps_progress_of_surviving_ranges() -> None:
    r1, r2, r3 = (0, 1 << 62), (1 << 62, 2 << 62), (2 << 62, 3 << 62)
    stores = {"a": filled(300, rng=(0, TOKEN_MAX)), "b": filled(300, rng=(0, TOKEN_MAX))}
    config = StreamConfig(page_bytes=600, page_rows=8, sessions_max=2)
    pump = Pump(stores, config)
    pump.plan([RangeFetch(KS, *r1, ("a",), 1), RangeFetch(KS, *r2, ("b",), 1)])
    for _ in range(6):
        pump.step()
    assert pump.fetcher.progress().ranges_done == 0
    saved_r1 = list(pump.store.scan(PROGRESS_PREFIX, b"t"))
    assert len(saved_r1) == 2
    pump.asked.clear()
    pump.plan([RangeFetch(KS, *r2, ("b", "a"), 1), RangeFetch(KS, *r3, ("a",), 1)])
    # r1's progress is gone; r2 keeps its cursor (its request in flight stays awaited, so
    # nothing new for it yet); r3 starts from the beginning.
    saved = list(pump.store.scan(PROGRESS_PREFIX, b"t"))
    assert len(saved) == 1 and saved[0][0].endswith(b"b")
    assert [(r.start, r.after) for _, r in pump.asked] == [(r3[0], b"")]
    pump.run()
    progress = pump.fetcher.progress()
    assert (progress.ranges_total, progress.ranges_done) == (2, 2)
    assert pump.fetcher.counters.stale_pages == 1  # the page of r1 that was in flight
    r2_requests = [(to, r.after) for to, r in pump.asked if r.start == r2[0]]
    assert r2_requests and all(to == "b" and after != b"" for to, after in r2_requests)
    assert data_rows(pump.store, (r2[0], r3[1])) == data_rows(stores["b"], (r2[0], r3[1]))


def test_serve_page_stays_within_its_budgets_and_in_range() -> None:
    source = filled(50)
    for key in keys_in(WRAP, 5, inside=False):
        put_cell(source, key, 1, b"x")
    request = StreamRequest(1, KS, *WRAP, b"", 500, 1000)
    seen: list[bytes] = []
    while True:
        page = serve_page(source, request, StreamConfig())
        assert page.checksum == page_checksum(page.rows)
        size = sum(len(r.key) + len(r.value) for r in page.rows)
        biggest = max(len(r.key) + len(r.value) for r in page.rows)
        assert size <= 500 or len(page.rows) == 1 or size - biggest < 500
        seen.extend(r.key for r in page.rows)
        if page.next_after is None:
            break
        request = StreamRequest(1, KS, *WRAP, page.next_after, 500, 1000)
    assert len(seen) == 50 == len(set(seen))
    bad = serve_page(source, StreamRequest(2, KS, 0, 1, b"zz", 500, 10), StreamConfig())
    assert bad.error and not bad.rows


def test_config_and_plan_are_checked() -> None:
    with pytest.raises(ValueError, match="bytes_per_s"):
        StreamConfig(bytes_per_s=-1)
    with pytest.raises(ValueError, match="copies"):
        RangeFetch(KS, 0, 1, ("a",), 2)
    with pytest.raises(ValueError, match="repeat"):
        RangeFetch(KS, 0, 1, ("a", "a"), 1)
    assert StreamConfig(bytes_per_s=1000).request_bytes() == 4096
    assert StreamConfig().request_bytes() == 1 << 20


def test_an_alone_source_is_read_by_itself_and_a_quorum_when_it_fails() -> None:
    a, b, c = filled(30), filled(30), filled(30)
    only_a = keys_in(WRAP, 1, tag="only-a")[0]
    put_cell(a, only_a, 5, b"a")
    pump = Pump({"a": a, "b": b, "c": c}, SMALL)
    pump.plan([RangeFetch(KS, *WRAP, ("b", "c", "a"), 2, alone="a")])
    pump.run()
    assert {to for to, _ in pump.asked} == {"a"}  # consistent range movement: one copy
    assert data_rows(pump.store) == data_rows(a)
    silent = Pump({"a": a, "b": b, "c": c}, SMALL)
    silent.silent.add("a")
    silent.plan([RangeFetch(KS, *WRAP, ("b", "c", "a"), 2, alone="a")])
    silent.run()
    assert {to for to, _ in silent.asked} == {"a", "b", "c"}
    assert silent.fetcher.counters.timeouts == 1
    assert data_rows(silent.store) == data_rows(b)  # a read quorum of the others
