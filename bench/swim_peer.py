"""One swim-protocol (PyPI ``swim-protocol==0.6.3``) peer per process, for the real-process
membership benchmark (bench/membership_real.py).

It runs the package's own UDP transport and worker with the package's DEFAULT timings and
prints every member status change to stderr as one JSON object per line, in the same shape as a
``leaderless node start --log-format json`` process::

    {"ts": 1700000000.123, "node": "n03", "msg": "started", "address": "127.0.0.1:40003"}
    {"ts": 1700000000.456, "node": "n03", "msg": "member", "kind": "alive", "member": "n07",
     "incarnation": 4}

Status mapping: ONLINE -> alive, SUSPECT -> suspect, OFFLINE -> dead. ``incarnation`` carries
swim-protocol's per-member sequence clock (its closest analogue).

swim-protocol 0.6.3 defaults (swimprotocol/config.py, BaseConfig.__init__), used unchanged:

    ping_interval    1.0 s   one random member is pinged per interval
    ping_timeout     0.3 s   wait for a direct ack
    ping_req_count   1       members asked for an indirect ping (SWIM's k)
    ping_req_timeout 0.9 s   wait for the indirect ack
    suspect_timeout  5.0 s   suspect -> offline when no ack arrives meanwhile
    sync_interval    0.5 s   one random member gets our pending gossip per interval

Members in swim-protocol are named by their ``host:port``; ``--member NAME@HOST:PORT`` (repeated)
tells this peer the benchmark name of each address so its output names members like leaderless
does. Every ``--member`` other than ourselves is also a configured peer unless ``--peer`` is
given, which then restricts the configured peers (e.g. to one seed).

Run: ``.venv/bin/python bench/swim_peer.py --name n01 --bind 127.0.0.1:40001
--member n00@127.0.0.1:40000 --member n01@127.0.0.1:40001 ...``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from contextlib import AsyncExitStack
from typing import Any

from swimprotocol.listener import Listener
from swimprotocol.members import Member, Members
from swimprotocol.status import Status
from swimprotocol.udp import UdpTransport
from swimprotocol.udp.config import UdpConfig
from swimprotocol.worker import Worker

# The secret only has to be shared by the benchmark's peers; swim-protocol signs every packet
# with it (HMAC-SHA256), which is part of the cost being measured.
BENCH_SECRET = "leaderless-bench-membership"

STATUS_KIND: dict[Status, str] = {
    Status.ONLINE: "alive",
    Status.SUSPECT: "suspect",
    Status.OFFLINE: "dead",
}


def emit(record: dict[str, Any]) -> None:
    """Write one JSON line to stderr and flush at once: the harness timestamps from ``ts`` but
    it must see the line promptly to decide when a phase is over."""
    sys.stderr.write(json.dumps(record, separators=(",", ":")) + "\n")
    sys.stderr.flush()


class StatusLog(Listener[Member]):
    """A Listener that also logs status changes synchronously.

    swim-protocol's ``Members`` calls ``listener.notify(member)`` inside the update itself; the
    package's ``on_notify`` callbacks run later in a task and see only the member's *current*
    status, so a quick ONLINE -> SUSPECT -> ONLINE flap between two loop turns would be lost.
    Logging inside ``notify`` sees every transition, and ``member.status_time`` is the exact
    moment the status changed.
    """

    def __init__(self, node: str, names: dict[str, str]) -> None:
        super().__init__()
        self._node = node
        self._names = names
        self._last: dict[str, Status] = {}

    def notify(self, item: Member) -> None:
        super().notify(item)
        if item.local:
            return
        status = item.status
        if self._last.get(item.name) == status:
            return  # a metadata-only change; not a membership event
        self._last[item.name] = status
        emit({
            "ts": item.status_time,
            "node": self._node,
            "msg": "member",
            "kind": STATUS_KIND.get(status, status.name.lower()),
            "member": self._names.get(item.name, item.name),
            "incarnation": item.clock,
        })


async def run_peer(name: str, bind: str, peers: list[str], names: dict[str, str]) -> int:
    config = UdpConfig(secret=BENCH_SECRET, local_name=bind, peers=peers,
                       local_metadata={"name": name.encode()})
    members = Members(config)
    # Members creates its Listener in __init__ and only ever calls .notify on it; swapping in
    # the logging subclass before the worker starts catches every later transition.
    members.listener = StatusLog(name, names)
    worker = Worker(config, members)
    transport = UdpTransport(config, worker)
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, done.set)
    loop.add_signal_handler(signal.SIGTERM, done.set)
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(transport)
        await stack.enter_async_context(worker)
        emit({"ts": time.time(), "node": name, "msg": "started", "address": bind,
              "peers": len(peers)})
        await done.wait()
    emit({"ts": time.time(), "node": name, "msg": "stopped"})
    return 0


def parse_member(text: str) -> tuple[str, str]:
    name, sep, address = text.partition("@")
    if not sep or not name or ":" not in address:
        raise argparse.ArgumentTypeError(f"expected NAME@HOST:PORT, got {text!r}")
    return name, address


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="this peer's benchmark name")
    parser.add_argument("--bind", required=True, help="HOST:PORT for UDP and TCP")
    parser.add_argument("--member", action="append", type=parse_member, default=[],
                        metavar="NAME@HOST:PORT", help="a cluster member (repeat)")
    parser.add_argument("--peer", action="append", default=[], metavar="HOST:PORT",
                        help="configured peers (default: every --member but ourselves)")
    args = parser.parse_args(argv)
    names = {address: member for member, address in args.member}
    names[args.bind] = args.name
    peers = list(args.peer) or [address for address in names if address != args.bind]
    if not peers:
        # swim-protocol's failure detector asserts that it has someone to ping.
        parser.error("need at least one --peer or another --member")
    return asyncio.run(run_peer(args.name, args.bind, peers, names))


if __name__ == "__main__":
    sys.exit(main())
