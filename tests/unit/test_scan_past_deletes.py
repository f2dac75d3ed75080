"""A scan pages past deleted rows: a partition whose first rows are tombstones (deleted
entries of a queue index, say) still returns the live rows after them."""

from __future__ import annotations

from pathlib import Path

from tests.unit.test_runtime_node import make_node, run_test


def test_a_scan_returns_live_rows_behind_many_deleted_ones(tmp_path: Path) -> None:
    async def main() -> None:
        node = make_node(tmp_path, "n1", storage="memory")
        await node.start()
        try:
            kv = node.kv
            assert kv is not None
            await kv.create_keyspace("q", replication=1)
            for i in range(300):
                await kv.put("q", b"shard", b"v", sort=b"%04d" % i)
            for i in range(280):
                await kv.delete("q", b"shard", sort=b"%04d" % i)
            rows, more = await kv.scan("q", b"shard", limit=10)
            assert [r.sort for r in rows] == [b"%04d" % i for i in range(280, 290)]
            assert more
            rows, more = await kv.scan("q", b"shard", start=b"0285", limit=100)
            assert [r.sort for r in rows] == [b"%04d" % i for i in range(285, 300)]
            assert not more
        finally:
            await node.stop()

    run_test(main())
