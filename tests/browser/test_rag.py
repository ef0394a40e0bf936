"""Private RAG in real tabs: real Chromium, real IndexedDB, the real MiniLM (numpy in the tab).

Three tabs in one room, each in its own browser context (its own IndexedDB), reused from
test to test to keep the boots few (~10-20 s each on 2 shared cores):
  A  ingests, searches, hits a full quota, reloads, deletes; holds a private marker document
  B  sees no RAG frame until a collection is shared; then shares and ingests beside A
  C  shares the collection last and catches up; then is closed in the middle of a large
     ingestMany and reopened on the same IndexedDB; finally answers a question (Ask)
The three connect before any heavy work: numpy blocks a tab's only thread (~5 ms a
word-piece idle, 40 ms on a loaded machine), longer than the test server's 2 s signaling
heartbeat, and an open data channel outlives the signaling connection. Tests run in file
order and build on each other; every wait is bounded; documents are a sentence or two.
"""
from __future__ import annotations

import base64
import json
import secrets
import time
from pathlib import Path

import numpy as np
import pytest

from settings import config

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "embeddings_minilm.json"
PRIVATE = "zq" + secrets.token_hex(6) + "private"      # a word no document or frame has by chance
SHARED = "zq" + secrets.token_hex(6) + "shared"

# Every byte a page puts on a data channel, a WebSocket or a fetch body is scanned for the
# markers (ASCII, so latin1 decoding of binary frames finds them inside JSON headers).
WIRE_SPY = """
(() => {
  const spy = window.__wire = {markers: %s, hits: [], rtcSends: 0};
  window.alert = () => { window.__alerted = true; };
  const scan = (where, data) => {
    let s = null;
    if (typeof data === "string") s = data;
    else if (data instanceof ArrayBuffer) s = new TextDecoder("latin1").decode(new Uint8Array(data));
    else if (ArrayBuffer.isView(data)) s = new TextDecoder("latin1").decode(
      new Uint8Array(data.buffer, data.byteOffset, data.byteLength));
    else if (data != null) s = String(data);
    if (s === null) return;
    for (const m of spy.markers) if (s.includes(m)) spy.hits.push([where, m]);
  };
  const rtcSend = RTCDataChannel.prototype.send;
  RTCDataChannel.prototype.send = function (d) { spy.rtcSends++; scan("datachannel", d); return rtcSend.call(this, d); };
  const wsSend = WebSocket.prototype.send;
  WebSocket.prototype.send = function (d) { scan("websocket", d); return wsSend.call(this, d); };
  // A full quota, on demand (window.__quotaFull): "abort" as Chromium reports one (the
  // transaction aborts, its error a QuotaExceededError), or "throw" from put() itself.
  const quota = () => new DOMException("the quota is full (test)", "QuotaExceededError");
  const put0 = IDBObjectStore.prototype.put;
  IDBObjectStore.prototype.put = function () {
    if (window.__quotaFull === "throw") throw quota();
    return put0.apply(this, arguments);
  };
  const txError = Object.getOwnPropertyDescriptor(IDBTransaction.prototype, "error").get;
  Object.defineProperty(IDBTransaction.prototype, "error", {configurable: true,
    get() { return this.__quota || txError.call(this); }});
  const commit0 = IDBTransaction.prototype.commit;
  IDBTransaction.prototype.commit = function () {
    if (window.__quotaFull === "abort" && this.mode === "readwrite") { this.__quota = quota(); return this.abort(); }
    return commit0.call(this);
  };
  const fetch0 = window.fetch;
  window.fetch = function (input, init) { scan("fetch", String(input && input.url || input));
    if (init && init.body) scan("fetch body", init.body); return fetch0.apply(this, arguments); };
})();
""" % json.dumps([PRIVATE, SHARED])

DOCS = {
    "zebras.txt": "Zebras live on the grasslands of Africa and sleep standing up.",
    "volcano.md": "Mount Etna is an active volcano on the east coast of Sicily.",
    "bread.txt": "Sourdough bread rises slowly because wild yeast ferments the dough.",
}


def wait_for(fn, timeout_s: float, what: str, every_s: float = 0.25):
    deadline = time.monotonic() + timeout_s
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s} s (last: {value!r:.300})")
        time.sleep(every_s)


