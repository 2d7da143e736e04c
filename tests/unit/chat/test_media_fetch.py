"""Image URLs downloaded before preparation (chat.media_load.MediaFetcher), over real HTTP from
a local server: each becomes inline data, and every refusal of the media policy is a 400
naming the image's field."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator

import pytest

from lmserve.chat.media import MediaPolicy
from lmserve.chat.media_load import MediaFetcher
from lmserve.core.backend import with_media
from lmserve.core.errors import ErrorKind, LmserveError
from lmserve.core.images import image_from_base64, image_from_url
from lmserve.core.request import ChatMessage, GenerationRequest
from tests.media_server import Answer, MediaHost, media_host

PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA"
                       "60e6kgAAAABJRU5ErkJggg==")
GIF = b"GIF89a" + bytes(16)
LIMIT = 1000


@pytest.fixture(scope="module")
def host() -> Iterator[MediaHost]:
    with media_host({
        "/a.png": Answer(PNG),
        "/b.gif": Answer(GIF, "application/octet-stream"),  # a vague type: the bytes decide
        "/big.png": Answer(PNG + bytes(LIMIT)),  # over the limit, said in Content-Length
        "/big-unsized.png": Answer(PNG + bytes(20 * LIMIT), length=False),
        "/slow.png": Answer(PNG, delay=5.0),
        "/page.html": Answer(b"<html><body>no image</body></html>", "text/html"),
        "/lying.png": Answer(GIF, "image/png"),
        "/gone.png": Answer(b"", None, 404),
        "/away": Answer(b"", None, 302, {"Location": "/a.png"}),
        "/to-localhost": Answer(b"", None, 302, {"Location": "http://localhost:{port}/a.png"}),
    }) as h:
        yield h


def policy(*hosts: str) -> MediaPolicy:
    return MediaPolicy(max_bytes=LIMIT, allowed_domains=hosts or ("127.0.0.1",), timeout=0.5,
                       max_images=3)


def chat(*urls: str, text: str = "look") -> GenerationRequest:
    images = tuple(image_from_url(u, f"messages[0].content[{i + 1}].image_url").at(len(text))
                   for i, u in enumerate(urls))
    return GenerationRequest(messages=[ChatMessage("system", "be brief"),
                                       ChatMessage("user", text, images=images)])


def fetch(request: GenerationRequest, pol: MediaPolicy | None = None) -> GenerationRequest:
    async def run() -> GenerationRequest:
        fetcher = MediaFetcher()
        try:
            return await fetcher.fetch_images(request, pol or policy())
        finally:
            fetcher.close()
    return asyncio.run(run())


def refused(request: GenerationRequest, pol: MediaPolicy | None = None) -> LmserveError:
    with pytest.raises(LmserveError) as caught:
        fetch(request, pol)
    error = caught.value
    assert error.kind is ErrorKind.INVALID_REQUEST and error.kind.http_status == 400
    assert error.param == "messages[0].content[1].image_url"
    assert error.message.startswith(error.param)
    return error


def test_urls_become_inline_images_that_keep_their_field_and_place(host: MediaHost):
    request = chat(host.url("/a.png"), host.url("/b.gif"))
    out = fetch(request)
    first, second = out.messages[1].images
    assert (first.source, first.media_type, base64.b64decode(first.data)) == \
        ("base64", "image/png", PNG)
    assert (second.source, second.media_type, base64.b64decode(second.data)) == \
        ("base64", "image/gif", GIF)
    assert [i.param for i in out.messages[1].images] == \
        [i.param for i in request.messages[1].images]
    assert [i.offset for i in out.messages[1].images] == [4, 4]
    assert out.messages[0] is request.messages[0]  # a message without URLs is left alone
    assert request.messages[1].images[0].source == "url"  # the caller's request is unchanged


def test_a_redirect_within_the_allow_list_is_followed_and_a_url_is_fetched_once(
        host: MediaHost):
    before = host.hits.get("/a.png", 0)
    out = fetch(chat(host.url("/away"), host.url("/away")))
    assert [base64.b64decode(i.data) for i in out.messages[1].images] == [PNG, PNG]
    assert host.hits["/a.png"] == before + 1


def test_inline_and_file_images_are_not_fetched(host: MediaHost):
    inline = image_from_base64(base64.b64encode(PNG).decode(), "images[0]", "image/png")
    request = GenerationRequest(messages=[ChatMessage("user", "x", images=(inline,))])
    assert fetch(request) is request
    assert not image_from_url("file:///srv/a.png", "p").remote


@pytest.mark.parametrize("path, code", [
    ("/big.png", "image_too_large"),
    ("/big-unsized.png", "image_too_large"),  # stopped while reading
    ("/page.html", "invalid_image"),  # an HTML page: no image
    ("/lying.png", "invalid_image"),  # declared PNG, is GIF
    ("/gone.png", "image_fetch_failed"),
    ("/slow.png", "image_fetch_failed"),  # past --media-timeout
])
def test_what_the_policy_refuses_is_a_400_naming_the_image(host: MediaHost, path: str,
                                                           code: str):
    error = refused(chat(host.url(path)))
    assert error.code == code
    if path == "/slow.png":
        assert "within 0.5 s" in error.message


def test_hosts_off_the_allow_list_are_refused_before_and_after_redirects(host: MediaHost):
    before = dict(host.hits)
    error = refused(chat(host.url("/a.png", host="localhost")))
    assert error.code == "url_not_allowed" and "localhost" in error.message
    assert host.hits == before  # nothing was fetched
    fetched = host.hits.get("/a.png", 0)
    redirect = refused(chat(host.url("/to-localhost")))
    assert redirect.code == "url_not_allowed" and "localhost" in redirect.message
    assert host.hits.get("/a.png", 0) == fetched  # the redirect's target was not fetched


def test_too_many_images_are_refused_before_any_download(host: MediaHost):
    before = dict(host.hits)
    with pytest.raises(LmserveError) as caught:
        fetch(chat(*[host.url("/a.png")] * 4))
    assert caught.value.code == "too_many_images"
    assert host.hits == before


def test_the_first_failing_image_in_order_is_the_answer(host: MediaHost):
    error = refused(chat(host.url("/page.html"), host.url("/slow.png")))
    assert error.code == "invalid_image"


def test_with_media_asks_the_backend_only_for_requests_with_urls(host: MediaHost):
    class Backend:
        def __init__(self) -> None:
            self.asked = 0

        async def fetch_media(self, request: GenerationRequest) -> GenerationRequest:
            self.asked += 1
            return request

    backend = Backend()
    plain = GenerationRequest(messages=[ChatMessage("user", "hi")])
    assert asyncio.run(with_media(backend, plain)) is plain  # type: ignore[arg-type]
    asyncio.run(with_media(backend, chat(host.url("/a.png"))))  # type: ignore[arg-type]
    assert backend.asked == 1
