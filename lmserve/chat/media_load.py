"""Loading an image's bytes once its request passed chat.media's checks: inline data decoded, a
file from the media directory read, or a URL downloaded with httpx.

A download has one deadline for the whole exchange (redirects included), stops reading as soon
as the size limit is passed, and follows redirects by hand, so that every target passes the
allow list. The server would load images only for a model with a vision projector, which
lmserve cannot load yet.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from lmserve.chat.media import (
    LoadedImage,
    MediaPolicy,
    canonical_type,
    check_remote_url,
    decode_inline,
    is_local,
    local_file,
    too_large,
    verified,
)
from lmserve.core.errors import LmserveError, invalid
from lmserve.core.images import ImageInput

MAX_REDIRECTS = 5


async def load_image(image: ImageInput, policy: MediaPolicy,
                     client: httpx.AsyncClient | None = None) -> LoadedImage:
    """The image's bytes and type; every check of check_image() holds again at this moment."""
    if image.source == "base64":
        return decode_inline(image, policy)
    if is_local(image):
        path = local_file(image, policy)  # resolved again: a swapped symlink is caught
        data = await asyncio.to_thread(_read_at_most, path, policy.max_bytes + 1)
        return verified(data, None, image, policy)
    data, content_type = await fetch(image.data, policy, image.param, client)
    declared = content_type.split(";")[0].strip().lower() if content_type else ""
    # Servers often say application/octet-stream; an image/* type must be true, though.
    checked = canonical_type(declared, image.param) if declared.startswith("image/") else None
    return verified(data, checked, image, policy)


def _read_at_most(path: Path, limit: int) -> bytes:
    with path.open("rb") as f:
        return f.read(limit)


async def fetch(url: str, policy: MediaPolicy, param: str,
                client: httpx.AsyncClient | None = None) -> tuple[bytes, str | None]:
    """GET the URL: (body, Content-Type). Redirects are followed by hand, so that each target
    passes the allow list; the whole download shares one deadline."""
    own = client is None
    http = client or httpx.AsyncClient(timeout=policy.timeout)
    try:
        async with asyncio.timeout(policy.timeout):
            return await _follow(http, url, policy, param)
    except (TimeoutError, httpx.TimeoutException):
        raise _fetch_failed(param, f"no complete answer within {policy.timeout:g} s") from None
    except httpx.HTTPError as exc:
        raise _fetch_failed(param, f"{type(exc).__name__}: {exc}") from None
    finally:
        if own:
            await http.aclose()


async def _follow(client: httpx.AsyncClient, url: str, policy: MediaPolicy, param: str
                  ) -> tuple[bytes, str | None]:
    for _ in range(MAX_REDIRECTS + 1):
        check_remote_url(url, policy, param)
        async with client.stream("GET", url, follow_redirects=False) as response:
            if response.is_redirect:
                url = str(response.url.join(response.headers["location"]))
                continue
            if response.status_code != 200:
                raise _fetch_failed(param, f"the server answered HTTP {response.status_code}")
            _check_length(response, policy, param)
            return await _read_body(response, policy, param), response.headers.get(
                "content-type")
    raise _fetch_failed(param, f"more than {MAX_REDIRECTS} redirects")


def _check_length(response: httpx.Response, policy: MediaPolicy, param: str) -> None:
    length = response.headers.get("content-length", "")
    if length.isdigit() and int(length) > policy.max_bytes:
        raise too_large(param, policy)


async def _read_body(response: httpx.Response, policy: MediaPolicy, param: str) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > policy.max_bytes:  # stop reading: the rest is never downloaded
            raise too_large(param, policy)
        chunks.append(chunk)
    return b"".join(chunks)


def _fetch_failed(param: str, why: str) -> LmserveError:
    return invalid(f"{param}: the image could not be downloaded: {why}", param=param,
                   code="image_fetch_failed")
