"""HNSW (Malkov & Yashunin 2016) over cosine similarity, in numpy, with incremental insert
and delete, and a persistence format built for IndexedDB.

Build and search are hnswlib's: levels drawn with mL = 1/ln(M) (from a generator seeded by
(seed, items added so far), so a restored index grows exactly as the original would); a
new node links to at most M neighbours per layer, chosen among the ef_construction best
found by the neighbour-selection heuristic (paper alg. 4, without "keep pruned"); a
neighbour whose list overflows (M on upper layers, 2M on layer 0) is pruned with the same
heuristic. With ``_beam = 1`` the graph equals hnswlib's link for link given the same
levels (tests/native/test_hnsw.py checks it against a transcription of hnswalg.h).

Python only walks a sorted result pool: each step expands ``_beam`` (default 4) nodes at
once, filters their neighbour blocks against a visited-tag array, and scores the rest with
one gather and one matvec. Expanding four at a time cuts the numpy calls per search almost
fourfold and scores a few more nodes, so recall at a given ef is the same or higher.
Vectors are L2-normalized float32, so similarity is a dot product; scores returned are
cosine similarities, best first. On one core of an idle server (CPython 3.12) 10k x 384
vectors build in ~10 s (M=16, ef_construction=100) and a query takes ~0.5 ms at ef=50;
Pyodide runs the same code 2-3x slower.

Delete repairs the graph at once instead of leaving tombstones: every live node that
linked to a deleted node takes as candidates its other neighbours plus the deleted node's
neighbours (FreshDiskANN's delete consolidation) and re-selects with the heuristic (a node
left with no candidate searches the layer for new ones); the deleted slots are then freed
and reused by later inserts. Deleted items can never be returned, and no live node links
to a free slot.

Persistence: node batches
-------------------------
Everything persisted is a *node batch*, a dict of flat numpy arrays plus ``"meta"``:

    meta          JSON-able dict: format (=FORMAT_VERSION), dim, M, ef_construction, ef,
                  seed, n_slots (slots ever used; every slot is < n_slots), count (live
                  items), entry (slot of the entry point, -1 when empty), max_level (-1 when
                  empty), n_inserted (items ever added: seeds the level draws), version
                  (the change counter at export)
    slots         (k,) int32        the internal slots this batch describes, unique
    ids           (k,) int64        external id per slot (0 for a free slot)
    levels        (k,) int8         top layer of each node; -1 = free (deleted) slot
    vectors       (k, dim) float32  unit vectors (zeros for a free slot)
    count0        (k,) int32        layer-0 degree, <= 2M
    links0        (k, 2M) int32     layer-0 neighbours (slots); -1 after count0
    upper_count   (R,) int32        degree of each upper-layer row, <= M
    upper_links   (R, M) int32      upper-layer neighbours; -1 after the count

Upper rows are grouped by node in batch order, layers 1..level, so R = sum(max(level, 0))
and node i's rows start at the cumulative sum of the levels before it. Arrays are
little-endian and C-ordered (in JS: Int32Array, BigInt64Array for ids, Int8Array,
Float32Array). There is no separate deleted list: a slot below n_slots is free when its
level is -1, or when a snapshot does not list it.

``snapshot()`` is the batch of every live slot (a slot below n_slots that it does not list
is free). ``export_nodes(dirty_since(mark))`` is the batch of every slot changed since
``mark`` (an earlier ``version``), freed slots included with level -1. A store that writes
each such batch and the meta in one transaction, and keeps per slot the latest record,
holds at every commit a state ``HNSW.restore`` accepts; so does a store that keeps a base
snapshot plus the list of committed deltas and replays them with ``import_nodes``. A tab
closed between commits comes back as of the last commit.

``restore`` and ``import_nodes`` check every array's dtype, shape and range, and the graph
they produce (links to live slots of high enough level, unique ids, a valid entry point)
before changing anything, and raise ``CorruptIndexError`` naming the field otherwise.
"""

from __future__ import annotations

import bisect
import heapq
import math
from typing import Any

import numpy as np

from tabmesh.errors import TabmeshError

FORMAT_VERSION = 1
MAX_LEVEL = 31          # P(level > 31) = M**-31: never reached, but keeps int8 levels safe
_NORM_TOLERANCE = 1e-3  # stored vectors must have |norm - 1| below this


class HNSWError(TabmeshError):
    """A call to the HNSW index was given something it cannot use (wrong dimension, a
    zero or NaN vector, a duplicate or unknown id). The message names the item."""

    code = "hnsw_error"


class CorruptIndexError(HNSWError):
    """A stored HNSW index (snapshot or node batch) is damaged or from another format.
    Delete the stored index and re-index the documents."""

    code = "corrupt_index"


