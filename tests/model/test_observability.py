"""Observability against the real model: request ids, the server's JSON log (every line of a
request with its id, one access line per request), the request histograms, and the
OpenTelemetry spans of an in-process app (the SDK's in-memory exporter)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from lmserve.http.app import StoreSettings, create_app
from lmserve.http.observe import ACCESS_FIELDS
from lmserve.http.tracing import RequestTracer
from lmserve.models.registry import ModelRegistry
from lmserve.service import EngineSettings
from tests.model.conftest import Server, own_server

pytestmark = pytest.mark.model

CHAT = {"model": "smollm2", "max_tokens": 6, "temperature": 0,
        "messages": [{"role": "user", "content": "Say hi."}]}


@pytest.fixture(scope="module")
def json_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from own_server(tmp_path_factory, "observe", "smollm2", "--parallel", "2", "--ctx",
                          "1024", "--threads", "2", "--store", "memory", "--log-format",
                          "json", "--log-level", "debug")


def log_lines(server: Server) -> list[dict[str, Any]]:
    with open(server.log_path, encoding="utf-8", errors="replace") as f:
        return [json.loads(line) for line in f if line.startswith("{")]


def lines_of(server: Server, request_id: str, *, access: bool = True,
             timeout: float = 10.0) -> list[dict[str, Any]]:
    """The log lines of one request, once its access line is written."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [x for x in log_lines(server) if x.get("request_id") == request_id]
        if not access or any(x["logger"] == "lmserve.access" for x in lines):
            return lines
        assert time.monotonic() < deadline, f"no access line for {request_id}"
        time.sleep(0.1)


def test_the_id_is_echoed_or_made(json_server):
    url = json_server.url
    r = httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "m-1"},
                   timeout=120)
    assert r.status_code == 200 and r.headers["x-request-id"] == "m-1"
    made = httpx.get(f"{url}/v1/models").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made)


def test_error_bodies_of_every_dialect_carry_the_id(json_server):
    url = json_server.url
    calls = [
        ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user",
                                                                 "content": "x"}]}),
        ("/v1/responses", {"model": "nope", "input": "x"}),
        ("/v1/messages", {"model": "nope", "max_tokens": 3,
                          "messages": [{"role": "user", "content": "x"}]}),
        ("/api/generate", {"model": "nope", "prompt": "x"}),
        ("/generate", {"text": "x", "sampling_params": {"max_new_tokens": -5}}),
        ("/v1/prompt", {"model": "nope", "prompt": "x"}),
        ("/models/smollm2/stream/", {"transport": "nope"}),
    ]
    for path, body in calls:
        r = httpx.post(f"{url}{path}", json=body, headers={"X-Request-Id": f"e{path}"},
                       timeout=60)
        assert r.status_code >= 400, (path, r.text)
        assert r.json()["request_id"] == f"e{path}" == r.headers["x-request-id"], path


def test_every_line_of_a_request_carries_its_id_and_one_access_line_ends_it(json_server):
    r = httpx.post(f"{json_server.url}/v1/chat/completions", json=CHAT,
                   headers={"X-Request-Id": "log-1"}, timeout=120)
    assert r.status_code == 200
    usage = r.json()["usage"]
    lines = lines_of(json_server, "log-1")
    engine = [x["message"].split()[0] for x in lines if x["logger"] == "lmserve.engine"]
    assert engine == ["admitted", "finished"]  # logged on the engine thread, with the id
    access = [x for x in lines if x["logger"] == "lmserve.access"]
    assert len(access) == 1
    line = access[0]
    assert set(ACCESS_FIELDS) <= set(line) and line["level"] == "INFO" and line["time"]
    assert (line["method"], line["path"], line["status"]) == ("POST", "/v1/chat/completions",
                                                              200)
    assert (line["dialect"], line["model"], line["key"]) == ("openai", "smollm2", None)
    assert line["prompt_tokens"] == usage["prompt_tokens"]
    assert line["output_tokens"] == usage["completion_tokens"]
    assert line["cached_tokens"] == usage.get("prompt_tokens_details", {}).get(
        "cached_tokens", 0)
    assert 0 <= line["queue_ms"] <= line["ttft_ms"] <= line["duration_ms"]
    # Lines outside any request have no id; uvicorn's own access log is off.
    others = log_lines(json_server)
    assert any(x["request_id"] is None and x["logger"].startswith("lmserve") for x in others)
    assert not any(x["logger"] == "uvicorn.access" for x in others)


