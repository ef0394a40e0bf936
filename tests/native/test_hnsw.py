"""HNSW: recall@10 against exact search (clustered random, uniform random and real MiniLM
vectors), incremental insert, delete with graph repair, snapshot/restore, rejection of
corrupted snapshots, and change tracking for incremental persistence."""

from __future__ import annotations

import heapq
from pathlib import Path

import numpy as np
import pytest

from tabmesh.errors import TabmeshError
from tabmesh.rag.exact import exact_search, recall_at_k
from tabmesh.rag.hnsw import HNSW, CorruptIndexError, HNSWError

DIM = 384
MINILM = Path(__file__).resolve().parents[1] / "fixtures" / "hnsw_minilm_f16.npy"


def clustered(rng: np.random.Generator, n: int, n_clusters: int = 100, rank: int = 24,
              centers=None) -> tuple[np.ndarray, tuple]:
    """A mixture of anisotropic Gaussians: each cluster spreads along its own random
    ``rank``-dim subspace plus a little isotropic noise, like topics in embedding space."""
    if centers is None:
        centers = (rng.standard_normal((n_clusters, DIM)),
                   rng.standard_normal((n_clusters, DIM, rank)) / np.sqrt(rank))
    C, A = centers
    c = rng.integers(0, len(C), n)
    z = rng.standard_normal((n, A.shape[2])) * 1.2
    x = C[c] + 0.3 * rng.standard_normal((n, DIM))
    for j in np.unique(c):
        x[c == j] += z[c == j] @ A[j].T
    return x.astype(np.float32), centers


def recall(index: HNSW, Q: np.ndarray, k: int = 10, ef: int | None = None) -> float:
    ids, vecs = index.items()
    truth, _ = exact_search(vecs, ids, Q, k)
    found, _ = index.search_many(Q, k, ef=ef)
    return recall_at_k(found, truth)


def same_batch(a: dict, b: dict) -> None:
    assert a["meta"] == b["meta"]
    assert a.keys() == b.keys()
    for key in a:
        if key != "meta":
            assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def big():
    """10k clustered vectors, built in one batch of 8k then four incremental batches of
    500; 200 queries from the same distribution. ef_construction=64 (default 100) keeps the
    build within the suite's time budget on 2 cores; M and ef are the defaults."""
    rng = np.random.default_rng(7)
    X, centers = clustered(rng, 10_000)
    Q, _ = clustered(rng, 200, centers=centers)
    index = HNSW(DIM, M=16, ef_construction=64, ef=50, seed=1)
    ids = rng.choice(10**9, 10_000, replace=False)          # arbitrary external ids
    index.add(ids[:8000], X[:8000])
    recall_8k = recall(index, Q)
    for start in range(8000, 10_000, 500):
        index.add(ids[start:start + 500], X[start:start + 500])
    return {"index": index, "snap": index.snapshot(), "X": X, "Q": Q, "ids": ids,
            "recall_8k": recall_8k}


def test_exact_search_is_a_full_sort():
    rng = np.random.default_rng(0)
    X, Q = rng.standard_normal((300, 8)), rng.standard_normal((5, 8))
    ids = np.arange(1000, 1300)
    got, scores = exact_search(X, ids, Q, 7)
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    sims = (Q / np.linalg.norm(Q, axis=1, keepdims=True)) @ Xn.T
    assert np.array_equal(got, ids[np.argsort(-sims, axis=1)[:, :7]])
    assert np.allclose(scores, -np.sort(-sims, axis=1)[:, :7], atol=1e-6)
    assert recall_at_k(got, got) == 1.0 and recall_at_k(got[:, :5], got) == 5 / 7
    one, _ = exact_search(X, ids, Q[0], 400)
    assert one.shape == (300,) and one[0] == got[0, 0]


def test_recall_clustered_10k_with_incremental_batches(big):
    index = big["index"]
    assert len(index) == 10_000
    assert big["recall_8k"] >= 0.95
    assert recall(index, big["Q"]) >= 0.95                 # after 4 incremental batches
    found, scores = index.search(big["X"][123], 10)
    assert found[0] == big["ids"][123] and scores[0] == pytest.approx(1, abs=1e-5)
    assert np.all(np.diff(scores) <= 0)


