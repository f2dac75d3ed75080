"""Dropping bad or excess input: count it by kind, log one rate-limited line, move on."""

from __future__ import annotations

import asyncio
from typing import Any

from leaderless.runtime.counters import RuntimeCounters
from leaderless.runtime.logs import NodeLogger, RateLimitedLog


class Drops:
    """The one place the I/O layer reports what it dropped, so every drop is counted."""

    def __init__(self, counters: RuntimeCounters, log: NodeLogger) -> None:
        self.counters = counters
        self._log = RateLimitedLog(log)

    def _now(self) -> float:
        try:
            return asyncio.get_running_loop().time()
        except RuntimeError:
            return 0.0

    def malformed(self, kind: str, peer: Any, error: object) -> None:
        """A peer sent bytes that are not a valid message (the peer's fault)."""
        self.counters.dropped_malformed_total[kind] += 1
        self._log.warning(f"malformed:{kind}", "dropped_malformed", self._now(), kind=kind,
                          peer=str(peer), error=str(error)[:200])

    def overload(self, kind: str, peer: Any) -> None:
        """We dropped something because a stated bound was reached."""
        self.counters.dropped_overload_total[kind] += 1
        self._log.warning(f"overload:{kind}", "dropped_overload", self._now(), kind=kind,
                          peer=str(peer))

    def send_error(self, kind: str, peer: Any, error: object) -> None:
        """The operating system refused a send (e.g. unreachable address)."""
        self.counters.send_errors_total[kind] += 1
        self._log.warning(f"send:{kind}", "send_failed", self._now(), kind=kind,
                          peer=str(peer), error=str(error)[:200])
