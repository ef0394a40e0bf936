"""The browser's signaling client: one WebSocket to the server's /ws (protocol in signal_messages)."""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Callable

from ..jsbridge import ProxyBag, TaskSet, js
from . import signal_messages as sm

log = logging.getLogger("tabmesh.signaling")


class SignalingError(ConnectionError):
    pass


class SignalingClient:
    def __init__(self, url: str, room: str, on_message: Callable[[dict], None],
                 on_error: Callable[[str], None], on_closed: Callable[[str], None]):
        self.url, self.room = url, room
        self.on_message, self.on_error, self.on_closed = on_message, on_error, on_closed
        self.proxies = ProxyBag()
        self.tasks = TaskSet(on_error=lambda what, exc: on_error(f"{what}: {exc}"))
        self.ws = None
        self.welcome: dict | None = None
        self._welcomed: asyncio.Future | None = None
        self._closing = False

    async def connect(self, timeout_s: float = 15.0) -> dict:
        """Open the socket, join the room, and return the welcome message."""
        if not sm.ROOM_RE.fullmatch(self.room):
            raise SignalingError(f"room name {self.room!r} is not allowed: use 1–64 letters, digits, '_', '.' or '-'")
        self._welcomed = asyncio.get_event_loop().create_future()
        self.ws = js.WebSocket.new(self.url)
        self.ws.onopen = self.proxies(lambda _ev: self.send({"type": "join", "v": sm.PROTOCOL_VERSION, "room": self.room}))
        self.ws.onmessage = self.proxies(self._on_message)
        self.ws.onclose = self.proxies(self._on_close)
        try:
            self.welcome = await asyncio.wait_for(self._welcomed, timeout_s)
        except asyncio.TimeoutError:
            raise SignalingError(f"no answer from the signaling server at {self.url} within {timeout_s:.0f} s") from None
        self.tasks.spawn(self._heartbeat(self.welcome["heartbeatIntervalMs"] / 1000.0), "signaling heartbeat")
        return self.welcome

    def send(self, msg: dict) -> None:
        if self.ws is not None and self.ws.readyState == 1:
            self.ws.send(sm.encode(msg))

    async def _heartbeat(self, interval_s: float) -> None:
        while not self._closing:
            await asyncio.sleep(interval_s)
            self.send({"type": "ping"})

    def _on_message(self, ev) -> None:
        try:
            msg = sm.validate_server_message(json.loads(ev.data))
        except (ValueError, TypeError) as exc:
            log.warning("ignored a malformed server message: %s", exc)
            return
        kind = msg["type"]
        if kind == "welcome":
            if self._welcomed is not None and not self._welcomed.done():
                self._welcomed.set_result(msg)
        elif kind == "error":
            text = f"signaling server: {msg['code']}: {msg['message']}"
            if self._welcomed is not None and not self._welcomed.done():
                self._welcomed.set_exception(SignalingError(text))
            else:
                self.on_error(text)
            return
        if kind != "pong":
            self.on_message(msg)

    def _on_close(self, ev) -> None:
        reason = f"signaling connection closed (code {ev.code}{': ' + ev.reason if ev.reason else ''})"
        if self._welcomed is not None and not self._welcomed.done():
            self._welcomed.set_exception(SignalingError(reason))
        if not self._closing:
            self.on_closed(reason)
        self.close()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self.tasks.cancel_all()
        ws = self.ws
        if ws is not None:
            for name in ("onopen", "onmessage", "onclose"):
                setattr(ws, name, None)
            if ws.readyState <= 1:
                ws.close(1000, "bye")
        asyncio.get_event_loop().call_soon(self.proxies.destroy)
