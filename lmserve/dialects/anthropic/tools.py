"""Pure translation of the Messages request's tools, tool_choice, thinking and output_config.

tools (custom tools with an input_schema) -> ToolSpec; tool_choice auto | any | tool | none
(+ disable_parallel_tool_use) -> ToolChoice; thinking enabled | adaptive | disabled ->
whether the model thinks and whether thinking blocks are shown; output_config.format
json_schema -> ResponseFormat.

thinking.budget_tokens is checked as Anthropic checks it (at least 1024, below max_tokens); a
local model's reasoning cannot be cut at a budget, so max_tokens is what bounds it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lmserve.core.errors import invalid, unsupported
from lmserve.core.request import NamedTool, ResponseFormat, ToolChoice, ToolSpec
from lmserve.dialects.anthropic.schema import MessagesBase

MIN_THINKING_BUDGET = 1024


@dataclass(frozen=True)
class Thinking:
    """reasoning: the template's enable_thinking (None: the model's default);
    display: "summarized" (thinking blocks carry the text), "omitted" (blocks without it),
    None (no thinking blocks: the reasoning is dropped)."""

    reasoning: bool | None = False
    display: str | None = None


def tool_fields(body: MessagesBase) -> dict[str, Any]:
    """GenerationRequest fields for tools and structured output."""
    tools = [_tool(tool, i) for i, tool in enumerate(body.tools or [])]
    choice, parallel = _tool_choice(body.tool_choice, tools)
    return {"tools": tools or None, "tool_choice": choice, "parallel_tool_calls": parallel,
            "response_format": _output_format(body.output_config)}


def thinking(body: MessagesBase, max_tokens: int | None) -> Thinking:
    config = body.thinking
    kind = (config or {}).get("type", "disabled")
    display = (config or {}).get("display") or "summarized"
    if display not in ("summarized", "omitted"):
        raise invalid("thinking.display must be summarized or omitted", param="thinking.display")
    if kind == "disabled":
        return Thinking(False, None)
    if kind == "adaptive":
        return Thinking(None, display)
    if kind == "enabled":
        _check_budget((config or {}).get("budget_tokens"), max_tokens)
        return Thinking(True, display)
    if kind == "between_tools":
        raise unsupported("thinking.type", "interleaved thinking between tool calls is not "
                          "available; use enabled or adaptive")
    raise invalid("thinking.type must be enabled, adaptive or disabled", param="thinking.type")


def _check_budget(budget: Any, max_tokens: int | None) -> None:
    if not isinstance(budget, int) or isinstance(budget, bool):
        raise invalid("thinking.budget_tokens is required and must be an integer",
                      param="thinking.budget_tokens")
    if budget < MIN_THINKING_BUDGET:
        raise invalid(f"thinking.budget_tokens must be at least {MIN_THINKING_BUDGET}",
                      param="thinking.budget_tokens")
    if max_tokens is not None and budget >= max_tokens:
        raise invalid("max_tokens must be greater than thinking.budget_tokens",
                      param="thinking.budget_tokens")


def _tool(tool: Mapping[str, Any], index: int) -> ToolSpec:
    where = f"tools[{index}]"
    if tool.get("type") not in (None, "custom"):
        raise unsupported(f"{where}.type", f"server tool '{tool.get('type')}' is not available "
                          "here; only custom tools (name, description, input_schema) are")
    name = tool.get("name")
    if not isinstance(name, str) or not name:
        raise invalid(f"{where}.name is required", param=f"{where}.name")
    schema = tool.get("input_schema")
    if not isinstance(schema, Mapping):
        raise invalid(f"{where}.input_schema is required and must be a JSON Schema object",
                      param=f"{where}.input_schema")
    if tool.get("defer_loading"):
        raise unsupported(f"{where}.defer_loading", "there is no tool search here")
    if tool.get("allowed_callers") not in (None, ["direct"]):
        raise unsupported(f"{where}.allowed_callers", "tools are called by the model directly")
    return ToolSpec(name=name, description=_description(tool), parameters=dict(schema),
                    strict=bool(tool.get("strict")))


def _description(tool: Mapping[str, Any]) -> str | None:
    """The description, with input_examples appended so the model sees them."""
    text = tool.get("description") if isinstance(tool.get("description"), str) else None
    examples = tool.get("input_examples")
    if not examples:
        return text
    shown = "\n".join(json.dumps(example, ensure_ascii=False) for example in examples)
    return f"{text or ''}\nExample inputs:\n{shown}".strip()


def _tool_choice(choice: Mapping[str, Any] | None, tools: list[ToolSpec]
                 ) -> tuple[ToolChoice, bool]:
    if choice is None:
        return "auto", True
    parallel = not choice.get("disable_parallel_tool_use", False)
    kind = choice.get("type")
    if kind in ("auto", "none"):
        return kind, parallel
    if kind == "any":
        return "required", parallel
    if kind == "tool":
        name = choice.get("name")
        if not isinstance(name, str) or name not in {tool.name for tool in tools}:
            raise invalid(f"tool_choice.name: '{name}' is not one of the tools",
                          param="tool_choice.name")
        return NamedTool(name), parallel
    raise invalid("tool_choice.type must be auto, any, tool or none", param="tool_choice.type")


def _output_format(config: Mapping[str, Any] | None) -> ResponseFormat | None:
    config = config or {}
    if config.get("effort") is not None:
        raise unsupported("output_config.effort", "a local model's effort cannot be steered")
    fmt = config.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, Mapping) or fmt.get("type") != "json_schema":
        raise invalid("output_config.format.type must be json_schema",
                      param="output_config.format.type")
    schema = fmt.get("schema")
    if not isinstance(schema, Mapping):
        raise invalid("output_config.format.schema is required and must be a JSON Schema",
                      param="output_config.format.schema")
    return ResponseFormat("json_schema", schema=dict(schema), strict=True,
                          param="output_config.format.schema")
