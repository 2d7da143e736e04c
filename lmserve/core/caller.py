"""Who is asking, for the engine's fair share: the caller of the request being served.

The HTTP layer (lmserve.http.callers.CallerContext) sets it for each request from the API key's
name, or the client's address when the server has no keys; a backend reads it when a
GenerationRequest names no caller of its own. Outside a request it is None: one shared class.
"""

from __future__ import annotations

from contextvars import ContextVar

CURRENT_CALLER: ContextVar[str | None] = ContextVar("lmserve_caller", default=None)
# The name of the request's API key (None without keys): who owns what the request stores,
# e.g. a stored response (only that key, or an admin key, may delete it).
CURRENT_KEY: ContextVar[str | None] = ContextVar("lmserve_key", default=None)
# Whether the request's key is an admin key (True on a server without keys, and outside a
# request): an admin may read and delete what any key stored.
CURRENT_ADMIN: ContextVar[bool] = ContextVar("lmserve_admin", default=True)


def current_caller() -> str | None:
    return CURRENT_CALLER.get()


def current_key() -> str | None:
    return CURRENT_KEY.get()


def may_read(owner: str | None) -> bool:
    """Whether the current caller may read something `owner` (a key's name) stored: its own
    key, or an admin key; what was stored without a key (owner None) is everyone's."""
    return owner is None or CURRENT_ADMIN.get() or CURRENT_KEY.get() == owner
