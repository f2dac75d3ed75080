"""Fuzz the gossip decoder (``core.codec.decode_packet``) and the sealed-datagram opener
(``security.keyring.Keyring.open``) that runs before it when gossip is encrypted.

Properties: whatever a datagram holds, only ``MalformedInput`` (decoder) or ``OpenError``
(opener) escapes; what decodes re-encodes to a packet that decodes the same; a sealed
datagram with any byte changed never opens; and decoding a long run of hostile datagrams
holds no memory beyond the datagram at hand.
"""

from __future__ import annotations

import gc
import random
import tracemalloc

from hypothesis import given
from hypothesis import strategies as st

from leaderless.core.codec import (
    PACKET_BYTES_MAX,
    MalformedInput,
    decode_packet,
    encode_packet,
)
from leaderless.core.messages import Packet
from leaderless.security.keyring import Keyring, OpenError, decode_key, generate_key
from tests.fuzz.shapes import mutated, settings_for, shaped_bytes, shaped_or_mutated

datagrams = shaped_or_mutated(Packet) | st.binary(min_size=PACKET_BYTES_MAX - 8,
                                                  max_size=PACKET_BYTES_MAX + 8)


def decode_or_none(data: bytes) -> Packet | None:
    try:
        return decode_packet(data)
    except MalformedInput:
        return None


def test_the_gossip_decoder_only_raises_malformed_input() -> None:
    @settings_for(400)
    @given(datagrams)
    def check(data: bytes) -> None:
        packet = decode_or_none(data)
        if packet is not None:
            assert decode_packet(encode_packet(packet)) == packet

    check()


def keyring() -> Keyring:
    return Keyring([decode_key(generate_key()), decode_key(generate_key())])


def test_a_damaged_sealed_datagram_never_opens() -> None:
    ring = keyring()

    @settings_for(150)
    @given(shaped_bytes(Packet).flatmap(lambda p: st.tuples(st.just(p), st.data())))
    def check(drawn: tuple[bytes, st.DataObject]) -> None:
        plaintext, data = drawn
        sealed = ring.seal(plaintext)
        assert ring.open(sealed) == plaintext
        damaged = data.draw(mutated(sealed))
        try:
            opened = ring.open(damaged)
        except OpenError:
            return
        assert damaged == sealed and opened == plaintext  # only an undamaged one opens

    check()


def test_random_datagrams_only_fail_to_open() -> None:
    ring = keyring()

    @settings_for(400)
    @given(st.binary(max_size=PACKET_BYTES_MAX) | st.binary(max_size=64).map(
        lambda b: b"\xc1" + b))
    def check(data: bytes) -> None:
        try:
            ring.open(data)
        except OpenError:
            pass

    check()


def test_decoding_hostile_datagrams_holds_no_memory() -> None:
    rng = random.Random(20261126)
    seeds = [encode_packet(Packet("node-a", [], []))]

    def hostile() -> bytes:
        base = bytearray(rng.choice(seeds) if rng.random() < 0.5
                         else rng.randbytes(rng.randrange(PACKET_BYTES_MAX + 64)))
        for _ in range(rng.randrange(4)):
            if base:
                base[rng.randrange(len(base))] = rng.randrange(256)
        # msgpack headers that claim huge containers: must not be allocated up front
        return bytes(rng.choice([b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff",
                                 b"\xdb\xff\xff\xff\xff", b""])) + bytes(base)

    for _ in range(500):
        decode_or_none(hostile())
    gc.collect()
    tracemalloc.start()
    try:
        baseline, _ = tracemalloc.get_traced_memory()
        for _ in range(20_000):
            decode_or_none(hostile())
        gc.collect()
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - baseline < 1024 * 1024, (baseline, peak)
    assert current - baseline < 64 * 1024, (baseline, current)