def test_graph_shape(big):
    index, snap = big["index"], big["snap"]
    meta, levels = snap["meta"], snap["levels"]
    M = index.M
    assert snap["count0"].max() <= 2 * M and snap["upper_count"].max(initial=0) <= M
    assert meta["max_level"] == levels.max()
    assert levels[snap["slots"] == meta["entry"]] == levels.max()
    # levels are geometric with p = 1/M: about n/M nodes above layer 0
    assert 0.5 * 10_000 / M < (levels >= 1).sum() < 1.5 * 10_000 / M
    assert snap["count0"].min() >= 1


def reference_graph(X: np.ndarray, levels: list[int], M: int, efc: int) -> list[list[list[int]]]:
    """hnswlib's addPoint transcribed (hnswalg.h: greedy descent, searchBaseLayer,
    getNeighborsByHeuristic2, mutuallyConnectNewElement): links[node][layer]."""
    def sim(a, b):
        return float(X[a] @ X[b])

    def heuristic(cands, m):                 # cands: [(sim to base, node)], best first
        if len(cands) < m:
            return [v for _, v in cands]
        kept = []
        for s, v in cands:
            if len(kept) == m:
                break
            if all(sim(r, v) <= s for r in kept):
                kept.append(v)
        return kept

    def search(q, ep, lev):
        s0, visited = sim(q, ep), {ep}
        frontier, top = [(-s0, ep)], [(s0, ep)]
        while frontier and not (-frontier[0][0] < top[0][0] and len(top) == efc):
            c = heapq.heappop(frontier)[1]
            for e in links[c][lev]:
                if e not in visited:
                    visited.add(e)
                    s = sim(q, e)
                    if len(top) < efc or s > top[0][0]:
                        heapq.heappush(frontier, (-s, e))
                        heapq.heappush(top, (s, e))
                        if len(top) > efc:
                            heapq.heappop(top)
        return sorted(top, reverse=True)

    links = [[[] for _ in range(level + 1)] for level in levels]
    entry, top_level = -1, -1
    for q, level in enumerate(levels):
        if entry < 0:
            entry, top_level = q, level
            continue
        ep = entry
        for lev in range(top_level, level, -1):
            changed = True
            while changed:
                changed = False
                for e in links[ep][lev]:
                    if sim(q, e) > sim(q, ep):
                        ep, changed = e, True
        for lev in range(min(level, top_level), -1, -1):
            found = search(q, ep, lev)
            links[q][lev] = heuristic(found, M)
            cap = 2 * M if lev == 0 else M
            for nb in links[q][lev]:
                if len(links[nb][lev]) < cap:
                    links[nb][lev].append(q)
                else:
                    cands = sorted(((sim(nb, v), v) for v in links[nb][lev] + [q]), reverse=True)
                    links[nb][lev] = heuristic(cands, cap)
            ep = found[0][1]
        if level > top_level:
            entry, top_level = q, level
    return links


def test_graph_matches_hnswlib_algorithm():
    """With one node expanded per step (hnswlib's search), the graph is hnswlib's, link for
    link, given the same levels: same search, heuristic and pruning."""
    rng = np.random.default_rng(12)
    index = HNSW(16, M=4, ef_construction=12, seed=5)
    index._beam = 1
    index.add(np.arange(300), rng.standard_normal((300, 16)))
    snap = index.snapshot()
    _, X = index.items()
    levels = snap["levels"].tolist()
    assert max(levels) >= 2
    ref = reference_graph(X, levels, 4, 12)
    starts = np.concatenate([[0], np.cumsum(levels)])
    for node, level in enumerate(levels):
        rows = range(starts[node], starts[node + 1])
        ours = [snap["links0"][node, :snap["count0"][node]]] + [
            snap["upper_links"][r, :snap["upper_count"][r]] for r in rows]
        assert [sorted(x.tolist()) for x in ours] == [sorted(x) for x in ref[node]], node


def test_recall_uniform_random():
    """Uniform random 384-d vectors are the hard case (every point is nearly equidistant);
    at this size ef=100 still reaches 0.95."""
    rng = np.random.default_rng(3)
    X, Q = rng.standard_normal((1000, DIM)), rng.standard_normal((100, DIM))
    index = HNSW(DIM, M=16, ef_construction=100)
    index.add(np.arange(len(X)), X)
    assert recall(index, Q, ef=100) >= 0.95


