"""Anti-entropy: replicas compare hash trees of the ranges they share and exchange only the
rows that differ, as a sans-I/O state machine.

Every ``interval_s`` (jittered) a node starts a session with one peer for one keyspace,
round robin over the alive peers that share ring ranges with it. The initiator drives the
session one request at a time; the responder answers each request from its store and hash
forest (``core.merkle``) and keeps no state, so a peer that restarts mid-session costs
nothing but the initiator's timeout. The session:

1. compares one digest per shared segment (the ranges both replicate, adjacent ones
   merged), then, for each that differs, ``fanout`` finer segments on grid boundaries,
   down to single leaves;
2. lists (store key, version) of the peer's rows in the differing leaves (many leaves per
   request), page by page, and merges that listing with its own rows of the same key span;
3. pushes the rows the peer lacks or holds older versions of (``RowsPush``) and asks for
   the rows it lacks or holds older (``RowsRequest``), a message's worth at a time or at
   the end of the session; received rows leave as
   ``ApplyRows`` effects, which the runtime applies through the replica's normal write
   path (newer wins, and the forest is updated there).

Tombstones are rows like any other, so deletes converge too. Everything is bounded: one
request in flight per session, ``sessions_max`` sessions, pages of ``keys_per_message``,
``rows_per_message`` rows and ``row_bytes_per_message`` bytes per message, a stack of at
most ``pending_segments_max`` segments to compare. A session that waits longer than
``session_timeout_s`` for a reply is dropped (a later reply is ignored).

References: DeCandia et al., "Dynamo" (SOSP 2007) section 4.7; Cassandra's repair.
"""

from __future__ import annotations

import bisect
import dataclasses
import random
from collections import deque
from collections.abc import Collection, Mapping

from leaderless.core.anti_entropy_messages import (
    KEYS_MAX,
    ROWS_MAX,
    SEGMENTS_MAX,
    AntiEntropyMessage,
    DigestReply,
    DigestRequest,
    KeysReply,
    KeysRequest,
    KeyVersion,
    Row,
    RowsPush,
    RowsPushAck,
    RowsReply,
    RowsRequest,
    Span,
)
from leaderless.core.cells import Cell, decode_cell
from leaderless.core.keys import data_key, keyspace_prefix, parse_data_key, token
from leaderless.core.merkle import MerkleForest, Segment, coalesce, ring_segments, store_bounds
from leaderless.core.ring import Ring
from leaderless.storage.store import Store

ROW_OVERHEAD_BYTES = 96
"""Envelope of one row on the wire beyond its keys and value (cell fields, headers)."""


@dataclasses.dataclass(frozen=True)
class AntiEntropyConfig:
    interval_s: float = 30.0
    """Mean time between session starts (uniform 0.5x-1.5x). With n peers sharing ranges,
    each pair is compared about every 2·n·interval_s / keyspaces (both sides start)."""
    session_timeout_s: float = 10.0
    """Longest wait for one reply; a reply needs at most one leaf scan or 4 MiB of rows."""
    sessions_max: int = 1
    """Sessions this node drives at once: repair is background work, one is enough."""
    fanout: int = 16
    """Children of a differing segment: 16 reaches a leaf of 2**14 in 4 round trips."""
    segments_per_message: int = 1024
    keys_per_message: int = 1000
    """Keys in one listing page (~100 KiB with 64-byte keys)."""
    rows_per_message: int = 256
    row_bytes_per_message: int = 4 << 20
    """Half the 8 MiB frame; a single larger row (up to the 1 MiB value limit) still goes."""
    pending_segments_max: int = 1 << 14
    """Segments waiting to be compared; past it differing segments are listed key by key
    without splitting (more listing traffic, same result)."""

    def __post_init__(self) -> None:
        checks = [
            (self.interval_s > 0, "interval_s must be > 0"),
            (self.session_timeout_s > 0, "session_timeout_s must be > 0"),
            (self.sessions_max >= 1, "sessions_max must be >= 1"),
            (2 <= self.fanout <= SEGMENTS_MAX, f"fanout must be 2..{SEGMENTS_MAX}"),
            (1 <= self.segments_per_message <= SEGMENTS_MAX,
             f"segments_per_message must be 1..{SEGMENTS_MAX}"),
            (1 <= self.keys_per_message <= KEYS_MAX, f"keys_per_message must be 1..{KEYS_MAX}"),
            (1 <= self.rows_per_message <= ROWS_MAX, f"rows_per_message must be 1..{ROWS_MAX}"),
            (self.row_bytes_per_message >= 1, "row_bytes_per_message must be >= 1"),
            (self.pending_segments_max >= self.fanout, "pending_segments_max must be >= fanout"),
        ]
        for ok, text in checks:
            if not ok:
                raise ValueError(f"anti-entropy config: {text}")


