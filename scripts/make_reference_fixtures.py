"""Write the tokenizer and chat-template reference fixtures from llama-cpp-python.

Run with a Python that has llama-cpp-python 0.3.x, jinja2 and gguf (not the project venv;
see shared/ENVIRONMENT.md for the build flags):

    /work/refvenv/bin/python scripts/make_reference_fixtures.py [--check-full]

It writes, under tests/fixtures/:

- tokenizer_smollm2.json: the corpus, and for each string the ids of
  ``Llama(SmolLM2 GGUF, vocab_only=True).tokenize(text, add_bos=False, special=...)`` for
  special True and False, ``llama_detokenize`` of them, and the piece of every id seen.
- tokenizer_tiny_vocabs.json: small vocabularies cut from the real ones that ship with
  llama.cpp (models/ggml-vocab-*.gguf in the llama-cpp-python sdist, unpacked at /tmp/llx by
  default: see --llama-cpp-src): one SentencePiece
  (llama-spm) and one byte-level BPE (llama-bpe) written under several ``tokenizer.ggml.pre``
  names. Each is written as a 1-layer, 32-wide random Llama GGUF, loaded by llama.cpp, and
  its ids are recorded; the tests rebuild the GGUF metadata from the stored vocabulary.
- chat_templates.json: real chat templates (SmolLM2's from its GGUF, the rest from
  llama.cpp's models/templates and the Hugging Face configs) and their renderings of
  several conversations by llama-cpp-python's Jinja2ChatFormatter environment (jinja2).

``--check-full`` also compares tabmesh's tokenizer with llama.cpp on the full vendored
vocabularies (not stored: they are megabytes) and prints the agreement.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
LLAMA_SRC = ""   # set from --llama-cpp-src
sys.path.insert(0, os.path.join(ROOT, "pysrc"))

# -- the corpus ---------------------------------------------------------------------------

CORPUS_OWN = [
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure it's fine: they're here, we've done it, you'll see, he'd go, don't stop.",
    "IT'S LOUD AND I'M SHOUTING, WE'RE HERE, YOU'LL SEE, THEY'D KNOW",
    "O'Neil's rock 'n' roll '''quoted''' 's 't 're 've 'm 'll 'd",
    "Café déjà vu, naïve coöperation, Ångström, façade, São Paulo, Zürich.",
    "Crème brûlée à la française — très élégant!",
    "e\u0301 a\u0300 n\u0303 o\u0308 (combining marks, NFD)",
    "中文测试：你好，世界！今天天气很好。",
    "日本語のテキスト、カタカナとひらがな。",
    "한국어 문장입니다. 안녕하세요!",
    "مرحبا بالعالم، هذا اختبار للترميز.",
    "שלום עולם",
    "नमस्ते दुनिया, यह एक परीक्षण है।",
    "ภาษาไทยไม่มีช่องว่างระหว่างคำ",
    "Привет, мир! Ёлка и ещё.",
    "Καλημέρα κόσμε",
    "👨\u200d👩\u200d👧\u200d👦 family, 👩🏽\u200d💻 coder, 🏳️\u200d🌈 flag, ❤️\u200d🔥",
    "🇺🇸🇬🇧🇯🇵🇫🇷 flags, 1️⃣ #️⃣ keycaps, ✨🎉🥳👍🏿",
    "def greet(name: str) -> str:\n    \"\"\"Say hello.\"\"\"\n    if not name:\n"
    "        return 'hi'\n    return f\"Hello, {name}!\"\n",
    "function add(a, b) {\n\tif (a === undefined) {\n\t\treturn b;\n\t}\n\treturn a + b; // sum\n}\n",
    "{\"key\": [1, 2.5, null, true], \"nested\": {\"a\": \"b\"}}",
    "<div class=\"x\"><a href='/p?q=1&r=2'>link</a></div>",
    "for i in $(seq 1 10); do echo \"$i\" >> out.txt; done",
    "int main(void) { return 0; }  /* C */\n#include <stdio.h>",
    "a  b   c    d     e",
    "\t\tindented\twith\ttabs\t",
    "line1\r\nline2\r\n\r\nline3\rline4",
    "\n\n\n\nmany newlines\n\n\n",
    "trailing spaces   ",
    "   leading spaces",
    " \u00a0nbsp\u00a0 and\u3000ideographic space\u2003em",
    "\u2028line sep\u2029para sep\u0085nel",
    "\v\f vertical tab and form feed",
    "3.14159265358979323846264338327950288",
    "1234567890123456789012345678901234567890",
    "Phone: +1 (555) 123-4567, year 2024, 10,000,000.00",
    "١٢٣٤٥ Arabic-Indic, ½ ⅓ fractions, x² superscript, Ⅻ roman, ① circled",
    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after<|endoftext|>",
    "not a special <|im_start token <|im_end| >",
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nHi<|eot_id|>",
    "<s>[INST] hi [/INST]</s><unk>",
    "bell\x07 null\x00 escape\x1b[31m red",
    "\x1c\x1d\x1e\x1f separators",
    "URL https://example.com/path?q=1&r=two#frag mail a.b@c.de",
    "Markdown **bold** _it_ `code`\n# Heading\n- item\n1. one",
    "math: ∑_{i=1}^{n} x_i² ≤ ∞, α+β=γ, ∀x∃y",
    "$100 + €50 = £? ¥ ₹ ¢",
    "\ue000\uf8ff private use, \U0001FAE8 shaking face",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝐛𝐨𝐥𝐝 ｆｕｌｌｗｉｄｔｈ",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    ".......... ---------- ========== __________ ~~~~~",
    "Tokenizers split text into pieces. Byte-level BPE maps every byte to a printable "
    "character first, so no input is ever unknown; SentencePiece instead falls back to "
    "<0xXX> byte tokens when a character has no piece of its own.",
    "x",
    "\u00ff\u0100\u0101 latin extended and \u0000 NUL",
]


def load_corpus() -> list[str]:
    """llama.cpp's own tokenizer test inputs, then ours."""
    inp = os.path.join(LLAMA_SRC, "models", "ggml-vocab-llama-bpe.gguf.inp")
    texts = open(inp, encoding="utf-8").read().split("\n__ggml_vocab_test__\n")
    out: list[str] = []
    for t in texts + CORPUS_OWN:
        if t not in out:
            out.append(t)
    return out


