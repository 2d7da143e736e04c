"""Several names of one GGUF file: which share a loaded engine, and how each keeps its own
prompting.

Two names of one file (two `[models.X]` sections, model arguments, or app resources) share
one loaded engine when their engine settings are equal: an alias never loads a model twice.
Settings that only shape the prompt and the reading of the output stay per name
(`PER_NAME`: the chat template, the response schema, the context-overflow policy), as do the
default generation parameters and a default system prompt: a name whose per-name settings
differ from the engine's first name is a `NameView` over that engine (its own card, template
and parser; the engine's weights, KV cache, queue and load state). Names whose engine
settings differ (context, parallel, KV types, GPU layers, LoRA, projector, draft, ...) get an
engine of their own (the registry decides, `ModelRegistry.add` and `add_managed`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields, replace
from typing import Any

import numpy as np

from lmserve.chat.reasoning import detect_reasoning_tags
from lmserve.chat.response_schema import ResponseSchema, load_response_schema
from lmserve.chat.templates import ChatTemplate
from lmserve.chat.tools import StreamParser
from lmserve.core.backend import (
    BackendGeneration,
    CacheFlush,
    EngineStats,
    ModelCard,
    PreparedPrompt,
)
from lmserve.core.errors import LmserveError
from lmserve.core.lora import AdapterSet, LoraSelection
from lmserve.core.lora import resolve as resolve_lora
from lmserve.core.request import ChatMessage, GenerationRequest
from lmserve.models.managed import ManagedModel
from lmserve.prompting import Prompter
from lmserve.service import EngineSettings, ModelService

# EngineSettings fields that only shape prompts and the parsing of the output: per name.
PER_NAME = ("chat_template", "response_schema", "context_overflow")


def engine_differences(a: EngineSettings, b: EngineSettings) -> list[str]:
    """The engine settings (everything but PER_NAME) in which a and b differ."""
    return [f.name for f in fields(EngineSettings)
            if f.name not in PER_NAME and getattr(a, f.name) != getattr(b, f.name)]


def same_prompting(a: EngineSettings, b: EngineSettings) -> bool:
    return all(getattr(a, key) == getattr(b, key) for key in PER_NAME)


def check_template(settings: EngineSettings, name: str) -> None:
    """A name's own chat template must compile (TemplateError, a ValueError, naming it): a
    view meets it only at its first request, so it is checked when the name is added."""
    if settings.chat_template:
        ChatTemplate(settings.chat_template, name=name)


class NameView:
    """One name of a shared engine with its own per-name settings (see the module
    docstring). Implements the backend contract: prompting, its card and its defaults here,
    everything else (load state, generation, embeddings, caches) the engine's. The registry
    loads, drains and closes the engine itself; a view does none of that."""

    kind = "llama.cpp"

    def __init__(self, base: ModelService | ManagedModel, name: str, aliases: Sequence[str],
                 settings: EngineSettings, *, defaults: Mapping[str, Any] | None = None,
                 system: str | None = None) -> None:
        check_template(settings, name)
        self.base = base
        self.engine: ModelService = base.service if isinstance(base, ManagedModel) else base
        self.name = name
        self.aliases = tuple(aliases)
        self.settings = settings
        self.defaults = dict(defaults or {})  # default generation parameters
        self.system = system  # a system prompt for chats without one (Ollama's system layer)
        self._schema: ResponseSchema | None = \
            load_response_schema(settings.response_schema) if settings.response_schema else None
        self._template: tuple[Any, ChatTemplate | None] | None = None  # per loaded model
        self._prompter: Prompter | None = None

    # -- the engine, and this name's prompting over it --------------------------------------
    def _model(self) -> Any:  # engine.runner.Model (only the service may name it)
        """The engine's loaded model; else what the engine raises (a managed engine starts
        its load and raises ModelLoading, which the route awaits)."""
        if isinstance(self.base, ManagedModel):
            self.base._loaded()
        return self.engine._loaded()

    def _template_of(self, model: Any) -> ChatTemplate | None:
        if self._template is None or self._template[0] is not model:
            source = self.settings.chat_template or model.info.chat_template
            own = self.engine.template
            if own is not None and own.source == source:
                template: ChatTemplate | None = own
            elif source:
                template = ChatTemplate(source, bos_token=model.info.bos_token,
                                        eos_token=model.info.eos_token, name=self.name)
            else:
                template = None
            self._template = (model, template)
        return self._template[1]

    def _prompts(self) -> Prompter:
        model, engine, s = self._model(), self.engine, self.settings
        template = self._template_of(model)
        p = self._prompter
        if p is None or p.vocab is not model or p.template is not template or \
                p.n_ctx != engine.n_ctx or p.projector is not engine.projector or \
                p.turns is not engine.turns:
            p = self._prompter = Prompter(
                self.name, model, template, n_ctx=engine.n_ctx, media=s.media,
                context_overflow=s.context_overflow, projector=engine.projector,
                response_schema=self._schema, turns=engine.turns)
        return p

    def _template_source(self) -> str | None:
        if self.settings.chat_template:
            return self.settings.chat_template
        model = self.engine.model
        if model is not None:
            return model.info.chat_template
        header = self.base.entry.header if isinstance(self.base, ManagedModel) else None
        return header.chat_template if header is not None else None

    # -- the card ---------------------------------------------------------------------------
    @property
    def card(self) -> ModelCard:
        card = self.base.card
        template = self._template_source()
        settings = {**card.settings, "chat_template_override": self.settings.chat_template
                    is not None, "response_schema": self.settings.response_schema is not None,
                    "context_overflow": self.settings.context_overflow}
        return replace(card, name=self.name, aliases=self.aliases, chat_template=template,
                       reasoning_tags=detect_reasoning_tags(template), settings=settings,
                       defaults=self.defaults)

    def require_ready(self) -> ModelCard:
        self._model()
        return self.card

    @property
    def ready(self) -> bool:
        return self.base.ready

    @property
    def healthy(self) -> bool:
        return self.base.healthy

    def stats(self) -> EngineStats | None:
        return None  # the engine's counters are its first name's (not counted twice)

    # -- lifecycle: the engine's, done by the registry through its first name ---------------
    def load(self, loop: asyncio.AbstractEventLoop,
             progress: Callable[[float], None] | None = None) -> None:
        return None

    def close(self) -> None:
        return None

    def drain(self) -> None:
        return None

    @property
    def busy(self) -> int:
        return 0  # counted by the engine

    async def fail_all(self, error: LmserveError) -> None:
        return None

    # -- requests ---------------------------------------------------------------------------
    def prepare(self, request: GenerationRequest) -> PreparedPrompt:
        prompts = self._prompts()
        if self.system and request.messages is not None and \
                not any(m.role == "system" for m in request.messages):
            request = replace(request, messages=[ChatMessage(role="system", content=self.system),
                                                 *request.messages])
        return prompts.prepare(request)

    async def fetch_media(self, request: GenerationRequest) -> GenerationRequest:
        return await self.base.fetch_media(request)

    def start(self, request: GenerationRequest, prepared: PreparedPrompt | None = None, *,
              parse: bool | None = None) -> BackendGeneration:
        prepared = prepared or self.prepare(request)
        return self.base.start(request, prepared, parse=parse, prompts=self._prompts())

    def render_chat(self, messages: list[ChatMessage], *, add_generation_prompt: bool = True,
                    template_kwargs: dict[str, Any] | None = None,
                    tools: list[dict[str, Any]] | None = None) -> str:
        return self._prompts().render_chat(messages, add_generation_prompt=add_generation_prompt,
                                           template_kwargs=template_kwargs, tools=tools)

    def chat_parser(self, request: GenerationRequest, prepared: PreparedPrompt) -> StreamParser:
        return self._prompts().chat_parser(request, prepared)

    def check_context(self, n_prompt: int, max_tokens: int | None, *,
                      truncating: bool = False, param: str = "messages") -> int:
        return self._prompts().check_context(n_prompt, max_tokens, truncating=truncating,
                                             param=param)

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        return self.base.tokenize(text, add_special=add_special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.base.detokenize(tokens)

    async def embed(self, inputs: Sequence[Sequence[int] | str], adapters: AdapterSet = ()
                    ) -> list[np.ndarray]:
        return await self.base.embed(inputs, adapters)

    def adapters(self, model: str | None, selection: LoraSelection | None = None
                 ) -> AdapterSet:
        return resolve_lora(self.settings.loras, model, selection, (self.name, *self.aliases))

    async def abort(self, request_id: str) -> bool:
        return await self.base.abort(request_id)

    async def flush_cache(self) -> CacheFlush | None:
        return await self.base.flush_cache()

    async def release_session(self, session: str) -> bool:
        return await self.base.release_session(session)

    def __getattr__(self, name: str) -> Any:
        """What the engine offers beyond the contract (vision, model, ...)."""
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.base, name)
