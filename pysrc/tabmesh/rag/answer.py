"""Ask: the chat messages that make a model answer from retrieved passages and cite them,
and the parser that finds those citations in the streamed answer.

Prompt. Two messages, for the engine to render through the model's own chat template:

    system  SYSTEM_INSTRUCTION: answer only from the numbered passages, cite them as [1],
            [2] after the statement they support, say so when they do not hold the answer
    user    "Passages:\\n\\n[1] (source: a.md)\\n<text>\\n\\n[2] ...\\n\\nQuestion: <q>"

Passages go in retrieval order (best first), numbered from 1. ``budget`` caps the tokens
of the two contents together (``count_tokens`` counts them; leave room outside it for the
template's own tokens and the answer): the passages that fit are kept whole, the first
that does not is cut at a word boundary (ending in " …") when at least
``min_passage_tokens`` tokens are left for it, and the rest are dropped. Passage ``n`` of
the prompt is ``sources[n - 1]`` of the result, so the UI links ``[n]`` to that hit.

Citations. ``find_citations`` reads markers such as ``[1]``, ``[1, 3]``, ``[2-4]``,
``[1][2]`` and ``[Passage 2]``; numbers outside 1..len(sources) are ignored, and a marker
with none left is not a citation. ``CitationStream`` does the same on a stream of text
deltas, holding back a marker split across deltas until it closes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from tabmesh.errors import TabmeshError

__all__ = ["SYSTEM_INSTRUCTION", "AskPrompt", "Citation", "CitationStream", "PromptBudgetError",
           "build_messages", "find_citations"]

SYSTEM_INSTRUCTION = (
    "You answer questions using only the numbered passages the user gives you. After each "
    "statement, cite the passages it comes from by their numbers in square brackets, like "
    "[1] or [2][3]. Do not use outside knowledge and do not cite numbers that are not "
    "listed. If the passages do not contain the answer, say that the documents do not "
    "answer the question.")
ELLIPSIS = " …"
_MAX_MARKER = 48  # a longer bracket is not a citation marker; stop holding it back
_CITE = re.compile(r"\[\s*(?:(?:passage|source|doc(?:ument)?)\s*)?"
                   r"(\d{1,4}(?:\s*(?:,|;|-|–|and)\s*\d{1,4})*)\s*\]", re.IGNORECASE)
_NUMBER_RANGE = re.compile(r"(\d+)\s*(?:(?:-|–)\s*(\d+))?")


class PromptBudgetError(TabmeshError):
    """The question (with the instruction) alone exceeds the token budget: ask a shorter
    question, or use a model with a longer context."""

    code = "prompt_budget"


@dataclass(frozen=True)
class AskPrompt:
    """``messages`` for chat.completions; ``sources[n - 1]`` is passage [n];
    ``truncated``: the last source was cut to fit; ``n_tokens``: the contents' count."""

    messages: list[dict[str, str]]
    sources: list[Any]
    truncated: bool
    n_tokens: int


def _source_of(hit: Any) -> str:
    return getattr(hit, "source", None) or (hit.get("source") if isinstance(hit, dict) else "")


def _text_of(hit: Any) -> str:
    return hit.get("text") if isinstance(hit, dict) else hit.text


def _passage(n: int, source: str, text: str) -> str:
    head = f"[{n}] (source: {' '.join(source.split())})" if source else f"[{n}]"
    return f"{head}\n{text.strip()}"


def _user(passages: list[str], question: str) -> str:
    body = "\n\n".join(passages) if passages else "(no passages were found)"
    return f"Passages:\n\n{body}\n\nQuestion: {question.strip()}"


