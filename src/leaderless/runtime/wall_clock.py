"""The node's wall clock (Unix milliseconds), and its test-only skew fault.

Everything in a node process that stamps or judges wall time — hybrid clock stamps, TTL
expiry, lock lease expiry, the stamp in probe acks from which peers estimate this node's
clock offset — reads it here, so the fault hook moves all of them at once, as a host whose
clock is wrong would.

**Test-only fault hook**: ``LEADERLESS_FAULT_CLOCK_SKEW_MS=<ms>`` (may be negative) shifts
this process's wall clock by that many milliseconds, to test what a node with a skewed
clock does (``tests/integration/test_clock_skew.py``). Read once, when the node starts
(``install_fault_skew``), and logged at warning; never set it in production.

**Live variant** (chaos runs): ``LEADERLESS_FAULT_CLOCK_SKEW_FILE=<path>`` names a file
holding the skew in ms (absent or empty: 0), re-checked at most every
``SKEW_FILE_CHECK_S`` by ``wall_ms`` itself: one ``stat`` per check, the file read only
when its inode, mtime or size changed (``write_fault_skew_file`` replaces it atomically,
so a change is always seen). Values beyond ``FAULT_CLOCK_SKEW_MS_MAX`` are clamped to it,
with a warning. Without the variable ``wall_ms`` costs one extra test of a global.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

from leaderless.runtime.errors import StartupError
from leaderless.runtime.faults import fault_hook_int
from leaderless.runtime.logs import NodeLogger

FAULT_CLOCK_SKEW_ENV = "LEADERLESS_FAULT_CLOCK_SKEW_MS"
FAULT_CLOCK_SKEW_MS_MAX = 86_400_000
"""The largest skew the hook accepts (a day, either way): beyond any clock error worth a
test, and a typo of extra digits is refused instead of moving the clock by years."""

FAULT_CLOCK_SKEW_FILE_ENV = "LEADERLESS_FAULT_CLOCK_SKEW_FILE"
SKEW_FILE_CHECK_S = 0.2
"""How often, at most, ``wall_ms`` looks at the skew file (a ``stat``)."""

_skew_ms = 0
_skew_file: str | None = None  # the live hook's path; None: no live hook (the usual case)
_skew_file_seen: tuple[int, int, int] | None = None  # (inode, mtime_ns, size) last read
_skew_file_next_ns = 0  # monotonic ns of the next check
_skew_file_problem = ""  # the last warning about the file, so it is not repeated
_skew_log: NodeLogger | None = None


def wall_ms() -> int:
    """This node's wall clock in Unix ms (shifted by the test-only skew fault, if set)."""
    if _skew_file is not None:
        _poll_skew_file()
    return time.time_ns() // 1_000_000 + _skew_ms


def fault_skew_ms() -> int:
    """The skew the fault hook applies (0: none)."""
    return _skew_ms


def install_fault_skew(environ: Mapping[str, str], log: NodeLogger) -> int:
    """Read ``LEADERLESS_FAULT_CLOCK_SKEW_MS`` (or the live ``..._FILE``) from ``environ``
    and apply it to ``wall_ms`` for this process; warn loudly when set. Raises
    StartupError naming the variable when its value is not a whole number of ms within the
    limit, when the file holds no number, or when both variables are set."""
    global _skew_ms, _skew_file, _skew_log
    _skew_file, _skew_log = None, log
    try:
        skew_ms = fault_hook_int(environ, FAULT_CLOCK_SKEW_ENV, -FAULT_CLOCK_SKEW_MS_MAX,
                                 FAULT_CLOCK_SKEW_MS_MAX, "a clock shift in milliseconds") or 0
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    path = environ.get(FAULT_CLOCK_SKEW_FILE_ENV, "").strip()
    if path:
        if FAULT_CLOCK_SKEW_ENV in environ and environ[FAULT_CLOCK_SKEW_ENV].strip():
            raise StartupError(f"{FAULT_CLOCK_SKEW_ENV} and {FAULT_CLOCK_SKEW_FILE_ENV} are "
                               "both set: set one (test-only fault hooks; unset them)")
        return _install_skew_file(path, log)
    _skew_ms = skew_ms
    if skew_ms:
        log.warning("fault_clock_skew", skew_ms=skew_ms,
                    warning=f"TEST-ONLY FAULT HOOK {FAULT_CLOCK_SKEW_ENV} is set: this "
                    f"node's wall clock is shifted by {skew_ms} ms; never use it in "
                    "production")
    return skew_ms


