"""The Anthropic dialect's pure parts: adapter and encoder (golden event sequences)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from lmserve.core.backend import choice_step
from lmserve.core.errors import ErrorKind, LmserveError
from lmserve.core.events import TokenOutput, Usage
from lmserve.dialects.anthropic import adapter, encoder
from lmserve.dialects.anthropic.schema import MessageRequest

CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
USER = [{"role": "user", "content": "hi"}]


def body(**kw: Any) -> MessageRequest:
    return MessageRequest.model_validate({"model": "m", "max_tokens": 8, "messages": USER, **kw})


# -- adapter ----------------------------------------------------------------------------------

def test_request_maps_system_blocks_sampling_and_stops():
    gen, prefill = adapter.message_request(body(
        system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                               {"type": "text", "text": "b",
                                                "cache_control": {"type": "ephemeral"}}]}],
        temperature=0.2, top_p=0.9, top_k=40, stop_sequences=["END"],
        metadata={"user_id": "u1"}, service_tier="auto"))
    assert prefill is None
    assert [(m.role, m.content) for m in gen.messages] == [("system", "Be brief.\nBe kind."),
                                                          ("user", "a\nb")]
    assert (gen.sampling.temperature, gen.sampling.top_p, gen.sampling.top_k) == (0.2, 0.9, 40)
    assert gen.stop == ["END"] and gen.max_tokens == 8


def test_consecutive_turns_merge_and_final_assistant_turn_is_a_prefill():
    gen, prefill = adapter.message_request(body(messages=[
        {"role": "user", "content": "one"}, {"role": "user", "content": "two"},
        {"role": "assistant", "content": [{"type": "text", "text": "The answer is"}]}]))
    assert [(m.role, m.content) for m in gen.messages] == [("user", "one\n\ntwo"),
                                                          ("assistant", "The answer is")]
    assert prefill == "The answer is"
    assert gen.continue_final_message and not gen.add_generation_prompt


HISTORY = [
    {"role": "user", "content": "weather?"},
    {"role": "assistant", "content": [
        {"type": "thinking", "thinking": "need a tool", "signature": "s"},
        {"type": "redacted_thinking", "data": "opaque"},
        {"type": "text", "text": "Checking."},
        {"type": "tool_use", "id": "tu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
    {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "tu_1",
         "content": [{"type": "text", "text": "18C"}]},
        {"type": "text", "text": "thanks"}]},
]


def test_tool_history_becomes_template_fields():
    gen, _ = adapter.message_request(body(messages=HISTORY))
    user, assistant, tool, follow = [m.as_template_dict() for m in gen.messages]
    assert assistant["content"] == "Checking." and assistant["reasoning_content"] == "need a tool"
    assert assistant["tool_calls"] == [{"id": "tu_1", "type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Paris"}}}]
    assert tool == {"role": "tool", "content": "18C", "name": "get_weather",
                    "tool_call_id": "tu_1"}
    assert follow == {"role": "user", "content": "thanks"}


@pytest.mark.parametrize("fields, param", [
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0].type"),
    ({"tools": [{"name": "x"}]}, "tools[0].input_schema"),
    ({"tools": [{"name": "x", "input_schema": {}}], "tool_choice": {"type": "tool",
                                                                    "name": "y"}},
     "tool_choice.name"),
    ({"thinking": {"type": "enabled", "budget_tokens": 1000}}, "thinking.budget_tokens"),
    ({"thinking": {"type": "enabled", "budget_tokens": 2048}}, "thinking.budget_tokens"),
    ({"output_config": {"format": {"type": "json_schema"}}}, "output_config.format.schema"),
    ({"output_config": {"effort": "high"}}, "output_config.effort"),
    ({"mcp_servers": [{"url": "x"}]}, "mcp_servers"),
    ({"container": "c1"}, "container"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
     "messages[0].content[0].source.type"),
    ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "a",
                                                 "content": [{"type": "image"}]}]}]},
     "messages[0].content[0].content[0].source.type"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]},
     "messages[0].content[0].text"),
    ({"messages": [*USER, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "a", "name": "f", "input": {}}]}]},
     "messages[1].content[0].type"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "a", "name": "f",
                                                 "input": {}}]}]},
     "messages[0].content[0].type"),
])
def test_unimplemented_and_malformed_input_is_refused_naming_the_parameter(fields, param):
    with pytest.raises(LmserveError) as exc:
        adapter.message_request(body(**fields))
    assert exc.value.kind in (ErrorKind.UNSUPPORTED, ErrorKind.INVALID_REQUEST)
    assert exc.value.param == param and param in exc.value.message


def test_disabled_features_are_accepted():
    adapter.message_request(body(thinking={"type": "disabled"}, tool_choice={"type": "none"},
                                 tools=[], output_config={"effort": None}))


# -- encoder ----------------------------------------------------------------------------------

def test_error_bodies_and_usage_accounting():
    assert encoder.error_body(LmserveError(ErrorKind.MODEL_NOT_FOUND, "no such model")) == {
        "type": "error", "error": {"type": "not_found_error", "message": "no such model"}}
    kinds = {k: encoder.error_body(LmserveError(k, "x"))["error"]["type"] for k in ErrorKind}
    assert kinds[ErrorKind.OVERLOADED] == "rate_limit_error"
    assert kinds[ErrorKind.LOADING] == "overloaded_error"
    assert kinds[ErrorKind.INTERNAL] == "api_error"
    assert kinds[ErrorKind.CAPACITY] == "overloaded_error"
    assert kinds[ErrorKind.UPSTREAM] == kinds[ErrorKind.UPSTREAM_TIMEOUT] == "api_error"
    assert encoder.usage_body(Usage(prompt_tokens=10, completion_tokens=3, cached_tokens=4)) == {
        "input_tokens": 6, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 4,
        "output_tokens": 3}


def test_stop_reasons():
    def reason(capped: bool = False, **kw: Any) -> tuple[str, str | None]:
        return encoder.stop_reason(choice_step(TokenOutput(0, **kw)), context_capped=capped)

    assert reason(finish_reason="stop") == ("end_turn", None)
    assert reason(finish_reason="stop", stop_match="###") == ("stop_sequence", "###")
    assert reason(finish_reason="length") == ("max_tokens", None)
    assert reason(True, finish_reason="length") == ("model_context_window_exceeded", None)


def parse_sse(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for frame in raw.decode().split("\n\n"):
        if frame:
            event, data = frame.split("\n")
            assert event.startswith("event: ") and data.startswith("data: ")
            events.append((event[7:], json.loads(data[6:])))
    return events


STEPS = [[TokenOutput(0, "Hel")], [TokenOutput(0, "")],
         [TokenOutput(0, "lo", finish_reason="stop", stop_match="END",
                      usage=Usage(prompt_tokens=10, completion_tokens=3, cached_tokens=4))]]


def golden_events(message_id: str, model: str = "m") -> list[tuple[str, dict[str, Any]]]:
    return [
        ("message_start", {"type": "message_start", "message": {
            "id": message_id, "type": "message", "role": "assistant", "model": model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 10, "cache_creation_input_tokens": 0,
                      "cache_read_input_tokens": 0, "output_tokens": 0}}}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
        ("ping", {"type": "ping"}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": "Hel"}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": "lo"}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta",
                           "delta": {"stop_reason": "stop_sequence", "stop_sequence": "END"},
                           "usage": {"input_tokens": 6, "cache_creation_input_tokens": 0,
                                     "cache_read_input_tokens": 4, "output_tokens": 3}}),
        ("message_stop", {"type": "message_stop"}),
    ]


def test_stream_encoder_golden_sequence():
    enc = encoder.StreamEncoder("m", 10, context_capped=False)
    raw = b"".join(enc.start()) + b"".join(f for step in STEPS for out in step
                                           for f in enc.output(choice_step(out)))
    events = parse_sse(raw)
    message_id = events[0][1]["message"]["id"]
    assert message_id.startswith("msg_")
    assert events == golden_events(message_id)


def test_model_pages():
    cards = [encoder.model_card(n, 0, 0) for n in "abcde"]
    assert cards[0] == {"type": "model", "id": "a", "display_name": "a",
                        "created_at": "1970-01-01T00:00:00Z", "lifecycle": "active"}

    def ids(**kw: Any) -> tuple[list[str], bool, str | None, str | None]:
        page = encoder.model_page(cards, **{"limit": 2, "after_id": None, "before_id": None,
                                            **kw})
        return [c["id"] for c in page["data"]], page["has_more"], page["first_id"], page["last_id"]

    assert ids() == (["a", "b"], True, "a", "b")
    assert ids(after_id="b") == (["c", "d"], True, "c", "d")
    assert ids(after_id="d") == (["e"], False, "e", "e")
    assert ids(before_id="d") == (["b", "c"], True, "b", "c")
    assert ids(before_id="b") == (["a"], False, "a", "a")
    with pytest.raises(LmserveError):
        ids(after_id="zz")

