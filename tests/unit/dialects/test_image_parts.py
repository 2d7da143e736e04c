"""Each dialect's adapter turns its image parts into neutral ImageInputs: the field each came
from (for errors), where it stands in the message's text, and refusals of what cannot be."""

from __future__ import annotations

import pytest

from lmserve.core.errors import LmserveError
from lmserve.core.request import ChatMessage
from lmserve.dialects.anthropic import adapter as anthropic_adapter
from lmserve.dialects.anthropic.schema import MessageRequest
from lmserve.dialects.native import adapter as native_adapter
from lmserve.dialects.native.schema import GenerateBody
from lmserve.dialects.ollama import adapter as ollama_adapter
from lmserve.dialects.ollama.schema import ChatRequest, GenerateRequest
from lmserve.dialects.openai import adapter as openai_adapter
from lmserve.dialects.openai.responses import items
from lmserve.dialects.openai.schema import ChatCompletionRequest
from tests.unit.chat.test_media import PNG_B64

DATA_URL = f"data:image/png;base64,{PNG_B64}"
B64 = {"type": "base64", "media_type": "image/png", "data": PNG_B64}


def placed(message: ChatMessage) -> list[tuple[str, str, int]]:
    return [(image.source, image.param, image.offset) for image in message.images]


def refused_param(fn, *args) -> str | None:  # type: ignore[no-untyped-def]
    with pytest.raises(LmserveError) as caught:
        fn(*args)
    return caught.value.param


def test_openai_image_url_parts_keep_their_place():
    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": DATA_URL}},
        {"type": "text", "text": "ab"},
        {"type": "image_url", "image_url": {"url": "https://h/x.png", "detail": "high"}},
        {"type": "text", "text": "c"}]}])
    message = openai_adapter.chat_request(body).messages[0]
    assert message.content == "ab\nc"
    assert placed(message) == [("base64", "messages[0].content[0].image_url", 0),
                               ("url", "messages[0].content[2].image_url", 2)]
    assert message.images[1].detail == "high"


@pytest.mark.parametrize("message, param", [
    ({"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": DATA_URL}}]},
     "messages[0].content[0].type"),
    ({"role": "user", "content": [{"type": "image_url", "image_url": DATA_URL}]},
     "messages[0].content[0].image_url"),
    ({"role": "user", "content": [{"type": "image_url",
                                   "image_url": {"url": DATA_URL, "detail": "max"}}]},
     "messages[0].content[0].image_url.detail"),
    ({"role": "assistant", "content": [{"type": "input_audio", "input_audio": {}}]},
     "messages[0].content[0].type"),
    ({"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]},
     "messages[0].content[0].input_audio.data"),
])
def test_openai_refusals_name_the_part(message, param):
    body = ChatCompletionRequest(model="m", messages=[message])
    assert refused_param(openai_adapter.chat_request, body) == param


def test_responses_input_images_are_stored_as_sent_and_placed_in_the_chat():
    own = items.own_items([{"role": "user", "content": [
        {"type": "input_text", "text": "look"},
        {"type": "input_image", "image_url": DATA_URL}]}])
    assert own[0]["content"][1] == {"type": "input_image", "image_url": DATA_URL,
                                    "file_id": None, "detail": "auto"}
    message = items.chat_messages("sys", own)[1]
    assert message.content == "look"
    assert placed(message) == [("base64", "input[0].content[1].image_url", 4)]
    file_part = [{"role": "user", "content": [{"type": "input_image", "file_id": "f1"}]}]
    assert refused_param(items.own_items, file_part) == "input[0].content[0].file_id"


def test_anthropic_images_in_turns_tool_results_and_merged_turns():
    body = MessageRequest(model="m", max_tokens=4, messages=[
        {"role": "user", "content": [{"type": "text", "text": "ab"},
                                     {"type": "image", "source": B64}]},
        {"role": "user", "content": [{"type": "image", "source": {"type": "url",
                                                                  "url": "https://h/x"}}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "shot",
                                           "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                      "is_error": True, "content": [
                                          {"type": "text", "text": "x"},
                                          {"type": "image", "source": B64}]}]}])
    messages = anthropic_adapter.message_request(body)[0].messages
    assert messages[0].content == "ab\n\n"  # two user turns, merged
    assert placed(messages[0]) == [("base64", "messages[0].content[1].source", 2),
                                   ("url", "messages[1].content[0].source", 4)]
    assert messages[2].content == "Error: x"
    assert placed(messages[2]) == [("base64", "messages[3].content[0].content[1].source", 8)]


@pytest.mark.parametrize("block, param", [
    ({"type": "image", "source": {"type": "base64", "data": PNG_B64}},
     "messages[0].content[0].source.media_type"),
    ({"type": "image", "source": {"type": "file", "file_id": "f"}},
     "messages[0].content[0].source.file_id"),
    ({"type": "image", "source": {"type": "url", "url": "gopher://h"}},
     "messages[0].content[0].source"),
])
def test_anthropic_image_source_refusals(block, param):
    body = MessageRequest(model="m", max_tokens=4, messages=[{"role": "user",
                                                              "content": [block]}])
    assert refused_param(anthropic_adapter.message_request, body) == param


def test_ollama_images_on_chat_messages_and_generate():
    chat = ollama_adapter.chat_job(ChatRequest(model="m", messages=[
        {"role": "user", "content": "hi"},
        {"role": "user", "content": "what?", "images": [PNG_B64, PNG_B64]}]))
    assert placed(chat.request.messages[1]) == [("base64", "messages[1].images[0]", 0),
                                                ("base64", "messages[1].images[1]", 0)]
    generate = ollama_adapter.generate_job(GenerateRequest(model="m", prompt="p",
                                                           images=[PNG_B64]))
    assert placed(generate.request.messages[-1]) == [("base64", "images[0]", 0)]
    body = GenerateRequest(model="m", prompt="p", images=[PNG_B64])
    assert refused_param(ollama_adapter.without_template, generate, body) == "images"


def test_native_images_for_chat_and_conversation():
    def native(**body):  # type: ignore[no-untyped-def]
        return native_adapter.generation_request(
            GenerateBody(**body), default_transport="chat", has_template=True,
            reasoning_default=False).request
    chat = native(prompt="p", images=[{"path": "a.png"}, {"data": PNG_B64,
                                                         "media_type": "image/png"}])
    assert placed(chat.messages[0]) == [("path", "images[0]", 0), ("base64", "images[1]", 0)]
    talk = native(transport="conversation", messages=[
        {"role": "user", "content": "p", "images": [{"url": "https://h/x.png"}]}])
    assert placed(talk.messages[0]) == [("url", "messages[0].images[0]", 0)]
    for body, param in (({"prompt": "p", "images": [{}]}, "images[0]"),
                        ({"prompt": "p", "images": [{"url": "https://h", "media_type": "x"}]},
                         "images[0].media_type"),
                        ({"transport": "raw", "prompt": "p", "images": []}, "images")):
        assert refused_param(lambda: native(**body)) == param
