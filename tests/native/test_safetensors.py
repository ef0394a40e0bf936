"""The safetensors reader: round trips, and a hostile file refused with a message that
names the problem (every check in the module docstring has a case here)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from tabmesh.errors import TabmeshError
from tabmesh.rag.safetensors import (MAX_HEADER_BYTES, SafetensorsError, SafetensorsFile,
                                     header_size, read_safetensors_path)

MODEL = Path(__file__).resolve().parents[2] / "models" / "all-MiniLM-L6-v2" / "model.safetensors"


def pack(header: dict | bytes, data: bytes = b"", pad_to: int = 8) -> bytes:
    """A safetensors file: u64 header length, header (space-padded), data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw += b" " * (-len(raw) % pad_to)
    return struct.pack("<Q", len(raw)) + raw + data


def build(tensors: dict[str, np.ndarray | tuple[str, list[int], bytes]],
          metadata: dict | None = None) -> bytes:
    """Tensors laid out back to back in the given order."""
    header: dict = {"__metadata__": metadata} if metadata is not None else {}
    data = b""
    names = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("<i8"): "I64",
             np.dtype("u1"): "U8"}
    for name, t in tensors.items():
        if isinstance(t, np.ndarray):
            dtype, shape, raw = names[t.dtype], list(t.shape), t.tobytes()
        else:
            dtype, shape, raw = t
        header[name] = {"dtype": dtype, "shape": shape,
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    return pack(header, data)


def two_f32(a_offsets=(0, 16), b_offsets=(16, 32), data_len=32) -> bytes:
    return pack({"a": {"dtype": "F32", "shape": [4], "data_offsets": list(a_offsets)},
                 "b": {"dtype": "F32", "shape": [4], "data_offsets": list(b_offsets)}},
                bytes(range(data_len)))


def refused(buf: bytes, match: str) -> SafetensorsError:
    with pytest.raises(SafetensorsError, match=match) as e:
        SafetensorsFile(buf)
    return e.value


# ----- reading -----

def test_round_trip_dtypes_and_metadata():
    rng = np.random.default_rng(0)
    f32 = rng.standard_normal((3, 5)).astype("<f4")
    f16 = rng.standard_normal(7).astype("<f2")
    i64 = np.arange(12, dtype="<i8").reshape(1, 12)
    bf16_values = np.array([1.0, -2.5, 0.15625, 2.0**100, -0.0], dtype=np.float32)
    bf16_raw = (bf16_values.view(np.uint32) >> 16).astype("<u2").tobytes()  # exact in bf16
    st = SafetensorsFile(build({"f16": f16, "bf16": ("BF16", [5], bf16_raw), "f32": f32,
                                "ids": i64, "empty": ("F32", [0, 3], b"")},
                               metadata={"format": "pt"}))
    assert st.metadata == {"format": "pt"}
    assert sorted(st.keys()) == ["bf16", "empty", "f16", "f32", "ids"]
    np.testing.assert_array_equal(st.tensor("f32"), f32)
    np.testing.assert_array_equal(st.tensor("f16"), f16)
    assert st.tensor("f16").dtype == np.float16
    np.testing.assert_array_equal(st.tensor("ids"), i64)
    np.testing.assert_array_equal(st.tensor("bf16"), bf16_values)
    assert st.tensor("empty").shape == (0, 3)
    for name in ("f32", "f16", "bf16"):
        out = st.float32(name)
        assert out.dtype == np.float32 and out.flags.c_contiguous
    with pytest.raises(SafetensorsError, match="is I64, expected one of"):
        st.float32("ids")
    with pytest.raises(SafetensorsError, match="no tensor named 'nope'"):
        st.tensor("nope")
    assert "f32" in st and "nope" not in st
    assert st.raw("f16").nbytes == 14


def test_unaligned_tensor_is_copied_not_misread():
    # a U8 tensor of 1 byte first puts the F32 data at an odd offset
    f32 = np.array([1.5, -2.0], dtype="<f4")
    st = SafetensorsFile(build({"byte": np.array([7], dtype="u1"), "f": f32}))
    np.testing.assert_array_equal(st.tensor("f"), f32)


def test_f8_parses_but_does_not_convert():
    st = SafetensorsFile(build({"q": ("F8_E4M3", [4], b"\0\1\2\3")}))
    with pytest.raises(SafetensorsError, match="no numpy equivalent"):
        st.tensor("q")


def test_read_from_path_and_header_size(tmp_path):
    buf = build({"w": np.ones((2, 2), dtype="<f4")})
    p = tmp_path / "m.safetensors"
    p.write_bytes(buf)
    st = read_safetensors_path(str(p))
    np.testing.assert_array_equal(st.tensor("w"), np.ones((2, 2)))
    assert header_size(buf[:8]) == st.data_start
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(SafetensorsError, match="empty"):
        read_safetensors_path(str(tmp_path / "empty.safetensors"))


def test_the_minilm_file():
    if not MODEL.exists():
        pytest.skip(f"{MODEL} is absent: the repo setup downloads it")
    st = read_safetensors_path(str(MODEL))
    assert len(st.keys()) == 16 * 6 + 6 + 2  # layers, embeddings (and position_ids), pooler
    assert st.tensor("embeddings.word_embeddings.weight").shape == (30522, 384)
    assert st.entries["embeddings.position_ids"].dtype == "I64"


# ----- hostile files -----

def test_too_short_for_the_length_field():
    refused(b"\x10\x00\x00", "file too short")
    refused(b"", "file too short")


def test_header_length_past_the_end():
    buf = two_f32()
    refused(buf[:20], "file truncated: the header needs")
    refused(struct.pack("<Q", 1000) + b"{}", "file truncated")


def test_header_length_absurd():
    refused(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}", "exceeds the")
    refused(struct.pack("<Q", 2**64 - 1) + b"{}", "exceeds the")


def test_header_not_json_object():
    refused(pack(b"[1, 2]"), "starting with '{'")
    refused(pack(b"{not json"), "not UTF-8 JSON")
    refused(pack(b'{"a": "\xff\xfe"}'), "not UTF-8 JSON")
    refused(struct.pack("<Q", 4) + b"{} x", "not UTF-8 JSON")


def test_truncated_data():
    buf = two_f32()
    refused(buf[:-1], "run past the end of the data")
    refused(buf[:-16], "run past the end")


def test_offsets_out_of_bounds():
    refused(two_f32(b_offsets=(1 << 40, (1 << 40) + 16)), "run past the end")


def test_overlapping_tensors():
    e = refused(two_f32(a_offsets=(0, 16), b_offsets=(8, 24), data_len=24), "overlaps tensor 'a'")
    assert "'b'" in str(e)
    refused(two_f32(a_offsets=(0, 16), b_offsets=(0, 16), data_len=16), "overlaps")


def test_holes_and_trailing_bytes():
    refused(two_f32(a_offsets=(0, 16), b_offsets=(20, 36), data_len=36), "a hole of 4 bytes")
    refused(two_f32(data_len=40), "trailing bytes")


def test_size_must_match_shape():
    buf = pack({"a": {"dtype": "F32", "shape": [5], "data_offsets": [0, 16]}}, bytes(16))
    refused(buf, r"tensor 'a': 16 bytes .* needs 20")
    # a huge shape whose product would overflow a C size_t is still just a mismatch
    buf = pack({"a": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 16]}}, bytes(16))
    refused(buf, "needs")


