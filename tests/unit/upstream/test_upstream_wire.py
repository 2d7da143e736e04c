"""The upstream's wire, pure: request bodies, refusals, SSE chunks -> choice steps, errors."""

from __future__ import annotations

import dataclasses
import json

import pytest

from lmserve.core.backend import Failed, Finished, FinishReason
from lmserve.core.errors import ErrorKind, LmserveError
from lmserve.core.events import (
    CHANNEL_OUTPUT,
    CHANNEL_REASONING,
    TextDelta,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
    Usage,
)
from lmserve.core.images import ImageInput
from lmserve.core.lora import LoraRef, LoraSelection
from lmserve.core.request import (
    ChatMessage,
    GenerationRequest,
    NamedTool,
    ResponseFormat,
    SamplingParams,
    ToolSpec,
)
from lmserve.upstream import wire

CHAT = [ChatMessage("user", "hi")]


def chat(**kw) -> GenerationRequest:
    return GenerationRequest(model="m", messages=list(CHAT), **kw)


# -- request bodies ---------------------------------------------------------------------------

def test_chat_body_streams_with_usage_and_sends_only_what_was_set():
    body = wire.request_body(chat(max_tokens=7, stop=["x"], sampling=SamplingParams(
        temperature=0.0, top_k=5, seed=3)), "up-model", "lmserve")
    assert body == {"model": "up-model", "messages": [{"role": "user", "content": "hi"}],
                    "temperature": 0.0, "top_k": 5, "seed": 3, "max_tokens": 7,
                    "stop": ["x"], "stream": True, "stream_options": {"include_usage": True}}


def test_text_body_takes_the_prompt_or_its_token_ids():
    assert wire.request_body(GenerationRequest(prompt="Once"), "m")["prompt"] == "Once"
    body = wire.request_body(GenerationRequest(prompt_tokens=[1, 2], n=2, ignore_eos=True,
                                               stop_token_ids=[9], logprobs=2), "m")
    assert body["prompt"] == [1, 2] and body["n"] == 2 and body["ignore_eos"] is True
    assert body["stop_token_ids"] == [9] and body["logprobs"] == 2
    assert "messages" not in body


def test_penalties_use_the_flavor_s_name():
    req = chat(sampling=SamplingParams(repetition_penalty=1.3, logit_bias={5: -100.0}))
    assert wire.request_body(req, "m", "vllm")["repetition_penalty"] == 1.3
    assert wire.request_body(req, "m", "llamacpp")["repeat_penalty"] == 1.3
    assert wire.request_body(req, "m", "vllm")["logit_bias"] == {"5": -100.0}