def test_recall_real_minilm_vectors():
    """Real all-MiniLM-L6-v2 embeddings of 2000 generated sentences (see
    scripts/make_hnsw_fixtures.py): index 1800, query with the 200 held-out sentences."""
    E = np.load(MINILM).astype(np.float32)
    assert E.shape == (2000, DIM)
    index = HNSW(DIM)
    index.add(np.arange(1800), E[:1800])
    assert recall(index, E[1800:]) >= 0.95


def test_delete_repairs_graph_and_reuses_slots(big):
    rng = np.random.default_rng(11)
    index = HNSW.restore(big["snap"])
    gone = rng.choice(big["ids"], 2000, replace=False)
    assert index.delete(gone) == 2000
    assert len(index) == 8000 and not any(int(i) in index for i in gone[:50])
    Q = big["Q"]
    assert recall(index, Q) >= 0.95
    # deleted items never come back, not even for their own vectors
    pos = {int(i): p for p, i in enumerate(big["ids"])}
    own = big["X"][[pos[int(i)] for i in gone[:100]]]
    found, _ = index.search_many(np.concatenate([Q, own]), 10)
    assert not np.isin(found, gone).any() and (found >= 0).all()
    # the graph holds no link to a freed slot: restore() checks exactly that
    snap = index.snapshot()
    HNSW.restore(snap)
    # re-adding reuses the freed slots instead of growing
    n_slots = snap["meta"]["n_slots"]
    index.add(gone[:500] + 10**9, own[:100].repeat(5, axis=0) + 0.01)
    assert index.snapshot()["meta"]["n_slots"] == n_slots
    with pytest.raises(HNSWError, match="not in the index"):
        index.delete([gone[0]])
    assert index.delete([gone[0]], missing_ok=True) == 0


def test_delete_everything_then_add():
    rng = np.random.default_rng(5)
    index = HNSW(16, M=4, ef_construction=20)
    X = rng.standard_normal((200, 16))
    index.add(np.arange(200), X)
    index.delete(np.arange(0, 200, 2))
    assert recall(index, X[:20]) >= 0.9
    index.delete(np.arange(1, 200, 2))
    assert len(index) == 0
    assert [a.size for a in index.search(X[0], 5)] == [0, 0]
    assert index.search_many(X[:3], 5)[0].shape == (3, 0)
    empty = HNSW.restore(index.snapshot())
    index.add([7], X[:1])
    assert index.search(X[0], 5)[0].tolist() == [7]
    assert len(empty) == 0


def test_snapshot_restore_is_identical(big):
    restored = HNSW.restore(big["snap"])
    same_batch(restored.snapshot(), big["snap"])
    Q = big["Q"][:50]
    a, b = big["index"].search_many(Q, 10), restored.search_many(Q, 10)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    # and it keeps growing the same way (levels are drawn from seed and insert count)
    one, two = HNSW.restore(big["snap"]), HNSW.restore(restored.snapshot())
    for index in (one, two):
        index.add(np.arange(-50, 0), Q)
    same_batch(one.snapshot(), two.snapshot())


# --- corrupted snapshots ------------------------------------------------------------------

@pytest.fixture(scope="module")
def small():
    rng = np.random.default_rng(2)
    index = HNSW(8, M=4, ef_construction=16, seed=3)
    index.add(np.arange(100, 400), rng.standard_normal((300, 8)))
    index.delete(np.arange(100, 130))
    return index


def _set(name, where, value):
    def mutate(s):
        s[name] = s[name].copy()
        s[name][where] = value
    return mutate


def _top(s):
    """Index (in the batch) of a node above layer 0 that is not the entry point."""
    return int(np.flatnonzero((s["levels"] >= 1) & (s["slots"] != s["meta"]["entry"]))[0])


def _drop_node(s):
    """Lose the record of one layer-0 node, as a store that missed a write would."""
    keep = np.arange(len(s["slots"])) != int(np.argmin(s["levels"]))
    for key in ("slots", "ids", "levels", "vectors", "count0", "links0"):
        s[key] = s[key][keep]


