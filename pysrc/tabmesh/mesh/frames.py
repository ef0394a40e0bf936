"""Peer frames: the binary wire format spoken over WebRTC data channels.

Every data-channel message is exactly one frame. All integers are little-endian.

    offset  size  field
    0       2     magic        b"TM"
    2       1     version      PROTOCOL_VERSION (1); a frame of another version is dropped
    3       1     kind         Kind (below); unknown kinds are dropped
    4       4     request_id   u32, chosen by the sender; replies echo it
    8       4     chunk_index  u32, 0 <= chunk_index < chunk_count
    12      4     chunk_count  u32, 1 <= chunk_count <= MAX_CHUNKS
    16      4     total_len    u32, length of the whole reassembled payload (<= MAX_PAYLOAD)
    20      4     chunk_len    u32, length of the payload bytes in THIS frame
    24      ...   payload      chunk_len bytes; the frame ends exactly there

A payload larger than the channel's max message size is cut into chunks of equal size
(the last may be shorter), all carrying the same (kind, request_id, chunk_count,
total_len). The receiver reassembles per (sender, request_id) and only delivers a message
when every chunk arrived and the byte count equals total_len. Data channels used here are
ordered and reliable, but the reassembler does not depend on order.

Anything that does not follow this layout raises FrameError in `decode_frame`; the node
drops such a frame with a warning and keeps running (a hostile or buggy peer cannot stop it).
"""
from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field
from enum import IntEnum

MAGIC = b"TM"
PROTOCOL_VERSION = 1
HEADER = struct.Struct("<2sBBIIIII")
HEADER_SIZE = HEADER.size  # 24
MAX_PAYLOAD = 64 * 1024 * 1024  # one reassembled message; activations and tensors fit well inside
MAX_CHUNKS = 65536
DEFAULT_CHUNK = 64 * 1024 - HEADER_SIZE  # Chromium's SCTP takes 256 KiB, but 64 KiB interleaves fairly


class Kind(IntEnum):
    PING = 1      # payload: opaque bytes, echoed back in PONG
    PONG = 2
    HELLO = 3     # payload: JSON {"v": 1, "peerId", "nonce", "secret"}, then {"v", "peerId", "proof"} (mesh/auth.py)
    DATA = 4      # payload: application bytes, delivered to the inbox (tests, later subsystems)
    ECHO = 5      # payload: bytes the receiver sends back unchanged as ECHO_REPLY
    ECHO_REPLY = 6
    ERROR = 7     # payload: JSON {"type": ..., "message": ...} (tabmesh.errors shape)
    CLUSTER = 8   # payload: a cluster message (mesh/cluster_messages.py), one-way
    CALL = 9      # payload: a cluster message that wants an answer (compute-request)
    REPLY = 10    # payload: the answer to the CALL with the same request id
    RAG = 11      # payload: a RAG replication message (rag/sync.py), one-way


class FrameError(ValueError):
    """A frame that breaks the layout above; the message says which field."""


@dataclass(frozen=True)
class Frame:
    kind: Kind
    request_id: int
    chunk_index: int
    chunk_count: int
    total_len: int
    payload: bytes


