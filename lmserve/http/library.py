"""Routes of the model library. The admin routes list it and load, unload and reload a model
by name, guarded like every admin route (http.routing.admin_only: an admin key when the
server has keys). A model is never unloaded under a running request: unload of a busy model
answers 202 and the model unloads when its last request ends. `GET /models/` lists the models
with their chat pages and load states (the chat page's model picker; the API key when the
server has keys). Errors in OpenAI's shape.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from lmserve.dialects.openai import encoder as openai_encoder
from lmserve.http.routing import admin_only, dialect_route
from lmserve.models.managed import ManagedModel
from lmserve.models.registry import ModelRegistry


def listing_router(registry: ModelRegistry) -> APIRouter:
    router = APIRouter(route_class=dialect_route(openai_encoder.error_body),
                       tags=["Model library"])

    @router.get("/models/", summary="The models, their chat pages and load states")
    async def listing() -> Any:
        data = []
        for service in registry:
            card = service.card
            data.append({"name": card.name, "path": f"/models/{card.name}/",
                         "status": card.status, "progress": round(card.progress, 3),
                         "error": card.error})
        return {"object": "list", "data": data}

    return router


def admin_router(registry: ModelRegistry) -> APIRouter:
    router = APIRouter(route_class=dialect_route(openai_encoder.error_body),
                       tags=["Model library"], dependencies=[Depends(admin_only)])

    @router.get("/admin/models", summary="The model library: every model, loaded or not")
    async def library() -> Any:
        return {"object": "list", "data": [describe(registry, m) for m in registry
                                           if isinstance(m, ManagedModel)],
                "max_loaded": registry.manager.max_loaded,
                "memory_budget": registry.manager.memory_budget,
                "vram_budget": registry.manager.vram_budget}

    @router.post("/admin/models/{name:path}/load", summary="Load a model (and wait for it)")
    async def load(name: str) -> Any:
        model = registry.managed(name)
        if not model.loaded:
            registry.manager.request_load(model)
            await model.wait_loaded()
        return describe(registry, model)

    @router.post("/admin/models/{name:path}/unload",
                 summary="Unload a model (when its running requests have ended)")
    async def unload(name: str) -> Any:
        model = registry.managed(name)
        if model.loaded and not await model.unload_now():
            return JSONResponse(describe(registry, model), status_code=202)
        return describe(registry, model)

    @router.post("/admin/models/{name:path}/reload",
                 summary="Read the model's file again and load it anew (after it changed)")
    async def reload(name: str) -> Any:
        model = registry.managed(name)
        await registry.manager.reload(model)
        return describe(registry, model)

    return router


def describe(registry: ModelRegistry, model: ManagedModel) -> dict[str, Any]:
    card = model.card
    return {"id": model.name, "names": registry.engine_names(model), "source": model.entry.source,
            "path": model.entry.path, "status": card.status,
            "progress": round(card.progress, 3), "error": card.error,
            "size_bytes": model.entry.size_bytes, "memory_bytes": card.memory_bytes,
            "vram_bytes": model.estimate().vram,
            "busy": model.busy, "keep_alive": model.keep_alive_seconds(),
            "expires_at": card.expires_at, "load_at_start": model.at_start}
