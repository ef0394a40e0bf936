"""Each WGSL kernel against its numpy reference (tabmesh.gpu.reference) on lavapipe.

Random shapes (seeded) plus one fixed case per kernel. Tolerances, and why:
  * embed, add, kv_store: one rounding or none -> (near) exact.
  * matvec / matmul: f32 sums of k products in an order that differs from the float64
    reference. Worst case for recursive summation (Higham) is (k + 1) u sum|terms|; the
    kernels factor the block scales out (d * sum q x + m * sum x), so "terms" are the
    parts |d q| and |m| of each weight, not the weight: |err| <= (k + 4) eps32 * parts @ |x|.
  * rmsnorm: one sum of n squares, then inverseSqrt (2 ulp in Vulkan) -> rtol 2e-5.
  * rope: the angle pos * base^(-2i/n) is formed in f32 on the GPU (pow ~ few ulp, product
    1/2 ulp, 2 pi range reduction 1 ulp of theta), so the error grows with the position:
    atol = 2e-6 * (pos_max + 1) * max|x|.
  * attention: f32 dot products of head_dim terms, exp (a few ulp), online rescaling;
    outputs are convex combinations of V rows -> atol 2e-5 * max|v| + rtol 1e-4.
  * silu_mul: exp with 3 + 2|x| ulp -> rtol 1e-4.
"""

import math

import numpy as np
import pytest

from tabmesh.gpu import reference as ref
from tabmesh.gpu.ops import Ops
from tabmesh.gpu.reference import F16, F32, Q4_0, Q4_1, Q4_K, Q6_K, Q8_0

EPS32 = float(np.finfo(np.float32).eps)
MATRIX_TYPES = (Q4_0, Q4_1, Q8_0)  # matvec and matmul
K_TYPES = (Q4_K, Q6_K)  # matvec only


@pytest.fixture(scope="module", params=[False, True], ids=["gpu", "cpu"])
def ops(gpu, arun, request):
    """Ops with the GPU kernels, or with the CPU-adapter variants (cpu_kernels.py) where they exist
    (attention, argmax, rmsnorm); both run on any adapter."""
    return arun(Ops.create(gpu, head_dim=64, matrix_types=MATRIX_TYPES, embed_types=(F32, F16, Q4_0, Q4_1, Q8_0),
                           cpu_kernels=request.param))


@pytest.fixture(scope="module", params=[(1, False), (16, False), (1, True)], ids=["tpr1", "tpr16", "cpu"])
def mv_ops(gpu, arun, request):
    """Ops whose matvec kernels share each row among 1 or 16 threads (GPU kernels), or the
    CPU-adapter matvec (R rows per thread; K-quants and odd k fall back to TPR 1)."""
    tpr, cpu = request.param
    return arun(Ops.create(gpu, head_dim=64, matrix_types=MATRIX_TYPES + K_TYPES, embed_types=(),
                           matvec_tpr=tpr, cpu_kernels=cpu))


def f32buf(dev, a):
    return dev.upload(np.ascontiguousarray(a, np.float32))


def run_and_read(dev, arun, batch, buf, n, dtype=np.float32):
    batch.read(buf, 0, n * 4)
    (raw,) = arun(batch.run())
    return np.frombuffer(raw, dtype).copy()


def weight_parts(raw, qtype, rows, k):
    """|d q| + |m| per weight: the magnitudes the kernels actually sum (see module docstring)."""
    if qtype in (F32, F16, Q8_0, Q6_K):
        return np.abs(ref.dequantize(raw, qtype, (rows, k)))
    if qtype == Q4_K:  # d sc q - dmin m: dequantize with dmin = 0, then with d = 0
        blocks = np.frombuffer(raw, np.uint8).reshape(-1, 144)
        no_min, no_d = blocks.copy(), blocks.copy()
        no_min[:, 2:4] = 0
        no_d[:, 0:2] = 0
        return (np.abs(ref.dequantize(no_min.tobytes(), Q4_K, (rows, k)))
                + np.abs(ref.dequantize(no_d.tobytes(), Q4_K, (rows, k))))
    nbytes = ref.BLOCK[qtype][1]
    blocks = np.frombuffer(raw, np.uint8).reshape(-1, nbytes)
    d = np.abs(blocks[:, 0:2].copy().view(np.float16).astype(np.float64))
    qs = blocks[:, 4:] if qtype == Q4_1 else blocks[:, 2:]
    q = np.concatenate([qs & 0xF, qs >> 4], axis=1).astype(np.float64)
    if qtype == Q4_1:
        m = np.abs(blocks[:, 2:4].copy().view(np.float16).astype(np.float64))
        return (d * q + m).reshape(rows, k)
    return (d * (q + 8.0)).reshape(rows, k)


