"""Stored responses and sessions in Redis, and the Redis Store (for several replicas)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from lmserve.stores.base import ResponseStore, SessionStore, Store
from lmserve.stores.cluster import LEASE_REFRESH, LEASE_TTL, RedisCluster
from lmserve.stores.records import (
    JSON,
    Clock,
    ConflictError,
    ItemPage,
    NotFoundError,
    PageQuery,
    ResponseRecord,
    Retention,
    RetentionPolicy,
    Session,
    SessionInfo,
    check_id,
    check_messages,
    copy_json,
    dumps,
    page_items,
)
from lmserve.stores.redis_scripts import APPEND_MESSAGES, CREATE, PUT_RECORD
from lmserve.stores.redis_streams import RedisStreams
from lmserve.stores.redis_table import RedisTable, expiry_args, unavailable_when_down


@unavailable_when_down
class RedisResponses(ResponseStore):
    """One JSON string per record; a page of input items is cut from the decoded record."""

    def __init__(self, redis: Redis, prefix: str, retention: Retention, clock: Clock) -> None:
        self._table = RedisTable(redis, prefix, "response", ("response:",), retention, clock)
        self._put = redis.register_script(PUT_RECORD)

    async def put(self, record: ResponseRecord) -> None:
        check_id(record.id, "response")
        now = self._table.clock()
        expires = expiry_args(self._table.retention.expires_at(now), now)
        t = self._table
        inserted = await self._put(keys=[t.key(record.id), t.order, t.expiry, t.seq],
                                   args=[record.id, repr(now), dumps(record.to_json()), *expires])
        if inserted:
            await t.evict(cap=True)

    async def get(self, response_id: str) -> ResponseRecord | None:
        results = await self._table.fetch(response_id, ("get", 0))
        if results is None or results[0] is None:  # the key may expire between the commands
            return None
        return ResponseRecord.from_json(json.loads(results[0]))

    async def delete(self, response_id: str) -> bool:
        return await self._table.delete(response_id)

    async def input_items(self, response_id: str, query: PageQuery = PageQuery()) -> ItemPage:
        record = await self.get(response_id)
        if record is None:
            raise NotFoundError("Response", response_id)
        return page_items(record.input_items, query)

    async def purge(self) -> int:
        return len(await self._table.evict(cap=True))


def _session_info(session_id: str, fields: dict[str, str], count: int) -> SessionInfo:
    return SessionInfo(session_id, fields["model"], json.loads(fields["system"]),
                       json.loads(fields["metadata"]), float(fields["created_at"]),
                       float(fields["updated_at"]), count)


@unavailable_when_down
class RedisSessions(SessionStore):
    """A hash per session and a list of JSON messages; the order set is least recently used."""

    def __init__(self, redis: Redis, prefix: str, retention: Retention, clock: Clock) -> None:
        self._table = RedisTable(redis, prefix, "session", ("session:", "messages:"), retention,
                                 clock)
        self._create = redis.register_script(CREATE)
        self._append = redis.register_script(APPEND_MESSAGES)

    async def create(self, session_id: str, *, model: str, system: str | None = None,
                     metadata: JSON | None = None) -> Session:
        check_id(session_id, "session")
        t = self._table
        await t.evict(cap=False)
        now = t.clock()
        session = Session(session_id, model, system, copy_json(metadata or {}), now, now, 0)
        fields = ["model", model, "system", dumps(system), "metadata", dumps(session.metadata),
                  "created_at", repr(now), "updated_at", repr(now)]
        created = await self._create(
            keys=[t.key(session_id), t.order, t.expiry, t.seq],
            args=[session_id, *expiry_args(t.retention.expires_at(now), now), *fields])
        if not created:
            raise ConflictError(f"Session '{session_id}' already exists.", "already_exists")
        await t.evict(cap=True)
        return session

    async def get(self, session_id: str, *, messages: bool = True) -> Session | None:
        transcript = ("lrange", 1, 0, -1) if messages else ("llen", 1)
        results = await self._table.fetch(session_id, ("hgetall", 0), transcript)
        if results is None or not results[0]:
            return None
        fields, listed = results
        items = [json.loads(m) for m in listed] if messages else []
        count = len(items) if messages else int(listed)
        return Session(**vars(_session_info(session_id, fields, count)), messages=items)

    async def append(self, session_id: str, messages: Sequence[JSON]) -> SessionInfo:
        batch = [dumps(message) for message in check_messages(messages)]
        t = self._table
        now = t.clock()
        count, *flat = await self._append(
            keys=[t.key(session_id), t.key(session_id, 1), t.order, t.expiry, t.seq],
            args=[session_id, repr(now), *expiry_args(t.retention.expires_at(now), now), *batch])
        if count < 0:
            raise NotFoundError("Session", session_id)
        fields = dict(zip(flat[0][::2], flat[0][1::2], strict=True))
        return _session_info(session_id, fields, count)

    async def delete(self, session_id: str) -> bool:
        return await self._table.delete(session_id)

    async def _recent(self, limit: int) -> list[SessionInfo]:
        t = self._table
        await t.evict(cap=False)
        # decode_responses=True and no scores: the members as str
        ids = cast("list[str]", await t.redis.zrevrange(t.order, 0, limit - 1))
        async with t.redis.pipeline(transaction=False) as pipe:
            for session_id in ids:
                pipe.hgetall(t.key(session_id))
                pipe.llen(t.key(session_id, 1))
            results = await pipe.execute()
        return [_session_info(session_id, fields, count)
                for session_id, fields, count in zip(ids, results[::2], results[1::2], strict=True)
                if fields]

    async def purge(self) -> int:
        return len(await self._table.evict(cap=True))


def redacted(url: str) -> str:
    """The URL without its password, for logs and /server_info."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = f"{parts.username}:***@" if parts.username else ":***@"
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=user + host))


