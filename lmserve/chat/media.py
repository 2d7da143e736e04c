"""Image input policy: what a request may attach, checked before anything is fetched.

check_images() runs for every chat request and needs no network and no file read beyond a
stat: the number of images, inline bytes (base64-decoded, size-limited, sniffed against the
declared type), remote URLs (http or https, host on the allow list) and local files (only
inside the media directory, after symlinks and `..` are resolved). chat.media_load produces
the bytes. A model without a vision projector refuses valid images with no_projector().
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from lmserve.core.errors import LmserveError, invalid
from lmserve.core.images import ImageInput
from lmserve.core.request import ChatMessage

MIB = 1 << 20
MEDIA_TYPES = ("image/png", "image/jpeg", "image/webp", "image/gif")
_TYPE_ALIASES = {"image/jpg": "image/jpeg", "image/pjpeg": "image/jpeg"}
_DOMAIN = re.compile(r"(\*\.)?[a-z0-9_:.-]+")
MEDIA_KEYS = ("media_max_bytes", "media_allowed_domains", "media_dir", "media_timeout",
              "media_max_images",  # configuration keys (flags, LMSERVE_* env, file)
              "image_max_bytes", "image_timeout_seconds")  # seed 003's names for two of them


@dataclass(frozen=True)
class MediaPolicy:
    max_bytes: int = 20 * MIB  # the decoded size of one image
    allowed_domains: tuple[str, ...] = ()  # hosts URLs may name; "*.example.com": subdomains
    local_dir: str | None = None  # local files are readable only under this directory
    timeout: float = 10.0  # seconds for one download, redirects included
    max_images: int = 16  # per request

    def allows_host(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return any(host.endswith(d[1:]) if d.startswith("*.") else host == d
                   for d in self.allowed_domains)


@dataclass(frozen=True)
class LoadedImage:
    data: bytes
    media_type: str
    image: ImageInput


# -- configuration ------------------------------------------------------------------------

def media_policy(values: Mapping[str, Any]) -> MediaPolicy:
    """A policy from the media_* configuration keys (flags, env, file); ValueError names the
    key that is wrong."""
    unknown = sorted(set(values) - set(MEDIA_KEYS))
    if unknown:
        raise ValueError(f"unknown configuration key {unknown[0]!r}")
    default = MediaPolicy()
    policy = MediaPolicy(
        max_bytes=_number(values, "media_max_bytes", int,
                          _number(values, "image_max_bytes", int, default.max_bytes)),
        allowed_domains=_domains(values.get("media_allowed_domains") or ()),
        local_dir=_directory(values.get("media_dir")),
        timeout=_number(values, "media_timeout", float,
                        _number(values, "image_timeout_seconds", float, default.timeout)),
        max_images=_number(values, "media_max_images", int, default.max_images))
    if policy.max_bytes < 1 or policy.timeout <= 0 or policy.max_images < 0:
        raise ValueError("media_max_bytes and media_timeout must be positive and "
                         "media_max_images at least 0")
    return policy


def _number(values: Mapping[str, Any], key: str, kind: type, default: Any) -> Any:
    value = values.get(key)
    try:
        return default if value is None else kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be {kind.__name__}, got {value!r}") from None


def _domains(value: str | Sequence[str]) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else list(value)
    domains = tuple(str(d).strip().lower().rstrip(".") for d in items if str(d).strip())
    for domain in domains:
        if not _DOMAIN.fullmatch(domain):
            raise ValueError(f"media_allowed_domains: {domain!r} is not a host name (write "
                             "example.com, or *.example.com for its subdomains)")
    return domains


def _directory(value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(str(value)).expanduser().resolve()
    if not path.is_dir():
        raise ValueError(f"media_dir {value!r} is not a directory")
    return str(path)


# -- checks (no network, no file contents) --------------------------------------------------

def check_images(messages: Sequence[ChatMessage] | None, policy: MediaPolicy
                 ) -> list[ImageInput]:
    """Every image of the conversation, each checked against the policy."""
    images = [image for message in messages or () for image in message.images]
    if len(images) > policy.max_images:
        extra = images[policy.max_images]
        raise invalid(f"{extra.param}: this server takes at most {policy.max_images} images per "
                      f"request (--media-max-images); this request has {len(images)}",
                      param=extra.param, code="too_many_images")
    for image in images:
        check_image(image, policy)
    return images


def check_image(image: ImageInput, policy: MediaPolicy) -> None:
    if image.source == "base64":
        decode_inline(image, policy)
    elif is_local(image):
        local_file(image, policy)
    else:
        check_remote_url(image.data, policy, image.param)


def no_projector(model: str, image: ImageInput) -> LmserveError:
    return invalid(f"{image.param}: model '{model}' has no vision projector; it cannot take "
                   "image input", param=image.param, code="model_not_multimodal")


def decode_inline(image: ImageInput, policy: MediaPolicy) -> LoadedImage:
    declared = canonical_type(image.media_type, image.param) if image.media_type else None
    text = "".join(image.data.split())  # clients may wrap base64 into lines
    if len(text) // 4 * 3 > policy.max_bytes + 2:  # refused before decoding anything
        raise too_large(image.param, policy)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(f"{image.param}: the image data is not valid base64", param=image.param,
                      code="invalid_image") from None
    return verified(data, declared, image, policy)


def local_file(image: ImageInput, policy: MediaPolicy) -> Path:
    """The file's resolved path; refused unless it lies inside the media directory."""
    param = image.param
    if policy.local_dir is None:
        raise invalid(f"{param}: local image files are not allowed on this server; send the "
                      "image inline as base64, or start the server with --media-dir DIR to "
                      "allow files under DIR", param=param, code="path_not_allowed")
    raw = _file_url_path(image.data, param) if image.source == "url" else image.data
    try:
        if "\x00" in raw:
            raise ValueError("NUL in path")
        base = Path(policy.local_dir).resolve()
        target = (base / raw).resolve()
        inside = target.is_relative_to(base)
        found = inside and target.is_file()
        size = target.stat().st_size if found else 0
    except (OSError, RuntimeError, ValueError):
        raise invalid(f"{param}: the path cannot be read", param=param,
                      code="path_not_allowed") from None
    if not inside:
        raise invalid(f"{param}: the path leads outside the media directory", param=param,
                      code="path_not_allowed")
    if not found:
        raise invalid(f"{param}: there is no image file at this path in the media directory",
                      param=param, code="invalid_image")
    if size > policy.max_bytes:
        raise too_large(param, policy)
    return target


