"""The generation loop: prompt tokens in, token ids and text deltas out.

    engine = Engine(model, tokenizer, chat_template, model_id="SmolLM2-135M-Instruct")
    prompt = engine.encode_chat([{"role": "user", "content": "Hi"}])
    async for ev in engine.generate(prompt, GenerationParams(max_tokens=64), cancel=event):
        print(ev.text, end="")            # ev.token: the id; the last event has finish_reason

The model is anything that follows ``Model`` below (the numpy and the WebGPU backends do).
One engine owns one KV cache, so generations are queued on a lock; the engine remembers
which tokens the cache holds and forwards only the part of a new prompt after the common
prefix (turn 2 of a chat re-reads none of turn 1).

Per step: ``forward`` the new tokens -> sample -> stop token? -> decode (UTF-8 safe) ->
stop string? -> emit, holding back any tail that could begin a stop string. Finish
reasons: "stop" (stop token, stop string, JSON object complete), "length" (max_tokens
or the context window is full), "cancelled" (``cancel`` was set; checked between tokens).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Literal, Protocol, Sequence

import numpy as np

from tabmesh.api_errors import PromptTooLongError
from tabmesh.json_constraint import JsonConstraint, JsonVocab
from tabmesh.sampler import Sampler, SamplingParams

DEFAULT_PREFILL_CHUNK = 512  # prompt tokens per forward: bounds activations, lets cancel act


class Model(Protocol):
    """The interface the engine drives.

    ``n_ctx``: positions the KV cache holds. ``n_vocab``: length of a logits vector.

    ``await forward(tokens, start_pos, output=...)`` runs ``tokens`` at positions
    ``start_pos .. start_pos + len(tokens) - 1``, writing their keys and values into the
    cache there; whatever the cache held from ``start_pos`` on is overwritten, positions
    before it are kept and attended to. ``start_pos`` is never beyond the end of what was
    written before. Returns, for the *last* token only:
        output="logits": np.ndarray float32 (n_vocab,)
        output="argmax": int, the id of the largest logit (lowest id on ties); the GPU
                         backend reads back 8 bytes instead of n_vocab * 4.
    A failed call leaves positions >= start_pos undefined; the engine then replays them.
    """

    n_ctx: int
    n_vocab: int

    async def forward(self, tokens: list[int], start_pos: int, *,
                      output: Literal["logits", "argmax"] = "logits") -> np.ndarray | int: ...


class Cancel(Protocol):
    def is_set(self) -> bool: ...   # asyncio.Event and threading.Event both fit


@dataclass(frozen=True)
class GenerationParams:
    """What to generate. ``max_tokens=None``: until a stop or the context is full."""

    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()             # stop strings, matched on the decoded text
    stop_token_ids: tuple[int, ...] = ()   # in addition to the tokenizer's end-of-generation ids
    seed: int | None = None                # None: a random seed, reported in the stats
    json_object: bool = False              # constrain the output to one JSON object


@dataclass
class GenerationStats:
    """Counts and timings of one generation (seconds; rates in tokens per second)."""

    prompt_tokens: int = 0
    cached_tokens: int = 0       # prompt tokens whose KV was reused from the previous call
    completion_tokens: int = 0
    seed: int = 0
    ttft_s: float = 0.0          # from the start of the generation (after queueing) to the first token
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0        # forward calls of one generated token

    @property
    def prefill_tokens_per_s(self) -> float:
        n = self.prompt_tokens - self.cached_tokens
        return n / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s > 0 else 0.0


@dataclass(frozen=True)
class GenerationEvent:
    """One step of a generation. ``token`` is None only on a final event that adds no
    token; ``text`` may be "" (a character or a possible stop string still held back).
    The last event has ``finish_reason`` and ``stats``."""

    token: int | None
    text: str
    finish_reason: Literal["stop", "length", "cancelled"] | None = None
    stats: GenerationStats | None = None


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class StopStringMatcher:
    """Finds stop strings in streamed text and holds back what might still become one.

    ``push(delta)`` -> (text safe to emit, stopped). Invariant: the held-back text is the
    longest tail of the unemitted text that is a prefix of some stop string, so a stop
    string split across tokens is never emitted, in whole or in part."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.pending = ""

    def push(self, delta: str) -> tuple[str, bool]:
        if not self.stops:
            return delta, False
        text = self.pending + delta
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return text[:min(hits)], True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        self.pending = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold], False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Engine:
    """Generation on one model with one KV cache (see the module docstring)."""

    def __init__(self, model: Model, tokenizer: Any, chat_template: str | None = None,
                 model_id: str = "model", *, prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self.model_id = model_id
        self.created = int(time.time())
        self.prefill_chunk = max(1, int(prefill_chunk))
        self.cached_tokens: list[int] = []   # what the KV cache holds, position by position
        self.forwarded_tokens = 0            # total tokens sent to model.forward (for tests, stats)
        self._lock = asyncio.Lock()
        self._json_vocab: JsonVocab | None = None

    # -- prompts ----------------------------------------------------------------------

    def encode_chat(self, messages: list[dict[str, Any]], **variables: Any) -> list[int]:
        """Render ``messages`` with the chat template and tokenize (control tokens parsed).
        BOS comes from the template or from the vocabulary's add_bos_token, never both."""
        from tabmesh.chat_template import render_chat
        from tabmesh.tokenizer import TokenizerError

        tok = self.tokenizer
        if not self.chat_template:
            raise TokenizerError("the model has no chat template (tokenizer.chat_template): "
                                 "pass chat_template=... to Engine")
        bos = tok.tokens[tok.bos_id] if getattr(tok, "bos_id", -1) >= 0 else ""
        eos = tok.tokens[tok.eos_id] if getattr(tok, "eos_id", -1) >= 0 else ""
        text = render_chat(self.chat_template, messages, True, bos_token=bos, eos_token=eos, **variables)
        ids = tok.encode(text, add_special=True, parse_special=True)
        if bos and len(ids) > 1 and ids[0] == ids[1] == tok.bos_id:
            ids = ids[1:]
        return ids

    def check_prompt(self, n_prompt: int, max_tokens: int | None = None) -> None:
        """PromptTooLongError unless the prompt leaves room for at least one token."""
        if n_prompt >= self.model.n_ctx:
            raise PromptTooLongError(n_prompt, max_tokens, self.model.n_ctx)

    @property
    def stop_token_ids(self) -> frozenset[int]:
        tok = self.tokenizer
        ids = set(getattr(tok, "eog_ids", ()) or ())
        for name in ("eos_id", "eot_id"):
            i = getattr(tok, name, -1)
            if i is not None and i >= 0:
                ids.add(i)
        return frozenset(ids)

    def json_vocab(self) -> JsonVocab:
        if self._json_vocab is None:
            self._json_vocab = JsonVocab.from_tokenizer(self.tokenizer)
        return self._json_vocab

    def reset(self) -> None:
        """Forget the KV cache contents (the next prompt is forwarded in full)."""
        self.cached_tokens = []

    # -- generation -------------------------------------------------------------------

    async def _forward(self, tokens: list[int], start_pos: int, output: str) -> np.ndarray | int:
        """model.forward, keeping ``cached_tokens`` true even when the call fails."""
        del self.cached_tokens[start_pos:]
        result = await self.model.forward(tokens, start_pos, output=output)
        self.cached_tokens.extend(tokens)
        self.forwarded_tokens += len(tokens)
        return result

    async def generate(self, prompt_tokens: Sequence[int], params: GenerationParams | None = None,
                       cancel: Cancel | None = None) -> AsyncIterator[GenerationEvent]:
        """Generate after ``prompt_tokens``; yields a GenerationEvent per token, the last
        one with finish_reason and stats. Raises PromptTooLongError before any work if
        the prompt leaves no room. Close the iterator if you stop early
        (``contextlib.aclosing``): until then it holds the engine's lock."""
        params = params or GenerationParams()
        prompt = [int(t) for t in prompt_tokens]
        if not prompt:
            raise ValueError("generate needs at least one prompt token (a BOS token will do)")
        self.check_prompt(len(prompt), params.max_tokens)
        async with self._lock:
            async for ev in self._generate_locked(prompt, params, cancel):
                yield ev

    async def _generate_locked(self, prompt: list[int], params: GenerationParams,
                               cancel: Cancel | None) -> AsyncIterator[GenerationEvent]:
        from tabmesh.tokenizer import StreamDecoder

        t0 = time.perf_counter()
        n_ctx = self.model.n_ctx
        n_vocab = getattr(self.tokenizer, "n_vocab", None) or self.model.n_vocab
        room = n_ctx - len(prompt)                    # completion tokens that fit the window
        limit = room if params.max_tokens is None else min(params.max_tokens, room)
        constraint = JsonConstraint(self.json_vocab()) if params.json_object else None
        sampler = Sampler(params.sampling, params.seed, prompt, constraint)
        # a model may pad its output rows past the vocabulary; as those ids cannot be
        # decoded, such a model is always asked for logits, cut to the vocabulary
        output = "logits" if sampler.needs_logits or self.model.n_vocab > n_vocab else "argmax"
        stop_ids = self.stop_token_ids | set(params.stop_token_ids)
        stops = StopStringMatcher(params.stop)
        decoder = StreamDecoder(self.tokenizer)
        stats = GenerationStats(prompt_tokens=len(prompt), seed=sampler.seed)

        def cancelled() -> bool:
            return cancel is not None and cancel.is_set()

        def finish(reason: str, token: int | None = None, text: str = "",
                   stop_string: bool = False) -> GenerationEvent:
            if not stop_string:   # no stop string matched: what was held back is output after all
                rest, hit = stops.push(decoder.flush())
                text += rest if hit else rest + stops.flush()
            return GenerationEvent(token, text, reason, stats)

        if cancelled():
            yield finish("cancelled")
            return

        # prefill: only what follows the longest prefix already in the cache
        start = min(common_prefix_len(self.cached_tokens, prompt), len(prompt) - 1)
        stats.cached_tokens = start
        result: np.ndarray | int = 0
        for pos in range(start, len(prompt), self.prefill_chunk):
            chunk = prompt[pos:pos + self.prefill_chunk]
            last = pos + len(chunk) == len(prompt)
            result = await self._forward(chunk, pos, output if last else "argmax")
            if not last and cancelled():
                stats.prefill_s = time.perf_counter() - t0
                yield finish("cancelled")
                return
        stats.prefill_s = time.perf_counter() - t0

        n_out = 0
        while True:
            if output == "logits":
                token = sampler.sample(np.asarray(result).reshape(-1)[:n_vocab])
            else:
                token = int(result)
            sampler.accept(token)
            n_out += 1
            stats.completion_tokens = n_out
            if n_out == 1:
                stats.ttft_s = time.perf_counter() - t0
            if token in stop_ids:
                yield finish("stop", token)
                return
            text, hit = stops.push(decoder.push(token))
            if hit:
                yield finish("stop", token, text, stop_string=True)
                return
            if constraint is not None and constraint.is_complete:
                yield finish("stop", token, text)
                return
            if n_out >= limit:
                yield finish("length", token, text)
                return
            if cancelled():
                yield finish("cancelled", token, text)
                return
            yield GenerationEvent(token, text)
            if cancelled():   # set while the consumer handled the event
                yield finish("cancelled")
                return
            t = time.perf_counter()
            result = await self._forward([token], len(prompt) + n_out - 1, output)
            stats.decode_s += time.perf_counter() - t
            stats.decode_steps += 1
