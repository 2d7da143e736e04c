"""The dialect-neutral turn plan: how tools reach the model, which calls are parsed, which
grammar constrains the output, and room for reasoning before a constrained answer."""

from __future__ import annotations

import json

import pytest

from lmserve.chat.parsing import parse_all
from lmserve.chat.templates import CHATML_TEMPLATE, ChatTemplate
from lmserve.chat.turn import (
    CallGate, format_grammar, plan_turn, reasoning_grammar, template_kwargs, turn_parser,
    with_reasoning_room,
)
from lmserve.core.errors import LmserveError
from lmserve.core.request import (
    ChatMessage, GenerationRequest, NamedTool, ResponseFormat, ToolSpec,
)
from tests.unit.gbnf_matcher import GbnfMatcher

WEATHER = ToolSpec("get_weather", "Weather now", {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
TIME = ToolSpec("get_time", None, {"type": "object", "properties": {"tz": {"type": "string"}}})
USER = [ChatMessage("user", "Weather in Paris?")]
CHATML = ChatTemplate(CHATML_TEMPLATE)
# A Qwen-like template that renders tools itself and writes Hermes calls.
HERMES = ChatTemplate(
    "{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}"
    "</tools> answer with <tool_call></tool_call><|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MISTRAL = ChatTemplate("[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]"
                       "{% for m in messages %}{{ m.content }}{% endfor %}[TOOL_CALLS]")
TOOL_CODE = ChatTemplate("{{ tools | tojson }} answer in ```tool_code blocks"
                         "{% for m in messages %}{{ m.content }}{% endfor %}")


def request(**kw: object) -> GenerationRequest:
    return GenerationRequest(messages=list(USER), **kw)  # type: ignore[arg-type]


def hermes_call(name: str, arguments: dict) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {json.dumps(arguments)}}}\n</tool_call>'


def test_no_tools_is_a_plain_turn() -> None:
    plan = plan_turn(request(), CHATML)
    assert plan.messages == USER and plan.template_tools is None
    assert plan.tool_format is None and plan.grammar is None


def test_auto_on_a_template_without_tools_uses_the_fallback_prompt() -> None:
    plan = plan_turn(request(tools=[WEATHER, TIME]), CHATML)
    assert plan.messages[0].role == "system" and "<tools>" in (plan.messages[0].content or "")
    assert '"get_weather"' in (plan.messages[0].content or "")
    assert plan.template_tools is None and plan.tool_format == "hermes" and plan.grammar is None


def test_auto_on_a_tool_template_renders_through_the_template() -> None:
    plan = plan_turn(request(tools=[WEATHER]), HERMES)
    assert plan.messages == USER and plan.tool_format == "hermes"
    assert plan.template_tools == [WEATHER.as_template_dict()]
    assert plan.template_tools[0]["function"]["name"] == "get_weather"


def test_none_offers_no_tools_and_parses_no_calls() -> None:
    plan = plan_turn(request(tools=[WEATHER], tool_choice="none"), CHATML)
    assert plan.messages == USER and plan.tool_format is None and plan.grammar is None


def test_required_forces_a_call_of_any_tool() -> None:
    plan = plan_turn(request(tools=[WEATHER, TIME], tool_choice="required"), CHATML)
    matcher = GbnfMatcher(plan.grammar or "")
    assert matcher.matches(hermes_call("get_weather", {"city": "Paris"}))
    assert matcher.matches(hermes_call("get_time", {}) + "\n" + hermes_call("get_time", {}))
    assert not matcher.matches("Sure! " + hermes_call("get_time", {}))
    assert "at least one function" in (plan.messages[0].content or "")


def test_named_and_single_calls() -> None:
    named = plan_turn(request(tools=[WEATHER, TIME], tool_choice=NamedTool("get_time")), CHATML)
    matcher = GbnfMatcher(named.grammar or "")
    assert matcher.matches(hermes_call("get_time", {"tz": "UTC"}))
    assert not matcher.matches(hermes_call("get_weather", {"city": "x"}))
    single = plan_turn(request(tools=[WEATHER, TIME], tool_choice="required",
                               parallel_tool_calls=False), HERMES)
    assert single.template_tools is not None  # the template's format has a grammar
    assert not GbnfMatcher(single.grammar or "").matches(
        hermes_call("get_time", {}) + "\n" + hermes_call("get_time", {}))


def test_a_forced_call_in_a_format_without_grammar_falls_back_to_hermes() -> None:
    auto = plan_turn(request(tools=[WEATHER]), TOOL_CODE)
    assert auto.tool_format == "tool_code" and auto.template_tools is not None
    forced = plan_turn(request(tools=[WEATHER], tool_choice="required"), TOOL_CODE)
    assert forced.tool_format == "hermes" and forced.template_tools is None
    assert "<tools>" in (forced.messages[0].content or "")


