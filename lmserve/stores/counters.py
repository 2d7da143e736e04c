"""Windowed counters for rate limits: in this process (memory), or in Redis, where every
replica sharing the server counts into the same keys.

A counter is a key whose value expires `ttl` seconds after it was first counted into; the rate
limiter (lmserve.http.limits) names one per key name, minute and dimension. `admit` checks a
request's two counters and counts the request in one step (a Lua script in Redis), so two
replicas never both admit the last request of a minute."""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import cast

from redis.asyncio import Redis
from redis.exceptions import RedisError

from lmserve.stores.records import Clock

ADMITTED, OVER_REQUESTS, OVER_TOKENS = 0, 1, 2

# KEYS: requests counter, tokens counter. ARGV: requests limit, tokens limit (0: none), ttl s.
# Returns the verdict: 0 admitted (and counted), 1 over the requests, 2 over the tokens.
_ADMIT = """
local requests = tonumber(redis.call('GET', KEYS[1]) or '0')
local tokens = tonumber(redis.call('GET', KEYS[2]) or '0')
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
if rpm > 0 and requests >= rpm then return 1 end
if tpm > 0 and tokens >= tpm then return 2 end
if redis.call('INCR', KEYS[1]) == 1 then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
return 0
"""

# KEYS: the counter. ARGV: amount, ttl s.
_ADD = """
if redis.call('INCRBY', KEYS[1], ARGV[1]) == tonumber(ARGV[1]) then
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


class MemoryCounters:
    """Counters of this process only; `add` counts at once (no await)."""

    kind = "memory"

    def __init__(self, clock: Clock = time.time) -> None:
        self.clock = clock
        self._values: dict[str, tuple[int, float]] = {}  # key -> (value, expires at)

    def _get(self, key: str) -> int:
        value = self._values.get(key)
        if value is None or value[1] <= self.clock():
            return 0
        return value[0]

    def _add(self, key: str, amount: int, ttl: int) -> None:
        now = self.clock()
        current = self._values.get(key)
        if current is None or current[1] <= now:
            self._prune(now)
            self._values[key] = (amount, now + ttl)
        else:
            self._values[key] = (current[0] + amount, current[1])

    def _prune(self, now: float) -> None:
        for key in [k for k, (_, at) in self._values.items() if at <= now]:
            del self._values[key]

    async def admit(self, requests_key: str, tokens_key: str, rpm: int, tpm: int,
                    ttl: int) -> int:
        if rpm and self._get(requests_key) >= rpm:
            return OVER_REQUESTS
        if tpm and self._get(tokens_key) >= tpm:
            return OVER_TOKENS
        self._add(requests_key, 1, ttl)
        return ADMITTED

    def add(self, key: str, amount: int, ttl: int) -> Awaitable[None] | None:
        self._add(key, amount, ttl)
        return None

    def value(self, key: str) -> int:
        return self._get(key)

    async def close(self) -> None:
        pass


class RedisCounters:
    """Counters in Redis under `prefix`, shared by every replica that uses the same server.
    The window a counter belongs to is in its key, so the replicas' clocks must agree to
    within a second or so (NTP)."""

    kind = "redis"

    def __init__(self, client: Redis, prefix: str = "lmserve:rate:") -> None:
        self.client = client
        self.prefix = prefix
        self._admit = client.register_script(_ADMIT)
        self._add_script = client.register_script(_ADD)

    async def admit(self, requests_key: str, tokens_key: str, rpm: int, tpm: int,
                    ttl: int) -> int:
        verdict = await self._admit(keys=[self.prefix + requests_key, self.prefix + tokens_key],
                                    args=[rpm, tpm, ttl])
        return int(cast("int", verdict))

    def add(self, key: str, amount: int, ttl: int) -> Awaitable[None] | None:
        return self._add(key, amount, ttl)

    async def _add(self, key: str, amount: int, ttl: int) -> None:
        await self._add_script(keys=[self.prefix + key], args=[amount, ttl])

    async def value(self, key: str) -> int:
        raw = await self.client.get(self.prefix + key)
        return int(raw or 0)

    async def close(self) -> None:
        await self.client.aclose()


async def open_counters(url: str | None, *, prefix: str = "lmserve:",
                        clock: Clock = time.time) -> MemoryCounters | RedisCounters:
    """Redis counters when the store is Redis (limits hold across replicas), else memory."""
    if url is None or not url.startswith(("redis://", "rediss://", "unix://")):
        return MemoryCounters(clock)
    client = Redis.from_url(url, decode_responses=True)
    try:
        await client.ping()
    except RedisError as exc:
        await client.aclose()
        raise ConnectionError(f"cannot reach Redis for the rate limits: {exc}") from exc
    return RedisCounters(client, prefix + "rate:")
