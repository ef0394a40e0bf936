"""Which tensors a layer range needs, and loading them as dequantized float32 arrays.

Loading is kept apart from the math so that every transport can feed it: a local file
(``weights_from_path``), the HTTP Range responses a browser tab fetched for
``gguf.byte_ranges(tensors_needed(...))`` (``weights_from_ranges``), or any function from
tensor name to raw bytes (``load_weights``).

A stage running ``layers = range(a, b)`` of an n-layer model needs
    blk.{i}.*            for a <= i < b
    token_embd.weight    if a == 0 (embedding), or if b == n and the output is tied
    output_norm.weight   if b == n
    output.weight        if b == n and the output is not tied

numpy shapes (reversed GGUF ne) of one block, d = n_embd, f = n_ff:
    attn_norm (d,)   attn_q (q_dim, d)   attn_k (kv_dim, d)   attn_v (kv_dim, d)
    attn_output (d, q_dim)   ffn_norm (d,)   ffn_gate (f, d)   ffn_up (f, d)   ffn_down (d, f)
    attn_{q,k,v}.bias (q_dim,) / (kv_dim,), when the architecture has them (qwen2)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from tabmesh.errors import GGUFError
from tabmesh.gguf import read_gguf_path
from tabmesh.jsbridge import run_steps
from tabmesh.quants import format_for

from .config import LlamaConfig, ModelConfigError

# block tensor suffix -> LayerWeights field
BLOCK_TENSORS = {
    "attn_norm.weight": "attn_norm",
    "attn_q.weight": "wq",
    "attn_k.weight": "wk",
    "attn_v.weight": "wv",
    "attn_output.weight": "wo",
    "ffn_norm.weight": "ffn_norm",
    "ffn_gate.weight": "w_gate",
    "ffn_up.weight": "w_up",
    "ffn_down.weight": "w_down",
}
BIAS_TENSORS = {"attn_q.bias": "bq", "attn_k.bias": "bk", "attn_v.bias": "bv"}


@dataclass
class LayerWeights:
    """One transformer block, float32, numpy shapes as in the module docstring."""

    attn_norm: np.ndarray  # (n_embd,)
    wq: np.ndarray  # (q_dim, n_embd)
    wk: np.ndarray  # (kv_dim, n_embd)
    wv: np.ndarray  # (kv_dim, n_embd)
    wo: np.ndarray  # (n_embd, q_dim)
    ffn_norm: np.ndarray  # (n_embd,)
    w_gate: np.ndarray  # (n_ff, n_embd)
    w_up: np.ndarray  # (n_ff, n_embd)
    w_down: np.ndarray  # (n_embd, n_ff)
    bq: np.ndarray | None = None  # (q_dim,)
    bk: np.ndarray | None = None  # (kv_dim,)
    bv: np.ndarray | None = None  # (kv_dim,)


@dataclass
class ModelWeights:
    """The weights of one contiguous layer range. ``blocks[i]`` is layer ``layers[i]``."""

    layers: range
    blocks: list[LayerWeights]
    tok_embd: np.ndarray | None  # (n_vocab, n_embd), when the range starts at layer 0
    output_norm: np.ndarray | None  # (n_embd,), when the range ends at the last layer
    output: np.ndarray | None  # (n_vocab, n_embd), when it ends there; tok_embd itself if tied

    def select(self, layers: range, n_layers: int) -> "ModelWeights":
        """The weights of a sub-range of ``self.layers`` (of an ``n_layers`` model), sharing
        the arrays: for re-planning a pipeline without reloading."""
        if layers.step != 1 or len(layers) == 0 or layers.start < self.layers.start \
                or layers.stop > self.layers.stop:
            raise ModelConfigError(f"layers {layers!r} are not a non-empty part of the loaded "
                                   f"{self.layers!r}")
        if layers.start == 0 and self.tok_embd is None:
            raise ModelConfigError("the embedding is needed for layer 0 but was not loaded")
        off = layers.start - self.layers.start
        is_last = layers.stop == n_layers
        return ModelWeights(layers=layers, blocks=self.blocks[off:off + len(layers)],
                            tok_embd=self.tok_embd if layers.start == 0 else None,
                            output_norm=self.output_norm if is_last else None,
                            output=self.output if is_last else None)

    @property
    def nbytes(self) -> int:
        arrays = {id(a): a for a in (self.tok_embd, self.output_norm, self.output) if a is not None}
        for b in self.blocks:
            arrays.update((id(a), a) for a in vars(b).values() if a is not None)
        return sum(a.nbytes for a in arrays.values())


def check_layers(cfg: LlamaConfig, layers: range) -> range:
    """``layers`` as a non-empty, step-1 range inside [0, n_layers), else ModelConfigError."""
    if not isinstance(layers, range) or layers.step != 1 or len(layers) == 0:
        raise ModelConfigError(f"layers must be a non-empty range(a, b) with step 1, got {layers!r}")
    if layers.start < 0 or layers.stop > cfg.n_layers:
        raise ModelConfigError(f"layers {layers.start}..{layers.stop - 1} are outside the model's "
                               f"{cfg.n_layers} layers (0..{cfg.n_layers - 1})")
    return layers


def _expected_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """numpy shape of each block tensor suffix and of the global tensors."""
    d, f = cfg.n_embd, cfg.n_ff
    return {
        "attn_norm.weight": (d,), "attn_q.weight": (cfg.q_dim, d), "attn_k.weight": (cfg.kv_dim, d),
        "attn_v.weight": (cfg.kv_dim, d), "attn_output.weight": (d, cfg.q_dim),
        "ffn_norm.weight": (d,), "ffn_gate.weight": (f, d), "ffn_up.weight": (f, d),
        "ffn_down.weight": (d, f), "attn_q.bias": (cfg.q_dim,), "attn_k.bias": (cfg.kv_dim,),
        "attn_v.bias": (cfg.kv_dim,), "token_embd.weight": (cfg.n_vocab, d),
        "output_norm.weight": (d,), "output.weight": (cfg.n_vocab, d),
    }


def tensors_needed(cfg: LlamaConfig, gguf: Any, layers: range) -> list[str]:
    """Names of the tensors that ``layers`` needs, in file order (so that
    ``gguf.byte_ranges`` merges neighbours). Checks each one exists with the shape the
    config implies; a missing or misshapen tensor is a GGUFError naming it."""
    check_layers(cfg, layers)
    shapes = _expected_shapes(cfg)
    wanted: dict[str, tuple[int, ...]] = {}
    for i in layers:
        for suffix in BLOCK_TENSORS:
            wanted[f"blk.{i}.{suffix}"] = shapes[suffix]
        for suffix in BIAS_TENSORS:
            name = f"blk.{i}.{suffix}"
            if cfg.qkv_bias or name in gguf.tensors:  # required for qwen2, optional for llama
                wanted[name] = shapes[suffix]
    is_first, is_last = layers.start == 0, layers.stop == cfg.n_layers
    if is_first or (is_last and cfg.tied_output):
        wanted["token_embd.weight"] = shapes["token_embd.weight"]
    if is_last:
        wanted["output_norm.weight"] = shapes["output_norm.weight"]
        if not cfg.tied_output:
            wanted["output.weight"] = shapes["output.weight"]
    for name, shape in wanted.items():
        info = gguf.tensors.get(name)
        if info is None:
            raise GGUFError(f"tensor {name!r} is missing from this {cfg.arch} GGUF; the file is "
                            f"incomplete or of another architecture")
        if info.np_shape != shape:
            raise GGUFError(f"tensor {name!r} has numpy shape {list(info.np_shape)}, expected "
                            f"{list(shape)} from the model's metadata")
    return [name for name in gguf.tensors if name in wanted]


PIECE_ELEMENTS = 1 << 21  # larger tensors (the embedding table: 28 M values) dequantize in pieces


def iter_tensor_array(gguf: Any, name: str, raw: bytes | bytearray | memoryview):
    """``gguf.tensor_array(name, raw)`` a block of rows at a time for a 2-D tensor of more
    than PIECE_ELEMENTS values: a generator that yields between the blocks and returns the
    whole array. The same values: every row is whole quantization blocks, dequantized
    independently of the others."""
    info = gguf.tensors[name]
    shape = info.np_shape
    if info.n_elements <= PIECE_ELEMENTS or len(shape) != 2 or memoryview(raw).nbytes != info.nbytes:
        return gguf.tensor_array(name, raw)  # (which also reports a wrong size)
    fmt = format_for(info.ggml_type, name)
    n_rows, n_cols = shape
    row_bytes = info.nbytes // n_rows
    step = max(1, PIECE_ELEMENTS // n_cols)
    data = memoryview(raw).cast("B")
    out = np.empty(shape, np.float32)
    for r in range(0, n_rows, step):
        k = min(step, n_rows - r)
        piece = data[r * row_bytes:(r + k) * row_bytes]
        out[r:r + k] = fmt.dequantize(piece, k * n_cols, name).reshape(k, n_cols)
        yield
    return out


def iter_load_weights(cfg: LlamaConfig, gguf: Any, layers: range,
                      raw_of: Callable[[str], bytes | bytearray | memoryview]):
    """Dequantize the tensors ``layers`` needs, one layer at a time: yields after each
    layer, and between pieces of the embedding table (so a tab can return to its event
    loop), and returns the ModelWeights at the end (``StopIteration.value``; `load_weights`
    wraps this for synchronous callers). ``raw_of(name)`` returns exactly that tensor's raw
    bytes (``gguf.tensors[name].nbytes``)."""
    names = tensors_needed(cfg, gguf, layers)

    def get(name: str) -> np.ndarray:
        return gguf.tensor_array(name, raw_of(name))

    blocks = []
    for i in layers:
        fields = {field: get(f"blk.{i}.{suffix}") for suffix, field in BLOCK_TENSORS.items()}
        fields.update({field: get(f"blk.{i}.{suffix}") for suffix, field in BIAS_TENSORS.items()
                       if f"blk.{i}.{suffix}" in names})
        blocks.append(LayerWeights(**fields))
        yield i
    tok_embd = None
    if "token_embd.weight" in names:
        tok_embd = yield from iter_tensor_array(gguf, "token_embd.weight", raw_of("token_embd.weight"))
    output_norm = output = None
    if layers.stop == cfg.n_layers:
        output_norm = get("output_norm.weight")
        output = tok_embd if cfg.tied_output else (
            yield from iter_tensor_array(gguf, "output.weight", raw_of("output.weight")))
        if layers.start != 0:  # tied, needed only as the output projection
            tok_embd = None
    return ModelWeights(layers=layers, blocks=blocks, tok_embd=tok_embd,
                        output_norm=output_norm, output=output)


def load_weights(cfg: LlamaConfig, gguf: Any, layers: range,
                 raw_of: Callable[[str], bytes | bytearray | memoryview]) -> ModelWeights:
    """Dequantize the tensors ``layers`` needs (see iter_load_weights)."""
    return run_steps(iter_load_weights(cfg, gguf, layers, raw_of))


def weights_from_ranges(cfg: LlamaConfig, gguf: Any, layers: range,
                        blobs: Sequence[tuple[int, bytes | bytearray | memoryview]]) -> ModelWeights:
    """From fetched byte ranges: ``blobs`` holds ``(start, data)`` pairs, ``data`` being the
    file's bytes from absolute offset ``start`` on, e.g. one HTTP Range response per range
    of ``gguf.byte_ranges(tensors_needed(cfg, gguf, layers))``."""
    return load_weights(cfg, gguf, layers, raw_reader(gguf, blobs))


def raw_reader(gguf: Any, blobs: Sequence[tuple[int, bytes | bytearray | memoryview]]):
    """``raw_of(name)`` over fetched ``(start, data)`` byte ranges (see weights_from_ranges)."""
    blobs = sorted(blobs, key=lambda b: b[0])

    def raw_of(name: str) -> memoryview:
        info = gguf.tensors[name]
        for start, data in blobs:
            if start <= info.offset and info.end <= start + memoryview(data).nbytes:
                return gguf.tensor_bytes(name, data, start)
        raise GGUFError(f"tensor {name!r} (bytes [{info.offset}, {info.end}) of the file) is not "
                        f"inside any of the {len(blobs)} byte ranges given; fetch "
                        f"gguf.byte_ranges(tensors_needed(...))")

    return raw_of


def weights_from_path(path: str | os.PathLike, layers: range | None = None,
                      gguf: Any = None) -> tuple[LlamaConfig, Any, ModelWeights]:
    """Parse a local GGUF (unless ``gguf`` is given) and load ``layers`` (default: all).
    Reads only the needed tensors. Returns (config, parsed gguf, weights)."""
    if gguf is None:
        gguf = read_gguf_path(path)
    cfg = LlamaConfig.from_gguf(gguf)
    layers = range(cfg.n_layers) if layers is None else layers
    with open(path, "rb") as f:
        def raw_of(name: str) -> bytes:
            info = gguf.tensors[name]
            f.seek(info.offset)
            raw = f.read(info.nbytes)
            if len(raw) != info.nbytes:
                raise GGUFError(f"{path}: tensor {name!r} needs bytes [{info.offset}, {info.end}) "
                                f"but the file ends at byte {info.offset + len(raw)}")
            return raw

        return cfg, gguf, load_weights(cfg, gguf, layers, raw_of)
