"""ASGI app assembly: the shared shell (lifespan, store, health, metrics, docs, fallback errors),
the dialects at the server root, and resources mounted at their paths."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from lmserve._version import __version__
from lmserve.core.errors import ErrorKind, LmserveError
from lmserve.dialects.native.producer import CANCEL, StreamProducers
from lmserve.dialects.openai import encoder as openai_encoder
from lmserve.http import dialects, library, metrics
from lmserve.http import observe as http_observe
from lmserve.http.access import AccessControl, AccessSettings
from lmserve.http.callers import CallerContext
from lmserve.http.routing import error_response, validation_error
from lmserve.models.registry import ModelRegistry
from lmserve.models.resource import LLMResource
from lmserve.stores import ResponseStore, RetentionPolicy, Store, StreamStore, open_store
from lmserve.stores.cluster import Cluster
from lmserve.upstream import UpstreamBackend, UpstreamSettings

STORE_OFF = "none"  # keep no stored responses or sessions


@dataclass
class StoreSettings:
    url: str | None = None  # None: SQLite under data_dir; "memory"; "redis://..."; "none"
    data_dir: str | Path | None = None
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)


def stream_retention(stream_ttl: float, base: RetentionPolicy | None = None) -> RetentionPolicy:
    """A retention policy whose finished streams stay readable for `stream_ttl` seconds."""
    base = base or RetentionPolicy()
    if stream_ttl <= 0:
        raise ValueError("stream_ttl must be positive")
    return dataclasses.replace(base, streams=dataclasses.replace(base.streams, ttl=stream_ttl))


class AppState:
    """What the routes share at run time: the registry, the store, the stream producers."""

    def __init__(self, registry: ModelRegistry, store_settings: StoreSettings) -> None:
        self.registry = registry
        self.store_settings = store_settings
        self.store: Store | None = None
        self.storage_off = store_settings.url == STORE_OFF
        self.producers = StreamProducers(self.streams, self.cluster)
        # Handlers of the messages other replicas send through the store, by kind.
        self.handlers: dict[str, Callable[[dict[str, Any]], Awaitable[None]]] = {
            CANCEL: self.producers.on_message}
        self.resources: list[LLMResource] = []

    def streams(self) -> StreamStore:
        if self.store is None:
            raise LmserveError(ErrorKind.LOADING, "the server is still starting",
                               retry_after=1.0)
        return self.store.streams

    def cluster(self) -> Cluster:
        """The replicas sharing the store (this process alone, unless it is Redis)."""
        if self.store is None:
            raise LmserveError(ErrorKind.LOADING, "the server is still starting",
                               retry_after=1.0)
        return self.store.cluster

    def on_message(self, kind: str, handler: Callable[[dict[str, Any]], Awaitable[None]]
                   ) -> None:
        """Handle the cluster messages of one kind (the first handler registered stays)."""
        self.handlers.setdefault(kind, handler)

    async def _on_message(self, message: dict[str, Any]) -> None:
        handler = self.handlers.get(str(message.get("kind")))
        if handler is not None:
            await handler(message)

    def responses(self) -> ResponseStore | None:
        """The stored responses; None when storage is off."""
        if self.storage_off:
            return None
        if self.store is None:
            raise LmserveError(ErrorKind.LOADING, "the server is still starting",
                               retry_after=1.0)
        return self.store.responses

    async def open(self) -> None:
        s = self.store_settings
        # With storage off, resumable streams still need their frames somewhere: memory.
        url = "memory" if self.storage_off else s.url
        self.store = await open_store(url, data_dir=s.data_dir, retention=s.retention)
        await self.store.cluster.join(self.producers.owner["instance"], self._on_message)

    async def close(self) -> None:
        await self.producers.close()
        if self.store is not None:
            await self.store.close()


def build_app(registry: ModelRegistry, *, api_keys: tuple[str, ...] = (),
              load_on_startup: bool = True, store: StoreSettings | None = None,
              title: str = "lmserve", description: str | None = None,
              openapi: dict[str, Any] | None = None, docs: str | None = "/docs",
              redoc: str | None = "/redoc", access: AccessSettings | None = None) -> FastAPI:
    """The shell every lmserve app shares; dialects and resources are mounted on it after.
    `access`: the key ring (else `api_keys`), body and token limits, CORS (http.access)."""
    state = AppState(registry, store or StoreSettings())
    control = AccessControl(access or AccessSettings(), plain_keys=api_keys,
                            store_url=state.store_settings.url)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.open()
        # The port is bound once startup returns; weights load after that, in a thread.
        if load_on_startup:
            registry.load_in_background(asyncio.get_running_loop())
        try:
            yield
        finally:
            await state.close()
            await control.close()
            await asyncio.to_thread(registry.close)

    info = dict((openapi or {}).get("info", {}))
    app = FastAPI(title=info.pop("title", title), version=info.pop("version", __version__),
                  description=info.pop("description", description or
                                       "Local LLM serving over llama.cpp, in every dialect."),
                  lifespan=lifespan, docs_url=docs, redoc_url=redoc,
                  openapi_url="/openapi.json", **({"openapi_tags": openapi["tags"]}
                                                  if openapi and "tags" in openapi else {}))
    app.state.registry = registry
    app.state.api_keys = api_keys
    app.add_middleware(CallerContext)  # inside the key middleware: it reads its verdict
    app.state.access = control
    control.install(app)  # the key middleware, the body limit and CORS
    app.state.lmserve = state
    app.state.collectors = [control.collector()]  # /metrics: 429s by key name
    _install_fallback_errors(app)
    _install_operations(app, registry)
    http_observe.install(app)  # the last middleware added: the outermost
    return app


def mount_root_dialects(app: FastAPI, registry: ModelRegistry) -> None:
    """Every registered root dialect at the server root, routing by the `model` field."""
    routers = {d.name: d.root(lambda: registry) for d in dialects.root_dialects() if d.root}
    if "anthropic" in routers and "openai" in routers:
        _models_by_header(app, "anthropic-version", routers["anthropic"],
                          otherwise=routers["openai"])
    for name, router in routers.items():
        _include(app, router, name)


def mount_resource(app: FastAPI, resource: LLMResource) -> None:
    """A resource's dialects under its path: each at its registered prefix."""
    state: AppState = app.state.lmserve
    chosen = [dialects.get(name) for name in resource.dialects or dialects.resource_dialects()]
    for dialect in chosen:
        if dialect.resource is None:
            raise ValueError(f"the {dialect.name} dialect is served at the root only")
    state.resources.append(resource)
    base = resource.path.rstrip("/")
    tags: list[str | Enum] = [resource.title]
    for dialect in chosen:
        assert dialect.resource is not None
        prefix = f"{base}/{dialect.prefix}" if dialect.prefix else base
        _include(app, dialect.resource(resource, state, tags), dialect.name, prefix=prefix)


