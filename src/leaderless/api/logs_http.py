"""``GET /api/logs``: the node's recent log lines (``runtime.logs.LogBuffer``), for
``leaderless logs`` and the dashboard.

Query: ``since`` (a ``seq`` from an earlier answer: only newer lines), ``limit`` (1..5000,
default 200: the newest ones), ``level`` (``debug|info|warning|error``: that and above),
``component`` (e.g. ``kv``, ``membership``). Answer: ``{"node", "next", "lines": [{"seq",
"ts", "level", "node", "component", "msg", ...fields}]}``; ask again with ``since=next``.
"""

from __future__ import annotations

from aiohttp import web

from leaderless.runtime.logs import LOG_BUFFER_LINES, log_buffer

_LEVELS = ("", "debug", "info", "warning", "error")


def add_log_routes(app: web.Application, node: str) -> None:
    async def logs(request: web.Request) -> web.StreamResponse:
        query = request.query
        unknown = set(query) - {"since", "limit", "level", "component"}
        if unknown:
            return _bad(f"unknown query parameter(s): {', '.join(sorted(unknown))}")
        try:
            since = int(query.get("since", "0"))
            limit = int(query.get("limit", "200"))
        except ValueError:
            return _bad("since and limit must be integers")
        if not 1 <= limit <= LOG_BUFFER_LINES or since < 0:
            return _bad(f"limit must be 1..{LOG_BUFFER_LINES} and since >= 0")
        level = query.get("level", "")
        if level not in _LEVELS:
            return _bad(f"level must be one of {', '.join(_LEVELS[1:])}")
        lines, last = log_buffer().since(since, limit, node, level,
                                         query.get("component", ""))
        return web.json_response({"node": node, "next": last, "lines": lines})

    app.router.add_get("/api/logs", logs)


def _bad(message: str) -> web.Response:
    return web.json_response({"error": "bad_request", "message": message}, status=400)
