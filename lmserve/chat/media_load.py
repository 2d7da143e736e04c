"""Loading an image's (or an audio clip's) bytes once its request passed chat.media's checks:
inline data decoded, a file from the media directory read, or a URL downloaded with httpx.

A download has one deadline for the whole exchange (redirects included), stops reading as soon
as the size limit is passed, and follows redirects by hand, so that every target passes the
allow list. Prompt preparation is synchronous, so a model with a projector fetches a
request's media URLs first (`MediaFetcher.fetch_images`, awaited by the dialect routes through
the backend contract's `fetch_media`): each becomes inline data, checked as inline data is.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
from pathlib import Path

import httpx

from lmserve.chat.audio import known_audio_type
from lmserve.chat.media import (
    LoadedImage,
    MediaPolicy,
    canonical_type,
    check_images,
    check_remote_url,
    decode_inline,
    is_local,
    local_file,
    too_large,
    verified,
)
from lmserve.core.errors import LmserveError, invalid
from lmserve.core.images import ImageInput, MediaKind
from lmserve.core.request import ChatMessage, GenerationRequest

MAX_REDIRECTS = 5
log = logging.getLogger("lmserve.media")


class MediaFetcher:
    """Downloads a served model's media URLs with one pooled httpx client (keep-alive), made
    on the event loop at the first download and closed with the model."""

    def __init__(self, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._transport = transport  # tests: an httpx.MockTransport
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._loop = asyncio.get_running_loop()
            # No proxy from the environment, as for upstream models: the allow list names the
            # hosts the server itself connects to.
            self._client = httpx.AsyncClient(trust_env=False, transport=self._transport,
                                             limits=httpx.Limits(max_connections=32))
        return self._client

    async def fetch_images(self, request: GenerationRequest, policy: MediaPolicy
                           ) -> GenerationRequest:
        """The request with each http(s) media URL (images, audio clips) downloaded and put
        inline (base64, the type its bytes show), under the policy: the count and every URL are
        checked before anything is fetched, then the downloads run together; the first refusal
        (in the inputs' order) is the answer, and the other downloads are cancelled."""
        messages = request.messages
        if not messages or not any(i.remote for m in messages for i in m.images):
            return request
        check_images(messages, policy)  # count, hosts, inline data: 400s before any download
        first: dict[str, ImageInput] = {}  # each URL is downloaded once
        for message in messages:
            for image in message.images:
                if image.remote:
                    first.setdefault(image.data, image)
        client = self.client()
        tasks: list[asyncio.Task[LoadedImage]] = []
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(load_image(image, policy, client))
                         for image in first.values()]
        except BaseExceptionGroup:
            for task in tasks:  # the first image that failed, in order
                exc = None if task.cancelled() else task.exception()
                if exc is not None:
                    raise exc from None
            raise
        loaded = {url: task.result() for url, task in zip(first, tasks, strict=True)}
        inline = {url: (base64.b64encode(image.data).decode(), image.media_type)
                  for url, image in loaded.items()}
        return dataclasses.replace(request, messages=[_replaced(m, inline) for m in messages])

    def close(self) -> None:
        """Close the pool, from any thread (the model is unloading or the server stops)."""
        client, self._client = self._client, None
        if client is None:
            return
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not None:
            running.create_task(client.aclose())
        elif self._loop is not None and self._loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(client.aclose(), self._loop).result(5)
            except Exception:  # the loop is shutting down: the sockets close with it
                log.debug("media client not closed cleanly", exc_info=True)


def _replaced(message: ChatMessage, inline: dict[str, tuple[str, str]]) -> ChatMessage:
    """The message with its downloaded images inline (each keeps its field name and place)."""
    if not any(image.remote for image in message.images):
        return message
    return dataclasses.replace(message, images=tuple(
        dataclasses.replace(image, source="base64", data=inline[image.data][0],
                            media_type=inline[image.data][1]) if image.remote else image
        for image in message.images))


async def load_image(image: ImageInput, policy: MediaPolicy,
                     client: httpx.AsyncClient | None = None) -> LoadedImage:
    """The input's bytes and type; every check of check_image() holds again at this moment."""
    if image.source == "base64":
        return decode_inline(image, policy)
    if is_local(image):
        path = local_file(image, policy)  # resolved again: a swapped symlink is caught
        data = await asyncio.to_thread(_read_at_most, path, policy.limit(image.kind) + 1)
        return verified(data, None, image, policy)
    data, content_type = await fetch(image.data, policy, image.param, client, image.kind)
    declared = content_type.split(";")[0].strip().lower() if content_type else ""
    # Servers often say application/octet-stream; an image/* type must be true, though. Audio
    # types go by many names: one of ours must be true, others are left to the bytes.
    if image.kind == "audio":
        checked = known_audio_type(declared)
    else:
        checked = canonical_type(declared, image.param) if declared.startswith("image/") \
            else None
    return verified(data, checked, image, policy)


def _read_at_most(path: Path, limit: int) -> bytes:
    with path.open("rb") as f:
        return f.read(limit)


async def fetch(url: str, policy: MediaPolicy, param: str,
                client: httpx.AsyncClient | None = None, kind: MediaKind = "image"
                ) -> tuple[bytes, str | None]:
    """GET the URL: (body, Content-Type). Redirects are followed by hand, so that each target
    passes the allow list; the whole download shares one deadline."""
    own = client is None
    http = client or httpx.AsyncClient(timeout=policy.timeout)
    try:
        async with asyncio.timeout(policy.timeout):
            return await _follow(http, url, policy, param, kind)
    except (TimeoutError, httpx.TimeoutException):
        raise _fetch_failed(param, f"no complete answer within {policy.timeout:g} s",
                            kind) from None
    except httpx.HTTPError as exc:
        raise _fetch_failed(param, f"{type(exc).__name__}: {exc}", kind) from None
    finally:
        if own:
            await http.aclose()


async def _follow(client: httpx.AsyncClient, url: str, policy: MediaPolicy, param: str,
                  kind: MediaKind) -> tuple[bytes, str | None]:
    for _ in range(MAX_REDIRECTS + 1):
        check_remote_url(url, policy, param, kind)
        async with client.stream("GET", url, follow_redirects=False) as response:
            if response.is_redirect:
                url = str(response.url.join(response.headers["location"]))
                continue
            if response.status_code != 200:
                raise _fetch_failed(param, f"the server answered HTTP {response.status_code}",
                                    kind)
            _check_length(response, policy, param, kind)
            return await _read_body(response, policy, param, kind), response.headers.get(
                "content-type")
    raise _fetch_failed(param, f"more than {MAX_REDIRECTS} redirects", kind)


def _check_length(response: httpx.Response, policy: MediaPolicy, param: str,
                  kind: MediaKind) -> None:
    length = response.headers.get("content-length", "")
    if length.isdigit() and int(length) > policy.limit(kind):
        raise too_large(param, policy, kind)


async def _read_body(response: httpx.Response, policy: MediaPolicy, param: str,
                     kind: MediaKind) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > policy.limit(kind):  # stop reading: the rest is never downloaded
            raise too_large(param, policy, kind)
        chunks.append(chunk)
    return b"".join(chunks)


def _fetch_failed(param: str, why: str, kind: MediaKind = "image") -> LmserveError:
    return invalid(f"{param}: the {kind} could not be downloaded: {why}", param=param,
                   code=f"{kind}_fetch_failed")
