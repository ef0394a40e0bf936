"""OpenAI Chat Completions, served by a local Engine: the same call in the page and in Python.

    client = Client(engine)                    # mirrors openai.AsyncOpenAI
    resp = await client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}])
    resp["choices"][0]["message"]["content"]
    stream = await client.chat.completions.create(messages=..., stream=True,
                                                  stream_options={"include_usage": True})
    async for chunk in stream: ...             # stream.cancel() stops it between tokens
    await client.models.list()

The page exposes the same object as ``window.tabmesh.chat.completions.create(request)``
(page.py converts the JS object to a dict and the stream to a JS async iterator).
Requests, responses and stream chunks are plain dicts shaped exactly as OpenAI's
(openai-python ``ChatCompletion`` / ``ChatCompletionChunk`` / ``Model``); errors are
``APIError``s whose ``to_openai()`` is OpenAI's error body (see api_errors.py).

Request fields, and what tabmesh does with them (``validate_chat_request``):
- honoured: messages, model, stream, stream_options.include_usage, max_tokens,
  max_completion_tokens, temperature, top_p, frequency_penalty, presence_penalty,
  logit_bias, seed, stop, response_format (text, json_object), n (must be 1);
  extensions as in vLLM / llama.cpp: top_k, min_p, repetition_penalty.
- accepted and ignored (no effect on the output): user, metadata, store, service_tier,
  prompt_cache_key, safety_identifier, parallel_tool_calls.
- refused with an error when set to anything but their default, because ignoring them
  would silently change what the caller gets: tools, tool_choice, functions,
  function_call, logprobs, top_logprobs, audio, modalities, prediction,
  web_search_options, reasoning_effort, verbosity, response_format json_schema.
- any other field is refused as unknown (as OpenAI does), naming the closest known one:
  a typo such as "temprature" must not silently fall back to the default.
"""

from __future__ import annotations

import asyncio
import difflib
import math
import secrets
import string
import time
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterable

from tabmesh import __version__
from tabmesh.api_errors import InvalidRequestError, ModelNotFoundError
from tabmesh.engine import Engine, GenerationEvent, GenerationParams, GenerationStats
from tabmesh.sampler import SamplingParams

MAX_STOP = 4
ROLES = ("system", "developer", "user", "assistant", "tool")
SYSTEM_FINGERPRINT = f"tabmesh-{__version__}"

HONOURED = frozenset("""messages model stream stream_options max_tokens max_completion_tokens temperature
    top_p frequency_penalty presence_penalty logit_bias seed stop response_format n
    top_k min_p repetition_penalty""".split())
IGNORED = frozenset("user metadata store service_tier prompt_cache_key safety_identifier "
                    "parallel_tool_calls".split())
# field -> values that mean "not used"; anything else is refused (unsupported_parameter)
REFUSED_UNLESS_DEFAULT: dict[str, tuple] = {
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
    "function_call": (None, "none"), "logprobs": (None, False), "top_logprobs": (None, 0),
    "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,),
    "web_search_options": (None,), "reasoning_effort": (None,), "verbosity": (None,),
}
KNOWN_FIELDS = HONOURED | IGNORED | frozenset(REFUSED_UNLESS_DEFAULT)


@dataclass(frozen=True)
class ChatRequest:
    """A validated request, normalised: messages hold text only ("developer" is sent to
    the template as "system"), stop is a tuple, absent numbers are their defaults."""

    messages: list[dict[str, Any]]
    model: str | None = None
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    json_object: bool = False

    def generation_params(self) -> GenerationParams:
        return GenerationParams(sampling=self.sampling, max_tokens=self.max_tokens, stop=self.stop,
                                seed=self.seed, json_object=self.json_object)


def _fail(param: str | None, message: str, code: str = "invalid_value") -> InvalidRequestError:
    return InvalidRequestError(message, param=param, error_code=code)


def _kind(v: Any) -> str:
    return {type(None): "null", bool: "boolean", int: "integer", float: "number", str: "string",
            list: "array", dict: "object"}.get(type(v), type(v).__name__)


