"""Tokenizer built from GGUF metadata, token for token the same as llama.cpp's.

Two vocabularies, chosen by ``tokenizer.ggml.model``:

- ``gpt2``: byte-level BPE (SmolLM2, Llama-3, Qwen2). Text is cut into words by the
  pre-tokenizer that ``tokenizer.ggml.pre`` names, each word is mapped byte by byte onto
  the GPT-2 printable alphabet, then merged by merge rank.
- ``llama``: SentencePiece-style BPE over scores (Llama-1/2, Mistral): spaces become
  ``▁``, a space is prefixed, the highest-scoring adjacent pair merges first, and
  characters with no piece fall back to ``<0xXX>`` byte tokens.

This is a port of llama.cpp's ``src/llama-vocab.cpp`` and ``src/unicode.cpp`` (the
llama-cpp-python 0.3.x vendored copy); the function names below point at their C++
originals. No ``regex`` module: the pre-tokenizer regexes are hand-written scanners over
Unicode categories from ``unicodedata`` (llama.cpp builds its tables from UnicodeData.txt
too; the few letters and digits newer than Python 3.11's Unicode are listed below).

``encode(text, add_special, parse_special)`` is ``llama_tokenize``; ``detokenize`` is
``llama_detokenize``; ``decode`` and ``StreamDecoder`` give back exactly the bytes that
were encoded (no clean-up of spaces), the latter never emitting half a UTF-8 character.
"""

from __future__ import annotations

import codecs
import heapq
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from tabmesh.errors import TabmeshError


class TokenizerError(TabmeshError):
    """The GGUF's tokenizer is missing, malformed, or of a kind tabmesh does not run."""

    code = "bad_tokenizer"


# GGUF tokenizer.ggml.token_type values (llama.h: llama_token_type)
TYPE_UNDEFINED, TYPE_NORMAL, TYPE_UNKNOWN, TYPE_CONTROL, TYPE_USER_DEFINED, TYPE_UNUSED, TYPE_BYTE = range(7)

# Token attribute bits (llama.h: llama_token_attr); a token's type becomes one of them,
# and load-time fix-ups may add CONTROL or UNUSED.
ATTR_UNKNOWN, ATTR_UNUSED, ATTR_NORMAL, ATTR_CONTROL = 1, 2, 4, 8
ATTR_USER_DEFINED, ATTR_BYTE, ATTR_LSTRIP, ATTR_RSTRIP = 16, 32, 128, 256
_TYPE_TO_ATTR = {TYPE_UNKNOWN: ATTR_UNKNOWN, TYPE_UNUSED: ATTR_UNUSED, TYPE_NORMAL: ATTR_NORMAL,
                 TYPE_CONTROL: ATTR_CONTROL, TYPE_USER_DEFINED: ATTR_USER_DEFINED, TYPE_BYTE: ATTR_BYTE}

# Texts llama.cpp treats as end-of-generation and forces to CONTROL (llama_vocab::impl::load).
_EOG_TEXTS = frozenset([
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[",
])
# Texts auto-detected as EOT/EOM/FIM tokens, also forced to CONTROL.
_CONTROL_TEXTS = _EOG_TEXTS | frozenset([
    "<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
    "<|code_prefix|>", "<|prefix|>", "<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>",
    "<｜fim▁hole｜>", "<SUF>", "▁<SUF>", "<|code_suffix|>", "<|suffix|>", "<|fim_middle|>",
    "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>", "<|code_middle|>",
    "<|middle|>", "<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]", "<|fim_repo|>",
    "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>", "<|file_sep|>",
])

_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
              "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>")
_FIM_EOG = {"fim_pad_token_id": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
            "fim_rep_token_id": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
            "fim_sep_token_id": ("<|file_sep|>",)}

# ---------------------------------------------------------------------------------------
# Unicode classes, as llama.cpp's unicode_cpt_flags: one category bit plus "whitespace".

_NUMBER, _LETTER, _WHITESPACE, _PUNCT, _OTHER = 1, 2, 4, 8, 16
_WHITESPACE_CPTS = frozenset([*range(0x09, 0x0E), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B),
                              0x2028, 0x2029, 0x202F, 0x205F, 0x3000])
