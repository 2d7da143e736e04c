"""Media input policy (images and audio clips): what a request may attach, checked before
anything is fetched.

check_images() runs for every chat request and needs no network and no file read beyond a
stat: the number of media parts, inline bytes (base64-decoded, size-limited by kind, sniffed
against the declared type; chat.audio for audio), remote URLs (http or https, host on the
allow list) and local files (only inside the media directory, after symlinks and `..` are
resolved). chat.media_load produces the bytes. A model whose projector does not take a
kind refuses it with no_projector() (check_kinds()).
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

from lmserve.chat.audio import canonical_audio_type, check_wav, sniff_audio, type_name
from lmserve.core.errors import LmserveError, invalid
from lmserve.core.images import ImageInput, MediaKind
from lmserve.core.request import ChatMessage

MIB = 1 << 20
MEDIA_TYPES = ("image/png", "image/jpeg", "image/webp", "image/gif")
_TYPE_ALIASES = {"image/jpg": "image/jpeg", "image/pjpeg": "image/jpeg"}
_DOMAIN = re.compile(r"(\*\.)?[a-z0-9_:.-]+")
# seed 003's names (its `mtmd` table) for four of the settings; allowed_media_domains takes
# exact host names only (no *.example.com)
MEDIA_ALIASES = {"image_max_bytes": "media_max_bytes", "image_timeout_seconds": "media_timeout",
                 "allowed_media_domains": "media_allowed_domains",
                 "allowed_local_media_path": "media_dir"}
MEDIA_KEYS = ("media_max_bytes", "media_allowed_domains", "media_dir", "media_timeout",
              "media_max_images",  # configuration keys (flags, LMSERVE_* env, file)
              "audio_max_bytes",  # --audio-max-bytes, seed 003's name too
              *MEDIA_ALIASES)


@dataclass(frozen=True)
class MediaPolicy:
    max_bytes: int = 20 * MIB  # the decoded size of one image
    audio_max_bytes: int = 100 * MIB  # the size of one audio clip (as sent: WAV or MP3)
    allowed_domains: tuple[str, ...] = ()  # hosts URLs may name; "*.example.com": subdomains
    local_dir: str | None = None  # local files are readable only under this directory
    timeout: float = 10.0  # seconds for one download, redirects included
    max_images: int = 16  # media parts (images and audio clips together) per request

    def limit(self, kind: MediaKind) -> int:
        """The largest input of this kind, in bytes."""
        return self.audio_max_bytes if kind == "audio" else self.max_bytes

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

def media_policy(values: Mapping[str, Any], base: MediaPolicy = MediaPolicy()) -> MediaPolicy:
    """A policy from the media configuration keys (flags, env, file, a model's section), over
    `base` for the settings they leave out; ValueError names the key that is wrong. A setting
    given under both its names takes the media_* one."""
    unknown = sorted(set(values) - set(MEDIA_KEYS))
    if unknown:
        raise ValueError(f"unknown configuration key {unknown[0]!r}")

    def given(setting: str) -> tuple[str, Any]:
        for key in (setting, *(a for a, s in MEDIA_ALIASES.items() if s == setting)):
            if values.get(key) is not None:
                return key, values[key]
        return setting, None

    key, value = given("media_max_bytes")
    max_bytes = _number(key, value, int, base.max_bytes, minimum=1)
    key, value = given("media_allowed_domains")
    domains = base.allowed_domains if value is None else \
        _domains(value, key, exact=key == "allowed_media_domains")
    key, value = given("media_dir")
    local_dir = base.local_dir if value is None else _directory(value, key)
    key, value = given("media_timeout")
    timeout = _number(key, value, float, base.timeout, minimum=0)
    if timeout <= 0:
        raise ValueError(f"{key} must be more than 0 seconds")
    key, value = given("media_max_images")
    max_images = _number(key, value, int, base.max_images, minimum=0)
    key, value = given("audio_max_bytes")
    audio_max_bytes = _number(key, value, int, base.audio_max_bytes, minimum=1)
    return MediaPolicy(max_bytes=max_bytes, allowed_domains=domains, local_dir=local_dir,
                       timeout=timeout, max_images=max_images, audio_max_bytes=audio_max_bytes)


def _number(key: str, value: Any, kind: type, default: Any, minimum: float) -> Any:
    try:
        if isinstance(value, bool):  # int(True) would quietly be 1
            raise TypeError(value)
        number = default if value is None else kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be {kind.__name__}, got {value!r}") from None
    if number < minimum:
        raise ValueError(f"{key} must be at least {minimum}, got {value!r}")
    return number


def _domains(value: Any, key: str, *, exact: bool = False) -> tuple[str, ...]:
    if isinstance(value, str):
        items: list[Any] = value.split(",")
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ValueError(f"{key}: expected a list of host names, got {value!r}")
    domains = tuple(str(d).strip().lower().rstrip(".") for d in items if str(d).strip())
    for domain in domains:
        if exact and "*" in domain:
            raise ValueError(f"{key}: {domain!r}: exact host names only, no wildcards "
                             "(media_allowed_domains takes *.example.com for subdomains)")
        if not _DOMAIN.fullmatch(domain):
            raise ValueError(f"{key}: {domain!r} is not a host name (write "
                             "example.com, or *.example.com for its subdomains)")
    return domains


def _directory(value: Any, key: str) -> str:
    path = Path(str(value)).expanduser().resolve()
    if not path.is_dir():
        raise ValueError(f"{key} {value!r} is not a directory")
    return str(path)


# -- checks (no network, no file contents) --------------------------------------------------

def check_images(messages: Sequence[ChatMessage] | None, policy: MediaPolicy
                 ) -> list[ImageInput]:
    """Every image and audio clip of the conversation, each checked against the policy."""
    images = [image for message in messages or () for image in message.images]
    if len(images) > policy.max_images:
        extra = images[policy.max_images]
        what = "images" if all(i.kind == "image" for i in images) else "images and audio clips"
        raise invalid(f"{extra.param}: this server takes at most {policy.max_images} {what} "
                      f"per request (--media-max-images); this request has {len(images)}",
                      param=extra.param,
                      code="too_many_images" if extra.kind == "image" else "too_many_audio")
    for image in images:
        check_image(image, policy)
    return images


def check_image(image: ImageInput, policy: MediaPolicy) -> None:
    if image.source == "base64":
        decode_inline(image, policy)
    elif is_local(image):
        local_file(image, policy)
    else:
        check_remote_url(image.data, policy, image.param, image.kind)


def check_kinds(model: str, media: Sequence[ImageInput], *, vision: bool, audio: bool) -> None:
    """Refuse the first input of a kind the model's projector does not take."""
    for item in media:
        if not (vision if item.kind == "image" else audio):
            raise no_projector(model, item)


def no_projector(model: str, image: ImageInput) -> LmserveError:
    if image.kind == "audio":
        return invalid(f"{image.param}: model '{model}' has no audio encoder (a projector "
                       "that takes audio, --mmproj); it cannot take audio input",
                       param=image.param, code="model_not_multimodal")
    return invalid(f"{image.param}: model '{model}' has no vision projector; it cannot take "
                   "image input", param=image.param, code="model_not_multimodal")


def decode_inline(image: ImageInput, policy: MediaPolicy) -> LoadedImage:
    declared = canonical_type(image.media_type, image.param, image.kind) \
        if image.media_type else None
    text = "".join(image.data.split())  # clients may wrap base64 into lines
    if len(text) // 4 * 3 > policy.limit(image.kind) + 2:  # refused before decoding anything
        raise too_large(image.param, policy, image.kind)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(f"{image.param}: the {image.kind} data is not valid base64",
                      param=image.param, code=f"invalid_{image.kind}") from None
    return verified(data, declared, image, policy)


def local_file(image: ImageInput, policy: MediaPolicy) -> Path:
    """The file's resolved path; refused unless it lies inside the media directory."""
    param, kind = image.param, image.kind
    if policy.local_dir is None:
        raise invalid(f"{param}: local {kind} files are not allowed on this server; send the "
                      f"{kind} inline as base64, or start the server with --media-dir DIR to "
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
        raise invalid(f"{param}: there is no {kind} file at this path in the media directory",
                      param=param, code=f"invalid_{kind}")
    if size > policy.limit(kind):
        raise too_large(param, policy, kind)
    return target


def check_remote_url(url: str, policy: MediaPolicy, param: str,
                     kind: MediaKind = "image") -> None:
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        _ = parts.port  # a malformed port raises here
    except ValueError:
        raise invalid(f"{param}: the URL is malformed", param=param,
                      code=f"invalid_{kind}") from None
    if parts.scheme.lower() not in ("http", "https") or not host:
        raise invalid(f"{param}: only http and https URLs with a host can be fetched",
                      param=param, code=f"invalid_{kind}")
    if not policy.allowed_domains:
        raise invalid(f"{param}: {kind} URLs are not allowed on this server; send the {kind} "
                      "inline as base64, or start the server with --media-allowed-domain "
                      f"{host}", param=param, code="url_not_allowed")
    if not policy.allows_host(host):
        raise invalid(f"{param}: host '{host}' is not among this server's allowed media "
                      "domains (--media-allowed-domain)", param=param, code="url_not_allowed")


def canonical_type(media_type: str, param: str, kind: MediaKind = "image") -> str:
    if kind == "audio":
        return canonical_audio_type(media_type, param)
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
    if len(data) > policy.limit(image.kind):
        raise too_large(image.param, policy, image.kind)
    if image.kind == "audio":
        return _verified_audio(data, declared, image)
    actual = sniff(data)
    if actual is None:
        raise invalid(f"{image.param}: the data is not a PNG, JPEG, WebP or GIF image",
                      param=image.param, code="invalid_image")
    if declared is not None and declared != actual:
        raise invalid(f"{image.param}: the image is declared as {declared} but its data is "
                      f"{actual}", param=image.param, code="invalid_image")
    return LoadedImage(data, actual, image)


def _verified_audio(data: bytes, declared: str | None, clip: ImageInput) -> LoadedImage:
    actual = sniff_audio(data)
    if actual is None:
        raise invalid(f"{clip.param}: the data is not a WAV or MP3 audio clip",
                      param=clip.param, code="invalid_audio")
    if declared is not None and declared != actual:
        raise invalid(f"{clip.param}: the audio is declared as {type_name(declared)} but its "
                      f"data is {type_name(actual)}", param=clip.param, code="invalid_audio")
    if actual == "audio/wav":
        check_wav(data, clip.param)
    return LoadedImage(data, actual, clip)


def is_local(image: ImageInput) -> bool:
    return image.source == "path" or image.data[:5].lower() == "file:"


def _file_url_path(url: str, param: str) -> str:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise invalid(f"{param}: a file URL must name a local path (file:///...)",
                      param=param, code="path_not_allowed")
    return unquote(parts.path)


def too_large(param: str, policy: MediaPolicy, kind: MediaKind = "image") -> LmserveError:
    flag = "--audio-max-bytes" if kind == "audio" else "--media-max-bytes"
    return invalid(f"{param}: the {kind} is larger than this server's limit of "
                   f"{policy.limit(kind)} bytes ({flag})", param=param,
                   code=f"{kind}_too_large")
