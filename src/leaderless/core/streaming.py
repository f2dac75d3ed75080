"""Range streaming: a node fetches whole token ranges from other nodes, as a sans-I/O state
machine (the fetcher) plus a stateless page server.

A node that gains ranges (a joiner, a replacement, a node gaining from a leaver or from a
capacity change) is given a plan by ``core.placement``: a list of ``RangeFetch``, each a
ring range (start, end] of one keyspace, the range's current replicas as sources in
preference order, and how many of them (``copies``, a read quorum) it must read in full.
Reading a full read quorum means every write acknowledged at QUORUM before the fetch began
is seen; writes during the fetch reach the node directly (it is a pending replica).

**Pages.** The fetcher asks a source for ``StreamRequest(range, after)``; the source
answers with the rows after the cursor (``serve_page``): the data rows (``b"d"``) of the
range, then its Paxos acceptor rows (``b"p"``), in that fixed order (a wrapping range is two
key spans per prefix, high tokens first), up to a byte and row budget. The page carries an
xxh64 checksum of its rows (``page_checksum``) and the next cursor (None at the end). The
source keeps no state, so any page can be asked again.

**Merge.** Rows are applied by ``merge_rows``: a cell only if newer than ours (the replica
write path, which also updates the Merkle forest), an acceptor state merged with ours by
ballot (``merge_acceptor``): the highest promise, and the accepted (ballot, register) of the
higher accepted ballot. Applying the same page twice, or pages of several sources in any
order, gives the same result.

**Failures.** A page with an error, a bad checksum, or rows outside the range or out of
order is a failed page: retried from the same cursor, and after ``page_failures_max``
failures in a row the source is set aside for ``retry_backoff_s`` and the next source in
preference order takes its place. A request unanswered for ``request_timeout_s`` sets the
source aside at once (a silent source is most likely down). What a set-aside source
fetched stays merged; it resumes from its cursor if it is needed again.

**Throttle and parallelism.** At most ``sessions_max`` requests are in flight, spread over
the sources with the fewest requests in flight, so several sources stream at once. With
``bytes_per_s`` > 0 a token bucket over ``now`` limits the bytes asked for: each request
reserves its byte budget, the unused part is refunded when the page arrives, and no request
leaves before the bucket holds its budget.

**Resume.** The cursor of each (range, source), or its being done, is saved in the store
under ``b"s"`` (``progress_key``) by the same batch that holds the page's rows
(``ApplyStreamRows.progress``), so after a crash the saved cursor never runs ahead of the
rows. A new fetcher given the same plan resumes from the saved cursors and skips the done
ranges. ``forget_progress`` deletes it all once the caller no longer needs it.

References: Cassandra's bootstrap streaming (``StreamSession``, resumable since 2.2); the
Dynamo paper (DeCandia et al., SOSP 2007) section 4.9 on the cost of adding a node.
"""

from __future__ import annotations

import dataclasses
import random
import struct
from collections import deque
from collections.abc import Callable, Iterable, Sequence

import msgspec
import xxhash

from leaderless.core.cells import Cell, decode_cell
from leaderless.core.keys import (
    KEYSPACE_NAME_MAX,
    TOKEN_MAX,
    keyspace_prefix,
    parse_data_key,
    prefix_end,
    token_range_bounds,
)
from leaderless.core.paxos import PAXOS_PREFIX, Acceptor, decode_state, encode_state
from leaderless.core.paxos_messages import AcceptorState
from leaderless.core.ring import TokenRange
from leaderless.core.streaming_messages import (
    PAGE_BYTES_MAX,
    PAGE_ROWS_MAX,
    StreamPage,
    StreamRequest,
    StreamRow,
)
from leaderless.storage.store import Store, Write