# Letters, digits and punctuation that llama.cpp's table (Unicode 15.1) has and that are
# unassigned in Python 3.11's unicodedata (Unicode 14.0); found by comparing the two for
# every code point. Nothing else differs.
_NEWER_UNICODE = (
    (0x1123F, 0x11240, _LETTER), (0x11B00, 0x11B09, _PUNCT), (0x11F02, 0x11F02, _LETTER),
    (0x11F04, 0x11F10, _LETTER), (0x11F12, 0x11F33, _LETTER), (0x11F43, 0x11F4F, _PUNCT),
    (0x11F50, 0x11F59, _NUMBER), (0x1342F, 0x1342F, _LETTER), (0x13441, 0x13446, _LETTER),
    (0x1B132, 0x1B132, _LETTER), (0x1B155, 0x1B155, _LETTER), (0x1D2C0, 0x1D2D3, _NUMBER),
    (0x1DF25, 0x1DF2A, _LETTER), (0x1E030, 0x1E06D, _LETTER), (0x1E4D0, 0x1E4EB, _LETTER),
    (0x1E4F0, 0x1E4F9, _NUMBER), (0x2B739, 0x2B739, _LETTER), (0x2EBF0, 0x2EE5D, _LETTER),
    (0x31350, 0x323AF, _LETTER),
)
_CATEGORY_FLAGS = {"N": _NUMBER, "L": _LETTER, "P": _PUNCT}
_flag_cache: dict[str, int] = {}


def _flags(ch: str) -> int:
    """Class bits of one character: \\p{N}, \\p{L}, \\p{P}, and \\s (llama.cpp's White_Space list)."""
    f = _flag_cache.get(ch)
    if f is None:
        cat, cp = unicodedata.category(ch), ord(ch)
        f = _CATEGORY_FLAGS.get(cat[0], _OTHER)
        if cat == "Cn":
            f = next((c for lo, hi, c in _NEWER_UNICODE if lo <= cp <= hi), _OTHER)
        if cp in _WHITESPACE_CPTS:
            f |= _WHITESPACE
        if len(_flag_cache) < 1 << 16:
            _flag_cache[ch] = f
    return f


# ---------------------------------------------------------------------------------------
# Pre-tokenizers. Each splitter takes one piece of text and returns its sub-pieces; a
# pre-tokenizer is a chain of splitters, each applied to every piece of the one before
# (unicode_regex_split). Piece ends behave like string ends for look-aheads.

def _split_gpt2(s: str) -> list[str]:
    """'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+

    Port of unicode_regex_split_custom_gpt2 (contractions are case-sensitive here).
    """
    out, n, pos = [], len(s), 0
    fl = [_flags(c) for c in s] + [0]    # 0 = past the end of the piece
    while pos < n:
        c, start = s[pos], pos
        if c == "'" and pos + 1 < n:
            c1 = s[pos + 1]
            if c1 in "stmd":
                out.append(s[pos:pos + 2]); pos += 2; continue
            if pos + 2 < n and c1 + s[pos + 2] in ("re", "ve", "ll"):
                out.append(s[pos:pos + 3]); pos += 3; continue
        f2 = fl[pos + 1] if c == " " else fl[pos]
        for cls in (_LETTER, _NUMBER):
            if f2 & cls:
                pos += c == " "
                while fl[pos] & cls:
                    pos += 1
                break
        else:
            if f2 and not f2 & (_WHITESPACE | _LETTER | _NUMBER):
                pos += c == " "
                while fl[pos] and not fl[pos] & (_WHITESPACE | _LETTER | _NUMBER):
                    pos += 1
            else:
                nws = 0
                while fl[pos + nws] & _WHITESPACE:
                    nws += 1
                if nws > 1 and pos + nws < n:
                    pos += nws - 1          # \s+(?!\S): leave one space for the next word
                elif nws > 0:
                    pos += nws
                else:
                    pos += 1
        out.append(s[start:pos])
    return out


