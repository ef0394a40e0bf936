"""llama.cpp's CPU arithmetic in numpy (tabmesh.model.ggml_numerics, NumpyLlama(numerics="ggml")).

Three levels, each against llama.cpp itself (llama-cpp-python 0.3.36, x86-64 AVX-512 build):

- Building blocks, bit for bit, against ggml's own functions called on fixed inputs
  (tests/fixtures/ggml_numerics.json, scripts/make_ggml_numerics_fixtures.py):
  quantize_row_q8_0 / q8_1 (the AVX path the CPU backend runs, and the scalar *_ref, which
  round differently: 10 of the 584 blocks tell them apart), ggml_vec_dot_q4_1_q8_1 /
  q8_0_q8_0, ggml_vec_dot_f16, ggml_vec_soft_max_f32 (ggml_v_expf), ggml_vec_swiglu_f32.
  Plus gguf-py's Q8_0 quantizer (= quantize_row_q8_0_ref) and hand-worked blocks.
- The whole model, SmolLM2-135M Q4_1 and its Q8_0 re-quantization, against
  model_q4_1.json / model_q8_0.json (scripts/make_model_fixtures.py): the logits at every
  recorded prompt position (top-20 and 128 probe ids; the whole last row, stored as f16)
  and at every greedy step (top-5) are EQUAL to llama.cpp's, not close: max abs error 0.0 on
  all 4 prompts x 2 quants, and the 32 free-running greedy tokens equal llama.cpp's
  (where f32 numerics part from them at near-ties: test_model_numpy.GREEDY_NEAR_TIES).
  ggml numerics are slow (every quantized dot product is emulated lane by lane: ~0.25 s
  of CPU per decoded token, ~0.2 s per prompt token, 4x and 20x f32): by default the two
  shortest prompts per quant run (short, code: ~1.5 min for this file on the shared 2-core
  machine); TABMESH_HEAVY=1 adds chat and long (~5 min for the file).
- Pipeline stages in ggml numerics give the whole model's logits exactly.

Exactness needs ggml's sincosf, i.e. the C library's: the model tests run where that is
glibc (elsewhere one RoPE angle an ulp off is enough to move an 8-bit rounding, and the
difference grows through the layers).
"""

from __future__ import annotations

import base64
import os
import platform

import numpy as np
import pytest

from tabmesh.model import ggml_numerics as g
from tabmesh.model.llama_numpy import NumpyLlama
from tabmesh.model.weights import weights_from_path
from tabmesh.quants import GGMLType
from test_model_numpy import (_one_blas_thread, load_fixture, q8_0_path,  # noqa: F401 (fixtures)
                              smollm2)

HEAVY = os.environ.get("TABMESH_HEAVY") == "1"
DEFAULT_PROMPTS = ("short", "code")  # the two shortest (5 and 25 prompt tokens)
PROMPTS = ["short", "chat", "code", "long"]


def b64(s: str, dtype) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), dtype)


@pytest.fixture(scope="module")
def ggml_fx() -> dict:
    return load_fixture("ggml_numerics.json")


# -- activation quantizers -------------------------------------------------------------------

