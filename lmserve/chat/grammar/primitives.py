"""Shared GBNF rules for JSON values and string formats, and grammars for numeric ranges.

Whitespace between JSON tokens is bounded (at most one line break and 15 spaces or tabs)
and numbers have bounded digits: a small model that starts looping on newlines or digits is
then forced on instead of filling the whole token budget.
"""

from __future__ import annotations

from collections.abc import Mapping
from fractions import Fraction
from typing import Any

from lmserve.chat.grammar.gbnf import GrammarError, RuleSet, literal

WS = "ws"
_BODIES: dict[str, str] = {
    WS: r"([ \t\n] [ \t]{0,15})?",
    "json-char": r'[^"\\\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})',
    "json-string": r'"\"" json-char* "\""',
    "json-int": r'"-"? ("0" | [1-9] [0-9]{0,15})',
    "json-number": r'json-int ("." [0-9]{1,16})? ([eE] [-+]? [0-9]{1,3})?',
    "json-bool": r'"true" | "false"',
    "json-null": r'"null"',
    "json-value": "json-object | json-array | json-string | json-number | json-bool | json-null",
    "json-member": 'json-string ws ":" ws json-value',
    "json-object": '"{" ws (json-member (ws "," ws json-member)* ws)? "}"',
    "json-array": '"[" ws (json-value (ws "," ws json-value)* ws)? "]"',
    # the same values written compactly (SchemaConverter's compact mode, for tool-call
    # arguments): no line breaks, one space after ':' and ',', as json.dumps and templates'
    # tojson write them
    "jsonc-value": "jsonc-object | jsonc-array | json-string | json-number | json-bool | "
                   "json-null",
    "jsonc-member": 'json-string ": " jsonc-value',
    "jsonc-object": '"{" (jsonc-member (", " jsonc-member)*)? "}"',
    "jsonc-array": '"[" (jsonc-value (", " jsonc-value)*)? "]"',
    # string formats, without the quotes
    "fmt-date": r'[1-9] [0-9]{3} "-" (("0" [13578] | "1" [02]) "-" ("0" [1-9] | [12] [0-9] | "3" '
                r'[01]) | ("0" [469] | "11") "-" ("0" [1-9] | [12] [0-9] | "30") | "02-" ("0" '
                r'[1-9] | "1" [0-9] | "2" [0-8]))',
    "fmt-time": r'([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9] ":" [0-5] [0-9] ("." [0-9]{1,6})? '
                r'("Z" | [+-] ([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9])',
    "fmt-date-time": 'fmt-date "T" fmt-time',
    "fmt-uuid": r'[0-9a-f]{8} "-" [0-9a-f]{4} "-" [0-9a-f]{4} "-" [0-9a-f]{4} "-" [0-9a-f]{12}',
    "fmt-octet": r'"25" [0-5] | "2" [0-4] [0-9] | "1" [0-9] [0-9] | [1-9]? [0-9]',
    "fmt-ipv4": 'fmt-octet "." fmt-octet "." fmt-octet "." fmt-octet',
    "fmt-email": r'[A-Za-z0-9._+-]{1,64} "@" [A-Za-z0-9-]{1,63} ("." [A-Za-z0-9-]{1,63}){1,4}',
}
_DEPENDS: dict[str, tuple[str, ...]] = {
    "json-string": ("json-char",),
    "json-number": ("json-int",),
    "json-value": ("json-object", "json-array", "json-string", "json-number", "json-bool",
                   "json-null"),
    "json-member": ("json-string", WS, "json-value"),
    "json-object": (WS, "json-member"),
    "json-array": (WS, "json-value"),
    "jsonc-value": ("jsonc-object", "jsonc-array", "json-string", "json-number", "json-bool",
                    "json-null"),
    "jsonc-member": ("json-string", "jsonc-value"),
    "jsonc-object": ("jsonc-member",),
    "jsonc-array": ("jsonc-value",),
    "fmt-date-time": ("fmt-date", "fmt-time"),
    "fmt-ipv4": ("fmt-octet",),
}
STRING_FORMATS = ("date", "time", "date-time", "uuid", "ipv4", "email")


def primitive(rules: RuleSet, name: str) -> str:
    """Add a shared rule (and the rules it uses) to `rules`; returns its name."""
    if name not in rules:
        rules.ensure(name, _BODIES[name])
        for dependency in _DEPENDS.get(name, ()):
            primitive(rules, dependency)
    return name


def format_rule(rules: RuleSet, fmt: str) -> str:
    return primitive(rules, "fmt-" + fmt)


# --- integer and number ranges ----------------------------------------------------------------


def _group(expr: str) -> str:
    return f"({expr})" if " | " in expr else expr


def _alternatives(parts: list[str]) -> str:
    if not parts:
        raise GrammarError("the numeric range is empty")
    return " | ".join(parts)


def _digits(count: int) -> str:
    return "" if count == 0 else "[0-9]" if count == 1 else f"[0-9]{{{count}}}"


def _join(*parts: str) -> str:
    return " ".join(p for p in parts if p)


