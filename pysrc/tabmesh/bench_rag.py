"""`tabmesh bench --sections rag` (host side): the tab's RAG against references measured in
the same run.

  ingest   passages/s through tabmesh.rag.ingestMany (chunk, embed, HNSW insert, one
           IndexedDB commit per document) and through tabmesh.embed alone, in headless
           Chromium, against sentence-transformers on the CPU (same texts, same model
           files, torch with --threads threads) run by $TABMESH_ST_PYTHON (skipped when
           unset or when it cannot import sentence_transformers). The tab's Python is
           single-threaded WebAssembly.
  hnsw     our numpy HNSW (rag/hnsw.py) against hnswlib with the same M / ef_construction
           / ef on random unit vectors (dim 384): build time (both one thread) and recall@10
           (truth: exact search), then query latency p50 against exact search (rag/exact.py)
           and hnswlib at --rag-vectors (10k) and --rag-large (100k) items. The large graph
           is built by hnswlib and loaded into our HNSW (``hnsw_from_hnswlib``: the same
           links, levels and entry point), so the 100k rows time our *search* on the same
           graph hnswlib searches (hnswlib builds it with --threads threads); our own
           build at that size runs only with --rag-build-large (350 s on an idle server
           core against hnswlib's 67 s; ~15 minutes on the shared 2-vCPU dev VM).
  restore  tabmesh.rag.open of a stored collection of --rag-large passages after a page
           reload (IndexedDB -> HNSW, nothing re-embedded) against reading the same records
           with IndexedDB getAll from JS (the storage floor) and against the same restore in
           native CPython from memory. Ingesting 100k passages in the tab would take hours,
           so the collection is written straight into the tab's IndexedDB in the exact
           layout Collection commits (store.py "Storage layout"; ``synthetic_collection_ops``
           below, checked by tests/native/test_bench_rag.py): one one-chunk document per
           vector, the large graph above, texts "synthetic passage <n>".
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DIM = 384
M, EF_CONSTRUCTION, EF = 16, 100, 50   # our defaults (Collection, HNSW), given to hnswlib too


def _progress(msg: str) -> None:
    print(f"[bench] rag: {msg}", file=sys.stderr, flush=True)


def _p50(xs) -> float:
    return float(np.median(np.asarray(xs, np.float64)))


def _row(figure: str, ours: float, ref: float | None = None, ref_name: str = "",
         lower_is_better: bool = False) -> dict:
    row = {"section": "rag", "figure": figure, "ours": ours}
    if ref is not None:
        row.update(reference=ref, reference_name=ref_name,
                   ratio=(ref / ours) if lower_is_better else (ours / ref))
    return row


def random_unit(n: int, dim: int, seed: int) -> np.ndarray:
    """(n, dim) float32 random unit vectors."""
    x = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# --- sentence-transformers reference and in-tab ingestion ------------------------------

ST_SCRIPT = r"""
import json, sys, time
import torch
from sentence_transformers import SentenceTransformer
path, threads = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(threads)
texts = json.loads(sys.stdin.read())
model = SentenceTransformer(path, device="cpu")
model.encode(texts[:8], batch_size=8)  # warm-up
t0 = time.perf_counter()
vecs = model.encode(texts, batch_size=32, normalize_embeddings=True)
dt = time.perf_counter() - t0
print(json.dumps({"passages_per_s": len(texts) / dt, "seconds": dt, "dim": int(vecs.shape[1])}))
"""


def st_python() -> str | None:
    """$TABMESH_ST_PYTHON when it can import sentence_transformers."""
    exe = os.environ.get("TABMESH_ST_PYTHON")
    if exe and subprocess.run([exe, "-c", "import sentence_transformers"],
                              capture_output=True).returncode == 0:
        return exe
    return None


def bench_passages(root: Path, n: int) -> list[str]:
    """``n`` distinct passages (~100 words each) from the rag eval fixture: its 60 passages,
    titled with a round number after the first round so every text is new to the index."""
    from .rag.evaluate import document_text, read_passages
    base = read_passages(root / "tests" / "fixtures" / "rag_eval" / "passages.jsonl")
    out = []
    for i in range(n):
        p = base[i % len(base)]
        text = document_text(p)
        out.append(text if i < len(base) else f"({i // len(base) + 1}) {text}")
    return out


INGEST_JS = """async ([docs, collection]) => {
  await tabmesh.rag.open({collection});
  const t0 = performance.now(); const r = await tabmesh.rag.ingestMany({docs, collection});
  return {...r, wallS: (performance.now() - t0) / 1000}; }"""

EMBED_JS = """async (texts) => { const t0 = performance.now(); const r = await tabmesh.embed(texts);
  return {backend: r.backend, n: r.vectors.length, wallS: (performance.now() - t0) / 1000}; }"""


def bench_ingest(root: Path, n_passages: int, threads: int) -> list[dict]:
    from .headless import HeadlessTab
    texts = bench_passages(root, n_passages)
    ref, exe = None, st_python()
    if exe is None:
        _progress("TABMESH_ST_PYTHON unset or without sentence-transformers: no reference column")
    else:
        _progress(f"sentence-transformers on the CPU, {threads} threads, {len(texts)} passages…")
        out = subprocess.run([exe, "-c", ST_SCRIPT, str(root / "models" / "all-MiniLM-L6-v2"), str(threads)],
                             input=json.dumps(texts), capture_output=True, text=True, timeout=900,
                             env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
        if out.returncode != 0:
            raise RuntimeError(f"sentence-transformers benchmark failed:\n{out.stderr[-2000:]}")
        ref = json.loads(out.stdout.strip().splitlines()[-1])["passages_per_s"]
    with HeadlessTab(root, progress=_progress) as tab:
        page = tab.page
        page.set_default_timeout(3_600_000)
        loaded = page.evaluate("tabmesh.embed(['warm-up'])")
        _progress(f"tab: tabmesh.embed of {len(texts)} passages ({loaded['backend']})…")
        emb = page.evaluate(EMBED_JS, texts)
        _progress(f"tab: tabmesh.rag.ingestMany of {len(texts)} passages…")
        ing = page.evaluate(INGEST_JS, [[{"text": t, "source": f"p{i}"} for i, t in enumerate(texts)],
                                        "bench-ingest-" + os.urandom(3).hex()])
    name = f"sentence-transformers CPU, {threads} threads"
    return [_row(f"ingestMany passages/s ({len(texts)}, {loaded['backend']}, IndexedDB)",
                 len(texts) / ing["wallS"], ref, name),
            _row(f"tabmesh.embed passages/s ({len(texts)}, {emb['backend']})",
                 len(texts) / emb["wallS"], ref, name)]


# --- HNSW against hnswlib and exact search -------------------------------------------------

def hnsw_from_hnswlib(index, seed: int = 0):
    """Our HNSW holding exactly the graph of an hnswlib ``Index`` (space "ip" over unit
    vectors): the same slots (hnswlib internal ids), labels as ids, levels, links and
    entry point, through HNSW.restore (which checks the graph). Reads hnswlib's pickled
    state (hnswalg.h layout): level 0 is one record per element of [4-byte link count,
    maxM0 uint32 links, dim float32, uint64 label]; upper layers, for elements of level
    > 0 in id order, level blocks of [4-byte count, maxM uint32 links]."""
    from .rag.hnsw import FORMAT_VERSION, HNSW
    st = index.__getstate__()[0]
    n, dim, m, m0 = st["cur_element_count"], st["dim"], st["max_M"], st["max_M0"]
    if st["space"] != "ip" or m0 != 2 * m or st["has_deletions"]:
        raise ValueError("only an ip-space hnswlib index with maxM0 = 2M and no deletions maps to ours")
    rec = np.asarray(st["data_level0"], np.uint8)[:n * st["size_data_per_element"]]
    rec = rec.reshape(n, st["size_data_per_element"])
    count0 = rec[:, 0:2].copy().view("<u2")[:, 0].astype(np.int32)
    links0 = rec[:, 4:4 + 4 * m0].copy().view("<u4").astype(np.int32)
    od = st["offset_data"]
    vectors = rec[:, od:od + 4 * dim].copy().view("<f4")
    lo = st["label_offset"]
    ids = rec[:, lo:lo + 8].copy().view("<u8")[:, 0].astype(np.int64)
    levels = np.asarray(st["element_levels"], np.int64)[:n]
    block = np.asarray(st["link_lists"], np.uint8).reshape(-1, 4 + 4 * m)  # one row per (node, layer)
    if len(block) != int(levels.sum()) or block.shape[1] != st["size_links_per_element"]:
        raise ValueError("hnswlib upper link lists do not match the element levels")
    upper_count = block[:, 0:2].copy().view("<u2")[:, 0].astype(np.int32)
    upper_links = block[:, 4:].copy().view("<u4").astype(np.int32)
    links0[np.arange(2 * m) >= count0[:, None]] = -1
    upper_links[np.arange(m) >= upper_count[:, None]] = -1
    meta = {"format": FORMAT_VERSION, "dim": dim, "M": st["M"], "ef_construction": st["ef_construction"],
            "ef": st["ef"], "seed": seed, "n_slots": n, "count": n, "entry": st["enterpoint_node"],
            "max_level": st["max_level"], "n_inserted": n, "version": 0}
    return HNSW.restore({"meta": meta, "slots": np.arange(n, dtype=np.int32), "ids": ids,
                         "levels": levels.astype(np.int8), "vectors": np.ascontiguousarray(vectors),
                         "count0": count0, "links0": links0, "upper_count": upper_count,
                         "upper_links": upper_links})


def _hnswlib_index(X: np.ndarray, ids: np.ndarray, threads: int, seed: int = 0):
    import hnswlib
    index = hnswlib.Index(space="ip", dim=X.shape[1])
    index.init_index(max_elements=len(X), M=M, ef_construction=EF_CONSTRUCTION, random_seed=seed)
    index.add_items(X, ids, num_threads=threads)
    index.set_ef(EF)
    return index


def _latencies(fn, queries: np.ndarray) -> list[float]:
    out = []
    for q in queries:
        t0 = time.perf_counter()
        fn(q)
        out.append(1000 * (time.perf_counter() - t0))
    return out


def _search_rows(n: int, ours, hnswlib_index, X, ids, Q, truth, label: str) -> list[dict]:
    from .rag.exact import exact_search, recall_at_k
    rows = []
    found = ours.search_many(Q, 10, ef=EF)[0]
    r_ours = recall_at_k(found, truth)
    t_ours = _latencies(lambda q: ours.search(q, 10, ef=EF), Q)
    t_exact = _latencies(lambda q: exact_search(X, ids, q, 10), Q[:30])
    # exact_search re-normalizes every vector per call; its floor is one matvec + top-k
    t_floor = _latencies(lambda q: np.argpartition(-(X @ q), 9)[:10], Q[:30])
    for t_ref, ref_name in ((t_exact, "exact search (rag/exact.py)"),
                            (t_floor, "exact: matvec + argpartition only")):
        rows.append(_row(f"HNSW query p50 ms, {n // 1000}k x {DIM}, ef={EF}{label}", _p50(t_ours),
                         _p50(t_ref), ref_name, lower_is_better=True))
    if hnswlib_index is not None:
        hnswlib_index.set_num_threads(1)
        t_lib = _latencies(lambda q: hnswlib_index.knn_query(q, k=10), Q)
        r_lib = recall_at_k(hnswlib_index.knn_query(Q, k=10)[0].astype(np.int64), truth)
        rows.append(_row(f"HNSW query p50 ms, {n // 1000}k x {DIM}, ef={EF}{label}", _p50(t_ours),
                         _p50(t_lib), "hnswlib, same graph" if label else "hnswlib", lower_is_better=True))
        rows.append(_row(f"HNSW recall@10, {n // 1000}k x {DIM}, ef={EF}{label}", r_ours, r_lib,
                         "hnswlib, same graph" if label else "hnswlib, same M/efC/ef"))
    else:
        rows.append(_row(f"HNSW recall@10, {n // 1000}k x {DIM}, ef={EF}{label}", r_ours))
    return rows


def bench_hnsw(n_small: int, n_large: int, build_large: bool, threads: int = 1) -> tuple[list[dict], object]:
    """Rows, and the large graph (ours, loaded from hnswlib or built) for the restore bench.
    hnswlib builds the large graph with ``threads`` threads, or one beside our own build."""
    from .rag.exact import exact_search
    from .rag.hnsw import HNSW
    try:
        import hnswlib  # noqa: F401
        have_lib = True
    except ImportError:
        have_lib = False
        _progress("hnswlib is not installed (`make bench-deps`): no hnswlib column, no large graph")
    rows = []
    Q = random_unit(200, DIM, seed=1)
    X = random_unit(n_small, DIM, seed=0)
    ids = np.arange(1, n_small + 1, dtype=np.int64)
    truth = exact_search(X, ids, Q, 10)[0]
    _progress(f"our HNSW build, {n_small} x {DIM} (M={M}, ef_construction={EF_CONSTRUCTION})…")
    t0 = time.perf_counter()
    ours = HNSW(DIM, M, EF_CONSTRUCTION, EF, seed=0, capacity=n_small)
    ours.add(ids, X)
    t_ours = time.perf_counter() - t0
    lib = None
    if have_lib:
        t0 = time.perf_counter()
        lib = _hnswlib_index(X, ids, threads=1)
        t_lib = time.perf_counter() - t0
        rows.append(_row(f"HNSW build s, {n_small // 1000}k x {DIM}, M={M} efC={EF_CONSTRUCTION}", t_ours,
                         t_lib, "hnswlib, 1 thread", lower_is_better=True))
    else:
        rows.append(_row(f"HNSW build s, {n_small // 1000}k x {DIM}, M={M} efC={EF_CONSTRUCTION}", t_ours))
    rows += _search_rows(n_small, ours, lib, X, ids, Q, truth, "")
    del ours, lib
    if not n_large:
        return rows, None
    X = random_unit(n_large, DIM, seed=2)
    ids = np.arange(1, n_large + 1, dtype=np.int64)
    truth = exact_search(X, ids, Q, 10)[0]
    large, lib = None, None
    if build_large:
        _progress(f"our HNSW build, {n_large} x {DIM} (--rag-build-large)…")
        t0 = time.perf_counter()
        large = HNSW(DIM, M, EF_CONSTRUCTION, EF, seed=0, capacity=n_large)
        large.add(ids, X)
        t_ours = time.perf_counter() - t0
    if have_lib:
        lib_threads = 1 if build_large else threads
        _progress(f"hnswlib build, {n_large} x {DIM}, {lib_threads} thread(s)…")
        t0 = time.perf_counter()
        lib = _hnswlib_index(X, ids, threads=lib_threads)
        t_lib = time.perf_counter() - t0
        if build_large:
            rows.append(_row(f"HNSW build s, {n_large // 1000}k x {DIM}, M={M} efC={EF_CONSTRUCTION}",
                             t_ours, t_lib, "hnswlib, 1 thread", lower_is_better=True))
        else:
            # ours only with --rag-build-large: the figure is hnswlib's, for scale
            rows.append({"section": "rag", "figure": f"hnswlib-only build s, {n_large // 1000}k x {DIM}, {lib_threads} thr",
                         "ours": t_lib})
    if large is not None:
        rows += _search_rows(n_large, large, lib, X, ids, Q, truth, "")
    if lib is not None:
        graph = hnsw_from_hnswlib(lib)
        rows += _search_rows(n_large, graph, lib, X, ids, Q, truth, ", hnswlib graph")
        large = large or graph
    return rows, large


# --- restoring a large collection from IndexedDB ----------------------------------------------

def synthetic_collection_ops(name: str, index, replica: str = "bench") -> list[tuple]:
    """Storage ops (storage.py) of a collection ``name`` holding ``index``'s items as
    passages: per item id ``pid`` (1..n, as Collection numbers passages) one document
    ``replica/pid`` of one chunk ``replica:pid`` with text "synthetic passage <pid>", and
    ``index`` as its HNSW. The layout is store.py's "Storage layout", so
    ``Collection.restore`` accepts it; the vectors are not embeddings of the texts."""
    from .rag.chunking import content_hash
    from .rag.storage import hnsw_node_ops
    from .rag.store import FORMAT
    from .rag.sync import Seen, op_id
    ids, _ = index.items()
    n = len(ids)
    if n and (ids.min() != 1 or ids.max() != n):
        raise ValueError("synthetic_collection_ops needs item ids 1..n")
    p, ops, seen = name + "/", [], Seen()
    for pid in range(1, n + 1):
        text = f"synthetic passage {pid}"
        sha, key, doc = content_hash(text), op_id(replica, pid), f"{replica}/{pid}"
        seen.add(key)
        ops.append(("put", "records", f"{p}doc/{doc}", {"id": doc, "source": f"p{pid}", "sha256": sha,
                                                        "n_chunks": 1, "length": len(text), "order": pid}))
        ops.append(("put", "records", f"{p}chunk/{key}", {"key": key, "doc": doc, "i": 0, "s": 0,
                                                          "e": len(text), "text": text, "sha": sha, "pid": pid}))
    ops += hnsw_node_ops(index, np.arange(index._n_slots), p)
    ops.append(("put", "meta", name, {"format": FORMAT, "name": name, "dim": index.dim, "replica": replica,
                                      "shared": False, "next_seq": n + 1, "next_doc": n + 1,
                                      "next_pid": n + 1, "next_order": n + 1, "seen": seen.to_json(),
                                      "hnsw": index.meta()}))
    return ops


def pieces(ops: list[tuple], per_piece: int) -> list[tuple[bytes, bytes]]:
    """The ops as (JSON, float32 bytes) pieces for the tab: JSON {records: [[key, value]],
    vectorKeys: [...], meta: value | null}; the vectors of vectorKeys in order. The meta
    goes in the last piece, so a partly written collection is never visible."""
    records = [(k, v) for op, s, k, v in ops if s == "records"]
    vectors = [(k, v) for op, s, k, v in ops if s == "vectors"]
    meta = next(v for op, s, k, v in ops if s == "meta")
    n = max(1, -(-max(len(records), len(vectors)) // per_piece))
    r_step, v_step = -(-len(records) // n), -(-len(vectors) // n)
    out = []
    for i in range(n):
        rs, vs = records[i * r_step:(i + 1) * r_step], vectors[i * v_step:(i + 1) * v_step]
        head = {"records": rs, "vectorKeys": [k for k, _ in vs], "meta": meta if i == n - 1 else None}
        out.append((json.dumps(head).encode(), b"".join(v for _, v in vs)))
    return out


# Written as idb.py writes (database "tabmesh-rag" v1; records/meta plain objects, vectors
# one Float32Array each): one readwrite transaction per piece.
FILL_JS = """async ([name, nPieces, dim]) => {
  const db = await new Promise((res, rej) => { const r = indexedDB.open('tabmesh-rag', 1);
    r.onupgradeneeded = () => { for (const s of ['records', 'vectors', 'meta'])
      if (!r.result.objectStoreNames.contains(s)) r.result.createObjectStore(s); };
    r.onsuccess = () => res(r.result); r.onerror = () => rej(r.error); });
  let writeS = 0;
  for (let i = 0; i < nPieces; i++) {
    const head = await (await fetch(`/__bench/rag/${i}.json`)).json();
    const vecs = new Float32Array(await (await fetch(`/__bench/rag/${i}.bin`)).arrayBuffer());
    const t0 = performance.now();
    await new Promise((res, rej) => {
      const tx = db.transaction(['records', 'vectors', 'meta'], 'readwrite');
      const rs = tx.objectStore('records'), vs = tx.objectStore('vectors');
      for (const [k, v] of head.records) rs.put(v, k);
      head.vectorKeys.forEach((k, j) => vs.put(vecs.slice(j * dim, (j + 1) * dim), k));
      if (head.meta) tx.objectStore('meta').put(head.meta, name);
      tx.oncomplete = res; tx.onerror = () => rej(tx.error); tx.onabort = () => rej(tx.error); });
    writeS += (performance.now() - t0) / 1000;
  }
  db.close(); return writeS; }"""

# The storage floor: every record and vector of the collection, read as idb.py reads them.
READ_JS = """async (name) => {
  const db = await new Promise((res, rej) => { const r = indexedDB.open('tabmesh-rag', 1);
    r.onsuccess = () => res(r.result); r.onerror = () => rej(r.error); });
  const t0 = performance.now(); let n = 0;
  for (const s of ['records', 'vectors']) {
    const range = IDBKeyRange.bound(name + '/', name + '/\\uffff');
    const tx = db.transaction(s, 'readonly'), store = tx.objectStore(s);
    const [keys, vals] = await Promise.all([store.getAllKeys(range), store.getAll(range)].map((q) =>
      new Promise((res, rej) => { q.onsuccess = () => res(q.result); q.onerror = () => rej(q.error); })));
    n += keys.length + vals.length;
  }
  db.close(); return {n, seconds: (performance.now() - t0) / 1000}; }"""

OPEN_JS = """async (collection) => { const t0 = performance.now(); const r = await tabmesh.rag.open({collection});
  return {...r, wallS: (performance.now() - t0) / 1000}; }"""


def bench_restore(root: Path, index) -> list[dict]:
    import asyncio
    from .headless import HeadlessTab
    from .rag.storage import MemoryStorage
    from .rag.store import Collection
    n = len(index)
    name = f"bench-restore-{n}"
    _progress(f"writing a {n}-passage collection's records…")
    ops = synthetic_collection_ops(name, index)
    storage = MemoryStorage()
    asyncio.run(storage.commit(ops))
    t0 = time.perf_counter()
    col = asyncio.run(Collection.restore(storage, name))
    native_s = time.perf_counter() - t0
    assert col.n_passages == n, f"native restore gave {col.n_passages} passages, expected {n}"
    del col, storage
    parts = pieces(ops, 20_000)
    del ops
    with HeadlessTab(root, progress=_progress) as tab:
        page = tab.page
        page.set_default_timeout(3_600_000)

        def serve(route):
            stem = route.request.url.rsplit("/", 1)[1]
            i, ext = int(stem.split(".")[0]), stem.split(".")[1]
            route.fulfill(status=200, body=parts[i][0 if ext == "json" else 1],
                          content_type="application/json" if ext == "json" else "application/octet-stream")
        page.route("**/__bench/rag/*", serve)
        _progress(f"filling the tab's IndexedDB ({len(parts)} transactions)…")
        write_s = page.evaluate(FILL_JS, [name, len(parts), index.dim])
        _progress(f"written in {write_s:.1f} s; reloading and restoring with tabmesh.rag.open…")
        page.reload()
        page.evaluate("tabmesh.ready")
        opened = page.evaluate(OPEN_JS, name)
        if opened.get("passages") != n:
            raise RuntimeError(f"tabmesh.rag.open restored {opened.get('passages')} passages, expected {n}")
        floor = page.evaluate(READ_JS, name)
    ours = float(opened.get("restoreS") or opened["wallS"])
    return [_row(f"restore {n // 1000}k passages from IndexedDB (s, rag.open)", ours, floor["seconds"],
                 "IndexedDB getAll of the same records (JS)", lower_is_better=True),
            _row(f"restore {n // 1000}k passages from IndexedDB (s, rag.open)", ours, native_s,
                 "same restore, native CPython, from memory", lower_is_better=True)]


def bench_rag(root: Path, threads: int, n_passages: int, n_small: int, n_large: int,
              build_large: bool, failed: list[str] | None = None) -> list[dict]:
    """The three parts; one that fails is named in ``failed`` ("rag/ingest", ...) and
    does not lose the others' rows."""
    rows, large = [], None

    def part(name: str, fn):
        try:
            return fn()
        except Exception as exc:
            if failed is not None:
                failed.append(f"rag/{name}")
            _progress(f"{name} failed: {(str(exc).splitlines() or [repr(exc)])[0][:300]}")
            return None
    rows += part("ingest", lambda: bench_ingest(root, n_passages, threads)) or []
    got = part("hnsw", lambda: bench_hnsw(n_small, n_large, build_large, threads))
    if got is not None:
        rows += got[0]
        large = got[1]
    if large is not None:
        rows += part("restore", lambda: bench_restore(root, large)) or []
    return rows
