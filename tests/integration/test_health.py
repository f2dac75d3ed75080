"""Self-health on real processes: a node whose data dir fills up turns read-only, and
turns healthy again by itself when space is freed.

One node's data dir is a small tmpfs the test mounts (root or CAP_SYS_ADMIN needed; the
test skips, saying so, where mounting is not permitted)."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.integration.helpers import NodeProcess, Processes, wait_until
from tests.integration.test_ops import get, start_ready_cluster

pytestmark = pytest.mark.integration

TMPFS_SIZE = "16m"
FREE_WHEN_FULL_PCT = 2.0
"""The filler leaves this much free: under the default stop-writes threshold (5 %)."""
KEYS = 20


@contextmanager
def tmpfs(path: Path) -> Iterator[None]:
    """``path`` as a fresh tmpfs of TMPFS_SIZE; unmounted on the way out, whatever happens
    (lazily if a process still holds it)."""
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs",
                             str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the data dir (needs root or CAP_SYS_ADMIN): "
                    f"{result.stderr.strip() or result.returncode}")
    try:
        yield
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def request(method: str, url: str, body: bytes | None = None) -> tuple[int, dict[str, object]]:
    req = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            data = response.read()
            status = response.status
    except urllib.error.HTTPError as err:
        data, status = err.read(), err.code
    try:
        return status, json.loads(data) if data else {}
    except ValueError:
        return status, {"raw": data.decode(errors="replace")}


def health_of(url: str, member: str) -> str | None:
    """``member``'s gossiped health status in the view of the node at ``url``."""
    status, body, _ = get(url + "/api/cluster")
    if status != 200:
        return None
    for m in json.loads(body)["members"]:
        if m["name"] == member:
            return str(m["health"]["status"])
    return None


def kv_counter(node: NodeProcess, name: str) -> int:
    return int(node.status().runtime["kv"][name])


def fill(path: Path, leave_free_pct: float) -> Path:
    """A filler file that leaves ``leave_free_pct`` of the filesystem free."""
    st = os.statvfs(path)
    total, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
    filler = path / "filler"
    size = free - int(total * leave_free_pct / 100)
    assert size > 0, f"the tmpfs is already {100 * free / total:.1f}% free only"
    with filler.open("wb") as f:
        f.write(b"\0" * size)
    return filler


@pytest.mark.timeout(120)
def test_a_full_disk_makes_a_node_read_only_until_space_is_freed(processes: Processes,
                                                                tmp_path: Path) -> None:
    config = tmp_path / "health.toml"
    config.write_text("[health]\ninterval_s = 0.2\n")
    data_dir = processes.root / "n3"
    with tmpfs(data_dir):
        nodes, urls = start_ready_cluster(processes, ("n1", "n2", "n3"), "--config",
                                          str(config))
        n1, n2, n3 = nodes
        try:
            status, body = request("POST", urls[0] + "/v1/keyspaces", json.dumps(
                {"name": "hk", "replication": 3}).encode())
            assert status == 201, body
            status, body = request("POST", urls[0] + "/v1/keyspaces", json.dumps(
                {"name": "hs", "replication": 3, "mode": "strong"}).encode())
            assert status == 201, body
            for i in range(KEYS):
                status, body = request("PUT", f"{urls[i % 3]}/v1/kv/hk/before{i}", b"old")
                assert status == 200, body

            filler = fill(data_dir, FREE_WHEN_FULL_PCT)
            wait_until(lambda: all(health_of(url, "n3") == "read-only" for url in urls),
                       "every member sees n3 read-only")

            # Writes coordinated by the read-only node: the specific error, naming why.
            status, body = request("PUT", f"{urls[2]}/v1/kv/hk/refused", b"x")
            assert status == 503 and body["error"] == "read_only", body
            assert "disk" in str(body["message"]) and "stop-writes" in str(body["message"])
            # QUORUM writes through the others succeed; n3's copies become hints.
            for i in range(KEYS):
                status, body = request("PUT", f"{urls[i % 2]}/v1/kv/hk/during{i}"
                                       "?consistency=QUORUM", b"new")
                assert status == 200, body
            assert kv_counter(n1, "hints_pending") + kv_counter(n2, "hints_pending") > 0
            # Strong mode: n3 refuses to propose a write and to accept one; the Paxos
            # majority of the other two carries on, and reads through n3 still work.
            status, body = request("PUT", f"{urls[2]}/v1/kv/hs/lock", b"x")
            assert status == 503 and body["error"] == "read_only", body
            status, body = request("PUT", f"{urls[0]}/v1/kv/hs/lock", b"y")
            assert status == 200, body
            status, _ = request("GET", f"{urls[2]}/v1/kv/hs/lock")
            assert status == 200
            # Reads keep working everywhere, the read-only node included.
            for url in urls:
                for key in ("before3", "during4"):
                    status, _ = request("GET", f"{url}/v1/kv/hk/{key}?consistency=QUORUM")
                    assert status == 200, (url, key)

            filler.unlink()
            wait_until(lambda: all(health_of(url, "n3") == "healthy" for url in urls),
                       "every member sees n3 healthy again")
            wait_until(lambda: kv_counter(n1, "hints_pending") == 0
                       and kv_counter(n2, "hints_pending") == 0, "the hints are replayed")
            assert kv_counter(n1, "handoff_replayed") + kv_counter(n2, "handoff_replayed") > 0
            # n3 holds what it missed (a ONE read coordinated by a replica reads its own).
            for i in range(KEYS):
                status, _ = request("GET", f"{urls[2]}/v1/kv/hk/during{i}?consistency=ONE")
                assert status == 200, f"during{i} is not on n3"
            status, body = request("PUT", f"{urls[2]}/v1/kv/hk/after", b"ok")
            assert status == 200, body
        finally:
            n3.process.kill()  # release the mount before it is unmounted
            n3.process.wait(timeout=10)
