"""oLLM-style local API (seed 002): health, model discovery, runtime plans, prompts and sessions
whose turns are stored in the server's session store."""

from __future__ import annotations

import ipaddress
import os
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping
from enum import Enum
from typing import Any

from fastapi import APIRouter, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute

from lmserve._version import __version__
from lmserve.core.backend import ModelBackend, PlacementFacts
from lmserve.core.errors import ErrorKind, LmserveError
from lmserve.core.request import ChatMessage, with_defaults
from lmserve.dialects.ollm import adapter, discovery, encoder, plan
from lmserve.dialects.ollm.schema import (
    GenerationIn,
    PlanRequest,
    PromptRequest,
    RuntimeIn,
    SessionCreateRequest,
    SessionPromptRequest,
)
from lmserve.dialects.ollm.turns import PromptJob, SessionTurn, Turns
from lmserve.http.routing import body_error, defaults_of, dialect_route, unless_disconnected
from lmserve.http.streaming import SSE_HEADERS, accepted, truncation_headers
from lmserve.models.registry import ModelRegistry
from lmserve.stores import NotFoundError, SessionStore

Models = Callable[[], ModelRegistry]


class _FastAPIValidation(APIRoute):
    """A malformed request gets FastAPI's own 422 {"detail": [...]}, as from oLLM's server;
    a body that is not a JSON object at all is the 400 every dialect answers (outer route)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def validated(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                if body_error(exc) is not None:
                    raise
                return JSONResponse(encoder.validation_body(jsonable_encoder(exc.errors())),
                                    status_code=422)

        return validated


class OllmRoute(dialect_route(encoder.error_body), _FastAPIValidation):  # type: ignore[misc]
    """API keys and errors as in every dialect; validation sits inside (see the MRO)."""


def make_router(models: Models, *, tags: list[str | Enum] | None = None) -> APIRouter:
    router = APIRouter(route_class=OllmRoute, tags=tags or ["oLLM"])
    turns = Turns()

    @router.get("/v1/health", summary="Service health")
    async def health(request: Request) -> Any:
        registry = models()
        body = encoder.health_body(
            status=registry.status, version=__version__, local_only=_local_only(request),
            models={c.name: {"state": c.state.value, "error": c.error}
                    for c in (s.card for s in registry)})
        return JSONResponse(body, status_code=200 if body["ok"] else 503)

    @router.get("/v1/ollm/models", summary="Served and bundled models with runtime details")
    async def list_models(installed: bool = False) -> Any:
        registry = models()
        entries = [discovery.served_entry(registry, s) for s in registry]
        entries += discovery.catalog_entries(registry)
        return {"models": [e for e in entries if e["materialized"] or not installed]}

    @router.get("/v1/ollm/models/{model_reference:path}", summary="Inspect one model reference")
    async def model_info(model_reference: str) -> Any:
        return discovery.reference_entry(models(), model_reference)

    @router.post("/v1/plan", summary="Plan the runtime for a model without running a prompt")
    async def plan_runtime(body: PlanRequest) -> Any:
        return _plan(models(), body.runtime)

    @router.post("/v1/prompt", summary="Run one prompt")
    async def prompt(body: PromptRequest, request: Request) -> Response:
        return await _one_shot(request, models, body, stream=False)

    @router.post("/v1/prompt/stream", summary="Run one prompt, streamed as SSE")
    async def prompt_stream(body: PromptRequest, request: Request) -> Response:
        return await _one_shot(request, models, body, stream=True)

    @router.post("/v1/sessions", summary="Create a session")
    async def create_session(body: SessionCreateRequest, request: Request) -> Any:
        _, name = _served(models, body.runtime)
        session = await _sessions(request).create(
            f"sess_{uuid.uuid4().hex}", model=name, system=body.system_prompt,
            metadata={"session_name": body.session_name,
                      "generation": body.generation.model_dump(exclude_none=True)})
        return encoder.session_body(session)

    @router.get("/v1/sessions/{session_id}", summary="A session and its transcript")
    async def get_session(session_id: str, request: Request) -> Any:
        session = await _sessions(request).get(session_id)
        if session is None:
            raise NotFoundError("Session", session_id)
        return encoder.session_body(session)

    @router.delete("/v1/sessions/{session_id}", summary="Delete a session")
    async def delete_session(session_id: str, request: Request) -> Any:
        if not await _sessions(request).delete(session_id):
            raise NotFoundError("Session", session_id)
        for service in models():  # its KV is no longer pinned, wherever its turns ran
            await service.release_session(session_key(session_id))
        return {"session_id": session_id, "deleted": True}

    @router.post("/v1/sessions/{session_id}/prompt", summary="Prompt within a session")
    async def session_prompt(session_id: str, body: SessionPromptRequest,
                             request: Request) -> Response:
        return await _turn(request, models, turns, session_id, body, stream=False)

    @router.post("/v1/sessions/{session_id}/prompt/stream",
                 summary="Prompt within a session, streamed as SSE")
    async def session_prompt_stream(session_id: str, body: SessionPromptRequest,
                                    request: Request) -> Response:
        return await _turn(request, models, turns, session_id, body, stream=True)

    return router


def _local_only(request: Request) -> bool:
    host = (request.scope.get("server") or ("127.0.0.1", 0))[0]
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _sessions(request: Request) -> SessionStore:
    store = request.app.state.lmserve.store
    if store is None:
        raise LmserveError(ErrorKind.LOADING, "the session store is still opening",
                           retry_after=1.0)
    sessions: SessionStore = store.sessions
    return sessions


def _served(models: Models, runtime: RuntimeIn) -> tuple[ModelBackend, str]:
    """The served model a prompt runs on; its runtime must match the request's."""
    adapter.check_runtime(runtime, gpu=models().gpu()[0])
    service, name = discovery.served(models(), runtime.model_reference)
    card = service.card
    threads = card.threads or plan.default_threads()
    adapter.check_served(runtime, {"context_length": card.n_ctx, "threads": threads,
                                   "threads_batch": card.settings.get("threads_batch") or threads,
                                   "parallel": card.parallel,
                                   "offload_gpu_layers": card.placement.gpu_layers
                                   if card.placement is not None else 0})
    return service, name


