"""The tab's part in mesh inference: its stage, the room's cluster, window.tabmesh.mesh, the mesh view.

Runs only in the tab. The logic is mesh/cluster.py and mesh/pipeline.py (tested natively over
an in-memory mesh); this file wires them to the page: which model the room runs (`?model=`,
else the first GGUF the server serves), which backend stages use (`?backend=`, else WebGPU
when the tab has it), how many nodes a plan must use at least (`?stages=N`, what
`tabmesh mesh-run --nodes N` asks for; default 1: the planner decides). A tab takes part
only when asked (`?mesh=1`, `?stages=N`, tabmesh.mesh.join(), or the panel's button): a member
may be given layers to load at any time. The advert (GPU
info, memory estimate, benchmark figures measured here), and the DOM of the mesh view.
"""
from __future__ import annotations

import asyncio
import logging
import random

from .jsbridge import js
from .mesh import cluster_messages as cm
from .mesh.cluster import ClusterService, throttled
from .mesh.pipeline import GPUStage, NumpyStage, StageHost
from .mesh.planner import ModelInfo, Settings

log = logging.getLogger("tabmesh.mesh_page")
DEFAULT_MEMORY = 2 << 30      # WebGPU does not say how much memory an adapter has: assume 2 GiB
NUMPY_MEMORY = 1 << 30


