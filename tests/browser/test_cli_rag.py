"""`tabmesh embed --json` and `tabmesh rag eval --json` drive the real page in headless
Chromium (inside the test's netns): embeddings equal sentence-transformers', and the eval
ingests into IndexedDB, reloads, and retrieves from the restored index."""
import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

import netns

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def run_cli(app, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    cmd = netns.exec_prefix(app.ns) + [sys.executable, "-m", "tabmesh", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))


def test_embed_json_matches_sentence_transformers(app):
    doc = json.loads((FIXTURES / "embeddings_minilm.json").read_text(encoding="utf-8"))
    cases = [doc["texts"][i] for i in (0, 1, 13)]  # English sentences and Cyrillic
    out = run_cli(app, "embed", "--json", *[c["text"] for c in cases])
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert set(result) == {"model", "backend", "dim", "vectors"}
    assert result["model"] == "all-MiniLM-L6-v2" and result["dim"] == 384
    vecs = np.array(result["vectors"], np.float64)
    assert vecs.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    for case, vec in zip(cases, vecs):
        ref = np.frombuffer(base64.b64decode(case["embedding_f16"]), "<f2").astype(np.float64)
        cos = vec @ ref / np.linalg.norm(ref)
        assert cos >= 0.999, f"{case['text']!r}: cos {cos:.6f} against sentence-transformers"


def test_rag_eval_json_on_the_fixture(app):
    out = run_cli(app, "rag", "eval", "--passages", str(FIXTURES / "rag_eval" / "passages.jsonl"),
                  "--queries", str(FIXTURES / "rag_eval" / "queries.jsonl"), "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads(out.stdout)
    assert set(m) >= {"recall_at_1", "recall_at_10", "mrr_at_10", "ingest_passages_per_s",
                      "query_ms_p50", "query_ms_p99", "index_restore_s"}
    assert m["passages"] == 60 and m["queries"] == 20
    # exact search with sentence-transformers on this fixture: recall@1 0.95, @10 1.0, MRR 0.975
    assert m["recall_at_10"] >= 0.95 and m["recall_at_1"] >= 0.8 and m["mrr_at_10"] >= 0.85, m
    assert m["recall_at_1"] <= m["recall_at_10"] and m["mrr_at_10"] <= m["recall_at_10"]
    assert m["index_restore_s"] > 0 and m["ingest_passages_per_s"] > 0
    assert 0 < m["query_ms_p50"] <= m["query_ms_p99"]
    assert "reloading the page" in out.stderr  # the queries ran against the restored index
