"""JSON mode (``response_format: {"type": "json_object"}``): only tokens that keep the
output a valid JSON prefix may be sampled, and the output ends when the object closes.

Two parts:

- a recognizer: a pushdown automaton over *bytes* (RFC 8259, root must be an object).
  JSON's syntax is ASCII; bytes >= 0x80 are allowed only inside strings, as well-formed
  UTF-8 sequences, so a byte-level BPE token holding half of a character is judged
  correctly without decoding it, and the output always decodes.
  A state is an immutable tuple ``(mode, stack, aux, ws)``:
      mode   one of the M_* constants below
      stack  the open containers, e.g. "{[{" (at most MAX_DEPTH)
      aux    mode data: key flag for strings, hex digits left in \\uXXXX, literal rest
      ws     whitespace bytes in a row outside strings (at most MAX_WS_RUN, so a model
             that loves newlines cannot stall between tokens forever)
- a mask builder: ``JsonVocab`` holds every token's bytes and a few per-token facts
  (first byte, first non-whitespace byte, "plain string text"), computed once per
  tokenizer; ``JsonConstraint`` (one per generation) masks the logits. Cost per step:
  two 257-entry tables of allowed (first, first non-whitespace) bytes, cached per state
  shape, rule out most of the vocabulary with numpy gathers; inside a string every plain
  token is allowed at once; the remaining candidates are checked with the recognizer in
  logit order until ``limit`` are found (1 for greedy), at most ``MAX_SCAN`` once one
  allowed token is known. About 1-10 ms per token on a 49k vocabulary.

End of generation tokens are allowed only once the root object is complete; the engine
stops right there, so in practice the output is exactly one object.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from tabmesh.api_errors import JsonConstraintError

MAX_DEPTH = 64        # nesting deeper than this is refused (bounds the stack)
MAX_WS_RUN = 48       # consecutive whitespace bytes outside strings
MAX_SCAN = 1024       # candidates checked per step once one allowed token has been found

(M_TOP, M_OBJ_OPEN, M_OBJ_KEY, M_COLON, M_VALUE, M_ARR_OPEN, M_AFTER, M_DONE,
 M_STR, M_STR_ESC, M_STR_U, M_STR_UTF8,
 M_NUM_MINUS, M_NUM_ZERO, M_NUM_INT, M_NUM_DOT, M_NUM_FRAC, M_NUM_E, M_NUM_ESIGN, M_NUM_EXP,
 M_LIT) = range(21)

State = tuple  # (mode, stack: str, aux, ws: int)
START: State = (M_TOP, "", 0, 0)

_WS = frozenset(b" \t\n\r")
_DIGITS = frozenset(b"0123456789")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ESCAPES = frozenset(b'"\\/bfnrt')
# UTF-8 lead byte -> continuation bytes (no overlong 2-byte leads, nothing past U+10FFFF;
# the rarer overlong/surrogate 3-byte forms pass and decode as U+FFFD, still valid JSON)
_UTF8_LEAD = {**{b: 1 for b in range(0xC2, 0xE0)}, **{b: 2 for b in range(0xE0, 0xF0)},
              **{b: 3 for b in range(0xF0, 0xF5)}}
_LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}
_WS_MODES = frozenset((M_TOP, M_OBJ_OPEN, M_OBJ_KEY, M_COLON, M_VALUE, M_ARR_OPEN, M_AFTER))
_NUM_DONE = frozenset((M_NUM_ZERO, M_NUM_INT, M_NUM_FRAC, M_NUM_EXP))  # a number may end here


def _value_done(stack: str) -> State:
    return (M_AFTER, stack, 0, 0) if stack else (M_DONE, "", 0, 0)


def _value_start(stack: str, b: int) -> State | None:
    if b == 0x22:                                   # "
        return (M_STR, stack, 0, 0)
    if b in (0x7B, 0x5B):                           # { [
        if len(stack) >= MAX_DEPTH:
            return None
        return (M_OBJ_OPEN if b == 0x7B else M_ARR_OPEN, stack + chr(b), 0, 0)
    if b == 0x2D:                                   # -
        return (M_NUM_MINUS, stack, 0, 0)
    if b == 0x30:                                   # 0
        return (M_NUM_ZERO, stack, 0, 0)
    if b in _DIGITS:
        return (M_NUM_INT, stack, 0, 0)
    rest = _LITERALS.get(b)
    return None if rest is None else (M_LIT, stack, rest, 0)


def step(state: State, b: int) -> State | None:
    """The state after byte ``b``, or None if no JSON object starts with the bytes so far + b."""
    mode, stack, aux, ws = state
    if mode in _WS_MODES and b in _WS:
        return (mode, stack, aux, ws + 1) if ws < MAX_WS_RUN else None
    if mode == M_STR:
        if b == 0x22:
            return (M_COLON, stack, 0, 0) if aux else _value_done(stack)
        if b == 0x5C:
            return (M_STR_ESC, stack, aux, 0)
        if b < 0x80:
            return None if b < 0x20 else state
        need = _UTF8_LEAD.get(b)                    # a multi-byte character starts
        return None if need is None else (M_STR_UTF8, stack, aux * 8 + need, 0)
    if mode == M_STR_UTF8:                          # aux: key*8 + continuation bytes still due
        if not 0x80 <= b <= 0xBF:
            return None
        key, left = divmod(aux, 8)
        return (M_STR, stack, key, 0) if left == 1 else (M_STR_UTF8, stack, key * 8 + left - 1, 0)
    if mode == M_AFTER:
        if b == 0x2C:                               # ,
            return (M_OBJ_KEY, stack, 0, 0) if stack[-1] == "{" else (M_VALUE, stack, 0, 0)
        if (b == 0x7D and stack[-1] == "{") or (b == 0x5D and stack[-1] == "["):
            return _value_done(stack[:-1])
        return None
    if mode in (M_VALUE, M_ARR_OPEN):
        if b == 0x5D and mode == M_ARR_OPEN:
            return _value_done(stack[:-1])
        return _value_start(stack, b)
    if mode in (M_OBJ_OPEN, M_OBJ_KEY):
        if b == 0x22:
            return (M_STR, stack, 1, 0)
        if b == 0x7D and mode == M_OBJ_OPEN:
            return _value_done(stack[:-1])
        return None
    if mode == M_COLON:
        return (M_VALUE, stack, 0, 0) if b == 0x3A else None
    if mode == M_TOP:
        return (M_OBJ_OPEN, "{", 0, 0) if b == 0x7B else None
    if mode == M_STR_ESC:
        if b in _ESCAPES:
            return (M_STR, stack, aux, 0)
        return (M_STR_U, stack, aux * 8 + 4, 0) if b == 0x75 else None   # aux: key*8 + digits left
    if mode == M_STR_U:
        if b not in _HEX:
            return None
        key, left = divmod(aux, 8)
        return (M_STR, stack, key, 0) if left == 1 else (M_STR_U, stack, key * 8 + left - 1, 0)
    if mode == M_LIT:
        if b != aux[0]:
            return None
        return _value_done(stack) if len(aux) == 1 else (M_LIT, stack, aux[1:], 0)
    if mode == M_DONE:
        return None
    # numbers: -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?
    nxt = _NUMBER_STEPS[mode].get(b)
    if nxt is not None:
        return (nxt, stack, 0, 0)
    if mode in _NUM_DONE:                           # the byte ends the number and is read after it
        return step(_value_done(stack), b)
    return None


def _num_table() -> dict[int, dict[int, int]]:
    digits = {d: None for d in _DIGITS}
    exp = {ord("e"): M_NUM_E, ord("E"): M_NUM_E}
    return {
        M_NUM_MINUS: {ord("0"): M_NUM_ZERO, **{d: M_NUM_INT for d in digits if d != 0x30}},
        M_NUM_ZERO: {ord("."): M_NUM_DOT, **exp},
        M_NUM_INT: {**{d: M_NUM_INT for d in digits}, ord("."): M_NUM_DOT, **exp},
        M_NUM_DOT: {d: M_NUM_FRAC for d in digits},
        M_NUM_FRAC: {**{d: M_NUM_FRAC for d in digits}, **exp},
        M_NUM_E: {ord("+"): M_NUM_ESIGN, ord("-"): M_NUM_ESIGN, **{d: M_NUM_EXP for d in digits}},
        M_NUM_ESIGN: {d: M_NUM_EXP for d in digits},
        M_NUM_EXP: {d: M_NUM_EXP for d in digits},
    }


_NUMBER_STEPS = _num_table()


def feed(state: State | None, data: bytes) -> State | None:
    """``step`` over several bytes; None as soon as one is refused."""
    for b in data:
        if state is None:
            return None
        state = step(state, b)
    return state


def is_valid_prefix(data: bytes) -> bool:
    """Whether some JSON object starts with ``data`` (within MAX_DEPTH / MAX_WS_RUN)."""
    return feed(START, data) is not None


def _plain(piece: bytes) -> bool:
    if not piece or b'"' in piece or b"\\" in piece or min(piece) < 0x20:
        return False
    try:
        piece.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class JsonVocab:
    """Every token's bytes and first byte, computed once per tokenizer.

    ``pieces[i]`` is what token i appends to the output text (control tokens: b"");
    ``eog_ids`` are the tokens that end generation."""

    def __init__(self, pieces: Sequence[bytes], eog_ids: Iterable[int]) -> None:
        self.pieces = [bytes(p) for p in pieces]   # (n_vocab,)
        self.n_vocab = len(self.pieces)
        n = self.n_vocab
        # (n_vocab,) first byte, 256 for an empty piece (never allowed as text)
        self.first_byte = np.fromiter((p[0] if p else 256 for p in self.pieces), np.int16, n)
        # (n_vocab,) first byte that is not JSON whitespace, 256 if none
        self.first_nonws = np.fromiter((next((b for b in p if b not in _WS), 256) for p in self.pieces),
                                       np.int16, n)
        # (n_vocab,) True if the token can sit anywhere inside a string: whole UTF-8
        # characters, no quote, no backslash, no control byte (most of a vocabulary; these
        # are judged without the recognizer)
        self.plain_string = np.fromiter((_plain(p) for p in self.pieces), bool, n)
        self.eog_ids = np.array(sorted(i for i in set(eog_ids) if 0 <= i < self.n_vocab), np.int64)

    @classmethod
    def from_tokenizer(cls, tok) -> "JsonVocab":
        """From a tabmesh Tokenizer (``token_to_piece``, ``n_vocab``, ``eog_ids``)."""
        n = tok.n_vocab
        return cls([tok.token_to_piece(i) for i in range(n)], getattr(tok, "eog_ids", ()))


class JsonConstraint:
    """One generation's position in the JSON grammar; a ``sampler.LogitConstraint``."""

    def __init__(self, vocab: JsonVocab) -> None:
        self.vocab = vocab
        self.state: State = START
        self.text = bytearray()  # everything accepted so far
        self._first_cache: dict[tuple, np.ndarray] = {}

    @property
    def is_complete(self) -> bool:
        """The root object has closed: only an end-of-generation token may follow."""
        return self.state[0] == M_DONE

    def allows(self, token: int) -> bool:
        if self.is_complete:
            return token in self.vocab.eog_ids
        if not 0 <= token < self.vocab.n_vocab or not self.vocab.pieces[token]:
            return False
        return feed(self.state, self.vocab.pieces[token]) is not None

    def accept(self, token: int) -> None:
        if self.is_complete:
            return  # the end-of-generation token
        piece = self.vocab.pieces[token] if 0 <= token < self.vocab.n_vocab else b""
        new = feed(self.state, piece) if piece else None
        if new is None:
            raise JsonConstraintError(
                f"token {token} ({piece!r}) does not continue the JSON output "
                f"{bytes(self.text[-40:])!r}; the sampler should have masked it (a bug: please report it)")
        self.state = new
        self.text += piece

    def _byte_tables(self) -> tuple[np.ndarray, np.ndarray]:
        """Two (257,) bool tables for the current state (index 256: no such byte):
        which first bytes can start an allowed token, and, where whitespace may come
        first, which first non-whitespace bytes can follow it. Cached per state shape."""
        mode, stack, aux, ws = self.state
        key = (mode, aux, ws >= MAX_WS_RUN, stack[-1:], min(len(stack), 2), len(stack) >= MAX_DEPTH)
        tables = self._first_cache.get(key)
        if tables is None:
            first = np.zeros(257, bool)
            first[:256] = [step(self.state, b) is not None for b in range(256)]
            nonws = np.ones(257, bool)
            if mode in _WS_MODES:
                fresh = (mode, stack, aux, 0)
                nonws[:256] = [b in _WS or step(fresh, b) is not None for b in range(256)]
            tables = self._first_cache[key] = (first, nonws)
        return tables

    def mask(self, logits: np.ndarray, limit: int) -> np.ndarray:
        """``logits`` (n_vocab,) with all but the allowed tokens at -inf. Inside a string
        every plain token is kept; of the rest, the ``limit`` most likely allowed ones
        (fewer once MAX_SCAN candidates have been checked)."""
        logits = np.asarray(logits)
        out = np.full(logits.shape, -np.inf, dtype=np.float64)
        if self.is_complete:
            ids = self.vocab.eog_ids[self.vocab.eog_ids < logits.size]
            if ids.size == 0:
                raise JsonConstraintError(
                    "the JSON object is complete but the vocabulary has no end-of-generation "
                    "token to end it with; the engine should stop at is_complete")
            out[ids] = logits[ids]
            return out
        v = self.vocab
        n = min(v.n_vocab, logits.size)
        first_ok, nonws_ok = self._byte_tables()
        maybe = first_ok[v.first_byte[:n]] & nonws_ok[v.first_nonws[:n]] & np.isfinite(logits[:n])
        n_fast = 0
        if self.state[0] == M_STR:      # plain tokens leave a string state as it is
            fast = maybe & v.plain_string[:n]
            out[:n][fast] = logits[:n][fast]
            n_fast = int(fast.sum())
            maybe &= ~fast
        cand = np.flatnonzero(maybe)
        allowed: list[int] = []
        scanned = 0
        vals = logits[cand]
        remaining = np.arange(cand.size)
        chunk = max(4 * limit, 256)
        while remaining.size and len(allowed) < limit and not ((allowed or n_fast) and scanned >= MAX_SCAN):
            if remaining.size > chunk:   # the next `chunk` most likely, without sorting the rest
                part = np.argpartition(-vals[remaining], chunk - 1)
                head, remaining = remaining[part[:chunk]], remaining[part[chunk:]]
            else:
                head, remaining = remaining, remaining[:0]
            head = head[np.lexsort((cand[head], -vals[head]))]
            for i in head:
                scanned += 1
                tok = int(cand[i])
                if feed(self.state, v.pieces[tok]) is not None:
                    allowed.append(tok)
                    if len(allowed) >= limit:
                        break
                if (allowed or n_fast) and scanned >= MAX_SCAN:
                    break
            chunk *= 4
        if not allowed and not n_fast:
            raise JsonConstraintError(
                f"no token of the vocabulary continues the JSON output {bytes(self.text[-40:])!r} "
                "(every candidate has a -inf logit or breaks the syntax); drop logit_bias entries "
                "that ban punctuation, or use response_format 'text'")
        out[allowed] = logits[allowed]
        return out