def _split_llama3(s: str, max_digits: int = 3) -> list[str]:
    """(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}
    | ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+

    Port of unicode_regex_split_custom_llama3; with max_digits=1 it is the Qwen2 one.
    """
    out, n, pos = [], len(s), 0
    fl = [_flags(c) for c in s] + [0]
    while pos < n:
        c, f, start = s[pos], fl[pos], pos
        if c == "'" and pos + 1 < n:
            c1 = s[pos + 1]
            if c1 in "stmdSTMD":
                out.append(s[pos:pos + 2]); pos += 2; continue
            if pos + 2 < n and (c1 + s[pos + 2]).lower() in ("re", "ve", "ll") and (c1 + s[pos + 2]).isascii():
                out.append(s[pos:pos + 3]); pos += 3; continue
        if not (c == "\r" or c == "\n" or f & _NUMBER) and (f & _LETTER or fl[pos + 1] & _LETTER):
            pos += 1
            while fl[pos] & _LETTER:
                pos += 1
            out.append(s[start:pos]); continue
        if f & _NUMBER:
            while fl[pos] & _NUMBER and pos - start < max_digits:
                pos += 1
            out.append(s[start:pos]); continue
        f2 = fl[pos + 1] if c == " " else f
        if not f2 & (_WHITESPACE | _LETTER | _NUMBER) and f:
            pos += c == " "
            while fl[pos] and not fl[pos] & (_WHITESPACE | _LETTER | _NUMBER):
                pos += 1
            while pos < n and s[pos] in "\r\n":
                pos += 1
            out.append(s[start:pos]); continue
        nws, last_rn = 0, 0
        while fl[pos + nws] & _WHITESPACE:
            if s[pos + nws] in "\r\n":
                last_rn = pos + nws + 1
            nws += 1
        if last_rn > 0:
            pos = last_rn                    # \s*[\r\n]+
        elif nws > 1 and pos + nws < n:
            pos += nws - 1                   # \s+(?!\S)
        elif nws > 0:
            pos += nws
        else:
            pos += 1
        out.append(s[start:pos])
    return out


def _isolate(pred: Callable[[str], bool], min_len: int = 1, max_len: int | None = None):
    """A splitter for a std::regex of one character class, e.g. \\p{N} or \\p{N}+:
    leftmost matches and the text between them each become a piece."""
    def split(s: str) -> list[str]:
        out, n, pos, gap = [], len(s), 0, 0
        while pos < n:
            end = pos
            while end < n and pred(s[end]) and (max_len is None or end - pos < max_len):
                end += 1
            if end - pos >= min_len:
                if gap < pos:
                    out.append(s[gap:pos])
                out.append(s[pos:end])
                pos = gap = end
            else:
                pos += 1
        if gap < n:
            out.append(s[gap:])
        return out
    return split


def _is_number(c: str) -> bool:
    return bool(_flags(c) & _NUMBER)


def _is_default_punct(c: str) -> bool:
    return bool(_flags(c) & _PUNCT) or c in "$+<=>^~|"


# tokenizer.ggml.pre -> (splitter chain, clean_spaces, ignore_merges, add_bos); from
# llm_tokenizer_bpe's constructor and llama_vocab::impl::load.
_GPT2_CHAIN = (_split_gpt2,)
_LLAMA3 = ((_split_llama3,), True, True, True)
_QWEN2 = ((lambda s: _split_llama3(s, 1),), False, False, False)
_SMOLLM_CHAIN = (_isolate(_is_number, 1, 1), _split_gpt2)
_DEFAULT = ((_isolate(_is_default_punct), _split_gpt2, _isolate(_is_number),
             _isolate(lambda c: "0" <= c <= "9", 3, 3)), True, False, False)
PRE_TOKENIZERS: dict[str, tuple] = {
    "default": _DEFAULT,
    **{k: _LLAMA3 for k in ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                            "midm-2.0", "lfm2")},
    **{k: ((_split_llama3,), True, False, False) for k in ("dbrx", "smaug-bpe")},
    # "gpt2" is not a llama.cpp name (it says "gpt-2"); accepted as an alias
    **{k: (_GPT2_CHAIN, True, False, False) for k in ("gpt-2", "gpt2", "phi-2", "mpt", "olmo")},
    **{k: _QWEN2 for k in ("qwen2", "deepseek-r1-qwen")},
    **{k: (_QWEN2[0], True, False, False) for k in ("stablelm2", "megrez")},
    **{k: (_SMOLLM_CHAIN, True, False, False) for k in ("starcoder", "refact", "codeshell", "exaone")},
    **{k: (_SMOLLM_CHAIN, False, False, False) for k in ("smollm", "command-r")},
}


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table (unicode_byte_to_utf8_map)."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, n = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return [table[b] for b in range(256)]


