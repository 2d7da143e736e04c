"""JSON Schema -> GBNF, for structured output through llama.cpp's grammar sampler.

Supported: type (one or a list; `nullable`), enum, const, properties with required and optional
members (emitted in declared order), additionalProperties (false unless the schema allows
more, or `allow_extra_properties` is set), items / prefixItems with minItems and maxItems,
anyOf / oneOf (oneOf's exclusivity is not enforced), allOf (merged), $ref into $defs /
definitions / any local JSON pointer, recursion, string minLength / maxLength / pattern /
format (date, time, date-time, uuid, ipv4, email; other formats are annotations and leave the
string free), integer bounds, and number bounds that are whole numbers. Anything else that
constrains a value is refused with a GrammarError naming the keyword and where it is, rather
than producing output that would not validate.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from lmserve.chat.grammar.gbnf import GrammarError, RuleSet, literal, repeat
from lmserve.chat.grammar.merge import ANNOTATIONS, merge_schemas
from lmserve.chat.grammar.primitives import (
    STRING_FORMATS,
    WS,
    bounded_number,
    format_rule,
    primitive,
)
from lmserve.chat.grammar.regex import pattern_in_string

_TYPE_KEYWORDS = {
    "object": ("properties", "required", "additionalProperties"),
    "array": ("items", "prefixItems", "minItems", "maxItems", "additionalItems"),
    "string": ("minLength", "maxLength", "pattern", "format"),
    "number": ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"),
}
_HANDLED = {"type", "nullable", "enum", "const", "anyOf", "oneOf", "allOf", "$ref",
            *(k for keys in _TYPE_KEYWORDS.values() for k in keys)}
_SEP = f'{WS} "," {WS}'
_RULE_NAME = re.compile(r"[A-Za-z0-9-]+")


class SchemaConverter:
    """Converts the schemas of one document (sharing its $defs) into rules of a RuleSet."""

    def __init__(self, rules: RuleSet, document: Any, *, name: str = "root",
                 allow_extra_properties: bool = False, compact: bool = False) -> None:
        self.rules, self.document, self.name = rules, document, name
        self.allow_extra = allow_extra_properties
        self._refs: dict[str, str] = {}
        # compact: the one spelling json.dumps writes (`{"a": 1, "b": [2, 3]}`); else the
        # bounded whitespace of primitives.WS anywhere JSON allows it
        self._ws = "" if compact else WS
        self._sep = literal(", ") if compact else _SEP
        self._colon = literal(": ") if compact else f'{WS} ":" {WS}'
        self._any = "jsonc-value" if compact else "json-value"
        if not compact:
            primitive(rules, WS)

    def convert(self, schema: Any = None, path: str = "") -> str:
        """A GBNF expression (a rule name) matching the JSON values valid against `schema`."""
        schema = self.document if schema is None else schema
        hint = f"{self.name}{path}"
        if schema is True or schema == {}:
            return primitive(self.rules, self._any)
        if schema is False:
            raise GrammarError(f"schema at '{path or '/'}' is false: no value is valid")
        if not isinstance(schema, Mapping):
            raise GrammarError(f"schema at '{path or '/'}' must be an object or a boolean")
        body = self._body(dict(schema), path)
        return body if _RULE_NAME.fullmatch(body) else self.rules.add(hint, body)

    def convert_root(self) -> str:
        """The body of the document's own rule (for `root ::= ...`)."""
        if isinstance(self.document, Mapping) and self.document not in ({}, True):
            return self._body(dict(self.document), "")
        return self.convert()

    def _body(self, schema: dict[str, Any], path: str) -> str:
        _refuse_unknown(schema, path)
        if "$ref" in schema:
            rest = {k: v for k, v in schema.items() if k != "$ref" and k not in ANNOTATIONS}
            if not rest:
                return self._ref(schema["$ref"])
            schema = merge_schemas(self._resolve(schema["$ref"]), rest, path)
        if "allOf" in schema:
            merged = {k: v for k, v in schema.items() if k != "allOf"}
            for i, part in enumerate(schema["allOf"]):
                merged = merge_schemas(merged, self._deref(part), f"{path}/allOf/{i}")
            return self._body(merged, path)
        if "const" in schema:
            return literal(json.dumps(schema["const"], ensure_ascii=False))
        if "enum" in schema:
            return self._enum(schema, path)
        for key in ("anyOf", "oneOf"):
            if key in schema:
                return self._choice(schema, key, path)
        types = _types_of(schema)
        if not types:
            return primitive(self.rules, self._any)
        return " | ".join(self._typed(schema, t, path) for t in types)

    def _deref(self, schema: Any) -> Any:
        if isinstance(schema, Mapping) and set(schema) - ANNOTATIONS == {"$ref"}:
            return self._resolve(schema["$ref"])
        return schema

    def _enum(self, schema: dict[str, Any], path: str) -> str:
        values = schema["enum"]
        if not isinstance(values, list) or not values:
            raise GrammarError(f"'enum' at '{path or '/'}' must be a non-empty list")
        return " | ".join(literal(json.dumps(v, ensure_ascii=False)) for v in values)

    def _choice(self, schema: dict[str, Any], key: str, path: str) -> str:
        siblings = {k: v for k, v in schema.items() if k != key and k not in ANNOTATIONS}
        options = []
        for i, option in enumerate(schema[key]):
            sub = f"{path}/{key}/{i}"
            merged = merge_schemas(siblings, self._deref(option), sub) if siblings else option
            options.append(self.convert(merged, sub))
        return " | ".join(options)

    def _typed(self, schema: dict[str, Any], kind: str, path: str) -> str:
        if kind == "object":
            return self._object(schema, path)
        if kind == "array":
            return self._array(schema, path)
        if kind == "string":
            return self._string(schema, path)
        if kind in ("integer", "number"):
            return self._number(schema, kind, path)
        if kind in ("boolean", "null"):
            return primitive(self.rules, "json-bool" if kind == "boolean" else "json-null")
        raise GrammarError(f"unknown type {kind!r} at '{path or '/'}'")

    # -- $ref ----------------------------------------------------------------------------------
    def _ref(self, ref: str) -> str:
        if ref not in self._refs:
            self._refs[ref] = name = self.rules.reserve(f"{self.name}-ref-{ref.split('/')[-1]}")
            self.rules.define(name, self._body(dict(self._resolve(ref)), f"/{ref}"))
        return self._refs[ref]

    def _resolve(self, ref: Any) -> Any:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise GrammarError(f"$ref {ref!r} is not supported: only local references ('#/...')")
        target = self.document
        for part in filter(None, ref[1:].split("/")):
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(target, Mapping) and part in target:
                target = target[part]
            elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            else:
                raise GrammarError(f"$ref {ref!r} points to nothing in the schema")
        if not isinstance(target, (Mapping, bool)):
            raise GrammarError(f"$ref {ref!r} does not point to a schema")
        return target

    # -- objects -------------------------------------------------------------------------------
    def _object(self, schema: dict[str, Any], path: str) -> str:
        properties = dict(schema.get("properties") or {})
        required = schema.get("required") or []
        for name in required:
            properties.setdefault(name, {})
        members = [(self._member(name, sub, f"{path}/{name}"), name in required)
                   for name, sub in properties.items()]
        extra = self._extra_member(schema, path)
        tail = self.rules.add(f"{self.name}{path}-more", f'({self._sep} {extra})*') if extra else ""
        tails = [tail]  # tails[k]: the members from k on, each after a comma, then extras
        for member, needed in reversed(members[1:]):
            piece = f"{self._sep} {member}" if needed else f"({self._sep} {member})?"
            body = f"{piece} {tails[0]}".strip()
            tails.insert(0, self.rules.add(f"{self.name}{path}-rest", body))
        tails.insert(0, "")  # (members[0] always opens when present)
        firsts = []
        for k, (member, needed) in enumerate(members):
            firsts.append(f"{member} {tails[k + 1]}".strip())
            if needed:
                break
        else:
            if extra:
                firsts.append(f"{extra} {tail}")
        inner = " | ".join(firsts)
        if all(not needed for _, needed in members):
            return (f'"{{" {self._ws} (({inner}) {self._ws})? "}}"' if inner
                    else f'"{{" {self._ws} "}}"')
        return f'"{{" {self._ws} ({inner}) {self._ws} "}}"'

    def _member(self, name: str, schema: Any, path: str) -> str:
        key = literal(json.dumps(name, ensure_ascii=False))
        return self.rules.add(f"{self.name}{path}-kv",
                              f"{key} {self._colon} {self.convert(schema, path)}")

    def _extra_member(self, schema: dict[str, Any], path: str) -> str | None:
        # Strict by default: a schema that lists properties gets only those, unless it says
        # otherwise; one that lists none is a free-form object.
        default = self.allow_extra or "properties" not in schema
        extra = schema.get("additionalProperties", default)
        if extra is False:
            return None
        value = self.convert(extra if isinstance(extra, Mapping) else {}, f"{path}/additional")
        key = primitive(self.rules, "json-string")
        return self.rules.add(f"{self.name}{path}-extra-kv", f"{key} {self._colon} {value}")

    # -- arrays --------------------------------------------------------------------------------
    def _array(self, schema: dict[str, Any], path: str) -> str:
        items = schema.get("items", True)
        prefix = schema.get("prefixItems")
        rest: Any = items
        if isinstance(items, list):  # draft 2019 and older: items as a tuple
            prefix, rest = items, schema.get("additionalItems", True)
        low, high = int(schema.get("minItems", 0)), schema.get("maxItems")
        high = None if high is None else int(high)
        if high is not None and high < low:
            raise GrammarError(f"maxItems < minItems at '{path or '/'}'")
        slots = [self.convert(s, f"{path}/{i}") for i, s in enumerate(prefix or [])]
        rest_rule = None if rest is False else self.convert(rest, f"{path}/items")
        elements = _elements(slots, rest_rule, low, high, path, self._sep, self._ws)
        return f'"[" {self._ws} {elements}"]"'

    # -- scalars -------------------------------------------------------------------------------
    def _string(self, schema: dict[str, Any], path: str) -> str:
        fmt, pattern = schema.get("format"), schema.get("pattern")
        lengths = "minLength" in schema or "maxLength" in schema
        if sum(map(bool, (fmt in STRING_FORMATS, pattern is not None, lengths))) > 1:
            raise GrammarError(f"combining format, pattern and minLength/maxLength at "
                               f"'{path or '/'}' is not supported")
        if pattern is not None:
            return f'"\\"" {pattern_in_string(pattern, self.rules, f"{self.name}{path}-re")} "\\""'
        if fmt in STRING_FORMATS:
            return f'"\\"" {format_rule(self.rules, fmt)} "\\""'
        if lengths:
            low, high = int(schema.get("minLength", 0)), schema.get("maxLength")
            if high is not None and int(high) < low:
                raise GrammarError(f"maxLength < minLength at '{path or '/'}'")
            chars = repeat(primitive(self.rules, "json-char"), low,
                           None if high is None else int(high))
            return f'"\\"" {chars} "\\""'
        return primitive(self.rules, "json-string")

    def _number(self, schema: dict[str, Any], kind: str, path: str) -> str:
        bounded = bounded_number(schema, kind)
        return bounded or primitive(self.rules, "json-int" if kind == "integer" else "json-number")


