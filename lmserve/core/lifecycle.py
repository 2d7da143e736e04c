"""A model's life in the library: keep-alive durations, and the error a request for a model
that is not loaded raises while its load runs (the route waits for the load, then runs again).

Neutral vocabulary: the registry (lmserve.models) raises `ModelLoading`; the dialect route
class (lmserve.http.routing) catches it, awaits `wait()`, and runs the handler again, so a
request that arrives for an unloaded model waits for the load instead of getting a 503.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Protocol, runtime_checkable

from lmserve.core.errors import ErrorKind, LmserveError, invalid

__all__ = ["FOREVER", "ModelLoading", "Unloadable", "keep_alive_seconds", "load_failed"]

FOREVER = -1.0  # a keep-alive that never expires (Ollama: any negative duration)

_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0,
                 "m": 60.0, "h": 3600.0}


def keep_alive_seconds(value: float | str | None, param: str = "keep_alive") -> float | None:
    """A number of seconds, or a Go duration such as "5m" or "1h30m"; negative means forever.
    None stays None (the model's own keep-alive applies)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise invalid(f"invalid {param} {value!r}: send a duration such as \"5m\" or a number "
                      "of seconds", param=param)
    if isinstance(value, (int, float)):
        return float(value)
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        pass
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    parts = _DURATION_PART.findall(body)
    if not parts or "".join(n + u for n, u in parts) != body:
        raise invalid(f"invalid {param} {value!r}: send a duration such as \"5m\" or a "
                      "number of seconds", param=param)
    return sign * sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)


class ModelLoading(LmserveError):
    """The model a request names is not loaded; its load has started. `wait()` returns once
    it is loaded, or raises the load's failure (or a 503 when it takes longer than the
    server's load timeout). A caller that cannot wait answers the 503 itself."""

    def __init__(self, name: str, wait: Callable[[], Awaitable[None]], progress: float = 0.0
                 ) -> None:
        super().__init__(ErrorKind.LOADING, f"model '{name}' is loading ({progress:.0%})",
                         code="model_loading", retry_after=2.0)
        self.model = name
        self.wait = wait


def load_failed(name: str, reason: str) -> LmserveError:
    """The error of a request for a model whose load failed (a file that is not a model, a
    truncated one, not enough memory): 503, not a 500, with the reason."""
    return LmserveError(ErrorKind.UNAVAILABLE, f"model '{name}' could not be loaded: {reason}",
                        param="model", code="model_load_failed")


@runtime_checkable
class Unloadable(Protocol):
    """A backend the server loads and unloads (a library model): what a dialect may ask of
    its lifecycle beyond the backend contract (Ollama's empty request with keep_alive)."""

    @property
    def loaded(self) -> bool: ...

    def set_keep_alive(self, seconds: float | None) -> None:
        """The keep-alive from now on: 0 unloads the model when idle, < 0 never."""
        ...

    async def unload_now(self) -> bool:
        """Unload it now if idle (False: busy, or not loaded; it unloads when idle)."""
        ...
