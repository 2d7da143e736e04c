"""Response parsing by schema: a JSON Schema with Hugging Face's parsing extensions turns a
model's generated text into content, reasoning and tool calls, for formats no built-in parser
knows (a model's `response_schema`, per model in the config file or `--response-schema`).

The schema follows transformers' response parsing: each node takes its input from the node
above (the root takes the whole output), applies its own parsing keys, and hands the result to
its children:

* `x-regex-substitutions`: [[pattern, replacement], ...] rewrites applied to the text first;
* `x-regex`: one search; named groups give an object, else its one group gives a string
  (no match: the node is absent);
* `x-regex-iterator` (arrays): every match, each one item;
* `x-regex-key-value` (objects): every match of a regex with the groups `key` and `value`;
* `x-parser: "json"` parses the text as JSON (`x-parser-args`: `allow_non_json` keeps text
  that is not JSON, `transform` reshapes the result with a JMESPath expression);
* `const`, `default`, `properties`, `additionalProperties`, `items`, `prefixItems`, `required`
  and the types object, array, string, integer, number, boolean, null and any.

Regexes run with re.DOTALL. An object node that gets a string hands the whole string to each
property. The root's `content`, `reasoning_content` (or `thinking`, `reasoning`) and
`tool_calls` (items `{"function": {"name", "arguments"}}` or `{"name", "arguments"}`) become
the turn.

Streaming: a schema sees the whole text, so a field is only as decided as the text allows.
SchemaParser parses the text so far, and the same text followed by each way it may go on (the
literal markers of the schema's regexes, the rest of a marker the text ends inside, plain
text); what every one of those parses agrees on (the common prefix of each text field, calls
that are complete and identical in all) is streamed, and the rest is held. Text after a
possible tool-call marker is held that way until the call is decided. At the end the whole
text is parsed once more; an output the schema cannot parse comes out as content, unparsed.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import jmespath
import jmespath.exceptions
import jsonschema

from lmserve.chat.callgate import CallGate
from lmserve.chat.reasoning import generation_opens_reasoning
from lmserve.chat.toolparsers import StreamParser
from lmserve.chat.toolparsers.base import new_call_id
from lmserve.core.events import (
    CHANNEL_OUTPUT,
    CHANNEL_REASONING,
    ChatEvent,
    TextDelta,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
)

__all__ = [
    "ParsedMessage", "ResponseSchema", "ResponseSchemaError", "SchemaMismatch", "SchemaParser",
    "load_response_schema", "response_schema_text", "schema_turn_parser",
]

log = logging.getLogger("lmserve.chat")
# The standard library's own regex parser (untyped), for the literal markers of a pattern.
sre_parser: Any = importlib.import_module("re._parser")

TYPES = ("object", "array", "string", "integer", "number", "boolean", "null", "any")
PARSING_KEYS = ("x-regex", "x-regex-iterator", "x-regex-key-value", "x-regex-substitutions",
                "x-parser", "x-parser-args")
PARSERS = ("json",)
PARSER_ARGS = ("allow_non_json", "transform")
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
MESSAGE_KEYS = ("content", *REASONING_KEYS, "tool_calls")
# Streaming: re-parse when the unparsed text reaches this share of the text (1/256), so a
# long output costs O(n) parses in all, not one per step.
_REPARSE_SHARE = 256
# Plain continuations tried besides the schema's markers: more text, a space, a line break, a
# sentence's end (a regex may split at any of them).
_MOST_MARKERS = 12  # the longest literal markers of a schema that streaming probes with
_GENERIC_PROBES = ("x", " ", "\n", "\n\n", ". ", ".\n")


class ResponseSchemaError(ValueError):
    """The schema itself is wrong (found when the server starts)."""


class SchemaMismatch(ValueError):
    """An output the schema cannot parse (bad JSON, a required field missing, a wrong type)."""


@dataclass(frozen=True)
class ParsedMessage:
    content: str | None = None
    reasoning: str | None = None
    tool_calls: tuple[tuple[str, str, bool, str | None], ...] = ()  # name, args, ok, id


@dataclass(frozen=True)
class ResponseSchema:
    schema: Mapping[str, Any]
    source: str  # the schema as canonical JSON text (what the settings carry)
    markers: tuple[str, ...] = field(default=())  # the literal texts of its regexes

    def parse(self, text: str) -> Any:
        """The whole schema over one output (transformers' parse_response)."""
        return _parse(text, self.schema)

    def message(self, text: str) -> ParsedMessage:
        """The turn an output holds; SchemaMismatch if the schema cannot parse it."""
        parsed = self.parse(text)
        if not isinstance(parsed, Mapping):
            raise SchemaMismatch("the schema did not give an object")
        reasoning = next((parsed[k] for k in REASONING_KEYS if parsed.get(k) is not None), None)
        calls = parsed.get("tool_calls") or []
        if not isinstance(calls, list):
            raise SchemaMismatch("tool_calls is not a list")
        return ParsedMessage(_text(parsed.get("content")), _text(reasoning),
                             tuple(c for c in map(_tool_call, calls) if c is not None))


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def _tool_call(item: Any) -> tuple[str, str, bool, str | None] | None:
    if not isinstance(item, Mapping):
        return None
    inner = item.get("function")
    function: Mapping[str, Any] = inner if isinstance(inner, Mapping) else item
    name = function.get("name")
    if not isinstance(name, str) or not name:
        return None
    arguments = function.get("arguments", function.get("parameters", {}))
    call_id = item.get("id") if isinstance(item.get("id"), str) else None
    if isinstance(arguments, str):
        try:
            ok = isinstance(json.loads(arguments), dict)
        except ValueError:
            ok = False
        return name, arguments.strip(), ok, call_id
    return name, json.dumps(arguments, ensure_ascii=False), isinstance(arguments, dict), call_id


# -- loading and checking ---------------------------------------------------------------------

def load_response_schema(value: Any, *, where: str = "response_schema") -> ResponseSchema:
    """A schema from a mapping, JSON text, or the path of a JSON file; ResponseSchemaError
    (naming `where`) when it is not one this parser can run."""
    if isinstance(value, str):
        text = value.strip()
        if not text.startswith("{"):
            path = os.path.expanduser(text)
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except OSError as exc:
                raise ResponseSchemaError(f"{where}: cannot read {value!r}: "
                                          f"{exc.strerror or exc}") from None
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise ResponseSchemaError(f"{where}: not JSON: {exc}") from None
    if not isinstance(value, Mapping):
        raise ResponseSchemaError(f"{where}: expected a JSON object (a schema), a JSON file's "
                                  "path, or inline JSON")
    schema = json.loads(json.dumps(value))  # plain dicts and lists, as JSON has them
    _check_node(schema, where)
    if schema.get("type", "object") != "object":
        raise ResponseSchemaError(f"{where}: the root must be an object schema")
    if not any(k in (schema.get("properties") or {}) for k in MESSAGE_KEYS) and \
            "x-regex" not in schema and "x-parser" not in schema:
        raise ResponseSchemaError(f"{where}: parses none of {', '.join(MESSAGE_KEYS)}")
    try:  # the rest of it must be JSON Schema ("any" is the extensions' own type)
        jsonschema.Draft202012Validator.check_schema(_without_any(schema))
    except jsonschema.SchemaError as exc:
        at = "".join(f"[{p!r}]" for p in exc.path)
        raise ResponseSchemaError(f"{where}{at}: not a valid JSON Schema: {exc.message}") \
            from None
    markers = sorted({m for p in _patterns(schema) for m in _literals(p)}, key=len,
                     reverse=True)[:_MOST_MARKERS]
    return ResponseSchema(schema, json.dumps(schema, ensure_ascii=False), tuple(markers))


def response_schema_text(value: Any) -> str:
    """The config's conversion: the schema checked, as canonical JSON text (errors name the
    node as a JSON path from the root, $)."""
    try:
        return load_response_schema(value, where="$").source
    except ResponseSchemaError as exc:
        raise ResponseSchemaError(str(exc).removeprefix("$: ")) from None


def _check_node(node: Any, where: str) -> None:
    if not isinstance(node, Mapping):
        raise ResponseSchemaError(f"{where}: a schema node must be an object")
    kind = node.get("type")
    if kind is not None and kind not in TYPES:
        raise ResponseSchemaError(f"{where}.type: {kind!r} is not one of {', '.join(TYPES)}")
    unknown = [k for k in node if isinstance(k, str) and k.startswith("x-")
               and k not in PARSING_KEYS]
    if unknown:
        raise ResponseSchemaError(f"{where}: unknown parsing key(s) {', '.join(unknown)} "
                                  f"(known: {', '.join(PARSING_KEYS)})")
    for key in ("x-regex", "x-regex-iterator", "x-regex-key-value"):
        if key in node:
            groups = _compiled(node[key], f"{where}.{key}")
            names = set(groups.groupindex)
            if key == "x-regex-key-value" and not {"key", "value"} <= names:
                raise ResponseSchemaError(f"{where}.{key}: needs the named groups key and value")
            if key != "x-regex-key-value" and not names and groups.groups != 1:
                raise ResponseSchemaError(f"{where}.{key}: needs named groups or exactly one "
                                          f"group, has {groups.groups}")
    if "x-regex-iterator" in node and kind != "array":
        raise ResponseSchemaError(f"{where}: x-regex-iterator needs type array")
    if "x-regex-key-value" in node and kind != "object":
        raise ResponseSchemaError(f"{where}: x-regex-key-value needs type object")
    if "x-regex-substitutions" in node:
        subs = node["x-regex-substitutions"]
        if not isinstance(subs, list) or not all(
                isinstance(s, list) and len(s) == 2 and all(isinstance(x, str) for x in s)
                for s in subs):
            raise ResponseSchemaError(f"{where}.x-regex-substitutions: expected a list of "
                                      "[pattern, replacement] pairs")
        for i, (pattern, replacement) in enumerate(subs):
            compiled = _compiled(pattern, f"{where}.x-regex-substitutions[{i}]")
            try:
                compiled.sub(replacement, "")
            except (re.error, IndexError) as exc:
                raise ResponseSchemaError(f"{where}.x-regex-substitutions[{i}]: bad "
                                          f"replacement: {exc}") from None
    if "x-parser-args" in node and "x-parser" not in node:
        raise ResponseSchemaError(f"{where}: x-parser-args needs x-parser")
    if "x-parser" in node and node["x-parser"] not in PARSERS:
        raise ResponseSchemaError(f"{where}.x-parser: {node['x-parser']!r} is not one of "
                                  f"{', '.join(PARSERS)}")
    args = node.get("x-parser-args", {})
    if not isinstance(args, Mapping) or set(args) - set(PARSER_ARGS):
        raise ResponseSchemaError(f"{where}.x-parser-args: expected an object with "
                                  f"{' and/or '.join(PARSER_ARGS)}")
    if "transform" in args:
        try:
            jmespath.compile(args["transform"])
        except (jmespath.exceptions.JMESPathError, TypeError) as exc:
            raise ResponseSchemaError(f"{where}.x-parser-args.transform: {exc}") from None
    for key, child in (node.get("properties") or {}).items():
        _check_node(child, f"{where}.properties.{key}")
    if isinstance(node.get("additionalProperties"), Mapping):
        _check_node(node["additionalProperties"], f"{where}.additionalProperties")
    if "items" in node:
        _check_node(node["items"], f"{where}.items")
    for i, child in enumerate(node.get("prefixItems") or []):
        _check_node(child, f"{where}.prefixItems[{i}]")


def _without_any(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_any(v) for k, v in node.items()
                if not (k == "type" and v == "any")}
    if isinstance(node, list):
        return [_without_any(v) for v in node]
    return node


@lru_cache(maxsize=256)
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.DOTALL)


