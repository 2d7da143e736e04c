"""The upstream's wire, pure: a GenerationRequest as an OpenAI request body, the streamed
response (Server-Sent Events of chat or completion chunks) as the backend contract's choice
steps, and the upstream's errors as LmserveErrors with a kind.

Nothing here does I/O; `lmserve.upstream.backend` sends the bodies and feeds the bytes in.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lmserve.core.backend import ChoiceStep, Failed, Finished, FinishReason
from lmserve.core.errors import ErrorKind, LmserveError, invalid, unsupported
from lmserve.core.events import (
    CHANNEL_OUTPUT,
    CHANNEL_REASONING,
    ChatEvent,
    TextDelta,
    TokenLogprob,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
    TopLogprob,
    Usage,
)
from lmserve.core.images import ImageInput
from lmserve.core.request import ChatMessage, GenerationRequest, NamedTool, ResponseFormat

# Servers whose OpenAI routes take a prompt of token ids and the vLLM-style extras
# (top_k, min_p, repetition_penalty, ignore_eos, stop_token_ids, chat_template_kwargs).
# The flavor is read from /v1/models' `owned_by` when the backend loads.
TOKEN_FLAVORS = frozenset({"lmserve", "vllm", "llamacpp", "sglang"})
LLAMACPP = "llamacpp"
LMSERVE = "lmserve"
# Servers that put the usage so far on every chunk when asked (vLLM's
# stream_options.continuous_usage_stats): lmserve counts the whole request's tokens there,
# vLLM and SGLang the chunk's choice's.
CONTINUOUS_USAGE_FLAVORS = frozenset({LMSERVE, "vllm", "sglang"})

# -- request bodies -----------------------------------------------------------------------


def check_request(request: GenerationRequest, flavor: str) -> None:
    """Refuse (400, naming the parameter) what an OpenAI-compatible upstream cannot carry."""
    sampling = request.sampling
    if sampling.grammar:
        raise unsupported("grammar", "a raw GBNF grammar cannot be sent to an upstream model; "
                          "use response_format json_schema")
    fmt = request.response_format
    if fmt is not None and fmt.type in ("gbnf", "regex"):
        raise unsupported(fmt.param, f"'{fmt.type}' structured output cannot be sent to an "
                          "upstream model; use json_schema or json_object")
    if request.lora is not None and request.lora.refs:
        raise unsupported(request.lora.param, "LoRA adapters cannot be selected on an "
                          "upstream model")
    if request.prompt_logprobs is not None:
        raise unsupported("prompt_logprobs", "an upstream model reports no prompt logprobs")
    ids = flavor in TOKEN_FLAVORS
    if request.prompt_tokens is not None and not ids:
        raise unsupported("prompt", "this upstream is not known to take token ids; send text")
    if request.stop_token_ids and not ids:
        raise unsupported("stop_token_ids", "this upstream is not known to take token ids")
    if sampling.logit_bias and not ids:
        raise unsupported("logit_bias", "this upstream is not known to share this tokenizer")
    if request.messages is None and request.tools:
        raise invalid("tools need a chat request (messages)", param="tools")
    for message in request.messages or ():
        for image in message.images:
            if image.source not in ("base64", "url") or image.data.startswith("file:"):
                raise unsupported(image.param, f"a local {image.kind} file cannot be sent to "
                                  "an upstream model; send it inline (base64) or as an http(s) "
                                  "URL")


def request_body(request: GenerationRequest, model: str, flavor: str = "") -> dict[str, Any]:
    """The streamed /chat/completions (messages) or /completions (prompt) body."""
    body: dict[str, Any] = {"model": model}
    if request.messages is not None:
        body["messages"] = [wire_message(m) for m in request.messages]
        _chat_fields(body, request)
    else:
        body["prompt"] = list(request.prompt_tokens) if request.prompt_tokens is not None \
            else (request.prompt or "")
        if request.response_format is not None:
            body["response_format"] = response_format(request.response_format)
        if request.logprobs is not None:
            body["logprobs"] = request.logprobs
    _sampling_fields(body, request, flavor)
    body["stream"] = True
    body["stream_options"] = {"include_usage": True}
    if continuous_usage(request, flavor):
        body["stream_options"]["continuous_usage_stats"] = True
    return body


def continuous_usage(request: GenerationRequest, flavor: str) -> bool:
    """Whether the upstream is asked for the usage so far on every chunk."""
    return request.continuous_usage and flavor in CONTINUOUS_USAGE_FLAVORS


def _chat_fields(body: dict[str, Any], request: GenerationRequest) -> None:
    if request.tools:
        body["tools"] = [tool.as_template_dict() for tool in request.tools]
        for wire, tool in zip(body["tools"], request.tools, strict=True):
            if tool.strict:
                wire["function"]["strict"] = True
        body["tool_choice"] = tool_choice(request.tool_choice)
        if not request.parallel_tool_calls:
            body["parallel_tool_calls"] = False
    if request.response_format is not None:
        body["response_format"] = response_format(request.response_format)
    if request.logprobs is not None:
        body["logprobs"] = True
        if request.logprobs > 0:
            body["top_logprobs"] = request.logprobs
    kwargs = dict(request.template_kwargs)
    if request.reasoning is not None:
        kwargs.setdefault("enable_thinking", request.reasoning)
    if kwargs:
        body["chat_template_kwargs"] = kwargs
    if not request.add_generation_prompt:
        body["add_generation_prompt"] = False
    if request.continue_final_message:
        body["continue_final_message"] = True  # vLLM's: the reply continues the last turn
    if request.context_overflow is not None:
        body["context_overflow"] = request.context_overflow  # lmserve upstreams read it


def _sampling_fields(body: dict[str, Any], request: GenerationRequest, flavor: str) -> None:
    s = request.sampling
    body["temperature"] = s.temperature
    if s.top_p != 1.0:
        body["top_p"] = s.top_p
    if s.top_k > 0:
        body["top_k"] = s.top_k
    if s.min_p > 0.0:
        body["min_p"] = s.min_p
    if s.seed is not None:
        body["seed"] = s.seed
    if s.presence_penalty:
        body["presence_penalty"] = s.presence_penalty
    if s.frequency_penalty:
        body["frequency_penalty"] = s.frequency_penalty
    if s.repetition_penalty != 1.0:
        body["repeat_penalty" if flavor == LLAMACPP else "repetition_penalty"] = \
            s.repetition_penalty
    if s.logit_bias:
        body["logit_bias"] = {str(token): bias for token, bias in s.logit_bias.items()}
    if request.max_tokens is not None:
        body["max_tokens"] = request.max_tokens
    if request.stop:
        body["stop"] = list(request.stop)
    if request.stop_token_ids:
        body["stop_token_ids"] = list(request.stop_token_ids)
    if request.ignore_eos:
        body["ignore_eos"] = True
    if request.n != 1:
        body["n"] = request.n


def tool_choice(choice: Any) -> Any:
    if isinstance(choice, NamedTool):
        return {"type": "function", "function": {"name": choice.name}}
    return choice


def response_format(fmt: ResponseFormat) -> dict[str, Any]:
    if fmt.type == "json_object":
        return {"type": "json_object"}
    schema: dict[str, Any] = {"name": "response", "schema": fmt.schema
                              if fmt.schema is not None else {}}
    if fmt.strict:
        schema["strict"] = True
    return {"type": "json_schema", "json_schema": schema}


def wire_message(message: ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.role}
    out["content"] = content_parts(message.content or "", message.images) if message.images \
        else message.content
    if message.name is not None:
        out["name"] = message.name
    for key, value in message.extra.items():
        out[key] = [wire_call(c) for c in value] if key == "tool_calls" else value
    return out


def wire_call(call: Any) -> Any:
    """A tool call as OpenAI sends it: arguments as a JSON string (Ollama and Anthropic give
    an object)."""
    if not isinstance(call, Mapping):
        return call
    function = call.get("function")
    out = dict(call)
    out.setdefault("type", "function")
    if isinstance(function, Mapping) and not isinstance(function.get("arguments"), str):
        out["function"] = {**function, "arguments": json.dumps(function.get("arguments") or {})}
    return out


def content_parts(text: str, images: Sequence[ImageInput]) -> list[dict[str, Any]]:
    """Text, image_url and audio parts in their order (each input stands at its offset)."""
    parts: list[dict[str, Any]] = []
    at = 0
    for image in sorted(images, key=lambda i: i.offset):
        if image.offset > at:
            parts.append({"type": "text", "text": text[at:image.offset]})
            at = image.offset
        if image.kind == "audio":
            parts.append(audio_part(image))
            continue
        url: dict[str, Any] = {"url": image_url(image)}
        if image.detail:
            url["detail"] = image.detail
        parts.append({"type": "image_url", "image_url": url})
    if at < len(text) or not parts:
        parts.append({"type": "text", "text": text[at:]})
    return parts


_MAGIC = (("iVBOR", "image/png"), ("/9j/", "image/jpeg"), ("R0lG", "image/gif"),
          ("UklGR", "image/webp"))


_AUDIO_FORMATS = {"audio/mpeg": "mp3", "audio/mp3": "mp3"}


def audio_part(clip: ImageInput) -> dict[str, Any]:
    """OpenAI's input_audio part for inline data; an audio_url part (vLLM's, llama.cpp's
    server example's) for a URL."""
    if clip.source == "url":
        return {"type": "audio_url", "audio_url": {"url": clip.data}}
    fmt = _AUDIO_FORMATS.get(clip.media_type or "") or \
        ("mp3" if clip.data.startswith(("SUQz", "//")) else "wav")
    return {"type": "input_audio", "input_audio": {"data": clip.data, "format": fmt}}


