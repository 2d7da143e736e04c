"""Rate limits shared through a real redis-server: two limiters (two replicas) count into the
same keys, and two app instances sharing the Redis store refuse together."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from redis.asyncio import Redis

from lmserve.core.quota import RateLimited
from lmserve.http.access import AccessSettings
from lmserve.http.app import StoreSettings, create_app
from lmserve.http.keys import KeyPolicy, KeyRing
from lmserve.http.limits import RateLimiter
from lmserve.models.registry import ModelRegistry
from lmserve.models.resolve import resolve
from lmserve.service import EngineSettings
from lmserve.stores.counters import RedisCounters
from tests.stores.conftest import FakeClock

MINUTE_START = 1_699_999_980.0  # a whole minute: windows do not roll over inside a test


async def test_two_replicas_share_requests_and_tokens(redis_url: str) -> None:
    clock = FakeClock(MINUTE_START + 5)
    prefix = f"test-{uuid.uuid4().hex}:"
    a = RateLimiter(RedisCounters(Redis.from_url(redis_url, decode_responses=True), prefix), clock)
    b = RateLimiter(RedisCounters(Redis.from_url(redis_url, decode_responses=True), prefix), clock)
    try:
        policy = KeyPolicy("ci", rpm=3, tpm=100)
        await a.admit(policy)
        await b.admit(policy)
        await a.admit(policy)
        with pytest.raises(RateLimited) as caught:
            await b.admit(policy)  # the third request was a's: b knows
        assert caught.value.dimension == "requests" and caught.value.retry_after == 55.0
        tokens = KeyPolicy("tok", tpm=100)
        await a.admit(tokens)
        charge = a.charger(tokens)
        assert charge is not None
        charge(150)
        await a.settle()  # Redis counts in the background
        with pytest.raises(RateLimited) as caught:
            await b.admit(tokens)
        assert caught.value.dimension == "tokens"
        clock.advance(60)  # the next minute: both admit again
        await b.admit(policy)
        await b.admit(tokens)
    finally:
        await a.close()
        await b.close()


def _app(redis_url: str, ring: KeyRing, data_dir: Path) -> TestClient:
    registry = ModelRegistry()
    registry.add("tiny", resolve("smollm2").path, EngineSettings())
    app = create_app(registry, load_on_startup=False, access=AccessSettings(keys=ring),
                     store=StoreSettings(url=redis_url, data_dir=data_dir))
    app.state.access.limiter.clock = FakeClock(MINUTE_START + 1)
    return TestClient(app)


def test_two_app_instances_sharing_redis_refuse_together(redis_url: str,
                                                         tmp_path: Path) -> None:
    name = f"ci-{uuid.uuid4().hex[:8]}"  # a name of its own in the shared server
    keys = tmp_path / "keys"
    keys.write_text(f"sk-shared name={name} rpm=2\n", encoding="utf-8")
    ring = KeyRing(key_file=keys)
    auth = {"Authorization": "Bearer sk-shared"}
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    with _app(redis_url, ring, tmp_path) as one, _app(redis_url, ring, tmp_path) as two:
        assert one.post("/v1/chat/completions", json=body, headers=auth).status_code == 503
        assert two.post("/v1/chat/completions", json=body, headers=auth).status_code == 503
        r = one.post("/v1/chat/completions", json=body, headers=auth)
        assert r.status_code == 429 and r.headers["retry-after"] == "59"
        r = two.post("/api/chat", json=body, headers=auth)
        assert r.status_code == 429 and "2 requests a minute" in r.json()["error"]
