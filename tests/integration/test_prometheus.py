"""A real Prometheus scrapes a real 3-node cluster (issue 6, item 8).

Debian's ``prometheus`` package (``.ci/run`` installs it with apt-get when it is missing)
is started on loopback with a config that scrapes the three nodes' ``/metrics`` every
second; the test waits until it reports every target up and then asks it, through its
HTTP API, for the cluster's request counter and member gauge. Where the package brings
``promtool``, a second test lints one node's exposition with ``promtool check metrics``.

Without the binaries the tests skip and say why. Everything runs on free loopback ports
and in tmp dirs; Prometheus is always stopped (terminate, then kill) in a ``finally``.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from leaderless.client import AsyncClient
from leaderless.runtime.ports import free_port
from tests.integration.helpers import Processes, wait_until

pytestmark = pytest.mark.integration

PUTS = 60
GETS = 60
DEADLINE_S = 60.0
"""Prometheus scrapes every second; a minute covers a slow start on a loaded CI machine."""

ACCEPTED_LINT: frozenset[str] = frozenset()
"""``promtool check metrics`` lint problems accepted knowingly, as it prints them
(``<metric name> <problem>``, one a line). Anything else fails the test."""


def _require(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed: no `{binary}` on PATH "
                    f"({os.environ.get('PATH', '')}); it comes with Debian's `prometheus` "
                    "package (`apt-get install -y --no-install-recommends prometheus`), "
                    "which .ci/run installs when apt-get can")
    return path


@pytest.fixture(scope="module")
def prometheus_bin() -> str:
    return _require("prometheus")


@pytest.fixture(scope="module")
def promtool_bin() -> str:
    return _require("promtool")


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, b""  # not listening (yet)


@dataclass(frozen=True)
class Cluster:
    http: list[str]
    """The nodes' HTTP listeners, ``127.0.0.1:PORT`` (the Prometheus targets)."""
    sent: dict[str, int]
    """Client requests the test sent, by the ``operation`` label they are counted under."""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three nodes with HTTP listeners, after a known number of client requests."""
    processes = Processes(tmp_path_factory.mktemp("cluster"))
    try:
        http: list[str] = []
        clients: list[str] = []
        seed: str | None = None
        for name in ("p1", "p2", "p3"):
            http.append(f"127.0.0.1:{free_port()}")
            clients.append(f"127.0.0.1:{free_port()}")
            node = processes.start_node(name, None, seed, None, "--client", clients[-1],
                                        "--http", http[-1], "--log-level", "warning")
            seed = seed or node.address
        wait_until(lambda: all(get(f"http://{a}/health/ready")[0] == 200 for a in http),
                   "all three nodes are ready", timeout_s=DEADLINE_S)

        async def traffic() -> None:
            # No background ring refresh: every request the client sends is one we count.
            async with AsyncClient(clients, timeout_s=10, ring_refresh_s=0) as kv:
                await kv.create_keyspace("metrics", if_not_exists=True)
                for i in range(PUTS):
                    await kv.put("metrics", f"k{i}", b"v", consistency="QUORUM")
                for i in range(GETS):
                    assert await kv.get("metrics", f"k{i}") == b"v"

        asyncio.run(traffic())
        # connect() reads the ring and the keyspaces once: two requests of its own.
        sent = {"describe_ring": 1, "list_keyspaces": 1, "create_keyspace": 1,
                "put": PUTS, "get": GETS}
        yield Cluster(http, sent)
    finally:
        processes.kill_all()


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGKILL it if the test process dies, so that
    even a killed pytest leaves no Prometheus behind."""
    if sys.platform == "linux":
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


class PrometheusApi:
    def __init__(self, address: str, log_path: Path) -> None:
        self.base = f"http://{address}"
        self.log_path = log_path

    def log_tail(self) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-3000:]

    def api(self, path: str, **params: str) -> Any:
        """The ``data`` of a successful API answer, or None (not up yet, or an error)."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        status, body = get(f"{self.base}/api/v1/{path}{query}")
        if status != 200:
            return None
        answer = json.loads(body)
        return answer["data"] if answer.get("status") == "success" else None

    def targets(self) -> list[dict[str, Any]]:
        data = self.api("targets", state="active")
        return [] if data is None else list(data["activeTargets"])

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's vector (empty if Prometheus has no such series yet)."""
        data = self.api("query", query=promql)
        if data is None:
            return []
        assert data["resultType"] == "vector", data
        return list(data["result"])


