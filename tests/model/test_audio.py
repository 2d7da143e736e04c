"""Audio clips through an audio projector: SmolLM2 with the random Ultravox-style projector
`scripts/make_test_mmproj.py --audio` writes (the way llama.cpp's CI tests multimodal
plumbing), clips written by the stdlib's `wave`. The answers mean nothing; what is asserted is
the plumbing: a clip changes greedy output, two clips differ, each 30-second window of a clip
counts its positions and is encoded on its own, the same clip is reused (prefix, then the
embedding cache), a clip's URL answers as the clip inline, and the media policy's 400s hold in
every dialect that has audio parts (OpenAI chat, Responses, native). A model without an audio
encoder refuses clips with model_not_multimodal."""

from __future__ import annotations

import base64
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.media_server import Answer, MediaHost, media_host
from tests.model.conftest import Server, own_server
from tests.sounds import wav

ROOT = Path(__file__).resolve().parents[2]
MODEL = "smollm2"
P = f"/models/{MODEL}/"
AUDIO_TOKENS = 50  # a 30-second window: 1500 encoder frames / stack factor 30
LIMIT = 80_000  # --audio-max-bytes
QUESTION = "What is said here?"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


A, B = wav(440), wav(1000)
LONG = wav(300, seconds=31, rate=2000)  # 31 s (+ mtmd's 30 s of padding): two windows
BIG = wav(500, seconds=LIMIT / 4000 + 1)  # over --audio-max-bytes
LYING = A[:44] + bytes(10)  # the header declares 2000 bytes of samples
JUNK_MP3 = b"\xff\xfb\x90\x00" + bytes(400)  # an MP3 frame header, then nothing decodable


@pytest.fixture(scope="module")
def audio_mmproj(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mmproj") / "mmproj-smollm2-audio-test.gguf"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_test_mmproj.py"), "--audio",
                    str(out)], check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def host() -> Iterator[MediaHost]:
    with media_host({"/a.wav": Answer(A, "audio/x-wav"),
                     "/big.wav": Answer(BIG, "audio/wav")}) as h:
        yield h


@pytest.fixture(scope="module")
def audio_server(tmp_path_factory: pytest.TempPathFactory, audio_mmproj: Path
                 ) -> Iterator[Server]:
    yield from own_server(tmp_path_factory, "audio", MODEL, "--mmproj", str(audio_mmproj),
                          "--parallel", "2", "--ctx", "1024", "--threads", "2",
                          "--media-max-images", "2", "--audio-max-bytes", str(LIMIT),
                          "--media-allowed-domain", "127.0.0.1", "--media-timeout", "5")


@pytest.fixture()
def oai(audio_server: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=audio_server.base_url, api_key="x", timeout=300,
                       max_retries=0) as c:
        yield c


def input_audio(data: bytes, fmt: str = "wav") -> dict[str, Any]:
    return {"type": "input_audio", "input_audio": {"data": b64(data), "format": fmt}}


def chat(client: openai.OpenAI, *parts: dict[str, Any], text: str = QUESTION,
         max_tokens: int = 8) -> Any:
    content = [{"type": "text", "text": text}, *parts]
    return client.chat.completions.create(model=MODEL, temperature=0, max_tokens=max_tokens,
                                          messages=[{"role": "user", "content": content}])


def test_card_reports_audio(audio_server: Server):
    models = httpx.get(f"{audio_server.base_url}/models").json()["data"]
    meta = next(m for m in models if m["id"] == MODEL)["meta"]
    assert (meta["audio"], meta["vision"]) == (True, False)


def first_token_distribution(reply: Any) -> dict[str, float]:
    return {t.token: t.logprob for t in reply.choices[0].logprobs.content[0].top_logprobs}


def test_clips_change_output_and_count_as_prompt_tokens(oai, audio_server: Server):
    """A clip changes what the model computes, and two clips differently. Compared as the
    first token's distribution: with random projector weights the greedy text of two clips
    can agree for all 8 tokens (it did on an AMD EPYC), while their logprobs still differ."""
    def ask(*parts: dict[str, Any]) -> Any:
        audio_server.flush()  # each computed whole: the same input would give the same floats
        return oai.chat.completions.create(
            model=MODEL, temperature=0, max_tokens=8, logprobs=True, top_logprobs=5,
            messages=[{"role": "user", "content": [{"type": "text", "text": QUESTION}, *parts]}])

    plain, with_a, with_b = ask(), ask(input_audio(A)), ask(input_audio(B))
    dists = [first_token_distribution(r) for r in (plain, with_a, with_b)]

    def moved(x: dict[str, float], y: dict[str, float]) -> float:
        return max(abs(x.get(t, -100.0) - y.get(t, -100.0)) for t in x.keys() | y.keys())

    assert moved(dists[0], dists[1]) > 0.01 and moved(dists[1], dists[2]) > 0.01, dists
    assert with_a.usage.prompt_tokens == plain.usage.prompt_tokens + AUDIO_TOKENS
    assert with_b.usage.prompt_tokens == with_a.usage.prompt_tokens