def matvec_tol(raw, qtype, rows, k, x):
    return (k + 4) * EPS32 * (weight_parts(raw, qtype, rows, k) @ np.abs(np.asarray(x, np.float64)).T).T


# -- quant formats: our numpy dequant is bit-exact with gguf-py -------------------------------

@pytest.mark.parametrize("qtype", [F16, Q4_0, Q4_1, Q8_0, Q4_K, Q6_K])
def test_reference_dequant_matches_gguf_py(qtype):
    gq = pytest.importorskip("gguf.quants")
    import gguf

    raw = ref.random_weights(np.random.default_rng(qtype), qtype, 3, 512)
    gtype = gguf.GGMLQuantizationType[ref.TYPE_NAMES[qtype].upper()]
    expect = gq.dequantize(np.frombuffer(raw, np.uint8).reshape(3, -1), gtype)
    np.testing.assert_array_equal(ref.dequantize(raw, qtype, (3, 512)), expect)


# -- embed -----------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", [F32, F16, Q4_0, Q4_1, Q8_0])
def test_embed_random(gpu, ops, arun, qtype):
    rng = np.random.default_rng(10 + qtype)
    vocab, dim = 37, 96  # odd vocab: Q8_0/Q4_0 rows start 2 bytes into a word on odd rows
    table = ref.random_weights(rng, qtype, vocab, dim, scale=1.0)
    ids = rng.integers(0, vocab, 9).astype(np.uint32)
    ids[:2] = [vocab - 1, 0]
    out = gpu.create_buffer((5 + 9 * dim) * 4)
    b = gpu.batch()
    ops.embed(b, gpu.upload(ids), gpu.upload(table), out, qtype=qtype, n_tokens=9, dim=dim, out_off=5)
    got = run_and_read(gpu, arun, b, out, 5 + 9 * dim)[5:].reshape(9, dim)
    # d * q (+ m) is one f32 rounding on both sides; a fused multiply-add may round once less.
    np.testing.assert_allclose(got, ref.embed(table, qtype, dim, ids), rtol=1e-6, atol=1e-7)


def test_embed_fixed_q8_0(gpu, ops, arun):
    # two rows of one block each: d = 0.5 then d = -2, q = -128..127 pattern
    q = np.arange(-128, 128, 8, dtype=np.int8)  # 32 values
    row = lambda d: np.float16(d).tobytes() + q.tobytes()  # noqa: E731
    table = row(0.5) + row(-2.0)
    out = gpu.create_buffer(3 * 32 * 4)
    b = gpu.batch()
    ops.embed(b, gpu.upload(np.array([1, 0, 1], np.uint32)), gpu.upload(table), out, qtype=Q8_0, n_tokens=3, dim=32)
    got = run_and_read(gpu, arun, b, out, 96).reshape(3, 32)
    np.testing.assert_array_equal(got, np.stack([-2.0 * q, 0.5 * q, -2.0 * q]).astype(np.float32))


# -- rmsnorm, silu_mul, add, argmax ----------------------------------------------------------

@pytest.mark.parametrize("rows,n", [(1, 576), (3, 100), (2, 1000)])
def test_rmsnorm(gpu, ops, arun, rows, n):
    rng = np.random.default_rng(n)
    x = rng.normal(0, 3, (rows, n)).astype(np.float32)
    w = rng.normal(1, 0.2, n).astype(np.float32)
    out = gpu.create_buffer(rows * n * 4)
    b = gpu.batch()
    ops.rmsnorm(b, f32buf(gpu, x), f32buf(gpu, w), out, n_rows=rows, n=n, eps=1e-5)
    got = run_and_read(gpu, arun, b, out, rows * n).reshape(rows, n)
    np.testing.assert_allclose(got, ref.rmsnorm(x, w, 1e-5), rtol=2e-5, atol=1e-6)


