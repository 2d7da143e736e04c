"""The Responses API with the official openai client against the real server and SmolLM2:
create, stream, retrieve, delete, input items, chains, the WebSocket, and a SIGKILL restart."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from websockets.sync.client import connect

from tests.model.conftest import Server, start_server, stop_server

# The client tests run against the local model and an upstream-backed one (upstream_fixtures).
pytestmark = pytest.mark.upstream_variant

ASK = "Name three colors."
KW: dict[str, Any] = dict(model="smollm2", max_output_tokens=24, temperature=0)


def test_create_and_retrieve(client):
    r = client.responses.create(input=ASK, metadata={"suite": "model"}, **KW)
    assert r.object == "response" and r.id.startswith("resp_")
    assert r.status in ("completed", "incomplete") and r.output_text.strip()
    message = r.output[0]
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_") and message.content[0].type == "output_text"
    assert r.usage.input_tokens > 5 and 0 < r.usage.output_tokens <= 24
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.store is True and r.metadata == {"suite": "model"} and r.temperature == 0
    assert client.responses.retrieve(r.id).model_dump() == r.model_dump()


def test_stream_iteration_matches_the_whole_response(client):
    whole = client.responses.create(input=ASK, **KW)
    events = list(client.responses.create(input=ASK, stream=True, **KW))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events[:4]] == ["response.created", "response.in_progress",
                                           "response.output_item.added",
                                           "response.content_part.added"]
    assert events[-1].type == f"response.{whole.status}"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text == events[-1].response.output_text
    assert events[-1].response.usage.output_tokens == whole.usage.output_tokens


def test_stream_helper_and_the_stored_result(client):
    with client.responses.stream(input=ASK, **KW) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text
    assert client.responses.retrieve(final.id).output_text == final.output_text


def test_max_output_tokens_makes_an_incomplete_response(client):
    r = client.responses.create(model="smollm2", input="Tell me a long story.",
                                max_output_tokens=3)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3


def test_a_three_turn_chain_remembers_and_lists_its_items(client):
    r1 = client.responses.create(model="smollm2", instructions="Answer in one short sentence.",
                                 input="My name is Ada.", max_output_tokens=20, temperature=0)
    r2 = client.responses.create(model="smollm2", input="What is 2 + 2?",
                                 previous_response_id=r1.id, max_output_tokens=20,
                                 temperature=0)
    r3 = client.responses.create(model="smollm2", input="What is my name?",
                                 previous_response_id=r2.id, max_output_tokens=20,
                                 temperature=0)
    assert r3.previous_response_id == r2.id and r3.instructions is None
    assert r3.usage.input_tokens > r2.usage.input_tokens > r1.usage.input_tokens
    assert r3.usage.input_tokens_details.cached_tokens > 0  # the chain's prefix stays warm
    items = list(client.responses.input_items.list(r3.id, order="asc"))
    turns = [("message", "user"), ("message", "assistant")]
    assert [(i.type, i.role) for i in items] == [*turns, *turns, ("message", "user")]
    assert items[0].content[0].text == "My name is Ada."
    assert items[1].id == r1.output[0].id and items[3].id == r2.output[0].id
    newest_first = client.responses.input_items.list(r3.id, limit=2)
    assert [i.id for i in newest_first.data] == [items[4].id, items[3].id]
    assert newest_first.has_more


def test_delete_and_not_found(client):
    r = client.responses.create(input=ASK, **KW)
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.create(input="Hi", previous_response_id=r.id, **KW)
    assert caught.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list("resp_unknown")


def test_store_false_cannot_be_chained(client):
    r = client.responses.create(input=ASK, store=False, **KW)
    assert r.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.create(input="More", previous_response_id=r.id, **KW)
    assert caught.value.code == "previous_response_not_found"


def test_unsupported_parameters_are_refused_by_name(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(input=ASK, reasoning={"effort": "max"}, **KW)
    assert caught.value.body["param"] == "reasoning.effort"
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(input=ASK, metadata={f"k{i}": "v" for i in range(17)}, **KW)
    assert caught.value.body["param"] == "metadata"


# ---- tools and structured output --------------------------------------------------------------

WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"], "additionalProperties": False}}
TIME = {"type": "function", "name": "get_time", "description": "Local time in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}
TOOL_KW: dict[str, Any] = dict(KW, max_output_tokens=64, parallel_tool_calls=False,
                               tools=[WEATHER, TIME])


@pytest.mark.parametrize("choice, name", [
    ("required", None), ({"type": "function", "name": "get_time"}, "get_time")])
def test_a_forced_tool_call_is_a_function_call_item(client, choice, name):
    r = client.responses.create(input="What is the weather in Paris?", tool_choice=choice,
                                **TOOL_KW)
    calls = [item for item in r.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].id.startswith("fc_") and calls[0].call_id
    assert calls[0].name == (name or calls[0].name) and calls[0].status == "completed"
    tool = WEATHER if calls[0].name == "get_weather" else TIME
    jsonschema.validate(json.loads(calls[0].arguments), tool["parameters"])
    assert client.responses.retrieve(r.id).output[-1].arguments == calls[0].arguments
    follow = client.responses.create(previous_response_id=r.id, tools=[WEATHER, TIME], input=[
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny, 21 C"}],
        **{**KW, "max_output_tokens": 16})
    assert follow.status in ("completed", "incomplete")


def test_a_streamed_tool_call(client):
    events = list(client.responses.create(input="Weather in Oslo?", tool_choice="required",
                                          stream=True, **TOOL_KW))
    added = [e for e in events if e.type == "response.output_item.added"
             and e.item.type == "function_call"]
    assert len(added) == 1 and added[0].item.arguments == ""
    item_id = added[0].item.id
    deltas = [e for e in events if e.type == "response.function_call_arguments.delta"]
    assert deltas and all(e.item_id == item_id for e in deltas)
    [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert done.arguments == "".join(e.delta for e in deltas)
    jsonschema.validate(json.loads(done.arguments), WEATHER["parameters"])
    final = events[-1].response
    assert final.output[-1].type == "function_call" and final.output[-1].arguments == \
        done.arguments


def test_json_schema_output_validates(client):
    schema = {"type": "object", "properties": {"color": {"type": "string"},
                                               "count": {"type": "integer"}},
              "required": ["color", "count"], "additionalProperties": False}
    r = client.responses.create(input="Give a color and a number as JSON.",
                                text={"format": {"type": "json_schema", "name": "pick",
                                                 "schema": schema, "strict": True}},
                                **{**KW, "max_output_tokens": 64})
    assert r.status == "completed" and r.text.format.type == "json_schema"
    jsonschema.validate(json.loads(r.output_text), schema)
    loose = client.responses.create(input="Any JSON object.", **{**KW, "max_output_tokens": 64},
                                    text={"format": {"type": "json_object"}})
    assert loose.output_text.lstrip().startswith("{")  # a tiny model may not close it in time


# ---- WebSocket ----------------------------------------------------------------------------------

def ws_url(server: Server) -> str:
    return server.url.replace("http://", "ws://") + "/v1/responses"


def ws_turn(ws: Any, **fields: Any) -> list[dict[str, Any]]:
    ws.send(json.dumps({"type": "response.create", **KW, **fields}))
    events = [json.loads(ws.recv(timeout=120))]
    while events[-1]["type"] not in ("error", "response.completed", "response.incomplete",
                                     "response.failed"):
        events.append(json.loads(ws.recv(timeout=120)))
    return events


def test_websocket_chains_within_and_across_connections(target, client):
    with connect(ws_url(target)) as ws:
        first = ws_turn(ws, input="My name is Ada.")
        assert first[0]["type"] == "response.created"
        assert [e["sequence_number"] for e in first] == list(range(len(first)))
        error = ws_turn(ws, input="x", previous_response_id="resp_missing")
        # the error event carries the connection's request id, as every error body does
        assert error == [{"type": "error", "status": 404, "error": error[0]["error"],
                          "request_id": ws.response.headers["X-Request-Id"]}]
        assert error[0]["error"]["code"] == "previous_response_not_found"
        second = ws_turn(ws, input="What is my name?",
                         previous_response_id=first[-1]["response"]["id"])
        assert second[-1]["response"]["previous_response_id"] == first[-1]["response"]["id"]
    with connect(ws_url(target)) as ws:
        third = ws_turn(ws, input="Thanks.", previous_response_id=second[-1]["response"]["id"])
    items = list(client.responses.input_items.list(third[-1]["response"]["id"]))
    assert len(items) == 5


def test_closing_the_websocket_mid_response_cancels_it(target, server, client):
    with connect(ws_url(target)) as ws:
        ws.send(json.dumps({"type": "response.create", "model": "smollm2", "input": "A story.",
                            "max_output_tokens": 1500, "ignore_eos": True}))
        created = json.loads(ws.recv(timeout=120))
        while json.loads(ws.recv(timeout=120))["type"] != "response.output_text.delta":
            pass
    server.assert_generation_stops()
    assert client.responses.retrieve(created["response"]["id"]).status == "cancelled"


def test_websocket_with_the_official_client(client):
    with client.responses.connect() as connection:
        connection.response.create(input=ASK, **KW)
        events = []
        for event in connection:
            events.append(event)
            if event.type in ("response.completed", "response.incomplete", "error"):
                break
    assert events[-1].type in ("response.completed", "response.incomplete")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == events[-1].response.output_text


# ---- durability ---------------------------------------------------------------------------------

def test_responses_survive_sigkill_and_chains_continue(tmp_path):
    args = ("smollm2", "--parallel", "2", "--ctx", "2048", "--threads", "2",
            "--data-dir", str(tmp_path))
    server = start_server(str(tmp_path), *args)
    try:
        with openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0,
                           timeout=120) as c:
            first = c.responses.create(input="My name is Ada.", **KW)
            second = c.responses.create(input="What is my name?", previous_response_id=first.id,
                                        **KW)
            streamed = list(c.responses.create(input=ASK, stream=True, **KW))[-1].response
    finally:
        server.proc.kill()  # SIGKILL: no shutdown, no flush beyond what each write did
        server.proc.wait(15)
    server = start_server(str(tmp_path), *args)
    try:
        with openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0,
                           timeout=120) as c:
            assert c.responses.retrieve(first.id).model_dump() == first.model_dump()
            assert c.responses.retrieve(second.id).model_dump() == second.model_dump()
            assert c.responses.retrieve(streamed.id).output_text == streamed.output_text
            third = c.responses.create(input="And again?", previous_response_id=second.id, **KW)
            assert len(list(c.responses.input_items.list(third.id))) == 5
    finally:
        stop_server(server)


def test_a_client_leaving_a_stream_cancels_it_and_the_partial_is_stored(target, server,
                                                                        client):
    body = {"model": "smollm2", "input": "Tell me a very long story.", "stream": True,
            "max_output_tokens": 1500, "ignore_eos": True}
    with httpx.Client(timeout=120) as http:
        with http.stream("POST", f"{target.base_url}/responses", json=body) as r:
            lines = r.iter_lines()
            created = next(json.loads(line[6:]) for line in lines if line.startswith("data: "))
            deltas = 0
            for line in lines:
                deltas += line.startswith("data: ") and '"response.output_text.delta"' in line
                if deltas >= 3:
                    break
    server.assert_generation_stops()
    stored = client.responses.retrieve(created["response"]["id"])
    assert stored.status == "cancelled" and stored.output_text

