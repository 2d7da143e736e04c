"""Unknown request fields: ignored, and named in the X-Lmserve-Ignored-Fields header.

The policy (docs/architecture.md, "Unknown fields"): a field of a dialect's real API that
lmserve does not implement is refused by that dialect's adapter with 400 naming it; a field
no schema knows is ignored, as OpenAI-compatible servers do, and named here so a caller can
see that it had no effect. Only models that allow extra fields report them (strict models
refuse unknown fields themselves)."""

from __future__ import annotations

import json
import types
import typing
from typing import Any, Union

from fastapi import Request, Response
from pydantic import BaseModel

IGNORED_FIELDS_HEADER = "X-Lmserve-Ignored-Fields"
_MAX_NAMED = 32  # a header stays short whatever a client sends


def unknown_fields(model: type[BaseModel], value: Any, path: str = "") -> list[str]:
    """Dotted paths (`stream_options.foo`, `messages[1].bar`) of the keys in `value` that
    `model` does not declare, walking the declared fields whose type is a model (or a list
    of one model). A field typed as a union of several models is not walked: which one
    applies is the validator's call."""
    if not isinstance(value, dict):
        return []
    declared = {(info.alias or name): info for name, info in model.model_fields.items()}
    lenient = model.model_config.get("extra") == "allow"
    found: list[str] = []
    for key, item in value.items():
        where = f"{path}.{key}" if path else str(key)
        info = declared.get(key)
        if info is None:
            if lenient:
                found.append(where)
            continue
        inner, many = _one_model(info.annotation)
        if inner is None:
            continue
        if many and isinstance(item, list):
            for index, element in enumerate(item):
                found += unknown_fields(inner, element, f"{where}[{index}]")
        elif not many:
            found += unknown_fields(inner, item, where)
    return found


def _one_model(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """The model an annotation holds (X, X | None, list[X], list[X] | None), and whether it
    is a list of them; (None, False) for anything else."""
    options = [a for a in _union_args(annotation) if a is not type(None)]
    if len(options) != 1:
        return None, False
    only = _strip_annotated(options[0])
    if isinstance(only, type) and issubclass(only, BaseModel):
        return only, False
    if typing.get_origin(only) is list:
        (element,) = typing.get_args(only) or (Any,)
        element = _strip_annotated(element)
        if isinstance(element, type) and issubclass(element, BaseModel):
            return element, True
    return None, False


def _union_args(annotation: Any) -> tuple[Any, ...]:
    annotation = _strip_annotated(annotation)
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _strip_annotated(annotation: Any) -> Any:
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


async def note_ignored_fields(request: Request, response: Response,
                              model: type[BaseModel] | None) -> Response:
    """Add the header naming the body's unknown fields to a route's response (before it is
    sent: a stream's headers go out with its first byte)."""
    if model is None or model.model_config.get("extra") != "allow":
        return response
    try:
        body = json.loads(await request.body())
    except ValueError:
        return response
    names = unknown_fields(model, body)
    if names:
        shown = names[:_MAX_NAMED] + ([f"...{len(names) - _MAX_NAMED} more"]
                                      if len(names) > _MAX_NAMED else [])
        response.headers[IGNORED_FIELDS_HEADER] = ",".join(_header_safe(n) for n in shown)
    return response


def _header_safe(name: str) -> str:
    """A key as printable ASCII without commas: JSON escapes for the rest."""
    return json.dumps(name)[1:-1].replace(",", "\\u002c")


def body_model(route: Any) -> type[BaseModel] | None:
    """The pydantic model of a route's JSON body, if it has one."""
    field = getattr(route, "body_field", None)
    annotation = getattr(getattr(field, "field_info", None), "annotation", None)
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) \
        else None
