"""Coverage-guided fuzzing (atheris, libFuzzer) of the native protocol decoders: the
client port's request frames (``api.kv_messages.ClientRequest``, decoded as
``api.kv_server`` does) and the replies a client decodes (``ClientReply``). The node
port's frames are fuzzed by tests/unit/test_codec_fuzz.py (importing the node here would
make every run start slowly).

Run: ``python tests/fuzz/atheris_native.py -runs=100000 [CORPUS_DIR]`` (``make fuzz``).
Each input is a byte stream split into two halves at its first byte, fed to a
``FrameDecoder`` in those two pieces (so partial frames are exercised) and also decoded
whole as one request body. Anything but the decoders' own errors is a crash.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["leaderless"]):
    import msgspec

    from leaderless.api.kv_messages import ClientReply, ClientRequest
    from leaderless.core.codec import FrameDecoder, MalformedInput, encode_frame

DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError)
_request_decoder: msgspec.msgpack.Decoder[ClientRequest] = msgspec.msgpack.Decoder(
    ClientRequest)


def test_one_input(data: bytes) -> None:
    try:
        request = _request_decoder.decode(data)
    except DECODE_ERRORS:
        pass
    else:  # what decodes must encode and decode the same
        assert _request_decoder.decode(msgspec.msgpack.encode(request)) == request
    cut = data[0] if data else 0
    for frame_type in (ClientRequest, ClientReply):
        decoder: FrameDecoder[object] = FrameDecoder(frame_type)
        try:
            frames = decoder.feed(data[:cut]) + decoder.feed(data[cut:])
        except MalformedInput:
            continue
        for frame in frames:
            encode_frame(frame)


def seeds() -> list[bytes]:
    """Valid frames to start from (written to a corpus directory by the test)."""
    from leaderless.api.kv_messages import Get, ListKeyspaces, Put, Scan

    return [encode_frame(m) for m in (Put(1, "fz", b"k", b"v"), Get(2, "fz", b"k"),
                                      Scan(3, "fz", b"k"), ListKeyspaces(4))]


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
