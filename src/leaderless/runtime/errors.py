"""Why a node refuses to start. Each message says what is wrong and what to do."""

from __future__ import annotations


class StartupError(Exception):
    """The node cannot start in this environment (not a bug: the user can fix it)."""


class PortInUseError(StartupError):
    """The UDP or TCP side of the node's address is taken by another process."""


class DataDirError(StartupError):
    """The data directory cannot be created, written, locked or read."""
