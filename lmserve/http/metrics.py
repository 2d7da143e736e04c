"""Prometheus metrics, read from the engines' own counters at scrape time."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from lmserve.core.observe import RequestRecord, RequestTiming
    from lmserve.models.registry import ModelRegistry


class EngineCollector:
    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        labels = ["model"]
        counters = {
            "prompt_tokens": ("lmserve_prompt_tokens", "Prompt tokens processed (prefill)"),
            "generated_tokens": ("lmserve_generated_tokens", "Tokens generated"),
            "steps": ("lmserve_decode_steps", "llama_decode calls made by the scheduler"),
            "batch_tokens": ("lmserve_batch_tokens", "Tokens submitted across all decode steps"),
            "preemptions": ("lmserve_preemptions", "Sequences preempted for lack of KV room"),
            "decode_failures": ("lmserve_decode_failures", "llama_decode calls that failed"),
            "draft_tokens": ("lmserve_lookup_draft_tokens",
                             "Prompt-lookup tokens drafted and verified"),
            "accepted_tokens": ("lmserve_lookup_accepted_tokens",
                                "Drafted tokens the sampler accepted"),
            "model_draft_tokens": ("lmserve_draft_model_tokens",
                                   "Draft-model (--draft) tokens drafted and verified"),
            "model_accepted_tokens": ("lmserve_draft_model_accepted_tokens",
                                      "Draft-model tokens the sampler accepted"),
            "media_chunks": ("lmserve_media_chunks",
                             "Images and audio chunks decoded into sequences' KV"),
            "prefix_waits": ("lmserve_prefix_waits",
                             "Requests that waited for a prompt prefix being computed, "
                             "then shared it"),
            "lane_jobs": ("lmserve_prefill_lane_jobs",
                          "Prompts computed in the prefill lane while others decoded "
                          "(--prefill-lane)"),
            "lane_tokens": ("lmserve_prefill_lane_tokens",
                            "Prompt tokens the prefill lane computed (also in "
                            "lmserve_prompt_tokens)"),
            "media_tokens": ("lmserve_media_tokens", "Prompt positions filled by images and audio"),
            "media_cache_hits": ("lmserve_media_cache_hits",
                                 "Media chunks whose encoded embeddings came from the "
                                 "cache"),
            "media_disk_hits": ("lmserve_media_disk_cache_hits",
                                "Encoded media read from the disk tier (--media-cache-dir)"),
            "media_disk_writes": ("lmserve_media_disk_cache_writes",
                                  "Encoded media written to the disk tier"),
            "turn_reuses": ("lmserve_turn_memory_reuses",
                            "Chat prompts tokenized with the ids of an answer they repeat, so "
                            "they reuse its KV (engine.turn_memory)"),
        }
        families = {k: CounterMetricFamily(n, h, labels=labels) for k, (n, h) in counters.items()}
        phase = CounterMetricFamily("lmserve_step_phase_seconds",
                                    "Engine time per step phase (schedule, batch_build, decode, "
                                    "sample, detokenize)", labels=["model", "phase"])
        running = GaugeMetricFamily("lmserve_requests_running", "Sequences holding a slot",
                                    labels=labels)
        waiting = GaugeMetricFamily("lmserve_requests_waiting", "Sequences queued", labels=labels)
        batch_seqs = GaugeMetricFamily("lmserve_step_sequences",
                                       "Sequences in the last decode step", labels=labels)
        hits = CounterMetricFamily("lmserve_prefix_cache_hits", "Requests that reused a prefix",
                                   labels=labels)
        reused = CounterMetricFamily("lmserve_prefix_cache_tokens",
                                     "Prompt tokens served from the prefix cache", labels=labels)
        for backend in self.registry:
            stats = backend.stats()
            if stats is None:
                continue
            name = backend.name
            for key, family in families.items():
                family.add_metric([name], stats.counters.get(key, 0))
            for p, seconds in stats.phases.items():
                phase.add_metric([name, p], seconds)
            running.add_metric([name], stats.running)
            waiting.add_metric([name], stats.waiting)
            batch_seqs.add_metric([name], stats.last_step_sequences)
            hits.add_metric([name], stats.prefix_cache_hits)
            reused.add_metric([name], stats.prefix_cache_tokens)
        yield from families.values()
        yield from (phase, running, waiting, batch_seqs, hits, reused)
        yield from _disk_cache_families(self.registry)
        yield from _upstream_families(self.registry)
        yield from _adapter_families(self.registry)


_DISK_COUNTERS = {
    "hits": ("lmserve_disk_cache_hits", "Sequence states loaded from the disk cache"),
    "tokens_loaded": ("lmserve_disk_cache_tokens", "Prompt tokens loaded from the disk cache"),
    "saves": ("lmserve_disk_cache_saves", "Sequence states written to the disk cache"),
    "load_failures": ("lmserve_disk_cache_load_failures", "Loads from the disk cache that failed"),
}


def _disk_cache_families(registry: ModelRegistry) -> Iterator[Metric]:
    """Only models started with --disk-cache (lmserve_disk_cache_*) or --cache-ram
    (lmserve_ram_cache_*) report these."""
    for tier, where in (("disk", "on disk"), ("ram", "in the RAM tier")):
        families = {k: CounterMetricFamily(n.replace("disk", tier, 1),
                                           h.replace("the disk cache", f"the {tier} cache"),
                                           labels=["model"])
                    for k, (n, h) in _DISK_COUNTERS.items()}
        size = GaugeMetricFamily(f"lmserve_{tier}_cache_bytes", f"Bytes of saved states {where}",
                                 labels=["model"])
        for backend in registry:
            stats = backend.stats()
            saved = getattr(stats, f"{tier}_cache") if stats is not None else None
            if saved is not None:
                for key, family in families.items():
                    family.add_metric([backend.name], saved[key])
                size.add_metric([backend.name], saved["bytes"])
        yield from (*families.values(), size)


def _adapter_families(registry: ModelRegistry) -> Iterator[Metric]:
    """Only models with LoRA adapters report these (see engine.lora.AdapterRotation)."""
    steps = CounterMetricFamily("lmserve_adapter_steps", "Decode steps per LoRA adapter set "
                                "(base: none)", labels=["model", "adapters"])
    switches = CounterMetricFamily("lmserve_adapter_switches",
                                   "Decode steps that changed the context's LoRA adapters",
                                   labels=["model"])
    for backend in registry:
        stats = backend.stats()
        if stats is None or not backend.card.loras:
            continue
        for adapters, count in stats.adapter_steps.items():
            steps.add_metric([backend.name, adapters], count)
        switches.add_metric([backend.name], stats.adapter_switches)
    yield from (steps, switches)


def _upstream_families(registry: ModelRegistry) -> Iterator[Metric]:
    """Only models served by an upstream (lmserve.upstream) report these: requests relayed,
    errors by kind, time to the first token and whole-request latency."""
    requests = CounterMetricFamily("lmserve_upstream_requests", "Requests sent to an upstream",
                                   labels=["model"])
    errors = CounterMetricFamily("lmserve_upstream_errors", "Upstream requests that failed, by "
                                 "the kind of failure", labels=["model", "kind"])
    ttft = HistogramMetricFamily("lmserve_upstream_ttft_seconds", "Seconds from sending a "
                                 "request upstream to its first token", labels=["model"])
    duration = SummaryMetricFamily("lmserve_upstream_request_seconds", "Seconds an upstream "
                                   "request took, to its last byte", labels=["model"])
    for backend in registry:
        stats = backend.stats()
        up = stats.upstream if stats is not None else None
        if up is None:
            continue
        name = backend.name
        requests.add_metric([name], up.requests)
        for kind, count in sorted(up.errors.items()):
            errors.add_metric([name, kind], count)
        ttft.add_metric([name], [(f"{le:g}", n) for le, n in up.ttft_buckets]
                        + [("+Inf", up.ttft_count)], sum_value=up.ttft_sum)
        duration.add_metric([name], count_value=up.duration_count, sum_value=up.duration_sum)
    yield from (requests, errors, ttft, duration)


# Bucket bounds: latencies from a few ms (a cached prompt on a GPU) to minutes (a long prompt
# on a CPU); token counts in powers of two up to the largest contexts served.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0,
                   160.0, 320.0)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
TOKEN_BUCKETS = tuple(float(2 ** i) for i in range(18))  # 1 .. 131072


class RequestMetrics:
    """Per-request histograms and counters, observed once when a request ends (by
    lmserve.http.observe), so the engine's hot path still makes no metric calls. One per app:
    its own prometheus_client registry, scraped beside the engine collector (http.access
    registers lmserve_rate_limited_requests_total there)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ("model", "dialect")
        r = self.registry
        self.ttft = Histogram("lmserve_time_to_first_token_seconds", "Seconds from the "
                              "request's arrival to its first output token",
                              labels, buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("lmserve_inter_token_latency_seconds", "Seconds between two "
                             "consecutive output tokens of a choice", labels,
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("lmserve_request_duration_seconds", "Seconds from the request's "
                             "arrival to the end of its response (end-to-end latency)", labels,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("lmserve_request_queue_seconds", "Seconds a request waited for "
                               "the engine to admit it", labels, buckets=LATENCY_BUCKETS,
                               registry=r)
        self.prompt = Histogram("lmserve_request_prompt_tokens", "Prompt tokens of a request",
                                labels, buckets=TOKEN_BUCKETS, registry=r)
        self.output = Histogram("lmserve_request_output_tokens", "Output tokens of a request "
                                "(all its choices)", labels, buckets=TOKEN_BUCKETS, registry=r)
        self.requests = Counter("lmserve_requests", "Requests answered by a dialect, by HTTP "
                                "status", ("model", "dialect", "status"), registry=r)

    def observe(self, record: RequestRecord, timing: RequestTiming | None,
                duration: float) -> None:
        """A finished request: counted when a dialect answered it; its histograms filled from
        its generation's timing, where it started one."""
        if record.dialect is None:
            return
        model, dialect = record.model or "", record.dialect
        self.requests.labels(model, dialect, str(record.status or 0)).inc()
        self.e2e.labels(model, dialect).observe(duration)
        if timing is None:
            return
        if timing.queue_wait is not None:
            self.queue.labels(model, dialect).observe(timing.queue_wait)
        if timing.first_token_at is not None:
            self.ttft.labels(model, dialect).observe(timing.first_token_at - record.started)
        if timing.token_gaps:
            itl = self.itl.labels(model, dialect)
            for gap in timing.token_gaps:
                itl.observe(gap)
        self.prompt.labels(model, dialect).observe(timing.prompt_tokens)
        self.output.labels(model, dialect).observe(timing.output_tokens)

    def collect(self) -> Iterator[Metric]:
        yield from self.registry.collect()


def render(registry: ModelRegistry, requests: RequestMetrics | None = None
           ) -> tuple[bytes, str]:
    prom = CollectorRegistry()
    prom.register(EngineCollector(registry))
    if requests is not None:
        prom.register(requests)
    return generate_latest(prom), CONTENT_TYPE_LATEST
