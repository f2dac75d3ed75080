"""Structured logs: one JSON object per line on stderr (or a console format for people).

Every line has ``ts`` (unix seconds, float), ``level``, ``node``, ``component`` and ``msg``,
plus the fields of that message. The benchmark harness parses these lines, so the field
names of ``member``, ``user_event`` and ``started`` lines are a contract (see
docs and ``Node._log_member_event``).
"""

from __future__ import annotations

import collections
import logging
import sys
import threading
import time
from typing import IO, Any

import msgspec

_json = msgspec.json.Encoder()
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}
ROOT_LOGGER = "leaderless"


class JsonFormatter(logging.Formatter):
    """``{"ts":..., "level":..., "node":..., "component":..., "msg":..., **fields}``."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": record.created,
            "level": record.levelname.lower(),
            "node": getattr(record, "node", ""),
            "component": getattr(record, "component", record.name),
            "msg": record.getMessage(),
        }
        line.update(getattr(record, "fields", {}))
        return _json.encode(line).decode()


class ConsoleFormatter(logging.Formatter):
    """``12:00:01.234 INFO  node1 membership member kind=joined member=node2``."""

    def format(self, record: logging.LogRecord) -> str:
        clock = time.strftime("%H:%M:%S", time.localtime(record.created))
        millis = int(record.msecs)
        fields = " ".join(f"{k}={v}" for k, v in getattr(record, "fields", {}).items())
        node = getattr(record, "node", "")
        component = getattr(record, "component", record.name)
        return (f"{clock}.{millis:03d} {record.levelname:<7} {node} {component} "
                f"{record.getMessage()} {fields}").rstrip()


LOG_BUFFER_LINES = 5000
"""Recent log lines a process keeps in memory for ``GET /api/logs`` (``leaderless logs``):
at ~300 bytes a line, about 1.5 MB; older lines are only in the node's stderr/log file."""


class LogBuffer(logging.Handler):
    """The last ``LOG_BUFFER_LINES`` lines as JSON objects, each numbered (``seq``) so a
    reader can ask for what came after the last line it saw."""

    def __init__(self, lines_max: int = LOG_BUFFER_LINES) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter())
        self._lines: collections.deque[tuple[int, dict[str, Any]]] = collections.deque(
            maxlen=lines_max)
        self._seq = 0
        self._lock = threading.Lock()  # records may come from the group-commit thread

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = msgspec.json.decode(self.format(record))
        except Exception:  # a field that cannot be encoded: keep the message at least
            line = {"ts": record.created, "level": record.levelname.lower(),
                    "msg": record.getMessage()}
        with self._lock:
            self._seq += 1
            self._lines.append((self._seq, line))

    def since(self, seq: int, limit: int, node: str = "", level: str = "",
              component: str = "") -> tuple[list[dict[str, Any]], int]:
        """(up to ``limit`` lines after ``seq`` matching the filters — the newest ones when
        more match —, the sequence number to ask from next)."""
        floor = _LEVELS.get(level, 0)
        with self._lock:
            found = [dict(line, seq=n) for n, line in self._lines if n > seq
                     and (not node or line.get("node") == node)
                     and (not component or line.get("component") == component)
                     and _LEVELS.get(str(line.get("level")), 0) >= floor]
            last = self._seq
        return found[-limit:] if limit else [], last


_buffer = LogBuffer()


def log_buffer() -> LogBuffer:
    """This process's recent log lines (every ``leaderless`` logger feeds it)."""
    return _buffer


def configure_logging(log_format: str = "json", level: str = "info",
                      stream: IO[str] | None = None) -> None:
    """Send every ``leaderless`` logger to ``stream`` (stderr) in the chosen format, and
    keep the recent lines in memory (``log_buffer``)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else ConsoleFormatter())
    root = logging.getLogger(ROOT_LOGGER)
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.addHandler(_buffer)
    root.setLevel(_LEVELS.get(level, logging.INFO))
    root.propagate = False


class NodeLogger:
    """A logger bound to a node name and a component: ``log.info("member", kind=...)``."""

    def __init__(self, node: str, component: str) -> None:
        self.node = node
        self.component = component
        self._logger = logging.getLogger(f"{ROOT_LOGGER}.{component}")

    def _log(self, level: int, msg: str, fields: dict[str, Any]) -> None:
        if self._logger.isEnabledFor(level):
            extra = {"node": self.node, "component": self.component, "fields": fields}
            self._logger.log(level, msg, extra=extra)

    def debug(self, msg: str, **fields: Any) -> None:
        self._log(logging.DEBUG, msg, fields)

    def info(self, msg: str, **fields: Any) -> None:
        self._log(logging.INFO, msg, fields)

    def warning(self, msg: str, **fields: Any) -> None:
        self._log(logging.WARNING, msg, fields)

    def error(self, msg: str, **fields: Any) -> None:
        self._log(logging.ERROR, msg, fields)


class RateLimitedLog:
    """Logs the first occurrence of each key, then at most one line per ``interval_s``
    carrying how many were suppressed, so a peer spraying garbage cannot flood the log."""

    def __init__(self, log: NodeLogger, interval_s: float = 10.0, keys_max: int = 1024) -> None:
        self._log = log
        self._interval_s = interval_s
        self._keys_max = keys_max
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, key: str, msg: str, now: float, **fields: Any) -> None:
        last = self._last.get(key)
        if last is not None and now - last < self._interval_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        if len(self._last) >= self._keys_max and key not in self._last:
            self._last.clear()  # bound: forget old keys rather than grow without limit
            self._suppressed.clear()
        self._last[key] = now
        suppressed = self._suppressed.pop(key, 0)
        self._log.warning(msg, suppressed=suppressed, **fields)
