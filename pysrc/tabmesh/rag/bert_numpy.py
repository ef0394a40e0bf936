"""The MiniLM (BERT) sentence encoder in plain numpy, float32: what a tab without WebGPU
embeds with, and the reference the WebGPU kernels will be checked against. Runs in Pyodide.

all-MiniLM-L6-v2 as sentence-transformers runs it: BertModel -> mean pooling over the
non-padding tokens -> L2 normalization. Per batch (B texts padded to T tokens, H = 384):

    x = LayerNorm(word_emb[ids] + pos_emb[0..T) + type_emb[type_ids])          # (B, T, H)
    6 x (post-LayerNorm, as BERT does):
        q, k, v = split(x @ w_qkv + b_qkv)                   # 12 heads of 32
        a = softmax(q k^T / sqrt(32) + mask_bias) v          # padded keys: float32 min, as
                                                             # HF (dropped under right padding)
        x = LayerNorm(x + a @ w_o + b_o)
        x = LayerNorm(x + gelu(x @ w_in + b_in) @ w_out + b_out)    # 1536 wide, exact (erf) GELU
    e = sum_t(x * m) / sum_t(m)                              # m: attention mask
    e = e / max(|e|, 1e-12)

Weights are stored as torch nn.Linear does, (out, in); they are transposed once at load
to (in, out) so every matmul is ``x @ w``, and q/k/v are fused into one (H, 3H) matrix.
Attention runs one sequence and a block of query rows at a time (ATTN_BLOCK), the FFN in
blocks of FFN_ROWS rows, so the big intermediates ((12, T, T) scores, (tokens, 1536)
activations) never exist whole and stay in cache.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generator, Sequence

import numpy as np

from ..errors import TabmeshError
from ..jsbridge import IN_PYODIDE, run_sliced, run_steps
from .safetensors import SafetensorsFile, read_safetensors_path
from .wordpiece import Batch, Encoding, WordPieceTokenizer

if TYPE_CHECKING:
    from .bert_gpu import GPUBert

__all__ = ["BertConfigError", "BertConfig", "BertLayer", "BertWeights", "NumpyBert",
           "SentenceEmbedder", "gelu", "erf", "layer_norm"]

DEFAULT_BATCH_SIZE = 32
FFN_ROWS = 256  # rows of the (tokens, 1536) FFN activation computed at once
# query rows x keys of one attention block: per-head GEMMs of (rows, 32) x (32, keys) and
# (rows, keys) x (keys, 32) then stay under OpenBLAS's threading threshold (M*N*K <= 65536*4).
# Threads on GEMMs this small cost more than they save, and on busy cores 5-10x more.
ATTN_BLOCK = 8192
DEFAULT_MAX_BATCH_TOKENS = 4096  # padded tokens a batch: bounds its activations (~50 MiB)
TAB_PIECE_ROWS = 32  # a (32, 384) x (384, 1536) matmul: ~25-50 ms of Pyodide numpy


class BertConfigError(TabmeshError):
    """config.json or the weights do not describe a BERT encoder this module can run.
    The message names the field or tensor."""

    code = "bad_bert_config"


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_config_json(cls, data: str | bytes | dict) -> "BertConfig":
        """From HF config.json (text, bytes or parsed)."""
        d = json.loads(data) if isinstance(data, (str, bytes, bytearray)) else data
        if d.get("model_type", "bert") != "bert":
            raise BertConfigError(f"model_type is {d.get('model_type')!r}, expected 'bert'")
        if d.get("hidden_act", "gelu") != "gelu":
            raise BertConfigError(
                f"hidden_act {d.get('hidden_act')!r} is not supported (only 'gelu')")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise BertConfigError("only absolute position embeddings are supported")
        fields = {f: d[f] for f in cls.__dataclass_fields__ if f in d}
        cfg = cls(**fields)
        if cfg.hidden_size % cfg.num_attention_heads:
            raise BertConfigError(f"hidden_size {cfg.hidden_size} is not a multiple of "
                                  f"num_attention_heads {cfg.num_attention_heads}")
        return cfg


@dataclass
class BertLayer:
    """One encoder layer; matrices (in, out), float32."""

    w_qkv: np.ndarray  # (H, 3H): q | k | v
    b_qkv: np.ndarray  # (3H,)
    w_o: np.ndarray  # (H, H)
    b_o: np.ndarray  # (H,)
    ln1_w: np.ndarray  # (H,) after attention
    ln1_b: np.ndarray
    w_in: np.ndarray  # (H, I)
    b_in: np.ndarray  # (I,)
    w_out: np.ndarray  # (I, H)
    b_out: np.ndarray  # (H,)
    ln2_w: np.ndarray  # (H,) after the FFN
    ln2_b: np.ndarray


@dataclass
class BertWeights:
    word_emb: np.ndarray  # (vocab, H)
    pos_emb: np.ndarray  # (max_pos, H)
    type_emb: np.ndarray  # (type_vocab, H)
    emb_ln_w: np.ndarray  # (H,)
    emb_ln_b: np.ndarray
    layers: list[BertLayer]

    @classmethod
    def from_safetensors(cls, st: SafetensorsFile, cfg: BertConfig) -> "BertWeights":
        """Tensor names as BertModel saves them, with or without a "bert." prefix."""
        prefix = "bert." if "bert.embeddings.word_embeddings.weight" in st else ""
        H, I = cfg.hidden_size, cfg.intermediate_size

        def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
            full = prefix + name
            if full not in st:
                raise BertConfigError(f"tensor {full!r} is missing: not a BertModel checkpoint?")
            t = st.float32(full)
            if t.shape != shape:
                raise BertConfigError(f"tensor {full!r} has shape {t.shape}, config says {shape}")
            return t

        def linear(name: str, n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
            return (np.ascontiguousarray(get(name + ".weight", (n_out, n_in)).T),
                    get(name + ".bias", (n_out,)))

        layers = []
        for i in range(cfg.num_hidden_layers):
            p = f"encoder.layer.{i}."
            qkv = [linear(p + f"attention.self.{x}", H, H) for x in ("query", "key", "value")]
            w_o, b_o = linear(p + "attention.output.dense", H, H)
            w_in, b_in = linear(p + "intermediate.dense", H, I)
            w_out, b_out = linear(p + "output.dense", I, H)
            layers.append(BertLayer(
                w_qkv=np.concatenate([w for w, _ in qkv], axis=1),
                b_qkv=np.concatenate([b for _, b in qkv]),
                w_o=w_o, b_o=b_o,
                ln1_w=get(p + "attention.output.LayerNorm.weight", (H,)),
                ln1_b=get(p + "attention.output.LayerNorm.bias", (H,)),
                w_in=w_in, b_in=b_in, w_out=w_out, b_out=b_out,
                ln2_w=get(p + "output.LayerNorm.weight", (H,)),
                ln2_b=get(p + "output.LayerNorm.bias", (H,))))
        return cls(
            word_emb=get("embeddings.word_embeddings.weight", (cfg.vocab_size, H)),
            pos_emb=get("embeddings.position_embeddings.weight", (cfg.max_position_embeddings, H)),
            type_emb=get("embeddings.token_type_embeddings.weight", (cfg.type_vocab_size, H)),
            emb_ln_w=get("embeddings.LayerNorm.weight", (H,)),
            emb_ln_b=get("embeddings.LayerNorm.bias", (H,)),
            layers=layers)


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    """Over the last axis, biased variance, as torch.nn.LayerNorm."""
    mean = x.mean(axis=-1, keepdims=True)
    xc = x - mean
    var = np.mean(np.square(xc), axis=-1, keepdims=True)
    return xc * (1.0 / np.sqrt(var + np.float32(eps))) * w + b


# erfc(u) ~= t (a1 + a2 t + ... + a5 t^4) exp(-u^2), t = 1 / (1 + p u), u >= 0:
# Abramowitz & Stegun 7.1.26, |error| <= 1.5e-7. numpy has no erf, and math.erf per element
# is far too slow for (tokens x 1536) per layer. Every step below is one in-place pass over
# the array (numpy has no fused kernels), so the passes are kept few.
_AS_P = 0.3275911
_AS_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def _half_erfc_abs_scaled(x: np.ndarray, scale: float) -> np.ndarray:
    """erfc(|x| * scale) / 2, float32, a new array."""
    t = np.abs(x)
    t *= np.float32(_AS_P * scale)
    t += np.float32(1.0)
    np.reciprocal(t, out=t)
    poly = t * np.float32(0.5 * _AS_A[4])
    for a in _AS_A[3::-1]:
        poly += np.float32(0.5 * a)
        poly *= t
    np.square(x, out=t)
    t *= np.float32(-scale * scale)
    np.exp(t, out=t)
    poly *= t
    return poly


def erf(x: np.ndarray) -> np.ndarray:
    """Vectorized erf, float32; |error| < 6e-7 (float32 rounding included)."""
    h = _half_erfc_abs_scaled(x, 1.0)
    h *= np.float32(-2.0)
    h += np.float32(1.0)
    return np.copysign(h, x, out=h)


def gelu(x: np.ndarray) -> np.ndarray:
    """The exact GELU, x Phi(x) = x/2 (1 + erf(x / sqrt 2)), as HF's "gelu"; a new array.
    With h = erfc(|x| / sqrt 2) / 2, Phi(x) = 0.5 + copysign(0.5 - h, x): 1 - h for x >= 0,
    h for x < 0 (to within 3e-8 absolute)."""
    h = _half_erfc_abs_scaled(x, 0.7071067811865476)
    np.subtract(np.float32(0.5), h, out=h)
    np.copysign(h, x, out=h)  # (np.where is 4x slower than this and the two passes around it)
    h += np.float32(0.5)
    h *= x
    return h


class NumpyBert:
    """The encoder: ``forward`` gives the last hidden states, ``embed`` the pooled,
    normalized sentence embeddings of a padded batch.

    ``piece_rows``: token rows per matmul piece of ``forward_steps``. 0: whole projections
    and the FFN in FFN_ROWS blocks (the default natively). TAB_PIECE_ROWS (the default in a
    tab) keeps each piece a few tens of ms, so the page can run between them; Pyodide's
    numpy has no BLAS, and its matmul sums each output element on its own, so cutting rows
    changes no number there."""

    def __init__(self, cfg: BertConfig, weights: BertWeights, piece_rows: int | None = None) -> None:
        self.cfg = cfg
        self.w = weights
        self.piece_rows = (TAB_PIECE_ROWS if IN_PYODIDE else None) if piece_rows is None else piece_rows

    def _project(self, x: np.ndarray, w: np.ndarray) -> Generator[None, None, np.ndarray]:
        """x @ w, in pieces of piece_rows rows (a pause after each)."""
        n, step = x.shape[0], self.piece_rows
        if not step or n <= step:
            out = x @ w
            yield
            return out
        out = np.empty((n, w.shape[1]), np.float32)
        for r in range(0, n, step):
            np.matmul(x[r:r + step], w, out=out[r:r + step])
            yield
        return out

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                token_type_ids: np.ndarray | None = None) -> np.ndarray:
        """input_ids, attention_mask, token_type_ids (B, T) ints -> hidden (B, T, H) float32.
        Rows of padding positions are computed but meaningless."""
        return run_steps(self.forward_steps(input_ids, attention_mask, token_type_ids))

    def forward_steps(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                      token_type_ids: np.ndarray | None = None) -> Generator[None, None, np.ndarray]:
        """``forward`` in pieces: a generator that yields between its matmuls (the q/k/v
        projection, each attention block, the FFN's two projections and GELU of each row
        block) and returns forward's hidden states. A tab pauses between the pieces
        (``jsbridge.run_sliced``); the arithmetic is forward's."""
        cfg, w = self.cfg, self.w
        ids = np.asarray(input_ids)
        mask = np.asarray(attention_mask)
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise ValueError(f"input_ids {ids.shape} and attention_mask {mask.shape} must be "
                             "the same (batch, seq) shape")
        B, T = ids.shape
        if T > cfg.max_position_embeddings:
            raise ValueError(f"sequence of {T} tokens exceeds the model's "
                             f"{cfg.max_position_embeddings} positions")
        if ids.size and (ids.min() < 0 or ids.max() >= cfg.vocab_size):
            raise ValueError(f"token id out of range [0, {cfg.vocab_size})")
        types = np.zeros_like(ids) if token_type_ids is None else np.asarray(token_type_ids)
        H, nh, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
        eps = cfg.layer_norm_eps

        x = w.word_emb[ids] + w.pos_emb[:T] + w.type_emb[types]  # (B, T, H)
        x = layer_norm(x, w.emb_ln_w, w.emb_ln_b, eps).reshape(B * T, H)
        # additive key mask, as HF builds it: 0 for tokens, float32 min for padding
        bias = ((1.0 - mask.astype(np.float32)) * np.finfo(np.float32).min)[:, None, None, :]
        # where a row's mask is 1s then 0s, its padded keys are dropped rather than masked
        # (exp(-3.4e38) is exactly 0 either way); any other mask gets the additive bias
        lengths = mask.sum(axis=1)
        n_keys = [int(n) if n > 0 and mask[b, :n].all() else T for b, n in enumerate(lengths)]
        scale = np.float32(1.0 / np.sqrt(hd))
        a = np.empty((B, T, nh, hd), dtype=np.float32)  # attention output, heads side by side
        for L in w.layers:
            qkv = (yield from self._project(x, L.w_qkv)).reshape(B, T, 3, nh, hd)
            qkv += L.b_qkv.reshape(3, nh, hd)
            # (B, nh, T, hd) each, contiguous: numpy's stacked matmul is slow on strided input
            q, k, v = (np.ascontiguousarray(qkv[:, :, j].transpose(0, 2, 1, 3)) for j in range(3))
            q *= scale
            for b in range(B):  # one sequence, and a block of its queries, at a time
                n = n_keys[b]  # right padding: attend to the first n keys only, no bias needed
                kt, vb = k[b, :, :n].transpose(0, 2, 1), v[b, :, :n]  # (nh, hd, n), (nh, n, hd)
                rows = max(1, ATTN_BLOCK // n)
                for r in range(0, T, rows):
                    scores = q[b, :, r:r + rows] @ kt  # (nh, rows, n)
                    if n == T:
                        scores += bias[b]
                    scores -= scores.max(axis=-1, keepdims=True)
                    np.exp(scores, out=scores)
                    scores /= scores.sum(axis=-1, keepdims=True)
                    a[b, r:r + rows] = (scores @ vb).transpose(1, 0, 2)  # (rows, nh, hd)
                    yield
            h = yield from self._project(a.reshape(B * T, H), L.w_o)
            h += L.b_o
            h += x
            x = layer_norm(h, L.ln1_w, L.ln1_b, eps)
            out = np.empty_like(x)
            block = min(FFN_ROWS, self.piece_rows or FFN_ROWS)
            for r in range(0, B * T, block):  # row blocks: the 1536-wide part stays in cache
                xb = x[r:r + block]
                hb = xb @ L.w_in
                hb += L.b_in
                yield
                hb = gelu(hb)
                yield
                ob = hb @ L.w_out
                ob += L.b_out
                ob += xb
                out[r:r + block] = ob
                yield
            x = layer_norm(out, L.ln2_w, L.ln2_b, eps)
        return x.reshape(B, T, H)

    def embed(self, batch: Batch) -> np.ndarray:
        """Padded batch -> (B, H) mean-pooled, L2-normalized float32 embeddings."""
        return run_steps(self.embed_steps(batch))

    def embed_steps(self, batch: Batch) -> Generator[None, None, np.ndarray]:
        """``embed`` in pieces (see ``forward_steps``)."""
        hidden = yield from self.forward_steps(batch.input_ids, batch.attention_mask, batch.token_type_ids)
        m = batch.attention_mask.astype(np.float32)[:, :, None]  # (B, T, 1)
        pooled = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), np.float32(1e-9))
        norm = np.linalg.norm(pooled, axis=1, keepdims=True)
        return pooled / np.maximum(norm, np.float32(1e-12))


