"""Completions, embeddings, models, docs, health, metrics against the real server."""

from __future__ import annotations

import base64
import struct

import httpx
import openai
import pytest

# The client tests run against the local model and an upstream-backed one (upstream_fixtures).
pytestmark = pytest.mark.upstream_variant


def test_completion_raw_prompt(client):
    r = client.completions.create(model="smollm2", prompt="The capital of France is",
                                  max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text
    assert r.usage.completion_tokens <= 8
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="smollm2", prompt="The capital of France is", max_tokens=8, temperature=0,
        stream=True) if c.choices)
    assert streamed == r.choices[0].text


def test_a_completion_prompt_over_the_context_names_the_prompt(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="smollm2", prompt="word " * 9000, max_tokens=4)
    assert exc.value.code == "context_length_exceeded" and exc.value.param == "prompt"


def test_completion_batch_prompts_tokens_and_echo(client):
    r = client.completions.create(model="smollm2", prompt=["One, two,", "Alpha, beta,"],
                                  max_tokens=5, temperature=0, n=2)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    alone = client.completions.create(model="smollm2", prompt="Alpha, beta,", max_tokens=5,
                                      temperature=0)
    assert [c.text for c in r.choices if c.index in (2, 3)] == [alone.choices[0].text] * 2
    assert r.usage.prompt_tokens == 2 * alone.usage.prompt_tokens
    ids = client.completions.create(model="smollm2", prompt=[504, 3458, 282], max_tokens=3,
                                    temperature=0)
    assert ids.usage.prompt_tokens == 3
    echo = client.completions.create(model="smollm2", prompt="Hello there", max_tokens=3,
                                     temperature=0, echo=True)
    assert echo.choices[0].text.startswith("Hello there")


def test_completion_stream_usage_and_length(client):
    chunks = list(client.completions.create(
        model="smollm2", prompt="Once upon a time", max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[-1].usage.completion_tokens == 16
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_embeddings_float_base64_and_dimensions(client):
    r = client.embeddings.create(model="smollm2", input=["hello world", "goodbye"])
    assert [d.index for d in r.data] == [0, 1]
    vec = r.data[0].embedding
    assert len(vec) == 576
    assert abs(sum(x * x for x in vec) - 1.0) < 1e-3
    assert r.usage.prompt_tokens > 0
    raw = httpx.post(f"{client.base_url}embeddings", json={
        "model": "smollm2", "input": "hello world", "encoding_format": "base64"}).json()
    decoded = struct.unpack("<576f", base64.b64decode(raw["data"][0]["embedding"]))
    assert max(abs(a - b) for a, b in zip(decoded, vec)) < 1e-5
    short = client.embeddings.create(model="smollm2", input="hello world", dimensions=64)
    assert len(short.data[0].embedding) == 64
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="smollm2", input="x", dimensions=100_000)


def test_tokenize_and_detokenize(target, client):
    """vLLM's routes; through an upstream-backed front, they reach the upstream's."""
    url = target.url
    counted = httpx.post(f"{url}/tokenize", json={"model": "smollm2", "prompt": "Hello there"},
                         timeout=60).json()
    assert counted["count"] == len(counted["tokens"]) and counted["max_model_len"] == 4096
    usage = client.completions.create(model="smollm2", prompt="Hello there", max_tokens=1).usage
    assert usage.prompt_tokens == counted["count"]
    plain = httpx.post(f"{url}/tokenize", json={"content": "Hello there", "add_special": False,
                                                "return_token_strs": True}, timeout=60).json()
    assert "".join(plain["token_strs"]) == "Hello there"
    text = httpx.post(f"{url}/detokenize", json={"model": "smollm2", "tokens": plain["tokens"]},
                      timeout=60).json()
    assert text["prompt"] == text["content"] == "Hello there"
    bad = httpx.post(f"{url}/detokenize", json={"tokens": [10**9]}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_models(client):
    ids = [m.id for m in client.models.list()]
    assert "smollm2" in ids
    m = client.models.retrieve("smollm2")
    assert m.id == "smollm2" and m.owned_by == "lmserve"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_health_metrics_docs(target):
    h = httpx.get(f"{target.url}/health").json()
    assert h["status"] == "ok" and h["models"]["smollm2"]["state"] == "ready"
    assert "lmserve_generated_tokens_total" in httpx.get(f"{target.url}/metrics").text
    spec = httpx.get(f"{target.url}/openapi.json").json()
    assert "/v1/chat/completions" in spec["paths"]
    assert httpx.get(f"{target.url}/docs").status_code == 200
    assert httpx.get(f"{target.url}/redoc").status_code == 200
    missing = httpx.get(f"{target.url}/v1/nothing")
    assert missing.status_code == 404 and "error" in missing.json()