class Tab:
    """A page of the app in its own browser context (its own IndexedDB), with a request log."""

    def __init__(self, app, context, room: str, boot: bool = True):
        self.app, self.context, self.room = app, context, room
        self.requests: list[tuple[str, str]] = []
        self.open(boot)

    def open(self, boot: bool = True) -> None:
        self.page = self.context.new_page()
        self.page.set_default_timeout(60_000)
        self.page.on("request", lambda r: self.requests.append((r.url, r.post_data or "")))
        self.page.goto(self.app.room_url(self.room), wait_until="commit")
        if boot:
            self.boot()

    def boot(self) -> None:
        self.page.wait_for_function("!!window.tabmesh", timeout=config.BOOT_TIMEOUT_MS)
        self.info = self.page.evaluate(
            "Promise.race([tabmesh.ready, new Promise((_, rej) => setTimeout(() => "
            f"rej(new Error('boot timeout')), {config.BOOT_TIMEOUT_MS}))])")

    @property
    def peer_id(self) -> str:
        return self.info["peerId"]

    def rag(self, method: str, opts: dict | None = None):
        return self.page.evaluate(f"(o) => tabmesh.rag.{method}(o)", opts or {})

    def docs(self, collection: str = "default") -> dict[str, dict]:
        return {d["docId"]: d for d in self.rag("documents", {"collection": collection})}

    def open_peers(self) -> set[str]:
        return {p["peerId"] for p in self.page.evaluate("tabmesh.peers()") if p["state"] == "open"}

    def wire_hits(self) -> list:
        return self.page.evaluate("window.__wire.hits")


@pytest.fixture(scope="module")
def contexts(browser):
    made = []

    def new():
        ctx = browser.new_context()
        ctx.set_default_timeout(config.ACTION_TIMEOUT_MS)
        ctx.add_init_script(WIRE_SPY)
        made.append(ctx)
        return ctx
    yield new
    for ctx in made:
        try:
            ctx.close()
        except Exception:
            pass


@pytest.fixture(scope="module")
def room():
    return "rag-" + secrets.token_hex(4)


def connected(*tabs: Tab) -> bool:
    return all({o.peer_id for o in tabs if o is not t} <= t.open_peers() for t in tabs)


def join(*tabs: Tab, timeout_s: float = 30.0, rejoins: int = 2) -> None:
    """Wait until every tab has an open channel to every other. A tab whose signaling
    connection the server dropped before that (it stalled past the test server's 2 s
    heartbeat: a boot on an overloaded machine) is reloaded, at most ``rejoins`` times:
    the page itself does not reconnect (it says "reload the page to rejoin")."""
    for attempt in range(rejoins + 1):
        try:
            wait_for(lambda: connected(*tabs), timeout_s, "the tabs connect")
            return
        except AssertionError as e:
            lost = [t for t in tabs if any(x.startswith("signaling connection closed")
                                           for x in t.page.evaluate("tabmesh.errors"))]
            if not lost or attempt == rejoins:
                raise AssertionError(f"{e}; " + "; ".join(
                    f"{t.peer_id}: peers {t.page.evaluate('tabmesh.peers()')}, errors "
                    f"{t.page.evaluate('tabmesh.errors')}" for t in tabs)) from None
            for t in lost:
                t.page.reload(wait_until="commit")
                t.boot()


@pytest.fixture(scope="module")
def tabs(app, contexts, room):
    """A, B and C, connected to each other before any of them does heavy work."""
    made = {name: Tab(app, contexts(), room) for name in "abc"}
    join(*made.values())
    return made


@pytest.fixture(scope="module")
def tab_a(tabs):
    return tabs["a"]


@pytest.fixture(scope="module")
def tab_b(tabs):
    return tabs["b"]


@pytest.fixture(scope="module")
def tab_c(tabs):
    return tabs["c"]


def search(tab: Tab, query: str, k: int = 5, collection: str = "default") -> list[dict]:
    return tab.rag("search", {"query": query, "k": k, "collection": collection})["hits"]


# ---- one tab: ingest, search, the panel, reload, delete ----------------------------------

