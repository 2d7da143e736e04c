"""Observability over the fake engine: request ids, error bodies, log lines, the access line,
the request histograms and the OpenTelemetry spans (the SDK's in-memory exporter)."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from lmserve.core import observe
from lmserve.core.observe import RequestIdFilter, RequestRecord, RequestTiming, request_id_from
from lmserve.http import tracing
from lmserve.http.app import StoreSettings, create_app
from lmserve.http.observe import TextFormatter, access_fields, json_formatter
from lmserve.http.tracing import RequestTracer
from lmserve.models.registry import ModelRegistry
from lmserve.models.resolve import resolve
from lmserve.service import EngineSettings
from tests.unit.fakes import FakeRunner
from tests.unit.dialects.ollama.test_ollama import make_ready

HEX_ID = r"[0-9a-f]{32}"


@contextlib.contextmanager
def served(tracer: RequestTracer | None = None) -> Iterator[TestClient]:
    registry = ModelRegistry()
    service = registry.add("tiny", resolve("smollm2").path, EngineSettings())
    app = create_app(registry, load_on_startup=False, store=StoreSettings(url="memory"))
    app.state.tracer = tracer
    with TestClient(app) as test_client:
        test_client.portal.call(make_ready, service, FakeRunner(n_ctx=512))  # type: ignore[union-attr]
        yield test_client


def completion(c: TestClient, **headers: str) -> httpx.Response:
    return c.post("/v1/completions", json={"model": "tiny", "prompt": "ab", "max_tokens": 4},
                  headers=headers)


# -- the id ---------------------------------------------------------------------------------

def test_a_client_id_is_kept_when_printable_and_short():
    assert request_id_from("trace-42/a.b") == "trace-42/a.b"
    assert request_id_from("x" * 128) == "x" * 128
    for bad in (None, "", "has space", "x" * 129, "caf\u00e9", "line\nbreak"):
        made = request_id_from(bad)
        assert made != bad and len(made) == 32


def test_the_id_is_echoed_or_made_and_reaches_every_route():
    with served() as c:
        sent = completion(c, **{"X-Request-Id": "client-id-1"})
        assert sent.status_code == 200 and sent.headers["x-request-id"] == "client-id-1"
        made = completion(c)
        import re
        assert re.fullmatch(HEX_ID, made.headers["x-request-id"])
        assert completion(c).headers["x-request-id"] != made.headers["x-request-id"]
        bad = completion(c, **{"X-Request-Id": "a b"})
        assert re.fullmatch(HEX_ID, bad.headers["x-request-id"])
        for path in ("/health", "/metrics", "/no/such/path"):
            assert c.get(path, headers={"X-Request-Id": "op"}).headers["x-request-id"] == "op"


def test_every_dialects_error_body_carries_the_id():
    with served() as c:
        calls: list[tuple[str, str, dict[str, Any]]] = [
            ("post", "/v1/chat/completions", {"model": "nope", "messages": []}),
            ("post", "/v1/completions", {"model": "tiny"}),
            ("post", "/v1/responses", {"model": "nope", "input": "hi"}),
            ("post", "/v1/messages", {"model": "nope", "max_tokens": 5,
                                      "messages": [{"role": "user", "content": "hi"}]}),
            ("post", "/api/chat", {"model": "nope", "messages": []}),
            ("post", "/generate", {"text": "a", "sampling_params": {"max_new_tokens": -5}}),
            ("post", "/v1/prompt", {"model": "nope", "prompt": "hi"}),
            ("post", "/models/tiny/stream/", {"transport": "nope"}),
            ("get", "/no/such/path", {}),
        ]
        for method, path, body in calls:
            kwargs: dict[str, Any] = {"json": body} if method == "post" else {}
            r = c.request(method.upper(), path, headers={"X-Request-Id": f"id{path}"}, **kwargs)
            assert r.status_code >= 400, (path, r.status_code, r.text)
            assert r.json()["request_id"] == f"id{path}", (path, r.text)
            assert r.headers["x-request-id"] == f"id{path}"


def test_the_error_bodies_streams_send_carry_the_id():
    """In-stream errors (SSE error events, NDJSON error lines, WebSocket error events) are
    written by the same error_body functions, while the request's record is current."""
    from lmserve.core.errors import ErrorKind, LmserveError
    from lmserve.dialects.anthropic import encoder as anthropic_encoder
    from lmserve.dialects.ollama import encoder as ollama_encoder
    from lmserve.dialects.openai import encoder as openai_encoder
    from lmserve.dialects.openai.responses import encoder as responses_encoder
    from lmserve.dialects.sglang import encoder as sglang_encoder

    error = LmserveError(ErrorKind.CAPACITY, "the KV cache is full")
    writers = (anthropic_encoder.error_body, ollama_encoder.error_body,
               openai_encoder.error_body, responses_encoder.ws_error, sglang_encoder.error_body)
    assert all("request_id" not in write(error) for write in writers)  # outside a request
    token = observe.begin(RequestRecord("in-stream", "POST", "/x"))
    try:
        assert all(write(error)["request_id"] == "in-stream" for write in writers)
    finally:
        observe.end(token)


