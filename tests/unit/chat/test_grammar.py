"""Structured output grammars: golden text, what they accept and refuse, and clear errors."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmserve.chat.grammar import (
    GrammarError, gbnf_grammar, json_object_grammar, json_schema_grammar, json_value_grammar,
    regex_grammar, tool_call_grammar,
)
from lmserve.chat.grammar.check import validate_gbnf
from lmserve.chat.grammar.gbnf import literal
from lmserve.chat.grammar.primitives import int_range, number_range
from tests.unit.gbnf_matcher import GbnfMatcher

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "email": {"type": "string", "format": "email"},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 2},
        "role": {"anyOf": [{"const": "admin"}, {"type": "null"}]},
    },
    "required": ["name", "age"],
}

# (schema, documents it must accept, documents it must refuse)
CASES: list[tuple[dict, list, list]] = [
    (PERSON,
     [{"name": "Ann", "age": 30}, {"name": "B", "age": 0, "tags": ["a", "c"], "role": None},
      {"name": "C", "age": 130, "email": "c@x.org", "role": "admin"}],
     [{"name": "Ann"}, {"name": "Ann", "age": 131}, {"name": "", "age": 1},
      {"name": "A", "age": 1, "tags": ["a", "b", "c"]}, {"name": "A", "age": 1, "x": 1},
      {"age": 1, "name": "A"}]),
    ({"type": "array", "items": {"type": "number", "minimum": -1, "exclusiveMaximum": 1},
      "minItems": 1},
     [[0], [-1, 0.5, -0.25, 0.999]], [[], [1], [-1.5], [1.0]]),
    ({"$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer"},
                                                         "next": {"$ref": "#/$defs/node"}},
                         "required": ["v"]}},
      "$ref": "#/$defs/node"},
     [{"v": 1}, {"v": 1, "next": {"v": -2, "next": {"v": 3}}}], [{"next": {"v": 1}}]),
    ({"type": "object", "properties": {"when": {"type": "string", "format": "date-time"},
                                       "day": {"type": "string", "format": "date"},
                                       "id": {"type": "string", "format": "uuid"}},
      "required": ["when", "day", "id"]},
     [{"when": "2024-05-01T12:30:00Z", "day": "1999-12-31",
       "id": "123e4567-e89b-12d3-a456-426614174000"}],
     [{"when": "2024-05-01 12:30", "day": "1999-12-31", "id": "x"},
      {"when": "2024-05-01T12:30:00Z", "day": "1999-02-30",
       "id": "123e4567-e89b-12d3-a456-426614174000"}]),
    ({"type": ["string", "null"], "enum": ["x", None]}, ["x", None], ["y", 1]),
    ({"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}-\\d+$"},
                                       "note": {"type": "string", "pattern": "ok"}},
      "required": ["code", "note"]},
     [{"code": "AB-12", "note": "is ok!"}, {"code": "ZZ-0", "note": 'say "ok"'}],
     [{"code": "ab-12", "note": "ok"}, {"code": "AB-", "note": "ok"},
      {"code": "AB-1", "note": "nope"}]),
    ({"type": "array", "prefixItems": [{"type": "boolean"}, {"type": "string"}],
      "items": False, "minItems": 1},
     [[True], [False, "x"]], [[], ["x"], [True, "x", 1]]),
    ({"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                {"properties": {"b": {"type": "boolean"}}, "required": ["b"]}]},
     [{"a": 1, "b": True}], [{"a": 1}, {"b": True}]),
    ({"type": "object", "properties": {"a": {"type": "integer"}},
      "additionalProperties": {"type": "string"}},
     [{"a": 1}, {"a": 1, "x": "y"}, {}, {"x": "y", "z": "w"}], [{"a": 1, "x": 2}]),
    ({"type": "object"}, [{}, {"any": [1, {"x": None}]}], [[], "x"]),
    ({"oneOf": [{"type": "integer", "exclusiveMinimum": 10}, {"type": "boolean"}]},
     [11, 100, True], [10, 9.5, "x"]),
]


def accepts(grammar: str, document: object, indent: int | None = None) -> bool:
    return GbnfMatcher(grammar).matches(json.dumps(document, indent=indent))


@pytest.mark.parametrize("schema,good,bad", CASES)
def test_schema_grammar_accepts_valid_and_refuses_invalid(schema: dict, good: list,
                                                         bad: list) -> None:
    grammar = validate_gbnf(json_schema_grammar(schema))
    for document in good:
        jsonschema.validate(document, schema)
        assert accepts(grammar, document), document
        assert accepts(grammar, document, indent=2), document
    for document in bad:
        assert not accepts(grammar, document), document


def test_golden_json_object_grammar() -> None:
    assert json_object_grammar() == (
        'root ::= json-object\n'
        'json-object ::= "{" ws (json-member (ws "," ws json-member)* ws)? "}"\n'
        'ws ::= ([ \\t\\n] [ \\t]{0,15})?\n'
        'json-member ::= json-string ws ":" ws json-value\n'
        'json-string ::= "\\"" json-char* "\\""\n'
        'json-char ::= [^"\\\\\\x00-\\x1F] | "\\\\" (["\\\\/bfnrt] | "u" [0-9a-fA-F]{4})\n'
        'json-value ::= json-object | json-array | json-string | json-number | json-bool '
        '| json-null\n'
        'json-array ::= "[" ws (json-value (ws "," ws json-value)* ws)? "]"\n'
        'json-number ::= json-int ("." [0-9]{1,16})? ([eE] [-+]? [0-9]{1,3})?\n'
        'json-int ::= "-"? ("0" | [1-9] [0-9]{0,15})\n'
        'json-bool ::= "true" | "false"\n'
        'json-null ::= "null"\n')


def test_golden_small_schema_grammar() -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                               "n": {"type": "integer", "maximum": 9,
                                                     "minimum": 1}},
              "required": ["ok"]}
    assert json_schema_grammar(schema) == (
        'root ::= "{" ws (root-ok-kv root-rest) ws "}"\n'
        'ws ::= ([ \\t\\n] [ \\t]{0,15})?\n'
        'json-bool ::= "true" | "false"\n'
        'root-ok-kv ::= "\\"ok\\"" ws ":" ws json-bool\n'
        'root-n ::= [1-9]\n'
        'root-n-kv ::= "\\"n\\"" ws ":" ws root-n\n'
        'root-rest ::= (ws "," ws root-n-kv)?\n')


def test_json_value_and_object_grammars() -> None:
    value, obj = GbnfMatcher(json_value_grammar()), GbnfMatcher(json_object_grammar())
    for doc in ['{"a": [1, 2.5e3, true, null, "x\\n\\u00e9"]}', "[]", '"s"', "-0.5", "null"]:
        assert value.matches(doc)
        assert obj.matches(doc) == doc.startswith("{")
    assert not value.matches("{'a': 1}") and not value.matches("01") and not value.matches("[1,]")


@settings(max_examples=150, deadline=None)
@given(low=st.one_of(st.none(), st.integers(-1200, 1200)),
       span=st.one_of(st.none(), st.integers(0, 2500)),
       probe=st.integers(-3000, 3000))
def test_integer_ranges_are_exact(low: int | None, span: int | None, probe: int) -> None:
    high = None if span is None else (low or 0) + span
    matcher = GbnfMatcher(f"root ::= {int_range(low, high)}\n")
    inside = (low is None or probe >= low) and (high is None or probe <= high)
    assert matcher.matches(str(probe)) == inside
    assert not matcher.matches("0" + str(abs(probe)))  # no leading zeros


@settings(max_examples=150, deadline=None)
@given(low=st.one_of(st.none(), st.integers(-20, 20)), low_open=st.booleans(),
       span=st.one_of(st.none(), st.integers(0, 30)), high_open=st.booleans(),
       probe=st.decimals(-60, 60, places=3, allow_nan=False))
def test_number_ranges_never_admit_out_of_range(low: int | None, low_open: bool,
                                                span: int | None, high_open: bool,
                                                probe) -> None:
    high = None if span is None else (low or 0) + span
    try:
        expr = number_range(low, low_open, high, high_open)
    except GrammarError:
        assert low is not None and high is not None and low == high
        return
    text = format(probe, "f")
    inside = ((low is None or (probe > low if low_open else probe >= low))
              and (high is None or (probe < high if high_open else probe <= high)))
    if GbnfMatcher(f"root ::= {expr}\n").matches(text):
        assert inside, text
    elif inside and "." not in text.rstrip("0"):
        pytest.fail(f"{text} is in range but refused")


REGEX_CASES = [
    (r"^\d{3}-[A-Z]{2}(x|yz)*\.$", ["123-AB.", "000-ZZxyzx."], ["12-AB.", "123-ab.", "123-ABy."]),
    (r"(?:foo|ba[rz])+\s?\w{0,2}", ["foo", "barbaz x1", "foobar_"], ["fo", "bar  x", "bax"]),
    (r"[^a-c\n]+|(?P<n>\d)", ["xyz", "5", "d e"], ["abc", "x\ny", ""]),
    (r"a{2,}b{,2}c?\u00e9", ["aaé", "aaabbcé"], ["aé", "aabbbé"]),
    (r"\[\]\\\.\{x", ["[]\\.{x"], ["[]\\x{x"]),
]


@pytest.mark.parametrize("pattern,good,bad", REGEX_CASES)
def test_regex_grammar_matches_like_python(pattern: str, good: list[str], bad: list[str]) -> None:
    matcher = GbnfMatcher(validate_gbnf(regex_grammar(pattern)))
    for text in good + bad:
        assert matcher.matches(text) == bool(re.fullmatch(pattern.strip("^$"), text)), text
    assert all(matcher.matches(t) for t in good) and not any(matcher.matches(t) for t in bad)


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet="abxyz019-_. \n", max_size=8), which=st.integers(0, 3))
def test_regex_grammar_agrees_with_re_on_random_strings(text: str, which: int) -> None:
    pattern = [r"[a-c]+(x|y)?\d*", r"(ab|b)*z?", r"[^\s]{1,3}\.?", r"\w+(-\w+)*"][which]
    assert GbnfMatcher(regex_grammar(pattern)).matches(text) == bool(re.fullmatch(pattern, text))


@pytest.mark.parametrize("pattern,message", [
    (r"(a)\1", "backreferences"), (r"a(?=b)", "lookarounds"), (r"\bword", "word boundaries"),
    (r"a++", "possessive"), (r"a^b", "anchors"), (r"(?i)abc", "inline flags"),
    (r"[[:alpha:]]", "POSIX"), (r"(ab", "missing ')'"), (r"ab)", "unbalanced"),
])
def test_regex_refusals_are_clear(pattern: str, message: str) -> None:
    with pytest.raises(GrammarError, match=re.escape(message)):
        regex_grammar(pattern)


@pytest.mark.parametrize("schema,keyword", [
    ({"type": "string", "not": {"const": "x"}}, "not"),
    ({"type": "integer", "multipleOf": 3}, "multipleOf"),
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"type": "object", "patternProperties": {"^x": {}}}, "patternProperties"),
    ({"type": "number", "minimum": 0.5}, "0.5"),
    ({"$ref": "https://example.com/schema.json"}, "only local references"),
    ({"$ref": "#/$defs/missing"}, "points to nothing"),
    ({"type": "strin"}, "invalid JSON Schema"),
    ({"type": "string", "format": "date", "pattern": "x"}, "combining"),
])
def test_unsupported_schemas_are_refused_by_name(schema: dict, keyword: str) -> None:
    with pytest.raises(GrammarError, match=re.escape(keyword)):
        json_schema_grammar(schema)


def test_raw_gbnf_is_checked() -> None:
    good = 'root ::= "a" item+ # comment\nitem ::= [0-9] | "(" item ")"\n'
    assert gbnf_grammar(good) == good
    for bad, message in [("root ::= foo", "undefined rule 'foo'"),
                         ('item ::= "a"', "no 'root' rule"),
                         ('root ::= "a', "unexpected end"),
                         ("root ::= root \"a\"", "left-recursive"),
                         ('root ::= "a"\n  | "b"', "expected a rule name"),
                         ('root ::= "\\q"', "unknown escape"),
                         ('root ::= "a"{2', "expected '}'"),
                         ("root ::= *", "nothing to repeat")]:
        with pytest.raises(GrammarError, match=re.escape(message)):
            gbnf_grammar(bad)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather now",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"enum": ["c", "f"]}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"type": "string"}}}}}


def hermes_call(name: str, arguments: dict) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {json.dumps(arguments)}}}\n</tool_call>'


def test_tool_call_grammar_hermes() -> None:
    matcher = GbnfMatcher(validate_gbnf(tool_call_grammar([WEATHER, TIME])))
    one = hermes_call("get_weather", {"city": "Paris", "unit": "c"})
    assert matcher.matches(one)
    assert matcher.matches(one + "\n" + hermes_call("get_time", {}))
    # a newline after any call may end the output: ending stays reachable
    assert matcher.matches(one + "\n") and matcher.matches(one + "\n" + one + "\n")
    assert not matcher.matches(one + "\n\n")
    assert not matcher.matches(hermes_call("get_weather", {"unit": "c"}))  # city is required
    assert not matcher.matches(hermes_call("get_weather", {"city": "P", "unit": "k"}))
    assert not matcher.matches(hermes_call("rm_rf", {}))
    assert not matcher.matches("Sure! " + one)


def test_tool_call_grammar_named_and_single() -> None:
    named = GbnfMatcher(tool_call_grammar([WEATHER, TIME], function_name="get_time"))
    assert named.matches(hermes_call("get_time", {"tz": "UTC"}))
    assert not named.matches(hermes_call("get_weather", {"city": "x"}))
    assert not named.matches(hermes_call("get_time", {}) + "\n" + hermes_call("get_time", {}))
    single = GbnfMatcher(tool_call_grammar([WEATHER, TIME], parallel=False))
    assert not single.matches(hermes_call("get_time", {}) + "\n" + hermes_call("get_time", {}))
    with pytest.raises(GrammarError, match="not among the tools"):
        tool_call_grammar([WEATHER], function_name="nope")


NESTED = {"type": "function", "function": {"name": "plan", "parameters": {
    "type": "object", "properties": {"steps": {"type": "array", "items": {"type": "string"}},
                                     "extra": {}}, "required": ["steps"]}}}


def test_tool_call_arguments_are_written_as_tojson_writes_them() -> None:
    """Compact JSON only (json.dumps's spelling, which templates' tojson renders back), so the
    call the client returns is the text the model wrote, token for token."""
    matcher = GbnfMatcher(tool_call_grammar([WEATHER, NESTED]))
    for arguments in ({"city": "Paris", "unit": "c"}, {"city": "Paris"},
                      {"steps": ["a", "b"], "extra": {"k": [1, {"x": None}]}}, {"steps": []}):
        name = "plan" if "steps" in arguments else "get_weather"
        assert matcher.matches(hermes_call(name, arguments))
        for spaced in (json.dumps(arguments, indent=2), json.dumps(arguments).replace(": ", ":"),
                       "{ " + json.dumps(arguments)[1:]):
            text = hermes_call(name, {}).replace("{}", spaced, 1)
            assert not matcher.matches(text), text


def test_tool_call_grammar_json_format() -> None:
    grammar = tool_call_grammar([WEATHER, TIME], fmt="json", arguments_key="parameters")
    matcher = GbnfMatcher(grammar)
    assert matcher.matches('{"name": "get_weather", "parameters": {"city": "Oslo"}}; '
                           '{"name": "get_time", "parameters": {}}')
    assert not matcher.matches('{"name": "get_weather", "arguments": {"city": "Oslo"}}')


def test_literal_escaping_round_trips_through_the_checker() -> None:
    text = 'a"b\\c\nd\te\x01é'
    assert GbnfMatcher(validate_gbnf(f"root ::= {literal(text)}\n")).matches(text)
