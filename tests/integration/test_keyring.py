"""Encrypted gossip on real processes: a keyed cluster converges, a live rotation keeps it
whole, the rotated keyring survives a restart, and a node without the key (or with none)
never gets in: its sealed or plaintext syncs are refused by the seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from leaderless.security.keyring import decode_key, key_id_text
from tests.integration.helpers import NodeProcess, Processes, run_cli, wait_until
from tests.integration.test_ops import get, start, start_ready_cluster

pytestmark = pytest.mark.integration

INFO = ("--log-level", "info")
"""The node logs each delivered user event at info: the tests read them from the logs."""


def new_key() -> str:
    result = run_cli("keyring", "generate")
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip()
    assert len(key) == 44
    return key


def key_id(key: str) -> str:
    return key_id_text(decode_key(key))


def keyring_file(path: Path, *keys: str) -> str:
    path.write_text("".join(f"{k}\n" for k in keys))
    path.chmod(0o600)
    return str(path)


def keyring_cli(*args: str) -> tuple[int, str, str]:
    result = run_cli("keyring", *args, timeout_s=60)
    return result.returncode, result.stdout, result.stderr


def malformed_drops(node: NodeProcess) -> dict[str, int]:
    """The node's malformed-input drops by kind (empty while it does not answer yet)."""
    try:
        malformed: dict[str, int] = node.status().runtime.get("dropped_malformed_total", {})
    except (OSError, TimeoutError, ConnectionError):
        return {}
    return malformed


def gossip_drops(node: NodeProcess) -> dict[str, int]:
    """The node's gossip datagram drops by reason."""
    return {kind: n for kind, n in malformed_drops(node).items() if kind.startswith("gossip_")}


def delivered(node: NodeProcess, event: str) -> bool:
    return any(line.get("msg") == "user_event" and line.get("name") == event
               for line in node.log())


def send_event_and_wait(nodes: list[NodeProcess], event: str) -> None:
    result = run_cli("event", "send", event, "after-rotation", "--node", nodes[0].address)
    assert result.returncode == 0, result.stderr
    wait_until(lambda: all(delivered(n, event) for n in nodes),
               f"every node delivered the user event {event!r}")


def all_alive(nodes: list[NodeProcess]) -> bool:
    names = {n.name for n in nodes}
    for node in nodes:
        view = node.members()
        if not names <= {name for name, m in view.items() if m.state == "alive"}:
            return False
    return True


def dead_events(node: NodeProcess, members: set[str]) -> list[str]:
    return [line["member"] for line in node.log()
            if line.get("msg") == "member" and line.get("kind") == "dead"
            and line.get("member") in members]


