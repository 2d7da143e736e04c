"""Regular expressions -> GBNF, for the subset a grammar expresses exactly: literals, escapes
(\\d \\w \\s and their negations, \\n \\t \\xHH \\uHHHH ...), classes with ranges and negation,
`.`, groups (plain, non-capturing, named), alternation, and the quantifiers ? * + {m} {m,}
{m,n} {,n} (lazy forms match the same strings). Anchors may only open or close the pattern.
Backreferences, lookarounds, word boundaries, inline flags and possessive quantifiers are
refused with a GrammarError. \\w and \\s are their ASCII meanings, a subset of Python's.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmserve.chat.grammar.gbnf import GrammarError, RuleSet, char_class, literal, repeat
from lmserve.chat.grammar.primitives import primitive

Ranges = list[tuple[int, int]]
_DIGIT: Ranges = [(0x30, 0x39)]
_WORD: Ranges = [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)]
_SPACE: Ranges = [(0x09, 0x0D), (0x20, 0x20)]
_CLASS_ESCAPES = {"d": (_DIGIT, False), "D": (_DIGIT, True), "w": (_WORD, False),
                  "W": (_WORD, True), "s": (_SPACE, False), "S": (_SPACE, True)}
_CHAR_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "0": "\0", "a": "\a"}
_HEX = {"x": 2, "u": 4, "U": 8}
_MAX_CODEPOINT = 0x10FFFF


@dataclass
class _Node:
    kind: str  # "text" | "class" | "seq" | "alt" | "rep"
    text: str = ""
    ranges: Ranges | None = None
    negated: bool = False
    parts: list[_Node] | None = None
    low: int = 0
    high: int | None = None


def regex_to_gbnf(pattern: str) -> str:
    """A grammar whose language is the strings the pattern matches in full."""
    rules = RuleSet()
    node, _, _ = _Parser(pattern).parse()
    return rules.render(_emit(node, json_string=False))


def pattern_in_string(pattern: str, rules: RuleSet, hint: str) -> str:
    """A rule for the inside of a JSON string (escaped as JSON needs) that contains a match of
    `pattern`, which JSON Schema reads as a search unless anchored with ^ and $."""
    node, anchored_start, anchored_end = _Parser(pattern).parse()
    free = f"{primitive(rules, 'json-char')}*"
    body = " ".join(filter(None, ["" if anchored_start else free, _emit(node, json_string=True),
                                  "" if anchored_end else free]))
    return rules.add(hint, body or '""')


class _Parser:
    def __init__(self, pattern: str) -> None:
        self.s, self.i = pattern, 0

    def _fail(self, what: str) -> GrammarError:
        return GrammarError(f"regex {self.s!r} at position {self.i}: {what}")

    def parse(self) -> tuple[_Node, bool, bool]:
        start = self._anchor(("^", "\\A"))
        node = self._alternation()
        end = self._anchor(("$", "\\Z", "\\z"))
        if self.i < len(self.s):
            raise self._fail("unbalanced ')'" if self.s[self.i] == ")" else
                             "anchors are only supported at the start or the end")
        return node, start, end

    def _anchor(self, forms: tuple[str, ...]) -> bool:
        for form in forms:
            if self.s.startswith(form, self.i):
                self.i += len(form)
                return True
        return False

    def _alternation(self) -> _Node:
        options = [self._sequence()]
        while self.s.startswith("|", self.i):
            self.i += 1
            options.append(self._sequence())
        return options[0] if len(options) == 1 else _Node("alt", parts=options)

    def _sequence(self) -> _Node:
        parts: list[_Node] = []
        while self.i < len(self.s) and self.s[self.i] not in "|)":
            if self.s[self.i] == "$" and self.i == len(self.s) - 1 or \
                    self.s.startswith(("\\Z", "\\z"), self.i) and self.i == len(self.s) - 2:
                break
            parts.append(self._quantified(self._atom()))
        return _Node("seq", parts=parts)

    def _atom(self) -> _Node:
        ch = self.s[self.i]
        self.i += 1
        if ch == "(":
            return self._group()
        if ch == "[":
            return self._class()
        if ch == ".":
            return _Node("class", ranges=[(0x0A, 0x0A)], negated=True)
        if ch == "\\":
            return self._escape(in_class=False)
        if ch in "*+?":
            raise self._fail(f"'{ch}' has nothing to repeat")
        if ch in "^$":
            raise self._fail("anchors are only supported at the start or the end")
        return _Node("text", text=ch)

    def _group(self) -> _Node:
        if self.s.startswith("?", self.i):
            if self.s.startswith("?:", self.i):
                self.i += 2
            elif self.s.startswith(("?P<", "?<"), self.i) and not self.s.startswith(
                    ("?<=", "?<!"), self.i):
                self.i = self.s.index(">", self.i) + 1 if ">" in self.s[self.i:] else len(self.s)
            else:
                raise self._fail("lookarounds, inline flags and conditionals are not supported")
        node = self._alternation()
        if not self.s.startswith(")", self.i):
            raise self._fail("missing ')'")
        self.i += 1
        return node

    def _quantified(self, node: _Node) -> _Node:
        bounds = self._quantifier()
        if bounds is None:
            return node
        if self.s.startswith("?", self.i):
            self.i += 1  # lazy: same strings, another preference
        elif self.s.startswith("+", self.i):
            raise self._fail("possessive quantifiers are not supported")
        if self.i < len(self.s) and self.s[self.i] in "*+?" and not self.s.startswith("{", self.i):
            raise self._fail("multiple repeat")
        return _Node("rep", parts=[node], low=bounds[0], high=bounds[1])

    def _quantifier(self) -> tuple[int, int | None] | None:
        if self.i >= len(self.s):
            return None
        ch = self.s[self.i]
        if ch in "*+?":
            self.i += 1
            return {"*": (0, None), "+": (1, None), "?": (0, 1)}[ch]
        end = self.s.find("}", self.i)
        body = self.s[self.i + 1:end] if ch == "{" and end > 0 else ""
        low, comma, high = body.partition(",")
        if not body or not (low.isdigit() or not low and comma) or high and not high.isdigit():
            return None  # not a quantifier: '{' stands for itself
        self.i = end + 1
        bounds = (int(low or 0), int(high) if high else (None if comma else int(low)))
        if bounds[1] is not None and bounds[1] < bounds[0]:
            raise self._fail("min repeat greater than max repeat")
        return bounds

    def _escape(self, in_class: bool) -> _Node:
        if self.i >= len(self.s):
            raise self._fail("pattern ends with a backslash")
        ch = self.s[self.i]
        self.i += 1
        if ch in _CLASS_ESCAPES:
            ranges, negated = _CLASS_ESCAPES[ch]
            return _Node("class", ranges=list(ranges), negated=negated)
        if ch in _CHAR_ESCAPES:
            return _Node("text", text=_CHAR_ESCAPES[ch])
        if ch in _HEX:
            digits = self.s[self.i:self.i + _HEX[ch]]
            if len(digits) != _HEX[ch] or any(c not in "0123456789abcdefABCDEF" for c in digits):
                raise self._fail(f"\\{ch} needs {_HEX[ch]} hex digits")
            self.i += _HEX[ch]
            return _Node("text", text=chr(int(digits, 16)))
        if ch.isdigit():
            raise self._fail("backreferences are not supported")
        if ch.isascii() and ch.isalpha():
            what = "word boundaries" if ch in "bB" and not in_class else f"'\\{ch}'"
            raise self._fail(f"{what} not supported")
        return _Node("text", text=ch)

    def _class(self) -> _Node:
        negated = self.s.startswith("^", self.i)
        self.i += negated
        ranges: Ranges = []
        first = True
        while True:
            if self.i >= len(self.s):
                raise self._fail("missing ']'")
            if self.s[self.i] == "]" and not first:
                self.i += 1
                return _Node("class", ranges=ranges, negated=negated)
            if self.s.startswith("[:", self.i):
                raise self._fail("POSIX classes are not supported")
            first = False
            low = self._class_item()
            if isinstance(low, list):
                ranges += low
                continue
            if self.s.startswith("-", self.i) and self.s[self.i + 1:self.i + 2] not in ("]", ""):
                self.i += 1
                high = self._class_item()
                if isinstance(high, list) or high < low:
                    raise self._fail("bad character range")
                ranges.append((low, high))
            else:
                ranges.append((low, low))

    def _class_item(self) -> int | Ranges:
        ch = self.s[self.i]
        self.i += 1
        if ch != "\\":
            return ord(ch)
        node = self._escape(in_class=True)
        if node.kind == "text":
            return ord(node.text)
        if node.negated:
            raise self._fail("\\D, \\W and \\S inside a class are not supported")
        return list(node.ranges or [])


# --- GBNF output ---------------------------------------------------------------------------------

_JSON_SPECIAL = {ord('"'): '\\"', ord("\\"): "\\\\", 0x0A: "\\n", 0x09: "\\t", 0x0D: "\\r"}
_JSON_EXCLUDED: Ranges = [(0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C)]


def _emit(node: _Node, json_string: bool) -> str:
    if node.kind == "text":
        return " ".join(_emit_char(ord(c), json_string) for c in node.text) if json_string \
            else literal(node.text)
    if node.kind == "class":
        return _emit_class(node.ranges or [], node.negated, json_string)
    parts = node.parts or []
    if node.kind == "seq":
        return " ".join(p for p in (_emit(x, json_string) for x in _merge_text(parts)) if p)
    if node.kind == "alt":
        return "(" + " | ".join(_emit(p, json_string) or '""' for p in parts) + ")"
    inner = _emit(parts[0], json_string) or '""'
    return repeat(f"({inner})", node.low, node.high)


def _merge_text(parts: list[_Node]) -> list[_Node]:
    merged: list[_Node] = []
    for part in parts:
        if part.kind == "text" and merged and merged[-1].kind == "text":
            merged[-1] = _Node("text", text=merged[-1].text + part.text)
        else:
            merged.append(part)
    return merged


def _emit_char(code: int, json_string: bool) -> str:
    if json_string and code in _JSON_SPECIAL:
        return literal(_JSON_SPECIAL[code])
    if json_string and code < 0x20:
        return literal(f"\\u{code:04x}")
    return literal(chr(code))


def _emit_class(ranges: Ranges, negated: bool, json_string: bool) -> str:
    def to_class(rs: Ranges, neg: bool) -> str:
        return char_class([(chr(a), chr(b)) for a, b in rs], neg)

    if not json_string:
        return to_class(ranges, negated)

    def contains(code: int) -> bool:
        return any(a <= code <= b for a, b in ranges) != negated

    escapes = [literal(text) for code, text in _JSON_SPECIAL.items() if contains(code)]
    if negated:
        plain = to_class(ranges + _JSON_EXCLUDED, True)
    else:
        kept = _subtract(ranges, _JSON_EXCLUDED)
        plain = to_class(kept, False) if kept else ""
    options = [o for o in (plain, *escapes) if o]
    if not options:
        raise GrammarError("a character class in the pattern matches nothing a JSON string "
                           "can hold")
    return options[0] if len(options) == 1 else "(" + " | ".join(options) + ")"


def _subtract(ranges: Ranges, removed: Ranges) -> Ranges:
    out: Ranges = []
    for low, high in ranges:
        pieces = [(low, high)]
        for r_low, r_high in removed:
            pieces = [p for a, b in pieces for p in ((a, min(b, r_low - 1)),
                                                     (max(a, r_high + 1), b)) if p[0] <= p[1]]
        out += pieces
    return out
