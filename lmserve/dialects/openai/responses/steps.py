"""Per-step bookkeeping of a Responses turn: which generated tokens were reasoning (usage
output_tokens_details.reasoning_tokens), the logprobs each output_text delta carries, and the
reasoning output item with its events.

Tokens are attributed per engine step, by the parsed text the step released: reasoning text
makes the step's tokens reasoning tokens; answer text or a tool call makes them answer tokens.
A step that released nothing (a think tag, text the parser holds back, whitespace it drops)
counts with the step before it; before any text has shown, with the first text that shows. So
both think tags count as reasoning, and an answer token's logprob waits for the delta that
shows its text. (Answer text held back just after the reasoning, such as a "<" that may open
a tool call, therefore counts as reasoning too, and its logprob is not shown.) Logprobs of
tokens whose text never shows as answer text (the reasoning, a tool call's markup and
arguments, an end-of-turn token, a matched stop string) are left out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lmserve.core.backend import ChoiceStep
from lmserve.core.events import (
    CHANNEL_OUTPUT,
    CHANNEL_REASONING,
    ChatEvent,
    TextDelta,
    TokenLogprob,
)
from lmserve.dialects.openai.logprobs import chat_content
from lmserve.dialects.openai.responses.items import reasoning_item
from lmserve.dialects.openai.responses.schema import JSON, new_id

Emit = Callable[..., JSON]  # (event type, **fields) -> the numbered event


class StepTokens:
    """Reasoning token count and the answer logprobs not yet sent."""

    def __init__(self) -> None:
        self.reasoning_tokens = 0
        self._channel: str | None = None  # the channel of the last text shown
        self._undecided = 0  # tokens before any text showed
        self._pending: list[TokenLogprob] = []

    def step(self, out: ChoiceStep, events: list[ChatEvent]) -> None:
        channel = _last_channel(events) or self._channel
        count, logprobs = len(out.token_ids), out.logprobs or []
        if channel is None:
            self._undecided += count
            self._pending += logprobs
            return
        count, self._undecided = count + self._undecided, 0
        self._channel = channel
        if channel == CHANNEL_REASONING:
            self.reasoning_tokens += count
            self._pending.clear()
        else:
            self._pending += logprobs

    def take(self) -> list[JSON]:
        """The logprobs of answer tokens not sent yet, in the wire shape, for the delta that
        shows their text."""
        taken, self._pending = self._pending, []
        return chat_content(taken)

    def drop(self) -> None:
        """The waiting tokens' text went into a tool call, not into answer text."""
        self._pending.clear()


def _last_channel(events: list[ChatEvent]) -> str | None:
    for event in reversed(events):
        if isinstance(event, TextDelta):
            if event.text:
                return event.channel
        else:
            return CHANNEL_OUTPUT  # a tool call is the answer
    return None


def part_done(emit: Emit, kind: str, where: JSON, part: JSON, item: JSON,
              **text_fields: Any) -> list[JSON]:
    """The events that close a one-part item: response.<kind>.done with the whole text,
    content_part.done, output_item.done."""
    return [emit(f"response.{kind}.done", **where, **text_fields),
            emit("response.content_part.done", **where, part=part),
            emit("response.output_item.done", output_index=where["output_index"], item=item)]


class ReasoningWriter:
    """The open reasoning item: output_item.added, content_part.added (reasoning_text),
    reasoning_text.delta..., then reasoning_text.done, content_part.done, output_item.done."""

    def __init__(self, output: list[JSON], emit: Emit) -> None:
        self.output, self._emit = output, emit
        self.index: int | None = None  # its place in the output while it is open
        self._id, self._text = "", ""

    def delta(self, text: str) -> list[JSON]:
        events = self._open()
        self._text += text
        events.append(self._emit("response.reasoning_text.delta", **self._where(), delta=text))
        return events

    def close(self, status: str = "completed") -> list[JSON]:
        if self.index is None:
            return []
        part = {"type": "reasoning_text", "text": self._text}
        item = reasoning_item(self._id, status, self._text)
        events = part_done(self._emit, "reasoning_text", self._where(), part, item,
                           text=self._text)
        self.output[self.index] = item
        self.index = None
        return events

    def settle(self) -> None:
        """The response ended early (failed, cancelled): an open item ends incomplete."""
        if self.index is not None:
            self.output[self.index] = reasoning_item(self._id, "incomplete", self._text)
            self.index = None

    def _open(self) -> list[JSON]:
        if self.index is not None:
            return []
        self.index, self._id, self._text = len(self.output), new_id("rs"), ""
        self.output.append(reasoning_item(self._id, "in_progress", None))
        return [self._emit("response.output_item.added", output_index=self.index,
                           item=reasoning_item(self._id, "in_progress", None)),
                self._emit("response.content_part.added", **self._where(),
                           part={"type": "reasoning_text", "text": ""})]

    def _where(self) -> dict[str, Any]:
        return {"item_id": self._id, "output_index": self.index, "content_index": 0}
