"""A seeded fault schedule against the KV data plane, with its safety and liveness checks.

Five nodes, N=3: clients write and read a few keys at QUORUM through random coordinators
while nodes crash (losing unsynced writes), restart, and get cut off by partitions, on a
network that loses 1 % of messages. Then everything heals.

- Safety: a QUORUM read never returns a cell older than a write acknowledged before the
  read began (R + W > N, hints not counted towards W, blocking read repair).
- Liveness: after healing (hints replayed, anti-entropy run), every replica of every key
  holds the newest acknowledged cell.

``python -m leaderless.sim kv --seed N`` replays one seed and prints the report.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from leaderless.core.cells import Cell
from leaderless.core.coordinator import Failed, ReadDone, Result, WriteDone
from leaderless.sim.kv import KvSim, KvSimConfig

KEYS = (b"a", b"b", b"c", b"d")


@dataclasses.dataclass
class KvFaultsReport:
    seed: int
    writes_acked: int = 0
    reads_ok: int = 0
    failed: int = 0
    crashes: int = 0
    partitions: int = 0
    stale_reads: list[str] = dataclasses.field(default_factory=list)
    unconverged: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.stale_reads and not self.unconverged


def run_kv_faults(seed: int, steps: int = 400, heal_s: float = 60.0) -> KvFaultsReport:
    sim = KvSim(KvSimConfig(nodes=5, anti_entropy_interval_s=2.0, detection_s=0.5,
                            loss=0.01), seed=seed)
    rng = sim.rng
    names = sorted(sim.nodes)
    report = KvFaultsReport(seed)
    acked: dict[bytes, Cell] = {}

    def on_write(key: bytes, cell: Cell) -> Callable[[Result], None]:
        def done(result: Result) -> None:
            if isinstance(result, WriteDone):
                report.writes_acked += 1
                if cell.newer_than(acked.get(key)):
                    acked[key] = cell
            elif isinstance(result, Failed):
                report.failed += 1
        return done

    def on_read(key: bytes, floor: Cell | None) -> Callable[[Result], None]:
        def done(result: Result) -> None:
            if not isinstance(result, ReadDone):
                report.failed += 1
                return
            report.reads_ok += 1
            if floor is not None and floor.newer_than(result.cell):
                report.stale_reads.append(f"read of {key!r} returned {result.cell}, "
                                          f"older than acknowledged {floor}")
        return done

    partitioned = False
    for step in range(steps):
        up = [n for n in names if sim.nodes[n].up]
        roll = rng.random()
        if roll < 0.02 and len(up) > 3:
            sim.crash(rng.choice(up))
            report.crashes += 1
        elif roll < 0.05:
            down = [n for n in names if not sim.nodes[n].up]
            if down:
                sim.restart(rng.choice(down))
        elif roll < 0.06 and not partitioned:
            cut = rng.choice(names)
            sim.partition([[cut], [n for n in names if n != cut]])
            partitioned = True
            report.partitions += 1
        elif roll < 0.08 and partitioned:
            sim.heal()
            partitioned = False
        via = rng.choice([n for n in names if sim.nodes[n].up])
        key = rng.choice(KEYS)
        if rng.random() < 0.5:
            cell = sim.cell(via, f"{step}".encode())
            sim.put(via, key, cell, "QUORUM", on_write(key, cell))
        else:
            sim.get(via, key, "QUORUM", on_read(key, acked.get(key)))
        sim.run_for(rng.uniform(0.001, 0.05))
    sim.heal()
    for name in names:
        if not sim.nodes[name].up:
            sim.restart(name)
    sim.run_for(heal_s)
    for key, cell in acked.items():
        for name in sim.replicas(key):
            local = sim.nodes[name].local(key)
            if local is None or cell.newer_than(local):
                report.unconverged.append(f"{name} holds {local} for {key!r}; "
                                          f"acknowledged {cell}")
    return report