def _compiled(pattern: Any, where: str) -> re.Pattern[str]:
    if not isinstance(pattern, str):
        raise ResponseSchemaError(f"{where}: expected a regex string")
    try:
        return _regex(pattern)
    except re.error as exc:
        raise ResponseSchemaError(f"{where}: bad regex {pattern!r}: {exc}") from None


def _patterns(node: Any) -> list[str]:
    found: list[str] = []
    if isinstance(node, dict):
        for key in ("x-regex", "x-regex-iterator", "x-regex-key-value"):
            if isinstance(node.get(key), str):
                found.append(node[key])
        for pair in node.get("x-regex-substitutions") or []:
            found.append(pair[0])
        for key, child in node.items():
            if not key.startswith("x-"):
                found += _patterns(child)
    elif isinstance(node, list):
        for child in node:
            found += _patterns(child)
    return found


def _literals(pattern: str) -> set[str]:
    """The literal runs of two or more characters a regex contains (`<think>`, `</tool_call>`):
    the texts whose arrival may change how the output parses."""
    runs: set[str] = set()

    def walk(items: Any) -> None:
        run = ""
        for op, arg in items:
            if op is sre_parser.LITERAL:
                run += chr(arg)
                continue
            if len(run) >= 2:
                runs.add(run)
            run = ""
            if op is sre_parser.SUBPATTERN:
                walk(arg[-1])
            elif op is sre_parser.BRANCH:
                for branch in arg[1]:
                    walk(branch)
            elif op in (sre_parser.MAX_REPEAT, sre_parser.MIN_REPEAT,
                        sre_parser.POSSESSIVE_REPEAT):
                walk(arg[2])
            elif op in (sre_parser.ASSERT, sre_parser.ASSERT_NOT):
                walk(arg[1])
        if len(run) >= 2:
            runs.add(run)

    walk(sre_parser.parse(pattern, re.DOTALL))
    return runs


