"""Ollama: tools, format and think, from the request to the exact message shapes (a real
ModelService over a scripted generation)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from lmserve.chat.templates import CHATML_TEMPLATE
from lmserve.core.errors import LmserveError
from lmserve.core.request import ResponseFormat
from lmserve.dialects.ollama import adapter, routes
from lmserve.dialects.ollama.schema import ChatRequest
from tests.unit.chat_service import THINK_TEMPLATE, ScriptedService, scripted_client
from tests.unit.gbnf_matcher import GbnfMatcher

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
USER = [{"role": "user", "content": "Weather in Paris?"}]
CALLS = ['<tool_call>\n{"name": "get_weather", ', '"arguments": {"city": "Paris"}}\n</tool_call>',
         '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>']
CHAT = {"model": "m", "messages": USER, "tools": [WEATHER], "stream": False}


def client_for(chunks: list[str], template: str = CHATML_TEMPLATE
               ) -> tuple[TestClient, ScriptedService]:
    return scripted_client(routes.make_router, chunks, template)


def lines(raw: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in raw.decode().splitlines()]


def test_adapter_maps_tools_format_and_think() -> None:
    job = adapter.chat_job(ChatRequest(**{**CHAT, "format": "json", "think": "high"}))
    assert [t.name for t in job.request.tools or []] == ["get_weather"]
    assert job.request.response_format == ResponseFormat("json_object", param="format")
    assert job.request.reasoning is True and job.show_thinking
    assert job.request.template_kwargs == {"reasoning_effort": "high"}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    job = adapter.chat_job(ChatRequest(**{**CHAT, "format": schema}))
    assert job.request.response_format == ResponseFormat("json_schema", schema=schema,
                                                         param="format")
    assert job.request.reasoning is None
    for bad, param in (({"format": "yaml"}, "format"),
                       ({"tools": [{"type": "function", "function": {}}]},
                        "tools[0].function.name")):
        with pytest.raises(LmserveError) as exc:
            adapter.chat_job(ChatRequest(**{**CHAT, **bad}))
        assert exc.value.param == param


def test_tool_calls_carry_object_arguments() -> None:
    client, service = client_for(CALLS)
    data = client.post("/api/chat", json=CHAT).json()
    message = data["message"]
    assert message["content"] == "" and data["done_reason"] == "stop"
    assert [c["function"] for c in message["tool_calls"]] == [
        {"index": 0, "name": "get_weather", "arguments": {"city": "Paris"}},
        {"index": 1, "name": "get_weather", "arguments": {"city": "Rome"}}]
    assert all(c["id"].startswith("call_") for c in message["tool_calls"])
    assert "<tools>" in (service.started[0][1].text or "")


def test_streamed_tool_calls_arrive_whole_in_their_own_frames() -> None:
    client, _ = client_for(CALLS)
    frames = lines(client.post("/api/chat", json={**CHAT, "stream": True}).content)
    calls = [f["message"]["tool_calls"] for f in frames if "tool_calls" in f["message"]]
    assert [[c["function"]["arguments"] for c in group] for group in calls] == \
        [[{"city": "Paris"}], [{"city": "Rome"}]]
    assert all(f["message"]["content"] == "" for f in frames)
    assert frames[-1]["done"] is True and "tool_calls" not in frames[-1]["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_thinking_is_separate_and_dropped_with_think_false(stream: bool) -> None:
    client, _ = client_for(["Hmm, Paris.", "</think>", "Sunny."], THINK_TEMPLATE)
    for think, shown in ((True, "Hmm, Paris."), (None, "Hmm, Paris."), (False, "")):
        request = {"model": "m", "messages": USER, "stream": stream}
        if think is not None:
            request["think"] = think
        frames = lines(client.post("/api/chat", json=request).content)
        assert "".join(f["message"]["content"] for f in frames) == "Sunny."
        assert "".join(f["message"].get("thinking", "") for f in frames) == shown
        frames = lines(client.post("/api/generate", json={
            "model": "m", "prompt": "p", "stream": stream,
            **({"think": think} if think is not None else {})}).content)
        assert "".join(f["response"] for f in frames) == "Sunny."
        assert "".join(f.get("thinking", "") for f in frames) == shown


def test_format_becomes_a_grammar_for_chat_and_generate() -> None:
    client, service = client_for(['{"a": 1}'])
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    client.post("/api/chat", json={"model": "m", "messages": USER, "stream": False,
                                   "format": schema})
    client.post("/api/generate", json={"model": "m", "prompt": "p", "stream": False,
                                       "format": "json", "raw": True})
    chat, raw = (GbnfMatcher(p.grammar or "") for _, p, _ in service.started)
    assert chat.matches('{"a": 1}') and not chat.matches('{"a": "x"}')
    assert raw.matches('{"b": [true]}') and not raw.matches("[1]")
