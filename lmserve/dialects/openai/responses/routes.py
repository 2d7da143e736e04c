"""OpenAI Responses routes: POST/GET/DELETE /v1/responses[/{id}], GET .../input_items, and the
WebSocket /v1/responses, where each {"type": "response.create", ...} message runs one response
(sequentially, one at a time per connection) and its events come back as JSON messages. A
message for a model that is not loaded waits for its load (up to --load-timeout), as an HTTP
request does; only its own connection waits."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from enum import Enum
from typing import Any

from fastapi import APIRouter, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.types import Message

from lmserve.core.caller import may_read
from lmserve.core.errors import LmserveError, invalid, unsupported
from lmserve.dialects.openai.encoder import error_body
from lmserve.dialects.openai.responses import adapter, encoder, turns
from lmserve.dialects.openai.responses.schema import JSON, ResponseCreate
from lmserve.http.routing import (
    admit_connection,
    after_load,
    check_api_key,
    dialect_route,
    error_response,
    require_owner,
    unless_disconnected,
    validation_error,
)
from lmserve.http.streaming import SSE_HEADERS, accepted, truncation_headers
from lmserve.models.registry import ModelRegistry
from lmserve.stores import NotFoundError, PageQuery, ResponseStore

Models = Callable[[], ModelRegistry]


def make_router(models: Models, *, tags: list[str | Enum] | None = None) -> APIRouter:
    router = APIRouter(route_class=dialect_route(error_body), tags=tags or ["OpenAI"])

    @router.post("/v1/responses", summary="Create a model response")
    async def create_response(body: ResponseCreate, request: Request) -> Any:
        turn = await turns.begin(request.app.state.lmserve, models(), body)
        headers = truncation_headers(turn.truncated_messages)
        if body.stream:
            await accepted([turn.generation])  # an upstream's refusal is a status here too
            return StreamingResponse(_sse(turns.run(turn)), media_type="text/event-stream",
                                     headers={**headers, **SSE_HEADERS})
        return JSONResponse(await unless_disconnected(request, turns.collect(turn)),
                            headers=headers)

    @router.get("/v1/responses/{response_id}", summary="Retrieve a stored model response")
    async def retrieve_response(response_id: str, request: Request, stream: bool = False
                                ) -> Any:
        if stream:
            raise unsupported("stream", "a stored response is returned whole")
        adapter.check_include(_include(request))
        record = await _store(request).get(response_id)
        if record is None or not may_read(record.owner):  # another key's: as if none
            raise NotFoundError("Response", response_id)
        return record.response

    @router.delete("/v1/responses/{response_id}", summary="Delete a stored model response "
                   "(the key that created it, or an admin key, when the server has keys)")
    async def delete_response(response_id: str, request: Request) -> Any:
        store = _store(request)
        record = await store.get(response_id)
        if record is not None:
            require_owner(request, record.owner, f"response '{response_id}'", "response_id")
        if record is None or not await store.delete(response_id):
            raise NotFoundError("Response", response_id)
        return encoder.deleted(response_id)

    @router.get("/v1/responses/{response_id}/input_items",
                summary="List the items a stored response was generated from")
    async def list_input_items(response_id: str, request: Request, after: str | None = None,
                               before: str | None = None, limit: int = 20,
                               order: str = "desc") -> Any:
        adapter.check_include(_include(request))
        query = PageQuery(after, before, limit, order)  # type: ignore[arg-type]  # checks it
        store = _store(request)
        record = await store.get(response_id)
        if record is not None and not may_read(record.owner):
            raise NotFoundError("Response", response_id)
        page = await store.input_items(response_id, query)
        return {"object": "list", **dataclasses.asdict(page)}

    @router.websocket("/v1/responses")
    async def responses_socket(websocket: WebSocket) -> None:
        await _serve_socket(websocket, models)

    return router


def _store(request: Request) -> ResponseStore:
    store: ResponseStore | None = request.app.state.lmserve.responses()
    if store is None:
        raise turns.storage_off("response_id")
    return store


def _include(request: Request) -> list[str]:
    """The include list; the official clients send it as `include[]=...`."""
    return [value for key in ("include", "include[]")
            for value in request.query_params.getlist(key)]


async def _sse(events: AsyncGenerator[JSON, None]) -> AsyncIterator[bytes]:
    async with contextlib.aclosing(events):
        async for event in events:
            yield encoder.sse(event)


# ---- WebSocket ----------------------------------------------------------------------------------

async def _serve_socket(websocket: WebSocket, models: Models) -> None:
    try:
        check_api_key(websocket)  # reads only app state and headers
    except LmserveError as exc:
        await _refuse(websocket, exc)
        return
    await websocket.accept()
    inbox = _Inbox(websocket)
    try:
        while True:
            message = await inbox.next()
            if message["type"] == "websocket.disconnect":
                return
            await _serve_message(websocket, inbox, models, message.get("text") or
                                 (message.get("bytes") or b"").decode("utf-8", "replace"))
    except WebSocketDisconnect:
        return
    finally:
        inbox.close()


class _Inbox:
    """The connection's messages, one read ahead while a turn waits for its model's load: a
    client that leaves during the load is noticed (the load goes on for the others), and a
    message that comes meanwhile is served next."""

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket
        self._ahead: asyncio.Future[Message] | None = None

    async def next(self) -> Message:
        ahead, self._ahead = self._ahead, None
        return await ahead if ahead is not None else await self.websocket.receive()

    async def unless_left(self, work: Awaitable[None]) -> None:
        """Await `work`; WebSocketDisconnect when the client leaves first."""
        task: asyncio.Future[Any] = asyncio.ensure_future(work)
        if self._ahead is None:
            self._ahead = asyncio.ensure_future(self.websocket.receive())
        try:
            await asyncio.wait((task, self._ahead), return_when=asyncio.FIRST_COMPLETED)
            if not task.done() and self._ahead.done():
                message = self._ahead.result()
                if message["type"] == "websocket.disconnect":
                    raise WebSocketDisconnect(message.get("code", 1000), message.get("reason"))
            await task  # a message came: it waits its turn
        finally:
            if not task.done():
                task.cancel()  # the wait only: the load itself is shielded

    def close(self) -> None:
        if self._ahead is not None and not self._ahead.done():
            self._ahead.cancel()


async def _refuse(websocket: WebSocket, exc: LmserveError) -> None:
    """Turn the handshake down with an HTTP error where the server can, else close (1008)."""
    try:
        await websocket.send_denial_response(error_response(exc, error_body))
    except RuntimeError:
        await websocket.close(code=1008, reason=exc.message[:120])


async def _serve_message(websocket: WebSocket, inbox: _Inbox, models: Models, raw: str
                         ) -> None:
    """One response.create; errors before the response starts (a failed or timed-out load
    of its model included) are error events, and the connection stays open for the next
    message."""
    try:
        await admit_connection(websocket)  # each response.create counts against the key's limits
        body, stream_id = _create_event(raw)
        turn = await after_load(lambda: turns.begin(websocket.app.state.lmserve, models(), body,
                                                    nested_errors=True), inbox.unless_left)
    except LmserveError as exc:
        await websocket.send_json(encoder.ws_error(exc))
        return
    lane = {"stream_id": stream_id} if stream_id is not None else {}
    async with contextlib.aclosing(turns.run(turn)) as events:
        async for event in events:
            await websocket.send_json({**event, **lane})


def _create_event(raw: str) -> tuple[ResponseCreate, str | None]:
    try:
        payload = json.loads(raw)
    except ValueError as exc:
        raise invalid(f"the message is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(payload, dict) or payload.get("type") != "response.create":
        kind = payload.get("type") if isinstance(payload, dict) else None
        raise invalid(f"unknown event type {kind!r}; this server accepts response.create",
                      param="type", code="invalid_event_type")
    fields = {k: v for k, v in payload.items() if k not in ("type", "stream_id")}
    if fields.pop("stream", True) is not True:
        raise invalid("stream is implicit over a WebSocket; leave it out", param="stream")
    if fields.pop("generate", True) is not True:
        raise unsupported("generate", "every response.create generates a response")
    stream_id = payload.get("stream_id")
    if stream_id is not None and not isinstance(stream_id, str):
        raise invalid("stream_id must be a string", param="stream_id")
    try:
        return ResponseCreate.model_validate(fields), stream_id
    except ValidationError as exc:
        raise validation_error(RequestValidationError(exc.errors())) from exc
