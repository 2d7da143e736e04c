"""Regression tests, without a model, for what the reliability suite found (issue 17)."""

from __future__ import annotations

import time

import pytest
from redis.asyncio import Redis

from benchmarks.reliability import free_port
from lmserve.core.errors import ErrorKind
from lmserve.stores import RetentionPolicy, StreamInfo, StreamState
from lmserve.stores.records import StoreUnavailable
from lmserve.stores.redis_store import RedisResponses, RedisSessions
from lmserve.stores.redis_streams import RedisStreams


async def test_redis_unreachable_is_store_unavailable_503() -> None:
    redis = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", decode_responses=True)
    policy = RetentionPolicy()
    try:
        for call in (RedisResponses(redis, "t:", policy.responses, time.time).get("resp_x"),
                     RedisSessions(redis, "t:", policy.sessions, time.time).recent(),
                     RedisStreams(redis, "t:", policy.streams, time.time).get("s")):
            with pytest.raises(StoreUnavailable) as caught:
                await call
            assert caught.value.kind is ErrorKind.UNAVAILABLE
            assert caught.value.kind.http_status == 503 and caught.value.retry_after
    finally:
        await redis.aclose()


def test_the_pubsub_listener_keeps_redis_errors_it_retries_on() -> None:
    # _listen catches redis-py's RedisError and resubscribes; were _relay translated, one
    # outage would end the listener (and the shutdown would fail on its exception).
    assert not hasattr(RedisStreams._relay, "__wrapped__")
    assert not hasattr(RedisStreams._listen, "__wrapped__")


async def test_an_open_stream_is_orphaned_only_when_its_producer_is_gone() -> None:
    from lmserve.dialects.native.producer import StreamProducers
    from lmserve.stores.cluster import Cluster

    producers = StreamProducers(lambda: None)  # type: ignore[arg-type, return-value]

    def info(owner: object) -> StreamInfo:
        return StreamInfo("s", StreamState.OPEN, {"model": "m", "owner": owner}, 0.0, None, 3)

    me = producers.owner
    assert await producers._orphaned(info(me))  # ours, but no producer task runs
    assert await producers._orphaned(info({**me, "instance": "old", "pid": 2**22 + 7}))  # dead
    assert await producers._orphaned(info({**me, "instance": "old"}))  # our pid, older process
    assert not await producers._orphaned(info({**me, "host": "elsewhere", "instance": "x"}))
    assert not await producers._orphaned(info({**me, "instance": "x", "pid": 1}))  # pid 1 lives
    assert not await producers._orphaned(StreamInfo("s", StreamState.OPEN, {"model": "m"}, 0.0,
                                                    None, 0))  # no owner recorded: cannot tell

    class Leases(Cluster):  # a store that keeps leases (Redis): they decide, not the host
        async def alive(self, instance: str) -> bool | None:
            return instance == "live"

    leased = StreamProducers(lambda: None, lambda: Leases())  # type: ignore[arg-type, return-value]
    elsewhere = {**me, "host": "elsewhere"}
    assert await leased._orphaned(info({**elsewhere, "instance": "gone"}))  # its lease ran out
    assert not await leased._orphaned(info({**elsewhere, "instance": "live"}))