@pytest.mark.parametrize("quantize,block_bytes", [(g.quantize_row_q8_0, 34), (g.quantize_row_q8_1, 36)])
@pytest.mark.parametrize("variant", ["x86", "ref"])
def test_quantizers_bit_exact_with_ggml(ggml_fx, quantize, block_bytes, variant):
    k, n = ggml_fx["k"], ggml_fx["n_rows"]
    x = b64(ggml_fx["x_f32"], np.float32).reshape(n, k)
    name = quantize.__name__ + ("_ref" if variant == "ref" else "")
    want = b64(ggml_fx[name], np.uint8).reshape(n, k // 32, block_bytes)
    ours = quantize(x, variant).to_bytes()
    bad = np.flatnonzero((ours != want).any(axis=-1))
    assert bad.size == 0, (f"{name}: {bad.size} blocks differ, the first at (row, block) "
                           f"{divmod(int(bad[0]), k // 32)}")
    other = quantize(x, "ref" if variant == "x86" else "x86").to_bytes()
    assert (other != want).any(axis=-1).sum() >= 8  # the fixture tells the two roundings apart


def test_q8_0_ref_bit_exact_with_gguf_py(ggml_fx):
    gq = pytest.importorskip("gguf.quants", reason="gguf-py is a reference (pip install gguf)")
    from gguf import GGMLQuantizationType

    k, n = ggml_fx["k"], ggml_fx["n_rows"]
    x = b64(ggml_fx["x_f32"], np.float32).reshape(n, k)
    x = x[np.isfinite(g.quantize_row_q8_0(x).d).all(axis=1)]  # gguf-py refuses an f16 overflow
    want = np.asarray(gq.quantize(x, GGMLQuantizationType.Q8_0)).view(np.uint8).reshape(len(x), -1, 34)
    assert np.array_equal(g.quantize_row_q8_0(x, "ref").to_bytes(), want)


def test_quantizers_hand_worked():
    # amax 127: d = 1 and 127/amax = 1/d = 1, so x * id is x; the halves are exact ties
    x = np.zeros(32, np.float32)
    x[:8] = [127, 2.5, -2.5, 3.5, -3.5, 0.5, -0.5, 1.5]
    avx, ref = g.quantize_row_q8_1(x, "x86"), g.quantize_row_q8_1(x, "ref")
    assert avx.q[0, :8].tolist() == [127, 2, -2, 4, -4, 0, 0, 2]  # ties to even (vroundps)
    assert ref.q[0, :8].tolist() == [127, 3, -3, 4, -4, 1, -1, 2]  # roundf: away from zero
    assert avx.d[0] == ref.d[0] == 1.0 and avx.s[0] == ref.s[0] == 129.0
    # s = f16(d * sum) with the float32 d = 1/127, not f16(d) = 0.00787353515625
    x = np.full(32, np.float32(31 / 127), np.float32)
    x[0] = 1.0
    a = g.quantize_row_q8_1(x)
    assert a.q[0].tolist() == [127] + [31] * 31 and a.d[0] == np.float32(0.00787353515625)
    assert a.s[0] == 8.5703125  # f16(0.007874016 * 1088 = 8.56693); f16(d) * 1088 = 8.5664 -> 8.5625
    # an all-zero block: d = 0, id = 0, q = 0
    z = g.quantize_row_q8_1(np.zeros(64, np.float32))
    assert not z.q.any() and not z.d.any() and not z.s.any()
    assert g.quantize_row_q8_0(x).to_bytes().shape == (1, 34)


def test_f16_round_is_ties_to_even():
    assert g.f16_round(np.float32([1 + 2 ** -11, 1 + 3 * 2 ** -11, 65520.0, -1e-8])).tolist() == \
        [1.0, 1 + 2 ** -9, np.inf, -0.0]


# -- dot products, softmax, SwiGLU ------------------------------------------------------------

@pytest.mark.parametrize("wtype,wkey,dkey", [(GGMLType.Q4_1, "w_q4_1", "vec_dot_q4_1_q8_1"),
                                             (GGMLType.Q8_0, "w_q8_0", "vec_dot_q8_0_q8_0")])
def test_quantized_dot_products_bit_exact(ggml_fx, wtype, wkey, dkey):
    k, n, n_w = ggml_fx["k"], ggml_fx["n_rows"], ggml_fx["n_weight_rows"]
    x = b64(ggml_fx["x_f32"], np.float32).reshape(n, k)
    w = g.QMatrix.from_raw(wtype, b64(ggml_fx[wkey], np.uint8), (n_w, k))
    with np.errstate(invalid="ignore", over="ignore"):  # one row's d overflows f16, on purpose
        ours = w.matmul(x).T  # (n_w, n)
    want = b64(ggml_fx[dkey], np.float32).reshape(n_w, n)
    assert np.array_equal(ours, want, equal_nan=True)
    with np.errstate(invalid="ignore", over="ignore"):
        plain = (x @ w.dequantize().T).T  # the float32 product: close, not equal
    ok = np.isfinite(want)
    assert not np.array_equal(plain[ok], want[ok])


@pytest.mark.parametrize("n", ["64", "256"])
def test_f16_dot_bit_exact(ggml_fx, n):
    e = ggml_fx["vec_dot_f16"][n]
    x = b64(e["x_f16"], np.float16).reshape(-1, int(n)).astype(np.float32)
    y = b64(e["y_f16"], np.float16).reshape(-1, int(n)).astype(np.float32)
    want = b64(e["dot_f32"], np.float32)
    assert np.array_equal(g.lane_dot(x, y, 64), want)  # ggml_vec_dot_f16: decode
    assert not np.array_equal(g.lane_dot(x, y, 16), want)  # tinyBLAS's 16 lanes: prefill


def test_softmax_bit_exact(ggml_fx):
    sm = ggml_fx["soft_max"]
    x = b64(sm["x_f32"], np.float32).reshape(16, 256)
    y = b64(sm["y_f32"], np.float32).reshape(16, 256)  # exp(x - max), before the scaling
    total = b64(sm["sum_f64"], np.float64)
    assert np.array_equal(g.v_expf(x - x.max(axis=1, keepdims=True)), y)
    assert not np.array_equal(np.exp(x - x.max(axis=1, keepdims=True)), y)
    assert np.array_equal(g.softmax(x), y * (1.0 / total[:, None]).astype(np.float32))


def test_swiglu_bit_exact(ggml_fx):
    sw = ggml_fx["swiglu"]
    gate, up = b64(sw["g_f32"], np.float32), b64(sw["u_f32"], np.float32)
    assert np.array_equal(g.swiglu(gate, up), b64(sw["y_f32"], np.float32))


def test_halving_sum_pairs():
    x = np.float32([1e8, 1, -1e8, 1, 0, 0, 0, 0])
    assert g.halving_sum(x) == 2.0  # ((1e8 + 0) + (-1e8 + 0)) + ((1 + 0) + (1 + 0))
    assert np.cumsum(x)[-1] == 1.0  # in order, float32: 1e8 + 1 == 1e8
    with pytest.raises(ValueError, match="power-of-two"):
        g.halving_sum(np.zeros(6, np.float32))


# -- the model ---------------------------------------------------------------------------------

needs_glibc = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc" or g._libm() is None,
    reason="exact RoPE angles need the C library's sincosf, and the fixtures come from glibc's")


