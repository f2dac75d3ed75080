"""One contender of ``test_lock_fencing``: a separate OS process with its own client that
appends to a shared list under a lock.

    python tests/integration/lock_worker.py --nodes H:P,H:P --owner w3 --rounds 6 \
        --keyspace shared --key list [--pause-file PATH] [--parent-pid PID]

Each round: ``async with client.lock(LOCK)`` (blocking acquire, renewed every ttl/3), read
the list (a JSON list in a strong key), append ``["enter", owner, token, round]`` and write it
with ``fence=lease``, append ``["exit", owner, token, round]`` and write it again, release.
Every event is one JSON line on stdout, so the test can tell what happened:

- ``{"event": "acquired", "token": T, "round": R}``
- ``{"event": "write_ok", "entry": [...]}`` / ``{"event": "fenced", "entry": [...]}``
- ``{"event": "paused", "token": T}``: with ``--pause-file``, in its first round the worker
  reads the list right after acquiring, reports ``paused`` and waits for the file to exist
  before writing; that is where the test SIGSTOPs it. It writes its (by then stale)
  snapshot without checking its lease again: the fencing token alone must stop the write.
- ``{"event": "released", "token": T, "lost": bool}``: ``lost`` when a renewal found the
  lease gone or it ran out by the worker's clock (the release is then skipped or refused).
- ``{"event": "done"}`` at the end; the exit status is 0 unless something unexpected
  happened (then a traceback on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from leaderless.client import AsyncClient, FencedError, Lease

LOCK = "list-lock"
DEADLINE_S = 90.0
"""A worker that is still running after this long is stuck: it exits with an error."""


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


async def watch_parent(parent_pid: int) -> None:
    """Exit if the test process is gone (a killed pytest must not leave workers behind)."""
    started = time.monotonic()
    while True:
        if os.getppid() != parent_pid:
            os._exit(3)
        if time.monotonic() - started > DEADLINE_S:
            print(f"worker still running after {DEADLINE_S} s", file=sys.stderr, flush=True)
            os._exit(4)
        await asyncio.sleep(0.5)


async def write(kv: AsyncClient, opts: argparse.Namespace, items: list[Any],
                entry: list[Any], lease: Lease) -> bool:
    """Append ``entry`` to ``items`` and write the list under ``lease``; False if fenced."""
    items.append(entry)
    try:
        await kv.put(opts.keyspace, opts.key, json.dumps(items).encode(), fence=lease)
    except FencedError as exc:
        emit("fenced", entry=entry, error=str(exc))
        return False
    emit("write_ok", entry=entry)
    return True


async def read(kv: AsyncClient, opts: argparse.Namespace) -> list[Any]:
    raw = await kv.get(opts.keyspace, opts.key)
    items: list[Any] = [] if raw is None else json.loads(raw)
    return items


async def wait_for_file(path: Path) -> None:
    while not path.exists():
        await asyncio.sleep(0.02)


async def one_round(kv: AsyncClient, opts: argparse.Namespace, round_: int) -> None:
    async with kv.lock(LOCK, ttl=opts.ttl, wait=None, owner=opts.owner) as lease:
        emit("acquired", token=lease.token, round=round_)
        items = await read(kv, opts)
        if opts.pause_file and round_ == 0:
            emit("paused", token=lease.token)
            await wait_for_file(Path(opts.pause_file))
        entered = await write(kv, opts, items, ["enter", opts.owner, lease.token, round_],
                              lease)
        if entered:
            await write(kv, opts, items, ["exit", opts.owner, lease.token, round_], lease)
        lost = lease.lost or lease.valid_for_s() <= 0
    emit("released", token=lease.token, lost=lost)


async def main_async(opts: argparse.Namespace) -> None:
    watcher = asyncio.create_task(watch_parent(opts.parent_pid)) if opts.parent_pid else None
    async with AsyncClient(opts.nodes.split(","), timeout_s=10) as kv:
        for round_ in range(opts.rounds):
            await one_round(kv, opts, round_)
    emit("done")
    if watcher is not None:
        watcher.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", required=True, help="client addresses, comma-separated")
    parser.add_argument("--owner", required=True, help="this worker's lock owner id")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--ttl", type=float, default=2.0)
    parser.add_argument("--keyspace", default="shared")
    parser.add_argument("--key", default="list")
    parser.add_argument("--pause-file", default="")
    parser.add_argument("--parent-pid", type=int, default=0)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
