"""The OpenAI-shaped API: request validation table, response / chunk / error / model-list
schemas key by key, and the Client object the page exposes."""

from __future__ import annotations

import asyncio
import json

import pytest

from tabmesh.api import (ChatCompletionStream, Client, create_chat_completion, list_models,
                         stream_chat_completion, validate_chat_request)
from tabmesh.api_errors import (APIError, InvalidRequestError, JsonConstraintError, ModelNotFoundError,
                                PromptTooLongError, openai_error)
from tabmesh.chat_template import ChatTemplateRaised
from tabmesh.engine import Engine
from tabmesh.errors import TabmeshError
from tabmesh.model.config import ContextLengthError
from tabmesh.sampler import SamplingParams
from test_engine import IM_END, TOK, FakeModel, ids, reply_policy  # the fakes of the engine tests

USER = [{"role": "user", "content": "Hi"}]
REPLY = ids("Hel", "lo", " wor", "ld", "!")


def make_engine(n_ctx: int = 256, reply=REPLY) -> Engine:
    return Engine(FakeModel(reply_policy(reply), n_ctx=n_ctx), TOK, None, "tiny-chat")


def run(coro):
    return asyncio.run(coro)


async def agather(it):
    return [x async for x in it]


# -- validation ------------------------------------------------------------------------

def test_minimal_request_gets_openai_defaults():
    r = validate_chat_request({"messages": USER})
    assert r.messages == [{"role": "user", "content": "Hi"}]
    assert (r.model, r.stream, r.include_usage, r.max_tokens, r.seed, r.stop, r.json_object) == \
        (None, False, False, None, None, (), False)
    assert r.sampling == SamplingParams()


def test_full_request_is_normalised():
    r = validate_chat_request({
        "model": "tiny-chat", "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "developer", "content": "Be brief."},
                     {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                      "name": "ann"},
                     {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]},
                     {"role": "tool", "content": "42", "tool_call_id": "c1"}],
        "max_completion_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": 40, "min_p": 0.05,
        "frequency_penalty": 0.5, "presence_penalty": -0.5, "repetition_penalty": 1.1, "seed": 3,
        "stop": "\n\n", "logit_bias": {"5": -100, "7": 2.5}, "response_format": {"type": "json_object"},
        "n": 1, "user": "u1", "metadata": {"a": "b"}, "store": False, "logprobs": False, "tools": [],
        "tool_choice": "none"}, known_models=["tiny-chat"])
    assert [m["role"] for m in r.messages] == ["system", "user", "assistant", "tool"]
    assert r.messages[1] == {"role": "user", "content": "a\nb", "name": "ann"}
    assert r.messages[2]["content"] == "" and r.messages[3]["tool_call_id"] == "c1"
    assert r.stream and r.include_usage and r.max_tokens == 7 and r.seed == 3 and r.stop == ("\n\n",)
    assert r.json_object
    assert r.sampling == SamplingParams(temperature=0.5, top_p=0.9, top_k=40, min_p=0.05, frequency_penalty=0.5,
                                        presence_penalty=-0.5, repetition_penalty=1.1, logit_bias={5: -100, 7: 2.5})
    g = r.generation_params()
    assert (g.max_tokens, g.stop, g.seed, g.json_object) == (7, ("\n\n",), 3, True)


