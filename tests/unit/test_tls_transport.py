"""TLS on the TCP side, in one process: real sockets on loopback, certificates from
``security.pki`` in tmp dirs, nodes and transports on free ports."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from leaderless.api.client import Client, TlsFailedError
from leaderless.client.async_client import AsyncClient
from leaderless.client.connection import TlsHandshakeError
from leaderless.client.errors import ConnectionLostError, NoNodeAvailableError
from leaderless.config import load_config
from leaderless.core.kv_messages import PeerHello
from leaderless.core.messages import Address, Packet
from leaderless.runtime import tcp
from leaderless.runtime.counters import RuntimeCounters
from leaderless.runtime.drops import Drops
from leaderless.runtime.errors import StartupError
from leaderless.runtime.kv import PeerReply
from leaderless.runtime.logs import NodeLogger
from leaderless.runtime.node import Node
from leaderless.runtime.peers import PeerLinks
from leaderless.runtime.process import loop_factory
from leaderless.runtime.tcp import FrameClient, ServerConnection
from leaderless.runtime.transport import NetTransport
from leaderless.security import pki
from leaderless.security.tls import (
    ClientTls,
    NodeTls,
    PeerIdentity,
    client_context,
    peer_frame_refusal,
    tls_failure_reason,
)
from tests.unit.test_runtime_node import wait_until

TEST_TIMEOUT_S = 60.0
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "uvloop": loop_factory(), "asyncio": asyncio.new_event_loop}


def logged(caplog: pytest.LogCaptureFixture, msg: str) -> list[dict[str, Any]]:
    """The fields of every captured log line ``msg`` (``NodeLogger`` keeps them apart)."""
    return [dict(getattr(r, "fields", {}), node=getattr(r, "node", ""))
            for r in caplog.records if r.getMessage() == msg]


def run_on(loop: str, main: Coroutine[Any, Any, None]) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(main, TEST_TIMEOUT_S)

    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(bounded())


class Ping(msgspec.Struct, tag=1):
    text: str


class Pong(msgspec.Struct, tag=2):
    text: str
    peer: str


class Echo:
    """Answers each Ping with the sender's verified identity."""

    def __init__(self) -> None:
        self.identities: list[PeerIdentity | None] = []

    def handle_frame(self, message: Any, conn: ServerConnection) -> None:
        self.identities.append(conn.peer_identity)
        conn.send(Pong(message.text, str(conn.peer_identity)))