def encode_message(kind: int, request_id: int, payload: bytes, max_frame: int = DEFAULT_CHUNK + HEADER_SIZE) -> list[bytes]:
    """Split one message into frames no larger than max_frame bytes each."""
    kind = Kind(kind)
    if not 0 <= request_id < 2**32:
        raise FrameError(f"request_id {request_id} outside u32")
    if len(payload) > MAX_PAYLOAD:
        raise FrameError(f"payload of {len(payload)} bytes exceeds the {MAX_PAYLOAD}-byte limit")
    chunk = max_frame - HEADER_SIZE
    if chunk < 1:
        raise FrameError(f"max_frame {max_frame} leaves no room for payload after the {HEADER_SIZE}-byte header")
    count = max(1, -(-len(payload) // chunk))
    if count > MAX_CHUNKS:
        raise FrameError(f"{count} chunks needed, more than {MAX_CHUNKS}; raise max_frame")
    view = memoryview(payload)
    frames = []
    for i in range(count):
        part = view[i * chunk:(i + 1) * chunk]
        frames.append(HEADER.pack(MAGIC, PROTOCOL_VERSION, kind, request_id, i, count, len(payload), len(part)) + part)
    return frames


def decode_frame(data: bytes | bytearray | memoryview) -> Frame:
    """Parse and validate one frame. Raises FrameError naming the first bad field."""
    data = bytes(data)
    if len(data) < HEADER_SIZE:
        raise FrameError(f"frame of {len(data)} bytes is shorter than the {HEADER_SIZE}-byte header")
    magic, version, kind, rid, index, count, total, length = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise FrameError(f"bad magic {magic!r}")
    if version != PROTOCOL_VERSION:
        raise FrameError(f"unsupported protocol version {version} (this node speaks {PROTOCOL_VERSION})")
    try:
        kind = Kind(kind)
    except ValueError:
        raise FrameError(f"unknown frame kind {kind}") from None
    if not 1 <= count <= MAX_CHUNKS:
        raise FrameError(f"chunk_count {count} outside 1..{MAX_CHUNKS}")
    if index >= count:
        raise FrameError(f"chunk_index {index} >= chunk_count {count}")
    if total > MAX_PAYLOAD:
        raise FrameError(f"total_len {total} exceeds {MAX_PAYLOAD}")
    if length != len(data) - HEADER_SIZE:
        raise FrameError(f"chunk_len {length} but {len(data) - HEADER_SIZE} payload bytes present")
    if length > total:
        raise FrameError(f"chunk_len {length} exceeds total_len {total}")
    if count == 1 and length != total:
        raise FrameError(f"single-chunk frame carries {length} of {total} bytes")
    return Frame(kind, rid, index, count, total, data[HEADER_SIZE:])


@dataclass
class _Partial:
    kind: Kind
    chunk_count: int
    total_len: int
    started: float
    chunks: dict[int, bytes] = field(default_factory=dict)
    received: int = 0


class Reassembler:
    """Collects chunks per (sender, request_id) and yields whole messages.

    Bounded: at most `max_partials` messages in flight per reassembler and `max_buffered`
    bytes held in total; partial messages older than `timeout_s` are discarded. A chunk that
    contradicts earlier chunks of the same message (different kind, count or total, or a
    duplicate index) discards that message and raises FrameError.
    """

    def __init__(self, max_partials: int = 64, max_buffered: int = 2 * MAX_PAYLOAD, timeout_s: float = 30.0,
                 clock=time.monotonic):
        self.max_partials = max_partials
        self.max_buffered = max_buffered
        self.timeout_s = timeout_s
        self.clock = clock
        self._partials: dict[tuple[str, int], _Partial] = {}
        self._buffered = 0

    @property
    def pending(self) -> int:
        return len(self._partials)

    def _drop(self, key) -> None:
        p = self._partials.pop(key, None)
        if p is not None:
            self._buffered -= p.received

    def expire(self) -> int:
        now = self.clock()
        old = [k for k, p in self._partials.items() if now - p.started > self.timeout_s]
        for k in old:
            self._drop(k)
        return len(old)

    def drop_sender(self, sender: str) -> None:
        for k in [k for k in self._partials if k[0] == sender]:
            self._drop(k)

    def add(self, sender: str, frame: Frame) -> tuple[Kind, int, bytes] | None:
        """Feed one frame; returns (kind, request_id, payload) when a message completes."""
        if frame.chunk_count == 1:
            return frame.kind, frame.request_id, frame.payload
        self.expire()
        key = (sender, frame.request_id)
        p = self._partials.get(key)
        if p is None:
            if len(self._partials) >= self.max_partials:
                raise FrameError(f"more than {self.max_partials} messages in flight; chunk dropped")
            p = self._partials[key] = _Partial(frame.kind, frame.chunk_count, frame.total_len, self.clock())
        if (frame.kind, frame.chunk_count, frame.total_len) != (p.kind, p.chunk_count, p.total_len):
            self._drop(key)
            raise FrameError(f"chunk {frame.chunk_index} of request {frame.request_id} contradicts earlier chunks")
        if frame.chunk_index in p.chunks:
            self._drop(key)
            raise FrameError(f"duplicate chunk {frame.chunk_index} of request {frame.request_id}")
        if p.received + len(frame.payload) > p.total_len:
            self._drop(key)
            raise FrameError(f"request {frame.request_id} carries more than its total_len {p.total_len}")
        if self._buffered + len(frame.payload) > self.max_buffered:
            self._drop(key)
            raise FrameError(f"reassembly buffer over {self.max_buffered} bytes; request {frame.request_id} dropped")
        p.chunks[frame.chunk_index] = frame.payload
        p.received += len(frame.payload)
        self._buffered += len(frame.payload)
        if len(p.chunks) < p.chunk_count:
            return None
        self._drop(key)
        if p.received != p.total_len:
            raise FrameError(f"request {frame.request_id} reassembled to {p.received} bytes, expected {p.total_len}")
        return p.kind, frame.request_id, b"".join(p.chunks[i] for i in range(p.chunk_count))
