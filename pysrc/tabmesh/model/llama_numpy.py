"""A Llama (and Qwen2) forward pass in plain numpy, float32: the whole-model reference the
WebGPU kernels are checked against, and the backend of a tab that has no WebGPU.

It runs any contiguous layer range, so one model can be split into pipeline stages:

    stage = NumpyLlama(cfg, weights)             # weights.layers == range(a, b)
    out = stage.forward(x, start_pos)
        x:   token ids (list[int]) if a == 0, else the previous stage's hidden states
             (n_tokens, n_embd) float32
        out: logits (n_tokens, n_vocab) if b == n_layers, else hidden states (n_tokens, n_embd)

Each stage owns a KV cache for its own layers, preallocated at construction. ``forward``
of n tokens at ``start_pos`` writes cache positions start_pos .. start_pos + n - 1 and
attends causally to everything before them: a prompt is prefilled in one call (batched
matmuls), then tokens are decoded one call each. ``start_pos`` may go back (rewind: the
positions after it are overwritten) but not skip ahead.

The math, per block (x is the residual stream, (n_tokens, n_embd)):
    h = rmsnorm(x) * attn_norm
    q, k, v = h @ wq.T (+ bq), h @ wk.T (+ bk), h @ wv.T (+ bv)
    q, k = rope(q), rope(k)                           # per head, position-dependent rotation
    x = x + softmax(q k^T / sqrt(head_dim) + causal mask) v @ wo.T   # GQA: head h reads KV head h // n_group
    h = rmsnorm(x) * ffn_norm
    x = x + (silu(h @ w_gate.T) * (h @ w_up.T)) @ w_down.T
then logits = (rmsnorm(x) * output_norm) @ output.T.

Two numerics, chosen at construction:
- ``numerics="f32"`` (the default): weights dequantized once to float32, nothing rounded.
  As llama.cpp computes it on an F32 GGUF with an F32 KV cache (ggml's op order for rmsnorm
  and softmax); the reference the WebGPU kernels are checked against.
- ``numerics="ggml"``: llama.cpp's CPU arithmetic on the quantized file as it runs by
  default, bit for bit (ggml_numerics.py says exactly what): Q8_0 / Q4_1 matrices kept in
  their GGUF type, each matmul's input rows quantized to Q8_0 / Q8_1 and summed in ggml's
  SIMD lane order, an f16 KV cache, q and the softmax probabilities rounded to f16, ggml's
  expf / RoPE angles / reductions. Weights come from ``ggml_numerics.ggml_weights_from_path``
  (or ``from_path(..., numerics="ggml")``). Its logits equal llama.cpp's (measured: error
  0.0) and so do its greedy tokens, where f32 numerics part from them at near-ties (an
  8-bit rounding moved by an ulp upstream grows through the layers to ~0.5 in the logits).
  Slower than f32 (every quantized dot product is emulated lane by lane: ~4x per decoded
  token, ~20x in prefill), so not the default.
"""

from __future__ import annotations

import os
from typing import Generator, Sequence

import numpy as np

from ..jsbridge import run_steps
from . import ggml_numerics
from .config import ContextLengthError, LlamaConfig, check_span
from .weights import ModelWeights, check_layers, weights_from_path

