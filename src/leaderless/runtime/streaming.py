"""Range streaming on a running node: the fetcher (``core.streaming.Fetcher``) on the event
loop, and the page server for peers' requests.

``StreamService`` belongs to the node's ``KvNode``. It sends page requests over the
KvNode's peer links (pages come back on the same links), merges received rows through the
replica write path (``Replica.apply``: newest wins, Merkle forest updated) and the acceptor
merge, and commits them together with the saved cursor as one group-commit batch; the
request that follows a page leaves once that batch is durable, so the disk paces the
stream. A timer runs the fetcher at its ``next_deadline`` (timeouts, the throttle).

Serving a page (``serve``) reads at most one page of rows (``StreamConfig.page_bytes``,
1 MiB by default) synchronously on the loop: a few milliseconds, so foreground requests
wait at most that long behind it.

The orchestration (``core.placement``, join and leave) calls ``set_plan``, awaits
``wait_done`` and then ``forget_progress``; ``progress`` feeds the CLI and the metrics.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from leaderless.core.streaming import (
    ApplyStreamRows,
    Fetcher,
    RangeFetch,
    SendStream,
    StreamConfig,
    StreamEffect,
    StreamProgress,
    merge_rows,
    serve_page,
)
from leaderless.core.streaming_messages import StreamPage, StreamRequest
from leaderless.runtime.logs import NodeLogger
from leaderless.storage.store import StorageError

if TYPE_CHECKING:
    from leaderless.runtime.kv import KvNode


class StreamService:
    def __init__(self, kv: KvNode, config: StreamConfig, rng: random.Random) -> None:
        self._kv = kv
        self.config = config
        self.fetcher = Fetcher(kv.name, config, kv.store, rng)
        self.log = NodeLogger(kv.name, "stream")
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = float("inf")
        self._changed: asyncio.Event | None = None
        self._closed = False
        self.pages_served = 0
        self.bytes_sent = 0
        self.serve_errors = 0
        self._durable: list[bool] | None = None
        """[synced] once a sync after the end of the fetch was asked (``done``)."""

    # -- the orchestration's API ---------------------------------------------------------

    def set_plan(self, fetches: list[RangeFetch]) -> None:
        """Fetch ``fetches`` (replacing the previous plan; see ``Fetcher.set_plan``)."""
        self._durable = None
        self.log.info("stream_plan", ranges=len(fetches),
                      sources=len({s for f in fetches for s in f.sources}))
        self._execute(self.fetcher.set_plan(self._now(), fetches))

    def forget_progress(self) -> None:
        """Drop the plan and its saved cursors (the caller no longer needs them)."""
        self._execute(self.fetcher.forget_progress())

    def progress(self) -> StreamProgress:
        return self.fetcher.progress()

    def done(self) -> bool:
        """Every range of the plan fetched *and durable* (the fetcher is done once the
        last rows are handed to the store; a member must not announce them before a
        sync covers them): the first call after the fetch ends asks for a sync, a later
        one sees it."""
        if not self.fetcher.done():
            self._durable = None
            return False
        if self._durable is None:
            mark = self._durable = [False]

            def synced(error: StorageError | None) -> None:
                mark[0] = error is None

            self._kv.commit.commit([], synced)
            return False
        return self._durable[0]

    async def wait_done(self) -> None:
        """Return once every range of the plan is fetched and durable (raises the
        ``StorageError`` if the store failed)."""
        loop = asyncio.get_running_loop()
        while True:
            if self._closed:
                raise asyncio.CancelledError("the node is stopping")
            if self.fetcher.done():
                error = await self._synced(loop)
                if error is not None:
                    raise error
                if self.fetcher.done():  # (the plan may have changed meanwhile)
                    return
            event = self._event()
            event.clear()
            await event.wait()

    def _synced(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[StorageError | None]:
        """Resolves after the next sync: an empty batch joins it, and it covers every row
        written before."""
        durable: asyncio.Future[StorageError | None] = loop.create_future()

        def synced(error: StorageError | None) -> None:
            if not durable.done():
                durable.set_result(error)

        self._kv.commit.commit([], synced)
        return durable

    def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._changed is not None:
            self._changed.set()

    # -- messages ------------------------------------------------------------------------

    def serve(self, request: StreamRequest, reply: Callable[[Any], object]) -> None:
        """Answer a peer's page request from the local store (at most one page read)."""
        try:
            page = serve_page(self._kv.store, request, self.config)
        except StorageError as exc:
            self.serve_errors += 1
            self.log.error("stream_serve_failed", error=str(exc))
            reply(StreamPage(request.id, [], None, 0, f"storage: {exc}"[:500]))
            return
        self.pages_served += 1
        self.bytes_sent += sum(len(r.key) + len(r.value) for r in page.rows)
        reply(page)

    def on_page(self, sender: str, page: StreamPage) -> None:
        self._execute(self.fetcher.on_message(self._now(), sender, page))

    # -- effects and time ----------------------------------------------------------------

    def _execute(self, effects: list[StreamEffect]) -> None:
        for effect in effects:
            if isinstance(effect, SendStream):
                self._send(effect.to, effect.message)
            elif isinstance(effect, ApplyStreamRows):
                try:
                    self._apply(effect)
                except StorageError as exc:
                    self._kv._storage_failed(exc)
                    return
        self._event().set()
        self._arm_timer()

    def _send(self, to: str, request: StreamRequest) -> None:
        if to == self._kv.name:  # (a plan naming this node as a source: read it here)
            loop = asyncio.get_running_loop()
            self.serve(request, lambda page: loop.call_soon(self.on_page, to, page))
            return
        self._kv._send(to, request)

    def _apply(self, effect: ApplyStreamRows) -> None:
        """Merge the rows and save the cursor in one batch; its follow-ups once durable."""
        writes = merge_rows(self._kv.store, effect.rows, self._kv.replica.apply)
        then = effect.then

        def durable(error: StorageError | None) -> None:
            if error is None and not self._closed:
                self._execute(then)

        self._kv.commit.commit(writes + effect.progress, durable)

    def _arm_timer(self) -> None:
        if self._closed:
            return
        when = self.fetcher.next_deadline()
        if when == float("inf") or when >= self._timer_when:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_when = when
        self._timer = asyncio.get_running_loop().call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_when = float("inf")
        self._execute(self.fetcher.on_tick(self._now()))

    def _event(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    # -- metrics -------------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        """``stream_*`` counters and gauges for ``KvNode.counters`` (``obs.metrics``)."""
        c = self.fetcher.counters
        progress = self.fetcher.progress()
        return {
            "stream_bytes_in": c.bytes_received,
            "stream_bytes_out": self.bytes_sent,
            "stream_rows_in": c.rows_received,
            "stream_pages_in": c.pages_received,
            "stream_pages_served": self.pages_served,
            "stream_failed_checksum": c.checksum_failures,
            "stream_failed_error": c.page_errors,
            "stream_failed_invalid": c.invalid_pages,
            "stream_failed_timeout": c.timeouts,
            "stream_source_switches": c.source_switches,
            "stream_ranges_done": progress.ranges_done,
            "stream_ranges_active": progress.ranges_active,
            "stream_ranges_pending": (progress.ranges_total - progress.ranges_done
                                      - progress.ranges_active),
            "stream_rate_bytes_per_second": round(progress.bytes_per_s),
            "stream_eta_seconds": -1 if progress.eta_s is None else round(progress.eta_s),
        }
