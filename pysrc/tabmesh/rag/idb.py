"""The Storage protocol (storage.py) on the browser's IndexedDB, for the tab.

Database ``db_name`` (default "tabmesh-rag"), version DB_VERSION, with three object
stores of out-of-line string keys created in ``onupgradeneeded``:

    records   plain JS objects (JSON-able dicts)
    vectors   Float32Array values (a vector blob per HNSW slot)
    meta      plain JS objects

``commit(ops)`` issues every put/delete in ONE readwrite transaction over the three
stores, synchronously (no await between them, so the transaction cannot auto-commit
early), then calls ``transaction.commit()`` where the browser has it and waits for
``complete``. Chromium's ``durability: "strict"`` makes ``complete`` mean "on disk", so a
tab closed afterwards keeps the batch; a tab closed before it loses the whole batch and
nothing else (IndexedDB aborts unfinished transactions). ``abort`` with a
``QuotaExceededError`` (the error of the transaction or of a request in it) raises
StorageQuotaError; any other failure StorageError; either way nothing of the batch was
written. Reads open their own readonly transaction; ``items`` takes keys and values with
``getAllKeys``/``getAll`` over one IDBKeyRange (both sorted by key).

Event handlers are Python proxies owned by a ProxyBag per request or transaction and
destroyed once it settles; every request of a transaction gets its handlers before any is
awaited (an event fired before its handler is set is lost). ``blocked`` on open only
logs: the open completes when the other tab's connection closes (ours close on
``versionchange``). ``navigator.storage.persist()`` is asked once per page, so the
browser does not evict the index under storage pressure (Chromium grants it silently to
sites with engagement; the answer is kept in ``persisted``). Under CPython the module
imports, and ``open`` raises StorageError.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any, Sequence

from tabmesh.jsbridge import IN_PYODIDE, JsException, ProxyBag, js, js_obj, log, py_bytes
from tabmesh.rag.storage import STORES, Op, StorageError, StorageQuotaError, check_ops

__all__ = ["IndexedDBStorage", "DB_VERSION"]

DB_VERSION = 1
# Pyodide wraps a thrown value that lacks a string ``stack`` (Chromium's DOMException does)
# in a plain Error whose message quotes it; the DOMException's name is recovered from there.
_WRAPPED = re.compile(r'thrown value gives """(\w+): (.*?)"""', re.S)
_persist_asked: bool | None = None  # navigator.storage.persist() answer, asked once a page


class IndexedDBStorage:
    """A Storage in IndexedDB; ``storage = await IndexedDBStorage.open()``."""

    def __init__(self, db_name: str = "tabmesh-rag") -> None:
        self.db_name = db_name
        self.persisted: bool | None = None
        self._db = None
        self._bag = ProxyBag()  # the database's own handlers

    @classmethod
    async def open(cls, db_name: str = "tabmesh-rag") -> "IndexedDBStorage":
        self = cls(db_name)
        await self._open()
        self.persisted = await request_persistence()
        return self

    async def _open(self) -> None:
        if not IN_PYODIDE:
            raise StorageError("IndexedDB exists only in the browser; use MemoryStorage here")
        factory = getattr(js, "indexedDB", None)
        if factory is None:
            raise StorageError("this browser context has no IndexedDB (a private window may "
                               "disable it); documents cannot be kept across reloads")
        req = _sync_js(lambda: factory.open(self.db_name, DB_VERSION), "open IndexedDB")

        def upgrade(_event) -> None:  # runs inside the versionchange transaction
            db = req.result
            for name in STORES:
                if not db.objectStoreNames.contains(name):
                    db.createObjectStore(name)

        self._db = await _watch(req, "open IndexedDB", upgrade=upgrade)

        def version_change(_event) -> None:  # another tab upgrades the schema: let it
            self.close()

        self._db.onversionchange = self._bag(version_change)

    def close(self) -> None:
        if self._db is not None:
            self._db.onversionchange = None
            self._db.close()
            self._db = None
        self._bag.destroy()

    def _need_db(self):
        if self._db is None:
            raise StorageError("the IndexedDB connection is closed (another tab upgraded the "
                               "database, or close() was called); reload the page")
        return self._db

    async def commit(self, ops: Sequence[Op]) -> None:
        ops = check_ops(ops)
        db = self._need_db()
        # Convert every value before the transaction starts: a failure here stores nothing.
        requests = [(op[0], op[1], op[2], _js_value(op[1], op[3]) if op[0] == "put" else None)
                    for op in ops]
        tx = _sync_js(lambda: db.transaction(js_obj(list(STORES)), "readwrite",
                                             js_obj({"durability": "strict"})),
                      "start a storage transaction")
        fut = asyncio.get_event_loop().create_future()
        bag = ProxyBag()
        failure: list[BaseException] = []

        def complete(_event) -> None:
            if not fut.done():
                fut.set_result(None)

        def abort(_event) -> None:
            if not fut.done():
                fut.set_exception(failure[0] if failure else _error(tx.error, "write to storage"))

        tx.oncomplete, tx.onabort = bag(complete), bag(abort)
        try:
            stores = {name: tx.objectStore(name) for name in STORES}
            for kind, name, key, value in requests:  # no await in here (see the docstring)
                if kind == "put":
                    stores[name].put(value, key)
                elif kind == "delete":
                    stores[name].delete(key)
                else:
                    stores[name].delete(js.IDBKeyRange.bound(key, key + "\uffff"))
            if getattr(tx, "commit", None) is not None:
                tx.commit()  # no more requests: commit now instead of at the next idle
        except Exception as e:  # DataCloneError, an invalid key, ...: abort the whole batch
            failure.append(_error(getattr(e, "js_error", e), "write to storage"))
            try:
                tx.abort()
            except JsException:
                pass  # already finished or aborting; onabort reports it
        try:
            await fut
        finally:
            tx.oncomplete = tx.onabort = None
            bag.destroy()

    async def get(self, store: str, key: str) -> Any | None:
        req = self._read(store, lambda s: s.get(key))
        return _py_value(store, await _watch(req, f"read {store}"))

    async def items(self, store: str, prefix: str = "") -> list[tuple[str, Any]]:
        rng = js.IDBKeyRange.bound(prefix, prefix + "\uffff") if prefix else None
        keys_req = self._read(store, lambda s: s.getAllKeys(rng))
        vals_req = keys_req.transaction.objectStore(store).getAll(rng)  # same transaction
        keys_f, vals_f = _watch(keys_req, f"list {store}"), _watch(vals_req, f"read {store}")
        keys, values = await asyncio.gather(keys_f, vals_f)
        keys = keys.to_py() if hasattr(keys, "to_py") else [str(k) for k in keys]
        if store == "vectors":
            return [(k, _py_value(store, values[i])) for i, k in enumerate(keys)]
        # one JSON round trip for the whole list, not one per record: a restore reads
        # tens of thousands of records, and each crossing of the FFI costs more than parsing
        return list(zip(keys, json.loads(js.JSON.stringify(values))))

    def _read(self, store: str, start):
        if store not in STORES:
            raise StorageError(f"unknown store {store!r}; stores are {STORES}")
        db = self._need_db()
        return _sync_js(lambda: start(db.transaction(store, "readonly").objectStore(store)),
                        f"read {store}")

    async def estimate(self) -> dict[str, int | None]:
        """{"usage", "quota"} in bytes from navigator.storage.estimate() (None if absent)."""
        storage = getattr(js.navigator, "storage", None) if IN_PYODIDE else None
        if storage is None or getattr(storage, "estimate", None) is None:
            return {"usage": None, "quota": None}
        est = await storage.estimate()
        return {"usage": int(est.usage or 0), "quota": int(est.quota or 0)}


async def request_persistence() -> bool | None:
    """Ask once per page for persistent storage; the browser's answer (None: no API)."""
    global _persist_asked
    if _persist_asked is None and IN_PYODIDE:
        storage = getattr(js.navigator, "storage", None)
        if storage is not None and getattr(storage, "persist", None) is not None:
            try:
                _persist_asked = bool(await storage.persist())
            except JsException:
                _persist_asked = False
    return _persist_asked


