"""Anti-entropy sessions between in-memory nodes: only differing rows move, only shared
ranges are compared, deletes converge, silent peers time out, limits hold."""

from __future__ import annotations

import random
from collections import deque

import msgspec
import pytest

from leaderless.core.anti_entropy import (
    AntiEntropy,
    AntiEntropyConfig,
    AntiEntropyEffect,
    ApplyRows,
    SendToPeer,
)
from leaderless.core.anti_entropy_messages import (
    ROWS_MAX,
    AntiEntropyMessage,
    DigestRequest,
    KeysReply,
    KeysRequest,
    KeyVersion,
    Row,
    RowsPush,
    RowsPushAck,
    Span,
)
from leaderless.core.cells import Cell, decode_cell
from leaderless.core.keys import data_key, token
from leaderless.core.merkle import MerkleForest
from leaderless.core.ring import Ring, RingNode
from leaderless.storage.memory import MemoryStore
from tests.unit.test_merkle import put

KS = "ks"
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(AntiEntropyMessage)


class Node:
    def __init__(self, name: str, config: AntiEntropyConfig, leaf_bits: int) -> None:
        self.name = name
        self.store = MemoryStore()
        self.forest = MerkleForest(leaf_bits=leaf_bits)
        self.ae = AntiEntropy(name, config, random.Random(name), self.store, self.forest)
        self.applied = 0

    def put(self, pk: bytes, cell: Cell, sk: bytes = b"") -> None:
        put(self.store, self.forest, KS, pk, sk, cell)

    def rows(self) -> dict[bytes, Cell]:
        return {k: decode_cell(v) for k, v in self.store.scan(b"d", b"e")}


class Cluster:
    """Nodes and a message queue between them, delivered in order (through the codec)."""

    def __init__(self, names: list[str], n: int, config: AntiEntropyConfig | None = None,
                 leaf_bits: int = 6, tokens: int = 8) -> None:
        self.config = config or AntiEntropyConfig()
        self.nodes = {name: Node(name, self.config, leaf_bits) for name in names}
        self.ring = Ring([RingNode(name, i + 1, tokens) for i, name in enumerate(names)])
        self.replication = {KS: n}
        self.queue: deque[tuple[str, str, AntiEntropyMessage]] = deque()
        self.messages = 0
        self.now = 0.0
        for node in self.nodes.values():
            assert node.ae.on_tick(self.now, self.ring, self.replication, set(names)) == []

    def replicas(self, pk: bytes) -> tuple[str, ...]:
        return self.ring.preference_list(token(pk), self.replication[KS])

    def execute(self, at: str, effects: list[AntiEntropyEffect]) -> None:
        node = self.nodes[at]
        for effect in effects:
            if isinstance(effect, SendToPeer):
                wire = _decoder.decode(_encoder.encode(effect.message))
                assert wire == effect.message
                self.queue.append((at, effect.to, wire))
            else:
                assert isinstance(effect, ApplyRows)
                for keyspace, pk, sk, cell in effect.rows:
                    put(node.store, node.forest, keyspace, pk, sk, cell)
                    node.applied += 1

    def run(self, drop_to: str | None = None) -> None:
        while self.queue:
            sender, to, msg = self.queue.popleft()
            if to == drop_to:
                continue
            self.messages += 1
            self.execute(to, self.nodes[to].ae.on_message(self.now, sender, msg))

    def session(self, a: str, b: str) -> None:
        self.execute(a, self.nodes[a].ae.start_session(self.now, b, KS))
        self.run()
        assert self.nodes[a].ae.active_sessions() == []


def test_a_session_streams_exactly_the_differing_rows() -> None:
    c = Cluster(["a", "b"], n=2)
    a, b = c.nodes["a"], c.nodes["b"]
    for i in range(300):
        cell = Cell(100 + i, "w", b"v%d" % i)
        a.put(b"k%d" % i, cell)
        b.put(b"k%d" % i, cell)
    for i in range(3):
        a.put(b"only-a%d" % i, Cell(50, "a", b"x"))
    for i in range(2):
        b.put(b"only-b%d" % i, Cell(50, "b", b"y"))
    a.put(b"k10", Cell(900, "a", b"newer on a"))
    a.put(b"k11", Cell(900, "a", b"newer on a"))
    b.put(b"k12", Cell(900, "b", b"newer on b"))
    b.put(b"k13", Cell(900, "a", b"same hlc, writer b wins"))  # (900, "b") > (900, "a")
    a.put(b"k13", Cell(900, "b", b"same hlc, writer b wins"))
    c.session("a", "b")
    counters = a.ae.counters
    # Sent: 3 only on a, k10 and k11 newer on a, k13 (writer "b" breaks the hlc tie).
    # Requested: 2 only on b, k12 newer on b.
    assert (counters.rows_sent, counters.rows_requested) == (6, 3)
    assert (b.applied, a.applied) == (6, 3)
    assert a.rows() == b.rows()
    assert a.rows()[data_key(KS, b"k12")].value == b"newer on b"
    assert counters.sessions_completed == 1
    assert b.ae.counters.rows_accepted == 6
    # A second session finds nothing to do: the hashes agree at the top.
    before, differing = counters.segments_compared, counters.segments_differing
    c.session("a", "b")
    assert (counters.rows_sent, counters.segments_differing) == (6, differing)
    assert counters.segments_compared - before == len(a.ae.shared_segments(c.ring, 2, "b"))


