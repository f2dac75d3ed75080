"""ChaosCluster on real node processes: netns mode (each node in its own network namespace
on a private bridge; skipped with the reason when this machine cannot) and loopback mode
(partitions through the test-only transport hook). Also the hook itself and cleanup."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from leaderless.chaos.cluster import (
    NAME_PREFIX,
    ChaosCluster,
    ChaosUnsupported,
    netns_unavailable,
    sweep_leftovers,
)
from leaderless.client import AsyncClient
from leaderless.runtime import fault_partition
from leaderless.runtime.logs import NodeLogger

pytestmark = pytest.mark.integration
KEYSPACE = "chaos"
DOWN = ("suspect", "dead")

_netns_problem = netns_unavailable()
needs_netns = pytest.mark.skipif(_netns_problem is not None,
                                 reason=f"netns mode unavailable: {_netns_problem}")


def leftovers(cluster: ChaosCluster) -> list[str]:
    """Namespaces, links and mounts of this cluster still on the machine."""
    found = [ns for ns in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                         text=True).stdout.split() if ns.startswith(cluster.tag)]
    if os.path.isdir("/sys/class/net"):
        found += [link for link in os.listdir("/sys/class/net") if link.startswith(cluster.tag)]
    mounts = Path("/proc/mounts").read_text() if Path("/proc/mounts").exists() else ""
    found += [line for line in mounts.splitlines() if line.startswith(f"{cluster.tag}-")]
    return found


async def put_get(addresses: list[str], key: bytes, value: bytes) -> bytes | None:
    async with AsyncClient(addresses, timeout_s=10) as kv:
        await kv.create_keyspace(KEYSPACE, 3, "eventual", read_consistency="QUORUM",
                                 write_consistency="QUORUM", if_not_exists=True)
        for _ in range(50):  # the schema reaches every node by gossip
            try:
                await kv.put(KEYSPACE, key, value)
                break
            except Exception:  # noqa: BLE001 (retried until the deadline)
                await asyncio.sleep(0.2)
        got: bytes | None = await kv.get(KEYSPACE, key)
        return got


async def get(addresses: list[str], key: bytes) -> bytes | None:
    async with AsyncClient(addresses, timeout_s=10) as kv:
        got: bytes | None = await kv.get(KEYSPACE, key)
        return got


@pytest.fixture(scope="module")
def netns_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChaosCluster]:
    if _netns_problem is not None:
        pytest.skip(f"netns mode unavailable: {_netns_problem}")
    cluster = ChaosCluster(3, tmp_path_factory.mktemp("netns"), seed=7, mode="netns")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
    assert leftovers(cluster) == []


@needs_netns
def test_netns_cluster_serves_from_its_own_addresses(netns_cluster: ChaosCluster) -> None:
    c = netns_cluster
    assert c.mode == "netns"
    assert c.subnet is not None and c.host_ip == str(next(c.subnet.hosts()))
    ips = {node.ip for node in c.nodes}
    assert len(ips) == 3 and all(ip in {str(h) for h in c.subnet.hosts()} for ip in ips)
    assert all(node.namespace and node.namespace.startswith(c.tag) for node in c.nodes)
    # Each node process really lives in its own namespace.
    inodes = {os.stat(f"/proc/{node.pid}/ns/net").st_ino for node in c.nodes}
    assert len(inodes) == 3 and os.stat("/proc/self/ns/net").st_ino not in inodes
    assert asyncio.run(put_get(c.client_addresses(), b"k1", b"v1")) == b"v1"


@needs_netns
def test_netns_isolate_and_heal(netns_cluster: ChaosCluster) -> None:
    c = netns_cluster
    c.isolate("n3")
    assert c.blocked == {"n1": {"n3"}, "n2": {"n3"}, "n3": {"n1", "n2"}}
    c.wait_for(lambda: c.members("n1").get("n3") in DOWN and c.members("n2").get("n3") in DOWN,
               "n1 and n2 see n3 down")
    c.wait_for(lambda: all(c.members("n3").get(o) in DOWN for o in ("n1", "n2")),
               "n3 sees n1 and n2 down")
    assert c.members("n1").get("n2") == "alive"
    # The majority side still takes QUORUM writes.
    assert asyncio.run(put_get(c.client_addresses()[:2], b"k2", b"v2")) == b"v2"
    c.heal()
    assert c.blocked == {}
    c.wait_healthy(30)


@needs_netns
def test_netns_bridge_partition(netns_cluster: ChaosCluster) -> None:
    c = netns_cluster
    left, bridge, right = c.bridge_partition()
    assert sorted([*left, bridge, *right]) == c.names and left and right
    a, b = left[0], right[0]
    assert _direct_cut(c, a, b) and _direct_cut(c, b, a)
    assert not _direct_cut(c, a, bridge) and not _direct_cut(c, b, bridge)
    assert c.members(bridge).get(a) == "alive" and c.members(bridge).get(b) == "alive"
    c.heal()
    c.wait_healthy(30)


def _direct_cut(c: ChaosCluster, a: str, b: str) -> bool:
    """SWIM's indirect probes through the bridge keep a and b alive in each other's view,
    so check the cut itself: a cannot reach b's node port from its namespace."""
    ns, target = c.node(a).namespace, c.node(b)
    assert ns is not None
    probe = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c",
                            "import socket; s = socket.socket(); s.settimeout(1); "
                            f"s.connect(('{target.ip}', {target.node_port}))"],
                           capture_output=True, timeout=10)
    return probe.returncode != 0


