"""Planner properties: shares follow throughput, memory is respected, slow or distant nodes
are left out, cached layers attract their nodes, and a throttled node loses share."""
import itertools
import os
import random
import time
from pathlib import Path

import pytest

from tabmesh.mesh import cluster_messages as cm
from tabmesh.mesh.planner import ModelInfo, NodeInfo, NoPlanError, Settings, ThroughputEstimator, _Planner, plan
from tabmesh.model.config import LlamaConfig

MB = 2**20
# 30 layers of 4 MiB weights + 1 MiB KV cache each; 8 MiB embedding and head (tied)
MODEL = ModelInfo("m", 30, 576, 49152, 1024, (4 * MB,) * 30, 1e6, 1 * MB, 8 * MB, 8 * MB, tied_output=True)
WHOLE = 30 * 5 * MB + 8 * MB  # one node running everything (tied table held once)
THROUGHPUT = Settings(objective="throughput")


def nid(i):
    return f"{i:012x}"


def node(i, bw=10.0, mem=1024 * MB, cached=(), dispatch_us=1.0):
    return NodeInfo(nid(i), mem, bw, 1000.0 * bw, dispatch_us, frozenset(cached))


def shares(p):
    return {s.node: s.end - s.start for s in p.stages}


def check_valid(p, model, nodes):
    """Contiguous, complete, within memory, and a well-formed wire plan."""
    p.check(model)
    by_id = {n.node_id: n for n in nodes}
    planner = _Planner(model, nodes, None, None, Settings())
    for s in p.stages:
        assert planner.stage_bytes(s.start, s.end) <= by_id[s.node].memory_bytes, s
    assert p.ms_per_token >= sum(s.ms for s in p.stages) - 1e-3
    assert cm.decode(cm.encode(cm.DistributionPlan(1, p, None), model), model).plan == p


def test_one_fast_node_runs_everything_and_a_slower_one_is_left_out():
    nodes = [node(1, bw=10), node(2, bw=4)]
    p = plan(MODEL, nodes)
    assert shares(p) == {nid(1): 30}
    check_valid(p, MODEL, nodes)
    # an equally fast second node would only add a hop: still one stage
    assert len(plan(MODEL, [node(1), node(2)]).stages) == 1


def test_shares_are_proportional_to_throughput():
    nodes = [node(1, bw=1), node(2, bw=2), node(3, bw=3)]
    p = plan(MODEL, nodes, settings=THROUGHPUT)
    assert shares(p) == {nid(1): 5, nid(2): 10, nid(3): 15}
    check_valid(p, MODEL, nodes)


def test_memory_caps_shares_and_forces_a_split():
    # node 1 is fastest but holds only 10 layers; the rest goes to node 2
    nodes = [node(1, bw=20, mem=10 * 5 * MB + 8 * MB), node(2, bw=5, mem=WHOLE - 1)]
    p = plan(MODEL, nodes)
    assert shares(p) == {nid(1): 10, nid(2): 20}
    check_valid(p, MODEL, nodes)
    # shares stay proportional when memory is not binding: 2:1 with room for 2/3 each
    nodes = [node(1, bw=2, mem=21 * 5 * MB + 8 * MB), node(2, bw=1, mem=21 * 5 * MB + 8 * MB)]
    assert shares(plan(MODEL, nodes)) == {nid(1): 20, nid(2): 10}


def test_memory_is_respected_when_layers_differ_in_size():
    # early layers are 4x the late ones, so the average layer size under-counts the first stages
    uneven = ModelInfo("u", 30, 576, 49152, 1024, (8 * MB,) * 10 + (2 * MB,) * 20, 1e6, MB, 8 * MB, 8 * MB,
                       tied_output=True)
    rng = random.Random(3)
    for _ in range(30):
        nodes = [node(i, bw=rng.uniform(1, 20), mem=rng.choice([40, 60, 90, 130]) * MB)
                 for i in range(rng.randint(2, 6))]
        for objective in ("latency", "throughput"):
            try:
                p = plan(uneven, nodes, settings=Settings(objective=objective))
            except NoPlanError:
                continue
            check_valid(p, uneven, nodes)


