"""The cost of encryption at rest on store puts and gets: RocksStore and MemoryStore, each
plain and wrapped in an EncryptedStore (AES-256-GCM). Prints a markdown table and writes
bench/results/encryption_at_rest.json. Measures only; nothing here asserts a timing.

    python bench/encryption_at_rest.py                 # about a minute
    python bench/encryption_at_rest.py --seconds 0.5   # quicker, noisier

Workload: values of 100 B and 1 KiB (random, incompressible) under ``data_key`` keys;
puts in batches of 16 rows (a group-commit turn), unsynced (the fsync is the same with or
without encryption and would hide the CPU cost); point gets of random existing keys;
a 100-row range scan. Each figure is the best of three runs of ``--seconds`` each.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from leaderless.core.keys import data_key  # noqa: E402
from leaderless.security.data_keys import (  # noqa: E402
    DataKeys,
    generate_entry,
    parse_data_keys,
)
from leaderless.storage.encrypted import RecordCipher, at_rest  # noqa: E402
from leaderless.storage.memory import MemoryStore  # noqa: E402
from leaderless.storage.rocks import RocksStore  # noqa: E402
from leaderless.storage.store import Store  # noqa: E402

ROWS = 50_000
BATCH_ROWS = 16
RANGE_ROWS = 100
VALUE_SIZES = (100, 1024)
RUNS = 3


def key(i: int) -> bytes:
    return data_key("bench", b"user%06d" % (i // 100), b"%04d" % (i % 100))


def rate(op: Callable[[], int], seconds: float) -> float:
    """Operations per second of ``op`` (which returns how many it did), best of RUNS."""
    best = 0.0
    for _ in range(RUNS):
        done, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            done += op()
        best = max(best, done / elapsed)
    return best


def measure(store: Store, value_bytes: int, seconds: float) -> dict[str, float]:
    rng = random.Random(1)
    values = [rng.randbytes(value_bytes) for _ in range(256)]
    for start in range(0, ROWS, 1000):
        store.write([(key(i), values[i % 256]) for i in range(start, start + 1000)])
    store.sync()
    counter = iter(range(10**12))

    def put() -> int:
        base = next(counter) * BATCH_ROWS
        store.write([(key((base + j) % ROWS), values[j]) for j in range(BATCH_ROWS)])
        return BATCH_ROWS

    def get() -> int:
        for _ in range(100):
            store.get(key(rng.randrange(ROWS)))
        return 100

    def scan() -> int:
        first = key(rng.randrange(ROWS // 100) * 100)
        return sum(1 for _ in store.scan(first, limit=RANGE_ROWS))

    return {"put_rows_per_s": rate(put, seconds), "get_per_s": rate(get, seconds),
            "scan_rows_per_s": rate(scan, seconds)}


def cipher_costs(keys: DataKeys, seconds: float) -> dict[str, float]:
    """Microseconds per seal and per open of one 100-byte value (the record cipher alone)."""
    cipher = RecordCipher(keys)
    value, store_key = random.Random(2).randbytes(100), key(12345)
    record = cipher.seal(store_key, value)

    def seal() -> int:
        for _ in range(1000):
            cipher.seal(store_key, value)
        return 1000

    def open_() -> int:
        for _ in range(1000):
            cipher.open(store_key, record)
        return 1000

    return {"seal": 1e6 / rate(seal, seconds), "open": 1e6 / rate(open_, seconds)}


@click.command()
@click.option("--seconds", type=float, default=1.0, show_default=True)
def main(seconds: float) -> None:
    keys = parse_data_keys(generate_entry("bench"), source="bench")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for value_bytes in VALUE_SIZES:
            for engine in ("memory", "rocksdb"):
                for encrypted in (False, True):
                    inner: Store = (MemoryStore() if engine == "memory" else RocksStore(
                        Path(tmp) / f"{engine}-{value_bytes}-{encrypted}", sync_mode="off"))
                    store = at_rest(inner, keys if encrypted else None, where="bench")
                    name = f"{engine} {value_bytes} B {'encrypted' if encrypted else 'plain'}"
                    results[name] = measure(store, value_bytes, seconds)
                    store.close()
    print("| store, value, mode | puts/s | gets/s | scan rows/s | put cost | get cost |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        plain = results[name.replace("encrypted", "plain")]
        cost = ""
        if name.endswith("encrypted"):
            cost = " | ".join(f"{1e6 / r[k] - 1e6 / plain[k]:+.2f} us/op "
                              f"({r[k] / plain[k] - 1:+.0%})" for k in ("put_rows_per_s",
                                                                         "get_per_s"))
        print(f"| {name} | {r['put_rows_per_s']:,.0f} | {r['get_per_s']:,.0f} | "
              f"{r['scan_rows_per_s']:,.0f} | {cost or '- | -'} |")
    cipher = cipher_costs(keys, seconds)
    print("\nper call, 100 B value: " + ", ".join(f"{k} {v:.2f} us" for k, v in cipher.items()))
    out = ROOT / "bench" / "results" / "encryption_at_rest.json"
    out.write_text(json.dumps({"seconds": seconds, "batch_rows": BATCH_ROWS,
                               "results": results, "cipher_us": cipher}, indent=2) + "\n")
    print(f"\nwrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
