"""Response parsing by schema (lmserve.chat.response_schema): the Hugging Face x-regex
extensions over fixed texts, streamed in pieces split anywhere, and the start-up checks."""

from __future__ import annotations

import json

import pytest

from lmserve import config
from lmserve.chat.callgate import CallGate
from lmserve.chat.parsing import parse_all
from lmserve.chat.response_schema import (
    ResponseSchemaError,
    SchemaMismatch,
    SchemaParser,
    load_response_schema,
    schema_turn_parser,
)
from lmserve.core.events import CHANNEL_OUTPUT, TextDelta

# A think-tag format: reasoning in <think>...</think> (possibly still open), then the answer.
THINK = {"type": "object", "properties": {
    "role": {"const": "assistant"},
    "reasoning_content": {"type": "string",
                          "x-regex": r"^\s*<think>\s*(.*?)\s*(?:</think>|$)"},
    "content": {"type": "string", "x-regex": r"^(?:\s*<think>.*?(?:</think>|$))?\s*(.*?)\s*$"}}}
# Hugging Face's SmolLM3 style: one regex with named groups; the think block is optional.
SMOL3 = {"x-regex": r"(?:<think>\n?(?P<thinking>.+?)\n?</think>)?\s*(?P<content>.+?)?\s*"
                    r"(?:<\|im_end\|>|$)",
         "type": "object", "properties": {"role": {"const": "assistant"},
                                          "content": {"type": "string"},
                                          "thinking": {"type": "string"}}}
# SmolLM2's fallback tool format (lmserve.chat.tool_prompt): <tool_call>{json}</tool_call>.
HERMES = {"type": "object", "properties": {
    "content": {"type": "string", "x-regex": r"^\s*(.*?)\s*(?:<tool_call>|$)"},
    "tool_calls": {"type": "array", "x-regex-iterator": r"<tool_call>\s*(.+?)\s*</tool_call>",
                   "items": {"type": "object", "properties": {
                       "type": {"const": "function"},
                       "function": {"type": "object", "x-parser": "json", "properties": {
                           "name": {"type": "string"},
                           "arguments": {"type": "object"}}}}}}}}
# XML calls with arbitrary parameter names (Qwen3-Coder style).
XML = {"type": "object", "properties": {
    "content": {"type": "string", "x-regex": r"^(.*?)\s*(?:<tool_call>|$)"},
    "tool_calls": {"type": "array", "x-regex-iterator": r"<tool_call>\s*(.+?)\s*</tool_call>",
                   "items": {"type": "object", "properties": {
                       "type": {"const": "function"},
                       "function": {"type": "object", "properties": {
                           "name": {"type": "string", "x-regex": r"<function=([^\n>]+)>"},
                           "arguments": {
                               "type": "object",
                               "x-regex-key-value":
                                   r"<parameter=(?P<key>[^>\n]+)>\n(?P<value>.*?)\n</parameter>",
                               "default": {},
                               "additionalProperties": {
                                   "x-parser": "json",
                                   "x-parser-args": {"allow_non_json": True}}}}}}}}}}

THOUGHT = "<think>\nThe user greets me. I greet back.\n</think>\n\nHello! How can I help?"
CALLS = ('Let me look. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
         '</tool_call>\n<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call>')


