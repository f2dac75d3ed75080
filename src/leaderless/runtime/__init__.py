"""The asyncio world: sockets, timers, the node process."""