def test_rmsnorm_fixed(gpu, ops, arun):
    x = np.array([[3.0, -4.0] * 8], np.float32)  # mean square 12.5
    out = gpu.create_buffer(16 * 4)
    b = gpu.batch()
    ops.rmsnorm(b, f32buf(gpu, x), f32buf(gpu, np.full(16, 2.0)), out, n_rows=1, n=16, eps=0.0)
    got = run_and_read(gpu, arun, b, out, 16)
    np.testing.assert_allclose(got, x[0] / math.sqrt(12.5) * 2.0, rtol=2e-6)


def test_silu_mul(gpu, ops, arun):
    rng = np.random.default_rng(3)
    n_tokens, n = 3, 200
    gu = rng.normal(0, 4, (n_tokens, 2 * n)).astype(np.float32)
    gu[0, :4] = [-100.0, 100.0, 0.0, -88.5]  # exp overflow side must give -0, not NaN
    out = gpu.create_buffer(n_tokens * n * 4)
    b = gpu.batch()
    ops.silu_mul(b, f32buf(gpu, gu), out, n_tokens=n_tokens, n=n)
    got = run_and_read(gpu, arun, b, out, n_tokens * n).reshape(n_tokens, n)
    np.testing.assert_allclose(got, ref.silu_mul(gu[:, :n], gu[:, n:]), rtol=1e-4, atol=1e-6)


def test_add(gpu, ops, arun):
    rng = np.random.default_rng(4)
    a = rng.normal(size=300).astype(np.float32)
    c = rng.normal(size=310).astype(np.float32)
    ba = f32buf(gpu, a)
    b = gpu.batch()
    ops.add(b, ba, f32buf(gpu, c), n=290, a_off=7, b_off=20)
    got = run_and_read(gpu, arun, b, ba, 300)
    expect = a.copy()
    expect[7:297] += c[20:310]
    np.testing.assert_array_equal(got, expect)


@pytest.mark.parametrize("n,x_off", [(49152, 0), (1000, 13), (5, 0)])
def test_argmax(gpu, ops, arun, n, x_off):
    x = np.random.default_rng(n).normal(size=n + x_off).astype(np.float32)
    out = gpu.create_buffer(8)
    b = gpu.batch()
    ops.argmax(b, f32buf(gpu, x), out, n=n, x_off=x_off)
    idx, bits = run_and_read(gpu, arun, b, out, 2, np.uint32)
    assert idx == ref.argmax(x[x_off:])
    assert np.uint32(bits).view(np.float32) == x[x_off:].max()


def test_argmax_ties_take_lowest_index(gpu, ops, arun):
    x = np.zeros(1000, np.float32)
    x[[700, 300, 301]] = 5.0
    out = gpu.create_buffer(8)
    b = gpu.batch()
    ops.argmax(b, f32buf(gpu, x), out, n=1000)
    assert run_and_read(gpu, arun, b, out, 2, np.uint32)[0] == 300


# -- rope -------------------------------------------------------------------------------------

@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize("pos0,base", [(0, 10000.0), (1000, 100000.0)])
def test_rope(gpu, ops, arun, neox, pos0, base):
    rng = np.random.default_rng(pos0 + neox)
    n_tokens, n_heads, hd, x_off, stride = 5, 3, 64, 64, 64 + 3 * 64 + 32  # heads inside wider rows
    rows = rng.normal(size=(n_tokens, stride)).astype(np.float32)
    buf = f32buf(gpu, rows)
    b = gpu.batch()
    ops.rope(b, buf, n_tokens=n_tokens, n_heads=n_heads, head_dim=hd, pos0=pos0, base=base, neox=neox,
             row_stride=stride, x_off=x_off)
    got = run_and_read(gpu, arun, b, buf, n_tokens * stride).reshape(n_tokens, stride)
    heads = rows[:, x_off:x_off + n_heads * hd].reshape(n_tokens, n_heads, hd)
    expect = rows.copy()
    expect[:, x_off:x_off + n_heads * hd] = ref.rope(heads, pos0, base, neox).reshape(n_tokens, -1)
    atol = 2e-6 * (pos0 + n_tokens) * np.abs(rows).max()
    np.testing.assert_allclose(got, expect, rtol=0, atol=atol)
    np.testing.assert_array_equal(got[:, :x_off], rows[:, :x_off])  # outside the heads: untouched
    np.testing.assert_array_equal(got[:, x_off + n_heads * hd:], rows[:, x_off + n_heads * hd:])


