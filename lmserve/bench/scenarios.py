"""Benchmark scenarios: a concurrency sweep and a shared-prefix (prompt cache) probe."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from lmserve.bench.base import Backend
from lmserve.bench.prompts import make_prompts
from lmserve.bench.runner import run_level
from lmserve.bench.stats import LevelResult

DEFAULT_CONCURRENCIES: tuple[int, ...] = (1, 2, 4, 8, 16)


class LevelProbe(Protocol):
    """Measures something around each level (e.g. benchmarks/harness/engine_metrics.py)."""

    async def start(self) -> None: ...

    async def finish(self) -> dict[str, Any]: ...


def default_requests_per_level(concurrency: int) -> int:
    """Two requests per worker, and at least 4, so every level reaches steady state."""
    return max(4, 2 * concurrency)


@dataclass
class SweepResult:
    """A concurrency sweep of one backend."""

    backend: str
    input_len: int
    output_len: int
    levels: list[LevelResult] = field(default_factory=list)
    shared_prefix: dict[str, Any] | None = None  # filled by the CLI with --shared-prefix

    @property
    def failed(self) -> int:
        return sum(level.failed for level in self.levels)


async def sweep(
    backend: Backend,
    concurrencies: Sequence[int] = DEFAULT_CONCURRENCIES,
    input_len: int = 128,
    output_len: int = 128,
    requests_per_level: int | None = None,
    warmup: int = 1,
    seed: int = 0,
    on_level: Callable[[LevelResult], None] | None = None,
    probe: LevelProbe | None = None,
) -> SweepResult:
    """Warm up with `warmup` requests, then run one closed-loop level per concurrency.

    requests_per_level defaults to max(4, 2 * concurrency). Every request of the whole
    sweep (warm-up included) has its own numbered prompt, so no level profits from the
    prompt cache of another. `on_level` is called after each level (e.g. to print progress).
    `probe`, if given, is started before and finished after each level (not the warm-up);
    what it returns becomes the level's `engine` entry.
    """
    counts = [requests_per_level or default_requests_per_level(c) for c in concurrencies]
    prompts = make_prompts(
        warmup + sum(counts), input_len, seed=seed, max_tokens=output_len
    )
    result = SweepResult(backend=backend.name, input_len=input_len, output_len=output_len)
    if warmup > 0:
        await run_level(backend, prompts[:warmup], 1, warmup)
    offset = warmup
    for concurrency, count in zip(concurrencies, counts, strict=True):
        if probe is not None:
            await probe.start()
        level = await run_level(backend, prompts[offset : offset + count], concurrency, count)
        if probe is not None:
            level.engine = await probe.finish()
        offset += count
        result.levels.append(level)
        if on_level is not None:
            on_level(level)
    return result


async def shared_prefix(
    backend: Backend,
    prefix_len: int = 1000,
    tail_len: int = 32,
    output_len: int = 16,
    n: int = 4,
    seed: int | None = None,
) -> dict[str, Any]:
    """Send `n` sequential requests sharing a `prefix_len`-word prefix, each with a unique tail.

    With prompt caching the first (cold) TTFT is much larger than the later ones. The
    prefix is random per call (seed=None) so an earlier run cannot have warmed the cache.
    Returns TTFTs in ms and ratio = first / mean(later); TTFTs are None for failed requests.
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    if seed is None:
        seed = random.SystemRandom().randrange(2**32)
    prompts = make_prompts(
        n, prefix_len + tail_len, shared_prefix_len=prefix_len, seed=seed, max_tokens=output_len
    )
    level = await run_level(backend, prompts, concurrency=1, num_requests=n)
    ttfts = [(r.ttft * 1000.0 if r.ok and r.ttft is not None else None) for r in level.records]
    first = ttfts[0]
    later = [t for t in ttfts[1:] if t is not None]
    later_mean = sum(later) / len(later) if later else None
    ratio = first / later_mean if first is not None and later_mean else None
    return {
        "backend": backend.name,
        "prefix_len": prefix_len,
        "tail_len": tail_len,
        "output_len": output_len,
        "n": n,
        "failed": level.failed,
        "errors": level.errors,
        "ttft_ms": ttfts,
        "first_ttft_ms": first,
        "later_ttft_mean_ms": later_mean,
        "ratio": ratio,
    }
