"""The IndexedDB backend's Python side against a small fake of the IndexedDB API.

The fake follows the spec where idb.py depends on it: requests and transactions report
through onsuccess/onerror/oncomplete/onabort events fired on later loop turns, a
transaction's writes apply together when it completes, an abort (explicit or a
QuotaExceededError) applies none of them, getAll/getAllKeys return key order, and the
open request runs onupgradeneeded before onsuccess. It checks the control flow (futures,
handlers, the abort and quota paths, value conversion) natively; the browser tests check
the real thing. Storage-logic test: documents are embedded with test_rag_store's fake.
"""

from __future__ import annotations

import asyncio
import json
import types

import numpy as np
import pytest

import tabmesh.jsbridge as jsbridge
from tabmesh.rag import idb
from tabmesh.rag.store import Collection
from tabmesh.rag.storage import StorageQuotaError
from test_rag_store import fake_embed, queries, random_doc, results, small_chunks, state


class DOMException:
    def __init__(self, name, message=""):
        self.name, self.message = name, message


class Buffer:  # a Uint8Array / Float32Array stand-in
    def __init__(self, data=b""):
        self.data = bytes(data)

    def assign(self, data):
        self.data = bytes(data)

    @property
    def buffer(self):
        return self.data

    def to_bytes(self):
        return self.data


class KeyRange:
    def __init__(self, lo, hi):
        self.lo, self.hi = lo, hi


class Request:
    def __init__(self, tx=None):
        self.result = self.error = self.onsuccess = self.onerror = None
        self.onupgradeneeded = self.onblocked = None
        self.transaction = tx

    def fire(self, name):
        handler = getattr(self, name)
        if handler is not None:
            handler(types.SimpleNamespace(type=name))


def _match(key, q):
    return q is None or (q.lo <= key <= q.hi if isinstance(q, KeyRange) else key == q)


class Store:
    def __init__(self, tx, name):
        self.tx, self.name = tx, name

    def _req(self, action):
        req = Request(self.tx)
        self.tx.requests.append((req, action))
        return req

    def put(self, value, key):
        stored = value if isinstance(value, Buffer) else json.loads(json.dumps(value))
        return self._req(lambda data: data[self.name].__setitem__(key, stored))

    def delete(self, q):
        def action(data):
            for k in [k for k in data[self.name] if _match(k, q)]:
                del data[self.name][k]
        return self._req(action)

    def get(self, key):
        return self._req(lambda data: data[self.name].get(key))

    def getAllKeys(self, q=None):  # noqa: N802 - the IndexedDB name
        return self._req(lambda data: sorted(k for k in data[self.name] if _match(k, q)))

    def getAll(self, q=None):  # noqa: N802
        return self._req(lambda data: [data[self.name][k] for k in sorted(data[self.name])
                                       if _match(k, q)])


class Transaction:
    def __init__(self, db, mode):
        self.db, self.mode, self.requests = db, mode, []
        self.error = self.oncomplete = self.onabort = None
        self.aborted = self.finished = False
        asyncio.get_event_loop().call_soon(self._finish)  # auto-commit once the caller yields

    def objectStore(self, name):  # noqa: N802
        return Store(self, name)

    def commit(self):
        pass

    def abort(self):
        if self.finished:
            raise idb.JsException("InvalidStateError")
        self.aborted = True

    def _finish(self):
        self.finished = True
        data = {k: dict(v) for k, v in self.db.data.items()}
        for req, action in self.requests:
            req.result = action(data)
        if self.aborted:
            return self._fire("onabort")
        if self.mode == "readwrite":
            size = sum(len(json.dumps(v)) if not isinstance(v, Buffer) else len(v.data)
                       for d in data.values() for v in d.values())
            if self.db.factory.quota is not None and size > self.db.factory.quota:
                self.error = DOMException("QuotaExceededError", "quota exceeded")
                return self._fire("onabort")
            self.db.data.clear()
            self.db.data.update(data)
        for req, _ in self.requests:
            asyncio.get_event_loop().call_soon(req.fire, "onsuccess")
        asyncio.get_event_loop().call_soon(self._fire, "oncomplete")

    def _fire(self, name):
        handler = getattr(self, name)
        if handler is not None:
            handler(types.SimpleNamespace(type=name))


