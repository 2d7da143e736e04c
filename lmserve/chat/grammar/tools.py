"""Grammars that force a tool call (tool_choice required, or a named function), with the
arguments valid against that function's parameter schema."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from lmserve.chat.grammar.gbnf import GrammarError, RuleSet, literal
from lmserve.chat.grammar.json_schema import SchemaConverter
from lmserve.chat.tool_prompt import function_of

TOOL_CALL_GRAMMAR_FORMATS = ("hermes", "json")
MAX_PARALLEL_CALLS = 8  # bounds a small model that would otherwise repeat calls to the limit
_NO_PARAMETERS = {"type": "object", "properties": {}}
_HERMES_OPEN = literal("<tool_call>\n")
_HERMES_CLOSE = literal("\n</tool_call>")


def tool_call_grammar(tools: Sequence[Mapping[str, Any]], *, fmt: str = "hermes",
                      function_name: str | None = None, parallel: bool = True,
                      arguments_key: str = "arguments") -> str:
    """A grammar for one call (or, with `parallel`, up to MAX_PARALLEL_CALLS calls) of the
    given tools; a named function forces exactly one call of that function.

    fmt "hermes": `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks,
    one per line (the Hermes parser and the fallback prompt format).
    fmt "json": bare `{"name": ..., "<arguments_key>": {...}}` objects joined by "; " (the
    Llama 3 JSON parser; use arguments_key="parameters" for Llama 3 templates)."""
    if fmt not in TOOL_CALL_GRAMMAR_FORMATS:
        raise GrammarError(f"unknown tool-call grammar format {fmt!r}; "
                           f"known: {', '.join(TOOL_CALL_GRAMMAR_FORMATS)}")
    functions = [function_of(tool) for tool in tools]
    if function_name is not None:
        functions = [f for f in functions if f.get("name") == function_name]
        if not functions:
            raise GrammarError(f"tool_choice names {function_name!r}, which is not among the tools")
    if not functions:
        raise GrammarError("a tool call was required but no tools were given")
    rules = RuleSet()
    calls = [_call_rule(rules, f, fmt, arguments_key) for f in functions]
    one = rules.add("call", " | ".join(calls))
    if not parallel or function_name is not None:
        return rules.render(one)
    if fmt == "hermes":
        # A newline after a call may also end the output: a model that writes one there
        # (as in its training data) is not then made to write another call. Ending stays
        # reachable after every call; chat.callgate stops a call that repeats.
        newline = literal("\n")
        return rules.render(f"{one} ({newline} {one}){{0,{MAX_PARALLEL_CALLS - 1}}} {newline}?")
    return rules.render(f"{one} ({literal('; ')} {one}){{0,{MAX_PARALLEL_CALLS - 1}}}")


def _call_rule(rules: RuleSet, function: Mapping[str, Any], fmt: str, arguments_key: str) -> str:
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise GrammarError("every tool needs a function name")
    parameters = function.get("parameters") or _NO_PARAMETERS
    hint = f"{name}-args"
    arguments = SchemaConverter(rules, parameters, name=hint).convert()
    head = literal(f'{{"name": {json.dumps(name, ensure_ascii=False)}, "{arguments_key}": ')
    body = f'{head} {arguments} "}}"'
    if fmt == "hermes":
        body = f"{_HERMES_OPEN} {body} {_HERMES_CLOSE}"
    return rules.add(f"call-{name}", body)