@dataclasses.dataclass(frozen=True, slots=True)
class SendToPeer:
    """Send ``message`` to node ``to`` over the inter-node TCP connection."""

    to: str
    message: AntiEntropyMessage


@dataclasses.dataclass(frozen=True, slots=True)
class ApplyRows:
    """Store each (keyspace, partition, sort, cell) through the replica write path (kept
    only if newer than the local cell; updates the forest). A ``SendToPeer`` after it in
    the same list must leave only once these rows are durable."""

    rows: list[tuple[str, bytes, bytes, Cell]]


AntiEntropyEffect = SendToPeer | ApplyRows


@dataclasses.dataclass
class AntiEntropyCounters:
    """Monotonic counters for metrics."""

    sessions_started: int = 0
    sessions_completed: int = 0
    sessions_timed_out: int = 0
    sessions_failed: int = 0
    """Dropped because the peer broke the protocol (a bad reply)."""
    segments_compared: int = 0
    segments_differing: int = 0
    keys_compared: int = 0
    rows_sent: int = 0
    """Rows this node pushed to a peer that lacked them or held older versions."""
    rows_requested: int = 0
    """Rows this node found it lacks or holds older, and asked a peer for."""
    rows_received: int = 0
    rows_accepted: int = 0
    """Rows pushed to us (as responder) and passed to the write path."""
    rows_refused: int = 0
    """Rows pushed to us for ranges we do not replicate."""
    requests_answered: int = 0
    stale_replies: int = 0


@dataclasses.dataclass
class _Session:
    id: int
    peer: str
    keyspace: str
    deadline: float
    stack: list[Segment]
    """Segments to compare by digest (depth first)."""
    fine: deque[Segment] = dataclasses.field(default_factory=deque)
    """Differing segments to compare key by key."""
    listing: list[Segment] = dataclasses.field(default_factory=list)
    """The differing segments being listed, page by page from ``after``."""
    after: bytes | None = None
    to_push: deque[bytes] = dataclasses.field(default_factory=deque)
    to_fetch: deque[bytes] = dataclasses.field(default_factory=deque)
    awaiting: type | None = None
    asked: list[Segment] = dataclasses.field(default_factory=list)
    asked_keys: list[bytes] = dataclasses.field(default_factory=list)