def _plan(registry: ModelRegistry, runtime: RuntimeIn) -> dict[str, Any]:
    adapter.check_runtime(runtime, gpu=registry.gpu()[0])
    target, header, service = discovery.plan_target(registry, runtime.model_reference)
    facts = plan.facts_from_header(header.metadata, size_bytes=header.size_bytes,
                                   quantization=header.quantization)
    # A model that is not served is planned with the first served model's engine settings.
    source = service if service is not None else next(iter(registry), None)
    card = source.card if source is not None else None
    settings = card.settings if card is not None else {}
    running = card if service is not None and card is not None and card.ready else None
    knobs = plan.choose(facts, settings, runtime.model_dump(include=set(adapter.SERVED_KNOBS)),
                        cpu_count=plan.default_threads(),
                        running_ctx=running.n_ctx if running else None,
                        memory=plan.machine_memory(),
                        running_layout=running.kv_layout if running else None,
                        running_offload=_offload(running.placement) if running else None,
                        gpu=registry.gpu())
    return plan.plan_body(target, facts, knobs,
                          plan.memory(facts, knobs, available=_available_memory()))


def _offload(placement: PlacementFacts | None) -> Any:
    """The running engine's GPU layers, as the plan rules state them."""
    if placement is None:
        return None
    return plan.running_offload(placement.gpu_layers, placement.n_layer, placement.reason,
                                placement.kv_where == "gpu")


def _available_memory() -> int | None:
    """MemAvailable from /proc/meminfo (memory that can be had without swapping)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


async def _one_shot(request: Request, models: Models, body: PromptRequest, *,
                    stream: bool) -> Response:
    service, name = _served(models, body.runtime)
    messages = adapter.prompt_messages(body.system_prompt, [], body.prompt)
    job = _start(service, name, messages, body.generation, body.prompt, body.runtime.quiet,
                 defaults_of(models(), service))
    headers = truncation_headers(job.truncated_messages)
    if stream:
        await accepted([job.generation])  # an upstream's refusal is a status here too
        return StreamingResponse(job.events(), media_type="text/event-stream",
                                 headers={**headers, **SSE_HEADERS})
    return JSONResponse(await unless_disconnected(request, job.collect()), headers=headers)


async def _turn(request: Request, models: Models, turns: Turns, session_id: str,
                body: SessionPromptRequest, *, stream: bool) -> Response:
    """A session turn: the transcript so far, then this prompt; stored once answered."""
    sessions = _sessions(request)
    claim = turns.claim(session_id)
    handed_over = False
    try:
        session = await sessions.get(session_id)
        if session is None:
            raise NotFoundError("Session", session_id)
        service, name = _served(models, RuntimeIn(model_reference=session.model))
        generation = adapter.merge_generation(session.metadata.get("generation", {}),
                                              body.generation)
        messages = adapter.prompt_messages(session.system, session.messages, body.prompt)
        job = _start(service, name, messages, generation, body.prompt, None,
                     defaults_of(models(), service), session=session_key(session_id))
        job.sessions, job.session_id = sessions, session_id
        claim.generation = job.generation
        headers = truncation_headers(job.truncated_messages)
        if stream:
            await accepted([job.generation])  # an upstream's refusal is a status here too
            job.on_end = lambda: turns.release(session_id, claim)
            handed_over = True
            return StreamingResponse(job.events(on_start=lambda: _own(claim)),
                                     media_type="text/event-stream",
                                     headers={**headers, **SSE_HEADERS})
        claim.owned = True
        return JSONResponse(await unless_disconnected(request, job.collect()), headers=headers)
    finally:
        if not handed_over:
            turns.release(session_id, claim)


def _own(claim: SessionTurn) -> None:
    claim.owned = True


def session_key(session_id: str) -> str:
    """The engine's pin key of a stored session: its turns' KV stays resident between turns
    (GenerationRequest.session) until the session is deleted."""
    return f"ollm:{session_id}"


def _start(service: ModelBackend, name: str, messages: list[ChatMessage], gen: GenerationIn,
           prompt: str, quiet: bool | None, defaults: Mapping[str, Any],
           session: str | None = None) -> PromptJob:
    """Prepare and submit one prompt, with the model's defaults where `gen` sets nothing."""
    request = with_defaults(adapter.generation_request(messages, gen, name), defaults)
    request.session = session
    prepared = service.prepare(request)
    started = time.monotonic()
    # Refusals are real statuses, even streamed. oLLM answers the raw text: nothing to parse.
    generation = service.start(request, prepared, parse=False)
    status = None if quiet else (f"generating with {name} (llama.cpp): "
                                 f"{len(prepared.tokens)} prompt tokens")
    return PromptJob(generation, name, prompt, started, status=status,
                     truncated_messages=prepared.dropped_messages)
