"""BERT WordPiece tokenization, as HF `tokenizers` runs it for all-MiniLM-L6-v2: the same
ids for every text, and the character offset of every piece in the original text (chunking
counts and cuts by them). Pure Python; runs in Pyodide.

The pipeline, all of it read from tokenizer.json:

    raw text
      -> split out special tokens written literally in the text ("[MASK]", ...: the
         added tokens with normalized=false; matched case-sensitively, longest first)
      -> BertNormalizer, one character at a time (every step is per character, which is
         what lets each output character remember the input character it came from):
           clean_text            drop NUL, U+FFFD and "other" characters (Cc Cf Co Cs,
                                 except \\t \\n \\r; unassigned ones are kept); any
                                 White_Space character -> " "
           handle_chinese_chars  a CJK ideograph becomes its own word (after NFD, which maps
                                 CJK compatibility ideographs to unified ones)
           strip_accents         NFD, then drop nonspacing marks (Mn). Unset (null) in the
                                 file means "same as lowercase", as `tokenizers` reads it.
           lowercase             per character (so no Greek final-sigma rule, like Rust's
                                 char::to_lowercase)
      -> BertPreTokenizer: split on whitespace (dropped) and on punctuation (each
         punctuation character a word: ASCII punctuation, which includes $+<=>^`|~, or
         Unicode P*)
      -> WordPiece: greedy longest-match-first; pieces after the first carry "##"; a word
         of more than max_input_chars_per_word (100) characters, or with any part that
         matches nothing, is one [UNK]
      -> [CLS] pieces [SEP], truncated to max_length with [SEP] kept.

max_length defaults to 256, sentence-transformers' max_seq_length for this model, NOT the
128 that tokenizer.json's own truncation section says (sentence-transformers overrides it).

Categories come from Python's unicodedata, corrected by _OVERRIDE_TABLE wherever
`tokenizers` decides otherwise (its category tables predate Unicode 10; its lowercase is
newer than Python's). With the table, every code point gives the same words as
`tokenizers` 0.23.3 under CPython 3.11, 3.12 (Pyodide 0.27's Unicode 15.0) and 3.13;
``scripts/make_embedding_fixtures.py --check-unicode`` re-checks and prints the table.
One known difference remains, in offsets only: where NFD reorders combining marks across
characters, a piece's start can be one character off (ids are unaffected).
"""

from __future__ import annotations

import bisect
import json
import re
import unicodedata
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from ..errors import TabmeshError

__all__ = ["TokenizerConfigError", "Encoding", "Batch", "WordPieceTokenizer"]

DEFAULT_MAX_LENGTH = 256  # sentence-transformers' max_seq_length for all-MiniLM-L6-v2
_WORD_CACHE_MAX = 1 << 16

# Rust's char::is_whitespace (the Unicode White_Space property). Not str.isspace(): that
# also says yes to U+001C..U+001F, which are Cc here and removed by clean_text.
_WHITE_SPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"
    "\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
_OTHER = frozenset(("Cc", "Cf", "Co", "Cs"))  # not Cn: tokenizers keeps unassigned characters
# tokenizers' is_chinese_char (note its 0x2B920 where Google's BERT has 0x2B820)
_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
               (0x2B740, 0x2B81F), (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))

# What a normalized character does in pre-tokenization.
_SPACE, _PUNCT, _WORD, _SOLO = 0, 1, 2, 3  # _SOLO: a CJK ideograph, a word by itself


class TokenizerConfigError(TabmeshError):
    """tokenizer.json is not a BERT WordPiece tokenizer this module can run, or is malformed.
    The message names the field."""

    code = "bad_tokenizer"


@dataclass(frozen=True)
class Encoding:
    """One text, tokenized.

    ids: token ids, [CLS] ... [SEP] when special tokens were added.
    offsets: (start, end) character offsets of each token into the original text;
        (0, 0) for [CLS]/[SEP] added around it. A piece of a word whose normalization
        changed its length (accents stripped) maps to the whole input characters it came from.
    n_dropped: word-pieces cut off by truncation (0 if the text fitted).
    """

    ids: list[int]
    offsets: list[tuple[int, int]]
    n_dropped: int = 0