@pytest.fixture(scope="module")
def q4_1_ggml(smollm2):
    return g.ggml_weights_from_path(smollm2)


@pytest.fixture(scope="module")
def ggml_models(smollm2, q8_0_path):
    """quant -> NumpyLlama in ggml numerics; one model in memory at a time (~0.6 GB)."""
    paths, held = {"Q4_1": smollm2, "Q8_0": q8_0_path}, {}

    def get(quant: str) -> NumpyLlama:
        if quant not in held:
            held.clear()
            held[quant] = NumpyLlama.from_path(paths[quant], n_ctx=512, numerics="ggml")
        model = held[quant]
        model.reset()
        return model

    return get


def test_numerics_option(q4_1_ggml, smollm2):
    cfg, _, weights = q4_1_ggml
    with pytest.raises(ValueError, match="numerics must be one of"):
        NumpyLlama(cfg, weights, numerics="f16")
    _, _, floats = weights_from_path(smollm2, range(0, 1))
    with pytest.raises(ValueError, match="ggml_weights_from_path"):
        NumpyLlama(cfg, floats, numerics="ggml")
    assert NumpyLlama(cfg, weights.select(range(0, 1), cfg.n_layers), numerics="ggml").numerics == "ggml"
    # the matrices keep their types; dequantized, they are the f32 loader's arrays
    b = weights.blocks[0]
    assert (b.wq.ggml_type, weights.output.ggml_type) == (GGMLType.Q4_1, GGMLType.Q8_0)
    assert np.array_equal(b.wq.dequantize(), floats.blocks[0].wq)
    assert np.array_equal(weights.output.dequantize(), floats.tok_embd)


