"""`tabmesh mesh-run` (host side): a local server, N headless tabs in a fresh room, one
distributed greedy generation, optionally a node killed or throttled on the way.

Each node is its own Chromium process (killing one is a tab dying, not a page closing
politely). Node 0 is the requester. Prints one JSON object:
    {"tokens", "text", "plan", "final_plan", "events", "timings": {"per_hop_ms", "decode_tok_s", ...}}
"""
from __future__ import annotations

import json
import secrets
import sys
import time
from pathlib import Path

from .headless import ServerThread, launch_args

BOOT_TIMEOUT_S = 240.0


def _progress(msg: str) -> None:
    print(f"[mesh-run] {msg}", file=sys.stderr, flush=True)


def wait_for(page, expr: str, timeout_s: float, what: str, interval_s: float = 0.25):
    deadline = time.monotonic() + timeout_s
    while True:
        value = page.evaluate(expr)
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout_s:.0f} s")
        time.sleep(interval_s)


def mesh_run(root: Path, *, nodes: int, prompt: str, max_tokens: int = 16, chat: bool = False,
             kill_node: int | None = None, after_tokens: int = 1, throttle_node: int | None = None,
             throttle: float = 4.0, backend: str | None = None, models_dir: Path | None = None,
             model: str | None = None, progress=_progress, url: str | None = None) -> dict:
    from playwright.sync_api import sync_playwright
    if nodes < 1:
        raise ValueError("--nodes must be at least 1")
    for name, k in (("--kill-node", kill_node), ("--throttle-node", throttle_node)):
        if k is not None and not 1 <= k < nodes:
            raise ValueError(f"{name} must name a node 1..{nodes - 1} (node 0 is the requester)")
    server = None if url else ServerThread(root, models_dir)
    base = url or server.url
    room = "mesh-" + secrets.token_hex(4)
    query = f"?room={room}&stages={nodes}" + (f"&backend={backend}" if backend else "") + \
        (f"&model={model}" if model else "")
    try:
        with sync_playwright() as pw:
            browsers, pages = [], []
            try:
                for i in range(nodes):
                    b = pw.chromium.launch(**launch_args())
                    browsers.append(b)
                    page = b.new_context().new_page()
                    page.set_default_timeout(BOOT_TIMEOUT_S * 1000)
                    page.goto(base + query)
                    pages.append(page)
                for i, page in enumerate(pages):
                    info = page.evaluate("tabmesh.ready")
                    progress(f"node {i} is {info['peerId']}")
                req = pages[0]
                for page in pages:   # every node joins before anyone plans, so the plan can use them all
                    wait_for(page, "tabmesh.mesh.status().ready", BOOT_TIMEOUT_S, "the node joining the cluster")
                req.evaluate("tabmesh.mesh.prepare()")
                if throttle_node is not None:
                    before = req.evaluate("tabmesh.mesh.status().plan.epoch")
                    progress(f"throttling node {throttle_node} x{throttle}")
                    pages[throttle_node].evaluate("(f) => tabmesh.mesh.throttle(f)", throttle)
                    wait_for(req, f"(() => {{ const s = tabmesh.mesh.status(); return s.readyPlan && "
                                  f"s.plan.epoch > {before}; }})()", BOOT_TIMEOUT_S, "a re-plan after the throttle")
                plan = req.evaluate("tabmesh.mesh.status().plan")
                progress("plan: " + ", ".join(f"{s['node']} {s['layers'][0]}-{s['layers'][1] - 1}"
                                              for s in plan["stages"]))
                req.evaluate("(o) => { window.__meshDone = false; window.__meshRun = tabmesh.mesh.generate(o); "
                             "window.__meshRun.catch(() => {}).finally(() => { window.__meshDone = true; }); "
                             "return true; }", {"prompt": prompt, "maxTokens": max_tokens, "chat": chat})
                killed = False
                deadline = time.monotonic() + 60 * 30
                while not req.evaluate("window.__meshDone"):
                    if kill_node is not None and not killed and \
                            req.evaluate("tabmesh.mesh.status().progress.tokens") >= after_tokens:
                        progress(f"killing node {kill_node} after {after_tokens} token(s)")
                        browsers[kill_node].close()
                        killed = True
                    if time.monotonic() > deadline:
                        raise TimeoutError("generation did not finish within 30 minutes")
                    time.sleep(0.1)
                result = req.evaluate("window.__meshRun")
                result["nodes"] = [p.evaluate("tabmesh.mesh.status().peerId") if i != kill_node or not killed
                                   else None for i, p in enumerate(pages)]
                return result
            finally:
                for b in browsers:
                    try:
                        b.close()
                    except Exception:
                        pass
    finally:
        if server is not None:
            server.stop()


def main(args, root: Path) -> int:
    from .cli import _model_location
    models_dir, model = _model_location(args.model)
    try:
        result = mesh_run(root, nodes=args.nodes, prompt=args.prompt, max_tokens=args.max_tokens, chat=args.chat,
                          kill_node=args.kill_node, after_tokens=args.after_tokens, throttle_node=args.throttle_node,
                          backend=args.backend, models_dir=models_dir, model=model)
    except (ValueError, TimeoutError) as exc:
        raise SystemExit(f"tabmesh mesh-run: {exc}")
    if args.json:
        print(json.dumps(result))
    else:
        print(result["text"])
        t = result["timings"]
        print(f"[{len(result['tokens'])} tokens over {len(result['plan'])} stage(s); {t['decode_tok_s']:.2f} tok/s, "
              f"{t['per_hop_ms']:.2f} ms per hop]", file=sys.stderr)
    return 0
