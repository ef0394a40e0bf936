"""A node's part in the room's cluster: adverts, the coordinator, its stage, and generation.

    cluster = ClusterService(node, host, model_info, advert, rng=random.Random())
    cluster.start()                    # a task: Raft ticks, heartbeats, the leader's planning
    result = await cluster.generate(prompt_tokens, tokenizer, max_tokens=32)

Transport-free like Node: it speaks cluster_messages over node.send_cluster (Kind.CLUSTER)
and node.call (compute steps), so native tests run it over the in-memory mesh.

What runs where:
  - every node advertises itself (join: GPU, memory, benchmark figures, cached layers) when a
    channel opens and whenever the advert changes (a throttled node advertises its slower
    figures), and sends a heartbeat (status, plan epoch it runs) every HEARTBEAT_S;
  - raft.Coordinator elects one leader per room; only the leader plans (planner.plan over
    the members whose adverts it has) and proposes; it re-plans when a member joins, leaves,
    falls silent, or changes its advert. A plan is acted on once committed (majority);
  - on every committed plan each node's StageHost adopts it: loads its layers if they
    changed, then reports `ready` for that epoch in its heartbeats;
  - any node can generate: it waits for a committed plan whose stages all report ready, and
    drives pipeline.PipelineModel through the engine. When a stage is lost the model asks
    `replan`, which waits for the leader's next plan without that node (the leader hears of
    the loss from its own channels and the signaling server), then replays.
"""
from __future__ import annotations

import asyncio
import logging
import random
import secrets
import statistics
import time
from contextlib import aclosing
from dataclasses import replace
from typing import Callable

from ..errors import TabmeshError
from . import cluster_messages as cm
from .pipeline import NodeTransport, PipelineModel, StageHost
from .planner import NodeInfo, NoPlanError, Settings, plan as make_plan
from .raft import Coordinator

log = logging.getLogger("tabmesh.cluster")

TICK_S = 0.05
HEARTBEAT_S = 0.5
SILENT_AFTER_S = 2.0     # a member not heard from this long is planned without
READY_TIMEOUT_S = 300.0
# Longer than raft's default: a tab computing a numpy step holds its event loop for a while,
# and a needless election re-stamps the plan. Lost tabs are found by their channels closing.
ELECTION_TIMEOUT_S = (1.5, 3.0)
ADVERT_GRACE_S = 5.0     # the leader waits this long for a new member's advert before planning without it  # waiting for a plan whose stages all loaded (software GPUs load slowly)


class ClusterError(TabmeshError):
    code = "cluster_error"


def _stages(plan: cm.Plan | None) -> tuple:
    return () if plan is None else tuple((s.node, tuple(s.layers)) for s in plan.stages)