def test_tools_choice_format_reasoning_and_template_kwargs():
    tool = ToolSpec("get_weather", "Weather", {"type": "object", "properties": {}}, strict=True)
    body = wire.request_body(chat(
        tools=[tool], tool_choice=NamedTool("get_weather"), parallel_tool_calls=False,
        response_format=ResponseFormat("json_schema", schema={"type": "object"}, strict=True),
        reasoning=False, template_kwargs={"x": 1}, logprobs=3), "m")
    assert body["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather",
        "parameters": {"type": "object", "properties": {}}, "strict": True}}]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["parallel_tool_calls"] is False
    assert body["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "response", "schema": {"type": "object"}, "strict": True}}
    assert body["chat_template_kwargs"] == {"x": 1, "enable_thinking": False}
    assert body["logprobs"] is True and body["top_logprobs"] == 3
    auto = wire.request_body(chat(tools=[tool]), "m")
    assert auto["tool_choice"] == "auto" and "parallel_tool_calls" not in auto
    assert wire.request_body(chat(response_format=ResponseFormat("json_object")),
                             "m")["response_format"] == {"type": "json_object"}


def test_messages_keep_tool_calls_as_openai_sends_them_and_images_in_place():
    call = {"function": {"name": "f", "arguments": {"a": 1}}}  # Ollama's shape
    png = ImageInput("base64", "iVBORw0KGgo=", offset=4)
    msgs = [ChatMessage("assistant", "", extra={"tool_calls": [call],
                                                "reasoning_content": "hm"}),
            ChatMessage("tool", "sunny", name="f", extra={"tool_call_id": "c1"}),
            ChatMessage("user", "see:and this", images=(png,))]
    body = wire.request_body(GenerationRequest(messages=msgs), "m")
    assert body["messages"][0] == {"role": "assistant", "content": "", "reasoning_content": "hm",
                                   "tool_calls": [{"type": "function", "function": {
                                       "name": "f", "arguments": '{"a": 1}'}}]}
    assert body["messages"][1] == {"role": "tool", "content": "sunny", "name": "f",
                                   "tool_call_id": "c1"}
    assert body["messages"][2]["content"] == [
        {"type": "text", "text": "see:"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "text", "text": "and this"}]


def test_a_continued_assistant_turn_asks_the_upstream_to_continue_it():
    req = GenerationRequest(messages=[*CHAT, ChatMessage("assistant", "1, 2,")],
                            add_generation_prompt=False, continue_final_message=True)
    body = wire.request_body(req, "m")
    assert body["add_generation_prompt"] is False and body["continue_final_message"] is True
    closed = wire.request_body(dataclasses.replace(req, continue_final_message=False), "m")
    assert closed["add_generation_prompt"] is False and "continue_final_message" not in closed


@pytest.mark.parametrize("request_, param", [
    (chat(sampling=SamplingParams(grammar="root ::= \"a\"")), "grammar"),
    (chat(response_format=ResponseFormat("gbnf", grammar="root ::= \"a\"", param="format")),
     "format"),
    (chat(response_format=ResponseFormat("regex", pattern="a+")), "response_format"),
    (chat(lora=LoraSelection((LoraRef("x"),), param="lora")), "lora"),
    (GenerationRequest(prompt="a", prompt_logprobs=1), "prompt_logprobs"),
    (GenerationRequest(messages=[ChatMessage("user", "x", images=(
        ImageInput("path", "/tmp/a.png", param="messages[0].images[0]"),))]),
     "messages[0].images[0]"),
])
def test_what_an_upstream_cannot_carry_is_refused_naming_the_param(request_, param):
    with pytest.raises(LmserveError) as exc:
        wire.check_request(request_, "lmserve")
    assert exc.value.kind == ErrorKind.UNSUPPORTED and exc.value.param == param
    assert exc.value.kind.http_status == 400


def test_token_ids_go_only_to_upstreams_known_to_take_them():
    ids = GenerationRequest(prompt_tokens=[1, 2])
    wire.check_request(ids, "vllm")
    with pytest.raises(LmserveError) as exc:
        wire.check_request(ids, "openai")
    assert exc.value.param == "prompt" and exc.value.kind == ErrorKind.UNSUPPORTED


# -- the event stream -----------------------------------------------------------------------

def test_sse_decoder_splits_events_across_chunks_and_skips_comments():
    decoder = wire.SSEDecoder()
    assert decoder.feed(b"data: {\"a\"") == []
    assert decoder.feed(b": 1}\r\n\r\n: ping\n\nevent: x\ndata: [DONE]") == ['{"a": 1}']
    assert decoder.flush() == ["[DONE]"]


def chunk(delta=None, finish=None, index=0, **extra) -> str:
    choice = {"index": index, "delta": delta or {}, "finish_reason": finish, **extra}
    return json.dumps({"id": "c", "object": "chat.completion.chunk", "choices": [choice]})


def usage(prompt=5, completion=3, cached=2) -> str:
    return json.dumps({"choices": [], "usage": {
        "prompt_tokens": prompt, "completion_tokens": completion,
        "total_tokens": prompt + completion, "prompt_tokens_details": {"cached_tokens": cached}}})


def test_chat_text_and_reasoning_deltas_then_a_terminal_with_the_usage():
    reader = wire.StreamReader()
    assert reader.data(chunk({"role": "assistant", "content": ""})) == []
    [step] = reader.data(chunk({"reasoning_content": "think"}))
    assert step.events == [TextDelta(CHANNEL_REASONING, "think")] and step.text == ""
    [step] = reader.data(chunk({"content": "Hel"}))
    assert step.text == "Hel" and step.events == [TextDelta(CHANNEL_OUTPUT, "Hel")]
    [step] = reader.data(chunk({"content": "lo"}, "stop", stop_reason="\n\n"))
    assert step.end is None  # the terminal waits for the usage chunk
    [end] = reader.data(usage())
    assert end.end == Finished(FinishReason.STOP, Usage(5, 3, 2), "\n\n")
    assert reader.ended
    assert reader.data("[DONE]") == []


@pytest.mark.parametrize("wire_reason, reason", [
    ("stop", FinishReason.STOP), ("length", FinishReason.LENGTH),
    ("tool_calls", FinishReason.STOP), ("abort", FinishReason.CANCELLED)])
def test_finish_reasons_map(wire_reason, reason):
    reader = wire.StreamReader()
    reader.data(chunk({"content": "x"}, wire_reason))
    [end] = reader.data("[DONE]")  # an upstream without include_usage: counted
    assert end.end == Finished(reason, Usage(0, 1))


def test_tool_call_deltas_become_start_delta_end_events():
    reader = wire.StreamReader()
    steps = reader.data(chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                                               "function": {"name": "f", "arguments": ""}}]}))
    assert steps[0].events == [ToolCallStart(0, "call_a", "f")]
    steps = reader.data(chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{\"a\""}}]}))
    assert steps[0].events == [ToolCallDelta(0, "{\"a\"")]
    steps = reader.data(chunk({"tool_calls": [
        {"index": 1, "id": "call_b", "function": {"name": "g", "arguments": "{}"}}]}))
    assert steps[0].events == [ToolCallEnd(0, "{\"a\""), ToolCallStart(1, "call_b", "g"),
                               ToolCallDelta(1, "{}")]
    assert reader.data(chunk({}, "tool_calls")) == []
    [end] = reader.data(usage())
    assert end.events == [ToolCallEnd(1, "{}")]
    assert isinstance(end.end, Finished) and end.end.reason == FinishReason.STOP