def _number(obj: dict, name: str, lo: float, hi: float, *, integer: bool = False,
            lo_open: bool = False, hint: str = "") -> Any:
    """obj[name] checked to be a number (int if ``integer``) in [lo, hi], or None if absent."""
    v = obj.get(name)
    if v is None:
        return None
    ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok_type:
        raise _fail(name, f"Invalid type for '{name}': expected {'an integer' if integer else 'a number'}, "
                          f"got {_kind(v)} {v!r:.40}.", "invalid_type")
    if not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo):
        rng = f"greater than {lo}" if lo_open else f"at least {lo}"
        rng += "" if hi == math.inf else f" and at most {hi}"
        raise _fail(name, f"Invalid value for '{name}': {v} is out of range; it must be {rng}.{hint}")
    return v


def _text_parts(content: Any, where: str, allowed: tuple[str, ...] = ("text",)) -> str:
    """Message content (a string or a list of content parts) as one string."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _fail(where, f"Invalid type for '{where}': expected a string or an array of content "
                           f"parts, got {_kind(content)}.", "invalid_type")
    texts = []
    for j, part in enumerate(content):
        p = f"{where}[{j}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise _fail(p, f"Invalid content part '{p}': expected an object like "
                           f'{{"type": "text", "text": "..."}}.', "invalid_type")
        kind = part["type"]
        if kind not in allowed:
            what = ("this model reads text only: send images, audio and files as text, or use a "
                    "model with that input") if kind in ("image_url", "input_audio", "file") else \
                f"the content part types accepted here are {', '.join(allowed)}"
            raise _fail(f"{p}.type", f"Unsupported content part type '{kind}' in '{p}': {what}.",
                        "unsupported_value")
        text = part.get("text" if kind == "text" else "refusal")
        if not isinstance(text, str):
            raise _fail(p, f"Invalid content part '{p}': '{kind}' needs a string field "
                           f"'{'text' if kind == 'text' else 'refusal'}'.", "invalid_type")
        texts.append(text)
    return "\n".join(texts)


def _messages(raw: Any) -> list[dict[str, Any]]:
    if raw is None:
        raise _fail("messages", "Missing required parameter: 'messages'. Send a non-empty array such "
                                'as [{"role": "user", "content": "Hello"}].', "missing_required_parameter")
    if not isinstance(raw, list):
        raise _fail("messages", f"Invalid type for 'messages': expected an array of messages, got "
                                f"{_kind(raw)}.", "invalid_type")
    if not raw:
        raise _fail("messages", "Invalid 'messages': empty array. Send at least one message, e.g. "
                                '[{"role": "user", "content": "Hello"}].', "empty_array")
    out = []
    for i, m in enumerate(raw):
        w = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _fail(w, f"Invalid type for '{w}': expected an object with 'role' and 'content', "
                           f"got {_kind(m)}.", "invalid_type")
        role = m.get("role")
        if role == "function":
            raise _fail(f"{w}.role", f"Unsupported role 'function' in '{w}': function messages are "
                                     "deprecated and tools are not supported; send the result as a "
                                     "user message.", "unsupported_value")
        if role not in ROLES:
            raise _fail(f"{w}.role", f"Invalid value for '{w}.role': {role!r}. Supported roles: "
                                     f"{', '.join(ROLES)}.")
        msg: dict[str, Any] = {"role": "system" if role == "developer" else role}
        content = m.get("content")
        if role == "assistant" and content is None:
            if not m.get("tool_calls"):
                raise _fail(f"{w}.content", f"Missing '{w}.content': an assistant message needs "
                                            "content (or tool_calls).", "missing_required_parameter")
            content = ""
        elif content is None:
            raise _fail(f"{w}.content", f"Missing required parameter: '{w}.content'.",
                        "missing_required_parameter")
        msg["content"] = _text_parts(content, f"{w}.content",
                                     ("text", "refusal") if role == "assistant" else ("text",))
        if m.get("name") is not None:
            if not isinstance(m["name"], str):
                raise _fail(f"{w}.name", f"Invalid type for '{w}.name': expected a string.", "invalid_type")
            msg["name"] = m["name"]
        if role == "tool":
            if not isinstance(m.get("tool_call_id"), str):
                raise _fail(f"{w}.tool_call_id", f"Missing '{w}.tool_call_id': a tool message answers "
                                                 "a tool call and must name its id.",
                            "missing_required_parameter")
            msg["tool_call_id"] = m["tool_call_id"]
        if role == "assistant" and m.get("tool_calls") is not None:
            if not isinstance(m["tool_calls"], list) or not all(isinstance(c, dict) for c in m["tool_calls"]):
                raise _fail(f"{w}.tool_calls", f"Invalid type for '{w}.tool_calls': expected an array "
                                               "of objects.", "invalid_type")
            msg["tool_calls"] = m["tool_calls"]
        out.append(msg)
    return out


def validate_chat_request(obj: Any, *, known_models: Iterable[str] | None = None) -> ChatRequest:
    """Check a Chat Completions request and normalise it; InvalidRequestError (or
    ModelNotFoundError) with ``param`` and a message that says what to send instead."""
    # 1. the request is a JSON object
    if not isinstance(obj, dict):
        raise _fail(None, f"The request must be a JSON object with at least 'messages', got {_kind(obj)}.",
                    "invalid_type")
    # 2. no unknown fields: a misspelt option must not silently fall back to its default
    for name in obj:
        if name not in KNOWN_FIELDS:
            close = difflib.get_close_matches(str(name), sorted(KNOWN_FIELDS), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise _fail(name, f"Unknown parameter: '{name}'.{hint}", "unknown_parameter")
    # 3. fields tabmesh cannot honour are refused unless left at their default
    for name, defaults in REFUSED_UNLESS_DEFAULT.items():
        if name in obj and obj[name] not in defaults:
            raise _fail(name, f"Unsupported parameter: '{name}' is not supported by tabmesh; "
                              f"remove it from the request.", "unsupported_parameter")
    # 4. messages: a non-empty array of {role, content}
    messages = _messages(obj.get("messages"))
    # 5. model: optional; when given, one of the loaded models
    model = obj.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise _fail("model", f"Invalid type for 'model': expected a model id string, got {_kind(model)}.",
                    "invalid_type")
    if model is not None and known_models is not None:
        known = list(known_models)
        if model not in known:
            raise ModelNotFoundError(
                f"The model '{model}' does not exist in this tab. Loaded: "
                f"{', '.join(known) or 'none'}; pass one of those, or leave 'model' out.", param="model")
    # 6. stream and stream_options
    stream = obj.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _fail("stream", f"Invalid type for 'stream': expected a boolean, got {_kind(stream)}.",
                    "invalid_type")
    opts = obj.get("stream_options")
    include_usage = False
    if opts is not None:
        if not stream:
            raise _fail("stream_options", "The 'stream_options' parameter is only allowed when 'stream' "
                                          "is true.")
        if not isinstance(opts, dict) or any(k not in ("include_usage", "include_obfuscation") for k in opts):
            raise _fail("stream_options", "Invalid 'stream_options': expected an object like "
                                          '{"include_usage": true}.', "invalid_type")
        include_usage = opts.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise _fail("stream_options.include_usage", "Invalid type for 'stream_options.include_usage': "
                                                        "expected a boolean.", "invalid_type")
    # 7. n: one choice per request
    n = _number(obj, "n", 1, math.inf, integer=True)
    if n not in (None, 1):
        raise _fail("n", f"Invalid value for 'n': {n}. tabmesh generates one choice per request; "
                         "send n=1 (or leave it out) and make several requests instead.", "unsupported_value")
    # 8. lengths: max_completion_tokens (current name) or max_tokens (deprecated), >= 1
    max_tokens = _number(obj, "max_tokens", 1, math.inf, integer=True)
    max_completion = _number(obj, "max_completion_tokens", 1, math.inf, integer=True)
    if max_tokens is not None and max_completion is not None and max_tokens != max_completion:
        raise _fail("max_tokens", f"'max_tokens' ({max_tokens}) and 'max_completion_tokens' "
                                  f"({max_completion}) disagree; send only max_completion_tokens.")
    max_tokens = max_completion if max_completion is not None else max_tokens
    # 9. sampling numbers, in OpenAI's ranges (extensions in vLLM's)
    temperature = _number(obj, "temperature", 0, 2, hint=" Use 0 for deterministic output.")
    top_p = _number(obj, "top_p", 0, 1)
    freq = _number(obj, "frequency_penalty", -2, 2)
    pres = _number(obj, "presence_penalty", -2, 2)
    top_k = _number(obj, "top_k", 0, math.inf, integer=True, hint=" Use 0 to turn top_k off.")
    min_p = _number(obj, "min_p", 0, 1)
    rep = _number(obj, "repetition_penalty", 0, math.inf, lo_open=True, hint=" 1 turns it off.")
    # 10. seed: any integer
    seed = obj.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _fail("seed", f"Invalid type for 'seed': expected an integer, got {_kind(seed)}.", "invalid_type")
    # 11. stop: a string or up to 4 non-empty strings
    stop = obj.get("stop")
    stops: tuple[str, ...] = ()
    if stop is not None:
        items = [stop] if isinstance(stop, str) else stop
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise _fail("stop", "Invalid type for 'stop': expected a string or an array of strings.",
                        "invalid_type")
        if len(items) > MAX_STOP:
            raise _fail("stop", f"Invalid 'stop': {len(items)} sequences; send at most {MAX_STOP}.",
                        "array_above_max_length")
        if any(s == "" for s in items):
            raise _fail("stop", "Invalid 'stop': an empty string would stop before the first token; "
                                "remove it.")
        stops = tuple(items)
    # 12. response_format: text or json_object
    fmt = obj.get("response_format")
    json_object = False
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "json_schema":
            raise _fail("response_format.type", "response_format type 'json_schema' is not supported yet; "
                                                "use {\"type\": \"json_object\"} and describe the schema in "
                                                "the messages.", "unsupported_value")
        if kind not in ("text", "json_object"):
            raise _fail("response_format", "Invalid 'response_format': expected {\"type\": \"text\"} or "
                                           "{\"type\": \"json_object\"}.")
        json_object = kind == "json_object"
    # 13. logit_bias: {token id: bias in -100..100}
    bias_raw = obj.get("logit_bias")
    bias: dict[int, float] = {}
    if bias_raw is not None:
        if not isinstance(bias_raw, dict):
            raise _fail("logit_bias", "Invalid type for 'logit_bias': expected an object mapping token "
                                      "ids to numbers.", "invalid_type")
        for k, v in bias_raw.items():
            try:
                tid = int(k)
            except (TypeError, ValueError):
                tid = -1
            if tid < 0 or (isinstance(k, str) and not k.strip().isdigit()):
                raise _fail("logit_bias", f"Invalid key {k!r} in 'logit_bias': keys are token ids "
                                          "(non-negative integers, as strings in JSON).")
            bias[tid] = float(_number({"logit_bias": v}, "logit_bias", -100, 100))
    sampling = SamplingParams(
        temperature=1.0 if temperature is None else float(temperature),
        top_p=1.0 if top_p is None else float(top_p), top_k=top_k or 0,
        min_p=0.0 if min_p is None else float(min_p),
        frequency_penalty=float(freq or 0.0), presence_penalty=float(pres or 0.0),
        repetition_penalty=1.0 if rep is None else float(rep), logit_bias=bias)
    return ChatRequest(messages=messages, model=model, stream=bool(stream), include_usage=include_usage,
                       max_tokens=max_tokens, sampling=sampling, seed=seed, stop=stops,
                       json_object=json_object)


# -- responses ------------------------------------------------------------------------

_ID_ALPHABET = string.ascii_letters + string.digits


def completion_id() -> str:
    """An id like OpenAI's: "chatcmpl-" and 29 random letters and digits."""
    return "chatcmpl-" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(29))


