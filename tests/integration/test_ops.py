"""Operations endpoints on real processes: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from leaderless.client import AsyncClient, UnknownKeyspaceError
from leaderless.runtime.ports import free_port
from tests.integration.helpers import NodeProcess, Processes, run_cli, wait_until

pytestmark = pytest.mark.integration


def get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read(), response.headers["Content-Type"]
    except urllib.error.HTTPError as err:
        return err.code, err.read(), err.headers["Content-Type"]
    except (urllib.error.URLError, ConnectionError):
        return 0, b"", ""  # not listening yet


def start(processes: Processes, name: str, join: str | None = None, *extra: str
          ) -> tuple[NodeProcess, str]:
    """A node with a client and an HTTP listener (``extra``: more ``node start`` options; a
    later ``--log-level`` wins); (the node, its HTTP base URL)."""
    http = f"127.0.0.1:{free_port()}"
    node = processes.start_node(name, None, join, None, "--client", f"127.0.0.1:{free_port()}",
                                "--http", http, "--log-level", "warning", *extra)
    return node, f"http://{http}"


def start_ready_cluster(processes: Processes, names: tuple[str, ...], *extra: str
                        ) -> tuple[list[NodeProcess], list[str]]:
    """``start`` each node, joined to the first; return (nodes, HTTP base URLs) once every
    node is ready and sees all of them alive."""
    first, first_url = start(processes, names[0], None, *extra)
    # The seed answering first spares the others the join back-off of a refused seed.
    wait_until(lambda: get(first_url + "/health/live")[0] == 200, "the first node is live")
    others = [start(processes, name, first.address, *extra) for name in names[1:]]
    nodes = [first, *(node for node, _ in others)]
    urls = [first_url, *(url for _, url in others)]
    wait_until(lambda: all(get(url + "/health/ready")[0] == 200 for url in urls)
               and all(sum(m.state == "alive" for m in n.members().values()) == len(names)
                       for n in nodes), "all nodes are ready and see each other alive")
    return nodes, urls


@pytest.mark.timeout(300)
def test_health_live_and_ready(processes: Processes) -> None:
    # A node whose only seed never answers is live but not ready.
    lonely, lonely_url = start(processes, "lonely", join=f"127.0.0.1:{free_port()}")
    wait_until(lambda: get(lonely_url + "/health/live")[0] == 200, "the lonely node is live")
    status, body, content_type = get(lonely_url + "/health/ready")
    assert status == 503 and content_type.startswith("application/json")
    ready = json.loads(body)
    assert ready["status"] == "not_ready" and ready["node"] == "lonely"
    assert ready["checks"]["joined"].startswith("joining")
    assert ready["checks"]["storage"] == "ok"

    _, urls = start_ready_cluster(processes, ("n1", "n2", "n3"))
    body = json.loads(get(urls[1] + "/health/ready")[1])
    assert body == {"status": "ready", "node": "n2",
                    "checks": {"joined": "ok", "storage": "ok", "ring": "ok"}}
    live = json.loads(get(urls[2] + "/health/live")[1])
    assert live == {"status": "live", "node": "n3"}


@pytest.mark.timeout(300)
def test_metrics_and_cluster_view(processes: Processes) -> None:
    nodes, urls = start_ready_cluster(processes, ("m1", "m2", "m3"))

    async def traffic() -> None:
        ring = json.loads(get(urls[0] + "/v1/ring")[1])["members"]
        addresses = [m["client_address"] for m in ring]
        async with AsyncClient(addresses, timeout_s=10) as kv:
            await kv.create_keyspace("ks", if_not_exists=True)
            for i in range(200):
                await kv.put("ks", f"k{i}", b"v", consistency="QUORUM")
                await kv.get("ks", f"k{i}")
            with pytest.raises(UnknownKeyspaceError):
                await kv.get("nope", "k")

    asyncio.run(traffic())
    total_puts = 0.0
    for url in urls:
        status, body, content_type = get(url + "/metrics")
        assert status == 200 and content_type.startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(body.decode())}
        members = {s.labels["state"]: s.value for s in families["leaderless_members"].samples}
        assert members["alive"] == 3 and members["dead"] == 0
        for name in ("leaderless_system_cpu_percent", "leaderless_system_memory_used_bytes",
                     "leaderless_system_disk_free_bytes", "leaderless_system_load1",
                     "leaderless_commit_syncs", "leaderless_coordinator_writes"):
            assert name in families, name
        for sample in families["leaderless_request_duration_seconds"].samples:
            if (sample.name.endswith("_count") and sample.labels["operation"] == "put"
                    and sample.labels["consistency"] == "QUORUM"):
                total_puts += sample.value
        gossip = {x.labels["kind"]: x.value for x in families["leaderless_gossip_bytes"].samples
                  if x.name.endswith("_total")}
        assert gossip["sent"] > 0 and gossip["received"] > 0
        syncs = families["leaderless_commit_sync_duration_seconds"].samples
        assert any(x.name.endswith("_count") and x.value > 0 for x in syncs)
        assert b"/tmp" not in body and b"data_dir" not in body
    assert total_puts == 200  # every put counted once, on the node that served it
    errors = [s for url in urls for f in text_string_to_metric_families(
        get(url + "/metrics")[1].decode()) if f.name == "leaderless_request_errors"
        for s in f.samples if s.labels.get("code") == "unknown_keyspace"]
    assert sum(s.value for s in errors) == 1

    def everyone_gossiped_load() -> bool:
        view = json.loads(get(urls[2] + "/api/cluster")[1])["members"]
        return len(view) == 3 and all(m["load"] is not None for m in view)

    wait_until(everyone_gossiped_load, "every member's load reached m3", timeout_s=60)
    view = json.loads(get(urls[2] + "/api/cluster")[1])
    assert view["node"] == "m3"
    assert [m["name"] for m in view["members"]] == ["m1", "m2", "m3"]
    assert all(m["state"] == "alive" for m in view["members"])
    assert sorted(f"http://{m['http']}" for m in view["members"]) == sorted(urls)
    assert abs(sum(m["ownership"] for m in view["members"]) - 1) < 0.01
    assert all(0 <= m["load"]["cpu_pct"] <= 100 for m in view["members"])

    # The CLI shows the same view, from the cluster port of any node.
    shown = run_cli("status", "--node", nodes[2].address)
    assert shown.returncode == 0, shown.stderr
    assert "cluster (load" in shown.stdout
    assert all(name in shown.stdout for name in ("m1", "m2", "m3"))
    listed = json.loads(run_cli("members", "--node", nodes[0].address, "--json").stdout)
    assert all(m["load"] is not None and "ops_per_s" in m["load"] for m in listed)


@pytest.mark.timeout(300)
def test_recent_logs_over_http_and_the_cli(processes: Processes) -> None:
    http = f"127.0.0.1:{free_port()}"
    processes.start_node("l1", None, None, None, "--http", http, "--log-level", "info")
    url = f"http://{http}"
    wait_until(lambda: get(url + "/health/ready")[0] == 200, "the node is ready")
    status, body, _ = get(url + "/api/logs?limit=100")
    assert status == 200
    answer = json.loads(body)
    assert answer["node"] == "l1" and answer["next"] >= len(answer["lines"]) > 0
    assert all(line["node"] == "l1" and "seq" in line for line in answer["lines"])
    assert "started" in [line["msg"] for line in answer["lines"]]
    newer = json.loads(get(url + f"/api/logs?since={answer['next']}")[1])
    assert all(line["seq"] > answer["next"] for line in newer["lines"])
    warnings = json.loads(get(url + "/api/logs?level=warning")[1])["lines"]
    assert all(line["level"] in ("warning", "error") for line in warnings)
    assert get(url + "/api/logs?limit=0")[0] == 400
    assert get(url + "/api/logs?bogus=1")[0] == 400
    shown = run_cli("logs", "--node", http, "--json", "--component", "node")
    assert shown.returncode == 0, shown.stderr
    assert any(json.loads(line)["msg"] == "started" for line in shown.stdout.splitlines())
    refused = run_cli("logs", "--node", f"127.0.0.1:{free_port()}")
    assert refused.returncode == 1 and "cannot reach" in refused.stderr


@pytest.mark.timeout(300)
def test_one_request_can_be_followed_across_nodes(processes: Processes) -> None:
    # Every node sees the others alive first, or the ALL write below is refused.
    _, urls = start_ready_cluster(processes, ("t1", "t2", "t3"), "--log-level", "debug")
    ring = json.loads(get(urls[0] + "/v1/ring")[1])["members"]
    clients = [m["client_address"] for m in sorted(ring, key=lambda m: m["name"])]

    async def one_write() -> None:
        async with AsyncClient(clients[:1], token_aware=False, timeout_s=10) as kv:
            await kv.create_keyspace("ks", if_not_exists=True)
            await kv.put("ks", "traced", b"v", consistency="ALL")

    asyncio.run(one_write())

    def kv_lines(url: str) -> list[dict[str, object]]:
        return json.loads(get(url + "/api/logs?component=kv&limit=5000")[1])["lines"]

    lines = {url: kv_lines(url) for url in urls}
    coordinated = {line["request_id"] for url in urls for line in lines[url]
                   if line["msg"] == "request"}
    served = [(url, line["request_id"]) for url in urls for line in lines[url]
              if line["msg"] == "served"]
    assert coordinated and served
    # Every replica request names a request its coordinator logged...
    assert {rid for _, rid in served if not str(rid).endswith(":0")} <= coordinated
    # ...and the ALL write was served, under one id, by all three nodes.
    by_id: dict[object, set[str]] = {}
    for url, rid in served:
        by_id.setdefault(rid, set()).add(url)
    assert any(nodes == set(urls) for nodes in by_id.values())
