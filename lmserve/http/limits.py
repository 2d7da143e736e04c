"""Per-key rate limits: requests and tokens a minute, over fixed windows.

Windows are fixed, aligned on the clock's minutes (12:00:00-12:00:59, ...), and counted per key
*name* (keys that share a name share their limits). A request counts when it is admitted; its
tokens count as they become known: the prompt's when the backend admits the generation, the
output's when each choice ends. A key over its requests, or whose tokens of the minute have
reached its limit, is refused with 429 and `Retry-After` (the seconds until the minute ends)
in the caller's dialect. A request admitted just under the tokens limit may take the minute
past it: the limit refuses the next requests, it does not cut a running one. At a window's
edge a key can use up to twice its limit within a few seconds, the price of windows that one
Redis key each can count across replicas."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Protocol

from lmserve.core.quota import Dimension, RateLimited
from lmserve.http.keys import KeyPolicy

log = logging.getLogger("lmserve.limits")

WINDOW = 60  # seconds
_TTL = 2 * WINDOW  # a counter outlives its window (clock skew between replicas)
_VERDICTS: dict[int, Dimension] = {1: "requests", 2: "tokens"}


class Counters(Protocol):
    """lmserve.stores.counters: MemoryCounters or RedisCounters."""

    kind: str

    async def admit(self, requests_key: str, tokens_key: str, rpm: int, tpm: int,
                    ttl: int) -> int: ...

    def add(self, key: str, amount: int, ttl: int) -> Awaitable[None] | None: ...

    async def close(self) -> None: ...


class RateLimiter:
    def __init__(self, counters: Counters, clock: Callable[[], float] = time.time) -> None:
        self.counters = counters
        self.clock = clock
        self.refused: Counter[tuple[str, str]] = Counter()  # (key name, dimension) -> count
        self._pending: set[asyncio.Task[None]] = set()

    def _window(self) -> tuple[int, float]:
        """The current window's number and the seconds left in it."""
        now = self.clock()
        index = int(now // WINDOW)
        return index, (index + 1) * WINDOW - now

    @staticmethod
    def _keys(name: str, index: int) -> tuple[str, str]:
        return f"{name}:{index}:requests", f"{name}:{index}:tokens"

    async def admit(self, policy: KeyPolicy) -> None:
        """Count one request of this key, or raise RateLimited (429)."""
        if policy.rpm is None and policy.tpm is None:
            return
        index, left = self._window()
        requests_key, tokens_key = self._keys(policy.name, index)
        verdict = await self.counters.admit(requests_key, tokens_key, policy.rpm or 0,
                                            policy.tpm or 0, _TTL)
        if verdict == 0:
            return
        dimension = _VERDICTS[verdict]
        self.refused[(policy.name, dimension)] += 1
        limit = policy.rpm if dimension == "requests" else policy.tpm
        wait = max(1, int(left + 0.999))
        raise RateLimited(f"rate limit reached for the key '{policy.name}': {limit} {dimension} "
                          f"a minute; retry in {wait} s", dimension, float(wait))

    def charger(self, policy: KeyPolicy) -> Callable[[int], None] | None:
        """The function that charges this key's tokens (None: it has no tokens limit)."""
        if policy.tpm is None:
            return None
        return lambda tokens: self.charge(policy.name, tokens)

    def charge(self, name: str, tokens: int) -> None:
        """Count tokens into the key's current window (in Redis: in the background)."""
        index, _ = self._window()
        pending = self.counters.add(self._keys(name, index)[1], tokens, _TTL)
        if pending is None:
            return
        task = asyncio.ensure_future(pending)
        self._pending.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("could not count tokens for a rate limit: %s", task.exception())

    async def settle(self) -> None:
        """Wait for the token counts still being written (tests, shutdown)."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    async def close(self) -> None:
        await self.settle()
        await self.counters.close()