@pytest.fixture
def prometheus(prometheus_bin: str, cluster: Cluster, tmp_path: Path
               ) -> Iterator[PrometheusApi]:
    """Prometheus on a free loopback port, scraping the cluster every second."""
    targets = ", ".join(f'"{a}"' for a in cluster.http)
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  scrape_timeout: 1s\n"
        "  evaluation_interval: 1m\n"
        "scrape_configs:\n"
        "  - job_name: leaderless\n"
        "    scrape_interval: 1s\n"
        "    metrics_path: /metrics\n"
        f"    static_configs:\n      - targets: [{targets}]\n")
    address = f"127.0.0.1:{free_port()}"
    log_path = tmp_path / "prometheus.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [prometheus_bin, f"--config.file={config}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address={address}",
             "--storage.tsdb.retention.time=1h",
             "--web.max-connections=16", "--query.max-concurrency=2",
             "--log.level=warn"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=tmp_path,
            preexec_fn=_die_with_parent)
    try:
        api = PrometheusApi(address, log_path)

        def ready() -> bool:
            assert process.poll() is None, (
                f"prometheus exited with {process.returncode}:\n{api.log_tail()}")
            return get(f"{api.base}/-/ready")[0] == 200

        wait_until(ready, "prometheus is ready", timeout_s=DEADLINE_S)
        yield api
    finally:
        _stop(process)


@pytest.mark.timeout(300)
@pytest.mark.usefixtures("prometheus_bin")  # first: skip before starting any node
def test_prometheus_scrapes_the_cluster(cluster: Cluster, prometheus: PrometheusApi) -> None:
    expected_targets = set(cluster.http)

    def all_up() -> bool:
        targets = prometheus.targets()
        return ({t["labels"]["instance"] for t in targets} == expected_targets
                and all(t["health"] == "up" for t in targets))

    try:
        wait_until(all_up, "prometheus reports all three targets up", timeout_s=DEADLINE_S)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {prometheus.targets()}\n{prometheus.log_tail()}"
                             ) from None
    assert all(t["lastError"] == "" and t["scrapeUrl"].endswith("/metrics")
               for t in prometheus.targets())

    # Every request is counted once, on the node that served it: the cluster-wide sum is
    # what the test sent, once Prometheus has scraped every node after the traffic.
    total = sum(cluster.sent.values())
    promql = "sum(leaderless_request_duration_seconds_count)"

    def value(result: list[dict[str, Any]]) -> float | None:
        return float(result[0]["value"][1]) if len(result) == 1 else None

    def counted_all() -> bool:
        return value(prometheus.query(promql)) == total

    try:
        wait_until(counted_all, f"{promql} is {total}", timeout_s=DEADLINE_S)
    except AssertionError as exc:
        by_op = prometheus.query("sum by (operation) "
                                 "(leaderless_request_duration_seconds_count)")
        raise AssertionError(f"{exc}: it is {value(prometheus.query(promql))}; by "
                             f"operation {by_op}; sent {cluster.sent}") from None
    by_operation = {r["metric"]["operation"]: float(r["value"][1]) for r in prometheus.query(
        "sum by (operation) (leaderless_request_duration_seconds_count)")}
    assert by_operation == cluster.sent
    # The histogram is consistent: its +Inf bucket counts every request too.
    inf = prometheus.query('sum(leaderless_request_duration_seconds_bucket{le="+Inf"})')
    assert value(inf) == total
    puts = prometheus.query('sum(leaderless_request_duration_seconds_count'
                            '{operation="put", consistency="QUORUM"})')
    assert value(puts) == PUTS

    # Every node sees all three members alive.
    alive = prometheus.query('leaderless_members{state="alive"}')
    assert {r["metric"]["instance"]: float(r["value"][1]) for r in alive} == dict.fromkeys(
        expected_targets, 3.0)
    assert all(r["metric"]["job"] == "leaderless" for r in alive)
    dead = prometheus.query('sum(leaderless_members{state="dead"})')
    assert value(dead) == 0


@pytest.mark.timeout(120)
def test_promtool_accepts_the_exposition(promtool_bin: str, cluster: Cluster) -> None:
    status, body = get(f"http://{cluster.http[0]}/metrics")
    assert status == 200 and b"leaderless_request_duration_seconds_count" in body
    started = time.monotonic()
    checked = subprocess.run([promtool_bin, "check", "metrics"], input=body,
                             capture_output=True, timeout=60)
    output = (checked.stdout + checked.stderr).decode(errors="replace")
    # Exit 0: clean; 3: lint problems only (listed one a line); 1: it could not parse.
    assert checked.returncode in (0, 3), (
        f"promtool check metrics failed ({checked.returncode}) after "
        f"{time.monotonic() - started:.1f} s:\n{output}")
    assert "error" not in output.lower(), output
    problems = {line.strip() for line in output.splitlines() if line.strip()}
    assert problems <= ACCEPTED_LINT, f"new promtool lint problems:\n{output}"
    assert (checked.returncode == 0) == (not problems), output
