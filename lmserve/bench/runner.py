"""Closed-loop load generation: N workers, each sending its next request when one ends."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Sequence

from lmserve.bench.base import Backend, BenchRequest, Chunk
from lmserve.bench.stats import LevelResult, RequestRecord


async def _open_stream(backend: Backend, req: BenchRequest) -> AsyncIterator[Chunk]:
    stream: AsyncIterator[Chunk] | Awaitable[AsyncIterator[Chunk]] = backend.stream(req)
    if inspect.isawaitable(stream):  # `async def stream` that returns an iterator
        stream = await stream
    return stream


async def run_request(backend: Backend, req: BenchRequest) -> RequestRecord:
    """Send one request and time every chunk. Errors are recorded, never raised."""
    record = RequestRecord(start=time.perf_counter())
    stream: AsyncIterator[Chunk] | None = None
    try:
        stream = await _open_stream(backend, req)
        async for chunk in stream:
            record.on_chunk(chunk, time.perf_counter())
    except Exception as exc:  # noqa: BLE001 - any failure is one failed request
        record.finish(time.perf_counter(), error=f"{type(exc).__name__}: {exc}")
    else:
        record.finish(time.perf_counter())
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            try:
                await aclose()
            except Exception:  # noqa: BLE001 - the request's outcome is already recorded
                pass
    return record


async def run_level(
    backend: Backend,
    prompts: Sequence[BenchRequest],
    concurrency: int,
    num_requests: int,
) -> LevelResult:
    """Run `num_requests` requests with exactly `concurrency` closed-loop workers.

    Request i uses prompts[i % len(prompts)]; workers take the next index as soon as their
    previous request finishes. Throughputs are over the level's wall time.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    if num_requests < 0:
        raise ValueError("num_requests must be >= 0")
    if num_requests and not prompts:
        raise ValueError("no prompts")
    records: list[RequestRecord | None] = [None] * num_requests
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < num_requests:
            i = next_index
            next_index += 1  # no await between the check and the increment: no race
            records[i] = await run_request(backend, prompts[i % len(prompts)])

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, max(num_requests, 1)))))
    duration = time.perf_counter() - start
    done = [r for r in records if r is not None]
    return LevelResult.from_records(concurrency, done, duration)
