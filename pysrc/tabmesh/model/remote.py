"""Model files over HTTP Range, cached in the browser's Cache API.

A tab never downloads more of a GGUF than it runs: the header first (grown until it
parses), then only the byte ranges of its tensors, in pieces of at most PIECE bytes so the
page can show progress. Each piece is stored in the Cache API under a key naming the file,
its ETag and the range, so a reload (or another tab of the same origin) reads it from disk
and a changed file on the server is never mixed with stale pieces.

The planning is pure and tested natively; `RemoteFile` is the thin browser adapter.
"""
from __future__ import annotations

import logging
from typing import Awaitable, Callable

from ..gguf import GGUFFile, NeedMoreData, parse_header

log = logging.getLogger("tabmesh.model")

PIECE = 8 << 20          # progress and cache granularity
HEADER_FIRST = 2 << 20   # SmolLM2's header (vocabulary included) is ~1.7 MB
CACHE_NAME = "tabmesh-models-v1"


def split_ranges(ranges: list[tuple[int, int]], piece: int = PIECE) -> list[tuple[int, int]]:
    """Half-open ranges cut into pieces of at most `piece` bytes, aligned to `piece` so the
    same bytes always map to the same cache keys whichever layer range asked for them."""
    out = []
    for start, end in ranges:
        if not 0 <= start < end:
            raise ValueError(f"bad byte range {start}..{end}")
        pos = start
        while pos < end:
            stop = min(end, (pos // piece + 1) * piece)
            out.append((pos, stop))
            pos = stop
    return out


def parse_content_range(value: str | None) -> int | None:
    """Total size from 'bytes a-b/TOTAL' (None if absent or '*')."""
    if not value or "/" not in value:
        return None
    total = value.rsplit("/", 1)[1].strip()
    return int(total) if total.isdigit() else None


async def read_header(fetch: Callable[[int, int], Awaitable[bytes]], file_size: int,
                      first: int = HEADER_FIRST) -> GGUFFile:
    """Parse a GGUF header, fetching a longer prefix until it is complete."""
    n = min(first, file_size)
    while True:
        data = await fetch(0, n)
        try:
            return parse_header(data, file_size)
        except NeedMoreData as more:
            if n >= file_size:
                raise
            n = min(file_size, max(more.n_bytes_needed, 2 * n))


class RemoteFile:  # pragma: no cover - browser only; exercised by the browser tests
    """One model file on our own server, read by range through the Cache API."""

    def __init__(self, url: str, on_progress: Callable[[int, int], None] | None = None):
        self.url = url
        self.on_progress = on_progress or (lambda done, total: None)
        self.size: int | None = None
        self.etag = ""
        self._cache = None
        self.cache_hits = 0
        self.fetched_bytes = 0
        self.cache_warning: str | None = None

    async def open(self) -> "RemoteFile":
        from ..jsbridge import js
        resp = await js.fetch(self.url, _init({"method": "HEAD"}))
        if not resp.ok:
            raise FileNotFoundError(f"{self.url}: HTTP {resp.status}")
        self.size = int(resp.headers.get("Content-Length"))
        self.etag = (resp.headers.get("ETag") or "").strip('"')
        try:
            self._cache = await js.caches.open(CACHE_NAME)
        except Exception as exc:  # no Cache API (e.g. insecure context): fetch every time
            self.cache_warning = f"browser cache unavailable ({exc}); weights will be downloaded on every load"
        return self

    def _key(self, start: int, end: int) -> str:
        return f"{self.url}?etag={self.etag}&bytes={start}-{end}"

    async def _piece(self, start: int, end: int) -> bytes:
        from ..jsbridge import js
        key = self._key(start, end)
        if self._cache is not None:
            hit = await self._cache.match(key)
            if hit:
                self.cache_hits += 1
                return _buf_bytes(await hit.arrayBuffer())
        resp = await js.fetch(self.url, _init({"headers": {"Range": f"bytes={start}-{end - 1}"}}))
        if resp.status != 206:
            raise IOError(f"{self.url}: asked for bytes {start}-{end - 1}, got HTTP {resp.status}")
        buf = await resp.arrayBuffer()
        data = _buf_bytes(buf)
        if len(data) != end - start:
            raise IOError(f"{self.url}: range {start}-{end - 1} returned {len(data)} bytes")
        self.fetched_bytes += len(data)
        if self._cache is not None:
            try:
                await self._cache.put(key, js.Response.new(buf))
            except Exception as exc:  # quota full: keep going without caching, say so once
                if self.cache_warning is None:
                    self.cache_warning = f"could not cache model pieces ({exc}); they will be downloaded again next time"
        return data

    async def fetch(self, start: int, end: int) -> bytes:
        """Bytes [start, end) of the file, via cached pieces."""
        pieces = split_ranges([(start, end)])
        return b"".join([await self._piece(a, b) for a, b in pieces])

    async def fetch_many(self, ranges: list[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        pieces = split_ranges(ranges)
        total, done, got = sum(b - a for a, b in pieces), 0, {}
        self.on_progress(0, total)
        for a, b in pieces:
            got[(a, b)] = await self._piece(a, b)
            done += b - a
            self.on_progress(done, total)
        return {(s, e): b"".join(got[p] for p in split_ranges([(s, e)])) for s, e in ranges}


async def served_models(kind: str | None = None) -> list[dict]:  # pragma: no cover - browser only
    """The server's /models/ listing ({name, kind, size?}), of one kind ("gguf", "embedding")
    or all."""
    import json

    from ..jsbridge import js
    resp = await js.fetch("models/")
    if not resp.ok:
        raise RuntimeError(f"the server did not list its models (HTTP {resp.status})")
    models = json.loads(await resp.text())["models"]
    return [m for m in models if kind is None or m.get("kind") == kind]


def _init(obj):
    from ..jsbridge import js_obj
    return js_obj(obj)


def _buf_bytes(buf) -> bytes:
    from ..jsbridge import js
    return js.Uint8Array.new(buf).to_bytes()
