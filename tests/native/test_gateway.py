"""The OpenAI gateway (signaling/gateway.py) with the official `openai` client, natively.

The server is the real aiohttp app; the worker is the real ApiWorker (the tab's code) over
a real WebSocket, driving the real engine: SmolLM2 Q4_1 on the numpy backend and MiniLM on
numpy. Only the transport under the worker differs from a tab (aiohttp instead of the
browser's WebSocket); tests/browser/test_openai_api.py runs the same client against a real
headless tab. Every test is bounded by asyncio timeouts and small max_tokens.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

import numpy as np
import pytest

aiohttp = pytest.importorskip("aiohttp")
openai = pytest.importorskip("openai")

from signaling.gateway import Gateway, require_key_off_loopback  # noqa: E402
from signaling.server import ServerConfig, start  # noqa: E402
from tabmesh.api_worker import ApiWorker  # noqa: E402
from tabmesh.embed_service import EmbedService  # noqa: E402
from tabmesh.llm_page import LLMService  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
GGUF = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM = ROOT / "models" / "all-MiniLM-L6-v2"
MODEL_ID = GGUF.name
EMBED_ID = "all-MiniLM-L6-v2"
KEY = "test-key-123"
USER = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]

pytestmark = pytest.mark.skipif(not GGUF.exists() or not MINILM.exists(),
                                reason="models missing: run `tabmesh setup`")

_services = {}


def services():
    """One numpy model and one embedder for the module (loading takes seconds)."""
    if not _services:
        from tabmesh.api import Client
        from tabmesh.model.loader import load_model
        from tabmesh.rag.bert_numpy import SentenceEmbedder
        llm = LLMService(device=None)
        llm.loaded = asyncio.run(load_model(str(GGUF), backend="numpy", n_ctx=512))
        llm.loaded.model_id = MODEL_ID
        llm.client = Client(llm.loaded.engine)
        emb = EmbedService()
        emb.embedder, emb.model_id = SentenceEmbedder.from_dir(str(MINILM)), EMBED_ID
        _services.update(llm=llm, embed=emb)
    return _services


class Service:
    def __init__(self, delay_s: float = 0.0):
        s = services()
        self.llm, self.embed, self.delay_s = s["llm"], s["embed"], delay_s
        self.chat_open, self.chat_close = self.llm.chat_open, self.llm.chat_close
        self.embeddings = self.embed.embeddings

    async def chat_create(self, body):
        await asyncio.sleep(self.delay_s * 20)
        return await self.llm.chat_create(body)

    async def chat_next(self, sid):
        if self.delay_s:
            await asyncio.sleep(self.delay_s)   # a slow tab: keeps a stream open long enough to test queueing
        return await self.llm.chat_next(sid)


@contextlib.asynccontextmanager
async def server(**cfg):
    runner, _site, port = await start(ServerConfig(port=0, root=ROOT, **cfg))
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def worker(base: str, key: str | None = KEY, delay_s: float = 0.0, models=(MODEL_ID,)):
    session = aiohttp.ClientSession()
    ws = await session.ws_connect(base.replace("http", "ws") + "/api/worker")
    w = ApiWorker(Service(delay_s), send=lambda msg: ws.closed or asyncio.ensure_future(ws.send_str(json.dumps(msg))))
    await ws.send_str(json.dumps(w.hello({"models": list(models), "canLoad": [], "embeddings": [EMBED_ID]}, key)))

    async def pump():
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                w.on_frame(json.loads(msg.data))
    task = asyncio.ensure_future(pump())
    for _ in range(100):   # until the welcome arrives
        if w.worker_id:
            break
        await asyncio.sleep(0.02)
    try:
        yield w, ws
    finally:
        await ws.close()      # the tab vanishes first, as a closed tab does
        task.cancel()
        w.close()
        await session.close()


def client(base: str, key: str | None = KEY) -> "openai.AsyncOpenAI":
    return openai.AsyncOpenAI(base_url=base + "/v1", api_key=key or "none", max_retries=0, timeout=120)


def run(coro, timeout=240):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def direct_greedy(max_tokens: int, **extra) -> dict:
    return run(services()["llm"].client.chat.completions.create(
        {"messages": USER, "max_tokens": max_tokens, "temperature": 0, **extra}))


def test_models_whole_and_streamed_chat_match_the_engine():
    want = direct_greedy(12)

    async def main():
        async with server(api_key=KEY) as base, worker(base):
            c = client(base)
            ids = {m.id for m in (await c.models.list()).data}
            assert {MODEL_ID, EMBED_ID} <= ids
            whole = await c.chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=12, temperature=0)
            pieces, usage, finish = [], None, None
            stream = await c.chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=12, temperature=0,
                                                     stream=True, stream_options={"include_usage": True})
            async for chunk in stream:
                for ch in chunk.choices:
                    pieces.append(ch.delta.content or "")
                    finish = ch.finish_reason or finish
                usage = chunk.usage or usage
            return whole, "".join(pieces), usage, finish
    whole, streamed, usage, finish = run(main())
    assert whole.choices[0].message.content == want["choices"][0]["message"]["content"]
    assert whole.usage.completion_tokens == want["usage"]["completion_tokens"] == 12
    assert whole.usage.prompt_tokens == want["usage"]["prompt_tokens"] > 5
    assert whole.choices[0].finish_reason == "length"
    assert streamed == whole.choices[0].message.content
    assert usage.completion_tokens == 12 and usage.prompt_tokens == whole.usage.prompt_tokens
    assert finish == "length"


def test_stop_string_and_errors():
    want = direct_greedy(12)["choices"][0]["message"]["content"]
    stop = want.split()[1]   # the second word of the greedy answer

    async def main():
        async with server(api_key=KEY) as base, worker(base):
            c = client(base)
            stopped = await c.chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=12,
                                                      temperature=0, stop=[stop])
            with pytest.raises(openai.AuthenticationError) as no_key:
                await client(base, key="wrong").chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=2)
            with pytest.raises(openai.NotFoundError) as unknown:
                await c.chat.completions.create(model="no-such-model", messages=USER, max_tokens=2)
            with pytest.raises(openai.BadRequestError) as bad:
                await c.chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=2, temperature=7)
            return stopped, no_key.value, unknown.value, bad.value
    stopped, no_key, unknown, bad = run(main())
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == want[:want.index(stop)]
    assert no_key.status_code == 401 and no_key.code == "invalid_api_key"
    assert unknown.status_code == 404 and unknown.code == "model_not_found"
    assert bad.status_code == 400 and "temperature" in str(bad.message)


def test_embeddings_equal_the_embedder_and_decode_from_base64():
    texts = ["The contract ends in 2027.", "Clause 4.2 covers liability.", "日本語のテキスト"]
    ref = services()["embed"].embedder.embed(texts)

    async def main():
        async with server(api_key=KEY) as base, worker(base):
            c = client(base)
            as_b64 = await c.embeddings.create(model=EMBED_ID, input=texts)   # the client asks for base64
            as_float = await c.embeddings.create(model=EMBED_ID, input=texts[0], encoding_format="float")
            return as_b64, as_float
    as_b64, as_float = run(main())
    got = np.array([d.embedding for d in as_b64.data], dtype=np.float32)
    assert got.shape == (3, 384)
    np.testing.assert_array_equal(got, ref)   # float32 through base64 is lossless
    assert np.abs(np.array(as_float.data[0].embedding) - ref[0]).max() < 1e-6   # JSON floats round-trip
    assert as_b64.usage.prompt_tokens > 10


def test_disconnect_frees_the_tab_and_concurrent_clients_queue():
    async def main():
        async with server(api_key=KEY, api_max_queue=1) as base, worker(base, delay_s=0.05) as (w, _ws):
            c = client(base)
            stream = await c.chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=200,
                                                     temperature=0, stream=True)
            got = 0
            async for _chunk in stream:
                got += 1
                if got == 3:
                    break
            await stream.close()          # the client goes away mid-stream
            t0 = time.monotonic()
            while w.running and time.monotonic() - t0 < 10:
                await asyncio.sleep(0.05)
            freed_s = time.monotonic() - t0
            assert not w.running, "the tab kept generating for a client that left"
            # Two clients at once: one runs, one waits in the queue; a third is refused (429).
            a = asyncio.ensure_future(c.chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=4,
                                                                temperature=0))
            await asyncio.sleep(0.3)
            b = asyncio.ensure_future(c.chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=4,
                                                                temperature=0))
            await asyncio.sleep(0.3)
            with pytest.raises(openai.RateLimitError):
                await c.chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=4)
            ra, rb = await asyncio.gather(a, b)
            return freed_s, ra, rb, w.served
    freed_s, ra, rb, served = run(main())
    assert freed_s < 5
    assert ra.choices[0].message.content == rb.choices[0].message.content
    assert ra.usage.completion_tokens == 4
    assert served == 3


def test_worker_auth_hostile_frames_and_a_worker_that_leaves():
    async def main():
        async with server(api_key=KEY) as base:
            async with aiohttp.ClientSession() as s:
                ws = await s.ws_connect(base.replace("http", "ws") + "/api/worker")
                await ws.send_str(json.dumps({"type": "hello", "version": 1, "apiKey": "wrong", "slots": 1}))
                msg = await ws.receive(timeout=5)
                assert msg.type is aiohttp.WSMsgType.CLOSE and ws.close_code == 4401
                ws = await s.ws_connect(base.replace("http", "ws") + "/api/worker")
                await ws.send_str("[not a hello")
                await ws.receive(timeout=5)
                assert ws.close_code == 4400
            async with worker(base) as (w, ws):
                for junk in ("{", "[]", json.dumps({"type": "chunk", "id": "r999", "data": {}}),
                             json.dumps({"type": "error", "id": "r1", "status": 200, "error": {}}),
                             json.dumps({"type": "status", "models": "x"}), "\x00" * 100):
                    await ws.send_str(junk)
                c = client(base)
                ok = await c.chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=2, temperature=0)
                pending = asyncio.ensure_future(
                    c.chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=300, temperature=0))
                await asyncio.sleep(0.5)
            # the worker's socket is closed now, mid-request
            with pytest.raises(openai.APIStatusError) as gone:
                await pending
            with pytest.raises(openai.InternalServerError) as none_left:
                await c.chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=2)
            return ok, gone.value, none_left.value
    ok, gone, none_left = run(main())
    assert ok.usage.completion_tokens == 2
    assert gone.status_code == 502 and gone.code == "worker_gone"
    assert none_left.status_code == 503 and none_left.code == "no_workers"


def test_an_api_key_is_required_off_loopback():
    with pytest.raises(SystemExit, match="API key"):
        require_key_off_loopback("0.0.0.0", None)
    require_key_off_loopback("0.0.0.0", "k")
    require_key_off_loopback("127.0.0.1", None)


def test_queue_hands_slots_out_in_order_and_never_twice():
    async def main():
        g = Gateway(max_queue=4)
        sent = []
        w = g.worker_hello("w1", sent.append, {"type": "hello", "version": 1, "slots": 1, "models": ["m"]})
        first = await g.run_job("chat", "m", {}, False)
        waiters = [asyncio.ensure_future(g.run_job("chat", "m", {"n": i}, False)) for i in range(3)]
        await asyncio.sleep(0.01)
        assert not any(t.done() for t in waiters) and len(g.waiters) == 3
        order = []
        for job in [first]:
            g.worker_frame(w, json.dumps({"type": "result", "id": job.rid, "data": {}}))
        for t in waiters:
            job = await asyncio.wait_for(t, 1)
            order.append(job.body["n"])
            assert len(w.active) == 1
            g.worker_frame(w, json.dumps({"type": "result", "id": job.rid, "data": {}}))
        return order, w.active, g.dropped_frames
    order, active, dropped = asyncio.run(main())
    assert order == [0, 1, 2] and not active and dropped == 0
