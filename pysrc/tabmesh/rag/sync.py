"""Delta replication of a shared collection between peers: a 2P-set of chunks with
tombstones, per-origin counters, and a validated binary wire format.

The model
---------
Every change to a collection is an operation with a globally unique id
``"<replica>:<seq>"``: ``replica`` is the collection's persistent random replica id (not
the mesh peer id, which changes on every reload), ``seq`` that replica's counter (1, 2,
...). Two kinds exist:

    add     (id, chunk: doc id and metadata, index, offsets, text, sha256, embedding)
            the chunk's key is the add's id, so two peers adding at once add two elements
    delete  (id, target = the id of the add it removes)

A replica's state is the set of adds it has seen minus the targets of every delete it has
seen (tombstones are kept, so a delete wins over an add it meets in any order, and a
deleted chunk never comes back). Applying an op is a set union, so ``apply`` is
idempotent, commutative and associative: replicas that have seen the same ops hold the
same chunks, whatever the order and repetition of delivery. A delete also marks its
target as seen, so a peer that learns of a delete never needs the dead add's payload.

Each replica records the op ids it has seen as ranges per origin (``Seen``: a version
vector whose entries may have gaps). Catch-up: a peer (re)connecting sends its ``Seen``
in a sync request; the other answers with ``deltas_since(collection, seen)``: every live
chunk and every tombstone the requester has not seen, in batches bounded by op count and
bytes (``more`` says to ask again with the updated ``Seen``). Ops of this replica that are
not committed to storage yet are never sent, so a crash cannot make a replica reuse a
sequence number that a peer already holds. New local ops reach peers as they commit
(``Collection.on_commit``).

Wire format (all integers little-endian)
----------------------------------------
Delta batch:

    offset  size  field
    0       4     magic        b"TMRD"
    4       1     version      WIRE_VERSION (1)
    5       3     reserved     zero
    8       4     header_len   u32, <= MAX_HEADER_BYTES
    12      4     n_vectors    u32, == number of adds
    16      4     dim          u32, 1..MAX_DIM
    20      ...   header       UTF-8 JSON (below), then zero padding to a multiple of 4
    ...           vectors      n_vectors * dim float32, row i = adds[i]; the message ends there

    header = {"collection": str, "sender": replica, "more": bool,
              "adds": [{"id", "doc", "src", "dsha", "dn", "dlen", "i", "s", "e", "text",
                        "sha"}],
              "dels": [{"id", "target"}]}

Sync request: b"TMRQ", version u8, 3 zero bytes, then UTF-8 JSON
``{"collection": str, "seen": {replica: [[lo, hi], ...]}}``.

``decode_message`` checks every field (ids' format, sizes, offsets against the text,
sha256 of the text, dimension, finite nonzero vectors, no op twice) and raises
``DeltaError`` naming the field; nothing is applied from a malformed message.
"""

from __future__ import annotations

import bisect
import json
import re
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from tabmesh.errors import TabmeshError
from tabmesh.rag.chunking import content_hash

if TYPE_CHECKING:  # pragma: no cover
    from tabmesh.rag.store import ApplyResult, Collection

__all__ = ["DeltaError", "Seen", "ChunkAdd", "ChunkDelete", "DeltaBatch", "SyncRequest",
           "deltas_since", "apply", "encode_deltas", "encode_sync_request", "decode_message",
           "op_id", "split_op_id", "WIRE_VERSION"]

WIRE_VERSION = 1
DELTA_MAGIC, REQUEST_MAGIC = b"TMRD", b"TMRQ"
_PREFIX = struct.Struct("<4sB3xIII")
MAX_MESSAGE_BYTES = 48 * 1024 * 1024   # under the 64 MiB peer-frame message limit
MAX_HEADER_BYTES = 32 * 1024 * 1024
MAX_REQUEST_BYTES = 4 * 1024 * 1024
MAX_OPS = 65536                        # adds + deletes in one batch
MAX_DIM = 4096
MAX_TEXT_CHARS = 200_000               # one chunk
MAX_SOURCE_CHARS = 1024
MAX_SEQ = 2**53 - 1                    # JSON numbers stay exact in JS
MAX_DOC_CHUNKS = 10_000_000
MAX_DOC_LENGTH = 2**40
MAX_ORIGINS = 100_000
MAX_RANGES = 1_000_000

