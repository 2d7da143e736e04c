"""Grammars that force a tool call (tool_choice required, or a named function), with the
arguments valid against that function's parameter schema."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from lmserve.chat.grammar.calls import (
    MISTRAL_CALLS,
    gemma_call,
    harmony_analysis,
    harmony_call,
    json_arguments,
    mistral_args_call,
    pythonic_call,
)
from lmserve.chat.grammar.gbnf import GrammarError, RuleSet, literal
from lmserve.chat.tool_prompt import function_of

# hermes and json: JSON call objects; the rest write calls in a model family's own syntax
# (grammar.calls). Every format ends after a complete call, so ending stays reachable.
TOOL_CALL_GRAMMAR_FORMATS = ("hermes", "json", "mistral", "mistral_args", "pythonic", "gemma",
                             "harmony")
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
    Llama 3 JSON parser; use arguments_key="parameters" for Llama 3 templates).
    fmt "mistral": `[TOOL_CALLS][call, ...]` of such objects; "mistral_args":
    `[TOOL_CALLS]name[ARGS]{...}` per call; "pythonic": `[name(k=v), ...]`; "gemma":
    `<start_function_call>call:name{...}<end_function_call>` per call; "harmony": one
    commentary message to `functions.name` (gpt-oss makes one call a message), after an
    optional analysis message."""
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
    many = parallel and function_name is None
    if fmt in ("mistral", "pythonic"):  # a list of calls: `]` may follow any of them
        head = literal(f"{MISTRAL_CALLS}[") if fmt == "mistral" else literal("[")
        more = f" ({literal(', ')} {one}){{0,{MAX_PARALLEL_CALLS - 1}}}" if many else ""
        return rules.render(f"{head} {one}{more} {literal(']')}")
    if fmt == "harmony":
        return rules.render(f"{harmony_analysis(rules)} {one}")
    if not many:
        return rules.render(one)
    if fmt in ("mistral_args", "gemma"):  # calls one after another, each complete in itself
        return rules.render(f"{one}{{1,{MAX_PARALLEL_CALLS}}}")
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
    if fmt == "pythonic":
        return rules.add(f"call-{name}", pythonic_call(rules, name, parameters))
    if fmt == "gemma":
        return rules.add(f"call-{name}", gemma_call(rules, name, parameters))
    arguments = json_arguments(rules, parameters, name)
    if fmt == "mistral_args":
        return rules.add(f"call-{name}", mistral_args_call(name, arguments))
    if fmt == "harmony":
        return rules.add(f"call-{name}", harmony_call(name, arguments))
    head = literal(f'{{"name": {json.dumps(name, ensure_ascii=False)}, "{arguments_key}": ')
    body = f'{head} {arguments} "}}"'
    if fmt == "hermes":
        body = f"{_HERMES_OPEN} {body} {_HERMES_CLOSE}"
    return rules.add(f"call-{name}", body)