def test_rope_fixed_quarter_turn(gpu, ops, arun):
    # head_dim 4, base b: pair 0 turns by pos rad, pair 1 by pos / b^(1/2). pos = pi/2 would not
    # be an integer, so use pos = 1 and compare with the closed form.
    x = np.array([[1.0, 0.0, 1.0, 0.0]], np.float32)
    buf = f32buf(gpu, x)
    b = gpu.batch()
    ops.rope(b, buf, n_tokens=1, n_heads=1, head_dim=4, pos0=1, base=100.0, neox=False)
    got = run_and_read(gpu, arun, b, buf, 4)
    np.testing.assert_allclose(got, [math.cos(1), math.sin(1), math.cos(0.1), math.sin(0.1)], atol=1e-6)


# -- kv_store + attention -----------------------------------------------------------------------

def _attention_case(gpu, ops, arun, rng, n_tokens, pos0, n_heads=4, n_kv=2, hd=64, ctx=80, q_scale=1.0):
    """Fill the cache at 0..pos0 (earlier tokens), then store + attend n_tokens new ones from a fused QKV buffer."""
    qkv_w = (n_heads + 2 * n_kv) * hd
    old = rng.normal(size=(max(pos0, 1), qkv_w)).astype(np.float32)
    new = rng.normal(size=(n_tokens, qkv_w)).astype(np.float32)
    new[:, :n_heads * hd] *= q_scale
    cache = gpu.create_buffer(2 * n_kv * ctx * hd * 4)
    out = gpu.create_buffer(n_tokens * n_heads * hd * 4)
    b = gpu.batch()
    if pos0:
        ops.kv_store(b, f32buf(gpu, old), cache, n_tokens=pos0, n_heads=2 * n_kv, head_dim=hd, ctx=ctx, pos0=0,
                     src_stride=qkv_w, src_off=n_heads * hd)
    qkv = f32buf(gpu, new)
    ops.kv_store(b, qkv, cache, n_tokens=n_tokens, n_heads=2 * n_kv, head_dim=hd, ctx=ctx, pos0=pos0,
                 src_stride=qkv_w, src_off=n_heads * hd)
    ops.attention(b, qkv, cache, out, n_tokens=n_tokens, n_heads=n_heads, n_kv_heads=n_kv, head_dim=hd, ctx=ctx,
                  pos0=pos0, k_off=0, v_off=n_kv * ctx * hd, q_stride=qkv_w)
    b.read(cache)
    i_out = b.read(out)
    res = arun(b.run())
    got_cache = np.frombuffer(res[0], np.float32).reshape(2, n_kv, ctx, hd)
    got = np.frombuffer(res[i_out], np.float32).reshape(n_tokens, n_heads, hd)
    kvs = np.concatenate([old[:pos0], new])[:, n_heads * hd:].reshape(pos0 + n_tokens, 2, n_kv, hd)
    kvs = kvs.transpose(1, 2, 0, 3)  # (2, n_kv, positions, hd)
    np.testing.assert_array_equal(got_cache[:, :, :pos0 + n_tokens], kvs)
    q = new[:, :n_heads * hd].reshape(n_tokens, n_heads, hd)
    expect = ref.attention(q, kvs[0], kvs[1], pos0, 1 / math.sqrt(hd))
    np.testing.assert_allclose(got, expect, rtol=1e-4, atol=2e-5 * np.abs(kvs[1]).max())


def test_attention_cpu_head_groups(gpu, arun):
    # the CPU attention sharing each KV head's loads among 2 query heads (4 heads, 2 KV heads)
    g_ops = arun(Ops.create(gpu, head_dim=64, matrix_types=(), embed_types=(), cpu_kernels=True, attention_group=2))
    _attention_case(gpu, g_ops, arun, np.random.default_rng(9), n_tokens=3, pos0=40)
    _attention_case(gpu, g_ops, arun, np.random.default_rng(10), n_tokens=1, pos0=70)


def test_attention_prefill(gpu, ops, arun):
    _attention_case(gpu, ops, arun, np.random.default_rng(5), n_tokens=70, pos0=0)  # > one 64-key chunk


def test_attention_decode(gpu, ops, arun):
    _attention_case(gpu, ops, arun, np.random.default_rng(6), n_tokens=1, pos0=75)


