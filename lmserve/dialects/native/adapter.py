"""Pure translation: a native request (transport, prompt/messages, params) -> GenerationRequest."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lmserve.core.errors import invalid, unsupported
from lmserve.core.images import (
    ImageInput,
    MediaKind,
    image_from_base64,
    image_from_path,
    image_from_url,
)
from lmserve.core.lora import selection_field
from lmserve.core.request import (
    ChatMessage,
    FieldNames,
    GenerationRequest,
    SamplingParams,
    explicit_fields,
)
from lmserve.dialects.native.content import content_parts
from lmserve.dialects.native.schema import MAX_CONTENT, GenerateBody, ImageIn, Message
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


def generation_request(body: GenerateBody, *, default_transport: str, has_template: bool,
                       reasoning_default: bool) -> Native:
    """The request from the body's `params` (neutral names); the model's defaults fill the rest
    later (core.request.with_defaults), except reasoning: the resource's own default decides
    it when the request does not."""
    params = dict(body.params or {})
    transport = body.transport or default_transport
    if transport != "raw" and not has_template:
        raise invalid(f"transport '{transport}' needs a chat template and this model has none; "
                      "use transport 'raw'", param="transport")
    reasoning = bool(params.pop("reasoning", reasoning_default))
    request = GenerationRequest(
        sampling=_sampling(params), fields=FieldNames("params."),
        explicit=explicit_fields(params) | {"reasoning"},
        max_tokens=_max_tokens(params.get("max_tokens")),
        stop=_stops(params.get("stop")),
        reasoning=reasoning if transport != "raw" else None,
        context_overflow=_context_overflow(params, transport),
        lora=selection_field(params.get("lora"), "params.lora"), priority=body.priority,
        **tool_fields(body),
    )
    if transport == "raw":
        _forbid(body, transport, "system", "messages", "images", "audio")
        prompt = _required(body.prompt, "prompt", transport)
        if not isinstance(prompt, str):
            raise invalid("prompt: transport 'raw' takes a string; content parts (a list) go "
                          "with transport 'chat' or 'conversation'", param="prompt")
        request.prompt = prompt
    elif transport == "chat":
        _forbid(body, transport, "messages")
        text, media = content_parts(_required(body.prompt, "prompt", transport), "prompt",
                                    media=True)
        system = [ChatMessage("system", body.system)] if body.system else []
        request.messages = [*system, ChatMessage("user", text, images=(
            *_images(body.images, "images"), *_images(body.audio, "audio", "audio"),
            *media))]
    else:
        _forbid(body, transport, "prompt", "system", "images", "audio")
        if not body.messages:
            raise invalid("transport 'conversation' needs a non-empty 'messages' list",
                          param="messages")
        request.messages = [_message(m, i) for i, m in enumerate(body.messages)]
    return Native(request=request, transport=transport, reasoning=reasoning)


def _message(message: Message, index: int) -> ChatMessage:
    """A conversation message: its content's text, then its `images` and `audio` lists (before
    the text) and its content's media parts (at their places), in prompt order."""
    param = f"messages[{index}].content"
    text, media = content_parts(message.content, param, media=message.role == "user")
    if len(text) > MAX_CONTENT:
        raise invalid(f"{param}: a message's text may have at most {MAX_CONTENT} characters",
                      param=param, code="invalid_value")
    return dataclasses.replace(chat_message(message, text), images=(
        *_images(message.images, f"messages[{index}].images"),
        *_images(message.audio, f"messages[{index}].audio", "audio"), *media))


def _context_overflow(params: Mapping[str, Any], transport: str) -> Any:
    """The chat's overflow policy. A raw prompt is never cut: a request asking for that is
    refused (a model's default applies to the chat transports only)."""
    if transport != "raw":
        return params.get("context_overflow")
    if params.get("context_overflow") == "truncate":
        raise unsupported("params.context_overflow", "a raw prompt is sent verbatim and never "
                          "cut; a prompt that does not fit the context is refused")
    return None


def _images(images: Sequence[ImageIn] | None, param: str, kind: MediaKind = "image"
            ) -> tuple[ImageInput, ...]:
    """The images (or audio clips) of one message, placed before its text."""
    return tuple(_image(image, f"{param}[{k}]", kind) for k, image in enumerate(images or []))


def _image(image: ImageIn, param: str, kind: MediaKind) -> ImageInput:
    given = [key for key in ("url", "data", "path") if getattr(image, key) is not None]
    if len(given) != 1:
        raise invalid(f"{param} needs exactly one of 'url', 'data' or 'path'", param=param)
    if image.media_type is not None and image.data is None:
        raise invalid(f"{param}.media_type goes with 'data'", param=f"{param}.media_type")
    if image.url is not None:
        return image_from_url(image.url, param, kind=kind)
    if image.data is not None:
        return image_from_base64(image.data, param, image.media_type, kind=kind)
    return image_from_path(image.path, param, kind=kind)


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


def _required(value: str | list[Any] | None, field: str, transport: str) -> str | list[Any]:
    if value is None:
        raise invalid(f"transport '{transport}' needs '{field}'", param=field)
    return value


def _forbid(body: GenerateBody, transport: str, *fields: str) -> None:
    for field in fields:
        if getattr(body, field) is not None:
            raise invalid(f"'{field}' does not go with transport '{transport}'", param=field)