_BYTE_TO_CHAR = _bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in enumerate(_BYTE_TO_CHAR)}


def _seq(v: Any) -> list:
    return [] if v is None else list(v)


def _text(v: Any) -> Any:
    return v.decode("utf-8", "surrogateescape") if isinstance(v, (bytes, bytearray)) else v


def _value(v: Any, default: Any) -> Any:
    return default if v is None else v


def _fix_special_attrs(tokens: list[str], attrs: list[int], token_to_id: dict[str, int],
                       ids: dict[str, int], get: Callable[[str], Any]) -> set[int]:
    """llama.cpp's load-time fix-ups: EOG/FIM-looking tokens become CONTROL, control
    tokens named "unused" become UNUSED; returns the end-of-generation ids. (llama.cpp
    picks one token per FIM role in hash order; here every match counts.)"""
    eog = set()
    for i, t in enumerate(tokens):
        if token_to_id[t] != i:
            continue                               # a duplicate text: the last one wins
        if t in _CONTROL_TEXTS:
            attrs[i] |= ATTR_CONTROL
            if ids["eot_id"] < 0 and t in _EOT_TEXTS:
                ids["eot_id"] = i
        if t in _EOG_TEXTS:
            eog.add(i)
        if attrs[i] & ATTR_CONTROL and "unused" in t:
            attrs[i] |= ATTR_UNUSED
    eog.update(i for i in (ids["eos_id"], ids["eot_id"]) if i >= 0)
    for key, texts in _FIM_EOG.items():            # FIM pad/repo/file-separator end generation too
        v = get(key)
        if v is not None and 0 <= int(v) < len(tokens):
            eog.add(int(v))
        else:
            eog.update(token_to_id[t] for t in texts if t in token_to_id)
    return eog


# ---------------------------------------------------------------------------------------