def test_a_call_cut_by_length_ends_incomplete():
    reader = wire.StreamReader()
    reader.data(chunk({"tool_calls": [{"index": 0, "id": "c", "function": {
        "name": "f", "arguments": "{\"a"}}]}, "length"))
    [end] = reader.data(usage())
    assert end.events == [ToolCallEnd(0, "{\"a", complete=False)]


def test_n_choices_share_the_usage_by_their_chunks():
    reader = wire.StreamReader(2)
    reader.data(chunk({"content": "a"}, index=0))
    reader.data(chunk({"content": "b"}, index=1))
    reader.data(chunk({"content": "c"}, "stop", index=1))
    reader.data(chunk({}, "length", index=0))
    ends = reader.data(usage(prompt=4, completion=5, cached=0))
    assert {s.index: s.end.usage for s in ends} == {0: Usage(4, 1), 1: Usage(4, 4)}


def running(delta, index, completion, finish=None, prompt=5) -> str:
    """A chunk with the usage so far (continuous_usage_stats)."""
    data = json.loads(chunk(delta, finish, index))
    data["usage"] = {"prompt_tokens": prompt, "completion_tokens": completion,
                     "total_tokens": prompt + completion}
    return json.dumps(data)


def test_continuous_usage_is_asked_of_servers_that_give_it_when_the_caller_wants_it():
    def options(flavor, wanted=True):
        return wire.request_body(chat(continuous_usage=wanted), "m", flavor)["stream_options"]
    for flavor in ("lmserve", "vllm", "sglang"):
        assert options(flavor) == {"include_usage": True, "continuous_usage_stats": True}
    assert options("lmserve", wanted=False) == options("llamacpp") == options("") == \
        {"include_usage": True}


@pytest.mark.parametrize("summed, counts", [
    (True, [0, 0, 1, 2, 3, 3, 3]),  # lmserve: the whole request's tokens so far
    (False, [0, 0, 1, 1, 2, 2, 1]),  # vLLM: the chunk's choice's tokens so far
])
def test_running_counts_reach_each_choice_s_steps_and_split_the_final_usage(summed, counts):
    reader = wire.StreamReader(2, continuous=True, summed=summed)
    role = {"role": "assistant", "content": ""}
    assert reader.data(running(role, 0, counts[0])) == []
    assert reader.data(running(role, 1, counts[1])) == []
    [a] = reader.data(running({"content": "a"}, 0, counts[2]))
    [b] = reader.data(running({"content": "b"}, 1, counts[3]))
    [c] = reader.data(running({"content": "c"}, 0, counts[4]))
    assert [s.running for s in (a, b, c)] == [Usage(5, 1), Usage(5, 1), Usage(5, 2)]
    assert reader.data(running({}, 0, counts[5], "stop")) == []  # running: not the final
    assert reader.data(running({}, 1, counts[6], "stop")) == []
    ends = reader.data(usage(completion=3, cached=0))  # the final usage: no choices
    assert {s.index: s.end.usage for s in ends} == {0: Usage(5, 2), 1: Usage(5, 1)}


