"""Coverage-guided fuzzing (atheris, libFuzzer) of the gossip path a datagram takes:
``security.keyring.Keyring.open`` (when gossip is encrypted), then
``core.codec.decode_packet``.

Run: ``python tests/fuzz/atheris_gossip.py -runs=100000 [CORPUS_DIR]`` (``make fuzz``).
The keyring's keys are fixed, so a run is reproducible. Anything but ``OpenError`` and
``MalformedInput`` escaping is a crash; a packet that decodes must survive a round trip.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["leaderless"]):
    from leaderless.core.codec import MalformedInput, decode_packet, encode_packet
    from leaderless.security.keyring import Keyring, OpenError

KEYRING = Keyring([bytes(range(32)), bytes(range(32, 64))])


def test_one_input(data: bytes) -> None:
    for datagram in (data, KEYRING.seal(data)):
        try:
            opened = KEYRING.open(datagram) if datagram[:1] == b"\xc1" else datagram
        except OpenError:
            continue
        try:
            packet = decode_packet(opened)
        except MalformedInput:
            continue
        assert decode_packet(encode_packet(packet)) == packet


def seeds() -> list[bytes]:
    """Valid packets to start from (written to a corpus directory by the test)."""
    from leaderless.core.messages import Ack, Address, Alive, NodeMeta, Packet, Ping

    address = Address("127.0.0.1", 7946)
    return [encode_packet(Packet("node-a", [Ping(7, "node-b", address), Ack(3)],
                                 [Alive("node-c", 4, address, NodeMeta(zone="z1"))])),
            encode_packet(Packet("n", [], []))]


def write_seeds(directory: str) -> None:
    """``--write-seeds DIR``: put the seed inputs in a corpus directory, then exit."""
    for i, seed in enumerate(seeds()):
        with open(f"{directory}/seed{i}", "wb") as f:
            f.write(seed)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write-seeds"]:
        write_seeds(sys.argv[2])
    else:
        atheris.Setup(sys.argv, test_one_input)
        atheris.Fuzz()