def test_attention_decode_split_k(gpu, ops, arun):
    # 251 keys > 2 * 64: four key splits of one workgroup each, then the combine pass
    assert ops.attention_split_len == 64
    _attention_case(gpu, ops, arun, np.random.default_rng(9), n_tokens=1, pos0=250, n_heads=9, n_kv=3, ctx=300)


def test_attention_prefill_after_context(gpu, ops, arun):
    _attention_case(gpu, ops, arun, np.random.default_rng(7), n_tokens=6, pos0=30, n_heads=9, n_kv=3)


def test_attention_fixed_large_scores_stable(gpu, ops, arun):
    # q scaled by 300: scores of order 1e3 overflow a naive exp; online softmax must not.
    _attention_case(gpu, ops, arun, np.random.default_rng(8), n_tokens=3, pos0=66, q_scale=300.0)


# -- quantized matvec / matmul --------------------------------------------------------------------

@pytest.mark.parametrize("qtype", MATRIX_TYPES)
@pytest.mark.parametrize("rows,k,x_off,y_off,acc", [(1, 32, 0, 0, False), (37, 576, 4, 3, True), (130, 96, 0, 0, False)])
def test_matvec(gpu, mv_ops, arun, qtype, rows, k, x_off, y_off, acc):
    rng = np.random.default_rng(rows * k + qtype)
    w = ref.random_weights(rng, qtype, rows, k)
    x = rng.normal(size=x_off + k).astype(np.float32)
    y0 = rng.normal(size=y_off + rows).astype(np.float32)
    y = f32buf(gpu, y0)
    b = gpu.batch()
    mv_ops.matvec(b, gpu.upload(w), f32buf(gpu, x), y, qtype=qtype, rows=rows, k=k, x_off=x_off, y_off=y_off,
               accumulate=acc)
    got = run_and_read(gpu, arun, b, y, y_off + rows)
    expect = ref.matvec(w, qtype, rows, k, x[x_off:]) + (y0[y_off:] if acc else 0)
    np.testing.assert_array_equal(got[:y_off], y0[:y_off])
    tol = matvec_tol(w, qtype, rows, k, x[x_off:]) + (np.abs(y0[y_off:]) * EPS32 if acc else 0)
    assert np.all(np.abs(got[y_off:] - expect) <= tol), np.abs(got[y_off:] - expect).max()


@pytest.mark.parametrize("qtype", K_TYPES)
@pytest.mark.parametrize("rows,k,x_off,y_off,acc,fuse", [(5, 256, 0, 0, False, False), (37, 1536, 4, 3, True, False),
                                                         (19, 512, 8, 0, True, True)])
def test_matvec_k_quants(gpu, mv_ops, arun, qtype, rows, k, x_off, y_off, acc, fuse):
    # Q4_K / Q6_K super-blocks of 256; odd rows put Q6_K blocks 2 bytes into a word.
    rng = np.random.default_rng(rows * k + qtype)
    w = ref.random_weights(rng, qtype, rows, k)
    x = rng.normal(size=x_off + k).astype(np.float32)
    nw = rng.normal(1, 0.3, k).astype(np.float32)
    y0 = rng.normal(size=y_off + rows).astype(np.float32)
    y = f32buf(gpu, y0)
    b = gpu.batch()
    mv_ops.matvec(b, gpu.upload(w), f32buf(gpu, x), y, qtype=qtype, rows=rows, k=k, x_off=x_off, y_off=y_off,
                  accumulate=acc, norm_weight=f32buf(gpu, nw) if fuse else None)
    got = run_and_read(gpu, arun, b, y, y_off + rows)
    xin = ref.rmsnorm(x[None, x_off:], nw, 1e-5)[0] if fuse else x[x_off:]
    expect = ref.matvec(w, qtype, rows, k, xin) + (y0[y_off:] if acc else 0)
    np.testing.assert_array_equal(got[:y_off], y0[:y_off])
    parts = weight_parts(w, qtype, rows, k) @ np.abs(xin.astype(np.float64))
    tol = matvec_tol(w, qtype, rows, k, xin) + (2e-5 * parts if fuse else 0) + (np.abs(y0[y_off:]) * EPS32 if acc else 0)
    assert np.all(np.abs(got[y_off:] - expect) <= tol), np.abs(got[y_off:] - expect).max()