class Database:
    def __init__(self, factory, data):
        self.factory, self.data, self.onversionchange = factory, data, None
        self.objectStoreNames = types.SimpleNamespace(contains=lambda n: n in self.data)

    def createObjectStore(self, name):  # noqa: N802
        self.data[name] = {}

    def transaction(self, names, mode, options=None):
        return Transaction(self, mode)

    def close(self):
        pass


class Factory:
    def __init__(self):
        self.dbs, self.quota, self.opened = {}, None, 0

    def open(self, name, version):
        req = Request()

        def run():
            data = self.dbs.setdefault(name, {})
            req.result = Database(self, data)
            if not data:
                req.fire("onupgradeneeded")
            self.opened += 1
            req.fire("onsuccess")
        asyncio.get_event_loop().call_soon(run)
        return req


@pytest.fixture
def fake_js(monkeypatch):
    factory = Factory()

    async def persist():
        return True
    js = types.SimpleNamespace(
        indexedDB=factory, IDBKeyRange=types.SimpleNamespace(bound=KeyRange),
        JSON=types.SimpleNamespace(parse=json.loads, stringify=json.dumps),
        Uint8Array=types.SimpleNamespace(new=lambda n: Buffer(bytes(n))),
        Float32Array=types.SimpleNamespace(new=lambda buf: Buffer(buf)),
        ArrayBuffer=types.SimpleNamespace(isView=lambda v: isinstance(v, Buffer)),
        navigator=types.SimpleNamespace(storage=types.SimpleNamespace(persist=persist)))
    for mod in (idb, jsbridge):
        monkeypatch.setattr(mod, "IN_PYODIDE", True)
        monkeypatch.setattr(mod, "js", js)
    monkeypatch.setattr(idb, "_persist_asked", None)
    return factory


def test_collection_on_indexeddb_commits_restores_and_maps_quota(fake_js):
    async def main():
        st = await idb.IndexedDBStorage.open("test-db")
        assert st.persisted is True
        assert set(fake_js.dbs["test-db"]) == {"records", "vectors", "meta"}
        col = await Collection.open(st, "notes", chunker=small_chunks, batch_size=4)
        rng = np.random.default_rng(1)
        for i in range(3):
            await col.add_document(random_doc(rng, 150), f"d{i}.txt", fake_embed)
        await col.delete_document(col.documents()[1].doc_id)
        vec = fake_js.dbs["test-db"]["vectors"]
        assert vec and all(isinstance(v, Buffer) and len(v.data) == 384 * 4 for v in vec.values())
        qs = queries(10)
        again = await Collection.restore(await idb.IndexedDBStorage.open("test-db"), "notes",
                                         chunker=small_chunks, batch_size=4)
        assert state(again) == state(col) and results(again, qs) == results(col, qs)
        assert await st.get("meta", "missing") is None
        # a full quota aborts the whole transaction: typed error, nothing of it stored
        before = json.dumps({s: sorted(d) for s, d in fake_js.dbs["test-db"].items()})
        fake_js.quota = 1
        with pytest.raises(StorageQuotaError, match="quota"):
            await col.add_document(random_doc(rng, 150), "big.txt", fake_embed)
        assert json.dumps({s: sorted(d) for s, d in fake_js.dbs["test-db"].items()}) == before
        assert state(col) == state(again)
        fake_js.quota = None
        await st.commit([("delete_prefix", "records", "notes/"), ("delete", "meta", "notes")])
        assert await st.items("records", "notes/") == [] and await st.items("meta") == []
    asyncio.run(main())


def test_a_failing_request_aborts_the_batch(fake_js, monkeypatch):
    async def main():
        st = await idb.IndexedDBStorage.open("db2")
        await st.commit([("put", "meta", "a", {"v": 1})])
        original = Store.put

        def put(self, value, key):
            if key == "bad":
                raise idb.JsException("DataCloneError")
            return original(self, value, key)
        monkeypatch.setattr(Store, "put", put)
        with pytest.raises(idb.StorageError):
            await st.commit([("put", "meta", "a", {"v": 2}), ("put", "meta", "bad", {})])
        assert await st.items("meta") == [("a", {"v": 1})]
    asyncio.run(main())
