"""Where a turn's tool calls end: the model has nothing new to call.

A small model under a grammar that allows several calls tends to go on calling, repeating a
call it already made until max_tokens cuts it off. CallGate sits around a choice's parser and
ends the turn at the first repeat: a complete call with the same name and the same arguments
(compared as JSON) as an earlier complete call of the turn is dropped, and so is everything
after it; `done` then tells the generation to stop that choice (finish_reason stop, which the
dialects report as a tool-call finish). With parallel calls off, the turn ends where a second
call starts.

A later call of a function already called is held back until it is complete (it may be a
repeat, which must never reach the client); any other call streams as it is parsed.

Under a forced call (`forced`: the grammar allows nothing but calls, and reasoning where the
model thinks first) output text can only be a call cut off before it could be read (a
pythonic `[get_weather(city="Pa` at max_tokens), so it is dropped: it is never content.
"""

from __future__ import annotations

import json
from typing import Any

from lmserve.chat.toolparsers import StreamParser
from lmserve.core.events import (
    CHANNEL_OUTPUT,
    ChatEvent,
    TextDelta,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
)


class CallGate:
    def __init__(self, inner: StreamParser, *, parallel: bool = True,
                 forced: bool = False) -> None:
        self.inner = inner
        self.parallel = parallel
        self.forced = forced
        self.done = False  # the turn is over: everything from here on is dropped
        self._names: dict[int, str] = {}  # a call's index -> its function
        self._made: dict[str, list[Any]] = {}  # name -> the arguments of its complete calls
        self._held: list[ChatEvent] = []  # a later call of an already-called function

    def feed(self, text: str) -> list[ChatEvent]:
        return self._gate(self.inner.feed(text)) if not self.done else []

    def finish(self) -> list[ChatEvent]:
        if self.done:
            return []
        events = self._gate(self.inner.finish())
        held, self._held = self._held, []  # a held call the output ended inside, incomplete
        return events + held if not self.done else events

    def _gate(self, events: list[ChatEvent]) -> list[ChatEvent]:
        out: list[ChatEvent] = []
        for event in events:
            if self.forced and isinstance(event, TextDelta) and event.channel == CHANNEL_OUTPUT:
                continue
            if isinstance(event, ToolCallStart):
                if not self.parallel and self._names:
                    self.done = True
                    break
                self._names[event.index] = event.name
                if event.name in self._made:
                    self._held = [event]
                    continue
            elif isinstance(event, (ToolCallDelta, ToolCallEnd)) and self._holds(event.index):
                self._held.append(event)
                if isinstance(event, ToolCallEnd):
                    if self._repeats(event):
                        self.done = True
                        break
                    out += self._held
                    self._held = []
                continue
            if isinstance(event, ToolCallEnd):
                self._repeats(event)
            out.append(event)
        return out

    def _holds(self, index: int) -> bool:
        return bool(self._held) and isinstance(self._held[0], ToolCallStart) \
            and self._held[0].index == index

    def _repeats(self, end: ToolCallEnd) -> bool:
        """Whether a call that just ended repeats an earlier one; a complete call that does not
        is remembered."""
        if not end.complete:
            return False
        name = self._names.get(end.index, "")
        arguments = _decoded(end.arguments)
        earlier = self._made.setdefault(name, [])
        if arguments in earlier:
            return True
        earlier.append(arguments)
        return False


def _decoded(arguments: str) -> Any:
    """Arguments compared by value: the same JSON with other spacing or key order repeats."""
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments
