"""OpenAI logprobs shapes from neutral TokenLogprobs, and the adapter's logprob fields."""

from __future__ import annotations

import pytest

from lmserve.core.backend import choice_step
from lmserve.core.errors import LmserveError
from lmserve.core.events import TokenLogprob, TokenOutput, TopLogprob
from lmserve.dialects.openai import adapter, encoder
from lmserve.dialects.openai.logprobs import (
    StreamOffsets,
    chat_logprobs,
    choice_completion_logprobs,
    token_string,
    with_logprobs,
)
from lmserve.dialects.openai.schema import ChatCompletionRequest, CompletionRequest


def entry(piece: bytes, logprob: float | None, *alts: tuple[bytes, float]) -> TokenLogprob:
    top = tuple(TopLogprob(i, p, v) for i, (p, v) in enumerate(alts))
    return TokenLogprob(len(piece), piece, logprob, top)


def test_partial_utf8_tokens_show_escaped_bytes():
    assert token_string("é".encode()[:1]) == "\\xc3"
    assert token_string(b" caf\xc3\xa9") == " café"


def test_chat_logprobs_shape():
    body = chat_logprobs([entry(b"Hi", -0.5, (b"Hi", -0.5), (b"Hey", -1.5))])
    assert body == {"refusal": None, "content": [{
        "token": "Hi", "logprob": -0.5, "bytes": [72, 105],
        "top_logprobs": [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105]},
                         {"token": "Hey", "logprob": -1.5, "bytes": [72, 101, 121]}]}]}
    assert chat_logprobs(None) is None
    assert chat_logprobs([]) == {"content": [], "refusal": None}


def test_completion_arrays_with_echo_skip_an_added_bos():
    prompt = [entry(b"<s>", None), entry(b"Hello", -1.0, (b",", -0.2)),
              entry(b" w", -2.0, (b" w", -2.0))]
    generated = [entry(b"\xc3", -0.1), entry(b"\xa9!", -0.3, (b"?", -0.2))]
    text = "Hello w" + "é!"
    body = choice_completion_logprobs(prompt, generated, text)
    assert body["tokens"] == ["<s>", "Hello", " w", "\\xc3", "\\xa9!"]
    assert body["token_logprobs"] == [None, -1.0, -2.0, -0.1, -0.3]
    # the chosen token always appears among the alternatives (up to N + 1 entries)
    assert body["top_logprobs"] == [None, {",": -0.2, "Hello": -1.0}, {" w": -2.0},
                                    {"\\xc3": -0.1}, {"?": -0.2, "\\xa9!": -0.3}]
    # the BOS the tokenizer added takes no room; a character split over two tokens counts once
    assert body["text_offset"] == [0, 0, 5, 7, 7]


def test_completion_arrays_without_echo_and_when_not_asked():
    body = choice_completion_logprobs(None, [entry(b"a", -1.0), entry(b"b", -2.0)], "ab")
    assert body["text_offset"] == [0, 1] and body["top_logprobs"] == [{"a": -1.0}, {"b": -2.0}]
    assert choice_completion_logprobs(None, None, "ab") is None


def test_stream_offsets_continue_across_chunks_per_choice():
    offsets = StreamOffsets()
    first = offsets.chunk(0, [entry(b"Hello", None)], "Hello")
    assert first["text_offset"] == [0]
    assert offsets.chunk(0, [entry(b" there", -1.0)])["text_offset"] == [5]
    assert offsets.chunk(1, [entry(b"x", -1.0)])["text_offset"] == [0]
    assert offsets.chunk(0, None) is None


def test_held_back_text_still_carries_its_logprobs():
    enc = encoder.ChunkEncoder("m", chat=True, include_usage=False)
    lp = chat_logprobs([entry(b"<", -0.1)])
    chunks = with_logprobs([], lp, lambda: enc.choice_chunk(0, {}, None))
    assert chunks[0]["choices"][0] == {"index": 0, "delta": {}, "logprobs": lp,
                                       "finish_reason": None}
    shown = with_logprobs([enc.choice_chunk(0, {"content": "a"}, None),
                           enc.choice_chunk(0, {}, "stop")], lp, lambda: {})
    assert shown[0]["choices"][0]["logprobs"] == lp and shown[1]["choices"][0]["logprobs"] is None
    assert with_logprobs([], None, lambda: {}) == []


def test_collected_choices_gather_logprobs():
    collected = encoder.Collected()
    scores = [entry(b"A", None), entry(b"B", -1.0)]
    collected.add(choice_step(TokenOutput(0, "x", [1], logprobs=[entry(b"x", -0.5)],
                                          prompt_logprobs=scores)), 0)
    collected.add(choice_step(TokenOutput(0, "y", [2], finish_reason="length",
                                          logprobs=[entry(b"y", -0.7)])), 0)
    collected.add(choice_step(TokenOutput(1, "z", [3], finish_reason="length")), 1)
    choice = collected.choices[0]
    assert [e.piece for e in choice.logprobs] == [b"x", b"y"]
    assert choice.prompt_logprobs is scores and collected.choices[1].logprobs is None


def chat_body(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], **kw)


def test_chat_adapter_logprob_fields():
    assert adapter.chat_request(chat_body()).logprobs is None
    assert adapter.chat_request(chat_body(logprobs=True)).logprobs == 0
    assert adapter.chat_request(chat_body(logprobs=True, top_logprobs=4)).logprobs == 4
    assert adapter.chat_request(chat_body(logprobs=False, top_logprobs=0)).logprobs is None
    with pytest.raises(LmserveError) as exc:
        adapter.chat_request(chat_body(top_logprobs=2))
    assert exc.value.param == "top_logprobs"


def test_completion_adapter_scores_the_prompt_only_with_echo():
    plain = adapter.completion_request(CompletionRequest(model="m", prompt="a", logprobs=2), "a")
    assert plain.logprobs == 2 and plain.prompt_logprobs is None
    echo = adapter.completion_request(
        CompletionRequest(model="m", prompt="a", logprobs=1, echo=True), "a")
    assert echo.logprobs == 1 and echo.prompt_logprobs == 1
    off = adapter.completion_request(CompletionRequest(model="m", prompt="a", echo=True), "a")
    assert off.logprobs is None and off.prompt_logprobs is None