def _finish_reason(reason: str | None) -> str:
    # OpenAI has no "cancelled": a stopped generation ended where the caller stopped it
    return "length" if reason == "length" else "stop"


def usage_dict(stats: GenerationStats, e2e_s: float) -> dict[str, Any]:
    """OpenAI's CompletionUsage, plus WebLLM's ``extra`` timings."""
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.completion_tokens,
        "total_tokens": stats.prompt_tokens + stats.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": stats.cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                      "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
        "extra": {"e2e_latency_s": e2e_s, "time_to_first_token_s": stats.ttft_s,
                  "prefill_tokens_per_s": stats.prefill_tokens_per_s,
                  "decode_tokens_per_s": stats.decode_tokens_per_s, "seed": stats.seed},
    }


@dataclass
class _Prepared:
    req: ChatRequest
    prompt: list[int]
    id: str
    created: int
    model: str
    t0: float


def _prepare(engine: Engine, request: Any) -> _Prepared:
    """Validate, render and tokenize, check the context window: every error a request can
    cause before generation starts is raised here, before a stream is handed out."""
    t0 = time.perf_counter()
    req = request if isinstance(request, ChatRequest) else \
        validate_chat_request(request, known_models=[engine.model_id])
    if req.model is not None and req.model != engine.model_id:
        raise ModelNotFoundError(f"The model '{req.model}' does not exist in this tab. Loaded: "
                                 f"{engine.model_id}.", param="model")
    n_vocab = engine.model.n_vocab
    for tid in req.sampling.logit_bias:
        if tid >= n_vocab:
            raise _fail("logit_bias", f"Invalid key '{tid}' in 'logit_bias': the model's vocabulary has "
                                      f"{n_vocab} tokens (ids 0..{n_vocab - 1}).")
    prompt = engine.encode_chat(req.messages)
    engine.check_prompt(len(prompt), req.max_tokens)
    return _Prepared(req, prompt, completion_id(), int(time.time()), engine.model_id, t0)


