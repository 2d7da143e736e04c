"""Image URLs for a vision model (SmolLM2 with the random test projector): each dialect that
carries URLs (OpenAI chat image_url, Responses input_image, Anthropic image source url, native
images url) downloads them from a local HTTP server under the media policy before the prompt
is prepared, and answers as it does for the same image inline; what the policy refuses is a
400 in the dialect's shape. And the disk tier of the embedding cache (--media-cache-dir): an
image encoded before a restart is read back from disk after it (metrics)."""

from __future__ import annotations

import base64
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.media_server import Answer, MediaHost, media_host
from tests.model.conftest import Server, own_server, start_server, stop_server
from tests.model.test_vision import IMAGE_TOKENS, MODEL, ROOT, png

A, B = png(1), png(2)  # two images test_vision shows to answer differently
LIMIT = 20000
QUESTION = "What is in this picture?"


@pytest.fixture(scope="module")
def host() -> Iterator[MediaHost]:
    with media_host({
        "/a.png": Answer(A),
        "/b.png": Answer(B, "application/octet-stream"),
        "/big.png": Answer(A + bytes(LIMIT)),
        "/slow.png": Answer(A, delay=30.0),
        "/page.html": Answer(b"<html><body>hello</body></html>", "text/html"),
    }) as h:
        yield h


@pytest.fixture(scope="module")
def projector(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mmproj") / "mmproj-smollm2-test.gguf"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_test_mmproj.py"), str(out)],
                   check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def vision(tmp_path_factory: pytest.TempPathFactory, projector: Path) -> Iterator[Server]:
    yield from own_server(tmp_path_factory, "vision-urls", MODEL, "--mmproj", str(projector),
                          "--parallel", "2", "--ctx", "1024", "--threads", "2",
                          "--media-allowed-domain", "127.0.0.1", "--media-timeout", "1",
                          "--media-max-bytes", str(LIMIT))


@pytest.fixture()
def http(vision: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=vision.url, timeout=300) as c:
        yield c


def data_url(image: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image).decode()


# Each dialect: (request with the image at `url`, (prompt tokens, text) of its answer, how
# its 400 names the code).

def openai_chat(http: httpx.Client, url: str | None) -> httpx.Response:
    content: list[dict[str, Any]] = [{"type": "text", "text": QUESTION}]
    if url is not None:
        content.append({"type": "image_url", "image_url": {"url": url}})
    return http.post("/v1/chat/completions", json={
        "model": MODEL, "temperature": 0, "max_tokens": 8,
        "messages": [{"role": "user", "content": content}]})


def openai_answer(body: dict[str, Any]) -> tuple[int, str]:
    return body["usage"]["prompt_tokens"], body["choices"][0]["message"]["content"]


def responses(http: httpx.Client, url: str | None) -> httpx.Response:
    content: list[dict[str, Any]] = [{"type": "input_text", "text": QUESTION}]
    if url is not None:
        content.append({"type": "input_image", "image_url": url})
    return http.post("/v1/responses", json={
        "model": MODEL, "temperature": 0, "max_output_tokens": 8, "store": False,
        "input": [{"role": "user", "content": content}]})


def responses_answer(body: dict[str, Any]) -> tuple[int, str]:
    text = "".join(part["text"] for item in body["output"] if item["type"] == "message"
                   for part in item["content"] if part["type"] == "output_text")
    return body["usage"]["input_tokens"], text


def anthropic(http: httpx.Client, url: str | None) -> httpx.Response:
    content: list[dict[str, Any]] = [{"type": "text", "text": QUESTION}]
    if url is not None:
        content.append({"type": "image", "source": {"type": "url", "url": url}}
                       if not url.startswith("data:") else
                       {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                    "data": url.split(",", 1)[1]}})
    return http.post("/v1/messages", headers={"anthropic-version": "2023-06-01"}, json={
        "model": MODEL, "temperature": 0, "max_tokens": 8,
        "messages": [{"role": "user", "content": content}]})


def anthropic_answer(body: dict[str, Any]) -> tuple[int, str]:
    usage = body["usage"]
    text = "".join(b["text"] for b in body["content"] if b["type"] == "text")
    return usage["input_tokens"] + (usage.get("cache_read_input_tokens") or 0), text


