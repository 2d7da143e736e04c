"""Image input policy (chat.media) and loading (chat.media_load), with no network: downloads
run against httpx.MockTransport."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from lmserve.chat.media import (MediaPolicy, check_image, check_images, media_policy, sniff)
from lmserve.chat.media_load import load_image
from lmserve.core.errors import ErrorKind, LmserveError
from lmserve.core.images import ImageInput, image_from_base64, image_from_path, image_from_url
from lmserve.core.request import ChatMessage, GenerationRequest
from tests.unit.chat_service import ScriptedService

PNG_B64 = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJ"
           "RU5ErkJggg==")
PNG = base64.b64decode(PNG_B64)
JPEG = b"\xff\xd8\xff\xe0" + bytes(16)
GIF = b"GIF89a" + bytes(16)
WEBP = b"RIFF\x10\x00\x00\x00WEBPVP8 " + bytes(8)
ALLOWED = MediaPolicy(allowed_domains=("images.example.com", "*.cdn.example.net"))


def refused(fn: Callable[..., object], *args: object) -> LmserveError:
    with pytest.raises(LmserveError) as caught:
        fn(*args)
    assert caught.value.kind is ErrorKind.INVALID_REQUEST
    assert caught.value.param is not None and caught.value.message.startswith(caught.value.param)
    return caught.value


def url(value: str, param: str = "img") -> ImageInput:
    return image_from_url(value, param)


# ---- parsing what dialects received ---------------------------------------------------------

def test_data_urls_become_inline_base64_and_other_urls_stay_urls():
    image = image_from_url(f"data:image/PNG;base64,{PNG_B64}", "p", detail="low")
    assert (image.source, image.media_type, image.detail, image.data) == \
        ("base64", "image/png", "low", PNG_B64)
    assert url("https://images.example.com/a.png").source == "url"
    assert url("file:///srv/a.png").source == "url"
    assert image_from_path("a.png", "p").source == "path"
    assert image_from_base64(PNG_B64, "p", "IMAGE/JPEG").media_type == "image/jpeg"


@pytest.mark.parametrize("value, detail, param", [
    ("data:image/png,rawbytes", None, "p"),
    ("data:image/png;base64", None, "p"),
    ("ftp://host/a.png", None, "p"),
    ("a.png", None, "p"),
    ("", None, "p"),
    (None, None, "p"),
    ("https://h/a.png", "ultra", "p.detail"),
])
def test_malformed_image_urls_are_refused_naming_the_field(value, detail, param):
    assert refused(lambda: image_from_url(value, "p", detail=detail)).param == param


# ---- inline bytes: sniffing, declared types, size ------------------------------------------

def test_sniffing_knows_the_four_types_and_nothing_else():
    assert [sniff(data) for data in (PNG, JPEG, GIF, WEBP)] == \
        ["image/png", "image/jpeg", "image/gif", "image/webp"]
    assert sniff(b"<svg xmlns=...>") is None and sniff(b"") is None


def test_valid_inline_images_pass_even_wrapped_in_lines():
    wrapped = "\n".join(PNG_B64[i:i + 20] for i in range(0, len(PNG_B64), 20))
    check_image(image_from_base64(wrapped, "p", "image/png"), MediaPolicy())
    check_image(image_from_base64(base64.b64encode(JPEG).decode(), "p", "image/jpg"),
                MediaPolicy())


@pytest.mark.parametrize("image, code", [
    (image_from_base64(PNG_B64, "p", "image/jpeg"), "invalid_image"),  # mislabeled
    (image_from_base64(PNG_B64, "p", "image/bmp"), "unsupported_media_type"),
    (image_from_base64(base64.b64encode(b"<html>hi</html>").decode(), "p"), "invalid_image"),
    (image_from_base64("not base64!", "p"), "invalid_image"),
    (image_from_base64(base64.b64encode(PNG + bytes(200)).decode(), "p"), "image_too_large"),
    (image_from_base64("A" * 4000, "p"), "image_too_large"),  # refused before decoding
])
def test_bad_inline_images_are_refused(image, code):
    assert refused(check_image, image, MediaPolicy(max_bytes=len(PNG) + 100)).code == code


def test_the_image_count_is_limited_per_request():
    image = image_from_base64(PNG_B64, "messages[1].images[0]")
    messages = [ChatMessage("user", "a", images=(image.at(0),) * 2),
                ChatMessage("user", "b", images=(image,))]
    assert len(check_images(messages, MediaPolicy(max_images=3))) == 3
    err = refused(check_images, messages, MediaPolicy(max_images=2))
    assert err.code == "too_many_images" and "at most 2" in err.message


# ---- remote URLs ----------------------------------------------------------------------------

def test_urls_are_refused_unless_their_host_is_allowed():
    err = refused(check_image, url("https://images.example.com/a.png"), MediaPolicy())
    assert err.code == "url_not_allowed" and "--media-allowed-domain" in err.message
    check_image(url("https://images.example.com/a.png"), ALLOWED)
    check_image(url("http://IMAGES.example.com./a.png"), ALLOWED)
    check_image(url("https://a.b.cdn.example.net/x"), ALLOWED)
    for bad in ("https://example.com/a.png", "https://cdn.example.net/x",
                "https://images.example.com.evil.org/a.png", "https://evilimages.example.com/"):
        assert refused(check_image, url(bad), ALLOWED).code == "url_not_allowed"
    for malformed in ("https:///a.png", "http://[::1/a", "https://images.example.com:99999/"):
        assert refused(check_image, url(malformed), ALLOWED).code == "invalid_image"


# ---- local files ----------------------------------------------------------------------------

@pytest.fixture()
def media_dir(tmp_path: Path) -> Path:
    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    (root / "cat.png").write_bytes(PNG)
    (root / "sub" / "big.png").write_bytes(PNG + bytes(500))
    (tmp_path / "secret.png").write_bytes(PNG)
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    (root / "inner.png").symlink_to(root / "cat.png")
    return root


def test_local_files_are_refused_without_a_media_dir(media_dir):
    err = refused(check_image, image_from_path(str(media_dir / "cat.png"), "p"), MediaPolicy())
    assert err.code == "path_not_allowed" and "--media-dir" in err.message
    assert refused(check_image, url(f"file://{media_dir}/cat.png"), MediaPolicy()).code == \
        "path_not_allowed"


def test_local_files_inside_the_media_dir_pass(media_dir):
    policy = MediaPolicy(local_dir=str(media_dir), max_bytes=len(PNG) + 100)
    for image in (image_from_path("cat.png", "p"), image_from_path("sub/../cat.png", "p"),
                  image_from_path(str(media_dir / "cat.png"), "p"),
                  image_from_path("inner.png", "p"), url(f"file://{media_dir}/cat.png"),
                  url(f"file://localhost{media_dir}/cat.png")):
        check_image(image, policy)


@pytest.mark.parametrize("make, code", [
    (lambda d: image_from_path("../secret.png", "p"), "path_not_allowed"),
    (lambda d: image_from_path("sub/../../secret.png", "p"), "path_not_allowed"),
    (lambda d: image_from_path(str(d.parent / "secret.png"), "p"), "path_not_allowed"),
    (lambda d: image_from_path("link.png", "p"), "path_not_allowed"),  # symlink leads out
    (lambda d: image_from_path("/etc/passwd", "p"), "path_not_allowed"),
    (lambda d: image_from_path("cat\x00.png", "p"), "path_not_allowed"),
    (lambda d: url("file:///etc/passwd"), "path_not_allowed"),
    (lambda d: url(f"file://otherhost{d}/cat.png"), "path_not_allowed"),
    (lambda d: image_from_path("missing.png", "p"), "invalid_image"),
    (lambda d: image_from_path("sub", "p"), "invalid_image"),
    (lambda d: image_from_path("sub/big.png", "p"), "image_too_large"),
])
def test_local_paths_that_escape_or_fail_are_refused(media_dir, make, code):
    policy = MediaPolicy(local_dir=str(media_dir), max_bytes=len(PNG) + 100)
    assert refused(check_image, make(media_dir), policy).code == code


# ---- configuration --------------------------------------------------------------------------

def test_policy_from_configuration_values(tmp_path):
    policy = media_policy({"media_allowed_domains": "A.example.com, *.cdn.net,",
                           "media_dir": str(tmp_path), "media_max_bytes": "1024",
                           "media_timeout": "2.5", "media_max_images": 0})
    assert policy == MediaPolicy(max_bytes=1024, allowed_domains=("a.example.com", "*.cdn.net"),
                                 local_dir=str(tmp_path.resolve()), timeout=2.5, max_images=0)
    assert media_policy({}) == MediaPolicy()
    for bad in ({"media_allowed_domains": ["https://x.org/"]}, {"media_allowed_domains": ["*"]},
                {"media_dir": str(tmp_path / "none")}, {"media_max_bytes": 0},
                {"media_timeout": "soon"}, {"media_color": 1}):
        with pytest.raises(ValueError):
            media_policy(bad)


# ---- the service: policy first, then the projector ------------------------------------------

def test_the_service_refuses_valid_images_for_lack_of_a_projector():
    service = ScriptedService([], "{% for m in messages %}{{ m.content }}{% endfor %}")
    assert service.vision is False
    good = image_from_base64(PNG_B64, "messages[0].images[0]")
    request = GenerationRequest(messages=[ChatMessage("user", "hi", images=(good,))])
    err = refused(service.prepare, request)
    assert err.code == "model_not_multimodal" and err.param == "messages[0].images[0]"
    assert "model 'm' has no vision projector; it cannot take image input" in err.message
    bad = url("https://images.example.com/a.png", "messages[0].content[1].image_url")
    request = GenerationRequest(messages=[ChatMessage("user", "hi", images=(good, bad))])
    assert refused(service.prepare, request).code == "url_not_allowed"


# ---- loading --------------------------------------------------------------------------------

Handler = Callable[[httpx.Request], httpx.Response]


def mock_client(handler: Handler, requests: list[str] | None = None) -> httpx.AsyncClient:
    async def record(request: httpx.Request) -> httpx.Response:
        if requests is not None:
            requests.append(str(request.url))
        response = handler(request)
        return await response if asyncio.iscoroutine(response) else response  # type: ignore
    return httpx.AsyncClient(transport=httpx.MockTransport(record))


async def load(value: str, handler: Handler, policy: MediaPolicy = ALLOWED):
    async with mock_client(handler) as client:
        return await load_image(url(value), policy, client)


async def test_downloads_are_sniffed_against_their_content_type():
    image = await load("https://images.example.com/a", lambda r: httpx.Response(
        200, content=PNG, headers={"content-type": "image/png"}))
    assert (image.data, image.media_type) == (PNG, "image/png")
    octet = await load("https://images.example.com/a", lambda r: httpx.Response(
        200, content=GIF, headers={"content-type": "application/octet-stream"}))
    assert octet.media_type == "image/gif"
    for content, kind, code in ((PNG, "image/jpeg", "invalid_image"),
                                (b"<html></html>", "text/html", "invalid_image"),
                                (PNG, "image/svg+xml", "unsupported_media_type")):
        with pytest.raises(LmserveError) as caught:
            await load("https://images.example.com/a", lambda r: httpx.Response(
                200, content=content, headers={"content-type": kind}))
        assert caught.value.code == code


async def test_redirects_are_followed_only_to_allowed_hosts():
    def hop(request: httpx.Request) -> httpx.Response:
        if request.url.host == "images.example.com":
            return httpx.Response(302, headers={"location": "https://x.cdn.example.net/b"})
        return httpx.Response(200, content=PNG)
    seen: list[str] = []
    async with mock_client(hop, seen) as client:
        image = await load_image(url("https://images.example.com/a"), ALLOWED, client)
    assert image.data == PNG and seen[-1] == "https://x.cdn.example.net/b"
    seen.clear()
    outside = lambda r: httpx.Response(301, headers={"location": "http://169.254.169.254/"})
    async with mock_client(outside, seen) as client:
        with pytest.raises(LmserveError) as caught:
            await load_image(url("https://images.example.com/a"), ALLOWED, client)
    assert caught.value.code == "url_not_allowed" and "169.254.169.254" in caught.value.message
    assert seen == ["https://images.example.com/a"]  # the disallowed host was never asked
    loop = lambda r: httpx.Response(302, headers={"location": "/again"})
    with pytest.raises(LmserveError) as caught:
        await load("https://images.example.com/a", loop)
    assert caught.value.code == "image_fetch_failed" and "redirects" in caught.value.message


async def test_http_errors_and_timeouts_are_fetch_failures():
    with pytest.raises(LmserveError) as caught:
        await load("https://images.example.com/a", lambda r: httpx.Response(404))
    assert caught.value.code == "image_fetch_failed" and "404" in caught.value.message

    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)
        return httpx.Response(200, content=PNG)
    with pytest.raises(LmserveError) as caught:
        await load("https://images.example.com/a", slow,  # type: ignore[arg-type]
                   MediaPolicy(allowed_domains=ALLOWED.allowed_domains, timeout=0.05))
    assert caught.value.code == "image_fetch_failed" and "0.05 s" in caught.value.message


async def test_oversized_downloads_stop_early():
    policy = MediaPolicy(allowed_domains=ALLOWED.allowed_domains, max_bytes=1000)
    sent: list[int] = []

    async def endless() -> AsyncIterator[bytes]:
        for _ in range(100):
            sent.append(1)
            yield bytes(400)
    for response in (lambda r: httpx.Response(200, content=endless()),
                     lambda r: httpx.Response(200, content=bytes(5000))):
        with pytest.raises(LmserveError) as caught:
            await load("https://images.example.com/a", response, policy)
        assert caught.value.code == "image_too_large"
    assert len(sent) <= 3  # no Content-Length: reading stopped at the limit


async def test_files_and_inline_data_load_without_a_client(media_dir):
    policy = MediaPolicy(local_dir=str(media_dir))
    loaded = await load_image(image_from_path("cat.png", "p"), policy)
    assert (loaded.data, loaded.media_type) == (PNG, "image/png")
    inline = await load_image(image_from_base64(PNG_B64, "p"), policy)
    assert inline.data == PNG
    with pytest.raises(LmserveError):
        await load_image(image_from_path("link.png", "p"), policy)
