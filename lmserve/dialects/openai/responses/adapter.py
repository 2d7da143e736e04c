"""Pure translation: a Responses request -> checks, then a core.GenerationRequest.

Function tools (tool_choice, parallel_tool_calls), structured output (text.format
json_schema / json_object), reasoning.effort and output logprobs (include
message.output_text.logprobs, top_logprobs) become the neutral request's fields. Refused, each
with a 400 naming the parameter: hosted tools, allowed_tools, efforts beyond on/off, background
mode, conversations and prompt templates.
"""

from __future__ import annotations

from typing import Any, Literal

from lmserve.core.errors import invalid, unsupported
from lmserve.core.lifecycle import keep_alive_seconds
from lmserve.core.request import (
    ChatMessage,
    FieldNames,
    GenerationRequest,
    NamedTool,
    ResponseFormat,
    SamplingParams,
    ToolChoice,
    ToolSpec,
    function_tool,
)
from lmserve.dialects.given import explicit
from lmserve.dialects.openai.responses.schema import JSON, ResponseCreate

METADATA_KEYS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512
# truncation -> the neutral context overflow policy ("auto" drops the oldest turns)
OVERFLOW: dict[str, Literal["error", "truncate"]] = {"auto": "truncate", "disabled": "error"}

# Wire fields -> the neutral ones they set, and back for errors.
_NAMES = {"max_output_tokens": "max_tokens", "truncation": "context_overflow"}
FIELDS = FieldNames(renames={"max_tokens": "max_output_tokens"})

LOGPROBS_INCLUDE = "message.output_text.logprobs"
# reasoning.effort -> thinking on or off; the "on" efforts also reach the template
_EFFORT_OFF, _EFFORT_ON = ("none", "minimal"), ("low", "medium", "high")
_SUMMARIES = ("auto", "concise", "detailed")
# other reasoning keys, and the one value each may take here
_REASONING_ONLY = {"context": "auto", "mode": "standard"}
# include values that name items this server never produces, so they are honoured vacuously;
# logprobs are part of a stored response already when it was created with them
_INCLUDABLE = {LOGPROBS_INCLUDE, "file_search_call.results", "web_search_call.results",
               "web_search_call.action.sources", "message.input_image.image_url",
               "computer_call_output.output.image_url", "code_interpreter_call.outputs",
               "reasoning.encrypted_content"}


def check_request(body: ResponseCreate) -> None:
    """Every parameter is either honoured or refused here."""
    check_metadata(body.metadata)
    _check_tools(body)
    _check_text(body.text)
    reasoning_fields(body.reasoning)
    check_include(body.include)
    logprobs_count(body)
    _check_service_features(body)
    if isinstance(body.input, list) and not body.input and body.previous_response_id is None:
        raise invalid("input must not be empty", param="input")


def check_metadata(metadata: JSON | None) -> None:
    """OpenAI's limits: 16 pairs, keys up to 64 characters, string values up to 512."""
    if metadata is None:
        return
    if len(metadata) > METADATA_KEYS:
        raise invalid(f"metadata may hold at most {METADATA_KEYS} key-value pairs, got "
                      f"{len(metadata)}", param="metadata")
    for key, value in metadata.items():
        if len(key) > METADATA_KEY_CHARS:
            raise invalid(f"metadata keys may be at most {METADATA_KEY_CHARS} characters; "
                          f"{key[:20]!r}... has {len(key)}", param="metadata")
        if not isinstance(value, str):
            raise invalid(f"metadata values must be strings; {key!r} is not",
                          param=f"metadata.{key}")
        if len(value) > METADATA_VALUE_CHARS:
            raise invalid(f"metadata values may be at most {METADATA_VALUE_CHARS} characters; "
                          f"{key!r} has {len(value)}", param=f"metadata.{key}")


def _check_tools(body: ResponseCreate) -> None:
    tools = request_tools(body.tools)
    tool_choice(body.tool_choice, tools)


def request_tools(raw: list[JSON] | None) -> list[ToolSpec]:
    """Function tools; the hosted tools (web search, file search, ...) do not run here."""
    tools = []
    for i, tool in enumerate(raw or []):
        if tool.get("type") != "function":
            raise invalid(f"tools[{i}].type: only function tools are supported, not "
                          f"{tool.get('type')!r}", param=f"tools[{i}].type")
        tools.append(function_tool(tool, f"tools[{i}]"))
    return tools


def tool_choice(raw: str | JSON | None, tools: list[ToolSpec]) -> ToolChoice:
    if raw is None or raw == "auto":
        return "auto"
    if raw == "required" and not tools:
        raise invalid("tool_choice 'required' asks for a tool call but no tools were given",
                      param="tool_choice")
    if raw in ("none", "required"):
        return raw  # type: ignore[return-value]
    kind = raw.get("type") if isinstance(raw, dict) else None
    if isinstance(raw, dict) and kind == "function":
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise invalid("tool_choice.name is required", param="tool_choice.name")
        if name not in {tool.name for tool in tools}:
            raise invalid(f"tool_choice names the function '{name}', which is not among the "
                          "tools", param="tool_choice.name")
        return NamedTool(name)
    if kind == "allowed_tools":
        raise unsupported("tool_choice", "allowed_tools is not supported; send the tools to "
                          "offer and tool_choice auto or required")
    raise invalid("tool_choice must be 'none', 'auto', 'required' or "
                  '{"type": "function", "name": ...}', param="tool_choice")


