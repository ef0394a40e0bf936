"""The tab's sentence embedder (all-MiniLM-L6-v2): loading, and OpenAI-shaped embeddings.

One instance per tab, shared by the RAG panel, `window.tabmesh.embed` and the OpenAI
gateway's /v1/embeddings. The model folder comes from the server's /models/ (files read
through the Cache API like the GGUF weights, so a reload downloads nothing). WebGPU runs
the encoder when the tab has a device and the GPU encoder is available; numpy otherwise.

`embeddings_response` is pure and tested natively.
"""
from __future__ import annotations

import json
import logging
from typing import Callable

import numpy as np

from .api_errors import InvalidRequestError, ModelNotFoundError

log = logging.getLogger("tabmesh.embed")
DEFAULT_EMBED_MODEL = "all-MiniLM-L6-v2"
MAX_INPUTS = 2048


def check_inputs(body: dict) -> list[str]:
    texts = body.get("input")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise InvalidRequestError("`input` must be a string or a non-empty list of strings", param="input")
    if len(texts) > MAX_INPUTS:
        raise InvalidRequestError(f"`input` has {len(texts)} strings; at most {MAX_INPUTS}", param="input")
    return texts


def embeddings_response(model: str, vectors: np.ndarray, n_tokens: int) -> dict:
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": [float(x) for x in row]}
                     for i, row in enumerate(np.asarray(vectors, dtype=np.float32))],
            "usage": {"prompt_tokens": int(n_tokens), "total_tokens": int(n_tokens)}}


class EmbedService:
    def __init__(self, device=None, on_status: Callable[[str], None] = lambda text: None,
                 on_progress: Callable[[int, int], None] = lambda done, total: None):
        self.device = device
        self.on_status, self.on_progress = on_status, on_progress
        self.model_id: str | None = None
        self.embedder = None      # SentenceEmbedder (numpy) — tokenizer and reference encoder
        self.gpu = None           # the WebGPU encoder, when the tab has a device
        self.backend = "numpy"

    async def served(self) -> list[str]:
        from .model.remote import served_models
        return [m["name"] for m in await served_models("embedding")]

    async def _read(self, url: str) -> bytes:
        from .model.remote import RemoteFile
        f = await RemoteFile(url, self.on_progress).open()
        return b"".join((await f.fetch_many([(0, f.size)])).values()) if f.size else b""

    async def load(self, model: str | None = None, backend: str | None = None) -> dict:
        from .rag.bert_numpy import SentenceEmbedder
        served = await self.served()
        model = model or (DEFAULT_EMBED_MODEL if DEFAULT_EMBED_MODEL in served else (served or [None])[0])
        if model is None or model not in served:
            raise ModelNotFoundError(f"embedding model {model!r} is not served here; available: "
                                     f"{', '.join(served) or 'none'}", param="model")
        # WebGPU by default on a real GPU; on a CPU adapter (SwiftShader) numpy is ~10x faster
        cpu_adapter = self.device is not None and bool(self.device.info.get("cpu_adapter"))
        want = backend or ("webgpu" if self.device is not None and not cpu_adapter else "numpy")
        if want == "webgpu" and self.device is None:
            raise InvalidRequestError("this tab has no WebGPU device; use the numpy backend", param="backend")
        if self.model_id == model and self.backend == want:
            return self.info()
        self.on_status(f"loading {model}…")
        base = f"/models/{model}/"
        cfg = json.loads(await self._read(base + "sentence_bert_config.json") or b"{}")
        self.embedder = SentenceEmbedder.from_files(
            (await self._read(base + "tokenizer.json")).decode(), await self._read(base + "model.safetensors"),
            (await self._read(base + "config.json")).decode(), max_seq_length=int(cfg.get("max_seq_length", 256)))
        self.gpu, self.backend = None, "numpy"
        if want == "webgpu":
            self.gpu = await self._gpu_encoder()
            self.backend = "webgpu" if self.gpu is not None else "numpy"
        self.model_id = model
        self.on_status(f"{model} ready ({self.backend})")
        return self.info()

    async def _gpu_encoder(self):
        try:
            from .rag import bert_gpu
        except ImportError:
            return None
        try:
            return await bert_gpu.GPUBert.create(self.device, self.embedder.model.cfg, self.embedder.model.w)
        except Exception as exc:   # fall back to numpy, and say so
            log.warning("WebGPU encoder unavailable, using numpy: %s", exc)
            return None

    def info(self) -> dict | None:
        return None if self.model_id is None else {"model": self.model_id, "backend": self.backend,
                                                   "dim": self.embedder.model.cfg.hidden_size}

    async def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """(unit vectors (n, 384), tokens used), batched as SentenceEmbedder batches."""
        if self.embedder is None:
            await self.load()
        if self.gpu is None:
            return await self.embedder.embed_counted(texts)
        from .rag.bert_numpy import SentenceEmbedder
        return await SentenceEmbedder(self.embedder.tokenizer, self.gpu).embed_counted(texts)

    async def embeddings(self, body: dict) -> dict:
        texts = check_inputs(body)
        model = body.get("model") or DEFAULT_EMBED_MODEL
        if self.model_id != model:
            await self.load(model)
        vectors, n_tokens = await self.embed(texts)
        return embeddings_response(model, vectors, n_tokens)
