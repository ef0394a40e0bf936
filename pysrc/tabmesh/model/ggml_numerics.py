"""llama.cpp's CPU arithmetic in numpy, bit for bit: ``NumpyLlama(..., numerics="ggml")``.

llama.cpp on CPU does not compute the float32 forward pass of ``numerics="f32"``: it rounds
activations to 8 bits for every quantized matmul, keeps K/V in f16, and sums in its own
SIMD orders. Through 30 layers the quantization is chaotic: one activation rounded the other
way in an early layer (from a one-ulp difference anywhere upstream) moves later 8-bit
roundings by the hundred, and the logits end up ~0.5 apart, as far as with no rounding at
all. So this module reproduces every operation exactly, not approximately; measured on
SmolLM2-135M Q4_1 and Q8_0, 4 prompts, prefill + 32 greedy steps: every logit llama.cpp
reported is equal (error 0.0), and so are the greedy tokens.

The reference is llama.cpp as llama-cpp-python 0.3.36 bundles it (ggml 0.25.3), built with
-march=native on x86-64 (AVX2, FMA, F16C, AVX-512F/VL/VNNI, AVX-VNNI), run with its
defaults: flash attention off (llama-cpp-python passes flash_attn=False), f16 K and V cache,
llamafile sgemm on. What its CPU backend computes for a Llama block, in order (T = tokens in
the batch; "fma" = one rounding; f16() = round to nearest even, as F16C):

1. rmsnorm (ggml_compute_forward_rms_norm_f32, fused with the weight mul):
   sum = sum_i (double)(x_i * x_i)     squares in float32, summed in order in double
   mean = (float)(sum / n); scale = 1.0f / sqrtf(mean + eps); y_i = (x_i * scale) * w_i.
2. Matmul with Q8_0 / Q4_1 weights (Q4_0 too): the input row is first quantized per block
   of 32 (arch/x86/quants.c quantize_row_q8_0 / quantize_row_q8_1, the AVX path; NOT the
   scalar *_ref, which rounds differently):
       amax = max_j |x_j|;  d = amax / 127.0f;  id = amax != 0 ? 127.0f / amax : 0.0f
       q_j = round_half_even(x_j * id)   (float32 product; _mm256_round_ps(_MM_ROUND_NEAREST))
       block.d = f16(d);  Q8_1 also block.s = f16(d * sum_j q_j)  (the float32 d, not f16(d))
   Q4_1 weights take Q8_1, Q8_0 / Q4_0 take Q8_0. Then per weight row (ggml_vec_dot_q4_1_q8_1,
   ggml_vec_dot_q8_0_q8_0; for T >= 2 Q8_0 goes through llamafile's tinyBLAS_Q0_AVX, which
   does the same arithmetic): 8 float32 lanes, lane l of block b holds the exact integer
   isum[b][l] = sum_{k<4} qw[32b + 4l + k] * qx[32b + 4l + k]  (VNNI dpbusd), and
       acc[l] = fma(dw_b * dx_b, (float)isum[b][l], acc[l])   for b = 0, 1, ... in order
   (dw_b * dx_b: two f16 in float32, exact), then
       y = ((acc0 + acc4) + (acc2 + acc6)) + ((acc1 + acc5) + (acc3 + acc7))
   and for Q4_1 y += summs, summs = fma(mw_b, sx_b, summs) over b in order (exact products).
   Q4_1 and Q8_0 matmuls are the same for T = 1 (decode) and T >= 2 (prefill).
3. q, k, v (= 2), then RoPE (ggml_rope_cache_init, rotate_pairs as GCC compiles them):
   theta_scale = powf(base, -2.0f / n_rot); theta_0 = (float)pos; theta_{i+1} =
   theta_i * theta_scale (float32, iterated, not pow per i); theta *= freq_scale;
   (cos, sin) = sincosf(theta) of the C library (glibc's is not correctly rounded: 2% of
   the angles differ from the nearest float); then a' = fma(a, cos, -(b * sin)),
   b' = fma(a, sin, b * cos) with b * sin, b * cos rounded to float32.
4. K and V are stored to the cache as f16(k), f16(v). The attention reads n_kv cells (the
   used ones padded to 256; unused cells are zero and masked, they change nothing):
   kq = mul_mat(k_f16, q): q is rounded to f16 first; kq[key] = dot of f16 values in float32,
     T >= 2: tinyBLAS f16: 16 lanes, lane l sums elements l, l+16, l+32, l+48 in order;
     T == 1: ggml_vec_dot_f16: 64 slots (4 x 16 lanes), one step for head_dim 64;
     then the lanes are added by halving (x[i] + x[i + n/2] until one: GCC's
     _mm512_reduce_add_ps, and for 64 slots first acc0+acc2, acc1+acc3, acc0+acc1).
   softmax (ggml_compute_forward_soft_max_f32): w = kq * scale (+ mask: 0 or -inf);
     e = ggml_v_expf(w - max) (AVX-512 polynomial, see v_expf); sum = sum over chunks of 16
     of (double)halving_sum(chunk), in order; p = e * (float)(1.0 / sum).
   kqv = mul_mat(v_f16 transposed, p): p is rounded to f16 first; dot over keys as kq
     (T >= 2: 16 lanes over keys, in key order; T == 1: 64 slots, chains over 64-key steps).
5. o = matmul(kqv, wo) as 2; residual add in float32; ffn: rmsnorm, gate and up (as 2),
   SwiGLU (ggml_vec_swiglu_f32, AVX-512): y = (g / (1 + ggml_v_expf(-g))) * u, float32;
   down (as 2); residual add. Output: rmsnorm, matmul with output.weight (as 2).

Only Q8_0 / Q4_1 weights are bit-exact here. Q4_0 (repacked 8x8 kernels on AVX2), F16 and
F32 weights get ggml's input roundings but BLAS summation order; K-quants (Q8_K
activations) are refused. Other builds differ: an ARM or non-AVX build uses other rounding
(the "ref" variant of the quantizers is ggml's scalar C), and flash attention or an F32
cache changes step 4.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from tabmesh.errors import UnsupportedQuantError
from tabmesh.quants import GGMLType, format_for, type_name

from .config import LlamaConfig
from .weights import (BIAS_TENSORS, BLOCK_TENSORS, LayerWeights, ModelWeights, check_layers,
                      tensors_needed)

QK = 32  # elements per block of Q4_0, Q4_1, Q8_0, Q8_1
VARIANTS = ("x86", "ref")  # x86: the AVX2/AVX-512 build of the fixtures; ref: ggml's scalar C


def f16_round(x: np.ndarray) -> np.ndarray:
    """float32 -> nearest f16 (ties to even, as F16C's vcvtps2ph; inf beyond 65504) -> float32."""
    with np.errstate(over="ignore"):
        return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


# -- activation quantizers ---------------------------------------------------------------------

@dataclass
class Q8Rows:
    """Activation rows quantized to Q8_0 or Q8_1, unpacked.

    q (..., n_blocks, 32) int8; d (..., n_blocks) float32 holding the f16 block scale;
    s (..., n_blocks) float32 holding the f16 d * sum(q) (Q8_1), or None (Q8_0)."""

    q: np.ndarray
    d: np.ndarray
    s: np.ndarray | None = None

    def to_bytes(self) -> np.ndarray:
        """ggml's block layout, (..., n_blocks, 34) uint8 for block_q8_0 (d f16, qs[32])
        or (..., n_blocks, 36) for block_q8_1 (d f16, s f16, qs[32]); little-endian."""
        parts = [self.d.astype("<f2")[..., None].view(np.uint8)]
        if self.s is not None:
            parts.append(self.s.astype("<f2")[..., None].view(np.uint8))
        parts.append(self.q.view(np.uint8))
        return np.concatenate(parts, axis=-1)


def _blocks(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    if x.shape[-1] % QK:
        raise ValueError(f"rows of {x.shape[-1]} elements are not a whole number of blocks of {QK}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // QK, QK)


def _quantize_q8(x: np.ndarray, variant: str, with_sum: bool) -> Q8Rows:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    xb = _blocks(x)  # (..., nb, 32)
    amax = np.abs(xb).max(axis=-1)  # (..., nb)
    d = amax / np.float32(127)
    with np.errstate(divide="ignore"):
        if variant == "x86":
            inv = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
        else:
            inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    v = xb * inv[..., None]  # float32 products
    if variant == "x86":
        r = np.rint(v)  # _mm256_round_ps(_MM_ROUND_NEAREST): ties to even
    else:
        tie = np.abs(v - np.trunc(v)) == np.float32(0.5)  # exact: v - trunc(v) is exact
        r = np.where(tie, np.trunc(v) + np.sign(v), np.rint(v))  # roundf: ties away from zero
    q = np.clip(r, -128, 127).astype(np.int8)  # packs saturate; |x * id| <= 127 anyway
    s = None
    if with_sum:
        total = q.astype(np.int32).sum(axis=-1).astype(np.float32)  # exact (|sum| <= 4064)
        s = f16_round(d * total)  # float32 d, not f16(d)
    return Q8Rows(q=q, d=f16_round(d), s=s)


def quantize_row_q8_0(x: np.ndarray, variant: str = "x86") -> Q8Rows:
    """Rows (..., k) float32 -> Q8_0 blocks as ggml's ``quantize_row_q8_0`` makes them
    (variant "x86": the AVX path the CPU backend runs on x86; "ref": quantize_row_q8_0_ref)."""
    return _quantize_q8(x, variant, with_sum=False)


def quantize_row_q8_1(x: np.ndarray, variant: str = "x86") -> Q8Rows:
    """Rows (..., k) float32 -> Q8_1 blocks as ggml's ``quantize_row_q8_1`` makes them."""
    return _quantize_q8(x, variant, with_sum=True)


# -- weight matrices in their ggml type ------------------------------------------------------

class QMatrix:
    """A 2-D weight (n_out, n_in) kept in its GGUF type, multiplied as ggml's CPU backend
    multiplies it (``matmul``). Supported: F32, F16, Q4_0, Q4_1, Q8_0.

    Storage: F32 / F16: ``w`` (n_out, n_in) float32. Q4_0 / Q4_1 / Q8_0: ``q`` (n_blocks, 32,
    n_out) float32 holding the integer quants (Q4_0: -8..7, Q4_1: 0..15, Q8_0: -128..127) in
    block-element order, so that BLAS gives the exact integer sums of ggml's SIMD lanes
    (``q.reshape(n_blocks * 8, 4, n_out)``); ``d`` (n_blocks, n_out) and, for Q4_1, ``m``
    (n_blocks, n_out): the f16 scale / minimum as float32. 4 bytes a weight, like the f32
    model's dequantized arrays."""

    SUPPORTED = (GGMLType.F32, GGMLType.F16, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0)
    CHUNK_BYTES = 4 << 20  # float64 products per chunk of matmuls: a few MB, to stay in cache

    def __init__(self, ggml_type: int, shape: tuple[int, int], *, w: np.ndarray | None = None,
                 q: np.ndarray | None = None, d: np.ndarray | None = None,
                 m: np.ndarray | None = None, name: str | None = None) -> None:
        self.ggml_type = GGMLType(ggml_type)
        self.shape = (int(shape[0]), int(shape[1]))
        self.w, self.q, self.d, self.m = w, q, d, m
        self.name = name

    @classmethod
    def from_raw(cls, ggml_type: int, raw: bytes | bytearray | memoryview | np.ndarray,
                 shape: tuple[int, int], name: str | None = None) -> "QMatrix":
        """From a tensor's raw GGUF bytes; ``shape`` is the numpy shape (n_out, n_in)."""
        n_out, n_in = shape
        if ggml_type not in cls.SUPPORTED:
            raise UnsupportedQuantError(
                f"tensor {name!r} is {type_name(ggml_type)}: numerics='ggml' supports "
                f"{', '.join(t.name for t in cls.SUPPORTED)} weights (K-quants would need "
                f"ggml's Q8_K activations); use numerics='f32' for this model")
        if ggml_type in (GGMLType.F32, GGMLType.F16):
            w = format_for(ggml_type, name).dequantize(raw, n_out * n_in, name).reshape(shape)
            return cls(ggml_type, shape, w=w, name=name)
        fmt = format_for(ggml_type, name)
        data = (np.ascontiguousarray(raw).reshape(-1).view(np.uint8) if isinstance(raw, np.ndarray)
                else np.frombuffer(raw, np.uint8))
        nb = n_in // QK
        if n_in % QK or data.size != n_out * nb * fmt.type_size:
            raise UnsupportedQuantError(f"tensor {name!r}: {data.size} bytes is not a "
                                        f"{type_name(ggml_type)} matrix of shape {shape}")
        blocks = data.reshape(n_out, nb, fmt.type_size)

        def f16(lo: int) -> np.ndarray:  # (n_out, nb) -> (nb, n_out)
            half = np.ascontiguousarray(blocks[:, :, lo:lo + 2]).view("<f2")[..., 0]
            return np.ascontiguousarray(half.astype(np.float32).T)

        def nibbles(qs: np.ndarray) -> np.ndarray:  # (n_out, nb, 16) -> (n_out, nb, 32)
            return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1)

        m = None
        if ggml_type == GGMLType.Q8_0:
            q = blocks[:, :, 2:34].view(np.int8)
        elif ggml_type == GGMLType.Q4_0:
            q = nibbles(blocks[:, :, 2:18]).astype(np.int8) - np.int8(8)
        else:  # Q4_1
            q = nibbles(blocks[:, :, 4:20])
            m = f16(2)
        qt = np.ascontiguousarray(q.astype(np.float32).transpose(1, 2, 0))  # (nb, 32, n_out)
        return cls(ggml_type, shape, q=qt, d=f16(0), m=m, name=name)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.w, self.q, self.d, self.m) if a is not None)

    def dequantize(self) -> np.ndarray:
        """The float32 weights (n_out, n_in), as ggml's dequantize_row_* gives them."""
        if self.w is not None:
            return self.w
        w = self.d[:, None, :] * self.q  # (nb, 32, n_out)
        if self.m is not None:
            w = w + self.m[:, None, :]
        return np.ascontiguousarray(w.transpose(2, 0, 1).reshape(self.shape))

    def matmul(self, x: np.ndarray, variant: str = "x86") -> np.ndarray:
        """x (T, n_in) float32 -> (T, n_out) float32: ``x @ W.T`` as ggml computes it
        (see ``matmuls``)."""
        return matmuls(x, [self], variant)[0]


