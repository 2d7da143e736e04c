"""ASGI middleware around every route: API keys now; CORS and limits live here too.

The middleware authenticates; the dialect route that the request reaches refuses, because
only it knows the caller's dialect and so the shape of the 401 (lmserve.http.routing)."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from lmserve.core.errors import ErrorKind, LmserveError


def supplied_key(headers: Headers) -> str:
    """The key a request carries: `Authorization: Bearer KEY` or `x-api-key: KEY`."""
    auth = headers.get("authorization") or ""
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return headers.get("x-api-key") or ""


def key_matches(supplied: str, keys: tuple[str, ...]) -> bool:
    """Constant-time comparison against every configured key."""
    given = supplied.encode()
    return any(hmac.compare_digest(given, key.encode()) for key in keys)


@dataclass(frozen=True)
class Caller:
    """Who sent a request, as the key middleware found out: `authenticated` is False when
    keys are configured and the request carries none of them. `name` is the key's name
    (never the key itself): what logs, metrics and limits call the caller; None when no key
    was configured or none matched."""

    authenticated: bool
    name: str | None = None


CALLER = "lmserve.caller"  # the key of the Caller in the ASGI scope's state


def caller_of(scope: Scope) -> Caller:
    """The middleware's verdict; a scope it never saw (a bare router in a test) is open."""
    caller = scope.get("state", {}).get(CALLER)
    return caller if isinstance(caller, Caller) else Caller(True)


class ApiKeyMiddleware:
    """Authenticates every HTTP and WebSocket request against the configured keys, in constant
    time, and records the verdict (`Caller`) in the scope's state. Refusing is the route's
    part: a dialect route (lmserve.http.routing) that needs a key answers 401 in its own
    dialect's shape; public routes (the chat page) and the operations routes (health, metrics,
    docs) ignore the verdict."""

    def __init__(self, app: ASGIApp, keys: Callable[[], tuple[str, ...]]) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            keys = self.keys()
            caller = Caller(key_matches(supplied_key(Headers(scope=scope)), keys)) if keys \
                else Caller(True)
            scope.setdefault("state", {})[CALLER] = caller
        await self.app(scope, receive, send)


def require_key(scope: Scope) -> None:
    """Refuse a caller the middleware did not authenticate."""
    if not caller_of(scope).authenticated:
        raise LmserveError(ErrorKind.AUTHENTICATION, "invalid or missing API key",
                           code="invalid_api_key")
