"""CallGate: a turn's tool calls end where the model repeats one (or, with parallel calls off,
where a second one starts); the repeat and all after it never reach the client."""

from __future__ import annotations

import json

from lmserve.chat.callgate import CallGate
from lmserve.chat.parsing import parse_all
from lmserve.chat.tools import make_tool_parser
from lmserve.core.events import ToolCallStart


def call(name: str, arguments: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>\n'


PARIS = call("get_weather", '{"city": "Paris"}')


def gate(parallel: bool = True) -> CallGate:
    return CallGate(make_tool_parser("hermes"), parallel=parallel)


def test_a_repeated_call_ends_the_turn_streamed_or_whole() -> None:
    text = "On it. " + PARIS + call("get_weather", '{ "city":"Paris" }') + "<tool_call>\n{"
    for chunks in ([text], list(text)):
        g = gate()
        turn = parse_all(g, chunks)
        assert g.done and turn.content == "On it."
        assert [(c.name, json.loads(c.arguments), c.complete) for c in turn.tool_calls] == [
            ("get_weather", {"city": "Paris"}, True)]


def test_distinct_calls_all_pass_and_the_turn_goes_on() -> None:
    text = PARIS + call("get_time", '{"city": "Paris"}') + call("get_weather", '{"city": "Oslo"}')
    for chunks in ([text], list(text)):
        g = gate()
        turn = parse_all(g, chunks)
        assert not g.done
        assert [(c.name, json.loads(c.arguments)) for c in turn.tool_calls] == [
            ("get_weather", {"city": "Paris"}), ("get_time", {"city": "Paris"}),
            ("get_weather", {"city": "Oslo"})]


def test_a_call_of_a_function_already_called_waits_until_it_is_complete() -> None:
    g = gate()
    events = [e for ch in PARIS + call("get_weather", '{"city": "Oslo"}')[:-20] for e in g.feed(ch)]
    assert [e.name for e in events if isinstance(e, ToolCallStart)] == ["get_weather"]
    rest = [e for ch in '"Oslo"}}\n</tool_call>\n' for e in g.feed(ch)]
    assert [e.name for e in rest if isinstance(e, ToolCallStart)] == ["get_weather"]


def test_a_held_call_the_output_ends_inside_comes_out_incomplete() -> None:
    turn = parse_all(gate(), PARIS + '<tool_call>\n{"name": "get_weather", "arguments": {"ci')
    assert [(c.name, c.complete) for c in turn.tool_calls] == [("get_weather", True),
                                                              ("get_weather", False)]


def test_without_parallel_calls_the_turn_ends_at_a_second_call() -> None:
    g = gate(parallel=False)
    turn = parse_all(g, list(PARIS + call("get_time", "{}") + "more"))
    assert g.done and [c.name for c in turn.tool_calls] == ["get_weather"]
