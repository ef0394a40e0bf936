"""numerics="ggml" on WebGPU (gpu/ggml_ops.py, wgsl/ggml_*.wgsl) against the numpy statement of
llama.cpp's arithmetic (model/ggml_numerics.py, itself bit-exact with llama.cpp:
test_ggml_numerics.py). Every comparison is for equality, not closeness: the point of these
kernels is to round where llama.cpp rounds. Native wgpu (lavapipe in CI, whose fma is not
fused: the emulated fma is what runs there)."""

from __future__ import annotations

import numpy as np
import pytest

from tabmesh.gguf import read_gguf_path
from tabmesh.gpu.ggml_ops import GgmlOps, probe_inputs
from tabmesh.gpu.reference import Q4_1, Q8_0
from tabmesh.model import ggml_numerics as g
from tabmesh.model.config import LlamaConfig

from test_model_gpu import smol_path  # noqa: F401 (fixture)
from test_model_numpy import q8_0_path, smollm2  # noqa: F401 (fixtures: our Q8_0 re-quantization)


@pytest.fixture(scope="module")
def gops(gpu, arun):
    return arun(GgmlOps.create(gpu))


def run(gpu, arun, record, out: "Buffer", n: int, dtype=np.float32) -> np.ndarray:  # noqa: F821
    b = gpu.batch("t")
    record(b)
    r = b.read(out, 0, 4 * n)
    return np.frombuffer(arun(b.run())[r], dtype).copy()


def activations(rng, shape, spread=3.0) -> np.ndarray:
    """Rows like a transformer's: mostly small, a few large outliers."""
    x = rng.standard_normal(shape) * np.exp(rng.uniform(-spread, spread, shape[:-1] + (1,)))
    x[..., rng.integers(0, shape[-1], 3)] *= 20
    return x.astype(np.float32)


def test_probe_finds_the_adapter_exact_enough(gpu, arun, gops):
    assert set(gops.arithmetic) == {"FUSED_FMA", "EXACT_DIV", "EXACT_SQRT"}
    # the emulations themselves, forced on: exact here too (NVIDIA needs div_x; lavapipe fma_x)
    abc = probe_inputs()
    got = arun(GgmlOps._run_probe(gpu, abc, {"FUSED_FMA": False, "EXACT_DIV": False, "EXACT_SQRT": False}))
    a, b, c = abc[:, 0], abc[:, 1], abc[:, 2]
    np.testing.assert_array_equal(got[:, 3], (a.astype(np.float64) * b + c.astype(np.float64)).astype(np.float32))
    np.testing.assert_array_equal(got[:, 4], a / b)
    np.testing.assert_array_equal(got[:, 5], np.sqrt(np.abs(a)))
    abc = probe_inputs()
    a, b, c = (abc[:, i].astype(np.float64) for i in range(3))
    fused = (a * b + c).astype(np.float32)
    unfused = abc[:, 0] * abc[:, 1] + abc[:, 2]
    assert (fused != unfused).mean() > 0.3  # the probe can tell a fused fma from an unfused one


def test_rmsnorm_equal(gpu, arun, gops):
    rng = np.random.default_rng(1)
    x = activations(rng, (9, 576))
    w = (rng.standard_normal(576) * 0.3 + 1).astype(np.float32)
    bx, bw, by = gpu.upload(x.reshape(-1)), gpu.upload(w), gpu.create_buffer(x.nbytes)
    got = run(gpu, arun, lambda b: gops.rmsnorm(b, bx, bw, by, n_rows=9, n=576, eps=1e-5), by, x.size)
    want = g.rmsnorm(x, w, 1e-5).reshape(-1)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("qtype", [Q4_1, Q8_0])