def native(http: httpx.Client, url: str | None) -> httpx.Response:
    body: dict[str, Any] = {"transport": "chat", "prompt": QUESTION,
                            "params": {"max_tokens": 8, "temperature": 0}}
    if url is not None:
        body["images"] = [{"url": url}]
    return http.post(f"/models/{MODEL}/query/", json=body)


def native_answer(body: dict[str, Any]) -> tuple[int, str]:
    usage = body["usage"]
    text = "".join(b.get("text", "") for b in body["blocks"] if b["type"] == "text")
    return usage["input_tokens"], text


Send = Callable[[httpx.Client, str | None], httpx.Response]
Read = Callable[[dict[str, Any]], tuple[int, str]]
DIALECTS: dict[str, tuple[Send, Read]] = {
    "openai": (openai_chat, openai_answer),
    "responses": (responses, responses_answer),
    "anthropic": (anthropic, anthropic_answer),
    "native": (native, native_answer),
}


def answer(http: httpx.Client, dialect: str, url: str | None) -> tuple[int, str]:
    send, read = DIALECTS[dialect]
    response = send(http, url)
    assert response.status_code == 200, response.text
    return read(response.json())


@pytest.mark.parametrize("dialect", DIALECTS)
def test_an_image_url_answers_as_the_same_image_inline(http, vision: Server, host: MediaHost,
                                                       dialect: str):
    vision.flush()
    plain_tokens, _ = answer(http, dialect, None)
    tokens, text = answer(http, dialect, host.url("/a.png"))
    assert tokens == plain_tokens + IMAGE_TOKENS
    assert (tokens, text) == answer(http, dialect, data_url(A))
    other_tokens, other_text = answer(http, dialect, host.url("/b.png"))  # another image
    assert other_tokens == tokens and other_text != text


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("path, host_name, code, says", [
    # a host off --media-allowed-domain
    ("/a.png", "localhost", "url_not_allowed", "'localhost' is not among"),
    ("/big.png", "127.0.0.1", "image_too_large", f"limit of {LIMIT} bytes"),
    ("/slow.png", "127.0.0.1", "image_fetch_failed", "no complete answer within 1 s"),
    ("/page.html", "127.0.0.1", "invalid_image", "not a PNG, JPEG, WebP or GIF"),
])
def test_what_the_media_policy_refuses_is_a_400_in_each_dialect(
        http, host: MediaHost, dialect: str, path: str, host_name: str, code: str, says: str):
    send, _ = DIALECTS[dialect]
    response = send(http, host.url(path, host=host_name))
    assert response.status_code == 400, response.text
    body = response.json()
    error = body["error"]
    assert says in error["message"]
    if dialect == "anthropic":  # its errors carry a type, no code
        assert body["type"] == "error" and error["type"] == "invalid_request_error"
    else:
        assert error["code"] == code and "image" in error["param"]


def test_an_encoded_image_is_read_from_disk_after_a_restart(
        tmp_path_factory: pytest.TempPathFactory, projector: Path):
    folder = tmp_path_factory.mktemp("media-disk")
    cache = folder / "embeddings"
    args = (MODEL, "--mmproj", str(projector), "--parallel", "1", "--ctx", "1024", "--threads",
            "2", "--media-cache-dir", str(cache), "--data-dir", str(folder))

    def ask(server: Server) -> tuple[int, str]:
        with httpx.Client(base_url=server.url, timeout=300) as c:
            return answer(c, "openai", data_url(A))

    first = start_server(str(folder), *args)
    try:
        before = ask(first)
        assert first.metric("lmserve_media_cache_hits_total") == 0
        assert first.metric("lmserve_media_disk_cache_hits_total") == 0
    finally:
        stop_server(first)  # a clean stop finishes the queued write
    files = list(cache.glob("mmproj-*/*.npy"))
    assert len(files) == 1 and files[0].stat().st_size > IMAGE_TOKENS * 576 * 4
    second = start_server(str(folder), *args)
    try:
        assert ask(second) == before
        assert second.metric("lmserve_media_disk_cache_hits_total") == 1  # not encoded again
        assert second.metric("lmserve_media_cache_hits_total") == 1
        assert second.metric("lmserve_media_disk_cache_writes_total") == 0
    finally:
        stop_server(second)