@dataclass(repr=False)
class Tokenizer:
    """A GGUF vocabulary. Build it with ``Tokenizer.from_gguf_metadata``."""

    model: str                          # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    tokens: list[str]                   # (n_vocab,) piece text as stored in the GGUF
    attrs: list[int]                    # (n_vocab,) ATTR_* bits
    scores: list[float]                 # (n_vocab,) SPM merge scores; zeros for BPE
    merges: dict[tuple[str, str], int]  # BPE pair -> rank
    pre: str = "default"
    bos_id: int = -1
    eos_id: int = -1
    eot_id: int = -1
    unk_id: int = -1
    pad_id: int = -1
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool = False
    clean_spaces: bool = False
    ignore_merges: bool = False
    eog_ids: frozenset[int] = frozenset()
    chat_template: str | None = None
    token_to_id: dict[str, int] = field(default_factory=dict, repr=False)
    _special: list[int] = field(default_factory=list, repr=False)   # partition order
    _pieces: list[bytes] = field(default_factory=list, repr=False)  # token_to_piece(special=True)
    _word_cache: dict[str, list[int]] = field(default_factory=dict, repr=False)

    @property
    def n_vocab(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        return (f"Tokenizer(model={self.model!r}, pre={self.pre!r}, n_vocab={self.n_vocab}, "
                f"bos_id={self.bos_id}, eos_id={self.eos_id}, add_bos={self.add_bos})")

    # -- loading --------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, md: dict[str, Any]) -> "Tokenizer":
        """Build from GGUF key/values: ``tokenizer.ggml.*`` names, arrays as sequences
        (lists or numpy arrays), strings as str or UTF-8 bytes. Mirrors
        llama_vocab::impl::load, fix-ups of mislabelled special tokens included."""
        def get(key: str) -> Any:
            return md.get("tokenizer.ggml." + key)

        model = _text(get("model"))
        if model not in ("gpt2", "llama"):
            raise TokenizerError(
                f"tokenizer.ggml.model is {model!r}; tabmesh runs 'gpt2' (byte-level BPE) and "
                "'llama' (SentencePiece) vocabularies: pick a GGUF of a Llama/Qwen/SmolLM-style model")
        tokens = [_text(t) or f"[EMPTY_{i}]" for i, t in enumerate(_seq(get("tokens")))]
        n = len(tokens)
        if n == 0:
            raise TokenizerError("tokenizer.ggml.tokens is missing or empty: the GGUF has no vocabulary")
        types, scores = _seq(get("token_type")), _seq(get("scores"))
        for key, arr in (("token_type", types), ("scores", scores)):
            if arr and len(arr) < n:
                raise TokenizerError(f"tokenizer.ggml.{key} has {len(arr)} entries for {n} tokens")
        attrs = [_TYPE_TO_ATTR.get(int(t), 0) for t in types[:n]] if types else [ATTR_NORMAL] * n
        scores = [float(x) for x in scores[:n]] if scores else [0.0] * n

        pre = _text(get("pre")) or "default"
        merges: dict[tuple[str, str], int] = {}
        if model == "gpt2":
            if pre not in PRE_TOKENIZERS:
                raise TokenizerError(
                    f"pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; supported: "
                    + ", ".join(sorted(PRE_TOKENIZERS)))
            if get("merges") is None:
                raise TokenizerError("tokenizer.ggml.merges is missing: a 'gpt2' vocabulary needs its BPE merges")
            for rank, m in enumerate(_text(m) for m in _seq(get("merges"))):
                sp = m.find(" ", 1)
                merges.setdefault((m[:sp], m[sp + 1:]) if sp >= 0 else ("", ""), rank)
            _, clean, ignore, add_bos = PRE_TOKENIZERS[pre]
            ids = {"bos_id": 11, "eos_id": 11, "unk_id": -1}
            space_prefix = False
        else:
            clean, ignore, add_bos, space_prefix = False, False, True, True
            ids = {"bos_id": 1, "eos_id": 2, "unk_id": 0}
        ids = {k: (v if v < n else -1) for k, v in ids.items()} | {"pad_id": -1, "eot_id": -1}
        for name, key in (("bos_id", "bos_token_id"), ("eos_id", "eos_token_id"), ("unk_id", "unknown_token_id"),
                          ("pad_id", "padding_token_id"), ("eot_id", "eot_token_id")):
            v = get(key)
            if v is not None and 0 <= int(v) < n:
                ids[name] = int(v)

        token_to_id = {t: i for i, t in enumerate(tokens)}
        eog = _fix_special_attrs(tokens, attrs, token_to_id, ids, get)
        tok = cls(model=model, tokens=tokens, attrs=attrs, scores=scores, merges=merges, pre=pre,
                  add_bos=bool(_value(get("add_bos_token"), add_bos)),
                  add_eos=bool(_value(get("add_eos_token"), False)),
                  add_space_prefix=bool(_value(get("add_space_prefix"), space_prefix)),
                  clean_spaces=clean, ignore_merges=ignore, eog_ids=frozenset(eog),
                  chat_template=_text(md.get("tokenizer.chat_template")), token_to_id=token_to_id, **ids)
        # special tokens are cut out of the text longest first
        tok._special = sorted((i for i in range(n) if attrs[i] & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN)),
                              key=lambda i: -len(tokens[i].encode("utf-8", "surrogateescape")))
        tok._pieces = [tok._piece(i) for i in range(n)]
        name = str(_text(md.get("general.name")) or "").lower()
        if "phi-3" in name or "phi3" in name:   # per-model attributes, as llama.cpp sets them
            for i in tok._special:
                attrs[i] |= ATTR_RSTRIP
            for t, on in (("</s>", True), ("<unk>", False), ("<s>", False), ("<|endoftext|>", False)):
                if t in token_to_id:
                    i = token_to_id[t]
                    attrs[i] = attrs[i] | ATTR_RSTRIP if on else attrs[i] & ~ATTR_RSTRIP
        return tok

    def _piece(self, i: int) -> bytes:
        """token_to_piece(special=True): the bytes token i stands for."""
        a, text = self.attrs[i], self.tokens[i]
        if a & (ATTR_UNKNOWN | ATTR_CONTROL | ATTR_USER_DEFINED):
            return text.encode("utf-8", "surrogateescape")
        if a & ATTR_NORMAL:
            if self.model == "llama":
                return text.replace("\u2581", " ").encode("utf-8", "surrogateescape")
            out = bytearray()
            for c in text:
                b = _CHAR_TO_BYTE.get(c)
                if b is None:
                    raw = c.encode("utf-8", "surrogateescape")
                    out += b"[UNK_BYTE_0x" + raw.hex().encode() + text.encode("utf-8", "surrogateescape") + b"]"
                else:
                    out.append(b)
            return bytes(out)
        if a & ATTR_BYTE:                        # "<0xXX>"; like strtol, garbage reads as 0
            hexdigits = text[3:5]
            while hexdigits and not all(c in "0123456789abcdefABCDEF" for c in hexdigits):
                hexdigits = hexdigits[:-1]
            return bytes([int(hexdigits, 16) if hexdigits else 0])
        return b""

    # -- encoding ---------------------------------------------------------------------

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of ``text``, as ``llama_tokenize(text, add_special, parse_special)``.

        add_special adds BOS/EOS where the GGUF asks for them (``add_bos_token``).
        parse_special turns control-token texts such as ``<|im_start|>`` into their ids;
        user-defined tokens are always matched.
        """
        out: list[int] = []
        if add_special and self.add_bos:
            if self.bos_id < 0:
                raise TokenizerError("the GGUF asks for a BOS token (add_bos_token) but has none")
            out.append(self.bos_id)
        prev_special = True
        for frag in self._partition(text, parse_special):
            if isinstance(frag, int):
                out.append(frag)
                prev_special = True
            elif self.model == "llama":
                if self.add_space_prefix and prev_special:
                    frag = " " + frag
                self._spm_tokenize(frag.replace(" ", "\u2581"), out)
                prev_special = False
            else:
                for word in self._pre_split(frag):
                    ids = self._word_cache.get(word)
                    if ids is None:
                        ids = self._bpe_word(word)
                        if len(self._word_cache) < 65536:
                            self._word_cache[word] = ids
                    out.extend(ids)
        if add_special and self.add_eos:
            if self.eos_id < 0:
                raise TokenizerError("the GGUF asks for an EOS token (add_eos_token) but has none")
            out.append(self.eos_id)
        return out

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    template: str | None = None, **variables: Any) -> list[int]:
        """Render a conversation with the GGUF's chat template and tokenize it, control
        tokens parsed. BOS is added once: by the template (``bos_token``) or else by the
        vocabulary's ``add_bos_token``, never both."""
        from tabmesh.chat_template import render_chat
        template = template or self.chat_template
        if not template:
            raise TokenizerError("the GGUF has no tokenizer.chat_template: pass template=... explicitly")
        bos = self.tokens[self.bos_id] if self.bos_id >= 0 else ""
        eos = self.tokens[self.eos_id] if self.eos_id >= 0 else ""
        text = render_chat(template, messages, add_generation_prompt, bos_token=bos, eos_token=eos, **variables)
        ids = self.encode(text, add_special=True, parse_special=True)
        if self.add_bos and len(ids) > 1 and ids[0] == ids[1] == self.bos_id:
            ids = ids[1:]
        return ids

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Cut out special-token texts, longest first (tokenizer_st_partition)."""
        frags: list[str | int] = [text] if text else []
        for sid in self._special:
            a = self.attrs[sid]
            if not parse_special and a & (ATTR_CONTROL | ATTR_UNKNOWN):
                continue
            st = self.tokens[sid]
            new: list[str | int] = []
            for frag in frags:
                if isinstance(frag, int) or st not in frag:
                    new.append(frag)
                    continue
                pos = 0
                while True:
                    m = frag.find(st, pos)
                    if m < 0:
                        break
                    left = frag[pos:m]
                    if a & ATTR_LSTRIP:
                        left = left.rstrip(" \t\n\v\f\r")
                    if left:
                        new.append(left)
                    new.append(sid)
                    pos = m + len(st)
                    if a & ATTR_RSTRIP:
                        while pos < len(frag) and frag[pos] in " \t\n\v\f\r":
                            pos += 1
                if pos < len(frag):
                    new.append(frag[pos:])
            frags = new
        return frags

    def _pre_split(self, text: str) -> list[str]:
        pieces = [text]
        for split in PRE_TOKENIZERS[self.pre][0]:
            pieces = [w for p in pieces for w in split(p)]
        return pieces

    def _bpe_word(self, word: str) -> list[int]:
        """Merge one pre-tokenized word by rank (llm_tokenizer_bpe_session::tokenize)."""
        enc = "".join(_BYTE_TO_CHAR[b] for b in word.encode())
        if self.ignore_merges and enc in self.token_to_id:
            return [self.token_to_id[enc]]
        sym = list(enc)
        nxt = list(range(1, len(sym))) + [-1]
        prv = list(range(-1, len(sym) - 1))
        ranks, heap = self.merges, []

        def push(left: int, right: int) -> None:
            if left >= 0 and right >= 0:
                r = ranks.get((sym[left], sym[right]))
                if r is not None:
                    heapq.heappush(heap, (r, left, right, sym[left] + sym[right]))

        for i in range(len(sym) - 1):
            push(i, i + 1)
        while heap:
            _, left, right, text = heapq.heappop(heap)
            if not sym[left] or not sym[right] or sym[left] + sym[right] != text:
                continue                     # a stale pair: one side has merged since
            sym[left], sym[right] = text, ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prv[nxt[right]] = left
            push(prv[left], left)
            push(left, nxt[left])
        out = []
        for s in sym:
            if not s:
                continue
            tid = self.token_to_id.get(s)
            if tid is not None:
                out.append(tid)
            else:                            # no such token: single-byte pieces, if any
                out.extend(self.token_to_id[chr(b)] for b in s.encode()
                           if b < 0x80 and chr(b) in self.token_to_id)
        return out

    def _spm_tokenize(self, text: str, out: list[int]) -> None:
        """Highest-score pair first, byte fallback (llm_tokenizer_spm_session::tokenize)."""
        sym = list(text)
        nxt = list(range(1, len(sym))) + [-1]
        prv = list(range(-1, len(sym) - 1))
        heap: list[tuple[float, int, int, int]] = []
        rev_merge: dict[str, tuple[int, int]] = {}

        def push(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            t = sym[left] + sym[right]
            tid = self.token_to_id.get(t)
            if tid is None:
                return
            heapq.heappush(heap, (-self.scores[tid], left, right, len(t)))
            rev_merge[t] = (left, right)

        for i in range(len(sym) - 1):
            push(i, i + 1)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            if not sym[left] or not sym[right] or len(sym[left]) + len(sym[right]) != size:
                continue
            sym[left], sym[right] = sym[left] + sym[right], ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prv[nxt[right]] = left
            push(prv[left], left)
            push(left, nxt[left])

        def resegment(s: str) -> None:
            tid = self.token_to_id.get(s)
            if tid is not None:
                out.append(tid)
            elif s in rev_merge:
                left, right = rev_merge[s]
                resegment(sym[left])
                resegment(sym[right])
            else:
                out.extend(self.byte_to_token(b) for b in s.encode())

        i = 0 if sym else -1
        while i != -1:
            resegment(sym[i])
            i = nxt[i]

    def byte_to_token(self, b: int) -> int:
        """The ``<0xXX>`` token of a byte (or the one-character token, for SPM vocabularies)."""
        tid = self.token_to_id.get(f"<0x{b:02X}>")
        if tid is None and b < 0x80:
            tid = self.token_to_id.get(chr(b))
        if tid is None:
            raise TokenizerError(f"the vocabulary has no token for byte 0x{b:02X} and no <0x{b:02X}> fallback")
        return tid

    # -- decoding ---------------------------------------------------------------------

    def token_to_piece(self, token_id: int, special: bool = False) -> bytes:
        """The bytes of one token; control/unknown tokens are empty unless ``special``."""
        if not 0 <= token_id < len(self.tokens):
            raise TokenizerError(f"token id {token_id} is outside the vocabulary (0..{len(self.tokens) - 1})")
        if not special and self.attrs[token_id] & (ATTR_CONTROL | ATTR_UNKNOWN):
            return b""
        return self._pieces[token_id]

    def decode_bytes(self, ids: Iterable[int], special: bool = False) -> bytes:
        """Exactly the bytes that were encoded: pieces joined, minus the space that a
        SentencePiece vocabulary put in front of the text."""
        out = bytearray()
        for tid in ids:
            piece = self.token_to_piece(tid, special)
            if not out and self.add_space_prefix and piece[:1] == b" " and self.attrs[tid] & ATTR_NORMAL:
                piece = piece[1:]
            out += piece
        return bytes(out)

    def decode(self, ids: Iterable[int], special: bool = False) -> str:
        """``decode_bytes`` as text; invalid UTF-8 (a cut-off character) becomes U+FFFD."""
        return self.decode_bytes(ids, special).decode("utf-8", errors="replace")

    def detokenize(self, ids: Sequence[int], remove_special: bool = False,
                   unparse_special: bool = False) -> bytes:
        """``llama_detokenize``: as decode_bytes, plus llama.cpp's leading-space rule and
        its clean-up of spaces before punctuation (" ." -> ".") where the vocabulary asks."""
        ids = list(ids)
        remove_space = self.add_space_prefix
        if remove_special and self.add_bos and ids and ids[0] == self.bos_id:
            remove_space, ids = False, ids[1:]
        if remove_special and self.add_eos and ids and ids[-1] == self.eos_id:
            ids = ids[:-1]
        out = bytearray()
        for tid in ids:
            piece = self.token_to_piece(tid, unparse_special)
            if remove_space and piece[:1] == b" ":
                piece = piece[1:]
            remove_space = False
            out += piece
        return _clean_spaces(bytes(out)) if self.clean_spaces else bytes(out)

    def is_eog(self, token_id: int) -> bool:
        """Whether generation stops at this token (EOS, EOT, <|im_end|>, ...)."""
        return token_id in self.eog_ids


def _clean_spaces(t: bytes) -> bytes:
    """The three passes of llama_detokenize's clean_spaces."""
    if not t:
        return t
    out = bytearray(t[:1])                      # " ?", " !", " .", " ," lose the space
    for i in range(1, len(t)):
        if t[i - 1] == 0x20 and t[i] in b"?!.,":
            out.pop()
        out.append(t[i])
    t, out, i = bytearray(out), bytearray(out[:1]), 1
    while i < len(t):                           # " ' " -> "'"
        x = t[i]
        if x == 0x27 and i + 1 < len(t) and t[i - 1] == 0x20 and t[i + 1] == 0x20:
            out.pop()
            i += 1
            t[i] = 0                            # as llama.cpp: the next char then sees a NUL before it
        out.append(x)
        i += 1
    t, out = bytes(out), bytearray(out[:1])
    for i in range(1, len(t)):                  # " 's", " 'm", " 're", " 've" lose the space
        if t[i - 1] == 0x20 and t[i] == 0x27 and i + 1 < len(t):
            x1 = t[i + 1]
            if x1 in b"sm" or (i + 2 < len(t) and t[i + 1:i + 3] in (b"re", b"ve")):
                out.pop()
        out.append(t[i])
    return bytes(out)


class StreamDecoder:
    """Turns token ids into text as they are generated, holding back an incomplete
    UTF-8 character until its last byte arrives.

        dec = StreamDecoder(tok)
        for tid in generated: print(dec.push(tid), end="")
        print(dec.flush())
    """

    def __init__(self, tokenizer: Tokenizer, special: bool = False) -> None:
        self.tokenizer, self.special = tokenizer, special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._started = False

    def push(self, token_id: int) -> str:
        """Text completed by this token ("" while a character is still partial)."""
        tok = self.tokenizer
        piece = tok.token_to_piece(token_id, self.special)
        if not self._started and piece:
            if tok.add_space_prefix and piece[:1] == b" " and tok.attrs[token_id] & ATTR_NORMAL:
                piece = piece[1:]
            self._started = True
        return self._utf8.decode(piece)

    def flush(self) -> str:
        """Whatever is held back, with an unfinished character as U+FFFD."""
        return self._utf8.decode(b"", final=True)
