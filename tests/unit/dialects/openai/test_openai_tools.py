"""OpenAI chat: tools, tool_choice, response_format and reasoning, from the wire fields to
the exact response and stream shapes (a real ModelService over a scripted generation)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from lmserve.chat.templates import CHATML_TEMPLATE
from lmserve.core.errors import LmserveError
from lmserve.core.request import NamedTool, ResponseFormat
from lmserve.dialects.openai import adapter, routes
from lmserve.dialects.openai.schema import ChatCompletionRequest
from tests.unit.chat_service import THINK_TEMPLATE, ScriptedService, scripted_client
from tests.unit.gbnf_matcher import GbnfMatcher

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
MSG = [{"role": "user", "content": "Weather in Paris?"}]
CALLS = ['Checking.<tool_call>\n{"name": "get_weather", ', '"arguments": {"city": ', '"Paris"}}',
         '\n</tool_call>\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>']


def body(**kw: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=MSG, **kw)


def client_for(chunks: list[str], template: str = CHATML_TEMPLATE
               ) -> tuple[TestClient, ScriptedService]:
    return scripted_client(routes.make_router, chunks, template)


def sse_chunks(raw: bytes) -> list[dict[str, Any]]:
    lines = [ln[6:] for ln in raw.decode().splitlines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(ln) for ln in lines[:-1]]


def test_adapter_maps_tools_choice_format_and_effort() -> None:
    gen = adapter.chat_request(body(
        tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}},
        parallel_tool_calls=False, reasoning_effort="low",
        response_format={"type": "json_schema", "json_schema": {
            "name": "x", "strict": True, "schema": {"type": "object"}}}))
    assert [t.name for t in gen.tools or []] == ["get_weather", "get_time"]
    assert gen.tools and gen.tools[0].parameters == WEATHER["function"]["parameters"]
    assert gen.tool_choice == NamedTool("get_time") and gen.parallel_tool_calls is False
    assert gen.response_format == ResponseFormat("json_schema", schema={"type": "object"},
                                                 strict=True, param="response_format.json_schema")
    assert gen.reasoning is True and gen.template_kwargs == {"reasoning_effort": "low"}
    plain = adapter.chat_request(body(response_format={"type": "text"}, tool_choice="none",
                                      reasoning_effort="none"))
    assert plain.response_format is None and plain.tool_choice == "none"
    assert plain.reasoning is False and plain.template_kwargs == {}


@pytest.mark.parametrize("fields,param", [
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"description": "x"}}]},
     "tools[0].function.name"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
])
def test_adapter_refusals_name_the_parameter(fields: dict, param: str) -> None:
    with pytest.raises(LmserveError) as exc:
        adapter.chat_request(body(**fields))
    assert exc.value.param == param


def test_non_streaming_tool_calls() -> None:
    client, service = client_for(CALLS)
    r = client.post("/v1/chat/completions", json={"model": "m", "messages": MSG,
                                                   "tools": [WEATHER, TIME]})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] == "Checking."
    calls = message["tool_calls"]
    assert [c["type"] for c in calls] == ["function", "function"]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert calls[0]["id"].startswith("call_") and calls[0]["id"] != calls[1]["id"]
    prompt = service.started[0][1].text or ""
    assert "<tools>" in prompt and '"get_weather"' in prompt  # the fallback prompt


def test_streaming_tool_call_deltas_follow_openai_rules() -> None:
    client, _ = client_for(CALLS)
    r = client.post("/v1/chat/completions", json={"model": "m", "messages": MSG, "stream": True,
                                                   "tools": [WEATHER, TIME]})
    deltas = [(c["choices"][0]["delta"], c["choices"][0]["finish_reason"])
              for c in sse_chunks(r.content)]
    assert deltas[0] == ({"role": "assistant", "content": ""}, None)
    assert deltas[1] == ({"content": "Checking."}, None)
    first = deltas[2][0]["tool_calls"]
    assert len(first) == 1 and first[0]["index"] == 0 and first[0]["type"] == "function"
    assert first[0]["function"] == {"name": "get_weather", "arguments": ""}
    assert first[0]["id"].startswith("call_")
    by_index: dict[int, str] = {}
    for delta, _ in deltas[2:-1]:
        (call,) = delta["tool_calls"]
        if call["index"] not in by_index:
            assert set(call) == {"index", "id", "type", "function"}
            by_index[call["index"]] = ""
        else:
            assert set(call) == {"index", "function"} and set(call["function"]) == {"arguments"}
        by_index[call["index"]] += call["function"]["arguments"]
    assert {i: json.loads(a) for i, a in by_index.items()} == {0: {"city": "Paris"}, 1: {}}
    assert deltas[-1] == ({}, "tool_calls")


def test_tool_choice_none_parses_no_calls_and_required_sends_a_grammar() -> None:
    client, service = client_for(CALLS[-1:])
    r = client.post("/v1/chat/completions", json={"model": "m", "messages": MSG,
                                                   "tools": [WEATHER], "tool_choice": "none"})
    message = r.json()["choices"][0]["message"]
    assert "tool_calls" not in message and "<tool_call>" in message["content"]
    assert service.started[0][1].grammar is None
    assert "<tools>" not in (service.started[0][1].text or "")
    client.post("/v1/chat/completions", json={
        "model": "m", "messages": MSG, "tools": [WEATHER, TIME], "parallel_tool_calls": False,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    grammar = GbnfMatcher(service.started[1][1].grammar or "")
    assert grammar.matches('<tool_call>\n{"name": "get_weather", "arguments": {"city": "x"}}'
                           '\n</tool_call>')
    assert not grammar.matches('<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')


def test_parallel_tool_calls_false_keeps_the_first_call() -> None:
    client, _ = client_for(CALLS)
    r = client.post("/v1/chat/completions", json={"model": "m", "messages": MSG,
                                                   "tools": [WEATHER, TIME],
                                                   "parallel_tool_calls": False})
    calls = r.json()["choices"][0]["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather"]


def test_a_forced_call_repeated_to_the_limit_ends_at_the_first_repeat() -> None:
    """A small model repeating its call under tool_choice required ran to max_tokens: the repeat
    now ends the turn (the engine is told to stop the choice), with one call, finish_reason
    tool_calls and no marker in the content, streamed or not."""
    repeat = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    chunks = [repeat, repeat, repeat, "<tool"]
    for stream in (False, True):
        client, service = scripted_client(routes.make_router, chunks, CHATML_TEMPLATE,
                                          finish="length")
        r = client.post("/v1/chat/completions", json={
            "model": "m", "messages": MSG, "tools": [WEATHER, TIME], "tool_choice": "required",
            "stream": stream})
        if stream:
            chunks_out = sse_chunks(r.content)
            deltas = [c["choices"][0]["delta"] for c in chunks_out if c["choices"]]
            assert not any(d.get("content") for d in deltas)
            calls = [t for d in deltas for t in d.get("tool_calls") or []]
            assert [t["function"].get("name") for t in calls if t.get("id")] == ["get_weather"]
            finish = [c["choices"][0]["finish_reason"] for c in chunks_out if c["choices"]]
            assert finish[-1] == "tool_calls"
        else:
            choice = r.json()["choices"][0]
            assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
            assert [c["function"]["arguments"] for c in choice["message"]["tool_calls"]] == [
                '{"city": "Paris"}']
        assert service.started[0][2].stopping == {0}


def test_response_format_json_schema_reaches_the_engine_as_a_grammar() -> None:
    client, service = client_for(['{"n": 1}'])
    r = client.post("/v1/chat/completions", json={
        "model": "m", "messages": MSG, "response_format": {"type": "json_schema", "json_schema": {
            "name": "n", "schema": {"type": "object", "properties": {"n": {"type": "integer"}},
                                    "required": ["n"]}}}})
    assert r.json()["choices"][0]["message"]["content"] == '{"n": 1}'
    grammar = GbnfMatcher(service.started[0][1].grammar or "")
    assert grammar.matches('{"n": 1}') and not grammar.matches('{"n": "1"}')
    r = client.post("/v1/chat/completions", json={
        "model": "m", "messages": MSG, "response_format": {"type": "json_schema", "json_schema": {
            "name": "n", "schema": {"type": "object", "minProperties": "x"}}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format.json_schema"


def test_reasoning_content_is_kept_out_of_the_answer() -> None:
    chunks = ["Let me", " think.</th", "ink>\n\nIt is ", "sunny."]
    client, _ = client_for(chunks, THINK_TEMPLATE)
    r = client.post("/v1/chat/completions", json={"model": "m", "messages": MSG})
    message = r.json()["choices"][0]["message"]
    assert message["reasoning_content"] == "Let me think."
    assert message["content"] == "It is sunny."
    r = client.post("/v1/chat/completions", json={"model": "m", "messages": MSG, "stream": True})
    deltas = [c["choices"][0]["delta"] for c in sse_chunks(r.content)][1:-1]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "Let me think."
    assert "".join(d.get("content", "") for d in deltas) == "It is sunny."
    assert all(len(d) == 1 for d in deltas)
