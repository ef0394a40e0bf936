"""`tabmesh bench` (host side): measure the mesh in real headless Chromium, with references.

Every row puts our figure beside a reference measured in the same run on the same machine,
and their ratio. Sections:
  mesh   data-channel ping round trip (our frames, through Python in both tabs) against a
         WebSocket ping/pong through the signaling server (what a server-relayed design pays
         per hop); 4 MiB echo over the data channel against the same bytes fetched over HTTP
         from the local server.
Progress goes to stderr; the table to stdout (and --json prints the rows as JSON).
"""
from __future__ import annotations

import argparse
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

ECHO_JS = """async ([peer, size, reps]) => { const data = new Uint8Array(size);
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


def format_table(rows: list[dict]) -> str:
    head = f"{'section':8} {'figure':42} {'tabmesh':>10} {'reference':>10} {'ratio':>7}  reference is"
    lines = [head, "-" * len(head)]
    for r in rows:
        ref = r.get("reference")
        ref_s = "" if ref is None else f"{ref:10.3f}"
        ratio_s = "" if ref is None else f"{r['ratio']:7.2f}"
        lines.append(f"{r['section']:8} {r['figure']:42} {r['ours']:10.3f} {ref_s:>10} {ratio_s:>7}  "
                     f"{r.get('reference_name', '')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None, root: Path | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tabmesh bench")
    parser.add_argument("--pings", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if root is None:
        from .cli import repo_root
        root = repo_root()
    server = ServerThread(root)
    try:
        rows = bench_mesh(server, args.pings)
    finally:
        server.stop()
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    return 0
