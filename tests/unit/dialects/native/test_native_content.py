"""The native protocol's typed content parts (text, image:url, image:uri, audio:url,
audio:uri) in a conversation message's `content` and in the chat transport's `prompt`: text
joined, media placed where the parts stood, beside the `images`/`audio` lists; each refusal a
400 naming the part's field, in the native error shape; the media policy and the model's
projector judge the parts as they judge the lists."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from lmserve.chat.media import MediaPolicy, check_images
from lmserve.core.errors import ErrorKind, LmserveError
from lmserve.core.request import ChatMessage, GenerationRequest
from lmserve.dialects.native import adapter
from lmserve.dialects.native.schema import MAX_CONTENT, GenerateBody
from tests.unit.chat_service import ScriptedService, script
from tests.unit.chat.test_audio import MP3_B64, WAV_B64
from tests.unit.chat.test_media import JPEG, PNG_B64
from tests.unit.dialects.native.test_native_contract import client_for

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PNG_URI = f"data:image/png;base64,{PNG_B64}"
DEFAULT = MediaPolicy()


def native(**body: Any) -> GenerationRequest:
    return adapter.generation_request(GenerateBody(**body), default_transport="chat",
                                      has_template=True, reasoning_default=False).request


def user(*parts: dict[str, Any], role: str = "user") -> GenerationRequest:
    return native(transport="conversation", messages=[{"role": role, "content": list(parts)}])


def placed(message: ChatMessage) -> list[tuple[str, str, str, int, str | None]]:
    return [(m.kind, m.source, m.param, m.offset, m.media_type) for m in message.images]


def refused(fn: Any, *args: Any, **kwargs: Any) -> LmserveError:
    with pytest.raises(LmserveError) as caught:
        fn(*args, **kwargs)
    assert caught.value.kind is ErrorKind.INVALID_REQUEST
    assert caught.value.message.startswith(caught.value.param or "")
    return caught.value


def test_parts_are_joined_and_media_placed_where_they_stood():
    message = user({"type": "image:uri", "data": PNG_B64, "format": "png"},
                   {"type": "text", "text": "ab"},
                   {"type": "audio:uri", "data": WAV_B64, "format": "WAV"},
                   {"type": "image:url", "url": "https://h/x.png"},
                   {"type": "text", "text": "c"},
                   {"type": "audio:url", "url": "file:///clips/a.mp3"}).messages[0]
    assert message.content == "ab\nc"
    p = "messages[0].content"
    assert placed(message) == [
        ("image", "base64", f"{p}[0].data", 0, "image/png"),
        ("audio", "base64", f"{p}[2].data", 2, "audio/wav"),
        ("image", "url", f"{p}[3].url", 2, None),
        ("audio", "url", f"{p}[5].url", 4, None)]


def test_a_string_content_and_text_only_parts_in_any_role():
    talk = native(transport="conversation", messages=[
        {"role": "system", "content": [{"type": "text", "text": "be brief"}]},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "text", "text": "a"},
                                          {"type": "text", "text": "b"}]}])
    assert [(m.role, m.content, m.images) for m in talk.messages] == [
        ("system", "be brief", ()), ("user", "hi", ()), ("assistant", "a\nb", ())]
    long = [{"type": "text", "text": "x" * MAX_CONTENT}, {"type": "text", "text": ""}]
    assert refused(user, *long).param == "messages[0].content"  # the joined text's limit


def test_the_lists_stay_beside_the_parts_and_come_first():
    talk = native(transport="conversation", messages=[{
        "role": "user", "images": [{"data": PNG_B64}], "audio": [{"path": "a.wav"}],
        "content": [{"type": "text", "text": "x"},
                    {"type": "image:uri", "data": PNG_B64, "format": "png"}]}])
    assert [(m.param, m.offset) for m in talk.messages[0].images] == [
        ("messages[0].images[0]", 0), ("messages[0].audio[0]", 0),
        ("messages[0].content[1].data", 1)]
    chat = native(prompt=[{"type": "text", "text": "look"},
                          {"type": "image:url", "url": PNG_URI}],
                  system="s", images=[{"url": "https://h/y.png"}])
    assert [(m.role, m.content) for m in chat.messages] == [("system", "s"), ("user", "look")]
    assert [(m.param, m.offset, m.source) for m in chat.messages[1].images] == [
        ("images[0]", 0, "url"), ("prompt[1].url", 4, "base64")]


def test_data_uris_carry_their_type_and_the_format_must_agree():
    by_uri = user({"type": "image:uri", "data": PNG_URI}).messages[0].images[0]
    assert (by_uri.source, by_uri.data, by_uri.media_type) == ("base64", PNG_B64, "image/png")
    both = user({"type": "image:uri", "data": PNG_URI, "format": "png"}).messages[0].images[0]
    assert (both.data, both.media_type) == (PNG_B64, "image/png")
    jpg = user({"type": "image:uri", "data": "data:image/jpg;base64,AAAA", "format": "jpeg"})
    assert jpg.messages[0].images[0].media_type == "image/jpeg"  # image/jpg is image/jpeg
    clip = user({"type": "audio:uri", "data": f"data:audio/x-wav;base64,{WAV_B64}",
                 "format": "wav"}).messages[0].images[0]
    assert (clip.kind, clip.media_type) == ("audio", "audio/wav")
    error = refused(user, {"type": "image:uri", "data": PNG_URI, "format": "gif"})
    assert (error.param, error.code) == ("messages[0].content[0].format", "invalid_image")


P0 = "messages[0].content[0]"


@pytest.mark.parametrize("part, param, code", [
    ({"type": "video:url", "url": "https://h/v.mp4"}, f"{P0}.type", "unsupported_content"),
    ({"type": "image_url", "image_url": {"url": PNG_URI}}, f"{P0}.type",
     "unsupported_content"),  # OpenAI's part is not a native one
    ({"text": "no type"}, f"{P0}.type", "missing_required_parameter"),
    ({"type": ["text"], "text": "x"}, f"{P0}.type", "unsupported_content"),
    ("just text", P0, "invalid_value"),
    ({"type": "text"}, f"{P0}.text", "missing_required_parameter"),
    ({"type": "text", "text": 3}, f"{P0}.text", "invalid_value"),
    ({"type": "image:url"}, f"{P0}.url", "missing_required_parameter"),
    ({"type": "image:url", "url": "ftp://h/a.png"}, f"{P0}.url", "invalid_image"),
    ({"type": "audio:url", "url": "gopher://h/a.wav"}, f"{P0}.url", "invalid_audio"),
    ({"type": "image:uri", "format": "png"}, f"{P0}.data", "missing_required_parameter"),
    ({"type": "image:uri", "data": PNG_B64}, f"{P0}.format", "missing_required_parameter"),
    ({"type": "audio:uri", "data": WAV_B64}, f"{P0}.format", "missing_required_parameter"),
    ({"type": "image:uri", "data": "data:;base64,AAAA"}, f"{P0}.format",
     "missing_required_parameter"),
    ({"type": "image:uri", "data": PNG_B64, "format": "tiff"}, f"{P0}.format",
     "unsupported_media_type"),
    ({"type": "audio:uri", "data": WAV_B64, "format": "flac"}, f"{P0}.format",
     "unsupported_media_type"),
    ({"type": "image:uri", "data": "data:image/png,AAAA", "format": "png"}, f"{P0}.data",
     "invalid_image"),  # a data URI that is not base64
    ({"type": "image:uri", "data": "data:text/plain;base64,AAAA", "format": "png"},
     f"{P0}.data", "unsupported_media_type"),
    ({"type": "image:uri", "data": PNG_B64, "format": "png", "detail": "high"},
     f"{P0}.detail", "invalid_value"),
])
def test_bad_parts_are_refused_naming_the_field(part, param, code):
    error = refused(user, part)
    assert (error.param, error.code) == (param, code)


def test_media_parts_go_in_user_messages_and_parts_need_a_template():
    for role in ("assistant", "system", "tool"):
        error = refused(user, {"type": "image:uri", "data": PNG_B64, "format": "png"},
                        role=role)
        assert (error.param, error.code) == (f"{P0}.type", "unsupported_content")
    error = refused(native, transport="raw", prompt=[{"type": "text", "text": "x"}])
    assert error.param == "prompt"
    error = refused(native, prompt=[{"type": "text", "text": "x"}, {"type": "audio"}])
    assert (error.param, error.code) == ("prompt[1].type", "unsupported_content")


def test_the_media_policy_judges_parts_by_their_bytes():
    """A declared format that is not what the bytes are is refused, for images as for audio;
    parts count with the lists against the per-request limit; URLs need an allowed host."""
    def checked(*parts: dict[str, Any], policy: MediaPolicy = DEFAULT) -> LmserveError:
        return refused(check_images, user(*parts).messages, policy)
    jpeg_said_png = checked({"type": "image:uri", "data": base64.b64encode(JPEG).decode(),
                             "format": "png"})
    assert (jpeg_said_png.param, jpeg_said_png.code) == (f"{P0}.data", "invalid_image")
    assert "declared as image/png but its data is image/jpeg" in jpeg_said_png.message
    wav_said_mp3 = checked({"type": "audio:uri", "data": WAV_B64, "format": "mp3"})
    assert (wav_said_mp3.param, wav_said_mp3.code) == (f"{P0}.data", "invalid_audio")
    mp3 = user({"type": "audio:uri", "data": MP3_B64, "format": "mp3"}).messages
    assert [i.kind for i in check_images(mp3, MediaPolicy())] == ["audio"]
    big = checked({"type": "image:uri", "data": PNG_B64, "format": "png"},
                  policy=MediaPolicy(max_bytes=10))
    assert big.code == "image_too_large"
    many = checked({"type": "image:uri", "data": PNG_B64, "format": "png"},
                   {"type": "audio:uri", "data": WAV_B64, "format": "wav"},
                   policy=MediaPolicy(max_images=1))
    assert (many.param, many.code) == ("messages[0].content[1].data", "too_many_audio")
    url = checked({"type": "image:url", "url": "https://elsewhere.test/a.png"},
                  policy=MediaPolicy(allowed_domains=("images.example.com",)))
    assert (url.param, url.code) == (f"{P0}.url", "url_not_allowed")


def post(body: dict[str, Any]) -> dict[str, Any]:
    service = ScriptedService(script(["ok"]), TEMPLATE)
    with client_for(service) as client:
        r = client.post("/m/query/", json=body)
    assert r.status_code == 400, r.text
    return dict(r.json()["error"])


@pytest.mark.parametrize("body, param, code", [
    ({"transport": "conversation", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image:base64", "data": PNG_B64}]}]},
     "messages[0].content[1].type", "unsupported_content"),
    ({"transport": "conversation", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image:uri", "data": PNG_B64,
                                         "format": "png"}]}]},
     "messages[0].content[1].data", "model_not_multimodal"),  # no projector
    ({"prompt": [{"type": "audio:uri", "data": WAV_B64, "format": "wav"}]},
     "prompt[0].data", "model_not_multimodal"),
    ({"transport": "conversation", "messages": [{"role": "user", "content": 5}]},
     "messages[0].content", "invalid_value"),
])
def test_refusals_over_http_are_400s_in_the_native_shape(body, param, code):
    error = post(body)
    assert (error["type"], error["param"], error["code"]) == ("invalid_request", param, code)
    assert error["message"].startswith(param) or code == "invalid_value"


def test_a_text_only_part_list_answers_like_the_string():
    service = ScriptedService(script(["ok"]), TEMPLATE)
    with client_for(service) as client:
        for content in ("hi\nthere", [{"type": "text", "text": "hi"},
                                      {"type": "text", "text": "there"}]):
            r = client.post("/m/query/", json={"transport": "conversation", "messages": [
                {"role": "user", "content": content}]})
            assert r.status_code == 200, r.text
    first, second = (started[1] for started in service.started)
    assert first.tokens == second.tokens
