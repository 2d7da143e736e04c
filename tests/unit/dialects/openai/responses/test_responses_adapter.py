"""Responses input items (normalising, rendering into chat messages) and request checks."""

from __future__ import annotations

from typing import Any

import pytest

from lmserve.core.errors import ErrorKind, LmserveError
from lmserve.core.request import ChatMessage, NamedTool, ResponseFormat, ToolSpec
from lmserve.dialects.openai.responses import adapter, items
from lmserve.dialects.openai.responses.schema import ResponseCreate


def body(**kw: Any) -> ResponseCreate:
    return ResponseCreate.model_validate({"model": "m", "input": "hi", **kw})


# ---- own items ------------------------------------------------------------------------------

def test_a_string_input_is_one_user_message_with_an_input_text_part():
    [item] = items.own_items("hello")
    assert item["id"].startswith("msg_")
    assert {k: v for k, v in item.items() if k != "id"} == {
        "type": "message", "role": "user", "status": "completed",
        "content": [{"type": "input_text", "text": "hello"}]}


def test_items_are_normalised_and_keep_client_ids():
    own = items.own_items([
        {"role": "developer", "content": "be brief"},
        {"type": "message", "role": "user", "id": "msg_mine",
         "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]},
        {"role": "assistant", "content": "sure", "status": "incomplete"},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "42"},
    ])
    assert [i["id"].split("_")[0] for i in own] == ["msg", "msg", "msg", "msg", "fc", "fco"]
    assert own[1]["id"] == "msg_mine"
    assert own[0]["content"] == [{"type": "input_text", "text": "be brief"}]
    assert own[2] == {"id": own[2]["id"], "type": "message", "role": "assistant",
                      "status": "incomplete",
                      "content": [{"type": "output_text", "text": "sure", "annotations": [],
                                   "logprobs": []}]}
    assert own[3]["content"] == [{"type": "refusal", "refusal": "no"}]
    assert own[4] == {"id": own[4]["id"], "type": "function_call", "call_id": "c1",
                      "name": "f", "arguments": "{}", "status": "completed"}
    assert own[5] == {"id": own[5]["id"], "type": "function_call_output", "call_id": "c1",
                      "output": "42", "status": "completed"}


@pytest.mark.parametrize("item, param, kind", [
    ("text", "input[0]", ErrorKind.INVALID_REQUEST),
    ({"role": "tool", "content": "x"}, "input[0].role", ErrorKind.INVALID_REQUEST),
    ({"role": "user", "content": [{"type": "input_image", "image_url": "u"}]},
     "input[0].content[0].image_url", ErrorKind.INVALID_REQUEST),
    ({"role": "system", "content": [{"type": "input_image", "image_url": "data:,"}]},
     "input[0].content[0].type", ErrorKind.INVALID_REQUEST),
    ({"role": "assistant", "content": [{"type": "input_text", "text": "x"}]},
     "input[0].content[0].type", ErrorKind.INVALID_REQUEST),
    ({"role": "user", "content": [{"type": "input_text"}]}, "input[0].content[0].text",
     ErrorKind.INVALID_REQUEST),
    ({"role": "user", "content": 5}, "input[0].content", ErrorKind.INVALID_REQUEST),
    ({"type": "function_call", "name": "f", "arguments": "{}"}, "input[0].call_id",
     ErrorKind.INVALID_REQUEST),
    ({"type": "function_call_output", "call_id": "c", "output": 3}, "input[0].output",
     ErrorKind.INVALID_REQUEST),
    ({"type": "web_search_call"}, "input[0].type", ErrorKind.INVALID_REQUEST),
    ({"type": "item_reference", "id": "msg_1"}, "input[0].type", ErrorKind.UNSUPPORTED),
    ({"role": "user", "content": "x", "status": "done"}, "input[0].status",
     ErrorKind.INVALID_REQUEST),
    ({"role": "user", "content": "x", "id": 7}, "input[0].id", ErrorKind.INVALID_REQUEST),
])
def test_bad_items_name_the_field(item, param, kind):
    with pytest.raises(LmserveError) as caught:
        items.own_items([item])
    assert caught.value.param == param and caught.value.kind is kind


