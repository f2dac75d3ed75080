"""The node's wall clock (Unix milliseconds), and its test-only skew fault.

Everything in a node process that stamps or judges wall time — hybrid clock stamps, TTL
expiry, lock lease expiry, the stamp in probe acks from which peers estimate this node's
clock offset — reads it here, so the fault hook moves all of them at once, as a host whose
clock is wrong would.

**Test-only fault hook**: ``LEADERLESS_FAULT_CLOCK_SKEW_MS=<ms>`` (may be negative) shifts
this process's wall clock by that many milliseconds, to test what a node with a skewed
clock does (``tests/integration/test_clock_skew.py``). Read once, when the node starts
(``install_fault_skew``), and logged at warning; never set it in production.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from leaderless.runtime.errors import StartupError
from leaderless.runtime.faults import fault_hook_int
from leaderless.runtime.logs import NodeLogger

FAULT_CLOCK_SKEW_ENV = "LEADERLESS_FAULT_CLOCK_SKEW_MS"
FAULT_CLOCK_SKEW_MS_MAX = 86_400_000
"""The largest skew the hook accepts (a day, either way): beyond any clock error worth a
test, and a typo of extra digits is refused instead of moving the clock by years."""

_skew_ms = 0


def wall_ms() -> int:
    """This node's wall clock in Unix ms (shifted by the test-only skew fault, if set)."""
    return time.time_ns() // 1_000_000 + _skew_ms


def fault_skew_ms() -> int:
    """The skew the fault hook applies (0: none)."""
    return _skew_ms


def install_fault_skew(environ: Mapping[str, str], log: NodeLogger) -> int:
    """Read ``LEADERLESS_FAULT_CLOCK_SKEW_MS`` from ``environ`` and apply it to
    ``wall_ms`` for this process; warn loudly when set. Raises StartupError naming the
    variable when its value is not a whole number of ms within the limit."""
    global _skew_ms
    try:
        skew_ms = fault_hook_int(environ, FAULT_CLOCK_SKEW_ENV, -FAULT_CLOCK_SKEW_MS_MAX,
                                 FAULT_CLOCK_SKEW_MS_MAX, "a clock shift in milliseconds") or 0
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    _skew_ms = skew_ms
    if skew_ms:
        log.warning("fault_clock_skew", skew_ms=skew_ms,
                    warning=f"TEST-ONLY FAULT HOOK {FAULT_CLOCK_SKEW_ENV} is set: this "
                    f"node's wall clock is shifted by {skew_ms} ms; never use it in "
                    "production")
    return skew_ms
