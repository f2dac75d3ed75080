"""core.placement: who serves reads, who gets writes and who fetches what while the ring
changes, checked against brute force over random rings."""

from __future__ import annotations

import itertools
import random

from leaderless.core.keys import TOKEN_MAX
from leaderless.core.placement import Placement, PlacementMember, RingState
from leaderless.core.ring import Ring, RingNode

N = 3
TOKENS = 16


def member(name: str, seed: int, state: RingState = RingState.NORMAL, count: int = TOKENS,
           **kw: object) -> PlacementMember:
    return PlacementMember(name, seed, count, state=state, **kw)  # type: ignore[arg-type]


def ring_of(*members: PlacementMember) -> Ring:
    return Ring(RingNode(m.name, m.token_seed, m.token_count) for m in members)


def sample_tokens(rng: random.Random, count: int = 300) -> list[int]:
    return [rng.getrandbits(64) for _ in range(count)]


def covered(placement: Placement, me: str, tok: int) -> bool:
    """Whether ``me`` fetches ``tok`` (some fetch's range contains it)."""
    return any(f.range.contains(tok) for f in placement.fetches(me, N, 2))


def test_a_steady_ring_has_no_extra_replicas_and_nothing_to_fetch() -> None:
    members = [member(f"n{i}", i) for i in range(1, 5)]
    placement = Placement(members)
    assert not placement.changing
    for tok in sample_tokens(random.Random(1)):
        assert placement.extra_replicas(tok, N) == ()
    assert all(placement.fetches(m.name, N, 2) == [] for m in members)
    assert placement.gainers(N) == set()


def test_a_joining_member_gets_writes_for_and_fetches_exactly_its_future_ranges() -> None:
    normal = [member(f"n{i}", i) for i in range(1, 4)]
    joiner = member("j", 99, RingState.JOINING)
    placement = Placement([*normal, joiner])
    assert set(placement.current.nodes) == {"n1", "n2", "n3"}
    future = ring_of(*normal, joiner)
    for tok in sample_tokens(random.Random(2)):
        owns = "j" in future.preference_list(tok, N)
        assert placement.extra_replicas(tok, N) == (("j",) if owns else ())
        assert covered(placement, "j", tok) == owns
    for fetch in placement.fetches("j", N, 2):
        assert set(fetch.sources) == set(placement.current.preference_list(fetch.range.end, N))
        assert fetch.copies == 2


def test_a_leaving_members_ranges_are_fetched_by_those_that_take_them_over() -> None:
    members = [member(f"n{i}", i) for i in range(1, 6)]
    leaving = member("n5", 5, RingState.LEAVING)
    placement = Placement([*members[:4], leaving])
    after = ring_of(*members[:4])
    assert "n5" in placement.current.nodes and "n5" not in placement.base.nodes
    assert placement.gainers(N)
    for tok in sample_tokens(random.Random(3)):
        now = placement.current.preference_list(tok, N)
        later = after.preference_list(tok, N)
        assert set(placement.extra_replicas(tok, N)) == set(later) - set(now)
        for name in later:
            assert covered(placement, name, tok) == (name not in now)
    digest = placement.digest()
    synced = [member(m.name, m.token_seed, synced=digest) for m in members[:4]]
    assert Placement([*synced, leaving]).unsynced(N) == []
    assert Placement([*members[:4], leaving]).unsynced(N) == sorted(placement.gainers(N))


def test_a_replacement_fetches_the_dead_members_ranges_and_nobody_else_moves() -> None:
    members = [member(f"n{i}", i) for i in range(1, 5)]
    replacement = member("r", 4, RingState.JOINING, replacing="n4")
    placement = Placement([*members, replacement])
    assert "n4" in placement.current.nodes and "r" not in placement.current.nodes
    assert placement.gainers(N) == set()
    for tok in sample_tokens(random.Random(4)):
        had = "n4" in placement.current.preference_list(tok, N)
        assert placement.extra_replicas(tok, N) == (("r",) if had else ())
        assert covered(placement, "r", tok) == had
    done = Placement([*members, member("r", 4, replacing="n4")])
    assert "n4" not in done.current.nodes and "r" in done.current.nodes
    assert not done.changing


