"""obs.alerts: rules, their validation, state changes and history; the [alerts] config;
and the shipped Prometheus rules and Grafana dashboard against the exported metric names."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from leaderless.api.messages import StatusReply
from leaderless.config import ConfigError, load_config
from leaderless.obs import RequestStats, SystemSampler, make_registry, render
from leaderless.obs.alerts import (
    DEFAULT_RULES,
    GAUGES,
    HISTORY_MAX,
    INPUTS,
    RATES,
    RULES_MAX,
    Alerts,
    AlertsConfig,
    Rule,
    RuleError,
    node_readings,
    parse_rule,
    parse_rules,
    total_name,
)
from leaderless.obs.metrics import KV_METRICS
from leaderless.obs.system import SystemSample
from leaderless.runtime.counters import RuntimeCounters

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
GRAFANA_DASHBOARD = ROOT / "deploy" / "grafana" / "leaderless.json"


def rule(**fields: Any) -> Rule:
    base: dict[str, Any] = {"name": "r", "metric": "cpu_pct", "op": ">", "threshold": 50.0}
    return Rule(**{**base, **fields})


# -- rules and their validation ----------------------------------------------------------


def test_parse_rule_fills_defaults_and_normalises() -> None:
    parsed = parse_rule({"name": "hot", "metric": "cpu_pct", "op": ">=", "threshold": 90,
                         "severity": "CRITICAL"}, 1)
    assert parsed == Rule("hot", "cpu_pct", ">=", 90.0, 0.0, "critical", "")
    assert isinstance(parsed.threshold, float) and isinstance(parsed.for_s, float)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"name": "x", "metric": "cpu", "op": ">", "threshold": 1},
         "rule 1 'x': metric: 'cpu' is not an input; known: cpu_pct"),
        ({"name": "x", "metric": "cpu_pct", "op": "=>", "threshold": 1},
         "rule 1 'x': op: '=>' must be one of >, >=, <, <=, =="),
        ({"name": "x", "metric": "cpu_pct", "op": ">", "threshold": "high"},
         "rule 1 'x': threshold: 'high' must be a finite number"),
        ({"name": "x", "metric": "cpu_pct", "op": ">", "threshold": True},
         "rule 1 'x': threshold: True must be a finite number"),
        ({"name": "x", "metric": "cpu_pct", "op": ">", "threshold": float("nan")},
         "rule 1 'x': threshold: nan must be a finite number"),
        ({"name": "x", "metric": "cpu_pct", "op": ">", "threshold": 1, "for_s": -1},
         r"rule 1 'x': for_s: -1 must be a number of seconds in \[0, 86400\]"),
        ({"name": "x", "metric": "cpu_pct", "op": ">", "threshold": 1, "severity": "page"},
         "rule 1 'x': severity: 'page' must be one of warning, critical"),
        ({"name": "bad name", "metric": "cpu_pct", "op": ">", "threshold": 1},
         "rule 1 'bad name': name: must start with a letter or digit"),
        ({"name": "x" * 65, "metric": "cpu_pct", "op": ">", "threshold": 1},
         "name: is longer than 64 characters"),
        ({"name": "x", "metric": "cpu_pct", "threshold": 1}, "rule 1 'x': op is required"),
        ({"name": "x", "metric": "cpu_pct", "op": ">", "threshold": 1, "treshold": 2},
         "rule 1 'x': unknown field 'treshold'; known: name, metric, op"),
        ({"metric": "cpu_pct", "op": ">", "threshold": 1}, "rule 1: name is required"),
        ("cpu_pct > 1", "rule 1: must be a table"),
    ],
)
def test_a_bad_rule_is_named_with_the_field_and_why(raw: Any, message: str) -> None:
    with pytest.raises(RuleError, match=message):
        parse_rule(raw, 1)


def test_rules_must_have_unique_names_and_are_bounded() -> None:
    one = {"name": "a", "metric": "cpu_pct", "op": ">", "threshold": 1}
    with pytest.raises(RuleError, match="rule 2 'a': name: another rule already has"):
        parse_rules([one, one])
    many = [{**one, "name": f"r{i}"} for i in range(RULES_MAX + 1)]
    with pytest.raises(RuleError, match=f"at most {RULES_MAX}"):
        parse_rules(many)
    with pytest.raises(RuleError, match="must be an array of tables"):
        parse_rules("a > 1")
    # The defaults count too: a file that would exceed the bound with them is refused.
    with pytest.raises(RuleError, match="set alerts.defaults = false"):
        AlertsConfig(rules=parse_rules(many[:RULES_MAX]))
    assert len(AlertsConfig(defaults=False, rules=parse_rules(many[:RULES_MAX]))
               .effective_rules()) == RULES_MAX


def test_a_configured_rule_replaces_the_default_of_that_name() -> None:
    stricter = rule(name="disk_critical", metric="disk_used_pct", threshold=95.0)
    effective = AlertsConfig(rules=(stricter,)).effective_rules()
    assert [r for r in effective if r.name == "disk_critical"] == [stricter]
    assert len(effective) == len(DEFAULT_RULES)
    assert AlertsConfig(defaults=False, rules=(stricter,)).effective_rules() == (stricter,)
    assert AlertsConfig().effective_rules() == DEFAULT_RULES


@pytest.mark.parametrize(("op", "holds"), [(">", [False, False, True]),
                                          (">=", [False, True, True]),
                                          ("<", [True, False, False]),
                                          ("<=", [True, True, False]),
                                          ("==", [False, True, False])])
def test_operators(op: str, holds: list[bool]) -> None:
    r = rule(op=op, threshold=1.0)
    assert [r.holds(v) for v in (0.0, 1.0, 2.0)] == holds
    assert not r.holds(None) and not r.holds(float("nan"))


# -- states --------------------------------------------------------------------------------


def test_pending_then_firing_after_for_s_then_resolved() -> None:
    alerts = Alerts([rule(name="hot", for_s=10.0, severity="critical", description="why")])
    assert alerts.evaluate(0.0, {"cpu_pct": 10.0}) == []
    assert alerts.state("hot") == "inactive"
    [t] = alerts.evaluate(5.0, {"cpu_pct": 80.0})
    assert (t.state, t.value, t.now) == ("pending", 80.0, 5.0)
    assert alerts.evaluate(14.0, {"cpu_pct": 85.0}) == []  # held 9 s of 10
    assert alerts.state("hot") == "pending"
    [pending] = alerts.alerts(14.0, wall_offset_s=1000.0)
    assert pending["state"] == "pending" and pending["since"] == 1005.0
    [t] = alerts.evaluate(15.0, {"cpu_pct": 90.0})
    assert (t.state, t.value) == ("firing", 90.0)
    assert alerts.evaluate(20.0, {"cpu_pct": 95.0}) == []  # still firing: no new change
    [firing] = alerts.alerts(20.0, wall_offset_s=1000.0)
    assert firing == {"name": "hot", "severity": "critical", "state": "firing",
                      "metric": "cpu_pct", "value": 95.0, "threshold": 50.0, "op": ">",
                      "since": 1015.0, "message": firing["message"]}
    assert "cpu_pct = 95 > 50" in firing["message"] and firing["message"].endswith(": why")
    [t] = alerts.evaluate(25.0, {"cpu_pct": 20.0})
    assert (t.state, t.value) == ("resolved", 20.0)
    assert alerts.state("hot") == "inactive"
    [resolved] = alerts.alerts(26.0)
    assert resolved["state"] == "resolved" and resolved["since"] == 25.0
    assert "fired for 10 s" in resolved["message"]


def test_pending_that_stops_holding_goes_back_to_inactive_unrecorded() -> None:
    alerts = Alerts([rule(for_s=10.0)])
    alerts.evaluate(0.0, {"cpu_pct": 80.0})
    [t] = alerts.evaluate(5.0, {"cpu_pct": 10.0})
    assert t.state == "inactive"
    assert alerts.alerts(6.0) == []
    # Holding again starts the wait over.
    alerts.evaluate(6.0, {"cpu_pct": 80.0})
    assert alerts.evaluate(15.0, {"cpu_pct": 80.0}) == []
    assert [t.state for t in alerts.evaluate(16.0, {"cpu_pct": 80.0})] == ["firing"]


def test_for_s_zero_fires_at_once_and_a_missing_input_resolves() -> None:
    alerts = Alerts([rule(metric="disk_used_pct", op=">=", threshold=0.0)])
    assert [t.state for t in alerts.evaluate(0.0, {"disk_used_pct": 1.0})] == ["firing"]
    # The OS stopped giving the figure: no data is not "still true".
    assert [t.state for t in alerts.evaluate(1.0, {})] == ["resolved"]
    assert [t.state for t in alerts.evaluate(2.0, {"disk_used_pct": float("nan")})] == []


def test_alerts_are_listed_firing_by_severity_then_pending_then_resolved() -> None:
    alerts = Alerts([rule(name="w"), rule(name="p", for_s=60.0),
                     rule(name="c", severity="critical"), rule(name="gone")])
    alerts.evaluate(0.0, {"cpu_pct": 99.0})
    alerts.evaluate(1.0, {"cpu_pct": 99.0})
    assert [(a["name"], a["state"]) for a in alerts.alerts(1.0)] == [
        ("c", "firing"), ("w", "firing"), ("gone", "firing"), ("p", "pending")]
    alerts.evaluate(2.0, {"cpu_pct": 0.0})
    assert [(a["name"], a["state"]) for a in alerts.alerts(2.0)] == [
        ("w", "resolved"), ("c", "resolved"), ("gone", "resolved")]


def test_history_is_bounded_in_count_and_age() -> None:
    alerts = Alerts([rule()])
    now = 0.0
    for _ in range(HISTORY_MAX + 20):
        alerts.evaluate(now, {"cpu_pct": 99.0})
        alerts.evaluate(now + 1, {"cpu_pct": 0.0})
        now += 2
    resolved = alerts.alerts(now)
    assert len(resolved) == HISTORY_MAX
    assert resolved[0]["since"] == now - 1  # newest first
    aged = Alerts([rule()], history_max=5, history_age_s_max=100.0)
    aged.evaluate(0.0, {"cpu_pct": 99.0})
    aged.evaluate(1.0, {"cpu_pct": 0.0})
    assert len(aged.alerts(50.0)) == 1
    assert aged.alerts(102.0) == []  # past the age even before the next evaluation
    aged.evaluate(200.0, {"cpu_pct": 0.0})
    assert aged.alerts(200.0) == []


def test_rates_come_from_successive_totals() -> None:
    alerts = Alerts([rule(metric="dropped_malformed_per_s", threshold=1.0)])
    # The first reading has nothing to compare with: no rate, no alert.
    assert alerts.evaluate(0.0, {"dropped_malformed_total": 500.0}) == []
    assert "dropped_malformed_per_s" not in alerts.inputs()
    assert alerts.evaluate(5.0, {"dropped_malformed_total": 505.0}) == []
    assert alerts.inputs()["dropped_malformed_per_s"] == 1.0
    assert [t.state for t in alerts.evaluate(10.0, {"dropped_malformed_total": 520.0})] == [
        "firing"]
    assert alerts.inputs()["dropped_malformed_per_s"] == 3.0
    # A counter that went down (a restart of its source) gives no rate that turn.
    assert [t.state for t in alerts.evaluate(15.0, {"dropped_malformed_total": 0.0})] == [
        "resolved"]


def test_two_rules_with_one_name_are_refused_by_the_evaluator() -> None:
    with pytest.raises(RuleError, match="same name"):
        Alerts([rule(), rule()])


# -- inputs the node provides ----------------------------------------------------------------


def _sample(**overrides: Any) -> SystemSample:
    fields: dict[str, Any] = {f.name: 0 for f in dataclasses.fields(SystemSample)}
    fields.update(cpu_percent=12.5, cpu_count=4, load_1m=2.0, memory_used_bytes=3 << 30,
                  memory_total_bytes=4 << 30, disk_used_bytes=60, disk_free_bytes=40,
                  disk_total_bytes=150, disk_usage_available=True,
                  disk_io_available=True, network_io_available=True)
    fields.update(overrides)
    return SystemSample(**fields)


def _readings(**overrides: Any) -> dict[str, float]:
    runtime = RuntimeCounters()
    runtime.dropped_malformed_total["udp_packet"] += 3
    runtime.dropped_malformed_total["tcp_frame"] += 4
    kv = {key: 0 for key in KV_METRICS}
    kv.update(hints_pending=12, coordinator_timeouts=2, coordinator_unavailable=1,
              proposer_unavailable=5)
    args: dict[str, Any] = {
        "sample": _sample(), "states": {"alive": 2, "dead": 1}, "runtime": runtime.as_dict(),
        "kv": kv, "request_p99_ms": 3.5, "request_ops_per_s": 100.0,
        "request_errors_total": 9, "storage_failed": False}
    args.update(overrides)
    return node_readings(**args)


def test_the_node_provides_every_input() -> None:
    readings = _readings()
    assert set(GAUGES) <= set(readings)
    assert {total_name(r) for r in RATES} <= set(readings)
    assert readings["disk_used_pct"] == 60.0  # as df: used / (used + free), not / total
    assert readings["memory_used_pct"] == 75.0
    assert readings["load_per_cpu"] == 0.5
    assert (readings["members_dead"], readings["members_suspect"]) == (1, 0)
    assert readings["dropped_malformed_total"] == 7
    assert readings["unavailable_total"] == 6
    assert readings["storage_failed"] == 0.0
    assert _readings(storage_failed=True)["storage_failed"] == 1.0
    # What the OS or a not yet started data plane cannot give is missing, not zero.
    partial = _readings(sample=_sample(disk_usage_available=False), kv=None)
    assert "disk_used_pct" not in partial and "hints_pending" not in partial


def test_every_default_rule_reads_an_input_the_node_provides_and_says_why() -> None:
    alerts = Alerts(DEFAULT_RULES)
    alerts.evaluate(0.0, _readings())
    alerts.evaluate(5.0, _readings())
    provided = alerts.inputs()
    assert set(provided) == set(INPUTS)
    for r in DEFAULT_RULES:
        assert r.metric in provided, r.name
        assert len(r.description) > 40, r.name
    names = {r.name for r in DEFAULT_RULES}
    assert {"disk_critical", "disk_warning", "member_dead", "hints_backlog",
            "request_latency", "memory_critical"} <= names
    by_name = {r.name: r for r in DEFAULT_RULES}
    assert by_name["disk_critical"].condition() == "disk_used_pct > 90"
    assert by_name["disk_critical"].severity == "critical"
    assert by_name["disk_warning"].condition() == "disk_used_pct > 80"
    assert (by_name["member_dead"].condition(), by_name["member_dead"].for_s) == (
        "members_dead > 0", 30.0)
    assert by_name["hints_backlog"].condition() == "hints_pending > 10000"
    assert (by_name["request_latency"].condition(), by_name["request_latency"].for_s) == (
        "request_p99_ms > 500", 60.0)
    assert by_name["memory_critical"].condition() == "memory_used_pct > 90"


def test_defaults_stay_quiet_on_a_healthy_node() -> None:
    alerts = Alerts(DEFAULT_RULES)
    for now in (0.0, 100.0, 400.0):
        assert alerts.evaluate(now, _readings(states={"alive": 3})) == []


# -- [alerts] in the node's config -----------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def test_config_defaults() -> None:
    config = load_config({}, env={})
    assert config.alerts == AlertsConfig()
    assert config.alerts.interval_s == 5.0
    assert config.alerts.effective_rules() == DEFAULT_RULES


def test_config_rules_from_toml(tmp_path: Path) -> None:
    path = write(tmp_path, """