def test_quantize_equal(gpu, arun, gops, qtype):
    rng = np.random.default_rng(2)
    x = activations(rng, (7, 576))
    x[0, :32] = 0  # an all-zero block: d = 0, id = 0
    x[1, :32] = np.float32(0.5) * np.arange(-16, 16, dtype=np.float32) / np.float32(127 / 16)  # ties
    nb = 576 // 32
    bx, bq, bd = gpu.upload(x.reshape(-1)), gpu.create_buffer(7 * nb * 32), gpu.create_buffer(7 * nb * 8)

    def record(b):
        gops.quantize(b, bx, bq, bd, n_rows=7, k=576, qtype=qtype)

    quants = run(gpu, arun, record, bq, 7 * nb * 8, np.uint32).view(np.int8).reshape(7, nb, 32)
    ds = run(gpu, arun, record, bd, 7 * nb * 2).reshape(7, nb, 2)
    want = (g.quantize_row_q8_1 if qtype == Q4_1 else g.quantize_row_q8_0)(x)
    np.testing.assert_array_equal(ds[..., 0], want.d)
    np.testing.assert_array_equal(quants, want.q)
    np.testing.assert_array_equal(ds[..., 1], want.s if qtype == Q4_1 else 0)


@pytest.mark.parametrize("name,n_tokens", [("blk.0.attn_q.weight", 1), ("blk.3.ffn_down.weight", 3),
                                           ("token_embd.weight", 1)])
