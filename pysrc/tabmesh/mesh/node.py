"""A mesh node: the peer table, signaling reactions and frame dispatch.

Transport-free on purpose. The browser plugs in a WebSocket signaling client and
RTCPeerConnection links (mesh/rtc.py); native tests plug in in-memory pairs. A link is any
object with:

    link.peer_id                     the remote peer's id
    await link.start()               begin connecting (the initiator creates the offer)
    await link.handle_signal(data)   an offer / answer / ICE candidate from the remote peer
    await link.send(frame_bytes)     one frame on the data channel (waits out backpressure)
    link.max_frame                   largest frame the channel takes, in bytes
    link.close()

and it reports back through node.link_state(peer_id, state), node.link_frame(peer_id, data)
and node.link_closed(peer_id). Who offers: the newcomer, to every peer listed in its
welcome message; existing peers wait for that offer. So two peers never offer to each other.

A peer's state: connecting → authenticating (channel open, HELLO exchange) → open, or
rejected (it failed the room-secret checks of mesh/auth.py; kept in the table until it
leaves), or closed. Only "open" peers are sent or dispatched anything but HELLO.
"""
from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..jsbridge import TaskSet
from . import auth
from .frames import FrameError, Kind, Reassembler, decode_frame, encode_message

log = logging.getLogger("tabmesh.mesh")

PING_INTERVAL_S = 2.0
HELLO_TIMEOUT_S = 15.0  # a peer whose channel opened but whose HELLO proof never came is rejected
INBOX_LIMIT = 64  # DATA messages kept for inspection (digest + size + head), oldest dropped


@dataclass
class PeerInfo:
    peer_id: str
    state: str = "new"            # new → connecting → authenticating → open | rejected → closed
    rtt_ms: float | None = None
    joined_at: float = field(default_factory=time.monotonic)
    link: Any = None
    handshake: Any = None         # auth.Handshake once the channel opened
    hellos_sent: int = 0
    reason: str | None = None     # why it was rejected (a human sentence)

    def public(self) -> dict:
        return {"peerId": self.peer_id, "state": self.state,
                "rttMs": None if self.rtt_ms is None else round(self.rtt_ms, 3), "reason": self.reason}


