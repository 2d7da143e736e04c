"""The frame every streaming tool-call parser shares.

A parser is in text mode until it meets what opens a call: a marker (`<tool_call>`,
`[TOOL_CALLS]`, ...) or, for formats whose calls are the whole message, a bare opening
character at the start of the message. It then hands the text to a *body*, a small parser for
that one call format, until the body says the call is over and returns the text after it.

A body that finds its text is not a call after all puts everything it consumed back on the
output channel and returns the rest, so no text is ever lost. Whitespace around calls is
layout and is dropped.
"""

from __future__ import annotations

import secrets
import string
from collections.abc import Callable
from typing import Protocol

from lmserve.chat.textscan import find_marker, partial_marker_len, push_text
from lmserve.chat.toolparsers.jsonscan import JsonScanner
from lmserve.core.events import (
    CHANNEL_OUTPUT,
    ChatEvent,
    TextDelta,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
)

_ID_ALPHABET = string.ascii_letters + string.digits


def new_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


class Emitter:
    """Collects the events of one feed/finish and numbers calls across the whole turn."""

    def __init__(self) -> None:
        self.events: list[ChatEvent] = []
        self.calls = 0

    def text(self, text: str) -> None:
        push_text(self.events, CHANNEL_OUTPUT, text)

    def start(self, name: str) -> int:
        index = self.calls
        self.calls += 1
        self.events.append(ToolCallStart(index, new_call_id(), name))
        return index

    def delta(self, index: int, fragment: str) -> None:
        if not fragment:
            return
        last = self.events[-1] if self.events else None
        if isinstance(last, ToolCallDelta) and last.index == index:
            self.events[-1] = ToolCallDelta(index, last.arguments + fragment)
        else:
            self.events.append(ToolCallDelta(index, fragment))

    def end(self, index: int, arguments: str, complete: bool) -> None:
        self.events.append(ToolCallEnd(index, arguments, complete))

    def take(self) -> list[ChatEvent]:
        events, self.events = self.events, []
        return events


class CallWriter:
    """One call's events: Start once the name is known (fragments seen before it wait), then
    argument fragments, then End with exactly their concatenation."""

    def __init__(self, out: Emitter) -> None:
        self.out = out
        self.index: int | None = None
        self.arguments = ""
        self.ended = False
        self._waiting = ""

    @property
    def started(self) -> bool:
        return self.index is not None

    def start(self, name: str) -> None:
        self.index = self.out.start(name)
        waiting, self._waiting = self._waiting, ""
        self.add(waiting)

    def add(self, fragment: str) -> None:
        if self.index is None:
            self._waiting += fragment
        else:
            self.arguments += fragment
            self.out.delta(self.index, fragment)

    def end(self, complete: bool = True) -> None:
        assert self.index is not None, "a call ends only after it started"
        if complete and not self.arguments:
            self.add("{}")
        self.ended = True
        self.out.end(self.index, self.arguments, complete)

    def whole(self, name: str, arguments: str) -> None:
        self.start(name)
        self.add(arguments)
        self.end()


class SuffixMatcher:
    """After a call: optional whitespace and an optional closing marker, consumed if present."""

    def __init__(self, suffix: str) -> None:
        self.suffix = suffix
        self._held = ""

    def feed(self, text: str) -> str | None:
        """None while what arrived could still be the marker, else the text after it."""
        held = self._held + text
        head = held.lstrip()
        if head.startswith(self.suffix):
            return head[len(self.suffix):]
        if len(head) < len(self.suffix) and self.suffix.startswith(head):
            self._held = held
            return None
        return held


class Body(Protocol):
    """The parser of one call (or one run of calls) after its opening."""

    made_call: bool  # False when the body fell back to text

    def feed(self, text: str) -> str | None:
        """Consume text; None while the body goes on, else the unconsumed rest."""

    def finish(self) -> None:
        """The output ended inside the body: close or fall back."""


class CharBody:
    """A body read one character at a time. `_step(ch)` returns False when the text is not
    (or no longer) a call, and `_fall_back(rest)` then puts consumed text back on the output.
    A state listed by `_handover` takes all the remaining text at once (a suffix marker,
    streamed arguments); the state "done" ends the body."""

    made_call = False
    _state = ""
    _after: SuffixMatcher | None = None

    def feed(self, text: str) -> str | None:
        for i, ch in enumerate(text):
            take_rest = self._handover()
            if take_rest is not None:
                return take_rest(text[i:])
            if not self._step(ch):
                return self._fall_back(text[i:])
            if self._state == "done":
                return text[i + 1:]
        return None

    def finish(self) -> None:
        if self._state not in ("done", "suffix"):
            self._fall_back("")

    def _handover(self) -> Callable[[str], str | None] | None:
        return self._match_suffix if self._state == "suffix" else None

    def _match_suffix(self, text: str) -> str | None:
        assert self._after is not None
        rest = self._after.feed(text)
        if rest is not None:
            self._state = "done"
        return rest

    def _step(self, ch: str) -> bool:
        raise NotImplementedError

    def _fall_back(self, rest: str) -> str:
        raise NotImplementedError


class BufferedParser:
    """feed() appends to a buffer and lets `_advance` consume it until it needs more text."""

    out: Emitter
    _buffer = ""

    def feed(self, text: str) -> list[ChatEvent]:
        self._buffer += text
        while self._advance():
            pass
        return self.out.take()

    def _advance(self) -> bool:
        raise NotImplementedError


