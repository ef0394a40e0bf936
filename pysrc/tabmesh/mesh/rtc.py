"""RTCPeerConnection + RTCDataChannel links for mesh.node.Node (browser only).

Names mirror the W3C API so MDN applies. Signal payloads relayed by the server:
    {"kind": "offer" | "answer", "sdp": str}
    {"kind": "ice", "candidate": str, "sdpMid": str | None, "sdpMLineIndex": int | None}
Anything else from the remote side is rejected (the server relays, it does not vouch).
With a room secret, node.py checks and strips an offer's or answer's "tag" (mesh/auth.py)
before the signal reaches the link, and handles {"kind": "reject"} itself.
"""
from __future__ import annotations

import asyncio
import logging

from ..jsbridge import ProxyBag, js, js_obj, py_bytes

log = logging.getLogger("tabmesh.rtc")

CHANNEL_LABEL = "tabmesh"
MAX_FRAME = 64 * 1024            # well under Chromium's 256 KiB SCTP limit; keeps channels fair
HIGH_WATER = 1 << 20             # pause sending above this many buffered bytes
LOW_WATER = 256 * 1024
MAX_SDP = 12 * 1024


def validate_signal(data) -> dict:
    if not isinstance(data, dict):
        raise ValueError("signal data must be an object")
    kind = data.get("kind")
    if kind in ("offer", "answer"):
        sdp = data.get("sdp")
        if not isinstance(sdp, str) or not 0 < len(sdp) <= MAX_SDP or set(data) != {"kind", "sdp"}:
            raise ValueError(f"malformed {kind}")
        return data
    if kind == "ice":
        cand, mid, idx = data.get("candidate"), data.get("sdpMid"), data.get("sdpMLineIndex")
        if (not isinstance(cand, str) or len(cand) > 2048 or not (mid is None or isinstance(mid, str))
                or not (idx is None or (isinstance(idx, int) and 0 <= idx < 64))):
            raise ValueError("malformed ice candidate")
        return data
    raise ValueError(f"unknown signal kind {kind!r}")


