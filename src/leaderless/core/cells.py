"""A stored value with its version: the unit replicas exchange and reconcile.

Last-writer-wins by (HLC timestamp, writer node name): the newer cell wins on every
replica whatever the order cells arrive in, so replicas converge. A delete is a cell with
``tombstone=True`` (it must win against older values, so it is stored, not removed, until
the grace period has passed). A TTL is an absolute expiry in wall milliseconds: an expired
cell reads as absent and is purged like a tombstone.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
import xxhash

from leaderless.core.hlc import physical_ms
from leaderless.core.messages import Name

VALUE_BYTES_MAX_DEFAULT = 1 << 20
"""1 MiB, the issue's default limit; configurable per node (``value_bytes_max``)."""
VALUE_BYTES_HARD_MAX = (8 << 20) - 4096
"""A value must fit in one 8 MiB frame with its envelope, whatever the setting says."""

Timestamp = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


class Cell(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True):
    hlc: Timestamp
    writer: Name
    value: Annotated[bytes, msgspec.Meta(max_length=VALUE_BYTES_HARD_MAX)] = b""
    tombstone: bool = False
    expires_at_ms: Timestamp = 0
    """Wall-clock ms after which the cell reads as absent; 0 means never."""

    def version(self) -> tuple[int, str]:
        return (self.hlc, self.writer)

    def newer_than(self, other: Cell | None) -> bool:
        return other is None or (self.hlc, self.writer) > (other.hlc, other.writer)

    def visible(self, wall_ms: int) -> bool:
        """True if a read should return this cell's value."""
        return not self.tombstone and (self.expires_at_ms == 0 or wall_ms < self.expires_at_ms)

    def purgeable(self, wall_ms: int, grace_ms: int) -> bool:
        """A tombstone or expired cell older than the grace period: safe to drop, because
        every replica has had ``grace_ms`` to receive it (by hints, repair, anti-entropy)."""
        if self.tombstone:
            return wall_ms - physical_ms(self.hlc) > grace_ms
        return self.expires_at_ms != 0 and wall_ms - self.expires_at_ms > grace_ms

    def digest(self) -> int:
        """64-bit digest of the version (not the value: versions are unique per write)."""
        return xxhash.xxh64_intdigest(self.writer.encode(), seed=self.hlc)


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Cell)


def encode_cell(cell: Cell) -> bytes:
    return _encoder.encode(cell)


def decode_cell(data: bytes) -> Cell:
    return _decoder.decode(data)


def newest(cells: list[Cell | None]) -> Cell | None:
    best: Cell | None = None
    for cell in cells:
        if cell is not None and cell.newer_than(best):
            best = cell
    return best