def test_a_distant_node_is_left_out():
    nodes = [node(1, mem=16 * 5 * MB + 8 * MB), node(2, mem=16 * 5 * MB + 8 * MB), node(3, mem=16 * 5 * MB + 8 * MB)]
    far = {(nid(1), nid(2)): 0.5, (nid(1), nid(3)): 40.0, (nid(2), nid(3)): 40.0}
    p = plan(MODEL, nodes, hop_ms=far)
    assert set(shares(p)) == {nid(1), nid(2)}
    near3 = {(nid(1), nid(2)): 40.0, (nid(1), nid(3)): 0.5, (nid(2), nid(3)): 40.0}
    assert set(shares(plan(MODEL, nodes, hop_ms=near3))) == {nid(1), nid(3)}


def test_nodes_that_cache_layers_are_preferred():
    p = plan(MODEL, [node(1), node(2, cached=range(30))])
    assert shares(p) == {nid(2): 30}
    half = 15 * 5 * MB + 8 * MB
    nodes = [node(1, mem=half, cached=range(15, 30)), node(2, mem=half, cached=range(15)), node(3, mem=half)]
    p = plan(MODEL, nodes)
    assert [(s.node, s.layers) for s in p.stages] == [(nid(2), (0, 15)), (nid(1), (15, 30))]
    # a small speed edge does not outweigh loading 60 MiB; a large one does
    assert shares(plan(MODEL, [node(1, bw=10.2), node(2, cached=range(30))])) == {nid(2): 30}
    assert shares(plan(MODEL, [node(1, bw=30), node(2, cached=range(30))])) == {nid(1): 30}


def test_requester_in_or_out_of_the_pipeline():
    slow_requester = node(9, bw=2)
    nodes = [node(1), slow_requester]
    p = plan(MODEL, nodes, requester=nid(9))
    assert shares(p) == {nid(1): 30} and p.requester == nid(9)
    p = plan(MODEL, nodes, requester=nid(9), require_requester=True)
    assert nid(9) in shares(p)
    # the requester runs the last stage, so the logits never cross a data channel
    two = [node(1, mem=16 * 5 * MB + 8 * MB), node(2, mem=16 * 5 * MB + 8 * MB)]
    assert plan(MODEL, two, requester=nid(1)).stages[-1].node == nid(1)
    assert plan(MODEL, two, requester=nid(2)).stages[-1].node == nid(2)
    # latency counts the hop in and the logits back when the requester runs no stage
    alone = plan(MODEL, [node(1)], requester=nid(9), hop_ms={(nid(1), nid(9)): 5.0})
    logits_ms = MODEL.result_bytes / Settings().link_bytes_per_s * 1e3
    assert alone.ms_per_token == pytest.approx(alone.stages[0].ms + 10.0 + logits_ms, abs=1e-2)


def test_clear_errors_when_nothing_fits():
    with pytest.raises(NoPlanError, match=r"needs about \d+ MiB .* offer \d+ MiB"):
        plan(MODEL, [node(1, mem=40 * MB), node(2, mem=40 * MB)])
    with pytest.raises(NoPlanError, match="benchmark"):
        plan(MODEL, [NodeInfo(nid(1), 1 << 40, 0.0, 0.0, 0.0)])
    with pytest.raises(NoPlanError, match="must run a stage"):
        plan(MODEL, [node(1), node(2, mem=MB)], requester=nid(2), require_requester=True)
    with pytest.raises(NoPlanError, match="must run a stage"):
        plan(MODEL, [node(1)], requester=nid(7), require_requester=True)
    assert NoPlanError("x").to_dict()["type"] == "NoPlanError"


