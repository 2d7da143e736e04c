"""Merging two JSON Schemas into one that both constrain (for allOf, and for keywords that sit
beside $ref, anyOf or oneOf)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from lmserve.chat.grammar.gbnf import GrammarError

# Keywords that describe but do not constrain; a grammar ignores them.
ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "$comment", "deprecated", "readOnly",
    "writeOnly", "$schema", "$id", "$anchor", "$defs", "definitions", "contentMediaType",
    "contentEncoding",
})
_LOWER_BOUNDS = frozenset({"minimum", "exclusiveMinimum", "minLength", "minItems"})
_UPPER_BOUNDS = frozenset({"maximum", "exclusiveMaximum", "maxLength", "maxItems"})


def merge_schemas(a: Any, b: Any, path: str) -> dict[str, Any]:
    """A schema that holds exactly when both do, for the keyword combinations a grammar can
    express; anything else raises GrammarError."""
    if a is True or a == {}:
        return dict(b) if isinstance(b, Mapping) else _boolean(b, path)
    if b is True or b == {}:
        return dict(a) if isinstance(a, Mapping) else _boolean(a, path)
    if not isinstance(a, Mapping) or not isinstance(b, Mapping):
        raise GrammarError(f"schema at '{path or '/'}' allows no value")
    merged = dict(a)
    for key, value in b.items():
        if key not in merged or key in ANNOTATIONS:
            merged.setdefault(key, value)
        else:
            merged[key] = _merge_key(key, merged[key], value, path)
    return merged


def _boolean(schema: Any, path: str) -> dict[str, Any]:
    if schema is True:
        return {}
    raise GrammarError(f"schema at '{path or '/'}' allows no value")


def _merge_key(key: str, a: Any, b: Any, path: str) -> Any:
    if key in _LOWER_BOUNDS and not isinstance(a, bool):
        return max(a, b)
    if key in _UPPER_BOUNDS and not isinstance(a, bool):
        return min(a, b)
    merger = _MERGERS.get(key)
    if merger is not None:
        return merger(a, b, f"{path}/{key}")
    if a == b:
        return a
    raise GrammarError(f"cannot combine two different '{key}' at '{path or '/'}'")


def _types(a: Any, b: Any, path: str) -> list[str]:
    left = [a] if isinstance(a, str) else list(a)
    right = [b] if isinstance(b, str) else list(b)
    both = [t for t in left if t in right or t == "integer" and "number" in right]
    both += [t for t in right if t == "integer" and "number" in left and t not in both]
    if not both:
        raise GrammarError(f"the types at '{path}' exclude each other")
    return both


def _enums(a: list[Any], b: list[Any], path: str) -> list[Any]:
    both = [v for v in a if v in b]
    if not both:
        raise GrammarError(f"the enums at '{path}' have no value in common")
    return both


def _properties(a: Mapping[str, Any], b: Mapping[str, Any], path: str) -> dict[str, Any]:
    merged = dict(a)
    for name, schema in b.items():
        merged[name] = merge_schemas(merged[name], schema, f"{path}/{name}") \
            if name in merged else schema
    return merged


def _required(a: list[str], b: list[str], path: str) -> list[str]:
    return list(dict.fromkeys([*a, *b]))


def _subschema(a: Any, b: Any, path: str) -> Any:
    if a is False or b is False:
        return False
    return merge_schemas(a, b, path)


def _all_of(a: list[Any], b: list[Any], path: str) -> list[Any]:
    return [*a, *b]


def _nullable(a: bool, b: bool, path: str) -> bool:
    return bool(a and b)


_MERGERS: dict[str, Callable[[Any, Any, str], Any]] = {
    "type": _types, "enum": _enums, "properties": _properties, "required": _required,
    "additionalProperties": _subschema, "items": _subschema, "allOf": _all_of,
    "nullable": _nullable,
}
