"""Per-request observability, neutral of HTTP and of the backend: the request id, the record
of one request, and a backend's per-request timing.

The HTTP edge (lmserve.http.observe) opens a `RequestRecord` for every request and sets it in
a context variable for the time the request is handled: log lines read its id through
`RequestIdFilter`, error bodies carry it (`with_request_id`), and a backend that starts a
generation notes its model and a `RequestTiming` source (`note_generation`), which the edge
reads when the request ends for the access line, the histograms and the trace. The engine
thread does not see the context variable: the id travels with the engine request and its
lines pass it explicitly (`extra={"request_id": ...}`).
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import Any

REQUEST_ID_HEADER = "x-request-id"
MAX_REQUEST_ID = 128
# What a client's X-Request-Id may be: printable ASCII without spaces, bounded in length. Any
# other value is replaced by a new id (it would end up in headers, bodies and log lines).
_VALID_ID = re.compile(rf"[\x21-\x7e]{{1,{MAX_REQUEST_ID}}}")


def new_request_id() -> str:
    return uuid.uuid4().hex


def request_id_from(value: str | None) -> str:
    """The client's id when it is acceptable, else a new one."""
    if value is not None and _VALID_ID.fullmatch(value):
        return value
    return new_request_id()


@dataclass(frozen=True, slots=True)
class RequestTiming:
    """One request's life in a backend, in `time.monotonic()` seconds. For n > 1 choices:
    the first admission and first token of any choice, the last finish of all, output tokens
    summed; `finished_at` stays None until every choice has ended."""

    queued_at: float
    admitted_at: float | None = None  # the first choice took a slot (queue wait ends)
    first_token_at: float | None = None
    finished_at: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV was reused (prefix or disk cache)
    token_gaps: tuple[float, ...] = ()  # seconds between a choice's consecutive tokens

    @property
    def queue_wait(self) -> float | None:
        return None if self.admitted_at is None else self.admitted_at - self.queued_at


TimingSource = Callable[[], RequestTiming]


@dataclass
class RequestRecord:
    """One HTTP request (or WebSocket), from the edge's point of view."""

    request_id: str
    method: str
    path: str
    started: float = field(default_factory=time.monotonic)
    started_ns: int = field(default_factory=time.time_ns)  # the same instant, wall clock
    dialect: str | None = None
    model: str | None = None
    status: int | None = None
    sources: list[TimingSource] = field(default_factory=list)

    def timing(self) -> RequestTiming | None:
        """The generations started for this request, as one timing (None: none started). A
        request of several prompts (a batch) waits until its first is admitted and ends when
        its last finishes."""
        timings = [source() for source in self.sources]
        if not timings:
            return None
        if len(timings) == 1:
            return timings[0]

        def first(values: list[float | None]) -> float | None:
            known = [v for v in values if v is not None]
            return min(known) if known else None

        ends = [t.finished_at for t in timings]
        return RequestTiming(
            queued_at=min(t.queued_at for t in timings),
            admitted_at=first([t.admitted_at for t in timings]),
            first_token_at=first([t.first_token_at for t in timings]),
            finished_at=None if None in ends else max(e for e in ends if e is not None),
            prompt_tokens=sum(t.prompt_tokens for t in timings),
            output_tokens=sum(t.output_tokens for t in timings),
            cached_tokens=sum(t.cached_tokens for t in timings),
            token_gaps=tuple(g for t in timings for g in t.token_gaps))

    def wall_ns(self, monotonic: float) -> int:
        """A `time.monotonic()` instant as nanoseconds since the epoch (for trace spans)."""
        return self.started_ns + round((monotonic - self.started) * 1e9)


_CURRENT: ContextVar[RequestRecord | None] = ContextVar("lmserve_request", default=None)


def current() -> RequestRecord | None:
    return _CURRENT.get()


def current_request_id() -> str | None:
    record = _CURRENT.get()
    return record.request_id if record is not None else None


def begin(record: RequestRecord) -> Token[RequestRecord | None]:
    return _CURRENT.set(record)


def end(token: Token[RequestRecord | None]) -> None:
    _CURRENT.reset(token)


def note_model(name: str) -> None:
    """The model a request was served by (outside a request: nothing)."""
    record = _CURRENT.get()
    if record is not None:
        record.model = name


def note_generation(model: str, timing: TimingSource) -> None:
    """A backend started a generation for the current request: its model and its timing."""
    record = _CURRENT.get()
    if record is not None:
        record.model = model
        record.sources.append(timing)


def with_request_id(body: dict[str, Any]) -> dict[str, Any]:
    """An error body with the current request's id at its top level (`request_id`, as
    Anthropic's API places it); unchanged outside a request."""
    request_id = current_request_id()
    if request_id is not None and "request_id" not in body:
        body = {**body, "request_id": request_id}
    return body


class RequestIdFilter(logging.Filter):
    """Gives every log record a `request_id` attribute: the one it was logged with (the engine
    thread passes it in `extra`), else the request being handled, else None."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = current_request_id()
        return True