REPLICA_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")
_OP_RE = re.compile(r"([A-Za-z0-9_-]{1,32}):([1-9][0-9]{0,15})")
_DOC_RE = re.compile(r"[A-Za-z0-9_-]{1,32}/[1-9][0-9]{0,15}")
COLLECTION_RE = re.compile(r"[A-Za-z0-9 _.-]{1,64}")
_SHA_RE = re.compile(r"[0-9a-f]{64}")
LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # not UTF-8 encodable: never on the wire


class DeltaError(TabmeshError):
    """A replication message from a peer is malformed (the message names the field), or
    does not fit this collection. Nothing from it was applied; the peer runs another or
    a broken version of tabmesh."""

    code = "bad_delta"


def op_id(replica: str, seq: int) -> str:
    return f"{replica}:{seq}"


def split_op_id(key: str) -> tuple[str, int]:
    """("replica", seq) of an op id; DeltaError if it is not ``replica:seq``."""
    m = _OP_RE.fullmatch(key) if isinstance(key, str) else None
    if m is None or int(m.group(2)) > MAX_SEQ:
        raise DeltaError(f"op id {key!r:.80} is not 'replica:seq' (replica 1-32 of "
                         f"[A-Za-z0-9_-], seq 1..{MAX_SEQ})")
    return m.group(1), int(m.group(2))


class Seen:
    """The op ids a replica has seen: per origin, sorted disjoint inclusive [lo, hi] ranges."""

    def __init__(self) -> None:
        self._lo: dict[str, list[int]] = {}
        self._hi: dict[str, list[int]] = {}

    def __contains__(self, key: str) -> bool:
        origin, seq = split_op_id(key)
        lo = self._lo.get(origin)
        if not lo:
            return False
        i = bisect.bisect_right(lo, seq) - 1
        return i >= 0 and seq <= self._hi[origin][i]

    def add(self, key: str) -> bool:
        """Record ``key``; True if it was not seen before."""
        origin, seq = split_op_id(key)
        lo, hi = self._lo.setdefault(origin, []), self._hi.setdefault(origin, [])
        i = bisect.bisect_right(lo, seq) - 1
        if i >= 0 and seq <= hi[i]:
            return False
        joins_left = i >= 0 and hi[i] == seq - 1
        joins_right = i + 1 < len(lo) and lo[i + 1] == seq + 1
        if joins_left and joins_right:
            hi[i] = hi[i + 1]
            del lo[i + 1], hi[i + 1]
        elif joins_left:
            hi[i] = seq
        elif joins_right:
            lo[i + 1] = seq
        else:
            lo.insert(i + 1, seq)
            hi.insert(i + 1, seq)
        return True

    def vector(self) -> dict[str, int]:
        """The classic version vector: per origin, the n such that 1..n are all seen."""
        return {o: (self._hi[o][0] if lo and lo[0] == 1 else 0) for o, lo in self._lo.items()}

    def to_json(self) -> dict[str, list[list[int]]]:
        return {o: [[a, b] for a, b in zip(lo, self._hi[o])] for o, lo in self._lo.items() if lo}

    @classmethod
    def from_json(cls, data: Any, what: str = "seen") -> "Seen":
        """From ``to_json`` output, or a plain version vector {origin: n}; DeltaError if bad."""
        if not isinstance(data, dict) or len(data) > MAX_ORIGINS:
            raise DeltaError(f"{what} must be an object of at most {MAX_ORIGINS} origins")
        seen = cls()
        total = 0
        for origin, ranges in data.items():
            if not isinstance(origin, str) or not REPLICA_RE.fullmatch(origin):
                raise DeltaError(f"{what} has a bad replica id {origin!r:.40}")
            if _is_int(ranges):
                ranges = [[1, ranges]] if ranges > 0 else []
            if not isinstance(ranges, list):
                raise DeltaError(f"{what}[{origin}] must be a list of [lo, hi] ranges or a count")
            total += len(ranges)
            if total > MAX_RANGES:
                raise DeltaError(f"{what} has more than {MAX_RANGES} ranges")
            prev = 0
            for r in ranges:
                if (not isinstance(r, list) or len(r) != 2 or not all(map(_is_int, r))
                        or not prev < r[0] <= r[1] <= MAX_SEQ):
                    raise DeltaError(f"{what}[{origin}] ranges must be sorted, disjoint "
                                     f"[lo, hi] with 1 <= lo <= hi <= {MAX_SEQ}; got {r!r:.60}")
                if r[0] == prev + 1 and seen._hi.get(origin):
                    seen._hi[origin][-1] = r[1]
                else:
                    seen._lo.setdefault(origin, []).append(r[0])
                    seen._hi.setdefault(origin, []).append(r[1])
                prev = r[1]
        return seen


