"""What the three Redis stores share: key names, expiry arguments, eviction and deletion."""

from __future__ import annotations

import functools
import inspect
import logging
import math
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from lmserve.stores.records import Clock, Retention, StoreUnavailable
from lmserve.stores.redis_scripts import DELETE, EVICT

log = logging.getLogger("lmserve.stores")
P = ParamSpec("P")
R = TypeVar("R")
C = TypeVar("C", bound=type)


def unavailable_when_down(cls: C) -> C:
    """The public coroutine methods of a Redis store class, and the abstract hooks its base
    class's methods call (SessionStore._recent), raise StoreUnavailable (503) when Redis cannot
    be reached, instead of redis-py's ConnectionError or TimeoutError (which reached clients
    as a 500). Private helpers keep redis-py's errors: the pub/sub listener handles them."""
    hooks = {name for base in cls.__mro__[1:] for name in getattr(base, "__abstractmethods__", ())}
    for name, method in list(vars(cls).items()):
        if inspect.iscoroutinefunction(method) and (not name.startswith("_") or name in hooks):
            setattr(cls, name, _unavailable_when_down(method))
    return cls


def _unavailable_when_down(method: Callable[P, Awaitable[R]]
                           ) -> Callable[P, Coroutine[Any, Any, R]]:
    @functools.wraps(method)
    async def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(*args, **kwargs)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            log.warning("the Redis store cannot be reached: %s", exc)
            raise StoreUnavailable("the store (Redis) cannot be reached; retry shortly") \
                from exc
    return guarded


def expiry_args(expires_at: float | None, now: float) -> list[str]:
    """The (expires_at, ttl in ms) script arguments; two empty strings mean no expiry."""
    if expires_at is None:
        return ["", ""]
    return [repr(expires_at), str(max(1, math.ceil((expires_at - now) * 1000)))]


def is_live(exists: Any, expires_at: float | None, now: float) -> bool:
    """An item is live when its key exists and its expiry (if any) is still ahead."""
    return bool(exists) and (expires_at is None or expires_at > now)


class RedisTable:
    """One kind of item: ids in an order set and an expiry set, data under item key prefixes."""

    def __init__(self, redis: Redis, prefix: str, kind: str, item_prefixes: tuple[str, ...],
                 retention: Retention, clock: Clock) -> None:
        self.redis = redis
        self.retention = retention
        self.clock = clock
        self.order = f"{prefix}{kind}s"
        self.expiry = f"{prefix}{kind}s:expiry"
        self.seq = f"{prefix}seq"
        self.prefixes = tuple(prefix + p for p in item_prefixes)
        self._evict = redis.register_script(EVICT)
        self._delete = redis.register_script(DELETE)

    def key(self, ident: str, part: int = 0) -> str:
        return self.prefixes[part] + ident

    async def evict(self, *, cap: bool) -> list[str]:
        """Drop expired items, and with cap=True also the oldest beyond max_entries."""
        limit = self.retention.max_entries if cap else None
        gone = await self._evict(keys=[self.order, self.expiry],
                                 args=[repr(self.clock()), "" if limit is None else limit,
                                       *self.prefixes])
        return list(gone)

    async def delete(self, ident: str) -> bool:
        was_live = await self._delete(keys=[self.key(ident), self.order, self.expiry],
                                      args=[ident, repr(self.clock()), *self.prefixes])
        return bool(was_live)

    async def fetch(self, ident: str, *commands: tuple[Any, ...]) -> list[Any] | None:
        """Run read commands (name, item key part, *args) on one item in one round trip, with
        its liveness check; None when the item is not live, else the commands' results."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.exists(self.key(ident))
            pipe.zscore(self.expiry, ident)
            for name, part, *args in commands:
                getattr(pipe, name)(self.key(ident, part), *args)
            exists, expires_at, *results = await pipe.execute()
        return results if is_live(exists, expires_at, self.clock()) else None
