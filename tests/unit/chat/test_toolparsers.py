"""Streaming tool-call parsers: recorded outputs of each family, split at every boundary."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmserve.chat.parsing import make_chat_parser, parse_all
from lmserve.chat.templates import CHATML_TEMPLATE, ChatTemplate
from lmserve.chat.tools import (
    FALLBACK_TOOL_FORMAT, apply_fallback_tool_prompt, render_tool_instructions,
)
from lmserve.chat.toolparsers import canonical_tool_format, make_tool_parser
from lmserve.chat.toolparsers.detect import detect_tool_format
from lmserve.core.events import (
    ChatEvent, TextDelta, ToolCallDelta, ToolCallEnd, ToolCallStart,
)
from lmserve.core.request import ChatMessage

# (format, model output, expected content, expected [(name, arguments object)])
CASES: list[tuple[str, str, str, list[tuple[str, dict]]]] = [
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": '
               '{"city": "Paris", "unit": "c"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", '
               '"arguments": {"tz": "CET"}}\n</tool_call>',
     "Let me check.", [("get_weather", {"city": "Paris", "unit": "c"}),
                       ("get_time", {"tz": "CET"})]),
    ("hermes", '<tool_call>{"arguments": {"q": "a \\"quoted\\" }"}, "name": "search"}</tool_call>',
     "", [("search", {"q": 'a "quoted" }'})]),
    ("hermes", '<tool_call>\n{"name": "noargs"}\n</tool_call>', "", [("noargs", {})]),
    ("hermes", '<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>', "",
     [("f", {"x": 1})]),
    ("hermes", "No tools needed: 2 < 3 and <tool is a word.", "No tools needed: 2 < 3 and "
     "<tool is a word.", []),
    ("hermes", "<tool_call>I am not JSON</tool_call> ok", "<tool_call>I am not JSON</tool_call> ok",
     []),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Oslo", "days": [1, 2]}}',
     "", [("get_weather", {"city": "Oslo", "days": [1, 2]})]),
    ("llama3_json", '{"type": "function", "name": "a", "parameters": {"n": -1.5e2}}; '
                    '{"name": "b", "parameters": {}}',
     "", [("a", {"n": -150.0}), ("b", {})]),
    ("llama3_json", '{"answer": 42, "name": "x"}', '{"answer": 42, "name": "x"}', []),
    ("llama3_json", "Paris is the capital.", "Paris is the capital.", []),
    ("llama3_json", '{"name": "Alice", "age": 3}', '{"name": "Alice", "age": 3}', []),
    ("llama3_json", '{"name": "Bob"}', '{"name": "Bob"}', []),
    ("llama3_json", '<|python_tag|>{"name": "calc", "parameters": {"expr": "1+1"}}', "",
     [("calc", {"expr": "1+1"})]),
    ("llama3_json", '<|python_tag|>brave_search.call(query="llama")', "",
     [("brave_search", {"query": "llama"})]),
    ("mistral", '[TOOL_CALLS] [{"name": "f", "arguments": {"a": 1}}, {"name": "g", '
                '"arguments": {"b": "x"}}]',
     "", [("f", {"a": 1}), ("g", {"b": "x"})]),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Rome"}[TOOL_CALLS]get_time[ARGS]{}',
     "", [("get_weather", {"city": "Rome"}), ("get_time", {})]),
    ("mistral", 'Sure.[TOOL_CALLS]f[CALL_ID]a1b2c3d4e[ARGS]{"k": [true, null]}', "Sure.",
     [("f", {"k": [True, None]})]),
    ("pythonic", '[get_weather(city="San Francisco", unit=\'f\'), stocks.price(sym="GOOG", '
                 'n=3, opts={"live": true})]',
     "", [("get_weather", {"city": "San Francisco", "unit": "f"}),
          ("stocks.price", {"sym": "GOOG", "n": 3, "opts": {"live": True}})]),
    ("pythonic", "[Note] markdown, not a call.", "[Note] markdown, not a call.", []),
    ("pythonic", '<|python_start|>[f(x=1)]<|python_end|>', "", [("f", {"x": 1})]),
    ("gemma", "<start_function_call>call:get_current_weather{location:<escape>Tokyo, Japan"
              "<escape>,days:3,metric:true}<end_function_call>",
     "", [("get_current_weather", {"location": "Tokyo, Japan", "days": 3, "metric": True})]),
    ("gemma", "<start_function_call>call:a{}<end_function_call><start_function_call>call:b"
              "{l:[<escape>x<escape>,2]}<end_function_call>",
     "", [("a", {}), ("b", {"l": ["x", 2]})]),
    ("tool_code", 'I will look.\n```tool_code\nprint(lookup(term="gemma"))\n```\n',
     "I will look.", [("lookup", {"term": "gemma"})]),
    ("tool_code", "```tool_code\nimport os\n```", "```tool_code\nimport os\n```", []),
]

HARMONY = (
    "<|channel|>analysis<|message|>User wants weather. <tool_call>{\"name\": \"x\"}</tool_call>"
    "<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
    '<|message|>{"city": "Paris"}<|call|>'
)


def normalize(events: list[ChatEvent]) -> list[tuple]:
    """Merge adjacent text of a channel and adjacent fragments of a call; drop random ids."""
    out: list[tuple] = []
    for event in events:
        if isinstance(event, TextDelta):
            if out and out[-1][0] == "text" and out[-1][1] == event.channel:
                out[-1] = ("text", event.channel, out[-1][2] + event.text)
            elif event.text:
                out.append(("text", event.channel, event.text))
        elif isinstance(event, ToolCallDelta):
            if out and out[-1][0] == "delta" and out[-1][1] == event.index:
                out[-1] = ("delta", event.index, out[-1][2] + event.arguments)
            else:
                out.append(("delta", event.index, event.arguments))
        elif isinstance(event, ToolCallStart):
            out.append(("start", event.index, event.name))
        else:
            out.append(("end", event.index, event.arguments, event.complete))
    return out


def run(fmt: str, chunks: list[str]) -> list[ChatEvent]:
    parser = make_tool_parser(fmt)
    events: list[ChatEvent] = []
    for chunk in chunks:
        events += parser.feed(chunk)
    return events + parser.finish()


def check_call_invariants(events: list[ChatEvent]) -> None:
    started: dict[int, str] = {}
    streamed: dict[int, str] = {}
    ended: set[int] = set()
    for event in events:
        if isinstance(event, ToolCallStart):
            assert event.index == len(started), "calls are numbered 0, 1, 2, ... in order"
            assert event.id.startswith("call_") and event.name
            started[event.index] = event.id
            streamed[event.index] = ""
        elif isinstance(event, ToolCallDelta):
            assert event.index in started and event.index not in ended
            streamed[event.index] += event.arguments
        elif isinstance(event, ToolCallEnd):
            assert event.arguments == streamed[event.index]
            ended.add(event.index)
    assert ended == set(started), "every started call ends"


@pytest.mark.parametrize("fmt,text,content,calls", CASES)
def test_recorded_output_whole(fmt: str, text: str, content: str, calls: list) -> None:
    events = run(fmt, [text])
    check_call_invariants(events)
    turn = parse_all(make_tool_parser(fmt), text)
    assert turn.content == content
    assert [(c.name, json.loads(c.arguments)) for c in turn.tool_calls] == calls
    assert all(c.complete for c in turn.tool_calls)
    for event in events:  # a call that arrives in one chunk still streams start + arguments
        if isinstance(event, ToolCallStart):
            assert any(isinstance(e, ToolCallDelta) and e.index == event.index for e in events)


@pytest.mark.parametrize("fmt,text,content,calls", CASES)
def test_every_split_point_gives_the_same_events(fmt: str, text: str, content: str,
                                                 calls: list) -> None:
    expected = normalize(run(fmt, [text]))
    for cut in range(1, len(text)):
        events = run(fmt, [text[:cut], text[cut:]])
        check_call_invariants(events)
        assert normalize(events) == expected, f"split at {cut}: {text[:cut]!r}|{text[cut:]!r}"
    assert normalize(run(fmt, list(text))) == expected


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_chunking_gives_the_same_events(data: st.DataObject) -> None:
    fmt, text, _, _ = data.draw(st.sampled_from(CASES))
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(text) - 1)), max_size=12)))
    chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    events = run(fmt, chunks)
    check_call_invariants(events)
    assert normalize(events) == normalize(run(fmt, [text]))


def test_arguments_stream_as_they_arrive() -> None:
    parser = make_tool_parser("hermes")
    first = parser.feed('<tool_call>{"name": "f", "arguments": {"text": "hel')
    assert [type(e) for e in first] == [ToolCallStart, ToolCallDelta]
    assert first[1] == ToolCallDelta(0, '{"text": "hel')
    assert parser.feed('lo"}') == [ToolCallDelta(0, 'lo"}'), ToolCallEnd(0, '{"text": "hello"}')]
    assert parser.feed("}</tool_call>") == []
    assert parser.finish() == []


def test_truncated_call_ends_incomplete_with_what_was_streamed() -> None:
    events = run("hermes", ['<tool_call>{"name": "f", "arguments": {"a": "par'])
    check_call_invariants(events)
    assert events[-1] == ToolCallEnd(0, '{"a": "par', complete=False)


def test_malformed_arguments_end_the_call_and_keep_the_rest_as_text() -> None:
    events = run("hermes", ['<tool_call>{"name": "f", "arguments": {"a": oops}}</tool_call>'])
    check_call_invariants(events)
    assert normalize(events) == [("start", 0, "f"), ("delta", 0, '{"a": '),
                                 ("end", 0, '{"a": ', False),
                                 ("text", "output", "oops}}</tool_call>")]


def test_arguments_that_are_not_an_object_are_kept_but_flagged() -> None:
    turn = parse_all(make_tool_parser("hermes"),
                     '<tool_call>{"name": "f", "arguments": "just text"}</tool_call>')
    assert [(c.name, c.arguments, c.complete) for c in turn.tool_calls] == [
        ("f", "just text", False)]
    turn = parse_all(make_tool_parser("hermes"),
                     '<tool_call>{"arguments": [1, 2], "name": "g"}</tool_call>')
    assert [(c.name, c.arguments, c.complete) for c in turn.tool_calls] == [
        ("g", "[1, 2]", False)]


def test_a_marker_the_output_ends_in_is_a_cut_call_never_text() -> None:
    """Output cut off (max_tokens) on a marker or inside what it opened: no call was made,
    and the marker never reaches the content, streamed or whole."""
    for fmt, text in [("hermes", "<tool_call>"), ("hermes", "<tool_call>\n"), ("hermes", "<tool"),
                      ("mistral", "[TOOL_CALLS]"), ("mistral", "[TOOL_"),
                      ("hermes", '<tool_call>\n{"nam'), ("llama3_json", "<|python_tag|>{")]:
        for chunks in (["Sure. " + text], list("Sure. " + text)):
            turn = parse_all(make_tool_parser(fmt), chunks)
            assert (turn.content, turn.tool_calls) == ("Sure.", []), (fmt, text)


def test_text_is_never_lost_when_a_marker_leads_nowhere() -> None:
    for fmt, text in [("hermes", "<tool_call> is the tag. "), ("pythonic", "[f(x="),
                      ("llama3_json", '{"answer": 4'), ("hermes", "a < b")]:
        assert parse_all(make_tool_parser(fmt), text).content == text
        assert parse_all(make_tool_parser(fmt), list(text)).content == text


def test_harmony_reasoning_calls_and_final_answer() -> None:
    turn = parse_all(make_tool_parser("harmony"), HARMONY)
    assert turn.reasoning == 'User wants weather. <tool_call>{"name": "x"}</tool_call>'
    assert [(c.name, json.loads(c.arguments)) for c in turn.tool_calls] == [
        ("get_weather", {"city": "Paris"})]
    final = "<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>final" \
            "<|message|>Answer.<|return|>"
    turn = parse_all(make_tool_parser("harmony"), final)
    assert (turn.reasoning, turn.content, turn.tool_calls) == ("Think.", "Answer.", [])


def test_harmony_split_anywhere() -> None:
    expected = normalize(run("harmony", [HARMONY]))
    for cut in range(1, len(HARMONY)):
        assert normalize(run("harmony", [HARMONY[:cut], HARMONY[cut:]])) == expected


def test_harmony_recipient_before_channel_and_truncated_call() -> None:
    text = '<|start|>assistant to=functions.lookup<|channel|>commentary json<|message|>{"q": "x'
    events = run("harmony", [text])
    check_call_invariants(events)
    assert normalize(events)[0] == ("start", 0, "lookup")
    assert events[-1] == ToolCallEnd(0, '{"q": "x', complete=False)


# --- the reasoning + tools pipeline ---------------------------------------------------------


def test_calls_inside_reasoning_are_not_executed() -> None:
    text = ('<think>Maybe <tool_call>{"name": "rm", "arguments": {}}</tool_call>?</think>'
            'Here.<tool_call>{"name": "ls", "arguments": {}}</tool_call>')
    parser = make_chat_parser(tool_format="hermes", reasoning_tags=("<think>", "</think>"))
    turn = parse_all(parser, list(text))
    assert turn.reasoning == 'Maybe <tool_call>{"name": "rm", "arguments": {}}</tool_call>?'
    assert turn.content == "Here."
    assert [c.name for c in turn.tool_calls] == ["ls"]


def test_pipeline_with_template_opened_reasoning() -> None:
    parser = make_chat_parser(tool_format="hermes", reasoning_tags=("<think>", "</think>"),
                              starts_in_reasoning=True)
    turn = parse_all(parser, ["\nPlan it.\n</thi", "nk>\n\n", '<tool_call>{"name": "go"}',
                              "</tool_call>"])
    assert (turn.reasoning, turn.content) == ("Plan it.", "")
    assert [(c.name, c.arguments) for c in turn.tool_calls] == [("go", "{}")]


def test_pipeline_harmony_and_no_tools() -> None:
    assert isinstance(make_chat_parser(tool_format="gpt-oss").feed(""), list)
    parser = make_chat_parser(reasoning_tags=("<think>", "</think>"))
    turn = parse_all(parser, '<think>x</think><tool_call>{"name": "f"}</tool_call>')
    assert turn.content == '<tool_call>{"name": "f"}</tool_call>' and not turn.tool_calls


# --- format detection -----------------------------------------------------------------------


@pytest.mark.parametrize("template,expected", [
    ("{% for tool in tools %}<tool_call>{{ tool }}</tool_call>{% endfor %}", "hermes"),
    ("{{ '<|python_tag|>' }}{{ tools }}", "llama3_json"),
    ("[AVAILABLE_TOOLS]{{ tools }}[/AVAILABLE_TOOLS][TOOL_CALLS]", "mistral"),
    ("<|start|>assistant<|channel|>commentary to=functions.{{ name }}", "harmony"),
    ("<start_function_declaration>{{ tools }}<start_function_call>", "gemma"),
    ("[func_name1(params_name1=params_value1...)]{{ tools }}", "pythonic"),
    ("```tool_code\n{{ tools }}", "tool_code"),
    ("<|im_start|>{{ message.content }}<|im_end|>", None),
    ("<tool_call>\n<function={{ name }}>", None),
])
def test_detect_tool_format_from_template(template: str, expected: str | None) -> None:
    assert detect_tool_format(template, {}) == expected


def test_detect_tool_format_override_and_metadata() -> None:
    assert detect_tool_format("<tool_call>", {}, override="mistral") == "mistral"
    assert detect_tool_format("<tool_call>", {}, override="none") is None
    assert detect_tool_format(None, {"general.architecture": "gpt-oss"}) == "harmony"
    meta = {"tokenizer.chat_template.tool_use": "<tool_call>{{ tools }}"}
    assert detect_tool_format("plain", meta) == "hermes"
    with pytest.raises(ValueError, match="unknown tool-call format"):
        detect_tool_format(None, {}, override="klingon")
    assert canonical_tool_format("Qwen") == "hermes"


# --- the fallback prompt for templates without tool support --------------------------------

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}},
    {"name": "get_time", "parameters": {"type": "object", "properties": {}}}]
HISTORY = [
    ChatMessage("system", "Be brief."),
    ChatMessage("user", "Weather in Paris and the time?"),
    ChatMessage("assistant", None, extra={"tool_calls": [
        {"id": "call_a", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": {}}},
    ]}),
    ChatMessage("tool", "18C, sunny", extra={"tool_call_id": "call_a"}),
    ChatMessage("tool", "12:00", extra={"tool_call_id": "call_b"}),
    ChatMessage("user", "Thanks! And tomorrow?"),
]


def test_fallback_prompt_puts_tools_in_the_system_message() -> None:
    messages = apply_fallback_tool_prompt(HISTORY, TOOLS)
    assert [m.role for m in messages] == ["system", "user", "assistant", "user"]
    system = messages[0].content or ""
    assert system.startswith("Be brief.\n\n# Tools")
    lines = system.split("<tools>\n")[1].split("\n</tools>")[0].splitlines()
    assert [json.loads(line)["name"] for line in lines] == ["get_weather", "get_time"]
    assert json.loads(lines[0])["parameters"]["required"] == ["city"]
    assert "<tool_call>" in system and "must call" not in system


def test_fallback_prompt_renders_calls_and_results_as_text() -> None:
    messages = apply_fallback_tool_prompt(HISTORY, TOOLS)
    assistant, results = messages[2], messages[3]
    assert "tool_calls" not in assistant.extra
    turn = parse_all(make_tool_parser(FALLBACK_TOOL_FORMAT), assistant.content or "")
    assert [(c.name, json.loads(c.arguments)) for c in turn.tool_calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert results.content == (
        '<tool_response name="get_weather" id="call_a">\n18C, sunny\n</tool_response>\n\n'
        '<tool_response name="get_time" id="call_b">\n12:00\n</tool_response>\n\n'
        "Thanks! And tomorrow?")
    rendered = ChatTemplate(CHATML_TEMPLATE).render([m.as_template_dict() for m in messages])
    assert rendered.count("<|im_start|>user") == 2


def test_fallback_prompt_choices_and_no_system_role() -> None:
    forced = apply_fallback_tool_prompt(HISTORY[1:2], TOOLS, function_name="get_time",
                                        parallel=False)
    assert forced[0].role == "system"
    assert "You must call the function get_time" in (forced[0].content or "")
    assert "at most one function" in (forced[0].content or "")
    required = render_tool_instructions(TOOLS, tool_choice="required")
    assert required.endswith("You must call at least one function now.")
    inline = apply_fallback_tool_prompt(HISTORY[1:2], TOOLS, system_role=False)
    assert [m.role for m in inline] == ["user"]
    assert (inline[0].content or "").endswith("\n\nWeather in Paris and the time?")
    none = apply_fallback_tool_prompt(HISTORY, TOOLS, tool_choice="none")
    assert none[0].content == "Be brief." and "<tool_call>" in (none[2].content or "")
