"""Ollama routes: /api/chat, /api/generate, /api/embed, /api/embeddings, /api/tags, /api/show,
/api/ps, /api/version and the "Ollama is running" liveness text at the dialect's root.

lmserve serves the models it was started with: pull answers success for a model already served
and a clear error otherwise; push, create, copy, delete and blobs answer a clear error.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from enum import Enum
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from lmserve._version import __version__
from lmserve.chat.overflow import reply_room
from lmserve.core.backend import (
    BackendGeneration,
    LoadState,
    ModelBackend,
    ModelCard,
    PreparedPrompt,
    counted,
)
from lmserve.core.errors import ErrorKind, LmserveError
from lmserve.core.lifecycle import ModelLoading, Unloadable
from lmserve.core.request import GenerationRequest, with_defaults
from lmserve.dialects.ollama import adapter, encoder
from lmserve.dialects.ollama.schema import (
    ChatRequest,
    EmbeddingsRequest,
    EmbedRequest,
    GenerateRequest,
    PullRequest,
    ShowRequest,
)
from lmserve.http.routing import defaults_of, dialect_route, unless_disconnected
from lmserve.http.streaming import accepted, truncation_headers
from lmserve.models.registry import ModelRegistry

# The Ollama API revision whose request and response shapes this dialect follows.
OLLAMA_API_VERSION = "0.6.0"
LOAD_WAIT_S = 600.0
_MANAGEMENT = [("/api/push", ["POST"], "push models"), ("/api/create", ["POST"], "create models"),
               ("/api/copy", ["POST"], "copy models"), ("/api/delete", ["DELETE"], "delete models"),
               ("/api/blobs/{digest}", ["POST", "HEAD"], "store model blobs")]

Models = Callable[[], ModelRegistry]


def make_router(models: Models, *, tags: list[str | Enum] | None = None) -> APIRouter:
    router = APIRouter(route_class=dialect_route(encoder.error_body), tags=tags or ["Ollama"])

    async def root() -> Response:
        return PlainTextResponse("Ollama is running")

    async def version() -> Any:
        return {"version": OLLAMA_API_VERSION, "lmserve_version": __version__}

    _get_and_head(router, "/", root, "Liveness (Ollama clients probe it)")
    _get_and_head(router, "/api/version", version, "Version")

    @router.post("/api/chat", summary="Chat")
    async def chat(body: ChatRequest, request: Request) -> Response:
        return await _turn(request, models, body)

    @router.post("/api/generate", summary="Generate a completion")
    async def generate(body: GenerateRequest, request: Request) -> Response:
        return await _turn(request, models, body)

    @router.post("/api/embed", summary="Embeddings (L2-normalised)")
    async def embed(body: EmbedRequest) -> Response:
        started = time.monotonic_ns()
        service, embedding_ctx, options, headers = _embedding_request(models, body)
        texts = adapter.embed_texts(body.input)
        weights = service.require_ready().weights
        n_embd = weights.n_embd if weights is not None else None
        loaded = time.monotonic_ns()
        if body.dimensions and n_embd and body.dimensions > n_embd:
            raise LmserveError(ErrorKind.INVALID_REQUEST, f"dimensions must be at most {n_embd} "
                               "for this model", param="dimensions")
        inputs = [_embedding_input(service, embedding_ctx, text, options,
                                   body.truncate is not False, i)
                  for i, text in enumerate(texts)]
        vectors = await service.embed(inputs, service.adapters(body.model)) if inputs else []
        return JSONResponse(encoder.embed_response(
            body.model, vectors, body.dimensions, sum(len(t) for t in inputs),
            started_ns=started, loaded_ns=loaded, now_ns=time.monotonic_ns()), headers=headers)

    @router.post("/api/embeddings", summary="Embedding (legacy, not normalised)")
    async def embeddings(body: EmbeddingsRequest) -> Response:
        service, embedding_ctx, options, headers = _embedding_request(models, body)
        service.require_ready()
        vector: list[float] = []
        if body.prompt:
            tokens = _embedding_input(service, embedding_ctx, body.prompt, options, False, 0)
            adapters = service.adapters(body.model)  # "<model>:<alias>" picks a LoRA adapter
            vector = [float(x) for x in (await service.embed([tokens], adapters))[0]]
        return JSONResponse({"embedding": vector}, headers=headers)

    async def list_models() -> Any:
        registry = models()
        return {"models": [encoder.tag_entry(_facts(service.card, name))
                           for service in registry for name in registry.names(service)]}

    _get_and_head(router, "/api/tags", list_models, "List models")

    @router.get("/api/ps", summary="List loaded models")
    async def running() -> Any:
        registry = models()
        entries = []
        for service in registry:
            card = service.card
            if not card.ready or card.weights is None:
                continue
            metadata = _metadata(card)
            entries += [encoder.ps_entry(_facts(card, name), card.weights, card.n_ctx,
                                         metadata, card.placement,
                                         expires_at=card.expires_at)
                        for name in registry.names(service)]
        return {"models": entries}

    @router.post("/api/show", summary="Show a model")
    async def show(body: ShowRequest) -> Any:
        name = body.model or body.name
        service = _lookup(models, name)
        if body.verbose:
            raise LmserveError(ErrorKind.UNSUPPORTED, "'verbose' is not supported: lmserve does "
                               "not keep the GGUF's array metadata (tokens, merges) in memory",
                               param="verbose")
        card = service.card  # an unloaded library model is shown from its header
        if card.state in (LoadState.LOADING, LoadState.FAILED):
            card = service.require_ready()  # wait for the load, or its error
        return encoder.show_body(_facts(card, name), _metadata(card),
                                 template=card.chat_template or "",
                                 parameters=adapter.default_parameters(card.n_ctx),
                                 vision=card.vision)

    @router.post("/api/pull", summary="Pull (succeeds only for a model already served)")
    async def pull(body: PullRequest) -> Response:
        name = body.model or body.name
        try:
            _lookup(models, name)
        except LmserveError as exc:
            if exc.kind is not ErrorKind.MODEL_NOT_FOUND:
                raise
            raise _cannot(f'pull "{name}"', models) from None
        if body.stream is False:
            return JSONResponse({"status": "success"})
        return Response(json.dumps({"status": "success"}) + "\n",
                        media_type="application/x-ndjson")

    for path, methods, action in _MANAGEMENT:
        for method in methods:
            router.add_api_route(path, _refusal(action, models, path), methods=[method],
                                 summary=f"Not available: lmserve cannot {action}",
                                 include_in_schema=method != "HEAD")
    return router


def _get_and_head(router: APIRouter, path: str, endpoint: Callable[[], Any], summary: str) -> None:
    """GET in the API docs, plus the HEAD that Ollama clients probe with (one operation id)."""
    router.add_api_route(path, endpoint, methods=["GET"], summary=summary)
    router.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False)


# -- lookups and model facts -----------------------------------------------------------------

def _lookup(models: Models, name: str) -> ModelBackend:
    """Find a served model; "name:latest" also finds "name", as Ollama's default tag."""
    if not name:
        raise LmserveError(ErrorKind.INVALID_REQUEST, "model is required", param="model")
    registry = models()
    for candidate in dict.fromkeys((name, name.removesuffix(":latest"))):
        try:
            return registry.get(candidate)
        except LmserveError as exc:
            if exc.kind is not ErrorKind.MODEL_NOT_FOUND:
                raise
    raise LmserveError(ErrorKind.MODEL_NOT_FOUND, f'model "{name}" not found; this server '
                       f"serves {_served(registry)} (lmserve cannot pull models)", param="model")