class ClusterService:
    def __init__(self, node, host: StageHost, model_info, advert: cm.Join, *, rng: random.Random | None = None,
                 settings: Settings = Settings(), clock=time.monotonic, on_event: Callable[[dict], None] = lambda e: None):
        self.node, self.host, self.info, self.advert = node, host, model_info, advert
        self.settings, self.clock, self.on_event = settings, clock, on_event
        self.rng = rng or random.Random()
        self.raft: Coordinator | None = None
        self.adverts: dict[str, cm.Join] = {}
        self.status: dict[str, tuple[str, int, float]] = {}   # peer -> (status, epoch, heard at)
        self.demand: dict[str, float] = {}   # peer -> requests it wants a plan for (heartbeat load)
        self.wanted = False                  # this node wants a plan (it is about to generate)
        self.events: list[dict] = []
        self.dropped = 0
        self._task: asyncio.Task | None = None
        self._adopting: asyncio.Task | None = None
        self._adopted_epoch = 0
        self._my_status = "idle"
        self._last_heartbeat = 0.0
        self._planned_for: tuple | None = None
        self._lost: set[str] = set()
        self._opened: dict[str, float] = {}
        self._t0 = clock()
        node.on_cluster = self._on_cluster
        node.peer_listeners.append(self._on_peer)

    # ---- plumbing ----------------------------------------------------------------------
    def event(self, kind: str, **fields) -> None:
        e = {"event": kind, "t": round(self.clock() - self._t0, 3), **fields}
        self.events.append(e)
        del self.events[:-200]
        self.on_event(e)

    def _send(self, peer: str, msg) -> None:
        info = self.node.peers.get(peer)
        if info is None or info.state != "open":
            return
        self.node.tasks.spawn(self.node.send_cluster(peer, cm.encode(msg)), f"cluster {msg.TYPE} to {peer}")

    def _send_all(self, out) -> None:
        for peer, msg in out:
            self._send(peer, msg)

    def _broadcast(self, msg) -> None:
        for peer, info in self.node.peers.items():
            if info.state == "open":
                self._send(peer, msg)

    def start(self) -> asyncio.Task:
        self._task = asyncio.ensure_future(self._run())
        return self._task

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._adopting is not None:
            self._adopting.cancel()

    # ---- membership --------------------------------------------------------------------
    def _ensure_raft(self) -> Coordinator:
        if self.raft is None:
            if self.node.peer_id is None:
                raise ClusterError("the node has no peer id yet (not joined)")
            open_peers = [p for p, i in self.node.peers.items() if i.state == "open"]
            self.raft = Coordinator(self.node.peer_id, open_peers, rng=self.rng, now=self.clock(),
                                    election_timeout_s=ELECTION_TIMEOUT_S, on_commit=self._on_commit)
        return self.raft

    def _on_peer(self, peer: str, state: str) -> None:
        raft = self._ensure_raft()
        now = self.clock()
        if state == "open":
            self._opened[peer] = now
            self._send_all(raft.add_peer(now, peer))
            self._send(peer, self.advert)
            self.event("peer-joined", node=peer)
        else:
            self.adverts.pop(peer, None)
            self.status.pop(peer, None)
            self._lost.add(peer)
            self._send_all(raft.remove_peer(now, peer))
            self.event("peer-left", node=peer)

    def set_advert(self, advert: cm.Join) -> None:
        """A changed advert (new figures, a throttle, cached layers) goes to every peer at once."""
        self.advert = advert
        self._broadcast(advert)

    def _on_cluster(self, peer: str, payload: bytes) -> None:
        try:
            msg = cm.decode(payload, self.info)
        except cm.ClusterMessageError as exc:
            self.dropped += 1
            log.warning("dropped a cluster message from %s: %s", peer, exc)
            return
        now = self.clock()
        if isinstance(msg, cm.Join):
            if peer not in self.adverts:
                # it may have missed ours (its cluster started after our channel opened): answer
                self._send(peer, self.advert)
            changed = self.adverts.get(peer) != msg
            self.adverts[peer] = msg
            self._lost.discard(peer)
            if changed:
                b = msg.bench
                self.event("advert", node=peer, bandwidthGBs=round(b.bandwidth_gbs, 3) if b else None)
        elif isinstance(msg, cm.Heartbeat):
            self.status[peer] = (msg.status, msg.epoch, now)
            self.demand[peer] = msg.load
        elif isinstance(msg, cm.Leave):
            self._lost.add(peer)
        elif isinstance(msg, (cm.RequestVote, cm.Vote, cm.DistributionPlan, cm.PlanAck)):
            self._send_all(self._ensure_raft().receive(now, peer, msg))
        else:
            self.dropped += 1   # compute steps travel as CALLs, never as one-way messages

    # ---- the loop ----------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            try:
                self._step(self.clock())
            except Exception as exc:   # a bug in one tick must not stop the node's coordination
                log.exception("cluster tick failed: %s", exc)
                self.event("error", message=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(TICK_S)

    def _step(self, now: float) -> None:
        if self.node.peer_id is None:
            return
        raft = self._ensure_raft()
        self._send_all(raft.tick(now))
        if raft.is_leader:
            self._lead(now)
        if now - self._last_heartbeat >= HEARTBEAT_S:
            self._last_heartbeat = now
            self._broadcast(self._heartbeat())

    def _heartbeat(self) -> cm.Heartbeat:
        rtts = {p: round(i.rtt_ms, 3) for p, i in self.node.peers.items() if i.rtt_ms is not None}
        return cm.Heartbeat(self._my_status, 1.0 if self.wanted else 0.0, self._adopted_epoch, rtts)

    def want_plan(self) -> None:
        """Ask for a plan: the leader plans only once some member wants to generate, so joining
        a room loads no weights until there is work (then members keep their layers)."""
        if not self.wanted:
            self.wanted = True
            self._broadcast(self._heartbeat())

    def members(self, now: float) -> list[NodeInfo]:
        """Nodes the leader may plan with: itself and every member with an advert that is not
        silent or lost."""
        raft = self._ensure_raft()
        silent = set(raft.silent_peers(now, SILENT_AFTER_S)) if raft.is_leader else set()
        out = []
        for pid, join in [(self.node.peer_id, self.advert), *self.adverts.items()]:
            if pid != self.node.peer_id and (pid not in raft.members or pid in silent or pid in self._lost):
                continue
            info = NodeInfo.from_join(pid, join, self.info.model_id)
            if info is not None:
                out.append(info)
        return out

    def _lead(self, now: float) -> None:
        if self.raft.plan is None and not self.wanted and not any(v > 0 for v in self.demand.values()):
            return   # nobody has asked for a plan yet
        if any(p not in self.adverts and p not in self._lost and now - self._opened.get(p, now) < ADVERT_GRACE_S
               for p in self.raft.members):
            return   # a member that just joined has not advertised yet: plan with it, not before it
        nodes = self.members(now)
        key = tuple(sorted((n.node_id, n.bandwidth_gbs, n.memory_bytes) for n in nodes))
        current = self.raft.plan
        if key == self._planned_for and current is not None:
            return
        hop = {}
        for pid, info in self.node.peers.items():
            if info.rtt_ms is not None:
                hop[(self.node.peer_id, pid)] = info.rtt_ms / 2
        try:
            new = make_plan(self.info, nodes, hop_ms=hop, settings=self.settings)
        except NoPlanError as exc:
            if key != self._planned_for:
                self.event("no-plan", message=str(exc))
            self._planned_for = key
            return
        self._planned_for = key
        if current is not None and not self._worth_replacing(current, new, nodes):
            return
        self._plan_figures = {n.node_id: (n.bandwidth_gbs, n.memory_bytes) for n in nodes}
        self._send_all(self.raft.propose(now, new))
        self.event("plan-proposed", stages=[[n, *r] for n, r in _stages(new)], msPerToken=new.ms_per_token)

    def _worth_replacing(self, current: cm.Plan, new: cm.Plan, nodes) -> bool:
        """Hysteresis: a running plan stays unless one of its nodes is gone, one of its nodes
        advertises other figures, or the new plan is clearly (10%) faster. Every re-plan costs
        a reload of layers and a replay, so ties and measurement noise must not cause one."""
        if _stages(current) == _stages(new):
            return False
        figures = {n.node_id: (n.bandwidth_gbs, n.memory_bytes) for n in nodes}
        used = {s.node for s in current.stages}
        if not used <= set(figures):
            return True
        if len(current.stages) < min(self.settings.min_stages, len(nodes)):
            return True   # planned before every member had advertised
        before = getattr(self, "_plan_figures", None) or {}
        if any(node in before and before[node] != figures[node] for node in used):
            return True
        return new.ms_per_token < 0.9 * current.ms_per_token

    # ---- plans -------------------------------------------------------------------------
    def _on_commit(self, plan: cm.Plan) -> None:
        self.event("plan-committed", epoch=plan.epoch, term=plan.term, stages=[[n, *r] for n, r in _stages(plan)])
        if self._adopting is not None and not self._adopting.done():
            self._adopting.cancel()
        self._adopting = asyncio.ensure_future(self._adopt(plan))

    async def _adopt(self, plan: cm.Plan) -> None:
        mine = plan.stage_of(self.node.peer_id)
        self._my_status = "loading" if mine is not None and self.host.held != (plan.model, tuple(mine.layers)) \
            else self._my_status
        try:
            t0 = self.clock()
            await self.host.adopt(plan)
            self._adopted_epoch = plan.epoch
            self._my_status = "ready"
            if mine is not None:
                self.event("stage-loaded", epoch=plan.epoch, layers=list(mine.layers),
                           s=round(self.clock() - t0, 3))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._my_status = "error"
            self.event("stage-load-failed", epoch=plan.epoch, message=str(exc))
            log.warning("loading my stage of plan %d failed: %s", plan.epoch, exc)
        self._broadcast(self._heartbeat())

    def _stage_ready(self, peer: str, epoch: int) -> bool:
        if peer == self.node.peer_id:
            return self._adopted_epoch == epoch and self._my_status == "ready"
        st = self.status.get(peer)
        return st is not None and st[0] in ("ready", "busy") and st[1] == epoch and peer not in self._lost

    def ready_plan(self, min_epoch: int = 0, exclude=()) -> cm.Plan | None:
        plan = self._ensure_raft().committed
        if plan is None or plan.epoch < min_epoch or any(s.node in exclude for s in plan.stages):
            return None
        return plan if all(self._stage_ready(s.node, plan.epoch) for s in plan.stages) else None

    async def wait_plan(self, min_epoch: int = 0, exclude=(), timeout_s: float = READY_TIMEOUT_S) -> cm.Plan:
        deadline = self.clock() + timeout_s
        while (plan := self.ready_plan(min_epoch, exclude)) is None:
            if self.clock() > deadline:
                committed = self._ensure_raft().committed
                raise ClusterError(f"no plan became ready within {timeout_s:.0f} s (committed: "
                                   f"{None if committed is None else _stages(committed)}; leader "
                                   f"{self.raft.leader}; statuses {self.status})")
            await asyncio.sleep(TICK_S)
        return plan

    async def replan(self, lost: str | None, epoch: int) -> cm.Plan:
        """For PipelineModel: the next ready plan after `epoch` without `lost` (the leader
        makes it), or with lost None (a stage runs a newer plan) the current ready one."""
        if lost is not None:
            self._lost.add(lost)
        plan = await self.wait_plan(min_epoch=epoch + 1 if lost else epoch,
                                    exclude={lost} if lost else ())
        self.event("replanned", epoch=plan.epoch, lost=lost)
        return plan

    # ---- generation --------------------------------------------------------------------
    async def generate(self, prompt_tokens: list[int], tokenizer, *, max_tokens: int = 32,
                       on_token: Callable[[int, int], None] = lambda tok, n: None) -> dict:
        """Greedy generation through the room's pipeline; the dict mesh-run prints."""
        from ..engine import Engine, GenerationParams
        from ..sampler import SamplingParams
        t0 = self.clock()
        self.want_plan()
        plan = await self.wait_plan()
        wait_s = self.clock() - t0
        session = secrets.token_hex(6)
        model = PipelineModel(NodeTransport(self.node, self.host, self.info), plan, self.info, session,
                              replan=self.replan, clock=self.clock)
        engine = Engine(model, tokenizer, getattr(tokenizer, "chat_template", None), self.info.model_id,
                        prefill_chunk=512)
        params = GenerationParams(sampling=SamplingParams(temperature=0.0), max_tokens=max_tokens, seed=0)
        tokens, text, stats = [], [], None
        first_plan = plan
        async with aclosing(engine.generate(prompt_tokens, params)) as events:
            async for ev in events:
                if ev.token is not None:
                    tokens.append(ev.token)
                    on_token(ev.token, len(tokens))
                text.append(ev.text)
                stats = ev.stats or stats
        hops = [h for step in model.hop_ms for h in step]
        per_hop = statistics.median(hops) if hops else 0.0
        return {"tokens": tokens, "text": "".join(text),
                "plan": [{"node": n, "layers": list(r)} for n, r in _stages(first_plan)],
                "final_plan": [{"node": n, "layers": list(r)} for n, r in _stages(model.plan)],
                "epoch": model.plan.epoch,
                "events": model.events,
                "timings": {"plan_wait_s": round(wait_s, 3), "per_hop_ms": round(per_hop, 3),
                            "hops_per_token": len(model.plan.stages),
                            "decode_tok_s": round(stats.decode_tokens_per_s, 3) if stats else 0.0,
                            "prefill_tok_s": round(stats.prefill_tokens_per_s, 3) if stats else 0.0,
                            "ttft_s": round(stats.ttft_s, 3) if stats else 0.0}}


def throttled(advert: cm.Join, factor: float) -> cm.Join:
    """The advert of a node slowed down `factor` times (tests, `mesh-run --throttle-node`)."""
    if advert.bench is None or factor <= 1.0:
        return advert
    b = advert.bench
    return replace(advert, bench=cm.Bench(b.matmul_gflops / factor, b.bandwidth_gbs / factor,
                                          b.dispatch_us * factor))
