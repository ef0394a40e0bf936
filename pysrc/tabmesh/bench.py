"""`tabmesh bench` (host side): measure in real headless Chromium, with references.

Every row puts our figure beside a reference measured in the same run on the same machine,
and their ratio. Sections:
  llm    prefill tok/s (512-token prompt) and decode tok/s (128 greedy tokens) of SmolLM2
         Q4_1: our WebGPU engine in headless Chromium, our numpy backend (in the tab, and
         natively), against llama.cpp (llama-cpp-python, same GGUF, same thread count);
         plus the Python recording cost per decoded token on WebGPU.
  mesh   data-channel ping round trip (our frames, through Python in both tabs) against a
         WebSocket ping/pong through the signaling server (what a server-relayed design pays
         per hop); 4 MiB echo over the data channel against the same bytes fetched over HTTP
         from the local server.
  pipeline greedy decode tok/s with SmolLM2 split over 1, 2 and 3 tabs (tabmesh mesh-run),
         and the latency each hop adds per token.
  gateway  the OpenAI endpoint: one streamed greedy answer through `/v1/chat/completions`
         (the official openai client) against the same request made in the tab itself
         (window.tabmesh.chat.completions.create): ms per token and time to first token,
         plus the latency the gateway adds to each token (the tab's send time to the
         client's receive time, same machine clock).
  rag    the tab's RAG (bench_rag.py): ingest passages/s against sentence-transformers on
         the CPU; our numpy HNSW build, recall@10 and query latency against hnswlib and
         exact search (10k and 100k random vectors); restoring a 100k-passage collection
         from IndexedDB against the raw IndexedDB read.
Progress goes to stderr; the table to stdout (and --json prints the rows as JSON).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import sys
import time
from pathlib import Path

from .headless import ServerThread, launch_args


def _progress(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


PING_LOOP_JS = """async ([peer, n]) => { const out = [];
  for (let i = 0; i < n; i++) { const t = performance.now(); await tabmesh.ping(peer); out.push(performance.now() - t); }
  return out; }"""

WS_LOOP_JS = """async (n) => {
  const ws = new WebSocket(`ws://${location.host}/ws`);
  await new Promise((res, rej) => { ws.onopen = res; ws.onerror = rej; });
  const out = [];
  for (let i = 0; i < n; i++) {
    const t = performance.now();
    const got = new Promise((res) => { ws.onmessage = res; });
    ws.send('{"type":"ping"}'); await got; out.push(performance.now() - t);
    if (i % 30 === 29) await new Promise((r) => setTimeout(r, 800));  // stay under the server's rate limit
  }
  ws.close(); return out; }"""

ECHO_JS = """async ([peer, size, reps]) => { const data = new Uint8Array(size);  // 4 MiB each way
  for (let i = 0; i < size; i++) data[i] = (i * 2654435761) >>> 24;
  const out = [];
  for (let r = 0; r < reps; r++) { const t = performance.now(); const back = await tabmesh.echo(peer, data);
    if (back.length !== size) throw new Error('short echo'); out.push(performance.now() - t); }
  return out; }"""

FETCH_JS = """async ([url, reps]) => { const out = [];
  for (let r = 0; r < reps; r++) { const t = performance.now();
    const b = await (await fetch(url, {cache: 'no-store', headers: {Range: 'bytes=0-4194303'}})).arrayBuffer();
    out.push([performance.now() - t, b.byteLength]); }
  return out; }"""


# A bare RTCDataChannel between the same two tabs, echoed in JS: the floor under our frames.
RAW_SETUP_JS = """async (role) => {
  window.__rawpc = new RTCPeerConnection({iceServers: []});
  if (role === 'offer') { window.__rawdc = __rawpc.createDataChannel('raw'); }
  else { __rawpc.ondatachannel = (e) => { const dc = e.channel; dc.onmessage = (m) => dc.send(m.data); }; }
  const gathered = () => new Promise((r) => { if (__rawpc.iceGatheringState === 'complete') r();
    __rawpc.onicegatheringstatechange = () => __rawpc.iceGatheringState === 'complete' && r(); });
  window.__rawOffer = async () => { await __rawpc.setLocalDescription(await __rawpc.createOffer()); await gathered(); return __rawpc.localDescription.sdp; };
  window.__rawAnswer = async (sdp) => { await __rawpc.setRemoteDescription({type: 'offer', sdp});
    await __rawpc.setLocalDescription(await __rawpc.createAnswer()); await gathered(); return __rawpc.localDescription.sdp; };
}"""
RAW_PING_JS = """async ([sdp, n]) => { await __rawpc.setRemoteDescription({type: 'answer', sdp}); const dc = __rawdc;
  await new Promise((r) => dc.readyState === 'open' ? r() : dc.onopen = r);
  const out = [], buf = new Uint8Array(24);
  for (let i = 0; i < n + 10; i++) { const t = performance.now(); const got = new Promise((r) => dc.onmessage = r);
    dc.send(buf); await got; if (i >= 10) out.push(performance.now() - t); }
  dc.close(); __rawpc.close(); return out; }"""


def raw_datachannel_pings(a, b, n: int) -> list[float]:
    a.evaluate(RAW_SETUP_JS, "offer")
    b.evaluate(RAW_SETUP_JS, "answer")
    answer = b.evaluate("(sdp) => __rawAnswer(sdp)", a.evaluate("__rawOffer()"))
    return a.evaluate(RAW_PING_JS, [answer, n])


def bench_mesh(server: ServerThread, pings: int) -> list[dict]:
    from playwright.sync_api import sync_playwright
    rows = []
    room = "bench-" + secrets.token_hex(3)
    with sync_playwright() as p:
        browsers = [p.chromium.launch(**launch_args()) for _ in range(2)]
        try:
            pages = []
            for i, b in enumerate(browsers):
                _progress(f"booting tab {i + 1}/2 (Pyodide + WebGPU self-test)…")
                page = b.new_context().new_page()
                page.goto(f"{server.url}?room={room}")
                t0 = time.perf_counter()
                info = page.evaluate("tabmesh.ready")
                _progress(f"tab {i + 1} ready in {time.perf_counter() - t0:.1f} s as {info['peerId']}")
                pages.append((page, info))
            (a, ainfo), (b, binfo) = pages
            deadline = time.monotonic() + 30
            while not any(x["state"] == "open" for x in a.evaluate("tabmesh.peers()")):
                if time.monotonic() > deadline:
                    raise RuntimeError("the two bench tabs never connected")
                time.sleep(0.1)
            _progress(f"{pings} data-channel pings…")
            a.evaluate(PING_LOOP_JS, [binfo["peerId"], 10])  # warm-up
            dc = a.evaluate(PING_LOOP_JS, [binfo["peerId"], pings])
            _progress(f"{pings} WebSocket pings through the server…")
            ws = a.evaluate(WS_LOOP_JS, pings)
            _progress(f"{pings} pings on a bare JS RTCDataChannel…")
            raw = raw_datachannel_pings(a, b, pings)
            for q, name in ((0.5, "p50"), (0.99, "p99")):
                ours = percentile(dc, q)
                for ref, ref_name in ((percentile(raw, q), "bare RTCDataChannel, JS echo"),
                                      (percentile(ws, q), "WebSocket ping via server")):
                    rows.append({"section": "mesh", "figure": f"round trip {name} (ms)", "ours": ours,
                                 "reference": ref, "reference_name": ref_name, "ratio": ref / ours})
            _progress("4 MiB echo over the data channel vs 4 MiB HTTP fetch…")
            size, reps = 4 << 20, 3
            echo = a.evaluate(ECHO_JS, [binfo["peerId"], size, reps])
            model = next((m["name"] for m in json.loads(a.evaluate("fetch('/models/').then(r => r.text())"))["models"]
                          if m.get("kind") == "gguf"), None)
            ours = 2 * size / (min(echo) / 1000) / 1e6  # bytes cross the channel twice
            row = {"section": "mesh", "figure": "4 MiB echo throughput (MB/s, both ways)", "ours": ours}
            if model:
                fetched = a.evaluate(FETCH_JS, [f"/models/{model}", reps])
                ref = size / (min(t for t, _ in fetched) / 1000) / 1e6
                row.update(reference=ref, reference_name="HTTP fetch from local server", ratio=ours / ref)
            rows.append(row)
        finally:
            for br in browsers:
                br.close()
    return rows


DIRECT_STREAM_JS = """async (req) => { const t0 = performance.now(); const times = [];
  const stream = await tabmesh.chat.completions.create(req);
  for await (const chunk of stream) { if (chunk.choices.length && chunk.choices[0].delta.content) times.push(performance.now() - t0); }
  return times.map((t) => t / 1000); }"""


def _per_token(times: list[float]) -> float:
    """Mean ms between streamed tokens after the first (the decode rate a client sees)."""
    return 1000 * (times[-1] - times[0]) / max(1, len(times) - 1)


def bench_gateway(server: ServerThread, n_tokens: int, reps: int) -> list[dict]:
    import openai
    from playwright.sync_api import sync_playwright
    req = {"model": None, "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
           "max_tokens": n_tokens, "temperature": 0, "stream": True}
    rows = []
    with sync_playwright() as p:
        browser = p.chromium.launch(**launch_args())
        try:
            page = browser.new_context().new_page()
            page.goto(f"{server.url}?room=bench-{secrets.token_hex(3)}&serve=1")
            page.evaluate("tabmesh.ready")
            _progress("gateway: loading the model in the serving tab…")
            req["model"] = page.evaluate("tabmesh.llm.load({})")["model"]
            page.evaluate("tabmesh.api.serve(true)")
            client = openai.OpenAI(base_url=server.url + "v1", api_key="none", max_retries=0, timeout=600)
            direct, via, added = [], [], []
            for rep in range(reps + 1):   # the first of each is a warm-up (prefix cache, JIT)
                _progress(f"gateway: run {rep + 1}/{reps + 1} in the tab, then through /v1/…")
                d = page.evaluate(DIRECT_STREAM_JS, req)
                t0, got = time.perf_counter(), []
                recv = []
                for chunk in client.chat.completions.create(**req):
                    if chunk.choices and chunk.choices[0].delta.content:
                        got.append(time.perf_counter() - t0)
                        recv.append(time.time())
                sent = [t for _rid, t in page.evaluate("tabmesh.api.status()")["chunkTimes"]]
                if rep == 0:
                    continue
                direct.append(d)
                via.append(got)
                # chunks with content are all but the final (finish_reason) one, in order
                added += [1000 * (r - s) for r, s in zip(recv, sent[-(len(recv) + 1):])]
        finally:
            browser.close()
    ms_d = statistics.median(_per_token(t) for t in direct)
    ms_v = statistics.median(_per_token(t) for t in via)
    ttft_d = statistics.median(t[0] for t in direct)
    ttft_v = statistics.median(t[0] for t in via)
    rows.append({"section": "gateway", "figure": f"ms per streamed token ({n_tokens} tokens)", "ours": ms_v,
                 "reference": ms_d, "reference_name": "same request inside the tab", "ratio": ms_d / ms_v})
    rows.append({"section": "gateway", "figure": "time to first token (s)", "ours": ttft_v,
                 "reference": ttft_d, "reference_name": "same request inside the tab", "ratio": ttft_d / ttft_v})
    for q, name in ((0.5, "p50"), (0.99, "p99")):
        rows.append({"section": "gateway", "figure": f"latency added per token, tab -> client {name} (ms)",
                     "ours": percentile(added, q)})
    return rows


def bench_pipeline(root: Path, n_tokens: int) -> list[dict]:
    """Greedy decode tok/s with the model split over 1, 2 and 3 tabs (mesh-run: one Chromium
    process each, WebGPU), and the latency each hop adds per token (the requester's round
    trip to a stage minus that stage's compute time)."""
    from .mesh_run import mesh_run
    rows, one = [], None
    for n in (1, 2, 3):
        _progress(f"pipeline: {n} node(s), {n_tokens} greedy tokens…")
        r = mesh_run(root, nodes=n, prompt="The history of the printing press", max_tokens=n_tokens,
                     progress=lambda msg: _progress(f"  {msg}"))
        t = r["timings"]
        if one is None:
            one = t["decode_tok_s"]
        rows.append({"section": "pipeline", "figure": f"decode tok/s, model split over {n} tab(s)",
                     "ours": t["decode_tok_s"], "reference": one, "reference_name": "1 tab (same run)",
                     "ratio": t["decode_tok_s"] / one if one else 0.0})
        if n > 1:
            rows.append({"section": "pipeline", "figure": f"latency added per hop per token, {n} tabs (ms, p50)",
                         "ours": t["per_hop_ms"]})
    return rows


BENCH_TEXT = (
    "The history of the printing press begins in the middle of the fifteenth century, when Johannes "
    "Gutenberg, a goldsmith from Mainz, combined a screw press with movable metal type, oil-based ink "
    "and a mould for casting letters quickly and accurately. Within fifty years presses were at work in "
    "more than two hundred European cities, and millions of books had been printed. ")

LLAMA_CPP_SCRIPT = r"""
import json, sys, time
import numpy as np
from llama_cpp import Llama
path, n_threads, n_decode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
tokens = json.loads(sys.stdin.read())
llm = Llama(model_path=path, n_ctx=len(tokens) + n_decode + 8, n_batch=len(tokens), n_threads=n_threads,
            n_threads_batch=n_threads, verbose=False)
n_vocab = llm.n_vocab()
last = lambda: int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))
llm.eval(tokens[:8]); llm.reset()  # warm-up
t0 = time.perf_counter(); llm.eval(tokens); prefill = time.perf_counter() - t0
tok = last()
t1 = time.perf_counter()
for _ in range(n_decode):
    llm.eval([tok]); tok = last()
decode = time.perf_counter() - t1
print(json.dumps({"prefill_tok_s": len(tokens) / prefill, "decode_tok_s": n_decode / decode}))
"""


def bench_tokens(model_path: Path, n: int) -> list[int]:
    from .gguf import read_gguf_path
    from .tokenizer import Tokenizer
    tok = Tokenizer.from_gguf_metadata(read_gguf_path(model_path).metadata)
    ids = tok.encode(BENCH_TEXT, add_special=False)
    return (ids * (n // len(ids) + 1))[:n]


def llama_cpp_python() -> str | None:
    """A Python that can import llama_cpp: this one, or $TABMESH_LLAMA_CPP_PYTHON."""
    import os
    import subprocess
    for exe in (sys.executable, os.environ.get("TABMESH_LLAMA_CPP_PYTHON")):
        if exe and subprocess.run([exe, "-c", "import llama_cpp"], capture_output=True).returncode == 0:
            return exe
    return None


GGML_PROMPT_TOKENS = 128  # numerics="ggml" in the tab: prompt and decode lengths of its (slower) run
GGML_DECODE_TOKENS = 16


def bench_llm(root: Path, prompt_len: int, n_decode: int, threads: int, webgpu_decode: int) -> list[dict]:
    import os
    import subprocess
    model = root / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokens = bench_tokens(model, prompt_len)
    figures: dict[str, dict] = {}
    exe = llama_cpp_python()
    if exe is None:
        _progress("llama-cpp-python not found: `make bench` installs it; the llama.cpp column stays empty")
    else:
        _progress(f"llama.cpp: {prompt_len}-token prefill, {n_decode} decode steps, {threads} threads…")
        out = subprocess.run([exe, "-c", LLAMA_CPP_SCRIPT, str(model), str(threads), str(n_decode)],
                             input=json.dumps(tokens), capture_output=True, text=True, timeout=900)
        if out.returncode != 0:
            raise RuntimeError(f"llama.cpp benchmark failed:\n{out.stderr[-2000:]}")
        figures["llama.cpp"] = json.loads(out.stdout.strip().splitlines()[-1])

    _progress("numpy backend, natively…")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(threads))
    from .model.llama_numpy import NumpyLlama
    from .model.loader import NumpyBackend
    from .llm_page import run_model_benchmark
    backend = NumpyBackend(NumpyLlama.from_path(model, n_ctx=prompt_len + n_decode + 8))
    figures["numpy (native CPython)"] = asyncio.run(run_model_benchmark(backend, tokens, n_decode))

    from .headless import HeadlessTab
    with HeadlessTab(root, progress=_progress) as tab:
        tab.page.set_default_timeout(3_600_000)
        if tab.info.get("gpu"):
            _progress(f"WebGPU in headless Chromium ({tab.info['gpu']['architecture']}): "
                      f"{prompt_len}-token prefill, {webgpu_decode} decode steps…")
            figures["webgpu (tab)"] = tab.page.evaluate(
                "(o) => tabmesh.llm.benchmark(o)", {"tokens": tokens, "decode": webgpu_decode, "backend": "webgpu",
                                                    "numerics": "f32"})
            # llama.cpp-exact numerics: ~3-4x slower on a software adapter, so a shorter run
            short = tokens[:min(len(tokens), GGML_PROMPT_TOKENS)]
            _progress(f"WebGPU, numerics='ggml' (llama.cpp bit for bit): {len(short)}-token prefill, "
                      f"{min(webgpu_decode, GGML_DECODE_TOKENS)} decode steps…")
            fig = tab.page.evaluate("(o) => tabmesh.llm.benchmark(o)",
                                    {"tokens": short, "decode": min(webgpu_decode, GGML_DECODE_TOKENS),
                                     "backend": "webgpu", "numerics": "ggml"})
            figures["webgpu, ggml numerics (tab)"] = fig
        _progress("numpy backend in the tab (Pyodide)…")
        figures["numpy (tab, Pyodide)"] = tab.page.evaluate(
            "(o) => tabmesh.llm.benchmark(o)", {"tokens": tokens, "decode": min(n_decode, 16), "backend": "numpy"})

    rows = []
    ref = figures.get("llama.cpp")
    for name, fig in figures.items():
        if name == "llama.cpp":
            continue
        for key, label in (("prefill_tok_s", f"prefill tok/s ({fig.get('prompt_tokens', prompt_len)}-token prompt)"),
                           ("decode_tok_s", f"decode tok/s ({fig.get('decode_tokens', n_decode)} tokens)")):
            row = {"section": "llm", "figure": f"{name}: {label}", "ours": fig[key]}
            if ref:
                row.update(reference=ref[key], reference_name=f"llama.cpp, {threads} threads",
                           ratio=fig[key] / ref[key])
            rows.append(row)
        if "record_ms_per_token_p50" in fig:
            rows.append({"section": "llm", "figure": f"{name}: Python recording ms/token (p50)",
                         "ours": fig["record_ms_per_token_p50"]})
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'section':8} {'figure':58} {'tabmesh':>10} {'reference':>10} {'ratio':>7}  reference is"
    lines = [head, "-" * len(head)]
    for r in rows:
        ref = r.get("reference")
        ref_s = "" if ref is None else f"{ref:10.3f}"
        ratio_s = "" if ref is None else f"{r['ratio']:7.2f}"
        lines.append(f"{r['section']:8} {r['figure']:58} {r['ours']:10.3f} {ref_s:>10} {ratio_s:>7}  "
                     f"{r.get('reference_name', '')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None, root: Path | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tabmesh bench")
    parser.add_argument("--pings", type=int, default=200)
    parser.add_argument("--sections", default="llm,mesh,pipeline,gateway,rag",
                        help="comma-separated: llm, mesh, pipeline, gateway, rag")
    parser.add_argument("--pipeline-tokens", type=int, default=16, help="greedy tokens per mesh-run")
    parser.add_argument("--rag-passages", type=int, default=32, help="passages ingested in the tab (rag)")
    parser.add_argument("--rag-vectors", type=int, default=10_000, help="HNSW vs hnswlib build size (rag)")
    parser.add_argument("--rag-large", type=int, default=100_000,
                        help="vectors for the large query-latency and IndexedDB-restore rows; 0 skips them")
    parser.add_argument("--rag-build-large", action="store_true",
                        help="also build our HNSW at --rag-large (minutes); default: hnswlib builds that graph")
    parser.add_argument("--gateway-tokens", type=int, default=32)
    parser.add_argument("--gateway-reps", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--webgpu-decode-tokens", type=int, default=128,
                        help="decode steps for WebGPU (software WebGPU is slow; lower it for a quick run)")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp and BLAS threads")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if root is None:
        from .cli import repo_root
        root = repo_root()
    sections = {x.strip() for x in args.sections.split(",") if x.strip()}
    rows, failed = [], []

    def mesh() -> list[dict]:
        server = ServerThread(root)
        try:
            return bench_mesh(server, args.pings)
        finally:
            server.stop()

    def gateway() -> list[dict]:
        server = ServerThread(root)
        try:
            return bench_gateway(server, args.gateway_tokens, args.gateway_reps)
        finally:
            server.stop()

    def rag() -> list[dict]:
        from .bench_rag import bench_rag   # imports numpy: only after llm set OPENBLAS_NUM_THREADS
        return bench_rag(root, args.threads, args.rag_passages, args.rag_vectors, args.rag_large,
                         args.rag_build_large, failed)

    runs = {"llm": lambda: bench_llm(root, args.prompt_tokens, args.decode_tokens, args.threads,
                                     args.webgpu_decode_tokens),
            "mesh": mesh, "gateway": gateway,
            "pipeline": lambda: bench_pipeline(root, args.pipeline_tokens),
            "rag": rag}
    for name, run in runs.items():
        if name not in sections:
            continue
        try:
            rows += run()
        except Exception as exc:  # one broken section must not lose the others' figures
            failed.append(name)
            _progress(f"section {name} failed: {str(exc).splitlines()[0][:300]}")
    if failed and not rows:
        return 1
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    return 1 if failed else 0
