"""Per-kernel GPU timings, matvec bandwidth, and a synthetic SmolLM2-135M decode step.

    python -m tabmesh.gpu.bench [--quick] [--reps N] [--kernels gpu|cpu]   (native; prints JSON)
    await bench(dev)                                                        (either backend)

Method: each kernel is recorded `reps` times into ONE compute pass, submitted once and
waited for; the time of an empty submit+wait is subtracted and the rest divided by reps;
the best of 3 rounds (5 on CPU adapters) is kept. That is the per-dispatch cost as the
forward pass sees it (dispatches back to back in one pass, which is how decode runs), launch
and encoding overhead included. Wall clock, not timestamp queries, so it works on every
adapter. The matvec figure is weight bytes read per second; x and y are negligible beside
the weights. Each "op" is what one ops.py call records: on CPU adapters a matvec with a fused
RMSNorm is two dispatches, argmax two (see ops.py).

On a CPU adapter natively (lavapipe; SwiftShader with VK_ICD_FILENAMES pointing at Chromium's
vk_swiftshader_icd.json) the adapter's threads run in this process, so "cpu_us_per_dispatch"
(process CPU time, same method) is also reported: on a shared machine it is far steadier than
wall time, which other processes stretch. --kernels picks ops.py's kernel set (default: the
adapter's own, i.e. cpu on CPU adapters).

The decode step is the full per-token batch of a SmolLM2-shaped model with random weights
(embed, 30 x [matvec QKV + fused RMSNorm, RoPE + KV append, attention, matvec O + residual,
matvec gate|up + fused RMSNorm, matvec down + fused SwiGLU + residual], final-norm logits
matvec, argmax; 184 dispatches, one submit, 8 bytes read back), timed end to end, with the
Python recording + encoding time reported separately.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import numpy as np

from .device import Device
from .ops import Ops
from .reference import Q4_0, Q4_1, Q8_0, TYPE_NAMES, random_weights, row_bytes

# SmolLM2-135M: 30 layers, hidden 576, 9 heads / 3 KV heads, head_dim 64, ffn 1536, vocab 49152.
SMOL = dict(n_layers=30, dim=576, n_heads=9, n_kv=3, hd=64, ffn=1536, vocab=49152)


_process_time = getattr(time, "process_time", None)  # Pyodide: no per-process CPU clock worth reading


async def _time_batch(dev: Device, record, reps: int, rounds: int = 3) -> tuple[float, float | None]:
    """(wall, process CPU) seconds per op of `record(batch)` repeated reps times in one pass."""
    async def once(n):
        b = dev.batch("bench")
        for _ in range(n):
            record(b)
        t = time.perf_counter()
        c = _process_time() if _process_time else 0.0
        b.submit()
        await dev.wait()
        return time.perf_counter() - t, (_process_time() - c) if _process_time else 0.0

    await once(1)  # warm up: pipelines, bind groups, ring buffer
    empty = [await once(0) for _ in range(3)]
    runs = [await once(reps) for _ in range(rounds)]
    wall = max(min(w for w, _ in runs) - min(w for w, _ in empty), 0.0) / reps
    cpu = max(min(c for _, c in runs) - min(c for _, c in empty), 0.0) / reps
    return wall, (cpu if _process_time else None)


class SyntheticDecoder:
    """SmolLM2-shaped decode step on random weights (bench only; the real model is tabmesh.model)."""

    def __init__(self, dev: Device, ops: Ops, rng, n_layers: int, ctx: int):
        s = SMOL
        self.dev, self.ops, self.ctx, self.n_layers = dev, ops, ctx, n_layers
        d, nh, nkv, hd, ffn, vocab = s["dim"], s["n_heads"], s["n_kv"], s["hd"], s["ffn"], s["vocab"]
        self.shape = (d, nh, nkv, hd, ffn, vocab)
        qkv = (nh + 2 * nkv) * hd
        up, f32 = dev.upload, lambda n: dev.create_buffer(n * 4)  # noqa: E731
        self.emb = up(random_weights(rng, Q8_0, vocab, d))
        self.layers = [dict(qkv=up(random_weights(rng, Q4_1, qkv, d)), o=up(random_weights(rng, Q4_1, d, nh * hd)),
                            gu=up(random_weights(rng, Q4_1, 2 * ffn, d)), down=up(random_weights(rng, Q4_1, d, ffn)),
                            n1=up(np.ones(d, np.float32)), n2=up(np.ones(d, np.float32)),
                            cache=f32(2 * nkv * ctx * hd)) for _ in range(n_layers)]
        self.out_norm = up(np.ones(d, np.float32))
        self.ids, self.h, self.qkv, self.att = f32(4), f32(d), f32(qkv), f32(nh * hd)
        self.gu, self.logits, self.best = f32(2 * ffn), f32(vocab), f32(2)
        self.weight_bytes = sum(b.size for lw in self.layers for k, b in lw.items() if k not in ("cache", "n1", "n2"))
        self.weight_bytes += self.emb.size

    def record(self, token: int, pos: int):
        o, (d, nh, nkv, hd, ffn, vocab), ctx = self.ops, self.shape, self.ctx
        b = self.dev.batch("decode")
        self.dev.write(self.ids, np.array([token], np.uint32))
        o.embed(b, self.ids, self.emb, self.h, qtype=Q8_0, n_tokens=1, dim=d)
        for lw in self.layers:
            o.matvec(b, lw["qkv"], self.h, self.qkv, qtype=Q4_1, rows=(nh + 2 * nkv) * hd, k=d, norm_weight=lw["n1"])
            o.rope_kv(b, self.qkv, lw["cache"], n_tokens=1, n_heads=nh, n_kv_heads=nkv, head_dim=hd, ctx=ctx,
                      pos0=pos, base=1e5, neox=False, k_off=0, v_off=nkv * ctx * hd)
            o.attention(b, self.qkv, lw["cache"], self.att, n_tokens=1, n_heads=nh, n_kv_heads=nkv, head_dim=hd,
                        ctx=ctx, pos0=pos, k_off=0, v_off=nkv * ctx * hd, q_stride=(nh + 2 * nkv) * hd)
            o.matvec(b, lw["o"], self.att, self.h, qtype=Q4_1, rows=d, k=nh * hd, accumulate=True)
            o.matvec(b, lw["gu"], self.h, self.gu, qtype=Q4_1, rows=2 * ffn, k=d, norm_weight=lw["n2"])
            o.matvec(b, lw["down"], self.gu, self.h, qtype=Q4_1, rows=d, k=ffn, silu_up_off=ffn, accumulate=True)
        o.matvec(b, self.emb, self.h, self.logits, qtype=Q8_0, rows=vocab, k=d, norm_weight=self.out_norm)
        o.argmax(b, self.logits, self.best, n=vocab)
        b.read(self.best)
        return b

    async def step_times(self, pos: int, steps: int) -> dict:
        await (self.record(1, pos)).run()  # warm up bind groups
        rec, total, cpu = [], [], []
        for i in range(steps):
            t0 = time.perf_counter()
            c0 = _process_time() if _process_time else 0.0
            b = self.record(1 + i, pos)
            t1 = time.perf_counter()
            await b.run()
            t2 = time.perf_counter()
            rec.append(t1 - t0)
            total.append(t2 - t0)
            cpu.append((_process_time() - c0) if _process_time else 0.0)
        n_disp = len(b._dispatches)
        med = float(np.median(total))
        out = {"dispatches": n_disp, "ms_per_token": round(med * 1e3, 3), "tokens_per_s": round(1 / med, 1),
               "ms_python_recording": round(float(np.median(rec)) * 1e3, 3),
               "weight_mb": round(self.weight_bytes / 1e6, 1)}
        if _process_time:  # CPU adapters natively: adapter threads + Python, all cores summed
            out["cpu_ms_per_token"] = round(float(np.median(cpu)) * 1e3, 3)
        return out


async def bench(dev: Device, reps: int = 50, quick: bool = False, ctx: int = 512,
                cpu_kernels: bool | None = None) -> dict:
    rng = np.random.default_rng(0)
    ops = await Ops.create(dev, head_dim=SMOL["hd"], matrix_types=(Q4_0, Q4_1, Q8_0), cpu_kernels=cpu_kernels)
    on_cpu = bool(dev.info.get("cpu_adapter"))
    rounds = 5 if on_cpu else 3
    d, nh, nkv, hd, ffn, vocab = (SMOL[k] for k in ("dim", "n_heads", "n_kv", "hd", "ffn", "vocab"))
    qkv_rows = (nh + 2 * nkv) * hd
    f32 = lambda n: dev.upload(rng.normal(size=n).astype(np.float32))  # noqa: E731
    logits, hid, qkv, gu = f32(vocab), f32(d), f32(qkv_rows * 128), f32(2 * ffn * 128)
    out = dev.create_buffer(max(vocab, 2 * ffn * 128) * 4)
    cache = f32(2 * nkv * ctx * hd)
    norm_w = f32(d)
    results: dict = {"device": dev.info.get("device"), "backend": dev.info.get("backend"), "reps": reps,
                     "kernels": "cpu" if ops.cpu else "gpu",
                     "us_per_dispatch": {}, "matvec_gbps": {}, "matmul_gflops": {}}
    us = results["us_per_dispatch"]
    cpu_us = results["cpu_us_per_dispatch"] = {}

    async def timed(name, record, n=reps):
        wall, cpu = await _time_batch(dev, record, n, rounds)
        us[name] = round(wall * 1e6, 2)
        if cpu is not None:
            cpu_us[name] = round(cpu * 1e6, 2)

    att = dict(n_heads=nh, n_kv_heads=nkv, head_dim=hd, ctx=ctx, k_off=0, v_off=nkv * ctx * hd, q_stride=qkv_rows)
    await timed("noop_add_1", lambda b: ops.add(b, out, hid, n=1))
    await timed("rmsnorm_576", lambda b: ops.rmsnorm(b, hid, norm_w, out, n_rows=1, n=d, eps=1e-5))
    await timed("rope_kv_1tok", lambda b: ops.rope_kv(b, qkv, cache, n_tokens=1, n_heads=nh, n_kv_heads=nkv,
                                                      head_dim=hd, ctx=ctx, pos0=ctx - 1, base=1e5, neox=False,
                                                      k_off=0, v_off=nkv * ctx * hd))
    await timed("attention_decode_ctx128", lambda b: ops.attention(b, qkv, cache, out, n_tokens=1, pos0=127, **att))
    await timed(f"attention_decode_ctx{ctx}_split", lambda b: ops.attention(b, qkv, cache, out, n_tokens=1,
                                                                             pos0=ctx - 1, **att), max(2, reps // 2))
    await timed("attention_prefill_128", lambda b: ops.attention(b, qkv, cache, out, n_tokens=128, pos0=0, **att),
                max(2, reps // 10))
    await timed("silu_mul_1536", lambda b: ops.silu_mul(b, gu, out, n_tokens=1, n=ffn))
    await timed("argmax_49152", lambda b: ops.argmax(b, logits, out, n=vocab))
    await timed("attention_decode_ctx24", lambda b: ops.attention(b, qkv, cache, out, n_tokens=1, pos0=23, **att))
    if ops.cpu:  # the input of a CPU matvec into its texture (ops.py): plain, RMSNorm, SwiGLU
        xt = ops._x_texture(ffn)
        for mode, label in ((0, "copy"), (1, "rmsnorm"), (2, "silu")):
            await timed(f"xprep_cpu_{label}_{d if mode < 2 else ffn}", lambda b, mode=mode: b.dispatch(
                ops.k[f"xprep_cpu_{mode}"], (1, 1, 1), x=gu, nw=norm_w, xt=xt, k=d if mode < 2 else ffn, x_off=0,
                up_off=ffn, eps=1e-5, x_stride=0))

    # (name, qtype, rows, k): the model's matrices (fused QKV and gate|up) and large ones.
    shapes = [("qkv", Q4_1, qkv_rows, d), ("wo", Q4_1, d, d), ("gate_up", Q4_1, 2 * ffn, d),
              ("down", Q4_1, d, ffn), ("logits", Q8_0, vocab, d)]
    if not quick:
        shapes += [("big", t, 8192, 4096) for t in (Q4_0, Q4_1, Q8_0)]
    for name, qtype, rows, k in shapes:
        w = dev.upload(random_weights(rng, qtype, rows, k))
        y = dev.create_buffer(rows * 4)
        xin = dev.create_buffer(2 * k * 4)
        n = reps if rows * k < 1 << 24 else max(3, reps // 10)
        key = f"matvec_{TYPE_NAMES[qtype]}_{name}_{rows}x{k}"
        await timed(key, lambda b: ops.matvec(b, w, xin, y, qtype=qtype, rows=rows, k=k), n)
        if name in ("qkv", "gate_up", "logits"):  # as decode calls them: final RMSNorm fused
            await timed(key + "_rmsnorm", lambda b: ops.matvec(b, w, xin, y, qtype=qtype, rows=rows, k=k,
                                                                norm_weight=norm_w), n)
        if name == "down":  # SwiGLU of a gate|up input fused
            await timed(key + "_silu", lambda b: ops.matvec(b, w, xin, y, qtype=qtype, rows=rows, k=k,
                                                             silu_up_off=k), n)
        secs = us[key] * 1e-6
        results["matvec_gbps"][key] = round(rows * row_bytes(qtype, k) / secs / 1e9, 1) if secs > 0 else None
        if name in ("gate_up", "big") and qtype == Q4_1:
            n_tok = 128
            xt = dev.create_buffer(n_tok * k * 4)
            yt = dev.create_buffer(n_tok * rows * 4)
            mkey = f"matmul_{TYPE_NAMES[qtype]}_{name}_{n_tok}tok_{rows}x{k}"
            await timed(mkey, lambda b: ops.matmul(b, w, xt, yt, qtype=qtype, n_tokens=n_tok, rows=rows, k=k),
                        max(2, n // 5))
            results["matmul_gflops"][mkey] = round(2 * n_tok * rows * k / (us[mkey] * 1e-6) / 1e9, 1)
            dev.destroy_buffer(xt)
            dev.destroy_buffer(yt)
        for buf in (w, y, xin):
            dev.destroy_buffer(buf)

    n_layers = 4 if quick else SMOL["n_layers"]
    dec = SyntheticDecoder(dev, ops, rng, n_layers, ctx=1024)
    results[f"decode_step_{n_layers}_layers"] = {
        f"pos{pos}": await dec.step_times(pos, 5 if quick else 20) for pos in (16, 1000)}
    return results


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    quick = "--quick" in argv
    reps = int(argv[argv.index("--reps") + 1]) if "--reps" in argv else (10 if quick else 50)
    kernels = argv[argv.index("--kernels") + 1] if "--kernels" in argv else None
    if kernels not in (None, "gpu", "cpu"):
        raise SystemExit("--kernels takes gpu or cpu")

    async def run():
        from . import open_device

        dev = await open_device(backend="native")
        return await bench(dev, reps=reps, quick=quick, cpu_kernels=None if kernels is None else kernels == "cpu")

    print(json.dumps(asyncio.run(run()), indent=1))


if __name__ == "__main__":
    main()


async def advert_figures(dev: Device, reps: int = 8) -> dict:
    """The three figures a mesh node advertises (cluster_messages.Bench), measured in about a
    second with the model's own kernels: dispatch_us (an empty-ish dispatch in a pass),
    bandwidth_gbs (Q4_1 matvec of SmolLM2's gate|up matrix: weight bytes per second, what
    decode is bound by) and matmul_gflops (the same matrix times 32 tokens: prefill)."""
    rng = np.random.default_rng(0)
    ops = await Ops.create(dev, head_dim=SMOL["hd"], matrix_types=(Q4_1,))
    rounds = 2
    rows, k, n_tok = 2 * SMOL["ffn"], SMOL["dim"], 32
    w = dev.upload(random_weights(rng, Q4_1, rows, k))
    x, y = dev.create_buffer(n_tok * k * 4), dev.create_buffer(n_tok * rows * 4)
    try:
        dispatch, _ = await _time_batch(dev, lambda b: ops.add(b, y, x, n=1), reps * 4, rounds)
        matvec, _ = await _time_batch(dev, lambda b: ops.matvec(b, w, x, y, qtype=Q4_1, rows=rows, k=k), reps, rounds)
        matmul, _ = await _time_batch(dev, lambda b: ops.matmul(b, w, x, y, qtype=Q4_1, n_tokens=n_tok, rows=rows,
                                                                k=k), max(2, reps // 4), rounds)
    finally:
        for buf in (w, x, y):
            dev.destroy_buffer(buf)
    return {"dispatch_us": max(dispatch * 1e6, 0.1),
            "bandwidth_gbs": rows * row_bytes(Q4_1, k) / max(matvec, 1e-9) / 1e9,
            "matmul_gflops": 2 * n_tok * rows * k / max(matmul, 1e-9) / 1e9}


def numpy_figures(reps: int = 5) -> dict:
    """The same three figures for a tab without WebGPU (the numpy backend on the CPU)."""
    rng = np.random.default_rng(0)
    rows, k = 2 * SMOL["ffn"], SMOL["dim"]
    w = rng.standard_normal((rows, k), dtype=np.float32)
    x1, x32 = rng.standard_normal(k, dtype=np.float32), rng.standard_normal((32, k), dtype=np.float32)

    def best(fn):
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return max(min(times), 1e-9)
    return {"dispatch_us": best(lambda: np.add(x1[:1], x1[:1])) * 1e6,
            "bandwidth_gbs": w.nbytes / best(lambda: w @ x1) / 1e9,
            "matmul_gflops": 2 * 32 * rows * k / best(lambda: x32 @ w.T) / 1e9}
