"""A tiny GBNF recognizer for tests: does a grammar's language contain this string?

It walks the parsed rules (lmserve.chat.grammar.check.parse_gbnf) keeping the set of
positions each element can end at, memoized per rule and position. Fine for the short
documents tests use; grammars have no left recursion, so the recursion ends.
"""

from __future__ import annotations

from lmserve.chat.grammar.check import Item, parse_gbnf


class GbnfMatcher:
    def __init__(self, grammar: str) -> None:
        self.rules = parse_gbnf(grammar)

    def matches(self, text: str, root: str = "root") -> bool:
        self._text, self._memo = text, {}
        return len(text) in self._rule(root, 0)

    def _rule(self, name: str, pos: int) -> frozenset[int]:
        key = (name, pos)
        if key not in self._memo:
            self._memo[key] = frozenset()
            self._memo[key] = frozenset(self._alts(self.rules[name], pos))
        return self._memo[key]

    def _alts(self, alts: list[list[Item]], pos: int) -> set[int]:
        ends: set[int] = set()
        for seq in alts:
            ends |= self._seq(seq, pos)
        return ends

    def _seq(self, items: list[Item], pos: int) -> set[int]:
        positions = {pos}
        for item in items:
            positions = {end for p in positions for end in self._item(item, p)}
            if not positions:
                break
        return positions

    def _item(self, item: Item, pos: int) -> set[int]:
        if item.kind == "group" and (item.low, item.high) != (1, 1):
            return self._repeat(item, pos)
        text = self._text
        if item.kind == "literal":
            return {pos + len(item.text)} if text.startswith(item.text, pos) else set()
        if item.kind in ("class", "any"):
            if pos >= len(text):
                return set()
            inside = any(a <= ord(text[pos]) <= b for a, b in item.ranges)
            return {pos + 1} if item.kind == "any" or inside != item.negated else set()
        if item.kind == "ref":
            return set(self._rule(item.text, pos))
        if item.kind == "group":
            return self._alts(item.alts, pos)
        return set()  # token elements match token ids, not text

    def _repeat(self, item: Item, pos: int) -> set[int]:
        result = {pos} if item.low == 0 else set()
        frontier, seen, count = {pos}, {pos}, 0
        while frontier and (item.high is None or count < item.high):
            count += 1
            frontier = {end for p in frontier for end in self._alts(item.alts, p)}
            if count >= item.low:
                result |= frontier
            if item.high is None:
                frontier -= seen
                seen |= frontier
        return result