# -- llama.cpp helpers ----------------------------------------------------------------------

def reference(path: str):
    from llama_cpp import Llama
    return Llama(path, vocab_only=True, verbose=False)


def detokenize(llm, ids: list[int], unparse_special: bool) -> bytes:
    import llama_cpp
    arr = (llama_cpp.llama_token * max(1, len(ids)))(*ids)
    buf = ctypes.create_string_buffer(64 + 16 * len(ids) * 8)
    n = llama_cpp.llama_detokenize(llm._model.vocab, arr, len(ids), buf, len(buf), False, unparse_special)
    assert n >= 0, n
    return buf.raw[:n]


def piece(llm, tid: int) -> bytes:
    import llama_cpp
    buf = ctypes.create_string_buffer(512)
    n = llama_cpp.llama_token_to_piece(llm._model.vocab, tid, buf, len(buf), 0, True)
    assert n >= 0, n
    return buf.raw[:n]


def record(llm, corpus: list[str]) -> dict:
    cases, pieces = [], {}
    for text in corpus:
        ids_s = llm.tokenize(text.encode(), add_bos=False, special=True)
        ids_p = llm.tokenize(text.encode(), add_bos=False, special=False)
        case = {"ids_special": ids_s, "detok_special": detokenize(llm, ids_s, True).hex()}
        if ids_p != ids_s:
            case["ids_plain"] = ids_p
        case["detok_plain"] = detokenize(llm, ids_p, False).hex()
        cases.append(case)
        for t in ids_s + ids_p:
            pieces[str(t)] = piece(llm, t).hex()
    bos_case = llm.tokenize(b"Hello world", add_bos=True, special=False)
    return {"cases": cases, "pieces": pieces, "add_special_hello_world": bos_case}


def metadata_of(path: str) -> dict:
    from gguf import GGUFReader
    orig = np.memmap
    np.memmap = lambda p, mode="r": np.fromfile(p, dtype=np.uint8)   # far faster for 100k strings
    try:
        r = GGUFReader(path)
    finally:
        np.memmap = orig
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


# -- tiny vocabularies ------------------------------------------------------------------------

def tiny_spm(md: dict, n_keep: int = 1200) -> dict:
    tokens = md["tokenizer.ggml.tokens"][:n_keep] + ["<|ctl|>", "<|user|>"]
    scores = [float(x) for x in md["tokenizer.ggml.scores"][:n_keep]] + [0.0, 0.0]
    types = list(md["tokenizer.ggml.token_type"][:n_keep]) + [3, 4]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0}


