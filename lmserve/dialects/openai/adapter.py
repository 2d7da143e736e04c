"""Pure translation: OpenAI wire models -> core.GenerationRequest."""

from __future__ import annotations

from typing import Any, TypeVar

from lmserve.core.errors import invalid, unsupported
from lmserve.core.images import (
    ImageInput,
    audio_from_input,
    audio_from_url,
    image_from_url,
    joined_offset,
)
from lmserve.core.lifecycle import keep_alive_seconds
from lmserve.core.lora import selection_field
from lmserve.core.request import ChatMessage, GenerationRequest, SamplingParams
from lmserve.dialects.given import explicit
from lmserve.dialects.openai.chat_tools import effort_kwargs, tool_fields
from lmserve.dialects.openai.schema import (
    ChatCompletionRequest,
    ChatMessageIn,
    CompletionRequest,
    OtherPart,
    PromptField,
    SamplingFields,
    TextPart,
)


def sampling_from(body: SamplingFields) -> SamplingParams:
    defaults = SamplingParams()
    logit_bias: dict[int, float] = {}
    for key, value in (body.logit_bias or {}).items():
        try:
            logit_bias[int(key)] = value
        except ValueError:
            raise invalid(f"logit_bias keys must be token ids, got {key!r}",
                          param="logit_bias") from None
    return SamplingParams(
        temperature=_pick(body.temperature, defaults.temperature),
        top_p=_pick(body.top_p, defaults.top_p),
        top_k=_pick(body.top_k, defaults.top_k),
        min_p=_pick(body.min_p, defaults.min_p),
        seed=body.seed,
        presence_penalty=_pick(body.presence_penalty, defaults.presence_penalty),
        frequency_penalty=_pick(body.frequency_penalty, defaults.frequency_penalty),
        repetition_penalty=_pick(body.repetition_penalty, defaults.repetition_penalty),
        logit_bias=logit_bias,
    )


# Fields of OpenAI's chat API whose effect on the answer lmserve cannot deliver: refused by
# name (docs/architecture.md, "Unknown fields"). Its bookkeeping fields (store, metadata,
# service_tier, prompt_cache_key, safety_identifier, prediction) change no answer: they are
# ignored and named in X-Lmserve-Ignored-Fields like any unknown field.
_UNIMPLEMENTED_CHAT = {
    "audio": "audio output is not available from this server",
    "web_search_options": "this server does not search the web",
}
_ONLY_VALUE_CHAT = {"modalities": (["text"], "only text output is available"),
                    "verbosity": ("medium", "the model's verbosity cannot be steered")}


def _refuse_unimplemented(extra: dict[str, Any]) -> None:
    for name, reason in _UNIMPLEMENTED_CHAT.items():
        if extra.get(name) is not None:
            raise unsupported(name, reason)
    for name, (only, reason) in _ONLY_VALUE_CHAT.items():
        if extra.get(name) not in (None, only):
            raise unsupported(name, reason)


_T = TypeVar("_T")


def _pick(value: _T | None, default: _T) -> _T:
    return default if value is None else value


