"""SGLang-style runtime routes: /generate, /health_generate, /model_info, /server_info,
/flush_cache, /abort_request, /open_session and /close_session (plus SGLang's own
/get_model_info and /get_server_info names, which its clients call). /health lives in the app
shell: 200, or 503 when an engine died. Sessions: sessions.py."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from enum import Enum
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from lmserve._version import __version__
from lmserve.core.backend import (
    BackendGeneration,
    ChoiceStep,
    ModelBackend,
    ModelCard,
    PreparedPrompt,
    WeightsFacts,
)
from lmserve.core.errors import ErrorKind, LmserveError, invalid
from lmserve.core.request import GenerationRequest, SamplingParams, with_defaults
from lmserve.dialects.sglang import adapter, encoder, sessions
from lmserve.dialects.sglang.schema import AbortRequest, GenerateRequest
from lmserve.http.routing import (
    admin_only,
    caller_is_admin,
    caller_name,
    defaults_of,
    dialect_route,
    unless_disconnected,
)
from lmserve.http.streaming import SSE_HEADERS, accepted, merge, sse, start_all
from lmserve.models.gguf_header import GGUFError, GGUFHeader, read_header
from lmserve.models.registry import ModelRegistry

HEALTH_TIMEOUT_S = 20.0  # SGLang's default health-check timeout
ABORT = "sglang_abort"  # the cluster message: abort these rids (or all) on every replica
Models = Callable[[], ModelRegistry]
Samples = list[list[encoder.Sample]]  # per job, per sample


def make_router(models: Models, *, tags: list[str | Enum] | None = None) -> APIRouter:
    router = APIRouter(route_class=dialect_route(encoder.error_body), tags=tags or ["SGLang"])
    live = LiveRequests()
    open_sessions = sessions.Sessions()

    @router.get("/health_generate", summary="Health check that generates one token",
                response_class=Response)  # an empty 200, as SGLang answers
    async def health_generate(model: str | None = None) -> Response:
        for service in _services(models, model):
            await _one_token(service)
        return Response(status_code=200)

    async def model_info(model: str | None = None) -> Any:
        registry = models()
        service = registry.get(model)
        return _model_info(service, model or registry.names(service)[0])

    async def server_info(request: Request) -> Any:
        return _server_info(request, models())

    _route(router, "/model_info", model_info, "Model metadata", alias="/get_model_info")
    _route(router, "/server_info", server_info, "Runtime configuration (secrets redacted)",
           alias="/get_server_info")

    async def remote_abort(message: dict[str, Any]) -> None:
        """Another replica's /abort_request: abort what runs here, as the caller may."""
        caller, admin = message.get("caller"), message.get("admin") is True
        caller = caller if isinstance(caller, str) else None
        if message.get("all") is True:
            rids = live.rids() if admin else live.rids(owner=caller)
        else:
            sent = message.get("rids")
            rids = [r for r in (sent if isinstance(sent, list) else []) if isinstance(r, str)
                    and (admin or live.owner(r, caller) is True)]
        await _abort(models, rids)

    def listen(request: Request) -> None:
        """Take other replicas' aborts from the first request on: a rid they abort runs here
        only after a /generate came here."""
        state = getattr(request.app.state, "lmserve", None)  # http.app.AppState
        register = getattr(state, "on_message", None)  # an app without one: no cluster
        if register is not None:
            register(ABORT, remote_abort)

    async def generate(body: GenerateRequest, request: Request) -> Response:
        listen(request)
        registry = models()
        service = registry.get(body.model)
        plan = _with_defaults(adapter.generate_plan(body, new_rid=lambda: uuid.uuid4().hex),
                              defaults_of(registry, service))
        live.check_free(job.rid for job in plan.jobs)
        turn = None
        if body.session_params is not None:
            plan, turn = _session_turn(open_sessions, service, body, plan, request)
        prepared = [_prepare(service, job) for job in plan.jobs]
        arrival = time.monotonic()
        jobs = [(j.request, p) for j, p in zip(plan.jobs, prepared, strict=True)]
        generations = start_all(service, jobs, parse=False)
        live.add(plan.jobs, generations, caller_name(request))
        samples = _samples(plan, prepared)
        if turn is not None:
            job = plan.jobs[0]
            sessions.add_turn(turn, job.rid, job.request.max_tokens, generations[0],
                              samples[0][0])
        if body.stream:
            await accepted(generations)  # an upstream's refusal is a status here too
            return StreamingResponse(_stream(generations, plan, samples, arrival),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        await unless_disconnected(request, _collect(generations, samples, arrival))
        bodies = [s.body(indexed=False) for group in samples for s in group]
        return JSONResponse(bodies if plan.listed else bodies[0])

    _route(router, "/generate", generate, "Generate from text or token ids",
           methods=("POST", "PUT"))

    async def flush_cache(model: str | None = None) -> Response:
        dropped, removed, busy, kept = 0, 0, [], []
        for service in _services(models, model):
            flushed = await service.flush_cache()
            if flushed is None:
                busy.append(service.name)
                continue
            dropped += flushed.prefixes
            removed += flushed.disk_states
            if flushed.disk_kept is not None:
                kept.append(f"The disk cache of {service.name} was not cleared: "
                            f"{flushed.disk_kept}.\n")
        if busy:
            return PlainTextResponse(
                f"Cache not flushed: requests are running or waiting on {', '.join(busy)}. "
                "Retry when the server is idle.\n", status_code=400)
        disk = f"{removed} saved states removed from the disk cache.\n" if removed else ""
        return PlainTextResponse(f"Cache flushed.\n{dropped} cached prefixes dropped.\n"
                                 + disk + "".join(kept))

    _route(router, "/flush_cache", flush_cache, "Drop the idle prefix cache (refused while "
           "requests run; needs an admin key when the server has keys)",
           methods=("POST", "GET"), dependencies=[Depends(admin_only)])

    async def open_session(body: sessions.OpenSessionRequest, request: Request) -> Any:
        return open_sessions.open(body, caller_name(request))  # the id, as a JSON string

    _route(router, "/open_session", open_session, "Open a session: turns that continue "
           "earlier turns, with the session's KV kept warm (another key's session needs an "
           "admin key)", methods=("POST", "GET"))

    async def close_session(body: sessions.CloseSessionRequest, request: Request) -> Response:
        session = open_sessions.close(body.session_id, caller_name(request),
                                      caller_is_admin(request))
        for service in models():
            if service.name == session.model:
                await service.release_session(session.key)
        return Response(status_code=200)

    _route(router, "/close_session", close_session, "Close a session: abort its running "
           "turns and release its KV", methods=("POST", "GET"))

    @router.post("/abort_request", summary="Abort a running request by rid (another key's "
                 "request, or abort_all of every key's, needs an admin key)",
                 response_class=Response)  # an empty 200
    async def abort_request(body: AbortRequest, request: Request) -> Response:
        if not body.abort_all and not body.rid:
            raise invalid("send the rid of the request to abort, or abort_all", param="rid",
                          code="missing_required_parameter")
        admin, caller = caller_is_admin(request), caller_name(request)
        if body.abort_all:  # without an admin key: only the caller's own requests
            rids = live.rids() if admin else live.rids(owner=caller)
        else:
            rid = body.rid or ""
            if not admin and live.owner(rid, caller) is False:
                raise LmserveError(ErrorKind.PERMISSION, f"request '{rid}' was sent with "
                                   "another key; aborting it needs an admin key",
                                   param="rid", code="admin_key_required")
            rids = [rid]
        await _abort(models, rids)
        # The rid may run on another replica sharing the store: they abort it there too.
        cluster = getattr(getattr(request.app.state, "lmserve", None), "cluster", None)
        if cluster is not None:
            await cluster().broadcast({"kind": ABORT, "rids": rids, "all": body.abort_all,
                                       "caller": caller, "admin": admin})
        return Response(status_code=200)

    return router


async def _abort(models: Models, rids: list[str]) -> None:
    for service in models():
        for rid in rids:
            await service.abort(rid)


def _route(router: APIRouter, path: str, endpoint: Callable[..., Any], summary: str, *,
           alias: str | None = None, methods: tuple[str, ...] = ("GET",),
           dependencies: list[Any] | None = None) -> None:
    """One documented operation; other methods and the alias path work but stay out of the
    docs (one operation id each)."""
    first, *others = methods
    router.add_api_route(path, endpoint, methods=[first], summary=summary,
                         dependencies=dependencies)
    for method in others:
        router.add_api_route(path, endpoint, methods=[method], include_in_schema=False,
                             dependencies=dependencies)
    if alias:
        router.add_api_route(alias, endpoint, methods=[first], include_in_schema=False,
                             dependencies=dependencies)


class LiveRequests:
    """rid -> its running generation: a rid in use is refused, abort_all finds them all.
    Each rid remembers the name of the key that started it (None without keys)."""

    def __init__(self) -> None:
        self._by_rid: dict[str, BackendGeneration] = {}
        self._owners: dict[str, str | None] = {}

    def _prune(self) -> None:
        for rid in [r for r, g in self._by_rid.items() if backend_done(g)]:
            del self._by_rid[rid]
            self._owners.pop(rid, None)

    def check_free(self, rids: Iterable[str]) -> None:
        self._prune()
        for rid in rids:
            if rid in self._by_rid:
                raise invalid(f"rid '{rid}' is already used by a running request", param="rid",
                              code="duplicate_rid")

    def add(self, jobs: list[adapter.Job], generations: list[BackendGeneration],
            owner: str | None = None) -> None:
        for job, generation in zip(jobs, generations, strict=True):
            self._by_rid[job.rid] = generation
            self._owners[job.rid] = owner

    def rids(self, *, owner: str | None = None) -> list[str]:
        """Every running rid, or only those of one key's name."""
        self._prune()
        if owner is None:
            return list(self._by_rid)
        return [rid for rid in self._by_rid if self._owners.get(rid) == owner]

    def owner(self, rid: str, caller: str | None) -> bool | None:
        """Whether `caller` started this running rid; None when no such rid runs."""
        self._prune()
        if rid not in self._by_rid:
            return None
        return self._owners.get(rid) == caller


def backend_done(generation: BackendGeneration) -> bool:
    """Whether the backend is done with a generation (every choice ended, or it was closed),
    read or not: a stream response that never started still frees its rid."""
    return generation.finished


def _services(models: Models, name: str | None) -> list[ModelBackend]:
    registry = models()
    return [registry.get(name)] if name else list(registry)


def _session_turn(open_sessions: sessions.Sessions, service: ModelBackend,
                  body: GenerateRequest, plan: adapter.GeneratePlan, request: Request
                  ) -> tuple[adapter.GeneratePlan, sessions.TurnPlan]:
    """A /generate with session_params: its one prompt becomes the session's history plus
    that prompt, run under the session's key."""
    params = sessions.parse_params(body.session_params)
    if plan.listed:
        raise invalid("a session turn is one prompt with n = 1", param="session_params")
    session = open_sessions.get(params.id, caller_name(request), caller_is_admin(request))
    job = plan.jobs[0]
    req = job.request
    if req.prompt_tokens is not None:
        new_ids = list(req.prompt_tokens)
    else:  # a continuation is not the start of a text: no BOS
        new_ids = service.tokenize(req.prompt or "", add_special=params.rid is None)
    bos = service.tokenize("", add_special=True)
    turn = sessions.plan_turn(session, params, new_ids, bos[0] if bos else None,
                              service.name, job.rid)
    request_ = dataclasses.replace(req, prompt=None, prompt_tokens=turn.input_ids,
                                   session=session.key)
    return adapter.GeneratePlan([dataclasses.replace(job, request=request_)], listed=False), turn


def _with_defaults(plan: adapter.GeneratePlan, defaults: Mapping[str, Any]
                   ) -> adapter.GeneratePlan:
    """Each prompt's request with the model's defaults where its sampling_params set nothing."""
    jobs = [dataclasses.replace(job, request=with_defaults(job.request, defaults))
            for job in plan.jobs]
    return dataclasses.replace(plan, jobs=jobs)


def _prepare(service: ModelBackend, job: adapter.Job) -> PreparedPrompt:
    prepared = service.prepare(job.request)
    start = job.logprobs.start if job.logprobs else -1
    if start >= len(prepared.tokens):
        raise invalid(f"logprob_start_len ({start}) must be less than the prompt's "
                      f"{len(prepared.tokens)} tokens", param="logprob_start_len")
    return prepared


def _samples(plan: adapter.GeneratePlan, prepared: list[PreparedPrompt]) -> Samples:
    return [[encoder.Sample(rid=job.rid, position=offset + j, prompt_tokens=len(p.tokens),
                            stop_token_ids=frozenset(job.request.stop_token_ids),
                            no_stop_trim=job.no_stop_trim, logprobs=job.logprobs)
             for j in range(job.request.n)]
            for job, p, offset in zip(plan.jobs, prepared, plan.offsets, strict=True)]


def _add(samples: Samples, job: int, step: ChoiceStep, arrival: float) -> encoder.Sample:
    step.raise_failure()  # with its kind: a status before the first byte, a frame after it
    sample = samples[job][step.index]
    sample.add(step)
    if sample.finished:
        sample.e2e_latency = time.monotonic() - arrival
    return sample


async def _collect(generations: list[BackendGeneration], samples: Samples,
                   arrival: float) -> None:
    async for job, steps in merge(generations):
        for step in steps:
            _add(samples, job, step, arrival)


async def _stream(generations: list[BackendGeneration], plan: adapter.GeneratePlan,
                  samples: Samples, arrival: float) -> AsyncIterator[bytes]:
    try:
        async for job, steps in merge(generations):
            for step in steps:
                sample = _add(samples, job, step, arrival)
                if sample.due(plan.jobs[job].stream_interval):
                    yield sse(sample.body(indexed=plan.listed))
    except LmserveError as exc:  # the stream has started: the error travels inside it
        yield sse(encoder.error_body(exc))
    yield sse("[DONE]")


async def _one_token(service: ModelBackend) -> None:
    """Generate one token, as SGLang's /health_generate does; 503 when that fails."""
    try:
        service.require_ready()
        generation = service.start(GenerationRequest(
            prompt_tokens=service.tokenize("ping"), sampling=SamplingParams(temperature=0.0),
            max_tokens=1, request_id=f"HEALTH_CHECK_{uuid.uuid4().hex}"), parse=False)
    except LmserveError as exc:
        if exc.kind is ErrorKind.OVERLOADED and service.healthy:
            return  # an engine busy with a full queue is alive
        raise _unhealthy(service, exc.message) from None
    try:
        async with asyncio.timeout(HEALTH_TIMEOUT_S):
            async for steps in generation:
                failed = next((s.failed for s in steps if s.failed), None)
                if failed is not None:
                    raise _unhealthy(service, failed.message)
                if any(step.token_ids for step in steps):
                    return
    except TimeoutError:
        raise _unhealthy(service, f"no token within {HEALTH_TIMEOUT_S:.0f} s") from None
    finally:
        generation.close()


def _unhealthy(service: ModelBackend, why: str | None) -> LmserveError:
    return LmserveError(ErrorKind.LOADING, f"model '{service.name}' is not healthy: {why}",
                        retry_after=2.0)


def _gguf_header(card: ModelCard) -> GGUFHeader | None:
    """The served file's header, for what the card does not carry (quantization, whether the
    model only pools); None for an upstream's model (no GGUF here), or an unreadable file."""
    if card.kind == "upstream":
        return None
    try:
        return read_header(card.source)
    except (GGUFError, OSError):
        return None


def _model_info(service: ModelBackend, name: str) -> dict[str, Any]:
    card = service.card
    header = _gguf_header(card)
    # The loaded weights' facts; before they load, what the file's header says.
    weights = card.weights or (WeightsFacts(architecture=header.architecture,
                                            n_ctx_train=header.context_length,
                                            size_bytes=header.size_bytes) if header else None)
    extra: dict[str, Any] = {}
    if header is not None:
        extra["quantization"] = header.quantization
    if weights is not None:
        extra.update(context_length_train=weights.n_ctx_train, size_bytes=weights.size_bytes)
    extra["state"] = card.state.value
    if card.weights is not None:
        extra["n_params"] = card.weights.n_params
    return encoder.model_info(name=name, path=card.source,
                              architecture=(weights.architecture if weights else None) or "unknown",
                              generation=not header.pooling_only if header else True,
                              context_length=card.n_ctx or None, extra=extra)


def _server_info(request: Request, registry: ModelRegistry) -> dict[str, Any]:
    state = request.app.state.lmserve
    access = getattr(request.app.state, "access", None)  # http.access.AccessControl
    if access is not None:
        secrets, key_names = access.table.secrets(), access.table.names()
    else:  # an app assembled without build_app
        secrets, key_names = frozenset(getattr(request.app.state, "api_keys", ())), []
    host, port = request.scope.get("server") or (None, None)
    services = list(registry)
    cards = [s.card for s in services]
    config = {
        "version": __version__, "host": host, "port": port,
        "api_key": encoder.REDACTED if secrets else None,
        "api_key_names": key_names,  # the keys' names stand for them; keys are never shown
        # one name, as SGLang's (the router reads it as a string); every name in the next
        "served_model_name": registry.names(services[0])[0] if services else None,
        "served_model_names": [n for s in services for n in registry.names(s)],
        "model_path": cards[0].source if cards else None,
        "store": {"url": state.store_settings.url,
                  "data_dir": str(state.store_settings.data_dir or "") or None,
                  "kind": state.store.kind if state.store else None,
                  "location": state.store.location if state.store else None},
        "models": [_model_config(c, registry.names(s))
                   for s, c in zip(services, cards, strict=True)],
        "internal_states": [_internal_state(s, c)
                            for s, c in zip(services, cards, strict=True)],
    }
    redacted: dict[str, Any] = encoder.redact(config, secrets)
    return redacted


def _model_config(card: ModelCard, names: list[str]) -> dict[str, Any]:
    return {"served_model_name": names, "model_path": card.source, "state": card.state.value,
            "context_length": card.n_ctx or None, "max_running_requests": card.parallel,
            "max_queued_requests": card.max_queue, "chunked_prefill_size": card.step_tokens,
            "engine": dict(card.settings)}


def _internal_state(service: ModelBackend, card: ModelCard) -> dict[str, Any]:
    out: dict[str, Any] = {"model": card.name, "state": card.state.value, "error": card.error}
    stats = service.stats()
    if stats is not None:
        out.update(active_requests=stats.active_requests, engine_alive=stats.alive,
                   prefix_cache_hits=stats.prefix_cache_hits,
                   prefix_cache_reused_tokens=stats.prefix_cache_tokens)
    return out
