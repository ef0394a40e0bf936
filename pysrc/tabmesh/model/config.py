"""The hyper-parameters of a Llama-family GGUF, read from its metadata and tensor table.

One place knows the GGUF key names (``KEYS`` below, llama.cpp's ``LLM_KV_*``) and the
per-architecture differences (``ARCHS``). Everything downstream (weights.py, the numpy
model, the WebGPU model, the planner) reads a ``LlamaConfig``, never raw metadata.

Architectures run:
- ``llama`` (Llama 1/2/3 without rope_freqs, SmolLM, Mistral without sliding window):
  RoPE "normal" layout, i.e. rotating adjacent pairs (x[2i], x[2i+1]). The HF -> GGUF
  converter permutes the rows of attn_q / attn_k so that this is right for HF checkpoints.
- ``qwen2``: RoPE "neox" layout, rotating (x[i], x[i + n_rot/2]); q/k/v projections carry
  biases.
Refused with ModelConfigError (message says why): mixture-of-experts, per-layer head
counts, rope scaling other than linear, Llama-3.1 ``rope_freqs`` frequency factors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from tabmesh.errors import TabmeshError


class ModelConfigError(TabmeshError):
    """A GGUF's hyper-parameters are missing, inconsistent, or of a model tabmesh does not run."""

    code = "bad_model_config"


class ContextLengthError(TabmeshError):
    """A prompt (plus what is already in the KV cache) does not fit the context window."""

    code = "context_length_exceeded"


def check_span(n_tokens: int, start_pos: int, n_ctx: int, n_past: int, n_ctx_train: int) -> int:
    """Positions start_pos .. start_pos + n_tokens - 1 must fit the KV cache (n_ctx) and follow
    what it holds (n_past positions: rewriting from earlier is allowed, skipping is not).
    Returns the end position. Shared by every backend so they fail alike."""
    end = start_pos + n_tokens
    if end > n_ctx:
        raise ContextLengthError(
            f"{n_tokens} tokens at position {start_pos} need {end} positions, over the context of "
            f"{n_ctx} (model trained for {n_ctx_train}); shorten the prompt or the conversation, "
            f"or load the model with a larger n_ctx")
    if not 0 <= start_pos <= n_past:
        raise ValueError(f"start_pos {start_pos} must be in 0..{n_past}: the KV cache holds "
                         f"{n_past} positions, and positions cannot be skipped")
    return end


@dataclass(frozen=True)
class ArchInfo:
    rope_layout: str  # "normal" (adjacent pairs) or "neox" (halves), llama.cpp's LLAMA_ROPE_TYPE_*
    qkv_bias: bool  # q/k/v projections have bias vectors (required tensors)


ARCHS: dict[str, ArchInfo] = {
    "llama": ArchInfo(rope_layout="normal", qkv_bias=False),
    "qwen2": ArchInfo(rope_layout="neox", qkv_bias=True),
}

# GGUF metadata keys; "{arch}" is general.architecture.
KEYS = {
    "n_layers": "{arch}.block_count",
    "n_embd": "{arch}.embedding_length",
    "n_ff": "{arch}.feed_forward_length",
    "n_head": "{arch}.attention.head_count",
    "n_head_kv": "{arch}.attention.head_count_kv",
    "key_length": "{arch}.attention.key_length",
    "value_length": "{arch}.attention.value_length",
    "rms_eps": "{arch}.attention.layer_norm_rms_epsilon",
    "n_ctx_train": "{arch}.context_length",
    "n_vocab": "{arch}.vocab_size",
    "n_rot": "{arch}.rope.dimension_count",
    "rope_base": "{arch}.rope.freq_base",
    "rope_scaling_type": "{arch}.rope.scaling.type",
    "rope_scaling_factor": "{arch}.rope.scaling.factor",
    "rope_scale_linear": "{arch}.rope.scale_linear",  # older files
    "n_expert": "{arch}.expert_count",
    "bos_id": "tokenizer.ggml.bos_token_id",
    "eos_id": "tokenizer.ggml.eos_token_id",
    "add_bos": "tokenizer.ggml.add_bos_token",
    "tokens": "tokenizer.ggml.tokens",
}

DEFAULT_ROPE_BASE = 10000.0  # llama.cpp's default when the key is absent