def test_capacity_up_fetches_the_new_vnodes_and_capacity_down_hands_them_over() -> None:
    members = [member(f"n{i}", i) for i in range(1, 5)]
    growing = member("n4", 4, next_token_count=TOKENS * 2)
    placement = Placement([*members[:3], growing])
    bigger = ring_of(*members[:3], member("n4", 4, count=TOKENS * 2))
    for tok in sample_tokens(random.Random(5)):
        owns = "n4" in bigger.preference_list(tok, N)
        had = "n4" in placement.current.preference_list(tok, N)
        assert covered(placement, "n4", tok) == (owns and not had)
    shrinking = member("n4", 4, next_token_count=TOKENS // 2)
    placement = Placement([*members[:3], shrinking])
    smaller = ring_of(*members[:3], member("n4", 4, count=TOKENS // 2))
    for tok in sample_tokens(random.Random(6)):
        now = placement.current.preference_list(tok, N)
        for name in smaller.preference_list(tok, N):
            assert covered(placement, name, tok) == (name not in now)


def test_every_ring_reachable_by_completing_changes_is_covered() -> None:
    """The core promise: whichever of the changes in progress complete, in any order, a
    member that serves a key there either serves it now or fetches it (and gets its
    writes meanwhile)."""
    for seed in range(30):
        rng = random.Random(seed)
        names = [f"n{i}" for i in range(rng.randint(3, 6))]
        states = {name: RingState.NORMAL for name in names}
        for name in rng.sample(names, rng.randint(0, len(names) - 3)):
            states[name] = RingState.LEAVING
        joiners = [f"j{i}" for i in range(rng.randint(0, 2))]
        members = [member(n, hash((seed, n)) & TOKEN_MAX, states[n]) for n in names]
        members += [member(j, hash((seed, j)) & TOKEN_MAX, RingState.JOINING) for j in joiners]
        placement = Placement(members)
        leavers = [m for m in members if m.state is RingState.LEAVING]
        joining = [m for m in members if m.state is RingState.JOINING]
        stay = [m for m in members if m.state is RingState.NORMAL]
        toks = sample_tokens(rng, 150)
        for done_leaves in _subsets(leavers):
            for done_joins in _subsets(joining):
                left = {m.name for m in done_leaves}
                ring = ring_of(*stay, *done_joins,
                               *[m for m in leavers if m.name not in left])
                for tok in toks:
                    now = placement.current.preference_list(tok, N)
                    writes = set(now) | set(placement.extra_replicas(tok, N))
                    for name in ring.preference_list(tok, N):
                        assert name in writes, (seed, name, tok)
                        assert name in now or covered(placement, name, tok), (seed, name)


def _subsets(items: list[PlacementMember]) -> list[tuple[PlacementMember, ...]]:
    return [c for k in range(len(items) + 1) for c in itertools.combinations(items, k)]


def test_one_change_alone_fetches_each_range_from_the_member_it_leaves() -> None:
    """Cassandra's consistent range movement: with one change in progress, the member a
    range moves away from has every write it served; with several, a read quorum is read."""
    normal = [member(f"n{i}", i) for i in range(1, 4)]
    joiner = member("j", 99, RingState.JOINING)
    placement = Placement([*normal, joiner])
    future = ring_of(*normal, joiner)
    fetches = placement.fetches("j", N, 2)
    assert fetches and all(f.alone for f in fetches)
    for fetch in fetches:
        losers = set(fetch.sources) - set(future.preference_list(fetch.range.end, N))
        assert losers == {fetch.alone}
    leaving = member("n3", 3, RingState.LEAVING)
    placement = Placement([*normal[:2], member("n4", 4), leaving])
    for name in ("n1", "n2", "n4"):
        assert all(f.alone == "n3" for f in placement.fetches(name, N, 2))
    two = Placement([*normal, joiner, member("k", 77, RingState.JOINING)])
    assert all(f.alone == "" for f in two.fetches("j", N, 2))
    replacing = Placement([*normal, member("r", 3, RingState.JOINING, replacing="n3")])
    assert all(f.alone == "" for f in replacing.fetches("r", N, 2))
