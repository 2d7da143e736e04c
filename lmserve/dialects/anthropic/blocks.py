"""Pure: parsed output (reasoning, text, tool calls) -> Anthropic content blocks.

A whole message lists its blocks as thinking, text, then tool_use. A stream opens a block when
its first piece arrives and closes it when another kind follows: thinking blocks stream
thinking_delta and end with a signature_delta; tool_use blocks start with the name and an empty
input and stream the input's JSON text as input_json_delta partial_json.

Signatures: Anthropic signs thinking so that it can check blocks sent back to it. A local model
has nothing to check, so every block carries the same opaque marker and blocks sent back are
read without checking it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from lmserve.core.events import (
    CHANNEL_REASONING,
    ChatEvent,
    ParsedTurn,
    TextDelta,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
)

SIGNATURE = "lmserve-unsigned"

Frame = tuple[str, dict[str, Any]]  # (event name, data)


def tool_use_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


def tool_input(arguments: str) -> dict[str, Any]:
    """The input object of a call; arguments cut short by max_tokens give what parses, else {}."""
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def content_blocks(turn: ParsedTurn, display: str | None) -> list[dict[str, Any]]:
    """`display`: "summarized" shows thinking, "omitted" gives empty thinking blocks, None
    drops the reasoning."""
    blocks: list[dict[str, Any]] = []
    if turn.reasoning and display is not None:
        shown = turn.reasoning if display == "summarized" else ""
        blocks.append({"type": "thinking", "thinking": shown, "signature": SIGNATURE})
    if turn.content or not turn.tool_calls:
        blocks.append({"type": "text", "text": turn.content})
    blocks += [{"type": "tool_use", "id": tool_use_id(call.id), "name": call.name,
                "input": tool_input(call.arguments)} for call in turn.tool_calls]
    return blocks


class BlockStream:
    """Stream events for content blocks, from the parser's events, in order."""

    def __init__(self, display: str | None, on_first_block: Callable[[], list[Frame]]) -> None:
        self.display = display
        self.on_first_block = on_first_block  # frames to send right after the first block start
        self.index = -1
        self.open: str | None = None  # the kind of the open block
        self.made_calls = False

    def events(self, events: list[ChatEvent]) -> list[Frame]:
        frames: list[Frame] = []
        for event in events:
            if isinstance(event, TextDelta):
                frames += self._text(event)
            elif isinstance(event, ToolCallStart):
                self.made_calls = True
                frames += self._start("tool_use", {"type": "tool_use", "id": tool_use_id(event.id),
                                                   "name": event.name, "input": {}})
            elif isinstance(event, ToolCallDelta):
                frames.append(self._delta({"type": "input_json_delta",
                                           "partial_json": event.arguments}))
            elif isinstance(event, ToolCallEnd):
                frames += self._close()
        return frames

    def finish(self) -> list[Frame]:
        """Close the open block; a reply with no block at all gets an empty text block."""
        if self.index < 0:
            return [*self._start("text", {"type": "text", "text": ""}), *self._close()]
        return self._close()

    def _text(self, event: TextDelta) -> list[Frame]:
        if not event.text:
            return []
        if event.channel != CHANNEL_REASONING:
            frames = [] if self.open == "text" else self._start("text", {"type": "text",
                                                                         "text": ""})
            return [*frames, self._delta({"type": "text_delta", "text": event.text})]
        if self.display is None:
            return []
        frames = [] if self.open == "thinking" else self._start(
            "thinking", {"type": "thinking", "thinking": "", "signature": ""})
        if self.display == "summarized":
            frames.append(self._delta({"type": "thinking_delta", "thinking": event.text}))
        return frames

    def _start(self, kind: str, block: dict[str, Any]) -> list[Frame]:
        frames = self._close()
        self.index += 1
        self.open = kind
        frames.append(("content_block_start", {"type": "content_block_start",
                                               "index": self.index, "content_block": block}))
        if self.index == 0:
            frames += self.on_first_block()
        return frames

    def _delta(self, delta: dict[str, Any]) -> Frame:
        return ("content_block_delta", {"type": "content_block_delta", "index": self.index,
                                        "delta": delta})

    def _close(self) -> list[Frame]:
        if self.open is None:
            return []
        frames = []
        if self.open == "thinking":
            frames.append(self._delta({"type": "signature_delta", "signature": SIGNATURE}))
        frames.append(("content_block_stop", {"type": "content_block_stop",
                                              "index": self.index}))
        self.open = None
        return frames
