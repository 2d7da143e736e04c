"""Calls written as Python: `[f(a=1), g(b="x")]` lists (Llama 3.2/4, Gemma 3 prompting),
fenced ```tool_code blocks, and the single call after Llama's `<|python_tag|>`.

Python arguments are not JSON text, so each call is emitted whole (start, all its arguments,
end) the moment its closing parenthesis arrives; the list itself still streams call by call.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

from lmserve.chat.toolparsers.base import (
    CallWriter,
    CharBody,
    DelimitedBody,
    Emitter,
    SuffixMatcher,
    ToolParser,
)

_NAME_PREFIX = re.compile(r"\s*(?:[A-Za-z_][\w.]*)?\s*\(?")
_JSON_NAMES = {"true": True, "false": False, "null": None}


class NotACall(ValueError):
    pass


def call_from_python(source: str) -> tuple[str, str]:
    """`name(k=v, ...)` -> (name, arguments JSON); keyword arguments with literal values only."""
    try:
        node = ast.parse(source.strip(), mode="eval").body
    except SyntaxError as exc:
        raise NotACall(str(exc)) from exc
    if isinstance(node, ast.Call) and _dotted(node.func) == "print" and len(node.args) == 1:
        node = node.args[0]  # tool_code blocks often wrap the call in print()
    if not isinstance(node, ast.Call) or node.args or any(k.arg is None for k in node.keywords):
        raise NotACall("not a call with keyword arguments")
    name = _dotted(node.func)
    if not name:
        raise NotACall("call target is not a name")
    arguments = {k.arg: _literal(k.value) for k in node.keywords}
    return name, json.dumps(arguments, ensure_ascii=False)


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _literal(node: ast.expr) -> Any:
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise NotACall("dict unpacking in arguments")
        pairs = zip(node.keys, node.values, strict=True)
        return {str(_literal(k)): _literal(v) for k, v in pairs}  # type: ignore[arg-type]
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        return [_literal(e) for e in node.elts]
    try:
        value = ast.literal_eval(node)
    except (ValueError, SyntaxError) as exc:
        raise NotACall("argument value is not a literal") from exc
    if isinstance(value, (bytes, complex)):
        raise NotACall("argument value has no JSON form")
    return value


class PyNesting:
    """Tracks brackets and string literals over Python source fed one character at a time."""

    def __init__(self) -> None:
        self.depth = 0
        self._quote = ""
        self._escaped = False

    @property
    def in_string(self) -> bool:
        return bool(self._quote)

    def feed(self, ch: str) -> None:
        if self._quote:
            if self._escaped:
                self._escaped = False
            elif ch == "\\":
                self._escaped = True
            elif ch == self._quote:
                self._quote = ""
        elif ch in "'\"":
            self._quote = ch
        elif ch in "([{":
            self.depth += 1
        elif ch in ")]}":
            self.depth -= 1


class PythonicListBody(CharBody):
    """`[call, call, ...]`: each call is emitted once its parentheses close."""

    def __init__(self, out: Emitter, prefix: str = "", suffix: str = "") -> None:
        self.out, self._prefix = out, prefix
        self._after = SuffixMatcher(suffix) if suffix else None
        self.made_call = False
        self._raw = ""
        self._element = ""
        self._nesting = PyNesting()
        self._state = "open"

    def _step(self, ch: str) -> bool:
        if self._state == "element":
            return self._in_element(ch)
        self._raw += ch
        if ch.isspace():
            return True
        if self._state == "open" and ch == "[":
            self._state = "element"
        elif self._state == "after" and ch in ",]":
            self._state = "element" if ch == "," else "suffix" if self._after else "done"
        else:
            self._raw = self._raw[:-1]
            return False
        return True

    def _in_element(self, ch: str) -> bool:
        nesting = self._nesting
        if nesting.depth == 0 and not nesting.in_string and "(" not in self._element:
            if not _NAME_PREFIX.fullmatch(self._element + ch):
                return False
        nesting.feed(ch)
        self._element += ch
        self._raw += ch
        if nesting.depth == 0 and ch == ")":
            return self._emit_element()
        return nesting.depth >= 0

    def _emit_element(self) -> bool:
        try:
            name, arguments = call_from_python(self._element)
        except NotACall:
            return False
        CallWriter(self.out).whole(name, arguments)
        self.made_call = True
        self._raw, self._element, self._state = "", "", "after"
        return True

    def _fall_back(self, rest: str) -> str:
        self.out.text((self._prefix if not self.made_call else "") + self._raw)
        self._raw, self._state = "", "done"
        return rest


class PyCallBody(PythonicListBody):
    """A single bare call after Llama's `<|python_tag|>`: `name(k=v)` or, for its built-in
    tools, `name.call(k=v)`."""

    def __init__(self, out: Emitter, prefix: str = "") -> None:
        super().__init__(out, prefix)
        self._state = "element"

    def _emit_element(self) -> bool:
        try:
            name, arguments = call_from_python(self._element)
        except NotACall:
            return False
        CallWriter(self.out).whole(name.removesuffix(".call"), arguments)
        self.made_call = True
        self._raw, self._element, self._state = "", "", "done"
        return True


def tool_code_calls(source: str) -> list[tuple[str, str]]:
    """The calls in a ```tool_code block, one per statement."""
    return [call_from_python(ast.unparse(stmt)) for stmt in _statements(source)]


def _statements(source: str) -> list[ast.stmt]:
    try:
        body = ast.parse(source.strip("\n")).body
    except SyntaxError as exc:
        raise NotACall(str(exc)) from exc
    if not all(isinstance(s, ast.Expr) for s in body):
        raise NotACall("tool_code holds more than calls")
    return body


class PythonicParser(ToolParser):
    """The whole message is a list of calls; Llama 4 may wrap it in python_start/end tags."""

    markers = ("<|python_start|>",)
    bare_openers = "["

    def open_body(self, opener: str) -> PythonicListBody:
        if opener == "[":
            return PythonicListBody(self.out)
        return PythonicListBody(self.out, opener, suffix="<|python_end|>")


class ToolCodeParser(ToolParser):
    markers = ("```tool_code",)

    def open_body(self, opener: str) -> DelimitedBody:
        return DelimitedBody(self.out, opener, "```", tool_code_calls)