# -- parsing ---------------------------------------------------------------------------------

def _groups(match: re.Match[str]) -> Any:
    named = {k: v for k, v in match.groupdict().items() if v is not None}
    if named:
        return named
    if match.re.groups == 1:
        return match.group(1)
    raise SchemaMismatch(f"the regex {match.re.pattern!r} needs one group or named groups")


def _parse(content: Any, node: Mapping[str, Any]) -> Any:  # noqa: C901 (one rule per key)
    if "const" in node:
        return node["const"]
    if content is None:
        return None
    kind = node.get("type")
    parsing = any(k in node for k in PARSING_KEYS if k != "x-parser-args")
    if parsing and not isinstance(content, str):
        raise SchemaMismatch("a parsing node got structured input, not text")
    if "x-regex-substitutions" in node:
        for pattern, replacement in node["x-regex-substitutions"]:
            content = _regex(pattern).sub(replacement, content)
    if "x-regex" in node:
        match = _regex(node["x-regex"]).search(content)
        if match is None:
            return None
        content = _groups(match)
    if "x-regex-iterator" in node:
        items = [_groups(m) for m in _regex(node["x-regex-iterator"]).finditer(content)]
        if not items:
            return None
        content = items
    if "x-regex-key-value" in node:
        pairs = {m.group("key"): m.group("value")
                 for m in _regex(node["x-regex-key-value"]).finditer(content)
                 if m.group("key") is not None}
        if not pairs:
            return None
        content = pairs
    if "x-parser" in node:
        args = node.get("x-parser-args") or {}
        if not isinstance(content, str):
            raise SchemaMismatch("the json parser got structured input")
        try:
            content = json.loads(content)
        except ValueError as exc:
            if not args.get("allow_non_json"):
                raise SchemaMismatch(f"not JSON: {exc}") from None
        if args.get("transform") is not None:
            content = jmespath.search(args["transform"], content)
    if kind == "object":
        return _parse_object(content, node)
    if kind == "array":
        return _parse_array(content, node)
    return _scalar(content, kind)