def build_messages(question: str, hits: Sequence[Any], count_tokens: Callable[[str], int],
                   budget: int, *, system: str = SYSTEM_INSTRUCTION,
                   min_passage_tokens: int = 24) -> AskPrompt:
    """Messages asking ``question`` over ``hits`` (store.Hit or dicts with text/source),
    within ``budget`` tokens of content (module docstring)."""
    if not isinstance(question, str) or not question.strip():
        raise PromptBudgetError("the question is empty; type a question to ask")

    def total(passages: list[str]) -> int:
        return count_tokens(system) + count_tokens(_user(passages, question))

    base = total([])
    if base > budget:
        raise PromptBudgetError(f"the question and instructions take {base} tokens, more than "
                                f"the {budget} available; ask a shorter question")
    kept: list[str] = []
    sources: list[Any] = []
    truncated = False
    for hit in hits:
        n = len(kept) + 1
        block = _passage(n, _source_of(hit), _text_of(hit))
        if total(kept + [block]) <= budget:
            kept.append(block)
            sources.append(hit)
            continue
        if budget - total(kept) >= min_passage_tokens:
            cut = _fit(n, _source_of(hit), _text_of(hit), lambda b: total(kept + [b]) <= budget)
            if cut is not None:
                kept.append(cut)
                sources.append(hit)
                truncated = True
        break
    messages = [{"role": "system", "content": system},
                {"role": "user", "content": _user(kept, question)}]
    return AskPrompt(messages, sources, truncated, total(kept))


def _fit(n: int, source: str, text: str, fits: Callable[[str], bool]) -> str | None:
    """The longest word-boundary prefix of ``text`` whose block fits, or None."""
    cuts = [m.start() for m in re.finditer(r"\s+", text.strip())]
    lo, hi, best = 0, len(cuts) - 1, None
    stripped = text.strip()
    while lo <= hi:  # fits() is monotone in the prefix length
        mid = (lo + hi) // 2
        block = _passage(n, source, stripped[:cuts[mid]] + ELLIPSIS)
        if fits(block):
            best, lo = block, mid + 1
        else:
            hi = mid - 1
    return best


@dataclass(frozen=True)
class Citation:
    """A marker at ``[start, end)`` of the answer text citing passages ``numbers``
    (1-based), i.e. ``hits`` = sources[n - 1] for each."""

    start: int
    end: int
    numbers: tuple[int, ...]
    hits: tuple[Any, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "numbers": list(self.numbers)}


def _citation(m: re.Match, sources: Sequence[Any], offset: int = 0) -> Citation | None:
    numbers: list[int] = []
    for part in _NUMBER_RANGE.finditer(m.group(1)):
        a = int(part.group(1))
        b = int(part.group(2)) if part.group(2) else a
        if b < a or b - a > 50:
            b = a  # "[3-1]" or an absurd range: keep the first number only
        for n in range(a, b + 1):
            if 1 <= n <= len(sources) and n not in numbers:
                numbers.append(n)
    if not numbers:
        return None
    return Citation(m.start() + offset, m.end() + offset, tuple(numbers),
                    tuple(sources[n - 1] for n in numbers))


def find_citations(text: str, sources: Sequence[Any]) -> list[Citation]:
    """Every citation marker in ``text`` that names at least one of ``sources``."""
    out = []
    for m in _CITE.finditer(text):
        c = _citation(m, sources)
        if c is not None:
            out.append(c)
    return out


class CitationStream:
    """Feed the answer's deltas as they stream; each ``feed`` returns the citations that
    completed in it (offsets into the whole answer, ``text``)."""

    def __init__(self, sources: Sequence[Any]) -> None:
        self.sources = list(sources)
        self.text = ""
        self.citations: list[Citation] = []
        self._pos = 0  # everything before is scanned for good

    def feed(self, delta: str) -> list[Citation]:
        self.text += delta
        new = []
        for m in _CITE.finditer(self.text, self._pos):
            self._pos = m.end()
            c = _citation(m, self.sources)
            if c is not None:
                new.append(c)
        open_at = self.text.rfind("[", self._pos)
        tail = self.text[open_at:] if open_at >= 0 else "]"
        if "]" not in tail and len(tail) < _MAX_MARKER:
            self._pos = open_at  # a marker may still be arriving
        else:
            self._pos = len(self.text)
        self.citations += new
        return new
