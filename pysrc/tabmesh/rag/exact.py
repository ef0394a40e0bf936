"""Brute-force cosine top-k: the reference that HNSW recall is measured against.

One matmul per chunk of queries, ``argpartition`` for the top k, then a sort of those k.
Slow at scale (n_queries x n_items dot products) and exact by construction.
"""

from __future__ import annotations

import numpy as np


def normalized(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` scaled to unit L2 norm, as float32 (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norms > 0, norms, 1)


def exact_search(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int,
                 chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """The exact top-``k`` items by cosine similarity for each query.

    vectors: (n, dim), ids: (n,) int, queries: (q, dim) or (dim,). Inputs need not be
    normalized. Returns ``(ids (q, k'), scores (q, k'))`` with k' = min(k, n), best first
    (a 1-d query gives 1-d results). Ties are broken by position in ``vectors``.
    """
    vectors = normalized(vectors)
    ids = np.asarray(ids)
    single = np.ndim(queries) == 1
    queries = normalized(np.atleast_2d(queries))
    n = len(vectors)
    assert ids.shape == (n,), f"ids shape {ids.shape} does not match {n} vectors"
    assert queries.shape[1:] == vectors.shape[1:], (
        f"query dim {queries.shape[1:]} does not match vector dim {vectors.shape[1:]}")
    k = min(int(k), n)
    out_ids = np.empty((len(queries), k), dtype=ids.dtype)
    out_scores = np.empty((len(queries), k), dtype=np.float32)
    for start in range(0, len(queries), chunk):
        sims = queries[start:start + chunk] @ vectors.T            # (c, n)
        if k < n:
            top = np.argpartition(-sims, k - 1, axis=1)[:, :k]     # (c, k), unordered
        else:
            top = np.broadcast_to(np.arange(n), sims.shape).copy()
        top_sims = np.take_along_axis(sims, top, axis=1)
        order = np.lexsort((top, -top_sims), axis=1)               # by score, then position
        top = np.take_along_axis(top, order, axis=1)
        out_ids[start:start + chunk] = ids[top]
        out_scores[start:start + chunk] = np.take_along_axis(sims, top, axis=1)
    if single:
        return out_ids[0], out_scores[0]
    return out_ids, out_scores


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each row of ``truth`` (q, k) that appears in the same row of
    ``found`` (q, k'), as in ANN benchmarks (recall@k with k = truth.shape[1])."""
    found, truth = np.atleast_2d(found), np.atleast_2d(truth)
    assert len(found) == len(truth), f"{len(found)} result rows for {len(truth)} queries"
    hits = sum(len(np.intersect1d(f, t)) for f, t in zip(found, truth))
    return hits / truth.size if truth.size else 1.0