def test_matvec_fixed_q4_1(gpu, mv_ops, arun):
    # one row, one block: d = 1, m = -8 -> weights q - 8 with q = element index % 16 ... written by hand
    q = np.array([i % 16 for i in range(32)], np.uint8)
    qs = (q[:16] | (q[16:] << 4)).astype(np.uint8)
    block = np.float16(1.0).tobytes() + np.float16(-8.0).tobytes() + qs.tobytes()
    x = np.arange(32, dtype=np.float32)
    y = gpu.create_buffer(4)
    b = gpu.batch()
    mv_ops.matvec(b, gpu.upload(block), f32buf(gpu, x), y, qtype=Q4_1, rows=1, k=32)
    assert run_and_read(gpu, arun, b, y, 1)[0] == float(((q.astype(np.float32) - 8) * x).sum())


@pytest.mark.parametrize("qtype", MATRIX_TYPES)
@pytest.mark.parametrize("n_tokens,rows,k", [(1, 64, 32), (33, 70, 96), (5, 129, 64)])
def test_matmul(gpu, ops, arun, qtype, n_tokens, rows, k):
    rng = np.random.default_rng(n_tokens * rows + qtype)
    w = ref.random_weights(rng, qtype, rows, k)
    x_stride, x_off, y_stride, y_off = k + 8, 3, rows + 5, 2  # strided views, as into fused buffers
    x = rng.normal(size=(n_tokens, x_stride)).astype(np.float32)
    y0 = rng.normal(size=(n_tokens, y_stride)).astype(np.float32)
    y = f32buf(gpu, y0)
    b = gpu.batch()
    acc = n_tokens == 5
    ops.matmul(b, gpu.upload(w), f32buf(gpu, x), y, qtype=qtype, n_tokens=n_tokens, rows=rows, k=k,
               x_stride=x_stride, x_off=x_off, y_stride=y_stride, y_off=y_off, accumulate=acc)
    got = run_and_read(gpu, arun, b, y, n_tokens * y_stride).reshape(n_tokens, y_stride)
    xs = x[:, x_off:x_off + k]
    region = got[:, y_off:y_off + rows]
    expect = ref.matvec(w, qtype, rows, k, xs) + (y0[:, y_off:y_off + rows] if acc else 0)
    tol = matvec_tol(w, qtype, rows, k, xs) + (np.abs(y0[:, y_off:y_off + rows]) * EPS32 if acc else 0)
    assert np.all(np.abs(region - expect) <= tol), np.abs(region - expect).max()
    np.testing.assert_array_equal(got[:, :y_off], y0[:, :y_off])
    np.testing.assert_array_equal(got[:, y_off + rows:], y0[:, y_off + rows:])


# -- fused forms for decode: RMSNorm or SwiGLU folded into the matvec input, RoPE + KV append ----

@pytest.mark.parametrize("qtype", MATRIX_TYPES)
def test_matvec_fused_rmsnorm(gpu, mv_ops, arun, qtype):
    # y = inv_rms * W (x * nw) on the GPU vs W @ rmsnorm(x) * nw: the scalar inv_rms moves out of
    # the sum, one more rounding (2 ulp inverseSqrt) on top of the matvec bound -> + 2e-5 relative.
    rng = np.random.default_rng(20 + qtype)
    rows, k, x_off = 45, 576, 8
    w = ref.random_weights(rng, qtype, rows, k)
    x = rng.normal(0, 2, x_off + k).astype(np.float32)
    nw = rng.normal(1, 0.3, k).astype(np.float32)
    y0 = rng.normal(size=rows).astype(np.float32)
    y = f32buf(gpu, y0)
    b = gpu.batch()
    mv_ops.matvec(b, gpu.upload(w), f32buf(gpu, x), y, qtype=qtype, rows=rows, k=k, x_off=x_off, accumulate=True,
               norm_weight=f32buf(gpu, nw), eps=1e-5)
    got = run_and_read(gpu, arun, b, y, rows)
    xn = ref.rmsnorm(x[None, x_off:], nw, 1e-5)[0]
    expect = ref.matvec(w, qtype, rows, k, xn) + y0
    parts = weight_parts(w, qtype, rows, k) @ np.abs(xn.astype(np.float64))
    tol = matvec_tol(w, qtype, rows, k, xn) + 2e-5 * parts + np.abs(y0) * EPS32
    assert np.all(np.abs(got - expect) <= tol), np.abs(got - expect).max()


