"""Split a document into overlapping chunks for embedding, each one a slice of the original
text (``text[chunk.start:chunk.end] == chunk.text``) with a content hash for dedup.
Pure Python; runs in Pyodide.

Size is counted in *units*: characters by default, or word-pieces when the caller passes
their character spans (``chunk_by_tokens`` does it with a WordPieceTokenizer, so a chunk
of at most 254 pieces is never truncated by the 256-token encoder).

How the cuts fall. Chunks may only begin at the start of a unit; a chunk runs up to the
start of the next chunk's new material, so the whitespace between two words belongs to the
chunk before it, and the chunks cover every character of the text. For each chunk:
  1. the window is the next ``max_units`` units;
  2. in the window's later part (from ``min_fill`` of it on, and past the overlap) the cut
     goes at the best boundary, latest among equals:
        3 paragraph break (a blank line)
        2 sentence end (. ! ? … then whitespace; 。！？) or a line break
        1 word boundary (after whitespace; between CJK characters)
        0 any other unit boundary (a word longer than the window is split)
     Cuts never fall between two pieces of one character (a Hangul syllable decomposes
     into up to 3 pieces), so a window that holds no other cut gives a smaller chunk, or
     a larger one if a single character has more than max_units pieces.
  3. the next chunk starts ``overlap`` units before the cut, moved back to the start of
     the word it lands in (at most SNAP_UNITS further), so consecutive chunks share at least
     ``overlap`` units and at most ``overlap`` + one word.
The last chunk ends at the end of the text. Empty or whitespace-only text gives no chunks.

The hash (``Chunk.sha256``) is the sha256 of ``normalize_for_hash(text)``: NFKC, every
whitespace run made one space, ends stripped. Case is kept. Two chunks with the same hash
embed the same (the tokenizer ignores whitespace and NFKC differences are rare in
practice), so a store can embed one of them.
"""

from __future__ import annotations

import hashlib
import math
import re
import unicodedata
from dataclasses import dataclass
from typing import Callable, Sequence

__all__ = ["Chunk", "chunk_text", "chunk_by_tokens", "content_hash", "normalize_for_hash"]

SNAP_UNITS = 32  # how far back an overlap start may move to reach a word start

Spans = Sequence[tuple[int, int]]

_PARAGRAPH = re.compile(r"\n[^\S\n]*\n\s*(?=\S)")
_SENTENCE = re.compile(r"[.!?\u2026][\"')\]\u00bb\u201d\u2019]*\s+(?=\S)")
_LINE = re.compile(r"\n\s*(?=\S)")
_CJK_STOP = re.compile(r"[\u3002\uff01\uff1f](?=\S)")
_WORD = re.compile(r"\s+(?=\S)")


def _is_cjk(c: str) -> bool:
    cp = ord(c)
    return (0x3040 <= cp <= 0x30FF or 0x3400 <= cp <= 0x4DBF or 0x4E00 <= cp <= 0x9FFF
            or 0xAC00 <= cp <= 0xD7AF or 0xF900 <= cp <= 0xFAFF or 0x20000 <= cp <= 0x2FA1F)


@dataclass(frozen=True)
class Chunk:
    """One chunk: ``text == source[start:end]`` (character offsets), ``n_units`` its size
    in the units it was cut by, ``sha256`` the hex digest of its normalized text."""

    index: int
    start: int
    end: int
    text: str
    n_units: int
    sha256: str