@pytest.fixture(scope="module")
def pkis(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The cluster CA with nodes a and b and client ops; another CA with node rogue."""
    cluster = tmp_path_factory.mktemp("cluster")
    other = tmp_path_factory.mktemp("other")
    pki.init_ca(cluster, force=True)
    pki.init_ca(other, force=True)
    for name in ("a", "b", "n1", "n2"):
        pki.issue_node(cluster, name)
    pki.issue_client(cluster, "ops")
    pki.issue_node(other, "rogue")
    pki.issue_node(other, "n3")
    return {"cluster": cluster, "other": other}


def node_tls(directory: Path, name: str, ca: Path | None = None) -> NodeTls:
    return NodeTls.load(ca or directory / "ca.crt", directory / f"{name}.crt",
                        directory / f"{name}.key")


async def bind(tls: NodeTls, handler: Any, drops: Drops) -> NetTransport:
    def ignore(packet: Packet) -> None:
        pass

    return await NetTransport.bind(Address("127.0.0.1", 0), ignore, handler, Ping, drops,
                                   server_ssl=tls.node_server, client_ssl=tls.node_client)


def drops_for(counters: RuntimeCounters, name: str) -> Drops:
    return Drops(counters, NodeLogger(name, "transport"))


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_two_transports_exchange_a_request_over_mutual_tls(pkis: dict[str, Path],
                                                           loop: str) -> None:
    async def main() -> None:
        echo = Echo()
        counters = RuntimeCounters()
        a = await bind(node_tls(pkis["cluster"], "a"), echo, drops_for(counters, "a"))
        b = await bind(node_tls(pkis["cluster"], "b"), Echo(), drops_for(counters, "b"))
        try:
            reply = await b.request(a.address, Ping("hello"), Pong, 5.0)
            assert reply == Pong("hello", "node b")
            assert echo.identities == [PeerIdentity("node", "b")]
            assert not counters.dropped_malformed_total
        finally:
            await a.close()
            await b.close()

    run_on(loop, main())


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_a_certificate_from_another_ca_is_refused_with_the_reason_logged(
        pkis: dict[str, Path], loop: str, caplog: pytest.LogCaptureFixture) -> None:
    """The rogue trusts the cluster CA (ca.crt is public) but its own certificate is from
    another CA: the handshake fails on the node port, which logs and counts why."""

    async def main() -> None:
        echo = Echo()
        counters = RuntimeCounters()
        a = await bind(node_tls(pkis["cluster"], "a"), echo, drops_for(counters, "a"))
        rogue_context = _rogue_context(pkis)
        try:
            with pytest.raises((ssl.SSLError, ConnectionError)):
                client = await FrameClient.connect(a.address, Pong, 5.0, rogue_context)
                client.send(Ping("let me in"))
                await client.recv(5.0)
            await wait_until(lambda: counters.dropped_malformed_total["tls_handshake"] == 1,
                             "the node port counted the failed handshake")
            assert echo.identities == []  # no frame reached the handler
        finally:
            await a.close()

    with caplog.at_level(logging.WARNING):
        run_on(loop, main())
    drops = [f for f in logged(caplog, "dropped_malformed") if f["kind"] == "tls_handshake"]
    assert [f["error"] for f in drops] == [
        "certificate verify failed: unable to get local issuer certificate"], drops


def _rogue_context(pkis: dict[str, Path]) -> ssl.SSLContext:
    # client_context checks its material, and refuses a certificate from another CA: build
    # the rogue's context by hand, as an attacker would.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(pkis["cluster"] / "ca.crt")
    context.load_cert_chain(pkis["other"] / "rogue.crt", pkis["other"] / "rogue.key")
    return context


def test_a_node_of_another_ca_cannot_reach_the_node_port(pkis: dict[str, Path]) -> None:
    """The rogue trusts only its own CA: it refuses our certificate, we count its alert."""

    async def main() -> None:
        counters = RuntimeCounters()
        rogue_counters = RuntimeCounters()
        a = await bind(node_tls(pkis["cluster"], "a"), Echo(), drops_for(counters, "a"))
        rogue = await bind(node_tls(pkis["other"], "rogue"), Echo(),
                           drops_for(rogue_counters, "rogue"))
        try:
            with pytest.raises(ssl.SSLCertVerificationError) as failure:
                await rogue.request(a.address, Ping("hi"), Pong, 5.0)
            # Our node port sends its chain up to the cluster CA, which the rogue lacks.
            assert tls_failure_reason(failure.value) == (
                "certificate verify failed: self-signed certificate in certificate chain")
            await wait_until(lambda: counters.dropped_malformed_total["tls_handshake"] == 1,
                             "the node port counted the failed handshake")
        finally:
            await a.close()
            await rogue.close()

    run_on("uvloop", main())


def test_a_plaintext_peer_is_refused_by_a_tls_node_port(pkis: dict[str, Path]) -> None:
    async def main() -> None:
        counters = RuntimeCounters()
        echo = Echo()
        a = await bind(node_tls(pkis["cluster"], "a"), echo, drops_for(counters, "a"))
        try:
            client = await FrameClient.connect(a.address, Pong, 5.0)
            client.send(Ping("plain"))
            with pytest.raises(ConnectionError):
                await client.recv(5.0)
            await wait_until(lambda: counters.dropped_malformed_total["tls_handshake"] == 1,
                             "the plaintext handshake counted")
            assert echo.identities == []
        finally:
            await a.close()

    run_on("uvloop", main())


def test_peer_links_send_only_to_the_node_the_certificate_names(pkis: dict[str, Path]) -> None:
    """A link for member "b" that reaches a node whose certificate is "a" (say, b's old
    address taken over) sends nothing and counts why; the link for "a" delivers."""

    async def main() -> None:
        echo = Echo()
        counters = RuntimeCounters()
        a = await bind(node_tls(pkis["cluster"], "a"), echo, drops_for(counters, "a"))
        replies: list[tuple[str, Any]] = []
        links = PeerLinks("b", Ping("hello from b"), Pong, drops_for(counters, "b"),
                          lambda name, message: replies.append((name, message)),
                          ssl_context=node_tls(pkis["cluster"], "b").node_client)
        try:
            links.send("not-a", a.address, Ping("for not-a"))
            await wait_until(lambda: counters.send_errors_total["peer_tls"] == 1,
                             "the wrong certificate counted")
            links.send("a", a.address, Ping("for a"))
            await wait_until(lambda: len(replies) == 2, "a answered the hello and the ping")
            assert replies == [("a", Pong("hello from b", "node b")),
                               ("a", Pong("for a", "node b"))]
        finally:
            links.close()
            await a.close()

    run_on("uvloop", main())


def test_a_silent_connection_is_closed_at_the_handshake_deadline(
        pkis: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tcp, "TLS_HANDSHAKE_TIMEOUT_S", 0.2)

    async def main() -> None:
        counters = RuntimeCounters()
        a = await bind(node_tls(pkis["cluster"], "a"), Echo(), drops_for(counters, "a"))
        try:
            reader, writer = await asyncio.open_connection(a.address.host, a.address.port)
            writer.write(b"\x16\x03")  # the start of a ClientHello, then nothing
            assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the node
            assert counters.dropped_malformed_total["tls_handshake"] == 1
            writer.close()
        finally:
            await a.close()

    run_on("uvloop", main())


def test_frame_refusal_rules() -> None:
    node, client = PeerIdentity("node", "n1"), PeerIdentity("client", "ops")
    assert peer_frame_refusal(node, admin_request=False) is None
    assert peer_frame_refusal(node, admin_request=False, announced_name="n1") is None
    assert peer_frame_refusal(client, admin_request=True) is None
    refusal = peer_frame_refusal(client, admin_request=False)
    assert refusal is not None and "only admin requests" in refusal
    refusal = peer_frame_refusal(node, admin_request=False, announced_name="n2")
    assert refusal is not None and "'n2'" in refusal and "'n1'" in refusal


# -- nodes ---------------------------------------------------------------------------------


def make_node(tmp_path: Path, pkis: dict[str, Path], name: str, *, ca_dir: str = "cluster",
              join: list[Address] | None = None, **flags: Any) -> Node:
    directory = pkis[ca_dir]
    config = load_config({
        "name": name, "bind": "127.0.0.1:0", "data_dir": str(tmp_path / name),
        "storage": "memory", "join": [str(a) for a in join or []], "ring.bootstrap": False,
        "tls.ca": str(pkis["cluster"] / "ca.crt"), "tls.cert": str(directory / f"{name}.crt"),
        "tls.key": str(directory / f"{name}.key"), **flags}, env={})
    return Node(config)




def test_tls_nodes_join_and_replicate_and_clients_need_the_ca(tmp_path: Path,
                                                               pkis: dict[str, Path]) -> None:
    async def main() -> None:
        n1 = make_node(tmp_path, pkis, "n1", client="127.0.0.1:0", http="127.0.0.1:0")
        await n1.start()
        n2 = make_node(tmp_path, pkis, "n2", join=[n1.address], client="127.0.0.1:0")
        try:
            await n2.start()
            await asyncio.wait_for(n2.joined.wait(), 20)
            await wait_until(lambda: len([m for m in n1.members()
                                          if m.status.name == "ALIVE"]) == 2, "n1 sees n2")
            assert n1.client_address is not None
            seed = [str(n1.client_address)]
            ca = ClientTls(pkis["cluster"] / "ca.crt")
            async with AsyncClient(seed, tls=ca, ring_refresh_s=0) as kv:
                await kv.create_keyspace("t", replication=2, if_not_exists=True)
                await kv.put("t", "k", b"v", consistency="ALL")  # over n1<->n2 TLS links
                item = await kv.get("t", "k", consistency="ALL")
                assert item == b"v"
            # HTTP is HTTPS with the node certificate; a client certificate is optional.
            assert n1.http_address is not None
            url = f"https://{n1.http_address}/health/live"
            async with aiohttp.ClientSession() as http:
                async with http.get(url, ssl=ca.context()) as response:
                    assert response.status == 200
                with pytest.raises(aiohttp.ClientError):
                    await http.get(f"http://{n1.http_address}/health/live")
            # A plaintext client to the TLS client port: a clear refusal, not a hang.
            with pytest.raises((ConnectionLostError, NoNodeAvailableError)) as plain:
                async with AsyncClient(seed, ring_refresh_s=0, connect_timeout_s=2) as kv:
                    await kv.get("t", "k")
            assert "if the node serves TLS" in str(plain.value)
            # A client that trusts another CA: the handshake error says why.
            with pytest.raises(TlsHandshakeError, match="certificate verify failed"):
                async with AsyncClient(seed, tls=ClientTls(pkis["other"] / "ca.crt"),
                                       ring_refresh_s=0) as kv:
                    await kv.get("t", "k")
            assert not n1.counters.dropped_malformed_total["tls_peer"]
        finally:
            await n2.stop()
            await n1.stop()

    run_on("uvloop", main())


def test_node_port_admits_client_certificates_for_admin_requests_only(
        tmp_path: Path, pkis: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        n1 = make_node(tmp_path, pkis, "n1")
        await n1.start()
        try:
            cluster = pkis["cluster"]
            ops = client_context(cluster / "ca.crt", cluster / "ops.crt", cluster / "ops.key")
            async with Client(n1.address, ssl_context=ops) as admin:
                assert (await admin.status()).name == "n1"
            # Without a client certificate the node port refuses, and says what to set.
            with pytest.raises(TlsFailedError, match="LEADERLESS_TLS_CERT"):
                async with Client(n1.address,
                                  ssl_context=client_context(cluster / "ca.crt")) as admin:
                    await admin.status()
            # Plaintext to the TLS node port: the error says TLS may be the reason.
            with pytest.raises(TlsFailedError, match="LEADERLESS_TLS_CA"):
                async with Client(n1.address) as admin:
                    await admin.status()
            # A client certificate announcing itself as a peer: refused and counted.
            conn = await FrameClient.connect(n1.address, PeerReply, 5.0, ops)
            conn.send(PeerHello("n2"))
            with pytest.raises(ConnectionError):
                await conn.recv(5.0)
            await wait_until(lambda: n1.counters.dropped_malformed_total["tls_peer"] == 1,
                             "the client certificate's peer frame counted")
            # Node n2's certificate announcing itself as n1: refused and counted.
            n2 = client_context(cluster / "ca.crt", cluster / "n2.crt", cluster / "n2.key")
            conn = await FrameClient.connect(n1.address, PeerReply, 5.0, n2)
            conn.send(PeerHello("n1"))
            with pytest.raises(ConnectionError):
                await conn.recv(5.0)
            await wait_until(lambda: n1.counters.dropped_malformed_total["tls_peer"] == 2,
                             "the impersonating hello counted")
            # The admin status still works on the same port afterwards.
            async with Client(n1.address, ssl_context=ops) as admin:
                assert (await admin.status()).name == "n1"
        finally:
            await n1.stop()

    with caplog.at_level(logging.WARNING):
        run_on("uvloop", main())
    drops = [f for f in logged(caplog, "dropped_malformed") if f["kind"] == "tls_peer"]
    assert drops and "only admin requests" in drops[0]["error"], drops


def test_a_node_with_another_ca_cannot_join(tmp_path: Path, pkis: dict[str, Path],
                                            caplog: pytest.LogCaptureFixture) -> None:
    """n3's CA and certificate are another cluster's: its join fails, both sides log why."""

    async def main() -> None:
        n1 = make_node(tmp_path, pkis, "n1")
        await n1.start()
        n3 = Node(load_config({
            "name": "n3", "bind": "127.0.0.1:0", "data_dir": str(tmp_path / "n3"),
            "storage": "memory", "join": [str(n1.address)], "ring.bootstrap": False,
            "tls.ca": str(pkis["other"] / "ca.crt"), "tls.cert": str(pkis["other"] / "n3.crt"),
            "tls.key": str(pkis["other"] / "n3.key")}, env={}))
        try:
            await n3.start()
            await wait_until(lambda: n1.counters.dropped_malformed_total["tls_handshake"] >= 1,
                             "the seed refused n3's handshake")
            assert not n3.joined.is_set()
            assert [m.name for m in n1.members()] == ["n1"]
        finally:
            await n3.stop()
            await n1.stop()

    with caplog.at_level(logging.WARNING):
        run_on("uvloop", main())
    seed = [f for f in logged(caplog, "dropped_malformed")
            if f["kind"] == "tls_handshake" and f["node"] == "n1"]
    # n3 refuses n1's certificate first (TLS 1.3: the server's comes first) and hangs up.
    assert seed and "hung up during the handshake" in seed[0]["error"], seed
    joiner = logged(caplog, "join_push_pull_failed")
    assert joiner and "certificate verify failed" in joiner[0]["error"], joiner


def test_node_refuses_to_start_with_wrong_material(tmp_path: Path,
                                                   pkis: dict[str, Path]) -> None:
    async def main() -> None:
        node = Node(load_config({
            "name": "n9", "bind": "127.0.0.1:0", "data_dir": str(tmp_path / "n9"),
            "storage": "memory", "tls.ca": str(pkis["cluster"] / "ca.crt"),
            "tls.cert": str(pkis["cluster"] / "n1.crt"),
            "tls.key": str(pkis["cluster"] / "n1.key")}, env={}))
        with pytest.raises(StartupError, match="certificate of node 'n1', but this node is 'n9'"):
            await node.start()
        other = Node(load_config({
            "name": "n3", "bind": "127.0.0.1:0", "data_dir": str(tmp_path / "n3b"),
            "storage": "memory", "tls.ca": str(pkis["cluster"] / "ca.crt"),
            "tls.cert": str(pkis["other"] / "n3.crt"),
            "tls.key": str(pkis["other"] / "n3.key")}, env={}))
        with pytest.raises(StartupError, match="was not issued by the CA"):
            await other.start()

    run_on("uvloop", main())
