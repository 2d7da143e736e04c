"""Responses: reasoning output items and their events, reasoning token counts, reasoning
controls, reasoning items given back as input, and output_text logprobs; checked against the
official client's types, then end to end through the routes over a real ModelService whose
generations are scripted."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pydantic
import pytest
from fastapi.testclient import TestClient
from openai.types.responses import Response, ResponseStreamEvent

from lmserve.core.backend import ChoiceStep
from lmserve.core.errors import ErrorKind, LmserveError
from lmserve.core.events import (
    CHANNEL_OUTPUT,
    CHANNEL_REASONING,
    ChatEvent,
    TextDelta,
    TokenLogprob,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
    TopLogprob,
    Usage,
)
from lmserve.core.request import ChatMessage
from lmserve.dialects.openai.responses import adapter, encoder, items
from lmserve.dialects.openai.responses.schema import ResponseCreate
from tests.unit.chat_service import ScriptedRegistry, ScriptedService, script
from tests.unit.dialects.anthropic.test_anthropic import parse_sse
from tests.unit.dialects.openai.responses.test_responses_routes import make_app

STREAM_EVENT = pydantic.TypeAdapter(ResponseStreamEvent)
ASK = {"model": "m", "input": "Why is the sky blue?"}


def body(**kw: Any) -> ResponseCreate:
    return ResponseCreate.model_validate({**ASK, **kw})


def lp(piece: str, logprob: float, *alts: tuple[str, float]) -> TokenLogprob:
    top = tuple(TopLogprob(i, a.encode(), v) for i, (a, v) in enumerate(alts))
    return TokenLogprob(len(piece), piece.encode(), logprob, top)


def step(*events: ChatEvent, tokens: int = 1, logprobs: list[TokenLogprob] | None = None
         ) -> ChoiceStep:
    return ChoiceStep(0, events=list(events), token_ids=[7] * tokens, logprobs=logprobs)


def run(events: encoder.ResponseEvents, steps: list[ChoiceStep],
        usage: Usage, finish: str = "stop") -> list[dict[str, Any]]:
    out = events.start()
    for choice_step in steps:
        out += events.chat(choice_step.events, choice_step)
    return [*out, *events.finish(finish, usage), events.final_event()]


def stripped(event: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in event.items() if k not in ("sequence_number", "response")}


def validate(out: list[dict[str, Any]]) -> None:
    for event in out:
        STREAM_EVENT.validate_python(event)
    Response.model_validate(out[-1]["response"])


# -- the encoder -----------------------------------------------------------------------------

def test_reasoning_item_comes_first_with_its_events_and_token_count():
    events = encoder.ResponseEvents(encoder.response_head(
        body(reasoning={"effort": "high", "summary": "auto"}), response_id="resp_1",
        created_at=1, stored=True))
    out = run(events, [step(TextDelta(CHANNEL_REASONING, "Light")),
                       step(TextDelta(CHANNEL_REASONING, " scatters.")),
                       step(), step(),  # the closing tag, and whitespace the parser drops
                       step(TextDelta(CHANNEL_OUTPUT, "Blue."))], Usage(9, 5))
    rs = out[2]["item"]["id"]
    where = {"item_id": rs, "output_index": 0, "content_index": 0}
    item = {"id": rs, "type": "reasoning", "summary": [], "status": "completed",
            "content": [{"type": "reasoning_text", "text": "Light scatters."}]}
    assert rs.startswith("rs_") and [stripped(e) for e in out[2:9]] == [
        {"type": "response.output_item.added", "output_index": 0,
         "item": {**item, "status": "in_progress", "content": []}},
        {"type": "response.content_part.added", **where,
         "part": {"type": "reasoning_text", "text": ""}},
        {"type": "response.reasoning_text.delta", **where, "delta": "Light"},
        {"type": "response.reasoning_text.delta", **where, "delta": " scatters."},
        {"type": "response.reasoning_text.done", **where, "text": "Light scatters."},
        {"type": "response.content_part.done", **where, "part": item["content"][0]},
        {"type": "response.output_item.done", "output_index": 0, "item": item}]
    assert out[9]["type"] == "response.output_item.added" and out[9]["output_index"] == 1
    final = out[-1]["response"]
    assert [i["type"] for i in final["output"]] == ["reasoning", "message"]
    assert final["output"][0] == item and final["output_text"] == "Blue."
    assert final["usage"]["output_tokens_details"] == {"reasoning_tokens": 4}
    assert final["reasoning"] == {"effort": "high", "summary": "auto"}
    assert [e["sequence_number"] for e in out] == list(range(len(out)))
    validate(out)


def test_reasoning_cut_short_is_incomplete_and_the_only_output():
    events = encoder.ResponseEvents(encoder.response_head(body(), response_id="resp_1",
                                                          created_at=1, stored=True))
    out = run(events, [step(TextDelta(CHANNEL_REASONING, "Hmm"), tokens=3)], Usage(9, 3),
              finish="length")
    final = out[-1]["response"]
    assert final["status"] == "incomplete" and final["output_text"] == ""
    assert [(i["type"], i["status"]) for i in final["output"]] == [("reasoning", "incomplete")]
    assert final["usage"]["output_tokens_details"] == {"reasoning_tokens": 3}
    validate(out)


def test_reasoning_then_a_tool_call_and_a_failure_mid_reasoning():
    events = encoder.ResponseEvents(encoder.response_head(body(), response_id="resp_1",
                                                          created_at=1, stored=True))
    out = run(events, [step(TextDelta(CHANNEL_REASONING, "Need weather.")),
                       step(ToolCallStart(0, "call_1", "f"), ToolCallDelta(0, "{}"),
                            ToolCallEnd(0, "{}"), tokens=5)], Usage(9, 6))
    final = out[-1]["response"]
    assert [(i["type"], i["status"]) for i in final["output"]] == \
        [("reasoning", "completed"), ("function_call", "completed")]
    assert final["usage"]["output_tokens_details"] == {"reasoning_tokens": 1}
    validate(out)
    events = encoder.ResponseEvents(encoder.response_head(body(), response_id="resp_2",
                                                          created_at=1, stored=True))
    events.start()
    events.chat([TextDelta(CHANNEL_REASONING, "Hm")])
    events.fail(LmserveError(ErrorKind.INTERNAL, "generation failed"))
    failed = events.final_event()["response"]
    assert failed["status"] == "failed" and failed["output"][0]["status"] == "incomplete"
    assert failed["output"][0]["content"] == [{"type": "reasoning_text", "text": "Hm"}]


def test_output_text_logprobs_follow_the_answer_text():
    events = encoder.ResponseEvents(encoder.response_head(
        body(include=["message.output_text.logprobs"], top_logprobs=1), response_id="resp_1",
        created_at=1, stored=True))
    out = run(events, [
        step(TextDelta(CHANNEL_REASONING, "Hm"), logprobs=[lp("Hm", -0.5)]),
        step(logprobs=[lp("</think>", -0.1)]),
        step(TextDelta(CHANNEL_OUTPUT, "Blue"), logprobs=[lp("Blue", -0.2, ("Blue", -0.2))]),
        step(logprobs=[lp(" <", -0.3)]),  # held back: it may start a tool call
        step(TextDelta(CHANNEL_OUTPUT, " <b>"), logprobs=[lp("b>", -0.5)]),
        step(ToolCallStart(0, "c", "f"), ToolCallEnd(0, "{}"), logprobs=[lp("<tc>", -1.0)]),
        step(TextDelta(CHANNEL_OUTPUT, "!"), logprobs=[lp("!", -0.4, ("?", -2.0))]),
    ], Usage(9, 7))
    deltas = [e for e in out if e["type"] == "response.output_text.delta"]
    assert [[(x["token"], x["logprob"]) for x in d["logprobs"]] for d in deltas] == \
        [[("Blue", -0.2)], [(" <", -0.3), ("b>", -0.5)], [("!", -0.4)]]
    assert deltas[2]["logprobs"] == [{"token": "!", "logprob": -0.4, "bytes": [33],
                                      "top_logprobs": [{"token": "?", "logprob": -2.0,
                                                        "bytes": [63]}]}]
    final = out[-1]["response"]
    parts = [i["content"][0] for i in final["output"] if i["type"] == "message"]
    assert [p["logprobs"] for p in parts] == [deltas[0]["logprobs"] + deltas[1]["logprobs"],
                                              deltas[2]["logprobs"]]
    done = [e for e in out if e["type"] == "response.output_text.done"]
    assert [d["logprobs"] for d in done] == [p["logprobs"] for p in parts]
    assert final["top_logprobs"] == 1
    assert final["usage"]["output_tokens_details"] == {"reasoning_tokens": 2}
    validate(out)


# -- the adapter and the input items ---------------------------------------------------------

@pytest.mark.parametrize("effort, reasoning, kwargs", [
    ("none", False, {}), ("minimal", False, {}),
    ("low", True, {"reasoning_effort": "low"}), ("high", True, {"reasoning_effort": "high"})])
def test_effort_turns_thinking_on_or_off(effort, reasoning, kwargs):
    gen = adapter.generation_request(body(reasoning={"effort": effort, "summary": "detailed"}),
                                     [ChatMessage("user", "hi")])
    assert gen.reasoning is reasoning and gen.template_kwargs == kwargs


@pytest.mark.parametrize("fields, param, kind", [
    ({"reasoning": {"effort": "max"}}, "reasoning.effort", ErrorKind.UNSUPPORTED),
    ({"reasoning": {"effort": "lots"}}, "reasoning.effort", ErrorKind.INVALID_REQUEST),
    ({"reasoning": {"generate_summary": "all"}}, "reasoning.generate_summary",
     ErrorKind.INVALID_REQUEST),
    ({"reasoning": {"context": "all_turns"}}, "reasoning.context", ErrorKind.UNSUPPORTED),
    ({"reasoning": {"budget": 5}}, "reasoning.budget", ErrorKind.UNSUPPORTED),
    ({"top_logprobs": 3}, "top_logprobs", ErrorKind.INVALID_REQUEST),
    ({"top_logprobs": 21, "include": ["message.output_text.logprobs"]}, "body.top_logprobs",
     None),
])
def test_refused_controls_are_named(fields, param, kind):
    if kind is None:  # a schema range: the route answers it as a 400 naming the field
        with pytest.raises(pydantic.ValidationError):
            body(**fields)
        return
    with pytest.raises(LmserveError) as caught:
        adapter.check_request(body(**fields))
    assert caught.value.param == param and caught.value.kind is kind


def test_logprobs_count_and_accepted_controls():
    assert adapter.logprobs_count(body(include=["message.output_text.logprobs"])) == 0
    assert adapter.logprobs_count(body(include=["message.output_text.logprobs"],
                                       top_logprobs=5)) == 5
    assert adapter.logprobs_count(body(top_logprobs=0)) is None
    adapter.check_request(body(reasoning={"effort": "medium", "summary": "concise",
                                          "context": "auto", "mode": "standard"}))


def test_reasoning_items_in_and_back_to_the_template():
    item = {"type": "reasoning", "summary": [],
            "content": [{"type": "reasoning_text", "text": "They asked."}]}
    own = items.own_items([{"role": "user", "content": "hi"}, item,
                           {"role": "assistant", "content": "Hello"},
                           {"type": "reasoning", "id": "rs_2",
                            "summary": [{"type": "summary_text", "text": "Call f."}]},
                           {"type": "function_call", "call_id": "c", "name": "f",
                            "arguments": "{}"},
                           {"type": "function_call_output", "call_id": "c", "output": "3"},
                           {"type": "reasoning", "summary": []},
                           {"role": "user", "content": "more"}])
    assert own[1]["id"].startswith("rs_") and own[1]["status"] == "completed"
    assert own[3] == {"id": "rs_2", "type": "reasoning", "status": "completed", "content": [],
                      "summary": [{"type": "summary_text", "text": "Call f."}]}
    messages = items.chat_messages(None, own)
    assert [(m.role, m.content, m.extra.get("reasoning_content")) for m in messages] == [
        ("user", "hi", None), ("assistant", "Hello", "They asked.\nCall f."),
        ("tool", "3", None), ("user", "more", None)]
    assert items.chat_messages(None, own[3:5])[0].extra == {
        "reasoning_content": "Call f.", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    for bad, param in (({"encrypted_content": "x"}, "input[0].encrypted_content"),
                       ({"content": [{"type": "text", "text": "x"}]}, "input[0].content[0].type"),
                       ({"summary": "x"}, "input[0].summary")):
        with pytest.raises(LmserveError) as caught:
            items.own_items([{"type": "reasoning", "summary": [], **bad}])
        assert caught.value.param == param


# -- through the routes ----------------------------------------------------------------------

# Renders earlier reasoning, and opens the think block unless thinking is turned off.
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.reasoning_content %}<think>{{ m.reasoning_content }}</think>{% endif %}"
    "{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if reasoning_effort is defined %}[{{ reasoning_effort }}]{% endif %}"
    "{% if enable_thinking is not defined or enable_thinking %}<think>\n{% endif %}{% endif %}")
CHUNKS = ["Light", " scatters.", "\n</think>", "\n\n", "Blue", " sky."]


@pytest.fixture()
def service() -> ScriptedService:
    scripted = ScriptedService(script(CHUNKS), TEMPLATE)
    return scripted


@pytest.fixture()
def client(service: ScriptedService) -> Iterator[TestClient]:
    app, _ = make_app(service, registry=ScriptedRegistry)  # type: ignore[arg-type]
    with TestClient(app) as c:
        yield c


def test_a_stored_reasoning_response_and_its_follow_up(client, service):
    r = client.post("/v1/responses", json={**ASK, "reasoning": {"effort": "low"}})
    made = r.json()
    assert [i["type"] for i in made["output"]] == ["reasoning", "message"], r.text
    assert made["output"][0]["content"] == [{"type": "reasoning_text", "text": "Light scatters."}]
    assert made["output_text"] == "Blue sky." and made["reasoning"]["effort"] == "low"
    assert made["usage"]["output_tokens_details"] == {"reasoning_tokens": 4}
    assert service.started[0][1].text.endswith("<|im_start|>assistant\n[low]<think>\n")
    assert client.get(f"/v1/responses/{made['id']}").json() == made
    client.post("/v1/responses", json={"model": "m", "input": "And at night?",
                                       "previous_response_id": made["id"],
                                       "reasoning": {"effort": "none"}})
    prompt = service.started[1][1].text
    assert "<|im_start|>assistant\n<think>Light scatters.</think>Blue sky.<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")  # thinking off: no block opened


def test_streamed_reasoning_events_in_order(client):
    r = client.post("/v1/responses", json={**ASK, "stream": True})
    events = [data for _, data in parse_sse(r.content)]
    kinds = [e["type"] for e in events]
    first_text = kinds.index("response.output_text.delta")
    assert kinds[2:5] == ["response.output_item.added", "response.content_part.added",
                          "response.reasoning_text.delta"]
    assert kinds.index("response.output_item.done") < first_text
    assert "".join(e["delta"] for e in events if e["type"] ==
                   "response.reasoning_text.delta") == "Light scatters."
    validate(events)
