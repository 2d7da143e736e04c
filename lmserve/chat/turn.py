"""One chat turn's plan for tools, structured output and reasoning (dialect-neutral).

plan_turn() decides, from a GenerationRequest and the model's chat template:

* how tools reach the model: through the template when it reads `tools` and lmserve knows the
  call format the model then writes; otherwise through the fallback prompt
  (lmserve.chat.tool_prompt), whose calls are read with the Hermes parser. A forced call
  (tool_choice "required" or a named function) is written in the model's own format
  (Hermes, Llama 3 JSON, Mistral, pythonic, Gemma, harmony: chat.grammar.calls); only a
  format no grammar is built for (tool_code), or a function name that format cannot spell,
  goes through the fallback prompt.
* which tool-call format to parse (None: tools are off, nothing is parsed as a call);
* the grammar: a forced call (tool_call_grammar) or the response_format; both at once is
  refused. tool_choice "none" offers no tools and parses no calls.

with_reasoning_room() then lets a reasoning model think before a grammar-constrained answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lmserve.chat.callgate import CallGate
from lmserve.chat.grammar import (
    GrammarError,
    gbnf_grammar,
    json_object_grammar,
    json_schema_grammar,
    regex_grammar,
    tool_call_grammar,
)
from lmserve.chat.grammar.check import parse_gbnf
from lmserve.chat.grammar.gbnf import literal, text_without
from lmserve.chat.parsing import make_chat_parser
from lmserve.chat.reasoning import generation_opens_reasoning
from lmserve.chat.templates import ChatTemplate
from lmserve.chat.tools import (
    FALLBACK_TOOL_FORMAT,
    StreamParser,
    apply_fallback_tool_prompt,
    detect_tool_format,
)
from lmserve.core.errors import invalid
from lmserve.core.events import ChatEvent
from lmserve.core.request import ChatMessage, GenerationRequest, NamedTool, ResponseFormat

__all__ = [
    "CallGate", "TurnPlan", "forces_call", "format_grammar", "grammar_format", "plan_turn",
    "reasoning_grammar", "step_events", "template_kwargs", "turn_over", "turn_parser",
    "with_reasoning_room",
]

# The model's own call format -> (grammar format, arguments key) for a forced call.
_GRAMMAR_FORMATS = {"hermes": ("hermes", "arguments"), "llama3_json": ("json", "parameters"),
                    "pythonic": ("pythonic", ""), "gemma": ("gemma", ""),
                    "harmony": ("harmony", "")}
_REASONING_RULE = "lmserve-reasoning"


@dataclass(frozen=True)
class TurnPlan:
    messages: list[ChatMessage]  # what the template renders
    template_tools: list[dict[str, Any]] | None  # the template's `tools` variable
    tool_format: str | None  # the call format to parse; None: no tool calls are parsed
    grammar: str | None  # GBNF the whole output must match; None: unconstrained
    client_grammar: bool = False  # the grammar is the client's raw GBNF, applied as written


def forces_call(request: GenerationRequest) -> bool:
    """tool_choice "required" or a named function: the output is the call(s) and nothing else."""
    return request.tool_choice == "required" or isinstance(request.tool_choice, NamedTool)


def plan_turn(request: GenerationRequest, template: ChatTemplate,
              model_metadata: Mapping[str, str] | None = None) -> TurnPlan:
    tools = [tool.as_template_dict() for tool in request.tools or []]
    choice = request.tool_choice
    forced_name = choice.name if isinstance(choice, NamedTool) else None
    forced = forces_call(request)
    if forced and not tools:
        raise invalid("tool_choice asks for a tool call but no tools were given",
                      param="tool_choice")
    offered = tools if choice != "none" else []
    native = detect_tool_format(template.source, model_metadata) if template.supports_tools \
        else None
    use_template = template.supports_tools and (not offered or native is not None)
    grammar = None
    if forced and use_template:  # in the model's own format, where lmserve can write it
        grammar = _native_call_grammar(offered, native, template.source, forced_name,
                                       request.parallel_tool_calls)
        use_template = grammar is not None
    call_format = native if use_template else FALLBACK_TOOL_FORMAT
    tool_format = call_format if offered else None
    if native == "harmony" and use_template:
        tool_format = native  # its parser also splits the reasoning channel, tools or not
    messages = list(request.messages or [])
    if not use_template:
        messages = apply_fallback_tool_prompt(
            messages, offered or None, tool_choice="required" if forced else "auto",
            function_name=forced_name, parallel=request.parallel_tool_calls,
            system_role=template.supports_system_role)
    if forced and grammar is None:
        grammar = _forced_call_grammar(offered, FALLBACK_TOOL_FORMAT, forced_name,
                                       request.parallel_tool_calls)
    if request.response_format is not None:
        if grammar is not None:
            raise invalid("response_format cannot be combined with a tool_choice that forces a "
                          "call", param=request.response_format.param)
        grammar = format_grammar(request.response_format)
    return TurnPlan(messages, offered if use_template and offered else None, tool_format, grammar,
                    client_grammar=getattr(request.response_format, "type", None) == "gbnf")


def grammar_format(native: str | None, template_source: str | None) -> tuple[str, str] | None:
    """The forcing grammar's format (and arguments key) for the calls a model writes, or None
    where lmserve has no grammar for that format (a forced call then uses the fallback
    prompt). Mistral's templates write `name[ARGS]{...}` calls from the v11 tokenizers on."""
    if native == "mistral":
        return ("mistral_args" if "[ARGS]" in (template_source or "") else "mistral",
                "arguments")
    return _GRAMMAR_FORMATS.get(native or "")


