"""ASGI middleware around every route: API keys, the body size limit, and the admission a
dialect route runs before its handler (key, body size, rate limit, token limits).

The middleware authenticates and measures; the dialect route that the request reaches
refuses, because only it knows the caller's dialect and so the shape of the 401, 403, 413 or
429 (lmserve.http.routing)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmserve.core.errors import ErrorKind, LmserveError
from lmserve.core.quota import METER, Meter, TokenLimits
from lmserve.http.keys import KeyPolicy, KeyTable
from lmserve.http.limits import RateLimiter


def supplied_key(headers: Headers) -> str:
    """The key a request carries: `Authorization: Bearer KEY` or `x-api-key: KEY`."""
    auth = headers.get("authorization") or ""
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return headers.get("x-api-key") or ""


@dataclass(frozen=True)
class Caller:
    """Who sent a request, as the key middleware found out: `authenticated` is False when
    keys are configured and the request carries none of them. `name` is the key's name
    (never the key itself): what logs, metrics and limits call the caller; None when no key
    was configured or none matched."""

    authenticated: bool
    name: str | None = None
    admin: bool = True  # may use the admin routes: an admin key, or a server without keys
    policy: KeyPolicy | None = None  # the key's limits (None: no key)


CALLER = "lmserve.caller"  # the key of the Caller in the ASGI scope's state
ACCESS = "lmserve.access"  # the server's Access, for the routes' admission
BODY_TOO_LARGE = "lmserve.body_too_large"  # Content-Length over the limit (the route answers)


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

    def __init__(self, app: ASGIApp, keys: Callable[[], KeyTable | tuple[str, ...]],
                 access: Access | None = None) -> None:
        self.app = app
        self.keys = keys
        self.access = access or Access()
        self._plain: tuple[tuple[str, ...], KeyTable] | None = None

    def _table(self) -> KeyTable:
        keys = self.keys()
        if isinstance(keys, KeyTable):
            return keys
        if self._plain is None or self._plain[0] != keys:  # plain keys (the App API, tests)
            self._plain = (keys, KeyTable.plain(keys))
        return self._plain[1]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            table = self._table()
            if table:
                policy = table.match(supplied_key(Headers(scope=scope)))
                caller = Caller(policy is not None, policy.name if policy else None,
                                admin=policy is not None and policy.admin, policy=policy)
            else:
                caller = Caller(True)
            state = scope.setdefault("state", {})
            state[CALLER] = caller
            state[ACCESS] = self.access
        await self.app(scope, receive, send)


@dataclass(frozen=True)
class Access:
    """The server's access settings that routes apply at admission: the rate limiter (it
    counts only keys with rpm or tpm) and the server's per-request token limits."""

    limiter: RateLimiter | None = None
    limits: TokenLimits = TokenLimits()


def access_of(scope: Scope) -> Access:
    access = scope.get("state", {}).get(ACCESS)
    return access if isinstance(access, Access) else Access()


class PayloadTooLarge(LmserveError):
    def __init__(self, limit: int) -> None:
        super().__init__(ErrorKind.PAYLOAD_TOO_LARGE,
                         f"the request body is larger than this server's limit of {limit} "
                         "bytes (--max-body-bytes)", code="request_too_large")


class BodyLimitMiddleware:
    """Caps request bodies at `limit` bytes. A Content-Length over it is marked in the scope,
    and the route refuses before reading anything (413 in its dialect); a body without one
    (chunked) is counted as it arrives, and the read that passes the limit raises, which the
    route answers the same way. Nothing is buffered here."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            scope.setdefault("state", {})[BODY_TOO_LARGE] = limit
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(limit)
            return message

        await self.app(scope, counted, send)


def require_key(scope: Scope) -> None:
    """Refuse a caller the middleware did not authenticate."""
    if not caller_of(scope).authenticated:
        raise LmserveError(ErrorKind.AUTHENTICATION, "invalid or missing API key",
                           code="invalid_api_key")


def require_admin(scope: Scope) -> None:
    """Refuse a caller without an admin key, when the server has keys (401 without a valid
    key, 403 with a key that is not an admin's)."""
    require_key(scope)
    if not caller_of(scope).admin:
        raise LmserveError(ErrorKind.PERMISSION, "this route needs an admin key (--admin-key, "
                           "or 'admin' on the key's line of the key file)",
                           code="admin_key_required")


async def admit(scope: Scope) -> None:
    """What a dialect route checks before its handler, in this order: the key (401), the
    declared body size (413), the key's rate limit (429); then it sets the request's meter
    (core.quota) with the server's and the key's token limits."""
    require_key(scope)
    state = scope.get("state", {})
    if BODY_TOO_LARGE in state:
        raise PayloadTooLarge(state[BODY_TOO_LARGE])
    access = access_of(scope)
    policy = caller_of(scope).policy
    limits = access.limits
    charge = None
    if policy is not None:
        limits = limits.tighter(TokenLimits(policy.max_prompt_tokens, policy.max_tokens))
        if access.limiter is not None:
            await access.limiter.admit(policy)
            charge = access.limiter.charger(policy)
    METER.set(Meter(limits, charge) if limits.any or charge is not None else None)
