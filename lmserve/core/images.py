"""Media attached to chat messages (images and audio clips), as the client sent them.

Nothing here decodes, reads or fetches anything: `lmserve.chat.media` checks an ImageInput
(one dataclass for both kinds: its `kind` says image or audio) against the server's media
policy (types, sizes, allowed hosts, the media directory) and loads its bytes. The helpers
below only sort what a dialect received into the three sources.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from lmserve.core.errors import invalid

# base64: bytes inline in the request; url: an http(s) or file:// URL; path: a local file
ImageSource = Literal["base64", "url", "path"]
MediaKind = Literal["image", "audio"]
DETAILS = ("auto", "low", "high")
MEDIA_MARKER = "<__media__>"  # where media goes in a rendered prompt (llama.cpp mtmd's)
_URL_SCHEMES = ("http", "https", "file")
# OpenAI's input_audio formats (llama.cpp's decoder reads FLAC too, but trusts its header's
# length: chat.audio)
AUDIO_FORMATS = {"wav": "audio/wav", "mp3": "audio/mpeg"}


@dataclass(frozen=True)
class ImageInput:
    source: ImageSource
    data: str  # the base64 text, the URL or the path
    media_type: str | None = None  # as the client declared it; None: read from the bytes
    detail: str | None = None  # OpenAI's resolution hint
    param: str = "images"  # the request field it came from, for errors
    offset: int = 0  # where it stands in its message's text, in characters
    kind: MediaKind = "image"  # an image or an audio clip

    def at(self, offset: int) -> ImageInput:
        return dataclasses.replace(self, offset=offset)

    @property
    def remote(self) -> bool:
        """An http(s) URL: downloaded before the prompt is prepared (backend fetch_media)."""
        return self.source == "url" and self.data[:5].lower() != "file:"


def image_from_url(url: object, param: str, *, detail: object = None,
                   detail_param: str | None = None, kind: MediaKind = "image") -> ImageInput:
    """A `data:` URL becomes inline base64; http(s) and file:// URLs stay URLs."""
    if not isinstance(url, str) or not url:
        raise invalid(f"{param} must be a non-empty URL string", param=param)
    checked_detail = _detail(detail, detail_param or f"{param}.detail")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return _data_url(url, param, checked_detail, kind)
    if scheme not in _URL_SCHEMES:
        raise invalid(f"{param}: an {kind} URL must be a data: URL (base64), an http(s) URL or "
                      f"a file:// URL, not {_preview(url)}", param=param,
                      code=f"invalid_{kind}")
    return ImageInput("url", url, detail=checked_detail, param=param, kind=kind)


def image_from_base64(data: object, param: str, media_type: object = None,
                      kind: MediaKind = "image") -> ImageInput:
    if not isinstance(data, str) or not data:
        raise invalid(f"{param} must be a non-empty base64 string", param=param)
    if media_type is not None and not isinstance(media_type, str):
        raise invalid(f"{param}: media_type must be a string", param=param)
    declared = media_type.lower() if isinstance(media_type, str) and media_type else None
    return ImageInput("base64", data, media_type=declared, param=param, kind=kind)


def image_from_path(path: object, param: str, kind: MediaKind = "image") -> ImageInput:
    if not isinstance(path, str) or not path:
        raise invalid(f"{param} must be a non-empty file path", param=param)
    return ImageInput("path", path, param=param, kind=kind)


def audio_from_url(url: object, param: str) -> ImageInput:
    """An audio clip by URL (a data: URL with base64, an http(s) or a file:// URL)."""
    return image_from_url(url, param, kind="audio")


def audio_from_input(value: object, param: str) -> ImageInput:
    """OpenAI's `input_audio` object, {"data": base64, "format": "wav" | "mp3"}; without a
    format, the bytes say what they are."""
    if not isinstance(value, dict):
        raise invalid(f"{param} must be an object with base64 'data' and a 'format' "
                      f"({', '.join(AUDIO_FORMATS)})", param=param)
    fmt = value.get("format")
    if fmt is not None and (not isinstance(fmt, str) or fmt.lower() not in AUDIO_FORMATS):
        raise invalid(f"{param}.format must be one of {', '.join(AUDIO_FORMATS)}, not "
                      f"{fmt!r}", param=f"{param}.format", code="unsupported_media_type")
    media_type = AUDIO_FORMATS[fmt.lower()] if isinstance(fmt, str) else None
    return image_from_base64(value.get("data"), f"{param}.data", media_type, kind="audio")


def joined_offset(texts: list[str]) -> int:
    """Where an image stands that follows these text parts once they are joined with "\\n"."""
    return len("\n".join(texts))


def _data_url(url: str, param: str, detail: str | None, kind: MediaKind) -> ImageInput:
    example = "data:image/png;base64,..." if kind == "image" else "data:audio/wav;base64,..."
    header, comma, payload = url[len("data:"):].partition(",")
    if not comma:
        raise invalid(f"{param}: a data URL needs a comma before its data ({example})",
                      param=param, code=f"invalid_{kind}")
    fields = [f.strip().lower() for f in header.split(";")]
    if "base64" not in fields[1:]:
        raise invalid(f"{param}: {kind} data URLs must be base64-encoded ({example})",
                      param=param, code=f"invalid_{kind}")
    return ImageInput("base64", payload, media_type=fields[0] or None, detail=detail,
                      param=param, kind=kind)


def _detail(detail: object, param: str) -> str | None:
    if detail is None or detail in DETAILS:
        return detail
    raise invalid(f"{param} must be one of {', '.join(DETAILS)}", param=param)


def _preview(url: str) -> str:
    return repr(url if len(url) <= 40 else url[:40] + "...")


@dataclass(frozen=True, eq=False)
class MediaSpan:
    """An image's (or an audio window's) place in a prompt's token ids: `n_tokens` positions
    from `start`, whose ids are stand-ins derived from the content hash `key` (so prefix reuse
    compares media by content). `chunk` is the engine's handle to the encoded input (opaque
    here)."""

    start: int
    n_tokens: int
    key: str
    chunk: object

    @property
    def end(self) -> int:
        return self.start + self.n_tokens
