"""Formats whose arguments are JSON: Hermes/Qwen, Llama 3 and Mistral."""

from __future__ import annotations

import re
from collections.abc import Callable

from lmserve.chat.toolparsers.base import (
    Body,
    CallWriter,
    CharBody,
    DeferredBody,
    Emitter,
    ToolParser,
    stream_json,
)
from lmserve.chat.toolparsers.jsoncall import JsonCallBody
from lmserve.chat.toolparsers.jsonscan import JsonScanner
from lmserve.chat.toolparsers.pythonic import PyCallBody


class HermesParser(ToolParser):
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number per turn."""

    markers = ("<tool_call>",)

    def open_body(self, opener: str) -> Body:
        return JsonCallBody(self.out, prefix=opener, suffix="</tool_call>")


class Llama3JsonParser(ToolParser):
    """Llama 3.x: the message is `{"name": ..., "parameters": {...}}` (several joined by `;`),
    or `<|python_tag|>` followed by such JSON or by a Python-style call."""

    markers = ("<|python_tag|>",)
    bare_openers = "{"
    separators = ";"

    def open_body(self, opener: str) -> Body:
        if opener == "{":
            return JsonCallBody(self.out, strict=True)
        return DeferredBody(self.out, opener, self._after_python_tag)

    def _after_python_tag(self, first: str, prefix: str) -> Body:
        if first == "{":
            return JsonCallBody(self.out, prefix=prefix)
        return PyCallBody(self.out, prefix)


class MistralParser(ToolParser):
    """`[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (v0.3 and older) or
    `[TOOL_CALLS]name[ARGS]{...}` (v11 tokenizers and later, optionally with `[CALL_ID]id`)."""

    markers = ("[TOOL_CALLS]",)

    def open_body(self, opener: str) -> Body:
        return DeferredBody(self.out, opener, self._choose)

    def _choose(self, first: str, prefix: str) -> Body:
        if first == "[":
            return MistralListBody(self.out, prefix)
        return MistralNamedBody(self.out, prefix)


class MistralListBody:
    """`[call, call, ...]` of JSON call objects."""

    def __init__(self, out: Emitter, prefix: str) -> None:
        self.out, self._prefix = out, prefix
        self.made_call = False
        self._element: JsonCallBody | None = None
        self._raw = ""
        self._state = "open"

    def feed(self, text: str) -> str | None:
        while text:
            if self._element is not None:
                rest = self._element.feed(text)
                if rest is None:
                    return None
                if not self._element.made_call:
                    return self._done(rest)
                self.made_call, self._element, text = True, None, rest
                continue
            ch, text = text[0], text[1:]
            if ch.isspace():
                self._raw += ch
            elif self._state == "open" and ch == "[" or self._state == "next" and ch == ",":
                self._raw += ch
                self._element = JsonCallBody(self.out, prefix=self._pending_text())
                self._state = "next"
            elif self._state == "next" and ch == "]":
                return self._done(text)
            else:
                self.out.text(self._pending_text())
                return self._done(ch + text)
        return None

    def finish(self) -> None:
        if self._element is not None:
            self._element.finish()
        else:
            self.out.text(self._pending_text())

    def _pending_text(self) -> str:
        text = ("" if self.made_call else self._prefix) + self._raw
        self._raw = ""
        return text

    def _done(self, rest: str) -> str:
        self._state = "done"
        return rest


_NAME_CHAR = re.compile(r"[\w.\-]")


class MistralNamedBody(CharBody):
    """`name[ARGS]{...}`, `name[CALL_ID]id[ARGS]{...}` or `name{...}`."""

    def __init__(self, out: Emitter, prefix: str) -> None:
        self.out, self._prefix = out, prefix
        self.call = CallWriter(out)
        self.made_call = False
        self._raw = ""
        self._name = ""
        self._tag = ""
        self._state = "name"
        self._scanner = JsonScanner()

    def _handover(self) -> Callable[[str], str | None] | None:
        return self._feed_arguments if self._state == "args" else None

    def _step(self, ch: str) -> bool:
        state = self._state
        if ch == "{" and self._name and state in ("name", "args_start"):
            self._open_arguments()
            return self._feed_arguments(ch) is None
        if state == "name" and _NAME_CHAR.fullmatch(ch):
            self._name += ch
        elif state in ("name", "call_id") and ch == "[" and self._name:
            self._state, self._tag = "tag", ch
        elif state == "tag":
            if not self._in_tag(ch):
                return False
        elif state != "call_id" and not (state == "args_start" and ch.isspace()):
            return False  # (a call_id is the model's own; lmserve assigns ids itself)
        self._raw += ch
        return True

    def _in_tag(self, ch: str) -> bool:
        self._tag += ch
        if ch != "]":
            return ch.isalpha() or ch == "_"
        if self._tag not in ("[CALL_ID]", "[ARGS]"):
            return False
        self._state = "call_id" if self._tag == "[CALL_ID]" else "args_start"
        return True

    def _open_arguments(self) -> None:
        self.call.start(self._name)
        self.made_call = True
        self._raw, self._state = "", "args"

    def _feed_arguments(self, text: str) -> str | None:
        used = stream_json(self.call, self._scanner, text)
        if used is None:
            return None
        if not self._scanner.done:
            return self._fall_back(text[used:])
        self.call.end()
        self._state = "done"
        return text[used:]

    def _fall_back(self, rest: str) -> str:
        if self.call.started:
            if not self.call.ended:
                self.call.end(complete=False)
        else:
            self.out.text(self._prefix + self._raw)
        self._state = "done"
        return rest