def test_matmul_equal_on_the_model_matrices(gpu, arun, gops, smol_path, name, n_tokens):  # noqa: F811
    gguf = read_gguf_path(smol_path)
    info = gguf.tensors[name]
    assert info.ggml_type in (Q4_1, Q8_0)
    with open(smol_path, "rb") as f:
        f.seek(info.offset)
        raw = f.read(info.nbytes)
    rows, k = info.np_shape
    if name == "token_embd.weight":  # 49152 rows: a slice of whole rows keeps the test quick
        rows = 4096
        raw = raw[:rows * (k // 32) * 34]
    wq = g.QMatrix.from_raw(info.ggml_type, raw, (rows, k), name)
    rng = np.random.default_rng(3)
    x = activations(rng, (n_tokens, k))
    prev = rng.standard_normal((n_tokens, rows)).astype(np.float32)
    quants, scales = GgmlOps.repack(raw, info.ggml_type, rows, k)
    bw, bs, bx = gpu.upload(quants), gpu.upload(scales), gpu.upload(x.reshape(-1))
    nb = k // 32
    bq, bd = gpu.create_buffer(n_tokens * nb * 32), gpu.create_buffer(n_tokens * nb * 8)
    by = gpu.upload(prev.reshape(-1))

    def record(b):
        gops.quantize(b, bx, bq, bd, n_rows=n_tokens, k=k, qtype=info.ggml_type)
        gops.matmul(b, bw, bs, bq, bd, by, qtype=info.ggml_type, rows=rows, k=k, n_tokens=n_tokens,
                    y_stride=rows, accumulate=True)

    got = run(gpu, arun, record, by, n_tokens * rows).reshape(n_tokens, rows)
    np.testing.assert_array_equal(got, wq.matmul(x) + prev)


@pytest.mark.parametrize("n_tokens,pos0", [(1, 0), (1, 37), (6, 0), (5, 20)])
def test_rope_and_attention_equal(gpu, arun, gops, smol_path, n_tokens, pos0):  # noqa: F811
    cfg = LlamaConfig.from_gguf(read_gguf_path(smol_path))
    H, KV, hd, ctx = cfg.n_head, cfg.n_head_kv, cfg.head_dim, 64
    q_dim, kv_dim = H * hd, KV * hd
    stride = q_dim + 2 * kv_dim
    rng = np.random.default_rng(4 + pos0 + n_tokens)
    cos, sin = g.rope_tables(cfg, 0, ctx)
    tab = np.concatenate([cos.reshape(-1), sin.reshape(-1)])
    # the cache already holds positions < pos0 (f16 values), as a previous call left them
    k_old = g.f16_round(activations(rng, (pos0, KV, hd)))
    v_old = g.f16_round(activations(rng, (pos0, KV, hd)))
    cache = np.zeros((2, KV, ctx, hd), np.float32)
    cache[0, :, :pos0] = k_old.transpose(1, 0, 2)
    cache[1, :, :pos0] = v_old.transpose(1, 0, 2)
    qkv = activations(rng, (n_tokens, stride), spread=1.0)
    bqkv, btab, bcache = gpu.upload(qkv.reshape(-1)), gpu.upload(tab), gpu.upload(cache.reshape(-1))
    bout = gpu.create_buffer(n_tokens * q_dim * 4)

    def record(b):
        gops.rope_kv(b, bqkv, bcache, btab, tab_n=ctx, n_tokens=n_tokens, n_heads=H, n_kv_heads=KV,
                     head_dim=hd, n_rot=cfg.n_rot, pos0=pos0, ctx=ctx, qkv_stride=stride, neox=cfg.rope_neox)
        gops.attention(b, bqkv, bcache, bout, n_tokens=n_tokens, n_heads=H, n_kv_heads=KV, head_dim=hd,
                       pos0=pos0, ctx=ctx, q_stride=stride)

    got = run(gpu, arun, record, bout, n_tokens * q_dim).reshape(n_tokens, H, hd)
    c, s = g.rope_tables(cfg, pos0, n_tokens)
    q = g.rope(qkv[:, :q_dim].reshape(n_tokens, H, hd), c, s, cfg.rope_neox)
    k = g.f16_round(g.rope(qkv[:, q_dim:q_dim + kv_dim].reshape(n_tokens, KV, hd), c, s, cfg.rope_neox))
    v = g.f16_round(qkv[:, q_dim + kv_dim:].reshape(n_tokens, KV, hd))
    want = g.attention(q, np.concatenate([k_old, k]), np.concatenate([v_old, v]), pos0)
    np.testing.assert_array_equal(got, want)


def test_swiglu_equal(gpu, arun, gops):
    rng = np.random.default_rng(5)
    n = 1536
    gu = activations(rng, (3, 2 * n), spread=2.0)
    gu[0, :4] = [-95.0, -88.5, 90.0, 0.0]  # exp overflow (a zero out), its edge, large gates
    bgu, bout = gpu.upload(gu.reshape(-1)), gpu.create_buffer(3 * n * 4)
    got = run(gpu, arun, lambda b: gops.swiglu(b, bgu, bout, n_tokens=3, n=n), bout, 3 * n).reshape(3, n)
    with np.errstate(over="ignore"):
        want = g.swiglu(gu[:, :n], gu[:, n:])
    np.testing.assert_array_equal(got, want)


# -- the whole model ----------------------------------------------------------------------------

CASES = [("Q4_1", "short"), ("Q4_1", "code"), ("Q8_0", "short")]  # "code": a near-tie for f32 numerics


@pytest.fixture(scope="module")
def ggml_model(gpu, arun, smol_path, q8_0_path):  # noqa: F811
    """quant -> the whole model on the GPU in ggml numerics, one in memory at a time."""
    from tabmesh.model.llama_gpu import GPULlama, file_fetcher

    paths, held = {"Q4_1": smol_path, "Q8_0": q8_0_path}, {}

    def get(quant: str) -> GPULlama:
        if quant not in held:
            held.clear()
            path = paths[quant]
            held[quant] = arun(GPULlama.load(gpu, read_gguf_path(path), file_fetcher(path), n_ctx=96,
                                             max_batch=64, numerics="ggml"))
        assert held[quant].numerics == "ggml"
        return held[quant]

    return get


@pytest.mark.skipif(g._libm() is None, reason="exact RoPE angles need the C library's sincosf (glibc)")
@pytest.mark.parametrize("quant,name", CASES)
def test_whole_model_logits_and_32_greedy_tokens_equal_llama_cpp(ggml_model, arun, quant, name):
    """SmolLM2 (the shipped Q4_1, and our Q8_0 of it) on WebGPU in ggml numerics: the prompt's
    last logits equal llama.cpp's (top-20 and 128 probe ids: error 0.0) and 32 free-running
    greedy tokens are llama.cpp's."""
    import json
    from pathlib import Path

    fx = json.loads((Path(__file__).resolve().parents[1] / "fixtures" / f"model_{quant.lower()}.json").read_text())
    p = next(p for p in fx["prompts"] if p["name"] == name)
    tokens = p["tokens"]
    model = ggml_model(quant)
    logits = arun(model.forward(tokens, 0, output="logits"))
    last = next(r for r in p["positions"] if r["pos"] == len(tokens) - 1)
    np.testing.assert_array_equal(logits[last["top_ids"]], np.float32(last["top_logits"]))
    np.testing.assert_array_equal(logits[fx["probe_ids"]], np.float32(last["probe_logits"]))
    assert arun(model.generate_greedy(tokens, 32)) == p["greedy"]["tokens"]
