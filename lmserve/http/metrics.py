"""Prometheus metrics, read from the engines' own counters at scrape time."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
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
    "load_failures": ("lmserve_disk_cache_load_failures", "Disk cache loads that failed"),
}


def _disk_cache_families(registry: ModelRegistry) -> Iterator[Metric]:
    """Only models started with --disk-cache report these."""
    families = {k: CounterMetricFamily(n, h, labels=["model"])
                for k, (n, h) in _DISK_COUNTERS.items()}
    size = GaugeMetricFamily("lmserve_disk_cache_bytes", "Bytes of saved states on disk",
                             labels=["model"])
    for backend in registry:
        stats = backend.stats()
        disk = stats.disk_cache if stats is not None else None
        if disk is not None:
            for key, family in families.items():
                family.add_metric([backend.name], disk[key])
            size.add_metric([backend.name], disk["bytes"])
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


def render(registry: ModelRegistry) -> tuple[bytes, str]:
    prom = CollectorRegistry()
    prom.register(EngineCollector(registry))
    return generate_latest(prom), CONTENT_TYPE_LATEST
