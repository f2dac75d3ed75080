"""Per-key Paxos (core.paxos): acceptor transitions, ballots, and proposers driven over a
hand-cranked in-memory network (messages delivered in order unless a test drops them)."""

from __future__ import annotations

import collections
import itertools
import random
from collections.abc import Callable

import pytest

from leaderless.core.coordinator import Topology
from leaderless.core.paxos import (
    FLOOR_KEY,
    Acceptor,
    Conflict,
    Done,
    Failed,
    Proposer,
    ProposerConfig,
    PurgeDone,
    Respond,
    Result,
    SendAcceptor,
    apply_change,
    decode_state,
    encode_state,
    id_digest,
    parse_paxos_key,
    paxos_key,
)
from leaderless.core.paxos_messages import (
    EMPTY_REGISTER,
    RECENT_CHANGES_MAX,
    Accept,
    Accepted,
    AcceptorState,
    Ballot,
    Cas,
    Change,
    Delete,
    Incr,
    Nack,
    PaxosFailure,
    Prepare,
    Promise,
    Purge,
    Purged,
    Put,
    Read,
    Register,
)
from leaderless.core.ring import Ring, RingNode
from leaderless.storage.memory import MemoryStore

KS = "strong"
KEY = b"k"
NAMES = ("n1", "n2", "n3")


def _register(value: bytes | None, version: int = 1) -> Register:
    return Register(version, value)


# -- ballots and the acceptor -------------------------------------------------------------------


def test_ballots_order_by_counter_then_node() -> None:
    assert Ballot(2, "a") > Ballot(1, "z")
    assert Ballot(1, "b") > Ballot(1, "a")
    assert Ballot(1, "a") == Ballot(1, "a")
    assert sorted([Ballot(2, "a"), Ballot(1, "b"), Ballot(1, "a")]) == [
        Ballot(1, "a"), Ballot(1, "b"), Ballot(2, "a")]
    assert Ballot(0, "") < Ballot(1, "a")


def _handle(acceptor: Acceptor, request: Prepare | Accept) -> object:
    reply, writes = acceptor.handle(request)
    acceptor.store.write(writes)
    acceptor.store.sync()
    return reply


def test_acceptor_promises_higher_and_refuses_lower_or_equal() -> None:
    acceptor = Acceptor(MemoryStore())
    reply = _handle(acceptor, Prepare(1, KS, KEY, b"", Ballot(5, "n1")))
    assert reply == Promise(1, Ballot(5, "n1"), None, None)
    assert _handle(acceptor, Prepare(2, KS, KEY, b"", Ballot(4, "n9"))) == Nack(
        2, Ballot(5, "n1"))
    # Equal is refused too: a ballot is promised once.
    assert _handle(acceptor, Prepare(3, KS, KEY, b"", Ballot(5, "n1"))) == Nack(
        3, Ballot(5, "n1"))
    reply, writes = acceptor.handle(Prepare(4, KS, KEY, b"", Ballot(4, "n1")))
    assert writes == []  # a refusal writes nothing


def test_acceptor_accepts_unless_promised_higher() -> None:
    acceptor = Acceptor(MemoryStore())
    _handle(acceptor, Prepare(1, KS, KEY, b"", Ballot(5, "n1")))
    assert _handle(acceptor, Accept(2, KS, KEY, b"", Ballot(4, "n2"), _register(b"x"))) == Nack(
        2, Ballot(5, "n1"))
    assert _handle(acceptor, Accept(3, KS, KEY, b"", Ballot(5, "n1"), _register(b"a"))) == (
        Accepted(3, Ballot(5, "n1")))
    # A higher accept without a prepare is fine (its proposer had a majority's promises).
    assert _handle(acceptor, Accept(4, KS, KEY, b"", Ballot(6, "n2"), _register(b"b", 2),
                                    next_ballot=Ballot(7, "n2"))) == Accepted(4, Ballot(6, "n2"))
    state = acceptor.state(KS, KEY, b"")
    assert state == AcceptorState(Ballot(7, "n2"), Ballot(6, "n2"), _register(b"b", 2))
    # The piggybacked promise holds: ballot 6.n9 < 7.n2 is refused.
    assert isinstance(_handle(acceptor, Accept(5, KS, KEY, b"", Ballot(6, "n9"),
                                               _register(b"c"))), Nack)
    assert _handle(acceptor, Prepare(6, KS, KEY, b"", Ballot(8, "n1"))) == Promise(
        6, Ballot(8, "n1"), Ballot(6, "n2"), _register(b"b", 2))