def image_url(image: ImageInput) -> str:
    if image.source == "url":
        return image.data
    media_type = image.media_type or next(
        (t for magic, t in _MAGIC if image.data.startswith(magic)), "image/png")
    return f"data:{media_type};base64,{image.data}"


# -- the event stream ---------------------------------------------------------------------


class SSEDecoder:
    """Incremental Server-Sent Events parser: bytes in, each event's data out."""

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[str]:
        self._buffer += chunk
        if b"\n" not in chunk:
            return []
        lines = self._buffer.split(b"\n")
        self._buffer = lines.pop()
        out: list[str] = []
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if self._data:
                    out.append(b"\n".join(self._data).decode("utf-8", "replace"))
                    self._data = []
            elif line.startswith(b"data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(b" ") else value)
            # comments (":"), event:, id: and retry: lines carry nothing we need
        return out

    def flush(self) -> list[str]:
        """The last event of a stream that ended without a blank line."""
        out = self.feed(b"\n\n") if self._buffer or self._data else []
        return out


FINISH_REASONS = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH,
                  "tool_calls": FinishReason.STOP, "function_call": FinishReason.STOP,
                  "content_filter": FinishReason.STOP, "eos": FinishReason.STOP,
                  "cancelled": FinishReason.CANCELLED, "abort": FinishReason.CANCELLED}


