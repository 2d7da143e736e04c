"""Audio input without a model: each dialect's audio parts become neutral inputs of kind
"audio" (their field and place kept), the media policy judges clips (size under
--audio-max-bytes, WAV or MP3 by their bytes, a WAV header that tells the truth, the count,
hosts, the media directory), the prompter sends clips only to a projector that takes audio,
and an upstream receives OpenAI's audio parts."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import struct
from collections.abc import Sequence
from pathlib import Path

import httpx
import pytest

from lmserve.chat.media import MediaPolicy, check_images, check_kinds, media_policy
from lmserve.chat.media_load import load_image
from lmserve.chat.templates import ChatTemplate
from lmserve.core.errors import ErrorKind, LmserveError
from lmserve.core.images import (
    MediaSpan,
    audio_from_input,
    audio_from_url,
    image_from_base64,
    image_from_path,
)
from lmserve.core.request import ChatMessage, GenerationRequest
from lmserve.dialects.native import adapter as native_adapter
from lmserve.dialects.native.schema import GenerateBody
from lmserve.dialects.openai import adapter as openai_adapter
from lmserve.dialects.openai.responses import items
from lmserve.dialects.openai.schema import ChatCompletionRequest
from lmserve.engine.runner import chunk_key, stand_in_ids
from lmserve.prompting import Prompter
from lmserve.upstream.wire import content_parts
from tests.sounds import wav
from tests.unit.chat_service import StubModel
from tests.unit.chat.test_media import PNG_B64

WAV = wav(seconds=0.1)
WAV_B64 = base64.b64encode(WAV).decode()
MP3 = b"ID3\x04\x00\x00\x00\x00\x00\x00" + bytes(32)  # an ID3 tag: MP3 by its bytes
MP3_B64 = base64.b64encode(MP3).decode()


def refused(fn, *args, **kwargs) -> LmserveError:  # type: ignore[no-untyped-def]
    with pytest.raises(LmserveError) as caught:
        fn(*args, **kwargs)
    assert caught.value.kind is ErrorKind.INVALID_REQUEST
    return caught.value


def clip(data: bytes | str, fmt: str | None = "wav", param: str = "clip"):  # type: ignore[no-untyped-def]
    """An input_audio clip whose errors name `param`."""
    text = data if isinstance(data, str) else base64.b64encode(data).decode()
    return dataclasses.replace(audio_from_input({"data": text, "format": fmt}, "x"), param=param)


def placed(message: ChatMessage) -> list[tuple[str, str, str, int]]:
    return [(m.kind, m.source, m.param, m.offset) for m in message.images]


# ---- parsing ---------------------------------------------------------------------------------

def test_input_audio_takes_wav_and_mp3_formats():
    assert clip(WAV, "wav").media_type == "audio/wav"
    assert clip(MP3, "MP3").media_type == "audio/mpeg"
    assert clip(WAV, None).media_type is None  # the bytes will say
    err = refused(audio_from_input, {"data": WAV_B64, "format": "ogg"}, "clip")
    assert (err.param, err.code) == ("clip.format", "unsupported_media_type")
    assert refused(audio_from_input, {"format": "wav"}, "clip").param == "clip.data"
    assert audio_from_input({"data": WAV_B64}, "clip").param == "clip.data"
    assert refused(audio_from_input, "UklGRg==", "clip").param == "clip"


def test_audio_urls_by_scheme():
    inline = audio_from_url(f"data:audio/wav;base64,{WAV_B64}", "a")
    assert (inline.kind, inline.source, inline.media_type) == ("audio", "base64", "audio/wav")
    remote = audio_from_url("https://h/a.mp3", "a")
    assert (remote.kind, remote.source, remote.remote) == ("audio", "url", True)
    err = refused(audio_from_url, "ftp://h/a.wav", "a")
    assert err.code == "invalid_audio" and "an audio URL" in err.message


def test_openai_chat_audio_parts_keep_their_place():
    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": [
        {"type": "text", "text": "ab"},
        {"type": "input_audio", "input_audio": {"data": WAV_B64, "format": "wav"}},
        {"type": "text", "text": "c"},
        {"type": "audio_url", "audio_url": {"url": "https://h/x.mp3"}},
        {"type": "audio_url", "audio_url": "https://h/y.wav"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}}]}])
    message = openai_adapter.chat_request(body).messages[0]
    assert message.content == "ab\nc"
    assert placed(message) == [
        ("audio", "base64", "messages[0].content[1].input_audio.data", 2),
        ("audio", "url", "messages[0].content[3].audio_url", 4),
        ("audio", "url", "messages[0].content[4].audio_url", 4),
        ("image", "base64", "messages[0].content[5].image_url", 4)]


@pytest.mark.parametrize("part, param", [
    ({"type": "input_audio", "input_audio": {"data": WAV_B64, "format": "aac"}},
     "messages[0].content[0].input_audio.format"),
    ({"type": "audio_url", "audio_url": {}}, "messages[0].content[0].audio_url"),
])
def test_openai_chat_audio_refusals_name_the_part(part, param):
    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": [part]}])
    assert refused(openai_adapter.chat_request, body).param == param


def test_responses_input_audio_is_stored_as_sent_and_placed_in_the_chat():
    part = {"type": "input_audio", "input_audio": {"data": WAV_B64, "format": "wav"}}
    own = items.own_items([{"role": "user", "content": [
        {"type": "input_text", "text": "hear"}, part]}])
    assert own[0]["content"][1] == part
    message = items.chat_messages(None, own)[0]
    assert message.content == "hear"
    assert placed(message) == [("audio", "base64", "input[0].content[1].input_audio.data", 4)]
    bad = [{"role": "user", "content": [{**part, "input_audio": {"data": WAV_B64,
                                                                 "format": "flac"}}]}]
    assert refused(items.own_items, bad).param == "input[0].content[0].input_audio.format"
    outside = [{"role": "assistant", "content": [part]}]
    assert refused(items.own_items, outside).param == "input[0].content[0].type"


def test_native_audio_for_chat_and_conversation():
    def native(**body):  # type: ignore[no-untyped-def]
        return native_adapter.generation_request(
            GenerateBody(**body), default_transport="chat", has_template=True,
            reasoning_default=False).request
    chat = native(prompt="p", images=[{"path": "a.png"}],
                  audio=[{"data": WAV_B64, "media_type": "audio/wav"}, {"path": "b.mp3"}])
    assert placed(chat.messages[0]) == [("image", "path", "images[0]", 0),
                                        ("audio", "base64", "audio[0]", 0),
                                        ("audio", "path", "audio[1]", 0)]
    talk = native(transport="conversation", messages=[
        {"role": "user", "content": "p", "audio": [{"url": "https://h/x.wav"}]}])
    assert placed(talk.messages[0]) == [("audio", "url", "messages[0].audio[0]", 0)]
    with pytest.raises(LmserveError) as caught:
        native(transport="raw", prompt="p", audio=[])
    assert caught.value.param == "audio"


# ---- policy ----------------------------------------------------------------------------------

def conversation(*media) -> list[ChatMessage]:  # type: ignore[no-untyped-def]
    return [ChatMessage("user", "hi", images=tuple(media))]


def test_audio_has_its_own_size_limit():
    policy = MediaPolicy(max_bytes=10, audio_max_bytes=len(WAV))
    assert check_images(conversation(clip(WAV)), policy)  # over the image limit: fine
    err = refused(check_images, conversation(clip(WAV + b"\0")), MediaPolicy(
        audio_max_bytes=len(WAV)))
    assert err.code == "audio_too_large" and "--audio-max-bytes" in err.message
    huge = "A" * (4 * len(WAV))  # refused by its length, before any decoding
    assert refused(check_images, conversation(clip(huge)), policy).code == "audio_too_large"


@pytest.mark.parametrize("data, fmt, words", [
    (b"OggS" + bytes(40), None, "not a WAV or MP3"),
    (WAV, "mp3", "declared as MP3 but its data is WAV"),
    (MP3, "wav", "declared as WAV but its data is MP3"),
    (WAV[:44] + bytes(10), None, "declares 400 bytes of samples, but 10 follow"),
    (WAV[:40] + struct.pack("<I", 0), None, "holds no samples"),
    (b"RIFF\x04\x00\x00\x00WAVEdata\x00\x00\x00\x00", None, "before a fmt chunk"),
    (b"RIFF\x04\x00\x00\x00WAVEJUNK\x00\x00\x00\x00", None, "no fmt and data chunks"),
])
def test_clips_must_be_what_they_say(data, fmt, words):
    err = refused(check_images, conversation(clip(data, fmt, "p")), MediaPolicy())
    assert err.code == "invalid_audio" and err.param == "p" and words in err.message


def test_count_hosts_and_files_apply_to_audio(tmp_path: Path):
    policy = MediaPolicy(max_images=2)
    image = image_from_base64(PNG_B64, "i")
    err = refused(check_images, conversation(image, clip(WAV, param="a1"), clip(WAV, param="a2")),
                  policy)
    assert (err.code, err.param) == ("too_many_audio", "a2")
    assert "images and audio clips" in err.message
    err = refused(check_images, conversation(audio_from_url("https://h/a.wav", "u")), policy)
    assert err.code == "url_not_allowed" and "audio URLs are not allowed" in err.message
    err = refused(check_images, conversation(image_from_path("a.wav", "f", kind="audio")),
                  policy)
    assert err.code == "path_not_allowed" and "local audio files" in err.message
    (tmp_path / "a.wav").write_bytes(WAV)
    local = MediaPolicy(local_dir=str(tmp_path), audio_max_bytes=len(WAV) - 1)
    err = refused(check_images, conversation(image_from_path("a.wav", "f", kind="audio")), local)
    assert err.code == "audio_too_large"


def test_audio_max_bytes_is_a_policy_key():
    assert media_policy({"audio_max_bytes": "2048"}).audio_max_bytes == 2048
    assert MediaPolicy().audio_max_bytes == 100 << 20  # seed 003's default
    with pytest.raises(ValueError, match="audio_max_bytes"):
        media_policy({"audio_max_bytes": 0})


def test_a_model_takes_only_the_kinds_its_projector_encodes():
    image, audio = image_from_base64(PNG_B64, "i"), clip(WAV, param="a")
    check_kinds("m", [image, audio], vision=True, audio=True)
    err = refused(check_kinds, "m", [image, audio], vision=True, audio=False)
    assert (err.code, err.param) == ("model_not_multimodal", "a")
    assert "model 'm' has no audio encoder" in err.message
    err = refused(check_kinds, "m", [image, audio], vision=False, audio=True)
    assert err.param == "i" and "no vision projector" in err.message


# ---- the prompter and a projector ------------------------------------------------------------

class AudioProjector:
    """A projector with an audio encoder only: each clip is 3 positions after its marker."""

    vision, audio = False, True

    def __init__(self) -> None:
        self.calls: list[tuple[list[bytes], list[str], list[str]]] = []

    def tokenize(self, text: str, images: Sequence[tuple[bytes, str]], *, add_special: bool,
                 params: Sequence[str] = (), kinds: Sequence[str] = ()
                 ) -> tuple[list[int], list[MediaSpan]]:
        self.calls.append(([d for d, _ in images], list(params), list(kinds)))
        tokens: list[int] = []
        spans: list[MediaSpan] = []
        for i, piece in enumerate(text.split("<__media__>")):
            if i:
                spans.append(MediaSpan(len(tokens), 3, images[i - 1][1], None))
                tokens.extend([-1, -2, -3])
            tokens.extend(ord(c) for c in piece)
        return tokens, spans


def test_the_prompter_sends_clips_to_an_audio_projector():
    projector = AudioProjector()
    template = ChatTemplate("{% for m in messages %}{{ m.content }}|{% endfor %}")
    prompter = Prompter("m", StubModel(), template, n_ctx=4096,  # type: ignore[arg-type]
                        projector=projector)
    request = GenerationRequest(messages=conversation(clip(WAV, param="a").at(1)))
    prepared = prompter.prepare(request)
    assert projector.calls == [([WAV], ["a"], ["audio"])]
    assert [s.start for s in prepared.media] == [1] and len(prepared.tokens) == len("hi|") + 3
    image = image_from_base64(PNG_B64, "i")
    err = refused(prompter.prepare, GenerationRequest(messages=conversation(image)))
    assert err.code == "model_not_multimodal" and err.param == "i"


def test_each_window_of_a_long_clip_has_its_own_key():
    key = "ab" * 32
    keys = [chunk_key(key, n) for n in range(3)]
    assert keys[0] == key and len(set(keys)) == 3
    assert stand_in_ids(keys[0], 4) != stand_in_ids(keys[1], 4)


# ---- loading and the upstream ----------------------------------------------------------------

def test_downloaded_clips_are_checked_by_their_bytes():
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/a.wav":
            return httpx.Response(200, content=WAV, headers={"content-type": "audio/x-wav"})
        if request.url.path == "/odd.wav":  # a label of no use: the bytes decide
            return httpx.Response(200, content=WAV, headers={"content-type": "audio/x-odd"})
        if request.url.path == "/lying.mp3":
            return httpx.Response(200, content=WAV, headers={"content-type": "audio/mpeg"})
        if request.url.path == "/big.wav":
            return httpx.Response(200, content=WAV + bytes(100))
        return httpx.Response(404)

    policy = MediaPolicy(allowed_domains=("h",), audio_max_bytes=len(WAV) + 10)

    async def load(path: str):  # type: ignore[no-untyped-def]
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
            return await load_image(audio_from_url(f"https://h{path}", "u"), policy, client)

    assert asyncio.run(load("/a.wav")).media_type == "audio/wav"
    assert asyncio.run(load("/odd.wav")).data == WAV
    for path, code in (("/lying.mp3", "invalid_audio"), ("/big.wav", "audio_too_large"),
                       ("/gone.wav", "audio_fetch_failed")):
        with pytest.raises(LmserveError) as caught:
            asyncio.run(load(path))
        assert caught.value.code == code and caught.value.param == "u"


def test_an_upstream_gets_openai_audio_parts():
    parts = content_parts("hear this", [clip(WAV).at(4), clip(MP3, None).at(9),
                                        audio_from_url("https://h/a.wav", "u").at(9)])
    assert parts == [
        {"type": "text", "text": "hear"},
        {"type": "input_audio", "input_audio": {"data": WAV_B64, "format": "wav"}},
        {"type": "text", "text": " this"},
        {"type": "input_audio", "input_audio": {"data": MP3_B64, "format": "mp3"}},
        {"type": "audio_url", "audio_url": {"url": "https://h/a.wav"}}]
