"""Planner: which node runs which layers. Pure and deterministic; no I/O, no asyncio.

    plan(model, nodes, requester=..., hop_ms=...) -> cluster_messages.Plan

Cost model, one decoded token (ms; bandwidth in GB/s is bytes / 1e6 per ms):
    layer l on node n   max((layer_bytes[l] + kv_read) / bandwidth, layer_flops / gflops)
                        + dispatches_per_layer * dispatch_us / 1000
                        decode is memory-bound: the weights are read once per token;
                        kv_read is the K/V cache at `kv_fill` of n_ctx
    stage               sum over its layers + stage_overhead_ms (+ the output head if last)
    hop x -> y          0 if x == y, else one-way latency hop_ms[x, y] + bytes / link_bytes_per_s
                        (requester -> first stage: one token id; between stages: one hidden
                        state; last stage -> requester: the logits)
    per-token latency   sum of the stages + the hops along requester, s1 .. sk, requester
Memory of a stage: its layers' weights + their KV cache for n_ctx positions, plus the token
embedding on the first stage and the output head on the last one; it must fit the node's
advertised usable memory.

Shares: contiguous ranges whose sizes are proportional to each node's throughput
(1 / its mean time per layer), capped by its memory (water-filling), rounded by largest
remainder. Balanced stages keep a pipeline with several requests in flight busy on every
node. Which nodes, and in which order, is a search by number of stages: every subset of
that size when there are at most `exhaustive_nodes` (8) nodes, else a beam of the best
`beam_width` subsets grown one node at a time. A subset of up to 4 nodes is tried in every
order; a larger one with the requester first and last and the others by where their cached
layers sit, then the best few get swaps and moves of stages while that helps. The search
stops `patience` sizes after the best plan stopped improving. The score is the per-token
latency (objective "latency": single-stream decode is sequential, so an extra node only
adds hops unless it is faster or memory needs it) or the bottleneck stage time (objective
"throughput": many streams at once), plus the time to fetch the layers a node does not
cache yet, amortized over `amortize_tokens` tokens, so nodes that already hold the layers
win ties. A node whose share would round to zero layers is left out.

Re-planning is calling plan() again with fresh figures: drop the lost node, or pass
ThroughputEstimator.adjusted(nodes), whose figures follow the stage times nodes report
(compute-result.ms), so a throttled node gets a smaller share.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Optional, Sequence

from ..errors import TabmeshError
from .cluster_messages import Join, Plan, Stage


class NoPlanError(TabmeshError):
    """No set of nodes can hold the model; the message says how much is missing."""

    code = "no_plan"


@dataclass(frozen=True)
class ModelInfo:
    """What the planner (and cluster_messages.decode) needs to know about one model."""

    model_id: str
    n_layers: int
    n_embd: int
    n_vocab: int
    n_ctx: int  # KV cache positions each stage allocates
    layer_bytes: tuple  # (n_layers,) weight bytes of each block as the GPU holds them
    layer_flops: float  # FLOPs of one block for one token (2 * matrix parameters)
    kv_bytes_per_layer: int  # K and V of one block for n_ctx positions
    embed_bytes: int  # token embedding table, held by the first stage
    head_bytes: int  # output norm + output matrix (token_embd when tied), held and read by the last stage
    tied_output: bool = False  # head is the embedding table: one copy when one node is first and last
    hidden_bytes: int = 0  # one token's hidden state on the wire (default n_embd * 4)
    result_bytes: int = 0  # what the last stage sends back per token (default logits, n_vocab * 4)
    dispatches_per_layer: int = 7
    kv_fill: float = 0.5  # fraction of the KV cache a decode step reads, on average

    def __post_init__(self):
        if len(self.layer_bytes) != self.n_layers or self.n_layers < 1:
            raise ValueError(f"{len(self.layer_bytes)} layer sizes for a model of {self.n_layers} layers")
        object.__setattr__(self, "hidden_bytes", self.hidden_bytes or 4 * self.n_embd)
        object.__setattr__(self, "result_bytes", self.result_bytes or 4 * self.n_vocab)

    @classmethod
    def from_config(cls, cfg: Any, model_id: str, *, n_ctx: int, bits_per_weight: float = 5.0,
                    kv_elem_bytes: int = 4) -> "ModelInfo":
        """Estimate from a LlamaConfig: matrices at bits_per_weight (Q4_1: 5, Q8_0: 8.5),
        norms and biases f32, the KV cache f32 as llama_gpu allocates it."""
        d, q, kv, f = cfg.n_embd, cfg.q_dim, cfg.kv_dim, cfg.n_ff
        matrix = d * (q + 2 * kv) + q * d + 3 * f * d
        vectors = 2 * d + ((q + 2 * kv) if cfg.qkv_bias else 0)
        layer = int(matrix * bits_per_weight / 8) + 4 * vectors
        table = int(cfg.n_vocab * d * bits_per_weight / 8)
        return cls(model_id, cfg.n_layers, d, cfg.n_vocab, n_ctx, (layer,) * cfg.n_layers, 2.0 * matrix,
                   2 * n_ctx * kv * kv_elem_bytes, table, 4 * d + table, cfg.tied_output)

    @classmethod
    def from_gguf(cls, gguf: Any, cfg: Any, model_id: str, *, n_ctx: int, kv_elem_bytes: int = 4) -> "ModelInfo":
        """Exact weight bytes from a parsed GGUF's tensor table (the GPU keeps GGUF blocks)."""
        layers = [0] * cfg.n_layers
        for name, t in gguf.tensors.items():
            i = gguf.layer_of(name)
            if i is not None and 0 <= i < cfg.n_layers:
                layers[i] += t.nbytes
        embed = gguf.tensors["token_embd.weight"].nbytes
        norm = gguf.tensors["output_norm.weight"].nbytes
        head = norm + (embed if cfg.tied_output else gguf.tensors["output.weight"].nbytes)
        est = cls.from_config(cfg, model_id, n_ctx=n_ctx, kv_elem_bytes=kv_elem_bytes)
        return replace(est, layer_bytes=tuple(layers), embed_bytes=embed, head_bytes=head)


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    memory_bytes: int  # usable GPU memory for weights + KV cache
    bandwidth_gbs: float
    matmul_gflops: float
    dispatch_us: float
    cached: frozenset = frozenset()  # layers of this model the node already holds

    @classmethod
    def from_join(cls, node_id: str, join: Join, model_id: str) -> Optional["NodeInfo"]:
        """From a validated join message; None until the node has benchmark figures."""
        if join.bench is None:
            return None
        b = join.bench
        return cls(node_id, join.memory_bytes, b.bandwidth_gbs, b.matmul_gflops, b.dispatch_us,
                   join.cached_layers(model_id))


