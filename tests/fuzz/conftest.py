"""One real node for the whole fuzz package, running on its own event loop in a thread,
so synchronous hypothesis properties can drive it example after example.

The node has a client port and an HTTP port, and two keyspaces with replication 1 (so
well-formed requests can succeed on a single node): ``fz`` (eventual) and ``fzs``
(strong: compare-and-set, increments, watches, locks' keyspace behaviour). Every log
record at ERROR or above that the node writes is kept in ``errors``: the node logs a bug
(an unexpected exception on a request) that way, and no input may cause one.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from leaderless.config import load_config
from leaderless.runtime.logs import ROOT_LOGGER
from leaderless.runtime.node import Node

T = TypeVar("T")
START_TIMEOUT_S = 30.0


class ErrorRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class LiveNode:
    """A started node and the loop it runs on; ``run`` a coroutine there and wait."""

    def __init__(self, node: Node, loop: asyncio.AbstractEventLoop,
                 errors: ErrorRecords) -> None:
        self.node = node
        self.loop = loop
        self._errors = errors
        assert node.client_address is not None and node.http_address is not None
        self.client_port = node.client_address.port
        self.http_port = node.http_address.port

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    @property
    def errors(self) -> list[str]:
        """What the node logged at ERROR since the start (message and fields)."""
        return [f"{r.getMessage()} {getattr(r, 'fields', {})}" for r in self._errors.records]


@pytest.fixture(scope="session")
def live_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveNode]:
    data_dir: Path = tmp_path_factory.mktemp("fuzz-node")
    config = load_config({"name": "fuzz", "bind": "127.0.0.1:0", "data_dir": str(data_dir),
                          "client": "127.0.0.1:0", "http": "127.0.0.1:0"}, env={})
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fuzz-node", daemon=True)
    thread.start()
    errors = ErrorRecords()
    logging.getLogger(ROOT_LOGGER).addHandler(errors)
    node = Node(config)

    async def start() -> None:
        await node.start()
        await node.kv.create_keyspace("fz", 1, "eventual", "ONE", "ONE", True)
        await node.kv.create_keyspace("fzs", 1, "strong", "QUORUM", "QUORUM", True)

    try:
        asyncio.run_coroutine_threadsafe(start(), loop).result(START_TIMEOUT_S)
        yield LiveNode(node, loop, errors)
    finally:
        try:
            asyncio.run_coroutine_threadsafe(node.stop(), loop).result(START_TIMEOUT_S)
        finally:
            logging.getLogger(ROOT_LOGGER).removeHandler(errors)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()
