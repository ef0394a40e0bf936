"""A Llama (and Qwen2) forward pass on WebGPU: one stage (a contiguous layer range) of a
GGUF model, its weights in raw GGUF blocks on the GPU, its KV cache on the GPU.

    model = await GPULlama.load(dev, gguf, fetch_bytes, layers=range(a, b), n_ctx=2048)
    out = await model.forward(tokens, start_pos, output="argmax")

Same contract as NumpyLlama (the reference it is tested against): ``forward`` of n tokens at
``start_pos`` writes KV positions start_pos .. start_pos + n - 1 (overwriting what was
there: prefix reuse and replay) and attends causally to everything before them.
- input: token ids on the first stage (layers start at 0), else ``hidden_in``, the
  previous stage's hidden states (n_tokens, n_embd) float32.
- output: "logits" (n_vocab,) float32 of the LAST token, or "argmax" (int, lowest id on
  ties), on the last stage; "hidden" (n_tokens, n_embd) float32 on any stage.
- prefill (n > 1) runs the batched matmul kernels, up to ``max_batch`` tokens per submit
  (on CPU adapters the ops' CPU matmul variants; per-token matvecs on request, ``load(prefill=)``);
  decode (n = 1) records ONE batch for all layers (one command buffer, one submit) and
  reads back 8 bytes (argmax), n_vocab floats (logits) or n_embd floats (hidden).
- ``last_timings`` after each call: record_s (Python recording), run_s (encode, submit,
  GPU, readback), run_cpu_s (this thread's CPU time in run()), submits, total_s.
- ``generate_greedy(prompt, n, lookahead=k)``: k > 1 feeds each argmax to the next step on
  the GPU and reads k tokens back at once, overlapping CPU recording with GPU work.

Dispatches per token in decode, per layer (gpu/ops.py documents the kernels):
    matvec(wqkv, h -> qkv, fused RMSNorm)   [Qwen2: embed(bias) first, then accumulate]
    rope_kv(qkv -> cache)                   RoPE on Q and K, K and V stored at start_pos
    attention(qkv, cache -> att)            (+1 combine dispatch past 2 * 64 keys)
    matvec(wo, att -> h, +=)                residual fused
    matvec(wgate|up, h -> gu, fused RMSNorm)
    matvec(wdown, gu -> h, fused SwiGLU, +=)
plus embed first and matvec(output, fused final RMSNorm) + argmax last: 184 for SmolLM2.
wq|wk|wv raw bytes are concatenated into one matrix when the three share a quant type,
likewise gate|up; otherwise each is its own matvec writing its slice of the fused row.

numerics="ggml" (``load(numerics="ggml")``): llama.cpp's CPU arithmetic bit for bit instead of
float32 (gpu/ggml_ops.py: 8-bit activations before every matmul, f16 K/V, ggml's summation
orders; RoPE from a cos/sin table computed as glibc computes it, ``rope_table``), so logits and
greedy tokens equal llama.cpp's. Q4_1 / Q8_0 matrices only; 15 dispatches per layer.

Qwen2's q/k/v biases: the embed kernel with an F32 "table" of one row (the bias) and ids
all 0 broadcasts the bias into the QKV rows, and the projection then accumulates onto it.

Loading fetches only the tensors this stage needs (model/weights.py decides which), in
few requests: ``gguf.byte_ranges`` merged spans, cut at tensor boundaries into pieces of
at most ``chunk_bytes`` so that a tab never holds much more than one piece in memory.

Buffers (f32 unless noted; P = max_batch, d = n_embd, QKV = q_dim + 2 kv_dim, f = n_ff):
    kv[layer]  (2, n_head_kv, n_ctx, head_dim)  K heads then V heads
    ids (P,) u32, zero_ids (P,) u32, h (P, d), xn (P, d), qkv (P, QKV), att (P, q_dim),
    gu (P, 2f), act (P, f), logits (n_vocab,), best (2,) u32
"""

from __future__ import annotations

import asyncio
import inspect
import os
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Sequence

import numpy as np

from tabmesh.errors import GGUFError, UnsupportedQuantError
from tabmesh.gpu.device import Batch, Buffer, Device
from tabmesh.gpu.ggml_ops import GGML_TYPES, GgmlOps
from tabmesh.gpu.ops import EMBED_TYPES, MATMUL_TYPES, MATRIX_TYPES, Ops
from tabmesh.gpu.reference import F32, TYPE_NAMES

from .config import ContextLengthError, LlamaConfig, ModelConfigError, check_span
from .weights import check_layers, tensors_needed

# Pyodide has no time.thread_time; fall back to wall time there.
_thread_time = getattr(time, "thread_time", time.perf_counter)
DEFAULT_N_CTX = 2048
DEFAULT_MAX_BATCH = 512  # prefill tokens per submit (activation buffers are sized for it)
DEFAULT_CHUNK_BYTES = 64 << 20  # largest byte range fetched at once
OUTPUTS = ("logits", "argmax", "hidden")
NUMERICS = ("f32", "ggml")