def lease_option(url: str) -> tuple[str, float]:
    """The URL without lmserve's own `lease_ttl=SECONDS` option (how soon the replicas sharing
    the store count a silent replica as gone; default LEASE_TTL), and that option's value."""
    parts = urlsplit(url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    given = [value for key, value in pairs if key == "lease_ttl"]
    if not given:
        return url, LEASE_TTL
    try:
        ttl = float(given[-1])
    except ValueError:
        ttl = float("nan")
    if not 1.0 <= ttl <= 3600.0:
        raise ValueError(f"the Redis store option lease_ttl={given[-1]!r} must be a number of "
                         "seconds from 1 to 3600")
    rest = urlencode([(key, value) for key, value in pairs if key != "lease_ttl"])
    return urlunsplit(parts._replace(query=rest)), ttl


async def open_redis(url: str, retention: RetentionPolicy, clock: Clock, *,
                     prefix: str = "lmserve:", poll_interval: float = 0.5) -> Store:
    # A pooled connection left from before a Redis restart fails on its next command; retried
    # on a fresh connection, so lmserve recovers at once. While Redis is down, the two quick
    # retries keep the 503 prompt.
    url, lease_ttl = lease_option(url)
    client = Redis.from_url(url, decode_responses=True,
                            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
                            retry_on_error=[RedisConnectionError, RedisTimeoutError])
    try:
        await client.ping()
    except RedisError as exc:
        await client.aclose()
        raise ConnectionError(f"cannot reach Redis at {redacted(url)}: {exc}") from exc
    streams = RedisStreams(client, prefix, retention.streams, clock, poll_interval)

    async def close() -> None:
        await streams.stop()
        await client.aclose()

    return Store("redis", f"{redacted(url)} prefix={prefix!r}", streams=streams,
                 responses=RedisResponses(client, prefix, retention.responses, clock),
                 sessions=RedisSessions(client, prefix, retention.sessions, clock), closer=close,
                 cluster=RedisCluster(client, prefix, lease_ttl=lease_ttl,
                                      lease_refresh=min(LEASE_REFRESH, lease_ttl / 5)))