def _include(app: FastAPI, router: APIRouter, dialect: str, prefix: str = "") -> None:
    """Include a dialect's router, its routes marked as the dialect's (the access line and
    the metrics name it; the router's own routes too, for the paths _ByHeader sends it)."""
    before = len(app.router.routes)
    app.include_router(router, prefix=prefix)
    http_observe.tag_routes(router.routes, dialect)
    http_observe.tag_routes(app.router.routes[before:], dialect)


def create_app(registry: ModelRegistry, *, api_keys: tuple[str, ...] = (),
               load_on_startup: bool = True, store: StoreSettings | None = None,
               upstreams: tuple[tuple[str, str, str | None, str | None], ...] = (),
               access: AccessSettings | None = None) -> FastAPI:
    """The app of `lmserve serve`: dialects at the root, each model's native routes at
    /models/<name>/, and the chat page of the first model at /chat/. `upstreams`:
    (name, url, api_key, model) of models served by other OpenAI-compatible servers."""
    for name, url, api_key, model in upstreams:
        backend = UpstreamBackend(name, UpstreamSettings(url, model=model, api_key=api_key))
        registry.add_backend(backend, key=f"upstream:{name}")
    app = build_app(registry, api_keys=api_keys, load_on_startup=load_on_startup, store=store,
                    access=access,
                    description="Local LLM serving over llama.cpp: OpenAI, Anthropic, Ollama "
                                "and native APIs.")
    mount_root_dialects(app, registry)
    _include(app, library.admin_router(registry), "admin")  # the model library's routes
    _include(app, library.listing_router(registry), "native")
    resources = [LLMResource.for_service(service, f"/models/{service.name}/")
                 for service in registry]
    for resource in resources:
        mount_resource(app, resource)
    if resources:
        first = resources[0].path

        @app.get("/chat/", include_in_schema=False)
        @app.get("/chat", include_in_schema=False)
        async def chat() -> Response:
            return RedirectResponse(f"{first}chat/")
    return app


