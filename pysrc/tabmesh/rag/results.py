"""What a collection hands out: its chunk records, documents, search hits, ingestion
progress and results, and the outcome of applying replication ops. Plain frozen
dataclasses; ``Hit.to_dict`` is the shape the page gets (camelCase keys, lists)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["ChunkRecord", "Document", "Hit", "Progress", "IngestResult", "ApplyResult"]


@dataclass(frozen=True)
class ChunkRecord:
    """A stored chunk: ``text == document[start:end]``; ``pid`` its passage's HNSW id."""

    key: str
    doc_id: str
    index: int
    start: int
    end: int
    text: str
    sha256: str
    pid: int


@dataclass(frozen=True)
class Document:
    """A document as listed in the UI; ``n_stored`` of its ``n_chunks`` chunks are stored
    (``complete`` when all are; a partial one can be added again to finish it)."""

    doc_id: str
    source: str
    sha256: str
    length: int
    n_chunks: int
    n_stored: int
    order: int

    @property
    def complete(self) -> bool:
        return self.n_stored >= self.n_chunks


@dataclass(frozen=True)
class Hit:
    """A search result: cosine ``score``, passage ``text`` at ``[start, end)`` of
    document ``doc_id`` (``source``), chunk ``index`` and ``chunk_key``; ``highlights``:
    (start, end) spans in ``text`` of words matching the query; ``also_in``: other
    (doc_id, source, start, end) holding the same text."""

    score: float
    text: str
    doc_id: str
    source: str
    start: int
    end: int
    index: int
    chunk_key: str
    highlights: tuple[tuple[int, int], ...]
    also_in: tuple[tuple[str, str, int, int], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"score": self.score, "text": self.text, "docId": self.doc_id,
                "source": self.source, "start": self.start, "end": self.end,
                "index": self.index, "chunkKey": self.chunk_key,
                "highlights": [list(s) for s in self.highlights],
                "alsoIn": [list(x) for x in self.also_in]}


@dataclass(frozen=True)
class Progress:
    """Ingestion progress, reported after each committed batch (and once at the start)."""

    doc_id: str
    source: str
    done: int        # chunks of the document stored
    total: int
    batches: int     # batches committed by this call


@dataclass(frozen=True)
class IngestResult:
    doc_id: str
    n_chunks: int
    n_added: int      # chunks stored by this call
    n_embedded: int   # texts sent to the embedder
    skipped: bool     # the document was already stored whole
    resumed: bool     # it was partly stored and this call finished it


@dataclass(frozen=True)
class ApplyResult:
    added: int
    deleted: int
    ignored: int      # ops seen before (or adds already deleted): idempotence at work