@dataclass(frozen=True)
class ChunkAdd:
    """An add op: the chunk ``key`` (= the op id) of document ``doc_id`` (its source name,
    sha256, chunk count and length travel with every chunk), chunk ``index`` covering
    ``[start, end)`` of the document, its ``text`` and ``sha256`` (chunking.content_hash),
    and its embedding ``vector`` ((dim,) float32; None only for a local add whose text
    is already indexed)."""

    key: str
    doc_id: str
    source: str
    doc_sha256: str
    doc_chunks: int
    doc_length: int
    index: int
    start: int
    end: int
    text: str
    sha256: str
    vector: np.ndarray | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class ChunkDelete:
    """A delete op: ``key`` its own id, ``target`` the id of the add it removes."""

    key: str
    target: str


@dataclass
class DeltaBatch:
    """Ops of one collection from ``sender``; ``more``: the sender had more to send."""

    collection: str
    sender: str
    dim: int
    adds: list[ChunkAdd]
    deletes: list[ChunkDelete]
    more: bool = False


@dataclass
class SyncRequest:
    """"Send me what I have not seen": the requester's Seen for one collection."""

    collection: str
    seen: Seen


def deltas_since(collection: "Collection", seen: Seen | Mapping | None = None,
                 max_ops: int = 1024, max_bytes: int = 16 * 1024 * 1024) -> DeltaBatch:
    """The committed ops of ``collection`` that ``seen`` lacks (live chunks with their
    embeddings, and tombstones), sorted by (origin, seq), at most ``max_ops`` ops and about
    ``max_bytes``; ``more`` is set when some were held back. ``seen`` may be a Seen, its
    JSON, or a version vector {replica: n}."""
    if not isinstance(seen, Seen):
        seen = Seen.from_json(seen or {})
    max_ops = max(1, min(int(max_ops), MAX_OPS))
    max_bytes = min(int(max_bytes), MAX_MESSAGE_BYTES - 1024 * 1024)
    pending = [(split_op_id(k), k, "add") for k in collection.chunk_keys()
               if k not in seen and collection.is_committed(k)]
    pending += [(split_op_id(k), k, "del") for k in collection.tombstones()
                if k not in seen and collection.is_committed(k)]
    pending.sort()
    adds: list[ChunkAdd] = []
    dels: list[ChunkDelete] = []
    size, more = 0, False
    for n, (_, key, kind) in enumerate(pending):
        if kind == "add":
            op = collection.chunk_add(key)
            cost = 4 * collection.dim + len(op.text.encode()) + len(op.source.encode()) + 300
        else:
            op = ChunkDelete(key, collection.tombstones()[key])
            cost = 120
        if n >= max_ops or (n and size + cost > max_bytes):
            more = True
            break
        size += cost
        (adds if kind == "add" else dels).append(op)
    return DeltaBatch(collection.name, collection.replica, collection.dim, adds, dels, more)


async def apply(collection: "Collection", batch: DeltaBatch) -> "ApplyResult":
    """Apply a peer's batch to a shared collection (one storage transaction)."""
    if not collection.shared:
        raise DeltaError(f"collection {collection.name!r} is not shared with the mesh; "
                         "share it before applying a peer's changes")
    if batch.collection != collection.name or batch.dim != collection.dim:
        raise DeltaError(f"delta for collection {batch.collection!r} (dim {batch.dim}) sent to "
                         f"{collection.name!r} (dim {collection.dim})")
    return await collection.apply_ops(batch.adds, batch.deletes)


# --- encoding -----------------------------------------------------------------------------

def encode_deltas(batch: DeltaBatch) -> bytes:
    adds = [{"id": a.key, "doc": a.doc_id, "src": a.source, "dsha": a.doc_sha256,
             "dn": a.doc_chunks, "dlen": a.doc_length, "i": a.index, "s": a.start, "e": a.end,
             "text": a.text, "sha": a.sha256} for a in batch.adds]
    header = json.dumps({"collection": batch.collection, "sender": batch.sender,
                         "more": bool(batch.more), "adds": adds,
                         "dels": [{"id": d.key, "target": d.target} for d in batch.deletes]},
                        ensure_ascii=False, separators=(",", ":")).encode()
    vecs = np.zeros((len(batch.adds), batch.dim), "<f4")
    for i, a in enumerate(batch.adds):
        if a.vector is None:
            raise DeltaError(f"add {a.key} has no embedding to send")
        vecs[i] = a.vector
    pad = b"\0" * (-len(header) % 4)
    out = (_PREFIX.pack(DELTA_MAGIC, WIRE_VERSION, len(header), len(batch.adds), batch.dim)
           + header + pad + vecs.tobytes())
    if len(out) > MAX_MESSAGE_BYTES:
        raise DeltaError(f"delta batch of {len(out)} bytes exceeds {MAX_MESSAGE_BYTES}; "
                         "ask deltas_since for fewer ops")
    return out