@dataclass(frozen=True)
class Batch:
    """Encodings padded to the longest one (right padding, as sentence-transformers does).

    input_ids:      (batch, seq) int64, pad id 0 after the last token
    attention_mask: (batch, seq) int64, 1 on real tokens, 0 on padding
    token_type_ids: (batch, seq) int64, all 0 (single sentences)
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray


def _is_cjk(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


def _is_punctuation(c: str) -> bool:
    cp = ord(c)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    rule = _override(c)
    if rule is not None:
        return rule == "p"
    return unicodedata.category(c).startswith("P")


def _is_mark(c: str) -> bool:
    """A nonspacing mark, as tokenizers' (older) tables say."""
    rule = _override(c)
    return rule == "m" if rule is not None else unicodedata.category(c) == "Mn"


def _lower(c: str) -> str:
    rule = _override(c)
    if rule is None:
        return c.lower()
    if rule[0] == ">":
        return rule[1:]
    return chr(ord(c) + int(rule[1:], 16)) if rule[0] == "+" else c


# Where `tokenizers` and Python's unicodedata disagree. tokenizers takes categories from the
# `unicode_categories` crate, which predates Unicode 10: marks, punctuation and format
# characters added since are plain word characters to it (and a few changed category);
# its lowercase comes from a Rust standard library newer than Python's tables. Found by
# running every code point through both (tokenizers 0.23.3; CPython 3.11, 3.12, 3.13).
#   HEX[-HEX]RULE, RULE: w  an ordinary word character, left as it is
#                        p  punctuation, left as it is
#                        m  a nonspacing mark (removed with the accents)
#                        x  removed (clean_text)
#                        >HEX  lowercases to that code point
#                        +HEX  lowercases to the code point HEX further on
_OVERRIDE_TABLE = """
61dw 7fdw 890-891w 898-89fw 8ca-8e2w 9fd-9few a76w afa-affw b55w c04w c3cw c77w c84w
d00w d3b-d3cw d81w ebaw ecew 166dp 1734m 180fw 1885-1886w 1abf-1acew 1b7d-1b7ew
1c89>1c8a 1df6-1dfbw 2e43-2e4fw 2e52-2e5dw a7cb>264 a7cc>a7cd a7ce>a7cf a7d2>a7d3
a7d4>a7d5 a7da>a7db a7dc>19b a82cw a8c5w a8ffw a9bdw 10d24-10d27w 10d50-10d65+20
10eab-10eadw 10efd-10effw 10f46-10f50w 10f55-10f59w 10f82-10f89w 11070w 11073-11074w
110c2w 110cdw 111c9p 111cfw 1123ew 11241w 1133bw 11438-1143fw 11442-11444w 11446w
1144b-1144fw 1145a-1145bw 1145d-1145ew 11660-1166cw 116b9w 1182f-11837w 11839-1183bw
11938w 1193b-1193cw 1193ew 11943-11946w 119d4-119d7w 119da-119dbw 119e0w 119e2w
11a01-11a0aw 11a33-11a38w 11a3b-11a47w 11a51-11a56w 11a59-11a5bw 11a8a-11a96w
11a98-11a9cw 11a9e-11aa2w 11b00-11b09w 11c30-11c36w 11c38-11c3dw 11c3fw 11c41-11c45w
11c70-11c71w 11c92-11ca7w 11caa-11cb0w 11cb2-11cb3w 11cb5-11cb6w 11d31-11d36w 11d3aw
11d3c-11d3dw 11d3f-11d45w 11d47w 11d90-11d91w 11d95w 11d97w 11ef3-11ef4w 11ef7-11ef8w
11f00-11f01w 11f36-11f3aw 11f40w 11f42-11f4fw 11fffw 12ff1-12ff2w 13430-13440w
13447-13455w 16e97-16e9aw 16ea0-16eb8+1b 16f4fw 16fe2w 16fe4w 1cf00-1cf2dw 1cf30-1cf46w
1e000-1e006w 1e008-1e018w 1e01b-1e021w 1e023-1e024w 1e026-1e02aw 1e08fw 1e130-1e136w
1e2aew 1e2ec-1e2efw 1e4ec-1e4efw 1e944-1e94aw 1e95e-1e95fw
"""


def _parse_overrides(table: str) -> tuple[list[int], list[int], list[str]]:
    entries = []
    for item in table.split():
        i = next(k for k, ch in enumerate(item) if ch in "wpmx>+")
        lo, _, hi = item[:i].partition("-")
        rule = item[i:] if item[i] != ">" else ">" + chr(int(item[i + 1:], 16))
        entries.append((int(lo, 16), int(hi or lo, 16), rule))
    entries.sort()
    return [e[0] for e in entries], [e[1] for e in entries], [e[2] for e in entries]


