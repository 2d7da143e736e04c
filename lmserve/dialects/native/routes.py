"""Native routes at a resource path P: introspection, defaults, query/, two-step stream/."""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from enum import Enum
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from lmserve import web
from lmserve.core.backend import BackendGeneration, ModelBackend, PreparedPrompt, with_media
from lmserve.core.errors import ErrorKind, LmserveError, invalid
from lmserve.core.lifecycle import Unloadable
from lmserve.core.request import with_defaults
from lmserve.dialects.native import adapter, encoder
from lmserve.dialects.native.producer import StreamProducers, collect, sse_frames
from lmserve.dialects.native.schema import ConfigureBody, GenerateBody
from lmserve.http.routing import (
    admin_only,
    caller_name,
    defaults_of,
    dialect_route,
    require_owner,
    unless_disconnected,
)
from lmserve.http.streaming import accepted, truncation_headers
from lmserve.models.resource import LLMResource, check_params


def make_router(resource: LLMResource, producers: StreamProducers, *,
                tags: list[str | Enum] | None = None) -> APIRouter:
    router = APIRouter(route_class=dialect_route(encoder.error_body),
                       tags=tags or [resource.name])

    @router.get("/", summary="Describe the model and its defaults")
    async def describe() -> Any:
        return introspection(resource)

    @router.put("/", summary="Replace the default generation parameters (for every caller: "
                "needs an admin key when the server has keys)",
                dependencies=[Depends(admin_only)])
    async def configure(body: ConfigureBody) -> Any:
        return {"params": _with_reasoning(resource, resource.set_defaults(body.params))}

    @router.post("/query/", summary="Generate and answer when done (buffered)")
    async def query(body: GenerateBody, request: Request) -> Any:
        native, prepared, generation = await _start(resource, body)
        blocks, finish, usage = await unless_disconnected(
            request, collect(generation, native.reasoning))
        dropped = prepared.dropped_messages
        return JSONResponse(encoder.query_body(str(uuid.uuid4()), _now(), resource.name, blocks,
                                               finish, usage, dropped),
                            headers=truncation_headers(dropped))

    @router.post("/stream/", status_code=201, summary="Start a generation; read it at stream/{id}/")
    async def start_stream(body: GenerateBody, request: Request) -> Any:
        native, prepared, generation = await _start(resource, body)
        await accepted([generation])  # a refusal is the POST's status, not a stream frame
        ident = await producers.start(generation, native.reasoning, resource.name,
                                      len(prepared.tokens), prepared.dropped_messages,
                                      key=caller_name(request))
        return JSONResponse({"id": ident}, status_code=201,
                            headers=truncation_headers(prepared.dropped_messages))

    @router.get("/stream/{stream_id}/", summary="Read a stream as Server-Sent Events",
                response_class=StreamingResponse)
    async def read_stream(stream_id: str, request: Request) -> Any:
        ident = _stream_id(stream_id)
        info = await producers.store.get(ident)
        if info is None:
            raise _unknown_stream(ident)
        await producers.end_if_orphaned(info)  # its producer was killed: it ends, not hangs
        after = _last_event_id(request.headers.get("last-event-id"))
        return StreamingResponse(sse_frames(producers, ident, after,
                                            resource.heartbeat_interval),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @router.delete("/stream/{stream_id}/", summary="Cancel a stream's generation (the key "
                   "that started it, or an admin key, when the server has keys)")
    async def cancel_stream(stream_id: str, request: Request) -> Any:
        ident = _stream_id(stream_id)
        info = await producers.store.get(ident)
        if info is None:
            raise _unknown_stream(ident)
        key = info.meta.get("key")
        require_owner(request, key if isinstance(key, str) else None, f"stream {ident}",
                      "stream_id")
        info = await producers.end_if_orphaned(info)
        if producers.cancel(ident):
            return {"id": ident, "cancelled": True}
        if info.finished:
            return {"id": ident, "cancelled": False}
        # It runs on another replica sharing the store: the cancel goes there through it.
        if await producers.cancel_anywhere(info):
            return {"id": ident, "cancelled": True}
        raise LmserveError(ErrorKind.UNAVAILABLE, "this stream's generation runs in another "
                           "server process that did not take the cancel (it is not listening "
                           "to the shared store); retry", code="stream_owner_unreachable",
                           retry_after=1.0)

    router.include_router(_page_router(resource), tags=router.tags)
    return router


def _page_router(resource: LLMResource) -> APIRouter:
    """The chat page and its assets, open without an API key: the page asks for the key and
    sends it with its own requests."""
    router = APIRouter(route_class=dialect_route(encoder.error_body, public=True))

    @router.get("/chat/", summary="The chat page", response_class=HTMLResponse)
    async def chat_page() -> Any:
        return HTMLResponse(web.chat_page(resource.path, resource.title),
                            headers={"Content-Security-Policy": web.CONTENT_SECURITY_POLICY,
                                     "Cache-Control": "no-cache"})

    @router.get("/" + web.ASSET_PREFIX + "{name}", include_in_schema=False)
    async def chat_asset(name: str) -> Any:
        try:
            data, media_type = web.asset(name)
        except KeyError:
            raise LmserveError(ErrorKind.NOT_FOUND, f"no chat asset named '{name}'",
                               param="name") from None
        return Response(data, media_type=media_type, headers={"Cache-Control": "no-cache"})

    return router


def introspection(resource: LLMResource) -> dict[str, Any]:
    header, service = resource.header, resource.service
    model: dict[str, Any] = {"file": os.path.basename(resource.model_path), "architecture": None,
                             "name": None, "size": None, "quantization": None,
                             "n_ctx_train": None, "chat_template": False,
                             "context_length": None, "parameters": None}
    if header is not None:
        model.update(architecture=header.architecture, name=header.name, size=header.size_bytes,
                     quantization=header.quantization, n_ctx_train=header.context_length,
                     chat_template=header.chat_template is not None)
    status, progress = "pending", 0.0
    if service is not None:
        card = service.card
        # an unloaded library model is "unloaded": it loads when a request asks for it
        unloaded = isinstance(service, Unloadable) and card.status == "unloaded"
        status = "unloaded" if unloaded else card.state.value
        progress = round(card.progress, 3)
        if card.weights is not None:  # loaded
            model["context_length"] = card.n_ctx or None
            model["parameters"] = card.weights.n_params
            model["chat_template"] = card.has_template
    return {"name": resource.name, "verbose_name": resource.title, "path": resource.path,
            "status": status, "progress": progress, "serving": list(resource.dialects or ()),
            "transports": ["raw", "chat", "conversation"] if model["chat_template"] else ["raw"],
            "default_transport": resource.default_transport,
            "reasoning": resource.reasoning_default,
            "heartbeat_interval": resource.heartbeat_interval,
            "params": _with_reasoning(resource, resource.defaults), "model": model}


def _with_reasoning(resource: LLMResource, params: dict[str, Any]) -> dict[str, Any]:
    return {**params, "reasoning": resource.reasoning_default}


async def _start(resource: LLMResource, body: GenerateBody
                 ) -> tuple[adapter.Native, PreparedPrompt, BackendGeneration]:
    service, native, prepared = await _prepare(resource, body)
    # The raw transport's text goes through the chat parser too: the template's reasoning
    # tags split it into channels.
    return native, prepared, service.start(native.request, prepared, parse=True)


async def _prepare(resource: LLMResource, body: GenerateBody
                   ) -> tuple[ModelBackend, adapter.Native, PreparedPrompt]:
    assert resource.service is not None
    service: ModelBackend = resource.service
    card = service.require_ready()
    overrides = check_params(body.params or {}, request=True)
    native = adapter.generation_request(
        body.model_copy(update={"params": overrides}),
        default_transport=resource.default_transport, has_template=card.has_template,
        reasoning_default=resource.reasoning_default)
    request = with_defaults(native.request, defaults_of(resource.models(), service))
    request = await with_media(service, request)  # image URLs fetched
    native = dataclasses.replace(native, request=request)
    return service, native, service.prepare(request)


def _stream_id(raw: str) -> str:
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        raise invalid(f"'{raw}' is not a stream id (a UUID)", param="stream_id") from None


def _last_event_id(raw: str | None) -> int:
    if raw is None or raw.strip() == "":
        return 0
    try:
        value = int(raw)
    except ValueError:
        raise invalid(f"Last-Event-ID '{raw}' is not a frame id", param="Last-Event-ID") from None
    if value < 0:
        raise invalid("Last-Event-ID must not be negative", param="Last-Event-ID")
    return value


def _unknown_stream(ident: str) -> LmserveError:
    return LmserveError(ErrorKind.NOT_FOUND, f"no stream with id {ident} (unknown or expired)",
                        param="stream_id", code="stream_not_found")


def _now() -> int:
    return int(time.time())
