"""RagService replication over real mesh Nodes and frames on an in-memory network (the
browser test does the same over WebRTC with IndexedDB and MiniLM; this one runs in a
second): opt-in sharing, concurrent ingestion converging, deletes, a late joiner, paged
catch-up, unshared collections never encoded, malformed messages dropped."""
from __future__ import annotations

import asyncio
import re
from types import SimpleNamespace

import pytest

import tabmesh.rag_page as rag_page
from tabmesh.mesh.frames import Kind
from tabmesh.rag.storage import MemoryStorage
from tabmesh.rag_page import RagService
from test_node import MemoryNet
from test_rag_store import fake_embed

SECRET = "zqprivatemarker"


class WordTokenizer:
    def pieces(self, text):
        spans = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
        return [0] * len(spans), spans


class FakeEmbed:
    """EmbedService's surface as RagService uses it, with a hashing embedder."""

    def __init__(self):
        self.embedder = SimpleNamespace(tokenizer=WordTokenizer())

    def info(self):
        return {"model": "fake", "backend": "numpy", "dim": 384}

    async def load(self):
        pass

    async def embed(self, texts):
        await asyncio.sleep(0)
        return fake_embed(texts), sum(len(t.split()) for t in texts)


class Peer:
    def __init__(self, net: MemoryNet, pid: str, storage: MemoryStorage | None = None):
        self.node = net.join(pid)
        self.sent: list[tuple[str, bytes]] = []
        send = self.node.send_rag

        async def recording_send(peer_id, payload):
            self.sent.append((peer_id, payload))
            await send(peer_id, payload)
        self.node.send_rag = recording_send
        self.rag = RagService(FakeEmbed(), llm=None, node=self.node, storage=storage or MemoryStorage())

    async def docs(self, name="shared"):
        return {d["docId"]: d for d in await self.rag.documents(name)}


async def settle(peers, name, n, timeout_s=5.0):
    """Wait until every peer holds the same ``n`` documents of ``name``."""
    loop = asyncio.get_event_loop()
    deadline = loop.time() + timeout_s
    while True:
        sets = [set(await p.docs(name)) for p in peers]
        if len(sets[0]) == n and all(s == sets[0] for s in sets):
            return sets[0]
        assert loop.time() < deadline, f"no convergence on {n} documents: {[len(s) for s in sets]}"
        await asyncio.sleep(0.01)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_shared_collections_converge_and_private_ones_never_leave():
    async def main():
        net = MemoryNet()
        a, b = Peer(net, "A"), Peer(net, "B")
        await a.node.wait_open(1)
        await b.node.wait_open(1)
        await a.rag.ingest(f"The private code word is {SECRET}.", "secret.txt")
        await a.rag.share(True, "shared")
        await b.rag.ingest("B wrote this before sharing: walrus budget 450.", "early.txt", "shared")
        await b.rag.share(True, "shared")          # B's earlier document reaches A too
        await asyncio.gather(
            a.rag.ingest_many([{"text": f"A note {i}: heron {i}.", "source": f"a{i}"} for i in range(5)],
                              "shared"),
            b.rag.ingest_many([{"text": f"B note {i}: falcon {i}.", "source": f"b{i}"} for i in range(5)],
                              "shared"))
        ids = await settle([a, b], "shared", 11)
        early = next(i for i, d in (await a.docs()).items() if d["source"] == "early.txt")
        assert (await a.rag.remove(early, "shared")) == {"removedChunks": 1}
        await settle([a, b], "shared", 10)
        c = Peer(net, "C")                          # a late joiner catches up when it shares
        await c.node.wait_open(2)
        await c.rag.share(True, "shared")
        assert await settle([a, b, c], "shared", 10) == ids - {early}
        hits = (await c.rag.search("falcon 3", 1, "shared"))["hits"]
        assert hits[0]["source"] == "b3"
        assert c.rag.embedded_texts == 0            # vectors came with the deltas
        for p in (a, b, c):
            assert all(SECRET.encode() not in payload for _, payload in p.sent)
            assert "default" not in {x["name"] for x in (await p.rag.stats())["collections"]
                                     if x["shared"]}
        assert (await b.rag.stats())["collections"] == [
            {"name": "shared", "shared": True, "open": True, "documents": 10, "passages": 10,
             "peers": ["A", "C"]}]
        assert b.rag.dropped == 0
    run(main())


