"""Wires the node to the page: GPU probe, signaling, peers, the window.tabmesh API, the DOM.

Runs only in the tab (PyScript). Everything it calls is importable natively; this module
is the one that owns the DOM and the public JS surface defined in web/bootstrap.js.
"""
from __future__ import annotations

import asyncio
import logging
import sys
import time

from .jsbridge import IN_PYODIDE, ProxyBag, TaskSet, js, js_error_message, js_obj, py_bytes
from .api_worker import ApiWorker, BrowserWorkerSocket, TabServices
from .embed_service import EmbedService
from .llm_page import ChatPanel, LLMService
from .rag_page import RagService
from .rag_panel import RagPanel
from .mesh.auth import MAX_SECRET, RoomKey
from .mesh_page import MeshService
from .mesh.node import Node
from .mesh.rtc import RTCLink
from .mesh.signaling import SignalingClient, SignalingError

log = logging.getLogger("tabmesh.page")
DEFAULT_ROOM = "lobby"
_current_page = None  # the running Page; its proxies and tasks must outlive main()


def take_fragment_param(name: str) -> str | None:
    """A parameter of the URL fragment (#secret=…&key=…: browsers never send the fragment to a
    server, so no log line has it), then removed from the address bar so it does not linger
    in history; the fragment's other parameters stay."""
    frag = js.URLSearchParams.new(str(js.location.hash)[1:])
    value = frag.get(name)
    if value is None:
        return None
    frag.delete(name)
    rest = str(frag.toString())
    js.history.replaceState(None, "", str(js.location.pathname) + str(js.location.search)
                            + (f"#{rest}" if rest else ""))
    return str(value)


class PageUI:
    """Every DOM write goes through here, as text (never innerHTML)."""

    def __init__(self):
        self.doc = js.document
        self.api = js.window.tabmesh

    def _el(self, id_):
        return self.doc.getElementById(id_)

    def status(self, text: str, done: bool = False) -> None:
        self._el("status").textContent = text
        self._el("progress").hidden = done

    def field(self, id_: str, text: str) -> None:
        self._el(id_).textContent = text

    def error(self, text: str) -> None:
        log.warning("%s", text)
        self.api._showError(text)

    def render_peers(self, peers: list[dict]) -> None:
        body = self._el("peers").tBodies[0]
        body.replaceChildren()
        for p in peers:
            row = self.doc.createElement("tr")
            row.dataset.peerId = p["peerId"]
            rtt = "—" if p["rttMs"] is None else f"{p['rttMs']:.1f} ms"
            row.title = p.get("reason") or ""
            for text, cls in ((p["peerId"], "peer"), (p["state"], f"state-{p['state']}"), (rtt, "rtt")):
                cell = self.doc.createElement("td")
                cell.className = cls
                cell.textContent = text
                row.append(cell)
            body.append(row)
        self._el("no-peers").hidden = bool(peers)


async def probe_gpu(ui: PageUI):
    """Open the WebGPU device and run the self-test; None (and a message) without a GPU."""
    from .gpu import NoGPUError, open_device
    from .gpu.selftest import run_selftest
    try:
        device = await open_device()
    except NoGPUError as exc:
        ui.field("gpu", "none")
        ui.error(f"No WebGPU adapter: {exc} This tab still joins the mesh as a peer without a GPU.")
        return None, None, None
    info = device.info
    ui.field("gpu", f"{info.get('vendor') or '?'} / {info.get('architecture') or '?'} "
                    f"({info.get('description') or info.get('device') or 'WebGPU'})")
    ui.status("running the GPU self-test kernel…")
    result = await run_selftest(device)
    ui.field("selftest", f"{result['kernel']} {result['m']}×{result['k']}·{result['k']}×{result['n']}: "
                         f"{'ok' if result['ok'] else 'MISMATCH'} (max |err| {result['max_abs_err']:.2e})")
    if not result["ok"]:
        ui.error(f"GPU self-test failed: max |err| {result['max_abs_err']:.3g} against numpy")
    return device, info, result


