"""Forced tool calls in the model's own format (Mistral, pythonic, Gemma, harmony): the grammar
admits the family's own call syntax and nothing else, its parser reads every call the grammar
admits back with arguments valid against the schema, and plan_turn picks the family's grammar
from a template of that family."""

from __future__ import annotations

import json

import jsonschema
import pytest

from lmserve.chat.grammar import GrammarError, tool_call_grammar
from lmserve.chat.grammar.calls import gemma_text
from lmserve.chat.grammar.check import validate_gbnf
from lmserve.chat.parsing import parse_all
from lmserve.chat.templates import ChatTemplate
from lmserve.chat.tools import make_tool_parser
from lmserve.chat.turn import CallGate, grammar_format, plan_turn, turn_parser
from lmserve.core.request import ChatMessage, GenerationRequest, NamedTool, ToolSpec
from tests.unit.gbnf_matcher import GbnfMatcher

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer", "minimum": 1, "maximum": 7},
    "unit": {"enum": ["c", "f"]}}, "required": ["city"]}
NESTED = {"type": "object", "properties": {
    "where": {"type": "object", "properties": {"lat": {"type": "number"},
                                               "tags": {"type": "array",
                                                        "items": {"type": "string"}}},
              "required": ["lat"]},
    "exact": {"type": "boolean"}}, "required": ["where", "exact"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "locate", "parameters": NESTED}},
         {"type": "function", "function": {"name": "ping", "parameters": {"type": "object"}}}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
CALLS = [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Oslo", "days": 3,
                                                              "unit": "f"}),
         ("locate", {"where": {"lat": -1.5, "tags": ["a b", "c"]}, "exact": True}),
         ("ping", {})]


def pythonic(name: str, args: dict) -> str:
    return name + "(" + ", ".join(f"{k}={json.dumps(v)}" for k, v in args.items()) + ")"


def gemma(name: str, args: dict) -> str:
    return f"<start_function_call>call:{name}{gemma_text(args)}<end_function_call>"


def harmony(name: str, args: dict) -> str:
    return (f"<|channel|>commentary to=functions.{name} <|constrain|>json<|message|>"
            f"{json.dumps(args)}")


# fmt -> (parser, how one call is written, how calls are joined into one output)
FAMILIES = {
    "mistral": ("mistral", lambda n, a: json.dumps({"name": n, "arguments": a}),
                lambda calls: "[TOOL_CALLS][" + ", ".join(calls) + "]"),
    "mistral_args": ("mistral", lambda n, a: f"[TOOL_CALLS]{n}[ARGS]{json.dumps(a)}", "".join),
    "pythonic": ("pythonic", pythonic, lambda calls: "[" + ", ".join(calls) + "]"),
    "gemma": ("gemma", gemma, "".join),
    "harmony": ("harmony", harmony, "".join),
}


def output(fmt: str, calls: list[tuple[str, dict]]) -> str:
    _, write, join = FAMILIES[fmt]
    return join([write(name, args) for name, args in calls])


def read_back(fmt: str, text: str, chunks: bool = False) -> list[tuple[str, dict]]:
    turn = parse_all(make_tool_parser(FAMILIES[fmt][0]), list(text) if chunks else text)
    assert not turn.content.strip(), turn.content
    calls = []
    for call in turn.tool_calls:
        assert call.complete
        arguments = json.loads(call.arguments)
        jsonschema.validate(arguments, SCHEMAS[call.name])
        calls.append((call.name, arguments))
    return calls


@pytest.mark.parametrize("fmt", FAMILIES)
def test_each_call_is_admitted_and_read_back(fmt: str) -> None:
    matcher = GbnfMatcher(validate_gbnf(tool_call_grammar(TOOLS, fmt=fmt, parallel=False)))
    for name, args in CALLS:
        text = output(fmt, [(name, args)])
        assert matcher.matches(text), text
        assert read_back(fmt, text) == [(name, args)]
        assert read_back(fmt, text, chunks=True) == [(name, args)]


