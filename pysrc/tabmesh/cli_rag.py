"""`tabmesh embed` and `tabmesh rag eval` (host side): the tab's embedder and RAG index,
driven in headless Chromium through the page API (web/bootstrap.js):

    await tabmesh.embed(texts, {backend})          -> {model, backend, tokens, vectors}
    await tabmesh.rag.open({collection})           -> {collection, documents, passages, restoreS}
    await tabmesh.rag.ingestMany({docs, collection})   docs: [{text, source}]
                                                   -> {documents, chunks, embedded, seconds}
    await tabmesh.rag.search({query, k, collection})
                                                   -> {hits: [{score, text, source, ...}], ms}

`rag eval` ingests the passages (source = passage id, text = title + newline + text) into
a fresh collection in the tab's real IndexedDB, reloads the page (same browser context,
so IndexedDB persists), reopens the collection from storage and runs every query against
the restored index. Timings are taken in the page (performance.now) around the API calls,
with the embedding model loaded beforehand, so they exclude model download and set-up.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

INGEST_BATCH = 32  # passages per ingestMany call (progress is printed between calls)
MAX_K = 100        # the page's largest search k (rag_page.MAX_K)

INGEST_JS = """async ([docs, collection]) => { const t0 = performance.now();
  const r = await tabmesh.rag.ingestMany({docs, collection});
  return {...r, wallS: (performance.now() - t0) / 1000}; }"""

OPEN_JS = """async (collection) => { const t0 = performance.now();
  const r = await tabmesh.rag.open({collection});
  return {...r, wallS: (performance.now() - t0) / 1000}; }"""

# Each query: search k; a passage cut into several chunks comes back as several hits of
# one source, so search again with a doubled k until k distinct sources (or all of them).
SEARCH_JS = """async ([queries, k, collection, total, maxK]) => { const out = [];
  for (const query of queries) {
    const t0 = performance.now(); let fetchK = Math.min(k, total, maxK), sources, pageMs = 0;
    for (;;) {
      const r = await tabmesh.rag.search({query, k: fetchK, collection}); pageMs += r.ms || 0;
      sources = [...new Set(r.hits.map((h) => h.source))];
      if (sources.length >= k || r.hits.length < fetchK || fetchK >= Math.min(total, maxK)) break;
      fetchK = Math.min(2 * fetchK, total, maxK);
    }
    out.push({ms: performance.now() - t0, pageMs, k: fetchK, sources: sources.slice(0, k)});
  }
  return out; }"""


def _progress(msg: str) -> None:
    print(f"[rag] {msg}", file=sys.stderr, flush=True)


def _page_error(exc: Exception, what: str) -> SystemExit:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return SystemExit(f"tabmesh: {what} failed in the tab: {first}")


def _check_backend(tab, backend: str | None) -> None:
    if backend == "webgpu" and tab.info.get("gpu") is None:
        raise SystemExit("tabmesh: this Chromium offers no WebGPU adapter; use --backend numpy")


def _load_embedder(tab, backend: str | None) -> dict:
    """Load the tab's embedder (on ``backend``; None = the page's default) with one short
    text, so later timings exclude the model download."""
    from playwright.sync_api import Error as PlaywrightError
    opts = {"backend": backend} if backend else {}
    try:
        return tab.page.evaluate("([t, o]) => tabmesh.embed(t, o)", [["warm-up"], opts])
    except PlaywrightError as exc:
        raise _page_error(exc, "loading the embedding model") from None


def cmd_embed(args, root: Path) -> int:
    from playwright.sync_api import Error as PlaywrightError
    from .headless import HeadlessTab
    with HeadlessTab(root, progress=lambda m: print(f"[embed] {m}", file=sys.stderr, flush=True)) as tab:
        _check_backend(tab, args.backend)
        opts = {"backend": args.backend} if args.backend else {}
        try:
            r = tab.page.evaluate("([t, o]) => tabmesh.embed(t, o)", [list(args.text), opts])
        except PlaywrightError as exc:
            raise _page_error(exc, "tabmesh.embed") from None
    out = {"model": r["model"], "backend": r["backend"], "dim": len(r["vectors"][0]),
           "vectors": r["vectors"]}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{out['model']} on {out['backend']}: {len(out['vectors'])} x {out['dim']}", file=sys.stderr)
        for text, vec in zip(args.text, out["vectors"]):
            print(f"{text[:40]!r}: [{', '.join(f'{x:.4f}' for x in vec[:6])}, …]")
    return 0


def cmd_rag_eval(args, root: Path) -> int:
    from playwright.sync_api import Error as PlaywrightError
    from .headless import HeadlessTab
    from .rag.evaluate import (EvalInputError, document_text, percentile, read_passages,
                               read_queries, retrieval_metrics)
    if not 10 <= args.k <= MAX_K:
        raise SystemExit(f"tabmesh: --k must be in 10..{MAX_K} (recall@10 and MRR@10 need 10 results)")
    try:
        passages = read_passages(args.passages)
        queries = read_queries(args.queries, [p.id for p in passages])
    except EvalInputError as exc:
        raise SystemExit(f"tabmesh: {exc}") from None
    docs = [{"text": document_text(p), "source": p.id} for p in passages]
    collection = "eval-" + os.urandom(4).hex()
    with HeadlessTab(root, progress=_progress) as tab:
        page = tab.page
        page.set_default_timeout(3_600_000)
        _check_backend(tab, args.backend)
        if not page.evaluate("!!(window.tabmesh && tabmesh.rag && tabmesh.rag.ingestMany)"):
            raise SystemExit("tabmesh: this page has no tabmesh.rag API (rag_page.py); update the checkout")
        loaded = _load_embedder(tab, args.backend)
        _progress(f"embedder {loaded['model']} on {loaded['backend']}; ingesting {len(docs)} passages "
                  f"into {collection!r}…")
        try:
            page.evaluate(OPEN_JS, collection)
            ingest_s, chunks = 0.0, 0
            for at in range(0, len(docs), INGEST_BATCH):
                r = page.evaluate(INGEST_JS, [docs[at:at + INGEST_BATCH], collection])
                ingest_s += r["wallS"]
                chunks += int(r.get("chunks") or 0)
                _progress(f"  {min(at + INGEST_BATCH, len(docs))}/{len(docs)} passages "
                          f"({ingest_s:.1f} s)")
        except PlaywrightError as exc:
            raise _page_error(exc, "ingestion") from None
        _progress("reloading the page (same browser context: IndexedDB persists)…")
        page.reload()
        page.evaluate("tabmesh.ready")
        _load_embedder(tab, args.backend)
        try:
            opened = page.evaluate(OPEN_JS, collection)
        except PlaywrightError as exc:
            raise _page_error(exc, "reopening the collection") from None
        if int(opened.get("documents") or 0) != len(docs):
            raise SystemExit(f"tabmesh: the reopened collection holds {opened.get('documents')} documents, "
                             f"expected {len(docs)}: the index did not persist")
        restore_s = opened.get("restoreS")
        restore_s = float(restore_s) if restore_s is not None else float(opened["wallS"])
        total = max(int(opened.get("passages") or 0), chunks, len(docs))
        _progress(f"restored {opened.get('passages')} passages in {restore_s:.3f} s; "
                  f"{len(queries)} queries…")
        try:
            found = page.evaluate(SEARCH_JS, [[q.text for q in queries], args.k, collection, total, MAX_K])
        except PlaywrightError as exc:
            raise _page_error(exc, "search") from None
    metrics = retrieval_metrics([f["sources"] for f in found], [q.relevant_ids for q in queries])
    ms = [f["ms"] for f in found]
    result = {**metrics,
              "ingest_passages_per_s": len(docs) / ingest_s if ingest_s > 0 else None,
              "query_ms_p50": percentile(ms, 0.5), "query_ms_p99": percentile(ms, 0.99),
              "index_restore_s": restore_s,
              "passages": len(docs), "chunks": chunks, "queries": len(queries), "k": args.k,
              "model": loaded["model"], "backend": loaded["backend"]}
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:24} {value:.4g}" if isinstance(value, float) else f"{key:24} {value}")
    return 0
