"""JSON mode: the byte-level recognizer against json.loads, and the token mask."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from tabmesh.api_errors import JsonConstraintError
from tabmesh.json_constraint import (MAX_DEPTH, MAX_WS_RUN, START, JsonConstraint, JsonVocab, M_DONE, feed,
                                     is_valid_prefix)


def complete(data: bytes) -> bool:
    state = feed(START, data)
    return state is not None and state[0] == M_DONE


@pytest.mark.parametrize("doc", [
    '{}', '{"a":1}', ' {"a" : [1, -2.5e+3, 0, 0.25, 1E9, true, false, null]}\n',
    '{"s": "tab\\t quote\\" slash\\/ \\u00e9 \\uD83D\\uDE00", "k": {"n": {"m": []}}}',
    '{"é": "ünïcödé 🦙"}', '{"a": [[], [{}], [[1]]], "b": -0}',
])
def test_valid_objects_are_complete_and_every_prefix_is_valid(doc):
    data = doc.rstrip().encode()
    assert isinstance(json.loads(doc), dict)
    for i in range(len(data) + 1):
        assert is_valid_prefix(data[:i]), data[:i]
    assert complete(data)
    assert not complete(data[:-1])


@pytest.mark.parametrize("bad", [
    b'[1]', b'"s"', b'1', b'x', b'{a', b'{"a" 1', b'{"a":}', b'{"a":1,}', b'{"a":1]', b'{,}', b'{"a":01',
    b'{"a":1.}', b'{"a":1.e', b'{"a":-}', b'{"a":+1', b'{"a":tru}', b'{"a":nul1', b'{"a":"\n', b'{"a":"\\x',
    b'{"a":"\\u12G', b'{"a":1}}', b'{"a":1} ', b'{"a":[1 2]', b'{"a":1e+}', b"{'a':1}", b'{"a":NaN',
])
def test_invalid_prefixes_are_refused(bad):
    assert not is_valid_prefix(bad)


def test_strings_hold_only_whole_utf8_characters():
    assert complete('{"é": "€🦙"}'.encode())
    assert is_valid_prefix(b'{"a":"\xe2\x82') and not is_valid_prefix(b'{"a":"\xe2\x82"')
    for bad in (b'{"a":"\xff', b'{"a":"\x80', b'{"a":"\xc0\xaf', b'{"a":"\xf5', b'{"a":"\xc3\xc3', b'{\xc3'):
        assert not is_valid_prefix(bad), bad


def test_numbers_end_at_the_next_structural_byte():
    assert complete(b'{"a":10}') and complete(b'{"a":[1.5e3,2]}') and complete(b'{"a":0 }')
    assert is_valid_prefix(b'{"a":1') and is_valid_prefix(b'{"a":1e')


def test_depth_and_whitespace_are_bounded():
    assert is_valid_prefix(b'{"a":' + b'[' * (MAX_DEPTH - 1))
    assert not is_valid_prefix(b'{"a":' + b'[' * MAX_DEPTH)
    assert is_valid_prefix(b' ' * MAX_WS_RUN) and not is_valid_prefix(b' ' * (MAX_WS_RUN + 1))
    assert is_valid_prefix(b'{"a": "' + b' ' * 500)          # inside a string whitespace is text


def test_random_byte_strings_agree_with_json_loads():
    rng = random.Random(0)
    alphabet = [b'{', b'}', b'[', b']', b'"', b':', b',', b' ', b'1', b'0', b'-', b'.', b'e', b'a', b'\\',
                b'n', b'true', b'null', b'"a"', b'\xc3\xa9']
    n_complete = 0
    for _ in range(4000):
        data = b"{" + b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 10)))
        try:
            ok = isinstance(json.loads(data), dict)
        except ValueError:
            ok = False
        assert complete(data) == ok, data
        n_complete += ok
    assert n_complete > 10


PIECES = [b'{', b'}', b'"', b'{"', b'":', b'",', b' ', b'\n', b'a', b'xyz', b'1', b'}}', b'"}', b'', b'\xc3',
          b'\xa9', b'\x00', b' the', b'tru', b'e', b'  {']
EOG = 13  # the empty piece stands for an end-of-generation control token


def vocab() -> JsonVocab:
    return JsonVocab(PIECES, [EOG])


def allowed(c: JsonConstraint, limit: int = 100) -> set[int]:
    out = c.mask(np.zeros(len(PIECES), np.float32), limit)
    return {i for i in range(len(PIECES)) if np.isfinite(out[i])}


def names(ids) -> set[bytes]:
    return {PIECES[i] for i in ids}


def test_mask_allows_exactly_the_tokens_that_keep_a_valid_prefix():
    c = JsonConstraint(vocab())
    assert names(allowed(c)) == {b'{', b'{"', b' ', b'\n', b'  {'}
    c.accept(PIECES.index(b'{"'))
    # inside a key string: all but control bytes, a stray continuation byte and the end token;
    # '",' and '"}' close the key and are then refused, because a colon must follow
    assert names(allowed(c)) == {b'{', b'}', b'"', b'{"', b'":', b' ', b'a', b'xyz', b'1', b'}}',
                                 b'\xc3', b' the', b'tru', b'e', b'  {'}
    c.accept(PIECES.index(b'\xc3'))
    assert names(allowed(c)) == {b'\xa9'}                # the rest of "é", nothing else
    c.accept(PIECES.index(b'\xa9'))
    for p in (b'a', b'":', b' ', b'tru'):
        c.accept(PIECES.index(p))
    assert names(allowed(c)) == {b'e'}
    c.accept(PIECES.index(b'e'))
    assert names(allowed(c)) == {b'}', b' ', b'\n'}
    assert not c.is_complete
    c.accept(PIECES.index(b'}'))
    assert c.is_complete and allowed(c) == {EOG}
    assert json.loads(bytes(c.text)) == {"éa": True}


def test_mask_keeps_logits_of_the_allowed_and_scans_in_logit_order():
    c = JsonConstraint(vocab())
    logits = np.arange(len(PIECES), dtype=np.float32)    # the highest id is the most likely
    out = c.mask(logits, limit=1)
    kept = [i for i in range(len(PIECES)) if np.isfinite(out[i])]
    assert kept == [PIECES.index(b'  {')] and out[kept[0]] == logits[kept[0]]
    assert len([i for i in range(len(PIECES)) if np.isfinite(c.mask(logits, limit=2)[i])]) == 2


def test_inside_strings_plain_tokens_are_allowed_without_the_recognizer():
    v = vocab()
    assert v.plain_string[PIECES.index(b' the')] and not v.plain_string[PIECES.index(b'",')]
    assert not v.plain_string[PIECES.index(b'\xc3')]   # half a character: left to the recognizer
    assert not v.plain_string[PIECES.index(b'\x00')] and not v.plain_string[EOG]


def test_accepting_a_refused_token_or_finding_none_is_a_clear_error():
    c = JsonConstraint(vocab())
    with pytest.raises(JsonConstraintError, match="does not continue"):
        c.accept(PIECES.index(b'}'))
    logits = np.full(len(PIECES), -np.inf, np.float32)
    logits[PIECES.index(b'xyz')] = 0.0
    with pytest.raises(JsonConstraintError, match="no token"):
        c.mask(logits, 1)
    done = JsonConstraint(JsonVocab([b'{', b'}'], []))
    done.accept(0)
    done.accept(1)
    with pytest.raises(JsonConstraintError, match="no end-of-generation"):
        done.mask(np.zeros(2, np.float32), 1)


def test_vocab_from_a_tokenizer_uses_its_pieces_and_end_tokens():
    class Tok:
        n_vocab = 3
        eog_ids = frozenset({2})

        def token_to_piece(self, i):
            return [b'{', b'}', b''][i]

    v = JsonVocab.from_tokenizer(Tok())
    assert v.pieces == [b'{', b'}', b''] and list(v.eog_ids) == [2] and list(v.first_byte) == [123, 125, 256]


def _random_value(rng: random.Random, depth: int):
    kind = rng.randrange(8 if depth < 4 else 5)
    if kind == 0:
        return rng.choice([True, False, None])
    if kind == 1:
        return rng.randint(-10**6, 10**6)
    if kind == 2:
        return rng.uniform(-1e9, 1e9) * rng.choice([1, 1e-12, 1e12])
    if kind in (3, 4):
        return "".join(rng.choice('ab "\\/\n\té€🦙\x01') for _ in range(rng.randint(0, 6)))
    if kind == 5:
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {str(_random_value(rng, 4)): _random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}


@pytest.mark.parametrize("seed", range(3))
def test_random_documents_from_json_dumps_are_recognized(seed):
    rng = random.Random(seed)
    for _ in range(150):
        obj = {"k": _random_value(rng, 0), "l": _random_value(rng, 0)}
        for kw in ({}, {"indent": 2}, {"ensure_ascii": False}, {"separators": (",", ":")}):
            data = json.dumps(obj, **kw).encode()
            assert complete(data), data
