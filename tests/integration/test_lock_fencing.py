"""Ten OS processes contend for one lock to append to a shared list; the holder is SIGSTOPped
past its TTL, another process is granted the lock, and the stale holder's fenced write is
refused when it resumes. The list must show mutual exclusion and keep every write that was
acknowledged.

The workers are ``lock_worker.py`` processes (one client each, see its docstring). Worker
``w0`` starts first, acquires the lock, reads the (empty) list and waits for a file before
writing; the test checks that the lock's holder is ``w0``, SIGSTOPs it, starts the nine
others, and waits until the lock has granted a newer token and the newer holder has written
the list. Only then does it let ``w0`` go on (the file, then SIGCONT): ``w0`` writes its stale
snapshot under its old token without checking its lease, and the fencing token must refuse it
(a write accepted there would have wiped the others' entries).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from leaderless.client import Client
from tests.integration.helpers import LineReader, Processes, clean_env, wait_until
from tests.integration.test_kv_cluster import start_cluster

pytestmark = pytest.mark.integration

WORKER = Path(__file__).with_name("lock_worker.py")
WORKERS = 10
ROUNDS = 6
TTL_S = 2.0
LOCK = "list-lock"
KEYSPACE = "shared"
KEY = "list"
Entry = tuple[str, str, int, int]
"""("enter" | "exit", owner, token, round), as the workers write them."""


class Worker:
    def __init__(self, owner: str, process: subprocess.Popen[str], stderr_path: Path) -> None:
        self.owner = owner
        self.process = process
        self.stderr_path = stderr_path
        assert process.stdout is not None
        self.reader = LineReader(process.stdout)
        self.events: list[dict[str, Any]] = []

    def drain(self) -> list[dict[str, Any]]:
        """Every event reported so far (stdout lines must all be JSON)."""
        while not self.reader.lines.empty():
            self.events.append(json.loads(self.reader.lines.get_nowait()))
        return self.events

    def next_event(self) -> dict[str, Any]:
        event: dict[str, Any] = json.loads(self.reader.next())
        self.events.append(event)
        return event

    def read_to_done(self) -> list[dict[str, Any]]:
        """Every event, once the process has exited: its last line is ``done``."""
        self.drain()
        while not self.events or self.events[-1]["event"] != "done":
            self.next_event()  # the reader thread may still be behind the exited process
        return self.events

    def stderr(self) -> str:
        return self.stderr_path.read_text() if self.stderr_path.exists() else ""


def spawn_worker(owner: str, nodes: list[str], tmp_path: Path, *extra: str) -> Worker:
    args = [sys.executable, str(WORKER), "--nodes", ",".join(nodes), "--owner", owner,
            "--rounds", str(ROUNDS), "--ttl", str(TTL_S), "--keyspace", KEYSPACE,
            "--key", KEY, "--parent-pid", str(os.getpid()), *extra]
    stderr_path = tmp_path / f"{owner}.stderr"
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=stderr, text=True, env=clean_env())
    return Worker(owner, process, stderr_path)


def kill(workers: list[Worker]) -> None:
    for worker in workers:
        if worker.process.poll() is None:
            worker.process.send_signal(signal.SIGKILL)  # also ends a SIGSTOPped process
    for worker in workers:
        try:
            worker.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def as_entry(raw: list[Any]) -> Entry:
    kind, owner, token, round_ = raw
    return (str(kind), str(owner), int(token), int(round_))


def sections(items: list[Entry]) -> list[list[Entry]]:
    """The list cut into runs of consecutive entries with the same token."""
    runs: list[list[Entry]] = []
    for entry in items:
        if runs and runs[-1][-1][2] == entry[2]:
            runs[-1].append(entry)
        else:
            runs.append([entry])
    return runs


def check_mutual_exclusion(items: list[Entry], fenced: set[Entry]) -> None:
    """Each critical section is one run: its holder's "enter" then its "exit", same owner,
    same token, nothing of another token in between; tokens grow from run to run. A run
    may lack its "exit" only if that worker reported the exit write as fenced."""
    runs = sections(items)
    tokens = [run[0][2] for run in runs]
    assert tokens == sorted(set(tokens)), f"tokens do not strictly increase: {tokens}"
    for run in runs:
        kind, owner, token, round_ = run[0]
        assert kind == "enter", f"section of token {token} starts with {run[0]}"
        exit_ = ("exit", owner, token, round_)
        if len(run) == 1:
            assert exit_ in fenced, f"section of token {token} has no exit: {run}"
        else:
            assert run == [run[0], exit_], f"section of token {token} interleaved: {run}"


@pytest.mark.timeout(150)
def test_fenced_stale_holder_and_mutual_exclusion(processes: Processes,
                                                  tmp_path: Path) -> None:
    _, nodes = start_cluster(processes)
    workers: list[Worker] = []
    go = tmp_path / "w0-go"
    with Client(nodes, timeout_s=10) as kv:
        kv.create_keyspace(KEYSPACE, replication=3, mode="strong")
        try:
            stale = spawn_worker("w0", nodes, tmp_path, "--pause-file", str(go))
            workers.append(stale)
            assert stale.next_event()["event"] == "acquired"
            paused = stale.next_event()
            assert paused["event"] == "paused"
            stale_token: int = paused["token"]
            status = kv.lock_status(LOCK)
            assert status.held and status.holder == "w0" and status.token == stale_token

            # Freeze the holder: its renewals stop, its lease runs out.
            stale.process.send_signal(signal.SIGSTOP)
            workers += [spawn_worker(f"w{i}", nodes, tmp_path) for i in range(1, WORKERS)]
            wait_until(lambda: kv.lock_status(LOCK).token > stale_token,
                       "another worker is granted the lock", timeout_s=60)

            def newer_write() -> bool:
                return any(e["event"] == "write_ok" and e["entry"][2] > stale_token
                           for w in workers[1:] for e in w.drain())

            wait_until(newer_write, "a newer holder wrote the list", timeout_s=60)

            # Wake the stale holder: it writes its old snapshot under its old token.
            go.touch()
            stale.process.send_signal(signal.SIGCONT)
            for worker in workers:
                try:
                    code = worker.process.wait(timeout=90)
                except subprocess.TimeoutExpired:
                    raise AssertionError(f"{worker.owner} did not finish") from None
                assert code == 0, f"{worker.owner} exited {code}: {worker.stderr()}"
                worker.read_to_done()
            final = kv.get(KEYSPACE, KEY)
        finally:
            kill(workers)

    assert final is not None
    items = [as_entry(raw) for raw in json.loads(final)]
    events = {w.owner: w.events for w in workers}
    written = [as_entry(e["entry"]) for evs in events.values() for e in evs
               if e["event"] == "write_ok"]
    fenced = {as_entry(e["entry"]) for evs in events.values() for e in evs
              if e["event"] == "fenced"}

    # The stale holder's write was refused, and nothing of its old token is in the list.
    assert ("enter", "w0", stale_token, 0) in fenced, events["w0"]
    assert not [e for e in items if e[2] == stale_token], items
    # Every acknowledged write is in the list exactly once, and nothing else is.
    assert sorted(written) == sorted(items), (written, items)
    assert len(set(items)) == len(items)
    check_mutual_exclusion(items, fenced)
    # Everyone got its turns: w0 all but the fenced one, the others all (unless fenced).
    enters = [e for e in items if e[0] == "enter"]
    assert len(enters) + len([f for f in fenced if f[0] == "enter"]) == WORKERS * ROUNDS
