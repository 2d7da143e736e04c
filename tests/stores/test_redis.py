"""Redis only: key namespacing and the PEXPIRE backstop behind the store's own expiry."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from lmserve.stores import (
    ResponseRecord, Retention, RetentionPolicy, StreamRetention, open_store,
)
from tests.stores.conftest import FakeClock


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[Redis]:
    redis = Redis.from_url(redis_url, decode_responses=True)
    yield redis
    await redis.aclose()


async def test_every_key_stays_under_the_prefix(redis_url: str, client: Redis) -> None:
    # Other tests share this redis-server (rate counters, cluster leases): only the keys this
    # store makes are checked.
    before = set(await client.keys("*"))
    async with await open_store(redis_url, prefix="tenant-a:") as store:
        await store.streams.create("s")
        await store.streams.append("s", "delta", "x")
        assert await store.streams.wait("s", 0, timeout=1) is True
        await store.responses.put(ResponseRecord("resp_1", 0.0, "m", [], {"output": []}))
        await store.sessions.create("sess", model="m")
        await store.sessions.append("sess", [{"role": "user", "content": "hi"}])
    keys = [key for key in await client.keys("*") if key not in before]
    assert all(key.startswith("tenant-a:") for key in keys), keys
    ours = [key for key in keys if key.startswith("tenant-a:")]
    assert sorted(ours) == sorted([
        "tenant-a:seq", "tenant-a:stream:s", "tenant-a:frames:s", "tenant-a:streams",
        "tenant-a:streams:expiry", "tenant-a:response:resp_1", "tenant-a:responses",
        "tenant-a:responses:expiry", "tenant-a:session:sess", "tenant-a:messages:sess",
        "tenant-a:sessions"])


async def test_items_carry_a_redis_ttl_that_matches_the_retention(redis_url: str,
                                                                 client: Redis) -> None:
    policy = RetentionPolicy(responses=Retention(ttl=500), sessions=Retention(ttl=400),
                             streams=StreamRetention(ttl=60, max_open_age=300))
    async with await open_store(redis_url, prefix="ttl:", retention=policy,
                                clock=FakeClock()) as store:
        await store.streams.create("s")
        await store.streams.append("s", "delta", "x")
        assert 200_000 < await client.pttl("ttl:stream:s") <= 300_000
        assert 200_000 < await client.pttl("ttl:frames:s") <= 300_000
        await store.streams.finish("s")
        assert 0 < await client.pttl("ttl:stream:s") <= 60_000
        assert 0 < await client.pttl("ttl:frames:s") <= 60_000
        await store.responses.put(ResponseRecord("resp_1", 0.0, "m", [], {"output": []}))
        assert 400_000 < await client.pttl("ttl:response:resp_1") <= 500_000
        await store.sessions.create("sess", model="m")
        await store.sessions.append("sess", [{"role": "user", "content": "hi"}])
        assert 300_000 < await client.pttl("ttl:session:sess") <= 400_000
        assert 300_000 < await client.pttl("ttl:messages:sess") <= 400_000
