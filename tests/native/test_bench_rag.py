"""The rag bench's data paths: an hnswlib graph loaded into our HNSW, and the synthetic
collection written in store.py's storage layout (what the restore bench puts in IndexedDB)."""
import asyncio
import json

import numpy as np
import pytest

from tabmesh.bench_rag import bench_passages, hnsw_from_hnswlib, pieces, random_unit, synthetic_collection_ops
from tabmesh.cli import repo_root
from tabmesh.rag.exact import exact_search
from tabmesh.rag.hnsw import HNSW
from tabmesh.rag.storage import MemoryStorage
from tabmesh.rag.store import Collection


def test_hnswlib_graph_searches_exactly_as_hnswlib_with_a_beam_of_one():
    hnswlib = pytest.importorskip("hnswlib")
    X, ids = random_unit(3000, 32, 0), np.arange(1, 3001)
    lib = hnswlib.Index(space="ip", dim=32)
    lib.init_index(max_elements=3000, M=8, ef_construction=50, random_seed=0)
    lib.add_items(X, ids, num_threads=1)
    lib.set_ef(20)
    ours = hnsw_from_hnswlib(lib)
    assert len(ours) == 3000 and ours.M == 8
    np.testing.assert_array_equal(np.sort(ours.items()[0]), ids)
    Q = random_unit(100, 32, 1)
    ours._beam = 1  # hnswlib's search loop; the same graph must then give the same results
    got = ours.search_many(Q, 10, ef=20)[0]
    want = lib.knn_query(Q, k=10)[0].astype(np.int64)
    assert (np.sort(got, 1) == np.sort(want, 1)).all()


def test_synthetic_collection_restores_and_searches():
    X = random_unit(300, 16, 3)
    index = HNSW(16, M=4, ef_construction=20, seed=0)
    index.add(np.arange(1, 301), X)
    ops = synthetic_collection_ops("big one", index)
    storage = MemoryStorage()
    asyncio.run(storage.commit(ops))
    col = asyncio.run(Collection.restore(storage, "big one"))
    assert col.n_passages == 300 and len(col.documents()) == 300 and len(col) == 300
    hit = col.search(X[41], k=3)[0]
    assert hit.source == "p42" and hit.text == "synthetic passage 42" and hit.score > 0.999
    exact = exact_search(X, np.arange(1, 301), X[:20], 5)[0]
    found = np.array([[int(h.source[1:]) for h in col.search(x, k=5)] for x in X[:20]])
    assert (found[:, 0] == exact[:, 0]).all()


def test_pieces_put_the_meta_last_and_keep_every_op():
    index = HNSW(8, M=4)
    index.add(np.arange(1, 51), random_unit(50, 8, 0))
    ops = synthetic_collection_ops("c", index)
    parts = pieces(ops, 40)
    heads = [json.loads(h) for h, _ in parts]
    assert [h["meta"] is not None for h in heads] == [False] * (len(parts) - 1) + [True]
    assert sum(len(h["records"]) for h in heads) == sum(s == "records" for _, s, *_ in ops)
    for h, (_, blob) in zip(heads, parts):
        assert len(blob) == 4 * 8 * len(h["vectorKeys"])


def test_bench_passages_are_distinct():
    texts = bench_passages(repo_root(), 130)
    assert len(set(texts)) == 130
