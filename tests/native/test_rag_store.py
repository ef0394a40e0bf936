"""RAG collection: chunking into batches with progress, document and chunk dedup by content
hash, delete, atomic batch commits, restore equal to the state before a reload (no
re-embedding), a tab closed mid-ingest or between batches, a full quota, highlights, and
retrieval with the real MiniLM.

Most tests are about storage logic and use ``fake_embed``, a cheap deterministic
bag-of-words hashing embedder (so that searches have sensible, stable answers); the
MiniLM test at the end checks real retrieval.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from pathlib import Path

import numpy as np
import pytest

from tabmesh.errors import TabmeshError
from tabmesh.rag.chunking import Chunk, chunk_by_tokens, chunk_text, content_hash
from tabmesh.rag.highlight import highlight_spans
from tabmesh.rag.store import Collection, CollectionError, drop_collection, list_collections
from tabmesh.rag.storage import MemoryStorage, SimulatedCrash, StorageError, StorageQuotaError
from tabmesh.rag.sync import deltas_since
from tabmesh.rag.textfiles import document_text

MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "all-MiniLM-L6-v2"
WORDS = [f"w{i}" for i in range(400)]


def fake_embed(texts):
    """Storage-logic tests only: hashed bag of words, L2-normalized, (n, 384) float32."""
    out = np.zeros((len(texts), 384), np.float32)
    for i, t in enumerate(texts):
        for w in t.casefold().split():
            h = hashlib.sha256(w.strip(".,").encode()).digest()
            out[i, int.from_bytes(h[:2], "little") % 384] += 1.0
        out[i, 383] += 0.05
    return out / np.linalg.norm(out, axis=1, keepdims=True)


class CountingEmbed:
    def __init__(self):
        self.calls, self.texts = 0, 0

    def __call__(self, texts):
        self.calls += 1
        self.texts += len(texts)
        return fake_embed(texts)


def paragraphs(text):
    """A chunker that cuts at blank lines (so both documents cut the shared one alike)."""
    found = re.finditer(r"\S[^\n]*(?:\n(?!\s*\n)[^\n]*)*", text)
    return [Chunk(i, m.start(), m.end(), m.group(), len(m.group()), content_hash(m.group()))
            for i, m in enumerate(found)]


def random_doc(rng, n_words=240):
    return " ".join(rng.choice(WORDS, n_words)) + "."


def small_chunks(text):
    return chunk_text(text, 160, 30)


def state(col: Collection):
    """Everything observable about a collection, for equality checks."""
    ids, vecs = col._hnsw.items()
    order = np.argsort(ids)
    return ([(c.key, c.doc_id, c.index, c.start, c.end, c.text, c.sha256, c.pid)
             for c in col.chunks()], col.documents(), dict(col.tombstones()),
            col.seen().to_json(), ids[order].tolist(), vecs[order].tobytes())


def queries(n=12, seed=5):
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, 6)) for _ in range(n)]
    return texts, fake_embed(texts)


def results(col: Collection, qs):
    texts, vecs = qs
    return [col.search(v, 5, t) for t, v in zip(texts, vecs)]


def run(coro):
    return asyncio.run(coro)


# ----- ingestion, dedup, delete ----------------------------------------------------------

def test_ingest_in_batches_with_progress_and_offsets():
    async def main():
        st = MemoryStorage()
        col = await Collection.open(st, "notes", chunker=small_chunks, batch_size=4)
        text = random_doc(np.random.default_rng(1), 300)
        seen = []
        res = await col.add_document(text, "a.txt", fake_embed, on_progress=seen.append)
        n = len(small_chunks(text))
        assert res.n_chunks == res.n_added == res.n_embedded == n and not res.skipped
        assert [p.done for p in seen] == [0] + [min(4 * b, n) for b in range(1, -(-n // 4) + 1)]
        assert seen[-1].total == n and seen[-1].batches == -(-n // 4)
        assert st.commits == 1 + -(-n // 4)  # the meta, then one transaction per batch
        for c in col.chunks():
            assert text[c.start:c.end] == c.text
        [doc] = col.documents()
        assert (doc.source, doc.n_chunks, doc.n_stored, doc.complete) == ("a.txt", n, n, True)
    run(main())


def test_async_embedder_and_async_progress():
    async def main():
        async def embed(texts):
            await asyncio.sleep(0)
            return fake_embed(texts)
        got = []

        async def progress(p):
            got.append(p.done)
        col = Collection("mem", chunker=small_chunks, batch_size=3)
        await col.add_document(random_doc(np.random.default_rng(2)), "x", embed,
                               on_progress=progress)
        assert got[-1] == len(col) > 3
    run(main())


def test_duplicate_document_is_skipped_without_embedding():
    async def main():
        st = MemoryStorage()
        col = await Collection.open(st, "notes", chunker=small_chunks)
        text = random_doc(np.random.default_rng(3))
        emb = CountingEmbed()
        first = await col.add_document(text, "a.txt", emb)
        commits, calls = st.commits, emb.calls
        again = await col.add_document("  " + text.replace(" ", "\n", 3) + "\n", "copy.txt", emb)
        assert again.skipped and again.doc_id == first.doc_id and again.n_added == 0
        assert (st.commits, emb.calls, len(col.documents())) == (commits, calls, 1)
    run(main())


def test_duplicate_chunks_share_one_passage_and_survive_one_delete():
    async def main():
        rng = np.random.default_rng(4)
        shared = "shared paragraph " + " ".join(rng.choice(WORDS, 20)) + "."
        a = random_doc(rng, 60) + "\n\n" + shared + "\n\n" + random_doc(rng, 60)
        b = random_doc(rng, 50) + "\n\n" + shared
        st = MemoryStorage()
        col = await Collection.open(st, "notes", chunker=paragraphs)
        emb = CountingEmbed()
        ra = await col.add_document(a, "a.md", emb)
        rb = await col.add_document(b, "b.md", emb)
        assert rb.n_embedded == rb.n_chunks - 1  # the shared paragraph was not embedded again
        assert col.n_passages == len(col) - 1
        q = fake_embed([shared])[0]
        [top] = col.search(q, 1, shared)
        assert top.text.strip() == shared and top.score > 0.99
        assert {top.doc_id, top.also_in[0][0]} == {ra.doc_id, rb.doc_id}
        await col.delete_document(ra.doc_id)
        [top] = col.search(q, 1)
        assert top.doc_id == rb.doc_id and top.also_in == () and top.score > 0.99
        await col.delete_document(rb.doc_id)
        assert len(col) == col.n_passages == 0 and col.search(q, 3) == []
        assert state(await Collection.restore(st.copy(), "notes")) == state(col)
    run(main())


def test_delete_document_removes_its_chunks_from_index_and_storage():
    async def main():
        rng = np.random.default_rng(6)
        st = MemoryStorage()
        col = await Collection.open(st, "notes", chunker=small_chunks, batch_size=5)
        docs = [await col.add_document(random_doc(rng), f"d{i}", fake_embed) for i in range(4)]
        victim = docs[1].doc_id
        pids = {c.pid for c in col.chunks(victim)}
        keys = {c.key for c in col.chunks(victim)}
        assert await col.delete_document(victim) == len(keys)
        assert not pids & set(col._hnsw.items()[0].tolist())
        assert col.chunks(victim) == [] and victim not in {d.doc_id for d in col.documents()}
        for _, vec in zip(*queries(30)):
            assert all(h.doc_id != victim for h in col.search(vec, 10))
        stored = dict(await st.items("records", "notes/"))
        assert not [k for k in stored if k.startswith("notes/chunk/") and k[12:] in keys]
        assert f"notes/doc/{victim}" not in stored
        assert sorted(t for t in col.tombstones().values()) == sorted(keys)
        with pytest.raises(CollectionError, match="no document"):
            await col.delete_document(victim)
        assert state(await Collection.restore(st.copy(), "notes")) == state(col)
    run(main())


def test_bad_embedder_output_is_rejected_and_nothing_is_stored():
    async def main():
        st = MemoryStorage()
        col = await Collection.open(st, "notes", chunker=small_chunks)
        commits = st.commits
        for bad in (lambda t: np.zeros((len(t), 5)), lambda t: np.full((len(t), 384), np.nan)):
            with pytest.raises(CollectionError, match="embedder"):
                await col.add_document(random_doc(np.random.default_rng(7)), "a", bad)
        assert st.commits == commits and len(col) == 0
        with pytest.raises(CollectionError, match="empty"):
            await col.add_document(" \n ", "blank", fake_embed)
        with pytest.raises(CollectionError, match="name"):
            Collection("bad/name")
        # a lone surrogate from a JS string becomes U+FFFD, one character for one
        res = await col.add_document("half a pair \ud83d here", "s\udc00.txt", fake_embed)
        [c] = col.chunks(res.doc_id)
        assert c.text == "half a pair \ufffd here" and col.documents()[0].source == "s\ufffd.txt"
    run(main())


# ----- persistence -----------------------------------------------------------------------

def test_restore_equals_pre_reload_state_and_search_results():
    async def main():
        rng = np.random.default_rng(8)
        st = MemoryStorage()
        col = await Collection.open(st, "notes", chunker=small_chunks, batch_size=7)
        docs = [await col.add_document(random_doc(rng, 200), f"d{i}.txt", fake_embed)
                for i in range(12)]
        for d in docs[2:5]:
            await col.delete_document(d.doc_id)  # freed slots and repaired links persist too
        await col.add_document(random_doc(rng, 200), "late.txt", fake_embed)
        qs = queries(40)
        before = results(col, qs)
        # no embedder is given: nothing is re-embedded (the chunker is code, not state)
        again = await Collection.restore(st.copy(), "notes", chunker=small_chunks, batch_size=7)
        assert results(again, qs) == before
        assert state(again) == state(col)
        a, b = col._hnsw.snapshot(), again._hnsw.snapshot()
        assert a["meta"] == b["meta"]
        for k in a:
            if k != "meta":
                assert np.array_equal(a[k], b[k]), k
        # it grows on exactly as the original would
        text = random_doc(rng, 200)
        await col.add_document(text, "next.txt", fake_embed)
        await again.add_document(text, "next.txt", fake_embed)
        assert results(again, qs) == results(col, qs)
        assert [c["name"] for c in await list_collections(st)] == ["notes"]
        await drop_collection(st, "notes")
        assert await st.items("records") == [] and await st.items("vectors") == []
    run(main())


def _capture_each_commit(st, snaps):
    def progress(p):
        snaps.append((p.done, st.copy()))
    return progress


def test_tab_closed_during_a_commit_restores_the_last_committed_batch():
    async def main():
        text = random_doc(np.random.default_rng(9), 400)
        n = len(small_chunks(text))
        assert n > 12
        st = MemoryStorage(crash_at_commit=4)  # meta, batch 1, batch 2, then the crash
        col = await Collection.open(st, "notes", chunker=small_chunks, batch_size=4)
        snaps = []
        with pytest.raises(SimulatedCrash):
            await col.add_document(text, "big.txt", fake_embed,
                                   on_progress=_capture_each_commit(st, snaps))
        reloaded = await Collection.restore(st.copy(), "notes", chunker=small_chunks)
        assert snaps[-1][0] == 8
        last = await Collection.restore(snaps[-1][1], "notes")
        assert state(reloaded) == state(last)
        [doc] = reloaded.documents()
        assert (doc.n_stored, doc.n_chunks, doc.complete) == (8, n, False)
        assert sorted(c.index for c in reloaded.chunks()) == list(range(8))
        # adding the document again resumes it; the result equals an uninterrupted ingest
        st2 = reloaded.storage
        st2.crash_at_commit = None
        emb = CountingEmbed()
        other_chunker = await Collection.restore(st2.copy(), "notes")  # default chunker
        with pytest.raises(CollectionError, match="another way"):
            await other_chunker.add_document(text, "big.txt", emb)
        assert emb.calls == 0
        res = await reloaded.add_document(text, "big.txt", emb)
        assert res.resumed and res.doc_id == doc.doc_id and res.n_added == n - 8
        assert emb.texts == n - 8
        ref = Collection("notes", chunker=small_chunks, batch_size=4)
        await ref.add_document(text, "big.txt", fake_embed)
        qs = queries(20)
        assert [[(h.text, h.start, h.score) for h in r] for r in results(reloaded, qs)] == \
               [[(h.text, h.start, h.score) for h in r] for r in results(ref, qs)]
        assert state(await Collection.restore(st2.copy(), "notes")) == state(reloaded)
    run(main())


def test_tab_closed_between_batches_keeps_committed_batches():
    class TabClosed(Exception):
        pass

    async def main():
        st = MemoryStorage()
        col = await Collection.open(st, "notes", chunker=small_chunks, batch_size=3)
        await col.add_document(random_doc(np.random.default_rng(10)), "a", fake_embed)
        before = st.copy()

        def progress(p):
            if p.batches == 2:
                before.__dict__.update(st.copy().__dict__)
                raise TabClosed
        with pytest.raises(TabClosed):
            await col.add_document(random_doc(np.random.default_rng(11), 300), "b",
                                   fake_embed, on_progress=progress)
        reloaded = await Collection.restore(st.copy(), "notes")
        assert state(reloaded) == state(await Collection.restore(before, "notes"))
        assert [d.n_stored for d in reloaded.documents()][1] == 6
    run(main())


def test_quota_error_is_typed_and_loses_nothing():
    async def main():
        rng = np.random.default_rng(12)
        st = MemoryStorage()
        col = await Collection.open(st, "notes", chunker=small_chunks, batch_size=4)
        await col.add_document(random_doc(rng), "a.txt", fake_embed)
        text_b = random_doc(rng, 300)
        # a probe replays the same ingest on a copy, to learn the stored size per batch
        probe = await Collection.restore(st.copy(), "notes", chunker=small_chunks, batch_size=4)
        snaps = []
        await probe.add_document(text_b, "b.txt", fake_embed,
                                 on_progress=lambda p: snaps.append(probe.storage.copy()))
        st.quota_bytes = (snaps[1].size() + snaps[2].size()) // 2  # batch 1 fits, 2 does not
        with pytest.raises(StorageQuotaError) as exc:
            await col.add_document(text_b, "b.txt", fake_embed)
        err = exc.value
        assert isinstance(err, StorageError) and isinstance(err, TabmeshError)
        assert err.code == "storage_quota" and "nothing already stored was lost" in str(err)
        assert TabmeshError.from_dict(err.to_dict()).__class__ is StorageQuotaError
        after_batch_1 = state(await Collection.restore(snaps[1], "notes"))
        assert state(await Collection.restore(st.copy(), "notes")) == after_batch_1
        assert state(col) == after_batch_1  # memory was rolled back to what is stored
        a, b = col.documents()
        assert a.complete and (b.n_stored, b.complete) == (4, False)
        st.quota_bytes = None
        res = await col.add_document(text_b, "b.txt", fake_embed)
        assert res.resumed and col.documents()[1].complete
    run(main())


def test_quota_error_on_a_new_documents_first_batch_leaves_no_trace():
    async def main():
        rng = np.random.default_rng(13)
        st = MemoryStorage()
        col = await Collection.open(st, "notes", chunker=small_chunks)
        await col.add_document(random_doc(rng), "a", fake_embed)
        st.quota_bytes = st.size() + 10
        snapshot = state(col)
        with pytest.raises(StorageQuotaError):
            await col.add_document(random_doc(rng), "b", fake_embed)
        assert state(col) == snapshot and len(col.documents()) == 1
    run(main())


def test_memory_storage_commit_is_all_or_nothing():
    async def main():
        st = MemoryStorage()
        await st.commit([("put", "records", "c/x", {"a": 1}), ("put", "vectors", "c/1", b"\0" * 8)])
        for bad in ([("put", "records", "c/y", {"a": 2}),
                     ("put", "records", "c/z", {"n": float("nan")})],
                    [("put", "records", "c/y", {"a": 2}), ("put", "vectors", "c/2", b"abc")],
                    [("delete", "records", "c/x"), ("put", "nowhere", "k", {})]):
            with pytest.raises(StorageError):
                await st.commit(bad)
        assert await st.items("records") == [("c/x", {"a": 1})]
        await st.commit([("delete_prefix", "records", "c/"), ("delete", "vectors", "c/1")])
        assert await st.items("records") == [] and await st.get("vectors", "c/1") is None
    run(main())


def test_cancelled_commit_is_settled_by_the_next_call():
    class SlowStorage(MemoryStorage):
        async def commit(self, ops):
            await asyncio.sleep(0.01)
            await super().commit(ops)

    async def main():
        st = SlowStorage()
        col = await Collection.open(st, "notes", chunker=small_chunks, batch_size=100,
                                    shared=True)
        task = asyncio.ensure_future(col.add_document(random_doc(np.random.default_rng(14)),
                                                      "a", fake_embed))
        await asyncio.sleep(0.002)  # the batch is embedded and its commit is in flight
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert deltas_since(col, {}).adds == []  # not known to be committed yet
        await col.set_shared(True)  # any call first waits for the commit in flight
        assert len(deltas_since(col, {}).adds) == len(col) > 0
        await col.add_document(random_doc(np.random.default_rng(15)), "b", fake_embed)
        assert state(col) == state(await Collection.restore(st.copy(), "notes"))
        assert len(col.documents()) == 2 and len(deltas_since(col, {}).adds) == len(col)
    run(main())


def test_the_same_document_cannot_be_added_twice_at_once():
    async def main():
        async def slow_embed(texts):
            await asyncio.sleep(0.001)
            return fake_embed(texts)
        col = Collection("mem", chunker=small_chunks, batch_size=2)
        text = random_doc(np.random.default_rng(16))
        first = asyncio.ensure_future(col.add_document(text, "a", slow_embed))
        await asyncio.sleep(0)
        with pytest.raises(CollectionError, match="already being added"):
            await col.add_document(text, "a again", slow_embed)
        await first
        assert len(col.documents()) == 1 and col.documents()[0].complete
        assert (await col.add_document(text, "a again", slow_embed)).skipped
    run(main())


def test_document_text_from_dropped_files():
    html = ("<html><head><title>x</title><style>p {}</style></head><body><h1>Bees &amp; "
            "honey</h1><p>Workers   <b>fan</b> nectar.</p><script>evil()</script>"
            "<ul><li>one</li><li>two</li></ul></body></html>").encode()
    assert document_text("page.HTML", html) == "Bees & honey\n\nWorkers fan nectar.\n\none\n\ntwo"
    assert document_text("a.md", b"\xef\xbb\xbf# T\r\nline\rnext") == "# T\nline\nnext"
    assert document_text("u.txt", "h\u00e9".encode("utf-16")) == "h\u00e9"
    assert document_text("bad.txt", b"ok \xff") == "ok \ufffd"
    with pytest.raises(CollectionError, match="only"):
        document_text("slides.pdf", b"%PDF")


# ----- highlights --------------------------------------------------------------------------

def test_highlight_spans_are_word_level_case_insensitive_offsets():
    text = "The <b>Vectors</b> are STORED; storing vectors-of-floats, vectorsx and stores."
    spans = highlight_spans("Where are the stored vectors?", text)
    assert [text[a:b] for a, b in spans] == ["Vectors", "STORED", "storing", "vectors",
                                             "stores"]
    assert highlight_spans("the", "The cat and the hat") == [(0, 3), (12, 15)]
    assert highlight_spans("", "anything") == [] and highlight_spans("zebra", "no match") == []
    assert highlight_spans("café", "Un CAFÉ noir") == [(3, 7)]


# ----- the real embedder ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm():
    if not (MODEL_DIR / "model.safetensors").exists():
        pytest.skip(f"{MODEL_DIR} is absent: the repo setup downloads it")
    from tabmesh.rag.bert_numpy import SentenceEmbedder
    return SentenceEmbedder.from_dir(str(MODEL_DIR))


DOCS = {
    "bees.md": "Honey bees collect nectar from flowers and carry it back to the hive. Worker "
               "bees evaporate the water from the nectar by fanning their wings, and enzymes "
               "turn its sugars into honey, which they seal in wax cells.\n\nA colony has one "
               "queen, thousands of workers and a few hundred drones in summer.",
    "rust.md": "Rust prevents data races at compile time: the borrow checker allows either "
               "one mutable reference or any number of shared references to a value.\n\n"
               "Cargo is Rust's build tool and package manager; crates are published on "
               "crates.io.",
    "bread.txt": "To bake sourdough bread, mix flour, water and salt with an active starter, "
                 "let the dough ferment for several hours with a few stretch and folds, shape "
                 "it, proof it overnight in the fridge, and bake it in a very hot Dutch oven.",
    "tides.txt": "Ocean tides are caused mainly by the Moon's gravity pulling on the Earth's "
                 "oceans; the Sun adds a smaller effect, giving spring tides when they align.",
}


def test_minilm_search_finds_the_right_passage(minilm):
    async def main():
        st = MemoryStorage()
        col = await Collection.open(
            st, "kb", chunker=lambda t: chunk_by_tokens(t, minilm.tokenizer, 48, 8), batch_size=4)
        for name, text in DOCS.items():
            await col.add_document(text, name, minilm.embed)
        cases = [("How do bees turn nectar into honey?", "bees.md", "nectar"),
                 ("Which tool builds Rust packages?", "rust.md", "Cargo"),
                 ("What causes the tides in the sea?", "tides.txt", "Moon"),
                 ("how long should sourdough dough ferment", "bread.txt", "ferment")]
        before = []
        for q, source, word in cases:
            hits = await col.search_text(q, minilm.embed, k=3)
            assert hits[0].source == source, (q, [(h.source, h.score) for h in hits])
            assert word in hits[0].text and hits[0].score > hits[-1].score
            assert hits[0].text == DOCS[source][hits[0].start:hits[0].end]
            before.append(hits)
        again = await Collection.restore(st.copy(), "kb")
        for (q, _, _), hits in zip(cases, before):
            assert again.search(minilm.embed([q])[0], 3, q) == hits
    run(main())
