"""Fixtures for the dashboard tests: the integration tests' process owner (real nodes)."""

from __future__ import annotations

from tests.integration.conftest import processes

__all__ = ["processes"]