def tiny_bpe(md: dict, pre: str, n_merges: int = 1500) -> dict:
    from tabmesh.tokenizer import _BYTE_TO_CHAR
    tokens = list(_BYTE_TO_CHAR)
    have = set(tokens)
    merges = []
    for m in md["tokenizer.ggml.merges"]:
        a, b = m.split(" ", 1)
        if a in have and b in have and a + b not in have:
            merges.append(m)
            tokens.append(a + b)
            have.add(a + b)
        if len(merges) == n_merges:
            break
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eot_id|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    types = [1] * len(tokens) + [3] * len(specials) + [4]
    tokens += specials + ["<tool>"]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.bos_token_id": tokens.index("<|begin_of_text|>"),
            "tokenizer.ggml.eos_token_id": tokens.index("<|end_of_text|>")}


def write_tiny_llama(path: str, tok_md: dict) -> None:
    """A 1-layer, 32-wide Llama with random weights around the given tokenizer."""
    import gguf
    n_vocab, d, ff = len(tok_md["tokenizer.ggml.tokens"]), 32, 64
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(128)
    w.add_embedding_length(d)
    w.add_block_count(1)
    w.add_feed_forward_length(ff)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    for k, v in tok_md.items():
        if k == "tokenizer.ggml.model":
            w.add_tokenizer_model(v)
        elif k == "tokenizer.ggml.pre":
            w.add_tokenizer_pre(v)
        elif k == "tokenizer.ggml.tokens":
            w.add_token_list(v)
        elif k == "tokenizer.ggml.scores":
            w.add_token_scores(v)
        elif k == "tokenizer.ggml.token_type":
            w.add_token_types(v)
        elif k == "tokenizer.ggml.merges":
            w.add_token_merges(v)
        elif isinstance(v, bool):
            w.add_bool(k, v)
        else:
            w.add_uint32(k, int(v))
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (n_vocab, d), "output_norm.weight": (d,), "output.weight": (n_vocab, d),
              "blk.0.attn_norm.weight": (d,), "blk.0.attn_q.weight": (d, d), "blk.0.attn_k.weight": (d, d),
              "blk.0.attn_v.weight": (d, d), "blk.0.attn_output.weight": (d, d), "blk.0.ffn_norm.weight": (d,),
              "blk.0.ffn_gate.weight": (ff, d), "blk.0.ffn_up.weight": (ff, d), "blk.0.ffn_down.weight": (d, ff)}
    for name, shape in shapes.items():
        w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# -- chat templates ---------------------------------------------------------------------------

LLAMA3_TEMPLATE = (  # Meta-Llama-3-8B-Instruct tokenizer_config.json
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant"
    "<|end_header_id|>\n\n' }}{% endif %}")
