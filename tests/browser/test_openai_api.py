"""The OpenAI endpoint end to end: the official `openai` client -> `tabmesh serve --api-key`
-> a headless node started with `tabmesh node --headless` (real Chromium, real WebGPU on
SwiftShader, the real SmolLM2 and MiniLM) -> back.

Everything runs inside the test network namespace: the server and the node as processes
started there, the client from a thread that entered it (netns.call_in). Generation is
slow on a software GPU, so each request asks for a handful of tokens; every wait is bounded.
"""
from __future__ import annotations

import base64
import json
import os
import secrets
import statistics
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import netns
from settings import ROOT, config

openai = pytest.importorskip("openai")

KEY = "k-" + secrets.token_hex(8)
MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBED = "all-MiniLM-L6-v2"
USER = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]


class Proc:
    def __init__(self, cmd, env, ready_word, timeout_s, what):
        self.lines: list[str] = []
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        ready = threading.Event()

        def pump():
            for line in self.proc.stdout:
                self.lines.append(line.rstrip("\n"))
                if ready_word in line or '"failed"' in line:
                    ready.set()
            ready.set()
        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(timeout_s) or not any(ready_word in line for line in self.lines):
            self.stop()
            pytest.fail(f"{what} did not start:\n" + "\n".join(self.lines[-40:]))

    def events(self) -> list[dict]:
        return [json.loads(line) for line in self.lines if line.startswith("{")]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def api(app):
    """A keyed server and one headless node serving it, both in the test namespace."""
    port = 8766 if app.ns else 0
    if not port:
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    env = dict(os.environ, PYTHONUNBUFFERED="1", TABMESH_ROOT=str(ROOT), TABMESH_API_KEY=KEY)
    prefix = netns.exec_prefix(app.ns)
    server = Proc(prefix + [sys.executable, "-m", "tabmesh", "serve", "--port", str(port), "--max-queue", "8"],
                  env, "serving http://", 30, "tabmesh serve --api-key")
    base = f"http://127.0.0.1:{port}"
    node = Proc(prefix + [sys.executable, "-m", "tabmesh", "node", "--headless", "--server", base + "/",
                          "--room", "api-" + secrets.token_hex(3)],
                env, '"ready"', config.LLM_TIMEOUT_MS / 1000, "tabmesh node --headless")
    yield type("Api", (), {"base": base, "ns": app.ns, "node": node, "server": server})
    node.stop()
    server.stop()


def call(api, fn, *args, timeout_s=240.0):
    return netns.call_in(api.ns, fn, *args, timeout_s=timeout_s)


def client(api, key=KEY):
    return openai.OpenAI(base_url=api.base + "/v1", api_key=key, max_retries=0, timeout=180)


def health(api) -> dict:
    import urllib.request

    def get():
        with urllib.request.urlopen(api.base + "/healthz", timeout=10) as r:
            return json.loads(r.read())
    return call(api, get)["api"]


def test_headless_node_serves_models_and_whole_and_streamed_chat(api):
    ready = [e for e in api.node.events() if e["event"] == "ready"][0]
    assert ready["model"] == MODEL and ready["api"]["serving"]

    def run():
        c = client(api)
        ids = [m.id for m in c.models.list().data]
        whole = c.chat.completions.create(model=MODEL, messages=USER, max_tokens=6, temperature=0)
        pieces, usage, finish, n_chunks = [], None, None, 0
        for chunk in c.chat.completions.create(model=MODEL, messages=USER, max_tokens=6, temperature=0,
                                               stream=True, stream_options={"include_usage": True}):
            n_chunks += 1
            for ch in chunk.choices:
                pieces.append(ch.delta.content or "")
                finish = ch.finish_reason or finish
            usage = chunk.usage or usage
        return ids, whole, "".join(pieces), usage, finish, n_chunks
    ids, whole, streamed, usage, finish, n_chunks = call(api, run)
    assert MODEL in ids and EMBED in ids
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 6
    assert whole.usage.prompt_tokens > 10
    assert streamed == whole.choices[0].message.content and len(streamed) > 5
    assert usage.completion_tokens == 6 and usage.prompt_tokens == whole.usage.prompt_tokens
    assert finish == "length" and n_chunks >= 6   # token by token, then the usage chunk


