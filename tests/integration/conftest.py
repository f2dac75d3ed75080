"""Fixtures for integration tests (helpers live in helpers.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.helpers import Processes


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    """Starts processes for one test and kills every one of them afterwards, pass or fail."""
    owner = Processes(tmp_path)
    try:
        yield owner
    finally:
        owner.kill_all()
