"""Per-request token limits and token accounting, neutral of HTTP and of the backend.

The HTTP edge (lmserve.http.routing) knows who is calling and which limits apply; the backend
knows how many tokens a prompt has and how many a generation wrote. A `Meter` carries the
first to the second through a context variable: the route sets it for the request, and the
backend's `start` calls `metered()`, which checks the limits (400 naming the parameter),
charges the prompt at once and the output when each choice finishes."""

from __future__ import annotations

import contextvars
import dataclasses
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Literal

from lmserve.core.backend import BackendGeneration, ChoiceStep, WrappedGeneration
from lmserve.core.errors import ErrorKind, LmserveError, invalid
from lmserve.core.request import GenerationRequest

Dimension = Literal["requests", "tokens"]


class RateLimited(LmserveError):
    """429: the caller's key used up its requests or tokens of the current minute."""

    def __init__(self, message: str, dimension: Dimension, retry_after: float) -> None:
        super().__init__(ErrorKind.RATE_LIMITED, message, code="rate_limit_exceeded",
                         retry_after=retry_after)
        self.dimension = dimension


@dataclass(frozen=True)
class TokenLimits:
    """The most prompt tokens, and the most output tokens (`max_tokens`), of one request;
    None: no limit."""

    max_prompt_tokens: int | None = None
    max_tokens: int | None = None

    def tighter(self, other: TokenLimits) -> TokenLimits:
        """Each limit the smaller of the two (the server's and the key's)."""
        return TokenLimits(_least(self.max_prompt_tokens, other.max_prompt_tokens),
                           _least(self.max_tokens, other.max_tokens))

    @property
    def any(self) -> bool:
        return self.max_prompt_tokens is not None or self.max_tokens is not None


def _least(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


Charge = Callable[[int], None]


class Meter:
    """One request's account: its token limits and where its tokens are charged."""

    def __init__(self, limits: TokenLimits = TokenLimits(), charge: Charge | None = None) -> None:
        self.limits = limits
        self.charge = charge

    def admit(self, request: GenerationRequest, prompt_tokens: int) -> GenerationRequest:
        """Refuse a request over a limit; an unset max_tokens becomes the limit. Charges the
        prompt (once, whatever `n`) when the request is admitted."""
        limits = self.limits
        if limits.max_prompt_tokens is not None and prompt_tokens > limits.max_prompt_tokens:
            param = "messages" if request.messages is not None else "prompt"
            raise LmserveError(ErrorKind.INVALID_REQUEST,
                               f"the prompt has {prompt_tokens} tokens; this server allows "
                               f"{limits.max_prompt_tokens} a request", param=param,
                               code="prompt_too_long")
        if limits.max_tokens is not None:
            if request.max_tokens is None:
                request = dataclasses.replace(request, max_tokens=limits.max_tokens)
            elif request.max_tokens > limits.max_tokens:
                raise invalid(f"max_tokens is {request.max_tokens}; this server allows "
                              f"{limits.max_tokens} a request", param="max_tokens",
                              code="max_tokens_too_large")
        if self.charge is not None and prompt_tokens:
            self.charge(prompt_tokens)
        return request

    def track(self, generation: BackendGeneration) -> BackendGeneration:
        """The generation, charging each choice's output tokens when it ends."""
        if self.charge is None:
            return generation
        return MeteredGeneration(generation, self.charge)


METER: contextvars.ContextVar[Meter | None] = contextvars.ContextVar("lmserve_meter",
                                                                      default=None)


def metered(request: GenerationRequest, prompt_tokens: int,
            start: Callable[[GenerationRequest], BackendGeneration]) -> BackendGeneration:
    """Start a generation under the current request's meter (none: as it is)."""
    meter = METER.get()
    if meter is None:
        return start(request)
    return meter.track(start(meter.admit(request, prompt_tokens)))


def charge_tokens(tokens: int) -> None:
    """Charge tokens that no generation carries (embedding inputs) to the current request's
    key, when it has a tokens limit."""
    meter = METER.get()
    if meter is not None and meter.charge is not None and tokens > 0:
        meter.charge(tokens)


class MeteredGeneration(WrappedGeneration):
    """A BackendGeneration that charges each choice's completion tokens: its usage when it
    ends, or the tokens it had written when the reader stopped early (a client that left)."""

    def __init__(self, inner: BackendGeneration, charge: Charge) -> None:
        super().__init__(inner)
        self.charge = charge
        self._written: dict[int, int] = {}  # unfinished choice -> tokens seen so far

    async def __aiter__(self) -> AsyncIterator[list[ChoiceStep]]:
        try:
            async for steps in self.inner:
                for step in steps:
                    self._count(step)
                yield steps
        finally:
            self._settle()

    def _count(self, step: ChoiceStep) -> None:
        written = self._written.get(step.index, 0) + len(step.token_ids)
        if not step.finished:
            self._written[step.index] = written
            return
        self._written.pop(step.index, None)
        usage = step.usage
        tokens = usage.completion_tokens if usage is not None and usage.completion_tokens \
            else written
        if tokens:
            self.charge(tokens)

    def _settle(self) -> None:
        """Charge what the unfinished choices wrote (once)."""
        tokens = sum(self._written.values())
        self._written.clear()
        if tokens:
            self.charge(tokens)

    def close(self) -> None:
        self._settle()
        self.inner.close()