def finish_reason(value: str) -> FinishReason:
    return FINISH_REASONS.get(value, FinishReason.STOP)


@dataclass
class _Choice:
    index: int
    steps: int = 0  # chunks with generated content: the token count's estimate
    reason: FinishReason | None = None
    stop_match: str | None = None
    calls: dict[int, list[str]] = field(default_factory=dict)  # wire index -> [id, name, args]
    running: int = 0  # its tokens so far, by the upstream's running usage
    open_call: int | None = None  # our index of the call receiving argument deltas
    call_ids: dict[int, int] = field(default_factory=dict)  # wire index -> our index
    ended: bool = False


class StreamReader:
    """One upstream response's chunks -> choice steps. Each choice's terminal waits for the
    final usage chunk (it follows the finish chunks), so usage is known when it is sent.

    `continuous`: the upstream was asked for the usage so far on every chunk; a usage on a
    chunk with choices is then a running count, given to that chunk's steps
    (ChoiceStep.running), and only the chunk without choices holds the final usage.
    `summed`: the running counts are the whole request's (lmserve's), not the choice's
    (vLLM's): each choice's share is the growth over its own chunks. `stop_ids`: the
    request's stop_token_ids (a stop_reason that is a token id counts only for those)."""

    def __init__(self, n: int = 1, *, chat: bool = True, parse: bool = True,
                 continuous: bool = False, summed: bool = False,
                 stop_ids: Sequence[int] = ()) -> None:
        self.n = n
        self.stop_ids = frozenset(stop_ids)
        self.chat = chat
        self.parse = parse
        self.continuous = continuous
        self.summed = summed
        self.choices = {i: _Choice(i) for i in range(n)}
        self.usage: Usage | None = None
        self.running: Usage | None = None  # the last running count (its prompt: the request's)
        self.done = False  # [DONE] seen
        self.content_seen = False

    # The backend calls these three.
    def data(self, payload: str) -> list[ChoiceStep]:
        """One SSE event's data -> the steps it gives (possibly the terminals)."""
        if payload == "[DONE]":
            self.done = True
            return self.finish()
        try:
            chunk = json.loads(payload)
        except ValueError:
            return self.fail(Failed(ErrorKind.UPSTREAM, f"the upstream sent a chunk that is "
                                    f"not JSON: {payload[:200]!r}"))
        if not isinstance(chunk, dict):
            return []
        if "error" in chunk and not chunk.get("choices"):
            return self.fail(Failed.of(error_from_body(chunk, None)))
        choices = [c for c in chunk.get("choices") or () if isinstance(c, dict)]
        raw = chunk.get("usage")
        usage = parse_usage(raw) if isinstance(raw, dict) else None
        running = usage is not None and self.continuous and bool(choices)
        if running and usage is not None:
            self._note_running(choices, usage)
        steps = [step for c in choices for step in self._choice(c)]
        if usage is not None and not running:
            self.usage = usage
            steps.extend(self.finish())
        return steps

    def _note_running(self, choices: list[dict[str, Any]], usage: Usage) -> None:
        """A running count: each choice of the chunk gets its tokens so far."""
        grown = usage.completion_tokens - (self.running.completion_tokens
                                           if self.running is not None else 0)
        self.running = usage
        for data in choices[:1] if self.summed else choices:
            index = data.get("index", 0)
            choice = self.choices.get(index) if isinstance(index, int) else None
            if choice is None:
                continue
            choice.running = choice.running + max(grown, 0) if self.summed \
                else usage.completion_tokens

    def _running_usage(self, choice: _Choice) -> Usage | None:
        if self.running is None:
            return None
        return Usage(self.running.prompt_tokens, choice.running, self.running.cached_tokens)

    def finish(self) -> list[ChoiceStep]:
        """The terminals of the choices that finished (at the usage chunk or [DONE])."""
        if self.usage is None and not self.done:
            return []
        finished = [c for c in self.choices.values() if c.reason is not None and not c.ended]
        if not finished:
            return []
        usages = self._split_usage()
        out = []
        for choice in finished:
            choice.ended = True
            assert choice.reason is not None
            end = Finished(choice.reason, usages[choice.index], choice.stop_match)
            out.append(ChoiceStep(choice.index, events=self._close_calls(choice), end=end))
        return out

    def fail(self, failure: Failed) -> list[ChoiceStep]:
        """Every choice not yet ended ends with this failure."""
        out = []
        for choice in self.choices.values():
            if not choice.ended:
                choice.ended = True
                out.append(ChoiceStep(choice.index, end=failure))
        return out

    def end_of_stream(self) -> list[ChoiceStep]:
        """The response body ended: finished choices end (usage as counted), the rest fail."""
        self.done = True
        steps = self.finish()
        if any(not c.ended for c in self.choices.values()):
            steps.extend(self.fail(Failed(ErrorKind.UPSTREAM, "the upstream closed the stream "
                                          "before the generation finished")))
        return steps

    @property
    def ended(self) -> bool:
        return all(c.ended for c in self.choices.values())

    # -- one choice of a chunk --
    def _choice(self, data: dict[str, Any]) -> list[ChoiceStep]:
        index = data.get("index", 0)
        choice = self.choices.get(index) if isinstance(index, int) else None
        if choice is None or choice.ended:
            return []
        events: list[ChatEvent] = []
        text = ""
        if self.chat:
            delta = data.get("delta") or data.get("message") or {}
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            content = delta.get("content")
            if isinstance(reasoning, str) and reasoning:
                if self.parse:
                    events.append(TextDelta(CHANNEL_REASONING, reasoning))
            if isinstance(content, str) and content:
                text = content
                events.append(TextDelta(CHANNEL_OUTPUT, content))
            for call in delta.get("tool_calls") or ():
                if isinstance(call, dict):
                    events.extend(self._call(choice, call))
            logprobs = chat_logprobs(data.get("logprobs"))
            generated = bool(text or reasoning or events)
        else:
            content = data.get("text")
            if isinstance(content, str) and content:
                text = content
                events.append(TextDelta(CHANNEL_OUTPUT, content))
            logprobs = completion_logprobs(data.get("logprobs"))
            generated = bool(text)
        if generated:
            self.content_seen = True
            choice.steps += 1
        reason = data.get("finish_reason")
        if isinstance(reason, str) and reason:
            choice.reason = finish_reason(reason)
            choice.stop_match = self._stop_match(data.get("stop_reason",
                                                          data.get("matched_stop")))
        if not (text or events or logprobs):
            return []
        return [ChoiceStep(choice.index, text, events, logprobs=logprobs,
                           running=self._running_usage(choice))]

    def _stop_match(self, stop: Any) -> str | None:
        """vLLM's stop_reason (SGLang's matched_stop): the stop string matched, or the stop
        token's id, which counts (as the engine's text of it) only where it is one of the
        request's stop_token_ids (not an EOS id of the model's generation config)."""
        if isinstance(stop, str):
            return stop or None
        if isinstance(stop, int) and not isinstance(stop, bool) and stop in self.stop_ids:
            return str(stop)
        return None

    def _call(self, choice: _Choice, call: dict[str, Any]) -> list[ChatEvent]:
        wire_index = call.get("index", len(choice.call_ids))
        function = call.get("function") or {}
        arguments = function.get("arguments") if isinstance(function, dict) else None
        events: list[ChatEvent] = []
        ours = choice.call_ids.get(wire_index)
        if ours is None:
            events.extend(self._end_open_call(choice, complete=True))
            ours = choice.call_ids[wire_index] = len(choice.call_ids)
            call_id = call.get("id") or f"call_{ours}"
            name = function.get("name") if isinstance(function, dict) else None
            choice.calls[ours] = [call_id, name or "", ""]
            choice.open_call = ours
            events.append(ToolCallStart(ours, call_id, name or ""))
        if isinstance(arguments, (dict, list)):
            arguments = json.dumps(arguments)
        if isinstance(arguments, str) and arguments:
            choice.calls[ours][2] += arguments
            events.append(ToolCallDelta(ours, arguments))
        return events

    def _end_open_call(self, choice: _Choice, complete: bool) -> list[ChatEvent]:
        ours = choice.open_call
        if ours is None:
            return []
        choice.open_call = None
        return [ToolCallEnd(ours, choice.calls[ours][2], complete)]

    def _close_calls(self, choice: _Choice) -> list[ChatEvent]:
        return self._end_open_call(choice, complete=choice.reason != FinishReason.LENGTH)

    def _split_usage(self) -> dict[int, Usage]:
        """The upstream counts the whole request; each choice gets its share of the
        completion tokens (by its running counts where the upstream sent them, else by its
        chunks), the prompt counted on every one, as the engine does (the encoders count the
        prompt of n choices once)."""
        total = self.usage
        counts = {c.index: c.running if self.running is not None else c.steps
                  for c in self.choices.values()}
        if total is None:  # no final usage: the running counts, else the chunks
            prompt = self.running.prompt_tokens if self.running is not None else 0
            return {i: Usage(prompt, k) for i, k in counts.items()}
        out: dict[int, Usage] = {}
        left = total.completion_tokens
        last = max(counts)
        for i in sorted(counts):
            share = left if i == last else min(counts[i], left)
            left -= share
            out[i] = Usage(total.prompt_tokens, share, total.cached_tokens)
        return out


