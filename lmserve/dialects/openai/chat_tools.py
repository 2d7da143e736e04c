"""Pure translation of the chat request's tool, structured-output and reasoning fields.

tools / tool_choice / parallel_tool_calls -> ToolSpec list, ToolChoice, bool;
response_format text | json_object | json_schema -> ResponseFormat (None for text);
reasoning_effort "none" turns thinking off, any other effort turns it on and reaches the
template as `reasoning_effort` (the variable gpt-oss templates read).
The legacy functions / function_call pair is refused: its replies have another shape
(message.function_call), and every current client sends tools.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lmserve.core.errors import invalid, unsupported
from lmserve.core.request import NamedTool, ResponseFormat, ToolChoice, ToolSpec, function_tool
from lmserve.dialects.openai.schema import ChatCompletionRequest

_LEGACY = "the legacy functions API is not supported; send tools and tool_choice"


def tool_fields(body: ChatCompletionRequest) -> dict[str, Any]:
    """GenerationRequest fields for tools, structured output and reasoning."""
    if body.functions:
        raise unsupported("functions", _LEGACY)
    if body.function_call not in (None, "none", "auto"):
        raise unsupported("function_call", _LEGACY)
    tools = [_tool(tool, i) for i, tool in enumerate(body.tools or [])]
    fields: dict[str, Any] = {
        "tools": tools or None, "tool_choice": _tool_choice(body.tool_choice, tools),
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "response_format": response_format(body.response_format),
    }
    effort = body.reasoning_effort
    if effort is not None:
        fields["reasoning"] = effort != "none"
    return fields


def effort_kwargs(body: ChatCompletionRequest) -> dict[str, Any]:
    if body.reasoning_effort in (None, "none"):
        return {}
    return {"reasoning_effort": body.reasoning_effort}


def _tool(tool: Mapping[str, Any], index: int) -> ToolSpec:
    where = f"tools[{index}]"
    if tool.get("type", "function") != "function":
        raise invalid(f"{where}.type: only function tools are supported, not "
                      f"{tool.get('type')!r}", param=f"{where}.type")
    function = tool.get("function")
    if not isinstance(function, Mapping):
        raise invalid(f"{where}.function is required and must be an object",
                      param=f"{where}.function")
    return function_tool(function, f"{where}.function")


def _tool_choice(choice: str | dict[str, Any] | None, tools: list[ToolSpec]) -> ToolChoice:
    if choice is None or choice == "auto":
        return "auto"
    if choice in ("none", "required"):
        return choice  # type: ignore[return-value]
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name")
        if not isinstance(name, str) or not name:
            raise invalid("tool_choice.function.name is required",
                          param="tool_choice.function.name")
        if name not in {tool.name for tool in tools}:
            raise invalid(f"tool_choice names the function '{name}', which is not among the "
                          "tools", param="tool_choice.function.name")
        return NamedTool(name)
    if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        raise unsupported("tool_choice", "allowed_tools is not supported; send the tools to "
                          "offer and tool_choice auto or required")
    raise invalid("tool_choice must be 'none', 'auto', 'required' or "
                  '{"type": "function", "function": {"name": ...}}', param="tool_choice")


def response_format(raw: dict[str, Any] | None) -> ResponseFormat | None:
    if raw is None:
        return None
    kind = raw.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return ResponseFormat("json_object")
    if kind == "json_schema":
        spec = raw.get("json_schema")
        if not isinstance(spec, Mapping):
            raise invalid("response_format.json_schema is required for type json_schema",
                          param="response_format.json_schema")
        schema = spec.get("schema", {})
        if not isinstance(schema, (Mapping, bool)):
            raise invalid("response_format.json_schema.schema must be a JSON Schema object",
                          param="response_format.json_schema.schema")
        return ResponseFormat("json_schema", schema=schema if isinstance(schema, bool)
                              else dict(schema), strict=bool(spec.get("strict")),
                              param="response_format.json_schema")
    raise invalid("response_format.type must be text, json_object or json_schema",
                  param="response_format.type")