class Page:
    def __init__(self):
        self.ui = PageUI()
        self.proxies = ProxyBag()
        self.tasks = TaskSet(on_error=lambda what, exc: self.ui.error(f"{what} failed: {js_error_message(exc)}"))
        self.node: Node | None = None
        self.signaling: SignalingClient | None = None
        self.device = None
        self.gpu_info = None
        self.selftest = None
        self._render_pending = False
        self.api_socket = None

    async def start(self) -> None:
        params = js.URLSearchParams.new(js.location.search)
        room = params.get("room") or DEFAULT_ROOM
        self.ui.field("room", room)
        self.ui.status("asking for a WebGPU adapter…")
        try:
            self.device, self.gpu_info, self.selftest = await probe_gpu(self.ui)
        except Exception as exc:  # a broken GPU must not keep the tab out of the mesh
            self.ui.error(f"GPU start-up failed: {js_error_message(exc)}")
        self.llm = LLMService(self.device, on_status=lambda text: self.ui.field("model-status", text),
                              on_progress=self._model_progress)
        self.chat = ChatPanel(self.llm, self.proxies, self.tasks, self.ui.error)
        self.embed = EmbedService(self.device, on_status=lambda text: log.info("%s", text),
                                  on_progress=self._model_progress)
        self.llm.on_loaded = lambda: self.api_socket and self.tasks.spawn(self.api_socket.refresh(), "API status")
        self.tasks.spawn(self.chat.populate(), "list models")
        self.ui.status(f"joining room {room}…")
        scheme = "wss" if js.location.protocol == "https:" else "ws"
        secret = self._room_secret()
        if secret:
            self.ui.field("room", f"{room} (room secret set)")
        self.node = Node(make_link=lambda node, pid, initiator: RTCLink(node, pid, initiator),
                         send_signaling=lambda msg: self.signaling.send(msg),
                         on_change=self._schedule_render,
                         room_key=RoomKey(secret, room) if secret else None)   # the secret itself is not kept
        self.node.on_reject = lambda _pid, message: self.ui.error(message)
        self.signaling = SignalingClient(f"{scheme}://{js.location.host}/ws", room,
                                         on_message=self.node.on_signaling, on_error=self.ui.error,
                                         on_closed=self._signaling_closed)
        welcome = await self.signaling.connect()
        self.node.on_signaling(welcome)
        self.ui.field("peer-id", welcome["peerId"])
        self.rag = RagService(self.embed, self.llm, self.node)
        self.rag_panel = RagPanel(self.rag, self.proxies, self.tasks, self.ui.error)
        self.tasks.spawn(self.rag_panel.start(), "open documents")
        self.mesh = MeshService(self, params)
        js.document.getElementById("mesh-join").addEventListener(
            "click", self.proxies(lambda _ev: self.tasks.spawn(self.mesh.join(), "joining the mesh")))
        if (params.get("mesh") or "").lower() in ("1", "true", "yes") or params.get("stages"):
            self.tasks.spawn(self.mesh.start(), "joining the mesh's cluster")
        self._register_api()
        self.proxies_unload = self.proxies(lambda _ev: self.close())
        js.window.addEventListener("pagehide", self.proxies_unload)
        self.ui.status(f"connected as {welcome['peerId']} in room {room}", done=True)
        serve_box = js.document.getElementById("serve-api")
        serve_box.addEventListener("change", self.proxies(lambda _ev: self._toggle_api(serve_box.checked)))
        if (params.get("serve") or "").lower() in ("1", "true", "yes"):
            serve_box.checked = True
            self._toggle_api(True)
        gpu = None
        if self.gpu_info is not None:
            gpu = {k: self.gpu_info[k] for k in ("vendor", "architecture", "features", "limits")}
        js.window.tabmesh._ready(js_obj({"peerId": welcome["peerId"], "room": room, "gpu": gpu}))

    def _room_secret(self) -> str | None:
        secret = take_fragment_param("secret")
        if secret is not None and len(secret) > MAX_SECRET:   # refuse, rather than join the room unprotected
            raise SignalingError(f"the room secret (#secret=) is longer than {MAX_SECRET} characters")
        return secret or None

    # ---- serving the server's OpenAI endpoint (signaling/gateway.py) ------------------------
    def _api_key(self) -> str | None:
        """#key=… is read when the tab starts serving (it stays in the fragment until then)."""
        key = take_fragment_param("key")
        if key:
            self._key = key
        return getattr(self, "_key", None)

    def _toggle_api(self, on: bool) -> None:
        if on and self.api_socket is None:
            scheme = "wss" if js.location.protocol == "https:" else "ws"
            worker = ApiWorker(TabServices(self.llm, self.embed), send=lambda msg: None)
            self.api_socket = BrowserWorkerSocket(
                f"{scheme}://{js.location.host}/api/worker", worker, worker.service.offers, self._api_key(),
                on_state=lambda text: self.ui.field("api-status", text))
            self.tasks.spawn(self.api_socket.run(), "API worker")
        elif not on and self.api_socket is not None:
            self.api_socket.close()
            self.api_socket = None
            self.ui.field("api-status", "off")

    async def _api_serve(self, on=True) -> dict:
        self._toggle_api(bool(on))
        js.document.getElementById("serve-api").checked = bool(on)
        if self.api_socket is not None:
            await asyncio.wait_for(asyncio.shield(self.api_socket.connected), 30)
        return self._api_status()

    def _api_status(self) -> dict:
        s = self.api_socket
        return {"serving": s is not None and s.connected.done() and not s.connected.exception(),
                "workerId": s.worker.worker_id if s else None, "served": s.worker.served if s else 0,
                "running": len(s.worker.running) if s else 0,
                "chunkTimes": list(s.worker.chunk_times) if s else []}   # when each streamed chunk left (s)

    def _model_progress(self, done: int, total: int) -> None:
        bar = js.document.getElementById("model-progress")
        bar.hidden = done >= total
        bar.max, bar.value = max(total, 1), done
        self.ui.field("model-status", f"downloading weights: {done / 1e6:.1f} / {total / 1e6:.1f} MB")

    def _schedule_render(self) -> None:
        """Coalesce peer-table redraws: pongs arrive often and the DOM is slow from Python."""
        if self._render_pending:
            return
        self._render_pending = True

        def render():
            self._render_pending = False
            self.ui.render_peers(self.node.peer_list())
        asyncio.get_event_loop().call_later(0.1, render)

    def _signaling_closed(self, reason: str) -> None:
        self.ui.error(f"{reason}. Existing peer connections stay up; reload the page to rejoin the room.")
        self.ui.status("signaling disconnected", done=True)

    # ---- window.tabmesh ------------------------------------------------------------------
    def _async_handler(self, name: str, fn):
        def handler(resolve, reject, *args):
            async def run():
                try:
                    resolve(js_obj(await fn(*args)))
                except Exception as exc:
                    to_openai = getattr(exc, "to_openai", None)
                    if to_openai is not None:  # keep OpenAI's error shape across the JS boundary
                        reject(js_obj({"openai": to_openai(), "status": getattr(exc, "http_status", 500)}))
                    else:
                        reject(js.Error.new(js_error_message(exc)))
            self.tasks.spawn(run(), f"tabmesh.{name}")
        js.window.tabmesh._register(name, self.proxies(handler))

    def _sync_handler(self, name: str, fn):
        js.window.tabmesh._register(name, self.proxies(lambda *args: js_obj(fn(*args))))

    def _register_api(self) -> None:
        node = self.node
        self._sync_handler("peers", node.peer_list)
        self._sync_handler("inbox", lambda: list(node.inbox))
        self._sync_handler("stats", lambda: {"droppedFrames": node.dropped_frames,
                                             "pendingReassembly": node.reassembler.pending,
                                             "rejectedPeers": node.rejected,
                                             "roomSecret": node.room_key is not None})

        async def ping(peer_id):
            return await node.ping(str(peer_id))

        async def echo(peer_id, data):
            return await node.echo(str(peer_id), py_bytes(data))

        async def send(peer_id, data):
            await node.send_data(str(peer_id), py_bytes(data))
            return True

        async def self_test():
            if self.device is None:
                raise RuntimeError("this tab has no WebGPU device")
            from .gpu.selftest import run_selftest
            return await run_selftest(self.device)

        async def send_raw(peer_id, data):
            # Debugging aid (and the robustness tests): put arbitrary bytes on the channel.
            info = node.peers.get(str(peer_id))
            if info is None or info.state != "open":
                raise ConnectionError(f"no open channel to peer {peer_id}")
            await info.link.send(py_bytes(data))
            return True

        for name, fn in (("ping", ping), ("echo", echo), ("send", send), ("selfTest", self_test),
                         ("sendRawFrame", send_raw)):
            self._async_handler(name, fn)

        llm = self.llm

        def as_dict(obj) -> dict:
            value = obj.to_py() if hasattr(obj, "to_py") else obj
            if not isinstance(value, dict):
                from .api_errors import InvalidRequestError
                raise InvalidRequestError("the request must be an object")
            return value

        async def chat_create(request):
            return await llm.chat_create(as_dict(request))

        async def chat_open(request):
            return await llm.chat_open(as_dict(request))

        async def chat_next(sid):
            return await llm.chat_next(str(sid))

        async def chat_close(sid, cancel_only=False):
            return await llm.chat_close(str(sid), bool(cancel_only))

        async def llm_load(opts=None):
            opts = as_dict(opts) if opts is not None else {}
            return await llm.load(opts.get("model"), opts.get("backend"), int(opts.get("nCtx", 2048)),
                                  opts.get("numerics"))

        async def llm_generate(opts):
            return await llm.generate(as_dict(opts))

        async def llm_benchmark(opts):
            return await llm.benchmark(as_dict(opts))

        async def models_list():
            return await llm.models_list()

        for name, fn in (("chatCreate", chat_create), ("chatOpen", chat_open), ("chatNext", chat_next),
                         ("chatClose", chat_close), ("llmLoad", llm_load), ("llmGenerate", llm_generate),
                         ("llmBenchmark", llm_benchmark),
                         ("modelsList", models_list)):
            self._async_handler(name, fn)
        self._sync_handler("llmInfo", llm.info)

        async def embed(texts, opts=None):
            texts = texts.to_py() if hasattr(texts, "to_py") else texts
            opts = as_dict(opts) if opts is not None else {}
            if isinstance(texts, str) or not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                from .api_errors import InvalidRequestError
                raise InvalidRequestError("embed takes a list of strings", param="input")
            if opts.get("model") or opts.get("backend") or self.embed.model_id is None:
                await self.embed.load(opts.get("model"), opts.get("backend"))
            vectors, n_tokens = await self.embed.embed(texts)
            return {"model": self.embed.model_id, "backend": self.embed.backend, "tokens": n_tokens,
                    "vectors": [[float(x) for x in row] for row in vectors]}

        self._async_handler("embed", embed)
        for name, fn in self.rag.handlers().items():
            self._async_handler(name, fn)
        mesh = self.mesh

        async def mesh_generate(opts):
            return await mesh.generate(as_dict(opts))

        self._async_handler("meshGenerate", mesh_generate)
        self._sync_handler("meshStatus", mesh.status)
        self._async_handler("meshJoin", mesh.join)
        self._async_handler("meshPrepare", mesh.prepare)
        self._sync_handler("meshThrottle", mesh.throttle)
        self._async_handler("apiServe", self._api_serve)
        self._sync_handler("apiStatus", self._api_status)

    def close(self) -> None:
        if self.api_socket is not None:
            self.api_socket.close()
        if self.node is not None:
            self.node.close()
        if self.signaling is not None:
            self.signaling.close()
        if getattr(self, "rag", None) is not None:
            self.rag.close()
        if getattr(self, "mesh", None) is not None and self.mesh.cluster is not None:
            self.mesh.cluster.close()
        self.tasks.cancel_all()


async def main() -> Page:
    if not IN_PYODIDE:
        raise RuntimeError("tabmesh.page runs in the browser; use `tabmesh serve` and open the page")
    global _current_page
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stdout)
    page = _current_page = Page()
    t0 = time.perf_counter()
    try:
        await page.start()
    except SignalingError as exc:
        js.window.tabmesh._fail(f"Could not join the mesh: {exc}")
        page.ui.status("not connected", done=True)
    except Exception as exc:
        js.window.tabmesh._fail(f"Node start-up failed: {js_error_message(exc)}")
        page.ui.status("start-up failed", done=True)
        raise
    log.info("node started in %.2f s", time.perf_counter() - t0)
    return page