[alerts]
defaults = false
interval_s = 1

[[alerts.rules]]
name = "busy"
metric = "cpu_pct"
op = ">="
threshold = 95
for_s = 30
severity = "critical"
description = "The machine is saturated."

[[alerts.rules]]
name = "peer_dead"
metric = "members_dead"
op = ">"
threshold = 0
""")
    alerts = load_config({}, env={}, config_file=path).alerts
    assert alerts.defaults is False and alerts.interval_s == 1.0
    assert alerts.effective_rules() == (
        Rule("busy", "cpu_pct", ">=", 95.0, 30.0, "critical", "The machine is saturated."),
        Rule("peer_dead", "members_dead", ">", 0.0))


def test_config_alerts_from_environment() -> None:
    config = load_config({}, env={"LEADERLESS_ALERTS_DEFAULTS": "false",
                                  "LEADERLESS_ALERTS_INTERVAL_S": "2.5"})
    assert config.alerts.effective_rules() == () and config.alerts.interval_s == 2.5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[alerts.rules]]\nname = "d"\nmetric = "disk_pct"\nop = ">"\nthreshold = 1\n',
         "alerts.rules: rule 1 'd': metric: 'disk_pct' is not an input"),
        ('[[alerts.rules]]\nname = "a"\nmetric = "cpu_pct"\nop = ">"\nthreshold = 1\n'
         '[[alerts.rules]]\nname = "b"\nmetric = "cpu_pct"\nop = ">"\nthreshold = 1\n'
         'for_s = "1m"\n',
         "alerts.rules: rule 2 'b': for_s: '1m' must be a number of seconds"),
        ('[[alerts.rules]]\nname = "a"\nmetric = "cpu_pct"\nop = ">"\n',
         "alerts.rules: rule 1 'a': threshold is required"),
        ("[alerts]\ninterval_s = 0\n", r"alerts.interval_s: 0 must be in \(0, 3600\]"),
        ('[alerts]\ndefaults = "maybe"\n', "alerts.defaults: 'maybe' must be true or false"),
        ("[alerts]\nrules = 3\n", "alerts.rules: must be an array of tables"),
        ("[alerts]\nbogus = 1\n", "alerts.bogus: unknown setting in"),
        ("alerts = 1\n", r"config: \[alerts\] in .* must be a table"),
    ],
)
def test_config_errors_name_the_rule_and_field(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config({}, env={}, config_file=write(tmp_path, text))


# -- the shipped Prometheus rules and Grafana dashboard --------------------------------------


METRIC_NAME = re.compile(r"\bleaderless_[a-zA-Z0-9_]+")


def exported_names(body: str) -> set[str]:
    """Every series name a PromQL query may use against this exposition."""
    names: set[str] = set()
    for family in text_string_to_metric_families(body):
        names.add(family.name)
        names.update(s.name for s in family.samples)
        if family.type == "counter":
            names.add(family.name + "_total")  # present even before the first sample
        if family.type == "histogram":
            names.update(family.name + s for s in ("_bucket", "_count", "_sum"))
    return names


def referenced_names() -> dict[str, set[str]]:
    """Metric names used by each shipped file."""
    dashboard = json.loads(GRAFANA_DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v.get("query", "") if isinstance(v.get("query"), str)
              else v.get("query", {}).get("query", "")
              for v in dashboard["templating"]["list"]]
    return {
        PROMETHEUS_RULES.name: set(METRIC_NAME.findall(PROMETHEUS_RULES.read_text())),
        GRAFANA_DASHBOARD.name: set(METRIC_NAME.findall("\n".join(exprs))),
    }


def _full_status() -> Mapping[str, Any]:
    runtime = RuntimeCounters()
    reply = StatusReply(name="n1", address="127.0.0.1:7946", incarnation=1, version="0.1.0",
                        uptime_s=1.0, states={"alive": 3}, pending_broadcasts=0,
                        membership={}, runtime={**runtime.as_dict(),
                                                "kv": {key: 0 for key in KV_METRICS}})
    return msgspec.structs.asdict(reply)


def test_shipped_files_use_only_exported_metric_names(tmp_path: Path) -> None:
    requests = RequestStats()
    requests.observe("get", "QUORUM", 0.001)
    registry = make_registry(_full_status, requests, SystemSampler(tmp_path),
                             commit_group_sizes=lambda: {1: 1})
    exported = exported_names(render(registry)[0].decode())
    for file, names in referenced_names().items():
        assert names, file
        assert names <= exported, (file, sorted(names - exported))


def test_grafana_dashboard_shape() -> None:
    dashboard = json.loads(GRAFANA_DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert "node" in variables and variables["node"]["type"] == "query"
    assert "instance" in json.dumps(variables["node"]["query"])
    titles = " | ".join(p["title"].lower() for p in dashboard["panels"])
    for what in ("members", "request rate", "p99", "cpu", "memory", "disk used", "network",
                 "disk i/o", "load", "hints", "paxos", "commit"):
        assert what in titles, what
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert 'instance=~"$node"' in target["expr"], (panel["title"], target["expr"])


def test_prometheus_rules_mirror_the_default_rules() -> None:
    text = PROMETHEUS_RULES.read_text()
    assert "\ngroups:\n" in text and "\t" not in text
    alert_names = re.findall(r"^\s*- alert: (\w+)$", text, re.MULTILINE)
    assert len(alert_names) == len(set(alert_names))
    # Every default rule has a counterpart, named after it in CamelCase.
    for r in DEFAULT_RULES:
        camel = "Leaderless" + "".join(part.title() for part in r.name.split("_"))
        assert camel in alert_names, camel


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_rules_and_they_fire(tmp_path: Path) -> None:
    checked = subprocess.run(["promtool", "check", "rules", str(PROMETHEUS_RULES)],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # promtool's unit tests: synthetic series in, the alerts that must fire out.
    # promtool compares annotations too; the test is about when and with which labels.
    bare = tmp_path / "alerts.yml"
    bare.write_text(without_annotations(PROMETHEUS_RULES.read_text()))
    tests = tmp_path / "alerts_test.yml"
    tests.write_text(PROMTOOL_TESTS.format(rules=bare))
    tested = subprocess.run(["promtool", "test", "rules", str(tests)],
                            capture_output=True, text=True, timeout=60)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def without_annotations(text: str) -> str:
    """The rules file without its ``annotations:`` blocks (by indentation)."""
    out: list[str] = []
    skip_deeper_than: int | None = None
    for line in text.splitlines():
        indent = len(line) - len(line.lstrip())
        if skip_deeper_than is not None and (not line.strip() or indent > skip_deeper_than):
            continue
        skip_deeper_than = None
        if line.strip() == "annotations:":
            skip_deeper_than = indent
            continue
        out.append(line)
    return "\n".join(out) + "\n"


PROMTOOL_TESTS = """
rule_files:
  - {rules}