def _install_operations(app: FastAPI, registry: ModelRegistry) -> None:
    @app.get("/health", tags=["Operations"], summary="Liveness and loading state")
    async def health() -> Any:
        status = registry.status
        models: dict[str, Any] = {}
        for backend in registry:
            card, stats = backend.card, backend.stats()
            models[card.name] = {
                "state": card.state.value, "progress": round(card.progress, 3),
                "error": card.error or (stats.error if stats is not None else None)}
        body = {"status": status, "models": models}
        headers = {"Retry-After": "2"} if status == "loading" else {}
        return JSONResponse(body, status_code=200 if status == "ok" else 503, headers=headers)

    @app.get("/health/live", tags=["Operations"], summary="Liveness: the process runs")
    @app.get("/livez", include_in_schema=False)
    async def live() -> Any:
        return {"status": "alive"}

    @app.get("/health/ready", tags=["Operations"],
             summary="Readiness: models loaded and not shutting down (else 503)")
    @app.get("/readyz", include_in_schema=False)
    async def ready() -> Any:
        status = "draining" if registry.draining else registry.status
        headers = {"Retry-After": "2"} if status == "loading" else {}
        return JSONResponse({"status": "ready" if status == "ok" else status},
                            status_code=200 if status == "ok" else 503, headers=headers)

    @app.get("/metrics", tags=["Operations"], summary="Prometheus metrics")
    async def prometheus() -> Response:
        data, content_type = metrics.render(registry, app.state.request_metrics)
        return Response(data, media_type=content_type)


def _models_by_header(app: FastAPI, header: str, dialect: ASGIApp, *, otherwise: ASGIApp) -> None:
    """GET /v1/models at the root belongs to two dialects with different bodies. Anthropic's
    clients always send `anthropic-version`, so the header picks the dialect; under a resource
    prefix each dialect has its own path and no choice is needed."""
    # Starlette calls a non-function endpoint as an ASGI app; FastAPI's signature for
    # add_route names only request handlers, hence the Any.
    endpoint: Any = _ByHeader(header, dialect, otherwise)
    for path in ("/v1/models", "/v1/models/{model_id:path}"):
        app.router.add_route(path, endpoint, methods=["GET"], include_in_schema=False)


class _ByHeader:
    """An ASGI endpoint (Starlette passes the raw call to a non-function endpoint) that sends
    requests carrying `header` to `dialect` and the rest to `otherwise`."""

    def __init__(self, header: str, dialect: ASGIApp, otherwise: ASGIApp) -> None:
        self.header, self.dialect, self.otherwise = header, dialect, otherwise

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        target = self.dialect if self.header in Headers(scope=scope) else self.otherwise
        await target(scope, receive, send)


def _install_fallback_errors(app: FastAPI) -> None:
    """Errors outside any dialect router (404 on an unknown path, 405) in OpenAI's shape."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kind = ErrorKind.NOT_FOUND if exc.status_code == 404 else ErrorKind.INVALID_REQUEST
        error = LmserveError(kind, f"{request.method} {request.url.path}: {exc.detail}",
                             code=str(exc.status_code))
        body = openai_encoder.error_body(error)
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        return error_response(validation_error(exc), openai_encoder.error_body)