class ToolParser(BufferedParser):
    """feed(text) -> events, finish() -> events. Subclasses name their markers and bodies."""

    markers: tuple[str, ...] = ()
    bare_openers: str = ""  # characters that open a call at the start of the message
    separators: str = ""  # besides whitespace, skipped between consecutive calls

    def __init__(self) -> None:
        self.out = Emitter()
        self._buffer = ""
        self._body: Body | None = None
        self._call_position = bool(self.bare_openers)  # a bare call may start here
        self._after_call = False
        self._marker_opened = False  # the open body began at a marker (not a bare opener)

    def open_body(self, opener: str) -> Body:
        raise NotImplementedError

    def finish(self) -> list[ChatEvent]:
        """The output ended. A marker it ended inside or on (`<tool`, `<tool_call>` and what
        followed without making a call) is a call cut off, not text: it never reaches the
        output channel. A call opened by a bare character (a JSON answer) is text again."""
        if self._body is not None:
            self._finish_body(self._body)
        elif not (self._after_call and not self._buffer.strip()):
            keep = partial_marker_len(self._buffer, self.markers)
            self.out.text(self._buffer[:len(self._buffer) - keep].rstrip() if keep
                          else self._buffer)
        self._body, self._buffer = None, ""
        return self.out.take()

    def _finish_body(self, body: Body) -> None:
        events, self.out.events = self.out.events, []
        body.finish()
        tail, self.out.events = self.out.events, events
        if body.made_call or not self._marker_opened:
            for event in tail:
                if isinstance(event, TextDelta):
                    self.out.text(event.text)
                else:
                    self.out.events.append(event)

    def _advance(self) -> bool:
        if self._body is not None:
            rest = self._body.feed(self._buffer)
            if rest is None:
                self._buffer = ""
                return False
            made_call = self._body.made_call
            self._body, self._buffer = None, rest
            self._after_call = made_call
            self._call_position = made_call and bool(self.bare_openers)
            return True
        return self._scan_text()

    def _scan_text(self) -> bool:
        buf = self._buffer
        if self._after_call:
            buf = buf.lstrip(" \t\r\n" + self.separators)
            if not buf:
                self._buffer = ""
                return False
            self._buffer, self._after_call = buf, False
        if self._call_position:
            head = buf.lstrip()
            if not head:
                return False
            self._call_position = False
            if head[0] in self.bare_openers:
                self._body, self._buffer = self.open_body(head[0]), head
                self._marker_opened = False
                return True
        found = find_marker(buf, self.markers)
        if found is not None:
            pos, marker = found
            self.out.text(buf[:pos].rstrip())
            self._body, self._buffer = self.open_body(marker), buf[pos + len(marker):]
            self._marker_opened = True
            return True
        keep = partial_marker_len(buf, self.markers)
        ready = buf[:len(buf) - keep].rstrip()  # trailing whitespace may precede a call
        self.out.text(ready)
        self._buffer = buf[len(ready):]
        return False


class DeferredBody:
    """Waits for the first character after the opener, then hands over to the body that
    `choose(first_char, prefix)` selects; None from `choose` means the opener was not a call."""

    def __init__(self, out: Emitter, prefix: str, choose: Chooser) -> None:
        self.out, self._prefix, self._choose = out, prefix, choose
        self._inner: Body | None = None
        self._held = ""
        self.made_call = False

    def feed(self, text: str) -> str | None:
        if self._inner is None:
            held = self._held + text
            head = held.lstrip()
            if not head:
                self._held = held
                return None
            self._inner = self._choose(head[0], self._prefix + held[:len(held) - len(head)])
            if self._inner is None:
                self.out.text(self._prefix)
                return held
            text = head
        rest = self._inner.feed(text)
        self.made_call = self._inner.made_call
        return rest

    def finish(self) -> None:
        if self._inner is None:
            self.out.text(self._prefix + self._held)
            return
        self._inner.finish()
        self.made_call = self._inner.made_call


class Chooser(Protocol):
    def __call__(self, first: str, prefix: str) -> Body | None: ...


def stream_json(call: CallWriter, scanner: JsonScanner, text: str) -> int | None:
    """Feed `text` to `scanner`, passing accepted characters to the call as argument fragments.

    Returns None when everything was accepted and the value is still open, else how many
    characters were consumed (the value completed, or the next one was refused: see
    scanner.done)."""
    accepted = scanner.feed_text(text)
    call.add(text[:accepted])
    if accepted < len(text) or scanner.done:
        return accepted
    return None


class DelimitedBody:
    """Collects the text up to a closing marker, then turns it into calls all at once.

    `convert` returns (name, arguments JSON) pairs, or raises ValueError when the text is not
    calls, which then goes back to the output channel with its markers."""

    def __init__(self, out: Emitter, prefix: str, end: str,
                 convert: Callable[[str], list[tuple[str, str]]]) -> None:
        self.out, self._prefix, self._end, self._convert = out, prefix, end, convert
        self._source = ""
        self.made_call = False

    def feed(self, text: str) -> str | None:
        self._source += text
        end = self._source.find(self._end)
        if end < 0:
            return None
        rest = self._source[end + len(self._end):]
        self._source = self._source[:end]
        self._emit(closed=True)
        return rest

    def finish(self) -> None:
        self._emit(closed=False)

    def _emit(self, closed: bool) -> None:
        try:
            calls = self._convert(self._source)
        except ValueError:
            calls = []
        if not calls:
            self.out.text(self._prefix + self._source + (self._end if closed else ""))
            return
        for name, arguments in calls:
            CallWriter(self.out).whole(name, arguments)
        self.made_call = True
