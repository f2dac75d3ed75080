"""A 5-node cluster of real processes on loopback, driven and observed through the CLI,
the native protocol and the nodes' JSON logs.

The tests share one cluster (starting five Python processes is the slow part) and run in
file order; each one first waits for the state it starts from, so a failure shows up in
the test that caused it.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.helpers import (
    LineReader,
    NodeProcess,
    Processes,
    run_cli,
    wait_until,
)

pytestmark = pytest.mark.integration
NAMES = [f"n{i}" for i in range(1, 6)]


class Cluster:
    def __init__(self, processes: Processes) -> None:
        self.processes = processes
        self.nodes: dict[str, NodeProcess] = {}

    def start(self) -> None:
        first = self.processes.start_node("n1")
        self.nodes["n1"] = first
        for name in NAMES[1:]:
            self.nodes[name] = self.processes.start_node(name, join=first.address)

    def running(self, *excluding: str) -> list[NodeProcess]:
        return [n for name, n in self.nodes.items()
                if name not in excluding and n.process.poll() is None]

    def all_see(self, name: str, state: str, *, excluding: tuple[str, ...] = ()) -> bool:
        views = [n.members() for n in self.running(*excluding)]
        return all(name in v and v[name].state == state for v in views)

    def converged(self) -> bool:
        return all(self.all_see(name, "alive") for name in NAMES)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    processes = Processes(tmp_path_factory.mktemp("cluster"))
    cluster = Cluster(processes)
    try:
        cluster.start()
        yield cluster
    finally:
        processes.kill_all()


def test_five_nodes_converge(cluster: Cluster) -> None:
    wait_until(cluster.converged, "every node lists 5 alive members")
    for node in cluster.nodes.values():
        result = run_cli("members", "--node", node.address, "--json")
        assert result.returncode == 0, result.stderr
        members = json.loads(result.stdout)
        assert sorted(m["name"] for m in members) == NAMES
        assert {m["state"] for m in members} == {"alive"}
        for m in members:
            assert {"name", "address", "state", "incarnation", "zone", "tags",
                    "changed_at"} <= set(m)
        started = [line for line in node.log() if line["msg"] == "started"]
        assert len(started) == 1 and started[0]["address"] == node.address
    table = run_cli("members", "--node", cluster.nodes["n1"].address)
    assert table.returncode == 0 and all(name in table.stdout for name in NAMES)


def test_user_event_is_delivered_exactly_once_everywhere(cluster: Cluster,
                                                         processes: Processes) -> None:
    wait_until(cluster.converged, "the cluster is converged")
    watcher = processes.spawn("event", "watch", "--json", "--node", cluster.nodes["n3"].address)
    assert watcher.stderr is not None and watcher.stdout is not None
    assert "watching events" in LineReader(watcher.stderr).next()
    sent = run_cli("event", "send", "deploy", "v1.2.3", "--node", cluster.nodes["n2"].address,
                   "--json")
    assert sent.returncode == 0, sent.stderr
    reply = json.loads(sent.stdout)
    watched = json.loads(LineReader(watcher.stdout).next())
    assert watched == {"name": "deploy", "origin": "n2", "ltime": reply["ltime"],
                       "payload": "v1.2.3", "payload_encoding": "utf-8"}

    def deliveries(node: NodeProcess) -> int:
        return sum(1 for line in node.log() if line["msg"] == "user_event"
                   and (line["origin"], line["ltime"]) == ("n2", reply["ltime"]))

    wait_until(lambda: all(deliveries(n) >= 1 for n in cluster.nodes.values()),
               "every node logged the event")
    # When no node has anything left to retransmit, no duplicate can still be on its way.
    wait_until(lambda: all(n.status().pending_broadcasts == 0 for n in cluster.running()),
               "gossip is quiet")
    assert {n.name: deliveries(n) for n in cluster.nodes.values()} == dict.fromkeys(NAMES, 1)
    line = next(x for x in cluster.nodes["n5"].log() if x["msg"] == "user_event")
    assert line["name"] == "deploy" and line["payload"] == "v1.2.3" and line["node"] == "n5"
    assert isinstance(line["ts"], float)


def member_lines(node: NodeProcess, member: str, kind: str) -> list[dict[str, object]]:
    return [x for x in node.log() if x["msg"] == "member" and x["member"] == member
            and x["kind"] == kind]


def test_kill_9_is_detected_and_restart_rejoins(cluster: Cluster, processes: Processes) -> None:
    wait_until(cluster.converged, "the cluster is converged")
    victim = cluster.nodes["n4"]
    old_incarnation = cluster.nodes["n1"].members()["n4"].incarnation
    victim.process.kill()
    victim.process.wait(timeout=10)
    wait_until(lambda: cluster.all_see("n4", "dead", excluding=("n4",)),
               "every other node marks n4 dead")
    for node in cluster.running("n4"):
        assert member_lines(node, "n4", "dead"), f"{node.name} logged no dead event"
    # Same name, data dir and port: it must come back with a higher incarnation.
    again = processes.start_node("n4", port=victim.port, join=cluster.nodes["n1"].address)
    cluster.nodes["n4"] = again

    def back() -> bool:
        views = [n.members() for n in cluster.running()]
        return all("n4" in v and v["n4"].state == "alive"
                   and v["n4"].incarnation > old_incarnation for v in views)

    wait_until(back, "n4 is alive again on every node with a higher incarnation")
    for node in cluster.running("n4"):
        revived = member_lines(node, "n4", "alive")
        assert revived and int(revived[-1]["incarnation"]) > old_incarnation  # type: ignore


def test_sigterm_is_seen_as_left(cluster: Cluster) -> None:
    wait_until(cluster.converged, "the cluster is converged")
    leaver = cluster.nodes["n5"]
    leaver.process.send_signal(signal.SIGTERM)
    assert leaver.process.wait(timeout=15) == 0
    wait_until(lambda: cluster.all_see("n5", "left", excluding=("n5",)),
               "every other node marks n5 left")
    for node in cluster.running("n5"):
        assert member_lines(node, "n5", "left")
    assert [x["msg"] for x in leaver.log()][-1] == "stopped"


def test_every_log_line_has_the_contract_fields(cluster: Cluster) -> None:
    for node in cluster.nodes.values():
        for line in node.log():
            assert {"ts", "level", "node", "component", "msg"} <= set(line), line
            if line["msg"] == "member":
                assert {"kind", "member", "incarnation"} <= set(line), line
                assert line["kind"] in {"joined", "suspect", "alive", "dead", "left",
                                        "updated", "reaped"}


def test_node_directories_are_separate(cluster: Cluster) -> None:
    dirs = [Path(n.data_dir) for n in cluster.nodes.values()]
    assert len(set(dirs)) == len(dirs)
    assert all((d / "incarnation").exists() for d in dirs)