def _watch(req, what: str, upgrade=None) -> asyncio.Future:
    """A future for the result of an IDBRequest (or IDBOpenDBRequest), or its error as
    StorageError. Handlers are installed now: watch every request of a transaction
    before awaiting any, or an event that fires first is missed."""
    fut = asyncio.get_event_loop().create_future()
    bag = ProxyBag()

    def success(_event) -> None:
        if not fut.done():
            fut.set_result(req.result)

    def error(_event) -> None:
        if not fut.done():
            fut.set_exception(_error(req.error, what))

    def blocked(_event) -> None:  # the open goes on once the other connection closes
        log.warning("%s waits: another tab holds an older version of the database open; "
                    "close the other tabs of tabmesh if this lasts", what)

    def cleanup(_fut) -> None:
        req.onsuccess = req.onerror = None
        if upgrade is not None:
            req.onupgradeneeded = req.onblocked = None
        bag.destroy()

    req.onsuccess, req.onerror = bag(success), bag(error)
    if upgrade is not None:
        req.onupgradeneeded, req.onblocked = bag(upgrade), bag(blocked)
    fut.add_done_callback(cleanup)
    return fut


def _sync_js(call, what: str):
    try:
        return call()
    except JsException as e:
        raise _error(getattr(e, "js_error", e), what) from None


def _error(dom_error, what: str) -> StorageError:
    """StorageQuotaError for a QuotaExceededError, else StorageError naming the error."""
    name = getattr(dom_error, "name", None) or "UnknownError"
    message = getattr(dom_error, "message", None) or str(dom_error or "")
    wrapped = _WRAPPED.search(message) if name == "Error" else None
    if wrapped is not None:
        name, message = wrapped.group(1), wrapped.group(2)
    if name == "QuotaExceededError":
        return StorageQuotaError(
            f"could not {what}: the browser's storage quota for this site is full. Nothing "
            "already stored was lost; delete documents or collections (or free space for "
            "this site in the browser settings), then add the document again to resume")
    return StorageError(f"could not {what}: {name}: {message}")


def _js_value(store: str, value: Any):
    if store == "vectors":
        u8 = js_obj(bytes(value))  # a fresh Uint8Array at offset 0, length % 4 == 0
        return js.Float32Array.new(u8.buffer)
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise StorageError(f"{store} value cannot be stored: {e}") from e
    return js.JSON.parse(text)  # plain objects and arrays, null kept


def _py_value(store: str, value: Any) -> Any | None:
    if value is None:  # undefined (no such key) and null both arrive as None
        return None
    if store == "vectors":
        return py_bytes(value)
    return json.loads(js.JSON.stringify(value))
