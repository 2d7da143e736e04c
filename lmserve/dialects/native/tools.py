"""Pure translation of a native request's tools, tool_choice and format, and of the tool calls
and results in a conversation.

tools: [{"name", "description"?, "parameters"?}] (the OpenAI {"type": "function",
"function": {...}} wrapping is accepted too). tool_choice: "auto" (default), "none",
"required", or {"name": ...} to force that function; parallel_tool_calls false allows one call
per reply. format: "json", {"type": "json_schema",
"schema": {...}}, {"type": "regex", "pattern": "..."} or {"type": "gbnf", "grammar": "..."}.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from lmserve.core.errors import invalid
from lmserve.core.request import (
    ChatMessage,
    NamedTool,
    ResponseFormat,
    ToolChoice,
    ToolSpec,
    function_tool,
)
from lmserve.dialects.native.schema import GenerateBody, Message

_FORMAT_FIELDS = {"json_schema": "schema", "regex": "pattern", "gbnf": "grammar"}


def tool_fields(body: GenerateBody) -> dict[str, Any]:
    tools = [_tool(tool, i) for i, tool in enumerate(body.tools or [])]
    return {"tools": tools or None, "tool_choice": _choice(body.tool_choice, tools),
            "parallel_tool_calls": body.parallel_tool_calls,
            "response_format": _format(body.format)}


def chat_message(message: Message, content: str) -> ChatMessage:
    """The message with `content`, its text (dialects.native.content reads parts)."""
    role = "system" if message.role == "developer" else message.role
    extra: dict[str, Any] = {}
    if message.tool_calls:
        extra["tool_calls"] = [
            {"id": call.id, "type": "function",
             "function": {"name": call.name, "arguments": call.arguments
                          if isinstance(call.arguments, str) else json.dumps(call.arguments)}}
            for call in message.tool_calls]
    if message.tool_call_id:
        extra["tool_call_id"] = message.tool_call_id
    return ChatMessage(role, content, name=message.name, extra=extra)


def _tool(tool: Mapping[str, Any], index: int) -> ToolSpec:
    where = f"tools[{index}]"
    function = tool.get("function") if tool.get("type") == "function" else tool
    if not isinstance(function, Mapping):
        raise invalid(f"{where}.function must be an object", param=f"{where}.function")
    return function_tool(function, where if function is tool else f"{where}.function")


def _choice(choice: str | dict[str, Any] | None, tools: list[ToolSpec]) -> ToolChoice:
    if choice is None:
        return "auto"
    if isinstance(choice, str):
        return choice  # type: ignore[return-value]  # the schema allows only the three names
    name = choice.get("name")
    if set(choice) != {"name"} or not isinstance(name, str):
        raise invalid('tool_choice must be "auto", "none", "required" or {"name": ...}',
                      param="tool_choice")
    if name not in {tool.name for tool in tools}:
        raise invalid(f"tool_choice names '{name}', which is not among the tools",
                      param="tool_choice.name")
    return NamedTool(name)


def _format(fmt: str | dict[str, Any] | None) -> ResponseFormat | None:
    if fmt is None:
        return None
    if fmt == "json":
        return ResponseFormat("json_object", param="format")
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    field = _FORMAT_FIELDS.get(kind or "")
    if field is None or not isinstance(fmt, dict) or field not in fmt:
        raise invalid('format must be "json" or {"type": "json_schema", "schema": ...}, '
                      '{"type": "regex", "pattern": ...} or {"type": "gbnf", "grammar": ...}',
                      param="format")
    value = fmt[field]
    expected = (dict, bool) if field == "schema" else (str,)
    if not isinstance(value, expected):
        raise invalid(f"format.{field} has the wrong type", param=f"format.{field}")
    return ResponseFormat(kind, **{field: value}, param=f"format.{field}")  # type: ignore[arg-type]