def test_without_continuous_usage_a_usage_beside_choices_is_the_final_one():
    reader = wire.StreamReader()  # e.g. a server that sends the usage with the finish
    step, end = reader.data(running({"content": "x"}, 0, 1, "stop"))
    assert step.text == "x" and step.running is None
    assert end.end == Finished(FinishReason.STOP, Usage(5, 1))


def test_completion_chunks_carry_text_and_logprobs():
    reader = wire.StreamReader(chat=False)
    data = {"choices": [{"index": 0, "text": "Paris", "finish_reason": None, "logprobs": {
        "tokens": ["Paris"], "token_logprobs": [-0.5], "top_logprobs": [{"Paris": -0.5,
                                                                         "Lyon": -2.0}]}}]}
    [step] = reader.data(json.dumps(data))
    assert step.text == "Paris" and step.events == [TextDelta(CHANNEL_OUTPUT, "Paris")]
    [lp] = step.logprobs
    assert lp.piece == b"Paris" and lp.logprob == -0.5
    assert [t.piece for t in lp.top] == [b"Paris", b"Lyon"]


def test_chat_logprobs_keep_the_bytes():
    reader = wire.StreamReader()
    [step] = reader.data(chunk({"content": "é"}, logprobs={"content": [
        {"token": "é", "logprob": -0.1, "bytes": [195, 169],
         "top_logprobs": [{"token": "é", "logprob": -0.1, "bytes": [195, 169]}]}]}))
    assert step.logprobs[0].piece == "é".encode() and step.logprobs[0].top[0].logprob == -0.1


def test_an_error_inside_the_stream_fails_every_open_choice_with_its_kind():
    reader = wire.StreamReader(2)
    reader.data(chunk({"content": "a"}))
    steps = reader.data(json.dumps({"error": {"message": "the KV cache is full",
                                              "type": "service_unavailable_error",
                                              "code": "capacity"}}))
    assert [s.index for s in steps] == [0, 1]
    assert all(isinstance(s.end, Failed) and s.end.kind == ErrorKind.CAPACITY for s in steps)
    assert reader.ended


def test_a_stream_that_breaks_off_fails_the_unfinished_choices():
    reader = wire.StreamReader()
    reader.data(chunk({"content": "a"}))
    [step] = reader.end_of_stream()
    assert isinstance(step.end, Failed) and step.end.kind == ErrorKind.UPSTREAM


def test_a_stream_without_usage_or_done_still_finishes_finished_choices():
    reader = wire.StreamReader()
    reader.data(chunk({"content": "a"}, "stop"))
    [step] = reader.end_of_stream()
    assert step.end == Finished(FinishReason.STOP, Usage(0, 1))


# -- errors ---------------------------------------------------------------------------------

def err(message="bad", type_="invalid_request_error", param=None, code=None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": param,
                                 "code": code}}).encode()


@pytest.mark.parametrize("status, body, kind", [
    (400, err("max_tokens too big", param="max_tokens", code="context_length_exceeded"),
     ErrorKind.CONTEXT_LENGTH_EXCEEDED),
    (400, err(), ErrorKind.INVALID_REQUEST),
    (401, err(type_="authentication_error"), ErrorKind.AUTHENTICATION),
    (404, err(code="model_not_found"), ErrorKind.MODEL_NOT_FOUND),
    (404, b"Not Found", ErrorKind.MODEL_NOT_FOUND),
    (422, json.dumps({"detail": [{"msg": "field required"}]}).encode(),
     ErrorKind.INVALID_REQUEST),
    (429, err(type_="rate_limit_error"), ErrorKind.OVERLOADED),
    (500, err(type_="server_error"), ErrorKind.UPSTREAM),
    (502, b"", ErrorKind.UPSTREAM),
    (504, b"gateway timeout", ErrorKind.UPSTREAM_TIMEOUT),
    (400, json.dumps({"object": "error", "message": "vllm says no", "type": "BadRequestError",
                      "param": None, "code": 400}).encode(), ErrorKind.INVALID_REQUEST),
])
def test_upstream_statuses_map_back_to_kinds(status, body, kind):
    error = wire.error_from_response(status, body, {})
    assert error.kind == kind
    assert error.message


