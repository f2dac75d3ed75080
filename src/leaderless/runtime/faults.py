"""Test-only fault hooks: environment variables ``LEADERLESS_FAULT_*`` that make a real
node process misbehave on purpose (a skewed clock, failing fsyncs), so integration tests
can drive what operators meet. Each is read once at start, warned about at warning level
when set, and never set in production."""

from __future__ import annotations

from collections.abc import Mapping


def fault_hook_int(environ: Mapping[str, str], name: str, low: int, high: int,
                   meaning: str) -> int | None:
    """The integer value of the fault hook ``name`` in ``environ``, or None when unset.
    ValueError naming the variable when it is not a whole number within [low, high]
    (``meaning`` says what the number is, for that message)."""
    raw = environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise ValueError(f"{name}={raw!r}: must be {meaning}, a whole number in "
                         f"{low}..{high} (a test-only fault hook; unset it)")
    return value