def test_acceptor_state_survives_reopening_the_store_but_not_unsynced_writes() -> None:
    store = MemoryStore()
    acceptor = Acceptor(store)
    _handle(acceptor, Accept(1, KS, KEY, b"s", Ballot(3, "n1"), _register(b"v")))
    reply, writes = acceptor.handle(Prepare(2, KS, KEY, b"s", Ballot(9, "n2")))
    store.write(writes)  # not synced: the reply must not have been sent
    store.crash()
    reopened = Acceptor(store)
    assert reopened.state(KS, KEY, b"s") == AcceptorState(Ballot(3, "n1"), Ballot(3, "n1"),
                                                          _register(b"v"))
    raw = store.get(paxos_key(KS, KEY, b"s"))
    assert raw is not None and decode_state(raw) == reopened.state(KS, KEY, b"s")


def test_store_encoding_round_trips_and_keys_parse() -> None:
    state = AcceptorState(Ballot(2, "n1"), Ballot(1, "n1"), _register(b"x"))
    assert decode_state(encode_state(state)) == state
    key = paxos_key(KS, b"part", b"sort")
    assert key.startswith(b"pd") and parse_paxos_key(key) == (KS, b"part", b"sort")
    with pytest.raises(ValueError):
        parse_paxos_key(FLOOR_KEY)


def test_apply_change_versions_conflicts_and_counters() -> None:
    reg, out = apply_change(EMPTY_REGISTER, Put(b"a"), b"i1", 10)
    assert out == Done(1, b"a") and reg.version == 1 and reg.changed_at_ms == 10
    same, out = apply_change(reg, Cas(b"b", expected_version=0), b"i2", 11)
    assert same is reg and out == Conflict(1, b"a")
    reg, out = apply_change(reg, Cas(b"b", expected_value=b"a"), b"i3", 12)
    assert out == Done(2, b"b")
    _, out = apply_change(reg, Incr(1), b"i4", 13)
    assert isinstance(out, Failed) and out.code == "invalid"
    reg, out = apply_change(reg, Delete(), b"i5", 14)
    assert out == Done(3, None) and reg.tombstone
    reg, out = apply_change(reg, Incr(5), b"i6", 15)
    assert out == Done(4, b"5")
    again, out = apply_change(reg, Incr(5), b"i6", 16)
    assert again is reg and out == Done(4, b"5", duplicate=True)
    _, out = apply_change(reg, Cas(b"z", expected_absent=True), b"i7", 17)
    assert isinstance(out, Conflict)
    with pytest.raises(ValueError):
        Cas(b"z", expected_version=1, expected_absent=True)


def test_recent_ids_are_bounded() -> None:
    reg = EMPTY_REGISTER
    for i in range(RECENT_CHANGES_MAX + 10):
        reg, _ = apply_change(reg, Incr(1), f"id{i}".encode(), 0)
    assert len(reg.recent) == RECENT_CHANGES_MAX
    assert reg.recent[0].id == id_digest(b"id10") and reg.version == RECENT_CHANGES_MAX + 10
    # The oldest remembered id is still recognised; one just past the bound is not.
    assert apply_change(reg, Incr(1), b"id10", 0)[1] == Done(11, b"11", duplicate=True)
    again, outcome = apply_change(reg, Incr(1), b"id9", 0)
    assert isinstance(outcome, Done) and not outcome.duplicate


# -- proposers over an in-memory network --------------------------------------------------------


