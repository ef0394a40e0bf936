"""Write sentence-transformers' token ids and embeddings for all-MiniLM-L6-v2, the
references of tabmesh.rag.wordpiece and tabmesh.rag.bert_numpy.

Run with a Python that has torch (CPU) and sentence-transformers (not the project venv;
see shared/ENVIRONMENT.md), with the model folder at models/all-MiniLM-L6-v2:

    HF_HUB_OFFLINE=1 /work/stvenv/bin/python scripts/make_embedding_fixtures.py
    HF_HUB_OFFLINE=1 /work/stvenv/bin/python scripts/make_embedding_fixtures.py --bench

It writes tests/fixtures/embeddings_minilm.json: for each of TEXTS below

- ``ids``, ``offsets``: the `tokenizers` package on the folder's tokenizer.json, with its
  own truncation (128) and padding switched off: every word-piece, [CLS] and [SEP]
  included, and each token's (start, end) character offsets into the text
- ``n_st``: how many tokens sentence-transformers fed the model (max_seq_length 256). The
  script checks that its input ids are exactly ``ids[:n_st - 1] + [SEP]`` (or ``ids``
  when the text fits), so a test can rebuild them
- ``embedding_f16``: ``SentenceTransformer.encode([text])`` (one text at a time, so no
  padding), float16, little-endian, base64. f16 keeps ~3.3 significant digits; the cosine
  of an f16-rounded unit vector with the original is 1 - ~1e-8, far below the tolerances.

The model is loaded as the folder says (modules.json: Transformer, Pooling(mean),
Normalize). The folder has no 2_Normalize/ directory; Normalize has no parameters, so
sentence-transformers builds it without one. The script checks that every output has
unit norm.

--check-unicode (prints, writes nothing): every code point through `tokenizers` and
through tabmesh's WordPiece; prints how many differ and the override table
(wordpiece._OVERRIDE_TABLE) this Python needs.

--bench (prints, writes nothing): sentences/s and passages/s (~250 words) of
sentence-transformers and of tabmesh's numpy encoder, both on 2 threads of this CPU
(OMP/OPENBLAS_NUM_THREADS default to 2; set both to 1 for one thread), interleaved, best
of 6 rounds; and the two encoders' agreement in float32 on the fixture texts.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "2")

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_DIR = os.path.join(ROOT, "models", "all-MiniLM-L6-v2")
OUT = os.path.join(ROOT, "tests", "fixtures", "embeddings_minilm.json")
sys.path.insert(0, os.path.join(ROOT, "pysrc"))

MAX_SEQ_LENGTH = 256
SEP_ID = 102

_LOREM_EN = (
    "The committee met on Tuesday to review the proposal for a new library in the old "
    "market hall. Several residents argued that the building, which dates from 1887, "
    "should keep its iron roof and tall windows; others asked whether the heating costs "
    "would be affordable. The architect explained that modern insulation can be added "
    "from the inside without changing the facade. After two hours of discussion the "
    "members agreed to commission a detailed survey, publish the results online, and hold "
    "a second public meeting in the spring. ")
_LOREM_DE = (
    "Die Gemeindeversammlung beschäftigte sich am Dienstag ausführlich mit dem Vorschlag, "
    "in der alten Markthalle eine Bücherei einzurichten. Mehrere Anwohner äußerten die "
    "Befürchtung, dass die Heizkosten zu hoch würden; andere betonten, wie wichtig ein "
    "ruhiger Ort zum Lesen für Schülerinnen und Schüler sei. Straßenbau, Grünflächen und "
    "Fahrradwege kamen ebenfalls zur Sprache. ")
_ZH = ("自然语言处理是计算机科学和人工智能的一个重要方向。它研究如何让计算机理解、生成和翻译人类的语言，"
       "包括分词、句法分析、语义理解、机器翻译、问答系统和文本摘要等任务。")


def _words(seed: int, n: int) -> str:
    rng = random.Random(seed)
    pool = (_LOREM_EN + _LOREM_DE).replace(".", "").replace(",", "").replace(";", "").split()
    return " ".join(rng.choice(pool) for _ in range(n))


TEXTS = [
    # English, plain
    "This is a test sentence.",
    "The quick brown fox jumps over the lazy dog.",
    "How do I reset my password if I no longer have access to my email?",
    "Don't panic: it's only a U.S.-based e-mail, isn't it?",
    "UNAFFABLE, unaffable, Unaffable — and an unbelievably long-winded explanation.",
    "In 2024, revenue grew 17.5% to $3.2bn (vs. $2.7bn); EBITDA margin: 21%.",
    "Email me at jane.doe+rag@example.com or visit https://example.org/a/b?c=1&d=2#frag",
    # other languages
    "Größere Straßen führen über die Brücke nach Österreich.",
    "Où est la bibliothèque ? Je voudrais emprunter « Les Misérables » de Victor Hugo.",
    "¿Dónde está el baño? ¡Muchas gracias, señor Núñez!",
    "Tiếng Việt có rất nhiều dấu thanh: à, á, ả, ã, ạ.",
    "ΟΔΟΣ Σοφίας: η Ελληνική γλώσσα έχει τελικό σίγμα ς.",
    "İstanbul'da ılık bir akşam; ĞÜŞİÖÇ ğüşiöç.",
    "Москва — столица России. Ёжик в тумане!",
    "Українська мова: їжачок, ґанок, Є.",
    "مرحبا بالعالم، هذه جملة باللغة العربية.",
    "שלום עולם, זה משפט בעברית.",
    "自然语言处理很有趣。",
    "東京は日本の首都です。ひらがなとカタカナも使います。",
    "한국어 문장입니다. 안녕하세요!",
    "हिन्दी में एक वाक्य।",
    "ภาษาไทยไม่มีการเว้นวรรคระหว่างคำ",
    # code and markup
    "def add(a, b):\n    return a + b  # sum\n",
    "for (int i = 0; i < n; ++i) { sum += x[i] * y[i]; }",
    '{"name": "tabmesh", "version": "0.1.0", "deps": ["numpy"]}',
    "<div class=\"card\"><a href='/x'>Link</a></div>",
    "SELECT id, name FROM users WHERE age >= 21 ORDER BY name;",
    r"^\s*(?P<key>[A-Za-z_]\w*)\s*=\s*(?P<val>.+)$",
    # very short
    "",
    "a",
    "A",
    ".",
    "x y",
    "hello",
    "Ünïcödé",
    # emoji, symbols
    "I love it 😀👍🏽!",
    "👨‍👩‍👧‍👦 family, 🏳️‍🌈 flag",
    "new emoji 🥹🫠🪿🫎",
    "∑ᵢ xᵢ² ≤ √n · ∫ f(x) dx ≈ π ± ε",
    "ﬁnancial ﬂows, ＡＢＣ１２３, ｶﾀｶﾅ, ½ ™ ©",
    # whitespace and control characters
    "   leading and trailing spaces   ",
    "tabs\tand\nnewlines\r\nand\u00a0nbsp\u3000ideographic\u2003em space",
    "many          spaces\n\n\n\nand blank lines",
    "zero\u200bwidth\u200cjoiners\u200dand\ufeffbom\u00adsoft hyphen",
    "ctrl\x00chars\x07here\x1fand\x7fthere\ufffd!",
    "vertical\x0btab\x0cform feed\x1cfile sep\x85next line\u2028line\u2029para",
    "\t\n  \u3000 ",
    # special tokens written in the text
    "Fill the [MASK] please.",
    "[CLS] already there [SEP] and [cls] lowercase [UNK]",
    "[MASKED] [PAD][PAD]",
    # word-length limits and odd pieces
    "a" * 100,
    "b" * 101 + " short",
    "pneumonoultramicroscopicsilicovolcanoconiosis antidisestablishmentarianism",
    "\U0002b820\U0002b8ff\U00030000 rare CJK extension characters",
    # where tokenizers' Unicode tables differ from Python's (see wordpiece._OVERRIDE_TABLE):
    # a newer format char, a mark and punctuation kept as word characters, an old Po, an
    # old Mn, an unassigned code point, CJK compatibility ideographs, newer case pairs,
    # per-character lowercase (no final sigma), dotted capital I
    "a\u0890b a\u08cab a\u2e43b a\u166db x\u1734y a\u0378b \uf900\uf901 \u1c89\ua7cb "
    "\U00010d50 ΣΊΣΥΦΟΣ İIıi",
    # long: past 256 word-pieces
    _LOREM_EN * 3,
    _LOREM_DE * 3,
    _ZH * 4,
    _words(1, 400),
    "word " * 300,
    ("Paragraph one is short.\n\n" + _LOREM_EN + "\n\n") * 2,
]


def _unit(v: np.ndarray) -> bool:
    return bool(abs(float(np.linalg.norm(v)) - 1.0) < 1e-4)


def make_fixtures() -> None:
    import sentence_transformers
    import tokenizers
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(2)
    model = SentenceTransformer(MODEL_DIR, device="cpu")
    print(model)
    assert model.max_seq_length == MAX_SEQ_LENGTH, model.max_seq_length

    tok = tokenizers.Tokenizer.from_file(os.path.join(MODEL_DIR, "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()

    items = []
    for text in TEXTS:
        enc = tok.encode(text)
        ids = list(enc.ids)
        st_ids = model.preprocess([text])["input_ids"][0].tolist()
        expect = ids if len(ids) <= MAX_SEQ_LENGTH else ids[:MAX_SEQ_LENGTH - 1] + [SEP_ID]
        assert st_ids == expect, \
            f"sentence-transformers ids differ from tokenizers' for {text[:40]!r}"
        emb = model.encode([text], batch_size=1, convert_to_numpy=True)[0].astype(np.float32)
        assert _unit(emb), f"not unit norm: {text[:40]!r}"
        items.append({
            "text": text,
            "ids": ids,
            "offsets": [list(o) for o in enc.offsets],
            "n_st": len(st_ids),
            "embedding_f16": base64.b64encode(emb.astype("<f2").tobytes()).decode("ascii"),
        })

    # padding in sentence-transformers' own batches: how far it moves the reference
    batched = model.encode(TEXTS, batch_size=16, convert_to_numpy=True)
    single = np.stack([np.frombuffer(base64.b64decode(it["embedding_f16"]), "<f2") for it in items])
    print(f"sentence-transformers batched vs one-by-one (f16): max abs diff "
          f"{np.abs(batched - single.astype(np.float32)).max():.2e}")

    doc = {
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "max_seq_length": MAX_SEQ_LENGTH,
        "versions": {"sentence_transformers": sentence_transformers.__version__,
                     "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__, "torch": torch.__version__},
        "texts": items,
    }
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    n_long = sum(it["n_st"] < len(it["ids"]) for it in items)
    print(f"wrote {OUT}: {len(items)} texts ({n_long} truncated at {MAX_SEQ_LENGTH}), "
          f"{os.path.getsize(OUT)} bytes")


def bench_texts() -> tuple[list[str], list[str]]:
    """64 short sentences (8-12 words) and 16 passages of 250 words, deterministic."""
    sentences = [_words(100 + i, 8 + i % 5) + "." for i in range(64)]
    passages = [_words(200 + i, 250) for i in range(16)]
    return sentences, passages


def bench(rounds: int = 6) -> None:
    """Rounds that alternate the two encoders; the best time of each is kept, which is
    what a shared, busy machine can measure at all."""
    import torch
    from sentence_transformers import SentenceTransformer

    from tabmesh.rag.bert_numpy import SentenceEmbedder

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    sentences, passages = bench_texts()
    st = SentenceTransformer(MODEL_DIR, device="cpu")
    ours = SentenceEmbedder.from_dir(MODEL_DIR)
    n_tok = [len(ours.tokenizer.encode(p).ids) for p in passages]
    print(f"{len(sentences)} sentences; {len(passages)} passages x 250 words = "
          f"{min(n_tok)}..{max(n_tok)} tokens (truncated at 256); batches of 32")
    print(f"torch {torch.__version__} on {torch.get_num_threads()} threads; "
          f"numpy {np.__version__}, "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    jobs = {
        ("sentence-transformers", "sentences"): lambda: st.encode(sentences, batch_size=32),
        ("sentence-transformers", "passages"): lambda: st.encode(passages, batch_size=32),
        ("tabmesh numpy", "sentences"): lambda: ours.embed(sentences, batch_size=32),
        ("tabmesh numpy", "passages"): lambda: ours.embed(passages, batch_size=32),
        ("tabmesh WordPiece", "passages"): lambda: [ours.tokenizer.encode(p) for p in passages],
    }
    best = {key: float("inf") for key in jobs}
    for fn in jobs.values():
        fn()  # warm up
    for _ in range(rounds):
        for key, fn in jobs.items():
            t = time.perf_counter()
            fn()
            best[key] = min(best[key], time.perf_counter() - t)
    n = {"sentences": len(sentences), "passages": len(passages)}
    for (name, what), dt in best.items():
        print(f"{name:>22}: {n[what] / dt:8.1f} {what}/s")

    # agreement in float32 (the fixture stores float16), fixture texts one at a time
    ref = np.stack([st.encode([t], convert_to_numpy=True)[0] for t in TEXTS]).astype(np.float32)
    got = ours.embed(TEXTS)
    cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    print(f"agreement on {len(TEXTS)} fixture texts, float32: min cosine {cos.min():.9f} "
          f"(1 - cos <= {1 - cos.min():.1e}), max abs {np.abs(ref - got).max():.1e}")


def _ours_vs_tokenizers(tok, ours) -> dict[int, list[str]]:
    """Code point -> tokenizers' words for "a<c>b", wherever ours differ."""
    norm, pre = tok.normalizer, tok.pre_tokenizer
    out = {}
    for cp in range(0x110000):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        s = "a" + chr(cp) + "b"
        ref = [w for w, _ in pre.pre_tokenize_str(norm.normalize_str(s))]
        words: list = []
        ours._words(s, 0, words)
        if [w for w, _ in words] != ref:
            out[cp] = ref
    return out