@pytest.mark.parametrize("qtype", MATRIX_TYPES)
@pytest.mark.parametrize("ffn", [160, 192])  # 192: a multiple of 64, so Q4_0 / Q8_0 take the CPU kernels too
def test_matvec_fused_silu(gpu, mv_ops, arun, qtype, ffn):
    # xin = silu(gate) * up formed in f32 per element (exp: a few ulp) -> + 1e-5 relative of the sum.
    rng = np.random.default_rng(30 + qtype)
    rows = 40
    w = ref.random_weights(rng, qtype, rows, ffn)
    gu = rng.normal(0, 3, 2 * ffn).astype(np.float32)
    y = gpu.create_buffer(rows * 4)
    b = gpu.batch()
    mv_ops.matvec(b, gpu.upload(w), f32buf(gpu, gu), y, qtype=qtype, rows=rows, k=ffn, x_off=0, silu_up_off=ffn)
    got = run_and_read(gpu, arun, b, y, rows)
    xin = ref.silu_mul(gu[:ffn], gu[ffn:])
    expect = ref.matvec(w, qtype, rows, ffn, xin)
    parts = weight_parts(w, qtype, rows, ffn) @ np.abs(xin.astype(np.float64))
    tol = matvec_tol(w, qtype, rows, ffn, xin) + 1e-5 * parts
    assert np.all(np.abs(got - expect) <= tol), np.abs(got - expect).max()


@pytest.mark.parametrize("neox,n_rot,pos0,n_tokens", [(False, 64, 0, 4), (True, 64, 17, 1), (True, 32, 5, 3)])
def test_rope_kv(gpu, ops, arun, neox, n_rot, pos0, n_tokens):
    rng = np.random.default_rng(40 + pos0)
    nh, nkv, hd, ctx, base = 9, 3, 64, 24, 100000.0
    row = (nh + 2 * nkv) * hd
    qkv0 = rng.normal(size=(n_tokens, row)).astype(np.float32)
    cache0 = rng.normal(size=(2, nkv, ctx, hd)).astype(np.float32)
    qkv, cache = f32buf(gpu, qkv0), f32buf(gpu, cache0)
    b = gpu.batch()
    ops.rope_kv(b, qkv, cache, n_tokens=n_tokens, n_heads=nh, n_kv_heads=nkv, head_dim=hd, ctx=ctx, pos0=pos0,
                base=base, neox=neox, k_off=0, v_off=nkv * ctx * hd, n_rot=n_rot)
    b.read(qkv)
    b.read(cache)
    raw_q, raw_c = arun(b.run())
    got_q = np.frombuffer(raw_q, np.float32).reshape(n_tokens, row)
    got_c = np.frombuffer(raw_c, np.float32).reshape(2, nkv, ctx, hd)
    heads = qkv0.reshape(n_tokens, nh + 2 * nkv, hd)
    rq = ref.rope(heads[:, :nh], pos0, base, neox, n_rot)
    rk = ref.rope(heads[:, nh:nh + nkv], pos0, base, neox, n_rot)
    atol = 2e-6 * (pos0 + n_tokens) * np.abs(qkv0).max()
    np.testing.assert_allclose(got_q[:, :nh * hd].reshape(n_tokens, nh, hd), rq, rtol=0, atol=atol)
    np.testing.assert_array_equal(got_q[:, nh * hd:], qkv0[:, nh * hd:])  # K, V rows untouched
    expect_c = cache0.copy()
    expect_c[0, :, pos0:pos0 + n_tokens] = rk.transpose(1, 0, 2)
    expect_c[1, :, pos0:pos0 + n_tokens] = heads[:, nh + nkv:].transpose(1, 0, 2)
    np.testing.assert_allclose(got_c, expect_c, rtol=0, atol=atol)
    np.testing.assert_array_equal(got_c[1], expect_c[1])  # V is copied exactly


# -- CPU-adapter matvec (cpu_kernels.py): repacked into textures, R rows per invocation -----------

@pytest.fixture(scope="module")
def cpu_ops(gpu, arun):
    return arun(Ops.create(gpu, head_dim=64, matrix_types=MATRIX_TYPES, embed_types=(), cpu_kernels=True))