async def create_chat_completion(engine: Engine, request: Any, *, cancel: Any = None) -> dict[str, Any]:
    """A whole ``chat.completion`` for a request dict (or a validated ChatRequest)."""
    prep = _prepare(engine, request)
    if prep.req.stream:
        raise _fail("stream", "create_chat_completion returns one whole response; for stream=true call "
                              "stream_chat_completion (or Client.chat.completions.create).")
    parts: list[str] = []
    last: GenerationEvent | None = None
    async with aclosing(engine.generate(prep.prompt, prep.req.generation_params(), cancel)) as events:
        async for ev in events:
            parts.append(ev.text)
            last = ev
    assert last is not None and last.stats is not None, "a generation always ends with a finish event"
    return {
        "id": prep.id,
        "object": "chat.completion",
        "created": prep.created,
        "model": prep.model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": "".join(parts), "refusal": None},
            "logprobs": None,
            "finish_reason": _finish_reason(last.finish_reason),
        }],
        "usage": usage_dict(last.stats, time.perf_counter() - prep.t0),
    }


def _chunk(prep: _Prepared, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    out = {"id": prep.id, "object": "chat.completion.chunk", "created": prep.created, "model": prep.model,
           "system_fingerprint": SYSTEM_FINGERPRINT, "choices": choices}
    if prep.req.include_usage:
        out["usage"] = None   # present on every chunk, null except on the last (OpenAI's rule)
    out.update(extra)
    return out


def _choice(delta: dict[str, Any], finish_reason: str | None = None) -> list[dict[str, Any]]:
    return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]


