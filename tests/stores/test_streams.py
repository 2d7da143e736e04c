"""Resumable stream frames, the same tests on every backend."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from lmserve.stores import (
    ConflictError, Frame, NotFoundError, RetentionPolicy, Store, StreamRetention, StreamState,
)
from tests.stores.conftest import FakeClock, OpenStore

GUARD = 20.0  # generous limit on awaits that must finish; never a timing assertion


async def started(store: Store, stream_id: str = "s", frames: int = 0) -> list[int]:
    await store.streams.create(stream_id, {"model": "m", "n": 1})
    return [await store.streams.append(stream_id, "delta", f"frame {i}")
            for i in range(1, frames + 1)]


async def collect(store: Store, stream_id: str = "s", after: int = 0) -> list[Frame]:
    return [frame async for frame in store.streams.follow(stream_id, after) if frame is not None]


def expected(first: int, last: int) -> list[Frame]:
    return [Frame(i, "delta", f"frame {i}") for i in range(first, last + 1)]


async def test_frames_are_numbered_from_one_and_info_tracks_them(store: Store,
                                                                  clock: FakeClock) -> None:
    assert await started(store, frames=5) == [1, 2, 3, 4, 5]
    info = await store.streams.get("s")
    assert info is not None
    assert (info.state, info.last_id, info.meta) == (StreamState.OPEN, 5, {"model": "m", "n": 1})
    assert (info.created_at, info.finished_at, info.finished) == (clock.now, None, False)


@pytest.mark.parametrize("after", [0, 1, 3, 4, 5, 9])
async def test_read_returns_exactly_the_frames_after_a_position(store: Store, after: int) -> None:
    await started(store, frames=5)
    assert await store.streams.read("s", after) == expected(after + 1, 5)


async def test_read_with_a_limit_pages_through_without_gaps(store: Store) -> None:
    await started(store, frames=7)
    seen: list[Frame] = []
    while page := await store.streams.read("s", seen[-1].id if seen else 0, limit=3):
        seen += page
    assert seen == expected(1, 7)


async def test_frame_data_round_trips_verbatim(store: Store) -> None:
    await store.streams.create("s")
    data = 'line one\nline two: "quoted" \u00e9\u4e16\U0001f600 \\ trailing '
    await store.streams.append("s", "block.delta", data)
    assert await store.streams.read("s") == [Frame(1, "block.delta", data)]


async def test_follow_resumes_a_finished_stream_at_several_positions(store: Store) -> None:
    await started(store, frames=6)
    await store.streams.finish("s")
    for after in (0, 2, 5, 6):
        assert await collect(store, after=after) == expected(after + 1, 6)


async def test_two_live_followers_each_receive_every_frame(store: Store) -> None:
    await started(store)
    followers = [asyncio.create_task(collect(store)) for _ in range(2)]
    await asyncio.sleep(0)
    for i in range(1, 31):
        await store.streams.append("s", "delta", f"frame {i}")
        if i % 5 == 0:
            await asyncio.sleep(0.01)  # let the followers catch up part of the way
    await store.streams.finish("s")
    results = await asyncio.wait_for(asyncio.gather(*followers), GUARD)
    assert results == [expected(1, 30), expected(1, 30)]


async def test_a_reader_that_reconnects_gets_nothing_twice_and_nothing_lost(store: Store) -> None:
    await started(store, frames=3)
    first_visit: list[Frame] = []
    async for frame in store.streams.follow("s"):
        assert frame is not None
        first_visit.append(frame)
        if frame.id == 2:
            break  # the client disconnects after frame 2 (its Last-Event-ID)
    for i in range(4, 9):
        await store.streams.append("s", "delta", f"frame {i}")
    await store.streams.finish("s")
    second_visit = await collect(store, after=first_visit[-1].id)
    assert first_visit + second_visit == expected(1, 8)


WAKERS: dict[str, Callable[[Store], Awaitable[object]]] = {
    "append": lambda store: store.streams.append("s", "delta", "frame 2"),
    "finish": lambda store: store.streams.finish("s", StreamState.CANCELLED),
    "delete": lambda store: store.streams.delete("s"),
}


@pytest.mark.parametrize("wake", WAKERS)
async def test_wait_wakes_on_append_finish_and_delete(store: Store, wake: str) -> None:
    await started(store, frames=1)
    waiter = asyncio.create_task(store.streams.wait("s", 1, timeout=None))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    await WAKERS[wake](store)
    assert await asyncio.wait_for(waiter, GUARD) is True


async def test_wait_returns_at_once_when_there_is_news(store: Store) -> None:
    await started(store, frames=2)
    assert await store.streams.wait("s", 1, timeout=GUARD) is True
    assert await store.streams.wait("unknown", 0, timeout=GUARD) is True


async def test_wait_times_out_with_false(store: Store) -> None:
    await started(store, frames=2)
    assert await store.streams.wait("s", 2, timeout=0.05) is False


async def test_follow_yields_heartbeats_while_idle(store: Store) -> None:
    await started(store)
    follower = store.streams.follow("s", heartbeat=0.02)
    assert await asyncio.wait_for(anext(follower), GUARD) is None
    await store.streams.append("s", "delta", "frame 1")
    await store.streams.finish("s")
    rest = [item async for item in follower]
    assert [item for item in rest if item is not None] == expected(1, 1)


async def test_create_append_and_finish_refuse_what_does_not_fit(store: Store) -> None:
    await started(store)
    with pytest.raises(ConflictError):
        await store.streams.create("s")
    with pytest.raises(NotFoundError):
        await store.streams.append("nope", "delta", "x")
    with pytest.raises(NotFoundError):
        await store.streams.finish("nope")
    assert await store.streams.finish("s", StreamState.FAILED) is True
    assert await store.streams.finish("s") is False  # the first state wins
    with pytest.raises(ConflictError):
        await store.streams.append("s", "delta", "late")
    info = await store.streams.get("s")
    assert info is not None and info.state is StreamState.FAILED and info.finished


async def test_unknown_stream_reads_empty_and_gets_none(store: Store) -> None:
    assert await store.streams.get("nope") is None
    assert await store.streams.read("nope") == []
    assert await collect(store, "nope") == []


async def test_delete_drops_the_stream_and_its_frames(store: Store) -> None:
    await started(store, frames=2)
    assert await store.streams.delete("s") is True
    assert await store.streams.get("s") is None and await store.streams.read("s") == []
    assert await store.streams.delete("s") is False


def stream_policy(**kwargs: Any) -> RetentionPolicy:
    return RetentionPolicy(streams=StreamRetention(**kwargs))


async def test_finished_stream_is_kept_for_the_ttl_then_expires(open_test_store: OpenStore,
                                                                 clock: FakeClock) -> None:
    store = await open_test_store(stream_policy(ttl=120, max_open_age=None))
    await started(store, frames=3)
    clock.advance(10_000)  # an open stream without max_open_age never expires
    await store.streams.finish("s")
    clock.advance(119)
    assert await store.streams.read("s") == expected(1, 3)
    info = await store.streams.get("s")
    assert info is not None and info.finished_at == clock.now - 119
    clock.advance(2)
    assert await store.streams.get("s") is None
    assert await store.streams.read("s") == []
    await store.streams.create("s")  # the id is free again


async def test_unfinished_stream_expires_after_max_open_age(open_test_store: OpenStore,
                                                            clock: FakeClock) -> None:
    store = await open_test_store(stream_policy(ttl=60, max_open_age=300))
    await started(store, frames=1)
    clock.advance(299)
    assert await store.streams.append("s", "delta", "frame 2") == 2
    clock.advance(2)
    assert await store.streams.get("s") is None
    with pytest.raises(NotFoundError):
        await store.streams.append("s", "delta", "frame 3")


async def test_purge_removes_expired_streams(open_test_store: OpenStore, clock: FakeClock) -> None:
    store = await open_test_store(stream_policy(ttl=60))
    for name in ("a", "b", "c"):
        await started(store, name, frames=1)
        await store.streams.finish(name)
    await started(store, "open", frames=1)
    clock.advance(61)
    assert await store.purge() == 3
    assert await store.streams.get("open") is not None


async def test_stream_cap_evicts_the_oldest(open_test_store: OpenStore) -> None:
    store = await open_test_store(stream_policy(ttl=60, max_entries=3))
    for i in range(5):
        await started(store, f"s{i}", frames=1)
    present = [await store.streams.get(f"s{i}") is not None for i in range(5)]
    assert present == [False, False, True, True, True]
    assert await store.streams.read("s0") == []


async def test_the_poll_wakes_a_waiter_whose_stream_expired(open_test_store: OpenStore,
                                                            clock: FakeClock) -> None:
    store = await open_test_store(stream_policy(max_open_age=300), poll_interval=0.02)
    await started(store, frames=1)
    waiter = asyncio.create_task(store.streams.wait("s", 1, timeout=None))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    clock.advance(301)  # nothing signals an expiry; the poll notices it
    assert await asyncio.wait_for(waiter, GUARD) is True
    assert await store.streams.get("s") is None