def test_the_official_clients_still_read_the_errors():
    with served() as c:
        oa = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=c,
                           max_retries=0)
        with pytest.raises(openai.NotFoundError) as caught:
            oa.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
        assert caught.value.code == "model_not_found"
        assert caught.value.body["code"] == "model_not_found"  # type: ignore[index]
        # The client reads the id from X-Request-Id; the body has it beside "error".
        assert caught.value.request_id == caught.value.response.json()["request_id"]
        an = anthropic.Anthropic(base_url="http://testserver", api_key="x", http_client=c,
                                 max_retries=0)
        with pytest.raises(anthropic.NotFoundError) as refused:
            an.messages.create(model="nope", max_tokens=5,
                               messages=[{"role": "user", "content": "x"}])
        sent = refused.value.response.headers["x-request-id"]
        assert refused.value.body["request_id"] == sent  # type: ignore[index]
        assert refused.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]


# -- logs -----------------------------------------------------------------------------------

def test_lines_about_a_request_carry_its_id_in_the_loop_and_the_engine(caplog):
    caplog.set_level(logging.DEBUG, logger="lmserve")
    handler = caplog.handler
    handler.addFilter(RequestIdFilter())
    try:
        with served() as c:
            assert completion(c, **{"X-Request-Id": "log-me"}).status_code == 200
    finally:
        handler.removeFilter(handler.filters[-1])
    engine = [r for r in caplog.records if r.name == "lmserve.engine"]
    assert {r.getMessage().split()[0] for r in engine} >= {"admitted", "finished"}
    assert all(getattr(r, "request_id", None) == "log-me" for r in engine)
    access = [r for r in caplog.records if r.name == "lmserve.access"
              and getattr(r, "request_id", None) == "log-me"]
    assert len(access) == 1
    line: Any = access[0]
    assert (line.method, line.path, line.status, line.dialect, line.model) == \
        ("POST", "/v1/completions", 200, "openai", "tiny", )
    assert (line.prompt_tokens, line.output_tokens, line.cached_tokens) == (2, 4, 0)
    assert 0 <= line.queue_ms <= line.ttft_ms <= line.duration_ms
    assert line.key is None


def test_the_access_line_of_a_request_that_generated_nothing():
    record = RequestRecord("r1", "GET", "/health")
    fields = access_fields(record, None, record.started + 0.25, None)
    assert fields["duration_ms"] == 250.0 and fields["ttft_ms"] is None
    assert fields["prompt_tokens"] is None and fields["request_id"] == "r1"


def _record(name: str, message: str, **extra: Any) -> logging.LogRecord:
    record = logging.LogRecord(name, logging.INFO, __file__, 1, message, (), None)
    record.__dict__.update(extra)
    RequestIdFilter().filter(record)
    return record


def test_text_and_json_formats():
    token = observe.begin(RequestRecord("rid-7", "GET", "/"))
    try:
        inside = _record("lmserve.service", "hello")
    finally:
        observe.end(token)
    outside = _record("lmserve.service", "plain")
    text = TextFormatter()
    assert text.format(inside).endswith("INFO lmserve.service [rid-7]: hello")
    assert text.format(outside).endswith("INFO lmserve.service: plain")
    access = _record("lmserve.access", "POST /v1/x 200", request_id="a1", method="POST",
                     path="/v1/x", dialect="openai", model="m", status=200, prompt_tokens=3,
                     output_tokens=None, duration_ms=5.0)
    assert text.format(access).endswith(
        "[a1]: POST /v1/x 200 dialect=openai model=m prompt_tokens=3 duration_ms=5.0")
    line = json.loads(json_formatter().format(access))
    assert line["request_id"] == "a1" and line["level"] == "INFO"
    assert line["logger"] == "lmserve.access" and line["message"] == "POST /v1/x 200"
    assert line["prompt_tokens"] == 3 and line["output_tokens"] is None
    assert json.loads(json_formatter().format(outside))["request_id"] is None


