"""GPULlama speed: prefill and decode tok/s, the per-token CPU cost, the bandwidth bound.

    python -m tabmesh.model.gpu_bench --model models/SmolLM2-135M-Instruct.Q4_1.gguf
    python -m tabmesh.model.gpu_bench --synthetic .bench/smollm2_q4_1.header [--check]
    python -m tabmesh.model.gpu_bench --synthetic HEADER --prefill 0 --decode 0 --profile
    python -m tabmesh.model.gpu_bench make-header MODEL.gguf OUT.header

--synthetic runs a model of the exact shapes and quant types of a real GGUF whose header
alone is given (make-header writes it: the header bytes plus the file size in the last 8),
with deterministic random tensor data, written to a temporary file first. For the GPU
machine, where the 98 MB model cannot travel: timings do not depend on the weights' values.
--check also runs NumpyLlama on the same file and compares (logits and greedy tokens).

Figures (printed as JSON; wall clock, no timestamp queries):
- prefill: forward(prompt of --prefill tokens, output="argmax"), one submit per max_batch
  (512) tokens; best of --reps after one warm-up.
- decode: a --prompt-token prompt, then --decode greedy tokens two ways:
  "forward": forward([tok], pos, output="argmax") per token (submit, wait, 8 bytes back);
  "pipelined": generate_greedy(lookahead=--lookahead), argmax fed back on the GPU, the CPU
  recording token t+1 while the GPU runs token t.
- cpu: per decode token, Python recording (ops calls, uniform packing) and encode+submit
  (wgpu calls), from the pipelined run where both are timed apart; and run_cpu_s, this
  thread's CPU time inside batch.run() in the forward path.
- bound: decode tok/s if every token only streamed its weights (and KV cache) once from
  GPU memory at the card's nominal bandwidth (H100 SXM 3.35 TB/s, H200 4.8 TB/s, or
  --bandwidth).
- --profile: GPU time per decode token with Python out of the way (16 steps recorded into
  one batch, timed from its submit to the end of the work), whole and by part (matvecs,
  rope_kv + attention, logits head), at positions 64 and n_ctx - 40, for several matvec
  threads-per-row (TPR).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import struct
import sys
import tempfile
import time
import zlib

import numpy as np

from tabmesh.gguf import parse_header, read_gguf_path
from tabmesh.gpu import open_device
from tabmesh.gpu import reference as ref

from .llama_gpu import GPULlama, file_fetcher

NOMINAL_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}  # bytes/s, by a name in the adapter's


def make_header(model: str, out: str) -> None:
    g = read_gguf_path(model)
    with open(model, "rb") as f:
        head = f.read(g.data_offset)
    with open(out, "wb") as f:
        f.write(head + struct.pack("<Q", g.file_size))


def synthetic_file(header_path: str, out_path: str) -> str:
    """A GGUF of the header's shapes and types with deterministic random data (seeded by name)."""
    blob = open(header_path, "rb").read()
    head, (file_size,) = blob[:-8], struct.unpack("<Q", blob[-8:])
    g = parse_header(head, file_size)
    with open(out_path, "wb") as f:
        f.write(head)
        f.truncate(file_size)
        for name, t in g.tensors.items():
            rng = np.random.default_rng(zlib.crc32(name.encode()))
            if len(t.shape) == 1:  # norms ~1, biases ~0
                v = rng.normal(0 if name.endswith(".bias") else 1, 0.1, t.shape[0]).astype(np.float32)
                raw = v.astype(np.float16).tobytes() if t.ggml_type == ref.F16 else v.tobytes()
            else:
                rows, k = t.np_shape
                raw = ref.random_weights(rng, t.ggml_type, rows, k, scale=0.5 if "token_embd" in name else 0.05)
                if t.ggml_type == ref.Q4_1:  # centre the blocks (m = -7.5 d): no common direction
                    blocks = np.frombuffer(raw, np.uint8).reshape(-1, 20).copy()  # that makes greedy degenerate
                    d = blocks[:, 0:2].view(np.float16).astype(np.float32)
                    blocks[:, 2:4] = (-7.5 * d).astype(np.float16).view(np.uint8)
                    raw = blocks.tobytes()
            assert len(raw) == t.nbytes, name
            f.seek(t.offset)
            f.write(raw)
    return out_path


def bandwidth_for(device_name: str, override: float | None) -> float | None:
    if override:
        return override
    for key, bw in NOMINAL_BANDWIDTH.items():
        if key in device_name:
            return bw
    return None