def encode_sync_request(collection: str, seen: Seen) -> bytes:
    body = json.dumps({"collection": collection, "seen": seen.to_json()},
                      separators=(",", ":")).encode()
    return _PREFIX.pack(REQUEST_MAGIC, WIRE_VERSION, 0, 0, 0)[:8] + body


def decode_message(data: bytes, dim: int | None = None) -> DeltaBatch | SyncRequest:
    """A DeltaBatch or SyncRequest from bytes; ``dim``: the only vector dimension accepted
    (the collection's). DeltaError, naming the field, on anything malformed."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DeltaError(f"replication message must be bytes, got {type(data).__name__}")
    data = bytes(data)
    # 1. magic and version
    if len(data) < 8 or data[:4] not in (DELTA_MAGIC, REQUEST_MAGIC):
        raise DeltaError("replication message does not start with b'TMRD' or b'TMRQ'")
    if data[4] != WIRE_VERSION or data[5:8] != b"\0\0\0":
        raise DeltaError(f"replication message version {data[4]} is not {WIRE_VERSION}")
    if data[:4] == REQUEST_MAGIC:
        # 2r. a bounded JSON object with a valid collection name and Seen
        if len(data) > MAX_REQUEST_BYTES:
            raise DeltaError(f"sync request of {len(data)} bytes exceeds {MAX_REQUEST_BYTES}")
        obj = _json(data[8:], "sync request")
        return SyncRequest(_collection_name(obj), Seen.from_json(obj.get("seen"), "seen"))
    # 2. sizes: the message is exactly prefix + header + padding + vectors
    if len(data) < _PREFIX.size or len(data) > MAX_MESSAGE_BYTES:
        raise DeltaError(f"delta batch of {len(data)} bytes is outside "
                         f"{_PREFIX.size}..{MAX_MESSAGE_BYTES}")
    _, _, header_len, n_vec, vdim = _PREFIX.unpack_from(data)
    if not 1 <= vdim <= MAX_DIM or (dim is not None and vdim != dim):
        raise DeltaError(f"delta dim {vdim} is not {dim if dim is not None else f'1..{MAX_DIM}'}")
    if header_len > MAX_HEADER_BYTES or n_vec > MAX_OPS:
        raise DeltaError(f"delta header_len {header_len} / n_vectors {n_vec} out of range")
    vec_at = _PREFIX.size + header_len + (-header_len % 4)
    if len(data) != vec_at + 4 * n_vec * vdim:
        raise DeltaError(f"delta batch is {len(data)} bytes; its header_len {header_len}, "
                         f"{n_vec} vectors of dim {vdim} need {vec_at + 4 * n_vec * vdim}")
    # 3. the header: types, ids, and sizes of every op
    obj = _json(data[_PREFIX.size:_PREFIX.size + header_len], "delta header")
    name = _collection_name(obj)
    sender, more = obj.get("sender"), obj.get("more")
    if not isinstance(sender, str) or not REPLICA_RE.fullmatch(sender):
        raise DeltaError(f"delta sender {sender!r:.40} is not a replica id")
    if not isinstance(more, bool):
        raise DeltaError("delta 'more' must be a boolean")
    raw_adds, raw_dels = obj.get("adds"), obj.get("dels")
    if not isinstance(raw_adds, list) or not isinstance(raw_dels, list):
        raise DeltaError("delta 'adds' and 'dels' must be lists")
    if len(raw_adds) != n_vec or len(raw_adds) + len(raw_dels) > MAX_OPS:
        raise DeltaError(f"delta has {len(raw_adds)} adds for {n_vec} vectors "
                         f"(at most {MAX_OPS} ops)")
    # 4. vectors: finite and nonzero
    vecs = np.frombuffer(data, "<f4", n_vec * vdim, vec_at).reshape(n_vec, vdim)
    norms = np.linalg.norm(vecs.astype(np.float64), axis=1)
    bad = np.flatnonzero(~np.isfinite(norms) | (norms < 1e-6))
    if bad.size:
        raise DeltaError(f"adds[{int(bad[0])}] embedding is zero or not finite")
    adds = [_add(a, i, vecs[i].astype(np.float32)) for i, a in enumerate(raw_adds)]
    dels = [_delete(d, i) for i, d in enumerate(raw_dels)]
    # 5. no op twice; one document's metadata agrees across its chunks
    ids = [a.key for a in adds] + [d.key for d in dels]
    if len(set(ids)) != len(ids):
        raise DeltaError("delta lists an op id twice")
    docs: dict[str, tuple] = {}
    for a in adds:
        meta = (a.source, a.doc_sha256, a.doc_chunks, a.doc_length)
        if docs.setdefault(a.doc_id, meta) != meta:
            raise DeltaError(f"chunks of document {a.doc_id} disagree on its metadata")
    return DeltaBatch(name, sender, vdim, adds, dels, more)


def _add(a: Any, i: int, vector: np.ndarray) -> ChunkAdd:
    w = f"adds[{i}]"
    if not isinstance(a, dict):
        raise DeltaError(f"{w} must be an object")
    key = _op(a.get("id"), f"{w}.id")
    doc = a.get("doc")
    if not isinstance(doc, str) or not _DOC_RE.fullmatch(doc):
        raise DeltaError(f"{w}.doc {doc!r:.60} is not a document id 'replica/n'")
    src, text = a.get("src"), a.get("text")
    if not isinstance(src, str) or len(src) > MAX_SOURCE_CHARS:
        raise DeltaError(f"{w}.src must be a string of at most {MAX_SOURCE_CHARS} characters")
    if not isinstance(text, str) or not 0 < len(text) <= MAX_TEXT_CHARS:
        raise DeltaError(f"{w}.text must be a string of 1..{MAX_TEXT_CHARS} characters")
    if LONE_SURROGATE.search(src) or LONE_SURROGATE.search(text):
        raise DeltaError(f"{w} has a lone surrogate (\\u escape) in its text or source")
    for k in ("dsha", "sha"):
        if not isinstance(a.get(k), str) or not _SHA_RE.fullmatch(a[k]):
            raise DeltaError(f"{w}.{k} must be 64 lowercase hex digits")
    for k, low, high in (("dn", 1, MAX_DOC_CHUNKS), ("dlen", 1, MAX_DOC_LENGTH),
                         ("i", 0, MAX_DOC_CHUNKS), ("s", 0, MAX_DOC_LENGTH),
                         ("e", 0, MAX_DOC_LENGTH)):
        if not _is_int(a.get(k)) or not low <= a[k] <= high:
            raise DeltaError(f"{w}.{k} must be an integer in {low}..{high}")
    if a["i"] >= a["dn"] or a["e"] > a["dlen"] or a["e"] - a["s"] != len(text):
        raise DeltaError(f"{w}: index {a['i']} of {a['dn']} chunks, offsets [{a['s']}, "
                         f"{a['e']}) of a {a['dlen']}-character document and a text of "
                         f"{len(text)} characters do not fit together")
    if content_hash(text) != a["sha"]:
        raise DeltaError(f"{w}.sha is not the sha256 of its text")
    return ChunkAdd(key, doc, src, a["dsha"], a["dn"], a["dlen"], a["i"], a["s"], a["e"], text,
                    a["sha"], vector)


def _delete(d: Any, i: int) -> ChunkDelete:
    if not isinstance(d, dict):
        raise DeltaError(f"dels[{i}] must be an object")
    return ChunkDelete(_op(d.get("id"), f"dels[{i}].id"), _op(d.get("target"),
                                                             f"dels[{i}].target"))


def _op(value: Any, what: str) -> str:
    try:
        split_op_id(value)
    except DeltaError as e:
        raise DeltaError(f"{what}: {e}") from None
    return value


def _json(raw: bytes, what: str) -> dict:
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise DeltaError(f"{what} is not UTF-8 JSON: {e}") from None
    if not isinstance(obj, dict):
        raise DeltaError(f"{what} must be a JSON object")
    return obj


def _collection_name(obj: dict) -> str:
    name = obj.get("collection")
    if not isinstance(name, str) or not COLLECTION_RE.fullmatch(name):
        raise DeltaError(f"collection name {name!r:.80} is not 1-64 of [A-Za-z0-9 _.-]")
    return name


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