def test_identical_replicas_exchange_one_round_trip() -> None:
    c = Cluster(["a", "b"], n=2)
    for i in range(100):
        for node in c.nodes.values():
            node.put(b"k%d" % i, Cell(i + 1, "w"))
    c.session("a", "b")
    assert c.messages == 2
    assert c.nodes["a"].ae.counters.segments_differing == 0


def test_only_shared_ranges_are_compared_and_converged() -> None:
    names = ["a", "b", "c", "d"]
    c = Cluster(names, n=2, tokens=16)
    rnd = random.Random(7)
    for i in range(400):
        pk = b"p%d" % i
        for name in c.replicas(pk):
            if rnd.random() < 0.8:  # each replica missed some writes
                c.nodes[name].put(pk, Cell(10 + rnd.randrange(3), name, b"v"))
    a, b = c.nodes["a"], c.nodes["b"]
    shared = {pk for i in range(400) if {"a", "b"} <= set(c.replicas(pk := b"p%d" % i))}
    assert 0 < len(shared) < 400
    before_b = b.rows()
    c.session("a", "b")
    for i in range(400):
        pk = b"p%d" % i
        key = data_key(KS, pk)
        if pk in shared:
            assert a.rows().get(key) == b.rows().get(key)
        elif "b" not in c.replicas(pk):
            assert key not in b.rows(), "rows b does not replicate never reach it"
        else:  # replicated by b with someone else: untouched by this session
            assert b.rows().get(key) == before_b.get(key)
    assert b.ae.counters.rows_refused == 0


def test_sessions_between_all_pairs_converge_every_replica_set() -> None:
    names = ["a", "b", "c", "d"]
    c = Cluster(names, n=3, tokens=16)
    rnd = random.Random(11)
    newest: dict[bytes, Cell] = {}
    for i in range(300):
        pk = b"p%d" % i
        for name in c.replicas(pk):
            if rnd.random() < 0.7:
                cell = Cell(rnd.randrange(1, 50), name, b"v", tombstone=rnd.random() < 0.2)
                c.nodes[name].put(pk, cell)
                if cell.newer_than(newest.get(pk)):
                    newest[pk] = cell
    for x in names:
        for y in names:
            if x < y:
                c.session(x, y)
    for pk, cell in newest.items():
        for name in c.replicas(pk):
            assert c.nodes[name].rows()[data_key(KS, pk)] == cell, (pk, name)
    for node in c.nodes.values():
        rebuilt = MerkleForest(leaf_bits=6)
        rebuilt.align([], node.store)
        rebuilt.rebuild(node.store)
        assert rebuilt.digest(KS, 0, 1 << 64, node.store) == node.forest.digest(
            KS, 0, 1 << 64, node.store)


def test_a_tombstone_wins_over_an_older_value_and_loses_to_a_newer_one() -> None:
    c = Cluster(["a", "b"], n=2)
    a, b = c.nodes["a"], c.nodes["b"]
    a.put(b"deleted", Cell(10, "a", b"old value"))
    b.put(b"deleted", Cell(20, "b", tombstone=True))
    a.put(b"revived", Cell(40, "a", b"new value"))
    b.put(b"revived", Cell(30, "b", tombstone=True))
    b.put(b"gone-on-b-only", Cell(5, "b", tombstone=True))
    c.session("a", "b")
    rows = a.rows()
    assert rows[data_key(KS, b"deleted")].tombstone
    assert rows[data_key(KS, b"gone-on-b-only")].tombstone
    assert b.rows()[data_key(KS, b"revived")].value == b"new value"
    assert a.rows() == b.rows()


def test_a_silent_peer_times_out_and_a_late_reply_is_ignored() -> None:
    config = AntiEntropyConfig(session_timeout_s=5.0)
    c = Cluster(["a", "b"], n=2, config=config)
    a, b = c.nodes["a"], c.nodes["b"]
    a.put(b"x", Cell(1, "a"))
    c.execute("a", a.ae.start_session(0.0, "b", KS))
    assert a.ae.active_sessions() == [("b", KS)]
    assert a.ae.next_deadline() <= 5.0
    [(_, _, request)] = list(c.queue)
    c.queue.clear()
    a.ae.on_tick(4.9, c.ring, c.replication, {"b"})
    assert a.ae.active_sessions() == [("b", KS)]
    a.ae.on_tick(5.0, c.ring, c.replication, set())
    assert a.ae.active_sessions() == []
    assert a.ae.counters.sessions_timed_out == 1
    late = b.ae.on_message(6.0, "a", request)
    assert [type(e) for e in late] == [SendToPeer]
    assert isinstance(late[0], SendToPeer)
    assert a.ae.on_message(6.0, "b", late[0].message) == []
    assert a.ae.counters.stale_replies == 1


