"""Pipeline-parallel generation across tabs: each stage runs a contiguous range of layers.

    host = StageHost(my_id, load_stage)            # every node: runs its stage of the plan
    await host.adopt(plan)                         # loads (only) its layers, resets its KV cache
    model = PipelineModel(transport, plan, info, session="s1", replan=coordinator.replan)
    engine = Engine(model, tokenizer, ...)         # the engine neither knows nor cares

Topology: the requester drives every step (a star, not a chain). For each forward call of
the engine it sends a compute-request (cluster_messages.py) with the token ids to stage 0,
gets its hidden states back, sends them to stage 1, and so on; the last stage answers with
logits, or with the argmax alone when the sampler is greedy (4 bytes instead of n_vocab x 4).
Hidden states travel as float32, so a split model computes bit for bit what one tab
computes with the same kernels. A chain would save one transfer per token; the star lets
the requester see every hop, time it, and know exactly which step a lost stage broke.

Faults: a stage that leaves (its channel closes, the signaling server reports it gone) or
does not answer in time raises StageLost. PipelineModel then asks `replan(lost_peer)` for a
new plan over the survivors — the coordinator makes every new owner load its layers — and
replays the session's history through the new pipeline (the same happens when a stage answers that it
runs a newer plan: PlanChanged): the same forward calls, with the
same token batches at the same positions, so every KV cache is rebuilt with the arithmetic
of the first run. Then it retries the step that failed. With greedy sampling the output is
the no-fault output: no token lost, none repeated.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any, Awaitable, Callable, Protocol

import numpy as np

from ..errors import TabmeshError
from ..jsbridge import run_sliced
from . import cluster_messages as cm

log = logging.getLogger("tabmesh.pipeline")

CALL_TIMEOUT_S = 30.0          # a stage that says nothing this long is taken for lost ...
CALL_TIMEOUT_PER_TOKEN_S = 0.5  # ... plus this per token of a prefill batch (software GPUs are slow)
MAX_RECOVERIES = 8


class StageLost(ConnectionError):
    def __init__(self, peer: str, why: str):
        super().__init__(f"stage on {peer} lost: {why}")
        self.peer = peer


class PlanChanged(ConnectionError):
    """A stage runs another plan epoch, or lost this session's KV cache (it re-adopted a plan):
    take the current plan and replay."""

    def __init__(self, peer: str, why: str):
        super().__init__(f"stage on {peer}: {why}")
        self.peer = peer


class PipelineError(TabmeshError):
    """A stage refused or failed a step for a reason a re-plan does not fix."""

    code = "pipeline_error"


def _layout(plan: cm.Plan) -> tuple:
    return plan.model, tuple((s.node, tuple(s.layers)) for s in plan.stages)


# ---- one stage's model -----------------------------------------------------------------
class StageModel(Protocol):
    is_first: bool
    is_last: bool

    async def run(self, x, pos: int, want: str):
        """token ids (first stage) or hidden (n, n_embd) float32 -> hidden | logits | argmax."""

    def reset(self) -> None: ...


class NumpyStage:
    def __init__(self, llama):
        self.llama = llama
        self.is_first, self.is_last = llama.is_first, llama.is_last

    async def run(self, x, pos: int, want: str):
        # the page breathes between layers (see jsbridge.run_sliced)
        out = await run_sliced(self.llama.forward_steps(x, pos, last_only=True))
        if not self.is_last:
            return out
        return int(np.argmax(out[-1])) if want == "argmax" else out[-1]

    def reset(self) -> None:
        self.llama.reset()


class GPUStage:
    def __init__(self, llama):
        self.llama = llama
        self.is_first, self.is_last = llama.is_first, llama.is_last

    async def run(self, x, pos: int, want: str):
        if self.is_first:
            return await self.llama.forward(list(x), pos, output="hidden" if not self.is_last else want)
        return await self.llama.forward(None, pos, output="hidden" if not self.is_last else want, hidden_in=x)

    def reset(self) -> None:
        reset = getattr(self.llama, "reset", None)
        if reset is not None:
            reset()


# ---- the serving side --------------------------------------------------------------------
class StageHost:
    """Runs this node's stage of the current plan and answers compute-requests.

    `load_stage(model_id, (a, b))` returns a StageModel for those layers; it is called only
    when the plan gives this node other layers than it holds. `slowdown` multiplies the
    compute time (a throttled node, for tests and `mesh-run --throttle-node`)."""

    def __init__(self, node_id: str, load_stage: Callable[[str, tuple], Awaitable[StageModel]],
                 model_info: Any = None, slowdown: float = 1.0):
        self.node_id, self.load_stage, self.model_info = node_id, load_stage, model_info
        self.slowdown = slowdown
        self.plan: cm.Plan | None = None
        self.stage: StageModel | None = None
        self.held: tuple | None = None            # (model, (a, b)) of self.stage
        self.session: str | None = None
        self.aliases: set[int] = set()            # earlier epochs of the same layout
        self._lock = asyncio.Lock()
        self.steps = 0

    async def adopt(self, plan: cm.Plan) -> None:
        """Take a committed plan. New layers load while the old stage keeps answering steps of
        the old plan; the switch (stage, plan, session) happens at once, between two steps."""
        mine = plan.stage_of(self.node_id)
        want = (plan.model, tuple(mine.layers)) if mine is not None else None
        loaded = None
        if want is not None and want != self.held:
            loaded = await self.load_stage(plan.model, tuple(mine.layers))
        async with self._lock:
            same = self.plan is not None and _layout(self.plan) == _layout(plan)
            if loaded is not None:
                self.stage, self.held = loaded, want
            if same:
                # A new leader re-stamps the running plan (same stages, higher epoch): steps of
                # the earlier epochs of this layout stay valid, and so does the KV cache.
                self.aliases.add(self.plan.epoch)
            else:
                self.aliases = set()
                self.session = None   # another layout starts from a replay at position 0
            self.plan = plan

    async def handle(self, req: cm.ComputeRequest) -> cm.ComputeResult:
        async with self._lock:   # one step at a time (the KV cache is one sequence); no adopt mid-step
            plan = self.plan
            if plan is not None and req.epoch in self.aliases:
                plan = dataclasses.replace(plan, epoch=req.epoch)
            cm.check_compute_request(req, plan, self.node_id)
            stage = self.stage
            if stage is None:
                raise PipelineError(f"{self.node_id} has no stage loaded for plan epoch {req.epoch}")
            if req.session != self.session:
                if req.pos != 0:
                    raise PipelineError(f"session {req.session} starts at position {req.pos} on a stage that "
                                        f"does not hold it; replay it from position 0")
                stage.reset()
                self.session = req.session
            n, w = req.shape
            if req.dtype == "u32":
                x = np.frombuffer(req.data, dtype="<u4").astype(np.int64).tolist()
            else:
                x = np.frombuffer(req.data, dtype="<f4" if req.dtype == "f32" else "<f2").astype(np.float32)
                x = x.reshape(n, w)
            t0 = time.perf_counter()
            out = await stage.run(x, req.pos, req.want)
            ms = 1000 * (time.perf_counter() - t0)
            if self.slowdown > 1.0:
                await asyncio.sleep(ms * (self.slowdown - 1.0) / 1000)
                ms *= self.slowdown
            self.steps += 1
        if not stage.is_last:
            h = np.ascontiguousarray(out, dtype="<f4")
            return cm.ComputeResult(req.epoch, req.session, req.seq, req.layers, "hidden", h.shape, "f32", ms,
                                    h.tobytes())
        if req.want == "argmax":
            return cm.ComputeResult(req.epoch, req.session, req.seq, req.layers, "argmax", (1, 1), "u32", ms,
                                    int(out).to_bytes(4, "little"))
        logits = np.ascontiguousarray(out, dtype="<f4").reshape(1, -1)
        return cm.ComputeResult(req.epoch, req.session, req.seq, req.layers, "logits", logits.shape, "f32", ms,
                                logits.tobytes())

    async def answer(self, payload: bytes) -> bytes:
        """A CALL's payload in, the REPLY's payload out; every failure becomes a compute-error."""
        req = None
        try:
            req = cm.decode(payload, self.model_info)
            if not isinstance(req, cm.ComputeRequest):
                raise cm.ClusterMessageError(f"a call must carry a compute-request, got {req.TYPE}")
            return cm.encode(await self.handle(req))
        except Exception as exc:
            log.warning("compute step refused: %s", exc)
            epoch, session, seq = (req.epoch, req.session, req.seq) if isinstance(req, cm.ComputeRequest) \
                else (0, "invalid", 0)
            return cm.encode(cm.ComputeError.from_exception(epoch, session, seq, exc))


# ---- the requesting side -----------------------------------------------------------------
class Transport(Protocol):
    async def request(self, peer: str, req: cm.ComputeRequest, timeout_s: float) -> cm.ComputeResult: ...


class NodeTransport:
    """Compute calls over a mesh Node's data channels; this node's own stage is called directly."""

    def __init__(self, node, host: StageHost | None, model_info: Any = None):
        self.node, self.host, self.model_info = node, host, model_info

    async def request(self, peer: str, req: cm.ComputeRequest, timeout_s: float) -> cm.ComputeResult:
        if peer == self.node.peer_id:
            if self.host is None:
                raise StageLost(peer, "this node runs no stage")
            reply = await self.host.answer(cm.encode(req))
        else:
            try:
                reply = await self.node.call(peer, cm.encode(req), timeout_s)
            except asyncio.TimeoutError:
                raise StageLost(peer, f"no answer within {timeout_s:.0f} s") from None
            except ConnectionError as exc:
                raise StageLost(peer, str(exc)) from None
        msg = cm.decode(reply, self.model_info)
        if isinstance(msg, cm.ComputeError):
            if msg.error.type in ("ClusterMessageError", "PipelineError") and (
                    "epoch" in msg.error.message or "replay it" in msg.error.message):
                raise PlanChanged(peer, msg.error.message)
            raise msg.to_exception()
        if not isinstance(msg, cm.ComputeResult) or (msg.session, msg.seq) != (req.session, req.seq):
            raise PipelineError(f"stage on {peer} answered another step ({msg.TYPE})")
        return msg


class PipelineModel:
    """The engine's Model (engine.Model) for a model split over a plan's stages."""

    def __init__(self, transport: Transport, plan: cm.Plan, model_info: Any, session: str,
                 replan: Callable[[str | None, int], Awaitable[cm.Plan]] | None = None, clock=time.perf_counter):
        self.transport, self.plan, self.info, self.session = transport, plan, model_info, session
        self.replan, self.clock = replan, clock
        self.n_ctx, self.n_vocab = model_info.n_ctx, model_info.n_vocab
        self.history: list[tuple[list[int], int]] = []   # every forward call that completed
        self.events: list[dict] = []
        self.hop_ms: list[list[float]] = []               # per decode step: round trip - compute, per stage
        self.last_timings: dict = {}
        self._seq = 0
        self._stale = False      # the current plan's stages do not hold this session yet
        self._t0 = clock()

    def _event(self, kind: str, **fields) -> None:
        self.events.append({"event": kind, "t": round(self.clock() - self._t0, 3), **fields})

    def reset(self) -> None:
        self.history.clear()

    async def forward(self, tokens, start_pos: int, *, output: str = "logits"):
        tokens = [int(t) for t in tokens]
        self._truncate(start_pos)
        for _attempt in range(MAX_RECOVERIES + 1):
            try:
                if self._stale:
                    await self._replay()
                out = await self._step(tokens, start_pos, output, record=True)
                self.history.append((tokens, start_pos))
                return out
            except (StageLost, PlanChanged) as exc:
                await self._recover(exc)
        raise PipelineError(f"gave up after {MAX_RECOVERIES} re-plans in one step")

    def _truncate(self, start_pos: int) -> None:
        """Forget calls at or past start_pos (the engine rewrites from there: a new chat turn)."""
        kept = []
        for toks, pos in self.history:
            if pos >= start_pos:
                break
            kept.append((toks[:start_pos - pos], pos))
        self.history = kept

    async def _recover(self, exc: StageLost | PlanChanged) -> None:
        lost = exc.peer if isinstance(exc, StageLost) else None
        self._event("stage-lost" if lost else "plan-changed", node=exc.peer, message=str(exc))
        log.warning("%s; re-planning", exc)
        if self.replan is None:
            raise PipelineError(f"{exc} and no coordinator can re-plan") from exc
        old = self.plan
        self.plan = await self.replan(lost, old.epoch)
        self._stale = True
        self._event("replan", epoch=self.plan.epoch, stages=[[s.node, *s.layers] for s in self.plan.stages],
                    previous=[[s.node, *s.layers] for s in old.stages])

    async def _replay(self) -> None:
        t0 = self.clock()
        for toks, pos in self.history:
            await self._step(toks, pos, "argmax", record=False)
        self._stale = False
        self._event("replayed", calls=len(self.history),
                    tokens=sum(len(t) for t, _ in self.history), s=round(self.clock() - t0, 3))

    async def _step(self, tokens: list[int], pos: int, output: str, record: bool):
        plan, n = self.plan, len(tokens)
        data, shape, dtype = np.asarray(tokens, dtype="<u4").tobytes(), (n, 1), "u32"
        timeout = CALL_TIMEOUT_S + CALL_TIMEOUT_PER_TOKEN_S * n
        hops, compute = [], 0.0
        t_start = self.clock()
        for i, st in enumerate(plan.stages):
            last = i == len(plan.stages) - 1
            self._seq += 1
            req = cm.ComputeRequest(plan.epoch, self.session, self._seq, tuple(st.layers), pos, shape, dtype, data,
                                    want=(output if last else "hidden"))
            t0 = self.clock()
            res = await self.transport.request(st.node, req, timeout)
            rtt = 1000 * (self.clock() - t0)
            hops.append(max(0.0, rtt - res.ms))
            compute += res.ms
            data, shape, dtype = res.data, res.shape, res.dtype
        if record:
            self.last_timings = {"n_tokens": n, "total_s": self.clock() - t_start, "compute_ms": compute,
                                 "hop_ms": hops}
            if n == 1:
                self.hop_ms.append(hops)
        if output == "argmax":
            return int.from_bytes(data[:4], "little")
        return np.frombuffer(data, dtype="<f4" if dtype == "f32" else "<f2").astype(np.float32).reshape(-1)