PROGRESS_PREFIX = b"s"
"""Stream progress rows: ``b"s" | len(keyspace):u8 | keyspace | start:u64 | end:u64 |
source``. Free of the other prefixes (d data, p Paxos, h hints)."""
MIN_REQUEST_BYTES = 4096
"""The smallest byte budget a throttled fetcher asks for (a page holds at least one row
anyway): below it, per-page overhead dominates."""
_RANGE = struct.Struct(">QQ")
_LENGTHS = struct.Struct(">II")


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    """Limits of one node's fetcher; each default says why."""

    bytes_per_s: float = 0.0
    """Bytes of rows fetched per second, all sources together; 0 = unlimited. Streaming
    competes with foreground requests for disk and CPU: throttle it when client p99
    matters more than how soon the node is ready (``[ring] stream_mb_per_s``)."""
    sessions_max: int = 8
    """Page requests in flight at once, over different sources first: eight keep a disk
    and a LAN busy while one source's scan or the local fsync waits (most ranges of a
    small cluster are a page or less, so a fetch is mostly round trips)
    (``[ring] stream_sessions``)."""
    page_bytes: int = 1 << 20
    """Byte budget of one page: 1 MiB amortises the round trip and the per-page fsync,
    and one source's scan for it takes a few ms, so a serving loop never stalls long."""
    page_rows: int = PAGE_ROWS_MAX
    """Row budget of one page (the wire bound): it caps a page of tiny rows."""
    request_timeout_s: float = 10.0
    """A page not answered in this long counts as lost and the source is set aside: a
    1 MiB scan takes milliseconds, so 10 s means the source is down or badly overloaded,
    while a merely busy source (a long fsync, a GC pause) is not given up too early."""
    retry_backoff_s: float = 5.0
    """How long a failed source is set aside before it is asked again (if still needed):
    about a failure detector's suspicion time, so a restarted source gets another chance."""
    page_failures_max: int = 3
    """Bad pages (checksum, error, malformed) in a row from one source before another
    source takes over: one corrupt page is retried, a source that keeps failing is not."""
    rate_window_s: float = 10.0
    """The window of the rate shown in progress (and of the ETA)."""

    def __post_init__(self) -> None:
        checks = [
            (self.bytes_per_s >= 0, "bytes_per_s must be >= 0 (0: unlimited)"),
            (self.sessions_max >= 1, "sessions_max must be >= 1"),
            (1 <= self.page_bytes <= PAGE_BYTES_MAX, f"page_bytes must be 1..{PAGE_BYTES_MAX}"),
            (1 <= self.page_rows <= PAGE_ROWS_MAX, f"page_rows must be 1..{PAGE_ROWS_MAX}"),
            (self.request_timeout_s > 0, "request_timeout_s must be > 0"),
            (self.retry_backoff_s >= 0, "retry_backoff_s must be >= 0"),
            (self.page_failures_max >= 1, "page_failures_max must be >= 1"),
            (self.rate_window_s > 0, "rate_window_s must be > 0"),
        ]
        for ok, text in checks:
            if not ok:
                raise ValueError(f"stream config: {text}")

    def request_bytes(self) -> int:
        """The byte budget each request asks for: ``page_bytes``, smaller when throttled
        (about four pages per second of the rate), so a slow rate streams evenly."""
        if self.bytes_per_s == 0:
            return self.page_bytes
        return max(1, min(self.page_bytes, max(MIN_REQUEST_BYTES, int(self.bytes_per_s / 4))))


@dataclasses.dataclass(frozen=True)
class RangeFetch:
    """Fetch ring range (start, end] of ``keyspace`` (wrapping when start >= end) in full
    from ``copies`` distinct nodes of ``sources`` (best first)."""

    keyspace: str
    start: int
    end: int
    sources: tuple[str, ...]
    copies: int
    alone: str = ""
    """A source whose full copy alone is enough (Cassandra's consistent range movement:
    the one member the range moves away from, ``core.placement``): it is read first and,
    while it answers, the only one; if it fails, ``copies`` of the others are read."""

    def __post_init__(self) -> None:
        if self.alone and self.alone not in self.sources:
            raise ValueError(f"range fetch: alone source {self.alone!r} is not a source")
        if not 0 <= self.start <= TOKEN_MAX or not 0 <= self.end <= TOKEN_MAX:
            raise ValueError(f"range fetch: tokens must be 0..{TOKEN_MAX}")
        if len(set(self.sources)) != len(self.sources):
            raise ValueError(f"range fetch: sources repeat: {self.sources}")
        if not 1 <= self.copies <= len(self.sources):
            raise ValueError(f"range fetch: copies must be 1..{len(self.sources)} (the "
                             f"sources given), not {self.copies}")
        if not 0 < len(self.keyspace.encode()) <= 4 * KEYSPACE_NAME_MAX:
            raise ValueError(f"range fetch: bad keyspace {self.keyspace[:60]!r}")

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.keyspace, self.start, self.end)


