"""Images through a vision projector: SmolLM2 with the random projector scripts/make_test_mmproj.py
writes (the way llama.cpp's CI tests multimodal plumbing). The answers mean nothing; what is
asserted is the plumbing: an image changes greedy output, two images differ, the same image
is reused (prefix, then the embedding cache), image tokens count, and the media policy's
400s still hold in front of a model that takes images."""

from __future__ import annotations

import base64
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from tests.model.conftest import Server, own_server

ROOT = Path(__file__).resolve().parents[2]
MODEL = "smollm2"
IMAGE_TOKENS = 16  # (32 / 8)^2 patches of the test projector


def png(seed: int, width: int = 40, height: int = 30) -> bytes:
    """A small RGB PNG of pseudo-random pixels."""
    pixels = bytes((seed * 7919 + i * 104729) % 251 for i in range(width * height * 3))
    raw = b"".join(b"\x00" + pixels[y * width * 3:(y + 1) * width * 3] for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + \
            struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2,
                                                              0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


A, B = base64.b64encode(png(1)).decode(), base64.b64encode(png(2)).decode()


@pytest.fixture(scope="session")
def mmproj(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mmproj") / "mmproj-smollm2-test.gguf"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_test_mmproj.py"), str(out)],
                   check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def vision_server(tmp_path_factory: pytest.TempPathFactory, mmproj: Path) -> Iterator[Server]:
    yield from own_server(tmp_path_factory, "vision", MODEL, "--mmproj", str(mmproj),
                          "--parallel", "2", "--ctx", "1024", "--threads", "2",
                          "--media-max-images", "2", "--media-max-bytes", "20000")


@pytest.fixture()
def oai(vision_server: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=vision_server.base_url, api_key="x", timeout=300) as c:
        yield c


def chat(client: openai.OpenAI, *images: str, text: str = "What is in this picture?",
         max_tokens: int = 8):
    parts: list[dict] = [{"type": "text", "text": text}]
    parts += [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{i}"}}
              for i in images]
    return client.chat.completions.create(model=MODEL, temperature=0, max_tokens=max_tokens,
                                          messages=[{"role": "user", "content": parts}])


def test_card_reports_vision(vision_server: Server):
    models = httpx.get(f"{vision_server.base_url}/models").json()["data"]
    assert next(m for m in models if m["id"] == MODEL)["meta"]["vision"] is True
    show = httpx.post(f"{vision_server.url}/api/show", json={"model": MODEL}).json()
    assert "vision" in show["capabilities"]


def test_images_change_output_and_count_as_prompt_tokens(oai, vision_server: Server):
    vision_server.flush()
    plain, with_a, with_b = chat(oai), chat(oai, A), chat(oai, B)
    assert with_a.choices[0].message.content != plain.choices[0].message.content
    assert with_a.choices[0].message.content != with_b.choices[0].message.content
    assert with_a.usage.prompt_tokens == plain.usage.prompt_tokens + IMAGE_TOKENS
    assert with_b.usage.prompt_tokens == with_a.usage.prompt_tokens


def test_same_image_reuses_prefix_then_embedding_cache(oai, vision_server: Server):
    vision_server.flush()
    first = chat(oai, A, text="Describe it.")
    decoded = vision_server.metric("lmserve_media_chunks_total")
    again = chat(oai, A, text="Describe it.")
    assert again.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1
    assert again.choices[0].message.content == first.choices[0].message.content
    assert vision_server.metric("lmserve_media_chunks_total") == decoded  # KV held the image
    hits = vision_server.metric("lmserve_media_cache_hits_total")
    vision_server.flush()  # the KV is gone; the encoded image is not
    third = chat(oai, A, text="Describe it.")
    assert vision_server.metric("lmserve_media_cache_hits_total") == hits + 1
    assert third.choices[0].message.content == first.choices[0].message.content


