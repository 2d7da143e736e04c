"""Forced tool calls in a model family's own syntax (see grammar.tools for the front door).

Each builder returns the GBNF expression of one call of one function, written the way the
family's template teaches it and its parser in chat.toolparsers reads it back:

* mistral        `{"name": "f", "arguments": {...}}`, an element of `[TOOL_CALLS][...]`
* mistral_args   `[TOOL_CALLS]f[ARGS]{...}` (v11 tokenizers and later)
* pythonic       `f(city="Paris", days=3)`, an element of a `[...]` list (Llama 3.2 / 4)
* gemma          `<start_function_call>call:f{city:<escape>Paris<escape>}<end_function_call>`
* harmony        `<|channel|>commentary to=functions.f <|constrain|>json<|message|>{...}`

Arguments follow the function's parameter schema in every family: JSON for Mistral and
harmony; for pythonic, keyword arguments whose values are JSON literals (valid Python once
true/false/null are read as the parser reads them); for Gemma, the schema's values in Gemma's
notation (bare keys, strings fenced by `<escape>`).
"""

from __future__ import annotations

import json
import keyword
import re
from collections.abc import Mapping
from typing import Any

from lmserve.chat.grammar.gbnf import GrammarError, RuleSet, literal, repeat, text_without
from lmserve.chat.grammar.json_schema import SchemaConverter
from lmserve.chat.grammar.primitives import STRING_FORMATS, WS, format_rule, primitive
from lmserve.chat.grammar.regex import pattern_in_string

HARMONY_ANALYSIS = "<|channel|>analysis<|message|>"
HARMONY_END = "<|end|><|start|>assistant"
GEMMA_START, GEMMA_END, GEMMA_ESCAPE = "<start_function_call>", "<end_function_call>", "<escape>"
MISTRAL_CALLS, MISTRAL_ARGS = "[TOOL_CALLS]", "[ARGS]"
_SEP = f'{WS} "," {WS}'
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_BARE_KEY = re.compile(r"[\w.\-]+", re.ASCII)
# A Python string literal that reads back as the JSON string it looks like: JSON's escapes
# but `\/`, which Python would keep as two characters.
_PY_CHAR = r'[^"\\\x00-\x1F] | "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4})'


def mistral_args_call(name: str, arguments: str) -> str:
    if not _BARE_KEY.fullmatch(name):
        raise GrammarError(f"function name {name!r} cannot be written in Mistral's call format")
    return f"{literal(MISTRAL_CALLS + name + MISTRAL_ARGS)} {arguments}"


def harmony_call(name: str, arguments: str) -> str:
    if not name or any(c.isspace() or c == "<" for c in name):
        raise GrammarError(f"function name {name!r} cannot be a harmony recipient")
    head = literal(f"<|channel|>commentary to=functions.{name} <|constrain|>json<|message|>")
    return f"{head} {arguments}"


def harmony_analysis(rules: RuleSet) -> str:
    """An optional analysis message (gpt-oss reasons there first) before the call."""
    body = rules.add("harmony-analysis-text", text_without("<|end|>"))
    return f"({literal(HARMONY_ANALYSIS)} {body} {literal(HARMONY_END)})?"


def json_arguments(rules: RuleSet, parameters: Any, name: str) -> str:
    """A call's JSON arguments, written compactly as templates write them back (`tojson`,
    json.dumps): the next request renders the call the client returns exactly as the model
    wrote it, so its tokens match the KV the model left and the prefix is reused."""
    return SchemaConverter(rules, parameters, name=f"{name}-args", compact=True).convert()


# -- pythonic --------------------------------------------------------------------------------

def pythonic_call(rules: RuleSet, name: str, parameters: Mapping[str, Any]) -> str:
    """`name(k=v, ...)`: the parameter schema's properties as keyword arguments in declared
    order, the required ones always present."""
    if not _DOTTED.fullmatch(name):
        raise GrammarError(f"function name {name!r} cannot be written as a Python call")
    rules.ensure("json-char", _PY_CHAR)  # before any string rule: strings Python reads alike
    converter = SchemaConverter(rules, parameters, name=f"{name}-args")
    properties, required, extra = _object_parts(parameters, name)
    members = []
    for key, schema in properties.items():
        if not _IDENTIFIER.fullmatch(key) or keyword.iskeyword(key):
            raise GrammarError(f"parameter {key!r} of {name!r} cannot be a Python keyword "
                               "argument")
        value = converter.convert(schema, f"/{key}")
        members.append((rules.add(f"{name}-kw-{key}", f"{literal(key + '=')} {value}"),
                        key in required))
    if extra:
        value = primitive(rules, "json-value")
        members.append((rules.add("py-kwargs", f'py-ident "=" {value} ({_SEP} py-ident "=" '
                                  f"{value})*"), False))
        rules.ensure("py-ident", "[A-Za-z_] [A-Za-z0-9_]{0,63}")
    inner = in_order(rules, members, ", ", f"{name}-kws")
    return f"{literal(name + '(')} {inner} {literal(')')}"


