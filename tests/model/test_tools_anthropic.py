"""Tools and structured output through the official anthropic client and the real SmolLM2:
forced tool_use (tool_choice any / tool) whose input validates, streaming and not."""

from __future__ import annotations

import json

import anthropic
import jsonschema
import pytest

from tests.model.test_tools_openai import PERSON, SCHEMAS, TIME_PARAMS, WEATHER_PARAMS

# The client tests run against the local model and an upstream-backed one (upstream_fixtures).
pytestmark = pytest.mark.upstream_variant

TOOLS = [{"name": "get_weather", "description": "Weather now", "input_schema": WEATHER_PARAMS},
         {"name": "get_time", "description": "Local time", "input_schema": TIME_PARAMS}]
MSG = [{"role": "user", "content": "What is the weather in Paris?"}]
GREEDY = {"extra_body": {"temperature": 0}}


@pytest.fixture()
def claude(target):
    with anthropic.Anthropic(base_url=target.url, api_key="unused", max_retries=0,
                             timeout=120) as c:
        yield c


@pytest.mark.parametrize("choice,names", [
    ({"type": "any", "disable_parallel_tool_use": True}, {"get_weather", "get_time"}),
    ({"type": "tool", "name": "get_time"}, {"get_time"}),
])
def test_forced_tool_use(claude, choice, names):
    r = claude.messages.create(model="smollm2", max_tokens=80, messages=MSG, tools=TOOLS,
                               tool_choice=choice, **GREEDY)
    assert r.stop_reason == "tool_use", r.content
    uses = [b for b in r.content if b.type == "tool_use"]
    assert len(uses) == 1 and uses[0].id.startswith("toolu_") and uses[0].name in names
    jsonschema.validate(uses[0].input, SCHEMAS[uses[0].name])


def test_forced_tool_use_streaming(claude):
    with claude.messages.stream(model="smollm2", max_tokens=160, messages=MSG, tools=TOOLS,
                                tool_choice={"type": "tool", "name": "get_weather"},
                                **GREEDY) as stream:
        partial = "".join(e.partial_json for e in stream
                          if e.type == "input_json" and e.partial_json)
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    (use,) = [b for b in final.content if b.type == "tool_use"]
    assert use.name == "get_weather" and json.loads(partial) == use.input
    jsonschema.validate(use.input, WEATHER_PARAMS)


def test_tool_result_round_trip(claude):
    first = claude.messages.create(model="smollm2", max_tokens=80, messages=MSG, tools=TOOLS,
                                   tool_choice={"type": "any"}, **GREEDY)
    use = next(b for b in first.content if b.type == "tool_use")
    history = [*MSG, {"role": "assistant", "content": [b.model_dump() for b in first.content]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                             "content": "18 degrees, sunny"}]}]
    r = claude.messages.create(model="smollm2", max_tokens=24, messages=history, tools=TOOLS,
                               **GREEDY)
    assert r.stop_reason in ("end_turn", "max_tokens", "tool_use")
    assert r.usage.input_tokens + r.usage.cache_read_input_tokens > \
        first.usage.input_tokens + first.usage.cache_read_input_tokens


def test_output_format_json_schema_validates(claude):
    r = claude.messages.create(
        model="smollm2", max_tokens=120, **GREEDY,
        messages=[{"role": "user", "content": "Describe a person as JSON."}],
        output_config={"format": {"type": "json_schema", "schema": PERSON}})
    assert r.stop_reason == "end_turn"
    jsonschema.validate(json.loads(r.content[0].text), PERSON)