def test_ingest_and_search_find_the_passage_with_highlights(tab_a):
    page = tab_a.page
    opened = tab_a.rag("open")
    assert opened["collection"] == "default" and opened["documents"] == 0 and opened["passages"] == 0
    first = tab_a.rag("ingest", {"text": DOCS["zebras.txt"], "source": "zebras.txt"})
    assert first["chunks"] == 1 and first["added"] == 1 and first["embedded"] == 1
    assert first["skipped"] is False and first["docId"]
    many = tab_a.rag("ingestMany", {"docs": [{"text": DOCS[s], "source": s} for s in ("volcano.md", "bread.txt")]})
    assert many["documents"] == 2 and many["chunks"] == 2 and many["embedded"] == 2 and many["seconds"] > 0
    again = tab_a.rag("ingest", {"text": DOCS["zebras.txt"], "source": "zebras copy.txt"})
    assert again["skipped"] is True and again["embedded"] == 0 and again["docId"] == first["docId"]

    r = tab_a.rag("search", {"query": "Where do zebras sleep?", "k": 3})
    assert r["ms"] > 0 and len(r["hits"]) == 3
    top = r["hits"][0]
    assert top["source"] == "zebras.txt" and top["docId"] == first["docId"]
    assert top["text"] == DOCS["zebras.txt"] and (top["start"], top["end"]) == (0, len(DOCS["zebras.txt"]))
    assert top["score"] > r["hits"][1]["score"] + 0.1
    assert {top["text"][s:e].lower() for s, e in top["highlights"]} == {"zebras", "sleep"}
    volcano = search(tab_a, "volcano in Sicily", k=1)[0]
    assert volcano["source"] == "volcano.md"

    # the panel: document list, search with <mark>ed matches
    wait_for(lambda: page.locator("#rag-docs li").count() == 3, 10, "panel lists 3 documents")
    page.fill("#rag-query", "Where do zebras sleep?")
    page.click("#rag-search-form button")
    page.wait_for_function("document.querySelectorAll('#rag-hits li').length >= 3")
    first_hit = page.locator("#rag-hits li").first
    assert first_hit.locator(".source").inner_text() == "zebras.txt"
    assert first_hit.locator("mark").all_inner_texts() == ["Zebras", "sleep"]
    assert first_hit.locator(".passage").inner_text() == DOCS["zebras.txt"]


def test_pasted_markup_is_shown_as_text(tab_a):
    page = tab_a.page
    evil = "Beware of <script>alert(1)</script><b>x</b> in pasted notes about giraffes."
    page.fill("#rag-text", evil)
    page.fill("#rag-source", "<b>evil</b>.html")
    page.click("#rag-add")
    wait_for(lambda: page.locator("#rag-docs li").count() == 4, 30, "the pasted document is listed")
    page.fill("#rag-query", "giraffes script")
    page.click("#rag-search-form button")
    page.wait_for_function("[...document.querySelectorAll('#rag-hits .passage')].some("
                           "p => p.textContent.includes('giraffes'))")
    panel = page.locator("#rag-panel")
    assert panel.locator("script, b").count() == 0
    assert page.evaluate("document.querySelector('#rag-panel').innerHTML.includes('<script')") is False
    texts = page.evaluate("[...document.querySelectorAll('#rag-hits .passage')].map(p => p.textContent)")
    assert evil in texts
    assert "<b>evil</b>.html" in page.inner_text("#rag-docs")
    assert page.evaluate("window.__alerted") is None
    assert page.locator("#rag-hits mark", has_text="script").count() >= 1  # a match, as text


def test_a_full_quota_is_reported_on_the_page_and_loses_nothing(tab_a):
    page = tab_a.page
    docs_before = tab_a.docs()
    page.evaluate("window.__quotaFull = 'abort'")
    try:
        with pytest.raises(Exception, match="StorageQuotaError: .*quota for this site is full"):
            tab_a.rag("ingest", {"text": "Penguins huddle together through the Antarctic winter.",
                                 "source": "penguins.txt"})
        wait_for(lambda: "quota" in page.inner_text("#rag-error"), 10, "quota message on the page")
        page.evaluate("document.querySelector('#rag-error').hidden = true; window.__quotaFull = 'throw'")
        page.fill("#rag-text", "Owls hunt at night and can turn their heads very far.")
        page.click("#rag-add")
        wait_for(lambda: page.locator("#rag-error").is_visible(), 20, "the panel shows the quota error")
        message = page.inner_text("#rag-error")
        assert "storage quota for this site is full" in message and "Nothing already stored was lost" in message
        assert tab_a.docs() == docs_before
    finally:
        page.evaluate("window.__quotaFull = false")
    added = tab_a.rag("ingest", {"text": "Owls hunt at night and can turn their heads very far.",
                                 "source": "owls.txt"})
    assert added["added"] == 1 and set(tab_a.docs()) == set(docs_before) | {added["docId"]}
    assert search(tab_a, "owls at night", 1)[0]["source"] == "owls.txt"