def _stops(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else [s for s in stop if s]


# Chat fields -> the neutral ones they set (the rest keep their names).
_CHAT_NAMES = {"max_completion_tokens": "max_tokens", "reasoning_effort": "reasoning"}


def chat_request(body: ChatCompletionRequest) -> GenerationRequest:
    if body.max_tokens is not None and body.max_completion_tokens is not None \
            and body.max_tokens != body.max_completion_tokens:
        raise invalid("max_tokens and max_completion_tokens disagree; send one of them",
                      param="max_completion_tokens")
    _refuse_unimplemented(body.model_extra or {})
    _check_continuation(body)
    return GenerationRequest(
        model=body.model,
        keep_alive=keep_alive_seconds((body.model_extra or {}).get("keep_alive")),
        messages=[_message(m, i) for i, m in enumerate(body.messages)],
        sampling=sampling_from(body),
        max_tokens=body.max_completion_tokens or body.max_tokens,
        stop=_stops(body.stop),
        stop_token_ids=list(body.stop_token_ids or []),
        ignore_eos=body.ignore_eos,
        n=body.n,
        logprobs=_chat_logprobs(body),
        continuous_usage=_continuous_usage(body),
        add_generation_prompt=body.add_generation_prompt,
        continue_final_message=body.continue_final_message,
        template_kwargs={**effort_kwargs(body), **(body.chat_template_kwargs or {})},
        context_overflow=body.context_overflow,
        lora=selection_field(body.lora, "lora"),
        priority=body.priority,
        explicit=explicit(body, _CHAT_NAMES),
        **tool_fields(body),
    )


def _check_continuation(body: ChatCompletionRequest) -> None:
    """vLLM's continue_final_message: the reply continues the final assistant message, so no
    generation prompt may open a turn after it."""
    if not body.continue_final_message:
        return
    if body.add_generation_prompt:
        raise invalid("continue_final_message needs add_generation_prompt to be false",
                      param="add_generation_prompt", code="invalid_value")
    if body.messages[-1].role != "assistant":
        raise invalid("continue_final_message continues the final message, which must be an "
                      "assistant message", param=f"messages[{len(body.messages) - 1}].role",
                      code="invalid_value")


def _continuous_usage(body: SamplingFields) -> bool:
    """vLLM's stream_options.continuous_usage_stats: every chunk carries the usage so far."""
    return bool(body.stream and body.stream_options and
                body.stream_options.continuous_usage_stats)


def _chat_logprobs(body: ChatCompletionRequest) -> int | None:
    """logprobs: true turns them on; top_logprobs (0-20) adds alternatives and needs it."""
    if body.logprobs:
        return body.top_logprobs or 0
    if body.top_logprobs:
        raise invalid("top_logprobs requires logprobs to be true", param="top_logprobs")
    return None


def _message(message: ChatMessageIn, index: int) -> ChatMessage:
    role = "system" if message.role == "developer" else message.role
    content, images = _content(message, role, index)
    if content is None and role != "assistant":
        raise invalid(f"messages[{index}] ({role}) has no content",
                      param=f"messages[{index}].content")
    extra: dict[str, Any] = {}
    if message.tool_calls:
        extra["tool_calls"] = [dict(c) for c in message.tool_calls]
    if message.tool_call_id:
        extra["tool_call_id"] = message.tool_call_id
    return ChatMessage(role=role, content=content if content is not None else "",
                       name=message.name, extra=extra, images=images)


def _content(message: ChatMessageIn, role: str, index: int
             ) -> tuple[str | None, tuple[ImageInput, ...]]:
    """The text of the content parts, joined, and the media between them: image_url,
    input_audio (base64 WAV or MP3) and audio_url (vLLM's and llama.cpp's part for a clip's
    URL) parts."""
    if not isinstance(message.content, list):
        return message.content, ()
    texts: list[str] = []
    images: list[ImageInput] = []
    for j, part in enumerate(message.content):
        param = f"messages[{index}].content[{j}]"
        if part.type == "text":
            texts.append(getattr(part, "text", ""))
        elif part.type == "image_url" and role == "user":
            images.append(_image(part, param).at(joined_offset(texts)))
        elif part.type in ("input_audio", "audio_url") and role == "user":
            images.append(_audio(part, param).at(joined_offset(texts)))
        else:
            allowed = "text, image_url, input_audio or audio_url" if role == "user" else "text"
            raise invalid(f"content part type '{part.type}' is not supported in a {role} "
                          f"message; send {allowed} parts", param=f"{param}.type",
                          code="unsupported_content")
    return "\n".join(texts), tuple(images)


def _image(part: OtherPart | TextPart, param: str) -> ImageInput:
    value = getattr(part, "image_url", None)
    if not isinstance(value, dict):
        raise invalid(f"{param}.image_url must be an object with a 'url'",
                      param=f"{param}.image_url")
    return image_from_url(value.get("url"), f"{param}.image_url", detail=value.get("detail"))


def _audio(part: OtherPart | TextPart, param: str) -> ImageInput:
    if part.type == "input_audio":
        return audio_from_input(getattr(part, "input_audio", None), f"{param}.input_audio")
    value = getattr(part, "audio_url", None)  # {"url": ...}, or the URL itself
    url = value.get("url") if isinstance(value, dict) else value
    return audio_from_url(url, f"{param}.audio_url")


def completion_prompts(prompt: PromptField) -> list[str | list[int]]:
    """Split the prompt field into one prompt per completion (text or token ids)."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise invalid("prompt must not be empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    out: list[str | list[int]] = []
    for i, item in enumerate(prompt):
        if isinstance(item, list) and not item:
            raise invalid(f"prompt[{i}] is empty", param="prompt")
        out.append(item)  # type: ignore[arg-type]
    return out


def completion_request(body: CompletionRequest, prompt: str | list[int]) -> GenerationRequest:
    if body.suffix:
        raise unsupported("suffix", "fill-in-the-middle is not available for this model")
    if body.best_of is not None and body.best_of != body.n:
        raise unsupported("best_of", "only best_of equal to n is supported")
    if (body.model_extra or {}).get("context_overflow") not in (None, "error"):
        raise unsupported("context_overflow", "a raw prompt has no turns to drop; a prompt "
                          "that does not fit the context is refused")
    return GenerationRequest(
        model=body.model,
        keep_alive=keep_alive_seconds((body.model_extra or {}).get("keep_alive")),
        prompt=prompt if isinstance(prompt, str) else None,
        prompt_tokens=prompt if isinstance(prompt, list) else None,
        sampling=sampling_from(body),
        max_tokens=body.max_tokens if body.max_tokens is not None else 16,
        stop=_stops(body.stop),
        stop_token_ids=list(body.stop_token_ids or []),
        ignore_eos=body.ignore_eos,
        n=body.n,
        logprobs=body.logprobs,
        prompt_logprobs=body.logprobs if body.echo else None,  # echo shows the prompt's too
        continuous_usage=_continuous_usage(body),
        lora=selection_field(body.lora, "lora"),
        priority=body.priority,
        explicit=explicit(body),
    )