def parse_usage(usage: Mapping[str, Any]) -> Usage:
    details = usage.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens") if isinstance(details, Mapping) else None
    return Usage(prompt_tokens=int(usage.get("prompt_tokens") or 0),
                 completion_tokens=int(usage.get("completion_tokens") or 0),
                 cached_tokens=int(cached or 0))


# -- logprobs: the token ids are the upstream's, unknown here (-1) ------------------------


def _piece(entry: Mapping[str, Any]) -> bytes:
    raw = entry.get("bytes")
    if isinstance(raw, list):
        try:
            return bytes(raw)
        except (TypeError, ValueError):
            pass
    return str(entry.get("token", "")).encode("utf-8")


def chat_logprobs(data: Any) -> list[TokenLogprob] | None:
    if not isinstance(data, Mapping) or not isinstance(data.get("content"), list):
        return None
    out = []
    for entry in data["content"]:
        top = tuple(TopLogprob(-1, _piece(alt), float(alt.get("logprob", 0.0)))
                    for alt in entry.get("top_logprobs") or () if isinstance(alt, Mapping))
        out.append(TokenLogprob(-1, _piece(entry), float(entry.get("logprob", 0.0)), top))
    return out or None


def completion_logprobs(data: Any) -> list[TokenLogprob] | None:
    if not isinstance(data, Mapping) or not isinstance(data.get("tokens"), list):
        return None
    tokens, values = data["tokens"], data.get("token_logprobs") or []
    tops = data.get("top_logprobs") or []
    out = []
    for i, token in enumerate(tokens):
        value = values[i] if i < len(values) else None
        alts = tops[i] if i < len(tops) and isinstance(tops[i], Mapping) else {}
        top = tuple(TopLogprob(-1, str(t).encode("utf-8"), float(lp))
                    for t, lp in sorted(alts.items(), key=lambda kv: -kv[1]))
        out.append(TokenLogprob(-1, str(token).encode("utf-8"),
                                float(value) if value is not None else None, top))
    return out or None


