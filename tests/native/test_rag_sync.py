"""Replication of a shared collection: concurrent adds converge under many seeded random
delivery orders (with loss, duplication and reordering), deletes win, a reconnecting or
reloaded peer catches up, re-applying is idempotent, uncommitted ops are never sent, and
malformed deltas are rejected with DeltaError before anything is applied.

These tests are about replication logic, so they embed with ``fake_embed`` (a cheap
deterministic hashing embedder from test_rag_store); every delivery goes through the
binary encoding.
"""

from __future__ import annotations

import asyncio
import json
import struct

import numpy as np
import pytest

from tabmesh.errors import TabmeshError
from tabmesh.rag.store import Collection
from tabmesh.rag.storage import MemoryStorage
from tabmesh.rag.sync import (DeltaBatch, DeltaError, Seen, SyncRequest, apply, decode_message,
                              deltas_since, encode_deltas, encode_sync_request)
from test_rag_store import WORDS, fake_embed, random_doc, small_chunks, state

NAME = "team notes"


async def peer(i: int, **kw) -> Collection:
    col = await Collection.open(MemoryStorage(), NAME, replica=f"peer{i}", shared=True,
                                chunker=small_chunks, batch_size=3, **kw)
    col.outbox = []
    col.on_commit.append(lambda batch: col.outbox.append(encode_deltas(batch)))
    return col


def replicated(col: Collection):
    """What replicas must agree on: chunks with their embeddings, documents, tombstones."""
    chunks = sorted((c.key, c.doc_id, c.index, c.start, c.end, c.text, c.sha256,
                     col._vector(c.pid).round(5).tobytes()) for c in col.chunks())
    docs = sorted((d.doc_id, d.source, d.sha256, d.n_chunks, d.n_stored) for d in col.documents())
    return chunks, docs, sorted(col.tombstones().items()), col.seen().to_json()


async def deliver(data: bytes, to: Collection):
    msg = decode_message(data, dim=to.dim)
    assert isinstance(msg, DeltaBatch)
    return await apply(to, msg)


async def catch_up(requester: Collection, responder: Collection, max_ops: int = 1000) -> int:
    """The reconnect protocol, through the wire format; returns the number of rounds."""
    for rounds in range(1, 1000):
        req = decode_message(encode_sync_request(requester.name, requester.seen()))
        assert isinstance(req, SyncRequest) and req.collection == requester.name
        batch = deltas_since(responder, req.seen, max_ops=max_ops)
        await deliver(encode_deltas(batch), requester)
        if not batch.more:
            return rounds
    raise AssertionError("catch-up did not finish")


def run(coro):
    return asyncio.run(coro)


# ----- convergence -----------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(24))
def test_random_concurrent_histories_converge(seed):
    """Three peers add and delete documents concurrently (sometimes the same text); their
    delta messages are delivered late, out of order, twice, or lost; peers also catch up
    with each other at random. After a final round of catch-ups all hold the same set."""
    async def main():
        rng = np.random.default_rng(seed)
        peers = [await peer(i) for i in range(3)]
        pool = [random_doc(rng, int(rng.integers(30, 120))) for _ in range(6)]
        inflight: list[tuple[int, bytes]] = []
        for _ in range(int(rng.integers(12, 24))):
            p = peers[int(rng.integers(3))]
            r = rng.random()
            if r < 0.4:
                await p.add_document(pool[int(rng.integers(len(pool)))], "doc.txt", fake_embed)
            elif r < 0.55 and p.documents():
                docs = p.documents()
                await p.delete_document(docs[int(rng.integers(len(docs)))].doc_id)
            elif r < 0.85 and inflight:
                to, data = inflight.pop(int(rng.integers(len(inflight))))
                await deliver(data, peers[to])
                if rng.random() < 0.3:
                    inflight.append((to, data))  # delivered again later
            elif r < 1:
                a, b = rng.choice(3, 2, replace=False)
                await catch_up(peers[a], peers[b], max_ops=int(rng.integers(1, 8)))
            for q in peers:  # new local ops go to every other peer; some are lost
                for data in q.outbox:
                    inflight += [(j, data) for j in range(3)
                                 if peers[j] is not q and rng.random() > 0.2]
                q.outbox.clear()
        for a in range(3):
            for b in range(3):
                if a != b:
                    await catch_up(peers[a], peers[b], max_ops=5)
        finals = [replicated(p) for p in peers]
        assert finals[0] == finals[1] == finals[2]
        # every stored replica equals its memory, and searches agree
        for p in peers:
            assert state(await Collection.restore(p.storage.copy(), NAME)) == state(p)
        q = fake_embed([" ".join(WORDS[:8])])[0]
        tops = [[(h.chunk_key, round(h.score, 5)) for h in p.search(q, 3, ef=200)] for p in peers]
        assert tops[0] == tops[1] == tops[2]
    run(main())


