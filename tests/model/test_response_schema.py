"""A model's response_schema (Hugging Face x-regex response parsing) in place of the built-in
parsers, on a real SmolLM2 in the OpenAI chat (streamed and not), Anthropic and Ollama dialects.

The schema is written for what SmolLM2 writes: calls in the fallback tool format
(`<tool_call>{json}</tool_call>`, chat.tool_prompt), and, since it never writes think tags, its
answer's first sentence as the reasoning and the rest as the content (the think-tag format
itself is covered with fixed texts in tests/unit/chat/test_response_schema.py)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import anthropic
import ollama
import pytest

from tests.model.conftest import Server, own_server
from tests.model.test_tools_openai import TOOLS

SCHEMA = {"type": "object", "properties": {
    "role": {"const": "assistant"},
    "reasoning_content": {"type": "string", "x-regex": r"^\s*([^<]+?[.!?])(?=\s)"},
    "content": {"type": "string", "x-regex": r"^\s*[^<]+?[.!?]\s+(.*?)\s*(?:<tool_call>|$)"},
    "tool_calls": {"type": "array", "x-regex-iterator": r"<tool_call>\s*(.+?)\s*</tool_call>",
                   "items": {"type": "object", "properties": {
                       "type": {"const": "function"},
                       "function": {"type": "object", "x-parser": "json", "properties": {
                           "name": {"type": "string"}, "arguments": {"type": "object"}}}}}}}}
ASK = [{"role": "user", "content": "Describe Paris in three sentences."}]
WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def schema_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    path = tmp_path_factory.mktemp("schema") / "schema.json"
    path.write_text(json.dumps(SCHEMA))
    yield from own_server(tmp_path_factory, "schema-server", "smollm2", "--parallel", "2",
                          "--ctx", "2048", "--threads", "2", "--store", "memory",
                          "--response-schema", str(path))


def split(reasoning: str | None, content: str | None) -> None:
    """The schema's split of a real answer: one sentence of reasoning, the rest as content."""
    assert reasoning and re.fullmatch(r"[^<]+?[.!?]", reasoning), reasoning
    assert content and "<" not in content and reasoning not in content, content


@pytest.fixture()
def oai(schema_server: Server):
    import openai

    with openai.OpenAI(base_url=schema_server.base_url, api_key="x", max_retries=0,
                       timeout=120) as c:
        yield c


def test_openai_chat_reasoning_and_content(oai):
    kw = dict(model="smollm2", messages=ASK, temperature=0, max_tokens=120)
    r = oai.chat.completions.create(**kw)
    message = r.choices[0].message
    reasoning = message.model_extra["reasoning_content"]
    split(reasoning, message.content)
    streamed = {"reasoning_content": "", "content": ""}
    for chunk in oai.chat.completions.create(**kw, stream=True):
        if chunk.choices:
            delta = chunk.choices[0].delta
            streamed["content"] += delta.content or ""
            streamed["reasoning_content"] += (delta.model_extra or {}).get(
                "reasoning_content") or ""
    assert streamed == {"reasoning_content": reasoning, "content": message.content}


def test_openai_chat_tool_calls(oai):
    kw = dict(model="smollm2", messages=WEATHER, tools=TOOLS, tool_choice="required",
              temperature=0, max_tokens=200)
    r = oai.chat.completions.create(**kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    calls = [(c.function.name, json.loads(c.function.arguments))
             for c in choice.message.tool_calls]
    assert calls[0][0] == "get_weather" and calls[0][1].get("city")
    streamed: dict[int, list[str]] = {}
    content, finish = "", None
    for chunk in oai.chat.completions.create(**kw, stream=True):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
        for call in delta.tool_calls or []:
            entry = streamed.setdefault(call.index, ["", ""])
            entry[0] += call.function.name or ""
            entry[1] += call.function.arguments or ""
    assert finish == "tool_calls" and not content
    made = [(n, json.loads(a)) for n, a in streamed.values()]
    assert made[0][0] == "get_weather" and made[0][1].get("city")
    assert len({json.dumps(c, sort_keys=True) for c in made}) == len(made), made  # no repeat


def test_anthropic_thinking_text_and_tool_use(schema_server):
    with anthropic.Anthropic(base_url=schema_server.url, api_key="x", max_retries=0) as claude:
        answer = claude.messages.create(
            model="smollm2", max_tokens=1200, messages=ASK, extra_body={"temperature": 0},
            thinking={"type": "enabled", "budget_tokens": 1024})
        kinds = [b.type for b in answer.content]
        assert kinds == ["thinking", "text"], kinds
        split(answer.content[0].thinking, answer.content[1].text)
        tools = [{"name": t["function"]["name"], "description": t["function"]["description"],
                  "input_schema": t["function"]["parameters"]} for t in TOOLS]
        call = claude.messages.create(model="smollm2", max_tokens=200, messages=WEATHER,
                                      tools=tools, tool_choice={"type": "any"},
                                      extra_body={"temperature": 0})
    assert call.stop_reason == "tool_use"
    uses = [b for b in call.content if b.type == "tool_use"]
    assert uses and uses[0].name == "get_weather" and uses[0].input.get("city")
    assert not any(b.type == "text" and "<tool" in b.text for b in call.content)


def test_ollama_thinking_and_content(schema_server):
    oc = ollama.Client(host=schema_server.url, timeout=120)
    options = {"temperature": 0, "num_predict": 120}
    shown = oc.chat(model="smollm2", messages=ASK, think=True, options=options)
    split(shown.message.thinking, shown.message.content)
    parts = list(oc.chat(model="smollm2", messages=ASK, think=True, options=options,
                         stream=True))
    assert "".join(p.message.thinking or "" for p in parts) == shown.message.thinking
    assert "".join(p.message.content or "" for p in parts) == shown.message.content