def test_reload_restores_without_reembedding(tab_a):
    queries = ["Where do zebras sleep?", "volcano in Sicily", "how does bread rise", "giraffes", "owls"]
    before = [search(tab_a, q, k=5) for q in queries]
    docs_before = tab_a.docs()
    tab_a.page.reload()
    tab_a.boot()
    opened = tab_a.rag("open")
    assert opened["documents"] == 5 and opened["passages"] == 5 and opened["restoreS"] >= 0
    assert tab_a.rag("stats")["embeddedTexts"] == 0
    assert tab_a.docs() == docs_before
    after = [search(tab_a, q, k=5) for q in queries]
    stats = tab_a.rag("stats")
    assert stats["embeddedTexts"] == 0 and stats["embeddedQueries"] == len(queries)
    for b, a in zip(before, after):
        assert [(h["docId"], h["text"], h["highlights"]) for h in b] == \
               [(h["docId"], h["text"], h["highlights"]) for h in a]
        assert np.allclose([h["score"] for h in b], [h["score"] for h in a], atol=1e-6)
    assert [c["name"] for c in stats["collections"]] == ["default"]
    assert stats["usage"] > 0 and stats["quota"] > stats["usage"]
    wait_for(lambda: tab_a.page.locator("#rag-docs li").count() == 5, 20, "panel lists the restored documents")


def test_delete_removes_the_documents_chunks(tab_a):
    docs = {d["source"]: d for d in tab_a.docs().values()}
    gone = tab_a.rag("remove", {"docId": docs["volcano.md"]["docId"]})
    assert gone == {"removedChunks": 1}
    hits = search(tab_a, "volcano in Sicily", k=10)
    assert "volcano.md" not in {h["source"] for h in hits} and len(hits) == 4
    # and from the panel
    page = tab_a.page
    wait_for(lambda: page.locator("#rag-docs li").count() == 4, 10, "list without volcano.md")
    page.locator("#rag-docs li", has_text="bread.txt").locator("button.rag-delete").click()
    wait_for(lambda: page.locator("#rag-docs li").count() == 3, 20, "bread.txt deleted from the panel")
    assert {d["source"] for d in tab_a.docs().values()} == {"zebras.txt", "<b>evil</b>.html", "owls.txt"}
    assert "bread.txt" not in {h["source"] for h in search(tab_a, "how does bread rise", k=10)}
    with pytest.raises(Exception, match="CollectionError"):
        tab_a.rag("remove", {"docId": docs["volcano.md"]["docId"]})


# ---- two tabs: private by default, then an opt-in shared collection -----------------------

def test_unshared_documents_never_leave_the_tab(tab_a, tab_b, tab_c):
    join(tab_a, tab_b, tab_c)  # the reloaded A (a new peer id) reconnects to B and C
    text = f"The launch code word is {PRIVATE} and it is kept in the blue folder."
    tab_a.rag("ingest", {"text": text, "source": "secret.txt"})
    hit = search(tab_a, f"launch code {PRIVATE}", k=1)[0]
    assert PRIVATE in hit["text"]
    # the channel to B is busy with pings all along, so any leak would have had its chance
    rtt = tab_a.page.evaluate("(id) => tabmesh.ping(id)", tab_b.peer_id)
    assert rtt > 0 and tab_a.page.evaluate("window.__wire.rtcSends") > 0
    time.sleep(1.0)
    assert tab_a.wire_hits() == []
    assert not [u for u, body in tab_a.requests if PRIVATE in u or PRIVATE in body]
    for other in (tab_b, tab_c):
        stats = other.rag("stats")
        assert stats["messagesIn"] == 0 and stats["collections"] == []
        assert other.page.evaluate("tabmesh.inbox()") == []
        assert other.page.evaluate("tabmesh.stats()")["droppedFrames"] == 0
    assert tab_a.rag("stats")["messagesOut"] == 0


