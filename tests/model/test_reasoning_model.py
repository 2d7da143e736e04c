"""Reasoning kept out of the answer, in every dialect, with a real model: SmolLM2 served with a
synthetic ChatML template that opens a <think> block at the start of every reply.

SmolLM2 never learnt to close the block, so free generations stay in the reasoning; the native
test holds the model to a grammar that writes reasoning, the closing tag and an answer, to show
the split in a real stream."""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import httpx
import ollama
import openai
import pytest

from tests.model.conftest import Server, start_with_template, stop_server
from tests.model.sse import read_sse

# Earlier replies lose their reasoning, as such templates do.
THINK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content.split('</think>')[-1] }}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")
MSG = [{"role": "user", "content": "Why is the sky blue?"}]
TAGS = ("<think>", "</think>")


@pytest.fixture(scope="module")
def think_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_with_template(str(tmp_path_factory.mktemp("think")), THINK_TEMPLATE)
    yield server
    stop_server(server)


def no_tags(*texts: str | None) -> bool:
    return not any(tag in (text or "") for text in texts for tag in TAGS)


def test_openai_reasoning_content_streams_apart_from_the_content(think_server):
    with openai.OpenAI(base_url=think_server.base_url, api_key="x", max_retries=0) as client:
        chunks = list(client.chat.completions.create(model="smollm2", messages=MSG,
                                                     max_tokens=24, temperature=0, stream=True))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
        content = "".join(d.content or "" for d in deltas)
        whole = client.chat.completions.create(model="smollm2", messages=MSG, max_tokens=24,
                                               temperature=0).choices[0].message
    assert reasoning.strip() and content == "" and no_tags(reasoning, content)
    assert getattr(whole, "reasoning_content", None) == reasoning
    assert not whole.content


def test_native_stream_splits_reasoning_and_answer(think_server):
    grammar = 'root ::= "Light scatters." "</think>" "\\n\\nRayleigh scattering."\n'
    body = {"prompt": "Why is the sky blue?", "format": {"type": "gbnf", "grammar": grammar},
            "params": {"temperature": 0, "max_tokens": 40, "reasoning": True}}
    with httpx.Client(base_url=think_server.url, timeout=120) as http:
        r = http.post("/models/smollm2/stream/", json=body)
        assert r.status_code == 201, r.text
        frames, _ = read_sse(http, f"/models/smollm2/stream/{r.json()['id']}/")
        hidden = http.post("/models/smollm2/query/",
                           json={**body, "params": {**body["params"], "reasoning": False}})
    starts = [f.data for f in frames if f.event == "block.start"]
    assert [s["channel"] for s in starts] == ["reasoning", "output"]
    text = {s["channel"]: "".join(f.data["text"] for f in frames if f.event == "block.delta"
                                  and f.data["index"] == s["index"]) for s in starts}
    assert text == {"reasoning": "Light scatters.", "output": "Rayleigh scattering."}
    assert hidden.json()["blocks"] == [{"type": "text", "channel": "output",
                                        "text": "Rayleigh scattering."}]


def test_anthropic_thinking_blocks(think_server):
    with anthropic.Anthropic(base_url=think_server.url, api_key="x", max_retries=0) as claude:
        kw = dict(model="smollm2", max_tokens=1100, messages=MSG,
                  extra_body={"temperature": 0}, stop_sequences=["\n\n"])
        thinking = {"type": "enabled", "budget_tokens": 1024}
        with claude.messages.stream(**kw, thinking=thinking) as stream:
            final = stream.get_final_message()
        plain = claude.messages.create(**kw)
    kinds = [b.type for b in final.content]
    assert kinds[0] == "thinking" and final.content[0].thinking.strip()
    assert final.content[0].signature
    assert no_tags(*(getattr(b, "text", "") for b in final.content))
    assert [b.type for b in plain.content] == ["text"] and no_tags(plain.content[0].text)


def test_ollama_thinking_field(think_server):
    oc = ollama.Client(host=think_server.url, timeout=120)
    options = {"temperature": 0, "num_predict": 24}
    shown = oc.chat(model="smollm2", messages=MSG, think=True, options=options)
    assert shown.message.thinking and shown.message.content == ""
    assert no_tags(shown.message.thinking)
    streamed = "".join(part.message.thinking or "" for part in oc.chat(
        model="smollm2", messages=MSG, think=True, options=options, stream=True))
    assert streamed == shown.message.thinking
    hidden = oc.chat(model="smollm2", messages=MSG, think=False, options=options)
    assert not hidden.message.thinking and hidden.message.content == ""
