"""Private RAG in the tab: chunking, MiniLM embeddings, an HNSW index persisted batch by
batch (store.py over storage.py / idb.py), replication of shared collections (sync.py),
and answers that cite their passages (answer.py)."""

from tabmesh.rag.answer import (AskPrompt, Citation, CitationStream, PromptBudgetError,
                                build_messages, find_citations)
from tabmesh.rag.store import (ApplyResult, Collection, CollectionError, Document, Hit,
                               IngestResult, Progress, drop_collection, list_collections)
from tabmesh.rag.storage import MemoryStorage, Storage, StorageError, StorageQuotaError
from tabmesh.rag.sync import (DeltaBatch, DeltaError, Seen, SyncRequest, decode_message,
                              deltas_since, encode_deltas, encode_sync_request)
from tabmesh.rag.sync import apply as apply_deltas
from tabmesh.rag.textfiles import document_text

__all__ = ["AskPrompt", "Citation", "CitationStream", "PromptBudgetError", "build_messages",
           "find_citations", "ApplyResult", "Collection", "CollectionError", "Document", "Hit",
           "IngestResult", "Progress", "drop_collection", "list_collections", "MemoryStorage",
           "Storage", "StorageError", "StorageQuotaError", "DeltaBatch", "DeltaError", "Seen",
           "SyncRequest", "decode_message", "deltas_since", "encode_deltas",
           "encode_sync_request", "apply_deltas", "document_text"]
