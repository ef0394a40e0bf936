"""The ops composed into a tiny Llama: batched prefill, then decode with one submit per token.

Not the model code (that lives in tabmesh.model); this checks that the kernels fit together
with the layouts ops.py documents: fused QKV rows, a [K heads | V heads] cache per layer,
RMSNorm and SwiGLU folded into the decode matvecs, residual adds fused as accumulate=True,
tied Q8_0 embeddings as the logits matrix, argmax read back as 8 bytes.
Tolerance: logits within 1e-5 * max|logit| of a float64 numpy forward over the same
dequantized weights (two layers of f32 sums of <= 128 terms; observed: ~2e-7).
"""

import numpy as np
import pytest

from tabmesh.gpu import reference as ref
from tabmesh.gpu.ops import Ops
from tabmesh.gpu.reference import Q4_1, Q8_0

L, DIM, NH, NKV, HD, FFN, VOCAB, CTX, BASE, EPS = 2, 64, 4, 2, 16, 128, 96, 32, 10000.0, 1e-5
QKV = (NH + 2 * NKV) * HD


def make_weights(rng):
    w = {"emb": ref.random_weights(rng, Q8_0, VOCAB, DIM, scale=1.0),
         "out_norm": rng.normal(1, 0.1, DIM).astype(np.float32)}
    for i in range(L):
        w[i] = {"attn_norm": rng.normal(1, 0.1, DIM).astype(np.float32),
                "ffn_norm": rng.normal(1, 0.1, DIM).astype(np.float32),
                "qkv": ref.random_weights(rng, Q4_1, QKV, DIM, scale=0.2),  # wq|wk|wv rows concatenated
                "o": ref.random_weights(rng, Q4_1, DIM, NH * HD, scale=0.1),
                "gate_up": ref.random_weights(rng, Q4_1, 2 * FFN, DIM, scale=0.2),
                "down": ref.random_weights(rng, Q4_1, DIM, FFN, scale=0.1)}
    return w


def numpy_forward(w, tokens):
    """float64 forward over all tokens; returns logits of every position."""
    deq = lambda raw, rows, k: ref.dequantize(raw, Q4_1, (rows, k)).astype(np.float64)  # noqa: E731
    emb = ref.dequantize(w["emb"], Q8_0, (VOCAB, DIM)).astype(np.float64)
    h = emb[tokens]
    n = len(tokens)
    for i in range(L):
        lw = w[i]
        x = ref.rmsnorm(h, lw["attn_norm"], EPS)
        qkv = (x @ deq(lw["qkv"], QKV, DIM).T).reshape(n, NH + 2 * NKV, HD)
        q = ref.rope(qkv[:, :NH], 0, BASE, False)
        k = ref.rope(qkv[:, NH:NH + NKV], 0, BASE, False)
        att = ref.attention(q, k.transpose(1, 0, 2), qkv[:, NH + NKV:].transpose(1, 0, 2), 0, HD ** -0.5)
        h = h + att.reshape(n, -1) @ deq(lw["o"], DIM, NH * HD).T
        x = ref.rmsnorm(h, lw["ffn_norm"], EPS)
        gu = x @ deq(lw["gate_up"], 2 * FFN, DIM).T
        h = h + ref.silu_mul(gu[:, :FFN], gu[:, FFN:]) @ deq(lw["down"], DIM, FFN).T
    return ref.rmsnorm(h, w["out_norm"], EPS) @ emb.T


