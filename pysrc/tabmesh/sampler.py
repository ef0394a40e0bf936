"""Choosing the next token from a model's logits, in plain numpy.

The chain, in llama.cpp's order (``common_sampler``: logit_bias, penalties, top_k,
top_p, min_p, temperature, dist), each step working on what the previous one left:

    1. logit_bias          logits[t] += bias[t]                     (OpenAI ``logit_bias``)
    2. penalties           repeat: l / r if l > 0 else l * r        (llama.cpp ``repeat_penalty``)
                           then  l -= count[t] * frequency + (count[t] > 0) * presence
    3. constraint          tokens a constraint forbids (JSON mode) get -inf
    --- greedy (temperature == 0 or top_k == 1) stops here: argmax, lowest id on ties ---
    4. top_k               keep the k highest logits                (k == 0: off)
    5. top_p               keep the most likely tokens until their probability mass,
                           renormalised over what is left, reaches top_p (at least one)
    6. min_p               keep tokens with p >= min_p * p_max       (min_p == 0: off)
    7. temperature         logits / temperature
    8. sample              softmax, then one draw u ~ U[0, 1) from a PCG64 generator,
                           inverse-CDF over the candidates sorted by (logit desc, id asc)

top_p and min_p therefore see the temperature-1 distribution, as in llama.cpp; the
temperature only reshapes what they kept.

Penalty windows (the issue names both conventions; each is kept where it comes from):
- ``repetition_penalty`` (llama.cpp's ``repeat_penalty``) looks at the last
  ``repeat_last_n`` tokens of prompt + generated text (llama.cpp's default 64; -1: all).
- ``frequency_penalty`` / ``presence_penalty`` count the tokens *generated so far*, as
  OpenAI defines them ("how often token j was sampled prior to the current position").
  Counting the prompt would penalise the chat template's own markup.

Reproducibility: every sampled token costs exactly one ``rng.random()`` draw and the
candidate order is total, so the same seed, logits and parameters give the same tokens
on every machine numpy runs on (CPython, Pyodide). Greedy draws nothing.

When greedy and nothing needs the logits (no penalty, bias or constraint),
``Sampler.needs_logits`` is False: the engine then asks the model for its argmax and
reads back one integer instead of ``n_vocab`` floats.
"""

from __future__ import annotations

import math
import secrets
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence

import numpy as np

DEFAULT_REPEAT_LAST_N = 64  # llama.cpp's penalty_last_n


