"""The live clock-skew fault hook ``LEADERLESS_FAULT_CLOCK_SKEW_FILE``: a chaos run moves
a running node's wall clock by rewriting one file (``runtime.wall_clock``)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from leaderless.runtime import wall_clock
from leaderless.runtime.errors import StartupError
from leaderless.runtime.logs import NodeLogger
from leaderless.runtime.wall_clock import (
    FAULT_CLOCK_SKEW_ENV,
    FAULT_CLOCK_SKEW_FILE_ENV,
    FAULT_CLOCK_SKEW_MS_MAX,
    write_fault_skew_file,
)

LOG = NodeLogger("n", "test")


@pytest.fixture(autouse=True)
def no_hook_after() -> Iterator[None]:
    """Every test leaves this process's wall clock unshifted, the live hook off."""
    try:
        yield
    finally:
        wall_clock.install_fault_skew({}, LOG)
        assert wall_clock.fault_skew_ms() == 0


def logged(caplog: pytest.LogCaptureFixture, msg: str) -> list[dict[str, Any]]:
    return [dict(getattr(r, "fields", {})) for r in caplog.records if r.getMessage() == msg]


def wait_for(predicate: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    """Call ``wall_ms`` (which polls the file) until ``predicate`` holds."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        wall_clock.wall_ms()
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out: {what}")


def skew_becomes(ms: int) -> None:
    wait_for(lambda: wall_clock.fault_skew_ms() == ms, f"the skew becomes {ms} ms")


def test_the_file_moves_the_clock_while_the_process_runs(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = str(tmp_path / "skew")
    with caplog.at_level(logging.WARNING):
        # Absent at start: no shift yet, but the hook is armed and announced.
        assert wall_clock.install_fault_skew({FAULT_CLOCK_SKEW_FILE_ENV: path}, LOG) == 0
        start = logged(caplog, "fault_clock_skew")
        assert start and start[0]["file"] == path and "TEST-ONLY" in start[0]["warning"]
        before = time.time_ns() // 1_000_000
        write_fault_skew_file(path, 3000)
        skew_becomes(3000)
        assert wall_clock.wall_ms() - before >= 3000
        write_fault_skew_file(path, -2500)
        skew_becomes(-2500)
        assert wall_clock.wall_ms() < time.time_ns() // 1_000_000 - 2000
        assert [f["skew_ms"] for f in logged(caplog, "fault_clock_skew")][-2:] == [3000, -2500]
        # Empty or removed: back to 0.
        write_fault_skew_file(path, 700)
        skew_becomes(700)
        Path(path).write_text("")
        skew_becomes(0)
        write_fault_skew_file(path, 700)
        skew_becomes(700)
        os.unlink(path)
        skew_becomes(0)
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_the_file_is_read_only_when_its_stat_changed(tmp_path: Path) -> None:
    """An in-place rewrite that keeps inode, mtime and size is not seen (the node only
    stats the file); touching it makes the node read it."""
    path = tmp_path / "skew"
    path.write_text("1000")
    assert wall_clock.install_fault_skew({FAULT_CLOCK_SKEW_FILE_ENV: str(path)}, LOG) == 1000
    st = path.stat()
    path.write_text("2000")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    deadline = time.monotonic() + 3 * wall_clock.SKEW_FILE_CHECK_S + 0.2
    while time.monotonic() < deadline:  # several check periods pass
        wall_clock.wall_ms()
        time.sleep(0.02)
    assert wall_clock.fault_skew_ms() == 1000
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    skew_becomes(2000)


def test_values_beyond_the_limit_are_clamped_and_garbage_keeps_the_skew(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = str(tmp_path / "skew")
    write_fault_skew_file(path, FAULT_CLOCK_SKEW_MS_MAX * 10)
    with caplog.at_level(logging.WARNING):
        assert (wall_clock.install_fault_skew({FAULT_CLOCK_SKEW_FILE_ENV: path}, LOG)
                == FAULT_CLOCK_SKEW_MS_MAX)
        clamped = logged(caplog, "fault_clock_skew_clamped")
        assert clamped and clamped[0]["requested_ms"] == FAULT_CLOCK_SKEW_MS_MAX * 10
        write_fault_skew_file(path, -FAULT_CLOCK_SKEW_MS_MAX - 1)
        skew_becomes(-FAULT_CLOCK_SKEW_MS_MAX)
        write_fault_skew_file(path, 400)
        skew_becomes(400)
        Path(path).write_text("12 ms")  # not a number: the skew stays, one warning
        wait_for(lambda: bool(logged(caplog, "fault_clock_skew_file")), "a warning")
        assert wall_clock.fault_skew_ms() == 400
        assert "not a whole number" in logged(caplog, "fault_clock_skew_file")[0]["error"]
        write_fault_skew_file(path, 0)
        skew_becomes(0)
    assert len(logged(caplog, "fault_clock_skew_file")) == 1


def test_a_bad_start_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "skew"
    path.write_text("soon")
    with pytest.raises(StartupError, match=FAULT_CLOCK_SKEW_FILE_ENV):
        wall_clock.install_fault_skew({FAULT_CLOCK_SKEW_FILE_ENV: str(path)}, LOG)
    write_fault_skew_file(str(path), 5)
    with pytest.raises(StartupError, match="both set"):
        wall_clock.install_fault_skew(
            {FAULT_CLOCK_SKEW_FILE_ENV: str(path), FAULT_CLOCK_SKEW_ENV: "5"}, LOG)


def test_without_the_variable_the_file_is_never_looked_at(tmp_path: Path) -> None:
    path = str(tmp_path / "skew")
    write_fault_skew_file(path, 1234)
    assert wall_clock.install_fault_skew({}, LOG) == 0
    deadline = time.monotonic() + 2 * wall_clock.SKEW_FILE_CHECK_S + 0.1
    while time.monotonic() < deadline:
        wall_clock.wall_ms()
        time.sleep(0.02)
    assert wall_clock.fault_skew_ms() == 0
