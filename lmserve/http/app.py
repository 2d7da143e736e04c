"""The ASGI app for `lmserve serve`: OpenAI routes at the root, health, metrics, docs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmserve import __version__
from lmserve.core.errors import ErrorKind, LmserveError
from lmserve.dialects.openai import encoder as openai_encoder
from lmserve.dialects.openai.routes import make_router as openai_router
from lmserve.http import metrics
from lmserve.http.routing import error_response, validation_error
from lmserve.models.registry import ModelRegistry


def create_app(registry: ModelRegistry, *, api_keys: tuple[str, ...] = (),
               load_on_startup: bool = True) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The port is bound once startup returns; weights load after that, in a thread.
        if load_on_startup:
            registry.load_in_background(asyncio.get_running_loop())
        try:
            yield
        finally:
            await asyncio.to_thread(registry.close)

    app = FastAPI(title="lmserve", version=__version__, lifespan=lifespan,
                  description="Local LLM serving: OpenAI-compatible API over llama.cpp.",
                  docs_url="/docs", redoc_url="/redoc", openapi_url="/openapi.json")
    app.state.registry = registry
    app.state.api_keys = api_keys
    app.include_router(openai_router(lambda: registry))
    _install_fallback_errors(app)

    @app.get("/health", tags=["Operations"], summary="Liveness and loading state")
    async def health() -> Any:
        status = registry.status
        body = {"status": status,
                "models": {s.name: {"state": s.state, "progress": round(s.progress, 3),
                                    "error": s.error or (s.client.error if s.client else None)}
                           for s in registry}}
        headers = {"Retry-After": "2"} if status == "loading" else {}
        return JSONResponse(body, status_code=200 if status == "ok" else 503, headers=headers)

    @app.get("/metrics", tags=["Operations"], summary="Prometheus metrics")
    async def prometheus() -> Response:
        data, content_type = metrics.render(registry)
        return Response(data, media_type=content_type)

    return app


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
