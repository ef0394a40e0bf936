"""Write llama.cpp's logits and greedy tokens for SmolLM2, the references of the numpy model.

Run with a Python that has llama-cpp-python 0.3.x (not the project venv; see
shared/ENVIRONMENT.md for the build flags) and numpy:

    /work/refvenv/bin/python scripts/make_model_fixtures.py

It writes, under tests/fixtures/:

- model_q4_1.json: for the shipped SmolLM2-135M-Instruct.Q4_1.gguf
- model_q8_0.json: for its Q8_0 re-quantization, made here by
  ``tabmesh.model.requant.requantize_q8_0`` (deterministic; the sha256 of the file is
  recorded and the tests regenerate the same file)
- model_f32.json: for the F32 dequantization of the Q4_1 file (``requantize(..., F32)``:
  exactly the float32 weights the numpy model computes with), run with an F32 KV cache.
  With nothing rounded to 8 or 16 bits on llama.cpp's side either, this is the tight
  reference of the numpy model's math (the 540 MB file is made in a temp dir and deleted;
  the tests run the numpy model on the Q4_1 file, whose dequantization it is).

- model_tiny_qwen2.json: a 2-layer random Qwen2 (``tiny_qwen2_gguf``: F32 weights, q/k/v
  biases, neox RoPE with linear scaling x2, an untied output) that covers what SmolLM2
  does not; all logits of a short sequence as float32, and 8 greedy tokens. The tests
  rebuild the same file from the same seed (its sha256 is recorded).

llama.cpp is run with LLAMA_PARAMS (its defaults otherwise: f16 KV cache, no flash
attention; on CPU its Q4_1 / Q8_0 matmuls round activations to Q8_1 / Q8_0 first).

For each of the PROMPTS below:
- ``tokens``: ``llama.tokenize(text, add_bos=False, special=True)``
- ``positions``: at a few prompt positions (the last one included), the top-20 logits
  (ids and float32 values, largest first), the logits of the fixed ``probe_ids`` (128
  ids spread over the vocabulary, seeded) and max |logit| of the whole vector, from one
  batched ``llama.eval(tokens)`` with ``logits_all=True``
- ``last_logits_f16`` (Q4_1 and Q8_0 only, to keep the fixtures near 1 MB): the whole
  logit vector of the last prompt position, float16, base64 (little-endian); f16 rounds
  values of magnitude 16..32 by at most 2^-7
- ``greedy``: 32 tokens, each the argmax (lowest id on ties) of llama.cpp's own logits,
  fed back one at a time with ``llama.eval([token])``; for each step the top-5 logits,
  so a test can tell a near-tie from a real disagreement.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
sys.path.insert(0, os.path.join(ROOT, "pysrc"))

LLAMA_PARAMS = dict(n_ctx=512, n_threads=2, n_threads_batch=2, seed=0, logits_all=True,
                    verbose=False)
N_GREEDY = 32
TOP_K = 20
TOP_K_GREEDY = 5
N_PROBES = 128
F32_KV = dict(type_k=0, type_v=0)  # GGML_TYPE_F32

LONG_TEXT = (
    "The history of the printing press begins in the middle of the fifteenth century, when "
    "Johannes Gutenberg, a goldsmith from Mainz, combined several existing technologies into "
    "a single system for producing books. Movable type had been used in China and Korea "
    "centuries earlier, but Gutenberg's metal alloy, his oil-based ink and his adaptation of "
    "the screw press made printing fast and cheap enough to change Europe. Within fifty years, "
    "presses were operating in more than two hundred cities, and millions of volumes had been "
    "printed. The consequences were enormous: scholars could compare identical copies of a "
    "text, reformers spread pamphlets faster than authorities could suppress them, and "
    "vernacular languages gained standard spellings. Historians still debate how much the "
    "press caused these changes and how much it merely accelerated trends already under way. "
    "In the end, the most important effect of"
)

PROMPTS = [
    ("short", "The capital of France is"),
    ("chat", "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
             "Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the tallest mountain in the "
             "world?<|im_end|>\n<|im_start|>assistant\n"),
    ("code", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n"),
    ("long", LONG_TEXT),
]


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def positions_for(n: int) -> list[int]:
    return sorted({p for p in (0, 1, n // 3, (2 * n) // 3, n - 2, n - 1) if 0 <= p < n})


def top(logits: np.ndarray, k: int) -> tuple[list[int], list[float]]:
    ids = np.argsort(-logits, kind="stable")[:k]  # ties: lowest id first, like np.argmax
    return [int(i) for i in ids], [float(logits[i]) for i in ids]


def probe_ids(n_vocab: int) -> list[int]:
    return sorted(int(i) for i in np.random.default_rng(0).choice(n_vocab, N_PROBES, replace=False))


def record(llm, name: str, text: str, probes: list[int], full_last: bool) -> dict:
    tokens = llm.tokenize(text.encode(), add_bos=False, special=True)
    n = len(tokens)
    llm.reset()
    llm.eval(tokens)
    scores = np.array(llm.scores[:n], dtype=np.float32)  # (n, n_vocab)
    positions = []
    for p in positions_for(n):
        ids, vals = top(scores[p], TOP_K)
        positions.append({"pos": p, "top_ids": ids, "top_logits": vals,
                          "probe_logits": [float(scores[p, i]) for i in probes],
                          "absmax": float(np.abs(scores[p]).max())})
    last = scores[n - 1]
    greedy, steps = [], []
    tok = int(np.argmax(last))
    for step in range(N_GREEDY):
        greedy.append(tok)
        if step == N_GREEDY - 1:
            break
        llm.eval([tok])
        logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        ids, vals = top(logits, TOP_K_GREEDY)
        steps.append({"top_ids": ids, "top_logits": vals})
        tok = int(np.argmax(logits))
    first_ids, first_vals = top(last, TOP_K_GREEDY)
    steps.insert(0, {"top_ids": first_ids, "top_logits": first_vals})
    out = {"name": name, "text": text, "tokens": [int(t) for t in tokens], "positions": positions}
    if full_last:
        out["last_logits_f16"] = base64.b64encode(last.astype("<f2").tobytes()).decode()
    out["greedy"] = {"tokens": greedy, "steps": steps}
    return out


def run_model(path: str, params: dict, full_last: bool) -> tuple[list[int], list[dict]]:
    from llama_cpp import Llama

    llm = Llama(model_path=path, **params)
    probes = probe_ids(llm.n_vocab())
    out = [record(llm, name, text, probes, full_last) for name, text in PROMPTS]
    llm.close()
    return probes, out


def _dumps(x, indent: int = 0) -> str:
    """JSON with one key per line but lists of numbers (and small dicts) on one line."""
    pad = " " * (indent + 1)
    if isinstance(x, dict) and len(json.dumps(x)) > 200:
        items = [f"{pad}{json.dumps(k)}: {_dumps(v, indent + 1)}" for k, v in x.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    if isinstance(x, list) and any(isinstance(v, (dict, list)) for v in x):
        items = [f"{pad}{_dumps(v, indent + 1)}" for v in x]
        return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"
    return json.dumps(x, ensure_ascii=False)


def write(path: str, doc: dict) -> None:
    with open(path, "w") as f:
        f.write(_dumps(doc) + "\n")
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


# -- a tiny random Qwen2 ------------------------------------------------------------------

TINY = dict(n_layers=2, n_embd=64, n_head=4, n_head_kv=2, n_ff=96, n_vocab=256, n_ctx=256,
            rope_base=10000.0, rope_scale=2.0, rms_eps=1e-6, seed=1234)
TINY_TOKENS = [17, 200, 3, 3, 99, 42, 250, 7, 128, 64, 31, 5]


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character map: the 256 tokens of a byte-level vocabulary."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
            *range(ord("\xae"), ord("\xff") + 1)]
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return [out[b] for b in range(256)]


def tiny_qwen2_gguf(p: dict = TINY) -> bytes:
    """A deterministic random 2-layer Qwen2 GGUF (float32 weights), as bytes."""
    import io

    from tabmesh.gguf import ValueType as V
    from tabmesh.model.requant import write_gguf
    from tabmesh.quants import GGMLType

    rng = np.random.default_rng(p["seed"])
    d, f, hd = p["n_embd"], p["n_ff"], p["n_embd"] // p["n_head"]
    kv = p["n_head_kv"] * hd

    def mat(rows: int, cols: int) -> np.ndarray:  # numpy (rows, cols) = GGUF ne (cols, rows)
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def vec(n: int, center: float, spread: float) -> np.ndarray:
        return (center + spread * rng.standard_normal(n)).astype(np.float32)

    arrays = {"token_embd.weight": mat(p["n_vocab"], d)}
    for i in range(p["n_layers"]):
        arrays.update({
            f"blk.{i}.attn_norm.weight": vec(d, 1.0, 0.1),
            f"blk.{i}.attn_q.weight": mat(d, d), f"blk.{i}.attn_q.bias": vec(d, 0.0, 0.5),
            f"blk.{i}.attn_k.weight": mat(kv, d), f"blk.{i}.attn_k.bias": vec(kv, 0.0, 0.5),
            f"blk.{i}.attn_v.weight": mat(kv, d), f"blk.{i}.attn_v.bias": vec(kv, 0.0, 0.5),
            f"blk.{i}.attn_output.weight": mat(d, d),
            f"blk.{i}.ffn_norm.weight": vec(d, 1.0, 0.1),
            f"blk.{i}.ffn_gate.weight": mat(f, d), f"blk.{i}.ffn_up.weight": mat(f, d),
            f"blk.{i}.ffn_down.weight": mat(d, f),
        })
    arrays["output_norm.weight"] = vec(d, 1.0, 0.1)
    arrays["output.weight"] = mat(p["n_vocab"], d) * np.float32(4.0)

    md = {
        "general.architecture": ("qwen2", V.STRING),
        "general.name": ("tabmesh tiny qwen2", V.STRING),
        "general.file_type": (0, V.UINT32),
        "qwen2.block_count": (p["n_layers"], V.UINT32),
        "qwen2.context_length": (p["n_ctx"], V.UINT32),
        "qwen2.embedding_length": (d, V.UINT32),
        "qwen2.feed_forward_length": (f, V.UINT32),
        "qwen2.attention.head_count": (p["n_head"], V.UINT32),
        "qwen2.attention.head_count_kv": (p["n_head_kv"], V.UINT32),
        "qwen2.rope.freq_base": (p["rope_base"], V.FLOAT32),
        "qwen2.rope.scaling.type": ("linear", V.STRING),
        "qwen2.rope.scaling.factor": (p["rope_scale"], V.FLOAT32),
        "qwen2.attention.layer_norm_rms_epsilon": (p["rms_eps"], V.FLOAT32),
        "tokenizer.ggml.model": ("gpt2", V.STRING),
        "tokenizer.ggml.pre": ("qwen2", V.STRING),
        "tokenizer.ggml.tokens": (_bytes_to_unicode(), (V.ARRAY, V.STRING)),
        "tokenizer.ggml.token_type": (np.ones(p["n_vocab"], np.int32), (V.ARRAY, V.INT32)),
        "tokenizer.ggml.merges": (["\u0120 \u0120"], (V.ARRAY, V.STRING)),
        "tokenizer.ggml.bos_token_id": (0, V.UINT32),
        "tokenizer.ggml.eos_token_id": (1, V.UINT32),
    }
    metadata = {k: v for k, (v, _) in md.items()}
    value_types = {k: (t if isinstance(t, tuple) else (t, None)) for k, (_, t) in md.items()}
    tensors = [(name, a.shape[::-1], GGMLType.F32, a.astype("<f4").tobytes())
               for name, a in arrays.items()]
    buf = io.BytesIO()
    write_gguf(buf, metadata, value_types, tensors, alignment=32)
    return buf.getvalue()


def tiny_fixture() -> dict:
    from llama_cpp import Llama

    data = tiny_qwen2_gguf()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tiny-qwen2.gguf")
        with open(path, "wb") as f:
            f.write(data)
        llm = Llama(model_path=path, **{**LLAMA_PARAMS, **F32_KV, "n_ctx": TINY["n_ctx"]})
        llm.eval(TINY_TOKENS)
        n = len(TINY_TOKENS)
        logits = np.array(llm.scores[:n], dtype=np.float32)  # (n, n_vocab)
        greedy = []
        tok = int(np.argmax(logits[-1]))
        for step in range(8):
            greedy.append(tok)
            if step < 7:
                llm.eval([tok])
                tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.close()
    return {"generator": "scripts/make_model_fixtures.py", "model": {
                "made_by": "scripts/make_model_fixtures.py:tiny_qwen2_gguf", "params": TINY,
                "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)},
            "llama_params": {**{k: v for k, v in LLAMA_PARAMS.items() if k != "verbose"},
                             **F32_KV, "n_ctx": TINY["n_ctx"]},
            "tokens": TINY_TOKENS,
            "logits_f32": base64.b64encode(logits.astype("<f4").tobytes()).decode(),
            "greedy": greedy}


def main() -> int:
    import llama_cpp
    from tabmesh.model.requant import requantize, requantize_q8_0
    from tabmesh.quants import GGMLType

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--q8-out", default=None, help="keep the Q8_0 GGUF here (default: a temp dir)")
    ap.add_argument("--only", choices=["smollm2", "tiny"], default=None)
    args = ap.parse_args()

    if args.only != "smollm2":
        write(os.path.join(FIXTURES, "model_tiny_qwen2.json"), tiny_fixture())
    if args.only == "tiny":
        return 0

    def doc(quant: str, model: dict, path: str, params: dict, full_last: bool) -> dict:
        probes, prompts = run_model(path, params, full_last)
        return {"generator": "scripts/make_model_fixtures.py",
                "llama_cpp_python": llama_cpp.__version__,
                "llama_params": {k: v for k, v in params.items() if k != "verbose"},
                "quant": quant, "model": model, "n_greedy": N_GREEDY, "probe_ids": probes,
                "prompts": prompts}

    src = {"file": os.path.basename(args.model), "sha256": sha256_file(args.model),
           "size": os.path.getsize(args.model)}
    write(os.path.join(FIXTURES, "model_q4_1.json"),
          doc("Q4_1", src, args.model, LLAMA_PARAMS, True))

    with tempfile.TemporaryDirectory() as tmp:
        q8 = args.q8_out or os.path.join(tmp, "SmolLM2-135M-Instruct.Q8_0.gguf")
        digest = requantize_q8_0(args.model, q8)
        info = {"file": os.path.basename(q8), "sha256": digest, "size": os.path.getsize(q8),
                "made_by": "tabmesh.model.requant.requantize_q8_0", "from": src}
        write(os.path.join(FIXTURES, "model_q8_0.json"),
              doc("Q8_0", info, q8, LLAMA_PARAMS, True))

    with tempfile.TemporaryDirectory() as tmp:
        f32 = os.path.join(tmp, "SmolLM2-135M-Instruct.F32.gguf")
        digest = requantize(args.model, f32, GGMLType.F32)
        info = {"file": os.path.basename(f32), "sha256": digest, "size": os.path.getsize(f32),
                "made_by": "tabmesh.model.requant.requantize(src, dst, GGMLType.F32)", "from": src}
        write(os.path.join(FIXTURES, "model_f32.json"),
              doc("F32", info, f32, {**LLAMA_PARAMS, **F32_KV}, False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
