"""Chunking: every chunk is an exact slice of the source, the chunks cover every character,
consecutive chunks overlap by the configured amount (up to one word more), cuts prefer
paragraph and sentence ends, and the dedup hash is stable."""

from __future__ import annotations

import hashlib
import random
import string

import pytest

from tabmesh.rag.chunking import (SNAP_UNITS, Chunk, chunk_by_tokens, chunk_text, content_hash,
                                  normalize_for_hash)
from tabmesh.rag.wordpiece import WordPieceTokenizer

SENTENCES = [
    "The committee met on Tuesday to review the proposal.",
    "Several residents argued that the building should keep its iron roof!",
    "Others asked whether the heating costs would be affordable?",
    "The architect explained that insulation can be added from the inside.",
    "After two hours the members agreed to commission a survey.",
]


def document(n_paragraphs: int = 12, seed: int = 0, max_sentences: int = 6) -> str:
    rng = random.Random(seed)
    paras = [" ".join(rng.choice(SENTENCES) for _ in range(rng.randint(2, max_sentences)))
             for _ in range(n_paragraphs)]
    return "\n\n".join(paras) + "\n"


def letter_tokenizer() -> WordPieceTokenizer:
    """Every lowercase word splits into pieces of at most 3 letters: needs no model files."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.punctuation]
    trigrams = {a + b + c for a in "etaoinsrhl" for b in "etaoinsrhl" for c in "etaoinsrhl"}
    letters = list(string.ascii_lowercase) + sorted(trigrams)
    vocab += letters + ["##" + x for x in letters]
    return WordPieceTokenizer({t: i for i, t in enumerate(vocab)})


def check_invariants(text: str, chunks: list[Chunk], max_units: int) -> None:
    """Exact slices, full coverage, progress, sizes."""
    assert chunks, "non-blank text gives at least one chunk"
    assert chunks[0].start == 0 and chunks[-1].end == len(text)
    for i, c in enumerate(chunks):
        assert c.index == i
        assert text[c.start:c.end] == c.text
        assert c.sha256 == content_hash(c.text)
        assert 0 <= c.start < c.end <= len(text)
        if i < len(chunks) - 1:
            assert c.n_units <= max_units
    for a, b in zip(chunks, chunks[1:]):
        assert a.start < b.start <= a.end, "chunks move forward and leave no gap"


def units_between(starts: list[int], lo: int, hi: int) -> int:
    return sum(lo <= s < hi for s in starts)


# ----- characters -----

def test_chars_exact_slices_coverage_and_overlap():
    text = document()
    chunks = chunk_text(text, max_units=400, overlap=80)
    check_invariants(text, chunks, 400)
    assert len(chunks) > 5
    for a, b in zip(chunks, chunks[1:]):
        shared = a.end - b.start
        assert 80 <= shared <= 80 + SNAP_UNITS, shared
        assert a.text.endswith(text[b.start:a.end]) and b.text.startswith(text[b.start:a.end])
        assert b.text[0].isalnum(), "an overlap starts at a word"


def test_chars_no_overlap_abuts():
    text = document(seed=1)
    chunks = chunk_text(text, max_units=300, overlap=0)
    check_invariants(text, chunks, 300)
    assert "".join(c.text for c in chunks) == text
    assert all(a.end == b.start for a, b in zip(chunks, chunks[1:]))


def test_cuts_prefer_paragraphs_then_sentences():
    # paragraphs of <= 3 sentences (< 230 characters): the later half of every 500-character
    # window holds a paragraph end, and the cut must be there
    text = document(20, seed=2, max_sentences=3)
    for c in chunk_text(text, max_units=500, overlap=50)[:-1]:
        assert c.text.endswith("\n\n"), repr(c.text[-30:])
    one_paragraph = " ".join(SENTENCES * 8)
    for c in chunk_text(one_paragraph, max_units=300, overlap=40)[:-1]:
        assert c.text.rstrip()[-1] in ".!?", repr(c.text[-30:])


def test_min_fill_keeps_chunks_from_being_tiny():
    # a paragraph break early in the window must not make a 10-character chunk
    text = "Short.\n\n" + "word " * 400
    chunks = chunk_text(text, max_units=200, overlap=20)
    check_invariants(text, chunks, 200)
    assert all(c.n_units >= 100 for c in chunks[:-1])


def test_word_longer_than_the_window_is_split():
    text = "start " + "x" * 1000 + " end"
    chunks = chunk_text(text, max_units=100, overlap=10)
    check_invariants(text, chunks, 100)
    assert len(chunks) >= 10


def test_cjk_cuts_at_full_stops():
    text = "自然语言处理是计算机科学的一个重要方向。它研究如何让计算机理解人类的语言。" * 20
    chunks = chunk_text(text, max_units=60, overlap=10)
    check_invariants(text, chunks, 60)
    assert all(c.text.endswith("。") for c in chunks[:-1])


def test_short_blank_and_bad_arguments():
    assert chunk_text("") == []
    assert chunk_text(" \n\t ") == []
    (only,) = chunk_text("  hello world  ", max_units=100, overlap=10)
    assert (only.start, only.end, only.text, only.n_units) == (0, 15, "  hello world  ", 15)
    with pytest.raises(ValueError, match="overlap"):
        chunk_text("abc", max_units=10, overlap=10)
    with pytest.raises(ValueError, match="max_units"):
        chunk_text("abc", max_units=0, overlap=0)
    with pytest.raises(ValueError, match="min_fill"):
        chunk_text("abc", max_units=10, overlap=0, min_fill=0)
    with pytest.raises(ValueError, match="sorted"):
        chunk_text("abc def", max_units=10, overlap=0, spans=[(4, 7), (0, 3)])


@pytest.mark.parametrize("seed", range(40))
def test_random_texts_keep_the_invariants(seed):
    rng = random.Random(seed)
    pieces = ["word", "another", "x" * rng.randint(1, 60), ".", "!", " ", "  ", "\n", "\n\n",
              "\t", "é", "中文", "。", "😀", "한국어"]
    text = "".join(rng.choice(pieces) + rng.choice(["", " "]) for _ in range(rng.randint(1, 400)))
    max_units = rng.randint(5, 120)
    overlap = rng.randint(0, max_units - 1)
    tok = letter_tokenizer() if seed % 2 else None
    if not text.strip():
        assert chunk_text(text, max_units, overlap) == []
        return
    if tok is None:
        chunks = chunk_text(text, max_units, overlap, min_fill=rng.choice([0.1, 0.5, 1.0]))
    else:
        chunks = chunk_by_tokens(text, tok, max_units, overlap)
    check_invariants(text, chunks, max_units)


# ----- word-pieces -----

def test_tokens_sizes_and_overlap():
    tok = letter_tokenizer()
    text = document(seed=3)
    _, offsets = tok.pieces(text)
    starts = [s for s, _ in offsets]
    chunks = chunk_by_tokens(text, tok, max_tokens=120, overlap=24)
    check_invariants(text, chunks, 120)
    assert len(chunks) > 5
    for c in chunks:
        assert units_between(starts, c.start, c.end) == c.n_units
        assert tok.count(c.text) == c.n_units  # cut at word starts: re-tokenizes the same
    for a, b in zip(chunks, chunks[1:]):
        shared = units_between(starts, b.start, a.end)
        assert 24 <= shared <= 24 + SNAP_UNITS


def test_tokens_with_the_minilm_tokenizer_fit_the_encoder():
    from pathlib import Path
    path = Path(__file__).resolve().parents[2] / "models" / "all-MiniLM-L6-v2" / "tokenizer.json"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    tok = WordPieceTokenizer.from_tokenizer_json(path.read_text(encoding="utf-8"))
    text = document(30, seed=4) + "Größere Straßen. 東京は日本の首都です。" * 40
    chunks = chunk_by_tokens(text, tok, max_tokens=254, overlap=32)
    check_invariants(text, chunks, 254)
    for c in chunks:
        assert tok.encode(c.text).n_dropped == 0  # nothing lost to the 256-token limit


# ----- hashing -----

def test_hash_is_stable_and_normalized():
    assert content_hash("Hello world") == hashlib.sha256(b"Hello world").hexdigest() == \
        "64ec88ca00b268e5ba1a35678a1b5316d212f4f366b2477232534a8aeca37f3c"
    assert content_hash("  Hello \n\t world\n") == content_hash("Hello world")
    assert content_hash("ﬁne") == content_hash("fine")  # NFKC
    assert content_hash("Hello World") != content_hash("Hello world")  # case is kept
    assert normalize_for_hash("a\u00a0 b\u3000c ") == "a b c"


def test_repeated_paragraphs_dedup_by_hash():
    para = " ".join(SENTENCES)
    text = "\n\n".join([para] * 6)
    chunks = chunk_text(text, max_units=len(para) + 10, overlap=0)
    assert len(chunks) == 6
    assert len({c.sha256 for c in chunks}) == 1


def test_pieces_of_one_character_stay_together():
    from pathlib import Path
    path = Path(__file__).resolve().parents[2] / "models" / "all-MiniLM-L6-v2" / "tokenizer.json"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    tok = WordPieceTokenizer.from_tokenizer_json(path.read_text(encoding="utf-8"))
    text = "한국어 문장입니다. 안녕하세요! 대한민국 " * 10  # each syllable: 2-3 pieces
    _, offsets = tok.pieces(text)
    for max_tokens, overlap in ((10, 4), (5, 4), (7, 0), (20, 8)):
        chunks = chunk_by_tokens(text, tok, max_tokens, overlap)
        check_invariants(text, chunks, max_tokens)
        for c in chunks:
            assert all(e <= c.end for s, e in offsets if c.start <= s < c.end)


def test_text_with_no_tokens_is_one_chunk():
    tok = letter_tokenizer()
    text = "\x00\x07\u200b"  # not blank, but every character is dropped by the tokenizer
    (only,) = chunk_by_tokens(text, tok, max_tokens=10, overlap=2)
    assert (only.start, only.end, only.n_units) == (0, 3, 0)
