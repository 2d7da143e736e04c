"""Resumable stream frames in Redis: a hash per stream, a Redis stream of frames, pub/sub wake-ups.

Followers do not hold a blocking XREAD each (one connection per follower would exhaust the
pool); one subscriber connection per process fans the "changed" messages out to local waiters,
and a slow poll covers messages missed while that connection reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from lmserve.stores.base import StreamStore
from lmserve.stores.records import (
    JSON,
    Clock,
    ConflictError,
    Frame,
    NotFoundError,
    StreamInfo,
    StreamRetention,
    StreamState,
    check_id,
    copy_json,
    dumps,
)
from lmserve.stores.redis_scripts import APPEND_FRAME, CREATE, FINISH
from lmserve.stores.redis_table import RedisTable, expiry_args, unavailable_when_down

log = logging.getLogger("lmserve.stores")
_RETRY_DELAY = 1.0  # seconds between attempts to restore the wake-up subscription
_SUBSCRIBE_WAIT = 5.0  # at most this long for the first subscription to be confirmed


def _info(stream_id: str, fields: dict[str, str]) -> StreamInfo:
    finished_at = fields.get("finished_at", "")
    return StreamInfo(stream_id, StreamState(fields["state"]), json.loads(fields["meta"]),
                      float(fields["created_at"]), float(finished_at) if finished_at else None,
                      int(fields["last_id"]))


@unavailable_when_down
class RedisStreams(StreamStore):
    def __init__(self, redis: Redis, prefix: str, retention: StreamRetention, clock: Clock,
                 poll_interval: float = 0.5) -> None:
        super().__init__(poll_interval)
        self._redis = redis
        self._retention = retention
        self._table = RedisTable(redis, prefix, "stream", ("stream:", "frames:"), retention, clock)
        self._channel = f"{prefix}streams:changed"
        self._listener: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._create = redis.register_script(CREATE)
        self._append = redis.register_script(APPEND_FRAME)
        self._finish = redis.register_script(FINISH)

    async def create(self, stream_id: str, meta: JSON | None = None) -> StreamInfo:
        check_id(stream_id, "stream")
        await self._evict(cap=False)
        now = self._table.clock()
        info = StreamInfo(stream_id, StreamState.OPEN, copy_json(meta or {}), now, None, 0)
        fields = ["meta", dumps(info.meta), "state", info.state.value, "created_at", repr(now),
                  "finished_at", "", "last_id", 0]
        created = await self._create(
            keys=[self._table.key(stream_id), self._table.order, self._table.expiry,
                  self._table.seq],
            args=[stream_id, *expiry_args(self._retention.open_expires_at(now), now), *fields])
        if not created:
            raise ConflictError(f"Stream '{stream_id}' already exists.", "already_exists")
        await self._evict(cap=True)
        return info

    async def append(self, stream_id: str, event: str, data: str) -> int:
        frame_id = int(await self._append(keys=self._keys(stream_id),
                                          args=[stream_id, repr(self._table.clock()), str(event),
                                                str(data), self._channel]))
        if frame_id == -1:
            raise NotFoundError("Stream", stream_id)
        if frame_id == -2:
            raise ConflictError(f"Stream '{stream_id}' is finished.", "stream_finished")
        return frame_id

    async def read(self, stream_id: str, after: int = 0, limit: int | None = None) -> list[Frame]:
        results = await self._table.fetch(
            stream_id, ("xrange", 1, f"{max(after, 0) + 1}-0", "+", limit))
        if results is None:
            return []
        return [Frame(int(entry_id.split("-")[0]), fields["event"], fields["data"])
                for entry_id, fields in results[0]]

    async def finish(self, stream_id: str, state: StreamState = StreamState.COMPLETED) -> bool:
        if state is StreamState.OPEN:
            raise ValueError("finish needs a terminal state")
        now = self._table.clock()
        changed = int(await self._finish(
            keys=self._keys(stream_id),
            args=[stream_id, repr(now), state.value,
                  *expiry_args(self._retention.expires_at(now), now), self._channel]))
        if changed == -1:
            raise NotFoundError("Stream", stream_id)
        return changed == 1

    async def get(self, stream_id: str) -> StreamInfo | None:
        results = await self._table.fetch(stream_id, ("hgetall", 0))
        return None if results is None else _info(stream_id, results[0])

    async def delete(self, stream_id: str) -> bool:
        found = await self._table.delete(stream_id)
        await self._redis.publish(self._channel, stream_id)
        return found

    async def purge(self) -> int:
        return len(await self._evict(cap=True))

    async def stop(self) -> None:
        """Stop the subscriber task (called by Store.close)."""
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None

    def _keys(self, stream_id: str) -> list[str]:
        return [self._table.key(stream_id), self._table.key(stream_id, 1), self._table.expiry]

    async def _evict(self, *, cap: bool) -> list[str]:
        gone = await self._table.evict(cap=cap)
        for stream_id in gone:
            await self._redis.publish(self._channel, stream_id)
        return gone

    async def _before_wait(self) -> None:
        """Start the subscriber once, and let the first waiters see it confirmed, since a
        message published before the server registers the subscription is not delivered."""
        if self._listener is None:
            self._listener = asyncio.create_task(self._listen(), name="lmserve-redis-streams")
        if not self._subscribed.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._subscribed.wait(), _SUBSCRIBE_WAIT)

    async def _listen(self) -> None:
        pubsub = self._redis.pubsub()
        try:
            while True:
                try:
                    await self._relay(pubsub)
                except RedisError as exc:  # the pubsub reconnects and resubscribes by itself
                    log.warning("stream wake-ups from Redis interrupted: %s", exc)
                    await asyncio.sleep(_RETRY_DELAY)
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis leaves it unannotated

    async def _relay(self, pubsub: PubSub) -> None:
        if not pubsub.subscribed:
            await pubsub.subscribe(self._channel)
        message = await pubsub.get_message(timeout=None)
        if message is None:
            return
        if message["type"] == "subscribe":
            self._subscribed.set()
        elif message["type"] == "message":
            self.notifier.notify(message["data"])
