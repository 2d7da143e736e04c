"""The asyncio bridge over a real engine thread, with the fake runner."""

from __future__ import annotations

import asyncio
import gc

import pytest

from lmserve.core.errors import ErrorKind, LmserveError
from lmserve.core.request import SamplingParams
from lmserve.engine.client import EngineClient
from lmserve.engine.scheduler import EngineCore
from lmserve.engine.sequence import EngineRequest
from tests.unit.fakes import FakeRunner, reference_output


def make_client(*, max_running: int = 2, max_queue: int = 1) -> EngineClient:
    runner = FakeRunner()
    client = EngineClient(
        lambda sink: EngineCore(runner, n_slots=4, max_running=max_running, step_tokens=64,
                                sink=sink),
        loop=asyncio.get_running_loop(), max_queue=max_queue)
    client.start()
    return client


def request(max_tokens: int) -> EngineRequest:
    return EngineRequest(prompt_tokens=[3, 4, 5], sampling=SamplingParams(temperature=0),
                         max_tokens=max_tokens)


async def collect(client: EngineClient, req: EngineRequest) -> list[int]:
    return [t async for outs in client.submit(req) for o in outs for t in o.token_ids]


async def assert_idle_soon(client: EngineClient) -> None:
    """Within ~2 s nothing runs on the engine and no generation is counted active."""
    for _ in range(200):
        if not client.core.running and client.active == 0:
            break
        await asyncio.sleep(0.01)
    assert not client.core.running and client.active == 0


async def test_generations_stream_through_the_engine_thread():
    client = make_client()
    try:
        results = await asyncio.gather(*(collect(client, request(6)) for _ in range(3)))
        assert results == [reference_output([3, 4, 5], 6)] * 3
        assert client.active == 0
    finally:
        client.stop()


async def test_capacity_beyond_queue_is_refused_with_retry_after():
    client = make_client(max_running=1, max_queue=1)
    try:
        first = client.submit(request(10_000))
        second = client.submit(request(10_000))
        with pytest.raises(LmserveError) as exc:
            client.submit(request(1))
        assert exc.value.kind is ErrorKind.OVERLOADED and exc.value.retry_after
        first.close()
        second.close()
        assert client.active == 0
        assert await collect(client, request(2)) == reference_output([3, 4, 5], 2)
    finally:
        client.stop()


async def test_a_generation_dropped_before_iterating_is_aborted():
    client = make_client()
    try:
        gen = client.submit(request(100_000))
        del gen
        gc.collect()
        await assert_idle_soon(client)
    finally:
        client.stop()


async def test_leaving_early_aborts_the_sequence():
    client = make_client()
    try:
        gen = client.submit(request(100_000))
        async for _ in gen:
            break
        await assert_idle_soon(client)
    finally:
        client.stop()
