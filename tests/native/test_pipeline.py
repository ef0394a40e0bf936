"""Pipeline execution over an in-memory mesh: real SmolLM2 layers on the numpy backend,
split across 2 and 3 nodes, against the same model in one piece; a node lost mid-generation.

The nodes are real mesh Nodes (frames, chunking, CALL/REPLY) over in-memory channels
(test_node.MemoryNet); the browser tests run the same code over WebRTC.
"""
from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from tabmesh.gguf import read_gguf_path
from tabmesh.mesh import cluster_messages as cm
from tabmesh.mesh.pipeline import NodeTransport, NumpyStage, PipelineModel, StageHost
from tabmesh.mesh.planner import ModelInfo
from tabmesh.model.config import LlamaConfig
from tabmesh.model.llama_numpy import NumpyLlama
from test_node import MemoryNet

ROOT = Path(__file__).resolve().parents[2]
GGUF = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL = GGUF.name
N_CTX = 128
PROMPT = [1, 504, 3458, 282, 4649, 314, 253, 1345, 17]   # "The capital of France is a city." (any ids do)
N_NEW = 12

pytestmark = pytest.mark.skipif(not GGUF.exists(), reason="model missing: run `tabmesh setup`")

_cache: dict = {}


def info() -> ModelInfo:
    if "info" not in _cache:
        g = read_gguf_path(GGUF)
        _cache["info"] = ModelInfo.from_gguf(g, LlamaConfig.from_gguf(g), MODEL, n_ctx=N_CTX)
    return _cache["info"]


def stage(layers: tuple) -> NumpyLlama:
    """Weights per layer range, shared between tests (loading dequantizes; each stage has its own KV)."""
    key = ("w", layers)
    if key not in _cache:
        _cache[key] = NumpyLlama.from_path(GGUF, layers=range(*layers), n_ctx=N_CTX)
    base = _cache[key]
    return NumpyLlama(base.cfg, base.w, N_CTX)


def reference() -> list[int]:
    if "ref" not in _cache:
        _cache["ref"] = stage((0, 30)).generate_greedy(PROMPT, N_NEW)
    return _cache["ref"]


def make_plan(epoch: int, stages: list[tuple[str, int, int]]) -> cm.Plan:
    return cm.Plan(term=1, epoch=epoch, model=MODEL, n_layers=30,
                   stages=tuple(cm.Stage(n, (a, b), 1.0) for n, a, b in stages), ms_per_token=1.0,
                   requester=stages[0][0])


class Mesh:
    def __init__(self, ids):
        self.net = MemoryNet(max_frame=16384)
        self.nodes, self.hosts, self.loads = {}, {}, []
        for pid in ids:
            node = self.net.join(pid)
            host = StageHost(pid, self._loader(pid), info())
            node.on_call = lambda _peer, payload, host=host: host.answer(payload)
            self.nodes[pid], self.hosts[pid] = node, host

    def _loader(self, pid):
        async def load(model_id, layers):
            assert model_id == MODEL
            self.loads.append((pid, layers))
            return NumpyStage(stage(layers))
        return load

    async def ready(self):
        for node in self.nodes.values():
            await node.wait_open(len(self.nodes) - 1, 5)

    async def adopt(self, plan):
        await asyncio.gather(*(self.hosts[s.node].adopt(plan) for s in plan.stages))


async def greedy(model: PipelineModel) -> list[int]:
    tok = await model.forward(PROMPT, 0, output="argmax")
    out = [tok]
    while len(out) < N_NEW:
        tok = await model.forward([tok], len(PROMPT) + len(out) - 1, output="argmax")
        out.append(tok)
    return out


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 240))


@pytest.mark.parametrize("split", [[("a", 0, 30)], [("a", 0, 13), ("b", 13, 30)],
                                   [("b", 0, 7), ("c", 7, 22), ("a", 22, 30)]])