def test_a_4xx_keeps_the_upstream_s_message_param_and_code():
    error = wire.error_from_response(400, err("this model's maximum context length is 4096",
                                              param="max_tokens",
                                              code="context_length_exceeded"), {})
    assert error.message == "this model's maximum context length is 4096"
    assert error.param == "max_tokens" and error.code == "context_length_exceeded"
    vllm = wire.error_from_response(400, json.dumps({"object": "error", "message": "no",
                                                     "code": 400}).encode(), {})
    assert vllm.code is None and vllm.message == "no"


def test_retry_after_is_kept_and_a_loading_upstream_stays_503():
    busy = wire.error_from_response(429, err(type_="rate_limit_error"), {"retry-after": "3"})
    assert busy.kind == ErrorKind.OVERLOADED and busy.retry_after == 3.0
    loading = wire.error_from_response(503, err(code="model_loading"), {"retry-after": "2"})
    assert loading.kind == ErrorKind.LOADING and loading.retry_after == 2.0
    down = wire.error_from_response(503, b"", {})
    assert down.kind == ErrorKind.UPSTREAM and "503" in down.message


# -- the model list -------------------------------------------------------------------------

def test_model_facts_from_lmserve_vllm_and_llama_server_lists():
    lm = {"data": [{"id": "smollm2", "owned_by": "lmserve", "created": 5, "meta": {
        "n_ctx": 4096, "n_ctx_train": 8192, "architecture": "llama", "n_params": 1,
        "size": 2, "n_vocab": 3}}]}
    facts = wire.find_model(lm, "smollm2")
    assert (facts.flavor, facts.n_ctx, facts.n_ctx_train, facts.created) == \
        ("lmserve", 4096, 8192, 5)
    vllm = {"data": [{"id": "q", "owned_by": "vllm", "max_model_len": 32768}]}
    assert wire.find_model(vllm, "q").n_ctx == 32768
    llama = {"data": [{"id": "g.gguf", "owned_by": "llamacpp", "meta": {"n_ctx_train": 2048}}]}
    assert wire.find_model(llama, "g.gguf").n_ctx == 2048
    with pytest.raises(ValueError, match="it serves: q"):
        wire.find_model(vllm, "other")


def test_urls():
    assert wire.server_root("http://h:1/v1/") == "http://h:1"
    assert wire.join_url("http://h:1/v1/", "/models") == "http://h:1/v1/models"
    assert wire.tokens_of({"tokens": [1, {"id": 2, "piece": "x"}]}) == [1, 2]


# -- stop_reason, and the bodies that count a chat --------------------------------------------

@pytest.mark.parametrize("stop_reason, stop_ids, match", [
    ("5,", (), "5,"),  # the stop string
    (7, (7,), "7"),  # a stop_token_ids token: its id, as the engine names it
    (2, (), None),  # an EOS id of the upstream's generation config: no stop sequence
    (None, (), None), (True, (1,), None)])
def test_stop_reason_is_the_stop_string_or_a_requested_stop_token(stop_reason, stop_ids, match):
    reader = wire.StreamReader(stop_ids=stop_ids)
    reader.data(chunk({"content": "x"}, "stop", stop_reason=stop_reason))
    [end] = reader.data(usage())
    assert end.end == Finished(FinishReason.STOP, Usage(5, 3, 2), match)


def test_a_chat_is_counted_by_vllms_chat_form_of_tokenize():
    req = GenerationRequest(
        messages=[*CHAT, ChatMessage("assistant", "1, 2,")], add_generation_prompt=False,
        continue_final_message=True, reasoning=False, max_tokens=9, stop=["x"],
        response_format=ResponseFormat("json_object"),
        tools=[ToolSpec("f", "", {"type": "object"})], tool_choice="required")
    body = wire.chat_tokenize_body(req, "m")
    assert body == {
        "model": "m", "messages": [{"role": "user", "content": "hi"},
                                   {"role": "assistant", "content": "1, 2,"}],
        "tools": body["tools"], "tool_choice": "required",
        "chat_template_kwargs": {"enable_thinking": False},
        "add_generation_prompt": False, "continue_final_message": True}
    assert body["tools"][0]["function"]["name"] == "f"
    assert wire.chat_tokenize_body(chat(), "m") == {
        "model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert wire.template_body(chat()) == {"messages": [{"role": "user", "content": "hi"}]}
