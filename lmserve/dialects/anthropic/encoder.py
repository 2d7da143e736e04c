"""Pure translation: a backend's choice steps -> Anthropic JSON bodies and SSE frames.

Usage follows Anthropic's accounting: the prompt's total is input_tokens +
cache_read_input_tokens + cache_creation_input_tokens, and input_tokens counts only the tokens
computed for this request. The prefix reuse of the engine is the cache read; nothing is billed
as a cache write, so cache_creation_input_tokens is always 0.
"""

from __future__ import annotations

import datetime
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from lmserve.core.backend import ChoiceStep
from lmserve.core.errors import ErrorKind, LmserveError
from lmserve.core.events import FINISH_LENGTH, ParsedTurn, Usage
from lmserve.core.observe import with_request_id
from lmserve.dialects.anthropic.blocks import BlockStream, content_blocks

_ERROR_TYPES = {
    ErrorKind.INVALID_REQUEST: "invalid_request_error",
    ErrorKind.CONTEXT_LENGTH_EXCEEDED: "invalid_request_error",
    ErrorKind.UNSUPPORTED: "invalid_request_error",
    ErrorKind.NOT_FOUND: "not_found_error",
    ErrorKind.MODEL_NOT_FOUND: "not_found_error",
    ErrorKind.AUTHENTICATION: "authentication_error",
    ErrorKind.PERMISSION: "permission_error",
    ErrorKind.PAYLOAD_TOO_LARGE: "request_too_large",
    ErrorKind.RATE_LIMITED: "rate_limit_error",
    ErrorKind.OVERLOADED: "rate_limit_error",  # 429: the queue is full, retry after a second
    ErrorKind.LOADING: "overloaded_error",  # 503: weights still loading, retry after two
    # 503 (Anthropic answers 529 when overloaded; clients retry on either): the KV cache
    # filled up under a running request.
    ErrorKind.CAPACITY: "overloaded_error",
    ErrorKind.DRAINING: "overloaded_error",  # 503: the server is shutting down
    ErrorKind.UNAVAILABLE: "overloaded_error",  # 503: the store cannot be reached
    ErrorKind.UPSTREAM: "api_error",  # 502
    ErrorKind.UPSTREAM_TIMEOUT: "api_error",  # 504
    ErrorKind.INTERNAL: "api_error",
}


def error_body(exc: LmserveError) -> dict[str, Any]:
    return with_request_id({"type": "error", "error": {"type": _ERROR_TYPES[exc.kind],
                                                       "message": exc.message}})


def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def usage_body(usage: Usage) -> dict[str, int]:
    return {"input_tokens": usage.prompt_tokens - usage.cached_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": usage.cached_tokens,
            "output_tokens": usage.completion_tokens}


def stop_reason(step: ChoiceStep, *, context_capped: bool, made_calls: bool = False
                ) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) of a choice's last step.

    `context_capped`: max_tokens was lowered to what the context had left, so running out
    means the context window is full, not that the client's max_tokens was reached.
    """
    if step.finish_reason == FINISH_LENGTH:
        return ("model_context_window_exceeded" if context_capped else "max_tokens"), None
    if made_calls:
        return "tool_use", None
    if step.stop_match is not None:
        return "stop_sequence", step.stop_match
    return "end_turn", None


@dataclass
class Collected:
    """A whole (non-streamed) reply gathered from a choice's steps: its parsed turn."""

    final: ChoiceStep | None = None
    turn: ParsedTurn = field(default_factory=ParsedTurn)

    def add(self, step: ChoiceStep) -> None:
        self.turn.extend(step.events)
        if step.finished:
            self.final = step

    def raise_failure(self) -> None:
        """Raise the choice's error, with its kind, if it failed or never ended."""
        if self.final is None:
            raise LmserveError(ErrorKind.INTERNAL, "the generation ended without a result")
        self.final.raise_failure()


