"""The built-in dashboard: static HTML/JS (Apache ECharts, vendored) served by every node,
fed by a server-sent event stream of this node's view (``web.handlers``)."""

from leaderless.web.handlers import STATIC_DIR, add_web_routes

__all__ = ["STATIC_DIR", "add_web_routes"]
