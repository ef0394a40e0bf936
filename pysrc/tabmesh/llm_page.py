"""The tab's LLM: model loading, the chat panel, and window.tabmesh.chat / models / llm.

Runs only in the tab. The engine, API and model code it drives are the same modules the
native tests run; this file owns the DOM of the chat panel and the JS-facing handlers.
"""
from __future__ import annotations

import itertools
import logging
import time
from contextlib import aclosing

from .api import Client, list_models
from .api_errors import APIError, ModelNotFoundError
from .engine import GenerationParams
from .jsbridge import js, js_error_message
from .model.loader import DEFAULT_NUMERICS, generation_summary, load_model
from .sampler import SamplingParams

log = logging.getLogger("tabmesh.llm")


class LLMService:
    """One loaded model at a time, shared by the chat panel and the JS API."""

    def __init__(self, device, on_status=lambda text: None, on_progress=lambda done, total: None):
        self.device = device
        self.on_status, self.on_progress = on_status, on_progress
        self.on_loaded = lambda: None     # e.g. tell the API gateway this tab now holds the model
        self.loaded = None
        self.client: Client | None = None
        self._streams: dict[str, object] = {}
        self._ids = itertools.count(1)

    @property
    def default_backend(self) -> str:
        return "webgpu" if self.device is not None else "numpy"

    async def served_models(self) -> list[dict]:
        from .model.remote import served_models
        return await served_models("gguf")

    async def load(self, model: str | None = None, backend: str | None = None, n_ctx: int = 2048,
                   numerics: str | None = None) -> dict:
        """Load ``model`` (a served GGUF) on ``backend``; numerics "ggml" (llama.cpp's arithmetic,
        bit for bit) or "f32", default per backend (loader.DEFAULT_NUMERICS)."""
        served = await self.served_models()
        if not served:
            raise ModelNotFoundError("the server serves no GGUF model: start it with `tabmesh serve --models DIR`",
                                     param="model")
        names = [m["name"] for m in served]
        model = model or (self.loaded.model_id if self.loaded else names[0])
        if model not in names:
            raise ModelNotFoundError(f"model {model!r} is not served here; available: {', '.join(names)}", param="model")
        backend = backend or (self.loaded.backend if self.loaded else self.default_backend)
        if numerics is None:
            same = self.loaded is not None and self.loaded.backend == backend
            numerics = self.loaded.numerics if same else DEFAULT_NUMERICS.get(backend, "f32")
        if self.loaded is not None and (self.loaded.model_id, self.loaded.backend,
                                        self.loaded.numerics) == (model, backend, numerics):
            return self.info()
        self.on_status(f"loading {model} ({backend}, {numerics} numerics)…")
        self.loaded = None
        self.loaded = await load_model(f"/models/{model}", backend=backend, device=self.device, n_ctx=n_ctx,
                                       on_progress=self.on_progress, numerics=numerics)
        self.client = Client(self.loaded.engine)
        for w in self.loaded.warnings:
            log.warning("%s", w)
        self.on_status(f"{model} ready on {backend} in {self.loaded.load_s:.1f} s "
                       f"({self.loaded.bytes_read / 1e6:.1f} MB, {self.loaded.cache_hits} pieces from the browser cache)")
        self.on_loaded()
        return self.info()

    def info(self) -> dict | None:
        if self.loaded is None:
            return None
        lm = self.loaded
        return {"model": lm.model_id, "backend": lm.backend, "numerics": lm.numerics, "loadS": round(lm.load_s, 3),
                "bytesRead": lm.bytes_read, "cacheHits": lm.cache_hits,
                "networkBytes": lm.network_bytes, "nCtx": lm.engine.model.n_ctx,
                "warnings": lm.warnings}

    async def ensure(self, model: str | None) -> None:
        if self.loaded is None or (model and model != self.loaded.model_id):
            await self.load(model)

    # ---- OpenAI-shaped API ---------------------------------------------------------------
    async def chat_create(self, request: dict) -> dict:
        await self.ensure(request.get("model"))
        return await self.client.chat.completions.create({**request, "stream": False})

    async def chat_open(self, request: dict) -> str:
        await self.ensure(request.get("model"))
        stream = await self.client.chat.completions.create({**request, "stream": True})
        sid = f"s{next(self._ids)}"
        self._streams[sid] = stream
        return sid

    async def chat_next(self, sid: str) -> dict:
        stream = self._streams.get(sid)
        if stream is None:
            return {"done": True, "value": None}
        try:
            return {"done": False, "value": await stream.__anext__()}
        except StopAsyncIteration:
            self._streams.pop(sid, None)
            return {"done": True, "value": None}
        except BaseException:
            self._streams.pop(sid, None)
            raise

    async def chat_close(self, sid: str, cancel_only: bool = False) -> bool:
        stream = self._streams.get(sid)
        if stream is None:
            return False
        if cancel_only:
            stream.cancel()
        else:
            self._streams.pop(sid, None)
            await stream.aclose()
        return True

    async def models_list(self) -> dict:
        served = await self.served_models()
        loaded = list_models(self.loaded.engine)["data"] if self.loaded else []
        have = {m["id"] for m in loaded}
        return {"object": "list", "data": loaded + [
            {"id": m["name"], "object": "model", "created": 0, "owned_by": "tabmesh"}
            for m in served if m["name"] not in have]}

    # ---- raw generation (the CLI and benchmarks) -------------------------------------------
    async def benchmark(self, opts: dict) -> dict:
        """{tokens: [...], decode: N, model?, backend?, numerics?} → prefill/decode figures."""
        await self.load(opts.get("model"), opts.get("backend"), numerics=opts.get("numerics"))
        self.loaded.engine.reset()
        result = await run_model_benchmark(self.loaded.engine.model, [int(t) for t in opts["tokens"]],
                                           int(opts.get("decode", 128)))
        self.loaded.engine.reset()
        result.update(backend=self.loaded.backend, model=self.loaded.model_id, numerics=self.loaded.numerics)
        return result

    async def generate(self, opts: dict) -> dict:
        """{prompt, chat?, model?, backend?, numerics?, max_tokens?, temperature?, seed?} → summary dict."""
        await self.load(opts.get("model"), opts.get("backend"), numerics=opts.get("numerics"))
        engine = self.loaded.engine
        prompt = opts["prompt"]
        if opts.get("chat"):
            tokens = engine.encode_chat([{"role": "user", "content": prompt}])
        else:
            tokens = engine.tokenizer.encode(prompt, add_special=True, parse_special=False)
        if opts.get("fresh", True):
            engine.reset()  # measure a cold prefill, not a cache hit from an earlier call
        params = GenerationParams(sampling=SamplingParams(temperature=float(opts.get("temperature", 0.0))),
                                  max_tokens=int(opts.get("max_tokens", 32)), seed=opts.get("seed"))
        out, text, stats = [], [], None
        async with aclosing(engine.generate(tokens, params)) as events:
            async for ev in events:
                if ev.token is not None:
                    out.append(ev.token)
                text.append(ev.text)
                stats = ev.stats or stats
        summary = generation_summary(tokens, out, "".join(text), stats, self.loaded.load_s)
        summary["backend"] = self.loaded.backend
        summary["numerics"] = self.loaded.numerics
        summary["model"] = self.loaded.model_id
        timings = getattr(engine.model, "last_timings", {}) or {}
        summary["timings"]["last_forward"] = {k: v for k, v in timings.items() if isinstance(v, (int, float))}
        return summary


