"""The Response object and its stream events, checked against golden sequences and the official
client's own types (validated strictly, so a missing or mistyped field fails)."""

from __future__ import annotations

from typing import Any

import pydantic
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from openai.types.responses.responses_server_event import ResponsesServerEvent

from lmserve.core.errors import ErrorKind, LmserveError
from lmserve.core.events import (
    CHANNEL_OUTPUT,
    TextDelta,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
    Usage,
)
from lmserve.dialects.openai.responses import encoder
from lmserve.dialects.openai.responses.schema import ResponseCreate

STREAM_EVENT = pydantic.TypeAdapter(ResponseStreamEvent)
WS_EVENT = pydantic.TypeAdapter(ResponsesServerEvent)
USAGE = Usage(prompt_tokens=10, completion_tokens=3, cached_tokens=4)


def head(**kw: Any) -> dict[str, Any]:
    body = ResponseCreate.model_validate({"model": "m", "input": "hi", **kw})
    return encoder.response_head(body, response_id="resp_1", created_at=100, stored=True)


def run(events: encoder.ResponseEvents, finish: str = "stop") -> list[dict[str, Any]]:
    out = events.start()
    for text in ("Hel", "lo"):
        out += events.delta(text)
    out += events.finish(finish, USAGE)
    return [*out, events.final_event()]


def test_head_echoes_the_request_and_openai_defaults():
    h = head()
    assert h["status"] == "in_progress" and h["output"] == [] and h["usage"] is None
    assert (h["temperature"], h["top_p"], h["tool_choice"], h["tools"], h["truncation"],
            h["parallel_tool_calls"], h["store"], h["metadata"]) == \
        (1.0, 1.0, "auto", [], "disabled", True, True, {})
    h = head(instructions="be brief", temperature=0.3, top_p=0.5, max_output_tokens=9,
             metadata={"a": "b"}, truncation="auto", parallel_tool_calls=False, user="u",
             previous_response_id="resp_0", tool_choice="none")
    assert (h["instructions"], h["temperature"], h["top_p"], h["max_output_tokens"],
            h["metadata"], h["truncation"], h["parallel_tool_calls"], h["user"],
            h["previous_response_id"], h["tool_choice"]) == \
        ("be brief", 0.3, 0.5, 9, {"a": "b"}, "auto", False, "u", "resp_0", "none")
    Response.model_validate(h)


def test_golden_event_sequence():
    events = encoder.ResponseEvents(head())
    out = run(events)
    mid = events.message_id
    where = {"item_id": mid, "output_index": 0, "content_index": 0}
    part = {"type": "output_text", "text": "Hello", "annotations": [], "logprobs": []}
    message = {"id": mid, "type": "message", "status": "completed", "role": "assistant",
               "content": [part]}
    final = out[-1]["response"]
    assert [e["sequence_number"] for e in out] == list(range(len(out)))
    assert [{k: v for k, v in e.items() if k not in ("sequence_number", "response")}
            for e in out] == [
        {"type": "response.created"},
        {"type": "response.in_progress"},
        {"type": "response.output_item.added", "output_index": 0,
         "item": {**message, "status": "in_progress", "content": []}},
        {"type": "response.content_part.added", **where, "part": {**part, "text": ""}},
        {"type": "response.output_text.delta", **where, "delta": "Hel", "logprobs": []},
        {"type": "response.output_text.delta", **where, "delta": "lo", "logprobs": []},
        {"type": "response.output_text.done", **where, "text": "Hello", "logprobs": []},
        {"type": "response.content_part.done", **where, "part": part},
        {"type": "response.output_item.done", "output_index": 0, "item": message},
        {"type": "response.completed"},
    ]
    assert out[0]["response"] == out[1]["response"] == head()
    assert final["status"] == "completed" and final["output"] == [message]
    assert final["output_text"] == "Hello" and final["completed_at"] >= 100
    assert final["usage"] == {"input_tokens": 10,
                              "input_tokens_details": {"cached_tokens": 4,
                                                       "cache_write_tokens": 0},
                              "output_tokens": 3, "output_tokens_details": {"reasoning_tokens": 0},
                              "total_tokens": 13}
    assert final == events.snapshot()
    for event in out:
        STREAM_EVENT.validate_python(event)
        WS_EVENT.validate_python(event)
    assert Response.model_validate(final).output_text == "Hello"


