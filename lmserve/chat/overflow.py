"""Context overflow policy: what happens when a chat does not fit the context.

"error" (the default) refuses it with 400 context_length_exceeded. "truncate" drops the oldest
turns after the leading system (or developer) messages until the prompt leaves room for the
reply. A turn starts at a user message and runs to the next one, so an assistant message that
called tools always goes together with the tool results that answer it, and the roles keep
alternating the way strict templates require. The last user message and everything after it
are never dropped.

The room for the reply is max_tokens when the request sets it, else a reserve of a quarter of
the context, at most RESERVE_TOKENS. When even dropping every earlier turn leaves less room than
that, the shortest prompt is used as long as it fits the context at all (a request with
max_tokens is then refused by the usual context check, which says truncation was tried).

Each candidate is rendered through the chat template and tokenized, never estimated; a binary
search over the number of dropped turns keeps that to a few renders.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

from lmserve.core.errors import ErrorKind, LmserveError
from lmserve.core.request import ChatMessage, GenerationRequest

log = logging.getLogger("lmserve.overflow")

OverflowPolicy = Literal["error", "truncate"]
OVERFLOW_POLICIES: tuple[OverflowPolicy, ...] = ("error", "truncate")
RESERVE_TOKENS = 1024
_HEAD_ROLES = ("system", "developer")


class HasTokens(Protocol):
    tokens: list[int]


P = TypeVar("P", bound=HasTokens)


def output_reserve(window: int) -> int:
    """The room kept for a reply whose length the request does not set."""
    return max(1, min(RESERVE_TOKENS, window // 4))


def reply_room(window: int, max_tokens: int | None, *, capped: bool = False) -> int:
    """The tokens truncation leaves for the reply. `capped`: the dialect shrinks max_tokens to
    whatever room is left (Anthropic, Ollama), so a large one asks for no more than the
    reserve; otherwise max_tokens must fit whole."""
    reserve = output_reserve(window)
    if max_tokens is None:
        return reserve
    return min(max_tokens, reserve) if capped else max_tokens


@dataclass(frozen=True)
class Budget:
    window: int  # the tokens prompt and reply share
    room: int  # the tokens the reply should get

    @property
    def prompt_limit(self) -> int:
        return self.window - self.room


def turn_cuts(messages: Sequence[ChatMessage]) -> tuple[int, list[int]]:
    """(the number of leading system messages, where a kept tail may begin). Cut k keeps the
    head and messages[cuts[k]:]; cut 0 keeps everything; the last cut is the last user message."""
    head = 0
    while head < len(messages) and messages[head].role in _HEAD_ROLES:
        head += 1
    users = [i for i in range(head, len(messages)) if messages[i].role == "user"]
    if not users:
        return head, [head]
    return head, [head, *(i for i in users if i > head)]


def fit_chat(request: GenerationRequest, render: Callable[[GenerationRequest], P],
             window: int) -> tuple[P, int]:
    """fit_turns for a chat request: `render` prepares the request with a given message list;
    the room for the reply is its max_tokens or the reserve."""
    budget = Budget(window, reply_room(window, request.max_tokens))
    return fit_turns(request.messages or [],
                     lambda messages: render(dataclasses.replace(request, messages=messages)),
                     budget)


def fit_turns(messages: Sequence[ChatMessage], render: Callable[[list[ChatMessage]], P],
              budget: Budget) -> tuple[P, int]:
    """The rendered prompt with the fewest oldest turns dropped that fits the budget, and the
    number of messages dropped; see the module docstring for when the room cannot be had."""
    head, cuts = turn_cuts(messages)
    renders: dict[int, P] = {}

    def rendered(k: int) -> P:
        if k not in renders:
            renders[k] = render([*messages[:head], *messages[cuts[k]:]])
        return renders[k]

    def fits(k: int) -> bool:
        return len(rendered(k).tokens) <= budget.prompt_limit

    last = len(cuts) - 1
    if fits(0):
        return rendered(0), 0
    if not fits(last):
        return _shortest(rendered(last), cuts[last] - head, budget)
    lo, hi = 1, last  # fits(hi) holds; find the smallest k that fits
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid + 1
    dropped = cuts[lo] - head
    log.info("context overflow: dropped the %d oldest messages to fit %d prompt tokens",
             dropped, len(rendered(lo).tokens))
    return rendered(lo), dropped


def _shortest(prepared: P, dropped: int, budget: Budget) -> tuple[P, int]:
    n = len(prepared.tokens)
    if n >= budget.window:
        raise _cannot_fit(n, budget.window, dropped)
    return prepared, dropped


def _cannot_fit(n_prompt: int, window: int, dropped: int) -> LmserveError:
    what = (f"after dropping the {dropped} oldest messages" if dropped else
            "with no earlier turn to drop")
    return LmserveError(
        ErrorKind.CONTEXT_LENGTH_EXCEEDED,
        f"this model's maximum context length is {window} tokens, and truncation could not make "
        f"the prompt fit: {what}, the system messages and the last user turn still take "
        f"{n_prompt} tokens", param="messages", code="context_length_exceeded")


# Appended to the usual context check's message when truncation was on but could not help.
TRUNCATION_NOTE = " (truncation already dropped every turn before the last user message)"
