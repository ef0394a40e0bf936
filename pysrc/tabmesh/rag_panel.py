"""The documents panel (#rag-panel in web/index.html) over RagService (rag_page.py).

Add pasted text or dropped .txt/.md/.html files (PDF is refused with a message), watch the
ingestion progress, list and delete documents, search with highlighted matches, ask with
citation links that scroll to the cited passage, and opt the collection in to sharing.
Every piece of a document, a hit or an answer goes into the DOM as text (textContent;
<mark> built with createElement), never as HTML.
"""
from __future__ import annotations

import asyncio

from .jsbridge import js, js_error_message, js_obj, py_bytes
from .rag.answer import find_citations
from .rag.store import CollectionError, list_collections
from .rag.storage import StorageQuotaError
from .rag.textfiles import SUPPORTED_SUFFIXES, document_text
from .rag_page import DEFAULT_COLLECTION, RagService


class RagPanel:
    """The documents panel (#rag-panel): add text or files, progress, the document list,
    search with highlighted matches, Ask with citation links, and the share checkbox.
    Every piece of a document, a hit or an answer goes in as text (textContent, <mark>
    built with createElement): never as HTML."""

    def __init__(self, service: RagService, proxies, tasks, show_error):
        self.service, self.proxies, self.tasks, self.show_error = service, proxies, tasks, show_error
        self.doc = js.document
        el = self.doc.getElementById
        self.el = el
        self.name = DEFAULT_COLLECTION
        self.busy = False
        self._refresh_pending = False
        service.on_change = self._changed
        service.on_error = self._alert
        el("rag-add-form").addEventListener("submit", proxies(self._on_add))
        el("rag-file").addEventListener("change", proxies(self._on_files))
        drop = el("rag-drop")
        drop.addEventListener("dragover", proxies(self._on_dragover))
        drop.addEventListener("dragleave", proxies(lambda _ev: drop.classList.remove("over")))
        drop.addEventListener("drop", proxies(self._on_drop))
        el("rag-search-form").addEventListener("submit", proxies(self._on_search))
        el("rag-ask-form").addEventListener("submit", proxies(self._on_ask))
        el("rag-share").addEventListener("change", proxies(self._on_share))
        el("rag-docs").addEventListener("click", proxies(self._on_docs_click))
        el("rag-answer").addEventListener("click", proxies(self._on_answer_click))

    async def start(self) -> None:
        """At page load: open the storage and the shared collections, then show the panel's
        collection if it is stored (a boot-time problem stays in the panel)."""
        try:
            await self.service.start()
            stored = {c["name"] for c in await list_collections(await self.service.storage())}
            if self.name in stored:
                await self.service.collection(self.name)
            await self.refresh()
        except Exception as exc:
            self._status(f"documents unavailable: {exc}")

    # ---- small DOM helpers --------------------------------------------------------------
    def _make(self, tag: str, text: str | None = None, cls: str | None = None):
        node = self.doc.createElement(tag)
        if cls:
            node.className = cls
        if text is not None:
            node.textContent = text
        return node

    def _status(self, text: str) -> None:
        self.el("rag-status").textContent = text

    def _alert(self, text: str | None) -> None:
        box = self.el("rag-error")
        box.textContent = text or ""
        box.hidden = not text

    def _marked(self, parent, text: str, spans) -> None:
        """``text`` into ``parent`` with each (start, end) span in a <mark>, all as text."""
        at = 0
        for s, e in spans:
            if s < at or e <= s:
                continue
            if s > at:
                parent.append(self.doc.createTextNode(text[at:s]))
            parent.append(self._make("mark", text[s:e]))
            at = e
        if at < len(text):
            parent.append(self.doc.createTextNode(text[at:]))

    def _changed(self, name: str) -> None:
        if name != self.name or self._refresh_pending:
            return
        self._refresh_pending = True

        def run():
            self._refresh_pending = False
            self.tasks.spawn(self.refresh(), "refresh documents")
        asyncio.get_event_loop().call_later(0.2, run)

    async def refresh(self) -> None:
        col = self.service.opened(self.name)
        if col is None:
            self.el("rag-docs").replaceChildren()
            self.el("rag-no-docs").hidden = False
            return
        self.el("rag-share").checked = col.shared
        docs = await self.service.documents(self.name)
        ul = self.el("rag-docs")
        ul.replaceChildren()
        for d in docs:
            li = self._make("li")
            li.dataset.docId = d["docId"]
            li.append(self._make("span", d["source"], "source"))
            state = (f"{d['chunks']} chunk{'s' if d['chunks'] != 1 else ''}" if d["complete"] else
                     f"{d['stored']} of {d['chunks']} chunks stored: add it again to finish")
            li.append(self._make("span", f" · {state} ", "doc-state"))
            button = self._make("button", "Delete", "rag-delete")
            button.type = "button"
            button.dataset.docId = d["docId"]
            li.append(button)
            ul.append(li)
        self.el("rag-no-docs").hidden = bool(docs)

    # ---- adding -------------------------------------------------------------------------
    def _progress(self, p) -> None:
        bar = self.el("rag-progress")
        bar.hidden = False
        bar.max, bar.value = max(p.total, 1), p.done
        self._status(f"{p.source}: {p.done} / {p.total} chunks stored")

    async def _add(self, items: list[tuple[str, str]]) -> None:
        """Add (source, text) pairs in turn; the panel shows progress, then the list."""
        if self.busy:
            self._status("still adding the previous documents…")
            return
        self.busy = True
        self._alert(None)
        try:
            for source, text in items:
                r = await self.service.ingest(text, source, self.name, self._progress)
                self._status(f"{source}: already stored" if r["skipped"] else
                             f"{source}: {r['chunks']} chunks stored ({r['embedded']} embedded)")
        except StorageQuotaError as exc:
            self._alert(str(exc))
        except CollectionError as exc:
            self._alert(str(exc))
        except Exception as exc:
            self._alert(f"adding failed: {js_error_message(exc)}")
        finally:
            self.busy = False
            self.el("rag-progress").hidden = True
            await self.refresh()

    def _on_add(self, ev) -> None:
        ev.preventDefault()
        text = self.el("rag-text").value
        source = self.el("rag-source").value.strip() or "pasted text"
        if not text.strip():
            self._status("paste some text first")
            return
        self.el("rag-text").value = ""
        self.tasks.spawn(self._add([(source, text)]), "add document")

    def _on_files(self, ev) -> None:
        files = ev.target.files
        self.tasks.spawn(self._add_files([files.item(i) for i in range(files.length)]), "add files")
        ev.target.value = ""

    def _on_dragover(self, ev) -> None:
        ev.preventDefault()
        self.el("rag-drop").classList.add("over")

    def _on_drop(self, ev) -> None:
        ev.preventDefault()
        self.el("rag-drop").classList.remove("over")
        files = ev.dataTransfer.files
        self.tasks.spawn(self._add_files([files.item(i) for i in range(files.length)]), "add files")

    async def _add_files(self, files) -> None:
        items = []
        for f in files:
            name = str(f.name)
            if not name.lower().endswith(SUPPORTED_SUFFIXES):
                self._alert(f"{name}: only .txt, .md and .html files can be added; PDF and other "
                            "formats are not supported (save the document as text first)")
                continue
            try:
                items.append((name, document_text(name, py_bytes(await f.arrayBuffer()))))
            except CollectionError as exc:
                self._alert(str(exc))
        if items:
            await self._add(items)

    # ---- the list, sharing -------------------------------------------------------------
    def _on_docs_click(self, ev) -> None:
        target = ev.target
        if target.classList.contains("rag-delete"):
            doc_id = str(target.dataset.docId)
            target.disabled = True
            self.tasks.spawn(self._delete(doc_id), "delete document")

    async def _delete(self, doc_id: str) -> None:
        try:
            n = (await self.service.remove(doc_id, self.name))["removedChunks"]
            self._status(f"deleted {n} chunks")
        except Exception as exc:
            self._alert(f"delete failed: {js_error_message(exc)}")
        await self.refresh()

    def _on_share(self, ev) -> None:
        on = bool(ev.target.checked)

        async def run():
            try:
                r = await self.service.share(on, self.name)
                self._status(f"collection {self.name!r} is shared with the room" if r["shared"]
                             else f"collection {self.name!r} stays in this tab")
            except Exception as exc:
                self._alert(f"sharing failed: {js_error_message(exc)}")
            await self.refresh()
        self.tasks.spawn(run(), "share collection")

    # ---- search and ask ------------------------------------------------------------------
    def _hit_item(self, h: dict, n: int | None = None):
        li = self._make("li", cls="hit")
        if n is not None:
            li.id = f"rag-src-{n}"
        head = self._make("div", cls="hit-head")
        head.append(self._make("span", f"[{n}] " if n is not None else "", "hit-n"))
        head.append(self._make("span", h["source"], "source"))
        head.append(self._make("span", f" · score {h['score']:.3f}", "score"))
        li.append(head)
        body = self._make("div", cls="passage")
        self._marked(body, h["text"], h["highlights"])
        li.append(body)
        return li

    def _on_search(self, ev) -> None:
        ev.preventDefault()
        query = self.el("rag-query").value
        if query.strip():
            self.tasks.spawn(self._search(query), "search")

    async def _search(self, query: str) -> None:
        out = self.el("rag-hits")
        try:
            r = await self.service.search(query, 5, self.name)
        except Exception as exc:
            self._alert(f"search failed: {js_error_message(exc)}")
            return
        out.replaceChildren(*[self._hit_item(h) for h in r["hits"]])
        self._status(f"{len(r['hits'])} passages in {r['ms']:.0f} ms" if r["hits"]
                     else "no passages: add documents first")

    def _on_ask(self, ev) -> None:
        ev.preventDefault()
        question = self.el("rag-question").value
        if question.strip() and not self.el("rag-ask").disabled:
            self.tasks.spawn(self._ask(question), "ask")

    async def _ask(self, question: str) -> None:
        answer, sources_box = self.el("rag-answer-text"), self.el("rag-sources")
        answer.textContent = "…"
        sources_box.replaceChildren()
        self.el("rag-ask").disabled = True

        def show_sources(sources):
            sources_box.replaceChildren(*[self._hit_item(s, s["n"]) for s in sources])

        def show_text(text, sources):
            self._render_answer(answer, text, sources)
        try:
            try:
                max_tokens = max(1, min(2048, int(self.el("rag-max-tokens").value)))
            except ValueError:
                max_tokens = 128
            r = await self.service.ask(question, 4, max_tokens, self.name, on_sources=show_sources,
                                       on_text=show_text)
            self._render_answer(answer, r["answer"], r["sources"])
        except Exception as exc:
            answer.textContent = f"error: {js_error_message(exc)}"
        finally:
            self.el("rag-ask").disabled = False

    def _render_answer(self, box, text: str, sources: list[dict]) -> None:
        """The answer as text, each citation marker's numbers as links to their passage."""
        parts, at = [], 0
        for c in find_citations(text, sources):
            if c.start > at:
                parts.append(self.doc.createTextNode(text[at:c.start]))
            for n in c.numbers:
                a = self._make("a", f"[{n}]", "cite")
                a.href = f"#rag-src-{n}"
                a.dataset.n = str(n)
                parts.append(a)
            at = c.end
        if at < len(text):
            parts.append(self.doc.createTextNode(text[at:]))
        box.replaceChildren(*parts)

    def _on_answer_click(self, ev) -> None:
        target = ev.target
        if not target.classList.contains("cite"):
            return
        ev.preventDefault()
        passage = self.el(f"rag-src-{target.dataset.n}")
        if passage is None:
            return
        for old in self.doc.querySelectorAll("#rag-sources .cited"):
            old.classList.remove("cited")
        passage.classList.add("cited")
        passage.scrollIntoView(js_obj({"behavior": "smooth", "block": "center"}))
