"""Native dialect: tools, tool_choice and format in the body; tool blocks in buffered answers
and the exact stream frames of a tool call."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from lmserve.chat.parsing import make_chat_parser
from lmserve.chat.turn import step_events
from lmserve.core.errors import LmserveError
from lmserve.core.events import CHANNEL_OUTPUT, CHANNEL_REASONING, ChatEvent, Usage
from lmserve.core.request import NamedTool, ResponseFormat
from lmserve.dialects.native import adapter
from lmserve.dialects.native.encoder import Blocks, FrameEncoder, query_body
from lmserve.dialects.native.producer import visible
from lmserve.dialects.native.schema import GenerateBody

WEATHER = {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
REPLY = ['Thinking.</think>Sure.<tool_call>\n{"name": "get_weather", "arguments": ',
         '{"city": "Oslo"}}\n</tool_call>']


def request(**kw: object) -> adapter.Native:
    body = GenerateBody.model_validate({"transport": "conversation",
                                        "messages": [{"role": "user", "content": "hi"}], **kw})
    return adapter.generation_request(body, default_transport="chat",
                                      has_template=True, reasoning_default=False)


def reply(show: bool) -> Callable[[str, bool], list[ChatEvent]]:
    """A chunk, parsed as the backend parses a step, then filtered as the reply shows it."""
    parser = make_chat_parser(tool_format="hermes", reasoning_tags=("<think>", "</think>"),
                              starts_in_reasoning=True)
    return lambda text, finished: visible(step_events(parser, text, finished), show)


def test_body_fields_become_the_request() -> None:
    native = request(tools=[WEATHER, {"type": "function", "function": {"name": "t"}}],
                     tool_choice={"name": "t"}, format={"type": "regex", "pattern": "[a-z]+"})
    gen = native.request
    assert [t.name for t in gen.tools or []] == ["get_weather", "t"]
    assert gen.tool_choice == NamedTool("t") and gen.reasoning is False
    assert gen.response_format == ResponseFormat("regex", pattern="[a-z]+",
                                                 param="format.pattern")
    assert request(format="json").request.response_format == \
        ResponseFormat("json_object", param="format")
    history = request(messages=[
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "name": "get_weather", "arguments": {"city": "Oslo"}}]},
        {"role": "tool", "content": "5C", "tool_call_id": "c1"}]).request.messages or []
    assert history[0].extra["tool_calls"][0]["function"] == {
        "name": "get_weather", "arguments": '{"city": "Oslo"}'}
    assert history[1].extra == {"tool_call_id": "c1"}


@pytest.mark.parametrize("kw,param", [
    ({"tools": [{"description": "x"}]}, "tools[0].name"),
    ({"tools": [WEATHER], "tool_choice": {"name": "nope"}}, "tool_choice.name"),
    ({"format": {"type": "xml"}}, "format"),
    ({"format": {"type": "json_schema", "schema": "x"}}, "format.schema"),
])
def test_bad_tool_fields_name_the_parameter(kw: dict, param: str) -> None:
    with pytest.raises(LmserveError) as exc:
        request(**kw)
    assert exc.value.param == param


def test_buffered_blocks_and_stop_reason() -> None:
    blocks = Blocks()
    parser = reply(show=True)
    for i, chunk in enumerate(REPLY):
        blocks.add_events(parser(chunk, i == len(REPLY) - 1))
    assert [b["type"] for b in blocks.blocks] == ["text", "text", "tool"]
    assert blocks.blocks[0] == {"type": "text", "channel": CHANNEL_REASONING, "text": "Thinking."}
    assert blocks.blocks[1] == {"type": "text", "channel": CHANNEL_OUTPUT, "text": "Sure."}
    tool = blocks.blocks[2]
    assert tool["id"].startswith("call_") and tool["name"] == "get_weather"
    assert tool["arguments"] == {"city": "Oslo"}
    assert query_body("i", 0, "m", blocks, "stop", Usage())["stop_reason"] == "tool_use"
    assert query_body("i", 0, "m", blocks, "length", Usage())["stop_reason"] == "max_tokens"


def test_stream_frames_of_a_tool_call() -> None:
    encoder, parser = FrameEncoder("i", "m", 0), reply(show=False)
    frames = []
    for i, chunk in enumerate(REPLY):
        frames += encoder.events(parser(chunk, i == len(REPLY) - 1))
    frames += encoder.finish("stop", Usage(3, 4))
    names = [name for name, _ in frames]
    assert names[:3] == ["block.start", "block.delta", "block.stop"]
    assert frames[0][1] == {"index": 0, "type": "text", "channel": CHANNEL_OUTPUT}
    start = frames[3]
    assert start[0] == "block.start" and start[1]["type"] == "tool"
    assert set(start[1]) == {"index", "type", "id", "name"} and start[1]["index"] == 1
    deltas = [data for name, data in frames if name == "block.delta" and data["index"] == 1]
    assert all(set(d) == {"index", "arguments"} for d in deltas)
    assert "".join(d["arguments"] for d in deltas) == '{"city": "Oslo"}'
    assert names[-3:] == ["block.stop", "message.delta", "message.stop"]
    assert frames[-1][1]["stop_reason"] == "tool_use"
    assert all(data.get("channel") != CHANNEL_REASONING for _, data in frames)