async def run_model_benchmark(model, prompt_tokens: list[int], n_decode: int) -> dict:
    """Prefill `prompt_tokens` in one forward, then `n_decode` greedy steps, straight on the
    model (no sampler, no stop): the figures `make bench` compares with llama.cpp."""
    t0 = time.perf_counter()
    tok = await model.forward(prompt_tokens, 0, output="argmax")
    prefill_s = time.perf_counter() - t0
    record = []
    t1 = time.perf_counter()
    for i in range(n_decode):
        tok = await model.forward([tok], len(prompt_tokens) + i, output="argmax")
        timings = getattr(model, "last_timings", None) or {}
        if "record_s" in timings:
            record.append(timings["record_s"])
    decode_s = time.perf_counter() - t1
    out = {"prompt_tokens": len(prompt_tokens), "decode_tokens": n_decode,
           "prefill_s": prefill_s, "prefill_tok_s": len(prompt_tokens) / prefill_s,
           "decode_s": decode_s, "decode_tok_s": n_decode / decode_s}
    if record:
        record.sort()
        out["record_ms_per_token_p50"] = 1000 * record[len(record) // 2]
    return out


# The panel's sampling (the API keeps OpenAI's defaults): small models ramble at temperature 1.
CHAT_PANEL_SAMPLING = {"temperature": 0.3, "top_p": 0.9}


class ChatPanel:
    """The chat UI: model picker, streaming answer as text, stop button, TTFT and tokens/s."""

    def __init__(self, service: LLMService, proxies, tasks, show_error):
        self.service, self.proxies, self.tasks, self.show_error = service, proxies, tasks, show_error
        self.doc = js.document
        self.messages: list[dict] = []
        self.stream_id: str | None = None
        el = self.doc.getElementById
        self.picker, self.backend, self.numerics = el("model-picker"), el("backend"), el("numerics")
        self.log, self.input, self.stats = el("chat-log"), el("chat-input"), el("chat-stats")
        self.send_btn, self.stop_btn = el("send"), el("stop")
        el("chat-form").addEventListener("submit", proxies(self._on_submit))
        self.input.addEventListener("keydown", proxies(self._on_key))
        self.stop_btn.addEventListener("click", proxies(lambda _ev: self._stop()))
        el("load-model").addEventListener("click", proxies(lambda _ev: tasks.spawn(self._load(), "load model")))
        el("clear-chat").addEventListener("click", proxies(lambda _ev: self._clear()))
        if service.device is None:
            self.backend.value = "numpy"

    async def populate(self) -> None:
        self.picker.replaceChildren()
        for m in await self.service.served_models():
            opt = self.doc.createElement("option")
            opt.value = m["name"]
            opt.textContent = f"{m['name']} ({m['size'] / 1e6:.0f} MB)"
            self.picker.append(opt)

    async def _load(self) -> None:
        try:
            await self.service.load(self.picker.value or None, self.backend.value, numerics=self._numerics())
        except Exception as exc:
            self.show_error(f"loading the model failed: {js_error_message(exc)}")

    def _numerics(self) -> str:
        """The picker's numerics; llama.cpp-exact runs on WebGPU only (numpy in a tab is f32)."""
        return self.numerics.value if self.backend.value == "webgpu" else "f32"

    def _bubble(self, role: str, text: str):
        div = self.doc.createElement("div")
        div.className = f"msg {role}"
        div.textContent = text  # never HTML: the model's output and pasted text are shown as text
        self.log.append(div)
        self.log.scrollTop = self.log.scrollHeight
        return div

    def _clear(self) -> None:
        self.messages.clear()
        self.log.replaceChildren()
        self.stats.textContent = ""

    def _on_key(self, ev) -> None:
        if ev.key == "Enter" and not ev.shiftKey and not ev.isComposing:
            self._on_submit(ev)

    def _on_submit(self, ev) -> None:
        ev.preventDefault()
        text = self.input.value.strip()
        if not text or self.stream_id is not None:
            return
        self.input.value = ""
        self.tasks.spawn(self._ask(text), "chat")

    def _stop(self) -> None:
        if self.stream_id is not None:
            self.tasks.spawn(self.service.chat_close(self.stream_id, cancel_only=True), "stop")

    async def _ask(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})
        self._bubble("user", text)
        bubble = self._bubble("assistant", "…")
        self.send_btn.disabled, self.stop_btn.disabled = True, False
        answer, t0, first, n = [], time.perf_counter(), None, 0
        try:
            await self.service.load(self.picker.value or None, self.backend.value, numerics=self._numerics())
            sid = self.stream_id = await self.service.chat_open(
                {"messages": self.messages, "stream": True, "stream_options": {"include_usage": True},
                 **CHAT_PANEL_SAMPLING})
            while True:
                step = await self.service.chat_next(sid)
                if step["done"]:
                    break
                chunk = step["value"]
                for choice in chunk["choices"]:
                    piece = choice["delta"].get("content")
                    if piece:
                        first = first or time.perf_counter()
                        n += 1
                        answer.append(piece)
                        bubble.textContent = "".join(answer)
                        self.log.scrollTop = self.log.scrollHeight
                if chunk.get("usage"):
                    u = chunk["usage"]
                    dt = time.perf_counter() - (first or t0)
                    self.stats.textContent = (
                        f"time to first token {(first or t0) - t0:.2f} s · {u['completion_tokens']} tokens · "
                        f"{u['completion_tokens'] / dt if dt > 0 else 0:.1f} tokens/s · prompt {u['prompt_tokens']} tokens")
            self.messages.append({"role": "assistant", "content": "".join(answer)})
        except APIError as exc:
            bubble.textContent = f"error: {exc}"
            self.messages.pop()
        except Exception as exc:
            bubble.textContent = "error"
            self.messages.pop()
            self.show_error(f"generation failed: {js_error_message(exc)}")
        finally:
            self.stream_id = None
            self.send_btn.disabled, self.stop_btn.disabled = False, True
