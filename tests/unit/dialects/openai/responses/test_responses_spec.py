"""Every response object and event the Responses encoder makes, checked against the published
OpenAPI document of the Responses API (tests/openresponses.py): text, tool calls, reasoning,
running out of tokens, failures (SSE and WebSocket shapes), cancellation, refusals. The same
check runs on a real server's answers in tests/model/test_responses_spec.py."""

from __future__ import annotations

from typing import Any

import pytest

from lmserve.core.backend import ChoiceStep
from lmserve.core.errors import ErrorKind, LmserveError, invalid
from lmserve.core.events import (
    CHANNEL_OUTPUT,
    CHANNEL_REASONING,
    ChatEvent,
    TextDelta,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
    Usage,
)
from lmserve.dialects.openai.responses import encoder
from lmserve.dialects.openai.responses.schema import ResponseCreate
from tests.openresponses import check_event, check_response, check_ws_error

USAGE = Usage(prompt_tokens=10, completion_tokens=6, cached_tokens=0)
WEATHER = {"type": "function", "name": "get_weather",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


def events_of(nested: bool = False, **kw: Any) -> encoder.ResponseEvents:
    body = ResponseCreate.model_validate({"model": "m", "input": "hi", **kw})
    return encoder.ResponseEvents(encoder.response_head(body, response_id="resp_1",
                                                        created_at=100, stored=True),
                                  nested_errors=nested)


def step(*events: ChatEvent) -> ChoiceStep:
    return ChoiceStep(0, events=list(events), token_ids=[7])


def run(events: encoder.ResponseEvents, steps: list[ChoiceStep], finish: str = "stop"
        ) -> list[dict[str, Any]]:
    out = events.start()
    for s in steps:
        out += events.chat(s.events, s)
    return [*out, *events.finish(finish, USAGE), events.final_event()]


def check_all(out: list[dict[str, Any]]) -> None:
    for event in out:
        check_event(event)
    check_response(out[-1]["response"])


TEXT = [step(TextDelta(CHANNEL_OUTPUT, "Hel")), step(TextDelta(CHANNEL_OUTPUT, "lo"))]
CALL = [step(TextDelta(CHANNEL_OUTPUT, "Let me look.")),
        step(ToolCallStart(0, "call_1", "get_weather")),
        step(ToolCallDelta(0, '{"city": ')), step(ToolCallDelta(0, '"Paris"}')),
        step(ToolCallEnd(0, '{"city": "Paris"}', True))]
REASONING = [step(TextDelta(CHANNEL_REASONING, "Think")),
             step(TextDelta(CHANNEL_REASONING, "ing.")), step(TextDelta(CHANNEL_OUTPUT, "Answer."))]


@pytest.mark.parametrize("steps", [TEXT, CALL, REASONING, []], ids=["text", "call",
                                                                    "reasoning", "empty"])
@pytest.mark.parametrize("finish", ["stop", "length"])
def test_every_event_and_the_response_follow_the_spec(steps, finish):
    check_all(run(events_of(tools=[WEATHER], presence_penalty=0.5), steps, finish))


def test_the_response_echoes_penalties_and_every_field_of_a_function_tool():
    head = events_of().snapshot()
    assert (head["presence_penalty"], head["frequency_penalty"]) == (0.0, 0.0)
    head = events_of(presence_penalty=0.5, frequency_penalty=-1.0, tools=[
        WEATHER, {**WEATHER, "name": "other", "description": "d", "strict": True,
                  "unknown_extra": 1}]).snapshot()
    assert (head["presence_penalty"], head["frequency_penalty"]) == (0.5, -1.0)
    assert head["tools"] == [
        {"type": "function", "name": "get_weather", "description": None,
         "parameters": WEATHER["parameters"], "strict": None},
        {"type": "function", "name": "other", "description": "d",
         "parameters": WEATHER["parameters"], "strict": True}]
    check_response(head)


def test_running_out_of_room_without_a_limit_is_max_output_tokens_with_the_limit_null():
    """The API's only reason for a length stop; max_output_tokens null says no limit was set."""
    final = run(events_of(), TEXT, "length")[-1]["response"]
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["max_output_tokens"] is None
    check_response(final)


@pytest.mark.parametrize("nested", [False, True], ids=["sse", "websocket"])
@pytest.mark.parametrize("steps", [TEXT, CALL[:3], REASONING[:1]], ids=["text", "call",
                                                                         "reasoning"])
def test_a_failure_midway_follows_the_spec(nested, steps):
    events = events_of(nested=nested, tools=[WEATHER])
    out = events.start()
    for s in steps:
        out += events.chat(s.events, s)
    out += [*events.fail(LmserveError(ErrorKind.INTERNAL, "decode failed")),
            events.final_event()]
    assert [e["type"] for e in out[-2:]] == ["error", "response.failed"]
    check_all(out)


def test_a_cancelled_response_and_a_refused_socket_request_follow_the_spec():
    events = events_of()
    events.start()
    events.delta("Hel")
    check_response(events.cancel())
    check_ws_error(encoder.ws_error(invalid("bad", param="input")))
    check_ws_error(encoder.ws_error(LmserveError(ErrorKind.NOT_FOUND, "gone")))