# -- errors -------------------------------------------------------------------------------

_KINDS_BY_STATUS = {400: ErrorKind.INVALID_REQUEST, 401: ErrorKind.AUTHENTICATION,
                    403: ErrorKind.AUTHENTICATION, 404: ErrorKind.MODEL_NOT_FOUND,
                    413: ErrorKind.INVALID_REQUEST, 422: ErrorKind.INVALID_REQUEST,
                    429: ErrorKind.OVERLOADED, 504: ErrorKind.UPSTREAM_TIMEOUT}
_KINDS_BY_CODE = {"context_length_exceeded": ErrorKind.CONTEXT_LENGTH_EXCEEDED,
                  "unsupported_parameter": ErrorKind.UNSUPPORTED,
                  "model_not_found": ErrorKind.MODEL_NOT_FOUND,
                  "model_loading": ErrorKind.LOADING,
                  "server_overloaded": ErrorKind.OVERLOADED,
                  "capacity": ErrorKind.CAPACITY}
_KINDS_BY_TYPE = {"invalid_request_error": ErrorKind.INVALID_REQUEST,
                  "BadRequestError": ErrorKind.INVALID_REQUEST,
                  "NotFoundError": ErrorKind.MODEL_NOT_FOUND,
                  "authentication_error": ErrorKind.AUTHENTICATION,
                  "rate_limit_error": ErrorKind.OVERLOADED,
                  "service_unavailable_error": ErrorKind.CAPACITY,
                  "overloaded_error": ErrorKind.OVERLOADED}