async def _stream_prepared(engine: Engine, prep: _Prepared, cancel: Any) -> AsyncIterator[dict[str, Any]]:
    yield _chunk(prep, _choice({"role": "assistant", "content": "", "refusal": None}))
    async with aclosing(engine.generate(prep.prompt, prep.req.generation_params(), cancel)) as events:
        async for ev in events:
            if ev.text:
                yield _chunk(prep, _choice({"content": ev.text}))
            if ev.finish_reason is not None:
                yield _chunk(prep, _choice({}, _finish_reason(ev.finish_reason)))
                if prep.req.include_usage and ev.stats is not None:
                    yield _chunk(prep, [], usage=usage_dict(ev.stats, time.perf_counter() - prep.t0))


async def stream_chat_completion(engine: Engine, request: Any, *,
                                 cancel: Any = None) -> AsyncIterator[dict[str, Any]]:
    """``chat.completion.chunk`` dicts for a request (``stream`` is implied): a first chunk
    with ``delta.role``, one per text delta, one with ``finish_reason``, then (with
    ``stream_options.include_usage``) one with empty ``choices`` and the usage."""
    prep = _prepare(engine, request)
    async with aclosing(_stream_prepared(engine, prep, cancel)) as chunks:
        async for c in chunks:
            yield c


def list_models(engines: Engine | Iterable[Engine]) -> dict[str, Any]:
    """OpenAI's ``models.list()`` body for the loaded engine(s)."""
    engines = [engines] if isinstance(engines, Engine) else list(engines)
    return {"object": "list",
            "data": [{"id": e.model_id, "object": "model", "created": e.created, "owned_by": "tabmesh"}
                     for e in engines]}


