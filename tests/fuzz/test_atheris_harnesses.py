"""Run each atheris harness (``atheris_native.py``, ``atheris_gossip.py``) for a few
thousand inputs in a subprocess, from a corpus of valid messages, with a fixed seed and a
timeout: a crash (any exception but the decoders' own) fails the test with libFuzzer's
report. ``make fuzz`` runs them far longer. Skipped where atheris is not installed (it is
the optional ``fuzz`` extra)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
RUNS = int(3000 * float(os.environ.get("LEADERLESS_FUZZ_SCALE", "1")))
TIMEOUT_S = 120

pytestmark = pytest.mark.skipif(importlib.util.find_spec("atheris") is None,
                                reason="atheris is not installed (pip install -e '.[fuzz]')")


@pytest.mark.parametrize("harness", ["atheris_native", "atheris_gossip"])
def test_harness_runs_clean(harness: str, tmp_path: Path) -> None:
    script = str(HERE / f"{harness}.py")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    subprocess.run([sys.executable, script, "--write-seeds", str(corpus)], check=True,
                   capture_output=True, timeout=TIMEOUT_S)
    assert list(corpus.iterdir())
    done = subprocess.run(
        [sys.executable, script, f"-runs={RUNS}", "-seed=20261126",
         "-max_len=4096", "-rss_limit_mb=1024", str(corpus)],
        capture_output=True, text=True, timeout=TIMEOUT_S, cwd=tmp_path)
    report = done.stderr[-4000:]
    assert done.returncode == 0, report
    assert f"Done {RUNS} runs" in done.stderr, report