async def gpu_ms_per_token(model: GPULlama, pos: int, reps: int, part: str = "all") -> tuple[float, float]:
    """(encode+submit ms, GPU ms) per decode token: `reps` decode steps at positions pos.. (or
    only one `part` of each: "matvec", "attention" (rope_kv + attention), "head") recorded into
    ONE batch, so the wait after the submit is GPU time, not Python; one warm-up first."""
    cfg, o, dev = model.cfg, model.ops, model.dev

    def record(b, p):
        if part == "all":
            model._record(b, 1, p)
            model._record_head(b, 0)
        for L in model.blocks if part in ("matvec", "attention") else ():
            if part == "attention":
                model._attend(b, L, 1, p)
                continue
            for m in L.qkv:
                o.matvec(b, m.buf, model.h, model.qkv, qtype=m.qtype, rows=m.rows, k=m.k, y_off=m.out_off,
                         norm_weight=L.attn_norm)
            o.matvec(b, L.wo.buf, model.att, model.h, qtype=L.wo.qtype, rows=cfg.n_embd, k=cfg.q_dim, accumulate=True)
            for m in L.gate_up:
                o.matvec(b, m.buf, model.h, model.gu, qtype=m.qtype, rows=m.rows, k=m.k, y_off=m.out_off,
                         norm_weight=L.ffn_norm)
            o.matvec(b, L.down.buf, model.gu, model.h, qtype=L.down.qtype, rows=cfg.n_embd, k=cfg.n_ff,
                     silu_up_off=cfg.n_ff, accumulate=True)
        if part == "head":
            model._record_head(b, 0)

    best = (float("inf"), float("inf"))
    for _ in range(3):
        b = dev.batch("profile")
        for r in range(reps):
            record(b, pos + r)
        t0 = time.perf_counter()
        b.submit()
        t1 = time.perf_counter()
        await dev.wait()
        t2 = time.perf_counter()
        best = min(best, ((t1 - t0) / reps * 1e3, (t2 - t1) / reps * 1e3), key=lambda x: x[1])
    return round(best[0], 3), round(best[1], 3)


async def profile(dev, g, path: str, n_ctx: int, tprs: list[int]) -> dict:
    """GPU time per decode token by part, context length and matvec threads-per-row."""
    out: dict = {}
    for tpr in tprs:
        model = await GPULlama.load(dev, g, file_fetcher(path), n_ctx=n_ctx, matvec_tpr=tpr)
        row = {}
        for pos in (64, n_ctx - 40):
            row[f"all@{pos}"] = await gpu_ms_per_token(model, pos, 16)
        for part in ("matvec", "attention", "head"):
            row[f"{part}@64"] = await gpu_ms_per_token(model, 64, 16, part)
        out[f"tpr{tpr}"] = row
        print("profile tpr", tpr, row, file=sys.stderr, flush=True)
        del model
    return out


