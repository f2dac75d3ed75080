"""The nemesis: its seeded schedules (deterministic, a serving majority at every moment),
a real run of kills, pauses and partitions on a ChaosCluster that ends healed, and a node's
clock skewed live through the runtime's file hook."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from leaderless.chaos.cluster import ChaosCluster
from leaderless.chaos.nemesis import (
    CLOCK_SKEW_FAULT_MAX_MS,
    CLOCK_SKEW_MIN_MS,
    FAILURE_DETECTION_S,
    KINDS,
    MIN_FAULT_S,
    SHAPES,
    Nemesis,
    PlannedFault,
    format_schedule,
    parse_kinds,
    plan,
)
from leaderless.client import AsyncClient
from leaderless.core.locks import CLOCK_SKEW_MAX_MS


def names(n: int) -> list[str]:
    return [f"n{i + 1}" for i in range(n)]


# -- schedules ------------------------------------------------------------------------


def test_a_seed_gives_one_schedule() -> None:
    a = plan(names(5), KINDS, 42, 3.0, 120.0)
    assert a == plan(names(5), KINDS, 42, 3.0, 120.0)
    assert a != plan(names(5), KINDS, 43, 3.0, 120.0)
    # A longer run extends a shorter one's schedule (the end of a cut fault aside).
    short = plan(names(5), KINDS, 42, 3.0, 60.0)
    assert [(f.kind, f.at_s, f.targets) for f in short] == \
        [(f.kind, f.at_s, f.targets) for f in a[:len(short)]]
    text = format_schedule(a, 42)
    assert text.splitlines()[0] == f"nemesis schedule (seed 42, {len(a)} faults):"
    assert len(text.splitlines()) == len(a) + 1


def impaired_at(faults: list[PlannedFault], t: float, n: int) -> int:
    """How many nodes cannot serve with the majority at time ``t``: killed, paused, disk
    full, or cut off — a bridge partition's smaller half counted as nodes of its own (the
    cluster draws the halves when it starts)."""
    active = [f for f in faults if f.at_s <= t < f.end_s]
    cut = {name for f in active if f.kind in ("kill", "pause", "disk") for name in f.targets}
    for f in active:
        if f.kind == "partition" and f.detail["shape"] == "bridge":
            assert f.detail["cut"] == (n - 1) // 2
            cut |= {f"half-of-bridge-{i}" for i in range(f.detail["cut"])}
        elif f.kind == "partition":
            groups: list[list[str]] = f.detail["groups"]
            assert sorted(x for g in groups for x in g) == sorted(names(n))
            largest = max(groups, key=lambda g: len(g))
            cut |= set(names(n)) - set(largest)
    return len(cut)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7])
def test_schedules_keep_a_serving_majority_and_their_bounds(n: int) -> None:
    seen: set[str] = set()
    shapes: set[str] = set()
    long_pauses = 0
    for seed in range(40):
        duration_s = 90.0
        faults = plan(names(n), KINDS, seed, 2.5, duration_s)
        assert faults, "every slot cannot be empty"
        starts = [f.at_s for f in faults]
        assert starts == sorted(starts) and starts[0] >= 2.5
        for f in faults:
            seen.add(f.kind)
            assert MIN_FAULT_S <= f.duration_s and f.end_s <= duration_s + 1e-9
            assert f.targets and set(f.targets) <= set(names(n))
            if f.kind == "clock":
                assert CLOCK_SKEW_MIN_MS <= abs(f.detail["skew_ms"]) <= CLOCK_SKEW_FAULT_MAX_MS
            if f.kind == "partition":
                shapes.add(f.detail["shape"])
            if f.kind == "pause" and f.detail["long"]:
                long_pauses += 1
                assert f.duration_s > FAILURE_DETECTION_S
        # At every moment: a majority serves, one partition and one skew at most, a node
        # carries one fault.
        for t in sorted({f.at_s for f in faults} | {f.end_s - 1e-6 for f in faults}):
            assert impaired_at(faults, t, n) <= (n - 1) // 2, (seed, t)
            active = [f for f in faults if f.at_s <= t < f.end_s]
            assert sum(f.kind == "partition" for f in active) <= 1
            assert sum(f.kind == "clock" for f in active) <= 1
            per_node = [x for f in active if f.kind != "partition" for x in f.targets]
            assert len(per_node) == len(set(per_node)), (seed, t, active)
    if n <= 2:  # no node can be spared: only clock skews
        assert seen == {"clock"}
    else:
        assert seen == set(KINDS) and long_pauses > 0
        assert shapes == set(SHAPES)
    assert CLOCK_SKEW_FAULT_MAX_MS < CLOCK_SKEW_MAX_MS


def test_kinds_are_parsed_and_respected() -> None:
    assert parse_kinds("partition, kill") == {"partition", "kill"}
    assert parse_kinds("all") == set(KINDS)
    with pytest.raises(ValueError, match="unknown nemesis kinds \\['reboot'\\]"):
        parse_kinds("kill,reboot")
    with pytest.raises(ValueError, match="no nemesis kind"):
        parse_kinds("")
    for seed in range(20):
        faults = plan(names(5), {"partition", "clock"}, seed, 3.0, 60.0)
        assert faults and {f.kind for f in faults} <= {"partition", "clock"}


# -- on a real cluster ------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChaosCluster]:
    c = ChaosCluster(3, tmp_path_factory.mktemp("nemesis"), seed=11)
    try:
        c.start()
        print(f"chaos cluster mode: {c.mode} ({c.mode_reason})")
        yield c
    finally:
        c.stop()


def http(c: ChaosCluster, name: str, method: str, path: str,
         body: bytes = b"") -> tuple[int, dict[str, Any]]:
    url = f"http://{c.node(name).http_address}{path}"
    request = urllib.request.Request(url, data=body or None, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")
    except OSError as err:  # a node restarting, its listener not up yet
        return 0, {"error": str(err)}


def strong_put(c: ChaosCluster, name: str) -> tuple[int, str]:
    status, body = http(c, name, "PUT", "/v1/kv/strong/k", b"v")
    return status, str(body.get("error", ""))


def node_log(c: ChaosCluster, name: str, msg: str) -> list[dict[str, Any]]:
    """The node's JSON log lines ``msg`` (the harness writes other lines too)."""
    lines = []
    for line in c.node(name).log_path.read_text().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("msg") == msg:
                lines.append(entry)
    return lines


