"""Access control as the app shell installs it: the key ring, the rate limiter and its
counters (Redis when the store is Redis, so limits hold across replicas), the body limit,
the server's token limits and CORS."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from prometheus_client.core import CounterMetricFamily, Metric
from starlette.middleware.cors import CORSMiddleware

from lmserve.core.quota import TokenLimits
from lmserve.http.keys import KeyRing, KeyTable
from lmserve.http.limits import Counters, RateLimiter
from lmserve.http.middleware import Access, ApiKeyMiddleware, BodyLimitMiddleware
from lmserve.stores.counters import MemoryCounters, RedisCounters, open_counters

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024  # room for an image of 20 MiB sent as base64


@dataclass
class AccessSettings:
    keys: KeyRing | None = None  # None: the plain keys build_app was given
    max_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES  # None: no limit
    limits: TokenLimits = TokenLimits()  # every request's, whatever its key
    cors_origins: tuple[str, ...] = ()  # empty: no CORS headers at all


class LazyCounters:
    """The rate limit counters, opened on first use (a Redis connection only when a key has
    a limit) in the store's kind: Redis for a Redis store, else this process's memory."""

    def __init__(self, store_url: str | None) -> None:
        self.store_url = store_url
        self.kind = "redis" if _is_redis(store_url) else "memory"
        self._counters: MemoryCounters | RedisCounters | None = None
        self._lock = asyncio.Lock()

    async def _open(self) -> MemoryCounters | RedisCounters:
        if self._counters is None:
            async with self._lock:
                if self._counters is None:
                    self._counters = await open_counters(self.store_url)
        return self._counters

    async def admit(self, requests_key: str, tokens_key: str, rpm: int, tpm: int,
                    ttl: int) -> int:
        return await (await self._open()).admit(requests_key, tokens_key, rpm, tpm, ttl)

    def add(self, key: str, amount: int, ttl: int) -> Awaitable[None] | None:
        if self._counters is not None:
            return self._counters.add(key, amount, ttl)
        return self._add_later(key, amount, ttl)

    async def _add_later(self, key: str, amount: int, ttl: int) -> None:
        result = (await self._open()).add(key, amount, ttl)
        if result is not None:
            await result

    async def close(self) -> None:
        if self._counters is not None:
            await self._counters.close()
            self._counters = None


def _is_redis(url: str | None) -> bool:
    return bool(url) and str(url).startswith(("redis://", "rediss://", "unix://"))


class AccessControl:
    """What build_app installs; `app.state.access` holds it."""

    def __init__(self, settings: AccessSettings, *, plain_keys: tuple[str, ...] = (),
                 store_url: str | None = None, counters: Counters | None = None) -> None:
        self.settings = settings
        self.ring = settings.keys or KeyRing(plain_keys)
        self.limiter = RateLimiter(counters or LazyCounters(store_url))

    @property
    def table(self) -> KeyTable:
        return self.ring.table

    def install(self, app: FastAPI) -> None:
        """The key middleware, then (outside it) the body limit and CORS."""
        app.add_middleware(ApiKeyMiddleware, keys=lambda: self.ring.table,
                           access=Access(self.limiter, self.settings.limits))
        if self.settings.max_body_bytes is not None:
            app.add_middleware(BodyLimitMiddleware, limit=self.settings.max_body_bytes)
        if self.settings.cors_origins:
            app.add_middleware(CORSMiddleware, **cors_options(self.settings.cors_origins))

    async def close(self) -> None:
        await self.limiter.close()

    def collector(self) -> RateLimitCollector:
        return RateLimitCollector(self.limiter)


class RateLimitCollector:
    """lmserve_rate_limited_requests_total{key, limit}: requests refused with 429 by a key's
    rate limit, labelled by the key's name (never the key) and the limit (requests, tokens)."""

    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("lmserve_rate_limited_requests", "Requests refused (429) "
                                     "by their key's rate limit", labels=["key", "limit"])
        for (name, dimension), count in sorted(self.limiter.refused.items()):
            family.add_metric([name, dimension], count)
        yield family


def cors_options(origins: tuple[str, ...]) -> dict[str, Any]:
    """Starlette's CORSMiddleware for these origins: any method and header (the API key
    travels in Authorization or x-api-key), no cookies, Retry-After readable by the page."""
    return {"allow_origins": list(origins), "allow_methods": ["*"], "allow_headers": ["*"],
            "allow_credentials": False, "expose_headers": ["Retry-After"], "max_age": 600}
