"""Observability: what a node exposes about itself (Prometheus metrics, and later health,
structured logs and alerts).

``RequestStats`` counts client requests on the hot path with plain lists; ``SystemSampler``
reads the machine through psutil; ``make_registry`` turns both, and the node's status, into
a Prometheus registry of its own (never the process-wide default one: several nodes may run
in one process) that ``render`` writes in the text exposition format.
"""

from leaderless.obs.metrics import CONTENT_TYPE, make_registry, render
from leaderless.obs.requests import LatencySeries, RequestSnapshot, RequestStats
from leaderless.obs.system import SystemSample, SystemSampler

__all__ = [
    "CONTENT_TYPE",
    "LatencySeries",
    "RequestSnapshot",
    "RequestStats",
    "SystemSample",
    "SystemSampler",
    "make_registry",
    "render",
]
