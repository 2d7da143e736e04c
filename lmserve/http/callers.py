"""Names the caller of each request for the engine's fair share (lmserve.core.caller).

Runs inside the key middleware: the caller is the API key's name when the request carries a
configured key, else the client's address (no keys, or no valid key: such a request is
refused by its route anyway). Backends read it through core.caller.current_caller() when a
GenerationRequest names no caller itself."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from lmserve.core.caller import CURRENT_ADMIN, CURRENT_CALLER, CURRENT_KEY
from lmserve.http.middleware import caller_of


def caller_name(scope: Scope) -> str | None:
    """The key's name, else the client's address, else None (one shared class)."""
    name = caller_of(scope).name
    if name:
        return f"key:{name}"
    client = scope.get("client")
    return f"addr:{client[0]}" if client else None


class CallerContext:
    """Sets core.caller's current caller, key name and admin flag for the request's whole
    handling."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        token = CURRENT_CALLER.set(caller_name(scope))
        key = CURRENT_KEY.set(caller_of(scope).name)
        admin = CURRENT_ADMIN.set(caller_of(scope).admin)
        try:
            await self.app(scope, receive, send)
        finally:
            CURRENT_ADMIN.reset(admin)
            CURRENT_KEY.reset(key)
            CURRENT_CALLER.reset(token)
