"""Pure: parsed chat output (reasoning, answer text, tool calls) -> OpenAI chat shapes.

Streaming tool calls follow OpenAI's delta rules: the first delta of a call carries its
index, id, type and function name (with empty arguments); every later delta carries only an
arguments fragment under the same index; each call of a turn has its own index.
"""

from __future__ import annotations

from typing import Any

from lmserve.core.events import (
    CHANNEL_REASONING,
    ChatEvent,
    ParsedTurn,
    TextDelta,
    ToolCallDelta,
    ToolCallStart,
)


def chat_finish_reason(wire_reason: str | None, made_calls: bool) -> str | None:
    """"tool_calls" replaces "stop" when the turn called tools; a length cut stays "length"."""
    if made_calls and wire_reason == "stop":
        return "tool_calls"
    return wire_reason


def assistant_message(turn: ParsedTurn) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant",
                               "content": turn.content or (None if turn.tool_calls else ""),
                               "refusal": None}
    if turn.reasoning:
        message["reasoning_content"] = turn.reasoning
    if turn.tool_calls:
        message["tool_calls"] = [{"id": call.id, "type": "function",
                                  "function": {"name": call.name, "arguments": call.arguments}}
                                 for call in turn.tool_calls]
    return message


def event_deltas(events: list[ChatEvent]) -> list[dict[str, Any]]:
    """One chunk delta per event that shows on the wire (a call's end adds nothing)."""
    deltas: list[dict[str, Any]] = []
    for event in events:
        if isinstance(event, TextDelta) and event.text:
            key = "reasoning_content" if event.channel == CHANNEL_REASONING else "content"
            deltas.append({key: event.text})
        elif isinstance(event, ToolCallStart):
            deltas.append({"tool_calls": [{"index": event.index, "id": event.id,
                                           "type": "function",
                                           "function": {"name": event.name, "arguments": ""}}]})
        elif isinstance(event, ToolCallDelta):
            deltas.append({"tool_calls": [{"index": event.index,
                                           "function": {"arguments": event.arguments}}]})
    return deltas


class ChoiceCalls:
    """Whether each choice of a stream made a tool call (its finish reason depends on it)."""

    def __init__(self) -> None:
        self._made: set[int] = set()

    def note(self, index: int, events: list[ChatEvent]) -> None:
        if any(isinstance(e, ToolCallStart) for e in events):
            self._made.add(index)

    def finish_reason(self, index: int, wire_reason: str | None) -> str | None:
        return chat_finish_reason(wire_reason, index in self._made)
