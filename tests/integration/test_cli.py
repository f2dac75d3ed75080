"""The CLI as a user meets it: refusals with clear messages and exit codes, and
``leaderless up`` starting and stopping a local cluster without leaving processes behind."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from pathlib import Path

import pytest

from leaderless.runtime.ports import free_port
from tests.integration.helpers import LineReader, Processes, run_cli, wait_until

pytestmark = pytest.mark.integration


def start_failed(stderr: str) -> str:
    """The error of the node's ``start_failed`` JSON log line."""
    lines = [json.loads(x) for x in stderr.splitlines() if x.startswith("{")]
    failed = [x for x in lines if x["msg"] == "start_failed"]
    assert failed, stderr
    return str(failed[0]["error"])


@pytest.mark.parametrize("kind", [socket.SOCK_DGRAM, socket.SOCK_STREAM])
def test_refuses_a_taken_port(tmp_path: Path, kind: int) -> None:
    side = "UDP" if kind == socket.SOCK_DGRAM else "TCP"
    port = free_port()
    with socket.socket(socket.AF_INET, kind) as blocker:
        blocker.bind(("127.0.0.1", port))
        if kind == socket.SOCK_STREAM:
            blocker.listen()
        result = run_cli("node", "start", "--name", "blocked", "--bind", f"127.0.0.1:{port}",
                         "--data-dir", str(tmp_path / "d"))
    assert result.returncode == 3
    assert f"127.0.0.1:{port} is already in use ({side})" in start_failed(result.stderr)


def test_refuses_a_data_dir_it_cannot_create(tmp_path: Path) -> None:
    # A regular file where a directory should be: unwritable even for root (chmod is not).
    (tmp_path / "file").write_text("in the way")
    result = run_cli("node", "start", "--bind", f"127.0.0.1:{free_port()}",
                     "--data-dir", str(tmp_path / "file" / "data"), "--log-format", "console")
    assert result.returncode == 3
    assert "data_dir: cannot create" in result.stderr
    assert "pass --data-dir with a directory this user can write" in result.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to a read-only directory")
def test_refuses_a_read_only_data_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / "ro"
    data_dir.mkdir(mode=0o500)
    result = run_cli("node", "start", "--bind", f"127.0.0.1:{free_port()}",
                     "--data-dir", str(data_dir))
    assert result.returncode == 3
    assert "is not writable" in start_failed(result.stderr)


def test_refuses_a_data_dir_used_by_a_running_node(processes: Processes) -> None:
    owner = processes.start_node("owner")
    wait_until(lambda: any(x["msg"] == "started" for x in owner.log()), "owner started")
    result = run_cli("node", "start", "--bind", f"127.0.0.1:{free_port()}",
                     "--data-dir", str(owner.data_dir))
    assert result.returncode == 3
    assert "in use by another running node" in start_failed(result.stderr)


def test_invalid_settings_exit_2_naming_the_setting() -> None:
    result = run_cli("node", "start", "--bind", "127.0.0.1:99999")
    assert result.returncode == 2
    assert "bind: '127.0.0.1:99999' is not HOST:PORT with port 0..65535" in result.stderr
    env_result = run_cli("members", "--node", "nowhere")
    assert env_result.returncode == 2 and "--node: 'nowhere'" in env_result.stderr


def test_unreachable_node_is_a_clear_error() -> None:
    result = run_cli("members", "--node", f"127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert "no node answers at" in result.stderr


def test_up_runs_a_cluster_and_stops_it_without_orphans(processes: Processes,
                                                        tmp_path: Path) -> None:
    up = processes.spawn("up", "--nodes", "3", "--base-port", str(free_port()),
                         "--data-dir", str(tmp_path / "up"))
    assert up.stdout is not None
    lines = LineReader(up.stdout)
    converged: list[str] = []
    deadline = time.monotonic() + 60
    while len(converged) < 3:
        assert time.monotonic() < deadline, "the table never showed 3 nodes seen alive by 3"
        line = lines.next()
        if line.startswith("| node"):
            converged = [x for x in converged if x.split()[1] != line.split()[1]]
            if "| alive" in line and "3/3" in line:
                converged.append(line)
        elif line.startswith("-- "):
            converged = []  # a new table starts
    pids = [int(m) for row in converged for m in re.findall(r"pid (\d+)", row)]
    assert len(pids) == 3
    up.send_signal(signal.SIGINT)
    assert up.wait(timeout=30) == 0
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists(), f"node process {pid} outlived `up`"
    for name in ("node1", "node2", "node3"):
        log = (tmp_path / "up" / name / "node.log").read_text().splitlines()
        assert json.loads(log[-1])["msg"] == "stopped"
