"""Anthropic routes: /v1/messages, /v1/messages/count_tokens, /v1/models."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from enum import Enum
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from lmserve.chat.overflow import reply_room
from lmserve.core.backend import (
    BackendGeneration,
    ModelBackend,
    counted,
    prompt_count,
    with_media,
)
from lmserve.core.errors import ErrorKind, LmserveError, invalid
from lmserve.core.request import GenerationRequest, with_defaults
from lmserve.dialects.anthropic import adapter, encoder
from lmserve.dialects.anthropic.schema import CountTokensRequest, MessageRequest
from lmserve.dialects.anthropic.tools import thinking
from lmserve.http.routing import defaults_of, dialect_route, unless_disconnected
from lmserve.http.streaming import SSE_HEADERS, accepted, truncation_headers
from lmserve.models.registry import ModelRegistry

log = logging.getLogger("lmserve.anthropic")

_LIFECYCLES = ("active", "deprecated", "retired")


def make_router(models: Callable[[], ModelRegistry], *,
                tags: list[str | Enum] | None = None) -> APIRouter:
    router = APIRouter(route_class=dialect_route(encoder.error_body), tags=tags or ["Anthropic"])

    @router.post("/v1/messages", summary="Create a message")
    async def create_message(body: MessageRequest, request: Request) -> Any:
        view = models()
        service = view.get(body.model)
        gen, _ = adapter.message_request(body)
        gen = with_defaults(gen, defaults_of(view, service))  # never max_tokens: it is required
        gen = await with_media(service, gen)  # image URLs fetched under the media policy
        display = thinking(body, body.max_tokens).display
        n_ctx = service.require_ready().n_ctx
        # max_tokens is capped to the room left (below), so truncation keeps only a reserve
        room = reply_room(n_ctx, gen.max_tokens, capped=True)
        fitted = dataclasses.replace(gen, max_tokens=room)
        # an upstream renders the chat itself: it is asked for the length (core.backend)
        prepared = await counted(service, fitted, service.prepare(fitted))
        gen, capped = _fit_context(n_ctx, gen, len(prepared.tokens))
        headers = truncation_headers(prepared.dropped_messages)
        # Refusals happen before a stream starts; the steps come out parsed (thinking, tools).
        generation = service.start(gen, prepared)
        if body.stream:
            await accepted([generation])  # an upstream's refusal is a status here too
            enc = encoder.StreamEncoder(body.model, len(prepared.tokens), context_capped=capped,
                                        display=display)
            return StreamingResponse(_stream(generation, enc), media_type="text/event-stream",
                                     headers={**headers, **SSE_HEADERS})
        collected = await unless_disconnected(request, _collect(generation))
        collected.raise_failure()  # with the failure's kind: a full KV cache is a 503
        return JSONResponse(encoder.message(body.model, collected, context_capped=capped,
                                            display=display), headers=headers)

    @router.post("/v1/messages/count_tokens", summary="Count the tokens of a message request")
    async def count_tokens(body: CountTokensRequest) -> Any:
        service = models().get(body.model)
        gen, _ = adapter.count_request(body)
        gen = await with_media(service, gen)
        return {"input_tokens": await prompt_count(service, gen, service.prepare(gen))}

    # Names differ from the OpenAI router's: both dialects own GET /v1/models at the root.
    @router.get("/v1/models", summary="List models (Anthropic)")
    async def anthropic_list_models(request: Request,
                                    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
                                    after_id: str | None = None,
                                    before_id: str | None = None) -> Any:
        registry = models()
        cards = [_card(s, name) for s in registry for name in registry.names(s)]
        if "active" not in _lifecycles(request):  # every served model is active
            cards = []
        return encoder.model_page(cards, limit=limit, after_id=after_id, before_id=before_id)

    @router.get("/v1/models/{model_id:path}", summary="Retrieve a model (Anthropic)")
    async def anthropic_get_model(model_id: str) -> Any:
        return _card(models().get(model_id), model_id)

    return router


def _fit_context(n_ctx: int, gen: GenerationRequest, n_prompt: int
                 ) -> tuple[GenerationRequest, bool]:
    """Anthropic clients send a max_tokens sized for large models; instead of refusing, run
    until the context is full and report stop_reason model_context_window_exceeded."""
    room = n_ctx - n_prompt
    if gen.max_tokens is not None and 0 < room < gen.max_tokens:
        return dataclasses.replace(gen, max_tokens=room), True
    return gen, False


async def _collect(generation: BackendGeneration) -> encoder.Collected:
    collected = encoder.Collected()
    async for steps in generation:
        for step in steps:
            collected.add(step)
    return collected


async def _stream(generation: BackendGeneration, enc: encoder.StreamEncoder
                  ) -> AsyncIterator[bytes]:
    try:
        for frame in enc.start():
            yield frame
        async for steps in generation:
            for step in steps:
                step.raise_failure()  # its text is dropped; the error event carries its kind
                for frame in enc.output(step):
                    yield frame
    except LmserveError as exc:  # the stream has started: the error travels inside it
        yield enc.error(exc)
    except Exception as exc:
        log.exception("stream failed")
        yield enc.error(LmserveError(ErrorKind.INTERNAL, f"internal error: {type(exc).__name__}"))
    finally:
        generation.close()  # a disconnect lands here too: the engine stops the sequence


def _card(service: ModelBackend, name: str) -> dict[str, Any]:
    card = service.card
    return encoder.model_card(name, card.created, card.n_ctx)


def _lifecycles(request: Request) -> set[str]:
    """The lifecycle filter; the official client sends it as `lifecycle[]=...`."""
    values = [v for key in ("lifecycle", "lifecycle[]")
              for raw in request.query_params.getlist(key) for v in raw.split(",") if v]
    for value in values:
        if value not in _LIFECYCLES:
            raise invalid(f"lifecycle: '{value}' is not one of {', '.join(_LIFECYCLES)}",
                          param="lifecycle")
    return set(values) or {"active", "deprecated"}