# -- metrics --------------------------------------------------------------------------------

def _samples(text: str, name: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith(name):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def test_request_histograms_by_model_and_dialect():
    with served() as c:
        labels = '{dialect="openai",model="tiny"}'
        assert completion(c).status_code == 200
        first = c.get("/metrics").text
        for name in ("lmserve_time_to_first_token_seconds", "lmserve_inter_token_latency_seconds",
                     "lmserve_request_duration_seconds", "lmserve_request_queue_seconds",
                     "lmserve_request_prompt_tokens", "lmserve_request_output_tokens"):
            assert f"{name}_count{labels}" in first, name
        before = _samples(first, "lmserve_request_output_tokens")
        assert before[f"lmserve_request_output_tokens_count{labels}"] == 1
        assert before[f"lmserve_request_output_tokens_sum{labels}"] == 4
        itl = _samples(first, "lmserve_inter_token_latency_seconds_count")
        assert itl[f"lmserve_inter_token_latency_seconds_count{labels}"] == 3  # 4 tokens
        assert completion(c).status_code == 200
        c.post("/v1/completions", json={"model": "nope", "prompt": "a"})
        after = c.get("/metrics").text
        counts = _samples(after, "lmserve_requests_total")
        assert counts['lmserve_requests_total{dialect="openai",model="tiny",status="200"}'] == 2
        assert counts['lmserve_requests_total{dialect="openai",model="",status="404"}'] == 1
        out = _samples(after, "lmserve_request_output_tokens_count")
        assert out[f"lmserve_request_output_tokens_count{labels}"] == 2
        # Anthropic's dialect has its own series.
        c.post("/v1/messages", json={"model": "tiny", "max_tokens": 3,
                                     "messages": [{"role": "user", "content": "hi"}]})
        assert 'lmserve_request_duration_seconds_count{dialect="anthropic",model="tiny"} 1.0' \
            in c.get("/metrics").text


# -- traces ---------------------------------------------------------------------------------

def _tracer() -> tuple[RequestTracer, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return RequestTracer(provider), exporter


def test_a_span_per_request_with_queue_prefill_and_decode():
    tracer, exporter = _tracer()
    with served(tracer) as c:
        parent_trace, parent_span = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
        r = c.post("/v1/chat/completions", headers={
            "traceparent": f"00-{parent_trace}-{parent_span}-01", "X-Request-Id": "t1"},
            json={"model": "tiny", "max_tokens": 3, "stream": True,
                  "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and "[DONE]" in r.text
    spans: dict[str, ReadableSpan] = {s.name: s for s in exporter.get_finished_spans()}
    root = spans["POST /v1/chat/completions"]
    assert root.context is not None and root.parent is not None
    assert f"{root.context.trace_id:032x}" == parent_trace
    assert f"{root.parent.span_id:016x}" == parent_span
    attrs = root.attributes or {}
    assert attrs["http.request.method"] == "POST" and attrs["http.response.status_code"] == 200
    assert attrs["http.route"] == "/v1/chat/completions" and attrs["lmserve.request_id"] == "t1"
    assert attrs["gen_ai.request.model"] == "tiny" and attrs["lmserve.dialect"] == "openai"
    assert attrs["gen_ai.usage.output_tokens"] == 3 and attrs["gen_ai.usage.input_tokens"] > 0
    children = [spans[n] for n in ("queue", "prefill", "decode")]
    for child in children:
        assert child.parent is not None and child.parent.span_id == root.context.span_id
        assert child.start_time is not None and child.end_time is not None
        assert child.start_time <= child.end_time
    assert root.start_time is not None and root.end_time is not None
    assert root.start_time <= children[0].start_time  # type: ignore[operator]
    assert children[0].end_time == children[1].start_time
    assert children[1].end_time == children[2].start_time
    assert children[2].end_time <= root.end_time  # type: ignore[operator]


def test_a_request_that_never_reaches_the_engine_has_no_phase_spans():
    tracer, exporter = _tracer()
    with served(tracer) as c:
        c.get("/v1/models")
        c.post("/v1/completions", json={"model": "nope", "prompt": "a"})
    names = [s.name for s in exporter.get_finished_spans()]
    assert names == ["GET /v1/models", "POST /v1/completions"]
    failed = exporter.get_finished_spans()[1]
    assert (failed.attributes or {})["http.response.status_code"] == 404


def test_phase_spans_of_a_request_cut_short():
    tracer, exporter = _tracer()
    record = RequestRecord("r", "POST", "/x")
    t = record.started
    span = tracer.start(record, {})
    tracer.finish(span, record, RequestTiming(queued_at=t + 0.001, admitted_at=t + 0.002),
                  None, t + 0.01)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"POST /x", "queue", "prefill"}
    assert spans["prefill"].end_time == spans["POST /x"].end_time


def test_tracing_is_off_unless_asked():
    assert not tracing.enabled(None, {})
    assert tracing.enabled("http://c:4318", {})
    assert tracing.enabled(None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"})
    assert not tracing.enabled("http://c:4318", {"OTEL_SDK_DISABLED": "true"})
    assert tracing.traces_url("http://c:4318/") == "http://c:4318/v1/traces"
    assert tracing.traces_url("http://c:4318/v1/traces") == "http://c:4318/v1/traces"


def test_the_otlp_provider_names_the_service(monkeypatch):
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    provider: Any = tracing.otlp_provider("http://127.0.0.1:9")
    try:
        assert provider.resource.attributes["service.name"] == "lmserve"
    finally:
        provider.shutdown()
    monkeypatch.setenv("OTEL_SERVICE_NAME", "edge-7")
    provider = tracing.otlp_provider("http://127.0.0.1:9")
    try:
        assert provider.resource.attributes["service.name"] == "edge-7"
    finally:
        provider.shutdown()


def test_the_access_line_names_the_key_never_the_key_itself(caplog):
    caplog.set_level(logging.INFO, logger="lmserve.access")
    registry = ModelRegistry()
    registry.add("tiny", resolve("smollm2").path, EngineSettings())
    app = create_app(registry, api_keys=("sk-secret-1",), load_on_startup=False,
                     store=StoreSettings(url="memory"))
    with TestClient(app) as c:
        c.get("/v1/models", headers={"Authorization": "Bearer sk-secret-1",
                                     "X-Request-Id": "keyed"})
        c.get("/v1/models", headers={"X-Request-Id": "anonymous"})
    lines: dict[str, Any] = {r.request_id: r for r in caplog.records  # type: ignore[attr-defined]
                             if r.name == "lmserve.access"}
    assert lines["keyed"].key.startswith("key-") and "sk-secret" not in lines["keyed"].key
    assert lines["anonymous"].status == 401 and lines["anonymous"].key is None


def test_a_batch_of_generations_reads_as_one_timing():
    a = RequestTiming(queued_at=1.0, admitted_at=1.5, first_token_at=2.0, finished_at=3.0,
                      prompt_tokens=4, output_tokens=3, cached_tokens=1, token_gaps=(0.5, 0.5))
    b = RequestTiming(queued_at=1.1, admitted_at=1.2, first_token_at=2.5, finished_at=None,
                      prompt_tokens=5, output_tokens=1)
    record = RequestRecord("r", "POST", "/generate", sources=[lambda: a, lambda: b])
    both = record.timing()
    assert both is not None
    assert (both.queued_at, both.admitted_at, both.first_token_at) == (1.0, 1.2, 2.0)
    assert both.finished_at is None  # one is still running
    assert (both.prompt_tokens, both.output_tokens, both.cached_tokens) == (9, 4, 1)
    assert both.token_gaps == (0.5, 0.5) and both.queue_wait == pytest.approx(0.2)
    assert RequestRecord("r", "GET", "/").timing() is None


def test_the_engine_times_each_choice():
    from lmserve.core.request import SamplingParams
    from lmserve.engine.scheduler import EngineCore
    from lmserve.engine.sequence import EngineRequest

    outputs: list[Any] = []
    core = EngineCore(FakeRunner(n_ctx=256), n_slots=4, max_running=2, step_tokens=64,
                      sink=outputs.append)
    request = EngineRequest(prompt_tokens=[5, 6, 7], sampling=SamplingParams(temperature=0),
                            max_tokens=4, n=2, correlation_id="c-1")
    assert request.timing().admitted_at is None and request.timing().output_tokens == 0
    core.add(request)
    while core.has_work:
        core.step()
    t = request.timing()
    assert t.admitted_at is not None and t.first_token_at is not None
    assert t.finished_at is not None
    assert t.queued_at <= t.admitted_at <= t.first_token_at <= t.finished_at
    assert (t.prompt_tokens, t.output_tokens) == (3, 8)
    assert len(t.token_gaps) == 6 and all(g >= 0 for g in t.token_gaps)  # 3 per choice