def test_same_document_added_by_two_peers_at_once_is_kept_by_both_as_two():
    async def main():
        a, b = await peer(1), await peer(2)
        text = random_doc(np.random.default_rng(1), 120)
        await a.add_document(text, "a.txt", fake_embed)
        await b.add_document(text, "b.txt", fake_embed)
        await catch_up(a, b)
        await catch_up(b, a)
        assert replicated(a) == replicated(b) and len(a.documents()) == 2
        # identical texts share passages: searching shows each passage once
        assert a.n_passages == len(a) // 2
        hits = a.search(fake_embed([text[:80]])[0], 3)
        assert len({h.text for h in hits}) == len(hits) and hits[0].also_in
        # adding the same text again afterwards is a duplicate on either peer
        assert (await b.add_document(text, "again.txt", fake_embed)).skipped
    run(main())


def test_deletes_win_in_any_order_and_forever():
    async def main():
        a, b, c = await peer(1), await peer(2), await peer(3)
        await a.add_document(random_doc(np.random.default_rng(2), 100), "x.txt", fake_embed)
        add_msgs, a.outbox = a.outbox, []
        for m in add_msgs:
            await deliver(m, b)
        await b.delete_document(b.documents()[0].doc_id)  # b deletes a's document
        [del_msg] = b.outbox
        # c hears of the delete before the adds: the adds arrive dead
        await deliver(del_msg, c)
        for m in add_msgs:
            res = await deliver(m, c)
            assert res.added == 0 and res.ignored > 0
        assert len(c) == 0
        # a deleted concurrently with nothing: applying b's delete removes its chunks
        await deliver(del_msg, a)
        for col in (a, b, c):
            assert len(col) == 0 and col.n_passages == 0 and col.documents() == []
        assert replicated(a) == replicated(b) == replicated(c)
        # a peer replaying the adds much later cannot resurrect them
        for m in add_msgs + add_msgs:
            await deliver(m, b)
        assert len(b) == 0
    run(main())


# ----- catch-up ---------------------------------------------------------------------------

def test_reconnecting_peer_catches_up_in_bounded_rounds():
    async def main():
        rng = np.random.default_rng(3)
        a, b = await peer(1), await peer(2)
        await a.add_document(random_doc(rng, 80), "first.txt", fake_embed)
        await catch_up(b, a)
        # b goes offline: nothing is delivered either way
        docs = [await a.add_document(random_doc(rng, 90), f"a{i}.txt", fake_embed)
                for i in range(3)]
        await a.delete_document(docs[1].doc_id)
        await b.add_document(random_doc(rng, 70), "offline.txt", fake_embed)
        assert replicated(a) != replicated(b)
        rounds = await catch_up(b, a, max_ops=4)
        assert rounds > 2  # it paged through the backlog
        await catch_up(a, b, max_ops=4)
        assert replicated(a) == replicated(b)
        assert deltas_since(a, b.seen()).adds == [] and deltas_since(b, a.seen()).deletes == []
        assert b.seen().vector() == a.seen().vector() == {"peer1": a._next_seq - 1,
                                                          "peer2": b._next_seq - 1}
    run(main())


def test_reloaded_peer_keeps_its_sync_state_and_catches_up():
    async def main():
        rng = np.random.default_rng(4)
        a, b = await peer(1), await peer(2)
        await a.add_document(random_doc(rng, 90), "a.txt", fake_embed)
        await catch_up(b, a)
        b2 = await Collection.restore(b.storage.copy(), NAME, chunker=small_chunks)
        assert b2.shared and b2.replica == "peer2" and b2.seen().to_json() == b.seen().to_json()
        assert deltas_since(a, b2.seen()).adds == []  # nothing is sent twice after a reload
        await a.delete_document(a.documents()[0].doc_id)
        await b2.add_document(random_doc(rng, 60), "b.txt", fake_embed)
        await catch_up(b2, a)
        await catch_up(a, b2)
        assert replicated(a) == replicated(b2) and len(a.documents()) == 1
        # b2 does not reuse the sequence numbers b had used
        assert min(int(k.split(":")[1]) for k in b2.chunk_keys()) > b._next_seq - 1
    run(main())


