"""Which words of a passage match the query, as character spans for the UI to mark up.

Word-level and case-insensitive (``str.casefold``), with a light symmetric English stem
(so "stored", "storing" and "stores" match "store"); common stopwords are ignored unless
the query has nothing else. Spans are (start, end) offsets into the passage text, never
HTML: the page escapes the text and wraps the spans itself.
"""

from __future__ import annotations

import re

__all__ = ["highlight_spans", "STOPWORDS"]

_WORD = re.compile(r"\w+")
STOPWORDS = frozenset("""a an and are as at be been but by can could did do does for from had
has have how i if in into is it its me my no not of on or our so than that the their them
then there these they this to was we were what when where which who whom why will with
would you your""".split())


def _stem(word: str) -> str:
    """A light, symmetric English stem, so "stored"/"storing"/"stores" match "store"."""
    w = word.casefold()
    if len(w) > 4 and w.endswith("ies"):
        return w[:-3] + "y"
    for suffix in ("ing", "ed", "es", "s"):
        if w.endswith(suffix) and len(w) - len(suffix) >= 3 and not w.endswith("ss"):
            w = w[:-len(suffix)]
            break
    return w[:-1] if len(w) > 3 and w.endswith("e") else w


def highlight_spans(query: str, text: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the words of ``text`` that match a word of
    ``query``: case-insensitive, whole words, light stemming; stopwords are ignored unless
    the query has nothing else. Plain offsets for the UI to mark up (never HTML)."""
    terms = [m.group() for m in _WORD.finditer(query or "")]
    keep = {_stem(t) for t in terms if t.casefold() not in STOPWORDS} or {_stem(t) for t in terms}
    if not keep:
        return []
    return [(m.start(), m.end()) for m in _WORD.finditer(text) if _stem(m.group()) in keep]