evaluation_interval: 15s
tests:
  - interval: 15s
    input_series:
      - series: 'leaderless_members{{instance="n1:9000", job="leaderless", state="dead"}}'
        values: '0 1x10'
      - series: 'leaderless_system_disk_used_bytes{{instance="n1:9000", job="leaderless"}}'
        values: '95x40'
      - series: 'leaderless_system_disk_free_bytes{{instance="n1:9000", job="leaderless"}}'
        values: '5x40'
      - series: 'leaderless_system_source_available{{instance="n1:9000", job="leaderless",
                  source="disk_usage"}}'
        values: '1x40'
      - series: 'leaderless_hints_pending{{instance="n1:9000", job="leaderless"}}'
        values: '20000x10'
      - series: 'up{{instance="n2:9000", job="leaderless"}}'
        values: '0x10'
    alert_rule_test:
      - eval_time: 2m
        alertname: LeaderlessMemberDead
        exp_alerts:
          - exp_labels: {{severity: critical, instance: "n1:9000", job: leaderless,
                          state: dead}}
      - eval_time: 2m
        alertname: LeaderlessHintsBacklog
        exp_alerts:
          - exp_labels: {{severity: warning, instance: "n1:9000", job: leaderless}}
      - eval_time: 2m
        alertname: LeaderlessNodeDown
        exp_alerts:
          - exp_labels: {{severity: critical, instance: "n2:9000", job: leaderless}}
      - eval_time: 2m
        alertname: LeaderlessDiskCritical
        exp_alerts:
          - exp_labels: {{severity: critical, instance: "n1:9000", job: leaderless}}
      - eval_time: 2m
        alertname: LeaderlessDiskWarning
        exp_alerts: []
      - eval_time: 8m
        alertname: LeaderlessDiskWarning
        exp_alerts:
          - exp_labels: {{severity: warning, instance: "n1:9000", job: leaderless}}
"""
