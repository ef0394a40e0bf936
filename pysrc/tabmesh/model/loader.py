"""Load a GGUF into a generation Engine: WebGPU or numpy backend, in a tab or natively.

    loaded = await load_model("models/SmolLM2-135M-Instruct.Q4_1.gguf", backend="numpy")
    loaded = await load_model("/models/SmolLM2-135M-Instruct.Q4_1.gguf", backend="webgpu",
                              device=dev, on_progress=show)          # in a tab: HTTP Range + Cache API

A source starting with "/" or "http" inside a tab is a URL on our own server; anywhere else
it is a local path. Only the tensors of `layers` are read.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..engine import Engine
from ..gguf import read_gguf_path
from ..jsbridge import IN_PYODIDE, run_sliced
from ..tokenizer import Tokenizer
from .config import LlamaConfig
from .llama_numpy import NumpyLlama
from .weights import iter_load_weights, raw_reader, tensors_needed

BACKENDS = ("webgpu", "numpy")
# f32 by default: numerics="ggml" (llama.cpp bit for bit) costs ~3.7x in decode on SwiftShader
DEFAULT_NUMERICS = {"webgpu": "f32", "numpy": "f32"}
DEFAULT_N_CTX = 2048
NUMPY_PREFILL_CHUNK = 2  # Pyodide numpy prefills ~3 tok/s: keep each slice well under a second


class NumpyBackend:
    """NumpyLlama behind the engine's async Model interface (see engine.Model)."""

    def __init__(self, llama: NumpyLlama):
        self.llama = llama
        self.n_ctx = llama.n_ctx
        self.n_vocab = llama.cfg.n_vocab
        self.last_timings: dict = {}

    async def forward(self, tokens, start_pos: int, *, output: str = "logits"):
        t0 = time.perf_counter()
        # in a tab this runs on the page's thread: hand the event loop back between layers
        # whenever a time slice is used up (see jsbridge.run_sliced)
        logits = (await run_sliced(self.llama.forward_steps(list(tokens), start_pos, last_only=True)))[0]
        self.last_timings = {"n_tokens": len(tokens), "total_s": time.perf_counter() - t0}
        return int(np.argmax(logits)) if output == "argmax" else logits


class GPUBackend:
    """GPULlama (whole model) behind the engine's Model interface."""

    def __init__(self, llama):
        self.llama = llama
        self.n_ctx = llama.n_ctx
        self.n_vocab = llama.cfg.n_vocab

    @property
    def last_timings(self) -> dict:
        return self.llama.last_timings

    async def forward(self, tokens, start_pos: int, *, output: str = "logits"):
        return await self.llama.forward(list(tokens), start_pos, output=output)


@dataclass
class LoadedModel:
    engine: Engine
    model_id: str
    backend: str
    config: LlamaConfig
    load_s: float
    bytes_read: int
    cache_hits: int = 0
    network_bytes: int = 0    # bytes that came over HTTP this time (the rest from the Cache API)
    warnings: list[str] = field(default_factory=list)
    numerics: str = "f32"


def model_id_of(source: str) -> str:
    return os.path.basename(source.split("?")[0])


async def _open(source: str):
    """(gguf header, fetch(start, end), RemoteFile | None) for a URL in a tab or a local path."""
    if IN_PYODIDE and (source.startswith("/") or source.startswith("http")):
        from .remote import RemoteFile, read_header
        remote = await RemoteFile(source).open()
        return await read_header(remote.fetch, remote.size), remote.fetch, remote
    gguf = read_gguf_path(source)

    async def fetch(start: int, end: int) -> bytes:
        with open(source, "rb") as f:
            f.seek(start)
            return f.read(end - start)
    return gguf, fetch, None


async def ggml_rope_table(cfg: LlamaConfig, n_ctx: int) -> tuple[np.ndarray, bool]:
    """numerics="ggml"'s RoPE table (llama_gpu.ggml_rope_table) and whether it is glibc's, as
    llama.cpp's is: in a tab from the server (GET /api/ggml-rope, signaling/numerics.py),
    which has the C library; natively computed here."""
    if not IN_PYODIDE:
        import platform

        from .ggml_numerics import _libm
        from .llama_gpu import ggml_rope_table as local_table
        return local_table(cfg, n_ctx), platform.libc_ver()[0] == "glibc" and _libm() is not None
    from pyodide.http import pyfetch  # type: ignore[import-not-found]

    url = (f"/api/ggml-rope?base={cfg.rope_base!r}&n_rot={cfg.n_rot}&freq_scale={cfg.rope_freq_scale!r}"
           f"&n={n_ctx}")
    resp = await pyfetch(url)
    if not resp.ok:
        raise RuntimeError(f"GET {url} -> HTTP {resp.status}: {(await resp.string())[:200]}")
    table = np.frombuffer(await resp.bytes(), "<f4").astype(np.float32)
    return table, resp.headers.get("x-tabmesh-libm") == "glibc"