def _object_parts(parameters: Mapping[str, Any], name: str
                  ) -> tuple[dict[str, Any], list[str], bool]:
    if not isinstance(parameters, Mapping) or parameters.get("type", "object") != "object" \
            or any(k in parameters for k in ("$ref", "anyOf", "oneOf", "allOf")):
        raise GrammarError(f"the parameters of {name!r} are not a plain object schema")
    properties = dict(parameters.get("properties") or {})
    required = list(parameters.get("required") or [])
    for key in required:
        properties.setdefault(key, {})
    extra = parameters.get("additionalProperties", "properties" not in parameters)
    return properties, required, extra is not False


def in_order(rules: RuleSet, members: list[tuple[str, bool]], sep: str, hint: str) -> str:
    """The members in the given order, joined by `sep`: each one present if needed (True),
    else optional. "" when there are none."""
    if not members:
        return ""
    joint = literal(sep)
    tails = [""]  # tails[k]: what may follow member k-1
    for member, needed in reversed(members[1:]):
        piece = f"{joint} {member}" if needed else f"({joint} {member})?"
        tails.insert(0, rules.add(f"{hint}-rest", f"{piece} {tails[0]}".strip()))
    tails.insert(0, "")
    firsts = []
    for k, (member, needed) in enumerate(members):
        firsts.append(f"{member} {tails[k + 1]}".strip())
        if needed:
            break
    inner = f"({' | '.join(firsts)})"
    return inner if any(needed for _, needed in members) else f"{inner}?"


# -- Gemma -----------------------------------------------------------------------------------

def gemma_call(rules: RuleSet, name: str, parameters: Any) -> str:
    if not _BARE_KEY.fullmatch(name):
        raise GrammarError(f"function name {name!r} cannot be written in Gemma's call format")
    gemma_primitives(rules)
    arguments = GemmaConverter(rules, parameters, name=f"{name}-args").convert()
    return f"{literal(GEMMA_START + 'call:' + name)} {arguments} {literal(GEMMA_END)}"


def gemma_primitives(rules: RuleSet) -> None:
    """Gemma's notation under the JSON primitives' names, so every rule that uses them (a
    free-form value, an object's extra members) writes Gemma: defined before the converter."""
    fence = literal(GEMMA_ESCAPE)
    rules.ensure("gemma-text", text_without(GEMMA_ESCAPE))
    rules.ensure("gemma-key", r"[A-Za-z0-9_.\-]{1,64}")
    rules.ensure("json-string", f"{fence} gemma-text {fence}")
    rules.ensure("json-member", f'gemma-key {WS} ":" {WS} json-value')
    primitive(rules, "json-value")  # (what json-member refers to)


def gemma_text(value: Any) -> str:
    """A JSON value written as Gemma writes it."""
    if isinstance(value, str):
        return GEMMA_ESCAPE + value + GEMMA_ESCAPE
    if isinstance(value, list):
        return "[" + ",".join(gemma_text(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{_gemma_key(str(k))}:{gemma_text(v)}"
                              for k, v in value.items()) + "}"
    return json.dumps(value)


def _gemma_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else gemma_text(key)


class GemmaConverter(SchemaConverter):
    """SchemaConverter writing Gemma's notation: bare keys, `<escape>`-fenced strings."""

    def _body(self, schema: dict[str, Any], path: str) -> str:
        if "const" in schema:
            schema = {k: v for k, v in schema.items() if k != "const"} | {
                "enum": [schema["const"]]}
        return super()._body(schema, path)

    def _enum(self, schema: dict[str, Any], path: str) -> str:
        values = schema["enum"]
        if not isinstance(values, list) or not values:
            raise GrammarError(f"'enum' at '{path or '/'}' must be a non-empty list")
        return " | ".join(literal(gemma_text(v)) for v in values)

    def _member(self, name: str, schema: Any, path: str) -> str:
        return self.rules.add(f"{self.name}{path}-kv", f'{literal(_gemma_key(name))} {WS} ":" '
                                                       f'{WS} {self.convert(schema, path)}')

    def _extra_member(self, schema: dict[str, Any], path: str) -> str | None:
        default = self.allow_extra or "properties" not in schema
        extra = schema.get("additionalProperties", default)
        if extra is False:
            return None
        value = self.convert(extra if isinstance(extra, Mapping) else {}, f"{path}/additional")
        return self.rules.add(f"{self.name}{path}-extra-kv", f'gemma-key {WS} ":" {WS} {value}')

    def _string(self, schema: dict[str, Any], path: str) -> str:
        fence = literal(GEMMA_ESCAPE)
        fmt, pattern = schema.get("format"), schema.get("pattern")
        lengths = "minLength" in schema or "maxLength" in schema
        if sum(map(bool, (fmt in STRING_FORMATS, pattern is not None, lengths))) > 1:
            raise GrammarError(f"combining format, pattern and minLength/maxLength at "
                               f"'{path or '/'}' is not supported")
        if pattern is not None:
            inner = pattern_in_string(pattern, self.rules, f"{self.name}{path}-re")
            return f"{fence} {inner} {fence}"
        if fmt in STRING_FORMATS:
            return f"{fence} {format_rule(self.rules, fmt)} {fence}"
        if lengths:
            low, high = int(schema.get("minLength", 0)), schema.get("maxLength")
            if high is not None and int(high) < low:
                raise GrammarError(f"maxLength < minLength at '{path or '/'}'")
            char = self.rules.ensure("gemma-char", "[^<]")  # (a bounded string has no `<`)
            return f"{fence} {repeat(char, low, None if high is None else int(high))} {fence}"
        return primitive(self.rules, "json-string")