def test_stop_errors_and_keys(api):
    def run():
        c = client(api)
        ref = c.chat.completions.create(model=MODEL, messages=USER, max_tokens=6, temperature=0)
        text = ref.choices[0].message.content
        stop = text.split()[1]
        stopped = c.chat.completions.create(model=MODEL, messages=USER, max_tokens=6, temperature=0, stop=stop)
        errors = {}
        for name, fn in (("no_key", lambda: client(api, key="wrong").models.list()),
                         ("unknown", lambda: c.chat.completions.create(model="gpt-9", messages=USER, max_tokens=2)),
                         ("bad", lambda: c.chat.completions.create(model=MODEL, messages=[], max_tokens=2))):
            try:
                fn()
            except openai.APIStatusError as exc:
                errors[name] = (exc.status_code, exc.code)
        return text, stop, stopped, errors
    text, stop, stopped, errors = call(api, run)
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == text[:text.index(stop)]
    assert errors["no_key"] == (401, "invalid_api_key")
    assert errors["unknown"] == (404, "model_not_found")
    assert errors["bad"][0] == 400


def test_embeddings_have_384_dims_and_equal_the_in_tab_embeddings(api, open_node, room):
    fixture = json.loads((ROOT / "tests/fixtures/embeddings_minilm.json").read_text())
    texts = [t["text"] for t in fixture["texts"]][:6]
    ref = np.stack([np.frombuffer(base64.b64decode(t["embedding_f16"]), "<f2")
                    for t in fixture["texts"][:6]]).astype(np.float32)   # f16-rounded: cos error < 1e-4

    got = call(api, lambda: client(api).embeddings.create(model=EMBED, input=texts))
    vecs = np.array([d.embedding for d in got.data], dtype=np.float32)
    assert vecs.shape == (len(texts), 384)
    node = open_node(room)
    in_tab = node.page.evaluate("(t) => tabmesh.embed(t)", texts)
    tab = np.array(in_tab["vectors"], dtype=np.float32)
    # Same code on the same kind of backend in two tabs: equal up to float32 rounding of the
    # GPU's reduction order (identical on numpy).
    assert np.abs(vecs - tab).max() < 1e-5, in_tab["backend"]
    cos = (vecs * ref).sum(axis=1)
    assert cos.min() >= 0.999, cos   # sentence-transformers' own vectors
    assert got.usage.prompt_tokens == sum(len(t["ids"]) for t in fixture["texts"][:6])


def test_disconnect_frees_the_node_then_concurrent_streams_are_all_served(api):
    """A client leaving mid-stream stops the tab's generation; then a bounded load test:
    N concurrent streaming clients, all served through the queue, with TTFT percentiles."""
    def leave_mid_stream():
        c = client(api)
        stream = c.chat.completions.create(model=MODEL, messages=USER, max_tokens=400, temperature=0, stream=True)
        for i, _chunk in enumerate(stream):
            if i == 2:
                break
        stream.close()
    call(api, leave_mid_stream)
    t0 = time.monotonic()
    while health(api)["busy"] and time.monotonic() - t0 < 30:
        time.sleep(0.2)
    snap = health(api)
    assert snap["busy"] == 0, f"the node is still busy {time.monotonic() - t0:.0f} s after the client left: {snap}"
    assert snap["cancelled"] >= 1

    n_clients, max_tokens = 3, 4
    results: list[dict] = []

    def one(i):
        c = client(api)
        t = time.monotonic()
        ttft, n, text = None, 0, []
        for chunk in c.chat.completions.create(model=MODEL, messages=USER, max_tokens=max_tokens, temperature=0,
                                               stream=True):
            for ch in chunk.choices:
                if ch.delta.content:
                    ttft = ttft or time.monotonic() - t
                    n += 1
                    text.append(ch.delta.content)
        results.append({"ttft": ttft, "tokens": n, "text": "".join(text), "s": time.monotonic() - t})

    def load():
        threads = [threading.Thread(target=one, args=(i,)) for i in range(n_clients)]
        t = time.monotonic()
        for th in threads:
            th.start()
        for th in threads:
            th.join(200)
        return time.monotonic() - t
    wall = call(api, load, timeout_s=260)
    assert len(results) == n_clients, results
    assert all(r["tokens"] == max_tokens for r in results)
    assert len({r["text"] for r in results}) == 1          # greedy: the same answer for each
    ttfts = sorted(r["ttft"] for r in results)
    print(f"\nload: {n_clients} concurrent streams x {max_tokens} tokens in {wall:.1f} s = "
          f"{n_clients * max_tokens / wall:.2f} tok/s; TTFT p50 {statistics.median(ttfts):.2f} s, "
          f"p99 {ttfts[-1]:.2f} s")
    assert health(api)["busy"] == 0