@dataclass(frozen=True)
class LlamaConfig:
    """Shapes and constants of one model. Validated on construction."""

    arch: str  # "llama" or "qwen2"
    n_layers: int  # transformer blocks
    n_embd: int  # hidden size (residual stream width)
    n_head: int  # query heads
    n_head_kv: int  # key/value heads (GQA: n_head is a multiple of it)
    head_dim: int  # per-head width of q, k and v
    n_ff: int  # SwiGLU inner width
    n_vocab: int  # rows of token_embd / output
    n_ctx_train: int  # context length the model was trained for
    rope_base: float  # theta_i = pos * freq_scale * rope_base ** (-2i / n_rot)
    n_rot: int  # leading dims of each head that RoPE rotates (the rest pass through)
    rope_layout: str  # "normal": pairs (2i, 2i+1); "neox": pairs (i, i + n_rot/2)
    rms_eps: float
    tied_output: bool  # no output.weight: logits use token_embd
    qkv_bias: bool  # attn_q/k/v have .bias tensors
    rope_freq_scale: float = 1.0  # linear RoPE scaling: 1 / scaling factor
    bos_id: int | None = None
    eos_id: int | None = None
    add_bos: bool = False  # whether a prompt gets BOS prepended (tokenizer.ggml.add_bos_token)

    def __post_init__(self) -> None:
        self.validate()

    # -- derived sizes ---------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_head_kv * self.head_dim

    @property
    def n_group(self) -> int:
        """Query heads per KV head; query head h reads KV head h // n_group."""
        return self.n_head // self.n_head_kv

    @property
    def rope_neox(self) -> bool:
        return self.rope_layout == "neox"

    def validate(self) -> None:
        """Raise ModelConfigError naming the first inconsistent field."""
        def bad(msg: str) -> ModelConfigError:
            return ModelConfigError(f"{self.arch} model: {msg}")

        if self.arch not in ARCHS:
            raise ModelConfigError(f"architecture {self.arch!r} is not supported; tabmesh runs "
                                   f"{', '.join(ARCHS)}")
        for name in ("n_layers", "n_embd", "n_head", "n_head_kv", "head_dim", "n_ff", "n_vocab",
                     "n_ctx_train", "n_rot"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
                raise bad(f"{name} must be a positive integer, got {v!r}")
        if self.n_head % self.n_head_kv:
            raise bad(f"n_head {self.n_head} is not a multiple of n_head_kv {self.n_head_kv}")
        if self.head_dim % 2:
            raise bad(f"head_dim {self.head_dim} must be even for RoPE")
        if self.n_rot > self.head_dim or self.n_rot % 2:
            raise bad(f"rope dimension count {self.n_rot} must be even and at most head_dim "
                      f"{self.head_dim}")
        if self.rope_layout not in ("normal", "neox"):
            raise bad(f"rope_layout must be 'normal' or 'neox', got {self.rope_layout!r}")
        if not (self.rope_base > 0 and np.isfinite(self.rope_base)):
            raise bad(f"rope freq_base must be a positive number, got {self.rope_base!r}")
        if not (self.rope_freq_scale > 0 and np.isfinite(self.rope_freq_scale)):
            raise bad(f"rope freq_scale must be a positive number, got {self.rope_freq_scale!r}")
        if not (self.rms_eps > 0 and np.isfinite(self.rms_eps)):
            raise bad(f"rms epsilon must be a positive number, got {self.rms_eps!r}")
        for name in ("bos_id", "eos_id"):
            v = getattr(self, name)
            if v is not None and not 0 <= v < self.n_vocab:
                raise bad(f"{name} {v} is outside the vocabulary of {self.n_vocab} tokens")

    # -- from GGUF -------------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, gguf: Any) -> "LlamaConfig":
        """From a parsed ``tabmesh.gguf.GGUFFile``: its metadata, plus its tensor table for
        what only the tensors tell (tied output, vocabulary size when the key is absent)."""
        tensors = gguf.tensors
        return cls.from_metadata(gguf.metadata, tensor_shapes={n: t.shape for n, t in tensors.items()})

    @classmethod
    def from_metadata(cls, md: Mapping[str, Any],
                      tensor_shapes: Mapping[str, tuple[int, ...]]) -> "LlamaConfig":
        """From GGUF metadata and ``tensor_shapes`` (tensor name -> GGUF ne, ne[0] first):
        the tensors decide the tied output and the vocabulary size when no key gives it."""
        arch = md.get("general.architecture")
        if not isinstance(arch, str):
            raise ModelConfigError("metadata key 'general.architecture' is missing; is this a "
                                   "GGUF written by llama.cpp's converter?")
        if arch not in ARCHS:
            raise ModelConfigError(f"architecture {arch!r} is not supported; tabmesh runs "
                                   f"{', '.join(ARCHS)}")
        info = ARCHS[arch]

        def key(name: str) -> str:
            return KEYS[name].format(arch=arch)

        def get(name: str, default: Any = None, *, kind: type = int) -> Any:
            k = key(name)
            v = md.get(k, default)
            if v is None:
                raise ModelConfigError(f"{arch} model: metadata key {k!r} is missing")
            if isinstance(v, np.ndarray):
                raise ModelConfigError(f"{arch} model: metadata key {k!r} is an array (per-layer "
                                       f"values); tabmesh runs models with one value for all layers")
            if kind is int and (isinstance(v, bool) or not isinstance(v, (int, np.integer))):
                raise ModelConfigError(f"{arch} model: metadata key {k!r} must be an integer, got {v!r}")
            if kind is float and (isinstance(v, bool) or not isinstance(v, (int, float, np.number))):
                raise ModelConfigError(f"{arch} model: metadata key {k!r} must be a number, got {v!r}")
            return kind(v)

        n_expert = md.get(key("n_expert"), 0)
        if n_expert:
            raise ModelConfigError(f"{arch} model with {n_expert} experts (mixture of experts) is "
                                   f"not supported; use a dense model")
        n_embd = get("n_embd")
        n_head = get("n_head")
        n_head_kv = get("n_head_kv", n_head)
        if n_head <= 0:
            raise ModelConfigError(f"{arch} model: head_count must be positive, got {n_head}")
        if n_embd % n_head and key("key_length") not in md:
            raise ModelConfigError(f"{arch} model: n_embd {n_embd} is not a multiple of n_head "
                                   f"{n_head} and {key('key_length')!r} is absent")
        head_dim = get("key_length", n_embd // n_head)
        value_length = get("value_length", head_dim)
        if value_length != head_dim:
            raise ModelConfigError(f"{arch} model: key_length {head_dim} != value_length "
                                   f"{value_length} is not supported")

        rope_freq_scale = 1.0
        scaling = md.get(key("rope_scaling_type"), "none")
        if scaling == "linear":
            factor = get("rope_scaling_factor", 1.0, kind=float)
            rope_freq_scale = 1.0 / factor if factor > 0 else float("nan")
        elif scaling != "none":
            raise ModelConfigError(f"{arch} model: rope scaling {scaling!r} is not supported "
                                   f"(only none or linear)")
        if key("rope_scale_linear") in md:
            factor = get("rope_scale_linear", kind=float)
            rope_freq_scale = 1.0 / factor if factor > 0 else float("nan")

        shapes = tensor_shapes
        if "rope_freqs.weight" in shapes:
            raise ModelConfigError(f"{arch} model has rope_freqs.weight (Llama-3.1 style rope "
                                   f"frequency factors), which tabmesh does not apply yet")
        tokens = md.get(KEYS["tokens"])
        n_vocab_default = len(tokens) if tokens is not None else None
        if "token_embd.weight" in shapes:
            n_vocab_default = shapes["token_embd.weight"][-1]
        n_vocab = get("n_vocab", n_vocab_default)
        emb = shapes.get("token_embd.weight")
        if emb is not None and tuple(emb) != (n_embd, n_vocab):
            raise ModelConfigError(f"{arch} model: token_embd.weight has shape {list(emb)}, "
                                   f"expected [{n_embd}, {n_vocab}] (n_embd, n_vocab)")

        def token_id(name: str) -> int | None:
            v = md.get(KEYS[name])
            return int(v) if v is not None else None

        return cls(
            arch=arch,
            n_layers=get("n_layers"),
            n_embd=n_embd,
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim,
            n_ff=get("n_ff"),
            n_vocab=n_vocab,
            n_ctx_train=get("n_ctx_train"),
            rope_base=get("rope_base", DEFAULT_ROPE_BASE, kind=float),
            n_rot=get("n_rot", head_dim),
            rope_layout=info.rope_layout,
            rms_eps=get("rms_eps", kind=float),
            tied_output="output.weight" not in shapes,
            qkv_bias=info.qkv_bias,
            rope_freq_scale=rope_freq_scale,
            bos_id=token_id("bos_id"),
            eos_id=token_id("eos_id"),
            add_bos=bool(md.get(KEYS["add_bos"], False)),
        )
