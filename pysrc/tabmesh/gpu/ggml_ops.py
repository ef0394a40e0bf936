"""numerics="ggml" on WebGPU: the kernels that compute what llama.cpp's CPU backend computes,
bit for bit (model/ggml_numerics.py states every op in numpy; tests compare the two exactly).

Why a second set of kernels: the float32 forward pass (ops.py) is within ~1 logit of
llama.cpp, which rounds activations to 8 bits before every matmul and keeps K/V in f16;
through 30 layers one rounding the other way moves the rest, so greedy tokens part where
llama.cpp's top two are close. These kernels do llama.cpp's roundings and its summation
orders (wgsl/ggml_*.wgsl say which), so the tokens are llama.cpp's.

A layer (T tokens; decode T = 1, which also picks ggml's 64-lane f16 dot products):
    rmsnorm -> quantize (Q8_1 for Q4_1 weights, Q8_0 for Q8_0) -> matmul q|k|v (+ bias)
    rope_kv (RoPE from a cos/sin table the CPU computed as glibc does; Q, K, V to f16)
    attn_scores (per key) -> attn_softmax (per row) -> attn_out -> quantize -> matmul wo (+= residual)
    rmsnorm -> quantize -> matmul gate|up -> swiglu -> quantize -> matmul down (+= residual)
Weights: Q4_1 and Q8_0 only (ggml's Q4_0 path is a repacked kernel on AVX2; K-quants need
Q8_K activations): others are refused with the tensor's name, as in ggml_numerics.

WGSL allows 2.5 ulp for division and sqrt and does not promise a fused fma; the probe run by
``GgmlOps.create`` finds what the adapter has (NVIDIA: fused fma, inexact division; lavapipe
and SwiftShader: exact division and sqrt, unfused fma) and the kernels emulate the rest
exactly (wgsl/ggml_lib.wgsl), which the probe checks too.
"""

from __future__ import annotations

import numpy as np

from .device import Batch, Buffer, Device
from .errors import GPUError
from .ops import _cdiv, _need, cpu_workgroup_size, split_grid
from .reference import Q4_1, Q8_0, TYPE_NAMES

GGML_TYPES = (Q4_1, Q8_0)
QUANT_BYTES = {Q4_1: 16, Q8_0: 32}  # a block's quants, apart from its scales (``repack``)
BLOCK_BYTES = {Q4_1: 20, Q8_0: 34}


class AdapterNumericsError(GPUError):
    """The adapter's float32 division or square root is not correctly rounded."""


def probe_inputs(n: int = 4096, seed: int = 7) -> np.ndarray:
    """(n, 3) float32 a, b, c spread over many binades (half of them chosen so that a * b + c
    cancels, where a fused and an unfused fma differ most)."""
    rng = np.random.default_rng(seed)
    a = (rng.standard_normal(n) * np.exp2(rng.integers(-20, 20, n))).astype(np.float32)
    b = (rng.standard_normal(n) * np.exp2(rng.integers(-20, 20, n))).astype(np.float32)
    c = (rng.standard_normal(n) * np.exp2(rng.integers(-20, 20, n))).astype(np.float32)
    half = n // 2
    c[:half] = -(a[:half] * b[:half]) * np.float32(1 + 2 ** -20)
    return np.stack([a, b, c], axis=1)