# -- effects --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class SendStream:
    """Send ``message`` to node ``to`` over the inter-node TCP connection."""

    to: str
    message: StreamRequest


@dataclasses.dataclass(frozen=True, slots=True)
class ApplyStreamRows:
    """Merge ``rows`` (store key, store value) into the store (``merge_rows``) and write
    ``progress`` in the same batch; once that batch is durable, execute ``then``."""

    rows: list[tuple[bytes, bytes]]
    progress: list[Write]
    then: list[StreamEffect]


StreamEffect = SendStream | ApplyStreamRows


# -- progress ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StreamProgress:
    ranges_total: int
    ranges_done: int
    ranges_active: int
    """Ranges not done being read from at least one source now."""
    bytes_received: int
    rows_received: int
    bytes_per_s: float
    """Over the last ``rate_window_s``."""
    eta_s: float | None
    """Estimated seconds left (None: no estimate yet): the rate against the token-space
    fraction still to fetch, assuming rows spread evenly over tokens."""
    fraction_done: float
    """Of the plan's token space (weighted by range size), counting ``copies`` per range."""
    bytes_by_source: dict[str, int]


@dataclasses.dataclass
class StreamCounters:
    """Monotonic counters for metrics."""

    requests_sent: int = 0
    pages_received: int = 0
    bytes_received: int = 0
    rows_received: int = 0
    ranges_completed: int = 0
    checksum_failures: int = 0
    page_errors: int = 0
    """Pages that carried the source's error."""
    invalid_pages: int = 0
    """Pages with rows outside the range, out of order, or undecodable."""
    timeouts: int = 0
    source_switches: int = 0
    """Sources set aside (after a timeout or repeated bad pages)."""
    stale_pages: int = 0
    """Pages for requests no longer awaited (timed out, or dropped from the plan)."""


class _Saved(msgspec.Struct, frozen=True, array_like=True):
    after: bytes
    done: bool


_saved_encoder = msgspec.msgpack.Encoder()
_saved_decoder = msgspec.msgpack.Decoder(_Saved)


def _range_prefix(keyspace: str, start: int, end: int) -> bytes:
    name = keyspace.encode()
    return PROGRESS_PREFIX + bytes([len(name)]) + name + _RANGE.pack(start, end)


def progress_key(keyspace: str, start: int, end: int, source: str) -> bytes:
    return _range_prefix(keyspace, start, end) + source.encode()


# -- the stream order of a range -----------------------------------------------------------


def stream_segments(keyspace: str, start: int, end: int) -> list[tuple[bytes, bytes]]:
    """The store key spans [lo, hi) of range (start, end] in stream order: the data spans,
    then the same spans of the Paxos rows."""
    data = [(lo, hi if hi is not None else prefix_end(keyspace_prefix(keyspace)))
            for lo, hi in token_range_bounds(keyspace, start, end)]
    return data + [(PAXOS_PREFIX + lo, PAXOS_PREFIX + hi) for lo, hi in data]


def _segment_of(segments: Sequence[tuple[bytes, bytes]], key: bytes) -> int | None:
    for i, (lo, hi) in enumerate(segments):
        if lo <= key < hi:
            return i
    return None


def page_checksum(rows: Iterable[StreamRow]) -> int:
    """xxh64 over each row's key and value lengths (u32 each), key and value, in order:
    the lengths make every split of the bytes into rows hash differently."""
    digest = xxhash.xxh64()
    for row in rows:
        digest.update(_LENGTHS.pack(len(row.key), len(row.value)))
        digest.update(row.key)
        digest.update(row.value)
    return digest.intdigest()