def test_two_peers_converge_deletes_propagate_and_a_late_peer_catches_up(tab_a, tab_b, tab_c):
    for tab in (tab_a, tab_b):
        assert tab.rag("share", {"collection": "shared", "on": True}) == {"collection": "shared", "shared": True}
    a_docs = [{"text": f"Team A note {i}: the {w} project ships in {m}.", "source": f"a{i}.txt"}
              for i, (w, m) in enumerate([("heron", "May"), ("otter", "June"), ("lynx", "July")])]
    a_docs.append({"text": f"Shared marker {SHARED} belongs to the badger release.", "source": "marker.txt"})
    b_docs = [{"text": f"Team B note {i}: the {w} budget is {n} euros.", "source": f"b{i}.txt"}
              for i, (w, n) in enumerate([("falcon", 300), ("walrus", 450), ("cobra", 800)])]
    # both ingest at once (the calls are started, then awaited)
    for tab, docs in ((tab_a, a_docs), (tab_b, b_docs)):
        tab.page.evaluate("(d) => { window.__ingest = tabmesh.rag.ingestMany({docs: d, collection: 'shared'}); }", docs)
    for tab, docs in ((tab_a, a_docs), (tab_b, b_docs)):
        assert tab.page.evaluate("window.__ingest")["documents"] == len(docs)

    def converged(tabs, n):
        sets = [set(t.docs("shared")) for t in tabs]
        return len(sets[0]) == n and all(s == sets[0] for s in sets) and sets[0]
    ids = wait_for(lambda: converged([tab_a, tab_b], 7), 30, "A and B hold the same 7 documents")
    assert all(d["complete"] for d in tab_b.docs("shared").values())
    assert search(tab_b, "when does the heron project ship", 1, "shared")[0]["source"] == "a0.txt"
    assert search(tab_a, "walrus budget", 1, "shared")[0]["source"] == "b1.txt"

    # a delete (of a document B added) made on A reaches B as tombstones
    walrus = next(i for i, d in tab_a.docs("shared").items() if d["source"] == "b1.txt")
    assert tab_a.rag("remove", {"docId": walrus, "collection": "shared"}) == {"removedChunks": 1}
    wait_for(lambda: walrus not in tab_b.docs("shared") and len(tab_b.docs("shared")) == 6, 20,
             "the delete reaches B")
    assert "b1.txt" not in {h["source"] for h in search(tab_b, "walrus budget", 10, "shared")}

    # a third tab shares the collection last and catches up (documents and tombstones)
    quiet = tab_c.rag("stats")  # asked to sync (A's and B's requests), it answered nothing
    assert quiet["messagesOut"] == 0 and quiet["collections"] == [] and quiet["messagesIn"] == 2
    tab_c.rag("share", {"collection": "shared"})
    wait_for(lambda: converged([tab_a, tab_b, tab_c], 6), 30, "C catches up to the same 6 documents")
    assert set(tab_c.docs("shared")) == ids - {walrus}
    assert search(tab_c, "cobra budget", 1, "shared")[0]["source"] == "b2.txt"
    assert tab_c.rag("stats")["embeddedTexts"] == 0  # embeddings came with the deltas

    # the shared marker did cross (the spy works), the private one never did, anywhere
    assert ("datachannel", SHARED) in [tuple(h) for h in tab_a.wire_hits()]
    for tab in (tab_a, tab_b, tab_c):
        assert not [h for h in tab.wire_hits() if h[1] == PRIVATE], tab.room
        assert not [u for u, body in tab.requests if PRIVATE in u or PRIVATE in body]
    assert all(PRIVATE not in h["text"] for t in (tab_b, tab_c) for h in search(t, PRIVATE, 10, "shared"))
    assert tab_b.rag("stats")["droppedMessages"] == 0


N_BIG = 16


# ---- a tab closed mid-ingest; WebGPU embeddings ---------------------------------------------

