"""An incremental JSON validator: fed one character at a time, it knows at each point whether
the text so far is a prefix of a valid JSON value, and when that value is complete.

This is what lets the tool parsers stream argument fragments as they arrive while guaranteeing
that everything streamed is the beginning of well-formed JSON.
"""

from __future__ import annotations

import re
from collections.abc import Callable

_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")
_NUMBER_PREFIX = re.compile(r"-?|-?(?:0|[1-9]\d*)(?:\.\d*|(?:\.\d+)?[eE][+-]?\d*)?")
_NUMBER_CHARS = frozenset("0123456789+-.eE")
_ESCAPES = frozenset('"\\/bfnrt')
_HEX = frozenset("0123456789abcdefABCDEF")
_WS = frozenset(" \t\n\r")
_LITERALS = {"t": "true", "f": "false", "n": "null"}


class JsonScanner:
    """feed(ch) -> True when `ch` extends a valid JSON prefix, False when it cannot.

    After a False, `done` tells whether the value was already complete before `ch` (a number
    ends only at the next character) or the text is malformed. `done` turns True as soon as the
    value's last character has been fed."""

    def __init__(self) -> None:
        self._stack: list[str] = []
        self._state = "value"
        self._token = ""  # number text, or the literal still expected
        self._hex_left = 0
        self._is_key = False
        self.done = False

    def feed(self, ch: str) -> bool:
        handler: Callable[[str], bool] = getattr(self, "_in_" + self._state)
        return handler(ch)

    def feed_text(self, text: str) -> int:
        """Feed characters until one is refused; returns how many were accepted."""
        for i, ch in enumerate(text):
            if not self.feed(ch):
                return i
        return len(text)

    # -- states ------------------------------------------------------------------------------
    def _in_value(self, ch: str) -> bool:
        if ch in _WS:
            return True
        if ch == "{":
            self._stack.append("{")
            self._state = "object_first"
        elif ch == "[":
            self._stack.append("[")
            self._state = "array_first"
        elif ch == '"':
            self._is_key, self._state = False, "string"
        elif ch == "-" or ch.isdigit() and ch.isascii():
            self._token, self._state = ch, "number"
        elif ch in _LITERALS:
            self._token, self._state = _LITERALS[ch][1:], "literal"
        else:
            return False
        return True

    def _in_object_first(self, ch: str) -> bool:
        if ch == "}":
            return self._close()
        return self._in_object_key(ch)

    def _in_object_key(self, ch: str) -> bool:
        if ch in _WS:
            return True
        if ch != '"':
            return False
        self._is_key, self._state = True, "string"
        return True

    def _in_colon(self, ch: str) -> bool:
        if ch in _WS:
            return True
        if ch != ":":
            return False
        self._state = "value"
        return True

    def _in_next(self, ch: str) -> bool:
        """After a member or element: a comma, or the container's closing bracket."""
        if ch in _WS:
            return True
        in_object = self._stack[-1] == "{"
        if ch == ",":
            self._state = "object_key" if in_object else "value"
            return True
        return ch == ("}" if in_object else "]") and self._close()

    def _in_array_first(self, ch: str) -> bool:
        if ch == "]":
            return self._close()
        return self._in_value(ch)

    def _in_string(self, ch: str) -> bool:
        if ch == '"':
            if self._is_key:
                self._state = "colon"
            else:
                self._value_done()
        elif ch == "\\":
            self._state = "escape"
        elif ord(ch) < 0x20:
            return False
        return True

    def _in_escape(self, ch: str) -> bool:
        if ch == "u":
            self._hex_left, self._state = 4, "hex"
            return True
        if ch not in _ESCAPES:
            return False
        self._state = "string"
        return True

    def _in_hex(self, ch: str) -> bool:
        if ch not in _HEX:
            return False
        self._hex_left -= 1
        if not self._hex_left:
            self._state = "string"
        return True

    def _in_number(self, ch: str) -> bool:
        if ch in _NUMBER_CHARS and _NUMBER_PREFIX.fullmatch(self._token + ch):
            self._token += ch
            return True
        if not _NUMBER.fullmatch(self._token):
            return False
        self._value_done()
        return False if self.done else self.feed(ch)

    def _in_literal(self, ch: str) -> bool:
        if ch != self._token[0]:
            return False
        self._token = self._token[1:]
        if not self._token:
            self._value_done()
        return True

    def _in_done(self, ch: str) -> bool:
        return False

    # -- transitions -------------------------------------------------------------------------
    def _close(self) -> bool:
        self._stack.pop()
        self._value_done()
        return True

    def _value_done(self) -> None:
        if self._stack:
            self._state = "next"
        else:
            self._state, self.done = "done", True