def serve_page(store: Store, request: StreamRequest, config: StreamConfig) -> StreamPage:
    """The source side: the rows of the requested range after ``request.after``, within the
    request's budgets and this node's own (``config.page_bytes``, ``page_rows``). Reads at
    most one page's rows, so serving never holds the loop for long."""
    segments = stream_segments(request.keyspace, request.start, request.end)
    first = 0
    if request.after:
        at = _segment_of(segments, request.after)
        if at is None:
            return StreamPage(request.id, [], None, page_checksum([]),
                              "the cursor is outside the requested range")
        first = at
    bytes_max = min(request.bytes_max, config.page_bytes)
    rows_max = min(request.rows_max, config.page_rows)
    rows: list[StreamRow] = []
    size = 0
    full = False
    for i in range(first, len(segments)):
        lo, hi = segments[i]
        if i == first and request.after:
            lo = request.after + b"\x00"
        for key, value in store.scan(lo, hi, limit=rows_max - len(rows)):
            cost = len(key) + len(value)
            if rows and size + cost > bytes_max:
                full = True
                break
            rows.append(StreamRow(key, value))
            size += cost
        if full or len(rows) >= rows_max:
            full = True
            break
    return StreamPage(request.id, rows, rows[-1].key if full else None, page_checksum(rows))


# -- merging -------------------------------------------------------------------------------


def merge_acceptor(ours: AcceptorState, theirs: AcceptorState) -> AcceptorState:
    """The highest promise of the two, and the accepted (ballot, register) of the higher
    accepted ballot (ours on a tie: equal ballots carry the same register)."""
    promised = max(ours.promised, theirs.promised)
    best = ours
    if theirs.accepted is not None and (ours.accepted is None
                                        or theirs.accepted > ours.accepted):
        best = theirs
    return AcceptorState(promised, best.accepted, best.register)


CellApplier = Callable[[str, bytes, bytes, Cell], list[Write]]
"""(keyspace, partition, sort, cell) -> the writes that make it current if it is newer:
``core.replica.Replica.apply``, which also keeps the Merkle forest in step."""


def merge_rows(store: Store, rows: Iterable[tuple[bytes, bytes]],
               apply_cell: CellApplier) -> list[Write]:
    """The writes that merge streamed rows into ``store``: data rows through
    ``apply_cell`` (newest wins), Paxos rows by ``merge_acceptor`` (an absent local state
    is the empty state at the node's purge floor, as ``core.paxos.Acceptor`` reads it).
    Rows must have been checked by the fetcher (they decode, keys are in range)."""
    writes: list[Write] = []
    floor = None
    for key, value in rows:
        if key.startswith(PAXOS_PREFIX):
            theirs = decode_state(value)
            raw = store.get(key)
            if raw is None:
                if floor is None:
                    floor = Acceptor(store).floor()
                ours = AcceptorState(floor)
            else:
                ours = decode_state(raw)
            merged = merge_acceptor(ours, theirs)
            if raw is None or merged != ours:
                writes.append((key, encode_state(merged)))
        else:
            keyspace, _, partition, sort = parse_data_key(key)
            writes.extend(apply_cell(keyspace, partition, sort, decode_cell(value)))
    return writes


def _check_rows(segments: Sequence[tuple[bytes, bytes]], after: bytes,
                page: StreamPage) -> bool:
    """The page's rows are inside the range, strictly after the cursor in stream order,
    decodable; and its next cursor is its last row (or None)."""
    data_segments = len(segments) // 2
    start = _segment_of(segments, after) if after else 0
    if start is None:
        return False
    position = (start, after)
    for row in page.rows:
        at = _segment_of(segments, row.key)
        if at is None or (at, row.key) <= position:
            return False
        position = (at, row.key)
        try:
            if at < data_segments:
                parse_data_key(row.key)
                decode_cell(row.value)
            else:
                parse_data_key(row.key[len(PAXOS_PREFIX):])
                decode_state(row.value)
        except (ValueError, struct.error, msgspec.DecodeError, UnicodeDecodeError):
            return False
    if page.next_after is not None:
        return bool(page.rows) and page.next_after == page.rows[-1].key
    return True


# -- the fetcher ---------------------------------------------------------------------------