def check_remote_url(url: str, policy: MediaPolicy, param: str) -> None:
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        _ = parts.port  # a malformed port raises here
    except ValueError:
        raise invalid(f"{param}: the URL is malformed", param=param,
                      code="invalid_image") from None
    if parts.scheme.lower() not in ("http", "https") or not host:
        raise invalid(f"{param}: only http and https URLs with a host can be fetched",
                      param=param, code="invalid_image")
    if not policy.allowed_domains:
        raise invalid(f"{param}: image URLs are not allowed on this server; send the image "
                      "inline as base64, or start the server with --media-allowed-domain "
                      f"{host}", param=param, code="url_not_allowed")
    if not policy.allows_host(host):
        raise invalid(f"{param}: host '{host}' is not among this server's allowed media "
                      "domains (--media-allowed-domain)", param=param, code="url_not_allowed")


def canonical_type(media_type: str, param: str) -> str:
    value = media_type.split(";")[0].strip().lower()
    value = _TYPE_ALIASES.get(value, value)
    if value not in MEDIA_TYPES:
        raise invalid(f"{param}: unsupported image type '{media_type}'; send "
                      f"{', '.join(MEDIA_TYPES)}", param=param, code="unsupported_media_type")
    return value


def sniff(data: bytes) -> str | None:
    """The image type the bytes themselves show, whatever the client called them."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def verified(data: bytes, declared: str | None, image: ImageInput, policy: MediaPolicy
             ) -> LoadedImage:
    if len(data) > policy.max_bytes:
        raise too_large(image.param, policy)
    actual = sniff(data)
    if actual is None:
        raise invalid(f"{image.param}: the data is not a PNG, JPEG, WebP or GIF image",
                      param=image.param, code="invalid_image")
    if declared is not None and declared != actual:
        raise invalid(f"{image.param}: the image is declared as {declared} but its data is "
                      f"{actual}", param=image.param, code="invalid_image")
    return LoadedImage(data, actual, image)


def is_local(image: ImageInput) -> bool:
    return image.source == "path" or image.data[:5].lower() == "file:"


def _file_url_path(url: str, param: str) -> str:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise invalid(f"{param}: a file URL must name a local path (file:///...)",
                      param=param, code="path_not_allowed")
    return unquote(parts.path)


def too_large(param: str, policy: MediaPolicy) -> LmserveError:
    return invalid(f"{param}: the image is larger than this server's limit of "
                   f"{policy.max_bytes} bytes (--media-max-bytes)", param=param,
                   code="image_too_large")