def _install_skew_file(path: str, log: NodeLogger) -> int:
    """Start the live hook on ``path``: read it now (StartupError when it holds no
    number), then let ``wall_ms`` re-check it."""
    global _skew_ms, _skew_file, _skew_file_seen, _skew_file_next_ns, _skew_file_problem
    _skew_file_seen, _skew_file_problem = None, ""
    try:
        seen, text = _read_skew_file(path)
    except OSError as exc:
        raise StartupError(f"{FAULT_CLOCK_SKEW_FILE_ENV}={path!r}: cannot read it: {exc} "
                           "(a test-only fault hook; unset it)") from None
    try:
        _skew_ms = _parse_skew(text, path, log)
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    _skew_file_seen = seen
    _skew_file_next_ns = time.monotonic_ns() + int(SKEW_FILE_CHECK_S * 1e9)
    _skew_file = path
    log.warning("fault_clock_skew", skew_ms=_skew_ms, file=path,
                warning=f"TEST-ONLY FAULT HOOK {FAULT_CLOCK_SKEW_FILE_ENV} is set: this "
                f"node's wall clock is shifted by the ms in {path} (now {_skew_ms}), "
                "re-read while it runs; never use it in production")
    return _skew_ms


def _read_skew_file(path: str) -> tuple[tuple[int, int, int] | None, str]:
    """The file's identity (None: absent) and its text ("" when absent)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None, ""
    with open(path, encoding="utf-8", errors="replace") as f:
        return (st.st_ino, st.st_mtime_ns, st.st_size), f.read(64)


def _parse_skew(text: str, path: str, log: NodeLogger | None) -> int:
    """The skew in ``text`` (empty: 0), clamped to the hook's limit with a warning.
    ValueError when it is not a whole number."""
    raw = text.strip()
    if not raw:
        return 0
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{FAULT_CLOCK_SKEW_FILE_ENV}: {path} holds {raw[:20]!r}, not a "
                         "whole number of ms (a test-only fault hook)") from None
    clamped = max(-FAULT_CLOCK_SKEW_MS_MAX, min(FAULT_CLOCK_SKEW_MS_MAX, value))
    if clamped != value and log is not None:
        log.warning("fault_clock_skew_clamped", requested_ms=value, skew_ms=clamped, file=path,
                    warning=f"{path} asks for {value} ms; the test-only hook shifts the "
                    f"clock by at most {FAULT_CLOCK_SKEW_MS_MAX} ms either way")
    return clamped


def _poll_skew_file() -> None:
    """At most every SKEW_FILE_CHECK_S: stat the skew file and, when it changed, apply
    its value (a file that holds no number keeps the current skew, with one warning)."""
    global _skew_ms, _skew_file_seen, _skew_file_next_ns, _skew_file_problem
    now_ns = time.monotonic_ns()
    path = _skew_file
    if now_ns < _skew_file_next_ns or path is None:
        return
    _skew_file_next_ns = now_ns + int(SKEW_FILE_CHECK_S * 1e9)
    try:
        st = os.stat(path)
        seen: tuple[int, int, int] | None = (st.st_ino, st.st_mtime_ns, st.st_size)
    except FileNotFoundError:
        seen = None
    except OSError as exc:
        _skew_file_warn(f"cannot stat {path}: {exc}; the skew stays {_skew_ms} ms")
        return
    if seen == _skew_file_seen:
        return
    try:
        seen, text = _read_skew_file(path)
        skew_ms = _parse_skew(text, path, _skew_log)
    except (OSError, ValueError) as exc:
        _skew_file_warn(f"{exc}; the skew stays {_skew_ms} ms")
        return
    _skew_file_seen, _skew_file_problem = seen, ""
    if skew_ms != _skew_ms:
        _skew_ms = skew_ms
        if _skew_log is not None:
            _skew_log.warning("fault_clock_skew", skew_ms=skew_ms, file=path,
                              warning="TEST-ONLY FAULT HOOK: this node's wall clock is "
                              f"now shifted by {skew_ms} ms")


def _skew_file_warn(problem: str) -> None:
    global _skew_file_problem
    if problem != _skew_file_problem and _skew_log is not None:
        _skew_log.warning("fault_clock_skew_file", error=problem)
    _skew_file_problem = problem


def write_fault_skew_file(path: str, skew_ms: int) -> None:
    """Set the live skew of the node whose ``LEADERLESS_FAULT_CLOCK_SKEW_FILE`` is
    ``path`` (for test harnesses): written beside it and renamed over it, so the node never
    reads half a number and always sees the change (a new inode)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(f"{int(skew_ms)}\n")
    os.replace(tmp, path)
