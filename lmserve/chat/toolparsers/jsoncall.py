"""A call written as a JSON object, `{"name": "f", "arguments": {...}}`, parsed as it streams.

The call starts as soon as its name is known; the arguments object is streamed as fragments of
the model's own text, each one checked to extend valid JSON, and the call ends the moment the
arguments are complete. Used by the Hermes/Qwen, Llama 3 and old Mistral formats.
"""

from __future__ import annotations

import json

from lmserve.chat.toolparsers.base import CallWriter, CharBody, Emitter, SuffixMatcher
from lmserve.chat.toolparsers.jsonscan import JsonScanner

NAME_KEYS = frozenset({"name"})
ARGUMENT_KEYS = frozenset({"arguments", "parameters"})
# Keys a bare JSON message may have and still be a call (else it is an ordinary JSON answer).
CALL_KEYS = NAME_KEYS | ARGUMENT_KEYS | {"type"}
_WS = " \t\r\n"


class _Fail(Exception):
    pass


class JsonCallBody(CharBody):
    """Body for one JSON call object, optionally followed by a closing marker (`suffix`).

    `prefix` is the text that opened the call; with the consumed text it becomes output again
    if this turns out not to be a call. `strict`: every key must be a known call key."""

    def __init__(self, out: Emitter, *, prefix: str = "", suffix: str = "",
                 strict: bool = False) -> None:
        self.out = out
        self.call = CallWriter(out)
        self.made_call = False
        self._prefix, self._strict = prefix, strict
        self._raw = ""  # consumed text not yet accounted for by events
        self._state = "open"
        self._key = ""
        self._scanner = JsonScanner()
        self._value = ""
        self._name: str | None = None
        self._args_seen = False
        self._args_done = False
        self._args_valid = True
        self._after = SuffixMatcher(suffix) if suffix else None

    def _step(self, ch: str) -> bool:
        mark = len(self._raw)
        try:
            self._consume(ch)
        except _Fail:
            self._raw = self._raw[:mark]
            return False
        return True

    # -- character steps ---------------------------------------------------------------------
    def _consume(self, ch: str) -> None:
        state = self._state
        if state == "value":
            self._in_value(ch)
            return
        self._raw += ch
        if ch in _WS and state != "key":
            return
        if state == "open":
            self._expect(ch == "{", "key_or_end")
        elif state in ("key_or_end", "next"):
            if ch == "}":
                self._close_object()
            elif state == "next":
                self._expect(ch == ",", "key_start")
            else:
                self._begin_key(ch)
        elif state == "key_start":
            self._begin_key(ch)
        elif state == "key":
            self._in_key(ch)
        elif state == "colon":
            self._expect(ch == ":", "value_start")
        elif state == "value_start":
            self._begin_value(ch)

    def _expect(self, ok: bool, next_state: str) -> None:
        if not ok:
            raise _Fail
        self._state = next_state

    def _begin_key(self, ch: str) -> None:
        self._expect(ch == '"', "key")
        self._scanner, self._key = JsonScanner(), ""
        self._scanner.feed(ch)
        self._value = ch

    def _in_key(self, ch: str) -> None:
        if not self._scanner.feed(ch):
            raise _Fail
        self._value += ch
        if self._scanner.done:
            self._key = json.loads(self._value)
            repeated = (self._key in NAME_KEYS and self._name is not None
                        or self._key in ARGUMENT_KEYS and self._args_done)
            if repeated or self._strict and self._key not in CALL_KEYS:
                raise _Fail
            if self._key in ARGUMENT_KEYS:
                self._args_seen = True
                if self._name is not None and not self.call.started:
                    self._start_call()
            self._state = "colon"

    def _begin_value(self, ch: str) -> None:
        self._raw = self._raw[:-1]  # the value's own characters are accounted in _in_value
        self._scanner, self._value, self._state = JsonScanner(), "", "value"
        self._in_value(ch)

    def _in_value(self, ch: str) -> None:
        streaming = self._key in ARGUMENT_KEYS and (self._value or ch)[:1] == "{"
        if not self._scanner.feed(ch):
            if not self._scanner.done:
                raise _Fail
            self._value_complete()
            self._consume(ch)
            return
        self._value += ch
        if streaming:
            self.call.add(ch)
            if not self.call.started:
                self._raw += ch
        else:
            self._raw += ch
        if self._scanner.done:
            self._value_complete()

    def _value_complete(self) -> None:
        self._state = "next"
        if self._key in NAME_KEYS:
            self._take_name()
        elif self._key in ARGUMENT_KEYS:
            self._take_arguments()

    def _take_name(self) -> None:
        name = json.loads(self._value)
        if not isinstance(name, str) or not name:
            raise _Fail
        self._name = name
        if self._strict and not self._args_seen:
            return  # a bare JSON answer may have a "name" too: wait for the arguments key
        self._start_call()
        if self._args_done:
            self._end_call()

    def _start_call(self) -> None:
        assert self._name is not None
        self.call.start(self._name)
        self._raw = ""

    def _take_arguments(self) -> None:
        if not self._value.startswith("{"):
            arguments, self._args_valid = _arguments_from_value(self._value)
            self.call.add(arguments)
        self._args_done = True
        if self.call.started:
            self._end_call()

    def _end_call(self) -> None:
        self.call.end(complete=self._args_valid)
        self.made_call = True
        self._raw = ""

    def _close_object(self) -> None:
        if self._name is None or self._strict and not self._args_seen:
            raise _Fail
        if not self.call.started:
            self._start_call()
        if not self.call.ended:
            self._end_call()
        self._raw = ""
        self._state = "suffix" if self._after else "done"

    # -- after the object ----------------------------------------------------------------------
    def _fall_back(self, rest: str) -> str:
        """Everything consumed and not yet in an event goes back to the output channel; a call
        that started and broke off ends incomplete."""
        if not self.call.started:
            self.out.text(self._prefix + self._raw)
        elif not self.call.ended:  # the text consumed since the start belongs to the call
            self.call.end(complete=False)
            self.made_call = True
        else:
            self.out.text(self._raw)
        self._raw, self._state = "", "done"
        return rest


def _arguments_from_value(value: str) -> tuple[str, bool]:
    """Arguments given as something other than an object: a JSON string holding an object, or
    null for none. Anything else is kept as the arguments text but marks the call incomplete."""
    decoded = json.loads(value)
    if decoded is None:
        return "{}", True
    if isinstance(decoded, str):
        try:
            return decoded, isinstance(json.loads(decoded), dict)
        except json.JSONDecodeError:
            return decoded, False
    return value, False
