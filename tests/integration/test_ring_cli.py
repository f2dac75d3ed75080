"""``leaderless ring status --json`` and ``leaderless node decommission`` against real
node processes: the status lists every member as the CLI documents it; a decommission
waits until the node has left and says so, and the other members then show it left."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.integration.helpers import Processes, run_cli, wait_until

pytestmark = pytest.mark.integration
FAST = {"LEADERLESS_RING_SETTLE_S": "1"}
"""A short settle time: the ring is stable (and a leave may complete) within seconds."""


def ring_status(address: str) -> dict[str, Any]:
    result = run_cli("ring", "status", "--node", address, "--json")
    assert result.returncode == 0, result.stderr
    body: dict[str, Any] = json.loads(result.stdout)
    return body


@pytest.mark.timeout(60)
def test_ring_status_and_decommission_through_the_cli(processes: Processes) -> None:
    n1 = processes.start_node("n1", None, None, FAST)
    n2 = processes.start_node("n2", None, n1.address, FAST)
    n3 = processes.start_node("n3", None, n1.address, FAST)
    wait_until(lambda: all(len(n.members()) == 3 for n in (n1, n2, n3)),
               "every node sees three members")
    wait_until(lambda: not ring_status(n1.address)["summary"]["changing"],
               "the ring is stable")

    body = ring_status(n2.address)
    assert body["asked"] == "n2"
    members = {m["name"]: m for m in body["members"]}
    assert set(members) == {"n1", "n2", "n3"}
    for m in members.values():
        assert (m["state"], m["status"], m["reported"]) == ("normal", "alive", True)
        assert m["token_count"] > 0 and 0 < m["ownership"] < 1
        assert m["stream"]["ranges_total"] == 0 and m["cleanup"]["running"] is False
    assert body["summary"]["states"] == {"normal": 3}

    result = run_cli("node", "decommission", "--node", n3.address)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("n3 left the ring in "), result.stdout
    n3.process.wait(timeout=20)  # a decommissioned node stops by itself
    after = {m["name"]: m for m in ring_status(n1.address)["members"]}
    assert "n3" not in after or after["n3"]["state"] == "left"
    assert {after["n1"]["state"], after["n2"]["state"]} == {"normal"}

    again = run_cli("ring", "status", "--node", n3.address)
    assert again.returncode == 1 and "no node answers" in again.stderr
