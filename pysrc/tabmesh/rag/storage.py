"""The storage interface a RAG collection persists through, and an in-memory backend.

A ``Storage`` holds three key-value object stores, with string keys:

    records   JSON-able dicts: documents, chunks, tombstones, HNSW graph nodes
    vectors   bytes: little-endian float32 rows (a Float32Array in IndexedDB)
    meta      JSON-able dicts: one per collection (counters, sync state, HNSW meta)

Writes only happen through ``commit(ops)``: one transaction that applies every
``("put", store, key, value)``, ``("delete", store, key)`` and
``("delete_prefix", store, prefix)`` in order, or none of them. A commit that fails
(``StorageQuotaError`` when the browser's quota is full, ``StorageError`` otherwise)
leaves the stored state exactly as it was, so a collection can always be restored as of
its last successful commit. Reads (``get``, ``items``) see committed state only.

``hnsw_node_ops`` / ``hnsw_from_nodes`` map an HNSW index to records (one graph node
per slot) and vector blobs (one per slot) and back, so a commit writes only the slots
that changed (``HNSW.dirty_since``) and a restore rebuilds the graph exactly.

``MemoryStorage`` is the backend for native tests: values are kept serialized (JSON text,
bytes), as IndexedDB's structured clone would, so a value that IndexedDB could not store
fails here too; it can simulate a full quota (``quota_bytes``) and a tab closed in the
middle of a transaction (``crash_at_commit``). ``tabmesh.rag.idb`` is the browser backend.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Protocol, Sequence

import numpy as np

from tabmesh.errors import TabmeshError
from tabmesh.rag.hnsw import HNSW, CorruptIndexError

__all__ = ["STORES", "Op", "Storage", "MemoryStorage", "StorageError", "StorageQuotaError",
           "SimulatedCrash", "check_ops", "hnsw_node_ops", "hnsw_from_nodes"]

STORES = ("records", "vectors", "meta")

Op = tuple  # ("put", store, key, value) | ("delete", store, key) | ("delete_prefix", store, prefix)


class StorageError(TabmeshError):
    """The browser storage refused or lost a write; nothing of that write was stored, and
    what was stored before is intact. Reload the page and try again."""

    code = "storage_error"


class StorageQuotaError(StorageError):
    """The browser's storage quota for this site is full. Nothing already stored was lost;
    delete documents or collections (or free space for this site in the browser's
    settings), then add the document again: ingestion resumes where it stopped."""

    code = "storage_quota"


class SimulatedCrash(Exception):
    """Raised by MemoryStorage(crash_at_commit=n) in place of the n-th commit: the tab
    closed while that transaction was open, so none of it was stored."""


class Storage(Protocol):
    """What a Collection needs from a backend (see the module docstring)."""

    async def commit(self, ops: Sequence[Op]) -> None:
        """Apply every op in one atomic transaction (all or nothing)."""

    async def get(self, store: str, key: str) -> Any | None:
        """The committed value at ``key`` (dict for records/meta, bytes for vectors) or None."""

    async def items(self, store: str, prefix: str = "") -> list[tuple[str, Any]]:
        """Every committed (key, value) whose key starts with ``prefix``, sorted by key."""


def check_ops(ops: Iterable[Op]) -> list[Op]:
    """The ops as a list, each checked for shape; StorageError names the first bad one."""
    out = []
    for i, op in enumerate(ops):
        if not isinstance(op, tuple) or not op or op[0] not in ("put", "delete", "delete_prefix"):
            raise StorageError(f"storage op {i} must be a ('put'|'delete'|'delete_prefix', "
                               f"store, key[, value]) tuple, got {op!r:.100}")
        want = 4 if op[0] == "put" else 3
        if len(op) != want or op[1] not in STORES or not isinstance(op[2], str):
            raise StorageError(f"storage op {i} {op[0]!r} needs {want} fields with a store in "
                               f"{STORES} and a string key, got {op!r:.100}")
        if op[0] == "put":
            value = op[3]
            if op[1] == "vectors":
                if not isinstance(value, (bytes, bytearray)) or len(value) % 4:
                    raise StorageError(f"vectors value at {op[2]!r} must be float32 bytes "
                                       f"(a multiple of 4 long)")
            elif not isinstance(value, dict):
                raise StorageError(f"{op[1]} value at {op[2]!r} must be a dict, got "
                                   f"{type(value).__name__}")
        out.append(op)
    return out


class MemoryStorage:
    """An in-memory Storage. ``quota_bytes``: a commit that would make the stored total
    (UTF-8 JSON of records/meta, bytes of vectors, plus key lengths) exceed it raises
    StorageQuotaError and stores nothing. ``crash_at_commit``: the commit with that
    1-based number raises SimulatedCrash and stores nothing."""

    def __init__(self, quota_bytes: int | None = None, crash_at_commit: int | None = None):
        self.quota_bytes = quota_bytes
        self.crash_at_commit = crash_at_commit
        self.commits = 0        # successful commits
        self.attempts = 0       # commit calls, failed ones included
        self._data: dict[str, dict[str, str | bytes]] = {s: {} for s in STORES}

    def copy(self) -> "MemoryStorage":
        """An independent copy of the committed state (a reload of the page sees this)."""
        other = MemoryStorage(self.quota_bytes)
        other._data = {s: dict(d) for s, d in self._data.items()}
        return other

    def size(self) -> int:
        """Bytes stored, as counted against ``quota_bytes``."""
        return sum(_size(k, v) for d in self._data.values() for k, v in d.items())

    async def commit(self, ops: Sequence[Op]) -> None:
        self.attempts += 1
        ops = check_ops(ops)
        if self.crash_at_commit is not None and self.attempts == self.crash_at_commit:
            raise SimulatedCrash(f"tab closed during commit {self.attempts}")
        staged = {s: dict(d) for s, d in self._data.items()}
        for op in ops:
            kind, store, key = op[0], op[1], op[2]
            target = staged[store]
            if kind == "put":
                value = op[3]
                if store == "vectors":
                    target[key] = bytes(value)
                else:
                    try:
                        target[key] = json.dumps(value, allow_nan=False, separators=(",", ":"))
                    except (TypeError, ValueError) as e:
                        raise StorageError(f"{store} value at {key!r} cannot be stored: {e}") from e
            elif kind == "delete":
                target.pop(key, None)
            else:
                for k in [k for k in target if k.startswith(key)]:
                    del target[k]
        if self.quota_bytes is not None:
            total = sum(_size(k, v) for d in staged.values() for k, v in d.items())
            if total > self.quota_bytes:
                raise StorageQuotaError(
                    f"storage quota exceeded: this write needs {total} bytes of "
                    f"{self.quota_bytes}; nothing already stored was lost. Delete documents "
                    "or collections, or free space for this site, then add the document "
                    "again to resume")
        self._data = staged
        self.commits += 1

    async def get(self, store: str, key: str) -> Any | None:
        value = self._store(store).get(key)
        return value if value is None or isinstance(value, bytes) else json.loads(value)

    async def items(self, store: str, prefix: str = "") -> list[tuple[str, Any]]:
        d = self._store(store)
        return [(k, d[k] if isinstance(d[k], bytes) else json.loads(d[k]))
                for k in sorted(d) if k.startswith(prefix)]

    def _store(self, store: str) -> dict[str, str | bytes]:
        if store not in STORES:
            raise StorageError(f"unknown store {store!r}; stores are {STORES}")
        return self._data[store]


def _size(key: str, value: str | bytes) -> int:
    return len(key.encode()) + (len(value) if isinstance(value, bytes) else len(value.encode()))


# --- an HNSW index as records and vector blobs ---------------------------------------

def hnsw_node_ops(index: HNSW, slots, prefix: str) -> list[Op]:
    """Storage ops that write the HNSW nodes at ``slots`` (e.g. ``dirty_since(mark)``):
    records ``prefix + "node/<slot>"`` = {"level": -1} for a free slot, else {"id", "level",
    "links": [layer-0 slots, layer-1 slots, ...]}; vectors ``prefix + "<slot>"`` = the
    unit vector as little-endian float32 (deleted for a free slot)."""
    b = index.export_nodes(slots)
    ops: list[Op] = []
    row = 0
    for i, slot in enumerate(b["slots"].tolist()):
        key, vkey, level = f"{prefix}node/{slot}", f"{prefix}{slot}", int(b["levels"][i])
        if level < 0:
            ops += [("put", "records", key, {"level": -1}), ("delete", "vectors", vkey)]
            continue
        links = [b["links0"][i, :b["count0"][i]].tolist()]
        for r in range(row, row + level):
            links.append(b["upper_links"][r, :b["upper_count"][r]].tolist())
        row += level
        ops += [("put", "records", key, {"id": int(b["ids"][i]), "level": level, "links": links}),
                ("put", "vectors", vkey, b["vectors"][i].astype("<f4").tobytes())]
    return ops


def hnsw_from_nodes(meta: dict, nodes: dict[int, dict], vectors: dict, prefix: str) -> HNSW:
    """The index that ``hnsw_node_ops`` wrote: ``meta`` (HNSW.meta()), ``nodes`` {slot:
    node record}, ``vectors`` {prefix + str(slot): float32 bytes}. HNSW.restore checks the
    graph; CorruptIndexError names what is wrong."""
    dim, M = meta["dim"], meta["M"]
    slots = sorted(nodes)
    k = len(slots)
    for s in slots:
        level = nodes[s].get("level")
        if not isinstance(level, int) or isinstance(level, bool) or not -1 <= level <= 31:
            raise CorruptIndexError(f"stored graph node {s} has level {level!r:.20}")
    levels = np.array([nodes[s]["level"] for s in slots], np.int8)
    vecs = np.zeros((k, dim), np.float32)
    ids = np.zeros(k, np.int64)
    count0 = np.zeros(k, np.int32)
    links0 = np.full((k, 2 * M), -1, np.int32)
    up_count, up_links = [], []
    for i, s in enumerate(slots):
        n = nodes[s]
        if n["level"] < 0:
            continue
        raw = vectors.get(f"{prefix}{s}")
        if raw is None or len(raw) != 4 * dim:
            raise CorruptIndexError(f"stored vector of slot {s} is missing or not {dim} float32")
        vecs[i] = np.frombuffer(raw, "<f4")
        ids[i] = n["id"]
        links = n["links"]
        if len(links) != n["level"] + 1 or len(links[0]) > 2 * M:
            raise CorruptIndexError(f"stored graph node {s} has {len(links)} link lists for "
                                    f"level {n['level']}")
        count0[i] = len(links[0])
        links0[i, :len(links[0])] = links[0]
        for row in links[1:]:
            if len(row) > M:
                raise CorruptIndexError(f"stored graph node {s} has an upper row over M={M}")
            up_count.append(len(row))
            up_links.append(row + [-1] * (M - len(row)))
    return HNSW.restore({"meta": meta, "slots": np.array(slots, np.int32), "ids": ids,
                         "levels": levels, "vectors": vecs, "count0": count0, "links0": links0,
                         "upper_count": np.array(up_count, np.int32),
                         "upper_links": np.array(up_links, np.int32).reshape(-1, M)})