@dataclasses.dataclass
class _Source:
    after: bytes = b""
    done: bool = False
    assigned: bool = False
    """One of the ``copies`` sources this range is being read from now."""
    failures: int = 0
    """Bad pages in a row."""
    set_aside_until: float = 0.0
    request: int | None = None
    """The id of the request in flight, if any."""


@dataclasses.dataclass
class _Fetch:
    spec: RangeFetch
    segments: list[tuple[bytes, bytes]]
    sources: dict[str, _Source]
    complete: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class _InFlight:
    fetch: tuple[str, int, int]
    source: str
    deadline: float
    reserved: int
    after: bytes


class Fetcher:
    """One node's range fetcher. Drive it with ``set_plan``, ``on_message`` (pages),
    ``on_tick`` at ``next_deadline``; execute the effects in order."""

    def __init__(self, me: str, config: StreamConfig, store: Store,
                 rng: random.Random | None = None) -> None:
        self.me = me
        self.config = config
        self.counters = StreamCounters()
        self._store = store
        # Request ids from before a restart should not match this run's.
        self._next_id = rng.getrandbits(48) if rng is not None else 0
        self._fetches: dict[tuple[str, int, int], _Fetch] = {}
        self._in_flight: dict[int, _InFlight] = {}
        self._now = 0.0
        self._tokens = 0.0
        self._refilled_at: float | None = None
        self._samples: deque[tuple[float, int]] = deque()
        self._bytes_by_source: dict[str, int] = {}
        self._started_at: float | None = None
        self._baseline = (0.0, 0)
        """(fraction done, bytes received) when the plan was last set, for the ETA."""

    # -- plan --------------------------------------------------------------------------

    def set_plan(self, now: float, fetches: list[RangeFetch]) -> list[StreamEffect]:
        """Fetch ``fetches`` from now on. Ranges already planned keep their progress (under
        their new sources and copies); ranges no longer planned are dropped with their saved
        progress; new ranges resume from progress saved in the store."""
        self._see(now)
        if self._started_at is None:
            self._started_at = now
        wanted: dict[tuple[str, int, int], RangeFetch] = {}
        for spec in fetches:
            if spec.key in wanted and wanted[spec.key] != spec:
                raise ValueError(f"range fetch {spec.key} is planned twice, differently")
            wanted[spec.key] = spec
        drop: list[Write] = []
        for key in [k for k in self._fetches if k not in wanted]:
            self._cancel(key)
            del self._fetches[key]
            drop.extend((k, None) for k, _ in self._store.scan(
                _range_prefix(*key), prefix_end(_range_prefix(*key))))
        fetches_now: dict[tuple[str, int, int], _Fetch] = {}
        for key, spec in wanted.items():
            old = self._fetches.get(key)
            fetches_now[key] = self._replan(old, spec) if old else self._load(spec)
        self._fetches = fetches_now
        self._baseline = (self._fraction(), self.counters.bytes_received)
        effects: list[StreamEffect] = [ApplyStreamRows([], drop, [])] if drop else []
        return effects + self._pump(now)

    def _replan(self, old: _Fetch, spec: RangeFetch) -> _Fetch:
        for name in [n for n in old.sources if n not in spec.sources]:
            request = old.sources.pop(name).request
            if request is not None:
                self._in_flight.pop(request, None)
        for name in spec.sources:
            old.sources.setdefault(name, _Source())
        old.spec = spec
        old.sources = {name: old.sources[name] for name in spec.sources}  # preference order
        old.complete = self._enough(old)
        if old.complete:
            self._cancel(spec.key)
        return old

    def _load(self, spec: RangeFetch) -> _Fetch:
        fetch = _Fetch(spec, stream_segments(spec.keyspace, spec.start, spec.end),
                       {name: _Source() for name in spec.sources})
        prefix = _range_prefix(*spec.key)
        for key, value in self._store.scan(prefix, prefix_end(prefix)):
            source = fetch.sources.get(key[len(prefix):].decode(errors="replace"))
            if source is not None:
                saved = _saved_decoder.decode(value)
                source.after, source.done = saved.after, saved.done
        fetch.complete = self._enough(fetch)
        return fetch

    @staticmethod
    def _enough(fetch: _Fetch) -> bool:
        """Read in full from ``copies`` sources, or from the ``alone`` source."""
        spec = fetch.spec
        if spec.alone and fetch.sources[spec.alone].done:
            return True
        return sum(s.done for s in fetch.sources.values()) >= spec.copies

    def forget_progress(self) -> list[StreamEffect]:
        """Drop the plan and delete every saved cursor (the caller is done with them, e.g.
        the node announced normal). Returns the delete to execute."""
        for key in list(self._fetches):
            self._cancel(key)
        self._fetches = {}
        deletes: list[Write] = [(key, None) for key, _ in self._store.scan(
            PROGRESS_PREFIX, prefix_end(PROGRESS_PREFIX))]
        return [ApplyStreamRows([], deletes, [])] if deletes else []

    # -- queries -----------------------------------------------------------------------

    def done(self) -> bool:
        """Every range of the plan has been read from ``copies`` sources and handed to
        the runtime (applied; durable after the runtime's next sync)."""
        return all(f.complete for f in self._fetches.values())

    def next_deadline(self) -> float:
        """The earliest ``now`` at which ``on_tick`` has work to do (inf: none)."""
        when = min((r.deadline for r in self._in_flight.values()), default=float("inf"))
        if len(self._in_flight) >= self.config.sessions_max:
            return when
        waiting = False
        for fetch in self._fetches.values():
            if fetch.complete:
                continue
            for source in fetch.sources.values():
                if source.done or source.request is not None:
                    continue
                if source.set_aside_until > self._now:
                    when = min(when, source.set_aside_until)
                elif source.assigned or self._short(fetch):
                    waiting = True
        if waiting:
            when = min(when, self._throttle_ready_at())
        return when

    def progress(self) -> StreamProgress:
        total = len(self._fetches)
        done = sum(f.complete for f in self._fetches.values())
        window_start = self._now - self.config.rate_window_s
        while self._samples and self._samples[0][0] < window_start:
            self._samples.popleft()
        span = min(self.config.rate_window_s, self._now - (self._started_at or self._now))
        rate = sum(b for _, b in self._samples) / span if span > 0 else 0.0
        fraction = self._fraction()
        eta: float | None = None
        gained = fraction - self._baseline[0]
        fetched = self.counters.bytes_received - self._baseline[1]
        if fraction >= 1.0:
            eta = 0.0
        elif rate > 0 and gained > 0 and fetched > 0:
            eta = fetched * (1.0 - fraction) / gained / rate
        active = sum(not f.complete and any(s.assigned for s in f.sources.values())
                     for f in self._fetches.values())
        return StreamProgress(total, done, active, self.counters.bytes_received,
                              self.counters.rows_received, rate, eta, fraction,
                              dict(self._bytes_by_source))

    def active(self) -> list[tuple[str, int, int, str]]:
        """(keyspace, start, end, source) of each request in flight."""
        return [(*r.fetch, r.source) for r in self._in_flight.values()]

    # -- input -------------------------------------------------------------------------

    def on_tick(self, now: float) -> list[StreamEffect]:
        """Expire unanswered requests; send what the budgets allow."""
        self._see(now)
        for request_id, request in list(self._in_flight.items()):
            if now >= request.deadline:
                del self._in_flight[request_id]
                self._refund(request.reserved)
                self.counters.timeouts += 1
                fetch = self._fetches[request.fetch]
                self._failed(now, fetch.sources[request.source], set_aside=True)
        return self._pump(now)

    def on_message(self, now: float, sender: str, message: StreamPage) -> list[StreamEffect]:
        """A page from a source."""
        self._see(now)
        request = self._in_flight.get(message.id)
        if request is None or request.source != sender:
            self.counters.stale_pages += 1
            return []
        del self._in_flight[message.id]
        fetch = self._fetches[request.fetch]
        source = fetch.sources[sender]
        source.request = None
        size = sum(len(r.key) + len(r.value) for r in message.rows)
        self._refund(request.reserved - size)
        if message.error:
            self.counters.page_errors += 1
            self._failed(now, source)
            return self._pump(now)
        if page_checksum(message.rows) != message.checksum:
            self.counters.checksum_failures += 1
            self._failed(now, source)
            return self._pump(now)
        if not _check_rows(fetch.segments, request.after, message):
            self.counters.invalid_pages += 1
            self._failed(now, source)
            return self._pump(now)
        return self._take(now, fetch, sender, source, message, size)

    def _take(self, now: float, fetch: _Fetch, sender: str, source: _Source,
              page: StreamPage, size: int) -> list[StreamEffect]:
        source.failures = 0
        self.counters.pages_received += 1
        self.counters.bytes_received += size
        self.counters.rows_received += len(page.rows)
        self._samples.append((now, size))
        self._bytes_by_source[sender] = self._bytes_by_source.get(sender, 0) + size
        if page.next_after is None:
            source.done = True
            source.assigned = False
        else:
            source.after = page.next_after
        spec = fetch.spec
        progress: list[Write] = [(progress_key(*spec.key, sender),
                                  _saved_encoder.encode(_Saved(source.after, source.done)))]
        if not fetch.complete and self._enough(fetch):
            fetch.complete = True
            self.counters.ranges_completed += 1
            self._cancel(spec.key)
        rows = [(row.key, row.value) for row in page.rows]
        return [ApplyStreamRows(rows, progress, self._pump(now))]

    # -- scheduling --------------------------------------------------------------------

    def _pump(self, now: float) -> list[StreamEffect]:
        """Requests for idle sessions, up to ``sessions_max`` in flight and while the
        throttle allows, preferring the sources with the fewest requests in flight."""
        budget = self.config.sessions_max - len(self._in_flight)
        if budget <= 0 or not self._throttle_open():
            return []
        per_source: dict[str, int] = {}
        for request in self._in_flight.values():
            per_source[request.source] = per_source.get(request.source, 0) + 1
        load: dict[str, int] = {}
        for fetch in self._fetches.values():
            for name, source in fetch.sources.items():
                if source.assigned and not fetch.complete:
                    load[name] = load.get(name, 0) + 1
        idle: list[tuple[int, _Fetch, str]] = []
        for fetch in self._fetches.values():
            if fetch.complete:
                continue
            self._assign(now, fetch, load)
            idle.extend((len(idle) + i, fetch, name) for i, (name, s) in enumerate(
                (n, s) for n, s in fetch.sources.items() if s.assigned and s.request is None))
        effects: list[StreamEffect] = []
        while budget > 0 and idle and self._throttle_open():
            best = min(idle, key=lambda p: (per_source.get(p[2], 0), p[0]))
            idle.remove(best)
            _, fetch, name = best
            effects.append(self._request(now, fetch, name))
            per_source[name] = per_source.get(name, 0) + 1
            budget -= 1
        return effects

    def _assign(self, now: float, fetch: _Fetch, load: dict[str, int]) -> None:
        """Enough sources reading this range to make ``copies`` full reads, skipping the
        set-aside ones: the least loaded first (ranges assigned to each), then in
        preference order, so the ranges of a plan spread over all their sources."""
        alone = fetch.spec.alone
        if alone:
            source = fetch.sources[alone]
            if source.assigned or source.set_aside_until <= now:
                # The member the range leaves has it all: read it alone while it answers.
                source.assigned = True
                return
        busy = sum(s.done or s.assigned for s in fetch.sources.values())
        if busy >= fetch.spec.copies:
            return
        free = [(load.get(name, 0), i, name) for i, (name, s) in enumerate(
            fetch.sources.items()) if not (s.done or s.assigned) and s.set_aside_until <= now]
        for _, _, name in sorted(free)[:fetch.spec.copies - busy]:
            fetch.sources[name].assigned = True
            load[name] = load.get(name, 0) + 1

    def _short(self, fetch: _Fetch) -> bool:
        """Fewer sources reading this range than it needs (the alone source, while it
        reads, is all it needs)."""
        alone = fetch.spec.alone
        if alone and fetch.sources[alone].assigned:
            return False
        return sum(s.done or s.assigned for s in fetch.sources.values()) < fetch.spec.copies

    def _request(self, now: float, fetch: _Fetch, name: str) -> SendStream:
        self._next_id += 1
        source = fetch.sources[name]
        source.request = self._next_id
        reserved = self.config.request_bytes()
        if self.config.bytes_per_s > 0:
            self._tokens -= reserved
        self._in_flight[self._next_id] = _InFlight(fetch.spec.key, name,
                                                   now + self.config.request_timeout_s,
                                                   reserved, source.after)
        self.counters.requests_sent += 1
        spec = fetch.spec
        return SendStream(name, StreamRequest(self._next_id, spec.keyspace, spec.start,
                                              spec.end, source.after, reserved,
                                              self.config.page_rows))

    def _failed(self, now: float, source: _Source, set_aside: bool = False) -> None:
        source.request = None
        source.failures += 1
        if set_aside or source.failures >= self.config.page_failures_max:
            source.failures = 0
            source.assigned = False
            source.set_aside_until = now + self.config.retry_backoff_s
            self.counters.source_switches += 1

    def _cancel(self, key: tuple[str, int, int]) -> None:
        """Forget the requests in flight for a range (their pages will count as stale)."""
        fetch = self._fetches.get(key)
        for request_id in [i for i, r in self._in_flight.items() if r.fetch == key]:
            request = self._in_flight.pop(request_id)
            self._refund(request.reserved)
            if fetch is not None:
                fetch.sources[request.source].request = None
        if fetch is not None:
            for source in fetch.sources.values():
                source.assigned = False

    # -- throttle ----------------------------------------------------------------------

    def _see(self, now: float) -> None:
        self._now = max(self._now, now)
        if self.config.bytes_per_s == 0:
            return
        if self._refilled_at is None:
            self._tokens = self._capacity()
        else:
            elapsed = max(0.0, now - self._refilled_at)
            self._tokens = min(self._capacity(), self._tokens + elapsed * self.config.bytes_per_s)
        self._refilled_at = now

    def _capacity(self) -> float:
        """A second's worth of the rate (at least one request's budget): the largest burst."""
        return max(float(self.config.request_bytes()), self.config.bytes_per_s)

    def _throttle_open(self) -> bool:
        """A request leaves only when the bucket holds its whole budget, so the bytes
        fetched by any time t stay under capacity + rate * t (a page exceeds its budget
        only by a single row larger than the budget)."""
        # (within a byte: the refill is float arithmetic, and the deadline computed from
        # it must find the bucket open)
        return (self.config.bytes_per_s == 0
                or self._tokens >= self.config.request_bytes() - 1)

    def _throttle_ready_at(self) -> float:
        if self._throttle_open():
            return self._now
        missing = self.config.request_bytes() - self._tokens
        return self._now + missing / self.config.bytes_per_s

    def _refund(self, amount: int) -> None:
        if self.config.bytes_per_s > 0:
            self._tokens = min(self._capacity(), self._tokens + amount)

    # -- estimate ----------------------------------------------------------------------

    def _fraction(self) -> float:
        total = 0
        done = 0.0
        for fetch in self._fetches.values():
            size = TokenRange(fetch.spec.start, fetch.spec.end).size()
            total += size
            if fetch.complete:
                done += size
                continue
            best = sorted((self._source_fraction(fetch, s) for s in fetch.sources.values()),
                          reverse=True)[:fetch.spec.copies]
            done += size * sum(best) / fetch.spec.copies
        return done / total if total else 1.0

    @staticmethod
    def _source_fraction(fetch: _Fetch, source: _Source) -> float:
        """How far one source's read of a range is, by the token of its cursor (its Paxos
        rows, read last, count as the last 1 %)."""
        if source.done:
            return 1.0
        if not source.after:
            return 0.0
        at = _segment_of(fetch.segments, source.after)
        if at is None or at >= len(fetch.segments) // 2:
            return 0.99
        prefix = keyspace_prefix(fetch.spec.keyspace)
        raw = source.after[len(prefix):len(prefix) + 8]
        if len(raw) < 8:
            return 0.0
        tok = int.from_bytes(raw, "big")
        size = TokenRange(fetch.spec.start, fetch.spec.end).size()
        passed = (tok - fetch.spec.start) % (TOKEN_MAX + 1)
        return min(0.99, passed / size)
