"""Prompt preparation for one model: chat template, tool plan, grammar, tokens, context check.

A `Prompter` turns a neutral GenerationRequest into a PreparedPrompt for a vocabulary and a
chat template; `ModelService` owns one per loaded model, and unit tests build one over a stub
vocabulary (tests/unit/chat_service.py) to drive the dialects through a scripted backend."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, Protocol

from lmserve.chat.media import (
    MediaPolicy,
    check_images,
    check_kinds,
    decode_inline,
    is_local,
    local_file,
    verified,
)
from lmserve.chat.overflow import TRUNCATION_NOTE, fit_chat
from lmserve.chat.reasoning import detect_reasoning_tags
from lmserve.chat.response_schema import ResponseSchema, schema_turn_parser
from lmserve.chat.templates import ChatTemplate, TemplateError
from lmserve.chat.toolparsers import marker_texts
from lmserve.chat.tools import StreamParser
from lmserve.chat.turn import (
    forces_call,
    format_grammar,
    plan_turn,
    reasoning_grammar,
    template_kwargs,
    turn_parser,
)
from lmserve.core.backend import PreparedPrompt
from lmserve.core.errors import ErrorKind, LmserveError, invalid
from lmserve.core.images import MEDIA_MARKER, ImageInput, MediaSpan
from lmserve.core.request import ChatMessage, GenerationRequest, ResponseFormat
from lmserve.engine.turn_memory import TurnMemory

__all__ = ["Prompter", "Vocabulary"]


class VocabularyInfo(Protocol):
    @property
    def bos_token(self) -> str | None: ...

    @property
    def add_bos(self) -> bool: ...

    @property
    def metadata(self) -> Mapping[str, str]: ...


class Vocabulary(Protocol):
    """What prompt preparation needs of a model (engine.runner.Model has it)."""

    @property
    def n_vocab(self) -> int: ...

    @property
    def info(self) -> VocabularyInfo: ...

    def tokenize(self, text: str, *, add_special: bool = True,
                 parse_special: bool = True) -> list[int]: ...

    def control_tokens(self, texts: set[str]) -> frozenset[int]: ...


class MediaTokenizer(Protocol):
    """A multimodal projector's side of prompt preparation (engine.runner.Projector):
    whether it takes images and audio, and the tokens of a prompt with them."""

    @property
    def vision(self) -> bool: ...

    @property
    def audio(self) -> bool: ...

    def tokenize(self, text: str, images: Sequence[tuple[bytes, str]], *, add_special: bool,
                 params: Sequence[str] = (), kinds: Sequence[str] = ()
                 ) -> tuple[list[int], list[MediaSpan]]: ...


class Prompter:
    """Requests -> prompts for one vocabulary, template and context size."""

    def __init__(self, name: str, vocab: Vocabulary, template: ChatTemplate | None, *,
                 n_ctx: int, media: MediaPolicy | None = None,
                 context_overflow: str = "error",
                 projector: MediaTokenizer | None = None,
                 response_schema: ResponseSchema | None = None,
                 turns: TurnMemory | None = None) -> None:
        self.name = name
        self.turns = turns  # recent answers' ids: a chat prompt that repeats one reuses them
        self.response_schema = response_schema  # parses the output in place of the built-ins
        self.vocab = vocab
        self.template = template
        self.n_ctx = n_ctx
        self.media = media or MediaPolicy()
        self.context_overflow = context_overflow
        self.projector = projector
        self.vision = projector is not None and projector.vision
        self.audio = projector is not None and projector.audio
        self.reasoning_tags = detect_reasoning_tags(template.source if template else None)

    def render_chat(self, messages: list[ChatMessage], *, add_generation_prompt: bool = True,
                    template_kwargs: dict[str, Any] | None = None,
                    tools: list[dict[str, Any]] | None = None) -> str:
        template = self._chat_template()
        try:
            return template.render([_template_message(m, self.projector is not None)
                                    for m in messages],
                                   add_generation_prompt=add_generation_prompt, tools=tools,
                                   **(template_kwargs or {}))
        except TemplateError as exc:
            raise invalid(f"the chat template rejected these messages: {exc}",
                          param="messages") from None

    def prepare(self, request: GenerationRequest) -> PreparedPrompt:
        model = self.vocab
        if request.prompt_tokens is not None:
            bad = [t for t in request.prompt_tokens if not 0 <= t < model.n_vocab]
            if bad:
                raise invalid(f"token id {bad[0]} is outside the vocabulary "
                              f"(0..{model.n_vocab - 1})", param="prompt")
            fmt = request.response_format
            return PreparedPrompt(list(request.prompt_tokens), None,
                                  format_grammar(fmt) if fmt is not None else None)
        if request.messages is None:
            if request.response_format is not None:
                return self._prepare_raw(request.prompt or "", request.response_format)
            if request.tools:
                raise invalid("tools need a chat request (messages)", param="tools")
            text = request.prompt or ""
            return PreparedPrompt(self.tokenize(text), text)
        return self._prepare_chat(request)

    def _prepare_raw(self, prompt: str, response_format: ResponseFormat) -> PreparedPrompt:
        return PreparedPrompt(self.tokenize(prompt), prompt, format_grammar(response_format))

    def _chat_template(self) -> ChatTemplate:
        if self.template is None:
            raise invalid(f"model '{self.name}' has no chat template; use the completions "
                          "endpoint with a raw prompt, or start the server with --chat-template",
                          param="messages", code="no_chat_template")
        return self.template

    def _prepare_chat(self, request: GenerationRequest) -> PreparedPrompt:
        """Render the turn's plan: tools, fallback prompt, grammar (see chat.turn); under
        context_overflow "truncate", of the fewest oldest turns dropped (chat.overflow)."""
        media = check_images(request.messages, self.media)  # the policy's 400s first
        check_kinds(self.name, media, vision=self.vision, audio=self.audio)
        if (request.context_overflow or self.context_overflow) == "truncate":
            prepared, dropped = fit_chat(request, self._render_turn, self.n_ctx)
            return replace(prepared, dropped_messages=dropped, truncating=True)
        return self._render_turn(request)

    def _render_turn(self, request: GenerationRequest) -> PreparedPrompt:
        request, prefill = continued(request)
        plan = plan_turn(request, self._chat_template(), self.vocab.info.metadata)
        text = self.render_chat(plan.messages, add_generation_prompt=request.add_generation_prompt,
                                template_kwargs=template_kwargs(request), tools=plan.template_tools)
        text += prefill
        grammar = reasoning_grammar(plan, self.reasoning_tags, text, request.reasoning)
        texts = marker_texts(plan.tool_format, self.reasoning_tags)
        if self.response_schema is not None:
            texts.update(self.response_schema.markers)
        markers = self.vocab.control_tokens(texts)
        images = [image for message in plan.messages for image in _in_order(message)]
        if images and self.projector is not None:  # check_kinds: each of a kind it takes
            tokens, media = self._tokenize_media(text, images)
            return PreparedPrompt(tokens, text, grammar, plan.tool_format, markers=markers,
                                  media=tuple(media))
        tokens = self.tokenize(text) if self.turns is None else \
            self.turns.tokenize(text, lambda t, special: self.tokenize(t, add_special=special))
        return PreparedPrompt(tokens, text, grammar, plan.tool_format, markers=markers)

    def _tokenize_media(self, text: str, images: list[ImageInput]
                        ) -> tuple[list[int], list[MediaSpan]]:
        """The prompt's ids with each input's stand-ins, its images and audio clips read
        (inline data, or a file of the media directory) and keyed by their content hash."""
        assert self.projector is not None
        loaded = []
        for image in images:
            data = self._image_bytes(image)
            loaded.append((data, hashlib.sha256(data).hexdigest()))
        tokens, spans = self.projector.tokenize(text, loaded, add_special=True,
                                                params=[i.param for i in images],
                                                kinds=[i.kind for i in images])
        if spans and spans[-1].end >= len(tokens):
            raise invalid("the prompt ends with an image or audio clip; a text turn must "
                          "follow it", param="messages")
        bos = self.vocab.info.bos_token
        if len(tokens) >= 2 and tokens[0] == tokens[1] and bos and text.startswith(bos) \
                and self.vocab.info.add_bos:  # the template's BOS plus the vocabulary's
            tokens = tokens[1:]
            spans = [replace(s, start=s.start - 1) for s in spans]
        return tokens, spans

    def _image_bytes(self, image: ImageInput) -> bytes:
        if image.source == "base64":
            return decode_inline(image, self.media).data
        if is_local(image):
            path = local_file(image, self.media)
            with path.open("rb") as f:
                data = f.read(self.media.limit(image.kind) + 1)
            return verified(data, None, image, self.media).data
        # http(s) URLs were downloaded and put inline before preparation (fetch_media); a
        # caller that prepares without that step cannot take them.
        kind = image.kind
        raise invalid(f"{image.param}: {kind} URLs are not taken here; send the {kind} inline "
                      "(base64 / data: URL)", param=image.param, code=f"invalid_{kind}")

    def chat_parser(self, request: GenerationRequest, prepared: PreparedPrompt) -> StreamParser:
        """A fresh parser for one choice: reasoning first, then tool calls (or the model's
        response_schema, chat.response_schema)."""
        if self.response_schema is not None:
            return schema_turn_parser(self.response_schema, prepared.tool_format,
                                      self.reasoning_tags, prepared.text,
                                      parallel=request.parallel_tool_calls)
        return turn_parser(prepared.tool_format, self.reasoning_tags, prepared.text,
                           parallel=request.parallel_tool_calls, forced=forces_call(request))

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        model = self.vocab
        tokens = model.tokenize(text, add_special=add_special, parse_special=True)
        bos = model.info.bos_token
        # A template that writes the BOS text itself plus a vocab that adds BOS gives two.
        if len(tokens) >= 2 and tokens[0] == tokens[1] and bos and text.startswith(bos) \
                and model.info.add_bos:
            tokens = tokens[1:]
        return tokens

    def check_context(self, n_prompt: int, max_tokens: int | None, *,
                      truncating: bool = False, param: str = "messages") -> int:
        """Validate prompt length against the context; returns the effective max_tokens.
        `param`: the request field that holds the prompt (messages, or a completion's prompt)."""
        note = TRUNCATION_NOTE if truncating else ""
        if n_prompt == 0:
            raise invalid("the prompt is empty", param="prompt")
        if n_prompt >= self.n_ctx:
            raise LmserveError(ErrorKind.CONTEXT_LENGTH_EXCEEDED,
                               f"this model's maximum context length is {self.n_ctx} tokens, "
                               f"but the prompt has {n_prompt} tokens{note}", param=param,
                               code="context_length_exceeded")
        if max_tokens is None:
            return self.n_ctx - n_prompt
        if n_prompt + max_tokens > self.n_ctx:
            raise LmserveError(ErrorKind.CONTEXT_LENGTH_EXCEEDED,
                               f"this model's maximum context length is {self.n_ctx} tokens; "
                               f"the prompt has {n_prompt} tokens and max_tokens asks for "
                               f"{max_tokens} more{note}", param="max_tokens",
                               code="context_length_exceeded")
        return max_tokens


def continued(request: GenerationRequest) -> tuple[GenerationRequest, str]:
    """A request whose reply continues its final assistant message (continue_final_message):
    the messages before that one, rendered with the generation prompt, and its text, which
    follows the prompt (as llama-server renders an assistant prefill); else (request, "")."""
    if not request.continue_final_message:
        return request, ""
    messages = request.messages or []
    last = messages[-1] if messages else None
    if last is None or last.role != "assistant":
        raise invalid("continue_final_message continues the final message, which must be an "
                      "assistant message", param="messages")
    if last.images or last.extra.get("tool_calls"):
        raise invalid("continue_final_message continues the final assistant message's text; "
                      "it may hold no tool calls or media", param="messages")
    return replace(request, messages=messages[:-1], add_generation_prompt=True,
                   continue_final_message=False), last.content or ""


def _in_order(message: ChatMessage) -> list[ImageInput]:
    return sorted(message.images, key=lambda image: image.offset)


def _template_message(message: ChatMessage, markers: bool = False) -> dict[str, Any]:
    data = message.as_template_dict()
    if markers and message.images and isinstance(data.get("content"), str):
        content = data["content"]  # each input's media marker where it stood in the text
        for image in reversed(_in_order(message)):
            at = min(image.offset, len(content))
            content = content[:at] + MEDIA_MARKER + content[at:]
        data["content"] = content
    # Clients send tool-call arguments as JSON strings; HF templates expect mappings.
    for call in data.get("tool_calls") or []:
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
            try:
                fn["arguments"] = json.loads(fn["arguments"])
            except ValueError:
                pass
    return data
