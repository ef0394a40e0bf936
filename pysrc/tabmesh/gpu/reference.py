"""numpy references for the WGSL kernels, GGML semantics. The tests compare GPU against these.

Tensors are float32 unless noted; shapes in comments. Quantized weights are the raw GGUF
bytes of a [rows, k] tensor (row-major, k a multiple of 32), exactly as uploaded to the GPU.
"""

from __future__ import annotations

import numpy as np

# GGML type ids (ggml.h) and block geometry: (elements per block, bytes per block).
F32, F16, Q4_0, Q4_1, Q8_0, Q4_K, Q6_K = 0, 1, 2, 3, 8, 12, 14
BLOCK = {F32: (1, 4), F16: (1, 2), Q4_0: (32, 18), Q4_1: (32, 20), Q8_0: (32, 34), Q4_K: (256, 144), Q6_K: (256, 210)}
TYPE_NAMES = {F32: "f32", F16: "f16", Q4_0: "q4_0", Q4_1: "q4_1", Q8_0: "q8_0", Q4_K: "q4_k", Q6_K: "q6_k"}


def row_bytes(qtype: int, k: int) -> int:
    per, nbytes = BLOCK[qtype]
    if k % per:
        raise ValueError(f"{TYPE_NAMES[qtype]} rows need a multiple of {per} elements, got {k}")
    return k // per * nbytes


