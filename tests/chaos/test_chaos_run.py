"""The bounded chaos run of ``make test``: three workloads, ~12 s each, on a real 3-node
cluster (network namespaces when this machine allows, else loopback; the output says which)
while the nemesis kills nodes and partitions the network. Each must come out valid, with
zero lost acknowledged writes and every register key decided linearizable.
``make chaos`` runs all four workloads longer, with every fault kind and several seeds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from leaderless.chaos.history import read_jsonl
from leaderless.chaos.runner import ChaosConfig, run_chaos

pytestmark = pytest.mark.integration
DURATION_S = float(os.environ.get("LEADERLESS_CHAOS_CI_S", "12"))
LEADERLESS = str(Path(sys.executable).parent / "leaderless")


def _config(workload: str, seed: int, out: Path) -> ChaosConfig:
    return ChaosConfig(workload=workload, nodes=3, nemesis="kill,partition",
                       duration_s=DURATION_S, seed=seed, out_dir=out, interval_s=2.0,
                       settle_s=2.0)


def _assert_valid(summary: dict[str, object]) -> None:
    print(f"chaos {summary['workload']} seed {summary['seed']}: mode {summary['mode']}, "
          f"{summary['faults']} faults, ok {summary['ok']}, failed {summary['failed']}, "
          f"indeterminate {summary['indeterminate']}")
    assert summary["valid"] is True, summary["anomalies"]
    assert summary["lost_acknowledged_writes"] == 0
    assert summary["anomalies"] == []
    assert summary["recovered"] is True
    assert summary["faults"] >= 2  # the nemesis really did something
    assert int(str(summary["ok"])) > 20


@pytest.mark.timeout(240)
def test_register_is_linearizable_under_kills_and_partitions(tmp_path: Path) -> None:
    summary = run_chaos(_config("register", 11, tmp_path))
    _assert_valid(summary)
    result = summary["result"]
    assert isinstance(result, dict)
    assert set(result["keys"].values()) == {"linearizable"}, result["keys"]
    history = read_jsonl(tmp_path / "history.jsonl")
    assert len(history.operations()) == sum(result["counts"].values())
    assert json.loads((tmp_path / "faults.json").read_text())["faults"]


@pytest.mark.timeout(240)
def test_set_loses_no_acknowledged_add_under_kills_and_partitions(tmp_path: Path) -> None:
    summary = run_chaos(_config("set", 12, tmp_path))
    _assert_valid(summary)
    result = summary["result"]
    assert isinstance(result, dict)
    assert result["acknowledged"] == summary["ok"] and result["unreadable"] == []


@pytest.mark.timeout(240)
def test_lock_through_the_cli_grants_no_lock_twice(tmp_path: Path) -> None:
    """Through the command itself: --json, the exit code and the files it writes."""
    out = tmp_path / "run"
    done = subprocess.run(
        [LEADERLESS, "chaos", "--nodes", "3", "--workload", "lock", "--nemesis",
         "kill,partition", "--duration", str(DURATION_S), "--interval", "2", "--settle", "2",
         "--seed", "13", "--json", "--out", str(out)],
        capture_output=True, text=True, timeout=220, stdin=subprocess.DEVNULL,
        env={k: v for k, v in os.environ.items() if not k.startswith("LEADERLESS_")})
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    summary = json.loads(done.stdout)
    _assert_valid(summary)
    assert summary["workload"] == "lock" and summary["seed"] == 13 and summary["nodes"] == 3
    assert summary["mode"] in ("netns", "loopback") and summary["mode"] in done.stderr
    assert "nemesis schedule (seed 13" in done.stderr
    for name in ("history.jsonl", "faults.json", "result.json", "timeline.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads((out / "result.json").read_text())["result"]
    assert result["grants"] > 5 and result["fenced_writes_ok"] > 5
