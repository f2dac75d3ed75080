"""Converged bootstrap: give every node a view in which every other node is alive.

Joining n nodes one by one costs O(n^2) member merges plus O(n^2) gossip, which is fine up
to ~1,000 nodes and far too slow at 10,000. So a converged cluster is built directly in the
state a fully joined, quiet cluster would be in: every member known, alive, incarnation 0,
nothing pending to gossip.

This reaches into ``Membership``'s private fields (``_members``, ``_live``, ``_live_index``)
because core offers no bulk constructor and must not be changed from here. The layout is
exactly what core itself maintains (``_add_live``/``_remove_live`` invariants), and
tests/sim checks that a converged cluster behaves identically with and without sharing.

Memory: a plain full view costs ~2 MB per node at 10,000 members (10,000 ``Member``
objects and two 10,000-entry dicts), 20 GB for the cluster. With ``shared=True`` the
immutable prototypes and index are shared by all nodes through copy-on-access overlays
(``MemberOverlay``, ``IndexOverlay``): a node gets its own ``Member`` the first time it
looks one up (the caller may then mutate it), and pays only for what it touched.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from leaderless.core.membership import Member, Membership
from leaderless.core.messages import MemberStatus

_MISSING: Any = object()


class FrozenMember(Member):
    """A prototype ``Member`` shared by many nodes: fields are set once, then never."""

    def __setattr__(self, key: str, value: object) -> None:
        if key in self.__dict__:
            raise AttributeError(f"shared prototype of {self.name} is immutable ({key})")
        object.__setattr__(self, key, value)


class MemberOverlay:
    """A per-node ``dict[str, Member]`` over a shared dict of prototypes, copy-on-access.

    Behaves like a dict that started as a copy of ``base`` (same iteration order): a key
    keeps its place when re-assigned, and goes to the end when deleted and re-added.
    ``get``/``[]`` return this node's own copy; ``values``/``items`` may yield prototypes,
    which are read-only (core only reads what it iterates).
    """

    __slots__ = ("_base", "_positions", "_own", "_gone", "_extra")

    def __init__(self, base: dict[str, FrozenMember], positions: dict[str, int]) -> None:
        self._base = base
        self._positions = positions  # key -> its place in base's order
        self._own: dict[str, Member] = {}  # own copies at their base position
        self._gone: set[str] = set()  # base keys deleted from their base position
        self._extra: dict[str, Member] = {}  # keys added at the end

    def _lookup(self, key: str) -> Member:
        own = self._own.get(key)
        if own is not None:
            return own
        extra = self._extra.get(key)
        if extra is not None:
            return extra
        proto = self._base.get(key)
        if proto is None or key in self._gone:
            return _MISSING  # type: ignore[no-any-return]
        copy = Member(proto.name, proto.address, proto.meta, proto.incarnation,
                      proto.status, proto.changed_at)
        self._own[key] = copy
        return copy

    def get(self, key: str, default: Member | None = None) -> Member | None:
        m = self._lookup(key)
        return default if m is _MISSING else m

    def __getitem__(self, key: str) -> Member:
        m = self._lookup(key)
        if m is _MISSING:
            raise KeyError(key)
        return m

    def __setitem__(self, key: str, value: Member) -> None:
        if key in self._extra:
            self._extra[key] = value
        elif key in self._base and key not in self._gone:
            self._own[key] = value
        else:
            self._extra[key] = value

    def __delitem__(self, key: str) -> None:
        if key in self._extra:
            del self._extra[key]
        elif key in self._base and key not in self._gone:
            self._own.pop(key, None)
            self._gone.add(key)
        else:
            raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        if key in self._extra:
            return True
        return key in self._base and key not in self._gone

    def __len__(self) -> int:
        return len(self._base) - len(self._gone) + len(self._extra)

    def __iter__(self) -> Iterator[str]:
        for key, _ in self.items():
            yield key

    def items(self) -> list[tuple[str, Member]]:
        own_get, gone = self._own.get, self._gone
        pairs = [(k, own_get(k, p)) for k, p in self._base.items() if k not in gone]
        pairs.extend(self._extra.items())
        return pairs

    def values(self) -> list[Member]:
        # Full-state syncs and reaping iterate every member: copy the shared list at C
        # speed and patch in this node's own copies, O(n) memcpy + O(own).
        if self._gone:
            own_get, gone = self._own.get, self._gone
            values = [own_get(k, p) for k, p in self._base.items() if k not in gone]
        else:
            values = list(self._base.values())
            positions = self._positions
            for key, member in self._own.items():
                values[positions[key]] = member
        values.extend(self._extra.values())
        return values

    def own_count(self) -> int:
        """How many members this node has materialized (for memory accounting)."""
        return len(self._own) + len(self._extra)


class IndexOverlay:
    """A per-node ``dict[str, int]`` (core's ``_live_index``) over a shared base dict."""

    __slots__ = ("_base", "_own", "_gone")

    def __init__(self, base: dict[str, int]) -> None:
        self._base = base
        self._own: dict[str, int] = {}
        self._gone: set[str] = set()

    def __contains__(self, key: object) -> bool:
        if key in self._own:
            return True
        return key in self._base and key not in self._gone

    def get(self, key: str, default: int | None = None) -> int | None:
        if key in self._own:
            return self._own[key]
        if key in self._gone:
            return default
        return self._base.get(key, default)

    def __getitem__(self, key: str) -> int:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def __setitem__(self, key: str, value: int) -> None:
        self._own[key] = value

    def pop(self, key: str, default: int | None = None) -> int | None:
        if key in self._own:
            value = self._own.pop(key)
            if key in self._base:
                self._gone.add(key)
            return value
        if key in self._gone or key not in self._base:
            return default
        self._gone.add(key)
        return self._base[key]

    def __len__(self) -> int:
        n = len(self._own)
        n += sum(1 for k in self._base if k not in self._gone and k not in self._own)
        return n


class SharedView:
    """The prototypes all nodes of one converged cluster share."""

    def __init__(self, members: list[Member]) -> None:
        self.members: dict[str, FrozenMember] = {}
        for m in members:
            proto = Member(m.name, m.address, m.meta, m.incarnation, m.status, m.changed_at)
            proto.__class__ = FrozenMember
            self.members[m.name] = proto  # type: ignore[assignment]
        self.names = list(self.members)
        self.index = {name: i for i, name in enumerate(self.names)}


def install_converged(nodes: list[Membership], now: float, shared: bool,
                      rng: random.Random) -> None:
    """Make every node know every other as alive at incarnation 0, nothing to gossip.

    Each node's ``_live`` is the full name list with itself swap-removed, the same layout
    ``_remove_live`` would leave.

    Each node's first probe round (``_probe_order``) walks one random permutation of all
    members, drawn once from ``rng``, from a random starting point of its own (itself left
    out). For any one member, the step at which a node probes it is then uniform and
    independent across nodes, exactly as if each node had shuffled on its own, but it costs
    a list copy instead of a 10,000-element Python shuffle per node (50 s at 10,000 nodes).
    From the second round on, core shuffles with the node's own rng as always.
    """
    protos = [Member(m.name, m.address, m.meta, m.incarnation, MemberStatus.ALIVE, now)
              for m in nodes]
    view = SharedView(protos)
    names = view.names
    walk = list(names)
    rng.shuffle(walk)
    for m in nodes:
        start = rng.randrange(len(walk))
        probe_order = walk[start:] + walk[:start]
        probe_order.remove(m.name)
        m._probe_order = probe_order  # noqa: SLF001
        assert m.live_count() == 1 and m.pending_broadcasts() == 0, "install on fresh nodes"
        me = m._me  # noqa: SLF001 - see module docstring
        live = list(names)
        last = live.pop()
        my_index = view.index[m.name]
        if last != m.name:
            live[my_index] = last
        if shared:
            members: Any = MemberOverlay(view.members, view.index)
            members[m.name] = me
            index: Any = IndexOverlay(view.index)
            index.pop(m.name)
            if last != m.name:
                index[last] = my_index
        else:
            members = {}
            for name, proto in view.members.items():
                members[name] = me if name == m.name else Member(
                    name, proto.address, proto.meta, proto.incarnation, proto.status,
                    proto.changed_at)
            index = {name: i for i, name in enumerate(live)}
        m._members = members  # noqa: SLF001
        m._live = live  # noqa: SLF001
        m._live_index = index  # noqa: SLF001
        assert m.live_count() == len(nodes)
