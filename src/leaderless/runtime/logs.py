"""Structured logs: one JSON object per line on stderr (or a console format for people).

Every line has ``ts`` (unix seconds, float), ``level``, ``node``, ``component`` and ``msg``,
plus the fields of that message. The benchmark harness parses these lines, so the field
names of ``member``, ``user_event`` and ``started`` lines are a contract (see
docs and ``Node._log_member_event``).
"""

from __future__ import annotations

import logging
import sys
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


def configure_logging(log_format: str = "json", level: str = "info",
                      stream: IO[str] | None = None) -> None:
    """Send every ``leaderless`` logger to ``stream`` (stderr) in the chosen format."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else ConsoleFormatter())
    root = logging.getLogger(ROOT_LOGGER)
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
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
