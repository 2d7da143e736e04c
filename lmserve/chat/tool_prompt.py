"""Tool calling for chat templates that know nothing of tools (SmolLM2's ChatML, for one).

The fallback prompt format, documented here and in the instructions the model reads:

* The tool definitions go into the system prompt (a new system message, or the end of the
  existing one; the first user message when the template has no system role), one JSON object
  per line inside `<tools></tools>`, with instructions to answer a call as
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call.
* Assistant turns that made calls are rendered as their text followed by those blocks.
* Tool results (role `tool`, or the legacy `function`) become a user turn holding one
  `<tool_response name="..." id="...">result</tool_response>` block per result.

The model's reply is then read with the Hermes parser (FALLBACK_TOOL_FORMAT), and a forced call
uses the same format in its grammar.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from lmserve.core.request import ChatMessage

FALLBACK_TOOL_FORMAT = "hermes"

_HEADER = (
    "# Tools\n\n"
    "You can call functions to help with the user's request. Each function is described by a "
    "JSON object on its own line inside <tools></tools>; its \"parameters\" field is the JSON "
    "Schema of its arguments.\n<tools>\n"
)
_FOOTER = (
    "\n</tools>\n\n"
    "To call a function, answer with a <tool_call></tool_call> block holding a JSON object "
    "with the function's name and its arguments, exactly like this:\n"
    '<tool_call>\n{"name": "function_name", "arguments": {"argument": "value"}}\n</tool_call>\n'
    "Use one block per call. The results come back in <tool_response></tool_response> "
    "blocks; use them to answer the user. When no function is needed, answer normally."
)


def function_of(tool: Mapping[str, Any]) -> Mapping[str, Any]:
    """The function definition of an OpenAI-style tool ({"type": "function", "function": {...}})
    or of a flat one ({"name", "description", "parameters"})."""
    inner = tool.get("function")
    return inner if isinstance(inner, Mapping) else tool


def render_tool_instructions(tools: Sequence[Mapping[str, Any]], *, tool_choice: str = "auto",
                             function_name: str | None = None, parallel: bool = True) -> str:
    """The system-prompt text that teaches the model the tools and the call format.

    `tool_choice`: "auto" or "required"; `function_name` forces that one function."""
    lines = [json.dumps(_definition(function_of(t)), ensure_ascii=False) for t in tools]
    text = _HEADER + "\n".join(lines) + _FOOTER
    if function_name:
        text += f"\nYou must call the function {function_name} now."
    elif tool_choice == "required":
        text += "\nYou must call at least one function now."
    if not parallel:
        text += "\nCall at most one function per answer."
    return text


def _definition(function: Mapping[str, Any]) -> dict[str, Any]:
    definition: dict[str, Any] = {"name": function.get("name", "")}
    if function.get("description"):
        definition["description"] = function["description"]
    definition["parameters"] = function.get("parameters") or {"type": "object", "properties": {}}
    return definition


def apply_fallback_tool_prompt(
    messages: Sequence[ChatMessage], tools: Sequence[Mapping[str, Any]] | None = None, *,
    tool_choice: str = "auto", function_name: str | None = None, parallel: bool = True,
    system_role: bool = True,
) -> list[ChatMessage]:
    """Messages a tool-less template can render: instructions in, calls and results as text.

    With no tools (or tool_choice "none") only the history is rewritten."""
    rendered = _render_history(messages)
    if tools and tool_choice != "none":
        instructions = render_tool_instructions(
            tools, tool_choice=tool_choice, function_name=function_name, parallel=parallel)
        rendered = _add_instructions(rendered, instructions, system_role)
    return rendered


def _add_instructions(messages: list[ChatMessage], instructions: str,
                      system_role: bool) -> list[ChatMessage]:
    if system_role:
        if messages and messages[0].role == "system":
            return [_append(messages[0], instructions), *messages[1:]]
        return [ChatMessage("system", instructions), *messages]
    for i, message in enumerate(messages):
        if message.role == "user":
            joined = instructions + "\n\n" + (message.content or "")
            return [*messages[:i], _with(message, content=joined), *messages[i + 1:]]
    return [ChatMessage("user", instructions), *messages]


def _render_history(messages: Sequence[ChatMessage]) -> list[ChatMessage]:
    names: dict[str, str] = {}  # tool_call_id -> function name, for the results
    out: list[ChatMessage] = []
    results_at: int | None = None  # the user turn that collects consecutive tool results
    for message in messages:
        if message.role in ("tool", "function"):
            block = _render_result(message, names)
            if results_at is None:
                out.append(ChatMessage("user", block))
                results_at = len(out) - 1
            else:
                out[results_at] = _append(out[results_at], block)
            continue
        if message.role == "user" and results_at is not None:
            out[results_at] = _append(out[results_at], message.content or "")  # keep alternation
        elif message.role == "assistant" and message.extra.get("tool_calls"):
            out.append(_render_calls(message, names))
        else:
            out.append(message)
        results_at = None
    return out


def _render_calls(message: ChatMessage, names: dict[str, str]) -> ChatMessage:
    blocks = []
    for call in message.extra["tool_calls"]:
        function = function_of(call)
        name = str(function.get("name", ""))
        if call.get("id"):
            names[str(call["id"])] = name
        payload = {"name": name, "arguments": _arguments_value(function.get("arguments"))}
        blocks.append("<tool_call>\n" + json.dumps(payload, ensure_ascii=False) + "\n</tool_call>")
    text = "\n".join(filter(None, [message.content or "", *blocks]))
    extra = {k: v for k, v in message.extra.items() if k != "tool_calls"}
    return _with(message, content=text, extra=extra)


def _arguments_value(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return arguments
    return {} if arguments is None else arguments


def _render_result(message: ChatMessage, names: dict[str, str]) -> str:
    call_id = message.extra.get("tool_call_id")
    name = message.name or (names.get(str(call_id)) if call_id else None)
    attributes = "".join(f' {key}={json.dumps(str(value), ensure_ascii=False)}'
                         for key, value in (("name", name), ("id", call_id)) if value)
    return f"<tool_response{attributes}>\n{message.content or ''}\n</tool_response>"


def _append(message: ChatMessage, text: str) -> ChatMessage:
    joined = "\n\n".join(filter(None, [message.content or "", text]))
    return _with(message, content=joined)


def _with(message: ChatMessage, **changes: Any) -> ChatMessage:
    fields: dict[str, Any] = {"role": message.role, "content": message.content,
                              "name": message.name, "extra": message.extra}
    fields.update(changes)
    return ChatMessage(**fields)
