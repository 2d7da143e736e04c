"""Structured output and tools through the official ollama client and the real SmolLM2.

Ollama has no tool_choice, so a call cannot be forced here: tools are offered (auto) and
whatever the small model answers must come back well-formed."""

from __future__ import annotations

import json

import jsonschema
import ollama
import pytest

from tests.model.test_tools_openai import PERSON, TOOLS, check_json_object

# The client tests run against the local model and an upstream-backed one (upstream_fixtures).
pytestmark = pytest.mark.upstream_variant

MODEL = "smollm2"
GREEDY = {"temperature": 0, "num_predict": 120}


@pytest.fixture()
def oc(target):
    return ollama.Client(host=target.url, timeout=120)


@pytest.mark.parametrize("stream", [False, True])
def test_format_schema_chat_validates(oc, stream):
    messages = [{"role": "user", "content": "Describe a person as JSON."}]
    if stream:
        text = "".join(part.message.content for part in oc.chat(
            model=MODEL, messages=messages, format=PERSON, options=GREEDY, stream=True))
    else:
        r = oc.chat(model=MODEL, messages=messages, format=PERSON, options=GREEDY)
        assert r.done_reason == "stop"
        text = r.message.content
    jsonschema.validate(json.loads(text), PERSON)


def test_format_json_generate_parses(oc):
    r = oc.generate(model=MODEL, prompt="Two colors as a JSON object.", format="json",
                    options=GREEDY)
    check_json_object(r.response, r.done_reason == "stop")


def test_tools_auto_answers_are_well_formed(oc):
    r = oc.chat(model=MODEL, tools=TOOLS, options={"temperature": 0, "num_predict": 60},
                messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    assert "<tool_call>" not in r.message.content
    for call in r.message.tool_calls or []:
        assert call.function.name in ("get_weather", "get_time")
        assert isinstance(call.function.arguments, dict)


def test_tool_result_history_is_rendered(oc):
    history = [{"role": "user", "content": "What is the weather in Paris?"},
               {"role": "assistant", "content": "", "tool_calls": [
                   {"function": {"name": "get_weather",
                                 "arguments": {"city": "Paris", "unit": "celsius"}}}]},
               {"role": "tool", "tool_name": "get_weather", "content": "18 degrees, sunny"}]
    r = oc.chat(model=MODEL, messages=history, tools=TOOLS,
                options={"temperature": 0, "num_predict": 16})
    short = oc.chat(model=MODEL, messages=history[:1], tools=TOOLS,
                    options={"temperature": 0, "num_predict": 1})
    assert r.prompt_eval_count > short.prompt_eval_count