def _check_text(text: JSON | None) -> None:
    text_format(text)
    if (text or {}).get("verbosity") not in (None, "medium"):
        raise unsupported("text.verbosity", "the model's verbosity cannot be steered")


def text_format(text: JSON | None) -> ResponseFormat | None:
    """text.format: text (None), json_object, or json_schema {name, schema, strict}."""
    fmt = (text or {}).get("format") or {"type": "text"}
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return ResponseFormat("json_object", param="text.format")
    if kind != "json_schema":
        raise invalid("text.format.type must be text, json_schema or json_object",
                      param="text.format.type")
    if not isinstance(fmt.get("name"), str) or not fmt["name"]:
        raise invalid("text.format.name is required for type json_schema",
                      param="text.format.name")
    schema = fmt.get("schema")
    if not isinstance(schema, (dict, bool)):
        raise invalid("text.format.schema is required and must be a JSON Schema object",
                      param="text.format.schema")
    return ResponseFormat("json_schema", schema=schema, strict=bool(fmt.get("strict")),
                          param="text.format.schema")


def reasoning_fields(reasoning: JSON | None) -> dict[str, Any]:
    """reasoning.effort none/minimal turns thinking off; low/medium/high turn it on and reach
    the template as `reasoning_effort` (what gpt-oss templates read). Summaries are accepted,
    but none is written: the reasoning itself comes back as reasoning_text."""
    raw = reasoning or {}
    for key, value in raw.items():
        if key in ("effort", "summary", "generate_summary") or value is None:
            continue
        if value != _REASONING_ONLY.get(key):
            raise unsupported(f"reasoning.{key}", "only reasoning.effort and reasoning.summary "
                              "apply to the models this server runs")
    for key in ("summary", "generate_summary"):
        if raw.get(key) not in (None, *_SUMMARIES):
            raise invalid(f"reasoning.{key} must be one of {', '.join(_SUMMARIES)}",
                          param=f"reasoning.{key}")
    return _effort_fields(raw.get("effort"))


def _effort_fields(effort: Any) -> dict[str, Any]:
    if effort is None:
        return {}
    if effort in _EFFORT_OFF:
        return {"reasoning": False}
    if effort in _EFFORT_ON:
        return {"reasoning": True, "template_kwargs": {"reasoning_effort": effort}}
    if effort in ("xhigh", "max"):
        raise unsupported("reasoning.effort", f"effort {effort!r} is not available: the "
                          "models here reason or not; use none, minimal, low, medium or high")
    raise invalid("reasoning.effort must be one of none, minimal, low, medium or high",
                  param="reasoning.effort")


def reasoning_echo(reasoning: JSON | None) -> JSON:
    """The response's reasoning field: the effort and summary the request chose."""
    raw = reasoning or {}
    return {"effort": raw.get("effort"),
            "summary": raw.get("summary") or raw.get("generate_summary")}


def logprobs_count(body: ResponseCreate) -> int | None:
    """include message.output_text.logprobs turns them on, with top_logprobs alternatives."""
    if LOGPROBS_INCLUDE in (body.include or []):
        return body.top_logprobs or 0
    if body.top_logprobs:
        raise invalid(f"top_logprobs needs include: [\"{LOGPROBS_INCLUDE}\"]",
                      param="top_logprobs")
    return None


def check_include(include: list[str] | None) -> None:
    for value in include or []:
        if value not in _INCLUDABLE:
            raise invalid(f"include: unknown value {value!r}", param="include")


def _check_service_features(body: ResponseCreate) -> None:
    if body.background:
        raise unsupported("background", "responses run while the request is open")
    if body.conversation is not None:
        raise unsupported("conversation", "chain responses with previous_response_id")
    if body.prompt is not None:
        raise unsupported("prompt", "this server keeps no prompt templates")
    if body.service_tier not in (None, "auto", "default"):
        raise unsupported("service_tier", "this server has one service tier")


def generation_request(body: ResponseCreate, messages: list[ChatMessage]) -> GenerationRequest:
    stop = [body.stop] if isinstance(body.stop, str) else [s for s in body.stop or [] if s]
    tools = request_tools(body.tools)
    return GenerationRequest(model=body.model, messages=messages, sampling=_sampling(body),
                             fields=FIELDS, explicit=_explicit(body),
                             max_tokens=body.max_output_tokens, stop=stop,
                             ignore_eos=body.ignore_eos, priority=body.priority,
                             tools=tools or None,
                             tool_choice=tool_choice(body.tool_choice, tools),
                             parallel_tool_calls=body.parallel_tool_calls is not False,
                             response_format=text_format(body.text),
                             context_overflow=OVERFLOW[body.truncation] if body.truncation
                             else None, logprobs=logprobs_count(body),
                             keep_alive=keep_alive_seconds(
                                 (body.model_extra or {}).get("keep_alive")),
                             **reasoning_fields(body.reasoning))


def _explicit(body: ResponseCreate) -> frozenset[str]:
    """What the request set, by neutral name; reasoning only by its effort (a summary alone
    leaves thinking to the model's default)."""
    given = explicit(body, _NAMES)
    return given if (body.reasoning or {}).get("effort") is not None else given - {"reasoning"}


def _sampling(body: ResponseCreate) -> SamplingParams:
    chosen: dict[str, Any] = {
        "temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k,
        "min_p": body.min_p, "seed": body.seed, "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "repetition_penalty": body.repetition_penalty}
    return SamplingParams().replace(**{k: v for k, v in chosen.items() if v is not None})