def test_closing_the_tab_mid_ingest_leaves_a_consistent_index(tab_c):
    words = ["amber", "basil", "cedar", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "juniper"]
    docs = [{"text": f"Inventory record {i}: crate of {words[i % 10]} goods number {i * 7919 % 1000}.",
             "source": f"rec{i:02d}.txt"} for i in range(N_BIG)]
    page = tab_c.page
    page.evaluate("(d) => { window.__big = tabmesh.rag.ingestMany({docs: d, collection: 'big'}); "
                  "window.__big.catch(() => {}); }", docs)
    wait_for(lambda: len(tab_c.docs("big")) >= 3, 60, "a few documents stored")
    page.close()  # mid-ingest: the rest of the batch in flight is lost, nothing else
    tab_c.room += "-reopened"  # alone: no replication traffic beside the checks
    tab_c.open()  # the same browser context: the same IndexedDB
    opened = tab_c.rag("open", {"collection": "big"})
    stored = tab_c.docs("big")
    assert 3 <= len(stored) < N_BIG and opened["documents"] == len(stored)
    assert all(d["complete"] for d in stored.values())
    assert opened["passages"] == len(stored)
    some = next(iter(stored.values()))
    i = int(some["source"][3:5])
    assert search(tab_c, docs[i]["text"], 1, "big")[0]["docId"] == some["docId"]
    rest = tab_c.rag("ingestMany", {"docs": docs, "collection": "big"})
    assert rest["skipped"] == len(stored) and rest["documents"] == N_BIG
    assert rest["embedded"] == N_BIG - len(stored)
    assert len(tab_c.docs("big")) == N_BIG


def test_embeddings_on_webgpu_match_sentence_transformers(tab_b):
    fixture = json.loads(FIXTURE.read_text())["texts"][:4]
    ref = np.stack([np.frombuffer(base64.b64decode(t["embedding_f16"]), "<f2") for t in fixture]).astype(np.float32)
    tab_b.page.set_default_timeout(180_000)
    got = tab_b.page.evaluate("(t) => tabmesh.embed(t, {backend: 'webgpu'})", [t["text"] for t in fixture])
    assert got["backend"] == "webgpu"
    vecs = np.array(got["vectors"], dtype=np.float32)
    cos = (vecs * ref).sum(axis=1) / np.linalg.norm(vecs, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.999, cos


def test_a_second_tab_of_the_same_browser_leaves_open_collections_to_the_first(app, tab_a):
    second = Tab(app, tab_a.context, tab_a.room + "-2")  # another room: only IndexedDB is shared
    try:
        with pytest.raises(Exception, match="open in another tab of this browser"):
            second.rag("open")
        wait_for(lambda: "open in another tab" in second.page.inner_text("#rag-status"), 15,
                 "the panel says why it shows no documents")
        assert second.rag("open", {"collection": "not-held"})["documents"] == 0
        assert second.page.evaluate("tabmesh.errors") == []
    finally:
        second.page.close()


def test_no_page_errors(tabs):
    for tab in tabs.values():
        errors = [e for e in tab.page.evaluate("tabmesh.errors")
                  if not e.startswith("signaling connection closed")]  # the 2 s test heartbeat
        assert errors == [], tab.peer_id


ASK = "Copy the first line of the passages exactly."


def test_ask_streams_an_answer_with_its_sources(tab_c):
    tab = tab_c
    page = tab.page
    page.set_default_timeout(180_000)
    tab.rag("ingestMany", {"docs": [{"text": DOCS[s], "source": s} for s in ("zebras.txt", "volcano.md")],
                           "collection": "default"})
    page.evaluate("tabmesh.llm.load({backend: 'numpy'})")
    page.fill("#rag-question", ASK)
    page.fill("#rag-max-tokens", "10")
    page.click("#rag-ask")
    page.wait_for_function("document.querySelector('#rag-sources li')")
    page.wait_for_function("!document.querySelector('#rag-ask').disabled", timeout=180_000)
    shown = page.inner_text("#rag-answer-text")
    assert shown and not shown.startswith("error"), shown
    assert page.locator("#rag-sources li").count() == 2
    assert page.locator("#rag-src-1 .passage").inner_text() in (DOCS["zebras.txt"], DOCS["volcano.md"])
    # the same question through the API: greedy, so the same words (the KV cache makes it quick)
    r = tab.rag("ask", {"question": ASK, "k": 4, "maxTokens": 10})
    print("answer:", repr(r["answer"]), r["citations"])
    assert r["answer"] == shown
    assert [s["n"] for s in r["sources"]] == [1, 2]
    assert {s["source"] for s in r["sources"]} == {"zebras.txt", "volcano.md"}
    assert all(s["text"] == DOCS[s["source"]] for s in r["sources"])
    # greedy SmolLM2 copies the first passage's header, "[1] (": one citation of passage 1
    assert r["citations"] == [[1]], r["answer"]
    link = page.locator("#rag-answer-text a.cite")
    assert link.count() == 1 and link.inner_text() == "[1]"
    link.click()
    page.wait_for_function("document.querySelector('#rag-src-1').classList.contains('cited')")