CORRUPTIONS = {
    "not a dict": (lambda s: s.clear(), "meta"),
    "format": (lambda s: s["meta"].update(format=2), "format 2"),
    "meta type": (lambda s: s["meta"].update(M="16"), "meta M"),
    "missing array": (lambda s: s.pop("links0"), "links0 must be"),
    "dtype": (lambda s: s.update(links0=s["links0"].astype(np.int64)), "links0 must be"),
    "shape": (lambda s: s.update(vectors=s["vectors"][:, :7].copy()), "vectors has shape"),
    "truncated": (lambda s: s.update(ids=s["ids"][:-1].copy()), "ids has shape"),
    "upper rows": (lambda s: s.update(upper_count=s["upper_count"][:-1].copy()),
                   "upper_count has shape"),
    "slot range": (_set("slots", 0, 10_000), "slots must lie"),
    "slot repeat": (lambda s: _set("slots", 1, s["slots"][0])(s), "slots repeat"),
    "level range": (_set("levels", 0, 99), "levels must lie"),
    "degree": (_set("count0", 0, 9), "count0 must lie"),
    "link range": (_set("links0", (0, 0), 5000), "outside"),
    "link negative": (_set("links0", (0, 0), -1), "outside"),
    "self link": (lambda s: _set("links0", (0, 0), s["slots"][0])(s), "to itself"),
    "link to free slot": (_set("links0", (0, 0), 0), "free slot"),  # slot 0 was deleted
    "duplicate link": (lambda s: _set("links0", (0, 1), s["links0"][0, 0])(s), "twice"),
    "nan vector": (_set("vectors", (3, 2), np.nan), r"vectors\[3\]"),
    "not unit": (_set("vectors", (3, 2), 5.0), "not a finite unit vector"),
    "count": (lambda s: s["meta"].update(count=5), "count=5"),
    "max level": (lambda s: s["meta"].update(max_level=s["meta"]["max_level"] - 1), "max_level"),
    "entry": (lambda s: s["meta"].update(entry=int(s["slots"][np.argmin(s["levels"])])), "entry"),
    "entry range": (lambda s: s["meta"].update(entry=10_000), "entry"),
    "duplicate id": (_set("ids", 1, 150), "same id"),
    "dropped node": (lambda s: _drop_node(s), "count"),
    "upper link below layer": (lambda s: _set("upper_links", (int(np.argmax(s["upper_count"])), 0),
                                              int(s["slots"][np.argmin(s["levels"])]))(s),
                               "below layer"),
    "lowered level": (lambda s: _set("levels", _top(s), 0)(s), "upper_count has shape"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupted_snapshot_is_rejected(small, case):
    mutate, words = CORRUPTIONS[case]
    snap = small.snapshot()
    snap["meta"] = dict(snap["meta"])
    mutate(snap)
    with pytest.raises(CorruptIndexError, match=words) as err:
        HNSW.restore(snap)
    assert "re-index" in str(err.value) and isinstance(err.value, TabmeshError)
    assert TabmeshError.from_dict(err.value.to_dict()).__class__ is CorruptIndexError


def test_import_failure_leaves_index_unchanged(small):
    index = HNSW.restore(small.snapshot())
    mark = index.version
    rng = np.random.default_rng(9)
    other = HNSW.restore(index.snapshot())
    other.add(np.arange(1000, 1020), rng.standard_normal((20, 8)))
    delta = other.export_nodes(other.dirty_since(mark))
    delta["links0"] = delta["links0"].copy()
    delta["links0"][-1, 0] = 29                              # still a freed slot
    before = index.snapshot()
    with pytest.raises(CorruptIndexError):
        index.import_nodes(delta)
    same_batch(index.snapshot(), before)
    with pytest.raises(CorruptIndexError, match="dim=8, M=4"):
        HNSW(8, M=5).import_nodes(before)


# --- change tracking and incremental persistence -------------------------------------------

def _records(batch: dict) -> tuple[dict, dict[int, tuple]]:
    """Split a node batch into per-slot records, the way a store keyed by slot keeps them."""
    starts = np.concatenate([[0], np.cumsum(np.maximum(batch["levels"], 0))])
    out = {}
    for i, slot in enumerate(batch["slots"].tolist()):
        rows = slice(starts[i], starts[i + 1])
        out[slot] = tuple(batch[k][i] for k in ("ids", "levels", "vectors", "count0", "links0")) + (
            batch["upper_count"][rows], batch["upper_links"][rows])
    return batch["meta"], out


def _from_records(meta: dict, records: dict[int, tuple]) -> dict:
    live = sorted(s for s, r in records.items() if r[1] >= 0)
    cols = list(zip(*(records[s] for s in live)))
    batch = {"meta": meta, "slots": np.array(live, np.int32)}
    for k, col in zip(("ids", "levels", "vectors", "count0", "links0"), cols[:5]):
        batch[k] = np.array(col)
    batch["upper_count"] = np.concatenate(cols[5])
    batch["upper_links"] = np.concatenate(cols[6])
    return batch


def _changed_slots(a: dict, b: dict) -> set[int]:
    """Slots whose record differs between two snapshots (appeared, vanished or changed)."""
    ra, rb = _records(a)[1], _records(b)[1]
    return {s for s in ra.keys() | rb.keys() if s not in ra or s not in rb or
            any(not np.array_equal(x, y) for x, y in zip(ra[s], rb[s]))}


def test_dirty_tracking_exports_exactly_the_changed_nodes():
    rng = np.random.default_rng(4)
    index = HNSW(8, M=4, ef_construction=16)
    index.add(np.arange(400), rng.standard_normal((400, 8)))
    mark, before = index.version, index.snapshot()
    assert index.dirty_since(mark).size == 0
    index.add(np.arange(400, 440), rng.standard_normal((40, 8)))
    index.delete(np.arange(0, 400, 7))
    dirty = index.dirty_since(mark)
    assert set(dirty.tolist()) == _changed_slots(before, index.snapshot())
    assert 0 < len(dirty) < 400
    # the delta applied to the committed state reproduces the live one
    committed = HNSW.restore(before)
    committed.import_nodes(index.export_nodes(dirty))
    same_batch(committed.snapshot(), index.snapshot())
    assert committed.dirty_since(committed.version).size == 0


def test_tab_closed_mid_ingest_restores_last_commit():
    """A store keyed by slot: each committed batch writes its dirty records and the meta in
    one transaction. Work after the last commit is lost; what is stored restores whole."""
    rng = np.random.default_rng(8)
    index = HNSW(8, M=4, ef_construction=16)
    meta, store = _records(index.snapshot())
    mark = index.version
    committed = None
    for batch in range(4):
        index.add(np.arange(batch * 100, batch * 100 + 100), rng.standard_normal((100, 8)))
        if batch:
            index.delete(rng.choice(np.arange(batch * 100), 20, replace=False), missing_ok=True)
        if batch == 3:
            break                                            # the tab closes before commit
        meta, records = _records(index.export_nodes(index.dirty_since(mark)))
        store.update(records)
        mark, committed = index.version, index.snapshot()
    reloaded = HNSW.restore(_from_records(meta, store))
    same_batch(reloaded.snapshot(), committed)
    q = rng.standard_normal((5, 8))
    expected = HNSW.restore(committed).search_many(q, 5)[0]
    assert np.array_equal(reloaded.search_many(q, 5)[0], expected)


# --- bad input ----------------------------------------------------------------------------

def test_bad_input_is_refused_before_any_change():
    index = HNSW(4, M=4)
    index.add([1, 2], [[1, 0, 0, 0], [0, 1, 0, 0]])
    cases = [
        (lambda: index.add([3], [[0, 0, 0, 0]]), "id 3.*all zeros"),
        (lambda: index.add([3, 4], [[1, 1, 1, 1], [np.nan, 0, 0, 1]]), "id 4.*NaN"),
        (lambda: index.add([3], [[1, 2, 3]]), r"shape \(n, 4\)"),
        (lambda: index.add([3, 3], np.eye(4)[:2]), "twice"),
        (lambda: index.add([2], [[1, 1, 0, 0]]), "already in the index"),
        (lambda: index.add([3, 4], [[1, 1, 0, 0]]), "2 ids for 1 vectors"),
        (lambda: index.add([1.5], [[1, 1, 0, 0]]), "integers"),
        (lambda: index.search([0, 0, 0, 0], 1), "query 0 is all zeros"),
        (lambda: index.search([1, 0, 0, 0], 0), "k must be"),
        (lambda: index.search([1, 0, 0, 0], 1, ef=0), "ef must be"),
        (lambda: index.delete([9]), "not in the index"),
        (lambda: setattr(index, "ef_construction", 0), "ef_construction"),
        (lambda: HNSW(4, M=1), "M must be"),
    ]
    for call, words in cases:
        with pytest.raises(HNSWError, match=words):
            call()
    assert len(index) == 2 and index.version == 1
    ids, scores = index.search([3, 1, 0, 0], 5)
    assert ids.tolist() == [1, 2] and scores[0] == pytest.approx(3 / 10**0.5, abs=1e-6)