@pytest.mark.parametrize("entry, match", [
    ({"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}, "unknown dtype"),
    ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, "shape must be"),
    ({"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}, "shape must be"),
    ({"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}, "shape must be"),
    ({"dtype": "F32", "shape": "1", "data_offsets": [0, 4]}, "shape must be"),
    ({"dtype": "F32", "shape": [1] * 17, "data_offsets": [0, 4]}, "shape must be"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [0]}, "data_offsets must be"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}, "data_offsets must be"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}, "begin 4 > end 0"),
    ({"dtype": "F32", "shape": [1]}, "data_offsets must be"),
    ("not an object", "entry must be an object"),
])
def test_malformed_entries(entry, match):
    refused(pack({"t": entry}, bytes(4)), match)


def test_bad_metadata_and_duplicate_names():
    refused(pack({"__metadata__": {"k": 1}}), "__metadata__ must map strings to strings")
    refused(pack({"__metadata__": []}), "__metadata__")
    raw = (b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, '
           b'"a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}')
    refused(pack(raw, b"\0\0"), "names 'a' twice")


def test_error_is_a_tabmesh_error_and_crosses_the_wire():
    e = refused(b"", "too short")
    assert isinstance(e, TabmeshError) and e.code == "bad_safetensors"
    back = TabmeshError.from_dict(e.to_dict())
    assert type(back) is SafetensorsError and str(back) == str(e)


def test_empty_file_with_no_tensors_is_fine():
    st = SafetensorsFile(pack({}))
    assert st.keys() == [] and st.metadata == {}