def dequantize(raw, qtype: int, shape) -> np.ndarray:
    """Raw GGUF bytes of `qtype` -> float32 array of `shape` (bit-exact with ggml)."""
    n = int(np.prod(shape))
    per, nbytes = BLOCK[qtype]
    b = np.frombuffer(raw, np.uint8, n // per * nbytes)
    if qtype == F32:
        return b.view(np.float32).reshape(shape).copy()
    if qtype == F16:
        return b.view(np.float16).astype(np.float32).reshape(shape)
    blocks = b.reshape(-1, nbytes)
    if qtype == Q4_K:
        return _dequant_q4_k(blocks).reshape(shape)
    if qtype == Q6_K:
        return _dequant_q6_k(blocks).reshape(shape)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # (n_blocks, 1)
    if qtype == Q8_0:
        return (d * blocks[:, 2:].view(np.int8).astype(np.float32)).reshape(shape)
    qs = blocks[:, 4:] if qtype == Q4_1 else blocks[:, 2:]
    q = np.concatenate([qs & 0xF, qs >> 4], axis=1).astype(np.float32)  # low nibbles are elements 0..15
    if qtype == Q4_1:
        m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        return (d * q + m).reshape(shape)
    return (d * (q - 8.0)).reshape(shape)


def _dequant_q4_k(blocks) -> np.ndarray:  # (n, 144) -> (n, 256), ggml dequantize_row_q4_K
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc = blocks[:, 4:16].astype(np.uint32)
    scale = np.empty((len(blocks), 8), np.float32)
    mins = np.empty((len(blocks), 8), np.float32)
    for j in range(8):  # get_scale_min_k4
        if j < 4:
            scale[:, j], mins[:, j] = sc[:, j] & 63, sc[:, j + 4] & 63
        else:
            scale[:, j] = (sc[:, j + 4] & 0xF) | ((sc[:, j - 4] >> 6) << 4)
            mins[:, j] = (sc[:, j + 4] >> 4) | ((sc[:, j] >> 6) << 4)
    qs = blocks[:, 16:].reshape(-1, 4, 32)
    q = np.stack([qs & 0xF, qs >> 4], axis=2).reshape(-1, 8, 32).astype(np.float32)  # sub-block 2i low, 2i+1 high
    return ((d * scale)[:, :, None] * q - (dmin * mins)[:, :, None]).reshape(-1, 256)


def _dequant_q6_k(blocks) -> np.ndarray:  # (n, 210) -> (n, 256), ggml dequantize_row_q6_K
    ql = blocks[:, 0:128].reshape(-1, 2, 64).astype(np.int32)
    qh = blocks[:, 128:192].reshape(-1, 2, 32).astype(np.int32)
    sc = blocks[:, 192:208].view(np.int8).astype(np.float32).reshape(-1, 2, 8)
    d = blocks[:, 208:210].copy().view(np.float16).astype(np.float32)[:, :, None]  # (n, 1, 1)
    out = np.empty((len(blocks), 2, 4, 32), np.float32)
    for g in range(4):
        lo = (ql[:, :, 32 * (g % 2):32 * (g % 2) + 32] >> (4 * (g // 2))) & 0xF
        q = (lo | (((qh >> (2 * g)) & 3) << 4)) - 32
        s = np.repeat(sc[:, :, 2 * g:2 * g + 2], 16, axis=2)  # scale index 2g + l // 16
        out[:, :, g] = d * s * q
    return out.reshape(-1, 256)


def random_weights(rng: np.random.Generator, qtype: int, rows: int, k: int, scale: float = 0.05) -> bytes:
    """Random but valid raw blocks: any nibble/int8 pattern, finite f16 scales of about `scale`."""
    if qtype == F32:
        return rng.normal(0, scale, (rows, k)).astype(np.float32).tobytes()
    if qtype == F16:
        return rng.normal(0, scale, (rows, k)).astype(np.float16).tobytes()
    per, nbytes = BLOCK[qtype]
    nb = rows * k // per
    blocks = rng.integers(0, 256, (nb, nbytes), dtype=np.uint8)
    if qtype in (Q4_K, Q6_K):  # scales are small ints (6-bit / int8): d is the unit of one step
        d = (rng.uniform(0.2, 1.0, nb) * scale / (15 * 32 if qtype == Q4_K else 32 * 64)).astype(np.float16)
        at = 208 if qtype == Q6_K else 0
        blocks[:, at:at + 2] = d.view(np.uint8).reshape(nb, 2)
        if qtype == Q4_K:
            dmin = (rng.uniform(0, 1.0, nb) * scale / 64).astype(np.float16)
            blocks[:, 2:4] = dmin.view(np.uint8).reshape(nb, 2)
        return blocks.tobytes()
    qmax = 127 if qtype == Q8_0 else 15
    d = (rng.uniform(0.2, 1.0, nb) * scale * 3 / qmax).astype(np.float16)
    blocks[:, 0:2] = d.view(np.uint8).reshape(nb, 2)
    if qtype == Q4_1:
        m = (-rng.uniform(0, 1.5, nb) * scale).astype(np.float16)
        blocks[:, 2:4] = m.view(np.uint8).reshape(nb, 2)
    return blocks.tobytes()


def embed(table, qtype: int, dim: int, ids) -> np.ndarray:  # -> (n_tokens, dim)
    ids = np.asarray(ids, np.int64)
    rb = row_bytes(qtype, dim)
    raw = np.frombuffer(table, np.uint8)
    return np.stack([dequantize(raw[i * rb:(i + 1) * rb].tobytes(), qtype, (dim,)) for i in ids])


def rmsnorm(x, w, eps: float) -> np.ndarray:  # x (rows, n), w (n,)
    x = np.asarray(x, np.float64)
    return (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w).astype(np.float32)


def rope(x, pos0: int, base: float, neox: bool, n_rot: int | None = None, freq_scale: float = 1.0):
    """x (n_tokens, n_heads, head_dim) -> rotated copy; token t at position pos0 + t."""
    x = np.array(x, np.float64)
    n_tokens, _, hd = x.shape
    n_rot = hd if n_rot is None else n_rot
    half = n_rot // 2
    pos = (pos0 + np.arange(n_tokens, dtype=np.float64))[:, None, None]
    theta = pos * freq_scale * base ** (-2.0 * np.arange(half) / n_rot)  # (t, 1, half)
    c, s = np.cos(theta), np.sin(theta)
    if neox:
        a, b = x[..., :half].copy(), x[..., half:n_rot].copy()
        x[..., :half], x[..., half:n_rot] = a * c - b * s, a * s + b * c
    else:
        a, b = x[..., 0:n_rot:2].copy(), x[..., 1:n_rot:2].copy()
        x[..., 0:n_rot:2], x[..., 1:n_rot:2] = a * c - b * s, a * s + b * c
    return x.astype(np.float32)


def attention(q, k_cache, v_cache, pos0: int, scale: float) -> np.ndarray:
    """Causal GQA. q (n_tokens, n_heads, hd); caches (n_kv, ctx, hd) -> (n_tokens, n_heads, hd).

    Query t (position pos0 + t) sees cache positions 0 ..= pos0 + t.
    """
    q = np.asarray(q, np.float64)
    n_tokens, n_heads, hd = q.shape
    group = n_heads // k_cache.shape[0]
    out = np.zeros_like(q)
    for t in range(n_tokens):
        n_keys = pos0 + t + 1
        for h in range(n_heads):
            k = k_cache[h // group, :n_keys].astype(np.float64)
            v = v_cache[h // group, :n_keys].astype(np.float64)
            s = k @ q[t, h] * scale
            p = np.exp(s - s.max())
            out[t, h] = p @ v / p.sum()
    return out.astype(np.float32)


def silu_mul(gate, up) -> np.ndarray:
    g = np.asarray(gate, np.float64)
    return (g / (1.0 + np.exp(-g)) * up).astype(np.float32)


def matvec(w_raw, qtype: int, rows: int, k: int, x) -> np.ndarray:
    """W (rows, k) in raw blocks times x (k,) or X (n, k) -> (rows,) or (n, rows), in float64."""
    w = dequantize(w_raw, qtype, (rows, k)).astype(np.float64)
    x = np.asarray(x, np.float64)
    return (x @ w.T).astype(np.float32)


def argmax(x) -> int:
    return int(np.argmax(np.asarray(x)))