class TinyLlama:
    def __init__(self, dev, ops, w):
        self.dev, self.ops = dev, ops
        up = dev.upload
        self.emb, self.out_norm = up(w["emb"]), up(w["out_norm"])
        self.layers = [{k: up(v) for k, v in w[i].items()} for i in range(L)]
        self.cache = [dev.create_buffer(2 * NKV * CTX * HD * 4, f"kv{i}") for i in range(L)]  # [K heads | V heads]
        f32 = lambda n, label: dev.create_buffer(n * 4, label)  # noqa: E731
        self.ids, self.h, self.xn = f32(CTX, "ids"), f32(CTX * DIM, "h"), f32(CTX * DIM, "xn")
        self.qkv, self.att = f32(CTX * QKV, "qkv"), f32(CTX * NH * HD, "att")
        self.gu, self.act = f32(CTX * 2 * FFN, "gu"), f32(CTX * FFN, "act")
        self.logits, self.best = f32(VOCAB, "logits"), f32(2, "argmax")

    def _kv(self, b, i, n, pos0):
        o = self.ops
        o.rope_kv(b, self.qkv, self.cache[i], n_tokens=n, n_heads=NH, n_kv_heads=NKV, head_dim=HD, ctx=CTX,
                  pos0=pos0, base=BASE, neox=False, k_off=0, v_off=NKV * CTX * HD)
        o.attention(b, self.qkv, self.cache[i], self.att, n_tokens=n, n_heads=NH, n_kv_heads=NKV, head_dim=HD,
                    ctx=CTX, pos0=pos0, k_off=0, v_off=NKV * CTX * HD, q_stride=QKV)

    def _head(self, b, h_off):
        self.ops.matvec(b, self.emb, self.h, self.logits, qtype=Q8_0, rows=VOCAB, k=DIM, x_off=h_off,
                        norm_weight=self.out_norm, eps=EPS)
        self.ops.argmax(b, self.logits, self.best, n=VOCAB)

    async def prefill(self, tokens):
        """All prompt tokens through batched kernels in one submit; logits of the last one."""
        o, n, b = self.ops, len(tokens), self.dev.batch("prefill")
        self.dev.write(self.ids, np.asarray(tokens, np.uint32))
        o.embed(b, self.ids, self.emb, self.h, qtype=Q8_0, n_tokens=n, dim=DIM)
        for i, lw in enumerate(self.layers):
            o.rmsnorm(b, self.h, lw["attn_norm"], self.xn, n_rows=n, n=DIM, eps=EPS)
            o.matmul(b, lw["qkv"], self.xn, self.qkv, qtype=Q4_1, n_tokens=n, rows=QKV, k=DIM)
            self._kv(b, i, n, 0)
            o.matmul(b, lw["o"], self.att, self.h, qtype=Q4_1, n_tokens=n, rows=DIM, k=NH * HD, accumulate=True)
            o.rmsnorm(b, self.h, lw["ffn_norm"], self.xn, n_rows=n, n=DIM, eps=EPS)
            o.matmul(b, lw["gate_up"], self.xn, self.gu, qtype=Q4_1, n_tokens=n, rows=2 * FFN, k=DIM)
            o.silu_mul(b, self.gu, self.act, n_tokens=n, n=FFN)
            o.matmul(b, lw["down"], self.act, self.h, qtype=Q4_1, n_tokens=n, rows=DIM, k=FFN, accumulate=True)
        self._head(b, (n - 1) * DIM)
        return await self._finish(b)

    async def decode(self, token, pos):
        """One token: 1 + 6 per layer + 2 dispatches (CPU-adapter kernels: every matvec is two, its
        input into a texture (with the RMSNorm / SwiGLU) and the product, + 1 for the second argmax
        pass), one submit, logits and argmax back."""
        o, b = self.ops, self.dev.batch("decode")
        self.dev.write(self.ids, np.array([token], np.uint32))
        o.embed(b, self.ids, self.emb, self.h, qtype=Q8_0, n_tokens=1, dim=DIM)
        for i, lw in enumerate(self.layers):
            o.matvec(b, lw["qkv"], self.h, self.qkv, qtype=Q4_1, rows=QKV, k=DIM, norm_weight=lw["attn_norm"], eps=EPS)
            self._kv(b, i, 1, pos)
            o.matvec(b, lw["o"], self.att, self.h, qtype=Q4_1, rows=DIM, k=NH * HD, accumulate=True)
            o.matvec(b, lw["gate_up"], self.h, self.gu, qtype=Q4_1, rows=2 * FFN, k=DIM, norm_weight=lw["ffn_norm"],
                     eps=EPS)
            o.matvec(b, lw["down"], self.gu, self.h, qtype=Q4_1, rows=DIM, k=FFN, silu_up_off=FFN, accumulate=True)
        self._head(b, 0)
        assert len(b._dispatches) == (1 + 10 * L + 4 if self.ops.cpu else 1 + 6 * L + 2)
        return await self._finish(b)

    async def _finish(self, b):
        i_logits, i_best = b.read(self.logits), b.read(self.best)
        res = await b.run()
        return np.frombuffer(res[i_logits], np.float32), int(np.frombuffer(res[i_best], np.uint32)[0])


@pytest.fixture(scope="module", params=[False, True], ids=["gpu-kernels", "cpu-kernels"])
def tiny(gpu, arun, request):
    ops = arun(Ops.create(gpu, head_dim=HD, matrix_types=(Q4_1, Q8_0), embed_types=(Q8_0,), cpu_kernels=request.param))
    w = make_weights(np.random.default_rng(2024))
    return TinyLlama(gpu, ops, w), w


def test_prefill_then_greedy_decode_matches_numpy(tiny, arun):
    model, w = tiny
    tokens = [5, 17, 90, 3, 42, 42, 7]
    logits, best = arun(model.prefill(tokens))
    want = numpy_forward(w, tokens)
    scale = np.abs(want[-1]).max()
    np.testing.assert_allclose(logits, want[-1], rtol=0, atol=1e-5 * scale)
    assert best == int(np.argmax(logits))
    for step in range(4):  # greedy decode: one batch (one submit) per token
        tokens.append(best)
        logits, best = arun(model.decode(tokens[-1], len(tokens) - 1))
        want = numpy_forward(w, tokens)[-1]
        np.testing.assert_allclose(logits, want, rtol=0, atol=1e-5 * np.abs(want).max(), err_msg=f"step {step}")
        assert best == int(np.argmax(logits))