class GgmlOps:
    """Records the numerics="ggml" kernels into a Batch; see the module docstring."""

    def __init__(self, dev: Device, kernels: dict, fused_fma: bool, matmul_wg: int = 64):
        self.dev, self.k, self.fused_fma, self.matmul_wg = dev, kernels, fused_fma, matmul_wg
        self.arithmetic: dict = {}  # the probe's findings: FUSED_FMA, EXACT_DIV, EXACT_SQRT
        self._bufs: dict[str, Buffer] = {}

    @classmethod
    async def create(cls, dev: Device, matrix_types=GGML_TYPES, head_dim: int = 64) -> "GgmlOps":
        bad = [TYPE_NAMES.get(t, t) for t in matrix_types if t not in GGML_TYPES]
        if bad:
            raise ValueError(f"numerics='ggml' runs Q4_1 and Q8_0 matrices, not {bad}")
        c = await cls.probe(dev)
        k = {name: await dev.kernel(f"ggml_{name}", **c)
             for name in ("rmsnorm", "quantize", "rope_kv", "swiglu", "attn_softmax")}
        for lanes in (16, 64):
            k[f"attn_out_{lanes}"] = await dev.kernel("ggml_attn_out", LANES=lanes)
        ops = cls(dev, k, c["FUSED_FMA"], 64)
        ops.arithmetic = c
        wg = cpu_workgroup_size(dev) if dev.info.get("cpu_adapter") else 64  # CPU: its SIMD width
        for t in sorted(set(matrix_types)):
            k[f"matmul_{t}"] = await dev.kernel("ggml_matmul", QTYPE=t, WG=wg, **c)
        ops.matmul_wg = wg
        await ops.compile_attention(head_dim)
        return ops

    @staticmethod
    async def _run_probe(dev: Device, abc: np.ndarray, constants: dict) -> np.ndarray:
        n = abc.shape[0]
        kern = await dev.kernel("ggml_probe", **constants)
        src, out = dev.upload(abc.reshape(-1)), dev.create_buffer(24 * n, "ggml-probe")
        b = dev.batch("ggml-probe")
        b.dispatch(kern, (_cdiv(n, 64), 1, 1), abc=src, out=out, n=n, zero=0)
        r = b.read(out)
        got = np.frombuffer((await b.run())[r], np.float32).reshape(n, 6)
        dev.destroy_buffer(src)
        dev.destroy_buffer(out)
        return got

    @classmethod
    async def probe(cls, dev: Device) -> dict:
        """Run wgsl/ggml_probe.wgsl: which of fma (fused), / and sqrt (correctly rounded) the
        adapter has natively, as override constants for the kernels; then, compiled with those,
        check that the emulations are exact. Raises AdapterNumericsError if they are not."""
        abc = probe_inputs()
        a, bb, c = (abc[:, i] for i in range(3))
        fused = (a.astype(np.float64) * bb + c.astype(np.float64)).astype(np.float32)  # ties ~2^-29
        with np.errstate(all="ignore"):
            want = {1: a / bb, 2: np.sqrt(np.abs(a)), 3: fused}
        native = await cls._run_probe(dev, abc, {"FUSED_FMA": False, "EXACT_DIV": True, "EXACT_SQRT": True})
        constants = {"FUSED_FMA": bool(np.array_equal(native[:, 0], fused)),
                     "EXACT_DIV": bool(np.array_equal(native[:, 1], want[1])),
                     "EXACT_SQRT": bool(np.array_equal(native[:, 2], want[2]))}
        got = await cls._run_probe(dev, abc, constants)
        for col, ref, what in ((3, want[3], "fma"), (4, want[1], "division"), (5, want[2], "square root")):
            wrong = int(np.count_nonzero(got[:, col] != ref))
            if wrong:
                raise AdapterNumericsError(
                    f"numerics='ggml' needs correctly rounded float32 {what}, and on this adapter its "
                    f"emulation is off in {wrong} of {len(abc)} probes: use numerics='f32' here")
        return constants

    @staticmethod
    def repack(raw, qtype: int, rows: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw GGUF blocks -> (quants, scales): the quants of every block back to back (16 B of
        nibbles for Q4_1, 32 int8 for Q8_0: whole 16-byte loads) and one u32 per block (f16 d
        and f16 m for Q4_1, f16 d for Q8_0). On SwiftShader a storage load costs about the same
        for 16 bytes as for 4, and Q8_0's 34-byte blocks are not even word-aligned."""
        if qtype not in GGML_TYPES or k % 32:
            raise ValueError(f"ggml repack: {TYPE_NAMES.get(qtype, qtype)} {rows}x{k} is not a Q4_1 / Q8_0 "
                             f"matrix of whole blocks")
        n = rows * (k // 32)
        data = np.frombuffer(raw, np.uint8) if not isinstance(raw, np.ndarray) else raw.reshape(-1).view(np.uint8)
        if data.size != n * BLOCK_BYTES[qtype]:
            raise ValueError(f"ggml repack: {data.size} bytes is not a {TYPE_NAMES[qtype]} {rows}x{k} matrix")
        blocks = data.reshape(n, BLOCK_BYTES[qtype])
        head = 4 if qtype == Q4_1 else 2
        quants = np.ascontiguousarray(blocks[:, head:]).view(np.uint32).reshape(-1)
        scales = np.zeros((n, 4), np.uint8)
        scales[:, :head] = blocks[:, :head]
        return quants, scales.view(np.uint32).reshape(-1)

    def scratch(self, purpose: str, nbytes: int) -> Buffer:
        """An ops-owned buffer of at least nbytes, grown on demand (the old one is dropped, not
        destroyed: a batch not yet submitted may still use it)."""
        buf = self._bufs.get(purpose)
        if buf is None or buf.size < nbytes:
            size = max(nbytes, 2 * buf.size if buf else 0, 4096)
            buf = self._bufs[purpose] = self.dev.create_buffer(size, f"ggml-{purpose}")
        return buf

    # -- ops --------------------------------------------------------------------------------
    def rmsnorm(self, b: Batch, x: Buffer, w: Buffer, y: Buffer, *, n_rows: int, n: int, eps: float,
                x_off: int = 0, x_stride: int | None = None) -> None:
        """y (n_rows, n) = rmsnorm(rows of x at x_off + r * x_stride) * w."""
        x_stride = n if x_stride is None else x_stride
        _need(x, x_off + (n_rows - 1) * x_stride + n, "ggml rmsnorm x")
        _need(w, n, "ggml rmsnorm w")
        _need(y, n_rows * n, "ggml rmsnorm y")
        b.dispatch(self.k["rmsnorm"], (_cdiv(n_rows, 64), 1, 1), x=x, w=w, y=y, n_rows=n_rows, n=n,
                   x_off=x_off, x_stride=x_stride, eps=float(np.float32(eps)), zero=0)

    def quantize(self, b: Batch, x: Buffer, xq: Buffer, xd: Buffer, *, n_rows: int, k: int, qtype: int,
                 x_off: int = 0, x_stride: int | None = None) -> None:
        """Rows of x -> the activation blocks a ``qtype`` matmul takes (Q8_1 / Q8_0): int8
        quants into xq (8 words a block), (d, s) into xd (2 floats a block)."""
        if k % 32:
            raise ValueError(f"ggml quantize: rows of {k} are not whole blocks of 32")
        x_stride = k if x_stride is None else x_stride
        n = n_rows * (k // 32)
        _need(x, x_off + (n_rows - 1) * x_stride + k, "ggml quantize x")
        _need(xq, 8 * n, "ggml quantize xq")
        _need(xd, 2 * n, "ggml quantize xd")
        b.dispatch(self.k["quantize"], split_grid(_cdiv(n, 64)), x=x, xq=xq, xd=xd, n_rows=n_rows,
                   k=k, x_off=x_off, x_stride=x_stride, with_sum=int(qtype == Q4_1), c127=127.0, zero=0)

    def matmul(self, b: Batch, wq: Buffer, wd: Buffer, xq: Buffer, xd: Buffer, y: Buffer, *, qtype: int,
               rows: int, k: int, n_tokens: int, y_stride: int, y_off: int = 0, accumulate: bool = False,
               bias: Buffer | None = None, bias_off: int = 0) -> None:
        """y[t * y_stride + y_off + r] (+)= (W x_t)[r] (+ bias[bias_off + r]); W as ``repack``
        gives it (wq quants, wd scales), x as ``quantize`` gives it."""
        key = f"matmul_{qtype}"
        if key not in self.k:
            raise ValueError(f"no ggml matmul compiled for {TYPE_NAMES.get(qtype, qtype)}")
        nb = k // 32
        _need(wq, rows * nb * QUANT_BYTES[qtype] // 4, "ggml matmul weights")
        _need(wd, rows * nb, "ggml matmul scales")
        _need(xq, n_tokens * nb * 8, "ggml matmul xq")
        _need(xd, n_tokens * nb * 2, "ggml matmul xd")
        _need(y, (n_tokens - 1) * y_stride + y_off + rows, "ggml matmul y")
        if bias is not None:
            _need(bias, bias_off + rows, "ggml matmul bias")
        b.dispatch(self.k[key], split_grid(_cdiv(rows * n_tokens, self.matmul_wg)), wq=wq, wd=wd, xq=xq, xd=xd, y=y,
                   bias=bias if bias is not None else self.scratch("no-bias", 16), rows=rows, k=k,
                   n_tokens=n_tokens, y_stride=y_stride, y_off=y_off, acc_y=int(accumulate),
                   has_bias=int(bias is not None), bias_off=bias_off, zero=0)

    def rope_kv(self, b: Batch, qkv: Buffer, cache: Buffer, tab: Buffer, *, tab_n: int, n_tokens: int,
                n_heads: int, n_kv_heads: int, head_dim: int, n_rot: int, pos0: int, ctx: int,
                qkv_stride: int, neox: bool) -> None:
        q_dim, kv_dim = n_heads * head_dim, n_kv_heads * head_dim
        if pos0 + n_tokens > tab_n or pos0 + n_tokens > ctx:
            raise ValueError(f"ggml rope_kv: positions up to {pos0 + n_tokens - 1} beyond the table "
                             f"({tab_n}) or the cache ({ctx})")
        _need(qkv, (n_tokens - 1) * qkv_stride + q_dim + 2 * kv_dim, "ggml rope_kv qkv")
        _need(cache, 2 * kv_dim * ctx, "ggml rope_kv cache")
        _need(tab, tab_n * n_rot, "ggml rope table")
        slots = n_heads + 2 * n_kv_heads
        b.dispatch(self.k["rope_kv"], (_cdiv(n_tokens * slots, 64), 1, 1), qkv=qkv, tab=tab, cache=cache,
                   n_tokens=n_tokens, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
                   n_rot=n_rot, pos0=pos0, ctx=ctx, qkv_stride=qkv_stride, k_off=q_dim,
                   v_off=q_dim + kv_dim, neox=int(neox), cache_v_off=kv_dim * ctx, tab_n=tab_n, zero=0)

    def attention(self, b: Batch, qkv: Buffer, cache: Buffer, out: Buffer, *, n_tokens: int, n_heads: int,
                  n_kv_heads: int, head_dim: int, pos0: int, ctx: int, q_stride: int) -> None:
        """out (n_tokens, n_heads * head_dim): causal GQA over the cache's positions 0 ..
        pos0 + t, as llama.cpp computes it for a batch of n_tokens (64 lanes when 1, else 16)."""
        if n_heads % n_kv_heads:
            raise ValueError(f"ggml attention: {n_heads} heads not a multiple of {n_kv_heads} KV heads")
        lanes = 64 if n_tokens == 1 else 16
        n_keys = pos0 + n_tokens
        key = f"attn_scores_{lanes}_{head_dim}"
        if key not in self.k:
            raise ValueError(f"ggml attention for head_dim {head_dim} was not compiled (call "
                             f"compile_attention first)")
        probs = self.scratch("probs", 4 * n_tokens * n_heads * n_keys)
        _need(out, n_tokens * n_heads * head_dim, "ggml attention out")
        scale = float(np.float32(1.0) / np.sqrt(np.float32(head_dim)))
        b.dispatch(self.k[key], split_grid(_cdiv(n_tokens * n_heads * n_keys, 64)), qkv=qkv, cache=cache,
                   scores=probs, n_tokens=n_tokens, n_heads=n_heads, n_kv_heads=n_kv_heads, pos0=pos0, ctx=ctx,
                   q_stride=q_stride, n_keys=n_keys, scale=scale)
        b.dispatch(self.k["attn_softmax"], (_cdiv(n_tokens * n_heads, 64), 1, 1), scores=probs,
                   n_tokens=n_tokens, n_heads=n_heads, pos0=pos0, n_keys=n_keys, zero=0)
        b.dispatch(self.k[f"attn_out_{lanes}"], split_grid(_cdiv(n_tokens * n_heads * head_dim, 64)),
                   probs=probs, cache=cache, out=out, n_tokens=n_tokens, n_heads=n_heads,
                   n_kv_heads=n_kv_heads, head_dim=head_dim, pos0=pos0, ctx=ctx, n_keys=n_keys,
                   v_off=n_kv_heads * ctx * head_dim)

    async def compile_attention(self, head_dim: int) -> None:
        """The attention score kernels for this head size (a constant: their loops unroll)."""
        if head_dim > 256 or head_dim % 4:
            raise ValueError(f"ggml attention: head_dim {head_dim} must be a multiple of 4, at most 256")
        for lanes in (16, 64):
            self.k[f"attn_scores_{lanes}_{head_dim}"] = await self.dev.kernel("ggml_attn_scores", LANES=lanes,
                                                                               HD=head_dim)

    def swiglu(self, b: Batch, gu: Buffer, out: Buffer, *, n_tokens: int, n: int,
               in_stride: int | None = None) -> None:
        in_stride = 2 * n if in_stride is None else in_stride
        _need(gu, (n_tokens - 1) * in_stride + 2 * n, "ggml swiglu in")
        _need(out, n_tokens * n, "ggml swiglu out")
        b.dispatch(self.k["swiglu"], split_grid(_cdiv(n_tokens * n, 64)), gu=gu, out=out, n_tokens=n_tokens,
                   n=n, in_stride=in_stride, one=1.0, zero=0)
