"""A GBNF syntax check that reads grammars the way llama.cpp's parser does, so a raw grammar
from a client fails with a clear message (line and column) before it reaches the engine:
syntax, undefined rules, a missing root, left recursion."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmserve.chat.grammar.gbnf import GrammarError

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")
_SIMPLE_ESCAPES = {"t": "\t", "r": "\r", "n": "\n", "\\": "\\", '"': '"', "[": "[", "]": "]",
                   "-": "-"}
_HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}


@dataclass
class Item:
    """One element of a parsed rule: a literal, a class, `.`, a token, a rule or a group."""

    kind: str  # "literal" | "class" | "any" | "token" | "ref" | "group"
    text: str = ""  # literal: its characters; ref: the rule name
    ranges: list[tuple[int, int]] = field(default_factory=list)  # class
    negated: bool = False
    alts: list[list[Item]] = field(default_factory=list)  # group
    low: int = 1  # repetition bounds
    high: int | None = 1

    @property
    def ref(self) -> str:
        return self.text if self.kind == "ref" else ""

    @property
    def empty(self) -> bool:
        return self.kind == "literal" and not self.text

    @property
    def optional(self) -> bool:
        return self.low == 0


Rules = dict[str, list[list[Item]]]


def parse_gbnf(text: str) -> Rules:
    """The rules of a grammar, checked for syntax only."""
    return _Parser(text).parse()[0]


def validate_gbnf(text: str, root: str = "root") -> str:
    """Return `text` when it is a usable GBNF grammar, else raise GrammarError."""
    rules, refs = _Parser(text).parse()
    if root not in rules:
        raise GrammarError(f"grammar has no '{root}' rule")
    for name, where in refs.items():
        if name not in rules:
            raise GrammarError(f"grammar uses undefined rule '{name}' ({where})")
    _check_left_recursion(rules)
    return text


class _Parser:
    def __init__(self, text: str) -> None:
        self.s, self.i = text, 0
        self.rules: Rules = {}
        self.refs: dict[str, str] = {}

    def parse(self) -> tuple[Rules, dict[str, str]]:
        self._space(True)
        while self.i < len(self.s):
            self._rule()
        if not self.rules:
            raise GrammarError("grammar is empty")
        return self.rules, self.refs

    def _fail(self, what: str) -> GrammarError:
        line = self.s.count("\n", 0, self.i) + 1
        column = self.i - (self.s.rfind("\n", 0, self.i) + 1) + 1
        return GrammarError(f"invalid grammar at line {line}, column {column}: {what}")

    def _peek(self, n: int = 1) -> str:
        return self.s[self.i:self.i + n]

    def _space(self, newline_ok: bool) -> None:
        while self.i < len(self.s):
            ch = self.s[self.i]
            if ch == "#":
                while self.i < len(self.s) and self.s[self.i] not in "\r\n":
                    self.i += 1
            elif ch in " \t" or newline_ok and ch in "\r\n":
                self.i += 1
            else:
                return

    def _name(self) -> str:
        start = self.i
        while self.i < len(self.s) and self.s[self.i] in _NAME_CHARS:
            self.i += 1
        if start == self.i:
            raise self._fail("expected a rule name")
        return self.s[start:self.i]

    def _rule(self) -> None:
        name = self._name()
        self._space(False)
        if self._peek(3) != "::=":
            raise self._fail("expected '::='")
        self.i += 3
        self._space(True)
        alts = self._alternates(nested=False)
        if self.i < len(self.s) and self.s[self.i] not in "\r\n":
            raise self._fail("expected the end of the line")
        self._space(True)
        if name in self.rules:
            raise self._fail(f"rule '{name}' is defined twice")
        self.rules[name] = alts

    def _alternates(self, nested: bool) -> list[list[Item]]:
        alts = [self._sequence(nested)]
        while self._peek() == "|":
            self.i += 1
            self._space(True)
            alts.append(self._sequence(nested))
        return alts

    def _sequence(self, nested: bool) -> list[Item]:
        items: list[Item] = []
        while self.i < len(self.s):
            ch = self.s[self.i]
            if ch == '"':
                items.append(Item("literal", text=self._literal()))
            elif ch == "[":
                items.append(self._char_class())
            elif ch in "<!":
                self._token()
                items.append(Item("token"))
            elif ch in _NAME_CHARS:
                where = f"line {self.s.count(chr(10), 0, self.i) + 1}"
                name = self._name()
                self.refs.setdefault(name, where)
                items.append(Item("ref", text=name))
            elif ch == "(":
                self.i += 1
                self._space(True)
                items.append(Item("group", alts=self._alternates(nested=True)))
                if self._peek() != ")":
                    raise self._fail("expected ')'")
                self.i += 1
            elif ch == ".":
                self.i += 1
                items.append(Item("any"))
            elif ch in "*+?{":
                if not items:
                    raise self._fail(f"'{ch}' has nothing to repeat")
                items[-1] = self._repeated(items[-1])
            else:
                break
            self._space(nested)
        return items

    def _literal(self) -> str:
        self.i += 1
        chars = []
        while self._peek() != '"':
            chars.append(chr(self._char()))
        self.i += 1
        return "".join(chars)

    def _char_class(self) -> Item:
        self.i += 1
        item = Item("class", negated=self._peek() == "^")
        self.i += item.negated
        while self._peek() != "]":
            low = high = self._char()
            if self._peek() == "-" and self.s[self.i + 1:self.i + 2] not in ("]", ""):
                self.i += 1
                high = self._char()
            item.ranges.append((low, high))
        self.i += 1
        return item

    def _char(self) -> int:
        if self.i >= len(self.s):
            raise self._fail("unexpected end of grammar (unclosed literal or class)")
        if self.s[self.i] != "\\":
            self.i += 1
            return ord(self.s[self.i - 1])
        kind = self.s[self.i + 1:self.i + 2]
        if kind in _HEX_ESCAPES:
            digits = self.s[self.i + 2:self.i + 2 + _HEX_ESCAPES[kind]]
            if len(digits) != _HEX_ESCAPES[kind] or not all(c in "0123456789abcdefABCDEF"
                                                            for c in digits):
                raise self._fail(f"expected {_HEX_ESCAPES[kind]} hex digits after \\{kind}")
            self.i += 2 + len(digits)
            return int(digits, 16)
        if kind and kind in _SIMPLE_ESCAPES:
            self.i += 2
            return ord(_SIMPLE_ESCAPES[kind])
        raise self._fail(f"unknown escape '\\{kind}'")

    def _token(self) -> None:
        if self._peek() == "!":
            self.i += 1
        end = self.s.find(">", self.i)
        if self._peek() != "<" or end < 0:
            raise self._fail("expected a token <...>")
        self.i = end + 1

    def _repeated(self, item: Item) -> Item:
        ch = self.s[self.i]
        self.i += 1
        if ch != "{":
            low, high = {"*": (0, None), "+": (1, None), "?": (0, 1)}[ch]
            return Item("group", alts=[[item]], low=low, high=high)
        self._space(False)
        low = self._int()
        high = low
        self._space(False)
        if self._peek() == ",":
            self.i += 1
            self._space(False)
            high = None
            if self._peek().isdigit():
                high = self._int()
                self._space(False)
        if self._peek() != "}":
            raise self._fail("expected '}'")
        self.i += 1
        return Item("group", alts=[[item]], low=low, high=high)

    def _int(self) -> int:
        start = self.i
        while self._peek().isdigit():
            self.i += 1
        if start == self.i:
            raise self._fail("expected a number")
        return int(self.s[start:self.i])


def _check_left_recursion(rules: Rules) -> None:
    nullable: dict[str, bool] = {name: False for name in rules}

    def item_nullable(item: Item) -> bool:
        if item.optional or item.empty:
            return True
        if item.kind == "ref":
            return nullable.get(item.ref, False)
        return item.kind == "group" and any(all(map(item_nullable, a)) for a in item.alts)

    changed = True
    while changed:
        changed = False
        for name, alts in rules.items():
            if not nullable[name] and any(all(map(item_nullable, a)) for a in alts):
                nullable[name] = changed = True

    def left_refs(alts: list[list[Item]]) -> set[str]:
        found: set[str] = set()
        for alt in alts:
            for item in alt:
                found |= {item.ref} if item.kind == "ref" else left_refs(item.alts)
                if not item_nullable(item):
                    break
        return found

    edges = {name: left_refs(alts) for name, alts in rules.items()}
    state: dict[str, int] = {}  # 1 = in progress, 2 = done

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2 or name not in edges:
            return
        if state.get(name) == 1:
            cycle = " -> ".join(path[path.index(name):] + [name])
            raise GrammarError(f"grammar is left-recursive ({cycle}); llama.cpp refuses that")
        state[name] = 1
        for nxt in sorted(edges[name]):
            visit(nxt, path + [name])
        state[name] = 2

    for name in rules:
        visit(name, [])