def test_same_clip_reuses_prefix_then_embedding_cache(oai, audio_server: Server):
    audio_server.flush()
    first = chat(oai, input_audio(A), text="Transcribe it.")
    decoded = audio_server.metric("lmserve_media_chunks_total")
    again = chat(oai, input_audio(A), text="Transcribe it.")
    assert again.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1
    assert again.choices[0].message.content == first.choices[0].message.content
    assert audio_server.metric("lmserve_media_chunks_total") == decoded  # KV held the clip
    hits = audio_server.metric("lmserve_media_cache_hits_total")
    audio_server.flush()  # the KV is gone; the encoded clip is not
    third = chat(oai, input_audio(A), text="Transcribe it.")
    assert audio_server.metric("lmserve_media_cache_hits_total") == hits + 1
    assert third.choices[0].message.content == first.choices[0].message.content


def test_a_long_clip_is_one_chunk_per_window(oai, audio_server: Server):
    plain = chat(oai, max_tokens=1)
    chunks = audio_server.metric("lmserve_media_chunks_total")
    hits = audio_server.metric("lmserve_media_cache_hits_total")
    answer = chat(oai, input_audio(LONG), max_tokens=1)
    assert answer.usage.prompt_tokens == plain.usage.prompt_tokens + 2 * AUDIO_TOKENS
    assert audio_server.metric("lmserve_media_chunks_total") == chunks + 2
    # each window is encoded from its own samples (its own key), not taken for the first
    assert audio_server.metric("lmserve_media_cache_hits_total") == hits


def test_a_clip_url_answers_as_the_clip_inline(oai, host: MediaHost):
    inline = chat(oai, input_audio(A))
    by_url = chat(oai, {"type": "audio_url", "audio_url": {"url": host.url("/a.wav")}})
    assert by_url.choices[0].message.content == inline.choices[0].message.content
    assert by_url.usage.prompt_tokens == inline.usage.prompt_tokens


def test_responses_and_native_take_clips(oai, audio_server: Server):
    def respond(*parts: dict[str, Any]) -> Any:
        return oai.responses.create(model=MODEL, temperature=0, max_output_tokens=16, input=[
            {"role": "user", "content": [{"type": "input_text", "text": QUESTION}, *parts]}])
    plain, heard = respond(), respond(input_audio(A))
    assert heard.usage.input_tokens == plain.usage.input_tokens + AUDIO_TOKENS
    assert heard.output_text != plain.output_text

    def native(**extra: Any) -> dict[str, Any]:
        body = {"transport": "chat", "prompt": QUESTION,
                "params": {"temperature": 0, "max_tokens": 8}, **extra}
        r = httpx.post(f"{audio_server.url}{P}query/", json=body, timeout=300)
        assert r.status_code == 200, r.text
        return r.json()
    quiet, spoken = native(), native(audio=[{"data": b64(A), "media_type": "audio/wav"}])
    assert spoken["usage"]["input_tokens"] == quiet["usage"]["input_tokens"] + AUDIO_TOKENS



def test_native_audio_parts_answer_as_the_audio_list(audio_server: Server, host: MediaHost):
    """An audio:uri part (and an audio:url part) before the text reaches the model as the
    same clip in the `audio` list does: greedy, the same answer and the same prompt."""
    def native(body: dict[str, Any]) -> dict[str, Any]:
        r = httpx.post(f"{audio_server.url}{P}query/", timeout=300,
                       json={"params": {"temperature": 0, "max_tokens": 8}, **body})
        assert r.status_code == 200, r.text
        return dict(r.json())
    listed = native({"prompt": QUESTION, "audio": [{"data": b64(A), "media_type": "audio/wav"}]})
    text = {"type": "text", "text": QUESTION}
    for clip in ({"type": "audio:uri", "data": b64(A), "format": "wav"},
                 {"type": "audio:url", "url": host.url("/a.wav")}):
        for body in ({"prompt": [clip, text]},
                     {"transport": "conversation",
                      "messages": [{"role": "user", "content": [clip, text]}]}):
            answer = native(body)
            assert answer["blocks"] == listed["blocks"]
            assert answer["usage"]["input_tokens"] == listed["usage"]["input_tokens"]