class MeshService:
    def __init__(self, page, params):
        self.page, self.node, self.device = page, page.node, page.device
        self.params = params
        self.backend = params.get("backend") or ("webgpu" if self.device is not None else "numpy")
        self.min_stages = max(1, int(params.get("stages") or 1))
        self.model_id: str | None = None
        self.info: ModelInfo | None = None
        self.tokenizer = None
        self.cluster: ClusterService | None = None
        self.host: StageHost | None = None
        self.base_advert: cm.Join | None = None
        self.progress = {"tokens": 0, "running": False}
        self.last_result: dict | None = None
        self._render_pending = False
        self._starting: asyncio.Future | None = None

    async def join(self) -> dict:
        """Take part in mesh inference (the page does at load with ?mesh=1 or ?stages=N)."""
        if self._starting is None:
            self._starting = asyncio.ensure_future(self._start())
        await asyncio.shield(self._starting)
        return self.status()

    async def start(self) -> None:
        await self.join()

    async def _start(self) -> None:
        from .model.loader import load_header
        js.document.getElementById("mesh-summary").textContent = "joining: reading the model header, measuring the GPU…"
        served = [m["name"] for m in await self.page.llm.served_models()]
        self.model_id = self.params.get("model") or (served[0] if served else None)
        if self.model_id is None or self.model_id not in served:
            raise RuntimeError(f"the mesh has no model to run: the server serves {served or 'no GGUF'}")
        gguf, cfg, self.tokenizer = await load_header(f"/models/{self.model_id}")
        self.info = ModelInfo.from_gguf(gguf, cfg, self.model_id, n_ctx=min(1024, cfg.n_ctx_train))
        self.host = StageHost(self.node.peer_id, self._load_stage, self.info)
        self.node.on_call = lambda _peer, payload: self.host.answer(payload)
        self.base_advert = await self._advert()
        self.cluster = ClusterService(self.node, self.host, self.info, self.base_advert, rng=random.Random(),
                                      settings=Settings(min_stages=self.min_stages),
                                      on_event=lambda e: self._schedule_render())
        for pid, p in self.node.peers.items():   # channels that opened before the cluster existed
            if p.state == "open":
                self.cluster._on_peer(pid, "open")
        self.cluster.start()
        self._schedule_render()

    async def _advert(self) -> cm.Join:
        from .gpu.bench import advert_figures, numpy_figures
        info = self.device.info if self.device is not None else {}
        if self.backend == "webgpu" and self.device is not None:
            fig = await advert_figures(self.device)
            limits = {k: int(v) for k, v in (info.get("limits") or {}).items() if isinstance(v, (int, float))}
            memory = DEFAULT_MEMORY
        else:
            fig, limits, memory = numpy_figures(), {}, NUMPY_MEMORY
        gpu = cm.GpuInfo(str(info.get("vendor") or "none")[:64], str(info.get("architecture") or self.backend)[:64],
                         str(info.get("device") or "")[:128], str(info.get("description") or "")[:256],
                         "shader-f16" in (info.get("features") or []), dict(list(limits.items())[:64]))
        return cm.Join(gpu, memory, cm.Bench(fig["matmul_gflops"], fig["bandwidth_gbs"], fig["dispatch_us"]), ())

    async def _load_stage(self, model_id: str, layers: tuple):
        from .model.loader import load_stage
        self.page.ui.field("mesh-status", f"loading layers {layers[0]}..{layers[1] - 1} of {model_id}…")
        st = await load_stage(f"/models/{model_id}", range(*layers), backend=self.backend, device=self.device,
                              n_ctx=self.info.n_ctx)
        self.page.ui.field("mesh-status", f"running layers {layers[0]}..{layers[1] - 1} of {model_id} "
                                          f"({st.bytes_read / 1e6:.1f} MB, {st.load_s:.1f} s)")
        self.cluster.set_advert(self._cached_advert(layers))
        return GPUStage(st.llama) if self.backend == "webgpu" else NumpyStage(st.llama)

    def _cached_advert(self, layers: tuple) -> cm.Join:
        from dataclasses import replace
        adv = self.cluster.advert
        return replace(adv, cached=(cm.CachedLayers(self.model_id, (tuple(layers),)),))

    # ---- window.tabmesh.mesh -----------------------------------------------------------
    async def generate(self, opts: dict) -> dict:
        if self.cluster is None:
            await self.join()
        prompt = str(opts["prompt"])
        tokens = (self._chat_tokens(prompt) if opts.get("chat")
                  else self.tokenizer.encode(prompt, add_special=True, parse_special=False))
        self.progress = {"tokens": 0, "running": True}

        def on_token(_tok, n):
            self.progress["tokens"] = n
        try:
            result = await self.cluster.generate(tokens, self.tokenizer, max_tokens=int(opts.get("maxTokens", 32)),
                                                 on_token=on_token)
        finally:
            self.progress["running"] = False
        result["prompt_tokens"] = tokens
        result["cluster_events"] = [e for e in self.cluster.events
                                    if e["event"] in ("plan-committed", "peer-left", "stage-loaded", "replanned")]
        self.last_result = result
        self._schedule_render()
        return result

    def _chat_tokens(self, prompt: str) -> list[int]:
        from .engine import Engine
        return Engine(None, self.tokenizer, self.tokenizer.chat_template, self.model_id).encode_chat(
            [{"role": "user", "content": prompt}])

    async def prepare(self) -> dict:
        """Join, ask the coordinator for a plan, and wait until every stage has loaded."""
        await self.join()
        self.cluster.want_plan()
        await self.cluster.wait_plan()
        return self.status()

    def throttle(self, factor: float) -> dict:
        factor = max(1.0, float(factor))
        self.host.slowdown = factor
        self.cluster.set_advert(throttled(self.cluster.advert if factor == 1.0 else self.base_advert, factor))
        self._schedule_render()
        return {"slowdown": factor}

    def status(self) -> dict:
        c = self.cluster
        if c is None:
            return {"ready": False}
        raft = c.raft
        plan = raft.committed if raft else None
        return {"ready": True, "model": self.model_id, "backend": self.backend, "peerId": self.node.peer_id,
                "leader": raft.leader if raft else None, "isLeader": bool(raft and raft.is_leader),
                "term": raft.term if raft else 0,
                "plan": None if plan is None else {"epoch": plan.epoch, "msPerToken": plan.ms_per_token,
                                                   "stages": [{"node": s.node, "layers": list(s.layers)}
                                                              for s in plan.stages]},
                "readyPlan": c.ready_plan() is not None, "stageStatus": c._my_status,
                "progress": dict(self.progress), "slowdown": self.host.slowdown, "steps": self.host.steps,
                "adverts": {p: {"bandwidthGBs": j.bench.bandwidth_gbs if j.bench else None,
                                "matmulGflops": j.bench.matmul_gflops if j.bench else None,
                                "dispatchUs": j.bench.dispatch_us if j.bench else None,
                                "architecture": j.gpu.architecture}
                            for p, j in [(self.node.peer_id, c.advert), *c.adverts.items()]},
                "events": c.events[-30:], "dropped": c.dropped}

    # ---- the mesh view -----------------------------------------------------------------
    def _schedule_render(self) -> None:
        if self._render_pending:
            return
        self._render_pending = True

        def render():
            self._render_pending = False
            try:
                self._render()
            except Exception as exc:   # the view must never take the node down
                log.warning("mesh view: %s", exc)
        asyncio.get_event_loop().call_later(0.2, render)

    def _render(self) -> None:
        doc, st = js.document, self.status()
        if not st.get("ready"):
            return
        bar = doc.getElementById("mesh-plan")
        bar.replaceChildren()
        plan = st["plan"]
        if plan is not None:
            total = plan["stages"][-1]["layers"][1]
            for i, s in enumerate(plan["stages"]):
                seg = doc.createElement("div")
                seg.className = f"stage stage-{i % 4}"
                seg.style.flexGrow = str(s["layers"][1] - s["layers"][0])
                seg.textContent = f"{s['node']} · layers {s['layers'][0]}–{s['layers'][1] - 1}"
                seg.title = f"{s['layers'][1] - s['layers'][0]} of {total} layers"
                bar.append(seg)
        self.page.ui.field("mesh-summary", (
            f"model {st['model']} · {st['backend']} · leader {st['leader'] or '—'} (term {st['term']}) · "
            + (f"plan epoch {plan['epoch']}, est. {plan['msPerToken']:.1f} ms/token" if plan else "no plan yet")))
        body = doc.getElementById("mesh-nodes").tBodies[0]
        body.replaceChildren()
        for pid, a in st["adverts"].items():
            row = doc.createElement("tr")
            for text in (pid + (" (this tab)" if pid == st["peerId"] else ""), a["architecture"],
                         f"{a['bandwidthGBs']:.2f}" if a["bandwidthGBs"] else "—",
                         f"{a['matmulGflops']:.1f}" if a["matmulGflops"] else "—",
                         f"{a['dispatchUs']:.0f}" if a["dispatchUs"] else "—"):
                cell = doc.createElement("td")
                cell.textContent = text
                row.append(cell)
            body.append(row)
        if self.last_result is not None:
            t = self.last_result["timings"]
            self.page.ui.field("mesh-timings", f"last run: {len(self.last_result['tokens'])} tokens, "
                                               f"{t['decode_tok_s']:.2f} tok/s, {t['per_hop_ms']:.2f} ms per hop "
                                               f"({t['hops_per_token']} hops per token)")
        log_el = doc.getElementById("mesh-events")
        log_el.replaceChildren()
        for e in st["events"][-12:]:
            li = doc.createElement("li")
            detail = {k: v for k, v in e.items() if k not in ("event", "t")}
            li.textContent = f"{e['t']:8.2f} s  {e['event']}  {detail if detail else ''}"
            log_el.append(li)
