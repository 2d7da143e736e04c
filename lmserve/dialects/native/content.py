"""Pure translation of a native message's content: a string, or a list of typed parts (the
shape of Flama's native LLM protocol):

    {"type": "text", "text": "..."}
    {"type": "image:url", "url": "https://..."}      (also a data: or file:// URL)
    {"type": "image:uri", "data": "<base64 or a data: URI>", "format": "png"|"jpeg"|"gif"|"webp"}
    {"type": "audio:url", "url": "..."}
    {"type": "audio:uri", "data": "<base64 or a data: URI>", "format": "wav"|"mp3"}

Text parts are joined with newlines; each media part becomes an ImageInput placed at its
offset in that text (as OpenAI's content arrays are read), so the media marker lands where the
part stood. `format` is the declared type the media policy checks the bytes against
(chat.media); it may be left out when `data` is a data: URI that names its type.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lmserve.chat.media import canonical_type
from lmserve.core.errors import LmserveError, invalid
from lmserve.core.images import (
    AUDIO_FORMATS,
    ImageInput,
    MediaKind,
    image_from_base64,
    image_from_url,
    joined_offset,
)

IMAGE_FORMATS = {"png": "image/png", "jpeg": "image/jpeg", "jpg": "image/jpeg",
                 "gif": "image/gif", "webp": "image/webp"}
_FORMATS: dict[MediaKind, dict[str, str]] = {"image": IMAGE_FORMATS, "audio": AUDIO_FORMATS}
# each part type: its required fields, then its optional ones
_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "text": (("text",), ()),
    "image:url": (("url",), ()), "audio:url": (("url",), ()),
    "image:uri": (("data",), ("format",)), "audio:uri": (("data",), ("format",)),
}
PART_TYPES = tuple(_FIELDS)


def content_parts(content: str | list[Any], param: str, *, media: bool
                  ) -> tuple[str, tuple[ImageInput, ...]]:
    """The text of `content` and its media in order. `param` names the content field
    (`messages[0].content`, `prompt`); `media`: whether the message may carry media parts
    (user turns), else only text parts are taken."""
    if isinstance(content, str):
        return content, ()
    texts: list[str] = []
    found: list[ImageInput] = []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        kind = _part_type(part, where)
        _check_fields(part, kind, where)
        if kind == "text":
            texts.append(part["text"])
            continue
        if not media:
            raise invalid(f"{where}.type: a '{kind}' part is not supported in this message; "
                          "media parts go in user messages (send 'text' parts here)",
                          param=f"{where}.type", code="unsupported_content")
        medium: MediaKind = "image" if kind.startswith("image:") else "audio"
        item = _url(part, where, medium) if kind.endswith(":url") else \
            _inline(part, where, medium)
        found.append(item.at(joined_offset(texts)))
    return "\n".join(texts), tuple(found)


def _part_type(part: Any, where: str) -> str:
    if not isinstance(part, Mapping):
        raise invalid(f"{where} must be an object with a 'type' ({', '.join(PART_TYPES)})",
                      param=where, code="invalid_value")
    kind = part.get("type")
    if kind is None:
        raise invalid(f"{where}.type is missing; a content part is one of "
                      f"{', '.join(PART_TYPES)}", param=f"{where}.type",
                      code="missing_required_parameter")
    if not isinstance(kind, str) or kind not in _FIELDS:
        raise invalid(f"{where}.type: unknown content part type {kind!r}; send one of "
                      f"{', '.join(PART_TYPES)}", param=f"{where}.type",
                      code="unsupported_content")
    return kind


def _check_fields(part: Mapping[str, Any], kind: str, where: str) -> None:
    required, optional = _FIELDS[kind]
    takes = ("type", *required, *optional)
    for key in part:
        if key not in takes:
            raise invalid(f"{where}.{key}: not a field of a '{kind}' part (it takes "
                          f"{', '.join(takes)})", param=f"{where}.{key}", code="invalid_value")
    for key in (*required, *optional):
        value = part.get(key)
        if value is None and key in required:
            raise invalid(f"{where}.{key} is missing: a '{kind}' part needs "
                          f"{' and '.join(required)}", param=f"{where}.{key}",
                          code="missing_required_parameter")
        if value is not None and not isinstance(value, str):
            raise invalid(f"{where}.{key} must be a string", param=f"{where}.{key}",
                          code="invalid_value")


def _url(part: Mapping[str, Any], where: str, kind: MediaKind) -> ImageInput:
    return image_from_url(part["url"], f"{where}.url", kind=kind)


def _inline(part: Mapping[str, Any], where: str, kind: MediaKind) -> ImageInput:
    """An image:uri or audio:uri part: base64, or a data: URI; `format` is the declared type,
    which the bytes must agree with (chat.media), as must a data: URI's own type."""
    data, fmt, param = part["data"], part.get("format"), f"{where}.data"
    declared = _format(fmt, f"{where}.format", kind) if fmt is not None else None
    if not data.lower().startswith("data:"):
        if declared is None:
            raise _no_format(where, kind)
        return image_from_base64(data, param, declared, kind=kind)
    item = image_from_url(data, param, kind=kind)
    if declared is None:
        if item.media_type is None:
            raise _no_format(where, kind)
        return item
    if item.media_type is not None and \
            canonical_type(item.media_type, param, kind) != canonical_type(declared, param, kind):
        raise invalid(f"{where}.format: '{fmt}' does not match the data URI's type "
                      f"'{item.media_type}'", param=f"{where}.format", code=f"invalid_{kind}")
    return image_from_base64(item.data, param, declared, kind=kind)


def _format(fmt: str, param: str, kind: MediaKind) -> str:
    formats = _FORMATS[kind]
    media_type = formats.get(fmt.lower())
    if media_type is None:
        names = [name for name in formats if name != "jpg"]
        raise invalid(f"{param}: unsupported {kind} format {fmt!r}; send one of "
                      f"{', '.join(names)}", param=param, code="unsupported_media_type")
    return media_type


def _no_format(where: str, kind: MediaKind) -> LmserveError:
    names = ", ".join(name for name in _FORMATS[kind] if name != "jpg")
    return invalid(f"{where}.format is missing: an inline {kind} part needs its format "
                   f"({names}) unless its data is a data: URI that names its type",
                   param=f"{where}.format", code="missing_required_parameter")
