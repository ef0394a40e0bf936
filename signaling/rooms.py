"""Rooms and the signaling state machine, free of any network code.

`Hub` owns every connection, the rooms, and the rules of the protocol written in
`tabmesh.mesh.signal_messages`. The WebSocket glue in `server.py` feeds it frames and gives
each connection a `Sink` (non-blocking send, close); tests drive it directly with fake
sinks and a fake clock.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from tabmesh.mesh import signal_messages as sm

__all__ = ["Hub", "HubLimits", "Peer", "Room", "Sink", "TokenBucket"]


class Sink(Protocol):
    def send(self, text: str) -> bool:
        """Queue one frame without blocking; False if the client is too far behind."""

    def close(self, code: int, reason: str) -> None:
        """Send what is queued, then close the socket with `code`."""


@dataclass(frozen=True)
class HubLimits:
    max_message_bytes: int = 16384
    max_peers_per_room: int = 32
    max_rooms: int = 1000
    max_connections: int = 2000
    rate_per_s: float = 40.0      # token bucket per connection: sustained messages/s
    rate_burst: int = 80          # ... and bucket size
    heartbeat_interval_s: float = 2.0
    heartbeat_timeout_s: float = 6.0
    too_large_tolerated: int = sm.TOO_LARGE_TOLERATED


class TokenBucket:
    def __init__(self, rate: float, burst: int, now: float):
        self.rate, self.burst = rate, burst
        self.tokens, self.last = float(burst), now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@dataclass(eq=False)
class Peer:
    """One WebSocket connection; a member of a room once it has joined."""

    sink: Sink
    bucket: TokenBucket
    last_seen: float
    peer_id: str | None = None    # assigned at join
    room: "Room | None" = None
    too_large_count: int = 0
    closed: bool = False          # the hub is done with it; frames are ignored


@dataclass(eq=False)
class Room:
    name: str
    peers: dict[str, Peer] = field(default_factory=dict)  # peer_id -> Peer


def _new_peer_id() -> str:
    return secrets.token_hex(sm.PEER_ID_HEX_CHARS // 2)


class Hub:
    def __init__(self, limits: HubLimits = HubLimits(), *, clock: Callable[[], float] = time.monotonic,
                 new_peer_id: Callable[[], str] = _new_peer_id):
        self.limits = limits
        self.clock = clock
        self._new_peer_id = new_peer_id
        self.connections: set[Peer] = set()
        self.rooms: dict[str, Room] = {}
        self.peers: dict[str, Peer] = {}  # every joined peer, all rooms: ids stay unique
        self._slow: list[Peer] = []       # peers whose sink overflowed during this operation

    # ---- connection lifetime --------------------------------------------------------

    def connect(self, sink: Sink) -> Peer:
        """Register a new socket. Over max_connections it gets server-full and is closed."""
        now = self.clock()
        peer = Peer(sink=sink, bucket=TokenBucket(self.limits.rate_per_s, self.limits.rate_burst, now),
                    last_seen=now)
        if len(self.connections) >= self.limits.max_connections:
            self._fail(peer, sm.SignalError(
                "server-full", f"the server holds its maximum of {self.limits.max_connections} "
                               "connections; try again later"))
            return peer
        self.connections.add(peer)
        return peer

    def disconnect(self, peer: Peer) -> None:
        """The socket is gone (client closed, network error). Idempotent."""
        self._remove(peer, "closed")
        self._drain_slow()

    def sweep(self) -> list[Peer]:
        """Drop every connection silent for longer than heartbeat_timeout_s; return them."""
        now = self.clock()
        expired = [p for p in self.connections if now - p.last_seen > self.limits.heartbeat_timeout_s]
        for peer in expired:
            self._close(peer, "timeout", sm.CLOSE_TIMEOUT,
                        f"silent for more than {self.limits.heartbeat_timeout_s:g} s")
        self._drain_slow()
        return expired

    def stats(self) -> dict:
        return {"rooms": len(self.rooms), "peers": len(self.peers), "connections": len(self.connections)}

    def welcome_limits(self) -> dict:
        lim = self.limits
        return {"maxMessageBytes": lim.max_message_bytes, "maxPeersPerRoom": lim.max_peers_per_room,
                "messagesPerSecond": lim.rate_per_s, "messageBurst": lim.rate_burst}

    # ---- frames ---------------------------------------------------------------------

    def receive_text(self, peer: Peer, text: str) -> None:
        if peer.closed:
            return
        try:
            self._receive_text(peer, text)
        except sm.SignalError as exc:
            self._fail(peer, exc)
        self._drain_slow()

    def receive_binary(self, peer: Peer) -> None:
        if peer.closed:
            return
        peer.last_seen = self.clock()
        self._fail(peer, sm.SignalError("bad-message", "binary frames are not part of the protocol; "
                                                       "send JSON text frames"))
        self._drain_slow()

    def _receive_text(self, peer: Peer, text: str) -> None:
        now = self.clock()
        peer.last_seen = now  # any frame, even a refused one, proves the client is alive
        if not peer.bucket.take(now):
            raise sm.SignalError("rate-limited", f"more than {self.limits.rate_per_s:g} messages/s "
                                 f"(burst {self.limits.rate_burst}); message dropped, slow down")
        limit = self.limits.max_message_bytes
        if len(text) > limit or len(text.encode("utf-8", "surrogatepass")) > limit:
            peer.too_large_count += 1
            raise sm.SignalError("too-large", f"frame exceeds {limit} bytes; message dropped")
        message = sm.validate_client_message(sm.decode_frame(text))
        if isinstance(message, sm.Ping):
            self._deliver(peer, sm.PONG)
        elif isinstance(message, sm.Join):
            self._join(peer, message.room)
        elif peer.room is None:
            raise sm.SignalError("not-joined", f"send join before {message.type}")
        elif isinstance(message, sm.Signal):
            self._relay(peer, message.to, message.data)
        else:  # Leave
            self._close(peer, "closed", 1000, "left")

    # ---- protocol actions -----------------------------------------------------------

    def _join(self, peer: Peer, name: str) -> None:
        if peer.room is not None:
            raise sm.SignalError("already-joined", f"already in room {peer.room.name!r}; "
                                 "open a new connection to join another room")
        room = self.rooms.get(name)
        if room is None and len(self.rooms) >= self.limits.max_rooms:
            raise sm.SignalError("too-many-rooms", f"the server holds its maximum of "
                                 f"{self.limits.max_rooms} rooms; join an existing room or try later")
        if room is not None and len(room.peers) >= self.limits.max_peers_per_room:
            raise sm.SignalError("room-full", f"room {name!r} already has "
                                 f"{self.limits.max_peers_per_room} peers; pick another room")
        peer_id = self._new_peer_id()
        while peer_id in self.peers:
            peer_id = self._new_peer_id()
        if room is None:
            room = self.rooms[name] = Room(name)
        others = list(room.peers)
        peer.peer_id, peer.room = peer_id, room
        room.peers[peer_id] = peer
        self.peers[peer_id] = peer
        self._deliver(peer, sm.welcome(
            peer_id, name, others,
            heartbeat_interval_ms=round(self.limits.heartbeat_interval_s * 1000),
            heartbeat_timeout_ms=round(self.limits.heartbeat_timeout_s * 1000),
            limits=self.welcome_limits()))
        self._broadcast(room, sm.peer_joined(peer_id), exclude=peer)

    def _relay(self, peer: Peer, to: str, data: dict) -> None:
        assert peer.room is not None and peer.peer_id is not None
        target = peer.room.peers.get(to)  # never look outside the sender's room
        if target is None or target is peer:
            raise sm.SignalError("unknown-peer", f"no peer {to} in room {peer.room.name!r}")
        self._deliver(target, sm.signal_from(peer.peer_id, data))

    def _fail(self, peer: Peer, exc: sm.SignalError) -> None:
        """Tell the client what went wrong; close the socket if the error is fatal."""
        self._deliver(peer, exc.to_dict())
        if exc.fatal:
            self._close(peer, "closed", sm.CLOSE_CODES[exc.code], exc.code)
        elif exc.code == "too-large" and peer.too_large_count > self.limits.too_large_tolerated:
            self._close(peer, "closed", sm.CLOSE_CODES["too-large"], "too many oversized frames")

    # ---- delivery and removal -------------------------------------------------------

    def _deliver(self, peer: Peer, message: dict) -> None:
        if peer.closed:
            return
        if not peer.sink.send(sm.encode(message)):
            self._slow.append(peer)

    def _broadcast(self, room: Room, message: dict, exclude: Peer | None = None) -> None:
        for other in list(room.peers.values()):
            if other is not exclude:
                self._deliver(other, message)

    def _remove(self, peer: Peer, reason: str) -> None:
        """Forget the peer; its room (if any) hears peer-left. Does not touch the socket."""
        if peer.closed:
            return
        peer.closed = True
        self.connections.discard(peer)
        room = peer.room
        if room is None or peer.peer_id is None:
            return
        room.peers.pop(peer.peer_id, None)
        self.peers.pop(peer.peer_id, None)
        if room.peers:
            self._broadcast(room, sm.peer_left(peer.peer_id, reason))
        elif self.rooms.get(room.name) is room:
            del self.rooms[room.name]

    def _close(self, peer: Peer, reason: str, code: int, text: str) -> None:
        if peer.closed:
            return
        self._remove(peer, reason)
        peer.sink.close(code, text)

    def _drain_slow(self) -> None:
        while self._slow:
            peer = self._slow.pop()
            self._close(peer, "closed", sm.CLOSE_SLOW_CONSUMER, "too slow reading messages")