@pytest.mark.parametrize("fmt", FAMILIES)
@pytest.mark.parametrize("tool", TOOLS, ids=lambda t: t["function"]["name"])
def test_every_grammar_is_valid_gbnf_on_its_own(fmt: str, tool: dict) -> None:
    for parallel in (True, False):  # every rule referenced is defined, whatever the schema
        validate_gbnf(tool_call_grammar([tool], fmt=fmt, parallel=parallel))
    bounded = {"name": "f", "parameters": {"type": "object", "properties": {
        "s": {"type": "string", "maxLength": 4}, "d": {"type": "string", "format": "date"},
        "p": {"type": "string", "pattern": "^[a-z]+$"}, "c": {"const": "x"}}}}
    matcher = GbnfMatcher(validate_gbnf(tool_call_grammar([bounded], fmt=fmt)))
    args = {"s": "abcd", "d": "2024-03-01", "p": "abc", "c": "x"}
    assert matcher.matches(output(fmt, [("f", args)]))
    assert not matcher.matches(output(fmt, [("f", {**args, "s": "abcde"})]))


@pytest.mark.parametrize("fmt", FAMILIES)
def test_only_calls_valid_against_the_schema_are_admitted(fmt: str) -> None:
    matcher = GbnfMatcher(tool_call_grammar(TOOLS, fmt=fmt))
    for name, args in [("get_weather", {}), ("get_weather", {"city": 3}),
                       ("get_weather", {"city": "x", "days": 9}),
                       ("get_weather", {"city": "x", "unit": "k"}),
                       ("get_weather", {"city": "x", "wind": 1}),
                       ("locate", {"where": {"lat": 1}}), ("nope", {})]:
        assert not matcher.matches(output(fmt, [(name, args)])), (name, args)
    one = output(fmt, [CALLS[0]])
    assert not matcher.matches("Sure. " + one) and not matcher.matches(one + " Done.")


@pytest.mark.parametrize("fmt", FAMILIES)
def test_parallel_named_and_single(fmt: str) -> None:
    two = output(fmt, CALLS[:2])
    parallel = GbnfMatcher(tool_call_grammar(TOOLS, fmt=fmt))
    single = GbnfMatcher(tool_call_grammar(TOOLS, fmt=fmt, parallel=False))
    named = GbnfMatcher(tool_call_grammar(TOOLS, fmt=fmt, function_name="locate"))
    assert parallel.matches(output(fmt, CALLS[:1]))  # ending is reachable after each call
    assert parallel.matches(two) == (fmt != "harmony")  # gpt-oss: one call a message
    if fmt != "harmony":
        assert read_back(fmt, two) == CALLS[:2]
    assert not single.matches(two)
    assert named.matches(output(fmt, [CALLS[2]]))
    assert not named.matches(output(fmt, [CALLS[0]]))


def test_harmony_may_reason_first() -> None:
    matcher = GbnfMatcher(tool_call_grammar(TOOLS, fmt="harmony"))
    thought = "<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant"
    text = thought + harmony(*CALLS[0])
    assert matcher.matches(text)
    assert not matcher.matches("<|channel|>analysis<|message|>a<|end|>b<|end|><|start|>assistant"
                               + harmony(*CALLS[0]))
    turn = parse_all(make_tool_parser("harmony"), text)
    assert turn.reasoning == "Need weather." and turn.tool_calls[0].name == "get_weather"


def test_pythonic_strings_read_back_as_written() -> None:
    matcher = GbnfMatcher(tool_call_grammar(TOOLS, fmt="pythonic"))
    assert matcher.matches('[get_weather(city="A\\"b\\u00e9\\n")]')
    assert not matcher.matches('[get_weather(city="a\\/b")]')  # Python keeps `\/` as is
    assert read_back("pythonic", '[get_weather(city="A\\"b\\u00e9\\n")]') == [
        ("get_weather", {"city": 'A"bé\n'})]


def test_gemma_strings_are_fenced_and_keys_bare() -> None:
    matcher = GbnfMatcher(tool_call_grammar(TOOLS, fmt="gemma"))
    assert matcher.matches('<start_function_call>call:get_weather{city:<escape>Rio "de" '
                           'J<escape>,unit:<escape>c<escape>}<end_function_call>')
    assert not matcher.matches('<start_function_call>call:get_weather{"city":"Rio"}'
                               '<end_function_call>')
    assert not matcher.matches(gemma("ping", {"a": "x<escape>y"}))
    free = gemma("ping", {"a": [1, {"b": None}], "c": "d"})
    assert matcher.matches(free) and read_back("gemma", free) == [
        ("ping", {"a": [1, {"b": None}], "c": "d"})]


@pytest.mark.parametrize("fmt,name", [("pythonic", "get-weather"), ("gemma", "get weather"),
                                      ("mistral_args", "a/b"), ("harmony", "a b")])