class Node:
    def __init__(self, make_link: Callable[["Node", str, bool], Any], send_signaling: Callable[[dict], None],
                 on_change: Callable[[], None] = lambda: None, clock=time.perf_counter,
                 room_key: auth.RoomKey | None = None):
        self.make_link = make_link
        self.room_key = room_key                     # None: a room without secret (mesh/auth.py)
        self.rejected = 0                            # peers refused by either side
        self.on_reject: Callable[[str, str], None] | None = None   # (peer, message for the user)
        self.send_signaling = send_signaling
        self.on_change = on_change
        self.clock = clock
        self.peer_id: str | None = None
        self.room: str | None = None
        self.peers: dict[str, PeerInfo] = {}
        self.reassembler = Reassembler()
        self.inbox: list[dict] = []
        self.dropped_frames = 0
        self.tasks = TaskSet(on_error=lambda what, exc: log.warning("%s: %s", what, exc))
        self._request_ids = itertools.count(1)
        self._waiters: dict[tuple[str, int], asyncio.Future] = {}
        self._ping_sent: dict[tuple[str, int], float] = {}
        self._open_waiters: list[tuple[Callable[[], bool], asyncio.Future]] = []
        # Subsystems above the node (cluster membership, pipeline stages) plug in here:
        self.on_cluster: Callable[[str, bytes], None] | None = None        # (peer, payload)
        self.on_rag: Callable[[str, bytes], None] | None = None            # (peer, payload)
        self.on_call: Callable[[str, bytes], Any] | None = None            # async (peer, payload) -> bytes
        self.peer_listeners: list[Callable[[str, str], None]] = []         # (peer, "open" | "closed")

    # ---- signaling ---------------------------------------------------------------------
    def on_signaling(self, msg: dict) -> None:
        """React to one validated server→client signaling message."""
        kind = msg.get("type")
        if kind == "welcome":
            self.peer_id, self.room = msg["peerId"], msg["room"]
            for pid in msg["peers"]:
                self._add_peer(pid, initiator=True)
        elif kind == "peer-joined":
            self._add_peer(msg["peerId"], initiator=False)
        elif kind == "peer-left":
            self._remove_peer(msg["peerId"])
        elif kind == "signal":
            self._on_signal(msg["from"], msg["data"])
        self._changed()

    def _on_signal(self, pid: str, data: dict) -> None:
        info = self.peers.get(pid)
        if info is not None and info.state == "rejected":
            return                      # nothing more from a refused peer (ICE candidates too)
        if data.get("kind") == "reject":
            if info is not None and info.state != "open":   # unsigned: never tears down an open peer
                self._reject(pid, auth.rejected_message(pid, data), code=None)
            return
        info = info or self._add_peer(pid, initiator=False)
        try:
            data = auth.open_signal(self.room_key, sender=pid, receiver=self.peer_id, data=data)
        except auth.AuthError as exc:
            if info.state == "open":    # a forged re-offer cannot tear down a verified channel
                log.warning("ignored a signal from open peer %s: %s", pid, exc)
            else:
                self._reject(pid, f"refused peer {pid}: {exc.detail}", code=exc.code)
            return
        self.tasks.spawn(info.link.handle_signal(data), f"signal from {pid}")

    def send_signal(self, peer_id: str, data: dict) -> None:
        data = auth.sign_signal(self.room_key, sender=self.peer_id, receiver=peer_id, data=data)
        self.send_signaling({"type": "signal", "to": peer_id, "data": data})

    def _reject(self, peer_id: str, message: str, code: str | None) -> None:
        """Refuse a peer: close its link, keep it in the table as "rejected", count it, tell
        the user, and (when we refused, `code` set) tell the peer why through signaling."""
        info = self.peers.get(peer_id)
        if info is None or info.state == "rejected":
            return
        was_open = info.state == "open"
        info.state, info.reason, info.rtt_ms = "rejected", message, None
        self.rejected += 1
        self.reassembler.drop_sender(peer_id)
        for key, fut in list(self._waiters.items()):
            if key[0] == peer_id and not fut.done():
                fut.set_exception(ConnectionError(message))
        try:
            info.link.close()
        except Exception as exc:  # a broken link must not stop the node
            log.warning("closing link to %s: %s", peer_id, exc)
        if code is not None:
            self.send_signal(peer_id, auth.reject_signal(code))
        if was_open:
            self._tell_listeners(peer_id, "closed")
        log.warning("%s", message)
        if self.on_reject is not None:
            try:
                self.on_reject(peer_id, message)
            except Exception as exc:
                log.warning("on_reject failed: %s", exc)
        self._changed()

    def _add_peer(self, peer_id: str, initiator: bool) -> PeerInfo:
        if peer_id == self.peer_id:
            raise ValueError("the server listed this node as its own peer")
        old = self.peers.get(peer_id)
        if old is not None:
            return old
        info = PeerInfo(peer_id, state="connecting")
        info.link = self.make_link(self, peer_id, initiator)
        self.peers[peer_id] = info
        self.tasks.spawn(info.link.start(), f"connect to {peer_id}")
        return info

    def _remove_peer(self, peer_id: str) -> None:
        info = self.peers.pop(peer_id, None)
        if info is None:
            return
        info.state = "closed"
        self.reassembler.drop_sender(peer_id)
        self._tell_listeners(peer_id, "closed")
        for key, fut in list(self._waiters.items()):
            if key[0] == peer_id and not fut.done():
                fut.set_exception(ConnectionError(f"peer {peer_id} left"))
        try:
            info.link.close()
        except Exception as exc:  # a broken link must not stop the node
            log.warning("closing link to %s: %s", peer_id, exc)
        self._changed()

    # ---- link callbacks ----------------------------------------------------------------
    def link_state(self, peer_id: str, state: str) -> None:
        info = self.peers.get(peer_id)
        if info is None or info.state in (state, "rejected"):
            return
        if state == "open":             # the channel is open; the peer is not, until its HELLO
            if info.handshake is not None:
                return
            info.state = "authenticating"
            info.handshake = auth.Handshake(self.room_key, self.peer_id, peer_id)
            self.tasks.spawn(self._hello(peer_id, info.handshake.first()), f"hello to {peer_id}")
            self.tasks.spawn(self._hello_deadline(peer_id, info), f"hello deadline of {peer_id}")
        else:
            info.state = state
        self._changed()

    async def _hello(self, peer_id: str, hello: dict) -> None:
        await self._send(peer_id, Kind.HELLO, json.dumps(hello).encode())
        info = self.peers.get(peer_id)
        if info is not None:
            info.hellos_sent += 1
            self._maybe_open(peer_id)

    def _on_hello(self, peer_id: str, payload: bytes) -> None:
        info = self.peers.get(peer_id)
        if info is not None and info.handshake is None and info.state == "connecting":
            self.link_state(peer_id, "open")   # a frame came over the link, so it is open
        if info is None or info.handshake is None or info.state != "authenticating":
            raise ValueError(f"a HELLO from {peer_id} outside the handshake")
        try:
            try:
                hello = json.loads(payload)
            except ValueError:
                raise auth.AuthError("bad-hello", "HELLO is not JSON") from None
            reply = info.handshake.receive(hello)
        except auth.AuthError as exc:
            self._reject(peer_id, f"refused peer {peer_id}: {exc.detail}", code=exc.code)
            return
        if reply is not None:
            self.tasks.spawn(self._hello(peer_id, reply), f"hello proof to {peer_id}")
        self._maybe_open(peer_id)

    def _maybe_open(self, peer_id: str) -> None:
        """Open once the peer proved itself and our own last HELLO went out (so every frame we
        send after this reaches a peer that already verified us)."""
        info = self.peers.get(peer_id)
        if (info is None or info.state != "authenticating" or not info.handshake.peer_verified
                or info.hellos_sent < info.handshake.final_sends):
            return
        info.state = "open"
        self.tasks.spawn(self._ping_loop(peer_id), f"pings to {peer_id}")
        self._tell_listeners(peer_id, "open")
        self._changed()

    async def _hello_deadline(self, peer_id: str, info: PeerInfo) -> None:
        await asyncio.sleep(HELLO_TIMEOUT_S)
        if self.peers.get(peer_id) is info and info.state == "authenticating":
            self._reject(peer_id, f"refused peer {peer_id}: no valid HELLO within {HELLO_TIMEOUT_S:.0f} s",
                         code="bad-hello")

    def _tell_listeners(self, peer_id: str, state: str) -> None:
        for listener in list(self.peer_listeners):
            try:
                listener(peer_id, state)
            except Exception as exc:  # one subsystem's bug must not break the others
                log.warning("peer listener failed on %s %s: %s", peer_id, state, exc)

    def link_closed(self, peer_id: str) -> None:
        info = self.peers.get(peer_id)
        if info is not None and info.state == "rejected":
            return                      # stays listed as rejected until the server says it left
        self._remove_peer(peer_id)

    def link_frame(self, peer_id: str, data: bytes) -> None:
        """One data-channel message. Malformed frames are counted and dropped, never raised."""
        try:
            frame = decode_frame(data)
            info = self.peers.get(peer_id)
            if info is None or not (info.state == "open" or (info.state == "authenticating"
                                                              and info.handshake.peer_verified)):
                # Before its HELLO proof verified a peer gets nothing through but one small HELLO.
                if frame.kind != Kind.HELLO or frame.chunk_count != 1 or len(frame.payload) > auth.MAX_HELLO:
                    raise FrameError(f"{frame.kind.name} frame from a peer that has not authenticated")
            message = self.reassembler.add(peer_id, frame)
        except FrameError as exc:
            self.dropped_frames += 1
            log.warning("dropped frame from %s: %s", peer_id, exc)
            return
        if message is not None:
            try:
                self._dispatch(peer_id, *message)
            except Exception as exc:
                self.dropped_frames += 1
                log.warning("bad message from %s: %s", peer_id, exc)

    def _dispatch(self, peer_id: str, kind: Kind, rid: int, payload: bytes) -> None:
        if kind == Kind.PING:
            self._reply(peer_id, Kind.PONG, payload, rid)
        elif kind == Kind.PONG:
            sent = self._ping_sent.pop((peer_id, rid), None)
            if sent is not None:
                rtt = (self.clock() - sent) * 1000.0
                info = self.peers.get(peer_id)
                if info is not None:
                    info.rtt_ms = rtt
                self._resolve(peer_id, rid, rtt)
                self._changed()
        elif kind == Kind.ECHO:
            self._reply(peer_id, Kind.ECHO_REPLY, payload, rid)
        elif kind == Kind.ECHO_REPLY:
            self._resolve(peer_id, rid, payload)
        elif kind == Kind.DATA:
            self.inbox.append({"from": peer_id, "size": len(payload),
                               "sha256": hashlib.sha256(payload).hexdigest()})
            del self.inbox[:-INBOX_LIMIT]
            self._changed()
        elif kind == Kind.HELLO:
            self._on_hello(peer_id, payload)
        elif kind == Kind.ERROR:
            self._fail(peer_id, rid, json.loads(payload))
        elif kind == Kind.CLUSTER:
            if self.on_cluster is not None:
                self.on_cluster(peer_id, payload)
        elif kind == Kind.RAG:
            if self.on_rag is not None:
                self.on_rag(peer_id, payload)
        elif kind == Kind.CALL:
            if self.on_call is None:
                raise ValueError("a CALL arrived but this node serves no calls")
            self.tasks.spawn(self._answer(peer_id, rid, payload), f"call from {peer_id}")
        elif kind == Kind.REPLY:
            self._resolve(peer_id, rid, payload)

    async def _answer(self, peer_id: str, rid: int, payload: bytes) -> None:
        answer = await self.on_call(peer_id, payload)   # the handler turns its errors into answers
        if peer_id in self.peers:
            await self._send(peer_id, Kind.REPLY, answer, rid)

    # ---- requests ----------------------------------------------------------------------
    def _resolve(self, peer_id: str, rid: int, value) -> None:
        fut = self._waiters.pop((peer_id, rid), None)
        if fut is not None and not fut.done():
            fut.set_result(value)

    def _fail(self, peer_id: str, rid: int, err: dict) -> None:
        fut = self._waiters.pop((peer_id, rid), None)
        if fut is not None and not fut.done():
            fut.set_exception(RuntimeError(f"{err.get('type')}: {err.get('message')}"))

    def _reply(self, peer_id: str, kind: Kind, payload: bytes, rid: int) -> None:
        """Answer at once when the channel has room (no task, no event-loop hop: this is on
        the round-trip path of every ping and every pipeline stage); else queue a task."""
        info = self.peers.get(peer_id)
        try_send = getattr(info.link, "try_send", None) if info is not None else None
        if try_send is not None and info.state == "open":
            frames = encode_message(kind, rid, payload, max_frame=info.link.max_frame)
            if len(frames) == 1 and try_send(frames[0]):
                return
        self.tasks.spawn(self._send(peer_id, kind, payload, rid), f"{kind.name.lower()} to {peer_id}")

    async def _send(self, peer_id: str, kind: Kind, payload: bytes, rid: int | None = None) -> int:
        info = self.peers.get(peer_id)
        if info is None or not (info.state == "open" or (kind == Kind.HELLO and info.state == "authenticating")):
            raise ConnectionError(f"no open channel to peer {peer_id}")
        rid = next(self._request_ids) % 2**32 if rid is None else rid
        for frame in encode_message(kind, rid, payload, max_frame=info.link.max_frame):
            await info.link.send(frame)
        return rid

    async def _request(self, peer_id: str, kind: Kind, payload: bytes, timeout_s: float):
        rid = next(self._request_ids) % 2**32
        fut = asyncio.get_event_loop().create_future()
        self._waiters[(peer_id, rid)] = fut
        if kind == Kind.PING:
            self._ping_sent[(peer_id, rid)] = self.clock()
        try:
            await self._send(peer_id, kind, payload, rid)
            return await asyncio.wait_for(fut, timeout_s)
        finally:
            self._waiters.pop((peer_id, rid), None)
            self._ping_sent.pop((peer_id, rid), None)

    async def ping(self, peer_id: str, timeout_s: float = 5.0) -> float:
        """Round-trip time in ms of one PING over the data channel."""
        return await self._request(peer_id, Kind.PING, b"", timeout_s)

    async def echo(self, peer_id: str, payload: bytes, timeout_s: float = 30.0) -> bytes:
        return await self._request(peer_id, Kind.ECHO, payload, timeout_s)

    async def call(self, peer_id: str, payload: bytes, timeout_s: float) -> bytes:
        """Send a CALL and wait for its REPLY; ConnectionError if the peer leaves first."""
        return await self._request(peer_id, Kind.CALL, payload, timeout_s)

    async def send_cluster(self, peer_id: str, payload: bytes) -> None:
        await self._send(peer_id, Kind.CLUSTER, payload)

    async def send_rag(self, peer_id: str, payload: bytes) -> None:
        await self._send(peer_id, Kind.RAG, payload)

    async def send_data(self, peer_id: str, payload: bytes) -> None:
        await self._send(peer_id, Kind.DATA, payload)

    async def wait_open(self, count: int, timeout_s: float = 30.0) -> None:
        """Wait until at least `count` peers have an open channel."""
        deadline = time.monotonic() + timeout_s
        while sum(p.state == "open" for p in self.peers.values()) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {count} open peers after {timeout_s} s")
            await asyncio.sleep(0.02)

    async def _ping_loop(self, peer_id: str) -> None:
        while peer_id in self.peers and self.peers[peer_id].state == "open":
            try:
                await self.ping(peer_id, timeout_s=PING_INTERVAL_S * 2)
            except (asyncio.TimeoutError, ConnectionError):
                pass
            await asyncio.sleep(PING_INTERVAL_S)

    # ---- views -------------------------------------------------------------------------
    def peer_list(self) -> list[dict]:
        return [p.public() for p in sorted(self.peers.values(), key=lambda p: p.joined_at)]

    def _changed(self) -> None:
        try:
            self.on_change()
        except Exception as exc:
            log.warning("ui update failed: %s", exc)

    def close(self) -> None:
        for pid in list(self.peers):
            self._remove_peer(pid)
        self.tasks.cancel_all()