def _error_fields(body: Any) -> tuple[str | None, str | None, str | None, str | None]:
    """(message, type, param, code) from the error bodies servers send: OpenAI's
    {"error": {...}}, vLLM's {"object": "error", "message", ...}, {"error": "..."},
    FastAPI's {"detail": ...}."""
    if not isinstance(body, Mapping):
        return None, None, None, None
    error = body.get("error", body)
    if isinstance(error, str):
        return error, None, None, None
    if not isinstance(error, Mapping):
        return None, None, None, None
    message = error.get("message") or error.get("detail")
    if message is not None and not isinstance(message, str):
        message = json.dumps(message)
    def text(key: str) -> str | None:
        value = error.get(key)
        return str(value) if value is not None and not isinstance(value, (dict, list)) else None
    return message, text("type"), text("param"), text("code")


def error_from_body(body: Any, status: int | None, retry_after: float | None = None
                    ) -> LmserveError:
    """An upstream's error body, with the HTTP status when it came as one (None: an error
    sent inside a stream). A 4xx keeps its status class (and the upstream's message, param
    and code); a refused or broken upstream is ours to report as 502 (504: timed out)."""
    message, type_name, param, code = _error_fields(body)
    named = _kind_named(code, type_name)
    if status is None:
        kind = named or ErrorKind.UPSTREAM
    elif status == 503:
        kind = named if named in (ErrorKind.LOADING, ErrorKind.CAPACITY) else \
            (ErrorKind.LOADING if retry_after is not None else ErrorKind.UPSTREAM)
    elif status >= 500:
        kind = _KINDS_BY_STATUS.get(status, ErrorKind.UPSTREAM)
    elif named is not None and named.http_status == status:
        kind = named  # e.g. context_length_exceeded or unsupported_parameter under a 400
    else:
        kind = _KINDS_BY_STATUS.get(status, ErrorKind.INVALID_REQUEST)
    if kind == ErrorKind.INTERNAL:
        kind = ErrorKind.UPSTREAM  # the upstream's own failure is a bad gateway here
    if not message:
        message = f"the upstream answered {status}" if status else "the upstream failed"
    if kind in (ErrorKind.UPSTREAM, ErrorKind.UPSTREAM_TIMEOUT):
        message = f"upstream error ({status}): {message}" if status else \
            f"upstream error: {message}"
    if code is not None and code.isdigit():
        code = None  # vLLM puts the status number there
    return LmserveError(kind, message, param=param, code=code, retry_after=retry_after)


