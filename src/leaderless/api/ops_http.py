"""Operations endpoints on a node's HTTP listener: health probes and Prometheus metrics.

=====================  ============================================================
``GET /health/live``   200 ``{"status": "live", "node"}`` while the process serves HTTP
                       (its event loop runs): for a liveness probe, restart if not.
``GET /health/ready``  200 ``{"status": "ready", "node", "checks"}`` when the node has
                       joined its cluster, its storage is open and it knows the ring of
                       every alive member; else 503 with the same body and
                       ``"status": "not_ready"`` and each failing check's reason: for
                       a readiness probe / load balancer, send no traffic if not.
``GET /metrics``       Prometheus text format (``obs.metrics``).
``GET /api/cluster``   ``{"node", "members": [{"name", "address", "http", "state",
                       "incarnation", "zone", "version", "weight", "ownership",
                       "load": {"cpu_pct", "mem_pct", "disk_pct", "ops_per_s",
                       "p99_ms"} | null, "health": {"status", "reason"},
                       "routing": {"latency_ms", "outstanding", "score", "requests",
                       "timeouts"} | null}]}``: every member as this node knows it,
                       with the load each gossiped (refreshed every 5 s when it
                       moved), its health (at once) and how this node's coordinator
                       rates it as a replica (``core.snitch``; null: never asked).
``GET /api/alerts``    ``{"node", "alerts": [{"name", "severity", "state", "metric",
                       "value", "threshold", "op", "since", "message"}], "rules":
                       [{"name", "metric", "op", "threshold", "for_s", "severity",
                       "description"}]}``: this node's firing, pending and recently
                       resolved alerts (``obs.alerts``; ``since`` in unix seconds) and
                       the rules it evaluates.
=====================  ============================================================

Beside these: ``GET /api/hot-partitions`` (the busiest partitions this node coordinates and
its replica scores, ``api.routing_http``) and ``GET /api/doctor`` (``api.doctor_http``).
"""

from __future__ import annotations

from typing import Any, Protocol

from aiohttp import web


class OpsSource(Protocol):
    """What a node exposes to the operations endpoints (``runtime.node.Node``)."""

    @property
    def name(self) -> str: ...

    def readiness(self) -> dict[str, str | None]:
        """Each check's failure reason, or None when it passes."""

    def metrics(self) -> tuple[bytes, str]:
        """(Prometheus exposition body, its content type)."""

    def cluster(self) -> list[dict[str, Any]]:
        """Every known member with its state, ring ownership and gossiped load."""

    def alerts(self) -> list[dict[str, Any]]:
        """This node's firing, pending and recently resolved alerts."""

    def alert_rules(self) -> list[dict[str, Any]]:
        """The alert rules this node evaluates."""


def add_ops_routes(app: web.Application, ops: OpsSource) -> None:
    async def live(request: web.Request) -> web.StreamResponse:
        return web.json_response({"status": "live", "node": ops.name})

    async def ready(request: web.Request) -> web.StreamResponse:
        checks = ops.readiness()
        ok = all(reason is None for reason in checks.values())
        body: dict[str, Any] = {
            "status": "ready" if ok else "not_ready", "node": ops.name,
            "checks": {name: ("ok" if reason is None else reason)
                       for name, reason in checks.items()}}
        return web.json_response(body, status=200 if ok else 503)

    async def metrics(request: web.Request) -> web.StreamResponse:
        body, content_type = ops.metrics()
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    async def cluster(request: web.Request) -> web.StreamResponse:
        return web.json_response({"node": ops.name, "members": ops.cluster()})

    async def alerts(request: web.Request) -> web.StreamResponse:
        return web.json_response({"node": ops.name, "alerts": ops.alerts(),
                                  "rules": ops.alert_rules()})

    app.router.add_get("/health/live", live)
    app.router.add_get("/api/cluster", cluster)
    app.router.add_get("/api/alerts", alerts)
    app.router.add_get("/health/ready", ready)
    app.router.add_get("/metrics", metrics)
