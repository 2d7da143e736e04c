"""The official openai client against a real server and the real SmolLM2 model."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest

# The client tests run against the local model and an upstream-backed one (upstream_fixtures).
pytestmark = pytest.mark.upstream_variant

MSG = [{"role": "user", "content": "Name three colors."}]


def test_chat_completion(client):
    r = client.chat.completions.create(model="smollm2", messages=MSG, max_tokens=24, temperature=0)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 5
    assert 0 < r.usage.completion_tokens <= 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_matches_non_stream_and_reports_usage(client):
    kw = dict(model="smollm2", messages=MSG, max_tokens=20, temperature=0)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_seed_makes_sampling_reproducible(client):
    kw = dict(model="smollm2", messages=[{"role": "user", "content": "Tell me a story."}],
              max_tokens=30, temperature=1.0, top_p=0.95, seed=1234)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b
    others = {client.chat.completions.create(**{**kw, "seed": s}).choices[0].message.content
              for s in (1, 2, 3)}
    assert len(others | {a}) > 1  # the seed really drives sampling


def test_stop_strings(client):
    kw = dict(model="smollm2", max_tokens=40, temperature=0,
              messages=[{"role": "user", "content": "Count from 1 to 20, separated by commas."}])
    free = client.chat.completions.create(**kw).choices[0].message.content
    assert "5" in free, free
    stop = free[free.index("5"): free.index("5") + 2]  # e.g. "5," spans tokens
    r = client.chat.completions.create(**kw, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == free[: free.index(stop)]
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       client.chat.completions.create(**kw, stop=[stop], stream=True) if c.choices)
    assert streamed == r.choices[0].message.content


def test_n_choices(client):
    r = client.chat.completions.create(model="smollm2", messages=MSG, max_tokens=12, n=3,
                                       temperature=1.0, seed=7)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.message.content for c in r.choices)
    # One prompt, counted once; every choice's tokens counted.
    single = client.chat.completions.create(model="smollm2", messages=MSG, max_tokens=12, n=1,
                                            temperature=1.0, seed=7)
    assert r.usage.prompt_tokens == single.usage.prompt_tokens
    assert r.usage.completion_tokens >= 3


def test_concurrent_streams_overlap(client):
    order: list[int] = []
    lock = threading.Lock()

    def run(i: int) -> None:
        stream = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": f"Write a poem #{i}."}],
            max_tokens=40, temperature=0, stream=True, extra_body={"ignore_eos": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                with lock:
                    order.append(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(set(order)) == [0, 1, 2, 3]
    switches = sum(1 for a, b in zip(order, order[1:]) if a != b)
    assert switches > 10, "streams ran one after another instead of together"


def test_prefix_reuse_reports_cached_tokens(client):
    system = "You are a meticulous assistant. " + " ".join(f"Rule {i}: be precise." for i in range(60))
    kw = dict(model="smollm2", max_tokens=4, temperature=0)
    first = client.chat.completions.create(
        **kw, messages=[{"role": "system", "content": system}, {"role": "user", "content": "Hi"}])
    second = client.chat.completions.create(
        **kw, messages=[{"role": "system", "content": system}, {"role": "user", "content": "Yo"}])
    assert first.usage.prompt_tokens > 300
    assert second.usage.prompt_tokens_details.cached_tokens >= 300


def test_disconnect_cancels_generation(client, server):
    stream = client.chat.completions.create(
        model="smollm2", messages=MSG, max_tokens=3000, stream=True,
        extra_body={"ignore_eos": True})
    got = 0
    for chunk in stream:
        got += 1
        if got == 5:
            break
    stream.close()
    server.assert_generation_stops()


def test_context_overflow_is_a_clear_400(client):
    long = "word " * 5000
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": long}])
    assert exc.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="smollm2", messages=MSG, max_tokens=100_000)
    assert exc.value.code == "context_length_exceeded" and exc.value.param == "max_tokens"
    # Streaming requests are refused before the stream starts: a real status, not an event.
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="smollm2", messages=MSG, max_tokens=100_000,
                                       stream=True)
    assert exc.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="smollm2", messages=MSG, n=64, stream=True)
    assert exc.value.param == "n"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="gpt-9", messages=MSG)
    assert exc.value.code == "model_not_found"


def test_unimplemented_parameters_are_refused_not_ignored(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="smollm2", messages=MSG,
                                       functions=[{"name": "f", "parameters": {}}])
    assert exc.value.param == "functions"
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="smollm2", messages=MSG,
                                       response_format={"type": "yaml"})  # type: ignore
    assert exc.value.param == "response_format.type"


def test_bad_json_and_wrong_types(server):
    r = httpx.post(f"{server.base_url}/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(f"{server.base_url}/chat/completions",
                   json={"model": "smollm2", "messages": MSG, "temperature": "hot"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = httpx.post(f"{server.base_url}/chat/completions", json={"model": "smollm2"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(f"{server.base_url}/chat/completions",
                   json={"model": "smollm2", "messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages[0]")