@needs_netns
def test_netns_kill_restart_pause_resume(netns_cluster: ChaosCluster) -> None:
    c = netns_cluster
    asyncio.run(put_get(c.client_addresses(), b"k3", b"v3"))
    old_pid = c.node("n2").pid
    c.kill("n2")
    assert c.node("n2").pid is None and "n2" not in c.running()
    c.wait_for(lambda: c.members("n1").get("n2") in DOWN, "n1 sees n2 down")
    c.restart("n2")
    assert c.node("n2").pid not in (None, old_pid)
    c.wait_healthy(30)
    assert asyncio.run(get([c.node("n2").client_address], b"k3")) == b"v3"

    c.pause("n1")
    assert c.node("n1").paused and c.node("n1").pid is not None
    c.wait_for(lambda: c.members("n2").get("n1") in DOWN, "n2 sees the paused n1 down")
    assert c.members("n1", timeout_s=0.5) == {}  # a stopped process answers nothing
    c.resume("n1")
    c.wait_healthy(30)


@needs_netns
def test_netns_disk_full_and_clock_skew(netns_cluster: ChaosCluster) -> None:
    c = netns_cluster
    node = c.node("n1")
    assert node.disk_mounted, c.disk_reason
    # The node itself has its data dir on the harness's tmpfs.
    mountinfo = Path(f"/proc/{node.pid}/mountinfo").read_text()
    assert any(f" {node.data_dir} " in line and " - tmpfs " in line
               for line in mountinfo.splitlines())
    written = c.fill_disk("n1")
    stat = os.statvfs(node.data_dir)
    assert written > 0 and stat.f_bavail * stat.f_frsize < 1 << 20
    c.free_disk("n1")
    stat = os.statvfs(node.data_dir)
    assert stat.f_bavail * stat.f_frsize > written // 2
    # The running node's live clock-skew hook picks the skew up (and says so).
    c.set_clock_skew("n2", -300)
    c.wait_for(lambda: "now shifted by -300 ms" in c.node("n2").log_path.read_text(),
               "n2 logs its new skew", 10)
    with pytest.raises(ValueError, match="bound"):
        c.set_clock_skew("n2", 5000)
    c.set_clock_skew("n2", 0)
    c.wait_for(lambda: "now shifted by 0 ms" in c.node("n2").log_path.read_text(),
               "n2 logs its skew is gone", 10)