def test_anthropic_and_ollama_images_reach_the_model(vision_server: Server):
    vision_server.flush()
    with anthropic.Anthropic(base_url=vision_server.url, api_key="x", timeout=300) as client:
        message = client.messages.create(model=MODEL, max_tokens=6, messages=[
            {"role": "user", "content": [
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": A}}]}])
        plain = client.messages.create(model=MODEL, max_tokens=6, messages=[
            {"role": "user", "content": "What is in this picture?"}])
    def prompt(usage: anthropic.types.Usage) -> int:
        return usage.input_tokens + (usage.cache_read_input_tokens or 0)
    assert prompt(message.usage) == prompt(plain.usage) + IMAGE_TOKENS
    body = {"model": MODEL, "stream": False, "options": {"temperature": 0, "num_predict": 6},
            "messages": [{"role": "user", "content": "What is in this picture?",
                          "images": [A]}]}
    answer = httpx.post(f"{vision_server.url}/api/chat", json=body, timeout=300).json()
    assert answer["prompt_eval_count"] == prompt(plain.usage) + IMAGE_TOKENS


@pytest.mark.parametrize("images, code", [
    ([base64.b64encode(png(3) + b"\x00" * 20000).decode()], "image_too_large"),  # > 20000 B
    ([base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64).decode()], "invalid_image"),
    ([A, B, A], "too_many_images"),  # over --media-max-images 2
])
def test_policy_and_corrupt_images_are_400s(oai, images, code):
    with pytest.raises(openai.BadRequestError) as caught:
        chat(oai, *images)
    assert caught.value.status_code == 400 and caught.value.code == code


def test_image_urls_are_refused_with_a_reason(oai):
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(model=MODEL, max_tokens=4, messages=[{"role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "https://x.test/a.png"}}]}])
    assert caught.value.code == "url_not_allowed"


# ---- the native protocol's typed content parts -----------------------------------------------

NATIVE_PARAMS = {"temperature": 0, "max_tokens": 8}


def native(server: Server, body: dict, status: int = 200) -> dict:
    r = httpx.post(f"{server.url}/models/{MODEL}/query/", timeout=300,
                   json={"params": NATIVE_PARAMS, **body})
    assert r.status_code == status, r.text
    return dict(r.json())


def talk(content: object, **message: object) -> dict:
    return {"transport": "conversation",
            "messages": [{"role": "user", "content": content, **message}]}


def test_native_image_parts_answer_as_the_images_list(vision_server: Server):
    """An image:uri part (base64 or a data: URI) before the text reaches the model as the
    same image in the message's `images` list does (greedy: the same answer, the same
    prompt), on a conversation message and on the chat transport's prompt."""
    question = "What is in this picture?"
    vision_server.flush()
    plain = native(vision_server, talk(question))
    listed = native(vision_server, talk(question, images=[{"data": A, "media_type": "image/png"}]))
    assert listed["usage"]["input_tokens"] == plain["usage"]["input_tokens"] + IMAGE_TOKENS
    parts = [{"type": "image:uri", "data": A, "format": "png"},
             {"type": "text", "text": question}]
    as_uri = [{"type": "image:uri", "data": f"data:image/png;base64,{A}"},
              {"type": "text", "text": question}]
    for body in (talk(parts), {"transport": "chat", "prompt": as_uri}):
        answer = native(vision_server, body)
        assert answer["blocks"] == listed["blocks"]
        assert answer["usage"]["input_tokens"] == listed["usage"]["input_tokens"]


@pytest.mark.parametrize("part, param, code", [
    ({"type": "image:uri", "data": A, "format": "jpeg"}, "messages[0].content[1].data",
     "invalid_image"),  # a PNG declared as JPEG
    ({"type": "image:uri", "data": base64.b64encode(png(3) + b"\x00" * 20000).decode(),
      "format": "png"}, "messages[0].content[1].data", "image_too_large"),
    ({"type": "image:url", "url": "https://x.test/a.png"}, "messages[0].content[1].url",
     "url_not_allowed"),
    ({"type": "image:uri", "data": A}, "messages[0].content[1].format",
     "missing_required_parameter"),
    ({"type": "image:png", "data": A}, "messages[0].content[1].type", "unsupported_content"),
])
def test_native_image_part_refusals(vision_server: Server, part, param, code):
    error = native(vision_server, talk([{"type": "text", "text": "hi"}, part]), 400)["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request", param, code)
    assert error["message"].startswith(param)


def test_native_image_parts_to_a_model_without_a_projector(server: Server):
    body = talk([{"type": "text", "text": "hi"}, {"type": "image:uri", "data": A,
                                                  "format": "png"}])
    error = native(server, body, 400)["error"]
    assert (error["param"], error["code"]) == ("messages[0].content[1].data",
                                               "model_not_multimodal")
