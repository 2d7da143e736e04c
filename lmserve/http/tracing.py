"""OpenTelemetry traces, off by default: a span per request, with child spans for the
engine's queue, prefill and decode at the engine's own timestamps.

Nothing here imports OpenTelemetry until tracing is turned on (`--otel-endpoint`, or the
standard `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT` variables), so a server without it pays
nothing. Spans are exported over OTLP/HTTP by the SDK's batch processor; tests hand
`RequestTracer` a provider with the SDK's in-memory exporter instead."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lmserve._version import __version__
from lmserve.core.observe import RequestRecord, RequestTiming

if TYPE_CHECKING:
    from opentelemetry.trace import Span, TracerProvider

TRACES_PATH = "/v1/traces"
_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def enabled(endpoint: str | None, environ: Mapping[str, str] | None = None) -> bool:
    """Whether to trace: an endpoint was given, or the standard environment names one (and
    does not turn the SDK or the trace exporter off)."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return bool(endpoint) or any(env.get(name) for name in _ENDPOINT_VARIABLES)


def traces_url(endpoint: str) -> str:
    """`--otel-endpoint` is the collector's OTLP/HTTP base URL, like OTEL_EXPORTER_OTLP_ENDPOINT
    (http://collector:4318); a URL that already ends in /v1/traces is kept as it is."""
    url = endpoint.rstrip("/")
    return url if url.endswith(TRACES_PATH) else url + TRACES_PATH


def otlp_provider(endpoint: str | None) -> TracerProvider:
    """A tracer provider that batches spans to an OTLP/HTTP collector: `endpoint`, else the
    one the OTEL_* environment names. The service name is OTEL_SERVICE_NAME (or
    OTEL_RESOURCE_ATTRIBUTES' service.name), else "lmserve"."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "lmserve"}))
    provider = SdkTracerProvider(resource=resource)
    exporter = OTLPSpanExporter(endpoint=traces_url(endpoint) if endpoint else None)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


class RequestTracer:
    """Starts a request's span when it arrives (continuing the client's W3C `traceparent`)
    and finishes it, with its queue, prefill and decode children, when it ends."""

    def __init__(self, provider: TracerProvider) -> None:
        from opentelemetry.propagate import extract
        from opentelemetry.trace import SpanKind, StatusCode, set_span_in_context

        self.provider = provider
        self.tracer = provider.get_tracer("lmserve", __version__)
        self._extract, self._in_context = extract, set_span_in_context
        self._server, self._error = SpanKind.SERVER, StatusCode.ERROR

    def start(self, record: RequestRecord, headers: Mapping[str, str]) -> Span:
        return self.tracer.start_span(f"{record.method} {record.path}",
                                      context=self._extract(dict(headers)), kind=self._server,
                                      start_time=record.started_ns)

    def finish(self, span: Span, record: RequestRecord, timing: RequestTiming | None,
               route: str | None, end: float) -> None:
        """`end`: the request's last moment, time.monotonic()."""
        if route is not None:
            span.update_name(f"{record.method} {route}")
        attributes: dict[str, Any] = {
            "http.request.method": record.method, "url.path": record.path,
            "lmserve.request_id": record.request_id}
        if route is not None:
            attributes["http.route"] = route
        if record.status is not None:
            attributes["http.response.status_code"] = record.status
        if record.dialect is not None:
            attributes["lmserve.dialect"] = record.dialect
        if record.model is not None:
            attributes["gen_ai.request.model"] = record.model
        if timing is not None:
            attributes["gen_ai.usage.input_tokens"] = timing.prompt_tokens
            attributes["gen_ai.usage.output_tokens"] = timing.output_tokens
            attributes["lmserve.cached_tokens"] = timing.cached_tokens
        span.set_attributes(attributes)
        if record.status is None or record.status >= 500:
            span.set_status(self._error)
        if timing is not None:
            self._phases(span, record, timing, end)
        span.end(end_time=record.wall_ns(end))

    def _phases(self, span: Span, record: RequestRecord, timing: RequestTiming,
                end: float) -> None:
        """queue: arrival at the engine to admission; prefill: admission to the first token;
        decode: the first token to the last. A phase the request never reached is left out;
        one it was in when it ended (the client left) ends with the request."""
        parent = self._in_context(span)
        last = timing.finished_at if timing.finished_at is not None else end
        phases = (("queue", timing.queued_at, timing.admitted_at),
                  ("prefill", timing.admitted_at, timing.first_token_at),
                  ("decode", timing.first_token_at, timing.finished_at))
        for name, begin, until in phases:
            if begin is None:
                break
            child = self.tracer.start_span(name, context=parent,
                                           start_time=record.wall_ns(begin))
            if name == "decode":
                child.set_attribute("gen_ai.usage.output_tokens", timing.output_tokens)
            elif name == "prefill":
                child.set_attributes({"gen_ai.usage.input_tokens": timing.prompt_tokens,
                                      "lmserve.cached_tokens": timing.cached_tokens})
            child.end(end_time=record.wall_ns(until if until is not None else last))