def _served(registry: ModelRegistry) -> str:
    return ", ".join(sorted(n for s in registry for n in registry.names(s))) or "no models"


def _cannot(action: str, models: Models) -> LmserveError:
    return LmserveError(ErrorKind.UNSUPPORTED, f"lmserve cannot {action}: it serves the models "
                        f"it was started with ({_served(models())}); restart it with the "
                        "models you want")


def _refusal(action: str, models: Models, path: str) -> Callable[..., Any]:
    async def refuse() -> Response:
        raise _cannot(action, models)

    async def refuse_blob(digest: str) -> Response:  # declares the path's {digest}
        raise _cannot(action, models)
    return refuse_blob if "{digest}" in path else refuse


def _facts(card: ModelCard, name: str) -> encoder.ModelFacts:
    """The card's facts; a GGUF source's size and time are its file's. Without a file (an
    upstream's URL), the size is the weights' where known and the time the card's."""
    local = "://" not in card.source
    try:
        stat = os.stat(card.source) if local else None
    except OSError:
        stat = None
    if stat is not None:
        size, mtime_ns = stat.st_size, stat.st_mtime_ns
    else:
        weights_size = card.weights.size_bytes if card.weights is not None else None
        size, mtime_ns = weights_size or 0, card.created * 1_000_000_000
    return encoder.model_facts(name, os.path.realpath(card.source) if local else card.source,
                               size, mtime_ns, card.weights, _metadata(card))


