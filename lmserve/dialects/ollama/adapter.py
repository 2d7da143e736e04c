"""Pure translation: Ollama wire models -> core.GenerationRequest; options -> sampling.

Choices where Ollama and lmserve differ, so that nothing is silently ignored:
- Unknown option keys are refused (Ollama only logs them), so a typo does not pass unnoticed.
- Options lmserve cannot honour with a non-default value (typical_p, tfs_z, mirostat,
  penalize_newline false) are refused; load-time options (num_gpu, num_thread, use_mmap, ...)
  and num_keep cannot change the output here, so they are accepted and named in the response's
  X-Lmserve-Notice header.
- num_ctx smaller than the loaded context is a real per-request window; a larger one is capped
  at the loaded context (clients such as editors send their own num_ctx on every request), and
  the header says so. A prompt that does not fit the window is a 400.
- num_predict -1, -2 and 0 all mean "until the window is full", as in Ollama.
- `truncate` true drops the oldest turns of a chat that does not fit (lmserve.chat.overflow);
  absent, the server's --context-overflow decides (Ollama's own server truncates then, but its
  API docs do not document the field). A raw generate prompt is never cut.
- Unset options take the model's defaults (core.request.with_defaults), else Ollama's
  (temperature 0.8, top_k 40, top_p 0.9, repeat 1.1/64).
- keep_alive (a duration or seconds; 0: unload when idle; negative: forever) rides on the
  request to the model's keep-alive; an empty prompt with keep_alive 0 unloads the model.
- A generate `context` is the token ids of the earlier prompt and reply (EOS included); the next
  prompt is appended token for token, so it continues from the KV the engine kept resident.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pydantic import ValidationError

from lmserve.core import lifecycle
from lmserve.core.errors import ErrorKind, LmserveError, invalid, unsupported
from lmserve.core.images import ImageInput, image_from_base64
from lmserve.core.request import (
    ChatMessage,
    FieldNames,
    GenerationRequest,
    SamplingParams,
    explicit_fields,
)
from lmserve.dialects.ollama.schema import ChatRequest, GenerateRequest, Message, OptionValues
from lmserve.dialects.ollama.tools import output_fields, shows_thinking, tool_specs

T = TypeVar("T")

# Ollama's names of the neutral fields, for errors.
FIELDS = FieldNames("options.", {"repetition_penalty": "repeat_penalty",
                                  "penalty_last_n": "repeat_last_n", "max_tokens": "num_predict"})
# Option names -> the neutral fields they set (the rest keep their names).
_OPTION_NAMES = {"num_predict": "max_tokens", "repeat_penalty": "repetition_penalty"}

OLLAMA_DEFAULTS = SamplingParams(temperature=0.8, top_p=0.9, top_k=40, min_p=0.0,
                                 repetition_penalty=1.1, penalty_last_n=64)

# Options with a single value lmserve implements: the neutral one.
_ONLY_VALUE: dict[str, Any] = {"typical_p": 1.0, "tfs_z": 1.0, "mirostat": 0,
                               "penalize_newline": True}
# Accepted, but they cannot change what is generated: the model was loaded at startup, and
# lmserve never shifts the context (a full window ends the turn with done_reason "length").
NO_EFFECT = frozenset({"mirostat_tau", "mirostat_eta", "num_keep", "numa", "num_batch",
                       "num_gpu", "main_gpu", "low_vram", "f16_kv", "logits_all", "vocab_only",
                       "use_mmap", "use_mlock", "embedding_only", "num_thread"})


@dataclass(frozen=True)
class Options:
    sampling: SamplingParams = OLLAMA_DEFAULTS
    stop: tuple[str, ...] = ()
    num_predict: int | None = None  # None: until the window is full
    num_ctx: int | None = None
    repeat_last_n: int = 64  # -1: the whole window
    given: tuple[str, ...] = ()  # the option keys the request set

    @property
    def without_effect(self) -> list[str]:
        return [key for key in self.given if key in NO_EFFECT]


@dataclass(frozen=True)
class Job:
    request: GenerationRequest
    options: Options
    keep_alive: float | None  # seconds; negative: forever; None: not given
    show_thinking: bool = True  # think: false drops the reasoning


def parse_options(raw: Mapping[str, Any] | None) -> Options:
    given = {k: v for k, v in (raw or {}).items() if v is not None}
    unknown = sorted(set(given) - set(OptionValues.model_fields))
    if unknown:
        raise invalid(f"unknown option '{unknown[0]}'; lmserve accepts Ollama's Modelfile "
                      "parameters (temperature, top_p, top_k, min_p, num_predict, num_ctx, "
                      "seed, stop, repeat_penalty, repeat_last_n, presence_penalty, "
                      "frequency_penalty, ...)", param=f"options.{unknown[0]}")
    try:
        values = OptionValues.model_validate(given)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise invalid(f"invalid value for option '{key}': {first['msg']}",
                      param=f"options.{key}") from None
    _refuse_other_values(values)
    return Options(sampling=_sampling(values), stop=_stops(values.stop),
                   num_predict=_num_predict(values.num_predict), num_ctx=values.num_ctx,
                   repeat_last_n=_pick(values.repeat_last_n, OLLAMA_DEFAULTS.penalty_last_n),
                   given=tuple(given))


def _refuse_other_values(values: OptionValues) -> None:
    for key, only in _ONLY_VALUE.items():
        value = getattr(values, key)
        if value is not None and value != only:
            raise unsupported(f"options.{key}", f"only {key}={str(only).lower()} is "
                              "implemented by lmserve's sampler")


def _sampling(values: OptionValues) -> SamplingParams:
    d = OLLAMA_DEFAULTS
    seed = values.seed if values.seed is not None and values.seed >= 0 else None  # -1: random
    return SamplingParams(
        temperature=_pick(values.temperature, d.temperature), top_p=_pick(values.top_p, d.top_p),
        top_k=_pick(values.top_k, d.top_k), min_p=_pick(values.min_p, d.min_p), seed=seed,
        presence_penalty=_pick(values.presence_penalty, d.presence_penalty),
        frequency_penalty=_pick(values.frequency_penalty, d.frequency_penalty),
        repetition_penalty=_pick(values.repeat_penalty, d.repetition_penalty))


def _pick(value: T | None, default: T) -> T:
    return default if value is None else value


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(s for s in stop if s)


def _num_predict(value: int | None) -> int | None:
    return value if value is not None and value > 0 else None


def window(options: Options, loaded_ctx: int) -> int:
    """The tokens one request may use: num_ctx, capped at the context the server loaded."""
    return min(options.num_ctx or loaded_ctx, loaded_ctx)


def finalize(request: GenerationRequest, options: Options, loaded_ctx: int,
             n_prompt: int) -> GenerationRequest:
    """Fit the request to its window once the prompt is tokenized: max_tokens (num_predict, or
    a model's default, capped to the room left; unset: the room), penalty span."""
    span = window(options, loaded_ctx)
    if n_prompt >= span:
        whose = "num_ctx" if span < loaded_ctx else "the model's context"
        raise LmserveError(ErrorKind.CONTEXT_LENGTH_EXCEEDED,
                           f"the prompt has {n_prompt} tokens, which does not fit the context "
                           f"window of {span} tokens ({whose})", param="options.num_ctx",
                           code="context_length_exceeded")
    room = span - n_prompt
    max_tokens = room if request.max_tokens is None else min(request.max_tokens, room)
    last_n = span if options.repeat_last_n == -1 else options.repeat_last_n
    return dataclasses.replace(request, max_tokens=max_tokens,
                               sampling=request.sampling.replace(penalty_last_n=last_n))


def default_parameters(loaded_ctx: int) -> dict[str, Any]:
    """What an option left unset means here, as /api/show lists it."""
    d = OLLAMA_DEFAULTS
    return {"num_ctx": loaded_ctx, "temperature": d.temperature, "top_k": d.top_k,
            "top_p": d.top_p, "min_p": d.min_p, "repeat_penalty": d.repetition_penalty,
            "repeat_last_n": d.penalty_last_n}


def notice(options: Options, loaded_ctx: int | None, *, embedding: bool = False) -> str | None:
    """A one-line account of accepted parameters that change nothing or were capped."""
    parts = []
    idle = [k for k in options.given if k != "num_ctx"] if embedding else options.without_effect
    if idle:
        parts.append(f"no effect here: {', '.join(idle)}")
    if loaded_ctx and options.num_ctx and options.num_ctx > loaded_ctx:
        parts.append(f"num_ctx {options.num_ctx} capped at the loaded context of {loaded_ctx}")
    return "; ".join(parts) or None


# -- requests -------------------------------------------------------------------------------

def _explicit(body: ChatRequest | GenerateRequest) -> frozenset[str]:
    """The neutral fields the request set: its options, `think` and `truncate`."""
    given = {**(body.options or {}), "reasoning": body.think, "context_overflow": body.truncate}
    return explicit_fields(given, _OPTION_NAMES)


def chat_job(body: ChatRequest) -> Job:
    options = parse_options(body.options)
    request = GenerationRequest(model=body.model, sampling=options.sampling, fields=FIELDS,
                                explicit=_explicit(body), max_tokens=options.num_predict,
                                stop=list(options.stop),
                                messages=[_message(m, i) for i, m in enumerate(body.messages)],
                                tools=tool_specs(body.tools), **output_fields(body),
                                context_overflow=overflow_policy(body.truncate),
                                priority=body.priority)
    request.keep_alive = keep_alive_seconds(body.keep_alive)
    return Job(request, options, request.keep_alive, shows_thinking(body))


def generate_job(body: GenerateRequest) -> Job:
    """Raw mode sends the prompt verbatim; otherwise system + prompt go through the template."""
    if body.raw and (body.template or body.system or body.context):
        raise invalid("raw mode does not support template, system, or context", param="raw")
    if body.template:
        raise unsupported("template", "a Go-template override cannot be executed by lmserve; "
                          "render the prompt yourself and send it with raw: true")
    if body.suffix:
        raise unsupported("suffix", "fill-in-the-middle is not available for this model")
    if body.images and body.raw:
        raise invalid("raw mode sends the prompt verbatim, with no place for images; send "
                      "them without raw", param="images")
    if body.raw and body.truncate:
        raise unsupported("truncate", "a raw prompt is sent verbatim and never cut; a prompt "
                          "that does not fit the context is refused")
    options = parse_options(body.options)
    request = GenerationRequest(model=body.model, sampling=options.sampling, fields=FIELDS,
                                explicit=_explicit(body), max_tokens=options.num_predict,
                                stop=list(options.stop), **output_fields(body),
                                context_overflow=overflow_policy(body.truncate),
                                priority=body.priority)
    if body.raw:
        request.prompt = body.prompt
    else:
        system = [ChatMessage("system", body.system)] if body.system else []
        request.messages = [*system, ChatMessage("user", body.prompt,
                                                 images=_images(body.images, "images"))]
    request.keep_alive = keep_alive_seconds(body.keep_alive)
    return Job(request, options, request.keep_alive, shows_thinking(body))


def overflow_policy(truncate: bool | None) -> Literal["error", "truncate"] | None:
    """`truncate`: drop the oldest turns of a chat that does not fit (true) or refuse it
    (false). Ollama's server truncates when it is absent, but its API docs do not say so, so
    an absent one takes lmserve's server default (--context-overflow)."""
    if truncate is None:
        return None
    return "truncate" if truncate else "error"


def _message(message: Message, index: int) -> ChatMessage:
    extra: dict[str, Any] = {}
    if message.tool_calls:
        extra["tool_calls"] = [dict(call) for call in message.tool_calls]
    if message.thinking:
        extra["reasoning_content"] = message.thinking  # the Hugging Face templates' name
    return ChatMessage(role=message.role, content=message.content or "",
                       name=message.tool_name, extra=extra,
                       images=_images(message.images, f"messages[{index}].images"))


def _images(images: list[str] | None, param: str) -> tuple[ImageInput, ...]:
    """Ollama's images: base64 strings, placed before the message's text."""
    return tuple(image_from_base64(data, f"{param}[{k}]") for k, data in enumerate(images or []))


# -- keep_alive -----------------------------------------------------------------------------

keep_alive_seconds = lifecycle.keep_alive_seconds  # a duration ("5m") or seconds; < 0: forever


# -- embeddings -----------------------------------------------------------------------------

def without_template(job: Job, body: GenerateRequest) -> Job:
    """A model with no chat template gets the prompt verbatim, as Ollama's default template."""
    if body.system:
        raise invalid("this model has no chat template, so 'system' has nowhere to go; put it "
                      "in the prompt", param="system")
    if body.images:
        raise invalid("this model has no chat template, so 'images' have nowhere to go",
                      param="images")
    request = dataclasses.replace(job.request, messages=None, prompt=body.prompt)
    return dataclasses.replace(job, request=request)


def embed_texts(value: str | list[str] | None) -> list[str]:
    if value is None or value == "":
        return []
    return [value] if isinstance(value, str) else list(value)


def fit_embedding_input(tokens: list[int], limit: int, truncate: bool, index: int) -> list[int]:
    if len(tokens) <= limit:
        return tokens
    if truncate:
        return tokens[:limit]
    raise LmserveError(ErrorKind.CONTEXT_LENGTH_EXCEEDED,
                       f"input[{index}] has {len(tokens)} tokens, more than the {limit} the "
                       "embedding context holds",
                       param="input", code="context_length_exceeded")
