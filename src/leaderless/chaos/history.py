"""Histories of a chaos run: every client operation as Jepsen records it.

An operation is two entries: an ``invoke`` when the client sends it, and one completion when
the client learns (or gives up on) the outcome:

- ``ok``: it happened, ``value`` is what the store answered;
- ``fail``: it surely did not happen (the request never left the client, or the store gave a
  definite negative answer such as a compare-and-set conflict or "lock held");
- ``info``: nobody knows (a timeout, a lost connection, an error after the request may have
  been applied somewhere): it may take effect at any time after its invocation, or never.

Each entry is ``{process, type, f, key, value, time, index}``: ``process`` the worker (a
negative process is the harness itself, e.g. the final reads), ``f`` the operation
(``read``, ``write``, ``cas``, ``add``, ``incr``, ``acquire``, ``release``...), ``time`` in
seconds of ``time.monotonic()`` (the same clock the nemesis stamps its faults with), and
``index`` the entry's position in the history. A process has at most one operation pending.
Values are JSON values, so a history round-trips through a JSONL file unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "FINAL_PROCESS",
    "Entry",
    "History",
    "Operation",
    "operations",
    "read_jsonl",
    "write_jsonl",
]

EntryType = Literal["invoke", "ok", "fail", "info"]
ENTRY_TYPES: tuple[str, ...] = ("invoke", "ok", "fail", "info")
FINAL_PROCESS = -1
"""The process of the harness's own reads after the faults are healed."""


@dataclasses.dataclass(frozen=True, slots=True)
class Entry:
    process: int
    type: EntryType
    f: str
    key: Any
    value: Any
    time: float
    index: int

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Entry:
        kind = data["type"]
        if kind not in ENTRY_TYPES:
            raise ValueError(f"entry {data.get('index')}: type {kind!r} is not one of "
                             f"{', '.join(ENTRY_TYPES)}")
        return cls(int(data["process"]), kind, str(data["f"]), data.get("key"),
                   data.get("value"), float(data["time"]), int(data["index"]))


@dataclasses.dataclass(frozen=True, slots=True)
class Operation:
    """An invocation with its completion (``None``: never completed, i.e. indeterminate)."""

    invoke: Entry
    completion: Entry | None

    @property
    def process(self) -> int:
        return self.invoke.process

    @property
    def f(self) -> str:
        return self.invoke.f

    @property
    def key(self) -> Any:
        return self.invoke.key

    @property
    def type(self) -> EntryType:
        """``ok``, ``fail`` or ``info`` (an operation never completed counts as ``info``)."""
        return "info" if self.completion is None else self.completion.type

    @property
    def start(self) -> float:
        return self.invoke.time

    @property
    def end(self) -> float | None:
        """When the outcome was learned; None when it never was (ok/fail only)."""
        if self.completion is None or self.completion.type == "info":
            return None
        return self.completion.time


class History:
    """An append-only history, recorded while the workload runs (one asyncio loop).

    ``invoke`` returns the entry; pass it to ``ok``/``fail``/``info``. ``close`` completes any
    operation still pending as ``info``.
    """

    def __init__(self, entries: Iterable[Entry] = ()) -> None:
        self.entries: list[Entry] = []
        self._pending: dict[int, Entry] = {}
        for entry in entries:
            self._append(entry)

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries)

    def _append(self, entry: Entry) -> None:
        if entry.index != len(self.entries):
            raise ValueError(f"entry index {entry.index} out of order (expected "
                             f"{len(self.entries)})")
        if entry.type == "invoke":
            if entry.process in self._pending:
                raise ValueError(f"process {entry.process} invoked {entry.f} at index "
                                 f"{entry.index} while its previous operation is pending")
            self._pending[entry.process] = entry
        else:
            started = self._pending.pop(entry.process, None)
            if started is None or started.f != entry.f:
                raise ValueError(f"{entry.type} of process {entry.process} at index "
                                 f"{entry.index} matches no pending {entry.f}")
        self.entries.append(entry)

    def _add(self, process: int, type_: EntryType, f: str, key: Any, value: Any,
             at: float | None) -> Entry:
        entry = Entry(process, type_, f, key, value,
                      time.monotonic() if at is None else at, len(self.entries))
        self._append(entry)
        return entry

    def invoke(self, process: int, f: str, key: Any = None, value: Any = None, *,
               at: float | None = None) -> Entry:
        return self._add(process, "invoke", f, key, value, at)

    def ok(self, invoked: Entry, value: Any = None, *, at: float | None = None) -> Entry:
        return self._add(invoked.process, "ok", invoked.f, invoked.key, value, at)

    def fail(self, invoked: Entry, value: Any = None, *, at: float | None = None) -> Entry:
        return self._add(invoked.process, "fail", invoked.f, invoked.key, value, at)

    def info(self, invoked: Entry, value: Any = None, *, at: float | None = None) -> Entry:
        return self._add(invoked.process, "info", invoked.f, invoked.key, value, at)

    def pending(self) -> list[Entry]:
        return list(self._pending.values())

    def close(self, reason: str = "the run ended first") -> None:
        """Complete every pending operation as ``info`` (its outcome is unknown)."""
        for entry in list(self._pending.values()):
            self.info(entry, {"error": reason})

    def operations(self) -> list[Operation]:
        return operations(self.entries)


def operations(entries: Iterable[Entry]) -> list[Operation]:
    """Invocations paired with their completions, in invocation order."""
    result: list[Operation] = []
    pending: dict[int, int] = {}
    for entry in entries:
        if entry.type == "invoke":
            pending[entry.process] = len(result)
            result.append(Operation(entry, None))
        else:
            at = pending.pop(entry.process, None)
            if at is None:
                raise ValueError(f"{entry.type} at index {entry.index} matches no invocation")
            result[at] = Operation(result[at].invoke, entry)
    return result


def write_jsonl(entries: Iterable[Entry], path: Path) -> None:
    """One JSON object per line, in history order."""
    with path.open("w") as out:
        for entry in entries:
            out.write(json.dumps(entry.to_json(), separators=(",", ":")))
            out.write("\n")


def read_jsonl(path: Path) -> History:
    """The history written by ``write_jsonl`` (checked: indexes in order, one pending
    operation per process, each completion matching an invocation)."""
    history = History()
    with path.open() as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                history._append(Entry.from_json(json.loads(line)))
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{number}: not a history entry: {exc}") from None
    return history