# -- the client object ------------------------------------------------------------------

class _AnyOf:
    """Cancelled when any of the given flags is set."""

    def __init__(self, *flags: Any) -> None:
        self.flags = [f for f in flags if f is not None]

    def is_set(self) -> bool:
        return any(f.is_set() for f in self.flags)


class ChatCompletionStream:
    """The async iterator of chunk dicts that ``create(stream=True)`` returns.

    ``cancel()`` ends it cleanly between tokens (a final chunk, then usage if asked);
    ``aclose()`` (or leaving ``async with``) drops it at once and frees the engine."""

    def __init__(self, engine: Engine, prep: _Prepared, cancel: Any = None) -> None:
        self._cancel = asyncio.Event()
        self._gen = _stream_prepared(engine, prep, _AnyOf(self._cancel, cancel))
        self.id = prep.id

    def __aiter__(self) -> "ChatCompletionStream":
        return self

    async def __anext__(self) -> dict[str, Any]:
        return await self._gen.__anext__()

    def cancel(self) -> None:
        self._cancel.set()

    async def aclose(self) -> None:
        await self._gen.aclose()

    async def __aenter__(self) -> "ChatCompletionStream":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


class _Completions:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def create(self, request: dict[str, Any] | None = None, /, *, cancel: Any = None,
                     **fields: Any) -> dict[str, Any] | ChatCompletionStream:
        """``create({...})`` or ``create(messages=..., ...)``. ``cancel`` (an object with
        ``is_set()``, e.g. asyncio.Event) is not a request field: it stops generation
        between tokens. Returns the response dict, or a ChatCompletionStream if stream."""
        if request is None:
            body: Any = fields
        elif isinstance(request, dict):
            body = {**request, **fields}
        else:
            body = request   # not an object: validation says so
        if isinstance(body, dict) and body.get("stream") is True:
            return ChatCompletionStream(self._engine, _prepare(self._engine, body), cancel)
        return await create_chat_completion(self._engine, body, cancel=cancel)


class _Chat:
    def __init__(self, engine: Engine) -> None:
        self.completions = _Completions(engine)


class _Models:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def list(self) -> dict[str, Any]:
        return list_models(self._engine)


class Client:
    """``openai.AsyncOpenAI``'s shape over a local Engine: ``chat.completions.create``
    and ``models.list``, returning plain dicts."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.chat = _Chat(engine)
        self.models = _Models(engine)