def test_reapplying_is_idempotent_and_writes_nothing():
    async def main():
        a, b = await peer(1), await peer(2)
        await a.add_document(random_doc(np.random.default_rng(5), 100), "a.txt", fake_embed)
        data = encode_deltas(deltas_since(a, {}))
        first = await deliver(data, b)
        assert first.added == len(a) and first.ignored == 0
        snapshot, commits = replicated(b), b.storage.commits
        for _ in range(3):
            res = await deliver(data, b)
            assert (res.added, res.deleted, res.ignored) == (0, 0, len(a))
        assert replicated(b) == snapshot and b.storage.commits == commits
        # a batch and its reordered copy give the same state (commutativity within a batch)
        c = await peer(3)
        msg = decode_message(data)
        msg.adds.reverse()
        await apply(c, msg)
        assert replicated(c)[:3] == replicated(b)[:3]
    run(main())


def test_uncommitted_local_ops_are_never_sent():
    gate = asyncio.Event

    class GatedStorage(MemoryStorage):
        async def commit(self, ops):
            await self.gate.wait()
            await super().commit(ops)

    async def main():
        st = GatedStorage()
        st.gate = gate()
        st.gate.set()
        a = await Collection.open(st, NAME, replica="peer1", shared=True, chunker=small_chunks,
                                  batch_size=100)
        await a.add_document(random_doc(np.random.default_rng(6), 60), "one", fake_embed)
        st.gate.clear()
        task = asyncio.ensure_future(
            a.add_document(random_doc(np.random.default_rng(7), 60), "two", fake_embed))
        await asyncio.sleep(0.01)  # applied in memory, its commit waits at the gate
        assert len(a.documents()) == 2
        sent = deltas_since(a, {})
        assert {op.doc_id for op in sent.adds} == {a.documents()[0].doc_id}
        st.gate.set()
        await task
        assert len(deltas_since(a, {}).adds) == len(a)
    run(main())


