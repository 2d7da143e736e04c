"""Every Responses object and event a real server sends, checked against the published OpenAPI
document of the Responses API (tests/openresponses.py): JSON answers, SSE streams and WebSocket
messages, for text, forced tool calls, a stored response read back, a refusal, and a response
cut short by a full context with no max_output_tokens set."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from tests.model.conftest import Server, own_server
from tests.openresponses import check_event, check_response, check_ws_error

WEATHER = {"type": "function", "name": "get_weather",  # no description, no strict
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"]}}
TEXT: dict[str, Any] = {"model": "smollm2", "input": "Name three colors.", "temperature": 0,
                        "max_output_tokens": 16}
CALL: dict[str, Any] = {"model": "smollm2", "input": "What is the weather in Paris?",
                        "temperature": 0, "max_output_tokens": 48, "tools": [WEATHER],
                        "tool_choice": {"type": "function", "name": "get_weather"},
                        "presence_penalty": 0.25}
FINAL = ("response.completed", "response.incomplete", "response.failed", "error")


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # a short context, so that one test can fill it
    yield from own_server(tmp_path_factory, "responses_spec", "smollm2", "--parallel", "2",
                          "--ctx", "512", "--threads", "2")


def post(srv: Server, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(f"{srv.base_url}/responses", json=body, timeout=300)
    assert r.status_code == 200, r.text
    response: dict[str, Any] = r.json()
    check_response(response)
    return response


def stream(srv: Server, body: dict[str, Any]) -> list[dict[str, Any]]:
    events = []
    with httpx.stream("POST", f"{srv.base_url}/responses", json={**body, "stream": True},
                      timeout=300) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: "):]))
    for event in events:
        check_event(event)
    return events


def socket(srv: Server, body: dict[str, Any]) -> list[dict[str, Any]]:
    with connect(srv.url.replace("http://", "ws://") + "/v1/responses") as ws:
        ws.send(json.dumps({"type": "response.create", **body}))
        events = [json.loads(ws.recv(timeout=300))]
        while events[-1]["type"] not in FINAL:
            events.append(json.loads(ws.recv(timeout=300)))
    return events


@pytest.mark.parametrize("body", [TEXT, CALL], ids=["text", "tool_call"])
def test_json_stream_and_socket_follow_the_spec(srv, body):
    whole = post(srv, body)
    assert whole["presence_penalty"] == body.get("presence_penalty", 0)
    assert whole["frequency_penalty"] == 0
    got = httpx.get(f"{srv.base_url}/responses/{whole['id']}", timeout=30).json()
    check_response(got)
    streamed = stream(srv, body)
    sent = socket(srv, body)
    for event in sent:
        check_event(event)
    for events in (streamed, sent):
        assert events[0]["type"] == "response.created" and events[-1]["type"] in FINAL[:2]
    if "tools" in body:
        assert whole["tools"] == [{**WEATHER, "description": None, "strict": None}]
        assert whole["output"][-1]["type"] == "function_call"
        assert any(e["type"] == "response.function_call_arguments.done" for e in streamed)


def test_a_refused_socket_request_follows_the_spec(srv):
    [error] = socket(srv, {**TEXT, "previous_response_id": "resp_missing"})
    check_ws_error(error)
    assert error["status"] == 404


def test_a_full_context_with_no_limit_set(srv):
    """No max_output_tokens: generation runs until the context is full, and the response says
    so as the API does (reason max_output_tokens; the echoed max_output_tokens is null)."""
    # a prompt of about 450 of the 512 tokens, so little is left to generate
    body = {"model": "smollm2", "input": "Repeat: " + "red green blue " * 140,
            "ignore_eos": True}
    events = stream(srv, body)
    final = events[-1]
    assert final["type"] == "response.incomplete"
    response = final["response"]
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert response["max_output_tokens"] is None
    usage = response["usage"]
    assert usage["input_tokens"] + usage["output_tokens"] == 512
