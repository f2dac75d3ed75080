"""Locks with leases and fencing tokens, as changes of a strong key's register.

A lock is one key of the strong system keyspace ``system_locks`` (partition key = the
lock's name). Its register holds a ``LockState``: the current holder (an owner id the
client chose), the fencing token of the current lease, and when that lease expires. Every
lock operation is a CASPaxos change (``Acquire``, ``Renew``, ``Release``) applied by the
proposer to the chosen state, so grants are linearizable and a token is never granted
twice: each grant is ``token + 1`` of the chosen state it was applied to.

**Time.** A lease expires at ``expires_at_ms``, stamped by the proposer that granted or
renewed it from its hybrid clock's wall part (the runtime passes it as ``wall_ms``; it never
goes backwards on a node); another proposer may grant the lock once *its* clock has passed
that instant. The assumption: the wall clocks of the nodes differ by at
most ``CLOCK_SKEW_MAX_MS`` (the hybrid clock's bound, ``core.hlc``: a node refuses peer
timestamps further ahead). So a lease may end up to that much earlier than its holder's
TTL says, and a client must treat its lease as valid only until
``sent_at + ttl - CLOCK_SKEW_MAX_MS`` by its own monotonic clock, where ``sent_at`` is
when it sent the acquire or renew (``client.Lease.valid_for_s``).

**Why fencing tokens.** Clocks and pauses can still break the holder's belief: a holder
that is paused (GC, SIGSTOP, a swapped-out VM) right after checking its lease may resume
after the lease expired and another client was granted the lock, and write anyway. So a
write made under a lock carries ``Fence(lock, token)``: the node serving it first reads the
lock (a linearizable read) and refuses the write if a newer token has been granted; a
strong key also remembers the newest token that changed it and refuses older ones. The
paused client's write is then rejected instead of corrupting the data (Kleppmann, "How to
do distributed locking", 2016; Chubby's sequencers, Burrows 2006).
"""

from __future__ import annotations

import msgspec

from leaderless.core.hlc import MAX_OFFSET_MS_DEFAULT
from leaderless.core.paxos_messages import (
    Acquire,
    Counter,
    LockChange,
    Register,
    Release,
    Renew,
    WallMs,
)

LOCK_KEYSPACE = "system_locks"
LOCK_REPLICATION = 3
"""Lock registers live on 3 replicas: a majority (2) must be up for any lock operation, so
one node of three may die without stopping locks (with fewer than 2 nodes, locks are
unavailable)."""
CLOCK_SKEW_MAX_MS = MAX_OFFSET_MS_DEFAULT


class LockState(msgspec.Struct, frozen=True, array_like=True):
    holder: str
    """The owner id of the current lease; "" when released (or never granted)."""
    token: Counter
    """The fencing token of the last grant (0: never granted). Only grows."""
    expires_at_ms: WallMs
    """Wall-clock ms when the current lease ends (0 when released)."""

    def held(self, wall_ms: int) -> bool:
        return bool(self.holder) and wall_ms < self.expires_at_ms


FREE = LockState("", 0, 0)
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(LockState)


def encode_lock(state: LockState) -> bytes:
    return _encoder.encode(state)


def decode_lock(value: bytes | None) -> LockState:
    """The lock state in a register's value (absent: never granted)."""
    if value is None:
        return FREE
    return _decoder.decode(value)


def apply_lock(register: Register, change: LockChange, wall_ms: int
               ) -> tuple[LockState | None, LockState]:
    """(the new state, or None if the change is refused; the current state).

    A refused change leaves the register as it is; the caller reports the current state
    (who holds the lock, with which token, until when)."""
    state = decode_lock(register.value)
    if isinstance(change, Acquire):
        if state.held(wall_ms) and state.holder != change.owner:
            return None, state
        token = state.token if state.held(wall_ms) else state.token + 1
        return LockState(change.owner, token, wall_ms + change.ttl_ms), state
    if isinstance(change, Renew):
        if not (state.holder == change.owner and state.token == change.token
                and state.held(wall_ms)):
            return None, state
        return LockState(change.owner, state.token, wall_ms + change.ttl_ms), state
    assert isinstance(change, Release)
    if not (state.holder == change.owner and state.token == change.token):
        return None, state
    return LockState("", state.token, 0), state