OK = {"messages": USER}
BAD = [
    # (request, param, code, words the message must contain)
    ([], None, "invalid_type", "JSON object"),
    ({}, "messages", "missing_required_parameter", "non-empty array"),
    ({"messages": []}, "messages", "empty_array", "at least one message"),
    ({"messages": "hi"}, "messages", "invalid_type", "array"),
    ({"messages": ["hi"]}, "messages[0]", "invalid_type", "role"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "invalid_value", "system, developer"),
    ({"messages": [{"role": "function", "content": "x", "name": "f"}]}, "messages[0].role", "unsupported_value",
     "deprecated"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "missing_required_parameter", "content"),
    ({"messages": [{"role": "assistant", "content": None}]}, "messages[0].content", "missing_required_parameter",
     "tool_calls"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "invalid_type", "content parts"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0].type", "unsupported_value", "text only"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0]", "invalid_type",
     "'text'"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id", "missing_required_parameter",
     "tool call"),
    ({**OK, "temprature": 0.5}, "temprature", "unknown_parameter", "Did you mean 'temperature'"),
    ({**OK, "temperature": 2.5}, "temperature", "invalid_value", "at most 2"),
    ({**OK, "temperature": -0.1}, "temperature", "invalid_value", "at least 0"),
    ({**OK, "temperature": "hot"}, "temperature", "invalid_type", "number"),
    ({**OK, "temperature": True}, "temperature", "invalid_type", "boolean"),
    ({**OK, "temperature": float("nan")}, "temperature", "invalid_value", "out of range"),
    ({**OK, "top_p": 1.5}, "top_p", "invalid_value", "at most 1"),
    ({**OK, "frequency_penalty": 3}, "frequency_penalty", "invalid_value", "at most 2"),
    ({**OK, "presence_penalty": -2.1}, "presence_penalty", "invalid_value", "at least -2"),
    ({**OK, "top_k": 1.5}, "top_k", "invalid_type", "integer"),
    ({**OK, "min_p": -1}, "min_p", "invalid_value", "at least 0"),
    ({**OK, "repetition_penalty": 0}, "repetition_penalty", "invalid_value", "greater than 0"),
    ({**OK, "max_tokens": 0}, "max_tokens", "invalid_value", "at least 1"),
    ({**OK, "max_tokens": 5.0}, "max_tokens", "invalid_type", "integer"),
    ({**OK, "max_completion_tokens": -3}, "max_completion_tokens", "invalid_value", "at least 1"),
    ({**OK, "max_tokens": 5, "max_completion_tokens": 6}, "max_tokens", "invalid_value", "only max_completion_tokens"),
    ({**OK, "n": 2}, "n", "unsupported_value", "one choice"),
    ({**OK, "seed": 1.5}, "seed", "invalid_type", "integer"),
    ({**OK, "stop": ["a", "b", "c", "d", "e"]}, "stop", "array_above_max_length", "at most 4"),
    ({**OK, "stop": [1]}, "stop", "invalid_type", "strings"),
    ({**OK, "stop": ""}, "stop", "invalid_value", "empty string"),
    ({**OK, "stream": "yes"}, "stream", "invalid_type", "boolean"),
    ({**OK, "stream_options": {"include_usage": True}}, "stream_options", "invalid_value", "only allowed"),
    ({**OK, "stream": True, "stream_options": {"usage": True}}, "stream_options", "invalid_type", "include_usage"),
    ({**OK, "stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage",
     "invalid_type", "boolean"),
    ({**OK, "response_format": {"type": "json_schema", "json_schema": {}}}, "response_format.type",
     "unsupported_value", "json_object"),
    ({**OK, "response_format": {"type": "yaml"}}, "response_format", "invalid_value", "json_object"),
    ({**OK, "logit_bias": {"x": 1}}, "logit_bias", "invalid_value", "token ids"),
    ({**OK, "logit_bias": {"5": 101}}, "logit_bias", "invalid_value", "at most 100"),
    ({**OK, "logit_bias": [1]}, "logit_bias", "invalid_type", "object"),
    ({**OK, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "unsupported_parameter",
     "remove it"),
    ({**OK, "logprobs": True}, "logprobs", "unsupported_parameter", "not supported"),
    ({**OK, "modalities": ["text", "audio"]}, "modalities", "unsupported_parameter", "not supported"),
    ({**OK, "model": 3}, "model", "invalid_type", "model id"),
]


@pytest.mark.parametrize("request_, param, code, words", BAD, ids=[f"{i}-{b[1]}" for i, b in enumerate(BAD)])
def test_invalid_requests_get_openai_errors_that_say_what_to_do(request_, param, code, words):
    with pytest.raises(InvalidRequestError) as err:
        validate_chat_request(request_)
    e = err.value
    assert (e.param, e.error_code) == (param, code)
    assert words in str(e)
    status, body = openai_error(e)
    assert status == 400
    assert body == {"error": {"message": str(e), "type": "invalid_request_error", "param": param, "code": code}}


def test_unknown_model_is_a_404_naming_the_loaded_ones():
    with pytest.raises(ModelNotFoundError) as err:
        validate_chat_request({**OK, "model": "gpt-4o"}, known_models=["tiny-chat"])
    status, body = openai_error(err.value)
    assert status == 404 and body["error"]["code"] == "model_not_found" and body["error"]["param"] == "model"
    assert "tiny-chat" in body["error"]["message"]
    assert validate_chat_request({**OK, "model": "gpt-4o"}).model == "gpt-4o"   # no list given: not checked


def test_api_errors_keep_their_class_across_the_wire():
    e = InvalidRequestError("Invalid value for 'top_p'", param="top_p")
    back = TabmeshError.from_dict(json.loads(json.dumps(e.to_dict())))
    assert type(back) is InvalidRequestError and str(back) == str(e)
    assert back.to_openai()["error"]["type"] == "invalid_request_error"
    p = TabmeshError.from_dict(PromptTooLongError(10, None, 8).to_dict())
    assert isinstance(p, ContextLengthError) and openai_error(p)[1]["error"]["code"] == "context_length_exceeded"


def test_openai_error_for_other_exceptions():
    assert openai_error(ContextLengthError("too long"))[1]["error"]["code"] == "context_length_exceeded"
    s, b = openai_error(ChatTemplateRaised("Conversation roles must alternate"))
    assert s == 400 and "alternate" in b["error"]["message"] and b["error"]["param"] == "messages"
    s, b = openai_error(JsonConstraintError("stuck"))
    assert s == 500 and b["error"]["type"] == "server_error"
    s, b = openai_error(KeyError("x"))
    assert s == 500 and b == {"error": {"message": "internal error: KeyError: 'x'", "type": "server_error",
                                        "param": None, "code": None}}
    assert issubclass(PromptTooLongError, APIError)


# -- response schemas ------------------------------------------------------------------

USAGE_KEYS = {"prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details",
              "completion_tokens_details", "extra"}


def check_usage(u: dict, prompt: int, completion: int) -> None:
    assert set(u) == USAGE_KEYS
    assert (u["prompt_tokens"], u["completion_tokens"], u["total_tokens"]) == (prompt, completion, prompt + completion)
    assert isinstance(u["prompt_tokens_details"]["cached_tokens"], int)
    assert all(isinstance(v, int) for v in u["completion_tokens_details"].values())
    assert {"time_to_first_token_s", "prefill_tokens_per_s", "decode_tokens_per_s", "e2e_latency_s"} <= set(u["extra"])


def test_whole_response_has_every_key_of_openais_chat_completion():
    engine = make_engine()
    prompt_len = len(engine.encode_chat(USER))
    r = run(create_chat_completion(engine, {"messages": USER, "temperature": 0}))
    assert set(r) == {"id", "object", "created", "model", "system_fingerprint", "choices", "usage"}
    assert r["id"].startswith("chatcmpl-") and len(r["id"]) == 38
    assert r["object"] == "chat.completion" and isinstance(r["created"], int) and r["model"] == "tiny-chat"
    assert isinstance(r["system_fingerprint"], str)
    [c] = r["choices"]
    assert set(c) == {"index", "message", "logprobs", "finish_reason"}
    assert c["index"] == 0 and c["logprobs"] is None and c["finish_reason"] == "stop"
    assert c["message"] == {"role": "assistant", "content": "Hello world!", "refusal": None}
    check_usage(r["usage"], prompt_len, len(REPLY) + 1)
    json.dumps(r)   # plain JSON all the way down


def test_max_tokens_gives_finish_reason_length():
    r = run(create_chat_completion(make_engine(), {"messages": USER, "temperature": 0, "max_tokens": 2}))
    assert r["choices"][0]["finish_reason"] == "length" and r["choices"][0]["message"]["content"] == "Hello"
    assert r["usage"]["completion_tokens"] == 2


def test_stop_and_seed_pass_through():
    r = run(create_chat_completion(make_engine(), {"messages": USER, "stop": [" wor"], "seed": 9}))
    assert r["choices"][0]["message"]["content"] == "Hello" and r["choices"][0]["finish_reason"] == "stop"
    assert r["usage"]["extra"]["seed"] == 9


CHUNK_KEYS = {"id", "object", "created", "model", "system_fingerprint", "choices"}


@pytest.mark.parametrize("include_usage", [False, True])
def test_stream_chunks_follow_openais_sequence(include_usage):
    engine = make_engine()
    req = {"messages": USER, "temperature": 0, "stream": True}
    if include_usage:
        req["stream_options"] = {"include_usage": True}
    chunks = run(agather(stream_chat_completion(engine, req)))
    keys = CHUNK_KEYS | ({"usage"} if include_usage else set())
    for ch in chunks:
        assert set(ch) == keys and ch["object"] == "chat.completion.chunk"
        assert ch["id"] == chunks[0]["id"] and ch["created"] == chunks[0]["created"]
        for c in ch["choices"]:
            assert set(c) == {"index", "delta", "logprobs", "finish_reason"} and c["index"] == 0
    first, *middle, final = chunks[:-1] if include_usage else chunks
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    assert first["choices"][0]["finish_reason"] is None
    assert [c["choices"][0]["delta"] for c in middle] == [{"content": t} for t in ("Hel", "lo", " wor", "ld", "!")]
    assert all(c["choices"][0]["finish_reason"] is None for c in middle)
    assert final["choices"][0]["delta"] == {} and final["choices"][0]["finish_reason"] == "stop"
    if include_usage:
        assert all(c["usage"] is None for c in chunks[:-1])
        assert chunks[-1]["choices"] == []
        check_usage(chunks[-1]["usage"], len(engine.encode_chat(USER)), len(REPLY) + 1)
    json.dumps(chunks)


def test_stream_holds_back_a_split_stop_string():
    chunks = run(agather(stream_chat_completion(make_engine(), {"messages": USER, "stop": ["o w"]})))
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "Hell"


def test_json_object_response_format_gives_loadable_json():
    engine = make_engine(reply=ids('Sure: {"', "a", '":', " ", "true", "}"))
    r = run(create_chat_completion(engine, {"messages": USER, "temperature": 0, "max_tokens": 40,
                                            "response_format": {"type": "json_object"}}))
    out = r["choices"][0]["message"]["content"]
    assert isinstance(json.loads(out), dict) and r["choices"][0]["finish_reason"] == "stop"


# -- errors at create time ---------------------------------------------------------------

def test_context_errors_are_raised_before_any_generation():
    engine = make_engine(n_ctx=16)
    with pytest.raises(PromptTooLongError) as err:
        run(create_chat_completion(engine, {"messages": USER, "max_tokens": 5}))
    assert engine.model.calls == []
    status, body = openai_error(err.value)
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    assert body["error"]["param"] == "messages" and "16" in body["error"]["message"]
    with pytest.raises(PromptTooLongError):      # the stream object is never handed out
        run(Client(engine).chat.completions.create(messages=USER, stream=True))


def test_request_checks_that_need_the_model():
    engine = make_engine()
    with pytest.raises(ModelNotFoundError):
        run(create_chat_completion(engine, {"messages": USER, "model": "other"}))
    with pytest.raises(InvalidRequestError, match="vocabulary has"):
        run(create_chat_completion(engine, {"messages": USER, "logit_bias": {str(10**6): 5}}))
    with pytest.raises(InvalidRequestError, match="stream_chat_completion"):
        run(create_chat_completion(engine, {"messages": USER, "stream": True}))
    assert run(create_chat_completion(engine, {"messages": USER, "model": "tiny-chat", "max_tokens": 1}))


def test_a_template_that_refuses_the_conversation_is_a_400():
    engine = make_engine()
    engine.chat_template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    with pytest.raises(ChatTemplateRaised) as err:
        run(create_chat_completion(engine, {"messages": USER}))
    assert openai_error(err.value)[0] == 400


# -- the client object -------------------------------------------------------------------

def test_client_mirrors_async_openai():
    client = Client(make_engine())
    r = run(client.chat.completions.create(messages=USER, temperature=0))
    assert r["choices"][0]["message"]["content"] == "Hello world!"
    r2 = run(client.chat.completions.create({"messages": USER, "temperature": 0}, max_tokens=1))
    assert r2["choices"][0]["message"]["content"] == "Hel"
    with pytest.raises(InvalidRequestError):
        run(client.chat.completions.create(["not", "a", "dict"]))

    async def stream():
        s = await client.chat.completions.create(messages=USER, temperature=0, stream=True)
        assert isinstance(s, ChatCompletionStream) and s.id.startswith("chatcmpl-")
        async with s:
            return [c async for c in s]

    chunks = run(stream())
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_stream_cancel_ends_cleanly_between_tokens():
    engine = make_engine()
    client = Client(engine)

    async def go():
        s = await client.chat.completions.create(messages=USER, temperature=0, stream=True,
                                                 stream_options={"include_usage": True})
        out = []
        async for c in s:
            out.append(c)
            if c["choices"] and c["choices"][0]["delta"].get("content") == "lo":
                s.cancel()
        return out

    chunks = run(go())
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "Hello"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["usage"]["completion_tokens"] == 2

    external = asyncio.Event()
    external.set()
    r = run(client.chat.completions.create(messages=USER, cancel=external))
    assert r["choices"][0]["message"]["content"] == "" and r["usage"]["completion_tokens"] == 0


def test_models_list():
    engine = make_engine()
    body = run(Client(engine).models.list())
    assert body == {"object": "list", "data": [{"id": "tiny-chat", "object": "model", "created": engine.created,
                                                "owned_by": "tabmesh"}]}
    other = Engine(FakeModel(reply_policy([IM_END])), TOK, None, "other")
    assert [m["id"] for m in list_models([engine, other])["data"]] == ["tiny-chat", "other"]
    assert isinstance(engine.created, int)


def test_json_object_mode_on_the_real_model():
    """response_format json_object on SmolLM2 itself (numpy backend): the constrained output
    parses as one JSON object, whole and streamed alike, and ends with finish_reason "stop"."""
    from pathlib import Path

    from tabmesh.model.loader import load_model

    path = Path(__file__).resolve().parents[2] / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        pytest.skip(f"{path} is absent (make setup fetches it)")
    engine = run(load_model(str(path), backend="numpy", n_ctx=512)).engine
    req = {"messages": [{"role": "user", "content": "Describe a cat as JSON with the keys name and age."}],
           "temperature": 0, "max_tokens": 64, "response_format": {"type": "json_object"}}
    r = run(create_chat_completion(engine, req))
    out = r["choices"][0]["message"]["content"]
    assert isinstance(json.loads(out), dict), out
    assert r["choices"][0]["finish_reason"] == "stop" and r["usage"]["completion_tokens"] < 64

    async def streamed():
        chunks = await agather(await Client(engine).chat.completions.create(**req, stream=True))
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert run(streamed()) == out
