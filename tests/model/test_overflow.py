"""Context overflow against the real server (n_ctx 4096): a conversation that does not fit is
refused by default in each dialect's own shape, and with truncation on, its oldest turn goes,
the answer is generated and the header says how many messages were dropped."""

from __future__ import annotations

from typing import Any

import anthropic
import httpx
import openai
import pytest

HEADER = "x-lmserve-truncated-messages"
SYSTEM = "You are terse."
BIG = "The quick brown fox jumps over the lazy dog. " * 500  # ~5000 tokens, over n_ctx
OLD = [{"role": "user", "content": BIG}, {"role": "assistant", "content": "Noted."}]
RECENT = [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"},
          {"role": "user", "content": "Name a color."}]
N_CTX = 4096


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def chat_kw(messages: list[dict[str, Any]]) -> dict[str, Any]:
    return dict(model="smollm2", messages=[{"role": "system", "content": SYSTEM}, *messages],
                max_tokens=8, temperature=0)


def test_openai_chat(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**chat_kw(OLD + RECENT))
    assert caught.value.code == "context_length_exceeded"
    raw = client.chat.completions.with_raw_response.create(
        **chat_kw(OLD + RECENT), extra_body={"context_overflow": "truncate"})
    assert raw.headers[HEADER] == "2"
    reply = raw.parse()
    assert reply.choices[0].message.content and reply.usage.prompt_tokens < N_CTX
    # Exactly the oldest turn went: the same prompt as the conversation without it.
    recent = client.chat.completions.create(**chat_kw(RECENT))
    assert reply.usage.prompt_tokens == recent.usage.prompt_tokens


def test_responses_truncation_auto(client):
    kw: dict[str, Any] = dict(model="smollm2", instructions=SYSTEM, input=OLD + RECENT,
                              max_output_tokens=8, temperature=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(**kw)
    assert caught.value.code == "context_length_exceeded"
    raw = client.responses.with_raw_response.create(truncation="auto", **kw)
    assert raw.headers[HEADER] == "2"
    response = raw.parse()
    assert response.truncation == "auto" and response.output_text
    assert response.usage.input_tokens < N_CTX


def test_anthropic_messages(server):
    with anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0) as c:
        kw: dict[str, Any] = dict(model="smollm2", system=SYSTEM, max_tokens=8,
                                  messages=OLD + RECENT)
        with pytest.raises(anthropic.BadRequestError) as caught:
            c.messages.create(**kw)
        assert caught.value.body["error"]["type"] == "invalid_request_error"
        extra = {"context_overflow": "truncate", "temperature": 0}
        raw = c.messages.with_raw_response.create(extra_body=extra, **kw)
        assert raw.headers[HEADER] == "2"
        message = raw.parse()
        assert message.content and message.usage.input_tokens < N_CTX


def test_ollama_chat(http):
    body = {"model": "smollm2", "stream": False, "options": {"num_predict": 8, "temperature": 0},
            "messages": [{"role": "system", "content": SYSTEM}, *OLD, *RECENT]}
    refused = http.post("/api/chat", json=body)
    assert refused.status_code == 400 and "context" in refused.json()["error"]
    r = http.post("/api/chat", json={**body, "truncate": True})
    assert r.status_code == 200 and r.headers[HEADER] == "2"
    assert r.json()["message"]["content"] and r.json()["prompt_eval_count"] < N_CTX


def test_native_query(http):
    body = {"transport": "conversation", "params": {"max_tokens": 8, "temperature": 0},
            "messages": [{"role": "system", "content": SYSTEM}, *OLD, *RECENT]}
    refused = http.post("/models/smollm2/query/", json=body)
    assert refused.status_code == 400
    assert refused.json()["error"]["type"] == "context_length_exceeded"
    params = {**body["params"], "context_overflow": "truncate"}
    r = http.post("/models/smollm2/query/", json={**body, "params": params})
    assert r.status_code == 200 and r.headers[HEADER] == "2"
    answer = r.json()
    assert answer["truncated_messages"] == 2 and answer["usage"]["input_tokens"] < N_CTX
