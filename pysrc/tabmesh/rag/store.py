"""A RAG collection: documents cut into chunks, their embeddings in an HNSW index, every
change committed batch by batch to a Storage (IndexedDB in the tab), and the chunk set
replicable between peers (tabmesh.rag.sync).

State. A *chunk* is one element of the replicated set (see sync.py): key = the id of the
op that added it (``replica:seq``), its document (``doc_id = replica/n``, source name,
document sha256, chunk count, length), index, ``[start, end)`` offsets in the document,
text and content hash. Chunks with the same content hash share one *passage*: one HNSW
item (int id ``pid``) embedded once, alive while any of its chunks is. A search returns
passages, each shown as its first chunk by (doc_id, index) with the other places it occurs.
Deleting a document adds a tombstone per chunk; a passage left with no chunk leaves the
index (HNSW delete repairs the graph at once).

Ingestion (``add_document``): a document whose content hash matches a complete document
is skipped; one that matches a partly stored document resumes it (the chunks already
stored are kept). Chunks go in batches of ``batch_size``: texts not yet indexed are
embedded (the embedder is called once per batch; it may be sync or async), the batch is
applied in memory, and ONE storage transaction writes its chunk and document records,
the HNSW nodes it changed (``dirty_since``: vectors as float32 blobs, graph nodes as
records, freed slots included) and the collection's meta (counters, Seen, HNSW meta).
So storage always holds the collection as of its last committed batch: a tab closed
mid-ingest comes back with every committed batch and nothing else, and the document can
be added again to finish it. If a commit fails (StorageQuotaError when the quota is full)
the collection reloads itself from storage, so memory again equals what is stored, and
the error propagates; nothing committed before is lost. A commit cancelled mid-flight is
awaited by the next call, which reloads if it failed.

Storage layout (keys; ``C`` = collection name):
    meta     C                 {format, name, dim, replica, shared, next_seq, next_doc,
                                next_pid, next_order, seen, hnsw: HNSW.meta()}
    records  C/doc/<doc_id>    {id, source, sha256, n_chunks, length, order}
             C/chunk/<key>     {key, doc, i, s, e, text, sha, pid}
             C/tomb/<op id>    {key, target}
             C/node/<slot>     {level: -1} for a free slot, else {id, level, links:
                                [layer-0 slots, layer-1 slots, ...]}
    vectors  C/<slot>          float32 unit vector of a live slot
``restore`` rebuilds the HNSW index from the node records exactly (HNSW.restore), so
search results after a reload equal those before it, with no re-embedding.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import secrets
from typing import Any, Awaitable, Callable, Sequence

import numpy as np

from tabmesh.errors import TabmeshError
from tabmesh.rag.chunking import Chunk, chunk_text, content_hash, normalize_for_hash
from tabmesh.rag.hnsw import HNSW
from tabmesh.rag.highlight import highlight_spans
from tabmesh.rag.results import (ApplyResult, ChunkRecord, Document, Hit, IngestResult,
                                 Progress)
from tabmesh.rag.storage import Storage, hnsw_from_nodes, hnsw_node_ops
from tabmesh.rag.sync import (COLLECTION_RE, LONE_SURROGATE, MAX_SOURCE_CHARS, REPLICA_RE,
                              ChunkAdd, ChunkDelete, DeltaBatch, Seen, op_id, split_op_id)

__all__ = ["Collection", "CollectionError", "Hit", "Document", "IngestResult", "Progress",
           "ApplyResult", "highlight_spans", "list_collections", "drop_collection"]

log = logging.getLogger("tabmesh.rag")
FORMAT = 1
Embedder = Callable[[list[str]], "np.ndarray | Awaitable[np.ndarray]"]


class CollectionError(TabmeshError):
    """A collection was asked something it cannot do (bad name, unknown document, an
    embedder returning the wrong shape) or its stored form is inconsistent; the message
    says which."""

    code = "collection_error"


class Collection:
    """One named collection; create or reload with ``await Collection.open(storage, name)``
    (or ``Collection(name)`` for one that lives in memory only)."""

    def __init__(self, name: str, dim: int = 384, storage: Storage | None = None, *,
                 shared: bool = False, replica: str | None = None,
                 chunker: Callable[[str], list[Chunk]] | None = None, batch_size: int = 32,
                 M: int = 16, ef_construction: int = 100, ef: int = 50, seed: int = 0) -> None:
        if not isinstance(name, str) or not COLLECTION_RE.fullmatch(name):
            raise CollectionError(f"collection name {name!r:.80} must be 1-64 characters of "
                                  "letters, digits, space, '_', '.', '-'")
        replica = replica or secrets.token_hex(8)
        if not REPLICA_RE.fullmatch(replica):
            raise CollectionError(f"replica id {replica!r} must be 1-32 of [A-Za-z0-9_-]")
        if batch_size < 1:
            raise CollectionError(f"batch_size must be >= 1, got {batch_size}")
        self.name, self.dim, self.storage = name, int(dim), storage
        self.replica, self.shared, self.batch_size = replica, bool(shared), int(batch_size)
        self.chunker = chunker or (lambda text: chunk_text(text, 800, 160))
        self.on_commit: list[Callable[[DeltaBatch], Any]] = []  # local ops, once committed
        self._reset(HNSW(self.dim, M, ef_construction, ef, seed))
        self._lock = asyncio.Lock()
        self._pending: tuple | None = None    # (commit task, HNSW version, last seq) in flight
        self._ingesting: set[str] = set()       # sha256 of documents being added

    def _reset(self, hnsw: HNSW) -> None:
        self._hnsw = hnsw
        self._mark = hnsw.version               # HNSW version at the last commit
        self._docs: dict[str, dict] = {}        # doc_id -> doc record
        self._doc_chunks: dict[str, set[str]] = {}
        self._chunks: dict[str, ChunkRecord] = {}
        self._passages: dict[str, int] = {}     # content sha256 -> pid
        self._pid_chunks: dict[int, set[str]] = {}
        self._tombs: dict[str, str] = {}        # delete op id -> target add id
        self._dead: set[str] = set()
        self._seen = Seen()
        self._next_seq = self._next_doc = self._next_pid = self._next_order = 1
        self._committed_seq = 0

    # --- opening, restoring, dropping -------------------------------------------------

    @classmethod
    async def open(cls, storage: Storage, name: str, dim: int = 384, **kwargs) -> "Collection":
        """The stored collection ``name``, restored (no re-embedding); or a new one, whose
        meta is committed at once. ``kwargs`` (shared, chunker, batch_size, HNSW params,
        replica) apply to a new collection; chunker and batch_size also to a stored one."""
        col = cls(name, dim, storage, **kwargs)
        if await storage.get("meta", name) is not None:
            await col._load()
            if col.dim != dim:
                raise CollectionError(f"collection {name!r} stores {col.dim}-dim vectors; "
                                      f"the embedder gives {dim}")
        else:
            await col._commit([("put", "meta", name, col._meta())])
        return col

    @classmethod
    async def restore(cls, storage: Storage, name: str, **kwargs) -> "Collection":
        """The stored collection ``name``; CollectionError if there is none."""
        if await storage.get("meta", name) is None:
            raise CollectionError(f"no stored collection named {name!r}")
        col = cls(name, storage=storage, **kwargs)
        await col._load()
        return col

    async def _load(self) -> None:
        meta = await self.storage.get("meta", self.name)
        if meta is None:
            raise CollectionError(f"no stored collection named {self.name!r}")
        records = await self.storage.items("records", self.name + "/")
        vectors = dict(await self.storage.items("vectors", self.name + "/"))
        saved = {k: v for k, v in vars(self).items() if k not in ("_lock", "_pending")}
        try:
            self._load_from(meta, records, vectors)
            # doc ids handed to ingestions still running stay taken (seqs are reused: none
            # of the lost ones left this replica)
            self._next_doc = max(self._next_doc, saved["_next_doc"])
        except BaseException as e:
            vars(self).update(saved)  # a failed load changes nothing
            if isinstance(e, (KeyError, TypeError, ValueError, IndexError, AttributeError)):
                raise CollectionError(f"stored collection {self.name!r} is corrupted "
                                      f"({e!r:.200}); drop it and add the documents again") from e
            raise

    def _load_from(self, meta: dict, records: list, vectors: dict) -> None:
        if meta.get("format") != FORMAT:
            raise CollectionError(f"stored collection {self.name!r} has format "
                                  f"{meta.get('format')!r}, not {FORMAT}")
        nodes, p = {}, self.name + "/"
        for key, rec in records:
            kind, _, rest = key[len(p):].partition("/")
            if kind == "node":
                nodes[int(rest)] = rec
        self._reset(hnsw_from_nodes(meta["hnsw"], nodes, vectors, p))
        self.dim, self.replica, self.shared = self._hnsw.dim, meta["replica"], meta["shared"]
        self._seen = Seen.from_json(meta["seen"])
        self._next_seq, self._next_doc = meta["next_seq"], meta["next_doc"]
        self._next_pid, self._next_order = meta["next_pid"], meta["next_order"]
        self._committed_seq = self._next_seq - 1
        for key, rec in records:
            kind = key[len(p):].partition("/")[0]
            if kind == "doc":
                self._docs[rec["id"]] = rec
                self._doc_chunks[rec["id"]] = set()
            elif kind == "tomb":
                self._tombs[rec["key"]] = rec["target"]
                self._dead.add(rec["target"])
        for key, rec in records:
            if key[len(p):].startswith("chunk/"):
                c = ChunkRecord(rec["key"], rec["doc"], rec["i"], rec["s"], rec["e"],
                                rec["text"], rec["sha"], rec["pid"])
                self._chunks[c.key] = c
                self._doc_chunks[c.doc_id].add(c.key)
                self._passages[c.sha256] = c.pid
                self._pid_chunks.setdefault(c.pid, set()).add(c.key)
        ids = set(self._hnsw.items()[0].tolist())
        if ids != set(self._pid_chunks) or len(self._passages) != len(self._pid_chunks):
            raise CollectionError(f"stored collection {self.name!r} is inconsistent: its chunks "
                                  "and its index disagree; drop it and add the documents again")

    async def _reload(self) -> None:
        if self.storage is not None:
            await self._load()

    async def _settle(self) -> None:
        """Wait for a commit whose caller was cancelled; reload if it failed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            task, version, seq = pending
            try:
                await task
            except BaseException:
                await self._reload_after_failure()
            else:
                self._mark, self._committed_seq = version, seq

    # --- reading ----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._chunks)

    @property
    def n_passages(self) -> int:
        return len(self._hnsw)

    def documents(self) -> list[Document]:
        out = []
        for doc_id, d in self._docs.items():
            n = len({self._chunks[k].index for k in self._doc_chunks[doc_id]})
            out.append(Document(doc_id, d["source"], d["sha256"], d["length"], d["n_chunks"], n,
                                d["order"]))
        return sorted(out, key=lambda d: (d.order, d.doc_id))

    def chunks(self, doc_id: str | None = None) -> list[ChunkRecord]:
        keys = self._chunks if doc_id is None else self._doc_chunks.get(doc_id, ())
        return sorted((self._chunks[k] for k in keys), key=lambda c: (c.doc_id, c.index, c.key))

    def search(self, query_vector, k: int = 5, query_text: str = "",
               ef: int | None = None) -> list[Hit]:
        """The ``k`` passages most similar to ``query_vector`` ((dim,)), best first;
        ``query_text`` (the question) is used for highlights only."""
        if not len(self._hnsw):
            return []
        pids, scores = self._hnsw.search(query_vector, k, ef=max(ef or self._hnsw.ef, k))
        hits = []
        for pid, score in zip(pids.tolist(), scores.tolist()):
            first, *rest = sorted((self._chunks[c] for c in self._pid_chunks[pid]),
                                  key=lambda c: (c.doc_id, c.index, c.key))
            src = self._docs[first.doc_id]["source"]
            hits.append(Hit(float(score), first.text, first.doc_id, src, first.start, first.end,
                            first.index, first.key, tuple(highlight_spans(query_text, first.text)),
                            tuple((c.doc_id, self._docs[c.doc_id]["source"], c.start, c.end)
                                  for c in rest)))
        return hits

    async def search_text(self, query: str, embed: Embedder, k: int = 5) -> list[Hit]:
        """Embed ``query`` and search."""
        return self.search(await self._embed(embed, [query]), k, query)

    # --- replication view (sync.py) ---------------------------------------------------

    def chunk_keys(self) -> list[str]:
        return list(self._chunks)

    def tombstones(self) -> dict[str, str]:
        return self._tombs

    def is_committed(self, key: str) -> bool:
        origin, seq = split_op_id(key)
        return origin != self.replica or seq <= self._committed_seq

    def seen(self) -> Seen:
        """A copy of the op ids this replica holds: send it to catch up (sync request)."""
        return Seen.from_json(self._seen.to_json())

    def chunk_add(self, key: str) -> ChunkAdd:
        """The add op of live chunk ``key``, with its embedding."""
        c, d = self._chunks[key], self._docs[self._chunks[key].doc_id]
        return ChunkAdd(c.key, c.doc_id, d["source"], d["sha256"], d["n_chunks"], d["length"],
                        c.index, c.start, c.end, c.text, c.sha256, self._vector(c.pid))

    def _vector(self, pid: int) -> np.ndarray:
        # HNSW has no per-id getter; read its slot table (a copy, never a view).
        return self._hnsw._vecs[self._hnsw._slot_of[pid]].copy()

    # --- changing -----------------------------------------------------------------------

    async def add_document(self, text: str, source: str, embed: Embedder, *,
                           on_progress: Callable[[Progress], Any] | None = None
                           ) -> IngestResult:
        """Chunk, embed and store ``text`` (from ``source``: a file name, or "pasted
        text"), ``batch_size`` chunks per committed batch (module docstring)."""
        if not isinstance(text, str) or not isinstance(source, str):
            raise CollectionError("add_document takes the document text and its source name")
        if len(source) > MAX_SOURCE_CHARS:
            raise CollectionError(f"source name is longer than {MAX_SOURCE_CHARS} characters")
        # a lone UTF-16 surrogate (possible in a JS string) cannot be stored or sent: U+FFFD
        # takes its place, one character for one, so offsets hold
        text = LONE_SURROGATE.sub("\ufffd", text)
        source = LONE_SURROGATE.sub("\ufffd", source)
        if not normalize_for_hash(text):
            raise CollectionError(f"document {source!r} is empty")
        doc_sha, chunks = content_hash(text), self.chunker(text)
        if doc_sha in self._ingesting:
            raise CollectionError(f"document {source!r} is already being added")
        self._ingesting.add(doc_sha)
        try:
            return await self._add(text, source, embed, on_progress, doc_sha, chunks)
        finally:
            self._ingesting.discard(doc_sha)

    async def _add(self, text, source, embed, on_progress, doc_sha, chunks) -> IngestResult:
        async with self._lock:
            await self._settle()
            doc_id, have = self._find_partial(doc_sha, chunks)
            if doc_id is not None and len(have) == len(chunks):
                return IngestResult(doc_id, len(chunks), 0, 0, True, False)
            resumed = doc_id is not None
            if doc_id is None:
                doc_id = f"{self.replica}/{self._next_doc}"
                self._next_doc += 1
        todo = [c for c in chunks if c.index not in have]
        doc = (doc_id, source, doc_sha, len(chunks), len(text))
        done, embedded, batches = len(chunks) - len(todo), 0, 0
        await _call(on_progress, Progress(doc_id, source, done, len(chunks), 0))
        for at in range(0, len(todo), self.batch_size):
            async with self._lock:
                await self._settle()
                if at and doc_id not in self._docs:
                    break  # deleted while it was being added
                embedded += await self._ingest_batch(doc, todo[at:at + self.batch_size], embed)
            done += len(todo[at:at + self.batch_size])
            batches += 1
            await _call(on_progress, Progress(doc_id, source, done, len(chunks), batches))
        return IngestResult(doc_id, len(chunks), done - (len(chunks) - len(todo)), embedded,
                            False, resumed)

    def _find_partial(self, doc_sha: str, chunks: list[Chunk]) -> tuple[str | None, set[int]]:
        """A stored document with this content: (doc_id, chunk indices stored); a complete
        one first (whatever its chunking), else the partial one with the most chunks."""
        best, other = None, None
        for doc_id, d in self._docs.items():
            if d["sha256"] != doc_sha:
                continue
            have = {self._chunks[k].index: self._chunks[k] for k in self._doc_chunks[doc_id]}
            if len(have) == d["n_chunks"]:
                return doc_id, set(range(len(chunks)))
            if d["n_chunks"] != len(chunks) or any(
                    c.sha256 != chunks[i].sha256 or c.start != chunks[i].start
                    for i, c in have.items()):
                other = doc_id
            elif best is None or len(have) > len(best[1]):
                best = (doc_id, set(have))
        if best is None and other is not None:
            raise CollectionError(
                f"document {other} holds part of this text, cut into chunks another way; open "
                "the collection with the chunker it was built with, or delete that document "
                "and add this one again")
        return best if best is not None else (None, set())

    async def _ingest_batch(self, doc: tuple, chunks: list[Chunk], embed: Embedder) -> int:
        need = list(dict.fromkeys(c.sha256 for c in chunks if c.sha256 not in self._passages))
        texts = {c.sha256: c.text for c in chunks}
        vecs = await self._embed(embed, [texts[s] for s in need]) if need else None
        row = {s: i for i, s in enumerate(need)}
        adds = []
        for c in chunks:
            key = op_id(self.replica, self._next_seq)
            self._next_seq += 1
            adds.append(ChunkAdd(key, *doc, c.index, c.start, c.end, c.text, c.sha256,
                                 vecs[row[c.sha256]] if c.sha256 in row else None))
        await self._apply_locked(adds, [], local=True)
        return len(need)

    async def _embed(self, embed: Embedder, texts: list[str]) -> np.ndarray:
        out = embed(texts)
        if inspect.isawaitable(out):
            out = await out
        out = np.asarray(out, dtype=np.float32)
        if out.shape != (len(texts), self.dim) or not np.isfinite(out).all():
            raise CollectionError(f"the embedder returned {out.dtype} {out.shape} for "
                                  f"{len(texts)} texts; expected finite ({len(texts)}, {self.dim})")
        return out

    async def delete_document(self, doc_id: str) -> int:
        """Remove a document: a tombstone per chunk, its passages leave the index unless
        another document holds the same text. Returns the number of chunks removed."""
        async with self._lock:
            await self._settle()
            if doc_id not in self._docs:
                raise CollectionError(f"no document {doc_id!r} in collection {self.name!r}")
            dels = []
            for key in sorted(self._doc_chunks[doc_id]):
                dels.append(ChunkDelete(op_id(self.replica, self._next_seq), key))
                self._next_seq += 1
            return (await self._apply_locked([], dels, local=True)).deleted

    async def apply_ops(self, adds: Sequence[ChunkAdd], deletes: Sequence[ChunkDelete]
                        ) -> ApplyResult:
        """Apply ops (from a peer, see sync.apply) in one committed batch; idempotent."""
        async with self._lock:
            await self._settle()
            return await self._apply_locked(list(adds), list(deletes), local=False)

    async def _apply_locked(self, adds: list[ChunkAdd], deletes: list[ChunkDelete],
                            local: bool) -> ApplyResult:
        have = set(self._passages)
        for a in adds:  # checked before anything changes
            if a.vector is None and a.sha256 not in have:
                raise CollectionError(f"add {a.key} brings no embedding for a new text")
            if a.vector is not None:
                v = np.asarray(a.vector)
                if v.shape != (self.dim,) or not np.isfinite(v).all() or not v.any():
                    raise CollectionError(f"add {a.key} embedding is not a finite nonzero "
                                          f"({self.dim},) vector")
                have.add(a.sha256)
        ops: list[tuple] = []
        try:
            result = self._mutate(adds, deletes, ops)
        except BaseException:
            await self._reload_after_failure()
            raise
        if not ops:
            return result
        ops.extend(hnsw_node_ops(self._hnsw, self._hnsw.dirty_since(self._mark), self.name + "/"))
        ops.append(("put", "meta", self.name, self._meta()))
        await self._commit(ops)
        self._mark = self._hnsw.version
        self._committed_seq = self._next_seq - 1
        if local and self.shared:
            batch = DeltaBatch(self.name, self.replica, self.dim,
                               [self.chunk_add(a.key) for a in adds if a.key in self._chunks],
                               [d for d in deletes if d.key in self._tombs])
            for listener in list(self.on_commit):
                try:
                    listener(batch)
                except Exception:
                    log.exception("on_commit listener of %s failed", self.name)
        return result

    def _mutate(self, adds: list[ChunkAdd], deletes: list[ChunkDelete], ops: list) -> ApplyResult:
        p, added, deleted, ignored = self.name + "/", 0, 0, 0
        doomed = []
        for d in deletes:
            if not self._seen.add(d.key):
                ignored += 1
                continue
            self._seen.add(d.target)
            self._tombs[d.key] = d.target
            self._dead.add(d.target)
            ops.append(("put", "records", f"{p}tomb/{d.key}", {"key": d.key, "target": d.target}))
            if d.target in self._chunks:
                doomed.append(d.target)
        new_pids, new_vecs = [], []
        for a in adds:
            if not self._seen.add(a.key) or a.key in self._dead:
                ignored += 1
                continue
            origin, seq = split_op_id(a.key)
            if origin == self.replica:  # never reuse an id of ours a peer sent back
                self._next_seq = max(self._next_seq, seq + 1)
            pid = self._passages.get(a.sha256)
            if pid is None:
                pid, self._next_pid = self._next_pid, self._next_pid + 1
                self._passages[a.sha256] = pid
                new_pids.append(pid)
                new_vecs.append(a.vector)
            if a.doc_id not in self._docs:
                rec = {"id": a.doc_id, "source": a.source, "sha256": a.doc_sha256,
                       "n_chunks": a.doc_chunks, "length": a.doc_length, "order": self._next_order}
                self._next_order += 1
                self._docs[a.doc_id], self._doc_chunks[a.doc_id] = rec, set()
                ops.append(("put", "records", f"{p}doc/{a.doc_id}", rec))
                if a.doc_id.partition("/")[0] == self.replica:
                    self._next_doc = max(self._next_doc, int(a.doc_id.partition("/")[2]) + 1)
            c = ChunkRecord(a.key, a.doc_id, a.index, a.start, a.end, a.text, a.sha256, pid)
            self._chunks[a.key] = c
            self._doc_chunks[a.doc_id].add(a.key)
            self._pid_chunks.setdefault(pid, set()).add(a.key)
            ops.append(("put", "records", f"{p}chunk/{a.key}",
                        {"key": c.key, "doc": c.doc_id, "i": c.index, "s": c.start, "e": c.end,
                         "text": c.text, "sha": c.sha256, "pid": pid}))
            added += 1
        gone_pids = []
        for key in doomed:
            c = self._chunks.pop(key)
            ops.append(("delete", "records", f"{p}chunk/{key}"))
            deleted += 1
            self._pid_chunks[c.pid].discard(key)
            if not self._pid_chunks[c.pid]:
                del self._pid_chunks[c.pid], self._passages[c.sha256]
                gone_pids.append(c.pid)
            self._doc_chunks[c.doc_id].discard(key)
            if not self._doc_chunks[c.doc_id]:
                del self._doc_chunks[c.doc_id], self._docs[c.doc_id]
                ops.append(("delete", "records", f"{p}doc/{c.doc_id}"))
        if gone_pids:
            self._hnsw.delete(gone_pids)
        if new_pids:
            self._hnsw.add(new_pids, np.stack(new_vecs).astype(np.float32))
        return ApplyResult(added, deleted, ignored)

    def _meta(self) -> dict[str, Any]:
        return {"format": FORMAT, "name": self.name, "dim": self.dim, "replica": self.replica,
                "shared": self.shared, "next_seq": self._next_seq, "next_doc": self._next_doc,
                "next_pid": self._next_pid, "next_order": self._next_order,
                "seen": self._seen.to_json(), "hnsw": self._hnsw.meta()}

    async def set_shared(self, shared: bool) -> None:
        """Opt this collection in to (or out of) replication with the mesh."""
        async with self._lock:
            await self._settle()
            self.shared = bool(shared)
            await self._commit([("put", "meta", self.name, self._meta())])

    async def _commit(self, ops: list[tuple]) -> None:
        if self.storage is None:
            return
        task = asyncio.ensure_future(self.storage.commit(ops))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            # The transaction runs on; the next call waits for its outcome (_settle).
            self._pending = (task, self._hnsw.version, self._next_seq - 1)
            raise
        except BaseException:
            await self._reload_after_failure()
            raise

    async def _reload_after_failure(self) -> None:
        """After a failed commit: make memory equal storage again (the failure propagates)."""
        try:
            await self._reload()
        except Exception:
            log.exception("collection %s could not reload after a failed commit", self.name)


async def list_collections(storage: Storage) -> list[dict[str, Any]]:
    """[{name, dim, shared}] of the collections in ``storage``."""
    return [{"name": k, "dim": m.get("dim"), "shared": m.get("shared")}
            for k, m in await storage.items("meta")]


async def drop_collection(storage: Storage, name: str) -> None:
    """Delete a stored collection and everything in it (one transaction)."""
    await storage.commit([("delete_prefix", "records", name + "/"),
                          ("delete_prefix", "vectors", name + "/"), ("delete", "meta", name)])


async def _call(fn: Callable | None, *args) -> None:
    if fn is None:
        return
    out = fn(*args)
    if inspect.isawaitable(out):
        await out
