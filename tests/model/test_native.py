"""The native protocol of `lmserve serve` (/models/<name>/) against the real model."""

from __future__ import annotations

import threading
import uuid

import httpx
import pytest

from tests.model.sse import Frame, read_sse

P = "/models/smollm2/"


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def text_of(frames: list[Frame], channel: str = "output") -> str:
    return "".join(f.data["text"] for f in frames
                   if f.event == "block.delta" and f.data["channel"] == channel)


def start(http: httpx.Client, **body) -> str:
    r = http.post(f"{P}stream/", json=body)
    assert r.status_code == 201, r.text
    ident = r.json()["id"]
    assert str(uuid.UUID(ident)) == ident
    return ident


def test_introspection_describes_model_and_defaults(http):
    body = http.get(P).json()
    assert body["name"] == "smollm2" and body["status"] == "ready"
    assert body["default_transport"] == "chat"
    assert body["model"]["architecture"] == "llama"
    assert body["model"]["quantization"] == "Q4_1"
    assert body["model"]["context_length"] == 4096 and body["model"]["chat_template"] is True
    assert set(body["transports"]) == {"raw", "chat", "conversation"}


@pytest.mark.parametrize("body", [
    {"transport": "raw", "prompt": "The capital of France is"},
    {"transport": "chat", "prompt": "Say hello.", "system": "You are terse."},
    {"transport": "conversation", "messages": [{"role": "user", "content": "Hi!"},
                                               {"role": "assistant", "content": "Hello."},
                                               {"role": "user", "content": "Count to 3."}]},
    {"prompt": "Name a color."},
])
def test_query_in_each_transport(http, body):
    r = http.post(f"{P}query/", json={**body, "params": {"max_tokens": 8, "temperature": 0}})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["blocks"] and out["blocks"][0]["type"] == "text"
    assert out["blocks"][0]["channel"] == "output" and out["blocks"][0]["text"]
    assert out["usage"]["output_tokens"] <= 8 and out["usage"]["input_tokens"] > 0
    assert out["stop_reason"] in ("stop", "max_tokens")


def test_chat_transport_goes_through_the_template(http):
    raw = http.post(f"{P}query/", json={"transport": "raw", "prompt": "Hi",
                                        "params": {"max_tokens": 1}}).json()
    chat = http.post(f"{P}query/", json={"transport": "chat", "prompt": "Hi",
                                         "params": {"max_tokens": 1}}).json()
    assert chat["usage"]["input_tokens"] > raw["usage"]["input_tokens"] + 5


def test_stream_frames_in_protocol_order(http):
    ident = start(http, prompt="Write a sentence about the sea.",
                  params={"max_tokens": 40, "temperature": 0})
    frames, _ = read_sse(http, f"{P}stream/{ident}/")
    events = [f.event for f in frames]
    assert events[0] == "message.start" and frames[0].data["id"] == ident
    assert events[1] == "block.start" and frames[1].data == {"index": 0, "type": "text",
                                                             "channel": "output"}
    assert events[-1] == "message.stop" and events[-2] == "message.delta"
    assert "block.stop" in events
    assert [f.id for f in frames] == list(range(1, len(frames) + 1))
    stop = frames[-1].data
    assert stop["stop_reason"] in ("stop", "max_tokens")
    assert stop["usage"]["output_tokens"] <= 40
    query = http.post(f"{P}query/", json={"prompt": "Write a sentence about the sea.",
                                          "params": {"max_tokens": 40, "temperature": 0}}).json()
    assert text_of(frames) == query["blocks"][0]["text"]


def test_resume_with_last_event_id_loses_and_repeats_nothing(http):
    ident = start(http, prompt="List five fruits.", params={"max_tokens": 30, "temperature": 0})
    # Read part of it while generation runs, then drop the connection.
    partial, _ = read_sse(http, f"{P}stream/{ident}/", stop_after=3)
    resumed, _ = read_sse(http, f"{P}stream/{ident}/", last_event_id=partial[-1].id)
    full, _ = read_sse(http, f"{P}stream/{ident}/")
    assert partial + resumed == full
    for cut in (1, len(full) // 2, len(full) - 1, len(full)):
        after, _ = read_sse(http, f"{P}stream/{ident}/", last_event_id=cut)
        assert after == full[cut:]


def test_two_readers_each_get_every_frame(server, http):
    ident = start(http, prompt="Tell a short story.", params={"max_tokens": 30})
    results: list[list[Frame]] = []

    def reader() -> None:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            results.append(read_sse(c, f"{P}stream/{ident}/")[0])

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 2 and results[0] == results[1]
    assert results[0][-1].event == "message.stop"


def test_reader_leaving_does_not_cancel_but_delete_does(http):
    ident = start(http, prompt="Count from one to one hundred in words.",
                  params={"max_tokens": 3000, "temperature": 0})
    read_sse(http, f"{P}stream/{ident}/", stop_after=2)  # a reader leaves early
    r = http.delete(f"{P}stream/{ident}/")
    assert r.status_code == 200 and r.json() == {"id": ident, "cancelled": True}
    frames, _ = read_sse(http, f"{P}stream/{ident}/")
    assert frames[-1].event == "message.stop"
    assert frames[-1].data["stop_reason"] == "cancelled"
    assert frames[-1].data["usage"]["output_tokens"] < 3000
    again = http.delete(f"{P}stream/{ident}/")
    assert again.json() == {"id": ident, "cancelled": False}


def test_put_defaults_then_per_request_override(http):
    before = http.get(P).json()["params"]
    try:
        r = http.put(P, json={"params": {"max_tokens": 3, "temperature": 0}})
        assert r.status_code == 200 and r.json()["params"]["max_tokens"] == 3
        out = http.post(f"{P}query/", json={"prompt": "Tell me about the moon."}).json()
        assert out["usage"]["output_tokens"] == 3 and out["stop_reason"] == "max_tokens"
        out = http.post(f"{P}query/", json={"prompt": "Tell me about the moon.",
                                            "params": {"max_tokens": 5}}).json()
        assert out["usage"]["output_tokens"] == 5
    finally:
        http.put(P, json={"params": {k: v for k, v in before.items() if k != "reasoning"}})


@pytest.mark.parametrize("body,param", [
    ({"transport": "telepathy", "prompt": "x"}, "transport"),
    ({"transport": "raw"}, "prompt"),
    ({"transport": "conversation", "messages": []}, "messages"),
    ({"transport": "chat", "messages": [{"role": "user", "content": "x"}]}, "messages"),
    ({"prompt": "x", "params": {"temprature": 0.5}}, "params.temprature"),
    ({"prompt": "x", "params": {"max_tokens": "many"}}, "params.max_tokens"),
    ({"prompt": "x", "params": {"temperature": 9}}, "params.temperature"),
    ({"prompt": 42}, "prompt"),
    ({"prompt": "x", "extra": 1}, "extra"),
])
def test_bad_requests_are_clear_400s(http, body, param):
    for path in ("query/", "stream/"):
        r = http.post(f"{P}{path}", json=body)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["type"] == "invalid_request" and error["param"] == param


def test_unknown_and_malformed_stream_ids(http):
    r = http.get(f"{P}stream/{uuid.uuid4()}/")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
    r = http.get(f"{P}stream/not-a-uuid/")
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_id"
    assert http.delete(f"{P}stream/{uuid.uuid4()}/").status_code == 404


def test_context_overflow_is_refused_before_the_stream(http):
    r = http.post(f"{P}stream/", json={"transport": "raw", "prompt": "word " * 5000})
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "context_length_exceeded"