def _metadata(card: ModelCard) -> Mapping[str, str]:
    """The loaded weights' GGUF metadata (license, file type, attention shapes, model_info),
    values as strings; empty where unknown (not loaded, or an upstream model)."""
    return card.weights.metadata if card.weights is not None else {}


def _embedding_request(models: Models, body: EmbedRequest | EmbeddingsRequest
                       ) -> tuple[ModelBackend, int, adapter.Options, dict[str, str]]:
    """The model, its embedding context, the options and the notice header."""
    service = _lookup(models, body.model)
    embedding_ctx = service.card.embedding_ctx
    options = adapter.parse_options(body.options)
    adapter.keep_alive_seconds(body.keep_alive)  # checked; embeddings keep the default
    text = adapter.notice(options, embedding_ctx, embedding=True)
    return service, embedding_ctx, options, _notice(text)


def _embedding_input(service: ModelBackend, embedding_ctx: int, text: str,
                     options: adapter.Options, truncate: bool, index: int) -> list[int]:
    limit = adapter.window(options, embedding_ctx)
    return adapter.fit_embedding_input(service.tokenize(text), limit, truncate, index)


# -- generation ------------------------------------------------------------------------------

async def _turn(request: Request, models: Models, body: ChatRequest | GenerateRequest
                ) -> Response:
    """One chat or generate request; an empty message list or prompt only loads the model."""
    started = time.monotonic_ns()
    service = _lookup(models, body.model)
    chat = isinstance(body, ChatRequest)
    job = adapter.chat_job(body) if isinstance(body, ChatRequest) else adapter.generate_job(body)
    if not (body.messages if isinstance(body, ChatRequest) else body.prompt):
        return await _load(request, service, body.model, job, chat=chat)
    card = service.require_ready()
    context = None
    if isinstance(body, GenerateRequest) and not body.raw:
        context = list(body.context or [])  # templated generate replies carry `context`
        if not card.has_template:
            job = adapter.without_template(job, body)
    job = dataclasses.replace(job, request=with_defaults(job.request,
                                                         defaults_of(models(), service)))
    return await _respond(request, service, card, body.model, job, chat=chat, started=started,
                          stream=body.stream is not False, context=context)


async def _load(request: Request, service: ModelBackend, model: str, job: adapter.Job, *,
                chat: bool) -> Response:
    """An empty prompt asks for the model to be loaded (its keep_alive from now on), or with
    keep_alive 0 unloaded: do it, then say so."""
    managed = service if isinstance(service, Unloadable) else None
    if job.keep_alive == 0:
        if managed is None:
            raise LmserveError(ErrorKind.UNSUPPORTED, f'lmserve keeps "{model}" loaded while '
                               "the server runs; it cannot unload it (keep_alive: 0)",
                               param="keep_alive")
        if managed.loaded:
            await managed.unload_now()  # a busy model unloads when its last request ends
        return JSONResponse(encoder.load_response(model, chat=chat, unload=True))
    await unless_disconnected(request, _until_loaded(service))
    if managed is not None:
        managed.set_keep_alive(job.keep_alive)
    return JSONResponse(encoder.load_response(model, chat=chat))