def test_a_name_the_format_cannot_spell_is_refused(fmt: str, name: str) -> None:
    with pytest.raises(GrammarError):
        tool_call_grammar([{"name": name, "parameters": WEATHER}], fmt=fmt)


def test_a_parameter_python_cannot_name_is_refused() -> None:
    with pytest.raises(GrammarError):
        tool_call_grammar([{"name": "f", "parameters": {
            "type": "object", "properties": {"a-b": {"type": "string"}}}}], fmt="pythonic")


# -- the turn plan, with templates of each family -------------------------------------------------

def _template(tools_block: str) -> ChatTemplate:
    return ChatTemplate("{% if tools %}" + tools_block + "{{ tools | tojson }}{% endif %}"
                        "{% for m in messages %}{{ m.content }}{% endfor %}")


TEMPLATES = {
    "mistral": _template("[AVAILABLE_TOOLS]call as [TOOL_CALLS][{...}]"),
    "mistral_args": _template("[AVAILABLE_TOOLS]call as [TOOL_CALLS]name[ARGS]{...}"),
    "pythonic": _template("call as [func_name1(params_name1=params_value1)] "),
    "gemma": _template("<start_function_call>call:name{...}<end_function_call>"),
    "harmony": _template("<|start|>developer<|channel|>commentary "),
}
WEATHER_SPEC = ToolSpec("get_weather", None, WEATHER)
PING = ToolSpec("ping", None, {"type": "object"})


@pytest.mark.parametrize("fmt", FAMILIES)
def test_a_forced_call_goes_through_the_template_in_its_format(fmt: str) -> None:
    template = TEMPLATES[fmt]
    request = GenerationRequest(messages=[ChatMessage("user", "Weather?")],
                                tools=[WEATHER_SPEC, PING], tool_choice="required")
    plan = plan_turn(request, template)
    assert plan.template_tools is not None and plan.messages == request.messages
    assert plan.tool_format == FAMILIES[fmt][0]
    assert grammar_format(plan.tool_format, template.source) == (
        fmt, "arguments" if fmt.startswith("mistral") else "")
    matcher = GbnfMatcher(plan.grammar or "")
    assert matcher.matches(output(fmt, [CALLS[0]]))
    named = plan_turn(GenerationRequest(messages=list(request.messages),
                                        tools=[WEATHER_SPEC, PING],
                                        tool_choice=NamedTool("ping")), template)
    assert GbnfMatcher(named.grammar or "").matches(output(fmt, [("ping", {})]))
    assert not GbnfMatcher(named.grammar or "").matches(output(fmt, [CALLS[0]]))


def test_a_name_the_format_cannot_spell_falls_back_to_the_fallback_prompt() -> None:
    odd = ToolSpec("get-weather", None, WEATHER)
    plan = plan_turn(GenerationRequest(messages=[ChatMessage("user", "x")], tools=[odd],
                                       tool_choice="required"), TEMPLATES["pythonic"])
    assert plan.tool_format == "hermes" and plan.template_tools is None
    assert "<tools>" in (plan.messages[0].content or "")
    harmony_plan = plan_turn(GenerationRequest(messages=[ChatMessage("user", "x")],
                                               tools=[ToolSpec("a b", None, WEATHER)],
                                               tool_choice="required"), TEMPLATES["harmony"])
    assert harmony_plan.tool_format == "hermes"  # the fallback's calls, read as Hermes


@pytest.mark.parametrize("fmt", FAMILIES)
def test_a_repeated_call_ends_the_turn(fmt: str) -> None:
    if fmt == "harmony":
        pytest.skip("one call a message: the grammar ends after it")
    text = output(fmt, [CALLS[1], CALLS[1], CALLS[0]])
    for chunks in ([text], list(text)):
        gate = turn_parser(FAMILIES[fmt][0], None, "", forced=True)
        assert isinstance(gate, CallGate)
        turn = parse_all(gate, chunks)
        assert gate.done and turn.content == ""
        assert [(c.name, json.loads(c.arguments)) for c in turn.tool_calls] == [CALLS[1]]


@pytest.mark.parametrize("fmt", FAMILIES)
def test_a_call_cut_off_never_reaches_the_content(fmt: str) -> None:
    whole = output(fmt, [CALLS[1]])
    for cut in range(1, len(whole)):
        turn = parse_all(turn_parser(FAMILIES[fmt][0], None, "", forced=True), whole[:cut])
        assert turn.content == "", (cut, turn.content)
        assert all(c.name == "get_weather" for c in turn.tool_calls)
