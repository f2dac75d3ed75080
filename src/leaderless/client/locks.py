"""Leases as the client sees them, and the ``async with client.lock(...)`` helper.

A lease is valid, by the client's own monotonic clock, until ``sent_at + ttl - skew``:
``sent_at`` is when the acquire (or the last renew) was *sent*, so time spent in flight
counts against the lease, and ``skew`` is the cluster's clock skew bound
(``core.locks.CLOCK_SKEW_MAX_MS``), because the node that next judges expiry may run that
much ahead. Even so, a process can pause between checking its lease and writing; that is
what the fencing token is for: pass ``lease`` as ``fence=`` to writes made under it, and a
node refuses them once the lock has granted a newer token (``FencedError``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from leaderless.client.errors import LeaderlessError, LeaseLostError
from leaderless.core.locks import CLOCK_SKEW_MAX_MS

RENEW_FRACTION = 1 / 3
"""``lock()`` renews when a third of the TTL has passed: two renewals can fail (a node
dying, a slow round) before the lease runs out."""


@dataclasses.dataclass
class Lease:
    name: str
    owner: str
    token: int
    """The fencing token: it grows with every grant of this lock."""
    ttl_s: float
    sent_at: float
    """``time.monotonic()`` when the acquire or last renew was sent."""
    lost: bool = False
    """Set by ``lock()`` when a renewal found the lease gone."""

    @property
    def fence(self) -> tuple[str, int]:
        return (self.name, self.token)

    def valid_for_s(self) -> float:
        """How much longer this holder may act on the lease (<= 0: it must stop)."""
        if self.lost:
            return 0.0
        # +1 ms: nodes read their wall clocks in whole milliseconds.
        return self.sent_at + self.ttl_s - (CLOCK_SKEW_MAX_MS + 1) / 1000 - time.monotonic()


Renew = Callable[[Lease], Awaitable[Lease]]
Release = Callable[[Lease], Awaitable[object]]


@contextlib.asynccontextmanager
async def held(lease: Lease, renew: Renew, release: Release) -> AsyncIterator[Lease]:
    """Keep ``lease`` renewed while the block runs; release it after."""
    task = asyncio.get_running_loop().create_task(_keep(lease, renew))
    try:
        yield lease
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if not lease.lost:
            with contextlib.suppress(LeaderlessError):
                await release(lease)


async def _keep(lease: Lease, renew: Renew) -> None:
    while not lease.lost:
        await asyncio.sleep(lease.ttl_s * RENEW_FRACTION)
        try:
            renewed = await renew(lease)
        except LeaseLostError:
            lease.lost = True
            return
        except LeaderlessError:
            if lease.valid_for_s() <= 0:
                lease.lost = True
                return
            continue  # a node died or was slow: try again soon, while the lease lasts
        lease.sent_at = renewed.sent_at
