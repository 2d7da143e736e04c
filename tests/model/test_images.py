"""Image input in every dialect against the real server, whose SmolLM2 has no vision projector:
valid images end in the no-projector 400, policy violations in a 400 naming the field, each in
the dialect's own error shape; the official clients raise their own error types."""

from __future__ import annotations

import base64

import anthropic
import httpx
import ollama
import openai
import pytest

from tests.unit.chat.test_media import PNG, PNG_B64

MODEL = "smollm2"
NO_PROJECTOR = "model 'smollm2' has no vision projector; it cannot take image input"
PNG_URL = f"data:image/png;base64,{PNG_B64}"
P = "/models/smollm2/"


@pytest.fixture()
def http(server):  # type: ignore[no-untyped-def]
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def openai_parts(image_url: str) -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": image_url, "detail": "low"}}]}]


# ---- OpenAI chat completions and Responses --------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_openai_chat_image_needs_a_projector(client, stream):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=openai_parts(PNG_URL),
                                       max_tokens=4, stream=stream)
    error = caught.value.body
    assert caught.value.status_code == 400 and error["type"] == "invalid_request_error"
    assert error["code"] == "model_not_multimodal" and NO_PROJECTOR in error["message"]
    assert error["param"] == "messages[0].content[1].image_url"


@pytest.mark.parametrize("image_url, code", [
    ("data:image/bmp;base64,Qk0=", "unsupported_media_type"),
    (f"data:image/jpeg;base64,{PNG_B64}", "invalid_image"),  # the bytes say PNG
    ("https://example.com/cat.png", "url_not_allowed"),
    ("file:///etc/passwd", "path_not_allowed"),
])
def test_openai_chat_policy_errors_name_the_part(client, image_url, code):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=openai_parts(image_url),
                                       max_tokens=4)
    assert caught.value.code == code
    assert caught.value.param == "messages[0].content[1].image_url"


def test_openai_chat_refuses_an_oversized_image(http):
    huge = "A" * (28 * 1024 * 1024)  # decodes to more than the default 20 MiB
    r = http.post("/v1/chat/completions", json={
        "model": MODEL, "max_tokens": 4, "messages": openai_parts(f"data:image/png;base64,{huge}")})
    assert r.status_code == 400 and r.json()["error"]["code"] == "image_too_large"
    assert "--media-max-bytes" in r.json()["error"]["message"]


def test_responses_input_image(client):
    image = {"type": "input_image", "image_url": PNG_URL, "detail": "auto"}
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=MODEL, max_output_tokens=16, input=[
            {"role": "user", "content": [{"type": "input_text", "text": "Describe."}, image]}])
    assert caught.value.code == "model_not_multimodal"
    assert caught.value.param == "input[0].content[1].image_url"
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=MODEL, max_output_tokens=16, input=[
            {"role": "user", "content": [{**image, "image_url": "https://example.com/a.png"}]}])
    assert caught.value.code == "url_not_allowed"


# ---- Anthropic --------------------------------------------------------------------------------

@pytest.fixture()
def claude(server):  # type: ignore[no-untyped-def]
    with anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0,
                             timeout=120) as c:
        yield c


@pytest.mark.parametrize("source, needle", [
    ({"type": "base64", "media_type": "image/png", "data": PNG_B64}, NO_PROJECTOR),
    ({"type": "base64", "media_type": "image/gif", "data": PNG_B64}, "declared as image/gif"),
    ({"type": "url", "url": "https://example.com/cat.png"}, "--media-allowed-domain"),
])
def test_anthropic_image_blocks(claude, source, needle):
    content = [{"type": "text", "text": "What is this?"}, {"type": "image", "source": source}]
    with pytest.raises(anthropic.BadRequestError) as caught:
        claude.messages.create(model=MODEL, max_tokens=8,
                               messages=[{"role": "user", "content": content}])
    body = caught.value.body
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"].startswith("messages[0].content[1].source: ")
    assert needle in body["error"]["message"]


def test_anthropic_streaming_and_count_tokens_refuse_before_anything_starts(claude):
    content = [{"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                            "data": PNG_B64}}]
    messages = [{"role": "user", "content": content}]
    with pytest.raises(anthropic.BadRequestError, match="vision projector"):
        with claude.messages.stream(model=MODEL, max_tokens=8, messages=messages) as stream:
            stream.until_done()
    with pytest.raises(anthropic.BadRequestError, match="vision projector"):
        claude.messages.count_tokens(model=MODEL, messages=messages)


# ---- Ollama -----------------------------------------------------------------------------------

@pytest.fixture()
def oc(server):  # type: ignore[no-untyped-def]
    with ollama.Client(host=server.url, timeout=120) as c:
        yield c


def test_ollama_chat_and_generate_images(oc):
    with pytest.raises(ollama.ResponseError) as caught:
        oc.chat(model=MODEL, messages=[{"role": "user", "content": "What is it?",
                                        "images": [PNG]}])
    assert caught.value.status_code == 400
    assert caught.value.error == f"messages[0].images[0]: {NO_PROJECTOR}"
    with pytest.raises(ollama.ResponseError) as caught:
        oc.generate(model=MODEL, prompt="What is it?", images=[PNG], stream=True).__next__()
    assert caught.value.status_code == 400 and NO_PROJECTOR in caught.value.error
    not_an_image = base64.b64encode(b"just some text").decode()
    with pytest.raises(ollama.ResponseError) as caught:
        oc.generate(model=MODEL, prompt="What is it?", images=[not_an_image])
    assert caught.value.error.startswith("images[0]: the data is not a PNG")


# ---- native -------------------------------------------------------------------------------

@pytest.mark.parametrize("body, param, code", [
    ({"prompt": "What is it?", "images": [{"data": PNG_B64, "media_type": "image/png"}]},
     "images[0]", "model_not_multimodal"),
    ({"transport": "conversation", "messages": [
        {"role": "user", "content": "What is it?", "images": [{"url": PNG_URL}]}]},
     "messages[0].images[0]", "model_not_multimodal"),
    ({"prompt": "x", "images": [{"path": "cat.png"}]}, "images[0]", "path_not_allowed"),
    ({"prompt": "x", "images": [{"url": "http://127.0.0.1:1/cat.png"}]}, "images[0]",
     "url_not_allowed"),
    ({"prompt": "x", "images": [{"url": PNG_URL, "data": PNG_B64}]}, "images[0]", None),
    ({"transport": "raw", "prompt": "x", "images": [{"data": PNG_B64}]}, "images", None),
])
def test_native_images(http, body, param, code):
    for endpoint in ("query/", "stream/"):  # a stream is refused before it is created
        r = http.post(f"{P}{endpoint}", json=body)
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == param
        assert error.get("code") == code and error["type"] == "invalid_request"
