"""Streaming split of generated text into reasoning and output, by think tags.

Models that reason wrap their thoughts in a tag pair (`<think>...</think>` and relatives).
Some chat templates open the block themselves at the end of the prompt, so the generation
starts inside the reasoning and only the closing tag ever appears. The parser takes text in
chunks split anywhere (a tag may arrive in pieces), holds back only what could still become a
tag, and never lets a tag into either channel.

Whitespace around the tags is layout, not content: it is dropped after an opening tag, before
a closing tag and after a closing tag.
"""

from __future__ import annotations

from lmserve.chat.textscan import partial_marker_len, push_text
from lmserve.core.events import CHANNEL_OUTPUT, CHANNEL_REASONING, ChatEvent, TextDelta

__all__ = [
    "REASONING_TAGS", "ReasoningParser", "detect_reasoning_tags", "generation_opens_reasoning",
]

# Known tag pairs, by the name a configuration may use.
REASONING_TAGS: dict[str, tuple[str, str]] = {
    "think": ("<think>", "</think>"),
    "seed": ("<seed:think>", "</seed:think>"),
    "mistral": ("[THINK]", "[/THINK]"),
    "command": ("<|START_THINKING|>", "<|END_THINKING|>"),
    "kimi": ("\u25c1think\u25b7", "\u25c1/think\u25b7"),
}


class ReasoningParser:
    """feed(text) -> events, finish() -> events; every event is a TextDelta.

    `starts_in_reasoning`: the prompt already opened the block (see generation_opens_reasoning).
    `enabled=False`: no parsing at all, every character is output, tags included."""

    def __init__(self, start: str = "<think>", end: str = "</think>", *,
                 starts_in_reasoning: bool = False, enabled: bool = True) -> None:
        if not start or not end:
            raise ValueError("reasoning tags must be non-empty")
        self.start_tag, self.end_tag = start, end
        self.enabled = enabled
        self._reasoning = starts_in_reasoning and enabled
        self._buffer = ""
        # At the start of a block, leading whitespace is held until we know what follows it.
        self._block_start = True
        self._drop_leading_ws = self._reasoning

    @property
    def channel(self) -> str:
        return CHANNEL_REASONING if self._reasoning else CHANNEL_OUTPUT

    def feed(self, text: str) -> list[ChatEvent]:
        if not self.enabled:
            return [TextDelta(CHANNEL_OUTPUT, text)] if text else []
        self._buffer += text
        events: list[ChatEvent] = []
        while self._step(events):
            pass
        return events

    def finish(self) -> list[ChatEvent]:
        events: list[ChatEvent] = []
        rest, self._buffer = self._buffer, ""
        if self._reasoning:
            rest = rest.rstrip()
        elif self._block_start and self._drop_leading_ws:
            rest = rest.lstrip()
        push_text(events, self.channel, rest)
        return events

    # -- one scanning step; True when the buffer changed state and should be scanned again ----
    def _step(self, events: list[ChatEvent]) -> bool:
        if self._block_start:
            decided = self._settle_block_start()
            if not decided:
                return False
        tag = self.end_tag if self._reasoning else self.start_tag
        buf = self._buffer
        pos = buf.find(tag)
        if pos >= 0:
            before = buf[:pos]
            push_text(events, self.channel, before.rstrip() if self._reasoning else before)
            self._buffer = buf[pos + len(tag):]
            self._switch()
            return True
        keep = partial_marker_len(buf, (tag,))
        ready = buf[:len(buf) - keep]
        if self._reasoning:  # trailing whitespace may be followed by the closing tag
            ready = ready.rstrip()
        push_text(events, self.channel, ready)
        self._buffer = buf[len(ready):]
        return False

    def _settle_block_start(self) -> bool:
        """Deal with whitespace and a (repeated) opening tag at a block start; False = wait."""
        stripped = self._buffer.lstrip()
        if not stripped:
            return False
        start = self.start_tag
        if len(stripped) < len(start) and start.startswith(stripped):
            return False  # may be the opening tag, arriving in pieces
        if stripped.startswith(start):
            self._buffer = stripped[len(start):]
            if not self._reasoning:
                self._reasoning = True
            self._drop_leading_ws = True  # still at a block start: strip again after the tag
            return False if not self._buffer else self._settle_block_start()
        if self._drop_leading_ws:
            self._buffer = stripped
        self._block_start = False
        return True

    def _switch(self) -> None:
        self._reasoning = not self._reasoning
        self._block_start = True
        self._drop_leading_ws = True


def detect_reasoning_tags(template_source: str | None) -> tuple[str, str] | None:
    """The tag pair a chat template uses for reasoning, found by its closing tag."""
    if not template_source:
        return None
    for start, end in REASONING_TAGS.values():
        if end in template_source:
            return start, end
    return None


def generation_opens_reasoning(prompt: str, tags: tuple[str, str]) -> bool:
    """True when the rendered prompt ends inside an opened reasoning block."""
    return prompt.rstrip().endswith(tags[0])
