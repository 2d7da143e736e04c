"""Grammars against the real llama.cpp: every grammar lmserve builds parses there, and
constrained generation with SmolLM2 yields output that parses and validates."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import jsonschema
import pytest

from lmserve.chat.grammar import (
    json_object_grammar, json_schema_grammar, json_value_grammar, regex_grammar,
    tool_call_grammar,
)
from lmserve.chat.parsing import parse_all
from lmserve.chat.templates import ChatTemplate
from lmserve.chat.tools import apply_fallback_tool_prompt, make_tool_parser
from lmserve.core.request import ChatMessage
from lmserve.engine.runner import Context, GrammarSampler, Model, validate_grammar
from tests.unit.chat.test_grammar import CASES, PERSON, REGEX_CASES, TIME, WEATHER

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def model(model_path: str) -> Iterator[Model]:
    loaded = Model(model_path)
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def context(model: Model) -> Iterator[Context]:
    ctx = Context(model, n_ctx=2048, n_seq_max=1, n_batch=512, n_threads=2)
    yield ctx
    ctx.close()


def generate(model: Model, ctx: Context, prompt: str, gbnf: str,
             max_tokens: int = 200) -> tuple[str, bool]:
    """Greedy generation under the grammar: (text, ended by the model rather than the limit)."""
    ctx.clear()
    tokens = model.tokenize(prompt)
    sampler = GrammarSampler(model, gbnf)
    pieces: list[bytes] = []
    try:
        ctx.batch.clear()
        last = ctx.batch.add(tokens, 0, 0, True)
        assert ctx.decode(ctx.batch) == 0
        for position in range(len(tokens), len(tokens) + max_tokens):
            token = sampler.sample(ctx, last)
            if token in model.eog_tokens:
                return b"".join(pieces).decode("utf-8"), True
            pieces.append(model.piece(token))
            ctx.batch.clear()
            last = ctx.batch.add([token], position, 0, True)
            assert ctx.decode(ctx.batch) == 0
        return b"".join(pieces).decode("utf-8", "replace"), False
    finally:
        sampler.free()


def chat_prompt(model: Model, system: str, user: str, tools: list | None = None,
                function_name: str | None = None) -> str:
    messages = [ChatMessage("system", system), ChatMessage("user", user)]
    if tools:
        messages = apply_fallback_tool_prompt(messages, tools, tool_choice="required",
                                              function_name=function_name, parallel=False)
    template = ChatTemplate(model.info.chat_template or "")
    return template.render([m.as_template_dict() for m in messages])


def every_grammar() -> list[str]:
    grammars = [json_object_grammar(), json_value_grammar(),
                tool_call_grammar([WEATHER, TIME]),
                tool_call_grammar([WEATHER, TIME], fmt="json", function_name="get_time"),
                tool_call_grammar([{"name": "no.params"}, {"name": "tree", "parameters": {
                    "$defs": {"n": {"type": "object", "properties": {
                        "kids": {"type": "array", "items": {"$ref": "#/$defs/n"}}}}},
                    "$ref": "#/$defs/n"}}])]
    grammars += [json_schema_grammar(schema) for schema, _, _ in CASES]
    grammars += [regex_grammar(pattern) for pattern, _, _ in REGEX_CASES]
    return grammars


def test_llama_cpp_accepts_every_grammar(model: Model) -> None:
    for grammar in every_grammar():
        validate_grammar(model, grammar)
    with pytest.raises(ValueError):
        validate_grammar(model, "root ::= undefined-rule")


SCHEMAS = [
    PERSON,
    {"type": "object", "properties": {
        "items": {"type": "array", "minItems": 2, "maxItems": 3, "items": {
            "type": "object", "properties": {
                "item": {"type": "string", "maxLength": 16},
                "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["item", "qty"]}},
        "paid": {"type": "boolean"}}, "required": ["items", "paid"]},
    {"type": "object", "properties": {
        "day": {"type": "string", "format": "date"},
        "mood": {"enum": ["good", "bad"]},
        "note": {"type": ["string", "null"], "maxLength": 24},
        "score": {"type": "number", "minimum": 0, "maximum": 10}},
     "required": ["day", "mood", "note", "score"]},
]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_constrained_output_validates(model: Model, context: Context, schema: dict) -> None:
    prompt = chat_prompt(model, "Answer with JSON only.",
                         f"Fill in this JSON Schema with example data: {json.dumps(schema)}")
    text, ended = generate(model, context, prompt, json_schema_grammar(schema))
    assert ended, f"did not finish: {text!r}"
    jsonschema.validate(json.loads(text), schema)


def test_json_object_and_regex_output(model: Model, context: Context) -> None:
    prompt = chat_prompt(model, "You are helpful.", "Describe a cat as a JSON object.")
    text, ended = generate(model, context, prompt, json_object_grammar(), max_tokens=300)
    if ended:  # a free-form object may run to the limit on a tiny model; when done it parses
        assert isinstance(json.loads(text), dict)
    else:
        assert text.startswith("{")
    prompt = chat_prompt(model, "You are helpful.", "Give me a phone number.")
    pattern = r"\(\d{3}\) \d{3}-\d{4}"
    text, ended = generate(model, context, prompt, regex_grammar(pattern))
    assert ended and re.fullmatch(pattern, text)


@pytest.mark.parametrize("name", [None, "get_time"])
def test_forced_tool_call_parses_and_validates(model: Model, context: Context,
                                               name: str | None) -> None:
    prompt = chat_prompt(model, "You are helpful.", "What's the weather in Paris?",
                         [WEATHER, TIME], name)
    grammar = tool_call_grammar([WEATHER, TIME], function_name=name, parallel=False)
    text, ended = generate(model, context, prompt, grammar)
    assert ended, text
    turn = parse_all(make_tool_parser("hermes"), text)
    assert len(turn.tool_calls) == 1 and turn.content == ""
    call = turn.tool_calls[0]
    tool = {"get_weather": WEATHER, "get_time": TIME}[call.name]
    assert name is None or call.name == name
    jsonschema.validate(json.loads(call.arguments), tool["function"]["parameters"])
