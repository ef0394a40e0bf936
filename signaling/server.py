"""The tabmesh server: one asyncio aiohttp process serving the page and WebSocket signaling.

    make_app(config) -> web.Application
    await start(config) -> (runner, site, port)     port 0 binds an ephemeral port
    serve(config)                                   blocks until Ctrl-C

The signaling protocol is written down in tabmesh/mesh/signal_messages.py; its rules live
in rooms.Hub. This module only moves frames between sockets and the hub: each connection
gets a bounded outbox drained by its own writer task, so a slow reader never stalls the
peer that signals it (it is dropped with close code 4009 instead).

Frame size: the hub answers too-large for frames between max_message_bytes and
4 x max_message_bytes; aiohttp's reader refuses anything bigger from the frame header alone
and closes with 1009 without buffering it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from yarl import URL

from tabmesh import __version__
from tabmesh.mesh import signal_messages as sm

from . import gateway as api_gateway
from . import numerics as ggml_numerics_api
from .rooms import Hub, HubLimits, Peer
from .static import StaticFiles

log = logging.getLogger("signaling.server")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-eval' 'wasm-unsafe-eval'; "
    "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; connect-src 'self' blob: data:; "
    "worker-src 'self' blob:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
FRAME_HARD_CAP_FACTOR = 4   # frames above this many times max_message_bytes are never buffered
WS_CLOSE_TIMEOUT_S = 2.0    # how long close() waits for the client's close frame


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    root: Path = REPO_ROOT            # holds web/, wgsl/, vendor/, pysrc/
    models_dir: Path | None = None    # default: root / "models"
    heartbeat_interval_s: float = 2.0
    heartbeat_timeout_s: float = 6.0
    max_message_bytes: int = 16384
    rate_per_s: float = 40.0          # token bucket per connection
    rate_burst: int = 80
    max_peers_per_room: int = 32
    max_rooms: int = 1000
    max_connections: int = 2000
    outbox_max_bytes: int = 1 << 20   # queued bytes per connection before it counts as too slow
    csp: str = DEFAULT_CSP
    extra_origins: tuple[str, ...] = ()  # WebSocket origins allowed besides the server's own
    api_key: str | None = None        # required on /v1/ and /api/worker when set
    api_max_queue: int = 16           # requests waiting for a free tab before 429
    api_queue_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.models_dir = Path(self.models_dir) if self.models_dir is not None else self.root / "models"

    def hub_limits(self) -> HubLimits:
        return HubLimits(
            max_message_bytes=self.max_message_bytes, max_peers_per_room=self.max_peers_per_room,
            max_rooms=self.max_rooms, max_connections=self.max_connections,
            rate_per_s=self.rate_per_s, rate_burst=self.rate_burst,
            heartbeat_interval_s=self.heartbeat_interval_s, heartbeat_timeout_s=self.heartbeat_timeout_s)


CONFIG_KEY = web.AppKey("config", ServerConfig)
HUB_KEY = web.AppKey("hub", Hub)
STATIC_KEY = web.AppKey("static", StaticFiles)
TASKS_KEY = web.AppKey("tasks", set)        # every task this app started; cancelled on cleanup
SINKS_KEY = web.AppKey("sinks", set)        # open WebSocket outboxes; closed on shutdown
STARTED_KEY = web.AppKey("started", list)   # [loop.time() at start-up]


class WebSocketSink:
    """A connection's outbox: the hub queues frames without blocking, `run` writes them."""

    def __init__(self, ws: web.WebSocketResponse, max_bytes: int):
        self.ws = ws
        self.max_bytes = max_bytes
        self.queued_bytes = 0
        self._queue: collections.deque[str] = collections.deque()
        self._wake = asyncio.Event()
        self.close_with: tuple[int, str] | None = None

    def send(self, text: str) -> bool:
        if self.close_with is not None:
            return True  # closing anyway; drop quietly
        if self.queued_bytes + len(text) > self.max_bytes:
            return False
        self._queue.append(text)
        self.queued_bytes += len(text)
        self._wake.set()
        return True

    def close(self, code: int, reason: str) -> None:
        if self.close_with is None:
            self.close_with = (code, reason)
            if code == sm.CLOSE_SLOW_CONSUMER:
                self._queue.clear()
            self._wake.set()

    async def run(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._queue:
                    text = self._queue.popleft()
                    self.queued_bytes -= len(text)
                    await self.ws.send_str(text)
                if self.close_with is not None:
                    code, reason = self.close_with
                    await self.ws.close(code=code, message=reason.encode()[:123])
                    return
        except (ConnectionError, RuntimeError) as exc:  # the client went away mid-write
            log.debug("websocket writer stopped: %s", exc)


def _normal_origin(url: str) -> tuple[str, str, int | None] | None:
    try:
        u = URL(url)
    except (ValueError, TypeError):
        return None
    if not u.scheme or not u.host:
        return None
    return u.scheme.lower(), u.host.lower(), u.port


def origin_allowed(request: web.Request, config: ServerConfig) -> bool:
    """No Origin (not a browser) is fine; a browser must come from this server's own origin."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    got = _normal_origin(origin)
    allowed = {_normal_origin(f"{request.scheme}://{request.host}")}
    allowed.update(_normal_origin(o) for o in config.extra_origins)
    return got is not None and got in allowed


async def websocket_handler(request: web.Request) -> web.StreamResponse:
    app = request.app
    config, hub = app[CONFIG_KEY], app[HUB_KEY]
    if not origin_allowed(request, config):
        log.warning("websocket refused: origin %r is not %s://%s",
                    request.headers.get("Origin"), request.scheme, request.host)
        raise web.HTTPForbidden(text="cross-origin WebSocket refused: open the page from this server\n")
    ws = web.WebSocketResponse(
        max_msg_size=FRAME_HARD_CAP_FACTOR * config.max_message_bytes,
        heartbeat=config.heartbeat_timeout_s,  # wire-level pings; our own sweep is the rule
        compress=False, timeout=WS_CLOSE_TIMEOUT_S)
    await ws.prepare(request)
    sink = WebSocketSink(ws, config.outbox_max_bytes)
    writer = _spawn(app, sink.run())
    app[SINKS_KEY].add(sink)
    peer: Peer = hub.connect(sink)
    try:
        while not peer.closed:
            msg = await ws.receive()
            if msg.type is web.WSMsgType.TEXT:
                hub.receive_text(peer, msg.data)
            elif msg.type is web.WSMsgType.BINARY:
                hub.receive_binary(peer)
            else:  # CLOSE, CLOSING, CLOSED, ERROR (including frames over the hard cap)
                break
    finally:
        hub.disconnect(peer)
        sink.close(1000, "")
        app[SINKS_KEY].discard(sink)
        done, _ = await asyncio.wait({writer}, timeout=WS_CLOSE_TIMEOUT_S + 1.0)
        if not done:
            writer.cancel()
        elif not writer.cancelled() and writer.exception() is not None:
            log.error("websocket writer failed", exc_info=writer.exception())
    return ws


async def healthz(request: web.Request) -> web.Response:
    app = request.app
    stats = app[HUB_KEY].stats()
    uptime = asyncio.get_running_loop().time() - app[STARTED_KEY][0]
    return web.json_response({"ok": True, "version": __version__, "rooms": stats["rooms"],
                              "peers": stats["peers"], "connections": stats["connections"],
                              "uptime_s": round(uptime, 3), "api": app[api_gateway.GATEWAY_KEY].snapshot()})


def _spawn(app: web.Application, coro) -> asyncio.Task:
    task = asyncio.get_running_loop().create_task(coro)
    app[TASKS_KEY].add(task)
    task.add_done_callback(app[TASKS_KEY].discard)
    return task


async def _sweep_forever(hub: Hub, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        for peer in hub.sweep():
            log.info("dropped silent peer %s", peer.peer_id or "(not joined)")


def make_app(config: ServerConfig) -> web.Application:
    app = web.Application()
    app[CONFIG_KEY] = config
    app[HUB_KEY] = Hub(config.hub_limits())
    app[STATIC_KEY] = static = StaticFiles(config.root, config.models_dir)
    app[TASKS_KEY] = set()
    app[SINKS_KEY] = set()
    app[STARTED_KEY] = [0.0]

    async def on_response_prepare(request: web.Request, response: web.StreamResponse) -> None:
        # Here, not in a middleware: FileResponse settles 304/206/416 only while preparing.
        log.info("%s %s %d", request.method, request.raw_path[:200], response.status)
        response.headers["Content-Security-Policy"] = config.csp
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        if response.status != 101:
            response.headers.setdefault("Cache-Control", "no-cache")

    async def on_startup(app: web.Application) -> None:
        app[STARTED_KEY][0] = asyncio.get_running_loop().time()
        await static.verify_wheels()
        _spawn(app, _sweep_forever(app[HUB_KEY], min(0.5, config.heartbeat_timeout_s / 4)))

    async def on_shutdown(app: web.Application) -> None:
        for sink in list(app[SINKS_KEY]):
            sink.close(1001, "server shutting down")

    async def on_cleanup(app: web.Application) -> None:
        tasks = list(app[TASKS_KEY])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    app.on_response_prepare.append(on_response_prepare)
    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    app.router.add_get("/ws", websocket_handler)
    app.router.add_get("/healthz", healthz)
    ggml_numerics_api.install(app)
    api_gateway.install(app, api_gateway.Gateway(config.api_key, config.api_max_queue, config.api_queue_timeout_s))
    app.router.add_routes(static.routes())
    return app


async def start(config: ServerConfig) -> tuple[web.AppRunner, web.TCPSite, int]:
    api_gateway.require_key_off_loopback(config.host, config.api_key)
    runner = web.AppRunner(make_app(config), access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    port = runner.addresses[0][1]
    return runner, site, port


def serve(config: ServerConfig) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop.set)
        runner, _, port = await start(config)
        host = f"[{config.host}]" if ":" in config.host else config.host
        print(f"tabmesh serving http://{host}:{port}/ (models: {config.models_dir})", flush=True)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