async def put_get(addresses: list[str], key: bytes, value: bytes) -> bytes | None:
    async with AsyncClient(addresses, timeout_s=10) as kv:
        await kv.create_keyspace("nemesis", 3, "eventual", read_consistency="QUORUM",
                                 write_consistency="QUORUM", if_not_exists=True)
        deadline = time.monotonic() + 30
        while True:  # the schema reaches every node by gossip
            try:
                await kv.put("nemesis", key, value)
                break
            except Exception:  # noqa: BLE001 (retried until the deadline)
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        got: bytes | None = await kv.get("nemesis", key)
        return got


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_a_clock_skewed_live_past_the_bound_refuses_strong_operations_until_reset(
        cluster: ChaosCluster) -> None:
    c = cluster
    assert http(c, "n1", "POST", "/v1/keyspaces", b'{"name": "strong", "mode": "strong"}'
                )[0] in (201, 409)
    c.wait_for(lambda: strong_put(c, "n3")[0] == 200, "n3 coordinates strong puts", 30)
    c.set_clock_skew("n3", 2000, beyond_bound=True)  # the file its live hook reads
    try:
        c.wait_for(lambda: strong_put(c, "n3") == (503, "clock_skew"),
                   "n3 refuses strong puts for its clock", 60)
        assert strong_put(c, "n1")[0] == 200  # the others serve on
        assert [e["skew_ms"] for e in node_log(c, "n3", "fault_clock_skew")][-1] == 2000
    finally:
        c.set_clock_skew("n3", 0)
    c.wait_for(lambda: strong_put(c, "n3")[0] == 200,
               "n3 coordinates strong puts again, without a restart", 60)
    assert [e["skew_ms"] for e in node_log(c, "n3", "fault_clock_skew")][-1] == 0

    # The nemesis's clock faults (within the bound) go through the same hook.
    nemesis = Nemesis(c, {"clock"}, seed=3, interval_s=1.5, log=print)
    planned = nemesis.schedule(6.0)
    print(format_schedule(planned, 3))
    faults = asyncio.run(nemesis.run(6.0))
    assert [f["kind"] for f in faults] == ["clock"] * len(planned) and faults
    for fault, p in zip(faults, planned, strict=True):
        skews = [e["skew_ms"] for e in node_log(c, p.targets[0], "fault_clock_skew")]
        assert p.detail["skew_ms"] in skews and skews[-1] == 0
        assert fault["end"] is not None and "error" not in fault["detail"]
    assert all(c.node(n).skew_file.read_text().strip() == "0" for n in c.names)
    assert strong_put(c, "n2")[0] == 200


