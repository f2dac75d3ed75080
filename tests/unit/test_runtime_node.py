"""The runtime's Node, in one process: real sockets on loopback, free ports, tmp dirs."""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from leaderless.api.client import ApiError, Client
from leaderless.config import load_config
from leaderless.core.effects import SaveIncarnation, SendPacket
from leaderless.core.messages import Address, MemberStatus, Packet, UserEvent
from leaderless.runtime.datadir import DataDir
from leaderless.runtime.errors import DataDirError, PortInUseError
from leaderless.runtime.node import Node
from leaderless.runtime.ports import free_port
from leaderless.runtime.process import run

TEST_TIMEOUT_S = 60.0


def run_test(main: Coroutine[Any, Any, None]) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(main, TEST_TIMEOUT_S)

    run(bounded())


async def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    """Poll ``predicate`` until it holds; fail with ``what`` after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.05)


def make_node(tmp_path: Path, name: str, port: int = 0, join: list[Address] | None = None,
              **flags: Any) -> Node:
    config = load_config({"name": name, "bind": f"127.0.0.1:{port}",
                          "data_dir": str(tmp_path / name),
                          "join": [str(a) for a in join or []], "ring.bootstrap": False,
                          **flags}, env={})
    return Node(config)


def states(node: Node) -> dict[str, MemberStatus]:
    return {m.name: m.status for m in node.members()}


async def start_cluster(tmp_path: Path, n: int) -> list[Node]:
    first = make_node(tmp_path, "n1")
    await first.start()
    nodes = [first]
    for i in range(2, n + 1):
        node = make_node(tmp_path, f"n{i}", join=[first.address])
        await node.start()
        nodes.append(node)
    names = {f"n{i}" for i in range(1, n + 1)}
    await wait_until(lambda: all(states(x) == dict.fromkeys(names, MemberStatus.ALIVE)
                                 for x in nodes), "every node sees every node alive")
    return nodes


async def stop_all(nodes: list[Node]) -> None:
    await asyncio.gather(*(node.stop() for node in nodes))


def with_cluster(n: int, body: Callable[[list[Node]], Awaitable[None]], tmp_path: Path) -> None:
    async def main() -> None:
        nodes = await start_cluster(tmp_path, n)
        try:
            await body(nodes)
        finally:
            await stop_all(nodes)

    run_test(main())


def test_cluster_converges_and_events_are_delivered_once(tmp_path: Path) -> None:
    async def body(nodes: list[Node]) -> None:
        seen: list[Counter[tuple[str, int]]] = [Counter() for _ in nodes]
        for node, counter in zip(nodes, seen, strict=True):
            node.subscribe_user_events(
                lambda e, c=counter: c.update([(e.origin, e.ltime)]))  # type: ignore[misc]
        async with Client(nodes[1].address) as client:
            reply = await client.send_event("deploy", b"v1")
        key = (reply.origin, reply.ltime)
        await wait_until(lambda: all(c[key] >= 1 for c in seen), "every node got the event")
        # Once no node has anything left to retransmit, no duplicate can still arrive.
        await wait_until(lambda: all(n.membership.pending_broadcasts() == 0 for n in nodes),
                         "gossip is quiet")
        assert [c[key] for c in seen] == [1] * len(nodes)

    with_cluster(3, body, tmp_path)


def test_graceful_stop_is_seen_as_left(tmp_path: Path) -> None:
    async def body(nodes: list[Node]) -> None:
        await nodes[2].stop()
        await wait_until(lambda: all(states(n)["n3"] == MemberStatus.LEFT for n in nodes[:2]),
                         "n3 is left everywhere")

    with_cluster(3, body, tmp_path)


def test_restart_rejoins_with_higher_incarnation(tmp_path: Path) -> None:
    async def body(nodes: list[Node]) -> None:
        old = nodes[2]
        port, before = old.address.port, old.membership.incarnation
        await old.stop()
        await wait_until(lambda: states(nodes[0])["n3"] == MemberStatus.LEFT, "n3 left")
        left_incarnation = nodes[0].membership.member("n3").incarnation  # type: ignore[union-attr]
        again = make_node(tmp_path, "n3", port=port, join=[nodes[0].address])
        await again.start()
        nodes[2] = again
        assert again.membership.incarnation > left_incarnation > before

        def back() -> bool:
            members = [n.membership.member("n3") for n in nodes[:2]]
            return all(m is not None and m.status == MemberStatus.ALIVE
                       and m.incarnation == again.membership.incarnation for m in members)

        await wait_until(back, "n3 is alive again everywhere with its new incarnation")

    with_cluster(3, body, tmp_path)


def test_join_retries_until_a_seed_answers(tmp_path: Path) -> None:
    async def main() -> None:
        seed_port = free_port()
        joiner = make_node(tmp_path, "joiner", join=[Address("127.0.0.1", seed_port)])
        await joiner.start()
        seed = make_node(tmp_path, "seed", port=seed_port)
        try:
            await wait_until(lambda: joiner.membership.counters.push_pulls_failed >= 1,
                             "a join attempt failed (there is no seed yet)")
            assert not joiner.joined.is_set()
            await seed.start()
            await asyncio.wait_for(joiner.joined.wait(), 30)
            await wait_until(lambda: set(states(seed)) == {"seed", "joiner"}, "seed knows joiner")
        finally:
            await stop_all([joiner, seed])

    run_test(main())


def test_event_send_errors_and_watch(tmp_path: Path) -> None:
    async def body(nodes: list[Node]) -> None:
        async with Client(nodes[0].address) as client:
            with pytest.raises(ApiError, match="payload is 600 bytes; the limit is 512"):
                await client.send_event("big", b"x" * 600)
        async with Client(nodes[1].address) as watcher:
            stream = await watcher.watch_events()
            async with Client(nodes[0].address) as client:
                await client.send_event("hello", b"\xff\x00")
            got = await asyncio.wait_for(anext(stream), 10)
        assert (got.name, got.origin, got.payload) == ("hello", "n1", b"\xff\x00")

    with_cluster(2, body, tmp_path)


def test_port_in_use_is_refused_naming_the_side(tmp_path: Path) -> None:
    async def main() -> None:
        port = free_port()
        for kind, side in ((socket.SOCK_DGRAM, "UDP"), (socket.SOCK_STREAM, "TCP")):
            with socket.socket(socket.AF_INET, kind) as blocker:
                blocker.bind(("127.0.0.1", port))
                if kind == socket.SOCK_STREAM:
                    blocker.listen()
                node = make_node(tmp_path, f"blocked-{side}", port=port)
                with pytest.raises(PortInUseError, match=f"already in use \\({side}\\)"):
                    await node.start()
                # The refused node released its data dir: another may take it.
                DataDir(tmp_path / f"blocked-{side}").open()

    run_test(main())


def test_data_dir_is_locked_and_must_be_writable(tmp_path: Path) -> None:
    async def main() -> None:
        first = make_node(tmp_path, "owner")
        await first.start()
        try:
            second = make_node(tmp_path, "owner")
            with pytest.raises(DataDirError, match="in use by another running node"):
                await second.start()
        finally:
            await first.stop()
        (tmp_path / "file").write_text("not a directory")
        blocked = make_node(tmp_path, "x", data_dir=str(tmp_path / "file" / "sub"))
        with pytest.raises(DataDirError, match="data_dir: cannot create"):
            await blocked.start()

    run_test(main())


def test_incarnation_store(tmp_path: Path) -> None:
    data_dir = DataDir(tmp_path / "d")
    data_dir.open()
    assert data_dir.load_incarnation() is None
    data_dir.save_incarnation(41)
    assert data_dir.load_incarnation() == 41
    assert (tmp_path / "d" / "incarnation").read_text() == "41\n"
    (tmp_path / "d" / "incarnation").write_text("garbage")
    with pytest.raises(DataDirError, match="is corrupt"):
        data_dir.load_incarnation()
    data_dir.close()


class RecordingTransport:
    """Records each send with the incarnation on disk at the moment it was sent."""

    def __init__(self, address: Address, data_dir: Path) -> None:
        self._address = address
        self._data_dir = data_dir
        self.sent: list[tuple[Address, str]] = []

    @property
    def address(self) -> Address:
        return self._address

    def send_packet(self, to: Address, packet: Packet) -> None:
        on_disk = (self._data_dir / "incarnation").read_text().strip()
        self.sent.append((to, on_disk))

    async def request(self, to: Address, message: Any, reply_type: Any,
                      timeout_s: float) -> Any:
        raise OSError("no network in this test")

    async def close(self) -> None:
        pass


def test_save_incarnation_is_durable_before_later_sends(tmp_path: Path) -> None:
    async def main() -> None:
        transport = RecordingTransport(Address("127.0.0.1", 7946), tmp_path / "solo")

        async def factory(*_: Any) -> RecordingTransport:
            return transport

        config = load_config({"name": "solo", "data_dir": str(tmp_path / "solo")}, env={})
        node = Node(config, transport_factory=factory)
        await node.start()
        peer = Address("127.0.0.1", 9)
        packet = Packet("solo", [], [])
        node._feed([SendPacket(peer, packet), SaveIncarnation(7), SendPacket(peer, packet)])
        assert transport.sent == [(peer, "0"), (peer, "7")]
        await node.stop()

    run_test(main())


def test_subscriber_errors_do_not_stop_the_node(tmp_path: Path) -> None:
    async def main() -> None:
        node = make_node(tmp_path, "solo")
        await node.start()
        got: list[UserEvent] = []

        def broken(_: UserEvent) -> None:
            raise RuntimeError("subscriber bug")

        node.subscribe_user_events(broken)
        unsubscribe = node.subscribe_user_events(got.append)
        node.broadcast_event("e", b"1")
        unsubscribe()
        node.broadcast_event("e", b"2")
        assert [e.payload for e in got] == [b"1"]
        await node.stop()

    run_test(main())