@needs_netns
def test_two_clusters_at_once_do_not_collide(tmp_path: Path) -> None:
    first = ChaosCluster(1, tmp_path / "a", seed=1, mode="netns")
    second = ChaosCluster(1, tmp_path / "b", seed=2, mode="netns")
    try:
        first.start()
        second.start()
        assert first.tag != second.tag and first.subnet != second.subnet
        assert first.members("n1") == {"n1": "alive"} == second.members("n1")
    finally:
        first.stop()
        second.stop()
    assert leftovers(first) == [] and leftovers(second) == []


@needs_netns
def test_sweep_deletes_only_leftovers_of_dead_runs(tmp_path: Path) -> None:
    tmp = tmp_path / "data"
    gone = subprocess.Popen(["true"])
    gone.wait()
    orphan = f"{NAME_PREFIX}{gone.pid}z-n1"
    mine = f"{NAME_PREFIX}{os.getpid()}z-n1"
    subprocess.run(["ip", "netns", "add", orphan], check=True)
    subprocess.run(["ip", "netns", "add", mine], check=True)
    tmp.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", orphan, str(tmp)], check=True)
    try:
        deleted = sweep_leftovers()
        assert orphan in deleted and mine not in deleted
        assert f"{orphan} on {tmp}" in deleted and not os.path.ismount(tmp)
    finally:
        for ns in (orphan, mine):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        if os.path.ismount(tmp):
            subprocess.run(["umount", str(tmp)], capture_output=True)


def test_loopback_partition_through_the_fault_hook(tmp_path: Path) -> None:
    cluster = ChaosCluster(3, tmp_path, seed=3, mode="loopback")
    try:
        cluster.start()
        assert cluster.mode == "loopback"
        assert all(node.ip == "127.0.0.1" and node.namespace is None for node in cluster.nodes)
        assert asyncio.run(put_get(cluster.client_addresses(), b"k", b"v")) == b"v"
        cluster.isolate("n1")
        assert cluster.node("n1").drop_file.read_text().split() == [
            cluster.node("n2").address, cluster.node("n3").address]
        cluster.wait_for(lambda: cluster.members("n2").get("n1") in DOWN
                         and cluster.members("n1").get("n3") in DOWN, "the cut is seen")
        cluster.heal()
        assert all(node.drop_file.read_text() == "" for node in cluster.nodes)
        cluster.wait_healthy(30)
        log = cluster.node("n1").log_path.read_text()
        assert "TEST-ONLY FAULT HOOK LEADERLESS_FAULT_DROP_FILE" in log
    finally:
        cluster.stop()
    assert leftovers(cluster) == []
    assert all(node.pid is None for node in cluster.nodes)


def test_fill_disk_needs_the_harness_tmpfs(tmp_path: Path) -> None:
    cluster = ChaosCluster(1, tmp_path, seed=1, mode="loopback")
    cluster.disk_reason = "not root: cannot mount a tmpfs data dir"
    cluster.nodes.append(cluster._new_node(0, "127.0.0.1", (1, 2, 3), None))
    with pytest.raises(ChaosUnsupported, match="not root"):
        cluster.fill_disk("n1")


def test_fault_partition_hook_reads_the_file_live(tmp_path: Path) -> None:
    drop = tmp_path / "drop"
    log = NodeLogger("t", "test")
    try:
        assert fault_partition.install_fault_partition({}, log) is None
        assert not fault_partition.blocked("127.0.0.1", 1)
        fault_partition.install_fault_partition(
            {fault_partition.FAULT_DROP_FILE_ENV: str(drop)}, log)
        assert not fault_partition.blocked("127.0.0.1", 1)  # no file: nothing dropped
        drop.write_text("127.0.0.1:1\n[::1]:2\nnot an address\n")
        fault_partition._read_at = float("-inf")  # skip the refresh interval
        assert fault_partition.blocked("127.0.0.1", 1) and fault_partition.blocked("::1", 2)
        assert not fault_partition.blocked("127.0.0.1", 2)
        drop.write_text("")
        fault_partition._read_at = float("-inf")
        assert not fault_partition.blocked("127.0.0.1", 1)
    finally:
        fault_partition.reset()
