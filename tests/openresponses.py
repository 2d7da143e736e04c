"""The published OpenAPI document of the Responses API (Open Responses, the spec its public
compliance suite checks against), as jsonschema validators for the response object, each
streaming event and the WebSocket error event.

The document ships in the pinned dev dependency llm-comply (llm_comply/specs/openresponses.json),
so the check runs offline. Two event families lmserve sends under OpenAI's own names, which this
document names otherwise, are checked against the official openai client's types instead
(validated strictly): reasoning text (OpenAI's response.reasoning_text.*, Open Responses'
response.reasoning.*). Any other event type the document does not define fails.
"""

from __future__ import annotations

import json
from functools import cache
from importlib.resources import files
from typing import Any

import jsonschema
import pydantic
from openai.types.responses import ResponseStreamEvent
from referencing import Registry
from referencing.jsonschema import DRAFT202012

SPEC_URI = "urn:lmserve:openresponses"
OPENAI_ONLY = {"response.reasoning_text.delta", "response.reasoning_text.done"}


@cache
def spec() -> dict[str, Any]:
    text = (files("llm_comply") / "specs" / "openresponses.json").read_text(encoding="utf-8")
    document: dict[str, Any] = json.loads(text)
    return document


@cache
def _registry() -> Registry:
    return Registry().with_resource(SPEC_URI, DRAFT202012.create_resource(spec()))


@cache
def validator(name: str) -> jsonschema.Draft202012Validator:
    """The validator of one component schema (ResponseResource, ...)."""
    assert name in spec()["components"]["schemas"], name
    return jsonschema.Draft202012Validator(
        {"$ref": f"{SPEC_URI}#/components/schemas/{name}"}, registry=_registry())


@cache
def event_schemas() -> dict[str, str]:
    """Streaming event type -> the name of its schema, from the create operation's stream."""
    stream = spec()["paths"]["/responses"]["post"]["responses"]["200"]["content"]
    names = [ref["$ref"].rsplit("/", 1)[1] for ref in stream["text/event-stream"]["schema"]
             ["oneOf"]]
    schemas = spec()["components"]["schemas"]
    return {kind: name for name in names
            for kind in schemas[name]["properties"]["type"]["enum"]}


def check(name: str, instance: Any) -> None:
    errors = sorted(validator(name).iter_errors(instance), key=lambda e: list(e.path))
    assert not errors, f"not a valid {name}:\n" + "\n".join(
        f"  at {'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message[:300]}"
        for e in errors[:10])


def check_response(response: Any) -> None:
    check("ResponseResource", response)


def check_event(event: dict[str, Any]) -> None:
    """One streamed event (SSE data or a WebSocket message), by its type."""
    kind = event.get("type")
    if kind in OPENAI_ONLY:
        pydantic.TypeAdapter(ResponseStreamEvent).validate_python(event, strict=True)
        return
    assert kind in event_schemas(), f"event type {kind!r} is not in the Responses API spec"
    check(event_schemas()[kind], event)


def check_ws_error(event: dict[str, Any]) -> None:
    """A request refused over the WebSocket (before any response event)."""
    check("WebSocketErrorEvent", event)