class HNSW:
    """An HNSW index of unit vectors under cosine similarity; external ids are int64."""

    def __init__(self, dim: int, M: int = 16, ef_construction: int = 100, ef: int = 50,
                 seed: int = 0, capacity: int = 1024) -> None:
        for name, value, low in (("dim", dim, 1), ("M", M, 2), ("ef_construction",
                                 ef_construction, 1), ("ef", ef, 1), ("capacity", capacity, 1)):
            if not isinstance(value, (int, np.integer)) or value < low:
                raise HNSWError(f"HNSW {name} must be an integer >= {low}, got {value!r}")
        self.dim, self.M, self.seed = int(dim), int(M), int(seed)
        self._ef_construction, self._ef = int(ef_construction), int(ef)
        self._mult = 1.0 / math.log(self.M)
        self._n_slots = 0                 # slots ever used (high-water mark)
        self._count = 0                   # live items
        self._entry, self._max_level = -1, -1
        self._n_inserted = 0              # items ever added: seeds level draws
        self._version = 0                 # bumped by every mutating call
        self._slot_of: dict[int, int] = {}
        self._free_slots: list[int] = []  # min-heap of free slots below _n_slots
        self._cap = 0
        self._vecs = np.zeros((0, self.dim), np.float32)     # (cap, dim) unit vectors
        self._ids = np.zeros(0, np.int64)                    # (cap,)
        self._levels = np.zeros(0, np.int8)                  # (cap,) -1 = free
        self._links0 = np.zeros((0, 2 * self.M), np.int32)   # (cap, 2M) -1 padded
        self._count0 = np.zeros(0, np.int32)                 # (cap,)
        self._touched = np.zeros(0, np.int64)                # (cap,) version of last change
        self._beam = 4
        self._tag = 0
        self._visit = np.zeros(1, np.int32)  # (cap + 1,) visit tags; the last for -1
        # Upper layers: node -> its rows (layer 1..level) in one pool of M-wide rows.
        self._up: dict[int, list[int]] = {}
        self._up_links = np.zeros((0, self.M), np.int32)     # (rows, M) -1 padded
        self._up_count = np.zeros(0, np.int32)               # (rows,)
        self._free_rows: list[int] = []
        self._grow(int(capacity))

    # --- public state -----------------------------------------------------------------

    def __len__(self) -> int:
        return self._count

    def __contains__(self, item_id: int) -> bool:
        return int(item_id) in self._slot_of

    @property
    def ef(self) -> int:
        """Default search breadth (the size of the result heap); raise it for recall."""
        return self._ef

    @ef.setter
    def ef(self, value: int) -> None:
        self._ef = _positive("ef", value)

    @property
    def ef_construction(self) -> int:
        """Search breadth while inserting; applies to items added from now on."""
        return self._ef_construction

    @ef_construction.setter
    def ef_construction(self, value: int) -> None:
        self._ef_construction = _positive("ef_construction", value)

    @property
    def version(self) -> int:
        """Change counter: pass it to ``dirty_since`` later to get what changed after now."""
        return self._version

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids (n,) int64, unit vectors (n, dim) float32) of the live items, in slot order."""
        live = np.flatnonzero(self._levels[:self._n_slots] >= 0)
        return self._ids[live].copy(), self._vecs[live].copy()

    # --- insert -----------------------------------------------------------------------

    def add(self, ids, vectors) -> None:
        """Insert items (ids: n ints, vectors: (n, dim) or (dim,)); vectors are normalized.
        Raises HNSWError, before changing anything, on a bad vector or a duplicate id."""
        ids = _as_ids(ids)
        vecs = self._unit_rows(vectors, "vector", ids)
        if len(vecs) != len(ids):
            raise HNSWError(f"add got {len(ids)} ids for {len(vecs)} vectors")
        uniq, first = np.unique(ids, return_index=True)
        if len(uniq) != len(ids):
            dup = ids[np.setdiff1d(np.arange(len(ids)), first)[0]]
            raise HNSWError(f"id {dup} appears twice in one add call")
        present = [int(i) for i in ids if int(i) in self._slot_of]
        if present:
            raise HNSWError(f"{len(present)} ids are already in the index (first: {present[0]}); "
                            "delete them first to replace their vectors")
        if not len(ids):
            return
        self._version += 1
        rng = np.random.default_rng([self.seed, self._n_inserted])
        levels = np.minimum(-np.log1p(-rng.random(len(ids))) * self._mult, MAX_LEVEL).astype(int)
        self._n_inserted += len(ids)
        for item_id, vec, level in zip(ids.tolist(), vecs, levels.tolist()):
            slot = self._alloc_slot()
            self._vecs[slot] = vec
            self._ids[slot] = item_id
            self._levels[slot] = level
            self._up[slot] = [self._alloc_row() for _ in range(level)] if level else []
            self._slot_of[item_id] = slot
            self._count += 1
            self._touched[slot] = self._version
            self._insert(slot, level)

    def _insert(self, slot: int, level: int) -> None:
        q = self._vecs[slot]
        if self._entry < 0:
            self._entry, self._max_level = slot, level
            return
        ep = self._entry
        sim = float(self._vecs[ep] @ q)
        for lev in range(self._max_level, level, -1):
            ep, sim = self._greedy(q, ep, sim, lev)
        for lev in range(min(level, self._max_level), -1, -1):
            found_sims, found = self._search_layer(q, ep, sim, self.ef_construction, lev)
            cand = np.array(found, np.int32)
            chosen = self._select(cand, np.array(found_sims, np.float32), self._vecs[cand], self.M)
            self._set_links(slot, lev, chosen)
            max_degree = 2 * self.M if lev == 0 else self.M
            for nb in chosen.tolist():
                self._link(nb, slot, lev, max_degree)
            ep, sim = found[0], found_sims[0]  # the closest enters the next layer (hnswlib)
        if level > self._max_level:
            self._entry, self._max_level = slot, level

    def _link(self, node: int, new: int, level: int, max_degree: int) -> None:
        """Add ``new`` to ``node``'s list at ``level``, pruning with the heuristic if full."""
        table, counts, row = self._table(node, level)
        n = int(counts[row])
        if n < max_degree:
            table[row, n] = new
            counts[row] = n + 1
            self._touched[node] = self._version
            return
        cand = np.append(table[row, :n], np.int32(new))
        X = self._vecs[cand]
        sims = X @ self._vecs[node]
        order = np.argsort(-sims, kind="stable")
        chosen = self._select(cand[order], sims[order], X[order], max_degree)
        if not np.array_equal(chosen, cand[:n]):  # dirty tracking stays exact
            self._store(table, counts, row, chosen)
            self._touched[node] = self._version

    def _select(self, cand: np.ndarray, sims: np.ndarray, X: np.ndarray, m: int) -> np.ndarray:
        """The neighbour-selection heuristic: walk candidates best first and keep one unless
        a kept neighbour is closer to it than the base is. cand/sims/X sorted by sims desc.

        Each kept candidate costs one matvec that rules out everything it dominates. (One
        matmul for a block of candidates does fewer numpy calls but more flops, and BLAS
        threads on a busy machine make it many times slower.)"""
        if len(cand) < m:  # as hnswlib: exactly m candidates still go through the heuristic
            return cand
        alive = np.ones(len(cand), bool)
        keep = [0]
        i = 0
        while len(keep) < m and i + 1 < len(cand):
            alive &= (X @ X[i]) <= sims
            j = int(alive[i + 1:].argmax()) + i + 1
            if not alive[j]:
                break
            keep.append(j)
            i = j
        return cand[keep]

    # --- search -----------------------------------------------------------------------

    def search(self, query, k: int, ef: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The (approximately) ``k`` most similar live items: (ids (k',) int64, cosine
        scores (k',) float32), best first, k' = min(k, len(self)). ``ef`` (default
        ``self.ef``, at least k) trades speed for recall."""
        q = self._unit_rows(query, "query")[0]
        sims, slots = self._search(q, _positive("k", k), ef)
        return self._ids[np.array(slots, np.int64)], np.array(sims, np.float32)

    def search_many(self, queries, k: int, ef: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``search`` for each row of queries (q, dim): (ids (q, k'), scores (q, k')).
        A row that found fewer than k' items (a graph cut off by deletes) is padded with
        id -1 and score -inf."""
        Q = self._unit_rows(queries, "query")
        k = _positive("k", k)
        k_out = min(k, self._count)
        ids = np.full((len(Q), k_out), -1, np.int64)
        scores = np.full((len(Q), k_out), -np.inf, np.float32)
        for i, q in enumerate(Q):
            sims, slots = self._search(q, k, ef)
            ids[i, :len(slots)] = self._ids[np.array(slots, np.int64)]
            scores[i, :len(slots)] = sims
        return ids, scores

    def _search(self, q: np.ndarray, k: int, ef: int | None) -> tuple[list[float], list[int]]:
        if self._entry < 0:
            return [], []
        ep = self._entry
        sim = float(self._vecs[ep] @ q)
        for lev in range(self._max_level, 0, -1):
            ep, sim = self._greedy(q, ep, sim, lev)
        ef = self._ef if ef is None else _positive("ef", ef)
        sims, slots = self._search_layer(q, ep, sim, max(ef, k), 0)
        return sims[:k], slots[:k]

    def _greedy(self, q: np.ndarray, ep: int, sim: float, level: int) -> tuple[int, float]:
        """Hill-climb on one upper layer: move to the best neighbour while it improves."""
        while True:
            table, counts, row = self._table(ep, level)
            nb = table[row, :counts[row]]
            if not nb.size:
                return ep, sim
            sims = self._vecs[nb] @ q
            j = int(sims.argmax())
            if sims[j] <= sim:
                return ep, sim
            ep, sim = int(nb[j]), float(sims[j])

    def _search_layer(self, q: np.ndarray, ep: int, sim: float, ef: int,
                      level: int) -> tuple[list[float], list[int]]:
        """Best-first search of one layer from ``ep`` (whose similarity to q is ``sim``):
        the best ``ef`` found as (sims, slots), best first.

        The frontier lives inside the result pool itself (a list sorted best first, with a
        cursor before which every node is expanded), as in NSG/DiskANN; that stops exactly
        where hnswlib's two heaps stop, since a node that drops out of the top ``ef`` would
        only end the search when popped. Each round expands up to ``_beam`` nodes with one
        gather and one matvec over their unvisited neighbours (``_beam = 1`` is hnswlib's
        search, step for step). A neighbour that scores below the pool's worst once the pool
        is full never enters it later (the bound only rises), so it costs no Python work."""
        vecs = self._vecs
        if level == 0:
            table, counts, up = self._links0, self._count0, None
        else:
            table, counts, up = self._up_links, self._up_count, self._up
        self._tag += 1
        if self._tag == 2**31 - 1:
            self._visit[:] = 0
            self._tag = 1
        tag, visit = self._tag, self._visit
        visit[-1] = tag                        # the sentinel that -1 padding reads
        visit[ep] = tag
        neg, pool = [-sim], [ep]               # pool by negated similarity: best first
        seen, expanded = {ep}, set()
        cursor, beam = 0, self._beam
        insert = bisect.bisect_right
        while True:
            rows = []
            n = len(pool)
            while cursor < n and len(rows) < beam:
                c = pool[cursor]
                cursor += 1
                if c not in expanded:
                    expanded.add(c)
                    rows.append(c if up is None else up[c][level - 1])
            if not rows:
                break
            if len(rows) == 1:
                nb = table[rows[0], :counts[rows[0]]]
            else:
                nb = table[rows].ravel()
            nb = nb[visit[nb] != tag]
            if not nb.size:
                continue
            visit[nb] = tag
            s = vecs[nb] @ q
            full = n >= ef
            if full:
                better = s > -neg[-1]
                if not better.any():
                    continue
                nb, s = nb[better], s[better]
            for d, v in zip((-s).tolist(), nb.tolist()):
                if v in seen:
                    continue
                seen.add(v)
                if full and d >= neg[-1]:
                    continue
                at = insert(neg, d)
                neg.insert(at, d)
                pool.insert(at, v)
                if at < cursor:
                    cursor = at
                if full:
                    neg.pop()
                    pool.pop()
                elif len(pool) >= ef:
                    full = True
        return [-d for d in neg], pool

    # --- delete -----------------------------------------------------------------------

    def delete(self, ids, missing_ok: bool = False) -> int:
        """Remove items by id and repair the graph around them; returns how many were
        removed. Unknown ids raise HNSWError (before any change) unless ``missing_ok``."""
        ids = _as_ids(ids)
        missing = [int(i) for i in ids if int(i) not in self._slot_of]
        if missing and not missing_ok:
            raise HNSWError(f"{len(missing)} ids are not in the index (first: {missing[0]})")
        slots = sorted({self._slot_of[int(i)] for i in ids if int(i) in self._slot_of})
        if not slots:
            return 0
        self._version += 1
        n = self._n_slots
        dead = np.zeros(n, bool)
        dead[slots] = True
        for lev in range(self._max_level + 1):
            nodes, rows, table, counts = self._layer_rows(lev)
            lists = table[rows]
            hit = (lists >= 0) & dead[lists] & (np.arange(lists.shape[1]) < counts[rows][:, None])
            for node in nodes[hit.any(axis=1) & ~dead[nodes]].tolist():
                self._repair(node, lev, dead)
        for slot in slots:
            for row in self._up.pop(slot):
                self._store(self._up_links, self._up_count, row, np.zeros(0, np.int32))
                heapq.heappush(self._free_rows, row)
            self._store(self._links0, self._count0, slot, np.zeros(0, np.int32))
            del self._slot_of[int(self._ids[slot])]
            self._vecs[slot], self._ids[slot], self._levels[slot] = 0, 0, -1
            self._touched[slot] = self._version
            heapq.heappush(self._free_slots, slot)
        self._count -= len(slots)
        if dead[self._entry]:
            levels = self._levels[:n]
            self._max_level = int(levels.max()) if self._count else -1
            self._entry = int(np.argmax(levels == self._max_level)) if self._count else -1
        return len(slots)

    def _repair(self, node: int, level: int, dead: np.ndarray) -> None:
        """Re-select ``node``'s neighbours at ``level`` without the dead: candidates are its
        live neighbours and the live neighbours of its dead ones."""
        table, counts, row = self._table(node, level)
        cur = table[row, :counts[row]]
        parts = [cur]
        for gone in cur[dead[cur]].tolist():
            t, c, r = self._table(gone, level)
            parts.append(t[r, :c[r]])
        cand = np.unique(np.concatenate(parts))
        cand = cand[~dead[cand] & (cand != node)]
        if not cand.size:  # every route went through the dead: search for new neighbours
            v, ep = self._vecs[node], self._entry  # the old entry is on every layer
            found = self._search_layer(v, ep, float(self._vecs[ep] @ v),
                                       self.ef_construction, level)[1]
            cand = np.array([s for s in found if not dead[s] and s != node
                             and self._levels[s] >= level], np.int32)
        X = self._vecs[cand]
        sims = X @ self._vecs[node]
        order = np.argsort(-sims, kind="stable")
        max_degree = 2 * self.M if level == 0 else self.M
        chosen = self._select(cand[order], sims[order], X[order], max_degree)
        self._store(table, counts, row, chosen)
        self._touched[node] = self._version

    # --- change tracking and persistence --------------------------------------------------

    def dirty_since(self, mark: int) -> np.ndarray:
        """Slots (sorted int32) changed after ``mark`` (a past ``version``): export these."""
        return np.flatnonzero(self._touched[:self._n_slots] > int(mark)).astype(np.int32)

    def meta(self) -> dict[str, Any]:
        """The JSON-able metadata of the index now (see the module docstring)."""
        return {"format": FORMAT_VERSION, "dim": self.dim, "M": self.M,
                "ef_construction": self.ef_construction, "ef": self.ef, "seed": self.seed,
                "n_slots": self._n_slots, "count": self._count, "entry": self._entry,
                "max_level": self._max_level, "n_inserted": self._n_inserted,
                "version": self._version}

    def snapshot(self) -> dict[str, Any]:
        """The whole index as a node batch of its live slots."""
        return self.export_nodes(np.flatnonzero(self._levels[:self._n_slots] >= 0))

    def export_nodes(self, slots) -> dict[str, Any]:
        """A node batch (module docstring) of the given slots, with the current meta."""
        slots = np.asarray(slots, dtype=np.int64).reshape(-1)
        if slots.size and (slots.min() < 0 or slots.max() >= self._n_slots):
            raise HNSWError(f"export_nodes: slots must lie in 0..{self._n_slots - 1}")
        slots = slots.astype(np.int32)
        rows = [r for s in slots.tolist() for r in self._up.get(s, [])]
        return {"meta": self.meta(), "slots": slots, "ids": self._ids[slots],
                "levels": self._levels[slots], "vectors": self._vecs[slots],
                "count0": self._count0[slots], "links0": self._links0[slots],
                "upper_count": self._up_count[rows], "upper_links": self._up_links[rows]}

    @classmethod
    def restore(cls, snapshot: dict[str, Any]) -> "HNSW":
        """An index rebuilt from ``snapshot()`` output (or any node batch that describes a
        whole index); CorruptIndexError if anything in it is inconsistent."""
        meta = _check_meta(snapshot)
        index = cls(meta["dim"], meta["M"], meta["ef_construction"], meta["ef"], meta["seed"],
                    capacity=max(meta["n_slots"], 1))
        index.import_nodes(snapshot)
        return index

    def import_nodes(self, batch: dict[str, Any]) -> None:
        """Apply a node batch exported by an index with the same dim and M (a committed
        delta, or a snapshot onto an empty index). Everything is checked first: on
        CorruptIndexError the index is unchanged."""
        meta = _check_meta(batch)
        if (meta["dim"], meta["M"]) != (self.dim, self.M):
            raise CorruptIndexError(f"node batch has dim={meta['dim']}, M={meta['M']}; this "
                                    f"index has dim={self.dim}, M={self.M}")
        if meta["n_slots"] < self._n_slots:
            raise CorruptIndexError(f"node batch has n_slots={meta['n_slots']}, fewer than the "
                                    f"{self._n_slots} slots this index already uses")
        b = _check_arrays(batch, meta)
        self._check_merged(b, meta)
        self._grow(meta["n_slots"])
        slots, levels = b["slots"], b["levels"]
        for slot in slots[self._levels[slots] >= 0].tolist():
            del self._slot_of[int(self._ids[slot])]
        for slot in slots.tolist():
            for row in self._up.pop(slot, []):
                self._store(self._up_links, self._up_count, row, np.zeros(0, np.int32))
                heapq.heappush(self._free_rows, row)
        live = levels >= 0
        self._levels[slots] = levels
        self._touched[slots] = meta["version"]
        self._count0[slots], self._links0[slots] = b["count0"], b["links0"]
        self._vecs[slots] = np.where(live[:, None], b["vectors"], 0)
        self._ids[slots] = np.where(live, b["ids"], 0)
        self._slot_of.update(zip(b["ids"][live].tolist(), slots[live].tolist()))
        rows = [self._alloc_row() for _ in range(len(b["upper_count"]))]
        self._up_count[rows], self._up_links[rows] = b["upper_count"], b["upper_links"]
        at = 0
        for slot, level in zip(slots[levels > 0].tolist(), levels[levels > 0].tolist()):
            self._up[slot] = rows[at:at + level]
            at += level
        for slot in slots[levels == 0].tolist():
            self._up[slot] = []
        self._n_slots = meta["n_slots"]
        self._free_slots = np.flatnonzero(self._levels[:self._n_slots] < 0).tolist()
        self._count, self._entry, self._max_level = meta["count"], meta["entry"], meta["max_level"]
        self._n_inserted, self._version = meta["n_inserted"], meta["version"]
        self.ef_construction, self.ef, self.seed = meta["ef_construction"], meta["ef"], meta["seed"]

    def _check_merged(self, b: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """The graph after applying batch ``b`` must be whole: links only to live slots of a
        high enough level, unique live ids, the entry point on the top level."""
        n, slots = meta["n_slots"], b["slots"]
        levels = np.full(n, -1, np.int64)
        levels[:self._n_slots] = self._levels[:self._n_slots]
        levels[slots] = b["levels"]
        live = levels >= 0
        if int(live.sum()) != meta["count"]:
            _corrupt(f"meta count={meta['count']} but the index would hold {int(live.sum())} "
                     "live slots")
        top = int(levels.max()) if n else -1
        if meta["max_level"] != top:
            _corrupt(f"meta max_level={meta['max_level']} but the highest live level is {top}")
        if (meta["entry"] < 0) != (top < 0) or (top >= 0 and levels[meta["entry"]] != top):
            _corrupt(f"meta entry={meta['entry']} is not a live slot on the top level {top}")
        ids = np.zeros(n, np.int64)
        ids[:self._n_slots] = self._ids[:self._n_slots]
        ids[slots] = b["ids"]
        if len(np.unique(ids[live])) != int(live.sum()):
            _corrupt("two live slots carry the same id")
        in_batch = np.zeros(n, bool)
        in_batch[slots] = True
        old = np.flatnonzero(live[:self._n_slots] & ~in_batch[:self._n_slots])
        _check_links("links0", b["links0"], b["count0"], slots, levels, 0)
        _check_links("existing layer-0 links", self._links0[old], self._count0[old], old, levels, 0)
        up_slots = np.repeat(slots, np.maximum(b["levels"], 0))
        up_levels = _layer_numbers(b["levels"])
        _check_links("upper_links", b["upper_links"], b["upper_count"], up_slots, levels,
                     up_levels)
        old_up = [(s, lev + 1, r) for s in old.tolist() for lev, r in enumerate(self._up[s])]
        if old_up:
            s, lev, r = (np.array(x) for x in zip(*old_up))
            _check_links("existing upper links", self._up_links[r], self._up_count[r], s,
                         levels, lev)

    # --- storage internals ----------------------------------------------------------------

    def _table(self, node: int, level: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(links table, counts, row) holding ``node``'s neighbours at ``level``."""
        if level == 0:
            return self._links0, self._count0, node
        return self._up_links, self._up_count, self._up[node][level - 1]

    def _layer_rows(self, level: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(nodes, their rows, table, counts) of every live node on ``level``."""
        if level == 0:
            nodes = np.flatnonzero(self._levels[:self._n_slots] >= 0)
            return nodes, nodes, self._links0, self._count0
        pairs = [(s, r[level - 1]) for s, r in self._up.items() if len(r) >= level]
        nodes, rows = (np.array(x, np.int64) for x in zip(*pairs)) if pairs else (
            np.zeros(0, np.int64), np.zeros(0, np.int64))
        return nodes, rows, self._up_links, self._up_count

    def _set_links(self, node: int, level: int, nbrs: np.ndarray) -> None:
        table, counts, row = self._table(node, level)
        self._store(table, counts, row, nbrs)

    @staticmethod
    def _store(table: np.ndarray, counts: np.ndarray, row: int, nbrs: np.ndarray) -> None:
        table[row, :len(nbrs)] = nbrs
        table[row, len(nbrs):] = -1
        counts[row] = len(nbrs)

    def _alloc_slot(self) -> int:
        if self._free_slots:
            return heapq.heappop(self._free_slots)
        if self._n_slots == self._cap:
            self._grow(2 * self._cap)
        self._n_slots += 1
        return self._n_slots - 1

    def _alloc_row(self) -> int:
        if self._free_rows:
            return heapq.heappop(self._free_rows)
        n = len(self._up_count)
        self._up_links = np.concatenate([self._up_links, np.full((max(n, 16), self.M), -1,
                                                                  np.int32)])
        self._up_count = np.concatenate([self._up_count, np.zeros(max(n, 16), np.int32)])
        self._free_rows = list(range(n + 1, len(self._up_count)))
        return n

    def _grow(self, cap: int) -> None:
        """Make room for ``cap`` slots (never shrinks)."""
        if cap <= self._cap:
            return
        def grown(a: np.ndarray, fill) -> np.ndarray:
            out = np.full((cap,) + a.shape[1:], fill, a.dtype)
            out[:len(a)] = a
            return out
        self._vecs, self._ids = grown(self._vecs, 0), grown(self._ids, 0)
        self._levels, self._links0 = grown(self._levels, -1), grown(self._links0, -1)
        self._count0, self._touched = grown(self._count0, 0), grown(self._touched, 0)
        self._visit = np.zeros(cap + 1, np.int32)
        self._tag = 0
        self._cap = cap

    def _unit_rows(self, x, what: str, ids: np.ndarray | None = None) -> np.ndarray:
        """(n, dim) float32 unit rows from (n, dim) or (dim,); HNSWError naming a bad row."""
        x = np.asarray(x)
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2 or x.shape[1] != self.dim or x.dtype.kind not in "fiu":
            raise HNSWError(f"{what}s must be numbers of shape (n, {self.dim}) or "
                            f"({self.dim},), got {x.dtype} {x.shape}")
        x = x.astype(np.float64)
        norms = np.linalg.norm(x, axis=1)
        bad = np.flatnonzero(~np.isfinite(norms) | (norms < 1e-30))
        if bad.size:
            i = int(bad[0])
            name = f"{what} {i}" + (f" (id {int(ids[i])})" if ids is not None and
                                    i < len(ids) else "")
            problem = "is all zeros" if np.isfinite(norms[i]) else "has NaN or infinite values"
            raise HNSWError(f"{name} {problem}; cosine similarity needs a finite, nonzero "
                            "vector (check the embedding step)")
        return (x / norms[:, None]).astype(np.float32)


# --- batch validation ---------------------------------------------------------------------

_ARRAYS = {  # name: (dtype, shape given (k, R, dim, M))
    "slots": (np.int32, lambda k, R, d, m: (k,)),
    "ids": (np.int64, lambda k, R, d, m: (k,)),
    "levels": (np.int8, lambda k, R, d, m: (k,)),
    "vectors": (np.float32, lambda k, R, d, m: (k, d)),
    "count0": (np.int32, lambda k, R, d, m: (k,)),
    "links0": (np.int32, lambda k, R, d, m: (k, 2 * m)),
    "upper_count": (np.int32, lambda k, R, d, m: (R,)),
    "upper_links": (np.int32, lambda k, R, d, m: (R, m)),
}
_META_INTS = {"format": 1, "dim": 1, "M": 2, "ef_construction": 1, "ef": 1, "n_slots": 0,
              "count": 0, "entry": -1, "max_level": -1, "n_inserted": 0, "version": 0}


def _corrupt(message: str):
    raise CorruptIndexError(f"stored HNSW index is corrupted: {message}; delete the stored "
                            "index and re-index the documents")


def _check_meta(batch: Any) -> dict[str, Any]:
    if not isinstance(batch, dict) or not isinstance(batch.get("meta"), dict):
        _corrupt("expected a dict with a 'meta' dict")
    meta = dict(batch["meta"])
    for key, low in _META_INTS.items():
        v = meta.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
            _corrupt(f"meta {key}={v!r} is not an integer >= {low}")
        meta[key] = int(v)
    if not isinstance(meta.get("seed"), (int, np.integer)) or isinstance(meta["seed"], bool):
        _corrupt(f"meta seed={meta.get('seed')!r} is not an integer")
    meta["seed"] = int(meta["seed"])
    if meta["format"] != FORMAT_VERSION:
        _corrupt(f"format {meta['format']} is not {FORMAT_VERSION} (written by another "
                 "version of tabmesh)")
    if meta["entry"] >= meta["n_slots"] or meta["max_level"] > MAX_LEVEL:
        _corrupt(f"meta entry={meta['entry']} / max_level={meta['max_level']} out of range")
    return meta


def _check_arrays(batch: dict[str, Any], meta: dict[str, Any]) -> dict[str, np.ndarray]:
    """Dtype and shape of every array, and the ranges that need no other state."""
    out = {}
    for name, (dtype, _) in _ARRAYS.items():
        a = batch.get(name)
        if not isinstance(a, np.ndarray) or a.dtype != dtype:
            _corrupt(f"{name} must be a numpy {np.dtype(dtype).name} array, got "
                     f"{getattr(a, 'dtype', type(a).__name__)}")
        out[name] = a
    k = len(out["slots"]) if out["slots"].ndim == 1 else -1
    levels = out["levels"]
    if levels.shape == (k,) and levels.size and (levels.min() < -1 or levels.max() > MAX_LEVEL):
        _corrupt(f"levels must lie in -1..{MAX_LEVEL}")
    R = int(np.maximum(levels, 0).sum()) if levels.shape == (k,) else -1
    for name, (_, shape) in _ARRAYS.items():
        want = shape(k, R, meta["dim"], meta["M"])
        if out[name].shape != want:
            _corrupt(f"{name} has shape {out[name].shape}, expected {want}")
    slots = out["slots"]
    if slots.size and (slots.min() < 0 or slots.max() >= meta["n_slots"]):
        _corrupt(f"slots must lie in 0..{meta['n_slots'] - 1}")
    if len(np.unique(slots)) != k:
        _corrupt("slots repeat")
    live = levels >= 0
    norms = np.linalg.norm(out["vectors"][live].astype(np.float64), axis=1)
    if not np.all(np.abs(norms - 1) < _NORM_TOLERANCE):  # also catches NaN
        i = int(np.flatnonzero(live)[np.flatnonzero(~(np.abs(norms - 1) < _NORM_TOLERANCE))[0]])
        _corrupt(f"vectors[{i}] (slot {int(slots[i])}) is not a finite unit vector")
    for cname, width in (("count0", 2 * meta["M"]), ("upper_count", meta["M"])):
        c = out[cname]
        if c.size and (c.min() < 0 or c.max() > width):
            _corrupt(f"{cname} must lie in 0..{width}")
    if np.any(out["count0"][~live]):
        _corrupt("a free slot (level -1) has layer-0 links")
    out["links0"] = _padded(out["links0"], out["count0"])
    out["upper_links"] = _padded(out["upper_links"], out["upper_count"])
    return out


def _padded(links: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """A copy of ``links`` with -1 after each row's count."""
    return np.where(np.arange(links.shape[1]) < counts[:, None], links, -1).astype(np.int32)


def _layer_numbers(levels: np.ndarray) -> np.ndarray:
    """For upper rows grouped by node (layers 1..level each), the layer of each row."""
    # intp, not int64: np.repeat casts its counts to intp "safely", and intp is int32 in
    # Pyodide (wasm32), so int64 counts fail there (restore of any graph with upper layers)
    lv = np.maximum(levels.astype(np.intp), 0)
    starts = np.repeat(np.cumsum(lv) - lv, lv)
    return np.arange(int(lv.sum())) - starts + 1


def _check_links(name: str, links: np.ndarray, counts: np.ndarray, owners: np.ndarray,
                 levels: np.ndarray, layer) -> None:
    """Every link of ``owners`` (rows of ``links``) must name a distinct live slot other
    than the owner whose level reaches ``layer`` (an int or one per row)."""
    if not links.size:
        return
    used = np.arange(links.shape[1]) < counts[:, None]
    n = len(levels)
    bad = used & ((links < 0) | (links >= n))
    if bad.any():
        r, c = np.argwhere(bad)[0]
        _corrupt(f"{name}[{r}, {c}] = {links[r, c]} is outside 0..{n - 1}")
    safe = np.where(used, links, 0)
    layer = np.broadcast_to(np.asarray(layer)[..., None] if np.ndim(layer) else layer,
                            links.shape)
    bad = used & ((levels[safe] < layer) | (safe == owners[:, None]))
    if bad.any():
        r, c = np.argwhere(bad)[0]
        _corrupt(f"{name}[{r}, {c}] = {links[r, c]} links slot {int(owners[r])} to itself, a "
                 f"free slot, or a node below layer {int(layer[r, c])}")
    s = np.sort(np.where(used, links, -1 - np.arange(links.shape[1])), axis=1)
    if np.any(s[:, 1:] == s[:, :-1]):
        r = int(np.flatnonzero(np.any(s[:, 1:] == s[:, :-1], axis=1))[0])
        _corrupt(f"{name} row {r} (slot {int(owners[r])}) lists a neighbour twice")


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise HNSWError(f"HNSW {name} must be an integer >= 1, got {value!r}")
    return int(value)


def _as_ids(ids) -> np.ndarray:
    """(n,) int64 external ids from an int or a sequence of ints."""
    a = np.asarray(ids)
    if a.dtype.kind not in "iu" and not (a.size == 0 and a.dtype.kind == "f"):
        raise HNSWError(f"ids must be integers, got {a.dtype}")
    if a.dtype.kind == "u" and a.size and a.max() > np.iinfo(np.int64).max:
        raise HNSWError("ids must fit in int64")
    return a.astype(np.int64).reshape(-1)
