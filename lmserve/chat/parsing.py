"""The chat output pipeline: generated text in, reasoning, answer text and tool calls out.

The reasoning parser runs first and only text on the output channel reaches the tool-call
parser, so a call written inside the reasoning is never executed. Harmony (gpt-oss) marks
reasoning and calls in one syntax, so one parser does both jobs there.
"""

from __future__ import annotations

from lmserve.chat.reasoning import ReasoningParser
from lmserve.chat.textscan import push_text
from lmserve.chat.toolparsers import StreamParser, canonical_tool_format, make_tool_parser
from lmserve.chat.toolparsers.harmony import HarmonyParser
from lmserve.core.events import (
    CHANNEL_OUTPUT,
    CHANNEL_REASONING,
    ChatEvent,
    ParsedTurn,
    TextDelta,
)

__all__ = ["ChatOutputParser", "make_chat_parser", "parse_all"]


class ChatOutputParser:
    """Reasoning parser -> tool-call parser; either stage may be absent."""

    def __init__(self, reasoning: ReasoningParser | None = None,
                 tools: StreamParser | None = None) -> None:
        self.reasoning = reasoning
        self.tools = tools

    def feed(self, text: str) -> list[ChatEvent]:
        if self.reasoning is None:
            return self._route([TextDelta(CHANNEL_OUTPUT, text)] if text else [])
        return self._route(self.reasoning.feed(text))

    def finish(self) -> list[ChatEvent]:
        events = self._route(self.reasoning.finish()) if self.reasoning else []
        if self.tools is not None:
            _extend(events, self.tools.finish())
        return events

    def _route(self, events: list[ChatEvent]) -> list[ChatEvent]:
        if self.tools is None:
            return events
        routed: list[ChatEvent] = []
        for event in events:
            if isinstance(event, TextDelta) and event.channel == CHANNEL_OUTPUT:
                _extend(routed, self.tools.feed(event.text))
            else:
                _extend(routed, [event])
        return routed


def _extend(events: list[ChatEvent], more: list[ChatEvent]) -> None:
    for event in more:
        if isinstance(event, TextDelta):
            push_text(events, event.channel, event.text)
        else:
            events.append(event)


def make_chat_parser(*, tool_format: str | None = None,
                     reasoning_tags: tuple[str, str] | None = None,
                     reasoning_enabled: bool = True,
                     starts_in_reasoning: bool = False) -> StreamParser:
    """The parser for one generation.

    tool_format: a registered format (see detect_tool_format), None when tools are off.
    reasoning_tags: the model's think tags (see detect_reasoning_tags), None for none.
    reasoning_enabled: False puts everything on the output channel, tags included (harmony's
      analysis text then goes to output too).
    starts_in_reasoning: the prompt opened the think block (see generation_opens_reasoning)."""
    if tool_format is not None and canonical_tool_format(tool_format) == "harmony":
        channel = CHANNEL_REASONING if reasoning_enabled else CHANNEL_OUTPUT
        return HarmonyParser(reasoning_channel=channel)
    reasoning = None
    if reasoning_tags is not None:
        reasoning = ReasoningParser(*reasoning_tags, starts_in_reasoning=starts_in_reasoning,
                                    enabled=reasoning_enabled)
    tools = make_tool_parser(tool_format) if tool_format is not None else None
    return ChatOutputParser(reasoning, tools)


def parse_all(parser: StreamParser, chunks: list[str] | str) -> ParsedTurn:
    """Run a whole output through a parser (non-streaming responses, tests)."""
    turn = ParsedTurn()
    for chunk in [chunks] if isinstance(chunks, str) else chunks:
        turn.extend(parser.feed(chunk))
    return turn.extend(parser.finish())
