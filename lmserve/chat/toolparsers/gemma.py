"""FunctionGemma (Gemma 3 270M tuned for tools): calls written as
`<start_function_call>call:name{key:<escape>text<escape>,n:3}<end_function_call>`.

Strings are fenced by `<escape>` tokens instead of quotes, keys are bare, and the rest (numbers,
booleans, nested `{}` and `[]`) reads like JSON. Each call is converted to JSON and emitted
whole when its end marker arrives. Plain Gemma 3 has no tool tokens; prompted to call tools it
writes Python-style lists (the pythonic parser) or ```tool_code blocks (ToolCodeParser).
"""

from __future__ import annotations

import json
import re
from typing import Any

from lmserve.chat.toolparsers.base import DelimitedBody, ToolParser

START = "<start_function_call>"
END = "<end_function_call>"
ESCAPE = "<escape>"
_NAME = re.compile(r"\s*call:([\w.\-]+)\s*")
_KEY = re.compile(r"\s*([\w.\-]+)\s*:\s*")
_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")
_LITERALS = {"true": True, "false": False, "null": None}


class NotACall(ValueError):
    pass


def parse_function_gemma(source: str) -> tuple[str, dict[str, Any]]:
    """`call:name{...}` -> (name, arguments)."""
    match = _NAME.match(source)
    if not match:
        raise NotACall("expected call:NAME")
    reader = _Reader(source, match.end())
    arguments = reader.object()
    if source[reader.pos:].strip():
        raise NotACall("text after the arguments")
    return match.group(1), arguments


class _Reader:
    def __init__(self, text: str, pos: int) -> None:
        self.text, self.pos = text, pos

    def object(self) -> dict[str, Any]:
        self._expect("{")
        result: dict[str, Any] = {}
        if self._take("}"):
            return result
        while True:
            key = self._key()
            result[key] = self.value()
            if self._take("}"):
                return result
            self._expect(",")

    def value(self) -> Any:
        self._skip_space()
        text, pos = self.text, self.pos
        if text.startswith(ESCAPE, pos):
            end = text.find(ESCAPE, pos + len(ESCAPE))
            if end < 0:
                raise NotACall("unterminated <escape> string")
            self.pos = end + len(ESCAPE)
            return text[pos + len(ESCAPE):end]
        if text.startswith("{", pos):
            return self.object()
        if text.startswith("[", pos):
            return self._array()
        for word, value in _LITERALS.items():
            if text.startswith(word, pos):
                self.pos += len(word)
                return value
        number = _NUMBER.match(text, pos)
        if not number:
            raise NotACall(f"unexpected value at {pos}")
        self.pos = number.end()
        return json.loads(number.group())

    def _array(self) -> list[Any]:
        self._expect("[")
        items: list[Any] = []
        if self._take("]"):
            return items
        while True:
            items.append(self.value())
            if self._take("]"):
                return items
            self._expect(",")

    def _key(self) -> str:
        self._skip_space()
        if self.text.startswith(ESCAPE, self.pos):
            key = self.value()
            self._expect(":")
            return str(key)
        match = _KEY.match(self.text, self.pos)
        if not match:
            raise NotACall(f"expected a key at {self.pos}")
        self.pos = match.end()
        return match.group(1)

    def _skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def _take(self, token: str) -> bool:
        self._skip_space()
        if self.text.startswith(token, self.pos):
            self.pos += len(token)
            return True
        return False

    def _expect(self, token: str) -> None:
        if not self._take(token):
            raise NotACall(f"expected {token!r} at {self.pos}")


def function_gemma_calls(source: str) -> list[tuple[str, str]]:
    name, arguments = parse_function_gemma(source)
    return [(name, json.dumps(arguments, ensure_ascii=False))]


class FunctionGemmaParser(ToolParser):
    markers = (START,)

    def open_body(self, opener: str) -> DelimitedBody:
        return DelimitedBody(self.out, opener, END, function_gemma_calls)