class LogitConstraint(Protocol):
    """What the sampler needs from a constraint (see json_constraint.JsonConstraint)."""

    def mask(self, logits: np.ndarray, limit: int) -> np.ndarray:
        """``logits`` with every forbidden token at -inf; only the ``limit`` most likely
        allowed tokens need to be kept (a cost bound, not a promise of exactly ``limit``)."""

    def accept(self, token: int) -> None:
        """Advance past a token that was chosen."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. Defaults are OpenAI's (temperature 1, top_p 1) with every
    llama.cpp extra (top_k, min_p, repetition_penalty) off."""

    temperature: float = 1.0          # 0: greedy; OpenAI range 0..2
    top_p: float = 1.0                # 0..1; 1: off
    top_k: int = 0                    # >= 0; 0: off; 1: greedy
    min_p: float = 0.0                # 0..1; 0: off
    frequency_penalty: float = 0.0    # -2..2, per occurrence in the generated tokens
    presence_penalty: float = 0.0     # -2..2, once per token present in the generated tokens
    repetition_penalty: float = 1.0   # > 0; 1: off; over the last repeat_last_n tokens
    repeat_last_n: int = DEFAULT_REPEAT_LAST_N
    logit_bias: Mapping[int, float] = field(default_factory=dict)  # token id -> -100..100

    def __post_init__(self) -> None:
        # API validation gives users the friendly message; this guards direct callers.
        checks = [
            (self.temperature >= 0 and math.isfinite(self.temperature), "temperature must be >= 0"),
            (0 <= self.top_p <= 1, "top_p must be in 0..1"),
            (self.top_k >= 0, "top_k must be >= 0 (0 turns it off)"),
            (0 <= self.min_p <= 1, "min_p must be in 0..1"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0 (1 turns it off)"),
            (self.repeat_last_n >= -1, "repeat_last_n must be >= -1 (-1: the whole context)"),
            (math.isfinite(self.frequency_penalty) and math.isfinite(self.presence_penalty),
             "frequency_penalty and presence_penalty must be finite"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message}; got {self}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return (self.frequency_penalty != 0 or self.presence_penalty != 0
                or (self.repetition_penalty != 1 and self.repeat_last_n != 0))


def rng_from_seed(seed: int) -> np.random.Generator:
    """The generator a seed stands for; any Python int (negative ones wrap to 64 bits)."""
    return np.random.Generator(np.random.PCG64(int(seed) % (1 << 64)))


class Sampler:
    """One generation's sampling state: the RNG, the token history the penalties see,
    and an optional constraint.

        s = Sampler(params, seed=42, prompt_tokens=prompt)
        tok = s.sample(logits) if s.needs_logits else model_argmax
        s.accept(tok)
    """

    def __init__(self, params: SamplingParams, seed: int | None = None,
                 prompt_tokens: Sequence[int] = (), constraint: LogitConstraint | None = None) -> None:
        self.params = params
        self.seed = secrets.randbits(63) if seed is None else int(seed)  # kept so a run can be repeated
        self.rng = rng_from_seed(self.seed)
        self.constraint = constraint
        n = params.repeat_last_n
        self._recent: deque[int] = deque(prompt_tokens, maxlen=None if n < 0 else n)
        self._generated: Counter[int] = Counter()
        bias = dict(params.logit_bias)
        self._bias_ids = np.fromiter(bias.keys(), np.int64, len(bias))
        self._bias_vals = np.fromiter(bias.values(), np.float64, len(bias))

    @property
    def needs_logits(self) -> bool:
        """False when the model's argmax is the answer (greedy, nothing to adjust)."""
        p = self.params
        return not (p.greedy and not p.has_penalties and not len(self._bias_ids) and self.constraint is None)

    def accept(self, token: int) -> None:
        """Record a chosen token (sampled here, or the model's argmax)."""
        token = int(token)
        self._recent.append(token)
        self._generated[token] += 1
        if self.constraint is not None:
            self.constraint.accept(token)

    def adjust(self, logits: np.ndarray) -> np.ndarray:
        """Steps 1-3: a float64 copy of ``logits`` with bias, penalties and the constraint applied."""
        p = self.params
        x = np.array(logits, dtype=np.float64).reshape(-1)  # (n_vocab,)
        if len(self._bias_ids):
            ok = (self._bias_ids >= 0) & (self._bias_ids < x.size)
            np.add.at(x, self._bias_ids[ok], self._bias_vals[ok])
        if p.repetition_penalty != 1 and self._recent:
            ids = np.fromiter(set(self._recent), np.int64)
            ids = ids[(ids >= 0) & (ids < x.size)]
            v = x[ids]
            x[ids] = np.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and self._generated:
            ids = np.fromiter(self._generated.keys(), np.int64, len(self._generated))
            counts = np.fromiter(self._generated.values(), np.float64, len(self._generated))
            ok = (ids >= 0) & (ids < x.size)
            x[ids[ok]] -= counts[ok] * p.frequency_penalty + p.presence_penalty
        if self.constraint is not None:
            limit = 1 if p.greedy else max(p.top_k, 128)
            x = self.constraint.mask(x, limit)
        return x

    def distribution(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Steps 1-7: (token ids, their probabilities), most likely first. Greedy: the
        argmax alone, with probability 1."""
        x = self.adjust(logits)
        if self.params.greedy:
            best = int(np.argmax(x))  # first maximum: the lowest id wins ties
            if not np.isfinite(x[best]):
                raise ValueError("every token has a logit of -inf: nothing can be sampled")
            return np.array([best]), np.ones(1)
        ids, z = candidates(x, self.params)
        return ids, softmax(z / self.params.temperature)

    def sample(self, logits: np.ndarray) -> int:
        """The next token for these logits (float [n_vocab]); does not ``accept`` it."""
        ids, probs = self.distribution(logits)
        if self.params.greedy:
            return int(ids[0])
        return int(ids[draw(probs, self.rng.random())])


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def draw(probs: np.ndarray, u: float) -> int:
    """Inverse CDF: the index i with cdf[i-1] <= u < cdf[i] (u in [0, 1))."""
    cdf = np.cumsum(probs)
    return min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), len(probs) - 1)


def candidates(x: np.ndarray, p: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """Steps 4-6: the surviving token ids and their logits, most likely first (ties: lower id).

    Raises ValueError when every logit is -inf (nothing can be sampled)."""
    ids = np.flatnonzero(np.isfinite(x))
    if ids.size == 0:
        raise ValueError("every token has a logit of -inf: nothing can be sampled")
    if 0 < p.top_k < ids.size:
        part = np.argpartition(-x[ids], p.top_k - 1)[:p.top_k]
        kth = x[ids[part]].min()
        ids = ids[x[ids] >= kth]  # keep ties at the cut so the choice does not depend on argpartition
    order = np.lexsort((ids, -x[ids]))
    ids = ids[order]
    if 0 < p.top_k < ids.size:
        ids = ids[:p.top_k]
    z = x[ids]
    if p.top_p < 1:
        cum = np.cumsum(softmax(z))
        keep = int(np.searchsorted(cum, p.top_p, side="left")) + 1  # first index reaching top_p
        ids, z = ids[:keep], z[:keep]
    if p.min_p > 0 and ids.size > 1:
        keep = z >= z[0] + math.log(p.min_p)  # p >= min_p * p_max, in logit space
        ids, z = ids[keep], z[keep]
    return ids, z