class SentenceEmbedder:
    """Tokenizer + encoder: texts in, (n, H) unit vectors out, as
    ``SentenceTransformer(...).encode(texts)`` gives for all-MiniLM-L6-v2.

        emb = SentenceEmbedder.from_dir("models/all-MiniLM-L6-v2")
        vecs = emb.embed(["a sentence", "another one"])     # (2, 384) float32

    Texts are sorted by length and batched (at most ``batch_size`` texts and about
    ``max_batch_tokens`` padded tokens a batch), then returned in input order; padding
    does not change a text's embedding (beyond float rounding, ~1e-7).

    The model is NumpyBert or, from ``bert_gpu.load_gpu_embedder``, GPUBert on WebGPU, whose
    ``embed`` is a coroutine: ``await emb.embed_async(texts)`` runs either one.
    """

    def __init__(self, tokenizer: WordPieceTokenizer, model: "NumpyBert | GPUBert") -> None:
        self.tokenizer = tokenizer
        self.model = model

    @classmethod
    def from_files(cls, tokenizer_json: str | bytes, safetensors: bytes | SafetensorsFile,
                   config_json: str | bytes | None = None,
                   max_seq_length: int = 256) -> "SentenceEmbedder":
        """From the files' contents (what a tab fetched)."""
        cfg = BertConfig.from_config_json(config_json) if config_json is not None else BertConfig()
        if max_seq_length > cfg.max_position_embeddings:
            raise BertConfigError(f"max_seq_length {max_seq_length} exceeds the model's "
                                  f"{cfg.max_position_embeddings} positions")
        st = (safetensors if isinstance(safetensors, SafetensorsFile)
              else SafetensorsFile(safetensors))
        tok = WordPieceTokenizer.from_tokenizer_json(tokenizer_json, max_length=max_seq_length)
        return cls(tok, NumpyBert(cfg, BertWeights.from_safetensors(st, cfg)))

    @classmethod
    def from_dir(cls, path: str) -> "SentenceEmbedder":
        """From a sentence-transformers model folder: tokenizer.json, model.safetensors,
        config.json, and max_seq_length from sentence_bert_config.json (default 256)."""
        def read(name: str) -> str:
            with open(os.path.join(path, name), encoding="utf-8") as f:
                return f.read()
        max_len = 256
        if os.path.exists(os.path.join(path, "sentence_bert_config.json")):
            max_len = int(json.loads(read("sentence_bert_config.json")).get("max_seq_length", 256))
        return cls.from_files(read("tokenizer.json"),
                              read_safetensors_path(os.path.join(path, "model.safetensors")),
                              read("config.json"), max_seq_length=max_len)

    def encode_texts(self, texts: Sequence[str]) -> list[Encoding]:
        return [self.tokenizer.encode(t) for t in texts]

    def embed(self, texts: Sequence[str], batch_size: int = DEFAULT_BATCH_SIZE,
              max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS) -> np.ndarray:
        """(len(texts), H) float32, each row of unit length."""
        if inspect.iscoroutinefunction(self.model.embed):
            raise TypeError(f"this embedder's model ({type(self.model).__name__}) runs on the GPU: "
                            "use `await embedder.embed_async(texts)`")
        out, plan, _ = self._plan(texts, batch_size, max_batch_tokens)
        for rows, batch in plan:
            out[rows] = self.model.embed(batch)
        return out

    async def embed_async(self, texts: Sequence[str], batch_size: int = DEFAULT_BATCH_SIZE,
                          max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS) -> np.ndarray:
        """``embed`` for either model: awaits one whose ``embed`` is a coroutine (GPUBert,
        rag/bert_gpu.py), runs NumpyBert's in pieces with pauses for the browser between
        them (``jsbridge.run_sliced``: the same numbers as ``embed``)."""
        return (await self.embed_counted(texts, batch_size, max_batch_tokens))[0]

    async def embed_counted(self, texts: Sequence[str], batch_size: int = DEFAULT_BATCH_SIZE,
                            max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS) -> tuple[np.ndarray, int]:
        """``embed_async`` plus the number of tokens the texts were cut into (API usage)."""
        out, plan, n_tokens = self._plan(texts, batch_size, max_batch_tokens)
        steps = getattr(self.model, "embed_steps", None)
        for rows, batch in plan:
            if steps is not None:  # numpy, on the page's thread in a tab: pause between pieces
                out[rows] = await run_sliced(steps(batch))
            else:
                vecs = self.model.embed(batch)
                out[rows] = await vecs if inspect.isawaitable(vecs) else vecs
        return out, n_tokens

    def _plan(self, texts: Sequence[str], batch_size: int, max_batch_tokens: int):
        """The zeroed (len(texts), H) output, lazily (rows, padded Batch) per batch, and the
        token count."""
        if isinstance(texts, str):
            raise TypeError("embed takes a list of texts; wrap a single text in a list")
        encs = self.encode_texts(texts)
        out = np.zeros((len(encs), self.model.cfg.hidden_size), dtype=np.float32)
        plan = ((rows, self.tokenizer.pad([encs[i] for i in rows]))
                for rows in self.batches(encs, batch_size, max_batch_tokens))
        return out, plan, sum(len(e.ids) for e in encs)

    @staticmethod
    def batches(encs: Sequence[Encoding], batch_size: int,
                max_batch_tokens: int) -> list[list[int]]:
        """Indices of ``encs`` grouped longest first, so each batch pads little: a batch
        ends at batch_size texts, at max_batch_tokens padded tokens, or before a text
        shorter than 3/4 of its longest one."""
        order = sorted(range(len(encs)), key=lambda i: -len(encs[i].ids))
        groups: list[list[int]] = []
        cur: list[int] = []
        for i in order:
            width = len(encs[cur[0]].ids) if cur else len(encs[i].ids)  # longest comes first
            if cur and (len(cur) >= batch_size or (len(cur) + 1) * width > max_batch_tokens
                        or 4 * len(encs[i].ids) < 3 * width):  # > 25% of it would be padding
                groups.append(cur)
                cur = []
            cur.append(i)
        if cur:
            groups.append(cur)
        return groups
