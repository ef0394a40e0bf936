"""A tab serving the server's OpenAI endpoint: the worker side of signaling/gateway.py.

The gateway (protocol written at the top of signaling/gateway.py) sends `request` frames;
this module runs them on the tab's engine and answers with `chunk`/`end`, `result` or
`error` frames. `ApiWorker` is transport-free — it is handed a `send(dict)` callable and
fed decoded frames — so native tests drive it over an aiohttp socket and the tab over the
browser's WebSocket (`BrowserWorkerSocket`).

The service it drives has the LLMService surface (chat_create, chat_open, chat_next,
chat_close) plus `embeddings(body) -> dict`; errors become OpenAI's error shape via
api_errors.openai_error, so a bad request from a client gets the same answer through the
gateway as in the page.
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from typing import Callable

from .api_errors import openai_error
from .jsbridge import ProxyBag, TaskSet, js, js_error_message

log = logging.getLogger("tabmesh.api_worker")
PROTOCOL_VERSION = 1


class ApiWorker:
    def __init__(self, service, send: Callable[[dict], None], slots: int = 1):
        self.service, self.send, self.slots = service, send, slots
        self.tasks = TaskSet(on_error=lambda what, exc: log.warning("%s: %s", what, js_error_message(exc)))
        self.running: dict[str, asyncio.Task] = {}
        self.streams: dict[str, str] = {}     # request id -> the service's stream id
        self.served = 0
        self.worker_id: str | None = None
        self.chunk_times: collections.deque = collections.deque(maxlen=512)  # (rid, wall clock s) per chunk sent

    def hello(self, offers: dict, api_key: str | None) -> dict:
        return {"type": "hello", "version": PROTOCOL_VERSION, "apiKey": api_key, "slots": self.slots, **offers}

    def on_frame(self, msg: dict) -> None:
        kind = msg.get("type") if isinstance(msg, dict) else None
        if kind == "welcome":
            self.worker_id = msg.get("workerId")
        elif kind == "request" and isinstance(msg.get("id"), str) and isinstance(msg.get("body"), dict):
            rid = msg["id"]
            self.running[rid] = self.tasks.spawn(self._run(rid, msg.get("endpoint"), bool(msg.get("stream")),
                                                           msg["body"]), f"API request {rid}")
        elif kind == "cancel" and isinstance(msg.get("id"), str):
            self.tasks.spawn(self._cancel(msg["id"]), "API cancel")
        else:
            log.warning("ignored a gateway frame of type %r", kind)

    async def _cancel(self, rid: str) -> None:
        sid = self.streams.get(rid)
        if sid is not None:
            await self.service.chat_close(sid, True)   # stops between tokens; the stream then ends
        elif rid in self.running:
            self.running[rid].cancel()                 # a whole (non-streamed) request

    async def _run(self, rid: str, endpoint, stream: bool, body: dict) -> None:
        try:
            if endpoint == "embeddings":
                self.send({"type": "result", "id": rid, "data": await self.service.embeddings(body)})
            elif endpoint == "chat" and not stream:
                self.send({"type": "result", "id": rid, "data": await self.service.chat_create(body)})
            elif endpoint == "chat":
                await self._stream(rid, body)
            else:
                raise ValueError(f"unknown endpoint {endpoint!r}")
        except asyncio.CancelledError:
            self.send({"type": "error", "id": rid, "status": 499,
                       "error": {"message": "cancelled: the client went away", "type": "server_error",
                                 "param": None, "code": "cancelled"}})
        except Exception as exc:
            status, body_ = openai_error(exc)
            self.send({"type": "error", "id": rid, "status": status, "error": body_["error"]})
        finally:
            self.running.pop(rid, None)
            self.streams.pop(rid, None)
            self.served += 1

    async def _stream(self, rid: str, body: dict) -> None:
        sid = await self.service.chat_open(body)
        self.streams[rid] = sid
        try:
            while True:
                step = await self.service.chat_next(sid)
                if step["done"]:
                    break
                self.send({"type": "chunk", "id": rid, "data": step["value"]})
                self.chunk_times.append((rid, time.time()))
        finally:
            await self.service.chat_close(sid, False)
        self.send({"type": "end", "id": rid})

    def close(self) -> None:
        self.tasks.cancel_all()


class TabServices:
    """What a tab offers the gateway: its LLMService's chat calls and its EmbedService."""

    def __init__(self, llm, embed):
        self.llm, self.embed = llm, embed
        self.chat_create, self.chat_open = llm.chat_create, llm.chat_open
        self.chat_next, self.chat_close = llm.chat_next, llm.chat_close
        self.embeddings = embed.embeddings

    async def offers(self) -> dict:
        from .model.remote import served_models
        listing = await served_models()    # one fetch for both kinds
        loaded = [self.llm.loaded.model_id] if self.llm.loaded is not None else []
        gguf = [m["name"] for m in listing if m.get("kind") == "gguf"]
        return {"models": loaded, "canLoad": [m for m in gguf if m not in loaded],
                "embeddings": [m["name"] for m in listing if m.get("kind") == "embedding"]}


class BrowserWorkerSocket:
    """The tab's WebSocket to /api/worker; reconnects (with backoff) while the tab serves."""

    def __init__(self, url: str, worker: ApiWorker, offers: Callable[[], "asyncio.Future"],
                 api_key: str | None, on_state: Callable[[str], None]):
        self.url, self.worker, self.offers, self.api_key, self.on_state = url, worker, offers, api_key, on_state
        self.proxies = ProxyBag()
        self.ws = None
        self.closed = False
        self.connected = asyncio.get_event_loop().create_future()
        worker.send = self.send

    def send(self, msg: dict) -> None:
        if self.ws is not None and self.ws.readyState == 1:
            self.ws.send(json.dumps(msg))

    async def refresh(self) -> None:
        """Tell the gateway what this tab offers now (after a model load)."""
        self.send({"type": "status", **(await self.offers())})

    async def run(self) -> None:
        delay = 0.5
        while not self.closed:
            offers = await self.offers()
            opened = asyncio.get_event_loop().create_future()
            gone = asyncio.get_event_loop().create_future()
            ws = self.ws = js.WebSocket.new(self.url)

            def on_open(_ev, opened=opened):
                if not opened.done():
                    opened.set_result(True)

            def on_close(ev, gone=gone):
                if not gone.done():
                    gone.set_result((ev.code, ev.reason))

            def on_message(ev):
                try:
                    self.worker.on_frame(json.loads(ev.data))
                except ValueError:
                    log.warning("ignored a malformed gateway frame")
            ws.onopen, ws.onclose, ws.onmessage = self.proxies(on_open), self.proxies(on_close), self.proxies(on_message)
            done, _ = await asyncio.wait({opened, gone}, return_when=asyncio.FIRST_COMPLETED)
            if opened in done:
                ws.send(json.dumps(self.worker.hello(offers, self.api_key)))
                self.on_state("serving the API")
                if not self.connected.done():
                    self.connected.set_result(True)
                delay = 0.5
            code, reason = await gone
            if code in (4400, 4401):
                self.on_state(f"the server refused this tab as an API worker: {reason}")
                if not self.connected.done():
                    self.connected.set_exception(PermissionError(reason))
                return
            if self.closed:
                return
            self.on_state(f"API connection lost (code {code}); reconnecting…")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    def close(self) -> None:
        self.closed = True
        if self.ws is not None and self.ws.readyState <= 1:
            self.ws.close(1000, "bye")
        self.worker.close()
