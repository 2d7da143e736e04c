"""The official anthropic client, unchanged, against the real server and the SmolLM2 model."""

from __future__ import annotations

import anthropic
import httpx
import pytest

# The client tests run against the local model and an upstream-backed one (upstream_fixtures).
pytestmark = pytest.mark.upstream_variant

MSG = [{"role": "user", "content": "Name three colors."}]
# This client version no longer types the sampling parameters; older clients send them as fields.
GREEDY = {"extra_body": {"temperature": 0}}
COUNT = [{"role": "user", "content": "Count from 1 to 20, separated by commas."}]


@pytest.fixture()
def claude(target):
    with anthropic.Anthropic(base_url=target.url, api_key="unused", max_retries=0,
                             timeout=120) as c:
        yield c


def test_create(claude):
    r = claude.messages.create(model="smollm2", max_tokens=24, **GREEDY, messages=MSG,
                               system="You answer briefly.", metadata={"user_id": "u-1"})
    assert r.type == "message" and r.role == "assistant" and r.id.startswith("msg_")
    assert r.model == "smollm2"
    assert len(r.content) == 1 and r.content[0].type == "text" and r.content[0].text.strip()
    assert r.stop_reason in ("end_turn", "max_tokens") and r.stop_sequence is None
    assert 0 < r.usage.output_tokens <= 24
    assert r.usage.input_tokens + r.usage.cache_read_input_tokens > 10
    assert r.usage.cache_creation_input_tokens == 0


def test_max_tokens_stop_reason(claude):
    r = claude.messages.create(model="smollm2", max_tokens=3, **GREEDY, messages=COUNT)
    assert r.stop_reason == "max_tokens" and r.usage.output_tokens == 3


def test_stop_sequences(claude):
    kw = dict(model="smollm2", max_tokens=40, **GREEDY, messages=COUNT)
    free = claude.messages.create(**kw).content[0].text
    assert "5" in free, free
    stop = free[free.index("5"): free.index("5") + 2]  # e.g. "5," may span tokens
    r = claude.messages.create(**kw, stop_sequences=["never-appears", stop])
    assert r.stop_reason == "stop_sequence" and r.stop_sequence == stop
    assert r.content[0].text == free[: free.index(stop)]


def test_stream_text_events_and_final_message_match_create(claude):
    kw = dict(model="smollm2", max_tokens=20, **GREEDY, messages=MSG)
    full = claude.messages.create(**kw)
    with claude.messages.stream(**kw) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == full.content[0].text == final.content[0].text
    assert final.stop_reason == full.stop_reason
    assert final.usage.output_tokens == full.usage.output_tokens
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == \
        full.usage.input_tokens + full.usage.cache_read_input_tokens
    events = [e.type for e in claude.messages.create(**kw, stream=True)]
    assert events[:2] == ["message_start", "content_block_start"]
    assert events[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(events[2:-3]) == {"content_block_delta"}


def test_stream_wire_frames_have_event_names_and_a_ping(server):
    body = {"model": "smollm2", "max_tokens": 5, "messages": MSG, "stream": True}
    r = httpx.post(f"{server.url}/v1/messages", json=body, timeout=120,
                   headers={"anthropic-version": "2023-06-01"})
    names = [line[7:] for line in r.text.splitlines() if line.startswith("event: ")]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-1] == "message_stop"


def test_count_tokens_equals_the_prompt_of_a_create(claude):
    kw = dict(model="smollm2", system="Be terse.",
              messages=[*MSG, {"role": "assistant", "content": "Red,"}])
    counted = claude.messages.count_tokens(**kw).input_tokens
    r = claude.messages.create(**kw, max_tokens=4, **GREEDY)
    # Anthropic's accounting: the prompt is input + cache reads + cache writes.
    assert counted == r.usage.input_tokens + r.usage.cache_read_input_tokens + \
        r.usage.cache_creation_input_tokens
    assert counted > 10


def test_repeated_long_prompt_reads_the_cache(claude):
    system = "You are a meticulous assistant. " + " ".join(f"Rule {i}: be precise."
                                                           for i in range(60))
    kw = dict(model="smollm2", max_tokens=4, **GREEDY, system=system,
              messages=[{"role": "user", "content": "Hi"}])
    first = claude.messages.create(**kw)
    second = claude.messages.create(**kw)
    total = first.usage.input_tokens + first.usage.cache_read_input_tokens
    assert total > 300
    assert second.usage.cache_read_input_tokens >= 300
    assert second.usage.input_tokens + second.usage.cache_read_input_tokens == total


def test_models(claude):
    ids = [m.id for m in claude.models.list()]
    assert "smollm2" in ids
    model = claude.models.retrieve("smollm2")
    assert model.type == "model" and model.display_name == "smollm2"
    assert model.max_input_tokens == 4096
    with pytest.raises(anthropic.NotFoundError):
        claude.models.retrieve("no-such-model")


def test_unknown_model_is_not_found(claude):
    with pytest.raises(anthropic.NotFoundError) as exc:
        claude.messages.create(model="no-such-model", max_tokens=4, messages=MSG)
    assert exc.value.body["error"]["type"] == "not_found_error"
    assert "smollm2" in exc.value.body["error"]["message"]


@pytest.mark.parametrize("kw, needle", [
    ({"extra_body": {"temperature": 1.5}}, "temperature"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "web_search"),
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "budget_tokens"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": "iVBORw0KGgo="}}]}]}, "vision"),
    ({"extra_body": {"frequency_penalty": 1}}, "frequency_penalty"),
])
def test_bad_input_is_a_bad_request(claude, kw, needle):
    args = {"model": "smollm2", "max_tokens": 4, "messages": MSG, **kw}
    with pytest.raises(anthropic.BadRequestError) as exc:
        claude.messages.create(**args)
    assert exc.value.body["type"] == "error"
    assert exc.value.body["error"]["type"] == "invalid_request_error"
    assert needle in exc.value.body["error"]["message"]


def test_missing_max_tokens_and_context_overflow(server):
    url = f"{server.url}/v1/messages"
    r = httpx.post(url, json={"model": "smollm2", "messages": MSG}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    long = [{"role": "user", "content": "word " * 5000}]
    r = httpx.post(url, json={"model": "smollm2", "max_tokens": 4, "messages": long}, timeout=60)
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]


def test_max_tokens_larger_than_the_context_runs_until_it_is_full(claude):
    r = claude.messages.create(model="smollm2", max_tokens=100_000, **GREEDY,
                               messages=MSG)
    assert r.stop_reason in ("end_turn", "model_context_window_exceeded")


def test_disconnect_cancels_generation(claude, server):
    with claude.messages.stream(model="smollm2", max_tokens=3000,
                                messages=[{"role": "user", "content": "Write a long story."}]
                                ) as stream:
        for i, _ in enumerate(stream.text_stream):
            if i == 5:
                break
    server.assert_generation_stops()


def test_final_assistant_turn_is_continued(claude):
    r = claude.messages.create(model="smollm2", max_tokens=8, **GREEDY, messages=[
        *COUNT, {"role": "assistant", "content": "1, 2, 3,"}])
    assert r.content[0].text.lstrip().startswith("4"), r.content[0].text