def _parse_object(content: Any, node: Mapping[str, Any]) -> dict[str, Any]:
    properties: Mapping[str, Any] = node.get("properties") or {}
    parsed: dict[str, Any] = {}
    if isinstance(content, str):
        if not properties:
            raise SchemaMismatch("an object node got text but has no properties to parse it")
        for key, child in properties.items():
            value = _parse(content, child)
            if value is not None:
                parsed[key] = value
    elif isinstance(content, dict):
        for key, child in properties.items():
            if "const" in child:
                parsed[key] = child["const"]
            elif key in content:
                parsed[key] = _parse(content[key], child)
            elif "default" in child:
                parsed[key] = child["default"]
        extra = node.get("additionalProperties", True)
        if extra is not False:
            child = extra if isinstance(extra, Mapping) else {}
            for key, value in content.items():
                if key not in properties:
                    parsed[key] = _parse(value, child)
    else:
        raise SchemaMismatch(f"an object node got {type(content).__name__}")
    missing = [k for k in node.get("required") or [] if k not in parsed]
    if missing:
        raise SchemaMismatch(f"required field(s) missing: {', '.join(missing)}")
    return parsed


def _parse_array(content: Any, node: Mapping[str, Any]) -> list[Any]:
    if not content:
        return []
    if "items" in node:
        if not isinstance(content, list):
            raise SchemaMismatch(f"an array node got {type(content).__name__}")
        return [_parse(item, node["items"]) for item in content]
    if "prefixItems" in node:
        prefix = node["prefixItems"]
        if not isinstance(content, list):
            if len(prefix) != 1:
                raise SchemaMismatch(f"an array node got {type(content).__name__}")
            content = [content]
        if len(content) != len(prefix):
            raise SchemaMismatch(f"{len(content)} items for {len(prefix)} prefixItems")
        return [_parse(item, child) for item, child in zip(content, prefix, strict=True)]
    if isinstance(content, list):
        return content
    raise SchemaMismatch("an array node with no items schema got text")


def _scalar(content: Any, kind: str | None) -> Any:
    if kind in (None, "any"):
        return content
    if kind == "string":
        if not isinstance(content, str):
            raise SchemaMismatch(f"expected a string, got {type(content).__name__}")
        return content
    if kind == "null":
        return None
    if kind == "boolean":
        if isinstance(content, bool):
            return content
        if isinstance(content, str) and content.strip().lower() in ("true", "1", "false", "0"):
            return content.strip().lower() in ("true", "1")
        raise SchemaMismatch(f"not a boolean: {content!r}")
    if isinstance(content, bool):
        raise SchemaMismatch(f"expected a {kind}, got a boolean")
    try:
        if kind == "integer":
            return content if isinstance(content, int) else int(str(content).strip())
        return content if isinstance(content, (int, float)) else float(str(content).strip())
    except ValueError:
        raise SchemaMismatch(f"not a{'n integer' if kind == 'integer' else ' number'}: "
                             f"{content!r}") from None


