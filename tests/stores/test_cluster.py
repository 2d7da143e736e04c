"""What replicas sharing a real redis-server tell each other (stores/cluster.py): messages to
one replica and to all, leases, claims. The single-process Cluster for memory and SQLite."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from redis.asyncio import Redis

from lmserve.stores.cluster import Cluster, RedisCluster


class Inbox:
    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.changed = asyncio.Event()

    async def __call__(self, message: dict[str, Any]) -> None:
        self.messages.append(message)
        self.changed.set()

    async def next(self) -> dict[str, Any]:
        await asyncio.wait_for(self.changed.wait(), 20)
        self.changed.clear()
        return self.messages[-1]


async def test_send_reaches_one_replica_and_broadcast_every_other(redis_url: str) -> None:
    prefix = f"test-{uuid.uuid4().hex}:"
    redis = Redis.from_url(redis_url, decode_responses=True)
    a, b = RedisCluster(redis, prefix), RedisCluster(redis, prefix)
    inbox_a, inbox_b = Inbox(), Inbox()
    try:
        await a.join("a", inbox_a)
        await b.join("b", inbox_b)
        assert await a.send("b", {"kind": "cancel_stream", "id": "s1"}) is True
        assert await inbox_b.next() == {"kind": "cancel_stream", "id": "s1"}
        assert await a.send("nobody", {"kind": "x"}) is False  # no replica listens there
        assert await a.broadcast({"kind": "sglang_abort", "rids": ["r"]}) == 1
        assert (await inbox_b.next())["rids"] == ["r"]
        assert inbox_a.messages == []  # its own broadcast does not come back to the sender
        assert await a.alive("b") is True and await a.alive("nobody") is False
        await b.leave()
        assert await a.alive("b") is False  # a clean stop drops the lease at once
        assert await a.send("b", {"kind": "x"}) is False
    finally:
        await a.leave()
        await b.leave()
        await redis.aclose()


async def test_a_lease_nobody_refreshes_runs_out(redis_url: str) -> None:
    prefix = f"test-{uuid.uuid4().hex}:"
    redis = Redis.from_url(redis_url, decode_responses=True)
    killed = RedisCluster(redis, prefix, lease_ttl=0.5, lease_refresh=3600)  # never refreshed
    try:
        await killed.join("k", Inbox())
        observer = RedisCluster(redis, prefix)
        assert await observer.alive("k") is True
        deadline = time.monotonic() + 30
        while await observer.alive("k"):
            assert time.monotonic() < deadline, "the lease never ran out"
            await asyncio.sleep(0.1)
    finally:
        await killed.leave()
        await redis.aclose()


async def test_one_replica_claims_a_name(redis_url: str) -> None:
    prefix = f"test-{uuid.uuid4().hex}:"
    redis = Redis.from_url(redis_url, decode_responses=True)
    a, b = RedisCluster(redis, prefix), RedisCluster(redis, prefix)
    a.instance, b.instance = "a", "b"
    try:
        assert await a.claim("orphan:s") is True
        assert await b.claim("orphan:s") is False
        assert await a.claim("orphan:t") is True
    finally:
        await redis.aclose()


async def test_the_single_process_cluster_delivers_only_to_itself() -> None:
    cluster, inbox = Cluster(), Inbox()
    await cluster.join("me", inbox)
    assert await cluster.send("me", {"kind": "k"}) is True and inbox.messages == [{"kind": "k"}]
    assert await cluster.send("other", {"kind": "k"}) is False
    assert await cluster.broadcast({"kind": "k"}) == 0
    assert await cluster.alive("me") is True and await cluster.alive("other") is None
    assert await cluster.claim("orphan:s") is True