def message(model: str, collected: Collected, *, context_capped: bool,
            display: str | None = None) -> dict[str, Any]:
    """`display`: see blocks.content_blocks."""
    assert collected.final is not None
    turn = collected.turn
    reason, sequence = stop_reason(collected.final, context_capped=context_capped,
                                   made_calls=bool(turn.tool_calls))
    return {"id": new_message_id(), "type": "message", "role": "assistant", "model": model,
            "content": content_blocks(turn, display),
            "stop_reason": reason, "stop_sequence": sequence,
            "usage": usage_body(collected.final.usage or Usage())}


def sse(event: str, data: dict[str, Any]) -> bytes:
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"event: {event}\ndata: {payload}\n\n".encode()


class StreamEncoder:
    """The event sequence of one streamed message.

    message_start is sent before the engine has looked for a reusable prefix, so it reports
    the whole prompt as input_tokens; message_delta then carries the final split between
    input_tokens and cache_read_input_tokens, which the official clients take as final.
    """

    def __init__(self, model: str, prompt_tokens: int, *, context_capped: bool,
                 display: str | None = None) -> None:
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.context_capped = context_capped
        # As Anthropic does, a ping follows the first content_block_start.
        self.blocks = BlockStream(display, lambda: [("ping", {"type": "ping"})])

    def start(self) -> list[bytes]:
        message: dict[str, Any] = {"id": new_message_id(), "type": "message", "role": "assistant",
                   "model": self.model, "content": [], "stop_reason": None,
                   "stop_sequence": None,
                   "usage": usage_body(Usage(prompt_tokens=self.prompt_tokens))}
        return [sse("message_start", {"type": "message_start", "message": message})]

    def output(self, step: ChoiceStep) -> list[bytes]:
        """The frames of one step (a failed step is the route's: see routes._stream)."""
        frames = [sse(event, data) for event, data in self.blocks.events(step.events)]
        if step.finished:
            frames.extend(self._finish(step))
        return frames

    def _finish(self, step: ChoiceStep) -> list[bytes]:
        reason, sequence = stop_reason(step, context_capped=self.context_capped,
                                       made_calls=self.blocks.made_calls)
        closing = [sse(event, data) for event, data in self.blocks.finish()]
        return [*closing,
                sse("message_delta", {"type": "message_delta",
                                      "delta": {"stop_reason": reason,
                                                "stop_sequence": sequence},
                                      "usage": usage_body(step.usage or Usage())}),
                sse("message_stop", {"type": "message_stop"})]

    def error(self, exc: LmserveError) -> bytes:
        return sse("error", error_body(exc))


def model_card(name: str, created: int, n_ctx: int) -> dict[str, Any]:
    stamp = datetime.datetime.fromtimestamp(created, tz=datetime.UTC)
    card: dict[str, Any] = {"type": "model", "id": name, "display_name": name,
                            "created_at": stamp.isoformat().replace("+00:00", "Z"),
                            "lifecycle": "active"}
    if n_ctx:  # known once the model is loaded
        card["max_input_tokens"] = n_ctx
        card["max_tokens"] = n_ctx
    return card


def model_page(cards: list[dict[str, Any]], *, limit: int, after_id: str | None,
               before_id: str | None) -> dict[str, Any]:
    """One page of a list in Anthropic's cursor style (the cursors are model ids)."""
    ids = [card["id"] for card in cards]
    for name, cursor in (("after_id", after_id), ("before_id", before_id)):
        if cursor is not None and cursor not in ids:
            raise LmserveError(ErrorKind.INVALID_REQUEST, f"{name} '{cursor}' is not a model id "
                               "on this server", param=name)
    if before_id is not None:
        end = ids.index(before_id)
        page, has_more = cards[max(0, end - limit):end], end > limit
    else:
        start = ids.index(after_id) + 1 if after_id is not None else 0
        page, has_more = cards[start:start + limit], start + limit < len(cards)
    return {"data": page, "has_more": has_more,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None}
