"""The LLM in a real tab: the page's engine against llama.cpp's fixture, the OpenAI-shaped API,
the chat panel, and the weights cache across a reload."""
import json
from pathlib import Path

import pytest

from settings import config

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "model_q4_1.json"
MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf"


def fixture_prompt(name: str) -> dict:
    return next(p for p in json.loads(FIXTURE.read_text())["prompts"] if p["name"] == name)


@pytest.fixture
def llm_node(open_node, room):
    node = open_node(room)
    node.page.set_default_timeout(config.LLM_TIMEOUT_MS)
    return node


@pytest.mark.parametrize("backend", ["webgpu", "numpy"])
def test_greedy_tokens_equal_llama_cpp(llm_node, backend):
    ref = fixture_prompt("short")
    n = config.GREEDY_TOKENS_IN_BROWSER[backend]
    out = llm_node.page.evaluate("(o) => tabmesh.llm.generate(o)",
                                 {"prompt": ref["text"], "max_tokens": n, "backend": backend})
    assert out["backend"] == backend and out["model"] == MODEL
    assert out["prompt_tokens"] == ref["tokens"]
    assert out["tokens"] == ref["greedy"]["tokens"][:n]
    for key in ("load_s", "ttft_s", "prefill_tok_s", "decode_tok_s"):
        assert out["timings"][key] > 0, key


def test_ggml_numerics_give_llama_cpps_32_greedy_tokens(llm_node):
    """numerics="ggml" on WebGPU (SwiftShader here): llama.cpp's arithmetic bit for bit, so all
    32 greedy tokens are llama.cpp's, past step 5 where f32 numerics part from them (a near-tie,
    gap 0.33). The RoPE table comes from the server's glibc (GET /api/ggml-rope)."""
    ref = fixture_prompt("short")
    out = llm_node.page.evaluate("(o) => tabmesh.llm.generate(o)",
                                 {"prompt": ref["text"], "max_tokens": 32, "backend": "webgpu",
                                  "numerics": "ggml"})
    assert (out["backend"], out["numerics"]) == ("webgpu", "ggml")
    assert out["prompt_tokens"] == ref["tokens"]
    assert out["tokens"] == ref["greedy"]["tokens"] and len(out["tokens"]) == 32
    info = llm_node.page.evaluate("tabmesh.llm.info()")
    assert info["numerics"] == "ggml" and not info["warnings"]


def test_chat_completions_whole_streamed_and_errors(llm_node):
    page = llm_node.page
    page.evaluate("tabmesh.llm.load({backend: 'numpy'})")
    req = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 3,
           "temperature": 0}
    whole = page.evaluate("(r) => tabmesh.chat.completions.create(r)", req)
    assert whole["object"] == "chat.completion" and whole["id"].startswith("chatcmpl-")
    assert whole["model"] == MODEL
    (choice,) = whole["choices"]
    assert choice["finish_reason"] == "length" and choice["message"]["role"] == "assistant"
    assert choice["logprobs"] is None
    usage = whole["usage"]
    assert usage["completion_tokens"] == 3
    assert usage["total_tokens"] == usage["prompt_tokens"] + 3 and usage["prompt_tokens"] > 10

    chunks = page.evaluate("""async (r) => { const out = [];
        for await (const c of await tabmesh.chat.completions.create(r)) out.push(c); return out; }""",
                           {**req, "stream": True, "stream_options": {"include_usage": True}})
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == choice["message"]["content"]  # greedy: same words, whole or streamed

    err = page.evaluate("""async () => { try { await tabmesh.chat.completions.create({messages: [], temprature: 1}); }
        catch (e) { return {status: e.status, error: e.error, message: e.message}; } return null; }""")
    assert err["status"] == 400 and err["error"]["type"] == "invalid_request_error"
    assert err["error"]["param"] and err["message"]
    missing = page.evaluate("""async () => { try { await tabmesh.chat.completions.create(
        {model: 'nope.gguf', messages: [{role: 'user', content: 'hi'}]}); } catch (e) { return {status: e.status, code: e.code}; } }""")
    assert missing == {"status": 404, "code": "model_not_found"}

    models = page.evaluate("tabmesh.models.list()")
    assert models["object"] == "list" and MODEL in [m["id"] for m in models["data"]]


def test_chat_panel_streams_text_never_html_and_stop_works(llm_node):
    page = llm_node.page
    page.select_option("#backend", "numpy")
    page.fill("#chat-input", "Repeat after me: <script>window.pwned = 1</script><b>bold</b>")
    page.press("#chat-input", "Enter")  # Enter sends (Shift+Enter would add a line)
    page.wait_for_function("document.querySelectorAll('#chat-log .msg.assistant').length === 1 && "
                           "!document.querySelector('#stop').disabled")
    page.wait_for_function("document.querySelector('#chat-log .msg.assistant').textContent.length > 3")
    page.click("#stop")
    page.wait_for_function("document.querySelector('#send').disabled === false")
    user = page.locator("#chat-log .msg.user")
    assert user.inner_text().startswith("Repeat after me: <script>")  # shown as text
    assert page.locator("#chat-log script, #chat-log b").count() == 0
    assert page.evaluate("window.pwned") is None
    assert "tokens/s" in page.inner_text("#chat-stats") and "first token" in page.inner_text("#chat-stats")
    assert page.evaluate("tabmesh.errors") == []


def test_weights_come_from_the_browser_cache_after_a_reload(llm_node, room):
    page = llm_node.page
    first = page.evaluate("tabmesh.llm.load({backend: 'numpy'})")
    assert first["networkBytes"] > 90e6  # the whole 96.6 MB of tensors the first time
    page.reload()
    page.evaluate("tabmesh.ready")
    second = page.evaluate("tabmesh.llm.load({backend: 'numpy'})")
    assert second["networkBytes"] == 0 and second["cacheHits"] > 0
    assert second["bytesRead"] == first["bytesRead"]
