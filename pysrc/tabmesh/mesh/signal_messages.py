"""Signaling protocol between a tab and the signaling server: schema and validation.

Shared by the server (`signaling/`) and the browser client, so it is stdlib only and
imports under Pyodide. Nothing here does I/O.

Wire format, version 1
======================
One WebSocket at ``/ws`` per tab. Every frame is a UTF-8 JSON *text* frame holding one
object; binary frames are refused. Frames larger than ``maxMessageBytes`` (UTF-8 bytes,
default 16384) are refused with ``too-large``; the server stops reading a frame at 4x that
size and closes with 1009 instead of buffering it.

Client -> server
  {"type": "join", "v": 1, "room": ROOM}     must be the first message; ROOM matches
                                               ^[A-Za-z0-9_.-]{1,64}$
  {"type": "signal", "to": PEER_ID, "data": {...}}
                                               relayed to PEER_ID if it is in the same room;
                                               data is any JSON object (SDP, ICE candidate),
                                               nested at most 32 levels
  {"type": "ping"}                             liveness; answered with pong (also before join)
  {"type": "leave"}                            leave the room; the server then closes (1000)
  Any other key, a missing key or a wrong type is ``bad-message``. Every message, even a
  refused one, counts as liveness.

Server -> client
  {"type": "welcome", "v": 1, "peerId": ID, "room": ROOM, "peers": [ID, ...],
   "heartbeatIntervalMs": N, "heartbeatTimeoutMs": M,
   "limits": {"maxMessageBytes": B, "maxPeersPerRoom": P,
              "messagesPerSecond": R, "messageBurst": K}}
                                               answer to join; peers = the others already there
  {"type": "peer-joined", "peerId": ID}
  {"type": "peer-left", "peerId": ID, "reason": "closed" | "timeout"}
  {"type": "signal", "from": ID, "data": {...}}
  {"type": "pong"}
  {"type": "error", "code": CODE, "message": TEXT}

Peer ids are assigned by the server: 12 lowercase hex characters from `secrets`.
A client must send something (a ping is enough) every heartbeatIntervalMs; one silent for
longer than heartbeatTimeoutMs is dropped and its room sees peer-left reason "timeout".

Error codes (FATAL ones are followed by a close with the code in CLOSE_CODES; the others
leave the socket open and the offending message is dropped):
  bad-json        frame is not JSON (NaN/Infinity count as not JSON)
  bad-message     JSON but not a valid client message (also: binary frames)
  too-large       frame over maxMessageBytes; fatal on the 4th time on one socket
  rate-limited    over the token bucket (messagesPerSecond sustained, messageBurst burst)
  not-joined      signal/leave before join
  already-joined  a second join
  unknown-peer    signal target is not in your room (also: yourself). Whether the id
                  exists in another room is never revealed.
  version         join.v is not 1                                        FATAL
  room-full       the room has maxPeersPerRoom peers                     FATAL
  too-many-rooms  the server holds its maximum number of rooms            FATAL
  server-full     the server holds its maximum number of connections      FATAL
Other close codes: 4008 heartbeat timeout, 4009 client too slow to read its messages,
1000 after leave.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Union

PROTOCOL_VERSION = 1
ROOM_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
PEER_ID_RE = re.compile(r"[0-9a-f]{12}")
PEER_ID_HEX_CHARS = 12
MAX_DATA_DEPTH = 32

ERROR_CODES = (
    "bad-json", "bad-message", "too-large", "rate-limited", "not-joined", "already-joined",
    "unknown-peer", "version", "room-full", "too-many-rooms", "server-full",
)
CLOSE_CODES = {  # error code -> WebSocket close code sent after the error frame
    "version": 4001,
    "room-full": 4002,
    "too-many-rooms": 4003,
    "server-full": 4004,
    "too-large": 4005,  # only once it repeats more than TOO_LARGE_TOLERATED times
}
FATAL_CODES = frozenset(("version", "room-full", "too-many-rooms", "server-full"))
TOO_LARGE_TOLERATED = 3
CLOSE_TIMEOUT = 4008
CLOSE_SLOW_CONSUMER = 4009
LEFT_REASONS = ("closed", "timeout")


class SignalError(Exception):
    """A protocol violation, sent to the client as {"type": "error", code, message}."""

    def __init__(self, code: str, message: str):
        assert code in ERROR_CODES, f"unknown signal error code {code!r}"
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @property
    def fatal(self) -> bool:
        return self.code in FATAL_CODES

    def to_dict(self) -> dict:
        return {"type": "error", "code": self.code, "message": self.message}


# ---- client -> server ---------------------------------------------------------------

@dataclass(frozen=True)
class Join:
    room: str
    v: int = PROTOCOL_VERSION
    type: str = field(default="join", init=False)


@dataclass(frozen=True)
class Signal:
    to: str
    data: dict
    type: str = field(default="signal", init=False)


@dataclass(frozen=True)
class Ping:
    type: str = field(default="ping", init=False)


@dataclass(frozen=True)
class Leave:
    type: str = field(default="leave", init=False)


ClientMessage = Union[Join, Signal, Ping, Leave]
_CLIENT_KEYS = {
    "join": frozenset(("type", "v", "room")),
    "signal": frozenset(("type", "to", "data")),
    "ping": frozenset(("type",)),
    "leave": frozenset(("type",)),
}


def _depth_exceeds(value: Any, limit: int) -> bool:
    """True if containers nest deeper than `limit` (iterative: no recursion on hostile input)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _check_keys(obj: dict, allowed: frozenset, kind: str) -> None:
    unknown = sorted(k for k in obj if k not in allowed)
    if unknown:
        raise SignalError("bad-message", f"{kind}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    missing = sorted(k for k in allowed if k not in obj)
    if missing:
        raise SignalError("bad-message", f"{kind}: missing key(s) {missing}")


def validate_client_message(obj: Any) -> ClientMessage:
    """Check a decoded client frame and return it typed, or raise SignalError."""
    # 1. A message is a JSON object with a string "type" naming a known message.
    if not isinstance(obj, dict):
        raise SignalError("bad-message", f"a message must be a JSON object, got {type(obj).__name__}")
    kind = obj.get("type")
    if not isinstance(kind, str) or kind not in _CLIENT_KEYS:
        raise SignalError("bad-message", f"'type' must be one of {sorted(_CLIENT_KEYS)}, got {kind!r:.40}")
    # 2. Exactly the keys of that message: none unknown, none missing.
    _check_keys(obj, _CLIENT_KEYS[kind], kind)
    if kind == "join":
        # 3. join.v is exactly the integer 1 (bool is not accepted), else "version".
        v = obj["v"]
        if type(v) is not int or v != PROTOCOL_VERSION:
            raise SignalError("version", f"this server speaks protocol v{PROTOCOL_VERSION}, "
                              f"client sent v={v!r:.20}; reload the page to get a matching client")
        # 4. join.room is 1..64 characters of [A-Za-z0-9_.-].
        room = obj["room"]
        if not isinstance(room, str) or not ROOM_RE.fullmatch(room):
            raise SignalError("bad-message", f"room must match ^[A-Za-z0-9_.-]{{1,64}}$, got {room!r:.80}")
        return Join(room=room, v=v)
    if kind == "signal":
        # 5. signal.to is a peer id: 12 lowercase hex characters.
        to = obj["to"]
        if not isinstance(to, str) or not PEER_ID_RE.fullmatch(to):
            raise SignalError("bad-message", f"'to' must be a peer id of 12 lowercase hex characters, got {to!r:.40}")
        # 6. signal.data is a JSON object nested at most MAX_DATA_DEPTH levels.
        data = obj["data"]
        if not isinstance(data, dict):
            raise SignalError("bad-message", f"'data' must be a JSON object, got {type(data).__name__}")
        if _depth_exceeds(data, MAX_DATA_DEPTH):
            raise SignalError("bad-message", f"'data' nests deeper than {MAX_DATA_DEPTH} levels")
        return Signal(to=to, data=data)
    return Ping() if kind == "ping" else Leave()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def decode_frame(text: str) -> Any:
    """Parse one frame as strict JSON, or raise SignalError("bad-json")."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise SignalError("bad-json", f"frame is not valid JSON: {str(exc)[:120]}") from None


def encode(message: dict) -> str:
    """Serialize one message compactly (the form that goes on the wire).

    ASCII-only on purpose: relayed data may hold lone surrogates (legal in JSON escapes),
    which cannot be encoded as UTF-8 but survive as \\uXXXX escapes.
    """
    return json.dumps(message, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


# ---- server -> client ----------------------------------------------------------------

def welcome(peer_id: str, room: str, peers: list, *, heartbeat_interval_ms: int,
            heartbeat_timeout_ms: int, limits: dict) -> dict:
    return {"type": "welcome", "v": PROTOCOL_VERSION, "peerId": peer_id, "room": room,
            "peers": list(peers), "heartbeatIntervalMs": heartbeat_interval_ms,
            "heartbeatTimeoutMs": heartbeat_timeout_ms, "limits": dict(limits)}


def peer_joined(peer_id: str) -> dict:
    return {"type": "peer-joined", "peerId": peer_id}


def peer_left(peer_id: str, reason: str) -> dict:
    assert reason in LEFT_REASONS, reason
    return {"type": "peer-left", "peerId": peer_id, "reason": reason}


def signal_from(peer_id: str, data: dict) -> dict:
    return {"type": "signal", "from": peer_id, "data": data}


PONG = {"type": "pong"}

_LIMIT_KEYS = frozenset(("maxMessageBytes", "maxPeersPerRoom", "messagesPerSecond", "messageBurst"))
_SERVER_KEYS = {
    "welcome": frozenset(("type", "v", "peerId", "room", "peers", "heartbeatIntervalMs",
                          "heartbeatTimeoutMs", "limits")),
    "peer-joined": frozenset(("type", "peerId")),
    "peer-left": frozenset(("type", "peerId", "reason")),
    "signal": frozenset(("type", "from", "data")),
    "pong": frozenset(("type",)),
    "error": frozenset(("type", "code", "message")),
}


def _is_peer_id(value: Any) -> bool:
    return isinstance(value, str) and PEER_ID_RE.fullmatch(value) is not None


def validate_server_message(obj: Any) -> dict:
    """Check a decoded server frame (client side); return it unchanged or raise ValueError.

    Unknown keys are tolerated here so that a newer server can add fields.
    """
    # 1. An object whose "type" is a known server message with all its keys present.
    if not isinstance(obj, dict) or obj.get("type") not in _SERVER_KEYS:
        raise ValueError(f"not a server message: {str(obj)[:80]}")
    kind = obj["type"]
    missing = sorted(k for k in _SERVER_KEYS[kind] if k not in obj)
    if missing:
        raise ValueError(f"{kind}: missing key(s) {missing}")
    # 2. Per type: ids are peer ids, numbers are positive integers, enums are known.
    if kind == "welcome":
        ok = (obj["v"] == PROTOCOL_VERSION and _is_peer_id(obj["peerId"])
              and isinstance(obj["room"], str) and ROOM_RE.fullmatch(obj["room"]) is not None
              and isinstance(obj["peers"], list) and all(_is_peer_id(p) for p in obj["peers"])
              and all(type(obj[k]) is int and obj[k] > 0
                      for k in ("heartbeatIntervalMs", "heartbeatTimeoutMs"))
              and isinstance(obj["limits"], dict) and _LIMIT_KEYS <= obj["limits"].keys()
              and all(isinstance(obj["limits"][k], (int, float)) for k in _LIMIT_KEYS))
    elif kind == "peer-joined":
        ok = _is_peer_id(obj["peerId"])
    elif kind == "peer-left":
        ok = _is_peer_id(obj["peerId"]) and obj["reason"] in LEFT_REASONS
    elif kind == "signal":
        ok = _is_peer_id(obj["from"]) and isinstance(obj["data"], dict)
    elif kind == "error":
        ok = obj["code"] in ERROR_CODES and isinstance(obj["message"], str)
    else:
        ok = True
    if not ok:
        raise ValueError(f"malformed {kind} message: {str(obj)[:120]}")
    return obj
