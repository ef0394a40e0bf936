"""The generation loop on a scripted fake model and a tiny byte-level vocabulary:
stops (tokens, strings split across tokens), lengths, context limits, cancellation,
KV-cache prefix reuse, fault replay, UTF-8 streaming, seeds, JSON mode."""

from __future__ import annotations

import asyncio
import contextlib
import json

import numpy as np
import pytest

from tabmesh.api_errors import PromptTooLongError
from tabmesh.engine import Engine, GenerationParams, StopStringMatcher, common_prefix_len
from tabmesh.model.config import ContextLengthError
from tabmesh.sampler import SamplingParams
from tabmesh.tokenizer import Tokenizer

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = ["Hel", "lo", " wor", "ld", "!", " Paris", '{"', '":', ' "', '",', "}}", "]]", "xyz", " the", "\n\n",
         "true", "null"]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _bytes_to_unicode() -> list[str]:
    """GPT-2's printable alphabet for the 256 bytes."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


B2U = _bytes_to_unicode()


def make_tokenizer() -> Tokenizer:
    """256 byte tokens, a few words, three control tokens; no merges (encode gives bytes)."""
    tokens = B2U + ["".join(B2U[b] for b in w.encode()) for w in WORDS] + SPECIAL
    md = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt2", "tokenizer.ggml.tokens": tokens,
          "tokenizer.ggml.token_type": [1] * (256 + len(WORDS)) + [3] * len(SPECIAL),
          "tokenizer.ggml.merges": [], "tokenizer.ggml.eos_token_id": tokens.index("<|endoftext|>"),
          "tokenizer.ggml.bos_token_id": tokens.index("<|endoftext|>"), "tokenizer.ggml.add_bos_token": False,
          "tokenizer.chat_template": CHATML}
    return Tokenizer.from_gguf_metadata(md)


TOK = make_tokenizer()
V = TOK.n_vocab
W = {w: 256 + i for i, w in enumerate(WORDS)}          # word -> id
IM_START, IM_END, EOS = (TOK.token_to_id[s] for s in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"))
ASSISTANT = TOK.encode("<|im_start|>assistant\n", add_special=False, parse_special=True)


def ids(*parts) -> list[int]:
    """Token ids from words of WORDS (by text), raw strings (as bytes) and ints."""
    out = []
    for p in parts:
        if isinstance(p, int):
            out.append(p)
        elif p in W:
            out.append(W[p])
        else:
            out.extend(TOK.encode(p, add_special=False))
    return out


def one_hot(token: int, n_vocab: int = V) -> np.ndarray:
    x = np.full(n_vocab, -10.0, np.float32)
    x[token] = 10.0
    return x


class FakeModel:
    """A deterministic "model": the next-token logits are a function of the whole
    sequence in its (simulated) KV cache. Checks the Model contract as it goes."""

    def __init__(self, policy, n_ctx: int = 256, n_vocab: int = V) -> None:
        self.policy, self.n_ctx, self.n_vocab = policy, n_ctx, n_vocab
        self.kv: list[int] = []
        self.calls: list[tuple[int, int, str]] = []   # (start_pos, n_tokens, output)
        self.fail_next = False

    @property
    def forwarded(self) -> int:
        return sum(n for _, n, _ in self.calls)

    async def forward(self, tokens, start_pos, *, output="logits"):
        assert 0 <= start_pos <= len(self.kv), "start_pos beyond what the cache holds"
        assert tokens and start_pos + len(tokens) <= self.n_ctx, "forward past n_ctx"
        assert all(0 <= t < self.n_vocab for t in tokens)
        self.calls.append((start_pos, len(tokens), output))
        del self.kv[start_pos:]
        if self.fail_next:
            self.fail_next = False
            self.kv.extend([-1] * len(tokens))          # a half-written cache: garbage
            raise RuntimeError("device lost")
        self.kv.extend(tokens)
        await asyncio.sleep(0)
        r = self.policy(list(self.kv))
        logits = one_hot(r, self.n_vocab) if isinstance(r, (int, np.integer)) else np.asarray(r, np.float32)
        return int(np.argmax(logits)) if output == "argmax" else logits


def reply_policy(*replies: list[int]):
    """Answer the n-th assistant turn of a chat with replies[n] then <|im_end|>; the
    same scripted tokens whatever the prompt said. Earlier replies must be in the prompt."""
    def policy(seq: list[int]) -> int:
        starts = [i for i in range(len(seq)) if seq[i:i + len(ASSISTANT)] == ASSISTANT]
        if not starts:
            return EOS
        turn, k = len(starts) - 1, len(seq) - starts[-1] - len(ASSISTANT)
        reply = replies[min(turn, len(replies) - 1)]
        return reply[k] if k < len(reply) else IM_END
    return policy


def script_policy(script: list[int], prompt_len: int):
    """Token script[k] at generated position k, then EOS."""
    return lambda seq: script[len(seq) - prompt_len] if len(seq) - prompt_len < len(script) else EOS


async def collect(engine, prompt, params=None, cancel=None):
    events = []
    async with contextlib.aclosing(engine.generate(prompt, params or GenerationParams(), cancel)) as gen:
        async for ev in gen:
            events.append(ev)
    return events


def run(coro):
    return asyncio.run(coro)


GREEDY = SamplingParams(temperature=0)
USER = [{"role": "user", "content": "Hi"}]


def chat_engine(*replies, n_ctx=256):
    model = FakeModel(reply_policy(*replies), n_ctx=n_ctx)
    return Engine(model, TOK, None, "fake"), model


def text_of(events) -> str:
    return "".join(e.text for e in events)


# -- plain generation ----------------------------------------------------------------

def test_greedy_reply_stops_at_the_end_of_turn_token_and_asks_only_for_argmax():
    engine, model = chat_engine(ids("Hel", "lo", " wor", "ld", "!"))
    prompt = engine.encode_chat(USER)
    assert prompt == TOK.encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", parse_special=True)
    events = run(collect(engine, prompt, GenerationParams(sampling=GREEDY)))
    assert text_of(events) == "Hello world!"
    assert [e.token for e in events] == ids("Hel", "lo", " wor", "ld", "!") + [IM_END]
    last = events[-1]
    assert last.finish_reason == "stop" and last.text == ""
    assert all(e.finish_reason is None and e.stats is None for e in events[:-1])
    assert {out for _, _, out in model.calls} == {"argmax"}      # 8 bytes per token, not logits
    st = last.stats
    assert (st.prompt_tokens, st.completion_tokens, st.cached_tokens) == (len(prompt), 6, 0)
    assert st.ttft_s > 0 and st.prefill_tokens_per_s > 0 and st.decode_tokens_per_s > 0
    assert st.decode_steps == 5                                   # the end token is never forwarded


def test_sampling_asks_for_logits_and_a_seed_reproduces():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(64, V)).astype(np.float32) * 3

    def noisy(seq):
        return table[len(seq) % 64]

    def gen(seed):
        engine = Engine(FakeModel(noisy), TOK, None, "fake")
        p = GenerationParams(sampling=SamplingParams(temperature=1.0, top_k=50), max_tokens=20, seed=seed,
                             stop_token_ids=())
        events = run(collect(engine, [1, 2, 3], p))
        assert events[-1].stats.seed == seed
        return [e.token for e in events], engine.model.calls

    a, calls = gen(5)
    assert a == gen(5)[0] and a != gen(6)[0]
    assert all(out == "logits" for _, _, out in calls)


def test_padded_output_rows_are_never_chosen():
    pad = V + 8

    def prefers_padding(seq):
        x = np.zeros(pad, np.float32)
        x[V + 3], x[W["xyz"]] = 100.0, 50.0           # a row past the vocabulary wins the raw argmax
        return x

    model = FakeModel(prefers_padding, n_vocab=pad)
    events = run(collect(Engine(model, TOK, None, "fake"), [1, 2], GenerationParams(sampling=GREEDY, max_tokens=2)))
    assert text_of(events) == "xyzxyz" and {out for _, _, out in model.calls} == {"logits"}


def test_max_tokens_finishes_with_length():
    engine, model = chat_engine(ids("Hel", "lo", " wor", "ld", "!"))
    events = run(collect(engine, engine.encode_chat(USER), GenerationParams(sampling=GREEDY, max_tokens=2)))
    assert text_of(events) == "Hello"
    assert events[-1].finish_reason == "length" and events[-1].stats.completion_tokens == 2


def test_extra_stop_token_ids():
    engine, _ = chat_engine(ids("Hel", "lo", " wor", "ld"))
    events = run(collect(engine, engine.encode_chat(USER),
                         GenerationParams(sampling=GREEDY, stop_token_ids=(W[" wor"],))))
    assert text_of(events) == "Hello" and events[-1].finish_reason == "stop"


# -- stop strings ------------------------------------------------------------------

@pytest.mark.parametrize("stop, want", [
    (("o w",), "Hell"),          # split over "lo" + " wor"
    (("lo wor",), "Hel"),        # spans three tokens' boundaries
    (("ld!", "wor"), "Hello "),  # the earliest match wins
    (("Hello world!",), ""),     # the whole reply
    (("lox",), "Hello world!"),  # a false alarm: held back, then released
    (("!",), "Hello world"),
    (("!x",), "Hello world!"),   # never completed: the held-back "!" is emitted at the end
])
def test_stop_strings_across_tokens_are_never_emitted(stop, want):
    engine, _ = chat_engine(ids("Hel", "lo", " wor", "ld", "!"))
    events = run(collect(engine, engine.encode_chat(USER), GenerationParams(sampling=GREEDY, stop=stop)))
    assert text_of(events) == want
    emitted = ""
    for e in events:  # no prefix of the output ever showed text past the answer
        emitted += e.text
        assert want.startswith(emitted)
    assert events[-1].finish_reason == "stop"


def test_stop_string_matcher_holds_back_only_possible_starts():
    m = StopStringMatcher(["abc", "xyz"])
    assert m.push("12a") == ("12", False) and m.pending == "a"
    assert m.push("b") == ("", False) and m.pending == "ab"
    assert m.push("d") == ("abd", False)
    assert m.push("xyab") == ("xy", False) and m.pending == "ab"
    assert m.push("c") == ("", True)
    m = StopStringMatcher(["xyz"])
    assert m.push("..xy") == ("..", False) and m.push("a") == ("xya", False)


def test_stop_applies_to_text_of_multibyte_characters_split_over_tokens():
    e_acute = list("é".encode())  # two byte tokens: the first decodes to nothing yet
    engine, _ = chat_engine(ids("Hel") + e_acute + ids("!"))
    events = run(collect(engine, engine.encode_chat(USER), GenerationParams(sampling=GREEDY)))
    assert [e.text for e in events[:3]] == ["Hel", "", "é"]
    assert text_of(events) == "Helé!"
    events = run(collect(engine, engine.encode_chat(USER), GenerationParams(sampling=GREEDY, stop=("é",))))
    assert text_of(events) == "Hel"


# -- context window ------------------------------------------------------------------

def test_a_prompt_that_fills_the_context_is_refused_before_any_work():
    engine, model = chat_engine(ids("Hel"), n_ctx=16)
    prompt = list(range(16))
    with pytest.raises(PromptTooLongError) as err:
        run(collect(engine, prompt, GenerationParams(max_tokens=10)))
    assert isinstance(err.value, ContextLengthError)       # one except catches model's and engine's
    msg = str(err.value)
    assert "16 tokens" in msg and "max_tokens is 10" in msg and "maximum context length is 16" in msg
    assert (err.value.prompt_tokens, err.value.max_tokens, err.value.n_ctx) == (16, 10, 16)
    assert model.calls == []


def test_generation_that_reaches_the_context_end_finishes_with_length():
    n_ctx = 12
    model = FakeModel(lambda seq: W["xyz"], n_ctx=n_ctx)
    engine = Engine(model, TOK, None, "fake")
    events = run(collect(engine, list(range(8)), GenerationParams(sampling=GREEDY, max_tokens=100)))
    assert events[-1].finish_reason == "length"
    assert events[-1].stats.prompt_tokens + events[-1].stats.completion_tokens == n_ctx
    assert max(s + n for s, n, _ in model.calls) <= n_ctx - 1


# -- cancellation ----------------------------------------------------------------------

def test_cancel_stops_between_tokens_and_the_engine_stays_usable():
    engine, model = chat_engine(ids("Hel", "lo", " wor", "ld", "!"))
    prompt = engine.encode_chat(USER)

    async def go():
        cancel = asyncio.Event()
        events = []
        async for ev in engine.generate(prompt, GenerationParams(sampling=GREEDY), cancel):
            events.append(ev)
            if len(events) == 2:
                cancel.set()
        return events

    events = run(go())
    assert text_of(events) == "Hello" and events[-1].finish_reason == "cancelled"
    assert events[-1].stats.completion_tokens == 2
    assert model.forwarded == len(prompt) + 1     # "lo" was never forwarded
    again = run(collect(engine, prompt, GenerationParams(sampling=GREEDY)))
    assert text_of(again) == "Hello world!"


def test_cancel_before_start_and_abandoned_streams_release_the_engine():
    engine, model = chat_engine(ids("Hel", "lo"))
    prompt = engine.encode_chat(USER)

    class Flag:
        def is_set(self):
            return True

    events = run(collect(engine, prompt, cancel=Flag()))
    assert len(events) == 1 and events[0].finish_reason == "cancelled" and model.calls == []

    async def abandon_then_reuse():
        gen = engine.generate(prompt, GenerationParams(sampling=GREEDY))
        await gen.__anext__()
        await gen.aclose()                               # frees the lock
        return await asyncio.wait_for(collect(engine, prompt, GenerationParams(sampling=GREEDY)), 2)

    assert text_of(run(abandon_then_reuse())) == "Hello"


def test_concurrent_generations_queue_on_one_kv_cache():
    engine, model = chat_engine(ids("Hel", "lo"))
    prompt = engine.encode_chat(USER)

    async def both():
        return await asyncio.gather(collect(engine, prompt, GenerationParams(sampling=GREEDY)),
                                    collect(engine, prompt, GenerationParams(sampling=GREEDY)))

    a, b = run(both())
    assert text_of(a) == text_of(b) == "Hello"


# -- KV cache prefix reuse -----------------------------------------------------------

def test_turn_two_forwards_only_the_new_tokens():
    # byte tokens, so that the reply re-encodes to the same ids inside the next prompt
    reply1, reply2 = ids("Paris is it."), ids("Hel", "lo")
    engine, model = chat_engine(reply1, reply2)
    messages = [{"role": "user", "content": "Capital of France?"}]
    p1 = engine.encode_chat(messages)
    ev1 = run(collect(engine, p1, GenerationParams(sampling=GREEDY)))
    assert text_of(ev1) == "Paris is it." and model.forwarded == len(p1) + len(reply1)  # the end token is not fed back
    messages += [{"role": "assistant", "content": text_of(ev1)}, {"role": "user", "content": "Hi"}]
    p2 = engine.encode_chat(messages)
    assert p2[:len(p1) + len(reply1)] == p1 + reply1
    before = model.forwarded
    ev2 = run(collect(engine, p2, GenerationParams(sampling=GREEDY)))
    assert text_of(ev2) == "Hello"
    assert model.calls[-len(reply2) - 1][0] == len(p1) + len(reply1)   # prefill started after the shared prefix
    new_prompt_tokens = len(p2) - len(p1) - len(reply1)
    assert model.forwarded - before == new_prompt_tokens + len(reply2)
    assert ev2[-1].stats.cached_tokens == len(p1) + len(reply1)


def test_same_prompt_again_forwards_one_token_and_a_changed_prompt_rewrites_from_the_change():
    engine, model = chat_engine(ids("Hel", "lo"))
    prompt = engine.encode_chat(USER)
    run(collect(engine, prompt, GenerationParams(sampling=GREEDY)))
    n = model.forwarded
    run(collect(engine, prompt, GenerationParams(sampling=GREEDY)))
    assert model.calls[-3] == (len(prompt) - 1, 1, "argmax")       # the last prompt token, for its logits
    assert model.forwarded - n == 1 + 2
    other = engine.encode_chat([{"role": "user", "content": "Ho"}])
    k = common_prefix_len(prompt, other)
    n = model.forwarded
    ev = run(collect(engine, other, GenerationParams(sampling=GREEDY)))
    assert model.calls[-3][0] == k and model.forwarded - n == len(other) - k + 2
    assert model.kv == engine.cached_tokens == other + ids("Hel", "lo")
    assert text_of(ev) == "Hello"


def test_a_failed_forward_is_replayed_on_the_next_call():
    engine, model = chat_engine(ids("Hel", "lo", "!"))
    prompt = engine.encode_chat(USER)
    run(collect(engine, prompt, GenerationParams(sampling=GREEDY)))
    model.fail_next = True
    with pytest.raises(RuntimeError, match="device lost"):
        run(collect(engine, prompt + [W["xyz"]], GenerationParams(sampling=GREEDY)))
    assert engine.cached_tokens == prompt                       # nothing past the failed write is trusted
    ev = run(collect(engine, prompt, GenerationParams(sampling=GREEDY)))
    assert text_of(ev) == "Hello!" and -1 not in model.kv


def test_prefill_is_chunked_and_can_be_cancelled_between_chunks():
    model = FakeModel(lambda seq: W["xyz"], n_ctx=256)
    engine = Engine(model, TOK, None, "fake", prefill_chunk=10)
    events = run(collect(engine, list(range(25)), GenerationParams(sampling=GREEDY, max_tokens=1)))
    assert [c[:2] for c in model.calls] == [(0, 10), (10, 10), (20, 5)]
    assert text_of(events) == "xyz"

    class AfterFirstChunk:
        def is_set(self):
            return len(model.calls) >= 4

    engine.reset()
    events = run(collect(engine, list(range(30, 55)), GenerationParams(sampling=GREEDY), AfterFirstChunk()))
    assert events[-1].finish_reason == "cancelled" and len(model.calls) == 4


# -- JSON mode --------------------------------------------------------------------------

def chatty_then_structure(prompt_len: int):
    """A model that wants to chat ("Sure! Here it is: {...} Hope that helps") and ranks
    every JSON-breaking token (EOS, <|im_end|>) first once that is said; after those,
    a fixed order of structural tokens. Only the constraint makes its output JSON."""
    script = ids("Sure! Here it is: ", '{"', "a", '":', " ", "1", "}", " Hope that helps.") + [IM_END]
    fallback = [EOS, IM_END, W["xyz"], W["\n\n"]] + ids('"', ":", "1", "}", ",", "{", " ")

    def policy(seq):
        k = len(seq) - prompt_len
        x = np.full(V, -50.0, np.float32)
        for rank, t in enumerate(fallback):
            x[t] = 20.0 - rank
        if k < len(script):
            x[script[k]] = 40.0
        return x
    return policy


def test_json_mode_with_a_model_that_prefers_garbage_still_gives_json():
    engine = Engine(FakeModel(chatty_then_structure(3)), TOK, None, "fake")
    events = run(collect(engine, [1, 2, 3], GenerationParams(sampling=GREEDY, json_object=True, max_tokens=80)))
    out = text_of(events)
    assert isinstance(json.loads(out), dict), out
    assert json.loads(out) == {"a": 1}, out          # the prose and the end tokens were masked
    assert events[-1].finish_reason == "stop"        # ended as soon as the object closed
    # without the constraint the same model writes prose
    engine = Engine(FakeModel(chatty_then_structure(3)), TOK, None, "fake")
    plain = text_of(run(collect(engine, [1, 2, 3], GenerationParams(sampling=GREEDY, max_tokens=80))))
    assert plain.startswith("Sure!")
    with pytest.raises(json.JSONDecodeError):
        json.loads(plain)


@pytest.mark.parametrize("seed", range(5))
def test_json_mode_sampling_gives_json_or_a_valid_prefix(seed):
    from tabmesh.json_constraint import is_valid_prefix
    rng = np.random.default_rng(seed)
    table = rng.normal(size=(97, V)).astype(np.float32) * 2

    def noisy(seq):
        x = table[len(seq) % 97].copy()
        x[[W['",'], W['":'], ord("}")]] += 3.0           # so that objects do close
        return x

    engine = Engine(FakeModel(noisy), TOK, None, "fake")
    p = GenerationParams(sampling=SamplingParams(temperature=1.0), json_object=True, max_tokens=60, seed=seed)
    events = run(collect(engine, [1, 2, 3], p))
    out = text_of(events)
    if events[-1].finish_reason == "stop":
        assert isinstance(json.loads(out), dict), out
    else:
        assert events[-1].finish_reason == "length" and is_valid_prefix(out.encode()), out