def _digits_between(low: str, high: str) -> str:
    """Digit strings of one length from `low` to `high`, inclusive."""
    if low == high:
        return literal(low)
    rest = len(low) - 1
    if low[0] == high[0]:
        return _join(literal(low[0]), _group(_digits_between(low[1:], high[1:])))
    if set(low[1:]) <= {"0"} and set(high[1:]) <= {"9"}:
        return _join(f"[{low[0]}-{high[0]}]", _digits(rest))
    parts = [_join(literal(low[0]), _group(_digits_between(low[1:], "9" * rest)))]
    if int(high[0]) - int(low[0]) > 1:
        parts.append(_join(f"[{int(low[0]) + 1}-{int(high[0]) - 1}]", _digits(rest)))
    parts.append(_join(literal(high[0]), _group(_digits_between("0" * rest, high[1:]))))
    return " | ".join(parts)


def uint_range(low: int, high: int | None) -> str:
    """Non-negative integers low..high without leading zeros (high None = no bound)."""
    if high is None:
        width = len(str(low))
        longer = f"[1-9] [0-9]{{{width},{max(width, 15)}}}"
        return _alternatives([_group(uint_range(low, 10 ** width - 1)), longer])
    parts = []
    for width in range(len(str(low)), len(str(high)) + 1):
        first = max(low, 10 ** (width - 1) if width > 1 else 0)
        last = min(high, 10 ** width - 1)
        if first <= last:
            parts.append(_digits_between(str(first), str(last)))
    return _alternatives(parts)


def int_range(low: int | None, high: int | None) -> str:
    """Integers low..high, either bound optional."""
    if low is not None and high is not None and low > high:
        raise GrammarError(f"no integer lies between {low} and {high}")
    parts = []
    if high is None or high >= 0:
        parts.append(uint_range(max(low, 0) if low is not None else 0, high))
    if low is None or low < 0:
        magnitude_low = 1 if high is None or high >= 0 else -high
        parts.append('"-" ' + _group(uint_range(magnitude_low, None if low is None else -low)))
    return _alternatives(parts)


_FRACTION = '("." [0-9]{1,15})?'


def _magnitude(low: int, low_open: bool, high: int | None, high_open: bool) -> str:
    """Non-negative decimals m with low </<= m </<= high, for integer bounds."""
    parts = []
    start = low + 1 if low_open else low
    if low_open and (high is None or high > low):
        parts.append(f'{literal(str(low))} "." [0-9]{{0,14}} [1-9]')
    top = None if high is None else high - 1
    if top is None or start <= top:
        parts.append(_join(_group(uint_range(start, top)), _FRACTION))
    if high is not None and not high_open and high >= start:
        parts.append(f'{literal(str(high))} ("." "0"{{1,15}})?')
    return _alternatives(parts)


def number_range(low: float | None, low_open: bool, high: float | None, high_open: bool) -> str:
    """Decimal numbers within integer bounds (no exponent); non-integer bounds are refused."""
    lo, hi = _integral(low), _integral(high)
    if lo is not None and hi is not None and (lo > hi or lo == hi and (low_open or high_open)):
        raise GrammarError(f"no number lies between {low} and {high}")
    parts = []
    if hi is None or hi > 0 or hi == 0 and not high_open:
        nonneg_low = lo if lo is not None and lo >= 0 else None
        parts.append(_magnitude(nonneg_low or 0, low_open and nonneg_low is not None, hi,
                                high_open))
    if lo is None or lo < 0:
        mag_low, mag_low_open = (-hi, high_open) if hi is not None and hi < 0 else (0, True)
        parts.append('"-" ' + _group(_magnitude(mag_low, mag_low_open, None if lo is None else -lo,
                                                low_open)))
    return _alternatives(parts)


def _integral(bound: float | None) -> int | None:
    if bound is None:
        return None
    if Fraction(bound).denominator != 1:
        raise GrammarError(f"a bound of {bound} on a number is not supported (only whole-number "
                           "bounds are); use an integer type or a whole-number bound")
    return int(bound)


def bounded_number(schema: Mapping[str, Any], kind: str) -> str | None:
    """The grammar for an integer or number schema's bounds; None when it has none."""
    low, low_open = _bound(schema, "minimum", "exclusiveMinimum")
    high, high_open = _bound(schema, "maximum", "exclusiveMaximum")
    if low is None and high is None:
        return None
    if kind == "integer":
        return int_range(None if low is None else _ceil(low, low_open),
                         None if high is None else _floor(high, high_open))
    return number_range(low, low_open, high, high_open)


def _bound(schema: Mapping[str, Any], inclusive: str,
           exclusive: str) -> tuple[float | None, bool]:
    value, flag = schema.get(inclusive), schema.get(exclusive)
    if isinstance(flag, bool):  # draft 4: exclusiveMinimum is a flag on minimum
        return value, flag
    if flag is None:
        return value, False
    if value is None or (flag >= value if inclusive == "minimum" else flag <= value):
        return flag, True
    return value, False


def _ceil(value: float, open_: bool) -> int:
    whole = int(value) if value == int(value) else int(value) + (value > 0)
    return whole + 1 if open_ and whole == value else whole


def _floor(value: float, open_: bool) -> int:
    whole = int(value) if value == int(value) else int(value) - (value < 0)
    return whole - 1 if open_ and whole == value else whole