async def _load_layers(gguf, fetch, cfg: LlamaConfig, layers: range, backend: str, device, n_ctx: int,
                       progress: Callable[[int, int], None], numerics: str = "f32",
                       warnings: list[str] | None = None):
    """GPULlama or NumpyLlama holding only `layers`, reading only their byte ranges.
    Returns (model, bytes read)."""
    ranges = gguf.byte_ranges(tensors_needed(cfg, gguf, layers))
    total = sum(b - a for a, b in ranges)
    done = 0

    async def counted_fetch(start: int, end: int) -> bytes:
        nonlocal done
        data = await fetch(start, end)
        done += len(data)
        progress(min(done, total), total)
        return data

    progress(0, total)
    if backend == "webgpu":
        from .llama_gpu import GPULlama
        table = None
        if numerics == "ggml":
            table, exact = await ggml_rope_table(cfg, n_ctx)
            if not exact and warnings is not None:
                warnings.append("the server's C library is not glibc: RoPE angles are correctly rounded, "
                                "not glibc's, so outputs can differ from llama.cpp's on glibc")
        return await GPULlama.load(device, gguf, counted_fetch, layers=layers, n_ctx=n_ctx, numerics=numerics,
                                   rope_table=table), done
    if numerics != "f32":
        raise ValueError("the numpy backend in a tab runs numerics='f32' (ggml numerics are the "
                         "WebGPU engine's, or NumpyLlama's natively)")
    blobs = [(a, await counted_fetch(a, b)) for a, b in ranges]
    # dequantize layer by layer, returning to the event loop in between
    weights = await run_sliced(iter_load_weights(cfg, gguf, layers, raw_reader(gguf, blobs)))
    return NumpyLlama(cfg, weights, n_ctx), done


def _check_backend(backend: str, device) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "webgpu" and device is None:
        raise ValueError("the webgpu backend needs a GPU device (tabmesh.gpu.open_device())")


async def load_model(source: str, *, backend: str = "webgpu", device=None, n_ctx: int = DEFAULT_N_CTX,
                     on_progress: Callable[[int, int], None] | None = None,
                     numerics: str | None = None) -> LoadedModel:
    """numerics: "ggml" (llama.cpp's arithmetic, bit for bit: its tokens) or "f32"; default
    DEFAULT_NUMERICS[backend]."""
    _check_backend(backend, device)
    numerics = DEFAULT_NUMERICS[backend] if numerics is None else numerics
    if numerics not in ("f32", "ggml"):
        raise ValueError(f"numerics must be 'f32' or 'ggml', got {numerics!r}")
    t0 = time.perf_counter()
    gguf, fetch, remote = await _open(source)
    cfg = LlamaConfig.from_gguf(gguf)
    n_ctx = min(n_ctx, cfg.n_ctx_train)
    tokenizer = Tokenizer.from_gguf_metadata(gguf.metadata)
    warnings: list[str] = []
    llama, done = await _load_layers(gguf, fetch, cfg, range(cfg.n_layers), backend, device, n_ctx,
                                     on_progress or (lambda done, total: None), numerics, warnings)
    model = GPUBackend(llama) if backend == "webgpu" else NumpyBackend(llama)
    model_id = model_id_of(source)
    # numpy runs on the page's thread: prefill in small chunks so the page (and its
    # signaling heartbeats) get the event loop back between them
    engine = Engine(model, tokenizer, tokenizer.chat_template, model_id,
                    prefill_chunk=NUMPY_PREFILL_CHUNK if backend == "numpy" else 512)
    if remote is not None and remote.cache_warning:
        warnings.append(remote.cache_warning)
    return LoadedModel(engine, model_id, backend, cfg, time.perf_counter() - t0, done,
                       remote.cache_hits if remote is not None else 0,
                       remote.fetched_bytes if remote is not None else 0, warnings, numerics)


@dataclass
class LoadedStage:
    llama: Any            # GPULlama | NumpyLlama over `layers`
    layers: range
    backend: str
    load_s: float
    bytes_read: int


async def load_stage(source: str, layers: range, *, backend: str = "webgpu", device=None,
                     n_ctx: int = DEFAULT_N_CTX, on_progress: Callable[[int, int], None] | None = None
                     ) -> LoadedStage:
    """One pipeline stage: only `layers` of the model (plus the embedding table on the first
    stage and the output head on the last), fetched by byte range."""
    _check_backend(backend, device)
    t0 = time.perf_counter()
    gguf, fetch, _remote = await _open(source)
    cfg = LlamaConfig.from_gguf(gguf)
    llama, done = await _load_layers(gguf, fetch, cfg, layers, backend, device, min(n_ctx, cfg.n_ctx_train),
                                     on_progress or (lambda done, total: None))
    return LoadedStage(llama, layers, backend, time.perf_counter() - t0, done)


async def load_header(source: str):
    """(gguf header, LlamaConfig, Tokenizer) without any tensor data: what a requester that
    runs no stage needs."""
    gguf, _fetch, _remote = await _open(source)
    return gguf, LlamaConfig.from_gguf(gguf), Tokenizer.from_gguf_metadata(gguf.metadata)


def generation_summary(prompt_tokens: list[int], tokens: list[int], text: str, stats: Any,
                       load_s: float) -> dict:
    """The JSON `tabmesh generate --json` prints (also returned by tabmesh.llm.generate)."""
    return {"prompt_tokens": list(prompt_tokens), "tokens": list(tokens), "text": text,
            "timings": {"load_s": round(load_s, 4), "ttft_s": round(stats.ttft_s, 4),
                        "prefill_tok_s": round(stats.prefill_tokens_per_s, 2),
                        "decode_tok_s": round(stats.decode_tokens_per_s, 2)}}
