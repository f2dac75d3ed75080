"""``GET /api/hot-partitions``: the busiest partitions this node coordinates, and how it
routes reads to replicas.

Query: ``keyspace`` (only that one; default every keyspace), ``limit`` (partitions per
keyspace, 1..64, default 10). Answer::

    {"node", "half_life_s",
     "keyspaces": [{"keyspace", "requests_per_s",
                    "partitions": [{"partition" (text, or null if not UTF-8),
                                    "partition_b64", "label" (printable or 0x-hex, <= 64
                                    chars), "requests_per_s", "reads_per_s", "writes_per_s",
                                    "error_per_s", "share"}]}],
     "replicas": [{"peer", "zone", "latency_ms", "ewma_latency_ms", "outstanding",
                   "score", "requests", "timeouts"}]}

Rates are per second over a decaying window (``core.hot_partitions``: half of a request's
weight is gone after ``half_life_s``); ``requests_per_s`` of a partition may overestimate by
at most its ``error_per_s``; ``share`` is its part of the keyspace's rate. ``replicas`` is the
coordinator's dynamic snitch (``core.snitch``), best score first. With auth on the route
needs a token like every ops route, and lists only the keyspaces and partition keys the
caller may read.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from aiohttp import web

from leaderless.api.service import KvError
from leaderless.core.hot_partitions import HotPartition, HotPartitions, partition_label
from leaderless.core.snitch import PeerScore
from leaderless.security.auth import Principal

LIMIT_DEFAULT = 10
LIMIT_MAX = 64
"""The sketch keeps 64 counters per keyspace (``HotPartitionsConfig.capacity``)."""


@runtime_checkable
class RoutingSource(Protocol):
    """What a node's data plane exposes here (``runtime.kv.KvNode``)."""

    hot_partitions: HotPartitions

    def hot(self, n: int, keyspace: str | None = None) -> list[HotPartition]: ...

    def keyspace_rates(self) -> dict[str, float]: ...

    def routing(self) -> list[PeerScore]: ...


def add_routing_routes(app: web.Application, node: str, source: object,
                       principal: Callable[[web.Request], Principal | None]) -> None:
    """Serve ``GET /api/hot-partitions`` if ``source`` (the node's KV service) is a
    ``RoutingSource``; ``principal`` gives the authenticated caller (None when auth is
    off: everything is shown)."""
    if not isinstance(source, RoutingSource):
        return
    routing = source
    half_life_s = routing.hot_partitions.config.half_life_s

    async def hot_partitions(request: web.Request) -> web.StreamResponse:
        keyspace, limit = _query(request)
        caller = principal(request)
        rates = routing.keyspace_rates()
        names = sorted(rates) if keyspace is None else [keyspace]
        spaces: list[dict[str, Any]] = []
        for name in names:
            if caller is not None and not caller.sees_keyspace(name):
                continue
            partitions = [_partition_json(h) for h in routing.hot(limit, name)
                          if caller is None or caller.allows("read", name, h.partition)]
            spaces.append({"keyspace": name, "requests_per_s": round(rates.get(name, 0.0), 3),
                           "partitions": partitions})
        replicas = sorted(routing.routing(), key=lambda p: (p.score, p.name))
        return web.json_response({"node": node, "half_life_s": half_life_s,
                                  "keyspaces": spaces,
                                  "replicas": [_peer_json(p) for p in replicas]})

    app.router.add_get("/api/hot-partitions", hot_partitions)


def _query(request: web.Request) -> tuple[str | None, int]:
    unknown = set(request.query) - {"keyspace", "limit"}
    if unknown:
        raise KvError("bad_request", f"unknown query parameter(s) {', '.join(sorted(unknown))}"
                      "; /api/hot-partitions takes keyspace and limit")
    keyspace = request.query.get("keyspace") or None
    text = request.query.get("limit", str(LIMIT_DEFAULT))
    if not text.isdigit() or not 1 <= int(text) <= LIMIT_MAX:
        raise KvError("bad_request", f"limit must be 1..{LIMIT_MAX}, got {text[:20]!r}")
    return keyspace, int(text)


def _partition_json(h: HotPartition) -> dict[str, Any]:
    try:
        text: str | None = h.partition.decode()
    except UnicodeDecodeError:
        text = None
    return {"partition": text, "partition_b64": base64.b64encode(h.partition).decode(),
            "label": partition_label(h.partition),
            "requests_per_s": round(h.requests_per_s, 3),
            "reads_per_s": round(h.reads_per_s, 3), "writes_per_s": round(h.writes_per_s, 3),
            "error_per_s": round(h.error_per_s, 3), "share": round(h.share, 4)}


def _peer_json(p: PeerScore) -> dict[str, Any]:
    return {"peer": p.name, "zone": p.zone, "latency_ms": round(p.latency_s * 1000, 3),
            "ewma_latency_ms": (None if p.ewma_latency_s is None
                                else round(p.ewma_latency_s * 1000, 3)),
            "outstanding": p.outstanding, "score": p.score, "requests": p.requests,
            "timeouts": p.timeouts}
