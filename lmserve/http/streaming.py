"""Helpers the dialect routes share: start several generations at once, iterate them together,
and write Server-Sent Events frames."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

from lmserve.core.backend import BackendGeneration, ChoiceStep, ModelBackend, PreparedPrompt
from lmserve.core.request import GenerationRequest

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
TRUNCATED_HEADER = "X-Lmserve-Truncated-Messages"


def truncation_headers(dropped: int) -> dict[str, str]:
    """Reports the oldest messages dropped to fit the context (chat.overflow); none: no header."""
    return {TRUNCATED_HEADER: str(dropped)} if dropped else {}


def sse(data: dict[str, Any] | str, event: str | None = None) -> bytes:
    """One SSE frame; a dict is sent as compact JSON, a string as it is (e.g. "[DONE]")."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False,
                                                            separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


def start_all(backend: ModelBackend,
              jobs: Sequence[tuple[GenerationRequest, PreparedPrompt]], *,
              parse: bool | None = None) -> list[BackendGeneration]:
    """Submit every job, or none: a refusal part-way closes (aborts) the ones already started."""
    started: list[BackendGeneration] = []
    try:
        for request, prepared in jobs:
            started.append(backend.start(request, prepared, parse=parse))
    except BaseException:
        for generation in started:
            generation.close()
        raise
    return started


async def accepted(generations: Sequence[BackendGeneration]) -> None:
    """Wait until every backend accepted its request (an upstream answered with its status),
    so that a refusal is a real status even for a stream; a refusal closes them all."""
    try:
        for generation in generations:
            await generation.ready()
    except BaseException:
        for generation in generations:
            generation.close()
        raise


async def merge(generations: list[BackendGeneration]
                ) -> AsyncIterator[tuple[int, list[ChoiceStep]]]:
    """Iterate several submitted generations at once, yielding (index, step outputs)."""
    if len(generations) == 1:
        async for outs in generations[0]:
            yield 0, outs
        return
    queue: asyncio.Queue[tuple[int, list[ChoiceStep]] | Exception | None] = asyncio.Queue()

    async def pump(index: int, generation: BackendGeneration) -> None:
        try:
            async for outs in generation:
                queue.put_nowait((index, outs))
        except Exception as exc:  # re-raised in the consumer, not lost with the task
            queue.put_nowait(exc)
            return
        queue.put_nowait(None)

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(generations)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        for generation in generations:
            generation.close()