def test_catch_up_is_paged_and_unshared_requests_get_no_answer(monkeypatch):
    monkeypatch.setattr(rag_page, "SYNC_PAGE_OPS", 3)
    async def main():
        net = MemoryNet()
        a, b = Peer(net, "A"), Peer(net, "B")
        await a.node.wait_open(1)
        await a.rag.share(True, "shared")
        await a.rag.ingest_many([{"text": f"note {i} about otters", "source": f"n{i}"} for i in range(10)],
                                "shared")
        await a.rag.ingest("only in A, unshared", "private.txt", "mine")
        await b.rag.share(True, "shared")
        await settle([a, b], "shared", 10)
        requests_from_b = [p for peer, p in b.sent if p[:4] == b"TMRQ"]
        assert len(requests_from_b) >= 4             # 10 ops in pages of 3: the requester asks again
        # a request for a collection A does not share: ignored, never answered
        sent_before = len(a.sent)
        from tabmesh.rag.sync import Seen, encode_sync_request
        await b.node.send_rag("A", encode_sync_request("mine", Seen()))
        await b.node.send_rag("A", b"TMRD\x01garbage")        # malformed: dropped
        await b.node._send("A", Kind.RAG, b"")
        for _ in range(20):
            await asyncio.sleep(0)
        assert len(a.sent) == sent_before
        assert a.rag.dropped == 2
        assert len(await a.docs("shared")) == 10          # and A keeps working
        await a.rag.ingest("one more otter", "n10", "shared")
        await settle([a, b], "shared", 11)
    run(main())


def test_a_reloaded_tab_resumes_sharing_its_stored_collections():
    async def main():
        net = MemoryNet()
        a = Peer(net, "A")
        await a.rag.share(True, "shared")
        await a.rag.ingest_many([{"text": f"beaver log {i}", "source": f"l{i}"} for i in range(3)],
                                "shared")
        stored = MemoryStorage()       # what the tab kept before its reload: a shared collection
        before = RagService(FakeEmbed(), llm=None, storage=stored)
        await before.share(True, "shared")
        await before.ingest("a note from before the reload", "old.txt", "shared")
        d = Peer(net, "D", storage=stored)
        await d.node.wait_open(1)
        await d.rag.start()            # the page does this at boot (RagPanel.start)
        await settle([a, d], "shared", 4)
    run(main())


def test_turning_sharing_off_stops_sending():
    async def main():
        net = MemoryNet()
        a, b = Peer(net, "A"), Peer(net, "B")
        await a.node.wait_open(1)
        for p in (a, b):
            await p.rag.share(True, "shared")
        await a.rag.ingest("first shared note", "one", "shared")
        await settle([a, b], "shared", 1)
        assert (await a.rag.share(False, "shared")) == {"collection": "shared", "shared": False}
        sent = len(a.sent)
        await a.rag.ingest(f"after unsharing: {SECRET}", "two", "shared")
        for _ in range(20):
            await asyncio.sleep(0)
        assert len(a.sent) == sent and len(await b.docs("shared")) == 1
    run(main())


@pytest.mark.parametrize("opts, message", [
    ({"query": "x", "k": 0}, "k must be an integer in 1..100"),
    ({"query": "x", "k": 2.5}, "k must be an integer"),
    ({"query": 3}, "query must be a string"),
    ({"query": "x", "collection": "../etc"}, "collection name"),
])
def test_bad_options_are_refused_with_a_message(opts, message):
    async def main():
        svc = RagService(FakeEmbed(), llm=None, storage=MemoryStorage())
        with pytest.raises(Exception, match=re.escape(message)):
            await svc.handlers()["ragSearch"](opts)
    run(main())


def test_ingest_counts_embeddings_and_dedups():
    async def main():
        svc = RagService(FakeEmbed(), llm=None, storage=MemoryStorage())
        first = await svc.handlers()["ragIngest"]({"text": "alpha beta gamma", "source": "a.txt"})
        again = await svc.handlers()["ragIngest"]({"text": "alpha beta gamma", "source": "b.txt"})
        assert (first["chunks"], first["added"], first["embedded"], first["skipped"]) == (1, 1, 1, False)
        assert (again["added"], again["embedded"], again["skipped"]) == (0, 0, True)
        r = await svc.handlers()["ragSearch"]({"query": "beta"})
        assert r["hits"][0]["highlights"] == [[6, 10]] and r["ms"] >= 0
        stats = await svc.handlers()["ragStats"]()
        assert stats["embeddedTexts"] == 1 and stats["embeddedQueries"] == 1
    run(main())
