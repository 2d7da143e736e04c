"""Anthropic Messages: tools, tool_choice, thinking and output_config, from the request to the
exact tool_use / thinking blocks and stream events (a real ModelService, scripted output)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from lmserve.chat.templates import CHATML_TEMPLATE
from lmserve.core.request import NamedTool, ResponseFormat
from lmserve.dialects.anthropic import adapter, routes
from lmserve.dialects.anthropic.blocks import SIGNATURE
from lmserve.dialects.anthropic.schema import MessageRequest
from lmserve.dialects.anthropic.tools import thinking
from tests.unit.chat_service import THINK_TEMPLATE, ScriptedService, scripted_client
from tests.unit.gbnf_matcher import GbnfMatcher
from tests.unit.dialects.anthropic.test_anthropic import parse_sse

WEATHER = {"name": "get_weather", "description": "Weather now", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TIME = {"name": "get_time", "input_schema": {"type": "object", "properties": {}}}
USER = [{"role": "user", "content": "Weather in Paris?"}]
CALLS = ['Checking.<tool_call>\n{"name": "get_weather", ', '"arguments": {"city": ', '"Paris"}}',
         '\n</tool_call>\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>']
REQUEST = {"model": "m", "max_tokens": 2000, "messages": USER, "tools": [WEATHER, TIME]}


def client_for(chunks: list[str], template: str = CHATML_TEMPLATE
               ) -> tuple[TestClient, ScriptedService]:
    return scripted_client(routes.make_router, chunks, template)


def body(**kw: Any) -> MessageRequest:
    return MessageRequest.model_validate({**REQUEST, **kw})


def test_adapter_maps_tools_choices_thinking_and_format() -> None:
    gen, _ = adapter.message_request(body(tool_choice={"type": "any"}))
    assert [t.name for t in gen.tools or []] == ["get_weather", "get_time"]
    assert gen.tools and gen.tools[0].parameters == WEATHER["input_schema"]
    assert gen.tool_choice == "required" and gen.parallel_tool_calls and gen.reasoning is False
    gen, _ = adapter.message_request(body(tool_choice={
        "type": "tool", "name": "get_time", "disable_parallel_tool_use": True}))
    assert gen.tool_choice == NamedTool("get_time") and not gen.parallel_tool_calls
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    gen, _ = adapter.message_request(body(
        thinking={"type": "enabled", "budget_tokens": 1024},
        output_config={"format": {"type": "json_schema", "schema": schema}}))
    assert gen.reasoning is True
    assert gen.response_format == ResponseFormat("json_schema", schema=schema, strict=True,
                                                 param="output_config.format.schema")
    assert thinking(body(thinking={"type": "adaptive", "display": "omitted"}), 10).display \
        == "omitted"
    assert thinking(body(), 10).display is None


def test_tool_history_reaches_a_toolless_template_as_the_fallback_text() -> None:
    client, service = client_for(["ok"])
    history = [*USER, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                      "content": "18C"}]}]
    r = client.post("/v1/messages", json={**REQUEST, "messages": history})
    assert r.status_code == 200, r.text
    prompt = service.started[0][1].text or ""
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt
    assert '<tool_response name="get_weather" id="toolu_1">\n18C\n</tool_response>' in prompt


def test_tool_use_blocks() -> None:
    client, _ = client_for(CALLS)
    r = client.post("/v1/messages", json=REQUEST)
    data = r.json()
    assert data["stop_reason"] == "tool_use" and data["stop_sequence"] is None
    text, first, second = data["content"]
    assert text == {"type": "text", "text": "Checking."}
    assert first["type"] == "tool_use" and first["id"].startswith("toolu_")
    assert (first["name"], first["input"]) == ("get_weather", {"city": "Paris"})
    assert (second["name"], second["input"]) == ("get_time", {})


def test_tool_use_stream_events() -> None:
    client, _ = client_for(CALLS)
    events = parse_sse(client.post("/v1/messages", json={**REQUEST, "stream": True}).content)
    names = [e for e, _ in events]
    assert names[:4] == ["message_start", "content_block_start", "ping", "content_block_delta"]
    assert names[-2:] == ["message_delta", "message_stop"]
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    starts = [d for e, d in events if e == "content_block_start"]
    assert [s["index"] for s in starts] == [0, 1, 2]
    assert starts[0]["content_block"] == {"type": "text", "text": ""}
    assert starts[1]["content_block"]["type"] == "tool_use"
    assert starts[1]["content_block"]["input"] == {}
    assert starts[1]["content_block"]["name"] == "get_weather"
    json_parts: dict[int, str] = {1: "", 2: ""}
    for event, data in events:
        if event == "content_block_delta" and data["index"] > 0:
            assert data["delta"]["type"] == "input_json_delta"
            json_parts[data["index"]] += data["delta"]["partial_json"]
    assert {i: json.loads(t) for i, t in json_parts.items()} == {1: {"city": "Paris"}, 2: {}}
    stops = [d["index"] for e, d in events if e == "content_block_stop"]
    assert stops == [0, 1, 2]
    # every block is closed before the next one starts
    order = [(e, d["index"]) for e, d in events if e in ("content_block_start",
                                                         "content_block_stop")]
    assert order == [("content_block_start", 0), ("content_block_stop", 0),
                     ("content_block_start", 1), ("content_block_stop", 1),
                     ("content_block_start", 2), ("content_block_stop", 2)]


def test_forced_choice_sends_a_grammar() -> None:
    client, service = client_for(CALLS[1:2])
    client.post("/v1/messages", json={**REQUEST, "tool_choice": {
        "type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}})
    grammar = GbnfMatcher(service.started[0][1].grammar or "")
    assert grammar.matches('<tool_call>\n{"name": "get_weather", "arguments": {"city": "x"}}'
                           '\n</tool_call>')
    assert not grammar.matches('<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')


THOUGHT = ["Paris is", " in France.</think>", "Sunny."]


@pytest.mark.parametrize("config,expected", [
    ({"type": "enabled", "budget_tokens": 1024}, "Paris is in France."),
    ({"type": "adaptive", "display": "omitted"}, ""),
])
def test_thinking_blocks(config: dict, expected: str) -> None:
    client, service = client_for(THOUGHT, THINK_TEMPLATE)
    data = client.post("/v1/messages", json={**REQUEST, "thinking": config}).json()
    assert data["content"] == [
        {"type": "thinking", "thinking": expected, "signature": SIGNATURE},
        {"type": "text", "text": "Sunny."}]
    assert data["stop_reason"] == "end_turn"
    events = parse_sse(client.post("/v1/messages", json={**REQUEST, "thinking": config,
                                                         "stream": True}).content)
    deltas = [(d["index"], d["delta"]) for e, d in events if e == "content_block_delta"]
    assert "".join(d.get("thinking", "") for i, d in deltas if i == 0) == expected
    assert deltas[-2] == (0, {"type": "signature_delta", "signature": SIGNATURE})
    assert deltas[-1] == (1, {"type": "text_delta", "text": "Sunny."})
    start = [d for e, d in events if e == "content_block_start"][0]
    assert start["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}


def test_without_thinking_the_reasoning_is_dropped_and_never_reaches_the_text() -> None:
    client, service = client_for(THOUGHT, THINK_TEMPLATE)
    data = client.post("/v1/messages", json=REQUEST).json()
    assert data["content"] == [{"type": "text", "text": "Sunny."}]
    events = parse_sse(client.post("/v1/messages", json={**REQUEST, "stream": True}).content)
    assert [d["content_block"]["type"] for e, d in events if e == "content_block_start"] \
        == ["text"]
