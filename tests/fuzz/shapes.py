"""Hypothesis strategies for hostile input that knows the shape of our messages.

Pure random bytes die at the first msgpack byte; a fuzzer that never gets past the
decoder tests only the decoder. ``shaped(T)`` reads a message type's schema
(``msgspec.inspect``) and draws values that are *mostly* right (the right tag, the right
field types, lengths at and just past each limit) and sometimes wrong (a wrong type in
any field, a missing or extra field), so inputs reach validation and the handlers behind
it. ``mutated`` then damages an encoding the way a broken or hostile peer would.

Also ``settings_for``: every fuzz property runs derandomized (the same examples on every
run, so CI is deterministic) with its example count scaled by ``LEADERLESS_FUZZ_SCALE``
(``make fuzz`` raises it).
"""

from __future__ import annotations

import os
from typing import Any

import msgspec
import msgspec.inspect as mi
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

FUZZ_SCALE = float(os.environ.get("LEADERLESS_FUZZ_SCALE", "1"))
"""Multiplies every property's example count: 1 in ``make test``, more in ``make fuzz``."""
SIZE_CAP = 96
"""Strings and bytes drawn freely stay this short; limits are probed at the limit itself."""
PROBED_LIMIT_MAX = 4096
"""A length limit up to this is probed at limit and limit + 1; longer ones (values of
megabytes) are left to tests/unit: drawing them would make each example slow."""


def settings_for(examples: int) -> settings:
    return settings(max_examples=max(1, int(examples * FUZZ_SCALE)), derandomize=True,
                    deadline=None, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.large_base_example])


any_msgpack: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=24) | st.binary(max_size=24),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
"""Any msgpack value: the 'wrong type' of every field."""


def _mostly(usual: st.SearchStrategy[Any], *rare: st.SearchStrategy[Any]
            ) -> st.SearchStrategy[Any]:
    """``usual`` nine times in ten, else one of ``rare`` (an edge or a wrong value)."""
    if not rare:
        return usual
    return st.integers(0, 9).flatmap(lambda i: usual if i else st.one_of(*rare))


def _sized(limit: int | None, low: int | None, make: Any, fill: Any) -> st.SearchStrategy[Any]:
    low = low or 0
    usual = make(min_size=low, max_size=max(low, min(SIZE_CAP, limit or SIZE_CAP)))
    rare = []
    if limit is not None and limit <= PROBED_LIMIT_MAX:
        rare += [st.just(fill * limit), st.just(fill * (limit + 1))]
    if low:
        rare.append(st.just(fill * (low - 1)))
    return _mostly(usual, *rare)


def _ints(t: mi.IntType) -> st.SearchStrategy[int]:
    lo = t.ge if t.ge is not None else (t.gt + 1 if t.gt is not None else -(2**63))
    hi = t.le if t.le is not None else (t.lt - 1 if t.lt is not None else 2**64 - 1)
    inside = [v for v in (lo, hi, 0, 1) if lo <= v <= hi]
    outside = [v for v in (lo - 1, hi + 1, -1) if -(2**63) <= v < 2**64 and not lo <= v <= hi]
    small = st.integers(max(lo, 0), min(hi, 1000)) if max(lo, 0) <= min(hi, 1000) else None
    usual = st.integers(lo, hi) if small is None else st.integers(lo, hi) | small

    def pick(i: int) -> st.SearchStrategy[int]:
        if i == 0 and outside:
            return st.sampled_from(outside)  # one in fifty: just past a bound
        if i < 5:
            return st.sampled_from(inside)  # the bounds themselves
        return usual

    return st.integers(0, 49).flatmap(pick)