def test_duplicate_ids_in_a_conversation_are_refused():
    own = items.own_items([{"role": "user", "content": "a", "id": "x"}])
    with pytest.raises(LmserveError, match="Duplicate item found with id x"):
        items.check_unique_ids([*own, *own])


# ---- items -> chat messages -----------------------------------------------------------------

def test_conversation_renders_instructions_roles_calls_and_results():
    conversation = items.own_items([
        {"role": "developer", "content": "dev"},
        {"role": "user", "content": [{"type": "input_text", "text": "a"},
                                     {"type": "input_text", "text": "b"}]},
        {"role": "assistant", "content": "let me look"},
        {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": '{"q":1}'},
        {"type": "function_call", "call_id": "c2", "name": "time", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "c2",
         "output": [{"type": "input_text", "text": "noon"}]},
        {"type": "function_call", "call_id": "c3", "name": "again", "arguments": "{}"},
    ])
    calls = [{"id": c, "type": "function", "function": {"name": n, "arguments": a}}
             for c, n, a in (("c1", "weather", '{"q":1}'), ("c2", "time", "{}"))]
    assert items.chat_messages("be kind", conversation) == [
        ChatMessage("system", "be kind"),
        ChatMessage("system", "dev"),
        ChatMessage("user", "a\nb"),
        ChatMessage("assistant", "let me look", extra={"tool_calls": calls}),
        ChatMessage("tool", "sunny", name="weather", extra={"tool_call_id": "c1"}),
        ChatMessage("tool", "noon", name="time", extra={"tool_call_id": "c2"}),
        ChatMessage("assistant", "", extra={"tool_calls": [
            {"id": "c3", "type": "function", "function": {"name": "again", "arguments": "{}"}}]}),
    ]


def test_no_instructions_no_system_message():
    assert items.chat_messages(None, items.own_items("x")) == [ChatMessage("user", "x")]


def test_truncation_maps_to_the_context_overflow_policy():
    messages = [ChatMessage("user", "x")]
    for truncation, policy in (("auto", "truncate"), ("disabled", "error"), (None, None)):
        body = ResponseCreate(model="m", input="x", truncation=truncation)
        assert adapter.generation_request(body, messages).context_overflow == policy


# ---- request checks -------------------------------------------------------------------------

def test_metadata_limits():
    adapter.check_metadata({f"k{i}": "v" for i in range(16)})
    adapter.check_metadata({"k" * 64: "v" * 512})
    for bad, param in (({f"k{i}": "v" for i in range(17)}, "metadata"),
                       ({"k" * 65: "v"}, "metadata"),
                       ({"k": "v" * 513}, "metadata.k"),
                       ({"k": 1}, "metadata.k")):
        with pytest.raises(LmserveError) as caught:
            adapter.check_metadata(bad)
        assert caught.value.param == param


F_TOOL = {"type": "function", "name": "f", "description": "Find",
          "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}


def test_tools_and_structured_output_reach_the_request():
    req = body(tools=[F_TOOL], tool_choice={"type": "function", "name": "f"},
               parallel_tool_calls=False,
               text={"format": {"type": "json_schema", "name": "x", "strict": True,
                                "schema": {"type": "object"}}})
    adapter.check_request(req)
    gen = adapter.generation_request(req, [])
    assert gen.tools == [ToolSpec("f", "Find", F_TOOL["parameters"])]
    assert gen.tool_choice == NamedTool("f") and gen.parallel_tool_calls is False
    assert gen.response_format == ResponseFormat("json_schema", schema={"type": "object"},
                                                 strict=True, param="text.format.schema")
    plain = adapter.generation_request(body(tools=[F_TOOL], tool_choice="required",
                                            text={"format": {"type": "json_object"}}), [])
    assert plain.tool_choice == "required" and plain.parallel_tool_calls is True
    assert plain.response_format == ResponseFormat("json_object", param="text.format")
    assert adapter.generation_request(body(), []).tools is None


@pytest.mark.parametrize("fields, param, kind", [
    ({"tools": [{"type": "web_search"}]}, "tools[0].type", ErrorKind.INVALID_REQUEST),
    ({"tools": [{"type": "function"}]}, "tools[0].name", ErrorKind.INVALID_REQUEST),
    ({"tools": [{"type": "function", "name": "f", "parameters": 3}]}, "tools[0].parameters",
     ErrorKind.INVALID_REQUEST),
    ({"tool_choice": "required"}, "tool_choice", ErrorKind.INVALID_REQUEST),
    ({"tool_choice": {"type": "function", "name": "g"}, "tools": [F_TOOL]}, "tool_choice.name",
     ErrorKind.INVALID_REQUEST),
    ({"tool_choice": {"type": "allowed_tools", "tools": []}, "tools": [F_TOOL]}, "tool_choice",
     ErrorKind.UNSUPPORTED),
    ({"tool_choice": "sometimes"}, "tool_choice", ErrorKind.INVALID_REQUEST),
    ({"text": {"format": {"type": "json_schema", "schema": {}}}}, "text.format.name",
     ErrorKind.INVALID_REQUEST),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema",
     ErrorKind.INVALID_REQUEST),
    ({"text": {"format": {"type": "yaml"}}}, "text.format.type", ErrorKind.INVALID_REQUEST),
    ({"text": {"verbosity": "low"}}, "text.verbosity", ErrorKind.UNSUPPORTED),
    ({"reasoning": {"effort": "xhigh"}}, "reasoning.effort", ErrorKind.UNSUPPORTED),
    ({"reasoning": {"summary": "brief"}}, "reasoning.summary", ErrorKind.INVALID_REQUEST),
    ({"include": ["everything"]}, "include", ErrorKind.INVALID_REQUEST),
    ({"background": True}, "background", ErrorKind.UNSUPPORTED),
    ({"conversation": "conv_1"}, "conversation", ErrorKind.UNSUPPORTED),
    ({"prompt": {"id": "pmpt_1"}}, "prompt", ErrorKind.UNSUPPORTED),
    ({"top_logprobs": 2}, "top_logprobs", ErrorKind.INVALID_REQUEST),
    ({"service_tier": "flex"}, "service_tier", ErrorKind.UNSUPPORTED),
    ({"input": []}, "input", ErrorKind.INVALID_REQUEST),
    ({"metadata": {"k": "v" * 600}}, "metadata.k", ErrorKind.INVALID_REQUEST),
])
def test_refused_parameters_are_named(fields, param, kind):
    with pytest.raises(LmserveError) as caught:
        adapter.check_request(body(**fields))
    assert caught.value.param == param and caught.value.kind is kind


def test_accepted_parameters():
    adapter.check_request(body(
        tool_choice="none", tools=[], include=["reasoning.encrypted_content"],
        reasoning={"effort": None, "summary": None}, text={"format": {"type": "text"},
                                                           "verbosity": "medium"},
        service_tier="auto", background=False, top_logprobs=0, truncation="auto",
        parallel_tool_calls=False, user="u", safety_identifier="s", prompt_cache_key="k",
        stream_options={"include_obfuscation": False}))
    adapter.check_request(body(input=[], previous_response_id="resp_1"))


def test_generation_request_carries_sampling_limits_and_stops():
    gen = adapter.generation_request(
        body(temperature=0.2, top_p=0.9, max_output_tokens=7, seed=3, top_k=5, stop="END",
             ignore_eos=True),
        [ChatMessage("user", "hi")])
    assert gen.max_tokens == 7 and gen.stop == ["END"] and gen.ignore_eos
    assert gen.messages == [ChatMessage("user", "hi")]
    s = gen.sampling
    assert (s.temperature, s.top_p, s.seed, s.top_k) == (0.2, 0.9, 3, 5)
    default = adapter.generation_request(body(), [])
    assert default.max_tokens is None and default.stop == []
    assert default.sampling.temperature == 1.0 and default.sampling.top_p == 1.0
