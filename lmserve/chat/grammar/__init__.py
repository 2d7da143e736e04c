"""Structured output as GBNF grammars for llama.cpp's grammar sampler.

json_schema_grammar: a JSON Schema; json_object_grammar / json_value_grammar: any JSON object
/ value; regex_grammar: a regular expression matched in full; gbnf_grammar: a client's raw
GBNF, checked; tool_call_grammar: a forced tool call. Every function returns grammar text with
a `root` rule, or raises GrammarError (a ValueError) with a message fit for a 400 response.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jsonschema
from jsonschema.exceptions import SchemaError

from lmserve.chat.grammar.check import validate_gbnf
from lmserve.chat.grammar.gbnf import GrammarError, RuleSet
from lmserve.chat.grammar.json_schema import SchemaConverter
from lmserve.chat.grammar.primitives import primitive
from lmserve.chat.grammar.regex import regex_to_gbnf
from lmserve.chat.grammar.tools import TOOL_CALL_GRAMMAR_FORMATS, tool_call_grammar

__all__ = [
    "TOOL_CALL_GRAMMAR_FORMATS", "GrammarError", "gbnf_grammar", "json_object_grammar",
    "json_schema_grammar", "json_value_grammar", "regex_grammar", "tool_call_grammar",
]


def json_schema_grammar(schema: Mapping[str, Any] | bool, *,
                        allow_extra_properties: bool = False) -> str:
    """Values valid against `schema`. Objects that list properties get only those unless the
    schema (or `allow_extra_properties`) allows more."""
    try:
        # The stub's Validator protocol takes a dict; jsonschema takes any mapping or a bool.
        jsonschema.validators.validator_for(schema).check_schema(schema)  # type: ignore[arg-type]
    except SchemaError as exc:
        raise GrammarError(f"invalid JSON Schema: {exc.message}") from exc
    rules = RuleSet()
    converter = SchemaConverter(rules, schema, allow_extra_properties=allow_extra_properties)
    return rules.render(converter.convert_root())


def json_object_grammar() -> str:
    rules = RuleSet()
    return rules.render(primitive(rules, "json-object"))


def json_value_grammar() -> str:
    rules = RuleSet()
    return rules.render(primitive(rules, "json-value"))


def regex_grammar(pattern: str) -> str:
    return regex_to_gbnf(pattern)


def gbnf_grammar(text: str) -> str:
    return validate_gbnf(text)