class AntiEntropy:
    """One node's anti-entropy: initiator of its own sessions, responder to its peers'."""

    def __init__(self, me: str, config: AntiEntropyConfig, rng: random.Random, store: Store,
                 forest: MerkleForest) -> None:
        self.me = me
        self.config = config
        self.counters = AntiEntropyCounters()
        self._rng = rng
        self._store = store
        self._forest = forest
        self._sessions: dict[int, _Session] = {}
        self._next_id = rng.getrandbits(48)  # ids from before a restart will not match
        self._next_start_at: float | None = None
        self._ring: Ring | None = None
        self._replication: Mapping[str, int] = {}
        self._factors: frozenset[int] = frozenset()
        self._shared: dict[int, dict[str, list[Segment]]] = {}
        self._keyspace_turn = 0
        self._peer_order: dict[str, list[str]] = {}
        self.last_compared: dict[tuple[str, str], float] = {}
        """(keyspace, peer) -> ``now`` when a session this node drove over the ranges it
        shares with that peer last completed (the doctor's anti-entropy lag); at most
        keyspaces x members entries."""

    # -- queries -------------------------------------------------------------------------

    def active_sessions(self) -> list[tuple[str, str]]:
        """(peer, keyspace) of each session this node drives."""
        return [(s.peer, s.keyspace) for s in self._sessions.values()]

    def compared_pairs(self) -> list[tuple[str, str, float]]:
        """(keyspace, peer, expected_s) of every pair whose shared ranges this node
        compares, at the last tick's ring and replication map; ``expected_s`` is about how
        often this node starts a session for that pair (round robin over keyspaces, then
        peers: interval_s x keyspaces x peers of that keyspace)."""
        if self._ring is None:
            return []
        keyspaces = max(1, len(self._replication))
        pairs = []
        for keyspace, n in sorted(self._replication.items()):
            peers = sorted(self._shared_by_peer(n))
            for peer in peers:
                pairs.append((keyspace, peer,
                              self.config.interval_s * keyspaces * len(peers)))
        return pairs

    def next_deadline(self) -> float:
        """The earliest ``now`` at which ``on_tick`` has work to do."""
        if self._next_start_at is None:
            return 0.0  # never ticked: tick at once to set the schedule
        return min([self._next_start_at, *(s.deadline for s in self._sessions.values())])

    def shared_segments(self, ring: Ring, n: int, peer: str) -> list[Segment]:
        """Token segments of the ranges both this node and ``peer`` replicate (at
        replication factor ``n``), adjacent ones merged."""
        self._see_ring(ring)
        return self._shared_by_peer(n).get(peer, [])

    # -- time ----------------------------------------------------------------------------

    def on_tick(self, now: float, ring: Ring, replication: Mapping[str, int],
                alive: Collection[str]) -> list[AntiEntropyEffect]:
        """Expire sessions; start one when it is time. ``replication`` maps each eventual-
        mode keyspace to its replication factor; ``alive`` names the live members."""
        self._replication = replication
        self._see_ring(ring)
        for session in [s for s in self._sessions.values() if now >= s.deadline]:
            del self._sessions[session.id]
            self.counters.sessions_timed_out += 1
        if self._next_start_at is None:  # a random phase, so nodes do not start together
            self._next_start_at = now + self._rng.uniform(0, self.config.interval_s)
            return []
        if now < self._next_start_at:
            return []
        self._next_start_at = now + self.config.interval_s * self._rng.uniform(0.5, 1.5)
        if len(self._sessions) >= self.config.sessions_max:
            return []
        return self._start_next(now, alive)

    def start_session(self, now: float, peer: str, keyspace: str) -> list[AntiEntropyEffect]:
        """Compare ``keyspace`` with ``peer`` now (an operator's repair, or a test). Needs a
        ring from an earlier ``on_tick``; ignores ``sessions_max``."""
        assert self._ring is not None, "on_tick must have given a ring first"
        n = self._replication.get(keyspace)
        if n is None:
            raise ValueError(f"keyspace {keyspace!r} is not in the replication map")
        segments = self._shared_by_peer(n).get(peer, [])
        self._next_id += 1
        session = _Session(self._next_id, peer, keyspace, now + self.config.session_timeout_s,
                           stack=list(reversed(segments)))
        self._sessions[session.id] = session
        self.counters.sessions_started += 1
        return self._advance(now, session)

    def _start_next(self, now: float, alive: Collection[str]) -> list[AntiEntropyEffect]:
        keyspaces = sorted(self._replication)
        busy = {(s.peer, s.keyspace) for s in self._sessions.values()}
        for _ in range(len(keyspaces)):
            keyspace = keyspaces[self._keyspace_turn % len(keyspaces)]
            self._keyspace_turn += 1
            shared = self._shared_by_peer(self._replication[keyspace])
            peer = self._next_peer(keyspace, [p for p in shared if p in alive
                                              and (p, keyspace) not in busy])
            if peer is not None:
                return self.start_session(now, peer, keyspace)
        return []

    def _next_peer(self, keyspace: str, eligible: list[str]) -> str | None:
        """Round robin over a shuffled order, reshuffled each round (as SWIM probes)."""
        if not eligible:
            return None
        order = self._peer_order.setdefault(keyspace, [])
        wanted = set(eligible)
        for _ in range(2):
            while order:
                peer = order.pop()
                if peer in wanted:
                    return peer
            order.extend(sorted(wanted))
            self._rng.shuffle(order)
        return None

    # -- ring ----------------------------------------------------------------------------

    def _see_ring(self, ring: Ring) -> None:
        """On a new ring: forget shared-range caches and cut the forest at our ranges."""
        factors = frozenset(self._replication.values())
        if factors == self._factors and (ring is self._ring or _same_placement(ring,
                                                                              self._ring)):
            self._ring = ring
            return
        self._ring = ring
        self._factors = factors
        self._shared = {}
        cuts: set[int] = set()
        for n in factors:
            for rng, _ in ring.replica_ranges(self.me, n):
                for lo, hi in ring_segments(rng):
                    cuts.update((lo, hi))
        self._forest.align(cuts, self._store)

    def _shared_by_peer(self, n: int) -> dict[str, list[Segment]]:
        cached = self._shared.get(n)
        if cached is not None:
            return cached
        assert self._ring is not None
        by_peer: dict[str, list[Segment]] = {}
        for rng, replicas in self._ring.replica_ranges(self.me, n):
            for peer in replicas:
                if peer != self.me:
                    by_peer.setdefault(peer, []).extend(ring_segments(rng))
        result = {peer: coalesce(segs) for peer, segs in sorted(by_peer.items())}
        self._shared[n] = result
        return result

    def _accepts(self, keyspace: str, tok: int) -> bool:
        """Whether a pushed row is ours to store (before the first tick we cannot tell)."""
        if self._ring is None:
            return True
        n = self._replication.get(keyspace)
        return n is not None and self.me in self._ring.preference_list(tok, n)

    # -- messages ------------------------------------------------------------------------

    def on_message(self, now: float, sender: str,
                   msg: AntiEntropyMessage) -> list[AntiEntropyEffect]:
        if isinstance(msg, DigestRequest | KeysRequest | RowsRequest | RowsPush):
            self.counters.requests_answered += 1
            return self._answer(sender, msg)
        session = self._sessions.get(msg.session)
        if session is None or session.peer != sender or type(msg) is not session.awaiting:
            self.counters.stale_replies += 1
            return []
        session.awaiting = None
        session.deadline = now + self.config.session_timeout_s
        if isinstance(msg, DigestReply):
            ok = self._on_digests(session, msg)
        elif isinstance(msg, KeysReply):
            ok = self._on_keys(session, msg)
        elif isinstance(msg, RowsReply):
            return self._on_rows(now, session, msg)
        else:
            ok = True  # RowsPushAck: the pushed rows are stored (or refused) there
        if not ok:
            return self._fail(session)
        return self._advance(now, session)

    def _fail(self, session: _Session) -> list[AntiEntropyEffect]:
        del self._sessions[session.id]
        self.counters.sessions_failed += 1
        return []

    # -- initiator -----------------------------------------------------------------------

    def _advance(self, now: float, session: _Session) -> list[AntiEntropyEffect]:
        """Send the session's next request, or end it when nothing is left."""
        # Rows move once a message's worth has gathered, or at the end: a few scattered
        # differences then cost one push and one fetch, not a round trip each.
        full = self.config.rows_per_message
        drain = not (session.listing or session.fine or session.stack)
        if session.to_push and (drain or len(session.to_push) >= full):
            push = self._next_push(session)
            if push is not None:
                return self._ask(session, push, RowsPushAck)
        if session.to_fetch and (drain or len(session.to_fetch) >= full):
            session.asked_keys = [session.to_fetch[i] for i in range(
                min(len(session.to_fetch), self.config.rows_per_message))]
            request = RowsRequest(session.id, session.keyspace, session.asked_keys)
            return self._ask(session, request, RowsReply)
        if not session.listing and session.fine:
            session.listing = self._pop_fine(session)
            session.after = None
        if session.listing:
            spans = [Span(lo, hi - 1) for lo, hi in session.listing]
            return self._ask(session, KeysRequest(session.id, session.keyspace, spans,
                                                  session.after,
                                                  self.config.keys_per_message), KeysReply)
        if session.stack:
            count = min(len(session.stack), self.config.segments_per_message)
            session.asked = [session.stack.pop() for _ in range(count)]
            spans = [Span(lo, hi - 1) for lo, hi in session.asked]
            return self._ask(session, DigestRequest(session.id, session.keyspace, spans),
                             DigestReply)
        assert not (session.to_push or session.to_fetch), "rows left at the end"
        del self._sessions[session.id]
        self.counters.sessions_completed += 1
        self.last_compared[(session.keyspace, session.peer)] = now
        return []

    def _ask(self, session: _Session, msg: AntiEntropyMessage,
             reply: type) -> list[AntiEntropyEffect]:
        session.awaiting = reply
        return [SendToPeer(session.peer, msg)]

    def _pop_fine(self, session: _Session) -> list[Segment]:
        """Up to a message's worth of differing segments, adjacent ones merged: one listing
        pages through them all, instead of a round trip per leaf."""
        batch = coalesce(session.fine.popleft() for _ in range(
            min(len(session.fine), self.config.segments_per_message)))
        assert batch
        return batch

    def _on_digests(self, session: _Session, reply: DigestReply) -> bool:
        if len(reply.digests) != len(session.asked):
            return False
        mine = self._forest.digests(session.keyspace, session.asked, self._store)
        self.counters.segments_compared += len(mine)
        forest = self._forest
        for (lo, hi), ours, theirs in zip(session.asked, mine, reply.digests, strict=True):
            if ours == theirs:
                continue
            self.counters.segments_differing += 1
            # An empty side (digest 0) differs everywhere: list it rather than descend.
            room = len(session.stack) + self.config.fanout <= self.config.pending_segments_max
            if forest.is_finest(lo, hi) or ours == 0 or theirs == 0 or not room:
                session.fine.append((lo, hi))
            else:
                session.stack.extend(reversed(forest.split(lo, hi, self.config.fanout)))
        session.asked = []
        return True

    def _on_keys(self, session: _Session, reply: KeysReply) -> bool:
        assert session.listing
        keyspace, spans, after = session.keyspace, session.listing, session.after
        if not _valid_listing(keyspace, spans, after, reply.keys):
            return False
        limit = self.config.keys_per_message
        mine = scan_spans(self._store, keyspace, spans, after, limit)
        bounds = [reply.keys[-1].key] if reply.more and reply.keys else []
        if len(mine) == limit:
            bounds.append(mine[-1][0])
        bound = min(bounds) if bounds else None  # both lists are complete up to here
        theirs = {kv.key: kv for kv in reply.keys if bound is None or kv.key <= bound}
        for key, value in mine:
            if bound is not None and key > bound:
                break
            self._diff_one(session, key, decode_cell(value), theirs.pop(key, None))
        for key in theirs:  # theirs only
            self._diff_one(session, key, None, theirs[key])
        if bound is None:
            session.listing = []
        session.after = bound
        return True

    def _diff_one(self, session: _Session, key: bytes, ours: Cell | None,
                  theirs: KeyVersion | None) -> None:
        self.counters.keys_compared += 1
        their_version = (theirs.hlc, theirs.writer) if theirs is not None else None
        our_version = ours.version() if ours is not None else None
        if our_version == their_version:
            return
        if their_version is None or (our_version is not None and our_version > their_version):
            session.to_push.append(key)
        else:
            session.to_fetch.append(key)
            self.counters.rows_requested += 1

    def _next_push(self, session: _Session) -> RowsPush | None:
        rows: list[Row] = []
        size = 0
        while session.to_push and len(rows) < self.config.rows_per_message:
            key = session.to_push[0]
            value = self._store.get(key)
            if value is not None:
                cost = len(value) + len(key) + ROW_OVERHEAD_BYTES
                if rows and size + cost > self.config.row_bytes_per_message:
                    break
                _, _, partition, sort = parse_data_key(key)
                rows.append(Row(partition, sort, decode_cell(value)))
                size += cost
            session.to_push.popleft()
        self.counters.rows_sent += len(rows)
        return RowsPush(session.id, session.keyspace, rows) if rows else None

    def _on_rows(self, now: float, session: _Session,
                 reply: RowsReply) -> list[AntiEntropyEffect]:
        asked = session.asked_keys
        if not 1 <= reply.answered <= len(asked):
            return self._fail(session)
        answered = set(asked[:reply.answered])
        keyspace = session.keyspace
        applied: list[tuple[str, bytes, bytes, Cell]] = []
        for row in reply.rows:
            if data_key(keyspace, row.partition, row.sort) not in answered:
                return self._fail(session)
            applied.append((keyspace, row.partition, row.sort, row.cell))
        for _ in range(reply.answered):
            session.to_fetch.popleft()
        session.asked_keys = []
        self.counters.rows_received += len(applied)
        effects: list[AntiEntropyEffect] = [ApplyRows(applied)] if applied else []
        return effects + self._advance(now, session)

    # -- responder -----------------------------------------------------------------------

    def _answer(self, sender: str, msg: DigestRequest | KeysRequest | RowsRequest | RowsPush,
                ) -> list[AntiEntropyEffect]:
        if isinstance(msg, DigestRequest):
            segments = [(s.first, s.last + 1) for s in msg.spans]
            digests = self._forest.digests(msg.keyspace, segments, self._store)
            return [SendToPeer(sender, DigestReply(msg.session, digests))]
        if isinstance(msg, KeysRequest):
            return [SendToPeer(sender, self._list_keys(msg))]
        if isinstance(msg, RowsRequest):
            return [SendToPeer(sender, self._read_rows(msg))]
        return self._take_pushed(sender, msg)

    def _list_keys(self, msg: KeysRequest) -> KeysReply:
        spans = [(span.first, span.last + 1) for span in msg.spans]
        keys = [KeyVersion(key, cell.hlc, cell.writer) for key, value in scan_spans(
            self._store, msg.keyspace, spans, msg.after, msg.limit)
            for cell in (decode_cell(value),)]
        return KeysReply(msg.session, keys, more=len(keys) == msg.limit)

    def _read_rows(self, msg: RowsRequest) -> RowsReply:
        prefix = keyspace_prefix(msg.keyspace)
        rows: list[Row] = []
        size = 0
        answered = 0
        for key in msg.keys:
            value = self._store.get(key) if key.startswith(prefix) else None
            if value is not None:
                cost = len(value) + len(key) + ROW_OVERHEAD_BYTES
                if rows and size + cost > self.config.row_bytes_per_message:
                    break
                _, _, partition, sort = parse_data_key(key)
                rows.append(Row(partition, sort, decode_cell(value)))
                size += cost
            answered += 1
        return RowsReply(msg.session, rows, answered)

    def _take_pushed(self, sender: str, msg: RowsPush) -> list[AntiEntropyEffect]:
        accepted = [(msg.keyspace, row.partition, row.sort, row.cell) for row in msg.rows
                    if self._accepts(msg.keyspace, token(row.partition))]
        self.counters.rows_accepted += len(accepted)
        self.counters.rows_refused += len(msg.rows) - len(accepted)
        effects: list[AntiEntropyEffect] = [ApplyRows(accepted)] if accepted else []
        effects.append(SendToPeer(sender, RowsPushAck(msg.session, len(accepted))))
        return effects