class Net:
    """Nodes with an acceptor and a proposer each; ``step`` delivers one queued message."""

    def __init__(self, seed: int = 1, config: ProposerConfig | None = None) -> None:
        self.now = 0.0
        self.wall_ms = 1_000_000
        ids = itertools.count(1)
        self.stores = {name: MemoryStore() for name in NAMES}
        self.acceptors = {name: Acceptor(self.stores[name]) for name in NAMES}
        self.proposers = {name: Proposer(name, config or ProposerConfig(), ids,
                                         random.Random(seed + i))
                          for i, name in enumerate(NAMES)}
        self.ring = Ring(RingNode(name, i + 1, 8) for i, name in enumerate(NAMES))
        self.up = set(NAMES)
        self.queue: collections.deque[tuple[str, str, object]] = collections.deque()
        self.results: dict[int, Result] = {}
        self.sent: collections.Counter[str] = collections.Counter()
        self.drop: Callable[[str, str, object], bool] = lambda sender, to, message: False
        self._op_ids = itertools.count(1)

    def topology(self) -> Topology:
        return Topology(self.ring, frozenset(self.up), frozenset(self.up))

    def propose(self, via: str, change: Change, idempotency_id: bytes = b"",
                key: bytes = KEY) -> int:
        op_id = next(self._op_ids)
        self.execute(via, self.proposers[via].propose(
            self.now, op_id, self.topology(), KS, 3, key, b"", change, idempotency_id,
            self.wall_ms))
        return op_id

    def execute(self, node: str, effects: list[SendAcceptor | Respond]) -> None:
        for effect in effects:
            if isinstance(effect, SendAcceptor):
                self.sent[type(effect.message).__name__] += 1
                self.queue.append((node, effect.to, effect.message))
            else:
                assert effect.op_id not in self.results
                self.results[effect.op_id] = effect.result

    def deliver(self, sender: str, to: str, message: object) -> None:
        if self.drop(sender, to, message) or to not in self.up:
            return
        if isinstance(message, Prepare | Accept | Purge):
            reply, writes = self.acceptors[to].handle(message)
            self.stores[to].write(writes)
            self.stores[to].sync()  # durable before the reply leaves
            self.sent[type(reply).__name__] += 1
            self.queue.append((to, sender, reply))
        else:
            assert isinstance(message, Promise | Accepted | Nack | Purged | PaxosFailure)
            self.execute(to, self.proposers[to].on_reply(self.now, sender, message))

    def run(self, rng: random.Random | None = None, until_s: float = 10.0) -> None:
        """Deliver everything (in order, or in a random order with ``rng``), advancing time
        to the proposers' deadlines when the network is idle, for at most ``until_s``."""
        until_s += self.now
        while True:
            while self.queue:
                if rng is None:
                    item = self.queue.popleft()
                else:
                    i = rng.randrange(len(self.queue))
                    item = self.queue[i]
                    del self.queue[i]
                self.deliver(*item)
            soonest = min(p.next_deadline() for p in self.proposers.values())
            if soonest == float("inf") or soonest > until_s:
                return
            self.now = max(self.now, soonest)
            for name, proposer in self.proposers.items():
                self.execute(name, proposer.on_tick(self.now))


def test_happy_path_put_then_read() -> None:
    net = Net()
    put = net.propose("n1", Put(b"hello"))
    net.run()
    assert net.results[put] == Done(1, b"hello")
    read = net.propose("n2", Read())
    net.run()
    assert net.results[read] == Done(1, b"hello")
    # Every replica accepted: all three hold the register.
    for acceptor in net.acceptors.values():
        state = acceptor.state(KS, KEY, b"")
        assert state.register is not None and state.register.value == b"hello"


def test_second_change_from_the_same_proposer_takes_one_round_trip() -> None:
    net = Net()
    net.propose("n1", Put(b"a"))
    net.run()
    assert net.sent["Prepare"] == 3 and net.sent["Accept"] == 3
    net.sent.clear()
    second = net.propose("n1", Put(b"b"))
    net.run()
    assert net.results[second] == Done(2, b"b")
    assert net.sent == {"Accept": 3, "Accepted": 3}
    assert net.proposers["n1"].counters.one_rtt_rounds == 1
    # A read through the same proposer is a one-round-trip Paxos round too (no shortcut).
    net.sent.clear()
    read = net.propose("n1", Read())
    net.run()
    assert net.results[read] == Done(2, b"b") and net.sent == {"Accept": 3, "Accepted": 3}