def model_cases():
    for quant in ("Q4_1", "Q8_0"):
        for name in PROMPTS:
            skip = not HEAVY and name not in DEFAULT_PROMPTS
            yield pytest.param(quant, name, marks=pytest.mark.skipif(
                skip, reason="chat and long run with TABMESH_HEAVY=1 (ggml numerics: ~0.3 s a token)"))


@needs_glibc
@pytest.mark.parametrize("quant,name", list(model_cases()))
def test_logits_and_greedy_equal_llama_cpp(ggml_models, quant, name):
    """The prompt's logits and 32 free-running greedy steps, as generate_greedy runs them
    (prefill at 0, then one token per forward), all compared for equality."""
    fx = load_fixture(f"model_{quant.lower()}.json")
    p = next(p for p in fx["prompts"] if p["name"] == name)
    probes = fx["probe_ids"]
    model = ggml_models(quant)
    tokens, n = p["tokens"], len(p["tokens"])
    logits = model.forward(tokens, 0)  # (n, n_vocab): every row, for the recorded positions
    errors = {}
    for ref in p["positions"]:
        row = logits[ref["pos"]]
        errors[f"position {ref['pos']}"] = max(
            np.abs(row[ref["top_ids"]] - np.float32(ref["top_logits"])).max(),
            np.abs(row[probes] - np.float32(ref["probe_logits"])).max())
    full = b64(p["last_logits_f16"], "<f2").astype(np.float32)
    errors["last row (f16)"] = np.abs(g.f16_round(logits[n - 1]) - full).max()

    want = p["greedy"]["tokens"]
    ours, row = [], logits[n - 1]
    for i, step in enumerate(p["greedy"]["steps"]):
        ours.append(int(np.argmax(row)))
        if ours[-1] != want[i]:
            top = dict(zip(step["top_ids"], step["top_logits"]))
            pytest.fail(f"{quant} {name}: greedy step {i} gives {ours[-1]} (logit {row[ours[-1]]:.6f}), "
                        f"llama.cpp {want[i]} (its logits {top}); ours so far {ours}")
        errors[f"greedy step {i}"] = np.abs(row[step["top_ids"]] - np.float32(step["top_logits"])).max()
        if i < len(want) - 1:
            row = model.forward([ours[-1]], n + i)[0]
    assert ours == want and len(ours) == 32
    worst = max(errors, key=errors.get)
    assert errors[worst] == 0.0, (f"{quant} {name}: logits not bit-exact, max abs error "
                                  f"{errors[worst]:.3e} at {worst}")
    if (quant, name) == ("Q4_1", "short"):  # the public entry point gives the same tokens
        assert ggml_models(quant).generate_greedy(tokens, 4) == want[:4]


@needs_glibc
def test_stages_equal_whole_model_in_ggml_numerics(q4_1_ggml):
    cfg, _, weights = q4_1_ggml
    tokens = load_fixture("model_q4_1.json")["prompts"][0]["tokens"]  # "short": 5 tokens
    whole = NumpyLlama(cfg, weights, n_ctx=64, numerics="ggml")
    stages = [NumpyLlama(cfg, weights.select(range(a, a + 10), cfg.n_layers), n_ctx=64,
                         numerics="ggml") for a in (0, 10, 20)]

    def staged(x, pos):
        for s in stages:
            x = s.forward(x, pos)
        return x

    logits = staged(tokens, 0)  # prefill, then one decode step through the three caches
    assert np.array_equal(logits, whole.forward(tokens, 0))
    tok = int(np.argmax(logits[-1]))
    assert np.array_equal(staged([tok], len(tokens)), whole.forward([tok], len(tokens)))