def test_split_generation_equals_the_whole_model(split):
    async def main():
        mesh = Mesh(["a", "b", "c"])
        await mesh.ready()
        plan = make_plan(1, split)
        await mesh.adopt(plan)
        model = PipelineModel(NodeTransport(mesh.nodes["a"], mesh.hosts["a"], info()), plan, info(), "s1")
        got = await greedy(model)
        logits = await model.forward([got[-1]], len(PROMPT) + N_NEW - 1, output="logits")
        return got, logits, model
    got, logits, model = run(main())
    assert got == reference()
    assert logits.shape == (info().n_vocab,) and np.isfinite(logits).all()
    assert len(model.hop_ms) == N_NEW and all(len(h) == len(split) for h in model.hop_ms)


def test_a_node_lost_mid_generation_is_replaced_and_the_output_is_unchanged():
    async def main():
        mesh = Mesh(["a", "b", "c"])
        await mesh.ready()
        plan1 = make_plan(1, [("a", 0, 10), ("b", 10, 20), ("c", 20, 30)])
        await mesh.adopt(plan1)
        replans = []

        async def replan(lost, epoch):
            replans.append(lost)
            plan2 = make_plan(2, [("a", 0, 15), ("c", 15, 30)])
            await mesh.adopt(plan2)
            return plan2
        model = PipelineModel(NodeTransport(mesh.nodes["a"], mesh.hosts["a"], info()), plan1, info(), "s1",
                              replan=replan)
        tok = await model.forward(PROMPT, 0, output="argmax")
        out = [tok]
        while len(out) < N_NEW:
            if len(out) == 5:
                mesh.net.leave("b")     # the tab closes between two tokens
            tok = await model.forward([tok], len(PROMPT) + len(out) - 1, output="argmax")
            out.append(tok)
        return out, replans, model.events, mesh.loads
    out, replans, events, loads = run(main())
    assert out == reference()
    assert replans == ["b"]
    assert [e["event"] for e in events] == ["stage-lost", "replan", "replayed"]
    assert events[2]["calls"] == 5 and events[2]["tokens"] == len(PROMPT) + 4
    assert ("a", (0, 15)) in loads and ("c", (15, 30)) in loads


def test_stages_refuse_wrong_epochs_layers_sessions_and_junk():
    async def main():
        mesh = Mesh(["a", "b"])
        await mesh.ready()
        plan = make_plan(3, [("a", 0, 15), ("b", 15, 30)])
        await mesh.adopt(plan)
        host = mesh.hosts["b"]
        h = np.zeros((1, info().n_embd), "<f4").tobytes()
        cases = {
            "epoch": cm.ComputeRequest(2, "s", 1, (15, 30), 0, (1, info().n_embd), "f32", h, want="argmax"),
            "layers": cm.ComputeRequest(3, "s", 1, (10, 30), 0, (1, info().n_embd), "f32", h, want="argmax"),
            "session": cm.ComputeRequest(3, "s", 1, (15, 30), 4, (1, info().n_embd), "f32", h, want="argmax"),
        }
        answers = {k: cm.decode(await host.answer(cm.encode(v))) for k, v in cases.items()}
        answers["junk"] = cm.decode(await host.answer(b"\x05\x00\x00\x00{}}}}garbage"))
        nan = np.full((1, info().n_embd), np.nan, "<f4").tobytes()
        answers["width"] = cm.decode(await host.answer(cm.encode(cm.ComputeRequest(
            3, "s", 1, (15, 30), 0, (1, 8), "f32", nan[:32], want="argmax"))))
        ok = cm.decode(await host.answer(cm.encode(cm.ComputeRequest(
            3, "s", 2, (15, 30), 0, (1, info().n_embd), "f32", h, want="argmax"))))
        return answers, ok
    answers, ok = run(main())
    for name, msg in answers.items():
        assert isinstance(msg, cm.ComputeError), name
    assert "epoch" in answers["epoch"].error.message
    assert "layers" in answers["layers"].error.message
    assert "position 4" in answers["session"].error.message
    assert isinstance(ok, cm.ComputeResult) and ok.output == "argmax"
