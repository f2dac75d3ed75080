"""``GET /api/doctor``: the cluster's diagnosis, from any node's HTTP listener.

``{"asked", "checked_at", "findings": [{"severity", "check", "subject", "message",
"fix"}], "critical": n, "warning": n, "info": n}``: the node asked gathers every alive
member's report and runs the checks (``runtime.doctor``, ``obs.doctor``); findings are the
most severe first, ``checked_at`` is in unix seconds. Always 200 when the diagnosis ran
(read ``critical`` for the verdict); with auth on it needs a token like every ops route
(the ``authenticate`` middleware of ``api.http``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from leaderless.api.messages import DoctorReply
from leaderless.runtime.doctor import findings_json


def add_doctor_routes(app: web.Application,
                      diagnose: Callable[[], Awaitable[DoctorReply]]) -> None:
    """Serve ``diagnose`` (``runtime.node.Node.doctor``) as ``GET /api/doctor``."""

    async def doctor(request: web.Request) -> web.StreamResponse:
        return web.json_response(findings_json(await diagnose()))

    app.router.add_get("/api/doctor", doctor)