def test_one_round_trip_falls_back_to_prepare_after_another_proposer() -> None:
    net = Net()
    net.propose("n1", Put(b"a"))
    net.run()
    other = net.propose("n2", Put(b"b"))
    net.run()
    assert net.results[other] == Done(2, b"b")
    net.sent.clear()
    mine = net.propose("n1", Cas(b"c", expected_version=2))
    net.run()
    assert net.results[mine] == Done(3, b"c")
    assert net.sent["Nack"] >= 2 and net.sent["Prepare"] == 3
    assert net.proposers["n1"].counters.refused_rounds == 1


def test_concurrent_changes_on_one_proposer_share_a_round() -> None:
    net = Net()
    ops = [net.propose("n1", Incr(1)) for _ in range(10)]
    net.run()
    assert sorted(net.results[op].version for op in ops) == list(range(1, 11))  # type: ignore[union-attr]
    assert net.proposers["n1"].counters.rounds == 2  # the first alone, then a batch of 9


@pytest.mark.parametrize("seed", range(20))
def test_duelling_proposers_converge(seed: int) -> None:
    net = Net(seed)
    rng = random.Random(seed)
    ops = []
    for _ in range(5):
        for name in NAMES:
            ops.append(net.propose(name, Incr(1)))
        net.run(rng)
    net.run(rng)
    assert all(isinstance(net.results[op], Done) for op in ops), [net.results[o] for o in ops]
    versions = sorted(net.results[op].version for op in ops)  # type: ignore[union-attr]
    assert versions == list(range(1, 16))  # each change its own version: none lost or doubled
    read = net.propose("n1", Read())
    net.run(rng)
    assert net.results[read] == Done(15, b"15")


def test_idempotent_retry_is_not_applied_twice() -> None:
    net = Net(config=ProposerConfig(timeout_s=1.0))
    # Accepts arrive, but every Accepted reply is lost: the client sees a timeout.
    net.drop = lambda sender, to, message: isinstance(message, Accepted)
    first = net.propose("n1", Incr(7), b"client-42")
    net.run()
    result = net.results[first]
    assert isinstance(result, Failed) and result.code == "timeout" and result.maybe_applied
    net.drop = lambda sender, to, message: False
    retry = net.propose("n2", Incr(7), b"client-42")
    net.run()
    assert net.results[retry] == Done(1, b"7", duplicate=True)
    read = net.propose("n3", Read())
    net.run()
    assert net.results[read] == Done(1, b"7")


def test_cas_conflict_returns_the_current_version() -> None:
    net = Net()
    net.propose("n1", Put(b"a"))
    net.propose("n1", Put(b"b"))
    net.run()
    stale = net.propose("n2", Cas(b"c", expected_version=1))
    net.run()
    assert net.results[stale] == Conflict(2, b"b")
    fresh = net.propose("n2", Cas(b"c", expected_version=2))
    net.run()
    assert net.results[fresh] == Done(3, b"c")


def test_delete_then_read_is_absent() -> None:
    net = Net()
    net.propose("n1", Put(b"a"))
    net.run()
    deleted = net.propose("n2", Delete())
    net.run()
    assert net.results[deleted] == Done(2, None)
    read = net.propose("n3", Read())
    net.run()
    assert net.results[read] == Done(2, None)


