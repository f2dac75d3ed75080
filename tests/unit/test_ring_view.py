"""A restarted node starts from the ring view it saved: the ring it served with stays in
its write set for settle_s, since peers may still read with it (core.placement.PlacementView)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from leaderless.config import load_config
from leaderless.core.messages import Address
from leaderless.runtime.node import Node


def config(tmp_path: Path, name: str, join: Address | None = None) -> Node:
    return Node(load_config({
        "name": name, "bind": "127.0.0.1:0", "data_dir": str(tmp_path / name),
        "join": [str(join)] if join else [], "ring.bootstrap": False, "ring.settle_s": 0.5,
        "log_level": "warning"}, env={}))


def test_a_restarted_node_keeps_its_last_ring_in_the_write_set(tmp_path: Path) -> None:
    async def scenario() -> None:
        n1 = config(tmp_path, "n1")
        await n1.start()
        n2 = config(tmp_path, "n2", n1.address)
        await n2.start()
        try:
            for _ in range(100):
                await asyncio.sleep(0.1)
                assert n2.kv is not None
                n2.kv.refresh_placement()
                if {m.name for m in n2.kv._view._saved} == {"n1", "n2"}:
                    break
            else:
                raise AssertionError("n2 never saved its view of the two-node ring")
            await n2.stop()
            restarted = config(tmp_path, "n2", n1.address)
            await restarted.start()
            assert restarted.kv is not None
            # Before gossip brings anything, the saved ring is the one just replaced.
            rings = [sorted(ring.nodes) for _, ring in restarted.kv._view.history]
            assert ["n1", "n2"] in rings
            placement = restarted.kv.placement
            assert placement.changing
            await restarted.stop()
        finally:
            await n1.stop()

    asyncio.run(scenario())
