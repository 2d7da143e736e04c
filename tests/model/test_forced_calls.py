"""Forced tool calls with parallel calls allowed (the default), as a new user sends them, in
every dialect that forces calls, against the real SmolLM2: the turn ends with the model's
calls, none repeated, a tool-call finish, and no call marker in the content, streamed or not.

SmolLM2 under tool_choice "required" used to repeat its call until max_tokens cut it off, with
finish_reason length and a partial `<tool_call>` left in the content (chat.callgate, and the
tool parsers' finish, now end the turn at the first repeat and drop a cut-off marker).
Ollama has no tool_choice, so nothing is forced there."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest

from tests.model.conftest import Server
from tests.model.sse import read_sse
from tests.model.test_tools_openai import MSG, SCHEMAS, TOOLS

ASKS = ["What is the weather in Paris?", "What time is it in Tokyo?"]
LIMIT = 200  # far more than one call needs: running into it was the defect


def distinct(calls: list[tuple[str, Any]]) -> None:
    assert calls, "no call was made"
    assert len({json.dumps(c, sort_keys=True) for c in calls}) == len(calls), calls
    for name, _ in calls:
        assert name in SCHEMAS


def no_marker(text: str | None) -> None:
    assert not text or ("<tool" not in text and "tool_call" not in text), text


@pytest.mark.parametrize("ask", ASKS)
def test_openai_chat(client, ask):
    kw: dict[str, Any] = dict(model="smollm2", messages=[{"role": "user", "content": ask}],
                              tools=TOOLS, tool_choice="required", max_tokens=LIMIT,
                              temperature=0)
    r = client.chat.completions.create(**kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and r.usage.completion_tokens < LIMIT
    no_marker(choice.message.content)
    distinct([(c.function.name, json.loads(c.function.arguments))
              for c in choice.message.tool_calls])
    calls: dict[int, list[str]] = {}
    finish, content = None, ""
    for chunk in client.chat.completions.create(**kw, stream=True):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or []:
            entry = calls.setdefault(call.index, ["", ""])
            entry[0] += call.function.name or ""
            entry[1] += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    no_marker(content)
    distinct([(name, json.loads(arguments)) for name, arguments in calls.values()])


def test_responses(client):
    kw: dict[str, Any] = dict(model="smollm2", input=ASKS[0], tool_choice="required",
                              max_output_tokens=LIMIT, temperature=0, tools=[
                                  {"type": "function", **t["function"]} for t in TOOLS])
    r = client.responses.create(**kw)
    assert r.status == "completed" and r.usage.output_tokens < LIMIT
    no_marker(r.output_text)
    distinct([(i.name, json.loads(i.arguments)) for i in r.output if i.type == "function_call"])
    events = list(client.responses.create(**kw, stream=True))
    final = events[-1].response
    assert events[-1].type == "response.completed"
    no_marker("".join(e.delta for e in events if e.type == "response.output_text.delta"))
    distinct([(i.name, json.loads(i.arguments)) for i in final.output
              if i.type == "function_call"])


@pytest.fixture()
def claude(server: Server) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0,
                             timeout=300) as c:
        yield c


def test_anthropic_tool_choice_any(claude):
    tools = [{"name": t["function"]["name"], "description": t["function"]["description"],
              "input_schema": t["function"]["parameters"]} for t in TOOLS]
    kw: dict[str, Any] = dict(model="smollm2", max_tokens=LIMIT, messages=MSG, tools=tools,
                              tool_choice={"type": "any"}, extra_body={"temperature": 0})
    r = claude.messages.create(**kw)
    assert r.stop_reason == "tool_use" and r.usage.output_tokens < LIMIT
    for block in r.content:
        no_marker(getattr(block, "text", None))
    distinct([(b.name, b.input) for b in r.content if b.type == "tool_use"])
    with claude.messages.stream(**kw) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    distinct([(b.name, b.input) for b in final.content if b.type == "tool_use"])


def test_native_tool_choice_required(server):
    body = {"prompt": ASKS[0], "tool_choice": "required",
            "tools": [{"name": t["function"]["name"], "parameters": t["function"]["parameters"]}
                      for t in TOOLS],
            "params": {"temperature": 0, "max_tokens": LIMIT}}
    with httpx.Client(base_url=server.url, timeout=300) as http:
        r = http.post("/models/smollm2/query/", json=body)
        assert r.status_code == 200, r.text
        data = r.json()
        assert data["stop_reason"] == "tool_use", data
        for block in data["blocks"]:
            no_marker(block.get("text"))
        distinct([(b["name"], b["arguments"]) for b in data["blocks"] if b["type"] == "tool"])
        started = http.post("/models/smollm2/stream/", json=body)
        assert started.status_code == 201, started.text
        frames, _ = read_sse(http, f"/models/smollm2/stream/{started.json()['id']}/",
                             timeout=300)
    assert frames[-1].event == "message.stop" and frames[-1].data["stop_reason"] == "tool_use"
    streamed = [(f.data["name"], json.loads("".join(
        d.data["arguments"] for d in frames
        if d.event == "block.delta" and d.data["index"] == f.data["index"])))
        for f in frames if f.event == "block.start" and f.data["type"] == "tool"]
    distinct(streamed)
    for f in frames:
        if f.event == "block.delta":
            no_marker(f.data.get("text"))