_OV_LO, _OV_HI, _OV_RULE = _parse_overrides(_OVERRIDE_TABLE)


def _override(c: str) -> str | None:
    cp = ord(c)
    if cp < 0x61D:  # below the first entry: the common case, skip the search
        return None
    i = bisect.bisect_right(_OV_LO, cp) - 1
    return _OV_RULE[i] if i >= 0 and cp <= _OV_HI[i] else None


class WordPieceTokenizer:
    """A BERT WordPiece tokenizer built from tokenizer.json (``from_tokenizer_json``) or
    a vocab.txt (``from_vocab``).

        tok = WordPieceTokenizer.from_tokenizer_json(open("tokenizer.json").read())
        tok.encode("Hello, world!").ids       # [101, 7592, 1010, 2088, 999, 102]
        tok.tokenize("unaffable")             # ['una', '##ffa', '##ble']
        batch = tok.encode_batch(texts)       # padded numpy arrays
    """

    def __init__(self, vocab: dict[str, int], *, lowercase: bool = True,
                 strip_accents: bool | None = None, clean_text: bool = True,
                 handle_chinese_chars: bool = True, unk_token: str = "[UNK]",
                 cls_token: str = "[CLS]", sep_token: str = "[SEP]", pad_id: int = 0,
                 continuing_prefix: str = "##", max_input_chars_per_word: int = 100,
                 special_tokens: Iterable[str] | None = None,
                 max_length: int = DEFAULT_MAX_LENGTH) -> None:
        for name in (unk_token, cls_token, sep_token):
            if name not in vocab:
                raise TokenizerConfigError(f"special token {name!r} is not in the vocabulary")
        if max_length < 2:
            raise TokenizerConfigError(
                f"max_length {max_length} leaves no room for [CLS] and [SEP]")
        self.vocab = vocab
        self.id_to_token = {i: t for t, i in vocab.items()}
        self.lowercase = lowercase
        self.strip_accents = lowercase if strip_accents is None else strip_accents
        self.clean_text = clean_text
        self.handle_chinese_chars = handle_chinese_chars
        self.unk_id = vocab[unk_token]
        self.cls_id = vocab[cls_token]
        self.sep_id = vocab[sep_token]
        self.pad_id = pad_id
        self.prefix = continuing_prefix
        self.max_input_chars_per_word = max_input_chars_per_word
        self.max_length = max_length
        specials = list(special_tokens) if special_tokens is not None else [
            t for t in ("[PAD]", unk_token, cls_token, sep_token, "[MASK]") if t in vocab]
        # longest first, so a special token that is a prefix of another loses to it
        self._specials = sorted({s for s in specials if s}, key=len, reverse=True)
        self._special_ids = {s: vocab[s] for s in self._specials if s in vocab}
        # alternatives longest first: the regex then matches leftmost-longest, as tokenizers does
        self._special_re = (re.compile("|".join(map(re.escape, self._specials)))
                            if self._specials else None)
        self._char_cache: dict[str, tuple[tuple[str, int], ...]] = {}
        self._word_cache: dict[str, tuple[tuple[int, int, int], ...]] = {}

    # ----- construction -----

    @classmethod
    def from_tokenizer_json(cls, data: str | bytes | dict,
                            max_length: int = DEFAULT_MAX_LENGTH) -> "WordPieceTokenizer":
        """From the contents of tokenizer.json (text, bytes or the parsed dict)."""
        if isinstance(data, (str, bytes, bytearray)):
            try:
                data = json.loads(data)
            except ValueError as e:
                raise TokenizerConfigError(f"tokenizer.json is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise TokenizerConfigError("tokenizer.json must hold a JSON object")
        model = data.get("model")
        if not isinstance(model, dict) or model.get("type") != "WordPiece":
            kind = model.get("type") if isinstance(model, dict) else None
            raise TokenizerConfigError(f"model.type is {kind!r}; only WordPiece is supported")
        vocab = model.get("vocab")
        if not isinstance(vocab, dict) or not all(
                isinstance(k, str) and isinstance(v, int) for k, v in vocab.items()):
            raise TokenizerConfigError("model.vocab must map strings to integer ids")
        norm = data.get("normalizer") or {}
        if norm and norm.get("type") != "BertNormalizer":
            raise TokenizerConfigError(
                f"normalizer.type is {norm.get('type')!r}; only BertNormalizer is supported")
        pre = data.get("pre_tokenizer") or {}
        if pre and pre.get("type") != "BertPreTokenizer":
            raise TokenizerConfigError(
                f"pre_tokenizer.type is {pre.get('type')!r}; only BertPreTokenizer is supported")
        cls_token, sep_token = "[CLS]", "[SEP]"
        post = data.get("post_processor") or {}
        if post.get("type") == "TemplateProcessing":
            single = [s for s in post.get("single", []) if "SpecialToken" in s]
            if len(single) == 2:
                cls_token, sep_token = (s["SpecialToken"]["id"] for s in single)
        elif post.get("type") == "BertProcessing":
            cls_token, sep_token = post["cls"][0], post["sep"][0]
        specials = [t["content"] for t in data.get("added_tokens", [])
                    if isinstance(t, dict) and isinstance(t.get("content"), str)
                    and not t.get("normalized", False)]
        return cls(
            dict(vocab), lowercase=bool(norm.get("lowercase", True)),
            strip_accents=norm.get("strip_accents"),
            clean_text=bool(norm.get("clean_text", True)),
            handle_chinese_chars=bool(norm.get("handle_chinese_chars", True)),
            unk_token=model.get("unk_token", "[UNK]"), cls_token=cls_token, sep_token=sep_token,
            pad_id=int((data.get("padding") or {}).get("pad_id", 0)),
            continuing_prefix=model.get("continuing_subword_prefix", "##"),
            max_input_chars_per_word=int(model.get("max_input_chars_per_word", 100)),
            special_tokens=specials, max_length=max_length)

    @classmethod
    def from_vocab(cls, vocab_txt: str, max_length: int = DEFAULT_MAX_LENGTH,
                   **options) -> "WordPieceTokenizer":
        """From vocab.txt (one token a line, id = line number), BERT-uncased defaults."""
        vocab = {line: i for i, line in enumerate(vocab_txt.split("\n")) if line}
        return cls(vocab, max_length=max_length, **options)

    # ----- normalization and pre-tokenization -----

    def _normalize_char(self, c: str) -> tuple[tuple[str, int], ...]:
        """The normalized characters one input character becomes, each with its kind."""
        out = self._char_cache.get(c)
        if out is not None:
            return out
        rule = _override(c)
        if self.clean_text and (rule == "x" or c in "\0\ufffd" or (
                rule is None and c not in "\t\n\r" and unicodedata.category(c) in _OTHER)):
            out = ()
        elif c in _WHITE_SPACE:
            out = ((" ", _SPACE),)
        elif rule is not None and rule not in "xm":  # w, p or a lowercase mapping
            out = ((_lower(c) if self.lowercase else c, _PUNCT if rule == "p" else _WORD),)
        else:
            s = c
            if self.strip_accents:
                s = "".join(x for x in unicodedata.normalize("NFD", s) if not _is_mark(x))
            if self.lowercase:
                s = "".join(_lower(x) for x in s)
            if self.handle_chinese_chars and _is_cjk(ord(c)):
                out = tuple((x, _SOLO) for x in s)
            else:
                out = tuple((x, _SPACE if x in _WHITE_SPACE else
                             _PUNCT if _is_punctuation(x) else _WORD) for x in s)
        self._char_cache[c] = out
        return out

    def _words(self, text: str, base: int, out: list[tuple[str, list[int]]]) -> None:
        """Append the pre-tokenized words of ``text`` (which starts at ``base`` in the
        original) to ``out``: each as (normalized word, original index of each of its chars)."""
        chars: list[str] = []
        where: list[int] = []

        def flush() -> None:
            if chars:
                out.append(("".join(chars), where.copy()))
                chars.clear()
                where.clear()

        for i, c in enumerate(text):
            if c < "\x7f" and ("a" <= c <= "z" or "0" <= c <= "9"):  # fast path: ASCII word chars
                chars.append(c)
                where.append(base + i)
                continue
            for x, kind in self._normalize_char(c):
                if kind == _WORD:
                    chars.append(x)
                    where.append(base + i)
                else:
                    flush()
                    if kind != _SPACE:
                        out.append((x, [base + i]))
        flush()

    def _split_specials(self, text: str) -> list[tuple[int, int, int | None]]:
        """Spans of ``text``: (start, end, special id or None for ordinary text)."""
        if self._special_re is None or not any(s in text for s in self._specials):
            return [(0, len(text), None)]
        spans: list[tuple[int, int, int | None]] = []
        start = 0
        for m in self._special_re.finditer(text):
            if start < m.start():
                spans.append((start, m.start(), None))
            spans.append((m.start(), m.end(), self._special_ids.get(m.group(), self.unk_id)))
            start = m.end()
        if start < len(text):
            spans.append((start, len(text), None))
        return spans

    # ----- WordPiece -----

    def _wordpiece(self, word: str) -> tuple[tuple[int, int, int], ...]:
        """(id, start, end) of each piece of ``word``, start/end indexing its characters."""
        cached = self._word_cache.get(word)
        if cached is not None:
            return cached
        n = len(word)
        if n > self.max_input_chars_per_word:
            pieces: tuple[tuple[int, int, int], ...] = ((self.unk_id, 0, n),)
        else:
            found: list[tuple[int, int, int]] = []
            start = 0
            while start < n:
                end = n
                hit = None
                while start < end:
                    sub = word[start:end] if start == 0 else self.prefix + word[start:end]
                    hit = self.vocab.get(sub)
                    if hit is not None:
                        break
                    end -= 1
                if hit is None:
                    found = [(self.unk_id, 0, n)]
                    break
                found.append((hit, start, end))
                start = end
            pieces = tuple(found)
        if len(self._word_cache) >= _WORD_CACHE_MAX:
            self._word_cache.clear()
        self._word_cache[word] = pieces
        return pieces

    # ----- public API -----

    def pieces(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """All word-piece ids of ``text`` with their character offsets into it: no special
        tokens added, no truncation. What chunking counts."""
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        for start, end, special in self._split_specials(text):
            if special is not None:
                ids.append(special)
                offsets.append((start, end))
                continue
            words: list[tuple[str, list[int]]] = []
            self._words(text[start:end], start, words)
            for word, where in words:
                for tid, a, b in self._wordpiece(word):
                    ids.append(tid)
                    offsets.append((where[a], where[b - 1] + 1))
        return ids, offsets

    def encode(self, text: str, max_length: int | None = -1,
               add_special_tokens: bool = True) -> Encoding:
        """Tokenize one text. ``max_length`` counts [CLS] and [SEP]: -1 means the
        tokenizer's own (256), None means no truncation. A truncated text keeps its
        first max_length - 2 pieces and ends with [SEP]."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, not {type(text).__name__}")
        ids, offsets = self.pieces(text)
        if max_length == -1:
            max_length = self.max_length
        room = None if max_length is None else max_length - (2 if add_special_tokens else 0)
        if room is not None and room < 0:
            raise ValueError(f"max_length {max_length} leaves no room for [CLS] and [SEP]")
        dropped = 0
        if room is not None and len(ids) > room:
            dropped = len(ids) - room
            ids, offsets = ids[:room], offsets[:room]
        if add_special_tokens:
            ids = [self.cls_id, *ids, self.sep_id]
            offsets = [(0, 0), *offsets, (0, 0)]
        return Encoding(ids, offsets, dropped)

    def tokenize(self, text: str) -> list[str]:
        """The word-piece strings of ``text`` (no special tokens, no truncation)."""
        return [self.id_to_token[i] for i in self.pieces(text)[0]]

    def count(self, text: str) -> int:
        """Number of word-pieces in ``text``, special tokens not counted."""
        return len(self.pieces(text)[0])

    def pad(self, encodings: Sequence[Encoding]) -> Batch:
        """Right-pad encodings to the longest one."""
        if not encodings:
            raise ValueError("cannot pad an empty list of encodings")
        seq = max(len(e.ids) for e in encodings)
        ids = np.full((len(encodings), seq), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(encodings), seq), dtype=np.int64)
        for row, e in enumerate(encodings):
            ids[row, :len(e.ids)] = e.ids
            mask[row, :len(e.ids)] = 1
        return Batch(ids, mask, np.zeros_like(ids))

    def encode_batch(self, texts: Sequence[str], max_length: int | None = -1) -> Batch:
        """Tokenize and pad a batch, as sentence-transformers' tokenize() does."""
        return self.pad([self.encode(t, max_length) for t in texts])
