"""Per-dialect routes: validation, auth and engine errors rendered in the caller's own dialect.

FastAPI's default 422 {"detail": ...} body is nobody's wire format, so each dialect's router
uses a route class that turns every error into that dialect's body before it leaves.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, TypeVar

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection

from lmserve.core.errors import ErrorKind, LmserveError
from lmserve.core.lifecycle import ModelLoading
from lmserve.http.fields import body_model, note_ignored_fields
from lmserve.http.middleware import admit, caller_of, require_admin, require_key

log = logging.getLogger("lmserve.http")

ErrorBody = Callable[[LmserveError], dict[str, Any]]
T = TypeVar("T")
LOAD_ATTEMPTS = 4  # a model unloaded again before its request started: load it again


# pydantic's error types for a body that is not a JSON object at all (`[]`, `"x"`, `1`, null).
_NOT_AN_OBJECT = {"model_attributes_type", "model_type", "dict_type"}


def body_error(exc: RequestValidationError) -> LmserveError | None:
    """The error for a body that is not a JSON object at all (not JSON, empty, an array, a
    string...), or None when the body is an object and a field of it is wrong. Every dialect
    answers these with 400, oLLM's too (its field errors keep FastAPI's 422)."""
    errors = exc.errors()
    if not errors:
        return None
    first = errors[0]
    kind, loc = first.get("type"), tuple(first.get("loc", ()))
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error") or first.get("msg", "")
        where = f" at character {loc[1]}" if len(loc) > 1 and isinstance(loc[1], int) else ""
        return LmserveError(ErrorKind.INVALID_REQUEST,
                            f"the request body is not valid JSON: {detail}{where}",
                            code="invalid_json")
    if loc != ("body",):
        return None
    if kind == "missing":
        return LmserveError(ErrorKind.INVALID_REQUEST,
                            "the request body is empty; it must be a JSON object",
                            code="invalid_json")
    if kind in _NOT_AN_OBJECT:
        value = first.get("input")
        what = ("" if isinstance(value, bytes | bytearray)  # a Content-Type that is not JSON
                else f", not {_json_type(value)}")
        return LmserveError(ErrorKind.INVALID_REQUEST,
                            f"the request body must be a JSON object{what} "
                            "(Content-Type: application/json)", code="invalid_json")
    return None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "a JSON value of another type"


def parse_error(exc: HTTPException) -> LmserveError | None:
    """FastAPI's HTTPException for a body it could not read (not UTF-8, say) as a 400; None
    for any other HTTPException."""
    if exc.status_code != 400 or not isinstance(exc.__cause__, ValueError):
        return None
    cause = exc.__cause__
    detail = (f"it is not valid UTF-8 ({cause.reason} at byte {cause.start})"
              if isinstance(cause, UnicodeDecodeError) else str(cause))
    return LmserveError(ErrorKind.INVALID_REQUEST, f"the request body is not valid JSON: {detail}",
                        code="invalid_json")


def validation_error(exc: RequestValidationError) -> LmserveError:
    errors = exc.errors()
    if not errors:
        return LmserveError(ErrorKind.INVALID_REQUEST, "invalid request")
    body = body_error(exc)
    if body is not None:
        return body
    first = errors[0]
    loc = [p for p in first.get("loc", ()) if p != "body"]
    # Drop pydantic's union-branch names ("str", "list[str]") from the location.
    branches = {"str", "int", "float", "bool", "function-after"}
    loc = [p for p in loc if not (isinstance(p, str) and ("[" in p or p in branches))]
    param = _format_loc(loc) or None
    if first.get("type") == "missing":
        return LmserveError(ErrorKind.INVALID_REQUEST, f"missing required parameter '{param}'",
                            param=param, code="missing_required_parameter")
    message = f"invalid value for '{param}': {first.get('msg', 'invalid')}" if param else \
        f"invalid request body: {first.get('msg', 'invalid')}"
    return LmserveError(ErrorKind.INVALID_REQUEST, message, param=param, code="invalid_value")


def _format_loc(loc: list[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def error_response(exc: LmserveError, body: ErrorBody) -> JSONResponse:
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    return JSONResponse(body(exc), status_code=exc.kind.http_status, headers=headers)


def check_api_key(connection: HTTPConnection) -> None:
    """Refuse a connection the key middleware did not authenticate (a WebSocket's accept)."""
    require_key(connection.scope)


async def admit_connection(connection: HTTPConnection) -> None:
    """A dialect route's admission for one request over a connection the route serves by
    itself (each response.create of a WebSocket): key, rate limit, token limits."""
    await admit(connection.scope)


def admin_only(request: Request) -> None:
    """A route dependency: the route administers the server (needs an admin key when the
    server has keys; 403 in the route's dialect for another key)."""
    require_admin(request.scope)


def caller_name(connection: HTTPConnection) -> str | None:
    """The name of the caller's key (None without keys): who owns what a request starts."""
    return caller_of(connection.scope).name


def caller_is_admin(connection: HTTPConnection) -> bool:
    return caller_of(connection.scope).admin


def require_owner(connection: HTTPConnection, owner: str | None, what: str, param: str
                  ) -> None:
    """Refuse (403 in the route's dialect) a caller that may not cancel or delete `what`:
    a key other than `owner` (the name of the key that created it), unless an admin key.
    Without keys every caller is an admin."""
    caller = caller_of(connection.scope)
    if not caller.admin and caller.name != owner:
        raise LmserveError(ErrorKind.PERMISSION, f"{what} was created with another API key; "
                           "only that key or an admin key may cancel or delete it",
                           param=param, code="admin_key_required")


def dialect_route(body: ErrorBody, *, public: bool = False) -> type[APIRoute]:
    """An APIRoute class whose errors come out as `body(error)` with the error's status. Its
    routes need an API key when the server has keys (checked by http.middleware, which
    reads `error_body` and `requires_key` here), unless `public` (the chat page and its assets:
    static files that hold no data and must load before the page can send a key)."""

    class DialectRoute(APIRoute):

        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()
            fields_model = body_model(self)  # its unknown fields are named in a header

            async def guarded(request: Request) -> Response:
                try:
                    if not public:
                        await admit(request.scope)  # key, body size, rate and token limits
                    response = await once_loaded(handler, request)
                    return await note_ignored_fields(request, response, fields_model)
                except LmserveError as exc:
                    return error_response(exc, body)
                except RequestValidationError as exc:
                    return error_response(validation_error(exc), body)
                except HTTPException as exc:
                    if isinstance(exc.__cause__, LmserveError):  # raised while reading the
                        return error_response(exc.__cause__, body)  # body (over the limit)
                    error = parse_error(exc)
                    if error is not None:
                        return error_response(error, body)
                    kind = ErrorKind.NOT_FOUND if exc.status_code == 404 else \
                        ErrorKind.INVALID_REQUEST
                    return JSONResponse(body(LmserveError(kind, str(exc.detail))),
                                        status_code=exc.status_code, headers=exc.headers)
                except Exception as exc:  # a bug: still answer in the dialect's shape
                    log.exception("unhandled error in %s", request.url.path)
                    return error_response(LmserveError(ErrorKind.INTERNAL,
                                                       f"internal error: {type(exc).__name__}"),
                                          body)

            return guarded

    return DialectRoute


async def once_loaded(handler: Callable[[Request], Awaitable[Response]], request: Request
                      ) -> Response:
    """Run the handler; when the model it asks for is not loaded (core.lifecycle.ModelLoading,
    raised before any response starts), wait for that model's load and run it again. The
    body was read once and is cached on the request."""
    return await after_load(lambda: handler(request))


async def after_load(call: Callable[[], Awaitable[T]],
                     waiting: Callable[[Awaitable[None]], Awaitable[None]] | None = None) -> T:
    """Run `call`; while the model it asks for is loading (core.lifecycle.ModelLoading, raised
    before it did anything), wait for the load and run it again. `waiting(wait)` awaits the
    wait in the caller's way (a WebSocket's: unless its client leaves first)."""
    for _ in range(LOAD_ATTEMPTS - 1):
        try:
            return await call()
        except ModelLoading as loading:  # the load's failure, or its timeout, is the answer
            await (waiting(loading.wait()) if waiting is not None else loading.wait())
    return await call()


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client goes away first (non-streaming requests)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        raise LmserveError(ErrorKind.INVALID_REQUEST, "client disconnected", code="cancelled")
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


def defaults_of(models: Any, service: Any = None) -> Mapping[str, Any]:
    """The default generation parameters: the model's own (its card's), under those of a
    resource's model view (the root registry has none). Each dialect's route hands them to
    core.request.with_defaults with the neutral request its adapter made."""
    card = getattr(service, "card", None)
    own = getattr(card, "defaults", None) or {}
    return {**own, **(getattr(models, "defaults", {}) or {})}