# ---- the policy's 400s, in each dialect that has audio parts ---------------------------------

def refusal_openai(server: Server, clips: list[bytes | str], fmt: str) -> dict[str, Any]:
    parts = [{"type": "audio_url", "audio_url": {"url": c}} if isinstance(c, str)
             else input_audio(c, fmt) for c in clips]
    r = httpx.post(f"{server.base_url}/chat/completions", timeout=120, json={
        "model": MODEL, "max_tokens": 4,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, *parts]}]})
    assert r.status_code == 400, r.text
    return dict(r.json()["error"])


def refusal_responses(server: Server, clips: list[bytes | str], fmt: str) -> dict[str, Any]:
    parts = [input_audio(c, fmt) for c in clips if isinstance(c, bytes)]
    r = httpx.post(f"{server.base_url}/responses", timeout=120, json={
        "model": MODEL, "max_output_tokens": 16,
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}, *parts]}]})
    assert r.status_code == 400, r.text
    return dict(r.json()["error"])


def refusal_native(server: Server, clips: list[bytes | str], fmt: str) -> dict[str, Any]:
    media_type = {"wav": "audio/wav", "mp3": "audio/mpeg"}[fmt]
    audio = [{"url": c} if isinstance(c, str) else {"data": b64(c), "media_type": media_type}
             for c in clips]
    r = httpx.post(f"{server.url}{P}query/", timeout=120,
                   json={"prompt": "hi", "audio": audio, "params": {"max_tokens": 4}})
    assert r.status_code == 400, r.text
    return dict(r.json()["error"])


def refusal_native_parts(server: Server, clips: list[bytes | str], fmt: str) -> dict[str, Any]:
    """The native protocol's typed parts: audio:uri (base64 and its format), audio:url."""
    parts = [{"type": "audio:url", "url": c} if isinstance(c, str)
             else {"type": "audio:uri", "data": b64(c), "format": fmt} for c in clips]
    r = httpx.post(f"{server.url}{P}query/", timeout=120, json={
        "transport": "conversation", "params": {"max_tokens": 4},
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, *parts]}]})
    assert r.status_code == 400, r.text
    return dict(r.json()["error"])


@pytest.mark.parametrize("refusal", [refusal_openai, refusal_responses, refusal_native,
                                     refusal_native_parts])
@pytest.mark.parametrize("clips, fmt, code, words", [
    ([BIG], "wav", "audio_too_large", "--audio-max-bytes"),
    ([LYING], "wav", "invalid_audio", "declares 2000 bytes of samples"),
    ([JUNK_MP3], "mp3", "invalid_audio", "could not be decoded"),  # llama.cpp's decoder says
    ([A], "mp3", "invalid_audio", "declared as MP3 but its data is WAV"),
    ([A, B, A], "wav", "too_many_audio", "--media-max-images"),
])
def test_policy_and_corrupt_clips_are_400s(audio_server, refusal, clips, fmt, code, words):
    error = refusal(audio_server, clips, fmt)
    assert error["code"] == code and words in error["message"]
    assert error["message"].startswith(error["param"])


@pytest.mark.parametrize("refusal", [refusal_openai, refusal_native, refusal_native_parts])
def test_clip_urls_pass_the_allow_list_and_the_size_limit(audio_server, host, refusal):
    other_host = refusal(audio_server, [host.url("/a.wav", host="localhost")], "wav")
    assert other_host["code"] == "url_not_allowed"
    too_big = refusal(audio_server, [host.url("/big.wav")], "wav")
    assert too_big["code"] == "audio_too_large"


# ---- a model without an audio encoder --------------------------------------------------------

def test_a_model_without_audio_refuses_clips(server: Server):
    message = f"model '{MODEL}' has no audio encoder"
    for refusal, param in ((refusal_openai, "messages[0].content[1].input_audio.data"),
                           (refusal_responses, "input[0].content[1].input_audio.data"),
                           (refusal_native, "audio[0]"),
                           (refusal_native_parts, "messages[0].content[1].data")):
        error = refusal(server, [A], "wav")
        assert error["code"] == "model_not_multimodal" and error["param"] == param
        assert message in error["message"]