FetchBytes = Callable[[int, int], "Awaitable[bytes] | bytes"]


def file_fetcher(path: str | os.PathLike) -> FetchBytes:
    """``fetch_bytes`` for a local file: bytes [start, end)."""
    async def fetch(start: int, end: int) -> bytes:
        with open(path, "rb") as f:
            f.seek(start)
            return f.read(end - start)

    return fetch


def plan_requests(gguf, names: Sequence[str], chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[tuple[int, int]]:
    """Byte ranges [start, end) to fetch for ``names``: ``gguf.byte_ranges`` (neighbours
    merged), each cut at tensor boundaries into pieces of at most ``chunk_bytes`` (a single
    larger tensor is one piece of its own)."""
    by_offset = sorted((gguf.tensors[n] for n in names), key=lambda t: t.offset)
    out: list[tuple[int, int]] = []
    for start, end in gguf.byte_ranges(names):
        lo = hi = start
        for t in by_offset:
            if t.offset < start or t.end > end:
                continue
            if hi > lo and t.end - lo > chunk_bytes:
                out.append((lo, hi))
                lo = t.offset
            hi = t.end
        out.append((lo, hi))
    return out


def ggml_rope_table(cfg: LlamaConfig, n_pos: int) -> np.ndarray:
    """numerics="ggml"'s RoPE table for positions 0 .. n_pos - 1: cos (n_pos, n_rot / 2) then
    sin, float32, as ggml_rope_cache_init computes them with the C library's powf/sincosf."""
    from .ggml_numerics import rope_cos_sin

    cos, sin = rope_cos_sin(cfg.rope_base, cfg.n_rot, cfg.rope_freq_scale, n_pos)
    return np.concatenate([cos.reshape(-1), sin.reshape(-1)])


@dataclass
class Mat:
    """A quantized matrix on the GPU in raw GGUF blocks; its rows land at column ``out_off``
    of the output row (q, k, v or gate, up slices of a fused row when not concatenated)."""

    buf: Buffer
    qtype: int
    rows: int
    k: int
    out_off: int = 0
    scales: Buffer | None = None  # numerics="ggml": buf holds the quants, this the block scales


@dataclass
class Layer:
    attn_norm: Buffer  # (n_embd,)
    ffn_norm: Buffer  # (n_embd,)
    qkv: list[Mat]  # one [wq|wk|wv] matrix, or three when their quant types differ
    qkv_bias: Buffer | None  # (QKV,) bq|bk|bv, Qwen2
    wo: Mat
    gate_up: list[Mat]  # one [gate|up] matrix, or two
    down: Mat
    kv: Buffer  # (2, n_head_kv, n_ctx, head_dim): K heads, then V heads


class GPULlama:
    """One stage of a Llama/Qwen2 model on a WebGPU device; see the module docstring."""

    def __init__(self, dev: Device, cfg: LlamaConfig, ops: Ops, layers: range, n_ctx: int, max_batch: int):
        self.dev, self.cfg, self.ops = dev, cfg, ops
        self.layers = layers
        self.is_first = layers.start == 0
        self.is_last = layers.stop == cfg.n_layers
        self.n_ctx = n_ctx
        self.max_batch = max_batch
        self.n_past = 0  # KV positions 0 .. n_past - 1 are filled
        self.blocks: list[Layer] = []
        self.tok_embd: Mat | None = None  # (n_vocab, n_embd), first stage
        self.output_norm: Buffer | None = None  # (n_embd,), last stage
        self.output: Mat | None = None  # (n_vocab, n_embd), last stage; tok_embd's buffer if tied
        self.weight_bytes = 0  # bytes of weights uploaded
        self.prefill_matmul = True  # False: prefill projections as per-token matvecs (see load)
        self.numerics = "f32"
        self.gops: GgmlOps | None = None  # numerics="ggml": its kernels, rope table and buffers
        self.rope_tab: Buffer | None = None
        self.xq: Buffer | None = None  # quantized activations: int8 quants, and (d, s) per block
        self.xd: Buffer | None = None
        self.last_timings: dict = {}
        # one call at a time: calls share the activation buffers, and a tab's event loop could
        # otherwise interleave two of them at their awaits
        self._busy = asyncio.Lock()
        c, P = cfg, max_batch
        self.qkv_dim = c.q_dim + 2 * c.kv_dim
        f32 = lambda n, label: dev.create_buffer(4 * n, label)  # noqa: E731
        self.ids = f32(P, "ids")
        self.zero_ids = dev.upload(np.zeros(P, np.uint32), "zero-ids")
        self.h, self.xn = f32(P * c.n_embd, "h"), f32(P * c.n_embd, "xn")
        self.qkv, self.att = f32(P * self.qkv_dim, "qkv"), f32(P * c.q_dim, "att")
        self.gu, self.act = f32(P * 2 * c.n_ff, "gu"), f32(P * c.n_ff, "act")
        self.logits = f32(c.n_vocab, "logits") if self.is_last else None
        self.best = f32(2, "argmax")

    # -- loading -----------------------------------------------------------------------------
    @classmethod
    async def load(cls, device: Device, gguf_file, fetch_bytes: FetchBytes, layers: range | None = None,
                   n_ctx: int = DEFAULT_N_CTX, *, max_batch: int = DEFAULT_MAX_BATCH,
                   chunk_bytes: int = DEFAULT_CHUNK_BYTES, matvec_tpr: int | None = None,
                   prefill: str = "auto", numerics: str = "f32",
                   rope_table: np.ndarray | None = None) -> "GPULlama":
        """Fetch this stage's tensors with ``await fetch_bytes(start, end)`` (a file read, or an
        HTTP Range request in a tab), upload them as raw GGUF blocks and compile the kernels.

        prefill: "matmul" (matmul kernels; on CPU adapters ops picks its barrier-free CPU variant)
        or "matvec" (one matvec per token and matrix, in the same single batch); "auto" = matmul.
        (The GPU-style tiled matmul was ~7x slower than per-token matvecs on lavapipe/SwiftShader,
        whose workgroup barriers are emulated; the CPU variant is 1.6-2.4x faster than them.)

        numerics: "f32" or "ggml" (module docstring). rope_table (ggml only): cos then sin,
        (positions >= n_ctx, n_rot / 2) float32 each, concatenated, as ``ggml_rope_table`` makes
        it; default: computed here (exact where the C library is glibc, as llama.cpp's is)."""
        if prefill not in ("auto", "matmul", "matvec"):
            raise ValueError(f"prefill must be 'auto', 'matmul' or 'matvec', got {prefill!r}")
        if numerics not in NUMERICS:
            raise ValueError(f"numerics must be one of {NUMERICS}, got {numerics!r}")
        gguf = gguf_file
        cfg = LlamaConfig.from_gguf(gguf)
        layers = check_layers(cfg, range(cfg.n_layers) if layers is None else layers)
        if not 0 < n_ctx <= cfg.n_ctx_train:
            raise ContextLengthError(f"n_ctx {n_ctx} must be between 1 and the model's trained context "
                                     f"length {cfg.n_ctx_train}")
        if cfg.head_dim % 4 or cfg.head_dim > 256:
            raise ModelConfigError(f"head_dim {cfg.head_dim}: the attention kernel needs a multiple of 4, at most 256")
        names = tensors_needed(cfg, gguf, layers)
        matrix_types, embed_types = set(), {F32}  # F32: the Qwen2 bias broadcast
        for name in names:
            t = gguf.tensors[name]
            if len(t.shape) == 1:
                continue
            if name == "token_embd.weight" and layers.start == 0:
                if t.ggml_type not in EMBED_TYPES:
                    raise UnsupportedQuantError(
                        f"token_embd.weight is {t.type_name}; the GPU embedding kernel reads "
                        f"{[TYPE_NAMES[q] for q in EMBED_TYPES]}: use a GGUF quantized with one of those "
                        f"for token_embd (e.g. llama-quantize --token-embedding-type q8_0)")
                embed_types.add(t.ggml_type)
            if name == "token_embd.weight" and not (layers.stop == cfg.n_layers and cfg.tied_output):
                continue  # an embedding table only, not a matrix
            if numerics == "ggml" and t.ggml_type not in GGML_TYPES:
                raise UnsupportedQuantError(
                    f"tensor {name!r} is {t.type_name}: numerics='ggml' runs Q4_1 and Q8_0 matrices "
                    f"(llama.cpp's arithmetic for others is not reproduced); use numerics='f32'")
            if t.ggml_type not in MATRIX_TYPES:
                raise UnsupportedQuantError(f"tensor {name!r} is {t.type_name}; the GPU matvec kernels run "
                                            f"{[TYPE_NAMES[q] for q in MATRIX_TYPES]}")
            matrix_types.add(t.ggml_type)
        # CPU adapters' attention: the query heads of one KV head in one invocation share its K/V
        # loads (SwiftShader, SmolLM2 at 560 keys: ~410 -> ~280 ms a token)
        ratio = cfg.n_head // cfg.n_head_kv
        group = max(g for g in (4, 3, 2, 1) if ratio % g == 0)
        ops = await Ops.create(device, head_dim=cfg.head_dim, matrix_types=tuple(sorted(matrix_types)),
                               embed_types=tuple(sorted(embed_types)), matvec_tpr=matvec_tpr,
                               attention_group=group)
        model = cls(device, cfg, ops, layers, n_ctx, max_batch)
        # "auto" is the matmul path everywhere now that ops has CPU-adapter matmul kernels
        # (measured 1.6-2.4x faster than per-token matvecs natively on lavapipe/SwiftShader).
        model.prefill_matmul = prefill in ("matmul", "auto")
        if numerics == "ggml":
            await model._setup_ggml(tuple(sorted(matrix_types)), rope_table)
        await model._load_weights(gguf, names, fetch_bytes, chunk_bytes)
        if numerics == "f32":
            model._prepare_matrices()
        return model

    async def _setup_ggml(self, matrix_types: tuple, rope_table: np.ndarray | None) -> None:
        cfg = self.cfg
        self.gops = await GgmlOps.create(self.dev, matrix_types, cfg.head_dim)
        if rope_table is None:
            rope_table = ggml_rope_table(cfg, self.n_ctx)
        tab = np.ascontiguousarray(rope_table, dtype=np.float32).reshape(-1)
        half = cfg.n_rot // 2
        if half == 0 or tab.size % (2 * half) or tab.size // (2 * half) < self.n_ctx:
            raise ValueError(f"rope_table of {tab.size} floats is not cos and sin for {self.n_ctx} positions "
                             f"x {half} frequencies")
        self.rope_tab_n = tab.size // (2 * half)
        self.rope_tab = self.dev.upload(tab, "ggml-rope")
        k_max = max(cfg.n_embd, cfg.q_dim, cfg.n_ff)
        blocks = self.max_batch * (k_max // 32)
        self.xq = self.dev.create_buffer(blocks * 32, "ggml-xq")
        self.xd = self.dev.create_buffer(blocks * 8, "ggml-xd")
        self.numerics = "ggml"

    def _prepare_matrices(self) -> None:
        """Repack every matrix for the CPU-adapter kernels now (a no-op on real GPUs), so the
        one-time cost lands in loading, not in the first prefill."""
        mats = [m for L in self.blocks for m in (*L.qkv, L.wo, *L.gate_up, L.down)]
        if self.output is not None:
            mats.append(self.output)
        for m in mats:
            self.ops.prepare_matrix(m.buf, m.qtype, m.rows, m.k)

    async def _load_weights(self, gguf, names: list[str], fetch_bytes: FetchBytes, chunk_bytes: int) -> None:
        cfg, dev = self.cfg, self.dev
        pending: dict[int, dict[str, memoryview]] = {i: {} for i in self.layers}
        want = {i: {n[len(f"blk.{i}."):] for n in names if gguf.layer_of(n) == i} for i in self.layers}
        blocks: dict[int, Layer] = {}
        for start, end in plan_requests(gguf, names, chunk_bytes):
            blob = fetch_bytes(start, end)
            if inspect.isawaitable(blob):
                blob = await blob
            if len(blob) != end - start:
                raise GGUFError(f"fetching bytes [{start}, {end}) of the GGUF gave {len(blob)} bytes, expected "
                                f"{end - start}: the file is truncated or the server ignored the Range header")
            for name in names:
                info = gguf.tensors[name]
                if not (start <= info.offset and info.end <= end):
                    continue
                raw = gguf.tensor_bytes(name, blob, start)
                i = gguf.layer_of(name)
                if i is None:
                    self._load_global(gguf, name, raw)
                    continue
                pending[i][name[len(f"blk.{i}."):]] = raw
                if set(pending[i]) == want[i]:
                    blocks[i] = self._make_layer(gguf, i, pending.pop(i))
        missing = [i for i in self.layers if i not in blocks]
        if missing:
            raise GGUFError(f"layers {missing} were not complete after fetching their byte ranges")
        self.blocks = [blocks[i] for i in self.layers]
        if self.is_last and self.output is None:
            raise GGUFError("no output matrix was loaded (output.weight or the tied token_embd.weight)")

    def _vector(self, gguf, name: str, raw) -> np.ndarray:
        return np.ascontiguousarray(gguf.tensor_array(name, raw), dtype=np.float32)

    def _upload(self, data, label: str) -> Buffer:
        buf = self.dev.upload(data, label)
        self.weight_bytes += buf.size
        return buf

    def _load_global(self, gguf, name: str, raw) -> None:
        cfg, info = self.cfg, gguf.tensors[name]
        if name == "output_norm.weight":
            self.output_norm = self._upload(self._vector(gguf, name, raw), name)
            return
        if name == "token_embd.weight":
            table = Mat(self._upload(raw, name), info.ggml_type, cfg.n_vocab, cfg.n_embd)
            if self.is_first:
                self.tok_embd = table
            if self.is_last and cfg.tied_output:
                self.output = table if self.gops is None else self._matrix(raw, info.ggml_type, cfg.n_vocab,
                                                                             cfg.n_embd, "output")
        elif name == "output.weight":
            self.output = self._matrix(raw, info.ggml_type, cfg.n_vocab, cfg.n_embd, name)

    def _fused(self, gguf, i: int, raws: dict, suffixes: Sequence[str], label: str) -> list[Mat]:
        """One matrix of the row-concatenated tensors when their types agree, else one each."""
        infos = [gguf.tensors[f"blk.{i}.{s}"] for s in suffixes]
        rows = [t.np_shape[0] for t in infos]
        k = infos[0].np_shape[1]
        if len({t.ggml_type for t in infos}) == 1:
            data = b"".join(bytes(raws[s]) for s in suffixes)
            return [self._matrix(data, infos[0].ggml_type, sum(rows), k, f"blk.{i}.{label}")]
        offs = np.cumsum([0] + rows[:-1])
        return [self._matrix(raws[s], t.ggml_type, r, k, f"blk.{i}.{s}", int(o))
                for s, t, r, o in zip(suffixes, infos, rows, offs)]

    def _matrix(self, raw, qtype: int, rows: int, k: int, label: str, out_off: int = 0) -> Mat:
        """A weight matrix on the GPU: its raw GGUF bytes, or in numerics="ggml" its quants and
        block scales apart (GgmlOps.repack)."""
        if self.gops is None:
            return Mat(self._upload(raw, label), qtype, rows, k, out_off)
        quants, scales = self.gops.repack(raw, qtype, rows, k)
        return Mat(self._upload(quants, label), qtype, rows, k, out_off, self._upload(scales, f"{label}-scales"))

    def _make_layer(self, gguf, i: int, raws: dict) -> Layer:
        cfg = self.cfg

        def mat(s: str) -> Mat:
            t = gguf.tensors[f"blk.{i}.{s}"]
            return self._matrix(raws[s], t.ggml_type, *t.np_shape, f"blk.{i}.{s}")

        def vec(s: str) -> np.ndarray:
            return self._vector(gguf, f"blk.{i}.{s}", raws[s])

        bias = None
        if "attn_q.bias" in raws:  # required for qwen2 (weights.tensors_needed checked), rare for llama
            zeros = lambda n: np.zeros(n, np.float32)  # noqa: E731
            parts = [vec(s) if s in raws else zeros(n) for s, n in
                     (("attn_q.bias", cfg.q_dim), ("attn_k.bias", cfg.kv_dim), ("attn_v.bias", cfg.kv_dim))]
            bias = self._upload(np.concatenate(parts), f"blk.{i}.qkv_bias")
        kv = self.dev.create_buffer(2 * cfg.n_head_kv * self.n_ctx * cfg.head_dim * 4, f"blk.{i}.kv")
        return Layer(attn_norm=self._upload(vec("attn_norm.weight"), f"blk.{i}.attn_norm"),
                     ffn_norm=self._upload(vec("ffn_norm.weight"), f"blk.{i}.ffn_norm"),
                     qkv=self._fused(gguf, i, raws, ("attn_q.weight", "attn_k.weight", "attn_v.weight"), "qkv"),
                     qkv_bias=bias, wo=mat("attn_output.weight"),
                     gate_up=self._fused(gguf, i, raws, ("ffn_gate.weight", "ffn_up.weight"), "gate_up"),
                     down=mat("ffn_down.weight"), kv=kv)

    # -- forward -----------------------------------------------------------------------------
    def reset(self) -> None:
        self.n_past = 0

    def _check(self, tokens, start_pos: int, output: str, hidden_in) -> tuple[int, np.ndarray]:
        """Validate one forward call; returns (n_tokens, ids or hidden states)."""
        cfg, stage = self.cfg, f"stage for layers {self.layers.start}..{self.layers.stop - 1}"
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if output != "hidden" and not self.is_last:
            raise ValueError(f"{stage} of {cfg.n_layers} has no logits: ask for output='hidden' and pass them on")
        if self.is_first:
            if hidden_in is not None:
                raise ValueError(f"{stage} embeds token ids itself; hidden_in is for later stages")
            x = np.asarray(tokens)
            if x.ndim != 1 or x.size == 0 or not np.issubdtype(x.dtype, np.integer):
                raise ValueError(f"the first stage takes a non-empty list of token ids, got {x.dtype} {x.shape}")
            bad = (x < 0) | (x >= cfg.n_vocab)
            if bad.any():
                raise ValueError(f"token id {int(x[bad][0])} is outside the vocabulary of {cfg.n_vocab} tokens")
            x = x.astype(np.uint32)
        else:
            if hidden_in is None:
                raise ValueError(f"{stage} takes the previous stage's hidden states: pass hidden_in")
            x = np.ascontiguousarray(hidden_in, dtype=np.float32)
            if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] != cfg.n_embd:
                raise ValueError(f"{stage} takes hidden_in of shape (n_tokens, {cfg.n_embd}), got {x.shape}")
            if tokens is not None and len(tokens) not in (0, x.shape[0]):
                raise ValueError(f"{len(tokens)} tokens but hidden_in holds {x.shape[0]} rows")
        n = x.shape[0]
        check_span(n, start_pos, self.n_ctx, self.n_past, cfg.n_ctx_train)
        return n, x

    async def forward(self, tokens: Sequence[int] | None, start_pos: int, *, output: str = "logits",
                      hidden_in: np.ndarray | None = None):
        """Run this stage on n tokens at positions start_pos ..; see the module docstring.
        Returns logits (n_vocab,) float32 | argmax int | hidden (n_tokens, n_embd) float32."""
        async with self._busy:
            return await self._forward(tokens, start_pos, output, hidden_in)

    async def _forward(self, tokens, start_pos: int, output: str, hidden_in):
        t0 = time.perf_counter()
        n, x = self._check(tokens, start_pos, output, hidden_in)
        P, d = self.max_batch, self.cfg.n_embd
        hidden_parts = []
        record_s = run_s = cpu_s = 0.0
        submits = 0
        for c0 in range(0, n, P):  # prefill in chunks of max_batch tokens, one submit each
            c1 = min(n, c0 + P)
            m, last = c1 - c0, c1 == n
            t = time.perf_counter()
            if self.is_first:
                self.dev.write(self.ids, x[c0:c1])
            else:
                self.dev.write(self.h, x[c0:c1])
            b = self.dev.batch("decode" if n == 1 else "prefill")
            self._record(b, m, start_pos + c0)
            reads = {}
            if output == "hidden":
                reads["hidden"] = b.read(self.h, 0, m * d * 4)
            elif last:
                self._record_head(b, (m - 1) * d)
                reads[output] = b.read(self.logits) if output == "logits" else b.read(self.best, 0, 8)
            t1, c = time.perf_counter(), _thread_time()
            if reads:
                res = await b.run()
            else:
                b.submit()
            run_s += time.perf_counter() - t1
            cpu_s += _thread_time() - c
            record_s += t1 - t
            submits += 1
            if output == "hidden":
                hidden_parts.append(np.frombuffer(res[reads["hidden"]], np.float32).reshape(m, d))
        self.n_past = start_pos + n
        self.last_timings = {
            "n_tokens": n, "submits": submits,
            "record_s": record_s,  # Python: validation, ops calls, uniform packing, writes
            "run_s": run_s,  # batch.run(): encode + submit + GPU + readback (wall)
            "run_cpu_s": cpu_s,  # this thread's CPU time inside run(): encode + submit + map
            "total_s": time.perf_counter() - t0,
        }
        if output == "hidden":
            return np.concatenate(hidden_parts) if len(hidden_parts) > 1 else hidden_parts[0]
        if output == "logits":
            return np.frombuffer(res[reads["logits"]], np.float32).copy()
        return int(np.frombuffer(res[reads["argmax"]], np.uint32)[0])

    def _record(self, b: Batch, n: int, pos0: int, ids: Buffer | None = None) -> None:
        """All layers of this stage for n tokens at pos0, h (n, n_embd) in and out; the first
        stage embeds the token ids in ``ids`` (default self.ids) first."""
        cfg, o = self.cfg, self.ops
        d, eps = cfg.n_embd, cfg.rms_eps
        if self.is_first:
            e = self.tok_embd
            o.embed(b, self.ids if ids is None else ids, e.buf, self.h, qtype=e.qtype, n_tokens=n, dim=d)
        if self.gops is not None:
            for L in self.blocks:
                self._record_ggml_layer(b, L, n, pos0)
            return
        for L in self.blocks:
            if n == 1:
                self._record_decode_layer(b, L, pos0)
                continue
            o.rmsnorm(b, self.h, L.attn_norm, self.xn, n_rows=n, n=d, eps=eps)
            self._bias(b, L, n)
            self._project(b, L.qkv, self.xn, self.qkv, n, self.qkv_dim, accumulate=L.qkv_bias is not None)
            self._attend(b, L, n, pos0)
            self._project(b, [L.wo], self.att, self.h, n, d, accumulate=True)
            o.rmsnorm(b, self.h, L.ffn_norm, self.xn, n_rows=n, n=d, eps=eps)
            self._project(b, L.gate_up, self.xn, self.gu, n, 2 * cfg.n_ff)
            o.silu_mul(b, self.gu, self.act, n_tokens=n, n=cfg.n_ff)
            self._project(b, [L.down], self.act, self.h, n, d, accumulate=True)

    def _record_decode_layer(self, b: Batch, L: Layer, pos: int) -> None:
        cfg, o = self.cfg, self.ops
        d, eps = cfg.n_embd, cfg.rms_eps
        self._bias(b, L, 1)
        for m in L.qkv:
            o.matvec(b, m.buf, self.h, self.qkv, qtype=m.qtype, rows=m.rows, k=m.k, y_off=m.out_off,
                     norm_weight=L.attn_norm, eps=eps, accumulate=L.qkv_bias is not None)
        self._attend(b, L, 1, pos)
        o.matvec(b, L.wo.buf, self.att, self.h, qtype=L.wo.qtype, rows=d, k=cfg.q_dim, accumulate=True)
        for m in L.gate_up:
            o.matvec(b, m.buf, self.h, self.gu, qtype=m.qtype, rows=m.rows, k=m.k, y_off=m.out_off,
                     norm_weight=L.ffn_norm, eps=eps)
        o.matvec(b, L.down.buf, self.gu, self.h, qtype=L.down.qtype, rows=d, k=cfg.n_ff, silu_up_off=cfg.n_ff,
                 accumulate=True)

    def _ggml_project(self, b: Batch, mats: list[Mat], x: Buffer, y: Buffer, n: int, y_stride: int,
                      accumulate: bool = False, bias: Buffer | None = None) -> None:
        """numerics="ggml": quantize x (n rows of k) as each matrix type needs, then y (+)= W x."""
        g, done = self.gops, None
        for m in mats:
            if done != m.qtype:
                g.quantize(b, x, self.xq, self.xd, n_rows=n, k=m.k, qtype=m.qtype)
                done = m.qtype
            g.matmul(b, m.buf, m.scales, self.xq, self.xd, y, qtype=m.qtype, rows=m.rows, k=m.k, n_tokens=n, y_stride=y_stride,
                     y_off=m.out_off, accumulate=accumulate, bias=bias, bias_off=m.out_off)

    def _record_ggml_layer(self, b: Batch, L: Layer, n: int, pos0: int) -> None:
        cfg, g = self.cfg, self.gops
        d, eps, hd = cfg.n_embd, cfg.rms_eps, cfg.head_dim
        g.rmsnorm(b, self.h, L.attn_norm, self.xn, n_rows=n, n=d, eps=eps)
        self._ggml_project(b, L.qkv, self.xn, self.qkv, n, self.qkv_dim, bias=L.qkv_bias)
        g.rope_kv(b, self.qkv, L.kv, self.rope_tab, tab_n=self.rope_tab_n, n_tokens=n, n_heads=cfg.n_head,
                  n_kv_heads=cfg.n_head_kv, head_dim=hd, n_rot=cfg.n_rot, pos0=pos0, ctx=self.n_ctx,
                  qkv_stride=self.qkv_dim, neox=cfg.rope_neox)
        g.attention(b, self.qkv, L.kv, self.att, n_tokens=n, n_heads=cfg.n_head, n_kv_heads=cfg.n_head_kv,
                    head_dim=hd, pos0=pos0, ctx=self.n_ctx, q_stride=self.qkv_dim)
        self._ggml_project(b, [L.wo], self.att, self.h, n, d, accumulate=True)
        g.rmsnorm(b, self.h, L.ffn_norm, self.xn, n_rows=n, n=d, eps=eps)
        self._ggml_project(b, L.gate_up, self.xn, self.gu, n, 2 * cfg.n_ff)
        g.swiglu(b, self.gu, self.act, n_tokens=n, n=cfg.n_ff)
        self._ggml_project(b, [L.down], self.act, self.h, n, d, accumulate=True)

    def _bias(self, b: Batch, L: Layer, n: int) -> None:
        """Broadcast the q|k|v bias into the n QKV rows (the projection accumulates onto it)."""
        if L.qkv_bias is not None:
            self.ops.embed(b, self.zero_ids, L.qkv_bias, self.qkv, qtype=F32, n_tokens=n, dim=self.qkv_dim)

    def _attend(self, b: Batch, L: Layer, n: int, pos0: int) -> None:
        cfg, o = self.cfg, self.ops
        v_off = cfg.n_head_kv * self.n_ctx * cfg.head_dim
        o.rope_kv(b, self.qkv, L.kv, n_tokens=n, n_heads=cfg.n_head, n_kv_heads=cfg.n_head_kv,
                  head_dim=cfg.head_dim, ctx=self.n_ctx, pos0=pos0, base=cfg.rope_base, neox=cfg.rope_neox,
                  k_off=0, v_off=v_off, n_rot=cfg.n_rot, freq_scale=cfg.rope_freq_scale)
        o.attention(b, self.qkv, L.kv, self.att, n_tokens=n, n_heads=cfg.n_head, n_kv_heads=cfg.n_head_kv,
                    head_dim=cfg.head_dim, ctx=self.n_ctx, pos0=pos0, k_off=0, v_off=v_off, q_stride=self.qkv_dim)

    def _project(self, b: Batch, mats: list[Mat], x: Buffer, y: Buffer, n: int, y_stride: int,
                 accumulate: bool = False) -> None:
        """Y[t, m.out_off:] (+)= X[t] W_m^T for n tokens: matmul, or per-token matvecs (CPU
        adapters; quant types with no matmul kernel, i.e. K-quants)."""
        for m in mats:
            if self.prefill_matmul and m.qtype in MATMUL_TYPES:
                self.ops.matmul(b, m.buf, x, y, qtype=m.qtype, n_tokens=n, rows=m.rows, k=m.k,
                                y_stride=y_stride, y_off=m.out_off, accumulate=accumulate)
            else:
                for t in range(n):
                    self.ops.matvec(b, m.buf, x, y, qtype=m.qtype, rows=m.rows, k=m.k, x_off=t * m.k,
                                    y_off=t * y_stride + m.out_off, accumulate=accumulate)

    def _record_head(self, b: Batch, h_off: int, best: Buffer | None = None) -> None:
        """Logits of the token whose hidden state is at h[h_off:], final RMSNorm fused, and their
        argmax into ``best`` (default self.best): [token id u32, its logit f32 bits]."""
        cfg, out = self.cfg, self.output
        if self.gops is not None:
            self.gops.rmsnorm(b, self.h, self.output_norm, self.xn, n_rows=1, n=cfg.n_embd, eps=cfg.rms_eps,
                              x_off=h_off)
            self._ggml_project(b, [out], self.xn, self.logits, 1, cfg.n_vocab)
        else:
            self.ops.matvec(b, out.buf, self.h, self.logits, qtype=out.qtype, rows=cfg.n_vocab, k=cfg.n_embd,
                            x_off=h_off, norm_weight=self.output_norm, eps=cfg.rms_eps)
        self.ops.argmax(b, self.logits, self.best if best is None else best, n=cfg.n_vocab)

    async def generate_greedy(self, prompt: Sequence[int], n_new: int, stop: Sequence[int] = (), *,
                              lookahead: int = 1) -> list[int]:
        """Temperature 0 on a whole model: prefill ``prompt`` at 0, then up to n_new argmax tokens
        (stopping after one in ``stop``).

        lookahead=1: one ``forward(output="argmax")`` per token: submit, wait, 8 bytes back.
        lookahead=k>1: each step embeds the previous step's argmax straight from GPU memory, and
        k steps (one submit each) go out before their k token ids come back in one copy batch,
        so the CPU records token t+1 while the GPU computes token t. Up to k-1 steps past a stop
        token are computed and dropped (their K/V lie past n_past: overwritten later).
        ``last_timings`` then splits the CPU cost per token into recording and encode+submit.
        """
        if not (self.is_first and self.is_last):
            raise ValueError(f"generate_greedy needs all {self.cfg.n_layers} layers")
        async with self._busy:
            return await self._generate_greedy(prompt, n_new, stop, lookahead)

    async def _generate_greedy(self, prompt, n_new: int, stop, lookahead: int) -> list[int]:
        t0 = time.perf_counter()
        out = [await self._forward(list(prompt), 0, "argmax", None)]
        t_prefill = time.perf_counter()
        record_s = submit_s = 0.0
        if lookahead <= 1:
            while out[-1] not in stop and len(out) < n_new:
                out.append(await self._forward([out[-1]], len(prompt) + len(out) - 1, "argmax", None))
                record_s += self.last_timings["record_s"]
                submit_s += self.last_timings["run_s"]
        else:
            slots = getattr(self, "_argmax_slots", [])
            slots += [self.dev.create_buffer(8, f"argmax-{j}") for j in range(len(slots), lookahead)]
            self._argmax_slots = slots
            prev = self.best  # holds the prefill's argmax, i.e. out[0]
            while out[-1] not in stop and len(out) < n_new:
                k = min(lookahead, n_new - len(out))
                pos = len(prompt) + len(out) - 1  # position of the token fed to the first step
                if pos + k > self.n_ctx:
                    raise ContextLengthError(f"generating to position {pos + k - 1} overflows the context of "
                                             f"{self.n_ctx}; load with a larger n_ctx or generate fewer tokens")
                for j in range(k):
                    t = time.perf_counter()
                    b = self.dev.batch("decode")
                    self._record(b, 1, pos + j, ids=prev)
                    self._record_head(b, 0, best=slots[j])
                    t1 = time.perf_counter()
                    b.submit()
                    record_s += t1 - t
                    submit_s += time.perf_counter() - t1
                    prev = slots[j]
                rb = self.dev.batch("tokens")
                reads = [rb.read(slots[j], 0, 4) for j in range(k)]
                res = await rb.run()
                for r in reads:
                    out.append(int(np.frombuffer(res[r], np.uint32)[0]))
                    if out[-1] in stop:
                        break
        self.n_past = len(prompt) + len(out) - 1
        n_dec = max(1, len(out) - 1)
        t1 = time.perf_counter()
        self.last_timings = {"n_tokens": len(out), "lookahead": lookahead, "prefill_s": t_prefill - t0,
                             "decode_s": t1 - t_prefill, "decode_tok_per_s": (len(out) - 1) / (t1 - t_prefill),
                             "record_s_per_token": record_s / n_dec,
                             # lookahead > 1: encode + submit; 1: run() (encode, submit, GPU, readback)
                             "submit_s_per_token" if lookahead > 1 else "run_s_per_token": submit_s / n_dec}
        return out
