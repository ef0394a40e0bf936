"""Chat templates rendered without jinja2, against jinja2's renderings (made by
scripts/make_reference_fixtures.py in llama-cpp-python's Jinja2ChatFormatter environment)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tabmesh.chat_template import ChatTemplate, ChatTemplateError, ChatTemplateRaised, render_chat

FIXTURE = json.loads((Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "chat_templates.json")
                     .read_text(encoding="utf-8"))


def _case_id(case: dict) -> str:
    return f"{case['template']}-{case['conversation']}-{'gen' if case['add_generation_prompt'] else 'nogen'}"


def test_fixture_has_the_templates_of_the_issue():
    assert {"smollm2", "llama3", "llama3.1", "llama3.2", "qwen2", "qwen2.5"} <= set(FIXTURE["templates"])
    assert "You are a helpful AI assistant named SmolLM" in FIXTURE["templates"]["smollm2"]


@pytest.mark.parametrize("case", FIXTURE["cases"], ids=_case_id)
def test_real_templates_render_like_jinja2(case):
    out = render_chat(FIXTURE["templates"][case["template"]], FIXTURE["conversations"][case["conversation"]],
                      add_generation_prompt=case["add_generation_prompt"], bos_token=FIXTURE["bos_token"],
                      eos_token=FIXTURE["eos_token"], strftime_now=lambda fmt: FIXTURE["fixed_date"],
                      **case["extra"])
    assert out == case["text"]


@pytest.mark.parametrize("snippet", FIXTURE["snippets"], ids=lambda s: s["template"][:40])
def test_snippets_render_like_jinja2(snippet):
    assert ChatTemplate(snippet["template"]).render(**snippet["variables"]) == snippet["text"]


def test_smollm2_adds_its_default_system_prompt():
    out = render_chat(FIXTURE["templates"]["smollm2"], [{"role": "user", "content": "Hi"}])
    assert out == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                   "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_raise_exception_carries_the_templates_message():
    llama31 = FIXTURE["templates"]["llama3.1"]
    with pytest.raises(ChatTemplateRaised, match="no first user message"):
        render_chat(llama31, [{"role": "system", "content": "s"}], tools=[{"name": "f"}])
    with pytest.raises(ChatTemplateRaised, match="alternate"):
        render_chat("{% if messages[0].role != 'user' %}{{ raise_exception('roles must alternate') }}{% endif %}",
                    [{"role": "assistant", "content": "x"}])


@pytest.mark.parametrize("source, construct", [
    ("{% include 'other.jinja' %}", "include"),
    ("{% call foo() %}x{% endcall %}", "call"),
    ("{% extends 'base' %}", "extends"),
    ("{% raw %}{{ x }}{% endraw %}", "raw"),
    ("{{ x | wibble }}", "wibble"),
    ("{{ x is wobbly }}", "wobbly"),
    ("{% for x in xs recursive %}{% endfor %}", "recursive"),
])
def test_unsupported_constructs_are_named(source, construct):
    with pytest.raises(ChatTemplateError, match=construct):
        ChatTemplate(source).render(x=1, xs=[1])


@pytest.mark.parametrize("source", [
    "{% if x %}", "{% for x in y %}", "{{ x", "{{ (1 }}", "{% endif %}", "{# open",
])
def test_malformed_templates_fail_with_a_line_number(source):
    with pytest.raises(ChatTemplateError, match="line 1"):
        ChatTemplate(source)


def test_undefined_prints_empty_but_fails_when_used():
    assert ChatTemplate("[{{ nothing }}]").render() == "[]"
    with pytest.raises(ChatTemplateError, match="undefined"):
        ChatTemplate("{{ nothing.attr }}").render()
    with pytest.raises(ChatTemplateError, match="undefined"):
        ChatTemplate("{{ messages[0]['role'] }}").render(messages=[])
