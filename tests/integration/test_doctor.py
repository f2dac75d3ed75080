"""``leaderless doctor`` and ``GET /api/doctor`` on real processes: a healthy cluster has
nothing critical (exit 0); with a node killed and another read-only, both are named with
a fix (exit 1), and the HTTP route says the same."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from leaderless.runtime.ports import free_port
from tests.integration.helpers import LEADERLESS, Processes, clean_env, run_cli, wait_until
from tests.integration.test_ops import get, start, start_ready_cluster

pytestmark = pytest.mark.integration

READ_ONLY_AT_ONCE = {"LEADERLESS_HEALTH_DISK_STOP_WRITES_FREE_PCT": "99.9",
                     "LEADERLESS_HEALTH_DISK_WARN_FREE_PCT": "99.9"}
"""Thresholds must be below 100 %; no disk in use has 99.9 % free: read-only at once."""


def doctor(address: str) -> tuple[int, dict[str, Any]]:
    result = run_cli("doctor", "--node", address, "--json")
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


def critical(report: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(f["check"], f["subject"]): f for f in report["findings"]
            if f["severity"] == "critical"}


@pytest.mark.timeout(120)
def test_doctor_names_a_dead_and_a_read_only_node(processes: Processes) -> None:
    nodes, urls = start_ready_cluster(processes, ("n1", "n2", "n3"))
    code, report = doctor(nodes[0].address)
    assert (code, report["critical"]) == (0, 0), report
    assert report["asked"] == "n1"

    processes.start_node("n4", None, nodes[0].address, READ_ONLY_AT_ONCE,
                         "--client", f"127.0.0.1:{free_port()}",
                         "--http", f"127.0.0.1:{free_port()}", "--log-level", "warning")
    nodes[1].process.kill()  # SIGKILL
    wait_until(lambda: nodes[0].members()["n2"].state == "dead", "n1 marks n2 dead")
    wait_until(lambda: ("health", "n4") in critical(doctor(nodes[0].address)[1]),
               "n1 learns by gossip that n4 is read-only")

    code, report = doctor(nodes[0].address)
    found = critical(report)
    assert code == 1
    assert ("members", "n2") in found and ("health", "n4") in found, report
    assert "read-only" in found[("health", "n4")]["message"]
    assert all(f["fix"] for f in found.values())

    status, body, _ = get(urls[0] + "/api/doctor")
    assert status == 200
    over_http = json.loads(body)
    assert over_http["critical"] >= 2
    assert {("members", "n2"), ("health", "n4")} <= set(critical(over_http))
    assert {k: f["fix"] for k, f in critical(over_http).items()
            if k in {("members", "n2"), ("health", "n4")}} == {
        k: f["fix"] for k, f in found.items() if k in {("members", "n2"), ("health", "n4")}}

    # The asked node's metrics: each member's gossiped health, and the last diagnosis.
    status, body, _ = get(urls[0] + "/metrics")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(body.decode())
               for s in family.samples}
    assert samples[("leaderless_member_health", (("member", "n4"), ("status", "read-only")))] == 1
    assert samples[("leaderless_member_health", (("member", "n1"), ("status", "healthy")))] == 1
    assert samples[("leaderless_doctor_findings", (("severity", "critical"),))] >= 2


@pytest.mark.timeout(120)
def test_doctor_over_tls_reports_a_certificate_about_to_expire(processes: Processes,
                                                               tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    for args in (("init", "--out", str(ca)), ("issue", "t1", "--ca", str(ca), "--days", "3"),
                 ("issue", "t2", "--ca", str(ca)), ("issue-client", "ops", "--ca", str(ca))):
        result = run_cli("certs", *args)
        assert result.returncode == 0, result.stderr

    def tls(name: str) -> list[str]:
        return ["--tls-ca", str(ca / "ca.crt"), "--tls-cert", str(ca / f"{name}.crt"),
                "--tls-key", str(ca / f"{name}.key")]

    first, _ = start(processes, "t1", None, *tls("t1"))
    second, _ = start(processes, "t2", first.address, *tls("t2"))
    env = clean_env({"LEADERLESS_TLS_CA": str(ca / "ca.crt"),
                     "LEADERLESS_TLS_CERT": str(ca / "ops.crt"),
                     "LEADERLESS_TLS_KEY": str(ca / "ops.key")})

    def doctor_over_tls() -> subprocess.CompletedProcess[str]:
        return subprocess.run([LEADERLESS, "doctor", "--node", second.address, "--json"],
                              capture_output=True, text=True, timeout=60, env=env,
                              stdin=subprocess.DEVNULL)

    # Both nodes report (t1's report crosses the mutual-TLS node port from t2).
    def t1_reported() -> bool:
        result = doctor_over_tls()  # exit 1 with no output while t2 is not listening yet
        return bool(result.stdout) and ("tls", "t1") in critical(json.loads(result.stdout))

    wait_until(t1_reported, "t2 gets t1's report")
    result = doctor_over_tls()
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    finding = critical(report)[("tls", "t1")]
    assert "expires in" in finding["message"] and "certs issue t1" in finding["fix"]
    assert not [f for f in report["findings"] if f["subject"] == "t2"], report


@pytest.mark.timeout(120)
def test_doctor_names_the_node_whose_clock_is_beyond_the_bound(processes: Processes) -> None:
    nodes, _ = start_ready_cluster(processes, ("c1", "c2"))
    processes.start_node("c3", None, nodes[0].address,
                         {"LEADERLESS_FAULT_CLOCK_SKEW_MS": "2000"},  # test-only hook
                         "--client", f"127.0.0.1:{free_port()}",
                         "--http", f"127.0.0.1:{free_port()}", "--log-level", "warning")

    def clock_findings() -> dict[tuple[str, str], dict[str, Any]]:
        return {k: f for k, f in critical(doctor(nodes[0].address)[1]).items()
                if k[0] == "clock"}

    wait_until(lambda: {("clock", "c1/c3"), ("clock", "c2/c3")} <= set(clock_findings()),
               "probes measure c3's clock against both others")
    found = clock_findings()
    assert set(found) == {("clock", "c1/c3"), ("clock", "c2/c3")}, found  # c1/c2 agree
    assert all(f["message"].startswith("c3's clock is") for f in found.values()), found
    assert all("ntp" in f["fix"].lower() for f in found.values())
