"""``GET /api/ring``: the cluster's ring status, from any node's HTTP listener.

The same JSON as ``leaderless ring status --json``: ``{"operation": "status", "asked",
"checked_at", "members": [{"name", "address", "state", "status", "token_count",
"next_token_count", "replacing", "ownership", "reported", "stream": {"ranges_total",
"ranges_done", "ranges_active", "bytes_received", "bytes_per_s", "eta_s"} | null,
"waiting_for", "waiting_more", "error", "settled", "cleanup": {"running", "deleted_rows",
"last_finished_at", "error"} | null}], "summary": {"members", "states", "changing",
"streaming", "ranges_total", "ranges_done", "bytes_received", "bytes_per_s", "eta_s"}}``.
The node asked gathers every alive member's report within 3 s (``runtime.ring_status``).
With auth on it needs a token like every ops route (the ``authenticate`` middleware of
``api.http``). Read-only: ring changes are made with the CLI (the node port).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from leaderless.api.messages import RingReply
from leaderless.runtime.ring_status import ring_json


def add_ring_routes(app: web.Application, status: Callable[[], Awaitable[RingReply]]) -> None:
    """Serve ``status`` (``runtime.node.Node.ring_status``) as ``GET /api/ring``."""

    async def ring(request: web.Request) -> web.StreamResponse:
        return web.json_response(ring_json(await status()))

    app.router.add_get("/api/ring", ring)
