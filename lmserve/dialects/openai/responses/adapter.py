"""Pure translation: a Responses request -> checks, then a core.GenerationRequest.

Refused until their issues land, each with a 400 naming the parameter: tools (function tools
are checked, then refused) and a forced tool_choice, structured output (text.format
json_schema / json_object), reasoning controls, logprobs, background mode, conversations and
prompt templates.
"""

from __future__ import annotations

from typing import Any

from lmserve.core.errors import invalid, unsupported
from lmserve.core.request import ChatMessage, GenerationRequest, SamplingParams
from lmserve.dialects.openai.responses.schema import JSON, ResponseCreate

METADATA_KEYS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512

_LATER_TOOLS = "tool calling arrives in a later release"
# include values that name items this server never produces, so they are honoured vacuously
_INCLUDABLE = {"file_search_call.results", "web_search_call.results",
               "web_search_call.action.sources", "message.input_image.image_url",
               "computer_call_output.output.image_url", "code_interpreter_call.outputs",
               "reasoning.encrypted_content"}


def check_request(body: ResponseCreate) -> None:
    """Every parameter is either honoured or refused here."""
    check_metadata(body.metadata)
    _check_tools(body)
    _check_text(body.text)
    _check_reasoning(body.reasoning)
    check_include(body.include)
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
    for i, tool in enumerate(body.tools or []):
        if tool.get("type") != "function":
            raise invalid(f"tools[{i}].type: only function tools are supported, not "
                          f"{tool.get('type')!r}", param=f"tools[{i}].type")
        if not isinstance(tool.get("name"), str) or not tool["name"]:
            raise invalid(f"tools[{i}].name is required", param=f"tools[{i}].name")
    if body.tools:
        raise unsupported("tools", _LATER_TOOLS)
    if body.tool_choice not in (None, "none", "auto"):
        raise unsupported("tool_choice", _LATER_TOOLS)


def _check_text(text: JSON | None) -> None:
    fmt = (text or {}).get("format") or {"type": "text"}
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind in ("json_schema", "json_object"):
        raise unsupported("text.format", "structured output arrives in a later release")
    if kind != "text":
        raise invalid("text.format.type must be text, json_schema or json_object",
                      param="text.format.type")
    if (text or {}).get("verbosity") not in (None, "medium"):
        raise unsupported("text.verbosity", "the model's verbosity cannot be steered")


def _check_reasoning(reasoning: JSON | None) -> None:
    for key, value in (reasoning or {}).items():
        if value is not None:
            raise unsupported(f"reasoning.{key}", "reasoning controls arrive in a later release")


def check_include(include: list[str] | None) -> None:
    for value in include or []:
        if value == "message.output_text.logprobs":
            raise unsupported("include", "logprobs arrive in a later release")
        if value not in _INCLUDABLE:
            raise invalid(f"include: unknown value {value!r}", param="include")


def _check_service_features(body: ResponseCreate) -> None:
    if body.background:
        raise unsupported("background", "responses run while the request is open")
    if body.conversation is not None:
        raise unsupported("conversation", "chain responses with previous_response_id")
    if body.prompt is not None:
        raise unsupported("prompt", "this server keeps no prompt templates")
    if body.top_logprobs:
        raise unsupported("top_logprobs", "logprobs arrive in a later release")
    if body.service_tier not in (None, "auto", "default"):
        raise unsupported("service_tier", "this server has one service tier")


def generation_request(body: ResponseCreate, messages: list[ChatMessage]) -> GenerationRequest:
    stop = [body.stop] if isinstance(body.stop, str) else [s for s in body.stop or [] if s]
    return GenerationRequest(model=body.model, messages=messages, sampling=_sampling(body),
                             max_tokens=body.max_output_tokens, stop=stop,
                             ignore_eos=body.ignore_eos)


def _sampling(body: ResponseCreate) -> SamplingParams:
    chosen: dict[str, Any] = {
        "temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k,
        "min_p": body.min_p, "seed": body.seed, "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "repetition_penalty": body.repetition_penalty}
    return SamplingParams().replace(**{k: v for k, v in chosen.items() if v is not None})