def test_a_stream_is_logged_when_it_ends_or_its_client_leaves(json_server):
    url = json_server.url
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120,
                      headers={"X-Request-Id": "stream-1"}) as r:
        assert r.status_code == 200 and "[DONE]" in r.read().decode()
    done = [x for x in lines_of(json_server, "stream-1") if x["logger"] == "lmserve.access"]
    assert done[0]["output_tokens"] > 0 and done[0]["ttft_ms"] <= done[0]["duration_ms"]
    long = {**body, "max_tokens": 400}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=long, timeout=120,
                      headers={"X-Request-Id": "leaves-1"}) as r:
        for chunk in r.iter_lines():
            if '"content"' in chunk:
                break  # leave after the first token
    left = [x for x in lines_of(json_server, "leaves-1", timeout=30)
            if x["logger"] == "lmserve.access"]
    assert left[0]["status"] == 200 and left[0]["output_tokens"] < 400
    json_server.assert_generation_stops()


def counts(server: Server) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics").text
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines()
                                     if line.startswith("lmserve_") and "{" in line)}


def test_histograms_by_model_and_dialect_count_each_request(json_server):
    labels = '{dialect="anthropic",model="smollm2"}'
    names = ("lmserve_time_to_first_token_seconds", "lmserve_inter_token_latency_seconds",
             "lmserve_request_duration_seconds", "lmserve_request_queue_seconds",
             "lmserve_request_prompt_tokens", "lmserve_request_output_tokens")
    before = counts(json_server)
    r = httpx.post(f"{json_server.url}/v1/messages", timeout=120,
                   json={"model": "smollm2", "max_tokens": 5, "temperature": 0,
                         "messages": [{"role": "user", "content": "Count to ten."}]})
    assert r.status_code == 200
    out = r.json()["usage"]["output_tokens"]
    after = counts(json_server)
    for name in names[2:] + names[:1]:
        key = f"{name}_count{labels}"
        assert after[key] == before.get(key, 0) + 1, name
    itl = f"lmserve_inter_token_latency_seconds_count{labels}"
    assert after[itl] == before.get(itl, 0) + out - 1
    total = 'lmserve_requests_total{dialect="anthropic",model="smollm2",status="200"}'
    assert after[total] == before.get(total, 0) + 1
    tokens = f"lmserve_request_output_tokens_sum{labels}"
    assert after[tokens] == before.get(tokens, 0) + out


# -- traces from an app in this process, over the real model --------------------------------

def test_spans_of_a_real_generation(model_path):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    registry = ModelRegistry()
    registry.add("smollm2", model_path, EngineSettings(n_ctx=512, parallel=1, threads=2))
    app = create_app(registry, store=StoreSettings(url="memory"))
    app.state.tracer = RequestTracer(provider)
    with TestClient(app) as c:
        deadline = time.monotonic() + 120
        while c.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        exporter.clear()
        r = c.post("/v1/chat/completions", json=CHAT, headers={
            "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"})
        assert r.status_code == 200
    spans = {s.name: s for s in exporter.get_finished_spans()}
    root = spans["POST /v1/chat/completions"]
    assert root.context is not None and root.parent is not None
    assert f"{root.context.trace_id:032x}" == "4bf92f3577b34da6a3ce929d0e0e4736"
    attrs = root.attributes or {}
    usage = r.json()["usage"]
    assert attrs["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert attrs["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert attrs["gen_ai.request.model"] == "smollm2"
    assert attrs["http.response.status_code"] == 200
    phases = [spans[name] for name in ("queue", "prefill", "decode")]
    for span in phases:
        assert span.parent is not None and span.parent.span_id == root.context.span_id
    times = [t for s in phases for t in (s.start_time, s.end_time)]
    assert times == sorted(times)  # type: ignore[type-var]
    assert root.start_time <= times[0] and times[-1] <= root.end_time  # type: ignore[operator]