def _elements(slots: list[str], rest: str | None, low: int, high: int | None,
              path: str, sep: str = _SEP, ws: str = WS) -> str:
    """Array elements: the fixed slots in order, then `rest` items; low..high of them in all.
    The result is empty or ends with the whitespace before the closing bracket."""
    slots = slots if high is None else slots[:high]
    if rest is None and low > len(slots):
        raise GrammarError(f"minItems {low} exceeds the items allowed at '{path or '/'}'")
    tail = ""
    if rest is not None and (high is None or high > len(slots)):
        more_low = max(0, low - len(slots))
        more_high = None if high is None else high - len(slots)
        if not slots:  # the first element has no comma before it
            more = repeat(f"({sep} {rest})", max(0, more_low - 1),
                          None if more_high is None else more_high - 1)
            body = f"{rest} {more}".strip()
            return f"{body} {ws} " if low > 0 else f"({body} {ws})? "
        tail = repeat(f"({sep} {rest})", more_low, more_high)
    if not slots:
        return ""
    body = tail
    for i in range(len(slots) - 1, -1, -1):  # nested: a (, b (, c ...)?)?
        body = f"{slots[i] if i == 0 else f'{sep} {slots[i]}'} {body}".strip()
        if 0 < i and i >= low:
            body = f"({body})?"
    return f"{body} {ws} " if low > 0 else f"({body} {ws})? "


def _types_of(schema: Mapping[str, Any]) -> list[str]:
    declared = schema.get("type")
    types = [declared] if isinstance(declared, str) else list(declared or [])
    if not types:
        types = [t for t, keys in _TYPE_KEYWORDS.items() if any(k in schema for k in keys)]
    if not types:
        return []  # no constraint at all: any JSON value
    if schema.get("nullable") and "null" not in types:
        types.append("null")
    if "integer" in types and "number" in types:
        types.remove("integer")
    return types


def _refuse_unknown(schema: Mapping[str, Any], path: str) -> None:
    unknown = sorted(k for k in schema if k not in _HANDLED and k not in ANNOTATIONS)
    if unknown:
        raise GrammarError(f"JSON Schema keyword {unknown[0]!r} at '{path or '/'}' is not "
                           "supported for structured output")