def _kind_named(code: str | None, type_name: str | None) -> ErrorKind | None:
    if code is not None:
        if code in _KINDS_BY_CODE:
            return _KINDS_BY_CODE[code]
        try:
            return ErrorKind(code)  # lmserve sends its kind as the code where it has none
        except ValueError:
            pass
    return _KINDS_BY_TYPE.get(type_name or "")


def error_from_response(status: int, content: bytes, headers: Mapping[str, str]
                        ) -> LmserveError:
    try:
        body: Any = json.loads(content) if content else None
    except ValueError:
        body = {"error": content.decode("utf-8", "replace")[:500]}
    retry_after = _seconds(headers.get("retry-after"))
    if status == 429 and retry_after is None:
        retry_after = 1.0
    return error_from_body(body, status, retry_after)


def _seconds(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


# -- the upstream's model list --------------------------------------------------------------


@dataclass(frozen=True)
class UpstreamModel:
    """What /v1/models says about the served model."""

    id: str
    flavor: str  # owned_by: "lmserve", "vllm", "llamacpp", "sglang", ...
    created: int = 0
    n_ctx: int = 0
    n_ctx_train: int | None = None
    architecture: str | None = None
    n_params: int | None = None
    n_vocab: int | None = None
    size_bytes: int | None = None


def find_model(payload: Any, model: str) -> UpstreamModel:
    """The entry of `model` in a /v1/models answer; ValueError naming the served ones."""
    data = payload.get("data") if isinstance(payload, Mapping) else None
    if not isinstance(data, list):
        raise ValueError("the upstream's /models answer has no 'data' list")
    entries = [e for e in data if isinstance(e, Mapping)]
    entry = next((e for e in entries if e.get("id") == model), None)
    if entry is None:
        served = ", ".join(str(e.get("id")) for e in entries) or "none"
        raise ValueError(f"the upstream does not serve '{model}' (it serves: {served})")
    raw_meta = entry.get("meta")
    meta: Mapping[str, Any] = raw_meta if isinstance(raw_meta, Mapping) else {}

    def number(*values: Any) -> int | None:
        for value in values:
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                return int(value)
        return None

    n_ctx_train = number(meta.get("n_ctx_train"))
    n_ctx = number(meta.get("n_ctx"), entry.get("max_model_len"),
                   entry.get("context_length"), n_ctx_train) or 0
    return UpstreamModel(
        id=model, flavor=str(entry.get("owned_by") or ""), created=number(entry.get("created"))
        or 0, n_ctx=n_ctx, n_ctx_train=n_ctx_train,
        architecture=meta.get("architecture") if isinstance(meta.get("architecture"), str)
        else None, n_params=number(meta.get("n_params")), n_vocab=number(meta.get("n_vocab")),
        size_bytes=number(meta.get("size")))


# The request fields that change how the upstream renders a chat (what /tokenize reads).
_RENDERING = ("tools", "tool_choice", "parallel_tool_calls", "chat_template_kwargs",
              "add_generation_prompt", "continue_final_message")


def chat_tokenize_body(request: GenerationRequest, model: str) -> dict[str, Any]:
    """vLLM's chat form of /tokenize (lmserve's too): the messages rendered as the chat
    request would be (tools, template kwargs, generation prompt, continuation), tokenized."""
    chat: dict[str, Any] = {}
    _chat_fields(chat, request)
    body: dict[str, Any] = {"model": model, "messages": [wire_message(m) for m in
                                                         request.messages or ()]}
    body.update({key: chat[key] for key in _RENDERING if key in chat})
    return body


def template_body(request: GenerationRequest) -> dict[str, Any]:
    """llama-server's /apply-template: the chat's prompt text (a final assistant message is
    continued there: its assistant prefill)."""
    body = chat_tokenize_body(request, "")
    del body["model"]
    return body


def tokenize_body(text: str, add_special: bool, model: str) -> dict[str, Any]:
    """/tokenize as llama-server ("content", "add_special") and vLLM and lmserve ("model",
    "prompt", "add_special_tokens") read it."""
    return {"model": model, "content": text, "add_special": add_special, "prompt": text,
            "add_special_tokens": add_special}


def tokens_of(payload: Any) -> list[int]:
    tokens = payload.get("tokens") if isinstance(payload, Mapping) else None
    if not isinstance(tokens, list):
        raise ValueError("no 'tokens' list")
    return [int(t["id"]) if isinstance(t, Mapping) else int(t) for t in tokens]


def join_url(base: str, path: str) -> str:
    return base.rstrip("/") + "/" + path.lstrip("/")


def server_root(base: str) -> str:
    """http://host:8000/v1 -> http://host:8000 (where /tokenize lives)."""
    base = base.rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base
