"""Types shared by the benchmark harness: what a backend is given, and what it yields."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class BenchRequest:
    """One generation request. `prompt` is plain text (sent as-is to /v1/completions)."""

    prompt: str
    max_tokens: int
    ignore_eos: bool = True


@dataclass(frozen=True)
class Chunk:
    """One received content delta.

    Ordinary chunks carry `n_tokens` (1 when unknown) and their `text`; each one is a
    timing event for TTFT/ITL, and a chunk with several tokens has its gap split evenly.

    A chunk with `total_tokens` set is a *usage report* instead: it is not timed, and the
    request's output-token count becomes `total_tokens` (the server's authoritative
    count, e.g. OpenAI `usage.completion_tokens`), replacing the sum of `n_tokens`.
    `prompt_tokens`, when the server reports it, is recorded too. Backends that count
    tokens exactly (an in-process engine) never need to yield one.
    """

    n_tokens: int
    text: str
    total_tokens: int | None = None
    prompt_tokens: int | None = None

    @property
    def is_usage(self) -> bool:
        return self.total_tokens is not None


@runtime_checkable
class Backend(Protocol):
    """Anything that can stream a completion for a BenchRequest.

    `stream` is normally written as an async generator (`async def stream(...): yield ...`);
    the runner also accepts a coroutine that returns an async iterator.
    """

    name: str

    def stream(self, req: BenchRequest) -> AsyncIterator[Chunk]: ...

    async def aclose(self) -> None: ...


class BackendError(Exception):
    """A request the backend could not complete (HTTP error status, error event, ...)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
