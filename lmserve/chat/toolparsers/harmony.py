"""gpt-oss harmony: the output is a run of messages, each a header then content:

    <|channel|>analysis<|message|>thinking...<|end|>
    <|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json
        <|message|>{"city":"Paris"}<|call|>          (one line in the real output)
    <|start|>assistant<|channel|>final<|message|>The answer.<|return|>

The analysis channel is reasoning, final (and commentary addressed to no one, a preamble) is
output, and a message addressed `to=functions.NAME` is a call whose content is its arguments.
Only a recipient makes a call, so call-like text inside reasoning is never a call. This parser
does both jobs, reasoning and tools, and needs the special tokens rendered in the text.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from lmserve.chat.textscan import find_marker, partial_marker_len, push_text
from lmserve.chat.toolparsers.base import BufferedParser, CallWriter, Emitter, stream_json
from lmserve.chat.toolparsers.jsonscan import JsonScanner
from lmserve.core.events import CHANNEL_OUTPUT, CHANNEL_REASONING, ChatEvent

MESSAGE = "<|message|>"
START = "<|start|>"
ENDS = ("<|end|>", "<|call|>", "<|return|>")
_CONTENT_ENDS = (*ENDS, START)
_CHANNEL = re.compile(r"<\|channel\|>\s*([\w.\-]+)")
_RECIPIENT = re.compile(r"\bto=([^\s<]+)")
_MAX_HEADER = 512  # longer than any real header: the text is not harmony after all


class HarmonyParser(BufferedParser):
    """feed(text) -> events, finish() -> events."""

    def __init__(self, *, reasoning_channel: str = CHANNEL_REASONING) -> None:
        self.out = Emitter()
        self._reasoning_channel = reasoning_channel
        self._buffer = ""
        self._state = "header"  # header | text | call | after_call | plain
        self._channel = CHANNEL_OUTPUT
        self._call: CallWriter | None = None
        self._scanner = JsonScanner()

    def finish(self) -> list[ChatEvent]:
        buf, self._buffer = self._buffer, ""
        if self._state == "header":
            if "<|" not in buf:
                self._text(CHANNEL_OUTPUT, buf)
        elif self._state == "call":
            self._end_call(complete=False)
        elif self._state in ("text", "plain"):
            self._text(self._channel, buf)
        else:  # after_call
            self._text(CHANNEL_OUTPUT, buf.strip())
        return self.out.take()

    def _text(self, channel: str, text: str) -> None:
        push_text(self.out.events, channel, text)

    def _advance(self) -> bool:
        step: Callable[[], bool] = getattr(self, "_in_" + self._state)
        return step()

    def _in_header(self) -> bool:
        pos = self._buffer.find(MESSAGE)
        if pos < 0:
            if len(self._buffer) > _MAX_HEADER:
                self._state, self._channel = "plain", CHANNEL_OUTPUT
                return True
            return False
        self._open_message(self._buffer[:pos])
        self._buffer = self._buffer[pos + len(MESSAGE):]
        return True

    def _open_message(self, header: str) -> None:
        recipient = _RECIPIENT.search(header)
        channel = _CHANNEL.search(header)
        if recipient:
            self._call = CallWriter(self.out)
            self._call.start(recipient.group(1).removeprefix("functions."))
            self._scanner, self._state = JsonScanner(), "call"
            return
        is_analysis = channel is not None and channel.group(1) == "analysis"
        self._channel = self._reasoning_channel if is_analysis else CHANNEL_OUTPUT
        self._state = "text"

    def _in_text(self) -> bool:
        buf = self._buffer
        found = find_marker(buf, _CONTENT_ENDS)
        if found is None:
            keep = partial_marker_len(buf, _CONTENT_ENDS)
            self._text(self._channel, buf[:len(buf) - keep])
            self._buffer = buf[len(buf) - keep:]
            return False
        pos, marker = found
        self._text(self._channel, buf[:pos])
        self._buffer = buf[pos + (0 if marker == START else len(marker)):]
        self._state = "header"
        return True

    def _in_call(self) -> bool:
        assert self._call is not None
        buf = self._buffer
        if not self._call.arguments:
            buf = buf.lstrip()
        used = stream_json(self._call, self._scanner, buf)
        if used is None:
            self._buffer = ""
            return False
        self._buffer = buf[used:]
        self._end_call(complete=self._scanner.done)
        self._state, self._channel = ("after_call", CHANNEL_OUTPUT) if self._scanner.done else (
            "text", CHANNEL_OUTPUT)
        return True

    def _end_call(self, complete: bool) -> None:
        if self._call is not None and not self._call.ended:
            self._call.end(complete=complete)

    def _in_after_call(self) -> bool:
        buf = self._buffer.lstrip()
        found = find_marker(buf, _CONTENT_ENDS)
        if found is not None and found[0] == 0:
            marker = found[1]
            self._buffer, self._state = buf[0 if marker == START else len(marker):], "header"
            return True
        if not buf or partial_marker_len(buf, _CONTENT_ENDS) == len(buf):
            self._buffer = buf
            return False
        self._buffer, self._state = buf, "text"  # stray text after the arguments
        return True

    def _in_plain(self) -> bool:
        self._text(CHANNEL_OUTPUT, self._buffer)
        self._buffer = ""
        return False