class RTCLink:
    def __init__(self, node, peer_id: str, initiator: bool, ice_servers=()):
        self.node, self.peer_id, self.initiator = node, peer_id, initiator
        self.proxies = ProxyBag()
        self.pc = js.RTCPeerConnection.new(js_obj({"iceServers": list(ice_servers)}))
        self.channel = None
        self.max_frame = 16 * 1024
        self._pending_ice: list[dict] = []
        self._low = None
        self._closed = False
        self.pc.onicecandidate = self.proxies(self._on_ice)
        self.pc.onconnectionstatechange = self.proxies(self._on_pc_state)
        self.pc.ondatachannel = self.proxies(lambda ev: self._attach(ev.channel))

    async def start(self) -> None:
        if not self.initiator:
            return
        self._attach(self.pc.createDataChannel(CHANNEL_LABEL, js_obj({"ordered": True})))
        offer = await self.pc.createOffer()
        await self.pc.setLocalDescription(offer)
        self.node.send_signal(self.peer_id, {"kind": "offer", "sdp": self.pc.localDescription.sdp})

    async def handle_signal(self, data) -> None:
        data = validate_signal(data)
        if self._closed:
            return
        kind = data["kind"]
        if kind == "offer":
            if self.initiator:
                raise ValueError("unexpected offer: this side offered")
            await self.pc.setRemoteDescription(js_obj({"type": "offer", "sdp": data["sdp"]}))
            answer = await self.pc.createAnswer()
            await self.pc.setLocalDescription(answer)
            self.node.send_signal(self.peer_id, {"kind": "answer", "sdp": self.pc.localDescription.sdp})
            await self._flush_ice()
        elif kind == "answer":
            if not self.initiator:
                raise ValueError("unexpected answer: this side did not offer")
            await self.pc.setRemoteDescription(js_obj({"type": "answer", "sdp": data["sdp"]}))
            await self._flush_ice()
        else:
            self._pending_ice.append(data)
            if self.pc.remoteDescription:
                await self._flush_ice()

    async def _flush_ice(self) -> None:
        pending, self._pending_ice = self._pending_ice, []
        for c in pending:
            await self.pc.addIceCandidate(js_obj({"candidate": c["candidate"], "sdpMid": c["sdpMid"],
                                                  "sdpMLineIndex": c["sdpMLineIndex"]}))

    def _on_ice(self, ev) -> None:
        c = ev.candidate
        if c is None or not c.candidate:
            return
        self.node.send_signal(self.peer_id, {"kind": "ice", "candidate": c.candidate, "sdpMid": c.sdpMid,
                                             "sdpMLineIndex": c.sdpMLineIndex})

    def _on_pc_state(self, _ev) -> None:
        state = self.pc.connectionState
        if state in ("failed", "closed"):
            self.node.link_closed(self.peer_id)
        elif state == "disconnected":
            self.node.link_state(self.peer_id, "disconnected")

    def _attach(self, channel) -> None:
        if channel.label != CHANNEL_LABEL or self.channel is not None:
            channel.close()
            return
        self.channel = channel
        channel.binaryType = "arraybuffer"
        channel.bufferedAmountLowThreshold = LOW_WATER
        channel.onopen = self.proxies(self._on_open)
        channel.onclose = self.proxies(lambda _ev: self.node.link_closed(self.peer_id))
        channel.onmessage = self.proxies(self._on_message)
        channel.onbufferedamountlow = self.proxies(self._on_low)
        if channel.readyState == "open":
            self._on_open(None)

    def _on_open(self, _ev) -> None:
        sctp = self.pc.sctp
        limit = int(sctp.maxMessageSize) if sctp and sctp.maxMessageSize else 16 * 1024
        self.max_frame = max(1024, min(MAX_FRAME, limit))
        self.node.link_state(self.peer_id, "open")

    def _on_message(self, ev) -> None:
        try:
            data = py_bytes(ev.data)
        except TypeError:
            log.warning("dropped non-binary message from %s", self.peer_id)
            return
        self.node.link_frame(self.peer_id, data)

    def _on_low(self, _ev) -> None:
        if self._low is not None and not self._low.done():
            self._low.set_result(None)

    def try_send(self, frame: bytes) -> bool:
        """Send now if the channel is open and not backed up; False means use send()."""
        ch = self.channel
        if ch is None or ch.readyState != "open" or ch.bufferedAmount > HIGH_WATER:
            return False
        ch.send(js_obj(frame))
        return True

    async def send(self, frame: bytes) -> None:
        ch = self.channel
        if ch is None or ch.readyState != "open":
            raise ConnectionError(f"data channel to {self.peer_id} is not open")
        while ch.bufferedAmount > HIGH_WATER:
            # One future shared by every task waiting on this channel: a second waiter must not
            # replace the first one's future (that left the first to time out, its message lost).
            if self._low is None or self._low.done():
                self._low = asyncio.get_event_loop().create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._low), 30)
            except asyncio.TimeoutError:
                raise ConnectionError(f"data channel to {self.peer_id} drained nothing for 30 s") from None
            if ch.readyState != "open":
                raise ConnectionError(f"data channel to {self.peer_id} closed while sending")
        ch.send(js_obj(frame))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Detach every handler first: close() may run inside one of them, and events that
        # fire after close must not reach destroyed proxies. Destroy on the next loop turn.
        for target, names in ((self.pc, ("onicecandidate", "onconnectionstatechange", "ondatachannel")),
                              (self.channel, ("onopen", "onclose", "onmessage", "onbufferedamountlow"))):
            if target is not None:
                for name in names:
                    setattr(target, name, None)
        try:
            if self.channel is not None:
                self.channel.close()
            self.pc.close()
        finally:
            asyncio.get_event_loop().call_soon(self.proxies.destroy)
