"""Pure translation of Ollama's tools, format, think and logprobs fields.

tools (OpenAI-style function tools) -> ToolSpec list; the model calls them when it chooses
(Ollama has no tool_choice). format "json" -> any JSON object, a JSON Schema object -> that
schema. think true/false turns the model's thinking on or off; "low"/"medium"/"high" turn it on
and reach the template as `reasoning_effort` (the variable gpt-oss templates read). Thinking
is returned in `thinking`, never in the content; with think false it is dropped.
logprobs true returns each generated token's logprob (thinking tokens too, as Ollama does)
with top_logprobs (0-20) alternatives; top_logprobs above 0 without logprobs is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lmserve.core.errors import invalid
from lmserve.core.request import ResponseFormat, ToolSpec, function_tool
from lmserve.dialects.ollama.schema import GenerationFields


def tool_specs(tools: list[dict[str, Any]] | None) -> list[ToolSpec] | None:
    return [_tool(tool, i) for i, tool in enumerate(tools)] if tools else None


def _tool(tool: Mapping[str, Any], index: int) -> ToolSpec:
    where = f"tools[{index}]"
    if tool.get("type", "function") != "function":
        raise invalid(f"{where}.type: only function tools are supported", param=f"{where}.type")
    function = tool.get("function")
    if not isinstance(function, Mapping):
        raise invalid(f"{where}.function is required and must be an object",
                      param=f"{where}.function")
    return function_tool(function, f"{where}.function")


def output_fields(body: GenerationFields) -> dict[str, Any]:
    """GenerationRequest fields for format, think and logprobs."""
    fields: dict[str, Any] = {"response_format": _format(body.format),
                              "logprobs": _logprobs(body)}
    if body.think is not None:
        fields["reasoning"] = body.think is not False
    if isinstance(body.think, str):
        fields["template_kwargs"] = {"reasoning_effort": body.think}
    return fields


def _logprobs(body: GenerationFields) -> int | None:
    top = body.top_logprobs
    if top is not None and not 0 <= top <= 20:
        raise invalid("top_logprobs must be between 0 and 20", param="top_logprobs")
    if body.logprobs:
        return top or 0
    if top:
        raise invalid("top_logprobs needs logprobs: true", param="top_logprobs")
    return None


def shows_thinking(body: GenerationFields) -> bool:
    return body.think is not False


def _format(value: str | dict[str, Any] | None) -> ResponseFormat | None:
    if value in (None, ""):
        return None
    if value == "json":
        return ResponseFormat("json_object", param="format")
    if isinstance(value, dict):
        return ResponseFormat("json_schema", schema=value, param="format")
    raise invalid(f"invalid format {value!r}: send \"json\" or a JSON Schema object",
                  param="format")
