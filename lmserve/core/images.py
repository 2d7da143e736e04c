"""Images attached to chat messages, as the client sent them.

Nothing here decodes, reads or fetches anything: `lmserve.chat.media` checks an ImageInput
against the server's media policy (types, sizes, allowed hosts, the media directory) and
loads its bytes. The helpers below only sort what a dialect received into the three sources.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from lmserve.core.errors import invalid

# base64: bytes inline in the request; url: an http(s) or file:// URL; path: a local file
ImageSource = Literal["base64", "url", "path"]
DETAILS = ("auto", "low", "high")
MEDIA_MARKER = "<__media__>"  # where an image goes in a rendered prompt (llama.cpp mtmd's)
_URL_SCHEMES = ("http", "https", "file")


@dataclass(frozen=True)
class ImageInput:
    source: ImageSource
    data: str  # the base64 text, the URL or the path
    media_type: str | None = None  # as the client declared it; None: read from the bytes
    detail: str | None = None  # OpenAI's resolution hint
    param: str = "images"  # the request field it came from, for errors
    offset: int = 0  # where it stands in its message's text, in characters

    def at(self, offset: int) -> ImageInput:
        return dataclasses.replace(self, offset=offset)

    @property
    def remote(self) -> bool:
        """An http(s) URL: downloaded before the prompt is prepared (backend fetch_media)."""
        return self.source == "url" and self.data[:5].lower() != "file:"


def image_from_url(url: object, param: str, *, detail: object = None,
                   detail_param: str | None = None) -> ImageInput:
    """A `data:` URL becomes inline base64; http(s) and file:// URLs stay URLs."""
    if not isinstance(url, str) or not url:
        raise invalid(f"{param} must be a non-empty URL string", param=param)
    checked_detail = _detail(detail, detail_param or f"{param}.detail")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return _data_url(url, param, checked_detail)
    if scheme not in _URL_SCHEMES:
        raise invalid(f"{param}: an image URL must be a data: URL (base64), an http(s) URL or a "
                      f"file:// URL, not {_preview(url)}", param=param, code="invalid_image")
    return ImageInput("url", url, detail=checked_detail, param=param)


def image_from_base64(data: object, param: str, media_type: object = None) -> ImageInput:
    if not isinstance(data, str) or not data:
        raise invalid(f"{param} must be a non-empty base64 string", param=param)
    if media_type is not None and not isinstance(media_type, str):
        raise invalid(f"{param}: media_type must be a string", param=param)
    declared = media_type.lower() if isinstance(media_type, str) and media_type else None
    return ImageInput("base64", data, media_type=declared, param=param)


def image_from_path(path: object, param: str) -> ImageInput:
    if not isinstance(path, str) or not path:
        raise invalid(f"{param} must be a non-empty file path", param=param)
    return ImageInput("path", path, param=param)


def joined_offset(texts: list[str]) -> int:
    """Where an image stands that follows these text parts once they are joined with "\\n"."""
    return len("\n".join(texts))


def _data_url(url: str, param: str, detail: str | None) -> ImageInput:
    header, comma, payload = url[len("data:"):].partition(",")
    if not comma:
        raise invalid(f"{param}: a data URL needs a comma before its data "
                      "(data:image/png;base64,...)", param=param, code="invalid_image")
    fields = [f.strip().lower() for f in header.split(";")]
    if "base64" not in fields[1:]:
        raise invalid(f"{param}: image data URLs must be base64-encoded "
                      "(data:image/png;base64,...)", param=param, code="invalid_image")
    return ImageInput("base64", payload, media_type=fields[0] or None, detail=detail,
                      param=param)


def _detail(detail: object, param: str) -> str | None:
    if detail is None or detail in DETAILS:
        return detail
    raise invalid(f"{param} must be one of {', '.join(DETAILS)}", param=param)


def _preview(url: str) -> str:
    return repr(url if len(url) <= 40 else url[:40] + "...")


@dataclass(frozen=True, eq=False)
class MediaSpan:
    """An image's place in a prompt's token ids: `n_tokens` positions from `start`, whose ids
    are stand-ins derived from the image's content hash `key` (so prefix reuse compares
    images by content). `chunk` is the engine's handle to the encoded input (opaque here)."""

    start: int
    n_tokens: int
    key: str
    chunk: object

    @property
    def end(self) -> int:
        return self.start + self.n_tokens