def _same_placement(ring: Ring, other: Ring | None) -> bool:
    """Whether two rings place every token on the same replicas (a membership change that
    did not touch the ring, such as a metadata update, rebuilds an equal ring)."""
    return (other is not None and ring.tokens == other.tokens and ring.owners == other.owners
            and {n.name: n.zone for n in ring.nodes.values()}
            == {n.name: n.zone for n in other.nodes.values()})


def scan_spans(store: Store, keyspace: str, spans: list[Segment], after: bytes | None,
               limit: int) -> list[tuple[bytes, bytes]]:
    """Rows of ``spans`` (ascending) with store key > ``after``, at most ``limit``, in key
    order: the same listing on both sides of a comparison."""
    rows: list[tuple[bytes, bytes]] = []
    for lo, hi in spans:
        start, end = store_bounds(keyspace, lo, hi)
        if after is not None:
            if after >= end:
                continue
            start = max(start, after + b"\x00")
        rows.extend(store.scan(start, end, limit=limit - len(rows)))
        if len(rows) >= limit:
            break
    return rows


def _valid_listing(keyspace: str, spans: list[Segment], after: bytes | None,
                   keys: list[KeyVersion]) -> bool:
    """The peer's listing is in key order, past ``after`` and inside ``spans``."""
    prefix = keyspace_prefix(keyspace)
    starts = [lo for lo, _ in spans]
    previous = after
    for kv in keys:
        if (previous is not None and kv.key <= previous) or not kv.key.startswith(prefix):
            return False
        previous = kv.key
        if len(kv.key) < len(prefix) + 8:
            return False
        tok = int.from_bytes(kv.key[len(prefix):len(prefix) + 8], "big")
        i = bisect.bisect_right(starts, tok) - 1
        if i < 0 or tok >= spans[i][1]:
            return False
    return True