def test_local_commits_are_announced_with_embeddings():
    async def main():
        a = await peer(1)
        await a.add_document(random_doc(np.random.default_rng(8), 100), "a.txt", fake_embed)
        msgs = [decode_message(m) for m in a.outbox]
        assert sum(len(m.adds) for m in msgs) == len(a) and len(msgs) == -(-len(a) // 3)
        for m in msgs:
            for op in m.adds:
                assert np.allclose(op.vector, fake_embed([op.text])[0], atol=1e-6)
        private = Collection("private", chunker=small_chunks)
        heard = []
        private.on_commit.append(heard.append)
        await private.add_document("some text here", "p", fake_embed)
        assert heard == []  # a collection that is not shared announces nothing
        with pytest.raises(DeltaError, match="not shared"):
            await apply(private, msgs[0])
    run(main())


# ----- malformed input ----------------------------------------------------------------------

def _valid_message() -> tuple[bytes, Collection]:
    async def main():
        a = await peer(1)
        await a.add_document(random_doc(np.random.default_rng(9), 80), "a.txt", fake_embed)
        await a.delete_document(a.documents()[0].doc_id)
        await a.add_document(random_doc(np.random.default_rng(10), 40), "b.txt", fake_embed)
        return encode_deltas(deltas_since(a, {})), a
    return run(main())


def _rebuild(data: bytes, edit) -> bytes:
    """``data`` with its JSON header changed by ``edit(header)`` (sizes kept consistent)."""
    magic, ver, hlen, nvec, dim = struct.unpack_from("<4sB3xIII", data)
    header = json.loads(data[20:20 + hlen])
    vec_at = 20 + hlen + (-hlen % 4)
    vecs = data[vec_at:]
    edit(header)
    h = json.dumps(header).encode()
    return (struct.pack("<4sB3xIII", magic, ver, len(h), len(header["adds"]), dim) + h
            + b"\0" * (-len(h) % 4) + vecs[:len(header["adds"]) * dim * 4])


def test_malformed_deltas_are_rejected_with_a_typed_error():
    data, _ = _valid_message()
    msg = decode_message(data, dim=384)
    assert len(msg.adds) > 0 and len(msg.deletes) > 0
    hlen = struct.unpack_from("<I", data, 8)[0]
    vec_at = 20 + hlen + (-hlen % 4)

    def set_(path, value):
        def edit(h):
            obj = h
            for p in path[:-1]:
                obj = obj[p]
            obj[path[-1]] = value
        return edit

    nan_vec = bytearray(data)
    nan_vec[vec_at:vec_at + 4] = struct.pack("<f", float("nan"))
    zero_vec = bytearray(data)
    zero_vec[vec_at:vec_at + 384 * 4] = bytes(384 * 4)
    first = msg.adds[0]
    bad = {
        "magic": b"XXXX" + data[4:],
        "version": data[:4] + b"\x02" + data[5:],
        "truncated": data[:-4],
        "trailing bytes": data + b"\0\0\0\0",
        "header_len too large": data[:8] + struct.pack("<I", 2**31) + data[12:],
        "vector count": data[:12] + struct.pack("<I", 999) + data[16:],
        "header not JSON": _rebuild(data, lambda h: None)[:20] + b"{nope" + data[25:],
        "NaN embedding": bytes(nan_vec),
        "zero embedding": bytes(zero_vec),
        "id format": _rebuild(data, set_(["adds", 0, "id"], "peer1-7")),
        "seq zero": _rebuild(data, set_(["adds", 0, "id"], "peer1:0")),
        "seq too big": _rebuild(data, set_(["adds", 0, "id"], "peer1:99999999999999999")),
        "delete target": _rebuild(data, set_(["dels", 0, "target"], "../etc")),
        "doc id": _rebuild(data, set_(["adds", 0, "doc"], "peer1")),
        "text sha": _rebuild(data, set_(["adds", 0, "sha"], "0" * 64)),
        "offsets vs text": _rebuild(data, set_(["adds", 0, "e"], first.end + 1)),
        "index past count": _rebuild(data, set_(["adds", 0, "i"], first.doc_chunks)),
        "bool as int": _rebuild(data, set_(["adds", 0, "s"], True)),
        "text type": _rebuild(data, set_(["adds", 0, "text"], ["x"])),
        "duplicate op": _rebuild(data, lambda h: h["dels"].append(dict(h["dels"][0]))),
        "doc metadata disagrees": _rebuild(data, lambda h: (h["adds"].append(dict(
            h["adds"][0], id="peer1:9999", src="other.txt")), None)[1]),
        "collection name": _rebuild(data, set_(["collection"], "a/b")),
        "sender": _rebuild(data, set_(["sender"], "")),
        "more": _rebuild(data, set_(["more"], "yes")),
        "adds type": _rebuild(data, set_(["dels"], {})),
        "lone surrogate": _rebuild(data, set_(["adds", 0, "text"], "\ud800" + first.text[1:])),
        "request seen unsorted": b"TMRQ\x01\0\0\0" + json.dumps(
            {"collection": NAME, "seen": {"peer1": [[5, 9], [1, 2]]}}).encode(),
        "request bad origin": b"TMRQ\x01\0\0\0" + json.dumps(
            {"collection": NAME, "seen": {"bad origin": 3}}).encode(),
        "request not JSON": b"TMRQ\x01\0\0\0\xff",
        "not bytes": "TMRD",
    }
    for what, payload in bad.items():
        with pytest.raises(DeltaError) as exc:
            decode_message(payload, dim=384)
        assert isinstance(exc.value, TabmeshError) and exc.value.code == "bad_delta", what
    with pytest.raises(DeltaError, match="dim"):
        decode_message(data, dim=256)
    # a batch that decodes but is for another collection is refused before any change
    other = decode_message(_rebuild(data, set_(["collection"], "other")))

    async def refuse():
        b = await peer(2)
        with pytest.raises(DeltaError, match="collection"):
            await apply(b, other)
        assert len(b) == 0 and b.seen().to_json() == {}
    run(refuse())


def test_fuzzed_deltas_raise_only_delta_error():
    data, _ = _valid_message()
    rng = np.random.default_rng(11)
    hlen = struct.unpack_from("<I", data, 8)[0]
    for _ in range(400):
        b = bytearray(data)
        for _ in range(int(rng.integers(1, 4))):
            i = int(rng.integers(0, 20 + hlen))  # the prefix and header, where structure is
            b[i] = int(rng.integers(256))
        try:
            decode_message(bytes(b), dim=384)
        except DeltaError:
            pass


def test_seen_ranges_and_version_vector():
    s = Seen()
    for k in ["p:1", "p:2", "p:5", "p:4", "q:2", "p:3"]:
        assert s.add(k)
    assert not s.add("p:3") and "p:5" in s and "p:6" not in s and "q:1" not in s
    assert s.to_json() == {"p": [[1, 5]], "q": [[2, 2]]}
    assert s.vector() == {"p": 5, "q": 0}
    assert Seen.from_json({"p": 3}).to_json() == {"p": [[1, 3]]}
    assert Seen.from_json(s.to_json()).to_json() == s.to_json()
    with pytest.raises(DeltaError):
        Seen.from_json({"p": [[3, 2]]})