QWEN2_TEMPLATE = (  # Qwen2-7B-Instruct tokenizer_config.json
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEMPLATE_FILES = {
    "llama3.1": "meta-llama-Llama-3.1-8B-Instruct.jinja",
    "llama3.2": "meta-llama-Llama-3.2-3B-Instruct.jinja",
    "qwen2.5": "Qwen-Qwen2.5-7B-Instruct.jinja",
    "smollm3": "HuggingFaceTB-SmolLM3-3B.jinja",
}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city <now> & 'later'",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CONVERSATIONS = {
    "user": [{"role": "user", "content": "Hello!"}],
    "system_user": [{"role": "system", "content": "  Be terse.\n"}, {"role": "user", "content": "What is 2+2?"}],
    "multi_turn": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
                   {"role": "user", "content": "Tell me a joke 😀\n\n  "}],
    "system_multi_turn": [{"role": "system", "content": "Tu es un assistant."},
                          {"role": "user", "content": "Bonjour, ça va ?"},
                          {"role": "assistant", "content": " Oui, merci. "},
                          {"role": "user", "content": "日本語で答えて"}],
    "tools": [{"role": "user", "content": "Weather in Paris?"},
              {"role": "assistant", "content": "", "tool_calls": [
                  {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
              {"role": "tool", "content": "{\"temp\": 21}"},
              {"role": "user", "content": "thanks"}],
}
FIXED_DATE = "21 Nov 2026"
# Small templates for single features (whitespace control, scoping, filters, tests, ...)
SNIPPETS = [
    ("  {% if true %}\n    yes\n  {% endif %}\nend\n", {}),
    ("a {%- if true -%} b {%- endif -%} c", {}),
    ("{# comment #}\n  {#- c2 -#}  x\n", {}),
    ("{%+ if true %}keep{% endif +%}\n  {%- if true %}x{% endif %}", {}),
    ("{% for x in xs %}{{ loop.index }}/{{ loop.length }}{% if not loop.last %}, {% endif %}{% endfor %}",
     {"xs": "abc"}),
    ("{% set ns = namespace(n=0) %}{% for x in xs %}{% set ns.n = ns.n + x %}{% set local = x %}{% endfor %}"
     "{{ ns.n }} {{ local is defined }}", {"xs": [1, 2, 3]}),
    ("{% for x in [] %}x{% else %}empty{% endfor %}|{% for k, v in d | items %}{{ k }}={{ v }};{% endfor %}",
     {"d": {"a": 1, "b": [2]}}),
    ("{{ 'a' ~ 1 ~ none }} {{ [1, 2, 3][1:] }} {{ 'Hello World'[::-1] }} {{ 7 // 2 }} {{ 2 ** 10 }} "
     "{{ 7 % 3 }} {{ -3 | abs }}", {}),
    ("{{ x | tojson }} {{ x | tojson(indent=2) }}", {"x": {"é": [1, "<b>"], "n": None}}),
    ("{{ xs | select('odd') | list }} {{ xs | reject('equalto', 2) | join(',') }} "
     "{{ ms | map(attribute='role') | join(' ') }} {{ ms | selectattr('role', 'equalto', 'user') | list | length }}",
     {"xs": [1, 2, 3], "ms": [{"role": "user"}, {"role": "assistant"}]}),
    ("{{ missing }}|{{ missing is defined }}|{{ d.nokey is defined }}|{{ d.get('k', 'dflt') }}|"
     "{{ missing | default('dv') }}", {"d": {}}),
    ("{{ '  pad  ' | trim }}|{{ 'abc' | upper }}|{{ 'hello world' | title }}|{{ 'a-b' | replace('-', '+') }}|"
     "{{ '  x '.strip() }}|{{ 'a,b'.split(',') }}", {}),
    ("{{ 1 if x else 2 }} {{ 'yes' if y }} {{ x and y }} {{ x or y }} {{ not x }} {{ 1 < 2 < 3 }} "
     "{{ 'a' in 'cat' }} {{ 3 not in [1] }}", {"x": 0, "y": "s"}),
    ("{% macro greet(name, punct='!') %}Hi {{ name }}{{ punct }}{% endmacro %}{{ greet('Ann') }} "
     "{{ greet('Bob', punct='?') }}", {}),
    ("{% for x in xs %}{% if x == 2 %}{% continue %}{% endif %}{% if x == 4 %}{% break %}{% endif %}{{ x }}"
     "{% endfor %}", {"xs": [1, 2, 3, 4, 5]}),
    ("{% set a, b = 1, 2 %}{{ a + b }}{% set blk %}B{{ a }}{% endset %} {{ blk }}", {}),
    ("{{ \"esc\\n\\t\\\"q\\\"\" }}|{{ 'it\\'s' }}", {}),
    ("{{ messages[0]['role'] }} {{ messages[0].content | length }} {{ messages | length }}"
     "{% if messages[0]['role'] != 'system' %} nosys{% endif %}", {"messages": [{"role": "user", "content": "héllo"}]}),
    ("{{ '|safe' | safe + ' <b>&' }} {{ 'x' | e }}", {}),
]


def chat_fixture(smollm2_template: str) -> dict:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    templates = {"smollm2": smollm2_template, "llama3": LLAMA3_TEMPLATE, "qwen2": QWEN2_TEMPLATE}
    tdir = os.path.join(LLAMA_SRC, "models", "templates")
    for name, fname in TEMPLATE_FILES.items():
        templates[name] = open(os.path.join(tdir, fname), encoding="utf-8").read()

    def raise_exception(msg):
        raise ValueError(msg)

    cases = []
    for tname, src in templates.items():
        env = Jinja2ChatFormatter(src, eos_token="<EOS>", bos_token="<BOS>")._environment
        for cname, msgs in CONVERSATIONS.items():
            for agp in (True, False):
                if not agp and cname not in ("multi_turn", "tools"):
                    continue
                extra = {"tools": TOOLS} if cname == "tools" else {}
                if cname == "tools" and tname == "llama3.1":
                    extra["builtin_tools"] = ["brave_search", "code_interpreter"]
                try:
                    out = env.render(messages=msgs, add_generation_prompt=agp, bos_token="<BOS>",
                                     eos_token="<EOS>", raise_exception=raise_exception,
                                     strftime_now=lambda fmt: FIXED_DATE, **extra)
                    expected = {"text": out}
                except Exception as e:   # the template refuses this conversation
                    expected = {"error": f"{type(e).__name__}: {e}"}
                cases.append({"template": tname, "conversation": cname, "add_generation_prompt": agp,
                              "extra": extra, **expected})
    env = Jinja2ChatFormatter("", eos_token="", bos_token="")._environment.environment
    snippets = [{"template": src, "variables": ctx, "text": env.from_string(src).render(**ctx)}
                for src, ctx in SNIPPETS]
    return {"fixed_date": FIXED_DATE, "bos_token": "<BOS>", "eos_token": "<EOS>",
            "templates": templates, "conversations": CONVERSATIONS, "cases": cases, "snippets": snippets}


# -- checks against the full vocabularies -------------------------------------------------

def check_full(corpus: list[str]) -> None:
    from tabmesh.tokenizer import Tokenizer
    for path in sorted(glob.glob(os.path.join(LLAMA_SRC, "models", "ggml-vocab-*.gguf"))):
        md = metadata_of(path)
        try:
            tok = Tokenizer.from_gguf_metadata(md)
        except Exception as e:
            print(f"{os.path.basename(path)}: not supported ({e.__class__.__name__}: {str(e)[:80]})")
            continue
        llm = reference(path)
        same = total = 0
        for text in corpus:
            for special in (True, False):
                total += 1
                ref = llm.tokenize(text.encode(), add_bos=True, special=special)
                mine = tok.encode(text, add_special=True, parse_special=special)
                if ref == mine and detokenize(llm, ref, special) == tok.detokenize(mine, unparse_special=special):
                    same += 1
                elif total - same <= 3:
                    print(f"  mismatch {text[:40]!r} special={special}\n    ref  {ref[:24]}\n    mine {mine[:24]}")
        print(f"{os.path.basename(path)} (model={md.get('tokenizer.ggml.model')}, pre={md.get('tokenizer.ggml.pre')}): "
              f"{same}/{total} identical ids and detokenized bytes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--llama-cpp-src", default=(glob.glob("/tmp/llx/*/vendor/llama.cpp") or [""])[0],
                    help="llama.cpp source tree as vendored in the llama-cpp-python sdist")
    ap.add_argument("--check-full", action="store_true", help="compare on the full vendored vocabularies too")
    args = ap.parse_args()
    global LLAMA_SRC
    LLAMA_SRC = args.llama_cpp_src
    if not os.path.isdir(os.path.join(LLAMA_SRC, "models", "templates")):
        sys.exit("need llama.cpp's source for its vocabularies and templates: pip download --no-deps "
                 "--no-binary :all: -d /tmp/llsrc llama-cpp-python==0.3.36 && mkdir -p /tmp/llx && "
                 "tar xzf /tmp/llsrc/*.tar.gz -C /tmp/llx  (or pass --llama-cpp-src)")
    os.makedirs(FIXTURES, exist_ok=True)
    corpus = load_corpus()

    import llama_cpp
    smol = {"source": "llama-cpp-python " + llama_cpp.__version__ + ", " + os.path.basename(args.model),
            "corpus": corpus, **record(reference(args.model), corpus)}
    dump(smol, "tokenizer_smollm2.json")

    vdir = os.path.join(LLAMA_SRC, "models")
    spm_md, bpe_md = metadata_of(f"{vdir}/ggml-vocab-llama-spm.gguf"), metadata_of(f"{vdir}/ggml-vocab-llama-bpe.gguf")
    vocabs = {"spm": tiny_spm(spm_md)}
    bpe = tiny_bpe(bpe_md, "llama-bpe")
    for pre in ("llama-bpe", "qwen2", "gpt-2", "default", "smollm"):
        vocabs[f"bpe-{pre}"] = {**bpe, "tokenizer.ggml.pre": pre}
    tiny = {"source": "llama-cpp-python " + llama_cpp.__version__ + "; vocabularies cut from llama.cpp's "
            "ggml-vocab-llama-spm.gguf and ggml-vocab-llama-bpe.gguf", "corpus": corpus, "vocabs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, md in vocabs.items():
            path = os.path.join(tmp, name + ".gguf")
            write_tiny_llama(path, md)
            llm = reference(path)
            rec = record(llm, corpus)
            # the BPE variants share their vocabulary: store it once
            stored = md if name in ("spm", "bpe-llama-bpe") else {"same_vocab_as": "bpe-llama-bpe",
                                                                    "tokenizer.ggml.pre": md["tokenizer.ggml.pre"]}
            tiny["vocabs"][name] = {"metadata": stored, **rec}
    dump(tiny, "tokenizer_tiny_vocabs.json")

    smol_template = metadata_of(args.model)["tokenizer.chat_template"]
    dump(chat_fixture(smol_template), "chat_templates.json")
    if args.check_full:
        check_full(corpus)


def dump(obj: dict, name: str) -> None:
    path = os.path.join(FIXTURES, name)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {path} ({os.path.getsize(path) // 1024} KB)")


if __name__ == "__main__":
    main()
