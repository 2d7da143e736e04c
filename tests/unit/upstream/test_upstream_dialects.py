"""Every root dialect over an UpstreamBackend whose upstream is faked (httpx.MockTransport):
answers, streams, an upstream's 400 passed through, an unreachable upstream as 502, and
unsupported parameters as 400, each in the dialect's own shape."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from lmserve.http.app import StoreSettings, create_app
from lmserve.models.registry import ModelRegistry
from lmserve.upstream import UpstreamBackend, UpstreamSettings

MODELS = {"object": "list", "data": [{"id": "smol", "object": "model", "owned_by": "lmserve",
                                      "meta": {"n_ctx": 4096}}]}
CONTEXT_ERROR = {"error": {"message": "this model's maximum context length is 4096 tokens; "
                                      "max_tokens asks for 100000 more",
                           "type": "invalid_request_error", "param": "max_tokens",
                           "code": "context_length_exceeded"}}
PROMPT_ERROR = {"error": {"message": "this model's maximum context length is 4096 tokens, but "
                                     "the prompt has 5001 tokens",
                          "type": "invalid_request_error", "param": "messages",
                          "code": "context_length_exceeded"}}
LONG = [{"role": "user", "content": "TOO LONG"}]
MSG = [{"role": "user", "content": "Name three colors."}]


def sse(*chunks: Any) -> bytes:
    return b"".join(f"data: {c if isinstance(c, str) else json.dumps(c)}\n\n".encode()
                    for c in chunks)


def answer(chat: bool, pieces: list[str], continuous: bool = False) -> bytes:
    """`continuous`: every chunk with a choice has the usage so far, as lmserve sends it."""
    def choice(text: str | None, reason: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"index": 0, "finish_reason": reason}
        if chat:
            body["delta"] = {"content": text} if text is not None else {}
        else:
            body["text"] = text or ""
        return body

    chunks: list[Any] = [{"choices": [choice(p)]} for p in pieces]
    chunks.append({"choices": [choice(None, "stop")]})
    if continuous:
        for i, c in enumerate(chunks):
            done = min(i + 1, len(pieces))
            c["usage"] = {"prompt_tokens": 11, "completion_tokens": done,
                          "total_tokens": 11 + done}
    chunks.append({"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens":
                                            len(pieces), "total_tokens": 11 + len(pieces)}})
    chunks.append("[DONE]")
    return sse(*chunks)


class FakeUpstream:
    def __init__(self) -> None:
        self.down = False
        self.bodies: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused")
        if request.url.path == "/v1/models":
            return httpx.Response(200, json=MODELS)
        if request.url.path == "/tokenize":
            return httpx.Response(404, json={"detail": "Not Found"})
        body = json.loads(request.content)
        self.bodies.append(body)
        if (body.get("max_tokens") or 0) > 4096:
            return httpx.Response(400, json=CONTEXT_ERROR)
        if "TOO LONG" in json.dumps(body):
            return httpx.Response(400, json=PROMPT_ERROR)
        chat = request.url.path.endswith("/chat/completions")
        continuous = (body.get("stream_options") or {}).get("continuous_usage_stats", False)
        return httpx.Response(200, content=answer(chat, ["Red", ", green", ", blue."],
                                                  continuous),
                              headers={"content-type": "text/event-stream"})


@pytest.fixture()
def fake() -> FakeUpstream:
    return FakeUpstream()


@pytest.fixture()
def http(fake: FakeUpstream, tmp_path) -> Iterator[TestClient]:
    registry = ModelRegistry()
    registry.add_backend(UpstreamBackend("smollm2", UpstreamSettings(
        "http://upstream.test/v1", model="smol"), transport=httpx.MockTransport(fake)))
    app = create_app(registry, store=StoreSettings(url="memory", data_dir=tmp_path))
    with TestClient(app) as client:
        deadline = time.monotonic() + 10
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, client.get("/health").json()
            time.sleep(0.01)
        yield client


def test_openai_chat_whole_and_streamed(http, fake):
    r = http.post("/v1/chat/completions", json={"model": "smollm2", "messages": MSG,
                                                "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["message"]["content"] == "Red, green, blue."
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["prompt_tokens"] == 11 and body["usage"]["completion_tokens"] == 3
    assert fake.bodies[-1]["model"] == "smol" and fake.bodies[-1]["messages"] == MSG
    r = http.post("/v1/chat/completions", json={"model": "smollm2", "messages": MSG,
                                                "stream": True,
                                                "stream_options": {"include_usage": True}})
    frames = [json.loads(line[6:]) for line in r.text.splitlines()
              if line.startswith("data: {")]
    text = "".join(f["choices"][0]["delta"].get("content") or "" for f in frames
                   if f.get("choices"))
    assert text == "Red, green, blue." and frames[-1]["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("path,body", [("/v1/chat/completions", {"messages": MSG}),
                                       ("/v1/completions", {"prompt": "Colors:"})])
def test_continuous_usage_stats_come_from_the_upstream_s_running_counts(http, fake, path,
                                                                        body):
    r = http.post(path, json={"model": "smollm2", **body, "stream": True, "stream_options": {
        "include_usage": True, "continuous_usage_stats": True}})
    assert fake.bodies[-1]["stream_options"]["continuous_usage_stats"] is True
    frames = [json.loads(line[6:]) for line in r.text.splitlines()
              if line.startswith("data: {")]
    # every chunk, the role chunk first among them, knows the prompt the upstream counted
    assert {f["usage"]["prompt_tokens"] for f in frames} == {11}
    counts = [f["usage"]["completion_tokens"] for f in frames]
    assert counts == sorted(counts) and {1, 2, 3} <= set(counts) <= {0, 1, 2, 3}
    if "messages" in body:  # the role chunk, before any token
        assert frames[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert counts[0] == 0


def test_openai_completions(http, fake):
    r = http.post("/v1/completions", json={"model": "smollm2", "prompt": "Colors:",
                                           "max_tokens": 8})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == "Red, green, blue."
    assert fake.bodies[-1]["prompt"] == "Colors:"


def test_anthropic_messages(http):
    r = http.post("/v1/messages", headers={"anthropic-version": "2023-06-01"},
                  json={"model": "smollm2", "max_tokens": 8, "messages": MSG})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["content"][0]["text"] == "Red, green, blue."
    assert body["stop_reason"] == "end_turn" and body["usage"]["output_tokens"] == 3


def test_ollama_chat(http):
    r = http.post("/api/chat", json={"model": "smollm2", "messages": MSG, "stream": False})
    assert r.status_code == 200, r.text
    assert r.json()["message"]["content"] == "Red, green, blue." and r.json()["done"]


def test_an_upstream_400_passes_through_in_each_shape(http):
    r = http.post("/v1/chat/completions", json={"model": "smollm2", "messages": MSG,
                                                "max_tokens": 100_000})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "max_tokens"
    assert "maximum context length is 4096" in error["message"]
    r = http.post("/v1/chat/completions", json={"model": "smollm2", "messages": MSG,
                                                "max_tokens": 100_000, "stream": True})
    assert r.status_code == 400 and "maximum context length is 4096" in r.text
    r = http.post("/v1/messages", headers={"anthropic-version": "2023-06-01"},
                  json={"model": "smollm2", "max_tokens": 8, "messages": LONG})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert "the prompt has 5001 tokens" in r.json()["error"]["message"]
    r = http.post("/api/chat", json={"model": "smollm2", "messages": LONG, "stream": False})
    assert r.status_code == 400 and "5001" in r.json()["error"]
    for path, body in (("/v1/messages", {"max_tokens": 8}), ("/api/chat", {})):
        r = http.post(path, headers={"anthropic-version": "2023-06-01"},
                      json={"model": "smollm2", "messages": LONG, "stream": True, **body})
        assert r.status_code == 400 and "5001" in r.text, (path, r.text)


def test_an_unreachable_upstream_is_a_502_in_each_shape(http, fake):
    fake.down = True
    r = http.post("/v1/chat/completions", json={"model": "smollm2", "messages": MSG})
    assert r.status_code == 502, r.text
    assert r.json()["error"]["type"] == "server_error"
    assert "cannot be reached" in r.json()["error"]["message"]
    r = http.post("/v1/messages", headers={"anthropic-version": "2023-06-01"},
                  json={"model": "smollm2", "max_tokens": 8, "messages": MSG})
    assert r.status_code == 502, r.text
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "api_error"
    r = http.post("/api/chat", json={"model": "smollm2", "messages": MSG, "stream": False})
    assert r.status_code == 502 and "cannot be reached" in r.json()["error"]


def test_unsupported_parameters_are_a_400_naming_them(http):
    r = http.post("/v1/chat/completions", json={"model": "smollm2", "messages": MSG,
                                                "lora": "style"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "lora"


def test_an_upstream_request_is_timed_for_the_access_line_and_metrics(http, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="lmserve.access")
    r = http.post("/v1/chat/completions", json={"model": "smollm2", "messages": MSG},
                  headers={"X-Request-Id": "up-1"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "up-1"
    line: Any = next(x for x in caplog.records if getattr(x, "request_id", None) == "up-1"
                     and x.name == "lmserve.access")
    assert (line.model, line.dialect, line.prompt_tokens, line.output_tokens) == \
        ("smollm2", "openai", 11, 3)
    assert line.queue_ms == 0 and line.ttft_ms <= line.duration_ms
    metrics = http.get("/metrics").text
    assert 'lmserve_time_to_first_token_seconds_count{dialect="openai",model="smollm2"} 1.0' \
        in metrics
