"""Tools and structured output through the official openai client and the real SmolLM2.

SmolLM2's template knows no tools, so tools go through the fallback prompt; a forced call
(tool_choice required or named) is held to the grammar, so its arguments always validate."""

from __future__ import annotations

import json

import jsonschema
import pytest

# The client tests run against the local model and an upstream-backed one (upstream_fixtures).
pytestmark = pytest.mark.upstream_variant

WEATHER_PARAMS = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 24}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"]}
TIME_PARAMS = {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 24}},
               "required": ["timezone"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                           "parameters": WEATHER_PARAMS}},
         {"type": "function", "function": {"name": "get_time", "description": "Local time",
                                           "parameters": TIME_PARAMS}}]
SCHEMAS = {"get_weather": WEATHER_PARAMS, "get_time": TIME_PARAMS}
MSG = [{"role": "user", "content": "What is the weather in Paris?"}]
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0,
                                                        "maximum": 120},
    "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3}},
    "required": ["name", "age", "hobbies"], "additionalProperties": False}


def check_json_object(text: str, finished: bool) -> None:
    """Free-form JSON: a whole object when the model ended it. The grammar cannot stop a small
    model from rambling inside a string until max_tokens; the text is then a cut-off object."""
    assert text.lstrip().startswith("{")
    if finished:
        assert isinstance(json.loads(text), dict)


def check_calls(calls: list, names: set[str]) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("choice,names", [
    ("required", {"get_weather", "get_time"}),
    ({"type": "function", "function": {"name": "get_time"}}, {"get_time"}),
])
def test_forced_tool_call(client, choice, names):
    r = client.chat.completions.create(model="smollm2", messages=MSG, tools=TOOLS,
                                       tool_choice=choice, parallel_tool_calls=False,
                                       max_tokens=80, temperature=0)
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls", message
    assert len(message.tool_calls) == 1
    check_calls(message.tool_calls, names)
    assert not message.content


def test_forced_tool_call_streaming(client):
    stream = client.chat.completions.create(
        model="smollm2", messages=MSG, tools=TOOLS, max_tokens=160, temperature=0, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        choice = chunk.choices[0]
        for delta in choice.delta.tool_calls or []:
            if delta.index not in calls:  # the first delta of a call names it
                assert delta.id and delta.type == "function" and delta.function.name
                calls[delta.index] = {"name": delta.function.name, "arguments": ""}
            else:
                assert delta.id is None and delta.function.name is None
            calls[delta.index]["arguments"] += delta.function.arguments or ""
        assert not choice.delta.content
        finish = choice.finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0]
    assert calls[0]["name"] == "get_weather"
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER_PARAMS)


def test_tool_round_trip_renders_the_result(client):
    first = client.chat.completions.create(model="smollm2", messages=MSG, tools=TOOLS,
                                           tool_choice="required", max_tokens=80,
                                           temperature=0, parallel_tool_calls=False)
    call = first.choices[0].message.tool_calls[0]
    history = [*MSG, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": "18 degrees, sunny"}]
    r = client.chat.completions.create(model="smollm2", messages=history, tools=TOOLS,
                                       max_tokens=24, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert r.usage.prompt_tokens > first.usage.prompt_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_output_validates(client, stream):
    fmt = {"type": "json_schema",
           "json_schema": {"name": "person", "strict": True, "schema": PERSON}}
    kw = dict(model="smollm2", max_tokens=120, temperature=0, response_format=fmt,
              messages=[{"role": "user", "content": "Describe a person as JSON."}])
    if stream:
        text = "".join(c.choices[0].delta.content or ""
                       for c in client.chat.completions.create(**kw, stream=True) if c.choices)
    else:
        r = client.chat.completions.create(**kw)
        assert r.choices[0].finish_reason == "stop"
        text = r.choices[0].message.content
    jsonschema.validate(json.loads(text), PERSON)


def test_json_object_output_parses(client):
    r = client.chat.completions.create(
        model="smollm2", max_tokens=80, temperature=0, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Give me a JSON object with two colors."}])
    check_json_object(r.choices[0].message.content, r.choices[0].finish_reason == "stop")
