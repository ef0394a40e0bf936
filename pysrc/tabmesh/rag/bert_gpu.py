"""The MiniLM (BERT) sentence encoder on WebGPU: the same model as rag/bert_numpy.py (its
reference, and the fallback of a tab without WebGPU), on the kernels of wgsl/. Only the
backend-neutral gpu.Device API is used, so it runs in a tab (Pyodide) as natively.

    emb = await load_gpu_embedder(dev, "models/all-MiniLM-L6-v2")    # or a SentenceEmbedder
    vecs = await emb.embed_async(["a sentence", "another one"])      # (2, 384) float32

    model = await GPUBert.create(dev, cfg, weights)                  # BertConfig, BertWeights
    vecs = await model.embed(batch)                                  # a padded wordpiece Batch

One ``embed`` records the whole batch into ONE command submission (more only past
``max_batch_tokens`` padded tokens) and reads back only the pooled embeddings, B x H
floats. Dispatches for B sequences padded to T tokens (rows M = B T, H = 384, I = 1536):

    bert_embed     word[ids] + pos[t] + type[type_ids] -> h          (M, H)
    layernorm      h -> x
    6 x:
      matmul_f32_bias  x @ w_qkv + b_qkv -> qkv                      (M, 3H)
      bert_attention   qkv, mask -> att                              (M, H)
      matmul_f32_bias  att @ w_o + b_o + x -> h                      residual fused
      layernorm        h -> x                                        post-LN, as BERT
      matmul_f32_bias  gelu(x @ w_in + b_in) -> ff                   (M, I), exact GELU fused
      matmul_f32_bias  ff @ w_out + b_out + x -> h                   residual fused
      layernorm        h -> x
    mean_pool      x, mask -> out                                    (B, H), L2-normalized

45 dispatches for MiniLM. Padding rows are computed like the others (the attention and the
pooling ignore them through the mask); SentenceEmbedder batches texts of similar length, so
little is wasted.

Weights are uploaded once, as BertWeights holds them ((in, out) matrices, q|k|v fused), f32:
90 MB for MiniLM. Activation buffers grow to the largest batch seen and are reused.

Speed (native wgpu, MiniLM shapes): on an H100, 9,000 texts/s in batches of 32 x 16 tokens,
4,200 at 128 tokens, 1,100 at 256, plus a fixed ~3.5 ms a call (encoding 45 dispatches and
the readback round trip), i.e. ~260 single texts/s. On a CPU adapter (lavapipe, 2 cores) it
runs at about a tenth of NumpyBert's speed on the same cores (~200 against ~2,100 tokens/s):
where the only adapter is a CPU one (``dev.info["cpu_adapter"]``), embed with numpy.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..gpu.device import Batch as GPUBatch
from ..gpu.device import Buffer, Device
from ..gpu.ops import cpu_workgroup_size, split_grid
from .bert_numpy import (DEFAULT_BATCH_SIZE, DEFAULT_MAX_BATCH_TOKENS, BertConfig, BertConfigError,
                         BertWeights, SentenceEmbedder)
from .wordpiece import Batch

__all__ = ["BertKernels", "GPUBert", "load_gpu_embedder", "bench_embed", "GPU_MAX_BATCH_TOKENS"]

GPU_MAX_BATCH_TOKENS = 8192  # padded tokens per submission: (M, I) f32 activations of 48 MiB
MATMUL_TILE = 64  # rows and columns of Y per workgroup of matmul_f32_bias.wgsl
CPU_MATMUL_WG = 8  # invocations per workgroup of matmul_f32_bias_cpu.wgsl (lavapipe's SIMD width)
# queries per attention workgroup; the smallest >= seq_len is used (measured on lavapipe: 16 for
# 16 tokens is 1.6x faster than 32; 32 is 1.5x faster than 8 or 16 for 256 tokens)
ATTENTION_WQ = (8, 16, 32)
EPILOGUE_BIAS, EPILOGUE_GELU, EPILOGUE_RESIDUAL = 0, 1, 2
MAX_HEAD_DIM = 64  # bert_attention.wgsl's MAX_HD4 * 4


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _need(buf: Buffer, n_f32: int, what: str) -> None:
    if n_f32 * 4 > buf.size:
        raise ValueError(f"{what}: needs {n_f32 * 4} B but {buf} holds {buf.size} B")


class BertKernels:
    """The encoder's kernels as calls that record dispatches into a gpu Batch. Each checks that
    the buffers cover what the kernel touches (WebGPU clamps out-of-bounds accesses silently, so
    a wrong size gives wrong numbers, not an error), packs the uniforms and picks the grid.

    CPU adapters (lavapipe, SwiftShader; or cpu=True) get matmul_f32_bias_cpu.wgsl, a
    register-blocked matmul without workgroup memory (~3x the tiled kernel's speed there), and
    reductions in workgroups of one SIMD width. Attention takes WQ = 8, 16 or 32 queries per
    workgroup, the smallest that covers the sequence (fewer idle lanes on short texts)."""

    def __init__(self, dev: Device, kernels: dict, head_dim: int, cpu: bool, attention_wq: tuple[int, ...]):
        self.dev = dev
        self.k = kernels
        self.head_dim = head_dim
        self.cpu = cpu
        self.attention_wq = attention_wq  # the compiled attention variants, ascending

    @classmethod
    async def create(cls, dev: Device, head_dim: int, cpu: bool | None = None) -> "BertKernels":
        """Compile every kernel (once; the device caches them by name and constants)."""
        if head_dim % 4 or not 0 < head_dim <= MAX_HEAD_DIM:
            raise BertConfigError(f"head_dim {head_dim}: the GPU attention kernel needs a multiple of 4, "
                                  f"at most {MAX_HEAD_DIM}")
        cpu = bool(dev.info.get("cpu_adapter")) if cpu is None else bool(cpu)
        reduce_wg = cpu_workgroup_size(dev) if cpu else 64
        kernels = {
            "embed": await dev.kernel("bert_embed"),
            "layernorm": await dev.kernel("layernorm", WG=reduce_wg),
            "pool": await dev.kernel("mean_pool", WG=reduce_wg),
        }
        # K and V of WQ keys, and WQ flags, staged in workgroup memory: keep within the device's limit
        limit = int(dev.info["limits"].get("maxComputeWorkgroupStorageSize", 16384))
        wqs = tuple(wq for wq in ATTENTION_WQ if (2 * wq * head_dim + wq) * 4 <= limit) or ATTENTION_WQ[:1]
        for wq in wqs:
            kernels[f"attention_{wq}"] = await dev.kernel("bert_attention", WQ=wq, HD=head_dim)
        for epi in (EPILOGUE_BIAS, EPILOGUE_GELU, EPILOGUE_RESIDUAL):
            kernels[f"matmul_{epi}"] = await (dev.kernel("matmul_f32_bias_cpu", EPILOGUE=epi, WG=CPU_MATMUL_WG)
                                              if cpu else dev.kernel("matmul_f32_bias", EPILOGUE=epi))
        return cls(dev, kernels, head_dim, cpu, wqs)

    def embed(self, b: GPUBatch, ids: Buffer, type_ids: Buffer, word: Buffer, pos: Buffer, types: Buffer,
              out: Buffer, *, n_rows: int, seq_len: int, dim: int) -> None:
        """out (n_rows, dim) = word[ids] + pos[row % seq_len] + types[type_ids]; ids in range (caller checks)."""
        _need(ids, n_rows, "bert_embed ids")
        _need(type_ids, n_rows, "bert_embed type_ids")
        _need(pos, seq_len * dim, "bert_embed position table")
        _need(word, dim, "bert_embed word table")
        _need(types, dim, "bert_embed type table")
        _need(out, n_rows * dim, "bert_embed out")
        b.dispatch(self.k["embed"], split_grid(_cdiv(n_rows * dim, 256)), ids=ids, type_ids=type_ids, word=word,
                   pos=pos, types=types, out=out, n_rows=n_rows, seq_len=seq_len, dim=dim)

    def layernorm(self, b: GPUBatch, x: Buffer, w: Buffer, bias: Buffer, out: Buffer, *, n_rows: int, n: int,
                  eps: float) -> None:
        """out (n_rows, n) = LayerNorm(x) * w + bias, row by row."""
        _need(x, n_rows * n, "layernorm x")
        _need(out, n_rows * n, "layernorm out")
        _need(w, n, "layernorm weight")
        _need(bias, n, "layernorm bias")
        b.dispatch(self.k["layernorm"], split_grid(n_rows), x=x, w=w, b=bias, out=out, n_rows=n_rows, n=n, eps=eps)

    def linear(self, b: GPUBatch, x: Buffer, w: Buffer, bias: Buffer, y: Buffer, *, m: int, n: int, k: int,
               gelu: bool = False, residual: Buffer | None = None) -> None:
        """y (m, n) = x (m, k) @ w (k, n) + bias, then gelu() or + residual (m, n) if asked."""
        if k % 4 or n % 4:
            raise ValueError(f"linear: k {k} and n {n} must be multiples of 4 (rows are read as vec4)")
        if gelu and residual is not None:
            raise ValueError("linear: fuse GELU or a residual add, not both")
        _need(x, m * k, "linear x")
        _need(w, k * n, "linear weight")
        _need(bias, n, "linear bias")
        _need(y, m * n, "linear y")
        if residual is not None:
            _need(residual, m * n, "linear residual")
        epi = EPILOGUE_GELU if gelu else EPILOGUE_RESIDUAL if residual is not None else EPILOGUE_BIAS
        if self.cpu:  # an invocation per 8 rows x 8 columns
            grid = (_cdiv(n, 8 * CPU_MATMUL_WG), _cdiv(m, 8), 1)
        else:  # a workgroup per 64 x 64 tile
            grid = (_cdiv(n, MATMUL_TILE), _cdiv(m, MATMUL_TILE), 1)
        b.dispatch(self.k[f"matmul_{epi}"], grid, x=x, w=w, bias=bias, res=bias if residual is None else residual,
                   y=y, m=m, n=n, k=k)

    def attention(self, b: GPUBatch, qkv: Buffer, mask: Buffer, out: Buffer, *, n_seq: int, seq_len: int,
                  n_heads: int, scale: float | None = None) -> None:
        """out (n_seq * seq_len, n_heads * head_dim) = softmax(q k^T scale, masked keys dropped) v,
        per sequence and head; qkv rows are q | k | v (the fused projection)."""
        hd = self.head_dim
        width = n_heads * hd
        _need(qkv, n_seq * seq_len * 3 * width, "attention qkv")
        _need(mask, n_seq * seq_len, "attention mask")
        _need(out, n_seq * seq_len * width, "attention out")
        scale = 1.0 / math.sqrt(hd) if scale is None else scale
        wq = next((q for q in self.attention_wq if q >= seq_len), self.attention_wq[-1])
        b.dispatch(self.k[f"attention_{wq}"], (_cdiv(seq_len, wq), n_heads, n_seq), qkv=qkv, mask=mask,
                   out=out, seq_len=seq_len, n_heads=n_heads, qkv_stride=3 * width, scale=scale)

    def mean_pool(self, b: GPUBatch, x: Buffer, mask: Buffer, out: Buffer, *, n_seq: int, seq_len: int, dim: int,
                  out_off: int = 0) -> None:
        """out[out_off:][:n_seq * dim] = L2-normalized masked mean of x (n_seq, seq_len, dim) over tokens."""
        _need(x, n_seq * seq_len * dim, "mean_pool x")
        _need(mask, n_seq * seq_len, "mean_pool mask")
        _need(out, out_off + n_seq * dim, "mean_pool out")
        b.dispatch(self.k["pool"], (n_seq, 1, 1), x=x, mask=mask, out=out, seq_len=seq_len, dim=dim,
                   out_off=out_off)


@dataclass
class _Layer:
    """One encoder layer's weights on the GPU; matrices (in, out) f32 as BertLayer holds them."""

    w_qkv: Buffer  # (H, 3H)
    b_qkv: Buffer  # (3H,)
    w_o: Buffer  # (H, H)
    b_o: Buffer
    ln1_w: Buffer  # (H,)
    ln1_b: Buffer
    w_in: Buffer  # (H, I)
    b_in: Buffer  # (I,)
    w_out: Buffer  # (I, H)
    b_out: Buffer
    ln2_w: Buffer
    ln2_b: Buffer


def _check_shapes(cfg: BertConfig, w: BertWeights) -> None:
    """Every array the shape the kernels will assume (a wrong one would read wrong numbers)."""
    H, I = cfg.hidden_size, cfg.intermediate_size
    if len(w.layers) != cfg.num_hidden_layers:
        raise BertConfigError(f"weights hold {len(w.layers)} layers, config says {cfg.num_hidden_layers}")
    want = {"word_emb": (cfg.vocab_size, H), "pos_emb": (cfg.max_position_embeddings, H),
            "type_emb": (cfg.type_vocab_size, H), "emb_ln_w": (H,), "emb_ln_b": (H,)}
    layer = {"w_qkv": (H, 3 * H), "b_qkv": (3 * H,), "w_o": (H, H), "b_o": (H,), "ln1_w": (H,), "ln1_b": (H,),
             "w_in": (H, I), "b_in": (I,), "w_out": (I, H), "b_out": (H,), "ln2_w": (H,), "ln2_b": (H,)}
    arrays = [(n, getattr(w, n), s) for n, s in want.items()]
    arrays += [(f"layers[{i}].{n}", getattr(L, n), s) for i, L in enumerate(w.layers) for n, s in layer.items()]
    for name, a, shape in arrays:
        if np.shape(a) != shape:
            raise BertConfigError(f"weight {name} has shape {np.shape(a)}, the config says {shape}")


class GPUBert:
    """The encoder on a WebGPU device; ``await embed(batch)`` is NumpyBert.embed's contract.

    The constructor checks the config and uploads the weights (synchronous Device calls);
    kernels are compiled by ``await prepare()`` or on the first ``embed``. ``create`` does both.
    """

    def __init__(self, device: Device, cfg: BertConfig, weights: BertWeights, *,
                 max_batch_tokens: int = GPU_MAX_BATCH_TOKENS, cpu_kernels: bool | None = None):
        """max_batch_tokens: padded tokens per submission (a larger batch takes several).
        cpu_kernels: BertKernels' CPU-adapter variants; default: on CPU adapters."""
        H, I = cfg.hidden_size, cfg.intermediate_size
        if H % 4 or I % 4:
            raise BertConfigError(f"hidden_size {H} and intermediate_size {I} must be multiples of 4 "
                                  "for the GPU matmul kernel")
        if cfg.head_dim % 4 or cfg.head_dim > MAX_HEAD_DIM:
            raise BertConfigError(f"head_dim {cfg.head_dim}: the GPU attention kernel needs a multiple of 4, "
                                  f"at most {MAX_HEAD_DIM}")
        if max_batch_tokens < cfg.max_position_embeddings:
            raise ValueError(f"max_batch_tokens {max_batch_tokens} must hold one sequence of "
                             f"{cfg.max_position_embeddings} tokens")
        self.dev, self.cfg = device, cfg
        self.max_batch_tokens = max_batch_tokens
        self.cpu_kernels = cpu_kernels
        self.kernels: BertKernels | None = None
        self.weight_bytes = 0
        self.last_timings: dict = {}
        # one call at a time: calls share the activation buffers, and a tab's event loop could
        # otherwise interleave two of them at their awaits
        self._busy = asyncio.Lock()
        _check_shapes(cfg, weights)
        w, up = weights, self._upload
        self.word_emb = up(w.word_emb, "word_emb")
        self.pos_emb = up(w.pos_emb, "pos_emb")
        self.type_emb = up(w.type_emb, "type_emb")
        self.emb_ln_w, self.emb_ln_b = up(w.emb_ln_w, "emb_ln_w"), up(w.emb_ln_b, "emb_ln_b")
        self.layers = [_Layer(**{f: up(getattr(L, f), f"layer{i}.{f}") for f in _Layer.__dataclass_fields__})
                       for i, L in enumerate(w.layers)]
        self._rows = 0  # rows the activation buffers hold
        self._bufs: dict[str, Buffer] = {}
        self._out: Buffer | None = None  # pooled embeddings (B, H)

    def _upload(self, a: np.ndarray, label: str) -> Buffer:
        a = np.ascontiguousarray(a, dtype=np.float32)
        self.weight_bytes += a.nbytes
        return self.dev.upload(a, label)

    @classmethod
    async def create(cls, device: Device, cfg: BertConfig, weights: BertWeights, **kw) -> "GPUBert":
        model = cls(device, cfg, weights, **kw)
        await model.prepare()
        return model

    async def prepare(self) -> None:
        """Compile the kernels (the first embed does it otherwise)."""
        if self.kernels is None:
            self.kernels = await BertKernels.create(self.dev, self.cfg.head_dim, cpu=self.cpu_kernels)

    def close(self) -> None:
        """Free the GPU buffers (weights and activations); the model is unusable after this."""
        bufs = [self.word_emb, self.pos_emb, self.type_emb, self.emb_ln_w, self.emb_ln_b,
                *(getattr(L, n) for L in self.layers for n in _Layer.__dataclass_fields__),
                *self._bufs.values(), *([self._out] if self._out is not None else [])]
        for b in bufs:
            self.dev.destroy_buffer(b)
        self.layers, self._bufs, self._out, self._rows = [], {}, None, 0

    # -- buffers -----------------------------------------------------------------------------
    def _ensure_rows(self, rows: int) -> None:
        """Activation buffers for ``rows`` padded tokens; grown (x2 at least), never shrunk. Old
        ones are destroyed: every earlier submission was waited for (embed reads back at its end)."""
        if rows <= self._rows:
            return
        rows = max(rows, 2 * self._rows, 64)
        for b in self._bufs.values():
            self.dev.destroy_buffer(b)
        H, I = self.cfg.hidden_size, self.cfg.intermediate_size
        self._bufs = {name: self.dev.create_buffer(rows * width * 4, f"bert-{name}") for name, width in
                      (("ids", 1), ("type_ids", 1), ("mask", 1), ("x", H), ("h", H), ("qkv", 3 * H), ("att", H),
                       ("ff", I))}
        self._rows = rows

    def _ensure_out(self, n_seq: int) -> Buffer:
        H = self.cfg.hidden_size
        if self._out is None or self._out.size < n_seq * H * 4:
            if self._out is not None:
                self.dev.destroy_buffer(self._out)
            self._out = self.dev.create_buffer(max(n_seq, 32) * H * 4, "bert-pooled")
        return self._out

    # -- forward -----------------------------------------------------------------------------
    def _check(self, batch: Batch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, type ids, mask) as (B, T) uint32, after NumpyBert.forward's checks."""
        cfg = self.cfg
        ids, mask = np.asarray(batch.input_ids), np.asarray(batch.attention_mask)
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise ValueError(f"input_ids {ids.shape} and attention_mask {mask.shape} must be the same "
                             "(batch, seq) shape")
        types = np.zeros_like(ids) if batch.token_type_ids is None else np.asarray(batch.token_type_ids)
        if types.shape != ids.shape:
            raise ValueError(f"token_type_ids {types.shape} must have input_ids' shape {ids.shape}")
        T = ids.shape[1]
        if T > cfg.max_position_embeddings:
            raise ValueError(f"sequence of {T} tokens exceeds the model's {cfg.max_position_embeddings} positions")
        if ids.size and (ids.min() < 0 or ids.max() >= cfg.vocab_size):
            raise ValueError(f"token id out of range [0, {cfg.vocab_size})")
        if types.size and (types.min() < 0 or types.max() >= cfg.type_vocab_size):
            raise ValueError(f"token type id out of range [0, {cfg.type_vocab_size})")
        return ids.astype(np.uint32), types.astype(np.uint32), (mask != 0).astype(np.uint32)

    async def embed(self, batch: Batch) -> np.ndarray:
        """Padded batch -> (B, H) mean-pooled, L2-normalized float32 embeddings."""
        async with self._busy:
            return await self._embed(batch)

    async def _embed(self, batch: Batch) -> np.ndarray:
        t0 = time.perf_counter()
        ids, types, mask = self._check(batch)
        B, T = ids.shape
        H = self.cfg.hidden_size
        if B == 0 or T == 0:
            return np.zeros((B, H), np.float32)
        await self.prepare()
        per_submit = max(1, min(self.max_batch_tokens // T, self.dev.max_workgroups_per_dim))
        self._ensure_rows(min(B, per_submit) * T)
        out = self._ensure_out(B)
        bufs = self._bufs
        res = None
        for s0 in range(0, B, per_submit):
            s1 = min(B, s0 + per_submit)
            for name, a in (("ids", ids), ("type_ids", types), ("mask", mask)):
                self.dev.write(bufs[name], a[s0:s1])
            b = self.dev.batch("bert")
            self.record(b, s1 - s0, T, out_off=s0 * H)
            if s1 < B:
                b.submit()
            else:
                b.read(out, 0, B * H * 4)
                t1 = time.perf_counter()
                (res,) = await b.run()
        t2 = time.perf_counter()
        self.last_timings = {"n_seq": B, "seq_len": T, "submits": _cdiv(B, per_submit),
                             "record_s": t1 - t0,  # Python: checks, writes, recording (all but the last run)
                             "run_s": t2 - t1,  # last submit, GPU, readback
                             "total_s": t2 - t0}
        return np.frombuffer(res, np.float32).reshape(B, H).copy()

    def record(self, b: GPUBatch, n_seq: int, seq_len: int, out_off: int = 0) -> None:
        """The whole encoder and the pooling for n_seq sequences of seq_len tokens whose ids,
        type ids and mask are already in the input buffers; embeddings to out[out_off:]."""
        cfg, k, bufs = self.cfg, self.kernels, self._bufs
        H, I, M, eps = cfg.hidden_size, cfg.intermediate_size, n_seq * seq_len, cfg.layer_norm_eps
        x, h, qkv, att, ff = bufs["x"], bufs["h"], bufs["qkv"], bufs["att"], bufs["ff"]
        k.embed(b, bufs["ids"], bufs["type_ids"], self.word_emb, self.pos_emb, self.type_emb, h,
                n_rows=M, seq_len=seq_len, dim=H)
        k.layernorm(b, h, self.emb_ln_w, self.emb_ln_b, x, n_rows=M, n=H, eps=eps)
        for L in self.layers:
            k.linear(b, x, L.w_qkv, L.b_qkv, qkv, m=M, n=3 * H, k=H)
            k.attention(b, qkv, bufs["mask"], att, n_seq=n_seq, seq_len=seq_len, n_heads=cfg.num_attention_heads)
            k.linear(b, att, L.w_o, L.b_o, h, m=M, n=H, k=H, residual=x)
            k.layernorm(b, h, L.ln1_w, L.ln1_b, x, n_rows=M, n=H, eps=eps)
            k.linear(b, x, L.w_in, L.b_in, ff, m=M, n=I, k=H, gelu=True)
            k.linear(b, ff, L.w_out, L.b_out, h, m=M, n=H, k=I, residual=x)
            k.layernorm(b, h, L.ln2_w, L.ln2_b, x, n_rows=M, n=H, eps=eps)
        k.mean_pool(b, x, bufs["mask"], self._out, n_seq=n_seq, seq_len=seq_len, dim=H, out_off=out_off)


async def load_gpu_embedder(device: Device, source: "str | os.PathLike | SentenceEmbedder", *,
                            max_batch_tokens: int = GPU_MAX_BATCH_TOKENS) -> SentenceEmbedder:
    """A SentenceEmbedder whose model runs on ``device`` (use ``await emb.embed_async(texts)``).

    source: a sentence-transformers model folder (read as SentenceEmbedder.from_dir does), or
    an embedder already loaded with the numpy model (SentenceEmbedder.from_files, what a tab
    builds from fetched bytes), whose tokenizer and weights are reused. Kernels are compiled here.
    """
    cpu = source if isinstance(source, SentenceEmbedder) else SentenceEmbedder.from_dir(os.fspath(source))
    model = cpu.model
    if not hasattr(model, "w"):
        raise TypeError("load_gpu_embedder needs an embedder holding the numpy model's weights, "
                        f"got one with {type(model).__name__}")
    gpu = await GPUBert.create(device, model.cfg, model.w, max_batch_tokens=max_batch_tokens)
    return SentenceEmbedder(cpu.tokenizer, gpu)


async def bench_embed(embedder: SentenceEmbedder, texts: Sequence[str], *, repeats: int = 3,
                      batch_size: int = DEFAULT_BATCH_SIZE,
                      max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS) -> dict:
    """Throughput of ``embedder.embed_async(texts)`` (either backend): one warm-up run (kernel
    compilation, buffer growth), then the best of ``repeats`` timed runs. Tokenization is
    included, as a caller sees it. Returns texts_per_s, tokens_per_s (real word-pieces, padding
    not counted), seconds (of the best run), n_texts, n_tokens."""
    if isinstance(texts, str) or not texts:
        raise ValueError("bench_embed needs a non-empty list of texts")
    n_tokens = sum(len(e.ids) for e in embedder.encode_texts(texts))
    await embedder.embed_async(texts, batch_size, max_batch_tokens)
    best = math.inf
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        await embedder.embed_async(texts, batch_size, max_batch_tokens)
        best = min(best, time.perf_counter() - t)
    return {"texts_per_s": len(texts) / best, "tokens_per_s": n_tokens / best, "seconds": best,
            "n_texts": len(texts), "n_tokens": n_tokens}
