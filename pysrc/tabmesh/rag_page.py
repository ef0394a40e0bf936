"""Private RAG in the tab: the service behind window.tabmesh.rag and its replication over
the mesh (the documents panel over it is rag_panel.py).

RagService. One IndexedDB database per browser profile (``IndexedDBStorage``, opened once
a page; persistent storage is asked for then). A collection is opened on demand: restored
from its stored HNSW graph and chunks (nothing is re-embedded), or created on its first
ingestion. A tab holds a Web Lock per open collection ("tabmesh-rag:<name>") so two tabs
of one browser never write the same collection (the second is told it is open elsewhere).
Documents are cut with ``chunk_by_tokens`` (200 MiniLM word-pieces, 32 of overlap) and
embedded by the tab's EmbedService; ``ask`` retrieves passages, renders them through the
loaded LLM's own chat template (``build_messages``) and streams a greedy answer whose
``[n]`` markers name passage n.

Sharing (opt-in per collection, stored in the collection's meta). Wire: Kind.RAG frames
whose payload is a rag/sync.py message. A tab sends a SyncRequest (its Seen) for each
shared collection to every peer whose channel opens, and to every open peer when the
user shares the collection. A peer that shares the same collection answers with
``deltas_since`` in pages (``more``: ask again with the new Seen) and, the first time it
hears from that peer about the collection, asks back, so both sides catch up. From then
on each side sends its own committed batches (``Collection.on_commit``) to the peers it
knows share the collection. Applying is idempotent (sync.py), so a duplicate or crossed
message changes nothing. A message for a collection this tab does not share is ignored
and never answered; a malformed one is dropped with a warning. Unshared collections
never leave the tab: nothing of them is encoded, and their on_commit never fires.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from typing import Any, Callable

import numpy as np

from .jsbridge import IN_PYODIDE, ProxyBag, TaskSet, js, yield_to_browser
from .rag.answer import CitationStream, build_messages, find_citations
from .rag.chunking import chunk_by_tokens
from .rag.store import Collection, CollectionError, list_collections
from .rag.storage import StorageQuotaError
from .rag.sync import (DeltaBatch, DeltaError, SyncRequest, decode_message, deltas_since,
                       encode_deltas, encode_sync_request)
from .rag.sync import apply as apply_deltas

log = logging.getLogger("tabmesh.rag")

DEFAULT_COLLECTION = "default"
CHUNK_TOKENS, CHUNK_OVERLAP = 200, 32
BATCH_SIZE = 16                      # chunks per committed (and announced) batch
EMBED_SLICE_CHARS = 600              # ~150 word-pieces: texts embedded (and counted) per call
SYNC_PAGE_OPS, SYNC_PAGE_BYTES = 256, 4 * 1024 * 1024
ASK_MAX_PROMPT_TOKENS = 1536         # passages + question; the prefill is the slow part
LOCK_WAIT_S = 3.0                    # how long to wait for another tab's collection lock
MAX_K = 100


def _opts(value: Any) -> dict:
    value = value.to_py() if hasattr(value, "to_py") else value
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CollectionError("tabmesh.rag calls take one options object, e.g. {collection: 'default'}")
    return value


def _int(opts: dict, key: str, default: int, low: int, high: int) -> int:
    value = opts.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) \
            or not low <= value <= high:
        raise CollectionError(f"{key} must be an integer in {low}..{high}, got {value!r:.40}")
    return int(value)


def _str(opts: dict, key: str, default: str | None = None) -> str:
    value = opts.get(key, default)
    if not isinstance(value, str):
        raise CollectionError(f"{key} must be a string")
    return value


async def _web_lock(name: str, wait_s: float) -> Callable[[], None]:
    """Hold the Web Lock ``name`` for this page; the release function. CollectionError if
    another tab holds it for longer than ``wait_s``."""
    locks = getattr(js.navigator, "locks", None) if IN_PYODIDE else None
    if locks is None:
        return lambda: None
    loop = asyncio.get_event_loop()
    granted = loop.create_future()
    bag = ProxyBag()
    resolver = []

    def executor(resolve, _reject):
        resolver.append(resolve)

    hold = js.Promise.new(bag(executor))  # pending while we hold the lock

    def on_granted(_lock):
        if not granted.done():
            granted.set_result(True)
        return hold

    def on_failed(_err):
        if not granted.done():
            granted.set_result(False)

    opts = js.Object.new()
    opts.signal = js.AbortSignal.timeout(int(wait_s * 1000))
    locks.request(name, opts, bag(on_granted)).catch(bag(on_failed))
    if not await granted:
        bag.destroy()
        raise CollectionError(f"collection {name.partition(':')[2]!r} is open in another tab of "
                              "this browser; close that tab (or use another collection) here")

    def release():
        if resolver:
            resolver.pop()()
        loop.call_soon(bag.destroy)
    return release


class RagService:
    """Collections of this tab, the JS API over them, and their replication."""

    def __init__(self, embed, llm, node=None, db_name: str = "tabmesh-rag", storage=None):
        """``embed``: the tab's EmbedService; ``llm``: its LLMService; ``node``: the mesh
        node (None: no sharing); ``storage``: a Storage to use instead of IndexedDB (tests)."""
        self.embed, self.llm, self.node, self.db_name = embed, llm, node, db_name
        self.on_change: Callable[[str], None] = lambda name: None   # a collection changed
        self.on_error: Callable[[str], None] = lambda text: None    # e.g. storage quota full
        self.embedded_texts = 0      # document texts embedded by this tab since load
        self.embedded_queries = 0
        self.messages_in = self.messages_out = self.dropped = 0
        self._storage = storage
        self._storage_task: asyncio.Future | None = None
        self._cols: dict[str, asyncio.Future] = {}
        self._restore_s: dict[str, float] = {}
        self._release: dict[str, Callable[[], None]] = {}
        self._shared: set[str] = set()
        self._sharers: dict[str, set[str]] = defaultdict(set)     # collection -> peers sharing it
        self._embed_lock = asyncio.Lock()
        self.tasks = TaskSet()   # failures are logged as warnings (replication is best effort)
        self._started: asyncio.Future | None = None
        if node is not None:
            node.on_rag = self._on_message
            node.peer_listeners.append(self._on_peer)

    # ---- storage and collections -----------------------------------------------------
    async def storage(self):
        if self._storage is not None:
            return self._storage
        if self._storage_task is None:
            from .rag.idb import IndexedDBStorage
            self._storage_task = asyncio.ensure_future(IndexedDBStorage.open(self.db_name))
        try:
            self._storage = await asyncio.shield(self._storage_task)
        except Exception:
            self._storage_task = None
            raise
        return self._storage

    def start(self) -> asyncio.Future:
        """Once a page: open the storage and every stored collection marked shared, so they
        keep replicating across reloads."""
        if self._started is None:
            self._started = asyncio.ensure_future(self._start())
        return self._started

    async def _start(self) -> None:
        storage = await self.storage()
        for c in await list_collections(storage):
            if c.get("shared"):
                try:
                    await self.collection(c["name"], create=False)
                except CollectionError as exc:
                    log.warning("shared collection %s not opened: %s", c["name"], exc)

    async def collection(self, name: str = DEFAULT_COLLECTION, create: bool = True) -> Collection:
        if not isinstance(name, str):
            raise CollectionError("collection must be a string")
        fut = self._cols.get(name)
        if fut is None:
            fut = self._cols[name] = asyncio.ensure_future(self._open(name, create))
        try:
            return await asyncio.shield(fut)
        except BaseException:
            if self._cols.get(name) is fut and fut.done():
                del self._cols[name]
            raise

    def opened(self, name: str) -> Collection | None:
        """The collection if this tab has it open now (no waiting, no opening)."""
        fut = self._cols.get(name)
        if fut is None or not fut.done() or fut.cancelled() or fut.exception() is not None:
            return None
        return fut.result()

    async def _open(self, name: str, create: bool) -> Collection:
        Collection(name)  # validates the name before anything is locked or stored
        storage = await self.storage()
        release = await _web_lock(f"tabmesh-rag:{name}", LOCK_WAIT_S)
        try:
            t0 = time.perf_counter()
            kwargs = dict(chunker=self._chunk, batch_size=BATCH_SIZE)
            if create:
                col = await Collection.open(storage, name, self._dim(), **kwargs)
            else:
                col = await Collection.restore(storage, name, **kwargs)
            self._restore_s[name] = time.perf_counter() - t0
        except BaseException:
            release()
            raise
        self._release[name] = release
        col.on_commit.append(lambda batch: self._broadcast(name, batch))
        if col.shared:
            self._shared.add(name)
            self._ask_all(name)
        return col

    def _dim(self) -> int:
        info = self.embed.info()
        return info["dim"] if info else 384

    def _chunk(self, text: str):
        return chunk_by_tokens(text, self.embed.embedder.tokenizer, CHUNK_TOKENS, CHUNK_OVERLAP)

    async def _ensure_embedder(self) -> None:
        async with self._embed_lock:
            if self.embed.embedder is None:
                await self.embed.load()

    async def _embed_docs(self, texts: list[str]) -> np.ndarray:
        """Embed in slices of about EMBED_SLICE_CHARS, yielding to the browser between them:
        numpy in the tab blocks its one thread (~5 ms a word-piece on an idle core), and
        signaling heartbeats, peer pings and the page must keep running during a long
        ingestion (the numpy encoder also pauses inside a slice: jsbridge.run_sliced)."""
        out, group, size = [], [], 0
        for i, text in enumerate(texts):
            group.append(text)
            size += len(text)
            if size >= EMBED_SLICE_CHARS or i == len(texts) - 1:
                vectors, _ = await self.embed.embed(group)
                out.append(vectors)
                self.embedded_texts += len(group)
                group, size = [], 0
                await yield_to_browser()  # a timer: timers already due run first
        return np.concatenate(out) if out else np.zeros((0, self._dim()), np.float32)

    async def _embed_query(self, texts: list[str]) -> np.ndarray:
        vectors, _ = await self.embed.embed(texts)
        self.embedded_queries += len(texts)
        return vectors

    # ---- the operations (window.tabmesh.rag) -----------------------------------------
    async def open(self, name: str = DEFAULT_COLLECTION) -> dict:
        col = await self.collection(name)
        return {"collection": name, "documents": len(col.documents()), "passages": col.n_passages,
                "chunks": len(col), "shared": col.shared, "restoreS": round(self._restore_s[name], 4)}

    async def ingest(self, text: str, source: str, name: str = DEFAULT_COLLECTION,
                     on_progress=None) -> dict:
        await self._ensure_embedder()
        col = await self.collection(name)
        try:
            r = await col.add_document(text, source, self._embed_docs, on_progress=on_progress)
        except StorageQuotaError as exc:
            self.on_error(str(exc))
            raise
        finally:
            self.on_change(name)
        return {"docId": r.doc_id, "chunks": r.n_chunks, "added": r.n_added,
                "embedded": r.n_embedded, "skipped": r.skipped, "resumed": r.resumed}

    async def ingest_many(self, docs: list, name: str = DEFAULT_COLLECTION, on_progress=None) -> dict:
        if not isinstance(docs, list) or not all(
                isinstance(d, dict) and isinstance(d.get("text"), str) for d in docs):
            raise CollectionError("ingestMany takes {docs: [{text, source}, ...]}")
        t0 = time.perf_counter()
        out = {"documents": 0, "chunks": 0, "added": 0, "embedded": 0, "skipped": 0}
        for i, d in enumerate(docs):
            r = await self.ingest(d["text"], str(d.get("source") or f"document {i + 1}"), name,
                                  on_progress)
            out["documents"] += 1
            out["chunks"] += r["chunks"]
            out["added"] += r["added"]
            out["embedded"] += r["embedded"]
            out["skipped"] += r["skipped"]
        out["seconds"] = round(time.perf_counter() - t0, 4)
        return out

    async def documents(self, name: str = DEFAULT_COLLECTION) -> list[dict]:
        col = await self.collection(name)
        return [{"docId": d.doc_id, "source": d.source, "chunks": d.n_chunks, "stored": d.n_stored,
                 "complete": d.complete, "length": d.length} for d in col.documents()]

    async def remove(self, doc_id: str, name: str = DEFAULT_COLLECTION) -> dict:
        col = await self.collection(name)
        try:
            return {"removedChunks": await col.delete_document(doc_id)}
        finally:
            self.on_change(name)

    async def search(self, query: str, k: int = 5, name: str = DEFAULT_COLLECTION) -> dict:
        if not query.strip():
            raise CollectionError("the search query is empty")
        col = await self.collection(name)
        await self._ensure_embedder()
        t0 = time.perf_counter()
        qv = (await self._embed_query([query]))[0]
        t1 = time.perf_counter()
        hits = col.search(qv, k, query)
        t2 = time.perf_counter()
        return {"hits": [{"score": h.score, "text": h.text, "source": h.source, "docId": h.doc_id,
                          "start": h.start, "end": h.end, "index": h.index,
                          "highlights": [list(s) for s in h.highlights]} for h in hits],
                "ms": round((t2 - t0) * 1000, 3), "embedMs": round((t1 - t0) * 1000, 3),
                "searchMs": round((t2 - t1) * 1000, 3)}

    async def ask(self, question: str, k: int = 4, max_tokens: int = 64,
                  name: str = DEFAULT_COLLECTION, model: str | None = None,
                  backend: str | None = None, on_sources=None, on_text=None) -> dict:
        """Retrieve ``k`` passages, answer from them with the loaded LLM (loading the
        default model if none is), streaming; ``[n]`` cites sources[n - 1]."""
        hits = (await self.search(question, k, name))["hits"]
        if backend or model or self.llm.loaded is None:
            await self.llm.load(model, backend)
        engine = self.llm.loaded.engine
        budget = min(engine.model.n_ctx - max_tokens - 64, ASK_MAX_PROMPT_TOKENS)
        prompt = build_messages(question, hits, lambda s: len(engine.tokenizer.encode(
            s, add_special=False, parse_special=False)), budget)
        sources = [{"n": n, "source": h["source"], "docId": h["docId"], "text": h["text"],
                    "start": h["start"], "end": h["end"], "score": h["score"],
                    "highlights": h["highlights"]}
                   for n, h in enumerate(prompt.sources, 1)]
        if on_sources is not None:
            on_sources(sources)
        stream = CitationStream(prompt.sources)
        sid = await self.llm.chat_open({"messages": prompt.messages, "stream": True,
                                        "max_tokens": max_tokens, "temperature": 0})
        try:
            while True:
                step = await self.llm.chat_next(sid)
                if step["done"]:
                    break
                for choice in step["value"]["choices"]:
                    piece = choice["delta"].get("content")
                    if piece:
                        stream.feed(piece)
                        if on_text is not None:
                            on_text(stream.text, sources)
        finally:
            await self.llm.chat_close(sid)
        return {"answer": stream.text,
                "citations": [list(c.numbers) for c in find_citations(stream.text, prompt.sources)],
                "sources": sources, "truncated": prompt.truncated, "promptTokens": prompt.n_tokens}

    async def share(self, on: bool, name: str = DEFAULT_COLLECTION) -> dict:
        col = await self.collection(name)
        await col.set_shared(bool(on))
        if col.shared:
            self._shared.add(name)
            self._ask_all(name)
        else:
            self._shared.discard(name)
            self._sharers.pop(name, None)
        self.on_change(name)
        return {"collection": name, "shared": col.shared}

    async def stats(self) -> dict:
        storage = await self.storage()
        stored = {c["name"]: c for c in await list_collections(storage)}
        cols = []
        for name in sorted(stored):
            col = self.opened(name)
            cols.append({"name": name, "shared": bool(stored[name].get("shared")), "open": col is not None,
                         "documents": len(col.documents()) if col else None,
                         "passages": col.n_passages if col else None,
                         "peers": sorted(self._sharers.get(name, ()))})
        est = await storage.estimate() if hasattr(storage, "estimate") else {"usage": None, "quota": None}
        return {"embeddedTexts": self.embedded_texts, "embeddedQueries": self.embedded_queries,
                "collections": cols, "persisted": getattr(storage, "persisted", None), "usage": est["usage"],
                "quota": est["quota"], "messagesIn": self.messages_in,
                "messagesOut": self.messages_out, "droppedMessages": self.dropped}

    def handlers(self) -> dict[str, Callable]:
        """window.tabmesh.rag.* (web/bootstrap.js) -> coroutine functions of one options object."""
        def name_of(o: dict) -> str:
            return _str(o, "collection", DEFAULT_COLLECTION)

        async def rag_open(o=None):
            return await self.open(name_of(_opts(o)))

        async def ingest(o=None):
            o = _opts(o)
            return await self.ingest(_str(o, "text"), _str(o, "source", "pasted text"), name_of(o))

        async def ingest_many(o=None):
            o = _opts(o)
            return await self.ingest_many(o.get("docs"), name_of(o))

        async def documents(o=None):
            return await self.documents(name_of(_opts(o)))

        async def remove(o=None):
            o = _opts(o)
            return await self.remove(_str(o, "docId"), name_of(o))

        async def search(o=None):
            o = _opts(o)
            return await self.search(_str(o, "query"), _int(o, "k", 5, 1, MAX_K), name_of(o))

        async def ask(o=None):
            o = _opts(o)
            return await self.ask(_str(o, "question"), _int(o, "k", 4, 1, 20),
                                  _int(o, "maxTokens", 64, 1, 4096), name_of(o), o.get("model"),
                                  o.get("backend"))

        async def share(o=None):
            o = _opts(o)
            return await self.share(bool(o.get("on", True)), name_of(o))

        async def stats(o=None):
            return await self.stats()

        return {"ragOpen": rag_open, "ragIngest": ingest, "ragIngestMany": ingest_many,
                "ragDocuments": documents, "ragRemove": remove, "ragSearch": search,
                "ragAsk": ask, "ragShare": share, "ragStats": stats}

    # ---- replication over the mesh (module docstring) --------------------------------
    def _open_peers(self) -> list[str]:
        return [pid for pid, p in self.node.peers.items() if p.state == "open"] if self.node else []

    def _on_peer(self, peer_id: str, state: str) -> None:
        if state == "open":
            for name in sorted(self._shared):
                self.tasks.spawn(self._ask_peer(peer_id, name), f"RAG sync request to {peer_id}")
        elif state == "closed":
            for peers in self._sharers.values():
                peers.discard(peer_id)

    def _ask_all(self, name: str) -> None:
        for pid in self._open_peers():
            self.tasks.spawn(self._ask_peer(pid, name), f"RAG sync request to {pid}")

    async def _ask_peer(self, peer_id: str, name: str) -> None:
        col = await self.collection(name)
        if col.shared:
            await self._send(peer_id, encode_sync_request(name, col.seen()))

    async def _send(self, peer_id: str, payload: bytes) -> None:
        self.messages_out += 1
        await self.node.send_rag(peer_id, payload)

    def _broadcast(self, name: str, batch: DeltaBatch) -> None:
        if name not in self._shared or not (batch.adds or batch.deletes):
            return
        payload = encode_deltas(batch)
        open_peers = set(self._open_peers())
        for pid in sorted(self._sharers.get(name, set()) & open_peers):
            self.tasks.spawn(self._send(pid, payload), f"RAG deltas to {pid}")

    def _on_message(self, peer_id: str, payload: bytes) -> None:
        self.messages_in += 1
        self.tasks.spawn(self._handle(peer_id, bytes(payload)), f"RAG message from {peer_id}")

    async def _handle(self, peer_id: str, data: bytes) -> None:
        await self.start()
        try:
            msg = decode_message(data, dim=self._dim())
        except DeltaError as exc:
            self.dropped += 1
            log.warning("dropped a RAG message from %s: %s", peer_id, exc)
            return
        name = msg.collection
        if name not in self._shared:
            return  # not shared here: never answered, never applied
        col = await self.collection(name)
        if not col.shared:
            return
        if isinstance(msg, SyncRequest):
            first = peer_id not in self._sharers[name]
            self._sharers[name].add(peer_id)
            batch = deltas_since(col, msg.seen, SYNC_PAGE_OPS, SYNC_PAGE_BYTES)
            await self._send(peer_id, encode_deltas(batch))
            if first:
                await self._ask_peer(peer_id, name)
            return
        self._sharers[name].add(peer_id)
        try:
            result = await apply_deltas(col, msg)
        except (DeltaError, CollectionError) as exc:
            self.dropped += 1
            log.warning("RAG deltas from %s not applied: %s", peer_id, exc)
            return
        if result.added or result.deleted:
            self.on_change(name)
        if msg.more:
            await self._ask_peer(peer_id, name)

    def close(self) -> None:
        self.tasks.cancel_all()
        for release in self._release.values():
            release()
        self._release.clear()