def check_unicode() -> None:
    """Every code point through tokenizers' normalizer + pre-tokenizer and through ours
    (with and without wordpiece's override table); prints the table this Python needs.
    Run it under each Python the tab may use (Pyodide 0.27: 3.12, Unicode 15.0) and merge."""
    import unicodedata

    import tokenizers

    from tabmesh.rag import wordpiece

    tok = tokenizers.Tokenizer.from_file(os.path.join(MODEL_DIR, "tokenizer.json"))
    text = open(os.path.join(MODEL_DIR, "tokenizer.json"), encoding="utf-8").read()
    with_table = _ours_vs_tokenizers(tok, wordpiece.WordPieceTokenizer.from_tokenizer_json(text))
    saved = wordpiece._OV_LO, wordpiece._OV_HI, wordpiece._OV_RULE
    wordpiece._OV_LO, wordpiece._OV_HI, wordpiece._OV_RULE = [], [], []
    try:
        bare = _ours_vs_tokenizers(tok, wordpiece.WordPieceTokenizer.from_tokenizer_json(text))
    finally:
        wordpiece._OV_LO, wordpiece._OV_HI, wordpiece._OV_RULE = saved
    print(f"Python {sys.version.split()[0]} (Unicode {unicodedata.unidata_version}), tokenizers "
          f"{tokenizers.__version__}: {len(with_table)} code points differ with the table, "
          f"{len(bare)} without it")
    items: list[list] = []
    for cp, ref in sorted(bare.items()):
        c, s = chr(cp), "a" + chr(cp) + "b"
        if ref == [s]:
            rule = "w"
        elif ref == ["ab"]:
            rule = "m" if unicodedata.category(c).startswith("M") else "x"
        elif ref == ["a", c, "b"]:
            rule = "p"
        elif len(ref) == 1 and len(ref[0]) == 3 and ref[0][::2] == "ab":
            rule = "+%x" % (ord(ref[0][1]) - cp) if ord(ref[0][1]) > cp else ">%x" % ord(ref[0][1])
        else:
            print(f"  U+{cp:04X}: no rule for {ref!r}")
            continue
        if items and items[-1][2] == rule and items[-1][1] == cp - 1:
            items[-1][1] = cp
        else:
            items.append([cp, cp, rule])
    entries = [(f"{a:x}" if a == b else f"{a:x}-{b:x}") +
               (">%x" % (a + int(r[1:], 16)) if r[0] == "+" and a == b else r) for a, b, r in items]
    line = ""
    for e in entries:
        if len(line) + len(e) >= 88:
            print(line)
            line = ""
        line = f"{line} {e}".strip()
    print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bench", action="store_true", help="measure throughput, write nothing")
    ap.add_argument("--check-unicode", action="store_true",
                    help="compare every code point with tokenizers; print the override table")
    args = ap.parse_args()
    if args.check_unicode:
        check_unicode()
    elif args.bench:
        bench()
    else:
        make_fixtures()


if __name__ == "__main__":
    main()