@pytest.mark.parametrize("qtype", MATRIX_TYPES)
@pytest.mark.parametrize("rows,k", [(1, 64), (15, 128), (16, 576), (17, 64), (100, 1536)])
def test_matvec_cpu_rows_and_k(gpu, cpu_ops, arun, qtype, rows, k):
    # rows around the 16 rows of an invocation; the same tolerance as test_matvec
    rng = np.random.default_rng(7 * rows + k + qtype)
    w = ref.random_weights(rng, qtype, rows, k)
    x = rng.normal(size=k).astype(np.float32)
    wbuf = gpu.upload(w)
    assert cpu_ops.prepare_matrix(wbuf, qtype, rows, k)  # repacked: the texture kernel runs
    y = gpu.create_buffer(rows * 4)
    b = gpu.batch()
    cpu_ops.matvec(b, wbuf, f32buf(gpu, x), y, qtype=qtype, rows=rows, k=k)
    got = run_and_read(gpu, arun, b, y, rows)
    expect = ref.matvec(w, qtype, rows, k, x)
    assert np.all(np.abs(got - expect) <= matvec_tol(w, qtype, rows, k, x)), np.abs(got - expect).max()


def test_matvec_cpu_rows_fold_into_texture_columns(gpu, cpu_ops, arun):
    # more rows than the texture is high: rows r >= H continue in a second column of texels
    limit = gpu.info["limits"]["maxTextureDimension2D"]
    rows, k = limit + 37, 64
    rng = np.random.default_rng(99)
    w = ref.random_weights(rng, Q8_0, rows, k)
    x = rng.normal(size=k).astype(np.float32)
    wbuf = gpu.upload(w)
    y = gpu.create_buffer(rows * 4)
    b = gpu.batch()
    cpu_ops.matvec(b, wbuf, f32buf(gpu, x), y, qtype=Q8_0, rows=rows, k=k)
    tex = cpu_ops._packs[(wbuf.uid, Q8_0, rows, k)][0]
    assert (tex.width, tex.height) == (2 * 4, limit)
    got = run_and_read(gpu, arun, b, y, rows)
    expect = ref.matvec(w, Q8_0, rows, k, x)
    assert np.all(np.abs(got - expect) <= matvec_tol(w, Q8_0, rows, k, x)), np.abs(got - expect).max()


def test_matvec_cpu_falls_back_for_other_k(gpu, cpu_ops, arun):
    # Q8_0 with k = 96 (not a multiple of 64) and Q4_K have no CPU kernel: the GPU kernels run
    rng = np.random.default_rng(5)
    w = ref.random_weights(rng, Q8_0, 9, 96)
    wbuf = gpu.upload(w)
    assert not cpu_ops.prepare_matrix(wbuf, Q8_0, 9, 96)
    x = rng.normal(size=96).astype(np.float32)
    y = gpu.create_buffer(9 * 4)
    b = gpu.batch()
    cpu_ops.matvec(b, wbuf, f32buf(gpu, x), y, qtype=Q8_0, rows=9, k=96)
    got = run_and_read(gpu, arun, b, y, 9)
    expect = ref.matvec(w, Q8_0, 9, 96, x)
    assert np.all(np.abs(got - expect) <= matvec_tol(w, Q8_0, 9, 96, x))


def test_matvec_cpu_edge_values_q8_0_q4_0(gpu, cpu_ops, arun):
    # every int8 / nibble value, including -128 and the top-byte / top-nibble sign tricks
    k, rows = 256, 20
    rng = np.random.default_rng(11)
    for qtype in (Q8_0, Q4_0, Q4_1):
        raw = bytearray(ref.random_weights(rng, qtype, rows, k))
        per, nbytes = ref.BLOCK[qtype]
        qoff = 4 if qtype == Q4_1 else 2
        for blk in range(rows * k // per):
            start = blk * nbytes + qoff
            raw[start:start + nbytes - qoff] = bytes((blk * 7 + i * 13) % 256 for i in range(nbytes - qoff))
        raw = bytes(raw)
        x = rng.normal(size=k).astype(np.float32)
        y = gpu.create_buffer(rows * 4)
        b = gpu.batch()
        cpu_ops.matvec(b, gpu.upload(raw), f32buf(gpu, x), y, qtype=qtype, rows=rows, k=k)
        got = run_and_read(gpu, arun, b, y, rows)
        expect = ref.matvec(raw, qtype, rows, k, x)
        assert np.all(np.abs(got - expect) <= matvec_tol(raw, qtype, rows, k, x)), (qtype, np.abs(got - expect).max())