def _shape(t: mi.Type, overrides: dict[str, st.SearchStrategy[Any]],
           depth: int) -> st.SearchStrategy[Any]:
    if isinstance(t, mi.IntType):
        return _ints(t)
    if isinstance(t, mi.StrType):
        return _sized(t.max_length, t.min_length, st.text, "x")
    if isinstance(t, mi.BytesType):
        return _sized(t.max_length, t.min_length, st.binary, b"\xab")
    if isinstance(t, mi.BoolType):
        return st.booleans()
    if isinstance(t, mi.NoneType):
        return st.none()
    if isinstance(t, mi.FloatType):
        return st.floats()
    if isinstance(t, mi.UnionType):
        return st.one_of(*(_shape(member, overrides, depth) for member in t.types))
    if isinstance(t, mi.LiteralType):
        return st.sampled_from(list(t.values))
    if isinstance(t, (mi.ListType, mi.SetType, mi.FrozenSetType, mi.VarTupleType)):
        limit = min(t.max_length if t.max_length is not None else 4, 4 if depth else 8)
        return st.lists(_shape(t.item_type, overrides, depth + 1), max_size=limit)
    if isinstance(t, mi.DictType):
        return st.dictionaries(_shape(t.key_type, overrides, depth + 1),
                               _shape(t.value_type, overrides, depth + 1), max_size=3)
    if isinstance(t, mi.StructType):
        return _struct(t, overrides, depth)
    return any_msgpack


def _struct(t: mi.StructType, overrides: dict[str, st.SearchStrategy[Any]],
            depth: int) -> st.SearchStrategy[Any]:
    name = t.cls.__name__
    fields = [overrides[f"{name}.{f.name}"] if f"{name}.{f.name}" in overrides
              else _shape(f.type, overrides, depth + 1) for f in t.fields]
    required = sum(1 for f in t.fields if f.required)
    head = [st.just(t.tag)] if t.tag is not None else []

    @st.composite
    def build(draw: st.DrawFn) -> Any:
        values = [draw(s) for s in [*head, *fields]]
        # Optional trailing fields may be left out, as an older peer would.
        keep = draw(st.integers(len(head) + required, len(values)))
        values = values[:keep]
        odds = 19 if depth == 0 else 59  # nested structs are many: damage them rarely
        if values and draw(st.integers(0, odds)) == 0:  # one field of the wrong type
            at = draw(st.integers(min(len(head), len(values) - 1), len(values) - 1))
            values[at] = draw(any_msgpack)  # not the tag: that is random bytes' job
        if draw(st.integers(0, 2 * odds)) == 0:  # an extra field
            values.append(draw(any_msgpack))
        return values

    if t.array_like:
        return build()
    return st.fixed_dictionaries({f.encode_name: s for f, s in zip(t.fields, fields,
                                                                   strict=True)})


def shaped(message_type: Any, overrides: dict[str, st.SearchStrategy[Any]] | None = None
           ) -> st.SearchStrategy[Any]:
    """Values shaped like ``message_type`` (a Struct or a union of tagged Structs), as
    plain msgpack-ready lists. ``overrides`` maps ``"Struct.field"`` to a strategy."""
    return _shape(mi.type_info(message_type), overrides or {}, 0)


def shaped_bytes(message_type: Any, overrides: dict[str, st.SearchStrategy[Any]] | None = None
                 ) -> st.SearchStrategy[bytes]:
    return shaped(message_type, overrides).map(msgspec.msgpack.encode)


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` damaged a few times: bytes flipped, cut, duplicated, inserted or removed."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "cut", "insert", "delete", "dup"]))
        at = draw(st.integers(0, max(0, len(out) - 1)))
        if kind == "flip" and out:
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and out:
            out[at] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0xC1, 0xDC, 0xDD, 0xDF,
                                            0xCF, 0xD3, 0xDB, 0xC6]))
        elif kind == "cut":
            del out[at:]
        elif kind == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete" and out:
            del out[at:at + draw(st.integers(1, 8))]
        elif kind == "dup":
            out[at:at] = out[at:at + draw(st.integers(1, 16))]
    return bytes(out)


def shaped_or_mutated(message_type: Any,
                      overrides: dict[str, st.SearchStrategy[Any]] | None = None
                      ) -> st.SearchStrategy[bytes]:
    """Encodings of shaped values, damaged half of the time, or plain random bytes."""
    encoded = shaped_bytes(message_type, overrides)
    return st.one_of(encoded, encoded.flatmap(mutated), st.binary(max_size=64))