def pieces(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


def run(schema: dict, text: str, size: int, **kw) -> tuple:
    parser = SchemaParser(load_response_schema(schema), **kw)
    turn = parse_all(parser, pieces(text, size))
    return turn.reasoning, turn.content, [(c.name, json.loads(c.arguments), c.complete)
                                          for c in turn.tool_calls]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_think_tags_split_reasoning_and_answer_in_any_pieces(size):
    assert run(THINK, THOUGHT, size) == ("The user greets me. I greet back.",
                                         "Hello! How can I help?", [])


def test_think_block_streams_while_open_and_the_answer_waits():
    parser = SchemaParser(load_response_schema(THINK))
    events = parser.feed("<think>\nfirst thought") + parser.feed(" goes on")
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "first thought goes on"
    assert all(e.channel == "reasoning" for e in events)
    assert parser.feed(" </thi") == []  # a space, then maybe the closing tag: held
    events = parser.feed("nk>\nAnswer")
    assert [(e.channel, e.text) for e in events] == [("output", "Answer")]


def test_prefix_the_prompt_opened_counts_as_written():
    # The template ended the prompt with <think>: the output starts inside the block.
    assert run(THINK, "still thinking</think>Done.", 4, prefix="<think>") == \
        ("still thinking", "Done.", [])
    parser = schema_turn_parser(load_response_schema(THINK), None, ("<think>", "</think>"),
                                "<|im_start|>assistant\n<think>\n")
    turn = parse_all(parser, ["a thought", "</think>", "the answer"])
    assert (turn.reasoning, turn.content) == ("a thought", "the answer")


@pytest.mark.parametrize("size", [1, 5, 1000])
def test_named_groups_at_the_root_hold_until_the_block_closes(size):
    parser = SchemaParser(load_response_schema(SMOL3))
    first = parser.feed("<think>\nhmm")
    assert first == []  # open think with an optional block: undecided, nothing sent
    assert run(SMOL3, THOUGHT + "<|im_end|>", size) == \
        ("The user greets me. I greet back.", "Hello! How can I help?", [])


@pytest.mark.parametrize("size", [1, 3, 1000])
def test_fallback_tool_format_gives_calls_and_keeps_markers_out_of_content(size):
    reasoning, content, calls = run(HERMES, CALLS, size)
    assert content == "Let me look."
    assert calls == [("get_weather", {"city": "Paris"}, True), ("get_time", {"zone": "CET"}, True)]


def test_a_call_is_sent_whole_once_complete_and_text_after_a_possible_marker_is_held():
    parser = SchemaParser(load_response_schema(HERMES))
    assert [e.text for e in parser.feed("Sure <tool")] == ["Sure"]  # "<tool" may be a marker
    assert parser.feed('_call>{"name": "f", "arguments": {"a": 1}}') == []
    start, delta, end = parser.feed("</tool_call>")
    assert (start.name, delta.arguments, end.arguments, end.complete) == \
        ("f", '{"a": 1}', '{"a": 1}', True)
    assert parser.finish() == []


def test_key_value_arguments_and_non_json_values():
    text = ("Checking.\n<tool_call>\n<function=search>\n<parameter=query>\nbest pizza\n"
            "</parameter>\n<parameter=limit>\n3\n</parameter>\n</function>\n</tool_call>")
    assert run(XML, text, 2) == \
        ("", "Checking.", [("search", {"query": "best pizza", "limit": 3}, True)])


def test_json_transform_and_typed_leaves():
    schema = {"type": "object", "x-parser": "json",
              "x-parser-args": {"transform": "{content: answer, reasoning_content: why}"},
              "properties": {"content": {"type": "string"},
                             "reasoning_content": {"type": "string"}}}
    parsed = load_response_schema(schema).message('{"why": "because", "answer": "yes"}')
    assert (parsed.reasoning, parsed.content) == ("because", "yes")
    typed = load_response_schema({"type": "object", "x-regex": r"n=(?P<n>\d+) ok=(?P<ok>\w+)",
                                  "properties": {"content": {"type": "string"},
                                                 "n": {"type": "integer"},
                                                 "ok": {"type": "boolean"}}})
    assert typed.parse("n=42 ok=true") == {"n": 42, "ok": True}
    subs = load_response_schema({"type": "object", "properties": {"content": {
        "type": "string", "x-regex-substitutions": [[r"\[(\w+)\]", r"<\1>"]]}}})
    assert subs.message("a [b] c").content == "a <b> c"


def test_required_fields_and_bad_json_are_mismatches():
    strict = {**HERMES, "required": ["tool_calls"]}
    with pytest.raises(SchemaMismatch):
        load_response_schema(strict).message("no call here")
    with pytest.raises(SchemaMismatch):
        load_response_schema(HERMES).message("<tool_call>{not json}</tool_call>")


def test_an_output_the_schema_cannot_parse_comes_out_as_content():
    text = "<tool_call>{not json}</tool_call>"
    assert run(HERMES, text, 1000) == ("", text, [])


def test_calls_are_dropped_when_no_tools_were_offered_and_gated_when_they_were():
    schema = load_response_schema(HERMES)
    assert run(HERMES, CALLS, 4, tools=False) == ("", "Let me look.", [])
    gated = schema_turn_parser(schema, "hermes", None, None, parallel=False)
    assert isinstance(gated, CallGate)
    turn = parse_all(gated, pieces(CALLS, 5))
    assert [c.name for c in turn.tool_calls] == ["get_weather"] and gated.done


def test_plain_text_streams_at_once():
    parser = SchemaParser(load_response_schema(HERMES))
    assert parser.feed("Hello") == [TextDelta(CHANNEL_OUTPUT, "Hello")]


@pytest.mark.parametrize("schema, message", [
    ({"type": "object", "properties": {"content": {"x-regex": "(open"}}},
     "properties.content.x-regex: bad regex"),
    ({"type": "object", "properties": {"content": {"x-regex": "(a)(b)"}}},
     "exactly one group"),
    ({"type": "object", "properties": {"tool_calls": {"type": "object",
                                                      "x-regex-iterator": "(a)"}}},
     "x-regex-iterator needs type array"),
    ({"type": "object", "properties": {"tool_calls": {"type": "array", "items": {
        "type": "object", "x-regex-key-value": "(?P<k>a)"}}}}, "named groups key and value"),
    ({"type": "object", "properties": {"content": {"x-regexp": "(a)"}}}, "unknown parsing key"),
    ({"type": "object", "properties": {"content": {"x-parser": "yaml"}}}, "not one of json"),
    ({"type": "object", "properties": {"content": {"x-parser": "json",
                                                   "x-parser-args": {"transform": "a[[["}}}},
     "transform"),
    ({"type": "object", "properties": {"content": {"type": "text"}}}, "'text' is not one of"),
    ({"type": "object", "properties": {"content": {"required": "x"}}}, "not a valid JSON Schema"),
    ({"type": "object", "properties": {"answer": {"type": "string"}}}, "parses none of"),
    ({"type": "array", "items": {}}, "root must be an object"),
])
def test_bad_schemas_are_refused_naming_the_place(schema, message):
    with pytest.raises(ResponseSchemaError, match="response_schema") as info:
        load_response_schema(schema)
    assert message in str(info.value)


def test_config_takes_a_file_inline_json_or_a_table_and_refuses_bad_ones(tmp_path):
    path = tmp_path / "think.json"
    path.write_text(json.dumps(THINK))
    for value in (str(path), json.dumps(THINK)):
        cfg = config.build({"response_schema": value})
        assert json.loads(cfg.engine.response_schema) == THINK
    toml = tmp_path / "lmserve.toml"
    toml.write_text('[models.think]\nmodel = "smollm2"\nresponse_schema = { type = "object", '
                    'properties = { content = { type = "string", x-regex = "^(.*)$" } } }\n')
    (section, settings), = config.build(config.load_file(str(toml))).model_sections
    assert json.loads(settings.response_schema)["properties"]["content"]["x-regex"] == "^(.*)$"
    with pytest.raises(ValueError, match=r"response_schema: \$\.properties\.content\.x-regex"):
        config.build({"response_schema": {"type": "object",
                                          "properties": {"content": {"x-regex": "("}}}})
    with pytest.raises(ValueError, match="response_schema: cannot read"):
        config.build({"response_schema": str(tmp_path / "missing.json")})
    toml.write_text('[models.think]\nmodel = "smollm2"\nresponse_schema = "{"\n')
    with pytest.raises(ValueError, match="models.think: response_schema: not JSON"):
        config.build(config.load_file(str(toml)))
