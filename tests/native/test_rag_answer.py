"""Ask: prompt messages built from retrieved passages within a token budget, and citation
markers found in a (streamed) answer and mapped to the passages they cite."""

from __future__ import annotations

import re

import numpy as np
import pytest

from tabmesh.errors import TabmeshError
from tabmesh.rag.answer import (ELLIPSIS, SYSTEM_INSTRUCTION, CitationStream, PromptBudgetError,
                                build_messages, find_citations)
from tabmesh.rag.store import Hit


def hit(i: int, text: str, source: str = "") -> Hit:
    return Hit(1.0 - i / 10, text, f"r/{i + 1}", source or f"doc{i}.md", 0, len(text), 0,
               f"r:{i + 1}", ())


def words(s: str) -> int:
    """A stand-in tokenizer: one token per whitespace-separated word or bracket."""
    return len(re.findall(r"\w+|[^\w\s]", s))


HITS = [hit(0, "Bees make honey from nectar."), hit(1, "The hive has one queen."),
        hit(2, "Drones do not gather nectar at all.", "drones.txt")]


def test_messages_number_the_passages_and_tell_the_model_to_cite():
    p = build_messages("  How is honey made? ", HITS, words, 10_000)
    system, user = p.messages
    assert system == {"role": "system", "content": SYSTEM_INSTRUCTION}
    assert "only" in SYSTEM_INSTRUCTION and "[1]" in SYSTEM_INSTRUCTION
    assert user["role"] == "user"
    assert user["content"] == (
        "Passages:\n\n[1] (source: doc0.md)\nBees make honey from nectar.\n\n"
        "[2] (source: doc1.md)\nThe hive has one queen.\n\n"
        "[3] (source: drones.txt)\nDrones do not gather nectar at all.\n\n"
        "Question: How is honey made?")
    assert p.sources == HITS and not p.truncated
    assert p.n_tokens == words(system["content"]) + words(user["content"])


def test_budget_truncates_one_passage_at_a_word_and_drops_the_rest():
    long = hit(1, " ".join(f"word{i}" for i in range(200)))
    hits = [HITS[0], long, HITS[2]]
    base = build_messages("Why?", [], words, 10_000).n_tokens
    full_first = build_messages("Why?", hits[:1], words, 10_000).n_tokens
    budget = full_first + 60
    p = build_messages("Why?", hits, words, budget, min_passage_tokens=10)
    assert p.n_tokens <= budget and p.truncated and p.sources == hits[:2]
    text = p.messages[1]["content"]
    assert "[2] (source: doc1.md)\nword0 word1" in text and ELLIPSIS + "\n\nQuestion: Why?" in text
    assert "[3]" not in text and "Drones" not in text
    # the cut is as long as fits: one more word would not
    kept = re.search(r"\[2\].*?\n(.*?)" + re.escape(ELLIPSIS), text, re.S).group(1).split()
    assert kept == [f"word{i}" for i in range(len(kept))] and 10 < len(kept) < 200
    # too little room left for a useful piece: the passage is dropped, not cut to nothing
    p = build_messages("Why?", hits, words, full_first + 5, min_passage_tokens=10)
    assert p.sources == hits[:1] and not p.truncated
    # nothing fits: no passages, and the prompt says so
    p = build_messages("Why?", hits, words, base + 3)
    assert p.sources == [] and "(no passages were found)" in p.messages[1]["content"]
    with pytest.raises(PromptBudgetError) as exc:
        build_messages("Why " * 50 + "?", hits, words, base)
    assert isinstance(exc.value, TabmeshError) and "shorter question" in str(exc.value)
    with pytest.raises(PromptBudgetError):
        build_messages("   ", hits, words, 1000)


def test_hits_may_be_dicts_from_the_page():
    p = build_messages("q?", [{"text": "Alpha.", "source": "a.txt"}, {"text": "Beta."}], words, 999)
    assert "[1] (source: a.txt)\nAlpha." in p.messages[1]["content"]
    assert "[2]\nBeta." in p.messages[1]["content"]


def test_find_citations_maps_numbers_to_hits_and_ignores_the_rest():
    text = ("Honey comes from nectar [1]. Queens [2, 3] and drones [3][1] differ [2-3]. "
            "See [Passage 2]; not [4], [0], array[7] or [x]; odd [3-1] and [ 1 ; 2 ].")
    cites = find_citations(text, HITS)
    assert [(text[c.start:c.end], c.numbers) for c in cites] == [
        ("[1]", (1,)), ("[2, 3]", (2, 3)), ("[3]", (3,)), ("[1]", (1,)), ("[2-3]", (2, 3)),
        ("[Passage 2]", (2,)), ("[3-1]", (3,)), ("[ 1 ; 2 ]", (1, 2))]
    assert cites[1].hits == (HITS[1], HITS[2])
    assert cites[0].to_dict() == {"start": cites[0].start, "end": cites[0].end, "numbers": [1]}
    assert find_citations("no sources [1]", []) == []


def test_streamed_citations_equal_the_whole_text_parse_for_any_split():
    text = ("A [1] b [2,3] c [Source 1][2] d [9] e [ 3 ] f [1 and 2] g [12] h ["
            + "1" * 60 + "] i [3")
    whole = find_citations(text, HITS)
    rng = np.random.default_rng(0)
    for trial in range(300):
        cuts = sorted(set(rng.integers(0, len(text), int(rng.integers(0, 25))).tolist()))
        if trial < len(text):
            cuts = [trial]  # every single split point, too
        stream = CitationStream(HITS)
        got = []
        for a, b in zip([0] + cuts, cuts + [len(text)]):
            got += stream.feed(text[a:b])
        assert got == whole == stream.citations and stream.text == text
    one_by_one = CitationStream(HITS)
    for ch in "x [2] y":
        one_by_one.feed(ch)
    assert [c.numbers for c in one_by_one.citations] == [(2,)]
