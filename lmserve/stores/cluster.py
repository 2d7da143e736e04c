"""What the replicas sharing a store tell each other: who is alive, and control messages.

Each server process joins with its instance id (the one its native stream producers write
into each stream's meta) and a handler for the messages sent to it:

  - `send(instance, message)` delivers to one replica (the owner of a native stream: its
    cancel); True when that replica was listening.
  - `broadcast(message)` delivers to every other replica (SGLang's /abort_request of a rid
    that may run anywhere).
  - `alive(instance)`: False once a replica's lease ran out (killed, or cut off from the
    store for longer than the lease), True while it holds one, None when the backend cannot
    tell (memory and SQLite: the producers fall back to their host and process checks).

With memory or SQLite there is one process per store (SQLite may be shared by processes of one
host, which the pid check covers), so `LocalCluster` delivers only to itself. `RedisCluster`
keeps a lease key per replica, refreshed in the background, and a pub/sub channel per replica
plus one for everyone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from lmserve.stores.records import JSON
from lmserve.stores.redis_table import unavailable_when_down

log = logging.getLogger("lmserve.stores")

Handler = Callable[[JSON], Awaitable[None]]
LEASE_TTL = 15.0  # seconds a replica counts as alive after its last lease refresh
LEASE_REFRESH = 3.0  # seconds between refreshes (several chances before the lease runs out)
_RETRY_DELAY = 1.0


class Cluster:
    """One process's membership; the base class is the single-process cluster."""

    kind = "local"

    def __init__(self) -> None:
        self.instance: str | None = None
        self._handler: Handler | None = None

    async def join(self, instance: str, handler: Handler) -> None:
        self.instance, self._handler = instance, handler

    async def leave(self) -> None:
        self._handler = None

    async def send(self, instance: str, message: JSON) -> bool:
        if instance != self.instance or self._handler is None:
            return False
        await self._deliver(message)
        return True

    async def broadcast(self, message: JSON) -> int:
        """Deliver to every other replica; how many were listening."""
        return 0

    async def alive(self, instance: str) -> bool | None:
        return True if instance == self.instance else None

    async def claim(self, name: str, ttl: float = 60.0) -> bool:
        """True for the one replica that claims `name` first (for `ttl` seconds): who ends
        an orphaned stream. One process: always True (the caller guards against itself)."""
        return True

    async def _deliver(self, message: JSON) -> None:
        if self._handler is None:
            return
        try:
            await self._handler(message)
        except Exception:  # a handler's bug must not stop the listener
            log.exception("cluster message %r failed", message)


LocalCluster = Cluster


@unavailable_when_down
class RedisCluster(Cluster):
    kind = "redis"

    def __init__(self, redis: Redis, prefix: str, *, lease_ttl: float = LEASE_TTL,
                 lease_refresh: float = LEASE_REFRESH) -> None:
        super().__init__()
        self._redis = redis
        self._prefix = prefix
        self._lease_ttl, self._lease_refresh = lease_ttl, lease_refresh
        self._tasks: list[asyncio.Task[None]] = []
        self._subscribed = asyncio.Event()

    def lease_key(self, instance: str) -> str:
        return f"{self._prefix}replica:{instance}"

    def channel(self, instance: str | None = None) -> str:
        return f"{self._prefix}control:{instance or '*all'}"

    async def join(self, instance: str, handler: Handler) -> None:
        await super().join(instance, handler)
        await self._refresh_lease()
        self._tasks = [asyncio.create_task(self._keep_lease(), name="lmserve-cluster-lease"),
                       asyncio.create_task(self._listen(), name="lmserve-cluster-listen")]
        with contextlib.suppress(TimeoutError):  # a message sent before the subscription
            await asyncio.wait_for(self._subscribed.wait(), 5.0)  # counts would be lost

    async def leave(self) -> None:
        await super().leave()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self.instance is not None:
            with contextlib.suppress(RedisError):  # readers see the end at once, not at expiry
                await self._redis.delete(self.lease_key(self.instance))

    async def send(self, instance: str, message: JSON) -> bool:
        return int(await self._redis.publish(self.channel(instance), _dumps(message))) > 0

    async def broadcast(self, message: JSON) -> int:
        listeners = int(await self._redis.publish(self.channel(),
                                                  _dumps({**message, "from": self.instance})))
        return max(listeners - (1 if self._handler is not None else 0), 0)

    async def alive(self, instance: str) -> bool | None:
        return bool(await self._redis.exists(self.lease_key(instance)))

    async def claim(self, name: str, ttl: float = 60.0) -> bool:
        return bool(await self._redis.set(f"{self._prefix}claim:{name}", self.instance or "",
                                          nx=True, px=int(ttl * 1000)))

    async def _refresh_lease(self) -> None:
        assert self.instance is not None
        await self._redis.set(self.lease_key(self.instance), "1",
                              px=int(self._lease_ttl * 1000))

    async def _keep_lease(self) -> None:
        while True:
            await asyncio.sleep(self._lease_refresh)
            try:
                await self._refresh_lease()
            except RedisError as exc:
                log.warning("cannot refresh this replica's lease in Redis: %s", exc)

    async def _listen(self) -> None:
        assert self.instance is not None
        pubsub = self._redis.pubsub()
        channels = (self.channel(self.instance), self.channel())
        try:
            while True:
                try:
                    if not pubsub.subscribed:
                        await pubsub.subscribe(*channels)
                    message = await pubsub.get_message(timeout=None)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        self._subscribed.set()
                    elif message["type"] == "message":
                        await self._on_message(message["channel"], message["data"])
                except RedisError as exc:  # the pubsub reconnects and resubscribes by itself
                    log.warning("cluster messages from Redis interrupted: %s", exc)
                    await asyncio.sleep(_RETRY_DELAY)
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis leaves it unannotated

    async def _on_message(self, channel: str, data: str) -> None:
        try:
            message: Any = json.loads(data)
        except ValueError:
            return
        if not isinstance(message, dict) or (channel == self.channel()
                                             and message.get("from") == self.instance):
            return  # a broadcast comes back to its sender too
        await self._deliver(message)


def _dumps(message: JSON) -> str:
    return json.dumps(message, separators=(",", ":"))
