"""The OpenAI-compatible HTTP endpoint: the server relays each request to a tab that serves it.

    GET  /v1/models              the models the serving tabs have loaded or can load
    POST /v1/chat/completions    whole, or streamed as server-sent events (`stream: true`)
    POST /v1/embeddings          MiniLM (all-MiniLM-L6-v2), 384 dimensions, float or base64

Nothing is computed here: a tab opened with `?serve=1` (or `tabmesh node --headless`)
connects to `/api/worker` and the gateway hands it requests, one at a time per slot.

Worker protocol (JSON text frames on /api/worker, version 1). Tab -> server:

    {"type": "hello", "version": 1, "apiKey": str | null, "slots": int >= 1,
     "models": [id...], "canLoad": [id...], "embeddings": [id...]}     first frame, once
    {"type": "status", "models": [...], "canLoad": [...], "embeddings": [...]}   any time
    {"type": "chunk",  "id": rid, "data": {chat.completion.chunk}}    a stream's next chunk
    {"type": "result", "id": rid, "data": {...}}                      a whole response; ends rid
    {"type": "end",    "id": rid}                                     a stream is over; ends rid
    {"type": "error",  "id": rid, "status": int, "error": {message, type, param, code}}  ends rid

Server -> tab:

    {"type": "welcome", "version": 1, "workerId": str}
    {"type": "request", "id": rid, "endpoint": "chat" | "embeddings", "stream": bool, "body": {...}}
    {"type": "cancel",  "id": rid}       the client went away: stop between tokens, then end rid

The API key travels in `hello`, not in the URL, so it never reaches a log line. A frame that
breaks these rules is counted and dropped; a tab that breaks the hello closes with 4400.

Scheduling: a request goes to an idle slot of a tab that has its model loaded, else of one
that can load it (fewest active requests first); when every slot is busy it waits in one
FIFO queue bounded by `max_queue` (429 past that) and by `queue_timeout_s`. A client that
disconnects has its request cancelled in the tab; the slot is free again once the tab ends
the request. A tab that disconnects fails its requests with 502.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hmac
import itertools
import json
import logging
import os
from dataclasses import dataclass, field

from aiohttp import web

log = logging.getLogger("signaling.gateway")

PROTOCOL_VERSION = 1
API_KEY_ENV = "TABMESH_API_KEY"
MAX_WORKER_FRAME = 8 << 20        # an embeddings result of a large batch fits
MAX_REQUEST_BODY = 4 << 20
CLOSE_BAD_HELLO = 4400
CLOSE_BAD_KEY = 4401
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
DISCONNECT_POLL_S = 0.25


def openai_error(status: int, message: str, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": type_, "param": param, "code": code}},
                             status=status)


class GatewayError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.type_, self.code, self.param = status, type_, code, param

    def response(self) -> web.Response:
        return openai_error(self.status, str(self), self.type_, self.code, self.param)


@dataclass(eq=False)
class Job:
    rid: str
    endpoint: str
    stream: bool
    body: dict
    inbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    worker: "Worker | None" = None
    cancelled: bool = False


@dataclass(eq=False)
class Worker:
    wid: str
    send: object                     # callable(text) -> None
    slots: int = 1
    models: tuple = ()
    can_load: tuple = ()
    embeddings: tuple = ()
    active: dict = field(default_factory=dict)   # rid -> Job
    served: int = 0

    def offers(self, endpoint: str, model: str) -> bool:
        if endpoint == "embeddings":
            return model in self.embeddings
        return model in self.models or model in self.can_load

    @property
    def idle(self) -> bool:
        return len(self.active) < self.slots


def _str_list(value, what: str, limit: int = 256) -> tuple:
    if not isinstance(value, list) or len(value) > limit or not all(
            isinstance(v, str) and 0 < len(v) <= 256 for v in value):
        raise ValueError(f"{what} must be a list of at most {limit} model ids")
    return tuple(value)


class Gateway:
    def __init__(self, api_key: str | None = None, max_queue: int = 16, queue_timeout_s: float = 300.0):
        self.api_key = api_key or None
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self.workers: dict[str, Worker] = {}
        self.waiters: collections.deque = collections.deque()   # (endpoint, model, future)
        self._ids = itertools.count(1)
        self.dropped_frames = 0
        self.stats = collections.Counter()

    # ---- auth ----------------------------------------------------------------------------
    def key_ok(self, presented: str | None) -> bool:
        if self.api_key is None:
            return True
        return presented is not None and hmac.compare_digest(presented.encode(), self.api_key.encode())

    def check_request_key(self, request: web.Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not self.key_ok(token.strip()):
            raise GatewayError(401, "Incorrect or missing API key: send `Authorization: Bearer <key>` "
                                    "with the key `tabmesh serve --api-key` was given.", code="invalid_api_key")

    def snapshot(self) -> dict:
        return {"workers": len(self.workers), "slots": sum(w.slots for w in self.workers.values()),
                "busy": sum(len(w.active) for w in self.workers.values()), "queued": len(self.waiters),
                "droppedFrames": self.dropped_frames, **self.stats}

    # ---- catalogue -----------------------------------------------------------------------
    def model_ids(self) -> list[dict]:
        seen: dict[str, dict] = {}
        for w in self.workers.values():
            for mid in (*w.models, *w.can_load, *w.embeddings):
                entry = seen.setdefault(mid, {"id": mid, "object": "model", "created": 0, "owned_by": "tabmesh",
                                              "loaded_by": 0, "tabs": 0})
                entry["tabs"] += 1
                entry["loaded_by"] += int(mid in w.models or mid in w.embeddings)
        return sorted(seen.values(), key=lambda m: m["id"])

    # ---- scheduling ----------------------------------------------------------------------
    def _pick(self, endpoint: str, model: str) -> Worker | None:
        best = None
        for w in self.workers.values():
            if w.idle and w.offers(endpoint, model):
                key = (model not in w.models and endpoint == "chat", len(w.active), w.served)
                if best is None or key < best[0]:
                    best = (key, w)
        return best[1] if best else None

    def _reserve(self, worker: Worker) -> str:
        """Hold one slot of `worker` (so two requests are never handed the same one)."""
        rid = f"reserved-{next(self._ids)}"
        worker.active[rid] = None
        return rid

    async def acquire(self, endpoint: str, model: str) -> tuple[Worker, str]:
        """A worker with a slot reserved for this request: (worker, reservation id)."""
        if not self.workers:
            raise GatewayError(503, "No tab is serving the API: open the page with ?serve=1 or run "
                                    "`tabmesh node --headless`.", type_="server_error", code="no_workers")
        if not any(w.offers(endpoint, model) for w in self.workers.values()):
            kind = "embedding model" if endpoint == "embeddings" else "model"
            have = ", ".join(m["id"] for m in self.model_ids()) or "none"
            raise GatewayError(404, f"The {kind} `{model}` does not exist or no tab serves it; available: {have}.",
                               code="model_not_found", param="model")
        if not self.waiters and (worker := self._pick(endpoint, model)) is not None:
            return worker, self._reserve(worker)
        if len(self.waiters) >= self.max_queue:
            self.stats["rejected_429"] += 1
            raise GatewayError(429, f"Every serving tab is busy and {self.max_queue} requests are already "
                                    "queued; retry later.", type_="rate_limit_error", code="rate_limit_exceeded")
        fut = asyncio.get_running_loop().create_future()
        entry = (endpoint, model, fut)
        self.waiters.append(entry)
        self.stats["queued"] += 1
        self._dispatch_waiters()
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.queue_timeout_s)
        except asyncio.TimeoutError:
            raise GatewayError(503, f"No serving tab became free within {self.queue_timeout_s:.0f} s.",
                               type_="server_error", code="queue_timeout") from None
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                worker, rid = fut.result()   # handed a slot just as we gave up: give it back
                self.finish(worker, rid)
            raise
        finally:
            if entry in self.waiters:
                self.waiters.remove(entry)
            if not fut.done():
                fut.cancel()

    def _dispatch_waiters(self) -> None:
        """Hand free slots to waiting requests, oldest first (a later one may pass an earlier
        one only when no tab can take the earlier one's model right now)."""
        for entry in list(self.waiters):
            endpoint, model, fut = entry
            if fut.done():
                self.waiters.remove(entry)
                continue
            if not any(w.offers(endpoint, model) for w in self.workers.values()):
                self.waiters.remove(entry)
                fut.set_exception(GatewayError(503, f"The last tab serving `{model}` left.", type_="server_error",
                                               code="no_workers"))
                continue
            worker = self._pick(endpoint, model)
            if worker is not None:
                self.waiters.remove(entry)
                fut.set_result((worker, self._reserve(worker)))

    async def run_job(self, endpoint: str, model: str, body: dict, stream: bool) -> Job:
        """Start a job on a tab; returns it with its inbox of worker frames."""
        worker, reserved = await self.acquire(endpoint, model)
        worker.active.pop(reserved, None)
        if worker.wid not in self.workers:   # it left between the hand-over and now
            raise GatewayError(502, "The tab chosen for this request closed.", type_="server_error",
                               code="worker_gone")
        job = Job(rid=f"r{next(self._ids)}", endpoint=endpoint, stream=stream, body=body, worker=worker)
        worker.active[job.rid] = job
        worker.served += 1
        self.stats["requests"] += 1
        worker.send(json.dumps({"type": "request", "id": job.rid, "endpoint": endpoint, "stream": stream,
                                "body": body}))
        return job

    def cancel(self, job: Job) -> None:
        if job.cancelled or job.worker is None or job.rid not in job.worker.active:
            return
        job.cancelled = True
        self.stats["cancelled"] += 1
        job.worker.send(json.dumps({"type": "cancel", "id": job.rid}))

    def finish(self, worker: Worker, rid: str) -> None:
        if worker.active.pop(rid, None) is not None:
            self._dispatch_waiters()

    # ---- worker frames -------------------------------------------------------------------
    def worker_hello(self, wid: str, send, msg: dict) -> Worker:
        if not isinstance(msg, dict) or msg.get("type") != "hello":
            raise ValueError("the first frame must be a hello")
        if msg.get("version") != PROTOCOL_VERSION:
            raise ValueError(f"unsupported worker protocol version {msg.get('version')!r}")
        slots = msg.get("slots", 1)
        if not isinstance(slots, int) or isinstance(slots, bool) or not 1 <= slots <= 64:
            raise ValueError("slots must be an integer in 1..64")
        worker = Worker(wid=wid, send=send, slots=slots)
        self._update(worker, msg)
        self.workers[wid] = worker
        self._dispatch_waiters()
        return worker

    @staticmethod
    def _update(worker: Worker, msg: dict) -> None:
        worker.models = _str_list(msg.get("models", []), "models")
        worker.can_load = _str_list(msg.get("canLoad", []), "canLoad")
        worker.embeddings = _str_list(msg.get("embeddings", []), "embeddings")

    def worker_frame(self, worker: Worker, text: str) -> None:
        try:
            msg = json.loads(text)
            if not isinstance(msg, dict):
                raise ValueError("not an object")
            kind = msg.get("type")
            if kind == "status":
                self._update(worker, msg)
                self._dispatch_waiters()
                return
            rid = msg.get("id")
            job = worker.active.get(rid) if isinstance(rid, str) else None
            if job is None:
                raise ValueError(f"unknown request id {rid!r}")
            if kind == "chunk":
                if not job.stream or not isinstance(msg.get("data"), dict):
                    raise ValueError("chunk for a request that is not streamed, or without data")
                job.inbox.put_nowait(("chunk", msg["data"]))
            elif kind == "result":
                if not isinstance(msg.get("data"), dict):
                    raise ValueError("result without data")
                self.finish(worker, rid)
                job.inbox.put_nowait(("result", msg["data"]))
            elif kind == "end":
                self.finish(worker, rid)
                job.inbox.put_nowait(("end", None))
            elif kind == "error":
                status, error = msg.get("status"), msg.get("error")
                if not isinstance(status, int) or not 400 <= status <= 599 or not isinstance(error, dict) \
                        or not isinstance(error.get("message"), str):
                    raise ValueError("error needs a status 400..599 and error.message")
                self.finish(worker, rid)
                clean = {"message": error["message"][:4000], "type": str(error.get("type") or "server_error")[:64],
                         "param": error.get("param") if isinstance(error.get("param"), str) else None,
                         "code": error.get("code") if isinstance(error.get("code"), str) else None}
                job.inbox.put_nowait(("error", (status, clean)))
            else:
                raise ValueError(f"unknown frame type {kind!r}")
        except (ValueError, TypeError) as exc:
            self.dropped_frames += 1
            log.warning("dropped a frame from worker %s: %s", worker.wid, exc)

    def worker_gone(self, worker: Worker) -> None:
        self.workers.pop(worker.wid, None)
        for rid, job in list(worker.active.items()):
            worker.active.pop(rid, None)
            if job is not None:   # None: a reserved slot; its request sees the worker gone
                job.inbox.put_nowait(("error", (502, {"message": "The tab serving this request closed before it "
                                                  "finished.", "type": "server_error", "param": None,
                                                  "code": "worker_gone"})))
        self._dispatch_waiters()


GATEWAY_KEY = web.AppKey("gateway", Gateway)


# ---- HTTP handlers -------------------------------------------------------------------------
def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _next_frame(request: web.Request, job: Job, gateway: Gateway):
    """The tab's next frame for `job`; cancels the job in the tab if the client goes away."""
    while True:
        try:
            return await asyncio.wait_for(job.inbox.get(), DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            if _client_gone(request):
                gateway.cancel(job)
                return None


async def _read_json(request: web.Request) -> dict:
    if request.content_length is not None and request.content_length > MAX_REQUEST_BODY:
        raise GatewayError(413, f"Request body over {MAX_REQUEST_BODY} bytes.")
    try:
        raw = await request.content.read(MAX_REQUEST_BODY + 1)
        if len(raw) > MAX_REQUEST_BODY:
            raise GatewayError(413, f"Request body over {MAX_REQUEST_BODY} bytes.")
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise GatewayError(400, "The body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise GatewayError(400, "The body must be a JSON object.")
    return body


def _model_of(body: dict) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise GatewayError(400, "`model` is required: a model id from GET /v1/models.", param="model")
    return model


async def models_handler(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY_KEY]
    try:
        gateway.check_request_key(request)
    except GatewayError as exc:
        return exc.response()
    return web.json_response({"object": "list", "data": gateway.model_ids()})


async def chat_handler(request: web.Request) -> web.StreamResponse:
    gateway = request.app[GATEWAY_KEY]
    job = None
    try:
        gateway.check_request_key(request)
        body = await _read_json(request)
        model = _model_of(body)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise GatewayError(400, "`stream` must be true or false.", param="stream")
        job = await gateway.run_job("chat", model, body, stream)
        if not stream:
            frame = await _next_frame(request, job, gateway)
            return _final_response(frame)
        return await _relay_stream(request, job, gateway)
    except GatewayError as exc:
        return exc.response()
    finally:
        if job is not None and job.worker is not None and job.rid in job.worker.active:
            gateway.cancel(job)   # the handler ended early (client gone, server stopping)


def _final_response(frame) -> web.Response:
    if frame is None:
        return web.Response(status=499)   # nobody is listening any more
    kind, data = frame
    if kind == "result":
        return web.json_response(data)
    if kind == "error":
        status, error = data
        return web.json_response({"error": error}, status=status)
    return openai_error(502, f"The tab answered a {kind!r} frame where a result was due.", "server_error")


async def _relay_stream(request: web.Request, job: Job, gateway: Gateway) -> web.StreamResponse:
    """Server-sent events: `data: <chunk>` per chunk, `data: [DONE]` at the end. An error
    before the first chunk is a plain JSON error response (the client sees its status)."""
    response = None
    while True:
        frame = await _next_frame(request, job, gateway)
        if frame is None:
            return response or web.Response(status=499)
        kind, data = frame
        if kind == "error" and response is None:
            status, error = data
            return web.json_response({"error": error}, status=status)
        if response is None:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                                   "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            await response.prepare(request)
        try:
            if kind == "chunk":
                await response.write(b"data: " + json.dumps(data).encode() + b"\n\n")
            elif kind == "error":
                await response.write(b"event: error\ndata: " + json.dumps({"error": data[1]}).encode() + b"\n\n")
                break
            else:   # end (or a stray result: the stream is over either way)
                await response.write(b"data: [DONE]\n\n")
                break
        except (ConnectionError, RuntimeError):
            gateway.cancel(job)
            return response
    await response.write_eof()
    return response


async def embeddings_handler(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY_KEY]
    try:
        gateway.check_request_key(request)
        body = await _read_json(request)
        model = _model_of(body)
        texts = body.get("input")
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise GatewayError(400, "`input` must be a string or a non-empty list of strings "
                                    "(token arrays are not accepted).", param="input")
        if len(texts) > 2048:
            raise GatewayError(400, "`input` has more than 2048 strings.", param="input")
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise GatewayError(400, "`encoding_format` must be 'float' or 'base64'.", param="encoding_format")
        if body.get("dimensions") not in (None, 384):
            raise GatewayError(400, "This model has 384 dimensions; `dimensions` cannot change that.",
                               param="dimensions")
        job = await gateway.run_job("embeddings", model, {"model": model, "input": texts}, False)
        frame = await _next_frame(request, job, gateway)
        if frame is None or frame[0] != "result":
            return _final_response(frame)
        return web.json_response(_embedding_response(frame[1], fmt, model))
    except GatewayError as exc:
        return exc.response()


def _embedding_response(data: dict, fmt: str, model: str) -> dict:
    """The tab sends float lists; base64 is little-endian float32, as OpenAI encodes it."""
    import struct
    out = []
    for i, item in enumerate(data.get("data", [])):
        vec = item["embedding"]
        if fmt == "base64":
            vec = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
        out.append({"object": "embedding", "index": i, "embedding": vec})
    return {"object": "list", "data": out, "model": data.get("model", model), "usage": data.get("usage", {})}


async def worker_socket(request: web.Request) -> web.StreamResponse:
    from .server import CONFIG_KEY, origin_allowed
    gateway = request.app[GATEWAY_KEY]
    if not origin_allowed(request, request.app[CONFIG_KEY]):
        raise web.HTTPForbidden(text="cross-origin worker socket refused\n")
    ws = web.WebSocketResponse(max_msg_size=MAX_WORKER_FRAME, heartbeat=10.0, compress=False)
    await ws.prepare(request)
    outbox: asyncio.Queue = asyncio.Queue()

    async def writer():
        while True:
            text = await outbox.get()
            if text is None:
                return
            await ws.send_str(text)
    write_task = asyncio.get_running_loop().create_task(writer())
    worker = None
    try:
        try:
            first = await ws.receive(timeout=30)
            hello = json.loads(first.data) if first.type is web.WSMsgType.TEXT else None
        except (asyncio.TimeoutError, ValueError):
            hello = None
        if not isinstance(hello, dict) or hello.get("type") != "hello":
            await ws.close(code=CLOSE_BAD_HELLO, message=b"expected a hello frame")
            return ws
        if not gateway.key_ok(hello.get("apiKey") if isinstance(hello.get("apiKey"), str) else None):
            await ws.close(code=CLOSE_BAD_KEY, message=b"wrong or missing API key")
            return ws
        wid = f"w{next(gateway._ids)}"
        try:
            worker = gateway.worker_hello(wid, outbox.put_nowait, hello)
        except ValueError as exc:
            await ws.close(code=CLOSE_BAD_HELLO, message=str(exc).encode()[:120])
            return ws
        outbox.put_nowait(json.dumps({"type": "welcome", "version": PROTOCOL_VERSION, "workerId": wid}))
        log.info("worker %s serves models=%s canLoad=%s embeddings=%s", wid, worker.models, worker.can_load,
                 worker.embeddings)
        async for msg in ws:
            if msg.type is web.WSMsgType.TEXT:
                gateway.worker_frame(worker, msg.data)
            elif msg.type is web.WSMsgType.BINARY:
                gateway.dropped_frames += 1
            else:
                break
    finally:
        if worker is not None:
            gateway.worker_gone(worker)
            log.info("worker %s left", worker.wid)
        outbox.put_nowait(None)
        try:
            await asyncio.wait_for(write_task, 2.0)
        except (asyncio.TimeoutError, ConnectionError, RuntimeError):
            write_task.cancel()
    return ws


def api_key_from_env(explicit: str | None) -> str | None:
    return explicit or os.environ.get(API_KEY_ENV) or None


def require_key_off_loopback(host: str, api_key: str | None) -> None:
    if host not in LOOPBACK_HOSTS and not api_key:
        raise SystemExit(f"tabmesh: listening on {host} exposes /v1/ to the network: give an API key with "
                         f"--api-key or {API_KEY_ENV} (clients send it as `Authorization: Bearer <key>`)")


def install(app: web.Application, gateway: Gateway) -> None:
    app[GATEWAY_KEY] = gateway
    app.router.add_get("/v1/models", models_handler)
    app.router.add_post("/v1/chat/completions", chat_handler)
    app.router.add_post("/v1/embeddings", embeddings_handler)
    app.router.add_get("/api/worker", worker_socket)