def test_purge_after_grace_forgets_everywhere_and_refuses_old_ballots() -> None:
    net = Net()
    net.propose("n1", Put(b"a"))
    net.run()
    old_ballot = net.acceptors["n1"].state(KS, KEY, b"").accepted
    net.propose("n1", Delete())
    net.run()
    early = next(net._op_ids)
    net.execute("n2", net.proposers["n2"].purge(net.now, early, net.topology(), KS, 3, KEY, b"",
                                                net.wall_ms + 10, grace_ms=1000))
    net.run()
    assert net.results[early] == PurgeDone(False, "the tombstone is younger than the grace "
                                           "period")
    found, _ = net.acceptors["n3"].tombstones(b"", net.wall_ms + 5000, 1000, 100)
    assert found == [(KS, KEY, b"")]
    late = next(net._op_ids)
    net.execute("n2", net.proposers["n2"].purge(net.now, late, net.topology(), KS, 3, KEY, b"",
                                                net.wall_ms + 5000, grace_ms=1000))
    net.run()
    assert net.results[late] == PurgeDone(True)
    for name in NAMES:
        assert net.stores[name].get(paxos_key(KS, KEY, b"")) is None
        assert net.acceptors[name].floor() > Ballot(0, "")
    # A paused proposer's accept from before the delete cannot land after the purge.
    assert old_ballot is not None
    reply, _ = net.acceptors["n1"].handle(Accept(999, KS, KEY, b"", old_ballot,
                                                 _register(b"a")))
    assert isinstance(reply, Nack)
    read = net.propose("n3", Read())
    net.run()
    assert net.results[read] == Done(0, None)


def test_purge_needs_every_replica() -> None:
    net = Net()
    net.propose("n1", Delete())
    net.run()
    net.up.discard("n3")
    op = next(net._op_ids)
    net.execute("n1", net.proposers["n1"].purge(net.now, op, net.topology(), KS, 3, KEY, b"",
                                                net.wall_ms + 10**9, grace_ms=1))
    net.run()
    result = net.results[op]
    assert isinstance(result, Failed) and result.code == "unavailable"


def test_lost_quorum_is_unavailable() -> None:
    net = Net()
    net.up -= {"n2", "n3"}
    op = net.propose("n1", Put(b"a"))
    assert net.results[op] == Failed(
        "unavailable", "1 of 3 replicas are up; a strong change needs a majority of them",
        1, 2, False)


def test_timeouts_give_counts() -> None:
    net = Net(config=ProposerConfig(timeout_s=0.5))
    # n2 and n3 look up but never answer: only n1 promises.
    net.drop = lambda sender, to, message: to in ("n2", "n3")
    op = net.propose("n1", Put(b"a"))
    net.run()
    result = net.results[op]
    assert isinstance(result, Failed) and result.code == "timeout"
    assert (result.received, result.required, result.maybe_applied) == (1, 2, False)
    assert net.proposers["n1"].in_flight() == 0


def test_contention_fails_after_bounded_retries() -> None:
    net = Net(config=ProposerConfig(retries_max=2, timeout_s=100.0))
    # Every acceptor has promised a huge ballot and keeps refusing: a proposer never wins.
    for name in NAMES:
        _handle(net.acceptors[name], Prepare(1, KS, KEY, b"", Ballot(10**12, "zz")))
    original = Acceptor.handle

    def refuse(self: Acceptor, request: Prepare | Accept) -> tuple[object, list[object]]:
        return Nack(request.id, Ballot(10**15, "zz")), []

    Acceptor.handle = refuse  # type: ignore[assignment,method-assign]
    try:
        op = net.propose("n1", Put(b"a"))
        net.run()
    finally:
        Acceptor.handle = original  # type: ignore[method-assign]
    result = net.results[op]
    assert isinstance(result, Failed) and result.code == "contention"
    assert net.proposers["n1"].counters.refused_rounds == 3


def test_duplicate_prepare_does_not_derail_a_round() -> None:
    net = Net()
    original = net.deliver

    def twice(sender: str, to: str, message: object) -> None:
        original(sender, to, message)
        if isinstance(message, Prepare | Accept):
            original(sender, to, message)

    net.deliver = twice  # type: ignore[method-assign]
    op = net.propose("n1", Put(b"a"))
    net.run(random.Random(3))
    assert net.results[op] == Done(1, b"a")


def test_acceptor_ignores_a_next_ballot_that_is_not_higher() -> None:
    acceptor = Acceptor(MemoryStore())
    reply = _handle(acceptor, Accept(1, KS, KEY, b"", Ballot(5, "n1"), _register(b"a"),
                                     next_ballot=Ballot(4, "n1")))
    assert reply == Accepted(1, Ballot(5, "n1"))
    assert acceptor.state(KS, KEY, b"").promised == Ballot(5, "n1")