@pytest.mark.timeout(300)
def test_keyed_cluster_rotates_keys_without_losing_a_member(processes: Processes,
                                                            tmp_path: Path) -> None:
    old, new = new_key(), new_key()
    initial = keyring_file(tmp_path / "keyring", old)
    nodes, _ = start_ready_cluster(processes, ("k1", "k2", "k3"), "--gossip-keyring",
                                   initial, *INFO)
    names = {n.name for n in nodes}
    # Ready can come from the join syncs alone, before the first probe: wait for gossip.
    wait_until(lambda: all(n.status().runtime["gossip_packets_total"].get("received", 0) > 0
                           for n in nodes), "every node received sealed gossip")
    assert all(gossip_drops(n) == {} for n in nodes)
    for node in nodes:
        copy = node.data_dir / "keyring"
        assert copy.stat().st_mode & 0o777 == 0o600

    code, out, _ = keyring_cli("list", "--node", nodes[0].address, "--json")
    listed = json.loads(out)
    assert code == 0 and listed["answered"] == 3
    assert listed["keys"] == [{"id": key_id(old), "installed": 3, "primary": 3}]
    assert old not in out  # keys are shown by id only

    # `use` before `install` is refused and changes nothing.
    code, _, err = keyring_cli("use", new, "--node", nodes[0].address)
    assert code == 1 and "not installed" in err

    code, out, err = keyring_cli("install", new, "--node", nodes[1].address)
    assert code == 0, err
    assert f"key {key_id(new)} installed on 3/3 nodes" in out
    code, out, err = keyring_cli("use", new, "--node", nodes[2].address)
    assert code == 0, err
    assert "now primary on 3/3 nodes" in out
    # Gossip flows across the switch: an event sent now, sealed under the new key, arrives.
    send_event_and_wait(nodes, "after-use")
    code, _, err = keyring_cli("remove", new, "--node", nodes[0].address)
    assert code == 1 and "is the primary" in err
    code, out, err = keyring_cli("remove", old, "--node", nodes[0].address)
    assert code == 0, err
    assert f"key {key_id(old)} removed on 3/3 nodes" in out
    send_event_and_wait(nodes, "after-remove")

    code, out, _ = keyring_cli("list", "--node", nodes[1].address, "--json")
    assert json.loads(out)["keys"] == [{"id": key_id(new), "installed": 3, "primary": 3}]
    assert all_alive(nodes)
    assert all(dead_events(n, names) == [] for n in nodes)
    assert all(gossip_drops(n) == {} for n in nodes)

    # A membership change still spreads: a new node, given only the new key, joins.
    fresh, _ = start(processes, "k4", nodes[0].address, "--gossip-keyring",
                     keyring_file(tmp_path / "new-keyring", new))
    wait_until(lambda: all_alive([*nodes, fresh]), "every node sees the new node alive")

    # The rotation survives a restart: k3's data-dir keyring (new key) wins over the
    # initial file it is started with again (old key only).
    k3 = nodes[2]
    k3.process.terminate()
    k3.process.wait(timeout=30)
    restarted = processes.start_node("k3", k3.port, nodes[0].address, None,
                                     "--gossip-keyring", initial, *INFO)
    wait_until(lambda: all_alive([nodes[0], nodes[1], restarted, fresh]),
               "the restarted node is alive to every node, under the rotated key")
    assert gossip_drops(restarted) == {}


@pytest.mark.timeout(300)
def test_a_node_with_another_key_cannot_join(processes: Processes, tmp_path: Path) -> None:
    ours = keyring_file(tmp_path / "ours", new_key())
    nodes, urls = start_ready_cluster(processes, ("c1", "c2", "c3"), "--gossip-keyring", ours,
                                      *INFO)
    seed = nodes[0]
    intruder, _ = start(processes, "intruder", seed.address, "--gossip-keyring",
                        keyring_file(tmp_path / "theirs", new_key()), *INFO)
    plain, _ = start(processes, "plain", seed.address, *INFO)
    outsiders = {"intruder", "plain"}

    # The syncs are sealed too, so the seed refuses each join attempt before the membership
    # sees it: an outsider never enters a member's view, not even for a moment. Every
    # member's view is sampled on every poll while the outsiders keep retrying.
    listed: set[str] = set()

    def refused_twice() -> bool:
        for node in nodes:
            listed.update(outsiders & set(node.members()))
        drops = malformed_drops(seed)
        return drops.get("sync_unknown_key", 0) >= 2 and drops.get("sync_not_sealed", 0) >= 2

    wait_until(refused_twice, "the seed refused two join attempts of each outsider")
    for _ in range(10):
        refused_twice()
    assert listed == set(), f"members listed the outsiders {sorted(listed)}"
    assert not any(line.get("msg") == "member" and line.get("member") in outsiders
                   for node in nodes for line in node.log())
    assert all_alive(nodes)
    assert all(dead_events(n, {m.name for m in nodes}) == [] for n in nodes)

    # Each outsider is alone, and its log says why its join failed and what to check.
    for outsider in (intruder, plain):
        assert set(outsider.members()) == {outsider.name}
        failures = [line for line in outsider.log()
                    if line.get("msg") == "join_push_pull_failed"]
        assert failures and all(line["seed"] == seed.address for line in failures)
        assert "closed the connection" in failures[0]["error"]
        assert "--gossip-keyring" in failures[0]["hint"]

    # The refusals are counted by reason in the metrics and logged with the reason.
    metrics = get(urls[0] + "/metrics")[1].decode()
    for kind in ("sync_unknown_key", "sync_not_sealed"):
        assert f'leaderless_dropped_malformed_total{{kind="{kind}"}}' in metrics
        assert any(line.get("msg") == "dropped_malformed" and line.get("kind") == kind
                   for line in seed.log())
