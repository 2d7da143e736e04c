"""Observability at the HTTP edge: the request id, the access line, the request metrics and
the trace of every request, and the server's log format.

`RequestObserver` is the outermost middleware. For each HTTP request and WebSocket it takes
the client's `X-Request-Id` (when printable and at most 128 characters) or makes one, opens
the request's `core.observe.RequestRecord` for the time the request is handled (log lines
and error bodies read its id from there), returns the id in the `X-Request-Id` header, and
when the response has ended (a stream: its last byte, or the client leaving) writes one
access line, fills the request histograms (http.metrics.RequestMetrics) and ends the trace
span (http.tracing), from the timing the backend noted for the request."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmserve.core import observe
from lmserve.core.observe import RequestRecord, RequestTiming
from lmserve.http.metrics import RequestMetrics
from lmserve.http.middleware import caller_of
from lmserve.http.tracing import RequestTracer

access_log = logging.getLogger("lmserve.access")
log = logging.getLogger("lmserve.http")

DIALECT_ATTRIBUTE = "lmserve_dialect"  # set on each route a dialect's router contributes
# The access line's fields, in order (JSON: top-level keys; text: key=value after the line).
ACCESS_FIELDS = ("request_id", "method", "path", "dialect", "model", "status", "prompt_tokens",
                 "output_tokens", "cached_tokens", "queue_ms", "ttft_ms", "duration_ms", "key")
LOG_FORMATS = ("text", "json")
_IN_MESSAGE = ("request_id", "method", "path", "status")  # text: in the line already


def tag_routes(routes: list[Any], dialect: str) -> None:
    """Mark routes as the dialect's, so the access line and the metrics can name it."""
    for route in routes:
        setattr(route, DIALECT_ATTRIBUTE, dialect)


def install(app: FastAPI) -> None:
    """Add the observer to an app; call it after every other middleware (it must be the
    outermost, so that their refusals carry the request id too)."""
    app.state.request_metrics = RequestMetrics()
    for collector in getattr(app.state, "collectors", ()):  # the app's own (http.access's)
        app.state.request_metrics.registry.register(collector)
    app.state.tracer = None  # a RequestTracer when traces are on (enable_tracing)
    app.add_middleware(RequestObserver, metrics=app.state.request_metrics,
                       tracer=lambda: app.state.tracer)


def enable_tracing(app: FastAPI, endpoint: str | None) -> bool:
    """Trace this app's requests when `endpoint` or the OTEL_* environment asks for it."""
    from lmserve.http import tracing

    if not tracing.enabled(endpoint):
        return False
    app.state.tracer = RequestTracer(tracing.otlp_provider(endpoint))
    return True


class RequestObserver:
    def __init__(self, app: ASGIApp, *, metrics: RequestMetrics,
                 tracer: Callable[[], RequestTracer | None]) -> None:
        self.app = app
        self.metrics = metrics
        self.tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        record = RequestRecord(observe.request_id_from(headers.get(observe.REQUEST_ID_HEADER)),
                               scope.get("method", "GET"), scope.get("path", ""))
        id_header = (observe.REQUEST_ID_HEADER.encode(), record.request_id.encode())
        tracer = self.tracer()
        span = tracer.start(record, headers) if tracer is not None else None

        async def send_with_id(message: Message) -> None:
            kind = message["type"]
            if kind in ("http.response.start", "websocket.http.response.start",
                        "websocket.accept"):
                record.status = message.get("status", 101)
                sent = message.get("headers") or []
                if not any(name.lower() == id_header[0] for name, _ in sent):
                    message = {**message, "headers": [*sent, id_header]}
            elif kind == "websocket.close" and record.status is None:
                record.status = 403  # closed before it was accepted
            await send(message)

        token = observe.begin(record)
        try:
            await self.app(scope, receive, send_with_id)
        except BaseException:
            if record.status is None:
                record.status = 500
            raise
        finally:
            try:
                self._finish(scope, record, tracer, span)
            except Exception:  # observing must never fail the request it observes
                log.exception("could not record the end of request %s", record.request_id)
            finally:
                observe.end(token)

    def _finish(self, scope: Scope, record: RequestRecord, tracer: RequestTracer | None,
                span: Any) -> None:
        end = time.monotonic()
        route = scope.get("route")
        record.dialect = getattr(route, DIALECT_ATTRIBUTE, None)
        key = caller_of(scope).name
        timing = record.timing()
        self.metrics.observe(record, timing, end - record.started)
        access_log.info("%s %s %s", record.method, record.path, record.status,
                        extra=access_fields(record, timing, end, key))
        if tracer is not None and span is not None:
            tracer.finish(span, record, timing, getattr(route, "path", None), end)


def access_fields(record: RequestRecord, timing: RequestTiming | None, end: float,
                  key: str | None) -> dict[str, Any]:
    """The access line's fields (times in ms, rounded to 0.1; None where not known)."""
    def ms(seconds: float | None) -> float | None:
        return None if seconds is None else round(seconds * 1000, 1)

    first = timing.first_token_at if timing is not None else None
    return {
        "request_id": record.request_id, "method": record.method, "path": record.path,
        "dialect": record.dialect, "model": record.model, "status": record.status,
        "prompt_tokens": timing.prompt_tokens if timing is not None else None,
        "output_tokens": timing.output_tokens if timing is not None else None,
        "cached_tokens": timing.cached_tokens if timing is not None else None,
        "queue_ms": ms(timing.queue_wait) if timing is not None else None,
        "ttft_ms": ms(None if first is None else first - record.started),
        "duration_ms": ms(end - record.started), "key": key}


# -- the log format -------------------------------------------------------------------------

class TextFormatter(logging.Formatter):
    """`time level logger [request id]: message`, and the access line's fields as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        request_id = getattr(record, "request_id", None)
        record.request_tag = f" [{request_id}]" if request_id else ""
        line = super().formatMessage(record)
        if record.name == access_log.name:
            line += "".join(f" {name}={getattr(record, name, None)}"
                            for name in ACCESS_FIELDS if name not in _IN_MESSAGE
                            and getattr(record, name, None) is not None)
        return line


def json_formatter() -> logging.Formatter:
    """One JSON object a line (python-json-logger): time, level, logger, message, request_id,
    and any fields the line was logged with (the access line's)."""
    from pythonjsonlogger.json import JsonFormatter

    return JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s",
                         rename_fields={"asctime": "time", "levelname": "level",
                                        "name": "logger"})


def configure_logging(level: str, log_format: str = "text") -> None:
    """The root logger writes to stderr in `log_format` (text | json), every line with the
    request id of the request it is about. Uvicorn's loggers propagate here (run uvicorn with
    log_config=None and its own access log off: lmserve writes the access line)."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"unknown log format {log_format!r}; choose from {LOG_FORMATS}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(json_formatter() if log_format == "json" else TextFormatter())
    handler.addFilter(observe.RequestIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