def matmuls(x: np.ndarray, ws: list[QMatrix], variant: str = "x86") -> list[np.ndarray]:
    """ggml's mul_mat(w, x) for each w of ``ws`` (all of one type and n_in, like q/k/v or
    gate/up: x is quantized once): x (T, n_in) float32 -> [(T, n_out_i) float32].

    Q8_0 / Q4_1 weights: bit-exact with ggml_vec_dot_q8_0_q8_0 / ggml_vec_dot_q4_1_q8_1
    (AVX2 / AVX-512-VNNI; decode) and llamafile's tinyBLAS_Q0_AVX (Q8_0 prefill, the same
    arithmetic): per block b and lane l (block elements 4l .. 4l+3) the integer sum
    isum[b, l]; acc[l] = fma(f32(dw_b * dx_b), isum[b, l], acc[l]) over b in order; then
    ((acc0 + acc4) + (acc2 + acc6)) + ((acc1 + acc5) + (acc3 + acc7)); Q4_1 adds
    summs = sum over b in order of mw_b * sx_b (float32; the products are exact) at the end.
    Q4_0 (repacked 8x8 kernels in ggml on AVX2), F16 and F32 weights: ggml's roundings of the
    inputs, but BLAS summation order."""
    x = np.asarray(x, np.float32)
    kinds = {(w.ggml_type, w.shape[1]) for w in ws}
    if len(kinds) != 1:
        raise ValueError(f"matmuls needs weights of one type and input size, got {sorted(kinds)}")
    (ggml_type, n_in), = kinds
    if x.ndim != 2 or x.shape[1] != n_in:
        raise ValueError(f"{ws[0].name or 'matrix'} {ws[0].shape} cannot take input of "
                         f"shape {x.shape}")
    if ggml_type == GGMLType.F32:
        return [x @ w.w.T for w in ws]
    if ggml_type == GGMLType.F16:
        x16 = f16_round(x)  # products of two f16 are exact in float32
        return [x16 @ w.w.T for w in ws]
    act = (quantize_row_q8_1 if ggml_type == GGMLType.Q4_1 else quantize_row_q8_0)(x, variant)
    n_tok, nb = x.shape[0], n_in // QK
    qx = act.q.reshape(n_tok, nb * 8, 4).transpose(1, 0, 2).astype(np.float32)  # (nb * 8, T, 4)
    dx = act.d.T[:, :, None]  # (nb, T, 1)
    outs = []
    # chunks of rows x columns small enough for the per-block loop to run in cache
    per_elem = nb * 8 * 8  # bytes of float64 products per (row, column)
    rows = max(1, min(n_tok, QMatrix.CHUNK_BYTES // (per_elem * 256)))
    for w in ws:
        n_out = w.shape[0]
        cols = max(256, QMatrix.CHUNK_BYTES // (per_elem * rows))
        out = np.empty((n_tok, n_out), np.float32)
        w_lanes = w.q.reshape(nb * 8, 4, n_out)  # lane (b, l) = block elements 4l .. 4l+3
        for t0 in range(0, n_tok, rows):
            t1 = min(n_tok, t0 + rows)
            for c0 in range(0, n_out, cols):
                c1 = min(n_out, c0 + cols)
                isum = np.matmul(qx[:, t0:t1], w_lanes[:, :, c0:c1])  # |isum| < 2^17: exact
                prod = isum.astype(np.float64).reshape(nb, 8, t1 - t0, c1 - c0)
                prod *= (dx[:, t0:t1] * w.d[:, None, c0:c1])[:, None]  # f32(dw * dx), as ggml
                acc = prod[0].astype(np.float32)  # (8, t, c): lane accumulators
                for b in range(1, nb):  # acc = fma(dd, isum, acc): one rounding, to float32
                    s = prod[b]
                    s += acc
                    np.copyto(acc, s, casting="same_kind")
                y = halving_sum(acc.transpose(1, 2, 0))  # hsum_float_8
                if w.m is not None:  # Q4_1: + summs, m * s exact in float32, summed in order
                    ms = w.m[:, None, c0:c1] * act.s[t0:t1].T[:, :, None]  # (nb, t, c)
                    summs = ms[0].copy()
                    for b in range(1, nb):
                        summs += ms[b]
                    y += summs
                out[t0:t1, c0:c1] = y
        outs.append(out)
    return outs


def matmul(x: np.ndarray, w: QMatrix | np.ndarray) -> np.ndarray:
    """ggml's mul_mat(w, x) for a QMatrix; a plain float32 array is an F32 weight."""
    if isinstance(w, QMatrix):
        return matmuls(x, [w])[0]
    return x @ w.T


# -- float32 building blocks of ggml's SIMD code -----------------------------------------------

def fma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 fused multiply-add, round(a * b + c) once: the product of two float32 is exact
    in float64 and the sum is rounded twice (float64, float32), which differs from one
    rounding only when the float64 sum lands exactly halfway between two float32 (~2^-29)."""
    a64, b64, c64 = (np.asarray(v, np.float64) for v in (a, b, c))
    return (a64 * b64 + c64).astype(np.float32)


def halving_sum(x: np.ndarray) -> np.ndarray:
    """Sum over the last axis (a power of two) by halving: x[i] + x[i + n/2] until one is
    left, in float32. This is _mm512_reduce_add_ps (16 lanes, GCC's implementation), ggml's
    hsum_float_8 and tinyBLAS's hsum (8 lanes), and GGML_F32x16_REDUCE over 4 x 16 lanes."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"halving_sum needs a power-of-two length, got {n}")
    x = np.asarray(x, np.float32)
    while n > 1:
        n //= 2
        x = x[..., :n] + x[..., n:]
    return x[..., 0]


def lane_dot(a: np.ndarray, b: np.ndarray, lanes: int) -> np.ndarray:
    """sum(a * b, axis=-1) of f16 values (held in float32; products exact) as ggml's f16 dot
    products compute it: element i goes to lane i % lanes, each lane accumulates its elements
    in order in float32, then halving_sum over the lanes. lanes=16: llamafile's tinyBLAS f16
    (prefill); lanes=64: ggml_vec_dot_f16 on AVX-512 (decode: 4 accumulators of 16 lanes,
    x0+x2, x1+x3, x0+x1, then _mm512_reduce_add_ps). Zero padding (ggml's unused KV cells)
    changes nothing."""
    n = max(a.shape[-1], b.shape[-1])
    steps = -(-n // lanes)
    acc = None
    for s in range(steps):
        lo, hi = s * lanes, min(n, (s + 1) * lanes)
        p = a[..., lo:hi] * b[..., lo:hi]
        if hi - lo < lanes:
            pad = np.zeros(p.shape[:-1] + (lanes - (hi - lo),), np.float32)
            p = np.concatenate([p, pad], axis=-1)
        acc = p if acc is None else acc + p
    return halving_sum(acc)


_EXP = {k: np.float32(float.fromhex(v)) for k, v in dict(
    log2e="0x1.715476p+0", r="0x1.8p23", ln2_hi="0x1.62e4p-1", ln2_lo="0x1.7f7d1cp-20",
    c0="0x1.0e4020p-7", c1="0x1.573e2ep-5", c2="0x1.555e66p-3", c3="0x1.fffdb6p-2",
    c4="0x1.ffffecp-1").items()}


def v_expf(x: np.ndarray) -> np.ndarray:
    """ggml_v_expf, the AVX-512 version (ggml-cpu/vec.h), float32 op for op: 2^n * p(b)
    with n = round(x / ln2) via the 1.5 * 2^23 trick, b = x - n ln2 (two fnmadd), a degree-5
    polynomial in FMAs, _mm512_scalef_ps; 0 or inf where |n| > 192 (also for -inf)."""
    c = _EXP
    x = np.asarray(x, np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        z = fma(x, c["log2e"], c["r"])
        n = z - c["r"]
        b = fma(-n, c["ln2_lo"], fma(-n, c["ln2_hi"], x))
        u = b * b
        j = fma(fma(fma(c["c0"], b, c["c1"]), u, fma(c["c2"], b, c["c3"])), u,
                fma(c["c4"], b, np.float32(1)))
        big = np.abs(n) > np.float32(192)  # -inf in: n = -inf, big, result 0
        ni = np.where(big, 0, n).astype(np.int32)
        res = np.ldexp(j, ni).astype(np.float32)
        alt = np.where(n <= 0, np.float32(0), np.float32(np.inf))
        return np.where(big, alt, res).astype(np.float32)


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """ggml_vec_swiglu_f32 (AVX-512): silu(g) * u with silu(g) = g / (1 + v_expf(-g))."""
    gate = np.asarray(gate, np.float32)
    return (gate / (np.float32(1) + v_expf(-gate))) * up


def softmax(s: np.ndarray) -> np.ndarray:
    """ggml_vec_soft_max_f32 + the scaling in ggml_compute_forward_soft_max_f32, over the
    last axis of s (already scaled and masked): e = v_expf(s - max); the sum taken per 16
    elements with _mm512_reduce_add_ps, those partial sums added in double in order;
    e * (float)(1.0 / sum)."""
    s = np.asarray(s, np.float32)
    e = v_expf(s - s.max(axis=-1, keepdims=True))
    n = e.shape[-1]
    pad = -n % 16
    ep = np.concatenate([e, np.zeros(e.shape[:-1] + (pad,), np.float32)], axis=-1) if pad else e
    chunks = halving_sum(ep.reshape(*ep.shape[:-1], -1, 16)).astype(np.float64)  # (..., n/16)
    total = np.cumsum(chunks, axis=-1)[..., -1:]  # in order, in double
    return e * (1.0 / total).astype(np.float32)


# -- the other ops ------------------------------------------------------------------------

def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """ggml_rms_norm (+ ggml_mul): float32 squares summed in order in double, the mean
    rounded to float32, scale = 1 / sqrtf(mean + eps), y = (x * scale) * w."""
    sum_sq = np.cumsum(np.square(x).astype(np.float64), axis=-1)[..., -1:]
    mean = (sum_sq / x.shape[-1]).astype(np.float32)
    scale = np.float32(1.0) / np.sqrt(mean + np.float32(eps))
    return (x * scale) * weight


def _libm():
    """The C library's powf and sincosf, which ggml_rope_cache_init calls, when ctypes can
    find them (glibc's sincosf is not correctly rounded: it differs from the nearest float
    for ~2% of RoPE angles); else None."""
    global _LIBM
    if _LIBM is None:
        _LIBM = False
        try:
            import ctypes
            import ctypes.util

            lib = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
            lib.powf.argtypes, lib.powf.restype = [ctypes.c_float, ctypes.c_float], ctypes.c_float
            lib.sincosf.argtypes = [ctypes.c_float, ctypes.POINTER(ctypes.c_float),
                                    ctypes.POINTER(ctypes.c_float)]
            lib.sincosf.restype = None
            _LIBM = lib
        except (OSError, AttributeError, TypeError):
            _LIBM = False
    return _LIBM or None


_LIBM: Any = None
_ROPE_CACHE: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def _sincos(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lib = _libm()
    if lib is None:
        t = theta.astype(np.float64)
        return np.cos(t).astype(np.float32), np.sin(t).astype(np.float32)
    import ctypes

    s, c = ctypes.c_float(), ctypes.c_float()
    cos, sin = np.empty(theta.shape, np.float32), np.empty(theta.shape, np.float32)
    for i, v in enumerate(theta.ravel().tolist()):
        lib.sincosf(v, ctypes.byref(s), ctypes.byref(c))
        cos.flat[i], sin.flat[i] = c.value, s.value
    return cos, sin


def rope_tables(cfg: LlamaConfig, start_pos: int, n_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (n_tokens, 1, n_rot/2) as ggml_rope_cache_init computes them (no YaRN):
    theta_scale = powf(base, -2.0f / n_rot); theta_0 = pos, theta_{i+1} = theta_i *
    theta_scale in float32; theta *= freq_scale; sincosf(theta)."""
    half = cfg.n_rot // 2
    key = (float(cfg.rope_base), cfg.n_rot, float(cfg.rope_freq_scale))
    cos, sin = _ROPE_CACHE.get(key, (np.zeros((0, half), np.float32),) * 2)
    end = start_pos + n_tokens
    if cos.shape[0] < end:
        cos, sin = rope_cos_sin(cfg.rope_base, cfg.n_rot, cfg.rope_freq_scale, max(end, 2 * cos.shape[0], 64))
        _ROPE_CACHE[key] = (cos, sin)
    return cos[start_pos:end, None, :], sin[start_pos:end, None, :]


def rope_cos_sin(rope_base: float, n_rot: int, freq_scale: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (n, n_rot / 2) for positions 0 .. n - 1 (ggml_rope_cache_init), uncached."""
    half = n_rot // 2
    expo = np.float32(-2.0) / np.float32(n_rot)
    lib = _libm()
    theta_scale = (np.float32(lib.powf(rope_base, expo)) if lib is not None else
                   np.float32(np.float64(np.float32(rope_base)) ** np.float64(expo)))
    theta = np.empty((n, half), np.float32)
    theta[:, 0] = np.arange(n, dtype=np.float32)
    for i in range(1, half):
        theta[:, i] = theta[:, i - 1] * theta_scale
    return _sincos(np.float32(freq_scale) * theta)


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, neox: bool) -> np.ndarray:
    """ggml's rotate_pairs as compiled (GCC contracts it into FMAs):
    a' = fma(a, cos, -(b * sin)), b' = fma(a, sin, b * cos); x (T, n_heads, head_dim)."""
    half = cos.shape[-1]
    x = np.array(x, np.float32)
    if neox:
        ia, ib = slice(0, half), slice(half, 2 * half)
    else:
        ia, ib = slice(0, 2 * half, 2), slice(1, 2 * half, 2)
    a, b = x[..., ia].copy(), x[..., ib].copy()
    x[..., ia] = fma(a, cos, -(b * sin))
    x[..., ib] = fma(a, sin, b * cos)
    return x


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, start_pos: int,
              max_elems: int = 1 << 24) -> np.ndarray:
    """Causal GQA as llama.cpp computes it without flash attention, on an f16 KV cache.

    q (T, n_head, hd) float32; k, v (n_keys, n_kv, hd) float32 holding f16 values
    -> (T, n_head, hd). kq = mul_mat(k, f16(q)) and kqv = mul_mat(v, f16(softmax)), the f16
    dot products in ggml's lane order: tinyBLAS (16 lanes) when T >= 2, ggml_vec_dot_f16
    (64 lanes) when T == 1; softmax as ``softmax``."""
    n_tokens, n_head, hd = q.shape
    n_keys, n_kv, _ = k.shape
    group = n_head // n_kv
    lanes = 64 if n_tokens == 1 else 16
    q16 = f16_round(q)
    qg = q16.reshape(n_tokens, n_kv, group, hd).transpose(1, 2, 0, 3).reshape(n_kv, -1, hd)
    kk = k.transpose(1, 0, 2)  # (n_kv, n_keys, hd)
    vt = v.transpose(1, 2, 0)  # (n_kv, hd, n_keys)
    rows = group * n_tokens
    step = max(1, max_elems // (n_kv * max(n_keys, hd) * lanes))
    positions = np.arange(start_pos, start_pos + n_tokens)
    future = np.arange(n_keys)[None, :] > positions[:, None]  # (T, n_keys): masked to -inf
    future = np.broadcast_to(future[None], (group, n_tokens, n_keys)).reshape(rows, n_keys)
    out = np.empty((n_kv, rows, hd), np.float32)
    scale = np.float32(1.0) / np.sqrt(np.float32(hd))  # 1.0f / sqrtf(head_dim), as llama.cpp
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        kq = lane_dot(qg[:, r0:r1, None, :], kk[:, None, :, :], lanes)  # (n_kv, r, n_keys)
        kq *= scale
        kq[:, future[r0:r1]] = -np.inf
        p16 = f16_round(softmax(kq))
        out[:, r0:r1] = lane_dot(p16[:, :, None, :], vt[:, None, :, :], lanes)  # (n_kv, r, hd)
    return out.reshape(n_kv, group, n_tokens, hd).transpose(2, 0, 1, 3).reshape(n_tokens, n_head, hd)


# -- loading ------------------------------------------------------------------------------

def load_ggml_weights(cfg: LlamaConfig, gguf: Any, layers: range,
                      raw_of: Callable[[str], bytes | bytearray | memoryview]) -> ModelWeights:
    """Like ``weights.load_weights``, but the 2-D matrices stay in their GGUF type as
    QMatrix (norms and biases float32; ``tok_embd`` float32 for the embedding lookup, and
    again as a QMatrix ``output`` when the output is tied)."""
    check_layers(cfg, layers)
    names = tensors_needed(cfg, gguf, layers)

    def mat(name: str) -> QMatrix:
        info = gguf.tensors[name]
        return QMatrix.from_raw(info.ggml_type, raw_of(name), info.np_shape, name)

    def vec(name: str) -> np.ndarray:
        return gguf.tensor_array(name, raw_of(name))

    blocks = []
    for i in layers:
        fields: dict[str, Any] = {}
        for suffix, field in BLOCK_TENSORS.items():
            name = f"blk.{i}.{suffix}"
            fields[field] = vec(name) if suffix.endswith("norm.weight") else mat(name)
        fields.update({field: vec(f"blk.{i}.{suffix}") for suffix, field in BIAS_TENSORS.items()
                       if f"blk.{i}.{suffix}" in names})
        blocks.append(LayerWeights(**fields))
    is_first, is_last = layers.start == 0, layers.stop == cfg.n_layers
    tok_embd = vec("token_embd.weight") if is_first else None
    output_norm = output = None
    if is_last:
        output_norm = vec("output_norm.weight")
        output = mat("token_embd.weight" if cfg.tied_output else "output.weight")
    return ModelWeights(layers=layers, blocks=blocks, tok_embd=tok_embd,
                        output_norm=output_norm, output=output)


def ggml_weights_from_path(path: str | os.PathLike, layers: range | None = None,
                           gguf: Any = None) -> tuple[LlamaConfig, Any, ModelWeights]:
    """Parse a local GGUF and load ``layers`` (default: all) for numerics='ggml'."""
    from tabmesh.gguf import read_gguf_path

    if gguf is None:
        gguf = read_gguf_path(path)
    cfg = LlamaConfig.from_gguf(gguf)
    layers = range(cfg.n_layers) if layers is None else layers
    with open(path, "rb") as f:
        def raw_of(name: str) -> bytes:
            info = gguf.tensors[name]
            f.seek(info.offset)
            return f.read(info.nbytes)

        return cfg, gguf, load_ggml_weights(cfg, gguf, layers, raw_of)