# -- streaming -------------------------------------------------------------------------------

class SchemaParser:
    """feed(text) -> events, finish() -> events (the StreamParser protocol) for one choice.

    `prefix`: text the prompt already wrote for the model (an opened think tag), parsed as if
    the model had. `tools`: whether the turn offered tools; without, the schema's calls are
    dropped (no client asked for them)."""

    def __init__(self, schema: ResponseSchema, *, prefix: str = "", tools: bool = True) -> None:
        self.schema = schema
        self.tools = tools
        self._text = prefix
        self._unparsed = 0
        self._sent = {CHANNEL_REASONING: "", CHANNEL_OUTPUT: ""}
        self._calls = 0
        self._prefix = prefix

    def feed(self, text: str) -> list[ChatEvent]:
        if not text:
            return []
        self._text += text
        self._unparsed += len(text)
        if self._unparsed * _REPARSE_SHARE < len(self._text):
            return []
        self._unparsed = 0
        views = []
        for probe in self._probes():
            try:
                views.append(self.schema.message(self._text + probe))
            except (SchemaMismatch, jmespath.exceptions.JMESPathError, RecursionError):
                continue
        return self._advance(views, final=False)

    def finish(self) -> list[ChatEvent]:
        try:
            view = self.schema.message(self._text)
        except (SchemaMismatch, jmespath.exceptions.JMESPathError, RecursionError) as exc:
            log.warning("response_schema could not parse the output (%s); it is sent as "
                        "content", exc)
            view = ParsedMessage(content=self._text[len(self._prefix):])
        return self._advance([view], final=True)

    def _probes(self) -> list[str]:
        """The ways the text may go on that could change how it parses."""
        text = self._text
        markers = self.schema.markers
        opened = list(markers)  # a marker next, or the rest of one the text ends inside
        for marker in markers:
            opened += [marker[k:] for k in range(min(len(marker) - 1, len(text)), 0, -1)
                       if text.endswith(marker[:k])]
        # ... each alone, and followed by text and a marker (a block opened and closed)
        probes = ["", *_GENERIC_PROBES, *opened,
                  *(first + "x" + then for first in opened for then in markers)]
        return list(dict.fromkeys(probes))

    def _advance(self, views: list[ParsedMessage], *, final: bool) -> list[ChatEvent]:
        if not views:
            return []
        events: list[ChatEvent] = []
        for channel in (CHANNEL_REASONING, CHANNEL_OUTPUT):
            values = [(v.reasoning if channel == CHANNEL_REASONING else v.content) or ""
                      for v in views]
            decided = os.path.commonprefix(values)
            sent = self._sent[channel]
            if len(decided) > len(sent) and decided.startswith(sent):
                events.append(TextDelta(channel, decided[len(sent):]))
                self._sent[channel] = decided
            elif final and not decided.startswith(sent):
                log.warning("response_schema: the final %s differs from what was streamed",
                            channel)
        if self.tools:
            events += self._new_calls(views)
        return events

    def _new_calls(self, views: list[ParsedMessage]) -> list[ChatEvent]:
        events: list[ChatEvent] = []
        while all(len(v.tool_calls) > self._calls for v in views):
            call = views[0].tool_calls[self._calls]
            if any(v.tool_calls[self._calls][:3] != call[:3] for v in views[1:]):
                break
            name, arguments, ok, call_id = call
            index = self._calls
            events += [ToolCallStart(index, call_id or new_call_id(), name),
                       ToolCallDelta(index, arguments), ToolCallEnd(index, arguments, ok)]
            self._calls += 1
        return events


def schema_turn_parser(schema: ResponseSchema, tool_format: str | None,
                       tags: tuple[str, str] | None, prompt: str | None, *,
                       parallel: bool = True) -> StreamParser:
    """One choice's parser for a model with a response_schema, in place of the built-in
    reasoning and tool-call parsers (chat.turn.turn_parser): a prompt that opened the think
    block hands its opening tag to the schema; with tools offered, chat.callgate ends the turn
    at a repeated call as it does for the built-in parsers."""
    opened = tags is not None and prompt is not None and generation_opens_reasoning(prompt, tags)
    parser = SchemaParser(schema, prefix=tags[0] if opened and tags else "",
                          tools=tool_format is not None)
    return CallGate(parser, parallel=parallel) if tool_format is not None else parser