def test_small_pages_and_byte_budgets_still_converge() -> None:
    config = AntiEntropyConfig(fanout=2, segments_per_message=3, keys_per_message=4,
                               rows_per_message=3, row_bytes_per_message=500,
                               pending_segments_max=4)
    c = Cluster(["a", "b"], n=2, config=config, leaf_bits=3)
    a, b = c.nodes["a"], c.nodes["b"]
    for i in range(60):
        a.put(b"k%d" % i, Cell(5, "a", b"A" * 200), sk=b"s%d" % (i % 4))
        if i % 3:
            b.put(b"k%d" % i, Cell(6 if i % 2 else 4, "b", b"B" * 200), sk=b"s%d" % (i % 4))
    b.put(b"partition", Cell(9, "b", b"wide"), sk=b"")
    for j in range(30):  # one partition: one token, many rows, one leaf
        b.put(b"partition", Cell(9, "b", b"row"), sk=b"%03d" % j)
    c.session("a", "b")
    assert a.rows() == b.rows()
    counters = a.ae.counters
    assert counters.rows_sent + counters.rows_requested == a.applied + b.applied


def test_on_tick_starts_sessions_round_robin_with_alive_peers_only() -> None:
    config = AntiEntropyConfig(interval_s=10.0, sessions_max=1)
    c = Cluster(["a", "b", "c", "d"], n=3, config=config, tokens=16)
    a = c.nodes["a"].ae
    started: list[str] = []
    now = 0.0
    alive = {"a", "b", "c"}  # d is down
    while now < 400.0:
        now = max(now + 0.5, a.next_deadline())
        effects = a.on_tick(now, c.ring, c.replication, alive)
        for effect in effects:
            assert isinstance(effect, SendToPeer)
            assert isinstance(effect.message, DigestRequest)
            started.append(effect.to)
        if a.active_sessions():  # the peer never answers; the session times out
            assert len(a.active_sessions()) <= 1
    assert set(started) == {"b", "c"}
    assert abs(started.count("b") - started.count("c")) <= 1
    assert a.counters.sessions_started == len(started) >= 10


def test_pushed_rows_for_ranges_not_replicated_are_refused() -> None:
    c = Cluster(["a", "b", "c", "d"], n=1, tokens=16)
    b = c.nodes["b"]
    pk_other = next(b"p%d" % i for i in range(100) if c.replicas(b"p%d" % i) != ("b",))
    pk_mine = next(b"p%d" % i for i in range(100) if c.replicas(b"p%d" % i) == ("b",))
    push = RowsPush(7, KS, [Row(pk_other, b"", Cell(1, "a")), Row(pk_mine, b"", Cell(1, "a"))])
    effects = b.ae.on_message(0.0, "a", push)
    assert isinstance(effects[0], ApplyRows) and len(effects[0].rows) == 1
    assert effects[1] == SendToPeer("a", RowsPushAck(7, 1))
    assert b.ae.counters.rows_refused == 1


def test_messages_bound_what_a_peer_controls() -> None:
    # [tag, session, keyspace, spans]: a span with first > last is rejected on decode.
    with pytest.raises(msgspec.ValidationError, match="first > last"):
        _decoder.decode(_encoder.encode([40, 1, KS, [[5, 3]]]))
    with pytest.raises(msgspec.ValidationError):
        _decoder.decode(_encoder.encode([46, 1, KS, [[b"p", b"", [1, "w"]]] * (ROWS_MAX + 1)]))
    with pytest.raises(msgspec.ValidationError):  # an empty partition key
        _decoder.decode(_encoder.encode([46, 1, KS, [[b"", b"", [1, "w"]]]]))
    assert _decoder.decode(_encoder.encode([40, 1, KS, [[0, 2**64 - 1]]])) == DigestRequest(
        1, KS, [Span(0, 2**64 - 1)])
    with pytest.raises(ValueError):
        Span(5, 3)


def test_config_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="fanout"):
        AntiEntropyConfig(fanout=1)
    with pytest.raises(ValueError, match="keys_per_message"):
        AntiEntropyConfig(keys_per_message=10**6)


def test_a_listing_outside_the_asked_spans_ends_the_session() -> None:
    c = Cluster(["a", "b"], n=2)
    a, b = c.nodes["a"], c.nodes["b"]
    for i in range(50):
        for node in (a, b):
            node.put(b"k%d" % i, Cell(1, "w"))
    b.put(b"x", Cell(1, "b"))
    c.execute("a", a.ae.start_session(0.0, "b", KS))
    while not isinstance(c.queue[0][2], KeysRequest):  # digests first
        sender, to, msg = c.queue.popleft()
        c.execute(to, c.nodes[to].ae.on_message(0.0, sender, msg))
    _, _, request = c.queue.popleft()
    assert isinstance(request, KeysRequest)
    outside = next(pk for pk in (b"q%d" % i for i in range(10_000))
                   if not any(s.first <= token(pk) <= s.last for s in request.spans))
    bogus = KeysReply(request.session, [KeyVersion(data_key(KS, outside), 1, "b")], False)
    assert a.ae.on_message(0.0, "b", bogus) == []
    assert a.ae.active_sessions() == []
    assert a.ae.counters.sessions_failed == 1