DEFAULT_MAX_CTX = 2048  # default KV cache length when n_ctx is not given (memory, not a model limit)
NUMERICS = ("f32", "ggml")


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x (n, d) float32, weight (d,) -> (n, d). ggml_rms_norm then ggml_mul: the mean of
    squares summed in float64, the scale 1/sqrt(mean + eps) in float32."""
    mean_sq = np.mean(np.square(x, dtype=np.float64), axis=-1, keepdims=True).astype(np.float32)
    scale = np.float32(1.0) / np.sqrt(mean_sq + np.float32(eps))
    return (x * scale) * weight


def rope_tables(cfg: LlamaConfig, start_pos: int, n_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (n_tokens, 1, n_rot/2) for positions start_pos ..; pair i turns by
    theta = pos * freq_scale * base^(-2i / n_rot)."""
    half = cfg.n_rot // 2
    pos = np.arange(start_pos, start_pos + n_tokens, dtype=np.float64)[:, None, None]
    inv_freq = cfg.rope_base ** (-2.0 * np.arange(half, dtype=np.float64) / cfg.n_rot)  # (half,)
    theta = pos * cfg.rope_freq_scale * inv_freq  # (n_tokens, 1, half)
    return np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, neox: bool) -> np.ndarray:
    """Rotate x (n_tokens, n_heads, head_dim) in place and return it. The first n_rot dims
    of a head form n_rot/2 pairs (a, b) -> (a cos - b sin, a sin + b cos): adjacent pairs
    (2i, 2i+1) in the normal layout, (i, i + n_rot/2) in the neox layout."""
    half = cos.shape[-1]
    if neox:
        a, b = x[..., :half].copy(), x[..., half:2 * half].copy()
        x[..., :half], x[..., half:2 * half] = a * cos - b * sin, a * sin + b * cos
    else:
        a, b = x[..., 0:2 * half:2].copy(), x[..., 1:2 * half:2].copy()
        x[..., 0:2 * half:2], x[..., 1:2 * half:2] = a * cos - b * sin, a * sin + b * cos
    return x


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, start_pos: int) -> np.ndarray:
    """Causal grouped-query attention.

    q (T, n_head, hd): queries at positions start_pos .. start_pos + T - 1
    k, v (n_keys, n_kv, hd): cache positions 0 .. n_keys - 1 (n_keys = start_pos + T)
    -> (T, n_head, hd). Query head h reads KV head h // (n_head / n_kv), as ggml broadcasts.
    """
    n_tokens, n_head, hd = q.shape
    n_keys, n_kv, _ = k.shape
    group = n_head // n_kv
    # rows of one KV head: its `group` query heads x T tokens
    qg = q.reshape(n_tokens, n_kv, group, hd).transpose(1, 2, 0, 3).reshape(n_kv, group * n_tokens, hd)
    scores = qg @ k.transpose(1, 2, 0)  # (n_kv, group * T, n_keys)
    scores *= np.float32(1.0 / np.sqrt(hd))
    scores = scores.reshape(n_kv, group, n_tokens, n_keys)
    future = np.arange(n_keys)[None, :] > np.arange(start_pos, start_pos + n_tokens)[:, None]  # (T, n_keys)
    scores[:, :, future] = -np.inf
    scores -= scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p *= (np.float32(1.0) / p.sum(axis=-1, dtype=np.float64, keepdims=True)).astype(np.float32)
    out = p.reshape(n_kv, group * n_tokens, n_keys) @ v.transpose(1, 0, 2)  # (n_kv, group * T, hd)
    return out.reshape(n_kv, group, n_tokens, hd).transpose(2, 0, 1, 3).reshape(n_tokens, n_head, hd)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1.0) + np.exp(-x))


def _matmuls_f32(x: np.ndarray, ws: list[np.ndarray]) -> list[np.ndarray]:
    return [x @ w.T for w in ws]


