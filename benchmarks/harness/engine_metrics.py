"""Per-step engine timings of an lmserve server, from its /metrics before and after a level.

lmserve exports cumulative counters (lmserve/http/metrics.py): `lmserve_decode_steps`,
`lmserve_batch_tokens`, `lmserve_generated_tokens` and `lmserve_step_phase_seconds{phase=...}`.
The difference of two
scrapes, divided by the steps taken between them, gives what one engine step cost in each
phase over exactly that level's traffic.
"""

from __future__ import annotations

from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

PHASES: tuple[str, ...] = ("schedule", "batch_build", "decode", "sample", "detokenize")
COUNTERS = {"lmserve_decode_steps": "steps", "lmserve_batch_tokens": "batch_tokens",
            "lmserve_generated_tokens": "generated_tokens"}
PHASE_SECONDS = "lmserve_step_phase_seconds"

Counters = dict[str, float]


def counter_total(text: str, name: str) -> float:
    """The counter `name` (without _total) from a /metrics text, summed over its labels."""
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples if sample.name == f"{name}_total")


def parse_counters(text: str) -> Counters:
    """Engine counters summed over models: steps, batch_tokens, generated_tokens, phases."""
    out: Counters = {**{k: 0.0 for k in COUNTERS.values()}, **{p: 0.0 for p in PHASES}}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            name = sample.name.removesuffix("_total")
            if name in COUNTERS:
                out[COUNTERS[name]] += sample.value
            elif name == PHASE_SECONDS and sample.labels.get("phase") in PHASES:
                out[sample.labels["phase"]] += sample.value
    return out


def step_timings(before: Counters, after: Counters) -> dict[str, Any]:
    """What one step cost between two scrapes: ms per phase, tokens submitted and tokens
    generated per step (above 1 per sequence with speculative lookup), step count.

    With no step in between, the per-step figures are None.
    """
    steps = int(after["steps"] - before["steps"])
    phase_s = {p: after[p] - before[p] for p in PHASES}

    def per_step(value: float, scale: float = 1.0) -> float | None:
        return value * scale / steps if steps > 0 else None

    return {
        "steps": steps,
        "batch_tokens_per_step": per_step(after["batch_tokens"] - before["batch_tokens"]),
        "generated_per_step": per_step(after["generated_tokens"] - before["generated_tokens"]),
        "step_ms": {p: per_step(v, 1000.0) for p, v in phase_s.items()},
        "step_ms_total": per_step(sum(phase_s.values()), 1000.0),
        "engine_s": phase_s,
    }


class MetricsProbe:
    """Scrapes `<base_url>/metrics` around each sweep level (see scenarios.sweep's `probe`)."""

    def __init__(self, base_url: str, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/").removesuffix("/v1"), timeout=30, transport=transport
        )
        self._before: Counters | None = None

    async def scrape(self) -> Counters:
        resp = await self._client.get("/metrics")
        resp.raise_for_status()
        return parse_counters(resp.text)

    async def start(self) -> None:
        self._before = await self.scrape()

    async def finish(self) -> dict[str, Any]:
        if self._before is None:
            raise RuntimeError("MetricsProbe.finish() without start()")
        before, self._before = self._before, None
        return step_timings(before, await self.scrape())

    async def aclose(self) -> None:
        await self._client.aclose()