def sample(c: ChaosCluster) -> dict[str, Any]:
    """What the faults look like from outside: which processes are gone, which are
    stopped (state T in /proc), which partition the cluster enforces."""
    stopped, gone = set(), set()
    for node in c.nodes:
        pid = node.pid
        if pid is None:
            gone.add(node.name)
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] in ("T", "t"):
            stopped.add(node.name)
    return {"t": time.monotonic(), "gone": gone, "stopped": stopped,
            "cut": {a for a, b in c.blocked.items() if b}}


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_a_short_run_injects_every_fault_and_heals(cluster: ChaosCluster) -> None:
    c = cluster
    kinds = {"kill", "pause", "partition"}
    duration_s, interval_s = 14.0, 2.5
    seed = next(s for s in range(1000)  # the first seed whose run has each kind
                if {f.kind for f in plan(c.names, kinds, s, interval_s, duration_s)} == kinds)
    nemesis = Nemesis(c, kinds, seed, interval_s, log=print)
    planned = nemesis.schedule(duration_s)
    print(format_schedule(planned, seed))
    samples: list[dict[str, Any]] = []

    async def main() -> list[dict[str, Any]]:
        run = asyncio.create_task(nemesis.run(duration_s))
        while not run.done():
            samples.append(await asyncio.to_thread(sample, c))
            await asyncio.sleep(0.1)
        return await run

    faults = asyncio.run(main())
    assert [(f["kind"], tuple(f["targets"])) for f in faults] == \
        [(p.kind, p.targets) for p in planned]
    for fault in faults:
        assert fault["end"] is not None and fault["start"] < fault["end"], fault
        assert "error" not in fault["detail"], fault
        during = [s for s in samples if fault["start"] < s["t"] < fault["end"]]
        targets = set(fault["targets"])
        if fault["kind"] == "kill":
            assert any(targets <= s["gone"] for s in during), fault
        elif fault["kind"] == "pause":
            assert any(targets <= s["stopped"] for s in during), fault
        else:
            assert any(targets <= s["cut"] for s in during), fault
    # Healed: every node runs, none stopped, no partition, all see each other alive, and
    # the cluster takes a write and reads it back.
    end = sample(c)
    assert (end["gone"], end["stopped"], end["cut"]) == (set(), set(), set())
    c.wait_healthy(60)
    assert asyncio.run(put_get(c.client_addresses(), b"after", b"healed")) == b"healed"


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_cancelling_a_run_heals_what_it_started(cluster: ChaosCluster) -> None:
    c = cluster
    nemesis = Nemesis(c, {"pause"}, seed=5, interval_s=0.5, log=print)
    first = nemesis.schedule(30.0)[0]

    async def main() -> None:
        run = asyncio.create_task(nemesis.run(30.0))
        while not nemesis.faults:  # the first pause started
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        assert all(c.node(n).paused for n in first.targets)
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run

    asyncio.run(main())
    assert len(nemesis.faults) == 1 and nemesis.faults[0]["end"] is not None
    assert sample(c)["stopped"] == set()
    c.wait_healthy(60)


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_a_disk_fault_fills_a_data_dir_then_frees_it_and_the_node_is_back(
        cluster: ChaosCluster) -> None:
    c = cluster
    if c.disk_reason:
        pytest.skip(f"disk faults unavailable: {c.disk_reason}")
    nemesis = Nemesis(c, {"disk"}, seed=1, interval_s=1.0, log=print)
    planned = nemesis.schedule(12.0)[:1]
    target = planned[0].targets[0]

    async def main() -> None:
        run = asyncio.create_task(nemesis.run(12.0))
        # Writes while the disk is full: the node fails one and steps out (exit 4).
        async with AsyncClient(c.client_addresses(), timeout_s=5) as kv:
            await kv.create_keyspace("nemesis", 3, "eventual", read_consistency="QUORUM",
                                     write_consistency="QUORUM", if_not_exists=True)
            i = 0
            while not run.done():
                i += 1
                try:
                    await kv.put("nemesis", f"disk-{i}".encode(), b"x" * 1000)
                except Exception:  # noqa: BLE001 (a node stepping out: others serve)
                    pass
                await asyncio.sleep(0.02)
        await run

    asyncio.run(main())
    fault = nemesis.faults[0]
    assert (fault["kind"], fault["targets"]) == ("disk", [target])
    assert fault["detail"]["bytes"] > 0 and "error" not in fault["detail"], fault
    # Every write reaches its replica (N=3): it met the full disk, stepped out, and was
    # started again once the disk was freed.
    assert fault["detail"].get("restarted"), fault
    assert node_log(c, target, "passive_failover")
    assert all(f["end"] is not None for f in nemesis.faults)
    assert set(c.running()) == set(c.names)
    assert not (c.node(target).data_dir / ".chaos-disk-fill").exists()
    c.wait_healthy(60)
    assert asyncio.run(put_get(c.client_addresses(), b"after-disk", b"ok")) == b"ok"