def _swiglu_f32(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    return silu(gate) * up


class NumpyLlama:
    """One stage (a contiguous layer range) of a Llama/Qwen2 model, with its KV cache."""

    def __init__(self, cfg: LlamaConfig, weights: ModelWeights, n_ctx: int | None = None,
                 numerics: str = "f32") -> None:
        if numerics not in NUMERICS:
            raise ValueError(f"numerics must be one of {NUMERICS}, got {numerics!r}")
        if numerics == "ggml":
            mats = [getattr(b, f) for b in weights.blocks for f in
                    ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")] + \
                   ([weights.output] if weights.output is not None else [])
            if not all(isinstance(m, ggml_numerics.QMatrix) for m in mats):
                raise ValueError("numerics='ggml' needs the matrices in their GGUF types: load the "
                                 "weights with ggml_numerics.ggml_weights_from_path (or "
                                 "NumpyLlama.from_path(..., numerics='ggml')), not weights_from_path")
        self.numerics = numerics
        self.cfg = cfg
        self.w = weights
        self.layers = check_layers(cfg, weights.layers)
        self.is_first = self.layers.start == 0
        self.is_last = self.layers.stop == cfg.n_layers
        self.n_ctx = min(cfg.n_ctx_train, DEFAULT_MAX_CTX) if n_ctx is None else int(n_ctx)
        if not 0 < self.n_ctx <= cfg.n_ctx_train:
            raise ContextLengthError(f"n_ctx {self.n_ctx} must be between 1 and the model's trained "
                                     f"context length {cfg.n_ctx_train}")
        shape = (len(self.layers), self.n_ctx, cfg.n_head_kv, cfg.head_dim)
        # float32 arrays; in ggml numerics they hold f16 values (llama.cpp's f16 KV cache)
        self.k_cache = np.zeros(shape, np.float32)  # (n_layers here, n_ctx, n_kv, head_dim)
        self.v_cache = np.zeros(shape, np.float32)  # (n_layers here, n_ctx, n_kv, head_dim)
        self.n_past = 0  # cache positions 0 .. n_past - 1 are filled

    @classmethod
    def from_path(cls, path: str | os.PathLike, layers: range | None = None,
                  n_ctx: int | None = None, numerics: str = "f32") -> "NumpyLlama":
        """Load ``layers`` (default: all) of a local GGUF: dequantized to float32 for f32
        numerics, kept in their GGUF types for ggml numerics."""
        load = ggml_numerics.ggml_weights_from_path if numerics == "ggml" else weights_from_path
        cfg, _, weights = load(path, layers)
        return cls(cfg, weights, n_ctx, numerics)

    def reset(self) -> None:
        self.n_past = 0

    def _input(self, x: Sequence[int] | np.ndarray) -> np.ndarray:
        """Token ids (first stage) or hidden states -> residual stream (n_tokens, n_embd)."""
        cfg = self.cfg
        if self.is_first:
            ids = np.asarray(x)
            if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
                raise ValueError(f"the first stage takes a non-empty list of token ids, got "
                                 f"an array of dtype {ids.dtype} and shape {ids.shape}")
            bad = (ids < 0) | (ids >= cfg.n_vocab)
            if bad.any():
                raise ValueError(f"token id {int(ids[bad][0])} is outside the vocabulary of "
                                 f"{cfg.n_vocab} tokens")
            return self.w.tok_embd[ids]  # (n_tokens, n_embd)
        h = np.asarray(x)
        if h.ndim != 2 or h.shape[0] == 0 or h.shape[1] != cfg.n_embd:
            raise ValueError(f"stage for layers {self.layers.start}..{self.layers.stop - 1} takes "
                             f"hidden states of shape (n_tokens, {cfg.n_embd}), got {h.shape}")
        return h.astype(np.float32)  # a copy: the caller's array is never written

    def forward(self, x: Sequence[int] | np.ndarray, start_pos: int, *,
                last_only: bool = False) -> np.ndarray:
        """Run this stage on n_tokens tokens at positions start_pos .. start_pos + n_tokens - 1.

        Returns logits (n_tokens, n_vocab) on the last stage (just the last token's,
        (1, n_vocab), with ``last_only``), else hidden states (n_tokens, n_embd)."""
        return run_steps(self.forward_steps(x, start_pos, last_only=last_only))

    def forward_steps(self, x: Sequence[int] | np.ndarray, start_pos: int, *,
                      last_only: bool = False) -> Generator[None, None, np.ndarray]:
        """``forward`` in pieces: a generator that yields (None) after each layer and before
        the output head, and returns what ``forward`` returns. A caller on the browser's
        thread pauses between the pieces (``jsbridge.run_sliced``); the arithmetic is
        ``forward``'s. Input errors are raised at the first ``next``, before the cache is
        touched."""
        cfg = self.cfg
        h = self._input(x)  # (T, n_embd)
        n_tokens = h.shape[0]
        end = check_span(n_tokens, start_pos, self.n_ctx, self.n_past, cfg.n_ctx_train)
        if self.numerics == "ggml":
            g = ggml_numerics
            norm, mms, rot, att_fn, glu, kv_round = (g.rmsnorm, g.matmuls, g.rope, g.attention,
                                                     g.swiglu, g.f16_round)
            cos, sin = g.rope_tables(cfg, start_pos, n_tokens)  # (T, 1, n_rot/2) each
        else:
            norm, mms, rot, att_fn, glu, kv_round = (rmsnorm, _matmuls_f32, rope, attention,
                                                     _swiglu_f32, None)
            cos, sin = rope_tables(cfg, start_pos, n_tokens)  # (T, 1, n_rot/2) each

        # until the last layer is done, positions start_pos.. are half-written (this call may
        # fail, or be abandoned at a pause between layers)
        self.n_past = min(self.n_past, start_pos)
        for li, w in enumerate(self.w.blocks):
            # attention
            xn = norm(h, w.attn_norm, cfg.rms_eps)  # (T, n_embd)
            q, k, v = mms(xn, [w.wq, w.wk, w.wv])  # (T, q_dim), (T, kv_dim), (T, kv_dim)
            if w.bq is not None:
                q += w.bq
            if w.bk is not None:
                k += w.bk
            if w.bv is not None:
                v += w.bv
            q = rot(q.reshape(n_tokens, cfg.n_head, cfg.head_dim), cos, sin, cfg.rope_neox)
            k = rot(k.reshape(n_tokens, cfg.n_head_kv, cfg.head_dim), cos, sin, cfg.rope_neox)
            v = v.reshape(n_tokens, cfg.n_head_kv, cfg.head_dim)
            if kv_round is not None:
                k, v = kv_round(k), kv_round(v)
            self.k_cache[li, start_pos:end] = k
            self.v_cache[li, start_pos:end] = v
            att = att_fn(q, self.k_cache[li, :end], self.v_cache[li, :end], start_pos)  # (T, n_head, hd)
            h += mms(att.reshape(n_tokens, cfg.q_dim), [w.wo])[0]
            # feed-forward (SwiGLU)
            xn = norm(h, w.ffn_norm, cfg.rms_eps)  # (T, n_embd)
            h += mms(glu(*mms(xn, [w.w_gate, w.w_up])), [w.w_down])[0]
            yield

        self.n_past = end
        if not self.is_last:
            return h  # (T, n_embd)
        yield  # the output head is a layer's worth of work of its own (n_vocab x n_embd)
        if last_only:
            h = h[-1:]
        return mms(norm(h, self.w.output_norm, cfg.rms_eps), [self.w.output])[0]  # (T or 1, n_vocab)

    def generate_greedy(self, prompt: Sequence[int], n_new: int,
                        stop: Sequence[int] = ()) -> list[int]:
        """Temperature-0 decoding on a whole model (first and last stage): prefill ``prompt``
        at position 0, then up to ``n_new`` argmax tokens (ties: the lowest id), stopping
        after a token in ``stop``."""
        if not (self.is_first and self.is_last):
            raise ValueError(f"generate_greedy needs all {self.cfg.n_layers} layers; this stage "
                             f"runs {self.layers.start}..{self.layers.stop - 1}")
        logits = self.forward(prompt, 0, last_only=True)
        out: list[int] = []
        for _ in range(n_new):
            tok = int(np.argmax(logits[-1]))
            out.append(tok)
            if tok in stop or len(out) == n_new:
                break
            logits = self.forward([tok], len(prompt) + len(out) - 1)
        return out