def test_running_out_of_tokens_is_incomplete():
    events = encoder.ResponseEvents(head(max_output_tokens=2))
    out = run(events, finish="length")
    final = out[-1]
    assert final["type"] == "response.incomplete"
    assert final["response"]["status"] == "incomplete"
    assert final["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["response"]["completed_at"] is None
    assert out[-2]["item"]["status"] == "incomplete"
    STREAM_EVENT.validate_python(final)


def test_an_empty_answer_still_has_its_message():
    events = encoder.ResponseEvents(head())
    out = [*events.start(), *events.finish("stop", USAGE), events.final_event()]
    assert [e["type"] for e in out][2:] == [
        "response.output_item.added", "response.content_part.added",
        "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed"]
    assert out[-1]["response"]["output_text"] == ""


@pytest.mark.parametrize("nested", [False, True])
def test_a_failure_is_an_error_event_then_response_failed(nested):
    events = encoder.ResponseEvents(head(), nested_errors=nested)
    out = [*events.start(), *events.delta("Hel")]
    error = LmserveError(ErrorKind.INTERNAL, "generation failed: decode")
    out += [*events.fail(error), events.final_event()]
    fields = {"code": "server_error", "message": "generation failed: decode", "param": None}
    nested_error = {"type": "error", "error": {"type": "server_error", **fields}}
    expected = nested_error if nested else {**nested_error, **fields}
    assert {k: v for k, v in out[-2].items() if k != "sequence_number"} == expected
    failed = out[-1]
    assert failed["type"] == "response.failed" and failed["response"]["status"] == "failed"
    assert failed["response"]["error"] == {"code": "server_error",
                                           "message": "generation failed: decode"}
    assert failed["response"]["output"][0]["status"] == "incomplete"
    assert failed["response"]["output_text"] == "Hel"
    assert events.error is error
    (WS_EVENT if nested else STREAM_EVENT).validate_python(out[-2])
    STREAM_EVENT.validate_python(failed)


def test_a_cancelled_response_keeps_its_partial_output():
    events = encoder.ResponseEvents(head())
    events.start()
    events.delta("Hel")
    cancelled = events.cancel()
    assert cancelled["status"] == "cancelled" and cancelled["output_text"] == "Hel"
    Response.model_validate(cancelled)


def test_sse_frame_and_bodies():
    assert encoder.sse({"type": "response.created", "x": "é"}) == \
        'event: response.created\ndata: {"type":"response.created","x":"é"}\n\n'.encode()
    assert encoder.deleted("resp_1") == {"id": "resp_1", "object": "response.deleted",
                                         "deleted": True}
    error = LmserveError(ErrorKind.NOT_FOUND, "gone", param="previous_response_id",
                         code="previous_response_not_found")
    assert encoder.ws_error(error) == {"type": "error", "status": 404, "error": {
        "message": "gone", "type": "invalid_request_error", "param": "previous_response_id",
        "code": "previous_response_not_found"}}
    WS_EVENT.validate_python(encoder.ws_error(error))


def test_golden_event_sequence_of_a_function_call():
    tools = [{"type": "function", "name": "f", "parameters": {"type": "object"}}]
    events = encoder.ResponseEvents(head(tools=tools, tool_choice="required"))
    out = events.start()
    # (reasoning before a call: tests/unit/dialects/openai/responses/test_responses_reasoning.py)
    out += events.chat([TextDelta(CHANNEL_OUTPUT, "Ok"),
                        ToolCallStart(0, "call_1", "f"), ToolCallDelta(0, '{"q": '),
                        ToolCallDelta(0, '"x"}'), ToolCallEnd(0, '{"q": "x"}')])
    out += events.finish("stop", USAGE)
    out.append(events.final_event())
    mid = events.message_id
    call = out[8]["item"]
    fid = call["id"]
    assert fid.startswith("fc_") and call == {
        "id": fid, "type": "function_call", "status": "in_progress", "arguments": "",
        "call_id": "call_1", "name": "f"}
    done = {**call, "arguments": '{"q": "x"}', "status": "completed"}
    msg = {"id": mid, "type": "message", "status": "completed", "role": "assistant",
           "content": [{"type": "output_text", "text": "Ok", "annotations": [],
                        "logprobs": []}]}
    assert [(e["type"], e["sequence_number"]) for e in out] == [(kind, i) for i, kind in enumerate([
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed"])]
    assert out[7]["item"] == msg and out[7]["output_index"] == 0
    assert out[8]["output_index"] == 1
    assert out[9] == {"type": "response.function_call_arguments.delta", "item_id": fid,
                      "output_index": 1, "delta": '{"q": ', "sequence_number": 9}
    assert out[11] == {"type": "response.function_call_arguments.done", "item_id": fid,
                       "output_index": 1, "name": "f", "arguments": '{"q": "x"}',
                       "sequence_number": 11}
    assert out[12]["item"] == done and out[12]["output_index"] == 1
    final = out[-1]["response"]
    assert final["output"] == [msg, done] and final["output_text"] == "Ok"
    for event in out:
        STREAM_EVENT.validate_python(event)
    Response.model_validate(final)


def test_a_cut_off_call_is_incomplete():
    events = encoder.ResponseEvents(head())
    events.start()
    events.chat([ToolCallStart(0, "call_1", "f"), ToolCallDelta(0, '{"q"')])
    out = events.finish("length", USAGE)
    assert [e["type"] for e in out] == ["response.function_call_arguments.done",
                                        "response.output_item.done"]
    assert out[-1]["item"]["status"] == "incomplete" and out[-1]["item"]["arguments"] == '{"q"'
    assert events.snapshot()["status"] == "incomplete"
    Response.model_validate(events.snapshot())