@dataclass(frozen=True)
class Settings:
    objective: str = "latency"  # or "throughput"
    default_hop_ms: float = 1.0  # one-way latency of a pair hop_ms does not list
    link_bytes_per_s: float = 20e6  # data-channel throughput between two tabs
    stage_overhead_ms: float = 0.5  # submit + read back of one stage
    fetch_bytes_per_s: float = 50e6  # loading layers a node does not cache
    amortize_tokens: int = 2000  # tokens a plan is expected to serve (spreads the fetch cost)
    max_stages: Optional[int] = None
    min_stages: int = 1  # spread over at least this many nodes (a user's choice: `mesh-run --nodes N`)
    beam_width: int = 8
    exhaustive_nodes: int = 8  # up to this many nodes every subset is tried; beyond, a beam
    patience: int = 2  # levels without a better plan before the search stops


@dataclass
class _Eval:
    score: float
    latency: float
    order: tuple  # node indices in pipeline order
    ranges: tuple  # ((a, b), ...)
    stage_ms: tuple


class _Planner:
    def __init__(self, model: ModelInfo, nodes: Sequence[NodeInfo], requester, hop_ms, s: Settings):
        self.m, self.nodes, self.s, self.hop_ms = model, list(nodes), s, hop_ms or {}
        self.requester = requester
        L = model.n_layers
        self.cum_bytes = [0]
        for b in model.layer_bytes:
            self.cum_bytes.append(self.cum_bytes[-1] + b)
        kv_read = model.kv_bytes_per_layer * model.kv_fill
        self.cum_ms, self.head_ms, self.cum_fetch, self.centre = [], [], [], []
        for n in self.nodes:
            fetch = [0]
            for l, b in enumerate(model.layer_bytes):
                fetch.append(fetch[-1] + (0 if l in n.cached else b))
            self.cum_fetch.append(fetch)  # prefix sums of bytes this node would have to load
            held = [l for l in n.cached if 0 <= l < L]
            self.centre.append(sum(held) / len(held) if held else (L - 1) / 2)
            per_dispatch = n.dispatch_us / 1000.0
            cum = [0.0]
            for b in model.layer_bytes:
                t = max((b + kv_read) / (n.bandwidth_gbs * 1e6), model.layer_flops / (n.matmul_gflops * 1e6))
                cum.append(cum[-1] + t + model.dispatches_per_layer * per_dispatch)
            self.cum_ms.append(cum)
            self.head_ms.append(model.head_bytes / (n.bandwidth_gbs * 1e6) + 2 * per_dispatch)
        self.weight = [L / c[-1] for c in self.cum_ms]  # layers per ms

    # -- pieces of the cost model --------------------------------------------------------
    def stage_bytes(self, a: int, b: int) -> int:
        m = self.m
        extra = (m.embed_bytes if a == 0 else 0) + (m.head_bytes if b == m.n_layers else 0)
        if a == 0 and b == m.n_layers and m.tied_output:
            extra -= m.embed_bytes
        return self.cum_bytes[b] - self.cum_bytes[a] + (b - a) * m.kv_bytes_per_layer + extra

    def stage_ms(self, i: int, a: int, b: int) -> float:
        last = self.head_ms[i] if b == self.m.n_layers else 0.0
        return self.cum_ms[i][b] - self.cum_ms[i][a] + self.s.stage_overhead_ms + last

    def hop(self, x: str, y: str, nbytes: int) -> float:
        if x == y:
            return 0.0
        ms = self.hop_ms.get((x, y), self.hop_ms.get((y, x), self.s.default_hop_ms))
        return ms + nbytes / self.s.link_bytes_per_s * 1e3

    def fits_one_layer(self, i: int) -> bool:
        return self.nodes[i].memory_bytes >= min(self.m.layer_bytes) + self.m.kv_bytes_per_layer

    # -- shares --------------------------------------------------------------------------
    def split(self, order: tuple) -> tuple[Optional[tuple], int]:
        """Contiguous ranges for `order`, or (None, layers short of memory)."""
        L, m = self.m.n_layers, self.m
        k = len(order)
        per_layer = self.cum_bytes[-1] / L + m.kv_bytes_per_layer
        caps = []
        for pos, i in enumerate(order):
            extra = (m.embed_bytes if pos == 0 else 0) + (m.head_bytes if pos == k - 1 else 0)
            caps.append(max(0, min(L, int((self.nodes[i].memory_bytes - extra) // per_layer))))
        for _ in range(L + k):
            if sum(caps) < L:
                return None, L - sum(caps)
            counts = _integer_shares(L, [self.weight[i] for i in order], caps)
            if min(counts) == 0:
                return None, 0
            ranges, a = [], 0
            over = None
            for pos, (i, n) in enumerate(zip(order, counts)):
                ranges.append((a, a + n))
                if over is None and self.stage_bytes(a, a + n) > self.nodes[i].memory_bytes:
                    over = pos
                a += n
            if over is None:
                return tuple(ranges), 0
            caps[over] = counts[over] - 1  # the average layer size under-counted this stage
        return None, L

    def evaluate(self, order: tuple) -> tuple[Optional[_Eval], int]:
        ranges, short = self.split(order)
        if ranges is None:
            return None, short
        ids = [self.nodes[i].node_id for i in order]
        stage_ms = tuple(self.stage_ms(i, a, b) for i, (a, b) in zip(order, ranges))
        hops = sum(self.hop(x, y, self.m.hidden_bytes) for x, y in zip(ids, ids[1:]))
        if self.requester is not None:
            hops += self.hop(self.requester, ids[0], 4) + self.hop(ids[-1], self.requester, self.m.result_bytes)
        latency = sum(stage_ms) + hops
        if self.s.objective == "throughput":
            outgoing = [self.m.hidden_bytes] * (len(ids) - 1) + [self.m.result_bytes]
            objective = max(t + nb / self.s.link_bytes_per_s * 1e3 for t, nb in zip(stage_ms, outgoing))
        else:
            objective = latency
        uncached = sum(self.cum_fetch[i][b] - self.cum_fetch[i][a] for i, (a, b) in zip(order, ranges))
        fetch_ms = uncached / self.s.fetch_bytes_per_s * 1e3 / self.s.amortize_tokens
        return _Eval(objective + fetch_ms, latency, order, ranges, stage_ms), 0

    # -- search --------------------------------------------------------------------------
    def orders(self, subset: frozenset) -> list[tuple]:
        if len(subset) <= 4:  # at most 24 orders: try them all
            return list(itertools.permutations(sorted(subset)))
        r = self.requester_index  # others by where their cached layers sit (none: the middle)
        rest = tuple(sorted((i for i in subset if i != r), key=lambda i: (self.centre[i], self.nodes[i].node_id)))
        if r in subset:
            return [(r,) + rest, rest + (r,)] if rest else [(r,)]
        return [rest]

    def best_of(self, subset: frozenset) -> tuple[Optional[_Eval], int]:
        best, short = None, math.inf
        for order in self.orders(subset):
            ev, s = self.evaluate(order)
            if ev is not None and (best is None or ev.score < best.score):
                best = ev
            short = min(short, s)
        return best, short

    def improve(self, ev: _Eval) -> _Eval:
        """Swap two stages, or move one elsewhere, while that lowers the score."""
        better = True
        while better:
            better = False
            k = len(ev.order)
            for p, q in itertools.permutations(range(k), 2):
                swap, move = list(ev.order), list(ev.order)
                swap[p], swap[q] = swap[q], swap[p]
                move.insert(q, move.pop(p))
                for order in (swap, move):
                    cand, _ = self.evaluate(tuple(order))
                    if cand is not None and cand.score < ev.score - 1e-9:
                        ev, better = cand, True
        return ev

    def search(self, require_requester: bool) -> _Eval:
        s = self.s
        ids = [n.node_id for n in self.nodes]
        self.requester_index = ids.index(self.requester) if self.requester in ids else None
        eligible = [i for i in range(len(self.nodes)) if self.fits_one_layer(i)]
        if require_requester and self.requester_index not in eligible:
            raise NoPlanError(f"the requester {self.requester} must run a stage but is not among the "
                              f"nodes with benchmark figures and memory for one layer")
        fixed = frozenset((self.requester_index,)) if require_requester else frozenset()
        others = [i for i in eligible if i not in fixed]
        exhaustive = len(eligible) <= s.exhaustive_nodes

        def all_of(size):
            return {fixed | frozenset(c) for c in itertools.combinations(others, size - len(fixed))}

        level = all_of(1) if exhaustive or fixed else {frozenset((i,)) for i in eligible}
        max_stages = min(s.max_stages or len(eligible), len(eligible), self.m.n_layers)
        top: list = []  # the best few feasible plans seen
        best_score, stale, shortfall, size = math.inf, 0, self.m.n_layers, 1
        while level and size <= max_stages:
            ranked = []
            for subset in level:
                ev, short = self.best_of(subset)
                if ev is not None:
                    ranked.append(((0, ev.score, sorted(subset)), subset, ev))
                else:
                    shortfall = min(shortfall, short)
                    capacity = sum(self.nodes[i].memory_bytes for i in subset)
                    ranked.append(((1, short, -capacity, sorted(subset)), subset, None))
            ranked.sort(key=lambda r: r[0])
            beam = ranked[:s.beam_width]
            found = [ev for _, _, ev in beam if ev is not None]
            found = [self.improve(ev) if j < 3 and len(ev.order) > 4 else ev for j, ev in enumerate(found)]
            if size < min(s.min_stages, max_stages):   # fewer nodes than asked for: search on, keep none
                size += 1
                level = all_of(size) if exhaustive else {b | {i} for _, b, _ in beam for i in eligible if i not in b}
                continue
            top = sorted(top + found, key=lambda e: (e.score, e.order))[:s.beam_width]
            level_best = min((ev.score for ev in found), default=math.inf)
            if level_best < best_score - 1e-9:
                best_score, stale = level_best, 0
            elif best_score < math.inf:
                stale += 1
                if stale >= s.patience:
                    break
            size += 1
            level = all_of(size) if exhaustive else {b | {i} for _, b, _ in beam for i in eligible if i not in b}
        if not top:
            need = self.stage_bytes(0, self.m.n_layers)
            have = sum(self.nodes[i].memory_bytes for i in eligible)
            raise NoPlanError(
                f"model {self.m.model_id} needs about {need / 2**20:.0f} MiB (weights + KV cache for "
                f"{self.m.n_ctx} positions) but the {len(eligible)} usable node(s) offer {have / 2**20:.0f} "
                f"MiB in all ({shortfall} layer(s) short); open the room in a tab with more GPU memory, "
                f"lower n_ctx, or use a smaller quantization")
        return top[0]


def plan(model: ModelInfo, nodes: Sequence[NodeInfo], *, requester: Optional[str] = None,
         require_requester: bool = False, hop_ms: Optional[Mapping[tuple, float]] = None,
         settings: Settings = Settings(), epoch: int = 0, term: int = 0) -> Plan:
    """The best plan for `model` over `nodes` (see the module docstring for the model).

    requester: the node that sends tokens in and receives logits (None: leave the ring out).
    require_requester: that node must run a stage. hop_ms: one-way ms per (node, node) pair,
    either order (e.g. half of each measured RTT). Raises NoPlanError when nothing fits.
    """
    if settings.objective not in ("latency", "throughput"):
        raise ValueError(f"objective must be 'latency' or 'throughput', got {settings.objective!r}")
    if len({n.node_id for n in nodes}) != len(nodes):
        raise ValueError("node ids must be unique")
    usable = [n for n in nodes if min(n.bandwidth_gbs, n.matmul_gflops) > 0 and n.dispatch_us >= 0]
    if not usable:
        raise NoPlanError(f"no node with benchmark figures to plan {model.model_id} on; wait for the "
                          f"tabs to finish their GPU benchmark, or open the room in a tab with WebGPU")
    p = _Planner(model, usable, requester, hop_ms, settings)
    ev = p.search(require_requester)
    stages = tuple(Stage(p.nodes[i].node_id, r, round(ms, 4)) for i, r, ms in zip(ev.order, ev.ranges, ev.stage_ms))
    return Plan(term, epoch, model.model_id, model.n_layers, stages, round(ev.latency, 4), requester)


def _integer_shares(total: int, weights: Sequence[float], caps: Sequence[int]) -> list[int]:
    """Split `total` proportionally to `weights`, each at most its cap (sum(caps) >= total)."""
    k = len(weights)
    x, free, left = [0.0] * k, set(range(k)), float(total)
    while free:
        w = sum(weights[i] for i in free)
        over = [i for i in free if left * weights[i] / w > caps[i]]
        if not over:
            for i in free:
                x[i] = left * weights[i] / w
            break
        for i in over:
            x[i] = caps[i]
            left -= caps[i]
            free.discard(i)
    counts = [min(caps[i], int(x[i] + 1e-9)) for i in range(k)]
    by_remainder = sorted(range(k), key=lambda i: (-(x[i] - counts[i]), i))
    while sum(counts) < total:
        for i in by_remainder:
            if sum(counts) < total and counts[i] < caps[i]:
                counts[i] += 1
    return counts


@dataclass
class ThroughputEstimator:
    """Follows how fast nodes really are: EWMA of observed / predicted stage time per node.

    observe() takes a stage time a node reported (compute-result.ms) for layers [a, b);
    adjusted() returns the nodes with their figures divided by that ratio, for plan()."""

    model: ModelInfo
    alpha: float = 0.3
    settings: Settings = Settings()
    factors: dict = field(default_factory=dict)  # node id -> observed / predicted

    def observe(self, node: NodeInfo, layers: tuple, observed_ms: float) -> float:
        a, b = layers
        if not (0 <= a < b <= self.model.n_layers) or not math.isfinite(observed_ms) or observed_ms <= 0:
            raise ValueError(f"observation of {observed_ms} ms for layers {layers} is not usable")
        p = _Planner(self.model, [node], None, None, self.settings)
        ratio = min(100.0, max(0.01, observed_ms / p.stage_ms(0, a, b)))
        old = self.factors.get(node.node_id)
        self.factors[node.node_id] = ratio if old is None else (1 - self.alpha) * old + self.alpha * ratio
        return self.factors[node.node_id]

    def adjusted(self, nodes: Sequence[NodeInfo]) -> list[NodeInfo]:
        out = []
        for n in nodes:
            f = self.factors.get(n.node_id, 1.0)
            out.append(replace(n, bandwidth_gbs=n.bandwidth_gbs / f, matmul_gflops=n.matmul_gflops / f,
                               dispatch_us=n.dispatch_us * f))
        return out
