"""Pure translation: a native request (transport, prompt/messages, params) -> GenerationRequest."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lmserve.core.errors import invalid
from lmserve.core.request import ChatMessage, GenerationRequest, SamplingParams
from lmserve.dialects.native.schema import GenerateBody
from lmserve.dialects.native.tools import chat_message, tool_fields

_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
             "frequency_penalty", "repetition_penalty")
_RANGES = {"temperature": (0.0, 2.0), "top_p": (0.0, 1.0), "min_p": (0.0, 1.0),
           "presence_penalty": (-2.0, 2.0), "frequency_penalty": (-2.0, 2.0),
           "repetition_penalty": (0.0, 10.0)}


@dataclass(frozen=True)
class Native:
    """What a native request resolved to, besides the engine request."""

    request: GenerationRequest
    transport: str
    reasoning: bool


def generation_request(body: GenerateBody, *, defaults: Mapping[str, Any],
                       default_transport: str, has_template: bool,
                       reasoning_default: bool) -> Native:
    params = {**defaults, **(body.params or {})}
    transport = body.transport or default_transport
    if transport != "raw" and not has_template:
        raise invalid(f"transport '{transport}' needs a chat template and this model has none; "
                      "use transport 'raw'", param="transport")
    reasoning = bool(params.pop("reasoning", reasoning_default))
    request = GenerationRequest(
        sampling=_sampling(params),
        max_tokens=_max_tokens(params.get("max_tokens")),
        stop=_stops(params.get("stop")),
        reasoning=reasoning if transport != "raw" else None,
        **tool_fields(body),
    )
    if transport == "raw":
        _forbid(body, transport, "system", "messages")
        request.prompt = _required(body.prompt, "prompt", transport)
    elif transport == "chat":
        _forbid(body, transport, "messages")
        prompt = _required(body.prompt, "prompt", transport)
        system = [ChatMessage("system", body.system)] if body.system else []
        request.messages = [*system, ChatMessage("user", prompt)]
    else:
        _forbid(body, transport, "prompt", "system")
        if not body.messages:
            raise invalid("transport 'conversation' needs a non-empty 'messages' list",
                          param="messages")
        request.messages = [chat_message(m) for m in body.messages]
    return Native(request=request, transport=transport, reasoning=reasoning)


def _sampling(params: Mapping[str, Any]) -> SamplingParams:
    values = {k: params[k] for k in _SAMPLING if params.get(k) is not None}
    for key, (lo, hi) in _RANGES.items():
        if key in values and not lo <= values[key] <= hi:
            raise invalid(f"'params.{key}' must be between {lo} and {hi}", param=f"params.{key}")
    if values.get("top_k", 0) < 0:
        raise invalid("'params.top_k' must be 0 (off) or positive", param="params.top_k")
    return SamplingParams(**values)


def _max_tokens(value: Any) -> int | None:
    if value is None:
        return None
    if value < 1:
        raise invalid("'params.max_tokens' must be at least 1", param="params.max_tokens")
    return int(value)


def _stops(value: Any) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else [s for s in value if s]


def _required(value: str | None, field: str, transport: str) -> str:
    if value is None:
        raise invalid(f"transport '{transport}' needs '{field}'", param=field)
    return value


def _forbid(body: GenerateBody, transport: str, *fields: str) -> None:
    for field in fields:
        if getattr(body, field) is not None:
            raise invalid(f"'{field}' does not go with transport '{transport}'", param=field)