def test_a_stuck_round_is_restarted_before_the_change_times_out() -> None:
    net = Net(config=ProposerConfig(timeout_s=2.0, round_timeout_s=0.1))
    dropped = []

    def drop_first_accepts(sender: str, to: str, message: object) -> bool:
        if isinstance(message, Accept) and len(dropped) < 2:
            dropped.append(message)
            return True
        return False

    net.drop = drop_first_accepts
    op = net.propose("n1", Put(b"a"))
    net.run()
    assert net.results[op] == Done(1, b"a")
    assert net.proposers["n1"].counters.rounds == 2  # (waiting out timeout_s would fail)


def test_a_retried_change_forgotten_by_the_register_is_not_applied_twice() -> None:
    """A proposer's accept reaches one acceptor; another proposer adopts it (so the change
    is chosen) and then makes more changes than the register remembers ids of. When the
    first proposer retries, the id is gone from the register: applying the change again
    would count it twice (found by the chaos counter workload, seed 98). It must fail as
    "may have been applied" instead."""
    net = Net(config=ProposerConfig(round_timeout_s=5.0, timeout_s=100.0,
                                    backoff_base_s=0.01))
    net.drop = lambda sender, to, message: (
        sender == "n1" and to != "n1" and isinstance(message, Accept))
    first = net.propose("n1", Incr(1), b"client-1")
    net.run(until_s=0.0)
    net.up.discard("n3")  # n2's rounds must hear n1's acceptor, which holds the change
    others = []
    for i in range(RECENT_CHANGES_MAX + 8):
        others.append(net.propose("n2", Incr(1), f"other-{i}".encode()))
        net.run(until_s=1.0)
    assert all(isinstance(net.results[op], Done) for op in others)
    # n2 adopted n1's change in its first round: its own changes counted from 2.
    total = RECENT_CHANGES_MAX + 9
    assert net.results[others[-1]] == Done(total, str(total).encode())
    net.up.add("n3")
    net.drop = lambda sender, to, message: False
    net.run()
    result = net.results[first]
    assert isinstance(result, Failed) and result.maybe_applied, result
    read = net.propose("n3", Read())
    net.run()
    assert net.results[read] == Done(total, str(total).encode())


def test_a_client_retry_is_applied_only_if_the_register_would_remember_the_first_try() -> None:
    """A client lost its connection after sending an increment and retries it elsewhere
    with the same id and how long ago it first sent it (``retry_ms``)."""
    net = Net()

    def propose(via: str, change: Change, idempotency_id: bytes, retry_ms: int = 0) -> int:
        op_id = next(net._op_ids)
        net.execute(via, net.proposers[via].propose(
            net.now, op_id, net.topology(), KS, 3, KEY, b"", change, idempotency_id,
            net.wall_ms, retry_ms))
        net.run()
        return op_id

    first = propose("n1", Incr(1), b"lost-reply")  # applied; the client never heard
    assert net.results[first] == Done(1, b"1")
    # Still remembered: the retry gets the first outcome.
    again = propose("n2", Incr(1), b"lost-reply", retry_ms=40)
    assert net.results[again] == Done(1, b"1", duplicate=True)
    for i in range(RECENT_CHANGES_MAX):
        propose("n3", Incr(1), f"other-{i}".encode())
    # Forgotten, and the register changed since the first try: not applied again.
    late = propose("n2", Incr(1), b"lost-reply", retry_ms=40)
    result = net.results[late]
    assert isinstance(result, Failed) and result.maybe_applied, result
    # A retry whose first try went out after every change the register forgot is applied
    # (it cannot be among them).
    net.wall_ms += 10_000
    fresh = propose("n2", Incr(1), b"never-arrived", retry_ms=40)
    assert net.results[fresh] == Done(RECENT_CHANGES_MAX + 2, str(RECENT_CHANGES_MAX + 2).encode())