def normalize_for_hash(text: str) -> str:
    """NFKC, whitespace runs collapsed to one space, stripped: what the hash covers."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def content_hash(text: str) -> str:
    """sha256 hex digest of ``normalize_for_hash(text)`` (UTF-8)."""
    return hashlib.sha256(normalize_for_hash(text).encode("utf-8")).hexdigest()


def _boundary_priorities(text: str) -> dict[int, int]:
    """Character position -> priority of cutting there (positions not listed: 0, or 1
    beside a CJK character)."""
    prio: dict[int, int] = {}
    for pattern, p in ((_WORD, 1), (_LINE, 2), (_SENTENCE, 2), (_CJK_STOP, 2), (_PARAGRAPH, 3)):
        for m in pattern.finditer(text):
            if prio.get(m.end(), 0) < p:
                prio[m.end()] = p
    return prio


def chunk_text(text: str, max_units: int = 1000, overlap: int = 200,
               spans: Spans | Callable[[str], Spans] | None = None,
               min_fill: float = 0.5) -> list[Chunk]:
    """Chunks of ``text`` of at most ``max_units`` units, consecutive ones sharing about
    ``overlap`` units (see the module docstring).

    spans: the units' (start, end) character spans in ``text``, sorted, or a function
        that returns them; None means every character is a unit.
    min_fill: a chunk that is not the last holds at least this fraction of max_units
        (and more than ``overlap``), so boundaries never make chunks tiny.
    """
    if max_units < 1:
        raise ValueError(f"max_units must be >= 1, got {max_units}")
    if not 0 <= overlap < max_units:
        raise ValueError(
            f"overlap must be in [0, max_units), got {overlap} with max_units {max_units}")
    if not 0.0 < min_fill <= 1.0:
        raise ValueError(f"min_fill must be in (0, 1], got {min_fill}")
    if not text.strip():
        return []
    if spans is None:
        starts = list(range(len(text)))
        ends = None
    else:
        units = spans(text) if callable(spans) else spans
        starts = [s for s, _ in units]
        ends = [e for _, e in units]
        if any(b < a for a, b in zip(starts, starts[1:])) or any(
                not 0 <= s <= e <= len(text) for s, e in zip(starts, ends)):
            raise ValueError("spans must be sorted (start, end) character ranges inside the text")
    n = len(starts)
    prio_at = _boundary_priorities(text)

    def pos(k: int) -> int:  # where a cut before unit k falls
        return len(text) if k == n else 0 if k == 0 else starts[k]

    def prio(k: int) -> int:
        if ends is not None and starts[k] < ends[k - 1]:
            return -1  # inside one character (its pieces share it)
        p = pos(k)
        if p >= len(text):
            return 0
        if p in prio_at:
            return prio_at[p]
        if text[p].isspace():
            return 0
        return 1 if _is_cjk(text[p - 1]) or _is_cjk(text[p]) else 0

    chunks: list[Chunk] = []

    def emit(i: int, k: int) -> None:
        a, b = 0 if i == 0 else pos(i), pos(k)  # (with no units at all, i == k == n == 0)
        piece = text[a:b]
        chunks.append(Chunk(len(chunks), a, b, piece, k - i, content_hash(piece)))

    min_units = max(overlap + 1, math.ceil(max_units * min_fill))
    i = 0
    while n - i > max_units:
        hi = i + max_units
        lo = min(hi, i + min_units)
        best_k, best_p = None, -1
        for k in range(hi, lo - 1, -1):  # latest first, so ties keep the latest
            p = prio(k)
            if p > best_p:
                best_k, best_p = k, p
                if p == 3:
                    break
        if best_k is None:  # every cut in the window splits a character: look wider
            best_k = next((k for k in range(lo - 1, i, -1) if prio(k) >= 0), None)
        if best_k is None:
            best_k = next((k for k in range(hi + 1, n) if prio(k) >= 0), n)
            if best_k == n:
                break
        emit(i, best_k)
        if overlap == 0:
            nxt = best_k
        else:
            target = best_k - overlap
            nxt = next((k for k in range(target, max(i, target - SNAP_UNITS), -1)
                        if prio(k) >= 1), None)
            if nxt is None:
                nxt = next((k for k in range(target, i, -1) if prio(k) >= 0), best_k)
        i = nxt
    emit(i, n)
    return chunks


def chunk_by_tokens(text: str, tokenizer, max_tokens: int = 200, overlap: int = 32,
                    min_fill: float = 0.5) -> list[Chunk]:
    """Chunks of at most ``max_tokens`` word-pieces (special tokens not counted: keep
    max_tokens <= the encoder's max_length - 2, i.e. 254, to avoid truncation).
    ``tokenizer`` is a WordPieceTokenizer (anything with ``pieces(text) -> (ids, offsets)``)."""
    return chunk_text(text, max_tokens, overlap, spans=tokenizer.pieces(text)[1],
                      min_fill=min_fill)
