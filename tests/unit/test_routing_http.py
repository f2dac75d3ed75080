"""``GET /api/hot-partitions``, the routing metrics and ``/api/cluster``'s routing field,
against one real node in this process."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import aiohttp

from leaderless.client.async_client import AsyncClient
from leaderless.runtime.node import Node
from tests.unit.test_auth_api import ADMIN_PASSWORD, PASSWORD
from tests.unit.test_auth_api import with_cluster as with_auth_cluster
from tests.unit.test_metrics import Scrape
from tests.unit.test_runtime_node import make_node, run_test


async def _hot_node(tmp_path: Path) -> Node:
    node = make_node(tmp_path, "n1", http="127.0.0.1:0")
    await node.start()
    kv = node.kv
    assert kv is not None
    await kv.create_keyspace("orders", replication=1)
    for i in range(40):  # one hot partition (reads and writes), a few cold ones
        await kv.put("orders", b"hot-customer", f"v{i}".encode())
        await kv.get("orders", b"hot-customer")
        await kv.put("orders", f"cold-{i % 5}".encode(), b"x")
    await kv.get("orders", b"\x00\xffbinary")
    return node


def test_hot_partitions_endpoint_and_metrics_show_the_hot_key(tmp_path: Path) -> None:
    async def main() -> None:
        node = await _hot_node(tmp_path)
        try:
            assert node.http_address is not None
            base = f"http://{node.http_address}"
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{base}/api/hot-partitions?keyspace=orders&limit=3") as r:
                    assert r.status == 200
                    body = await r.json()
                async with http.get(f"{base}/api/hot-partitions") as r:
                    everything = await r.json()
                async with http.get(f"{base}/api/hot-partitions?limit=0") as r:
                    assert r.status == 400
                    assert (await r.json())["error"] == "bad_request"
                async with http.get(f"{base}/api/hot-partitions?keyspce=orders") as r:
                    assert r.status == 400
                async with http.get(f"{base}/api/cluster") as r:
                    members = (await r.json())["members"]
            scrape = Scrape(node.metrics()[0])
        finally:
            await node.stop()
        assert body["node"] == "n1" and body["half_life_s"] > 0
        [orders] = body["keyspaces"]
        assert orders["keyspace"] == "orders" and orders["requests_per_s"] > 0
        assert len(orders["partitions"]) == 3
        top = orders["partitions"][0]
        assert top["partition"] == "hot-customer" and top["label"] == "hot-customer"
        assert base64.b64decode(top["partition_b64"]) == b"hot-customer"
        assert top["reads_per_s"] > 0 and top["writes_per_s"] > 0
        assert top["requests_per_s"] > orders["partitions"][1]["requests_per_s"]
        assert 0.4 < top["share"] < 0.8  # 80 of 121 requests
        # This node is the only replica: the snitch knows it, having sent it every read.
        assert [p["peer"] for p in body["replicas"]] == ["n1"]
        assert body["replicas"][0]["requests"] >= 81
        binary = [p for p in everything["keyspaces"][0]["partitions"]
                  if p["partition_b64"] == base64.b64encode(b"\x00\xffbinary").decode()]
        assert binary and binary[0]["partition"] is None and binary[0]["label"] == "0x00ff" + (
            b"binary".hex())
        assert members[0]["routing"]["requests"] >= 81
        hot = scrape.value("leaderless_hot_partition_requests_per_second",
                           keyspace="orders", partition="hot-customer")
        assert hot is not None and hot > 0
        assert scrape.value("leaderless_requests_by_peer_total", peer="n1") >= 81
        latency = scrape.value("leaderless_replica_latency_seconds", peer="n1")
        assert latency is not None and latency > 0
        assert scrape.value("leaderless_replica_outstanding", peer="n1") == 0

    run_test(main())


def test_hot_partitions_need_a_token_and_show_only_readable_keys(tmp_path: Path) -> None:
    async def body(nodes: list[Node], clients: list[str], urls: list[str]) -> None:
        admin = AsyncClient(clients, timeout_s=10, ring_refresh_s=0)
        await admin.login("admin", ADMIN_PASSWORD)
        try:
            for name in ("shared", "secret"):
                await admin.create_keyspace(name, if_not_exists=True)
            await admin.create_role("reader")
            await admin.role_grant("reader", "read", "shared", b"pub/")
            await admin.create_user("reader1", PASSWORD, ["reader"])
        finally:
            await admin.close()
        base = urls[0]
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/api/hot-partitions") as r:
                assert r.status == 401
            admin_auth = await _login(http, base, "admin", ADMIN_PASSWORD)
            for path in ("shared/pub%2Fa", "shared/priv%2Fb", "secret/k"):
                async with http.put(f"{base}/v1/kv/{path}", data=b"v", headers=admin_auth) as r:
                    assert r.status == 200, await r.text()
            reader_auth = await _login(http, base, "reader1", PASSWORD)
            async with http.get(f"{base}/api/hot-partitions", headers=reader_auth) as r:
                assert r.status == 200
                seen = await r.json()
            async with http.get(f"{base}/api/hot-partitions", headers=admin_auth) as r:
                everything = await r.json()
        assert [k["keyspace"] for k in seen["keyspaces"]] == ["shared"]
        assert [p["partition"] for p in seen["keyspaces"][0]["partitions"]] == ["pub/a"]
        assert {"shared", "secret"} <= {k["keyspace"] for k in everything["keyspaces"]}

    with_auth_cluster(tmp_path, True, body)


async def _login(http: aiohttp.ClientSession, base: str, user: str, password: str
                 ) -> dict[str, str]:
    """The Authorization header of ``user``, once this node knows the user (a user just
    created through another node may take a moment to be readable here)."""
    for _ in range(100):
        async with http.post(f"{base}/v1/auth/login",
                             json={"user": user, "password": password}) as r:
            if r.status == 200:
                return {"Authorization": f"Bearer {(await r.json())['token']}"}
        await asyncio.sleep(0.1)
    raise AssertionError(f"{user} could not log in")