def test_replan_after_a_node_is_lost_uses_the_survivors():
    third = 11 * 5 * MB + 8 * MB
    nodes = [node(1, mem=third), node(2, mem=third), node(3, mem=third), node(4, mem=third)]
    p = plan(MODEL, nodes)
    assert len(p.stages) == 3
    lost = p.stages[1].node
    survivors = [n for n in nodes if n.node_id != lost]
    p2 = plan(MODEL, survivors, epoch=p.epoch + 1)
    assert lost not in shares(p2) and sum(shares(p2).values()) == 30
    check_valid(p2, MODEL, survivors)


def test_a_throttled_node_gets_a_smaller_share_at_the_next_plan():
    nodes = [node(1), node(2), node(3)]
    p = plan(MODEL, nodes, settings=THROUGHPUT)
    assert sorted(shares(p).values()) == [10, 10, 10]
    est = ThroughputEstimator(MODEL)
    slow = p.stage_of(nid(2))
    for _ in range(5):  # node 2 reports stages 3x slower than its benchmark promised
        est.observe(nodes[1], slow.layers, 3 * slow.ms)
        est.observe(nodes[0], p.stage_of(nid(1)).layers, p.stage_of(nid(1)).ms)
    assert est.factors[nid(2)] == pytest.approx(3.0, rel=0.05) and est.factors[nid(1)] == pytest.approx(1.0, rel=1e-3)
    p2 = plan(MODEL, est.adjusted(nodes), settings=THROUGHPUT)
    assert shares(p2)[nid(2)] < 10 and shares(p2)[nid(1)] > 10
    # the EWMA moves gradually: one slow report does not triple the factor at once
    est2 = ThroughputEstimator(MODEL, alpha=0.3)
    est2.observe(nodes[0], (0, 10), 10.0)
    first = est2.factors[nid(1)]
    est2.observe(nodes[0], (0, 10), 30.0)
    assert est2.factors[nid(1)] == pytest.approx(0.7 * first + 0.3 * 3 * first)
    with pytest.raises(ValueError):
        est2.observe(nodes[0], (0, 31), 1.0)


def _brute_force(model, nodes, requester, hop_ms, settings):
    p = _Planner(model, nodes, requester, hop_ms, settings)
    best = None
    for k in range(1, len(nodes) + 1):
        for order in itertools.permutations(range(len(nodes)), k):
            ev, _ = p.evaluate(order)
            if ev is not None and (best is None or ev.score < best.score):
                best = ev
    return best


def _planned_score(model, nodes, p, requester, hop_ms, settings):
    pl = _Planner(model, nodes, requester, hop_ms, settings)
    order = tuple(next(i for i, n in enumerate(nodes) if n.node_id == s.node) for s in p.stages)
    ev, _ = pl.evaluate(order)
    assert ev.ranges == tuple(s.layers for s in p.stages)
    return ev.score


@pytest.mark.parametrize("objective", ["latency", "throughput"])
@pytest.mark.parametrize("search", ["exhaustive", "beam"])
def test_search_matches_brute_force_on_small_random_rooms(objective, search):
    rng = random.Random(7 if objective == "latency" else 8)
    settings = Settings(objective=objective, exhaustive_nodes=8 if search == "exhaustive" else 0)
    for trial in range(36):
        n = rng.randint(1, 5)
        nodes = [NodeInfo(nid(i), rng.choice([40, 70, 120, 200]) * MB, rng.uniform(1, 20), rng.uniform(50, 5000),
                          rng.uniform(0, 30), frozenset(range(rng.randrange(30), 30)) if rng.random() < 0.3
                          else frozenset()) for i in range(n)]
        hop = {(a.node_id, b.node_id): rng.uniform(0.1, 20) for a, b in itertools.combinations(nodes, 2)}
        requester = rng.choice([None, nodes[0].node_id, nid(99)])
        best = _brute_force(MODEL, nodes, requester, hop, settings)
        if best is None:
            with pytest.raises(NoPlanError):
                plan(MODEL, nodes, requester=requester, hop_ms=hop, settings=settings)
            continue
        p = plan(MODEL, nodes, requester=requester, hop_ms=hop, settings=settings)
        check_valid(p, MODEL, nodes)
        assert _planned_score(MODEL, nodes, p, requester, hop, settings) <= best.score * (1 + 1e-9), trial


