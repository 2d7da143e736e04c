"""GBNF building blocks: literals, character classes, a rule set, and a syntax check.

GBNF facts this module relies on (llama.cpp's grammar parser): rule names use only letters,
digits and `-`; a rule ends at a newline unless inside parentheses or right after `|`;
literal and class escapes are \\x.. \\u.... \\U........ \\t \\r \\n \\\\ \\" \\[ \\] \\-;
repetition is `*`, `+`, `?`, `{m}`, `{m,}` or `{m,n}`; left recursion is refused.
"""

from __future__ import annotations

import re

__all__ = ["GrammarError", "RuleSet", "char_class", "literal", "repeat", "text_without"]


class GrammarError(ValueError):
    """A grammar could not be built or is not valid GBNF; the message says what and where."""


_LITERAL_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_CLASS_ESCAPES = {"\\": "\\\\", "]": "\\]", "[": "\\[", "-": "\\-", "^": "\\x5E",
                  "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(ch: str, table: dict[str, str]) -> str:
    if ch in table:
        return table[ch]
    if ord(ch) < 0x20 or ord(ch) == 0x7F:
        return f"\\x{ord(ch):02X}"
    return ch


def literal(text: str) -> str:
    """A GBNF string literal that matches `text` exactly."""
    return '"' + "".join(_escape(ch, _LITERAL_ESCAPES) for ch in text) + '"'


def char_class(ranges: list[tuple[str, str]], negated: bool = False) -> str:
    """`[...]` from (first, last) character ranges."""
    parts = []
    for first, last in ranges:
        parts.append(_escape(first, _CLASS_ESCAPES) if first == last else
                     f"{_escape(first, _CLASS_ESCAPES)}-{_escape(last, _CLASS_ESCAPES)}")
    return "[" + ("^" if negated else "") + "".join(parts) + "]"


def text_without(tag: str) -> str:
    """Text (any length, empty too) in which `tag` never occurs: each piece is a proper prefix
    of the tag followed by a character that neither continues it nor starts it again."""
    pieces = []
    for k in range(len(tag)):
        stop = {tag[k], tag[0]}
        prefix = literal(tag[:k]) + " " if k else ""
        pieces.append(prefix + char_class([(c, c) for c in sorted(stop)], negated=True))
    return "(" + " | ".join(pieces) + ")*"


def repeat(expr: str, low: int, high: int | None) -> str:
    """`expr` repeated low..high times (high None = unbounded); "" when high is 0."""
    if (low, high) == (1, 1):
        return expr
    if high == 0:
        return ""
    suffix = {(0, None): "*", (1, None): "+", (0, 1): "?"}.get((low, high))
    if suffix is None:
        suffix = f"{{{low}}}" if low == high else f"{{{low},{'' if high is None else high}}}"
    return f"{expr}{suffix}"


_FIXED_PREFIXES = ("json-", "fmt-")


class RuleSet:
    """Named rules for one grammar; identical bodies share one rule."""

    def __init__(self) -> None:
        self._rules: dict[str, str | None] = {}
        self._by_body: dict[str, str] = {}

    def add(self, hint: str, body: str) -> str:
        """Define a rule (or reuse an identical one) and return its name."""
        if body in self._by_body:
            return self._by_body[body]
        name = self.reserve(hint)
        self.define(name, body)
        return name

    def reserve(self, hint: str) -> str:
        """A fresh name whose body comes later (for recursive definitions)."""
        base = re.sub(r"[^A-Za-z0-9-]+", "-", hint).strip("-") or "r"
        if base == "ws" or base.startswith(_FIXED_PREFIXES):
            base = "x-" + base  # keep clear of the fixed names given to ensure()
        name, n = base, 1
        while name in self._rules or name == "root":
            n += 1
            name = f"{base}-{n}"
        self._rules[name] = None
        return name

    def __contains__(self, name: str) -> bool:
        return name in self._rules

    def ensure(self, name: str, body: str) -> str:
        """Define a rule under a fixed name unless it exists (shared primitives)."""
        if name not in self._rules:
            self.define(name, body)
        return name

    def define(self, name: str, body: str) -> None:
        self._rules[name] = body
        self._by_body.setdefault(body, name)

    def render(self, root: str) -> str:
        """The grammar text: `root ::= <root>` and then every rule, one per line."""
        lines = [f"root ::= {root}"]
        for name, body in self._rules.items():
            if body is None:
                raise GrammarError(f"internal error: rule {name!r} was never defined")
            lines.append(f"{name} ::= {body}")
        return "\n".join(lines) + "\n"
