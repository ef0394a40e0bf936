import os
import random
import struct

import pytest

from tabmesh.mesh.frames import (
    HEADER, HEADER_SIZE, MAX_PAYLOAD, Kind, FrameError, Reassembler, decode_frame, encode_message,
)


def roundtrip(payload: bytes, max_frame: int, shuffle_seed: int | None = None) -> bytes:
    frames = encode_message(Kind.DATA, 7, payload, max_frame=max_frame)
    assert all(len(f) <= max_frame for f in frames)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(frames)
    r = Reassembler()
    out = None
    for i, f in enumerate(frames):
        got = r.add("peer", decode_frame(f))
        if i < len(frames) - 1:
            assert got is None
        else:
            out = got
    assert out is not None and out[0] == Kind.DATA and out[1] == 7
    assert r.pending == 0
    return out[2]


@pytest.mark.parametrize("size", [0, 1, 40, 1000, 65536, 1_000_003])
def test_roundtrip_sizes(size):
    payload = os.urandom(size)
    assert roundtrip(payload, 16 * 1024) == payload


def test_one_megabyte_out_of_order():
    payload = random.Random(1).randbytes(1 << 20)
    assert roundtrip(payload, 16 * 1024 + HEADER_SIZE, shuffle_seed=3) == payload


def test_header_layout_is_as_documented():
    (f,) = encode_message(Kind.PING, 0xDEADBEEF, b"abc")
    assert f[:2] == b"TM" and f[2] == 1 and f[3] == Kind.PING
    assert struct.unpack_from("<IIIII", f, 4) == (0xDEADBEEF, 0, 1, 3, 3)
    assert f[24:] == b"abc" and HEADER_SIZE == 24


def corrupt(field_index: int, value) -> bytes:
    (f,) = encode_message(Kind.DATA, 1, b"hello")
    fields = list(HEADER.unpack_from(f))
    fields[field_index] = value
    return HEADER.pack(*fields) + f[HEADER_SIZE:]


@pytest.mark.parametrize("data, needle", [
    (b"", "shorter"),
    (b"TM\x01", "shorter"),
    (corrupt(0, b"XX"), "magic"),
    (corrupt(1, 9), "version"),
    (corrupt(2, 200), "kind"),
    (corrupt(4, 5), "chunk_index"),
    (corrupt(5, 0), "chunk_count"),
    (corrupt(6, MAX_PAYLOAD + 1), "total_len"),
    (corrupt(7, 4), "chunk_len"),
    (corrupt(6, 9), "single-chunk"),
])
def test_malformed_frames_are_rejected(data, needle):
    with pytest.raises(FrameError, match=needle):
        decode_frame(data)


def test_inconsistent_and_duplicate_chunks_drop_the_message():
    frames = encode_message(Kind.DATA, 5, os.urandom(100), max_frame=HEADER_SIZE + 30)
    r = Reassembler()
    r.add("a", decode_frame(frames[0]))
    with pytest.raises(FrameError, match="duplicate"):
        r.add("a", decode_frame(frames[0]))
    assert r.pending == 0
    r.add("a", decode_frame(frames[0]))
    liar = encode_message(Kind.ECHO, 5, os.urandom(100), max_frame=HEADER_SIZE + 30)[1]
    with pytest.raises(FrameError, match="contradicts"):
        r.add("a", decode_frame(liar))
    assert r.pending == 0


def test_senders_do_not_mix_and_limits_hold():
    t = [0.0]
    r = Reassembler(max_partials=2, max_buffered=100, timeout_s=5, clock=lambda: t[0])
    fa = encode_message(Kind.DATA, 1, b"a" * 60, max_frame=HEADER_SIZE + 30)
    fb = encode_message(Kind.DATA, 1, b"b" * 60, max_frame=HEADER_SIZE + 30)
    assert r.add("A", decode_frame(fa[0])) is None
    assert r.add("B", decode_frame(fb[0])) is None
    with pytest.raises(FrameError, match="in flight"):
        r.add("C", decode_frame(fa[0]))
    assert r.add("A", decode_frame(fa[1])) == (Kind.DATA, 1, b"a" * 60)
    assert r.add("B", decode_frame(fb[1])) == (Kind.DATA, 1, b"b" * 60)
    big = encode_message(Kind.DATA, 2, b"x" * 300, max_frame=HEADER_SIZE + 60)
    for f in big[:1]:
        r.add("A", decode_frame(f))
    with pytest.raises(FrameError, match="buffer"):
        r.add("A", decode_frame(big[1]))
    r.add("A", decode_frame(fa[0]))
    t[0] = 10.0
    assert r.expire() == 1 and r.pending == 0


def test_fuzz_never_raises_anything_but_frame_error():
    rng = random.Random(42)
    good = encode_message(Kind.DATA, 3, rng.randbytes(500), max_frame=HEADER_SIZE + 100)
    r = Reassembler()
    for _ in range(3000):
        f = bytearray(rng.choice(good))
        for _ in range(rng.randint(1, 4)):
            if f and rng.random() < 0.7:
                f[rng.randrange(len(f))] = rng.randrange(256)
            else:
                f = f[:rng.randrange(len(f) + 1)]
        try:
            r.add(rng.choice("xy"), decode_frame(f))
        except FrameError:
            pass