async def bench(args) -> dict:
    dev = await open_device("native")
    res: dict = {"device": dev.info["device"], "adapter": dev.info.get("description") or dev.info["architecture"],
                 "cpu_adapter": dev.info["cpu_adapter"], "model": args.model, "synthetic": bool(args.synthetic),
                 "numerics": args.numerics}
    path = args.model
    if args.synthetic:
        t = time.perf_counter()
        path = synthetic_file(args.synthetic, os.path.join(tempfile.gettempdir(), "tabmesh-synthetic.gguf"))
        res["synthetic_write_s"] = round(time.perf_counter() - t, 2)
    g = read_gguf_path(path)
    n_ctx = max(args.prefill, args.prompt_tokens + args.decode + args.lookahead, 64 + 8 if args.check else 0) + 16
    t = time.perf_counter()
    model = await GPULlama.load(dev, g, file_fetcher(path), n_ctx=n_ctx, numerics=args.numerics)
    res["load_s"] = round(time.perf_counter() - t, 2)
    cfg = model.cfg
    res["weight_bytes"] = model.weight_bytes
    res["prefill_kernels"] = "matmul" if model.prefill_matmul else "matvec"
    rng = np.random.default_rng(0)
    vocab_ids = lambda n: [int(x) for x in rng.integers(100, cfg.n_vocab, n)]  # noqa: E731
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731

    if args.prefill:
        prompt = vocab_ids(args.prefill)
        times = []
        for _ in range(args.reps + 1):
            t = time.perf_counter()
            await model.forward(prompt, 0, output="argmax")
            times.append(time.perf_counter() - t)
        res["prefill"] = {"tokens": args.prefill, "first_s": round(times[0], 4), "best_s": round(min(times[1:]), 4),
                          "tok_per_s": round(args.prefill / min(times[1:]), 1),
                          "record_s": round(model.last_timings["record_s"], 4)}
        log("prefill", res["prefill"])

    if args.decode:
        prompt = vocab_ids(args.prompt_tokens)
        tok = await model.forward(prompt, 0, output="argmax")
        toks, rec, run, cpu = [tok], [], [], []
        t = time.perf_counter()
        for i in range(args.decode):
            toks.append(await model.forward([toks[-1]], len(prompt) + i, output="argmax"))
            lt = model.last_timings
            rec.append(lt["record_s"]), run.append(lt["run_s"]), cpu.append(lt["run_cpu_s"])
        dt = time.perf_counter() - t
        med = lambda xs: round(float(np.median(xs)) * 1e3, 3)  # noqa: E731
        res["decode_forward"] = {"tokens": args.decode, "tok_per_s": round(args.decode / dt, 1),
                                 "ms_per_token": round(dt / args.decode * 1e3, 3), "record_ms": med(rec),
                                 "run_ms": med(run), "run_cpu_ms": med(cpu)}
        log("decode_forward", res["decode_forward"])
        out = await model.generate_greedy(prompt, args.decode + 1, lookahead=args.lookahead)
        lt = model.last_timings
        res["decode_pipelined"] = {"tokens": len(out) - 1, "lookahead": args.lookahead,
                                   "tok_per_s": round(lt["decode_tok_per_s"], 1),
                                   "ms_per_token": round(lt["decode_s"] / (len(out) - 1) * 1e3, 3),
                                   "record_ms": round(lt["record_s_per_token"] * 1e3, 3),
                                   "encode_submit_ms": round(lt["submit_s_per_token"] * 1e3, 3)}
        res["greedy_equal"] = out == toks
        res["greedy_first"] = toks[:8]
        log("decode_pipelined", res["decode_pipelined"], "same tokens:", res["greedy_equal"])

        # KV bytes read per token at the middle of the decode, and the bandwidth bound
        pos = args.prompt_tokens + args.decode // 2
        kv_bytes = cfg.n_layers * 2 * cfg.n_head_kv * pos * cfg.head_dim * 4
        bw = bandwidth_for(res["device"], args.bandwidth)
        if bw:
            per_token = model.weight_bytes + kv_bytes
            res["bound"] = {"bandwidth_Bps": bw, "bytes_per_token": per_token,
                            "tok_per_s": round(bw / per_token, 0),
                            "forward_fraction": round(res["decode_forward"]["tok_per_s"] * per_token / bw, 4),
                            "pipelined_fraction": round(res["decode_pipelined"]["tok_per_s"] * per_token / bw, 4)}

    if args.profile:
        res["profile_ms_per_token"] = {"columns": "(encode+submit ms, GPU ms) per token, 16 tokens in one submit",
                                       **await profile(dev, g, path, args.profile_ctx, args.profile_tpr)}

    if args.check:
        from .llama_numpy import NumpyLlama

        ref_model = NumpyLlama.from_path(path, n_ctx=n_ctx, numerics=args.numerics)
        prompt = vocab_ids(64)
        want = ref_model.forward(prompt, 0, last_only=True)[-1]
        got = await model.forward(prompt, 0, output="logits")
        # greedy on the GPU pipelined (K/V of 8 steps written by back-to-back submits), then the
        # logits of one more position, which attend to all of them
        ref_toks = ref_model.generate_greedy(prompt, 8)
        gpu_toks = await model.generate_greedy(prompt, 8, lookahead=4)
        want2 = ref_model.forward([ref_toks[-1]], len(prompt) + 7)[-1]
        got2 = await model.forward([gpu_toks[-1]], len(prompt) + 7, output="logits")
        err = lambda a, b: float(np.abs(a - b).max() / np.abs(b).max())  # noqa: E731
        res["check"] = {"prompt_tokens": 64, "prefill_logits_rel_err": err(got, want),
                        "top1_equal": int(got.argmax()) == int(want.argmax()),
                        "after_8_pipelined_steps_logits_rel_err": err(got2, want2),
                        "greedy_equal": gpu_toks == ref_toks, "greedy_gpu": gpu_toks}
        log("check", res["check"])
    return res


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["make-header"]:
        make_header(argv[1], argv[2])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a GGUF file")
    src.add_argument("--synthetic", help="a header file from make-header: random weights of its shapes")
    p.add_argument("--prefill", type=int, default=512, help="prompt tokens for the prefill figure (0: skip)")
    p.add_argument("--decode", type=int, default=128, help="greedy tokens for the decode figures (0: skip)")
    p.add_argument("--prompt-tokens", type=int, default=16, help="prompt before the decode")
    p.add_argument("--lookahead", type=int, default=16, help="steps per readback in the pipelined decode")
    p.add_argument("--reps", type=int, default=2, help="timed prefill repetitions after a warm-up")
    p.add_argument("--bandwidth", type=float, help="GPU memory bandwidth in bytes/s for the bound")
    p.add_argument("--check", action="store_true", help="compare with NumpyLlama on the same file")
    p.add_argument("--profile", action="store_true", help="GPU time per decode token by part and matvec TPR")
    p.add_argument("--profile-ctx", type=int, default=2048, help="context of the profiled models")
    p.add_argument("--profile-tpr", type=lambda s: [int(x) for x in s.split(",")], default=[4, 8, 16, 32, 64],
                   help="matvec threads per row to compare, comma-separated")
    p.add_argument("--numerics", choices=("f32", "ggml"), default="f32",
                   help="ggml: llama.cpp's arithmetic bit for bit (gpu/ggml_ops.py)")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    res = asyncio.run(bench(args))
    text = json.dumps(res, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