@pytest.mark.parametrize("objective", ["latency", "throughput"])
def test_sixteen_nodes_plan_quickly(objective):
    rng = random.Random(16)
    nodes = [node(i, bw=rng.uniform(1, 20), mem=rng.choice([30, 60, 90]) * MB,
                  cached=range(rng.randrange(30), 30) if i % 3 == 0 else ()) for i in range(16)]
    hop = {(a.node_id, b.node_id): rng.uniform(0.2, 10) for a, b in itertools.combinations(nodes, 2)}
    start = time.perf_counter()
    p = plan(MODEL, nodes, requester=nid(3), hop_ms=hop, settings=Settings(objective=objective))
    assert time.perf_counter() - start < 2.0  # ~0.1 s on an idle core; generous on a shared one
    check_valid(p, MODEL, nodes)


def test_model_info_from_config_and_join():
    cfg = LlamaConfig(arch="llama", n_layers=30, n_embd=576, n_head=9, n_head_kv=3, head_dim=64, n_ff=1536,
                      n_vocab=49152, n_ctx_train=8192, rope_base=1e5, n_rot=64, rope_layout="normal",
                      rms_eps=1e-5, tied_output=True, qkv_bias=False)
    info = ModelInfo.from_config(cfg, "smol", n_ctx=2048)
    matrix = 576 * (576 + 2 * 192) + 576 * 576 + 3 * 1536 * 576
    assert info.layer_bytes == (matrix * 5 // 8 + 4 * 2 * 576,) * 30
    assert info.kv_bytes_per_layer == 2 * 2048 * 192 * 4 and info.layer_flops == 2 * matrix
    assert (info.hidden_bytes, info.result_bytes) == (576 * 4, 49152 * 4)
    join = cm.Join(cm.GpuInfo("v", "a", "d", "", True, {}), 512 * MB, cm.Bench(900.0, 12.5, 6.0),
                   (cm.CachedLayers("smol", ((0, 4),)),))
    n = NodeInfo.from_join(nid(5), join, "smol")
    assert (n.memory_bytes, n.bandwidth_gbs, n.matmul_gflops, n.dispatch_us, n.cached) == (
        512 * MB, 12.5, 900.0, 6.0, frozenset(range(4)))
    assert NodeInfo.from_join(nid(5), cm.Join(join.gpu, 1, None, ()), "smol") is None


def test_model_info_from_the_smollm2_file():
    from tabmesh.gguf import read_gguf_path
    path = Path(os.environ.get("TABMESH_MODELS_DIR") or Path(__file__).resolve().parents[2] / "models")
    path = path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        pytest.skip(f"{path} is absent (the repo setup downloads it)")
    g = read_gguf_path(path)
    cfg = LlamaConfig.from_gguf(g)
    info = ModelInfo.from_gguf(g, cfg, "smol", n_ctx=2048)
    assert sum(info.layer_bytes) == sum(t.nbytes for name, t in g.tensors.items() if name.startswith("blk."))
    assert info.embed_bytes == g.tensors["token_embd.weight"].nbytes and info.tied_output
    p = plan(info, [node(1, mem=2 * 1024 * MB)])
    assert shares(p) == {nid(1): 30}


def test_min_stages_spreads_over_the_nodes_asked_for_in_throughput_proportion():
    nodes = [node(0, bw=10.0), node(1, bw=10.0), node(2, bw=5.0)]
    assert len(plan(MODEL, nodes).stages) == 1          # latency alone: one node, no hops
    p = plan(MODEL, nodes, settings=Settings(min_stages=3))
    check_valid(p, MODEL, nodes)
    got = shares(p)
    assert len(got) == 3
    assert got[nid(2)] < got[nid(0)] and got[nid(2)] < got[nid(1)]   # the slow node gets fewer layers
    assert len(plan(MODEL, nodes[:2], settings=Settings(min_stages=3)).stages) == 2   # at most what exists
