"""Membership benchmarks: real processes on loopback (leaderless vs swim-protocol) and the
simulator at 100 / 1,000 / 10,000 nodes. Prints markdown tables and writes JSON to
bench/results/. Measures only; nothing here asserts a timing.

    python bench/membership.py                  # everything (about an hour)
    python bench/membership.py --part sim       # simulator only
    python bench/membership.py --part real --sizes 5,10 --trials 3 --quiet-s 30
"""

from __future__ import annotations

import pathlib
import sys

import click

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))


@click.command()
@click.option("--part", type=click.Choice(["all", "sim", "real"]), default="all")
@click.option("--sizes", default="5,10,50", help="real-process cluster sizes")
@click.option("--trials", default=10, help="kill -9 trials per size")
@click.option("--quiet-s", default=300.0, help="seconds of quiet cluster for false positives")
def main(part: str, sizes: str, trials: int, quiet_s: float) -> None:
    if part in ("all", "real"):
        from membership_real import run_real_bench

        run_real_bench(sizes=tuple(int(s) for s in sizes.split(",")), trials=trials,
                       quiet_s=quiet_s)
    if part in ("all", "sim"):
        from membership_sim import run_sim_bench

        run_sim_bench()


if __name__ == "__main__":
    main()