def test_a_forced_call_in_mistral_format_goes_through_the_template() -> None:
    auto = plan_turn(request(tools=[WEATHER]), MISTRAL)
    assert auto.tool_format == "mistral" and auto.template_tools is not None
    forced = plan_turn(request(tools=[WEATHER], tool_choice="required"), MISTRAL)
    assert forced.tool_format == "mistral" and forced.template_tools is not None
    assert GbnfMatcher(forced.grammar or "").matches(
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]')


@pytest.mark.parametrize("kw,param", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": NamedTool("nope")}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "required",
      "response_format": ResponseFormat("json_object")}, "response_format"),
    ({"response_format": ResponseFormat("json_schema", schema={"type": "nope"})},
     "response_format"),
    ({"response_format": ResponseFormat("regex", pattern="(", param="format")}, "format"),
    ({"response_format": ResponseFormat("gbnf", grammar="root ::= x")}, "response_format"),
])
def test_refusals_name_the_parameter(kw: dict, param: str) -> None:
    with pytest.raises(LmserveError) as exc:
        plan_turn(request(**kw), CHATML)
    assert exc.value.param == param and exc.value.kind.http_status == 400


def test_response_formats() -> None:
    person = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    schema = GbnfMatcher(format_grammar(ResponseFormat("json_schema", schema=person)))
    assert schema.matches('{"name": "Ann"}') and not schema.matches('{"age": 1}')
    assert GbnfMatcher(format_grammar(ResponseFormat("json_object"))).matches('{"a": [1]}')
    assert GbnfMatcher(format_grammar(ResponseFormat("regex", pattern="[a-c]+"))).matches("abc")
    assert format_grammar(ResponseFormat("gbnf", grammar='root ::= "x"\n')) == 'root ::= "x"\n'


def test_reasoning_room_before_a_constrained_answer() -> None:
    grammar = format_grammar(ResponseFormat("json_object"))
    opened = GbnfMatcher(with_reasoning_room(grammar, ("<think>", "</think>"), opened=True))
    assert opened.matches('Hmm, a < b and </thin is fine.</think>\n\n{"a": 1}')
    assert not opened.matches('{"a": 1}')  # the prompt opened the block: it must be closed
    assert not opened.matches('x</think>y</think>{"a": 1}')
    optional = GbnfMatcher(with_reasoning_room(grammar, ("<think>", "</think>"), opened=False))
    assert optional.matches('{"a": 1}') and optional.matches('<think>ok</think>\n{"a": 1}')
    raw = 'root ::= "x"\n'
    assert with_reasoning_room(raw + 'y ::= "y"\n', ("<think>", "</think>"), opened=True) \
        .startswith("root ::= lmserve-reasoning")
    tags = ("<think>", "</think>")
    plan = plan_turn(request(response_format=ResponseFormat("json_object")), CHATML)
    assert reasoning_grammar(plan, tags, "p", False) == grammar
    assert reasoning_grammar(plan, tags, "p<think>", False).startswith("root ::= lmserve-")
    assert reasoning_grammar(plan, tags, "p<think>", None) != grammar
    client = plan_turn(request(response_format=ResponseFormat("gbnf", grammar=raw)), CHATML)
    assert client.client_grammar and reasoning_grammar(client, tags, "p<think>", None) == raw
    assert reasoning_grammar(plan_turn(request(), CHATML), tags, "p", None) is None


def test_template_kwargs_carry_the_reasoning_choice() -> None:
    assert template_kwargs(request(reasoning=False)) == {"enable_thinking": False}
    assert template_kwargs(request(reasoning=True, template_kwargs={"enable_thinking": False})) \
        == {"enable_thinking": False}
    assert template_kwargs(request()) == {}


def test_turn_parser_reasoning_tools_and_single_call() -> None:
    text = ("plan it</think>On it." + hermes_call("get_time", {"tz": "UTC"})
            + hermes_call("get_weather", {"city": "Oslo"}))
    turn = parse_all(turn_parser("hermes", ("<think>", "</think>"), "...<think>\n"), text)
    assert turn.reasoning == "plan it" and turn.content == "On it."
    assert [c.name for c in turn.tool_calls] == ["get_time", "get_weather"]
    single = turn_parser("hermes", None, "x", parallel=False)
    assert isinstance(single, CallGate)
    turn = parse_all(single, list(text.partition("</think>")[2]))
    assert [(c.name, json.loads(c.arguments)) for c in turn.tool_calls] == \
        [("get_time", {"tz": "UTC"})]
    plain = parse_all(turn_parser(None, None, None), "a <tool_call> b")
    assert plain.content == "a <tool_call> b" and not plain.tool_calls
