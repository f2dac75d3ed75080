"""Alerts on real processes: rules from the config file, /api/alerts, firing on a kill,
a bad rule refused at start, and the shipped Prometheus/Grafana files against a real
node's /metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from leaderless.runtime.ports import free_port
from leaderless.runtime.process import EXIT_CONFIG
from tests.integration.helpers import Processes, run_cli, wait_until
from tests.integration.test_ops import get, start_ready_cluster
from tests.unit.test_alerts import exported_names, referenced_names

pytestmark = pytest.mark.integration

CONFIG = """
[alerts]
interval_s = 1

# Holds from the first evaluation on: members_dead is never negative.
[[alerts.rules]]
name = "always"
metric = "members_dead"
op = ">"
threshold = -1
severity = "warning"
description = "fires at once"

[[alerts.rules]]
name = "peer_dead"
metric = "members_dead"
op = ">"
threshold = 0
for_s = 2
severity = "critical"
"""

ALERT_FIELDS = {"name", "severity", "state", "metric", "value", "threshold", "op", "since",
                "message"}


def alerts_of(url: str) -> dict[str, Any]:
    status, body, content_type = get(url + "/api/alerts")
    if status != 200:
        return {"node": None, "alerts": [], "rules": []}
    assert content_type.startswith("application/json")
    result: dict[str, Any] = json.loads(body)
    return result


def alert(url: str, name: str) -> dict[str, Any] | None:
    """The rule's current (pending or firing) alert, if any."""
    return next((a for a in alerts_of(url)["alerts"]
                 if a["name"] == name and a["state"] != "resolved"), None)


def firing(url: str, name: str) -> bool:
    found = alert(url, name)
    return found is not None and found["state"] == "firing"


@pytest.mark.timeout(300)
def test_configured_rules_fire_and_a_killed_node_raises_member_dead(
        processes: Processes, tmp_path: Path) -> None:
    config = tmp_path / "alerts.toml"
    config.write_text(CONFIG)
    nodes, urls = start_ready_cluster(processes, ("a1", "a2", "a3"), "--log-level", "info",
                                      "--config", str(config))

    wait_until(lambda: all(firing(url, "always") for url in urls),
               "the always-true rule fires on every node")
    shown = alerts_of(urls[1])
    assert shown["node"] == "a2"
    always = next(a for a in shown["alerts"] if a["name"] == "always")
    assert set(always) == ALERT_FIELDS
    assert (always["severity"], always["metric"], always["op"], always["threshold"]) == (
        "warning", "members_dead", ">", -1.0)
    assert always["value"] == 0.0 and always["message"].endswith("fires at once")
    assert always["since"] > 1.6e9  # unix seconds, not the loop clock
    assert alert(urls[1], "peer_dead") is None  # nobody is dead
    rules = {r["name"]: r for r in shown["rules"]}
    assert rules["peer_dead"] == {"name": "peer_dead", "metric": "members_dead", "op": ">",
                                  "threshold": 0.0, "for_s": 2.0, "severity": "critical",
                                  "description": ""}
    assert {"disk_critical", "member_dead", "hints_backlog"} <= set(rules)  # defaults kept

    nodes[2].process.kill()  # a3, without a leave
    survivor_url = urls[0]
    wait_until(lambda: firing(survivor_url, "peer_dead"),
               "a survivor's members_dead rule fires for the killed node", timeout_s=60)
    peer_dead = alert(survivor_url, "peer_dead")
    assert peer_dead is not None and peer_dead["value"] >= 1
    assert peer_dead["severity"] == "critical"

    # The transition was logged: a critical rule at error level, with its fields.
    def logged() -> list[dict[str, Any]]:
        return [line for line in nodes[0].log() if line.get("msg") == "alert_firing"]
    wait_until(lambda: any(line["alert"] == "peer_dead" for line in logged()),
               "the firing is logged")
    line = next(line for line in logged() if line["alert"] == "peer_dead")
    assert (line["level"], line["severity"], line["metric"]) == ("error", "critical",
                                                                  "members_dead")
    assert any(line["alert"] == "always" and line["level"] == "warning" for line in logged())

    # The shipped Prometheus rules and dashboard name only series a real node exports.
    status, body, _ = get(survivor_url + "/metrics")
    assert status == 200
    exported = exported_names(body.decode())
    for file, names in referenced_names().items():
        assert names <= exported, (file, sorted(names - exported))


@pytest.mark.timeout(120)
def test_a_bad_rule_stops_the_node_with_the_rule_and_field_named(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[[alerts.rules]]\nname = "disk_low"\nmetric = "disk_used_pct"\n'
                      'op = "=>"\nthreshold = 10\n')
    result = run_cli("node", "start", "--name", "bad", "--bind", f"127.0.0.1:{free_port()}",
                     "--data-dir", str(tmp_path / "bad"), "--config", str(config))
    assert result.returncode == EXIT_CONFIG, result.stderr
    assert "alerts.rules: rule 1 'disk_low': op: '=>' must be one of" in result.stderr
