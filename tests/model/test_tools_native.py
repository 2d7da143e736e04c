"""Tools and structured output in the native protocol (httpx) against the real SmolLM2:
forced calls as tool blocks, buffered and streamed; formats that validate."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import pytest

from tests.model.sse import read_sse
from tests.model.test_tools_openai import (PERSON, SCHEMAS, TIME_PARAMS, WEATHER_PARAMS,
                                           check_json_object)

# The client tests run against the local model and an upstream-backed one (upstream_fixtures).
pytestmark = pytest.mark.upstream_variant

P = "/models/smollm2/"
TOOLS = [{"name": "get_weather", "description": "Weather now", "parameters": WEATHER_PARAMS},
         {"name": "get_time", "description": "Local time", "parameters": TIME_PARAMS}]
ASK = {"prompt": "What is the weather in Paris?", "tools": TOOLS,
       "params": {"temperature": 0, "max_tokens": 120}}


@pytest.fixture()
def http(target):
    with httpx.Client(base_url=target.url, timeout=120) as c:
        yield c


@pytest.mark.parametrize("choice,names", [("required", {"get_weather", "get_time"}),
                                          ({"name": "get_time"}, {"get_time"})])
def test_forced_call_is_a_tool_block(http, choice, names):
    r = http.post(f"{P}query/", json={**ASK, "tool_choice": choice,
                                      "parallel_tool_calls": False})
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["stop_reason"] == "tool_use", data
    tools = [b for b in data["blocks"] if b["type"] == "tool"]
    (block,) = tools
    assert block["name"] in names and block["id"].startswith("call_")
    jsonschema.validate(block["arguments"], SCHEMAS[block["name"]])


def test_forced_call_streams_as_tool_frames(http):
    r = http.post(f"{P}stream/", json={**ASK, "tool_choice": {"name": "get_weather"}})
    assert r.status_code == 201, r.text
    frames, _ = read_sse(http, f"{P}stream/{r.json()['id']}/")
    starts = [f.data for f in frames if f.event == "block.start" and f.data["type"] == "tool"]
    assert len(starts) == 1 and starts[0]["name"] == "get_weather"
    index = starts[0]["index"]
    arguments = "".join(f.data["arguments"] for f in frames
                        if f.event == "block.delta" and f.data["index"] == index)
    jsonschema.validate(json.loads(arguments), WEATHER_PARAMS)
    assert [f.data for f in frames if f.event == "block.stop"][-1] == {"index": index}
    assert frames[-1].event == "message.stop" and frames[-1].data["stop_reason"] == "tool_use"


def test_tool_result_conversation(http):
    messages = [{"role": "user", "content": "What is the weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "c1", "name": "get_weather",
                     "arguments": {"city": "Paris", "unit": "celsius"}}]},
                {"role": "tool", "content": "18 degrees, sunny", "tool_call_id": "c1"}]
    r = http.post(f"{P}query/", json={"transport": "conversation", "messages": messages,
                                      "tools": TOOLS, "params": {"temperature": 0,
                                                                 "max_tokens": 16}})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["input_tokens"] > 100


COLORS = "(red|green|blue)(, (red|green|blue)){2}"


@pytest.mark.parametrize("fmt,check", [
    ({"type": "json_schema", "schema": PERSON},
     lambda text, stop: stop and jsonschema.validate(json.loads(text), PERSON) is None),
    ("json", lambda text, stop: check_json_object(text, stop) is None),
    pytest.param({"type": "regex", "pattern": COLORS},
                 lambda text, stop: stop and re.fullmatch(COLORS, text),
                 marks=pytest.mark.local_only(
                     "an OpenAI-compatible upstream has no regex format: the front refuses "
                     "it (400 format.pattern, test_upstream.py)")),
])
def test_formats(http, fmt, check):
    r = http.post(f"{P}query/", json={"prompt": "Describe a person, or name three colors.",
                                      "format": fmt,
                                      "params": {"temperature": 0, "max_tokens": 120}})
    assert r.status_code == 200, r.text
    data = r.json()
    (block,) = data["blocks"]
    assert check(block["text"], data["stop_reason"] == "stop"), data


def test_bad_grammar_is_a_400(http):
    r = http.post(f"{P}query/", json={"prompt": "x", "format": {"type": "gbnf",
                                                                "grammar": "root ::= ("}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "format.grammar"
