"""Per-request timing records and the summary statistics computed from them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lmserve.bench.base import Chunk


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100) with linear interpolation (numpy's default method)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= p <= 100.0:
        raise ValueError(f"percentile out of range: {p}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


@dataclass(frozen=True)
class Stats:
    """Mean, median and p99 of a sample; all None when the sample is empty."""

    count: int = 0
    mean: float | None = None
    p50: float | None = None
    p99: float | None = None

    @classmethod
    def of(cls, values: Sequence[float], scale: float = 1.0) -> Stats:
        """Summarise `values`, each multiplied by `scale` (1000.0 turns seconds into ms)."""
        if not values:
            return cls()
        scaled = [v * scale for v in values]
        return cls(
            count=len(scaled),
            mean=sum(scaled) / len(scaled),
            p50=percentile(scaled, 50.0),
            p99=percentile(scaled, 99.0),
        )


@dataclass
class RequestRecord:
    """Timings of one request, all from time.perf_counter() (seconds).

    Fed one chunk at a time with `on_chunk`; ITL gaps are computed as chunks arrive.
    """

    start: float
    first_token: float | None = None
    end: float | None = None
    output_tokens: int = 0
    prompt_tokens: int | None = None
    streamed_tokens: int = 0  # tokens counted from the stream's chunks, before any usage report
    itl: list[float] = field(default_factory=list)
    error: str | None = None
    _last: float | None = field(default=None, repr=False)
    _usage_total: int | None = field(default=None, repr=False)

    def on_chunk(self, chunk: Chunk, now: float) -> None:
        if chunk.is_usage:
            self._usage_total = chunk.total_tokens
            if chunk.prompt_tokens is not None:
                self.prompt_tokens = chunk.prompt_tokens
            return
        n = chunk.n_tokens
        if n <= 0:
            return
        if self._last is None:
            self.first_token = now
        else:
            gap = (now - self._last) / n
            self.itl.extend([gap] * n)
        self._last = now
        self.output_tokens += n

    def finish(self, now: float, error: str | None = None) -> None:
        self.end = now
        self.error = error
        self.streamed_tokens = self.output_tokens
        if self._usage_total is not None:
            self.output_tokens = self._usage_total

    @property
    def ok(self) -> bool:
        return self.error is None and self.end is not None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.start

    @property
    def latency(self) -> float | None:
        return None if self.end is None else self.end - self.start

    @property
    def tpot(self) -> float | None:
        """(end - first token) / (output tokens - 1); None with fewer than two tokens."""
        if self.first_token is None or self.end is None or self.output_tokens < 2:
            return None
        return (self.end - self.first_token) / (self.output_tokens - 1)

    def to_json(self) -> dict[str, object]:
        return {
            "ttft_ms": _ms(self.ttft),
            "latency_ms": _ms(self.latency),
            "tpot_ms": _ms(self.tpot),
            "output_tokens": self.output_tokens,
            "streamed_tokens": self.streamed_tokens,
            "prompt_tokens": self.prompt_tokens,
            "error": self.error,
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


@dataclass
class LevelResult:
    """Metrics of one concurrency level. Latency stats are in milliseconds."""

    concurrency: int
    num_requests: int
    completed: int
    failed: int
    duration_s: float
    request_throughput: float  # completed requests / wall second
    output_throughput: float  # output tokens of completed requests / wall second
    ttft: Stats
    itl: Stats
    tpot: Stats
    mean_prompt_tokens: float | None = None  # as reported by the server, when it does
    mean_output_tokens: float | None = None  # per completed request
    mean_streamed_tokens: float | None = None  # per completed request, counted from chunks
    errors: list[str] = field(default_factory=list)  # distinct messages, a few at most
    engine: dict[str, Any] | None = None  # per-step engine timings (engine_metrics), if probed
    records: list[RequestRecord] = field(default_factory=list, repr=False)

    @classmethod
    def from_records(
        cls, concurrency: int, records: Sequence[RequestRecord], duration_s: float
    ) -> LevelResult:
        ok = [r for r in records if r.ok]
        bad = [r for r in records if not r.ok]
        tokens = sum(r.output_tokens for r in ok)
        prompts = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
        errors: list[str] = []
        for r in bad:
            msg = r.error or "unfinished"
            if msg not in errors and len(errors) < 5:
                errors.append(msg)
        rate = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: 0.0)
        return cls(
            concurrency=concurrency,
            num_requests=len(records),
            completed=len(ok),
            failed=len(bad),
            duration_s=duration_s,
            request_throughput=rate(len(ok)),
            output_throughput=rate(tokens),
            ttft=Stats.of([t for r in ok if (t := r.ttft) is not None], 1000.0),
            itl=Stats.of([g for r in ok for g in r.itl], 1000.0),
            tpot=Stats.of([t for r in ok if (t := r.tpot) is not None], 1000.0),
            mean_prompt_tokens=sum(prompts) / len(prompts) if prompts else None,
            mean_output_tokens=tokens / len(ok) if ok else None,
            mean_streamed_tokens=sum(r.streamed_tokens for r in ok) / len(ok) if ok else None,
            errors=errors,
            records=list(records),
        )