async def _until_loaded(service: ModelBackend) -> None:
    """A library model's load is awaited by the route (ModelLoading); another backend that
    loads by itself (an upstream) is polled."""
    deadline = time.monotonic() + LOAD_WAIT_S
    while True:
        try:
            service.require_ready()
            return
        except ModelLoading:
            raise
        except LmserveError as exc:
            waiting = service.card.state in (LoadState.PENDING, LoadState.LOADING)
            if exc.kind is not ErrorKind.LOADING or not waiting or time.monotonic() >= deadline:
                raise
        await asyncio.sleep(0.1)


def _prepare(service: ModelBackend, n_ctx: int, job: adapter.Job, context: list[int] | None
             ) -> PreparedPrompt:
    """Template and tokenize; a `context` from an earlier reply is continued token for token."""
    prepared = service.prepare(_truncation_target(job, n_ctx))
    if not context:
        return prepared
    tokens = context + service.tokenize(prepared.text or "", add_special=False)
    checked = service.prepare(dataclasses.replace(  # token ids checked against the vocabulary
        job.request, messages=None, prompt=None, prompt_tokens=tokens, response_format=None))
    return dataclasses.replace(prepared, tokens=checked.tokens)


def _truncation_target(job: adapter.Job, loaded_ctx: int) -> GenerationRequest:
    """The request as truncation sees it (chat.overflow): room for num_predict (capped to what
    is left, so at most the reserve) inside the num_ctx window. The service fits prompts to the
    loaded context, so the part of it outside the window counts as room too."""
    window = adapter.window(job.options, loaded_ctx)
    room = reply_room(window, job.request.max_tokens, capped=True)
    return dataclasses.replace(job.request, max_tokens=loaded_ctx - window + room)


async def _respond(request: Request, service: ModelBackend, card: ModelCard, model: str,
                   job: adapter.Job, *, chat: bool, started: int, stream: bool,
                   context: list[int] | None) -> Response:
    loaded = time.monotonic_ns()
    # an upstream renders the prompt itself: it is asked for the length (core.backend)
    prepared = await counted(service, job.request, _prepare(service, card.n_ctx, job, context))
    gen = adapter.finalize(job.request, job.options, card.n_ctx, len(prepared.tokens))
    submitted = time.monotonic_ns()
    # Refusals are real statuses, even for streams. A chat's steps come out parsed (thinking,
    # tool calls); a raw prompt is the client's own text, so its output is not parsed.
    generation = service.start(gen, prepared)
    run = encoder.Run(model=model, chat=chat, started_ns=started, loaded_ns=loaded,
                      submitted_ns=submitted,
                      prompt_ids=list(prepared.tokens) if context is not None else None,
                      show_thinking=job.show_thinking)
    headers = {**_notice(adapter.notice(job.options, card.n_ctx)),
               **truncation_headers(prepared.dropped_messages)}
    if stream:
        await accepted([generation])  # an upstream's refusal is a status here too
        return StreamingResponse(_stream(generation, run),
                                 media_type="application/x-ndjson",
                                 headers={**headers, "Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})
    try:
        await unless_disconnected(request, _collect(generation, run))
    finally:
        generation.close()
    if run.failed is not None:
        raise run.failed.error()  # with its kind: a full KV cache is a 503
    return JSONResponse(run.final(time.monotonic_ns(), streamed=False), headers=headers)


async def _collect(generation: BackendGeneration, run: encoder.Run) -> None:
    async for steps in generation:
        for step in steps:
            run.add(step, time.monotonic_ns())


async def _stream(generation: BackendGeneration, run: encoder.Run) -> AsyncIterator[bytes]:
    try:
        async for steps in generation:
            for step in steps:
                step.raise_failure()  # its text is dropped; the last line is the error
                frame = run.add(step, time.monotonic_ns())
                if frame is not None:
                    yield _line(frame)
        yield _line(run.final(time.monotonic_ns(), streamed=True))
    except LmserveError as exc:  # the stream has started: the error is its last line
        yield _line(encoder.error_body(exc))
    finally:
        generation.close()  # a disconnect lands here too, and cancels the sequence


def _line(frame: dict[str, Any]) -> bytes:
    return (json.dumps(frame, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def _notice(text: str | None) -> dict[str, str]:
    return {"X-Lmserve-Notice": text} if text else {}