def _native_call_grammar(tools: list[dict[str, Any]], native: str | None,
                         template_source: str | None, function_name: str | None,
                         parallel: bool) -> str | None:
    """A forced call in the model's own format; None where none can be written (no grammar
    for the format, or a name it cannot spell): the fallback prompt's grammar then forces it,
    or refuses what no grammar can force."""
    fmt = grammar_format(native, template_source)
    if fmt is None:
        return None
    try:
        return tool_call_grammar(tools, fmt=fmt[0], function_name=function_name,
                                 parallel=parallel, arguments_key=fmt[1])
    except GrammarError:
        return None


def _forced_call_grammar(tools: list[dict[str, Any]], call_format: str,
                         function_name: str | None, parallel: bool) -> str:
    fmt, arguments_key = _GRAMMAR_FORMATS[call_format]  # (the fallback's: hermes)
    try:
        return tool_call_grammar(tools, fmt=fmt, function_name=function_name,
                                 parallel=parallel, arguments_key=arguments_key)
    except GrammarError as exc:
        raise invalid(f"cannot force this tool call: {exc}",
                      param="tool_choice" if function_name else "tools") from None


def format_grammar(fmt: ResponseFormat) -> str:
    """The grammar of a response format; a bad schema, pattern or grammar is a 400."""
    try:
        if fmt.type == "json_object":
            return json_object_grammar()
        if fmt.type == "json_schema":
            if fmt.schema is None:
                raise GrammarError("a json_schema format needs a schema")
            return json_schema_grammar(fmt.schema)
        if fmt.type == "regex":
            return regex_grammar(fmt.pattern or "")
        return gbnf_grammar(fmt.grammar or "")
    except GrammarError as exc:
        raise invalid(f"{fmt.param}: {exc}", param=fmt.param, code="invalid_grammar") from None


def template_kwargs(request: GenerationRequest) -> dict[str, Any]:
    """The template variables: the request's own, plus enable_thinking when it chose."""
    kwargs = dict(request.template_kwargs)
    if request.reasoning is not None:
        kwargs.setdefault("enable_thinking", request.reasoning)
    return kwargs


def reasoning_grammar(plan: TurnPlan, tags: tuple[str, str] | None, prompt: str,
                      reasoning: bool | None) -> str | None:
    """The grammar to sample with, given the model's think tags and the rendered prompt."""
    grammar = plan.grammar
    if grammar is None or tags is None or plan.client_grammar:
        return grammar
    opened = generation_opens_reasoning(prompt, tags)
    if not opened and reasoning is False:
        return grammar
    # An opened block must be closed, whatever was asked: the parser reads it as reasoning.
    return with_reasoning_room(grammar, tags, opened=opened)


def turn_parser(tool_format: str | None, tags: tuple[str, str] | None, prompt: str | None, *,
                parallel: bool = True, forced: bool = False) -> StreamParser:
    """The output parser of one choice: reasoning, then tool calls (chat.parsing)."""
    opens = tags is not None and prompt is not None and generation_opens_reasoning(prompt, tags)
    parser = make_chat_parser(tool_format=tool_format, reasoning_tags=tags,
                              starts_in_reasoning=opens)
    if tool_format is not None:  # no repeated call; with parallel off, one call
        return CallGate(parser, parallel=parallel, forced=forced)
    return parser


def step_events(parser: StreamParser, text: str, finished: bool) -> list[ChatEvent]:
    """One engine step's text through a choice's parser, plus its tail when the choice ended."""
    events = parser.feed(text) if text else []
    return events + parser.finish() if finished else events


def with_reasoning_room(grammar: str, tags: tuple[str, str], *, opened: bool) -> str:
    """Let the model reason before the constrained answer: a reasoning block (free text up to
    the closing tag) comes first; it is required when the prompt opened it, else optional.

    Only for grammars lmserve renders (their first line is the root rule, which no other rule
    references); a client's raw GBNF is applied as written."""
    start, end = tags
    head, _, rest = grammar.partition("\n")
    if not head.startswith("root ::= ") or _REASONING_RULE in parse_gbnf(grammar):
        return grammar
    reasoning = f"{_REASONING_RULE} {literal(end)} [\\n]{{0,2}}"
    if not opened:
        reasoning = f"({literal(start)} {reasoning})?"
    return (f"root ::= {reasoning} ({head.removeprefix('root ::= ')})\n{rest}"
            f"{_REASONING_RULE} ::= {text_without(end)}\n")


def turn_over(parser: StreamParser) -> bool:
    """Whether a choice's parser ended the turn before the output did (a repeated call, or a
    second call with parallel calls off: chat.callgate); the choice should stop there."""
    return isinstance(parser, CallGate) and parser.done
