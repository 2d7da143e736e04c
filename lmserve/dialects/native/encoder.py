"""Pure: neutral generation outputs -> native blocks (buffered) and stream frames (SSE)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from lmserve.core.errors import ErrorKind, LmserveError
from lmserve.core.events import (
    FINISH_CANCELLED,
    FINISH_ERROR,
    FINISH_LENGTH,
    ChatEvent,
    TextDelta,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
    Usage,
)
from lmserve.core.observe import with_request_id

Frame = tuple[str, dict[str, Any]]  # (event name, data)

_STOP_REASONS = {FINISH_LENGTH: "max_tokens", FINISH_CANCELLED: "cancelled",
                 FINISH_ERROR: "error"}


def stop_reason(finish_reason: str | None, made_calls: bool = False) -> str:
    """"tool_use" replaces "stop" when the reply called tools."""
    reason = _STOP_REASONS.get(finish_reason or "", "stop")
    return "tool_use" if made_calls and reason == "stop" else reason


def usage_body(usage: Usage) -> dict[str, int]:
    return {"input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens,
            "cached_tokens": usage.cached_tokens}


def error_body(exc: LmserveError) -> dict[str, Any]:
    error: dict[str, Any] = {"type": exc.kind.value, "message": exc.message}
    if exc.param is not None:
        error["param"] = exc.param
    if exc.code is not None:
        error["code"] = exc.code
    return with_request_id({"error": error})


@dataclass
class Blocks:
    """Text on channels, grouped into blocks (a new block whenever the channel changes), and
    tool blocks, one per call. A tool block's `arguments` is the arguments object; text that
    does not parse (a call cut short by max_tokens) stays a string."""

    blocks: list[dict[str, Any]] = field(default_factory=list)
    calls: dict[int, int] = field(default_factory=dict, repr=False)  # call index -> block

    @property
    def made_calls(self) -> bool:
        return any(block["type"] == "tool" for block in self.blocks)

    def add(self, channel: str, text: str) -> tuple[bool, int]:
        """Append text; returns (opened a new block, its index)."""
        last = self.blocks[-1] if self.blocks else None
        if last is not None and last["type"] == "text" and last["channel"] == channel:
            last["text"] += text
            return False, len(self.blocks) - 1
        self.blocks.append({"type": "text", "channel": channel, "text": text})
        return True, len(self.blocks) - 1

    def add_tool(self, call: ToolCallStart) -> int:
        self.blocks.append({"type": "tool", "id": call.id, "name": call.name, "arguments": ""})
        self.calls[call.index] = len(self.blocks) - 1
        return len(self.blocks) - 1

    def end_tool(self, end: ToolCallEnd) -> None:
        try:
            value: Any = json.loads(end.arguments)
        except ValueError:
            value = end.arguments
        self.blocks[self.calls[end.index]]["arguments"] = value

    def add_events(self, events: list[ChatEvent]) -> None:
        """A buffered reply: the parser's events into blocks."""
        for event in events:
            if isinstance(event, TextDelta) and event.text:
                self.add(event.channel, event.text)
            elif isinstance(event, ToolCallStart):
                self.add_tool(event)
            elif isinstance(event, ToolCallEnd):
                self.end_tool(event)


def truncated_field(dropped: int) -> dict[str, int]:
    """The oldest messages dropped to fit the context, when there were any."""
    return {"truncated_messages": dropped} if dropped else {}


def query_body(ident: str, created: int, model: str, blocks: Blocks, finish: str | None,
               usage: Usage, truncated: int = 0) -> dict[str, Any]:
    return {"id": ident, "created": created, "model": model, "blocks": blocks.blocks,
            "stop_reason": stop_reason(finish, blocks.made_calls), "usage": usage_body(usage),
            **truncated_field(truncated)}


class FrameEncoder:
    """Turns channel text and the finish into the stream's frames, in protocol order."""

    def __init__(self, ident: str, model: str, created: int, truncated: int = 0) -> None:
        self.blocks = Blocks()
        self._open: int | None = None
        self._start: Frame = ("message.start", {"id": ident, "model": model, "created": created,
                                                **truncated_field(truncated)})

    def start(self) -> list[Frame]:
        return [self._start]

    def text(self, channel: str, text: str) -> list[Frame]:
        if not text:
            return []
        frames: list[Frame] = []
        opened, index = self.blocks.add(channel, text)
        if opened:
            frames += self._close_block()
            frames.append(("block.start", {"index": index, "type": "text", "channel": channel}))
            self._open = index
        frames.append(("block.delta", {"index": index, "channel": channel, "text": text}))
        return frames

    def events(self, events: list[ChatEvent]) -> list[Frame]:
        """Frames for the parser's events: text on channels and tool calls."""
        frames: list[Frame] = []
        for event in events:
            if isinstance(event, TextDelta):
                frames += self.text(event.channel, event.text)
            elif isinstance(event, ToolCallStart):
                frames += self._close_block()
                index = self._open = self.blocks.add_tool(event)
                frames.append(("block.start", {"index": index, "type": "tool", "id": event.id,
                                               "name": event.name}))
            elif isinstance(event, ToolCallDelta):
                frames.append(("block.delta", {"index": self.blocks.calls[event.index],
                                               "arguments": event.arguments}))
            elif isinstance(event, ToolCallEnd):
                self.blocks.end_tool(event)
                frames += self._close_block()
        return frames

    def progress(self, usage: Usage) -> list[Frame]:
        return [("message.delta", {"usage": usage_body(usage)})]

    def finish(self, finish_reason: str | None, usage: Usage) -> list[Frame]:
        return [*self._close_block(), *self.progress(usage),
                ("message.stop", {"stop_reason": stop_reason(finish_reason,
                                                             self.blocks.made_calls),
                                  "usage": usage_body(usage)})]

    def error(self, exc: LmserveError, usage: Usage) -> list[Frame]:
        body = error_body(exc)["error"]
        return [*self._close_block(), ("error", body),
                ("message.stop", {"stop_reason": "error", "usage": usage_body(usage)})]

    def _close_block(self) -> list[Frame]:
        if self._open is None:
            return []
        index, self._open = self._open, None
        return [("block.stop", {"index": index})]


def internal(message: str) -> LmserveError:
    return LmserveError(ErrorKind.INTERNAL, message)
